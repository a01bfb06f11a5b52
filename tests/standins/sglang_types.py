"""SGLang's own request types and sampling functions, for the loopback stand-in.

``sglang.srt.managers.io_struct`` cannot be imported on a CPU-only torch: its import
chain (``schedule_batch`` -> ``configs`` -> ``multimodal.internvl_utils``) imports
``torchvision``, whose PyPI wheels link ``libtorch_cuda.so``. So ``GenerateReqInput``
is taken from the installed package's own source instead: the class (with its
``normalize_batch_and_arguments`` and every validator) is cut out of ``io_struct.py``
with ``ast`` and executed against the real modules it needs, which import fine. Two
aliases and one helper that live in ``schedule_batch`` are cut out of that file the
same way. SGLang's PyTorch sampling functions are cut out of ``layers/sampler.py`` the
same way (that module imports Triton kernels). Nothing is written from memory: a field
or function SGLang renames breaks this loader.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


def _source(module: str) -> tuple[Path, ast.Module]:
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("sglang is not installed (see tests/standins/README in the report)")
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / Path(*module.split(".")[1:]).with_suffix(".py")
    return path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _exec_nodes(nodes: list[ast.stmt], filename: str, namespace: dict[str, Any]) -> None:
    code = compile(ast.Module(body=nodes, type_ignores=[]), filename, "exec")
    exec(code, namespace)  # noqa: S102 - SGLang's own, installed source


def _load() -> ModuleType:
    import dataclasses
    import logging
    import typing

    from sglang.srt.sampling.sampling_params import SamplingParams

    module = ModuleType("atlas_standin_sglang_io_struct")
    ns = module.__dict__
    ns["__name__"] = module.__name__
    ns["logger"] = logging.getLogger("sglang.io_struct")
    sys.modules[module.__name__] = module  # dataclasses and pydantic resolve names there

    # schedule_batch's aliases and helper the request class refers to.
    sb_path, sb_tree = _source("sglang.srt.managers.schedule_batch")
    wanted = {"ReturnHiddenStatesMode", "SamplingLogprobsMode", "get_return_hidden_states_mode"}
    sb_nodes: list[ast.stmt] = []
    for node in sb_tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id in wanted for t in node.targets
        ):
            sb_nodes.append(node)
        elif isinstance(node, ast.FunctionDef) and node.name in wanted:
            sb_nodes.append(node)
    ns.update({k: getattr(typing, k) for k in ("Union", "Literal", "List")})
    # forward_batch_info imports the same torchvision chain: its enum is cut out too.
    fb_path, fb_tree = _source("sglang.srt.model_executor.forward_batch_info")
    fb_nodes = [
        n for n in fb_tree.body if isinstance(n, ast.ClassDef) and n.name == "CaptureHiddenMode"
    ]
    from enum import IntEnum
    from functools import total_ordering

    ns.update(IntEnum=IntEnum, total_ordering=total_ordering)
    _exec_nodes(fb_nodes, str(fb_path), ns)
    _exec_nodes(sb_nodes, str(sb_path), ns)
    missing = wanted - ns.keys()
    if missing:
        raise ImportError(f"schedule_batch no longer defines {sorted(missing)}")

    # io_struct: every import that works, its module-level aliases, then the class.
    io_path, io_tree = _source("sglang.srt.managers.io_struct")
    nodes: list[ast.stmt] = []
    for node in io_tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "sglang.srt.managers.schedule_batch":
            from sglang.srt.multimodal.modality import Modality

            ns["Modality"] = Modality
            ns["MultimodalProcessorOutput"] = Any
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            nodes.append(node)
        elif isinstance(node, ast.If):  # TYPE_CHECKING: Image = Any
            nodes.append(node)
        elif isinstance(node, ast.Assign) and all(
            isinstance(t, ast.Name) and t.id.endswith(("InputItem", "InputFormat"))
            for t in node.targets
        ):
            nodes.append(node)
        elif isinstance(node, ast.ClassDef) and node.name == "GenerateReqInput":
            nodes.append(node)
            break
    else:
        raise ImportError("io_struct no longer defines GenerateReqInput")
    _exec_nodes(nodes, str(io_path), ns)
    ns["SamplingParams"] = SamplingParams
    assert dataclasses.is_dataclass(ns["GenerateReqInput"])
    return module


io_struct = _load()
GenerateReqInput = io_struct.GenerateReqInput


def _load_sampler() -> ModuleType:
    """SGLang's PyTorch sampling functions, cut out of ``layers/sampler.py`` (that module
    imports Triton kernels and the distributed runtime, which a CPU cannot load)."""
    from typing import Optional

    import torch
    from sglang.srt.environ import envs

    module = ModuleType("atlas_standin_sglang_sampler")
    ns = module.__dict__

    def multinomial_with_seed(*_: Any, **__: Any) -> Any:
        raise NotImplementedError("SGLang's seeded sampling hashes with a Triton kernel")

    ns.update(torch=torch, Optional=Optional, envs=envs)
    ns["multinomial_with_seed"] = multinomial_with_seed
    wanted = {"sampling_from_probs_torch", "top_k_top_p_min_p_sampling_from_probs_torch"}
    path, tree = _source("sglang.srt.layers.sampler")
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    _exec_nodes(nodes, str(path), ns)
    missing = wanted - ns.keys()
    if missing:
        raise ImportError(f"sglang's sampler no longer defines {sorted(missing)}")
    return module


sampler = _load_sampler()

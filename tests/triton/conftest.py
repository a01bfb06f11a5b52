"""The Triton backend against the loopback stand-in serving SmolLM2-135M in float32 as
TensorRT-LLM's ``tensorrt_llm`` model.

The stand-in checks every ModelInfer as Triton does, so a malformed request from the
backend fails the test that sent it (``no_rejections``). References come from the torch
backend on the same weights (its own caches).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from atlas_sidecar import models
from atlas_sidecar.engine.backends.sglang import target_spec
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.backends.triton import TritonBackend
from atlas_sidecar.tooling import workloads
from tests.standins.triton_server import TritonStandin

AGREEING_LAYERS = 27  # as tests/engine: a real, different draft model of the same tokenizer
MAX_TOKENS = 24


@pytest.fixture(scope="session", autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def served_model() -> CausalLMRunner:
    models.pull(models.TEST_MODEL)  # a no-op when cached
    return CausalLMRunner.load(models.TEST_MODEL, dtype="fp32")


@pytest.fixture(scope="session")
def torch_target(served_model: CausalLMRunner) -> CausalLMRunner:
    """The torch backend on the served weights, with its own caches: the reference."""
    return CausalLMRunner(served_model.model, served_model.tokenizer)


@pytest.fixture(scope="session")
def draft_model() -> CausalLMRunner:
    return CausalLMRunner.load(models.TEST_MODEL, dtype="fp32", num_layers=AGREEING_LAYERS)


@pytest.fixture(scope="session")
def prompts(torch_target: CausalLMRunner) -> list[list[int]]:
    """Two HumanEval (Python) and two MT-Bench (chat) prompts, as token ids."""
    chosen = workloads.humaneval(2) + workloads.mtbench(2)
    return [workloads.encode(torch_target.tokenizer, p) for p in chosen]


@pytest.fixture(scope="session")
def _standin(served_model: CausalLMRunner) -> Iterator[TritonStandin]:
    standin = TritonStandin(served_model).start()
    yield standin
    standin.stop()


@pytest.fixture
def standin(_standin: TritonStandin) -> Iterator[TritonStandin]:
    """The stand-in, up and without faults."""
    _standin.delay_s = 0.0
    _standin.die_after_requests = None
    if not _standin.running:
        _standin.start()
    _standin.rejected.clear()
    yield _standin
    _standin.delay_s = 0.0
    if not _standin.running:
        _standin.start()


@pytest.fixture
def no_rejections(standin: TritonStandin) -> Iterator[None]:
    yield
    assert standin.rejected == [], "the backend sent requests Triton would refuse"


@pytest.fixture
def backend(standin: TritonStandin) -> Iterator[TritonBackend]:
    backend = TritonBackend(standin.url, target_spec(models.TEST_MODEL), timeout_s=30.0)
    backend.wait_ready(timeout_s=30.0)
    yield backend
    backend.close()

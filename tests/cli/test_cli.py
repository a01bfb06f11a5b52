"""The `atlas` command end to end, as a user runs it (subprocesses, real model)."""

from __future__ import annotations

import json
import subprocess
import sys

from atlas_sidecar import models

SMOL = models.TEST_MODEL


def atlas(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "atlas_sidecar.cli", *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_generate_prints_text_and_statistics():
    models.pull(SMOL)
    result = atlas(
        "generate", "Write a Python function that reverses a string.",
        "--target", SMOL, "--draft", SMOL, "--dtype", "fp32", "--max-tokens", "24",
        "--speculator", "static",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "def " in result.stdout
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    assert stats["completion_tokens"] == 24
    assert stats["speculator"] == "static"
    # The drafter is the target itself here: nearly every draft token is accepted.
    assert stats["accept_len"] > 3


def test_bad_input_exits_2_with_a_clear_message():
    cases = [
        (("generate", "", "--target", SMOL, "--speculator", "none"), "prompt: must not be empty"),
        (("generate", "hi", "--target", SMOL, "--speculator", "none", "--max-tokens", "0"),
         "max_tokens: must be a positive integer"),
        (("generate", "hi", "--target", "no-such-model"), "unknown model 'no-such-model'"),
        (("generate", "hi", "--target", SMOL, "--speculator", "none", "--max-tokens",
          "100000000"), "exceeds what the model's context leaves"),
    ]  # fmt: skip
    for args, message in cases:
        result = atlas(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_models_list_shows_the_registry():
    result = atlas("models", "list")
    assert result.returncode == 0
    for name in models.REGISTRY:
        assert name in result.stdout

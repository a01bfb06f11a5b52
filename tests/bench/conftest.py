"""The small real model as target, a layer-skip copy of it as draft, for bench and peers."""

from __future__ import annotations

import pytest
import torch

from atlas_sidecar import models
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner

SMOL = models.TEST_MODEL
# The target's first 27 of 30 layers: a real, different model of the same tokenizer
# that agrees with the target often but not always (as in tests/engine).
DRAFT_LAYERS = 27


@pytest.fixture(scope="session", autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def smol() -> str:
    models.pull(SMOL)  # a no-op when cached; `make test` pulls it beforehand
    return SMOL


@pytest.fixture(scope="session")
def target(smol: str) -> CausalLMRunner:
    return CausalLMRunner.load(smol, dtype="fp32")


@pytest.fixture(scope="session")
def draft(smol: str) -> CausalLMRunner:
    return CausalLMRunner.load(smol, dtype="fp32", num_layers=DRAFT_LAYERS)

"""Real models for engine tests, loaded once per session, in float32 for exactness."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from atlas_sidecar import models
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.tooling import workloads

SMOL = models.TEST_MODEL
# A layer-skip drafter (the target's first N of 30 layers): a real, different model
# of the same tokenizer. 27 layers agree with the target often but not always.
AGREEING_LAYERS = 27
# 12 layers disagree most of the time: the hard case for rejection sampling.
DISAGREEING_LAYERS = 12


@pytest.fixture(scope="session", autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def smol_pulled() -> str:
    models.pull(SMOL)  # a no-op when cached; `make test` pulls it beforehand
    return SMOL


@pytest.fixture(scope="session")
def target(smol_pulled: str) -> CausalLMRunner:
    return CausalLMRunner.load(smol_pulled, dtype="fp32")


@pytest.fixture(scope="session")
def layer_skip() -> Callable[[int], CausalLMRunner]:
    loaded: dict[int, CausalLMRunner] = {}

    def get(num_layers: int) -> CausalLMRunner:
        if num_layers not in loaded:
            loaded[num_layers] = CausalLMRunner.load(SMOL, dtype="fp32", num_layers=num_layers)
        return loaded[num_layers]

    return get


@pytest.fixture(scope="session")
def real_prompts() -> list[workloads.Prompt]:
    """12 HumanEval (Python) and 12 MT-Bench (chat) prompts."""
    return workloads.humaneval(12) + workloads.mtbench(12)

"""The SGLang backend against the loopback stand-in serving SmolLM2-135M in float32.

The stand-in checks every /generate body with SGLang's own request types, so a
malformed request from the backend fails the test that sent it (``no_rejections``).
References come from the torch backend on the same weights (its own caches).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from atlas_sidecar import models
from atlas_sidecar.engine.backends.sglang import SGLangBackend, target_spec
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.tooling import workloads
from tests.standins.sglang_server import SGLangStandin

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
def _standin(served_model: CausalLMRunner) -> Iterator[SGLangStandin]:
    standin = SGLangStandin(served_model, models.TEST_MODEL).start()
    yield standin
    standin.stop()


@pytest.fixture
def standin(_standin: SGLangStandin) -> Iterator[SGLangStandin]:
    """The stand-in, up and without faults; the test fails if it refused any request."""
    _standin.delay_s = 0.0
    _standin.die_after_requests = None
    _standin.return_original_logprob = False
    if _standin._server is None:
        _standin.start()
    _standin.rejected.clear()
    yield _standin
    if _standin._server is None:
        _standin.start()
    _standin.delay_s = 0.0
    _standin.return_original_logprob = False


@pytest.fixture
def no_rejections(standin: SGLangStandin) -> Iterator[None]:
    yield
    assert standin.rejected == [], "the backend sent requests SGLang would refuse"


@pytest.fixture
def backend(standin: SGLangStandin) -> SGLangBackend:
    backend = SGLangBackend(standin.url, target_spec(models.TEST_MODEL), timeout_s=30.0)
    backend.wait_ready(timeout_s=30.0)
    return backend

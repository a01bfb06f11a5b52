"""The real target/draft pair: Qwen2.5-Coder 1.5B verified against its 0.5B draft."""

from __future__ import annotations

import pytest

from atlas_sidecar import models
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.static import StaticSpeculator
from atlas_sidecar.tooling.workloads import encode

pytestmark = [
    pytest.mark.qwen,
    pytest.mark.skipif(
        not (models.is_pulled(models.DEFAULT_TARGET) and models.is_pulled(models.DEFAULT_DRAFT)),
        reason="Qwen pair not pulled: run `atlas models pull` (make test does)",
    ),
]


@pytest.mark.parametrize("weights", ["native", "int8"])  # int8: the CPU default for drafts
def test_qwen_static_speculation_is_exact_in_float32(real_prompts, weights):
    target = CausalLMRunner.load(models.DEFAULT_TARGET, dtype="fp32")
    draft = CausalLMRunner.load(models.DEFAULT_DRAFT, dtype="fp32", weights=weights)
    plain = Engine(target, target.tokenizer)
    spec = Engine(target, target.tokenizer, StaticSpeculator(draft), 4)
    accepted = 0
    for prompt in (real_prompts[0], real_prompts[1], real_prompts[-1]):
        ids = encode(target.tokenizer, prompt)
        params = SamplingParams(max_tokens=24)
        got = spec.generate(ids, params)
        assert got.token_ids == plain.generate(ids, params).token_ids, prompt.prompt_id
        accepted += got.accepted
    assert accepted > 0  # the 0.5B really drafts for the 1.5B

"""Every mode, the controller included, is lossless on real prompts (float32)."""

from __future__ import annotations

from atlas_sidecar.engine.build import MODES, build_engine
from atlas_sidecar.engine.controller import CostModel
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.tooling.workloads import encode

from .conftest import AGREEING_LAYERS


class FixedCosts(CostModel):
    """A forward costs little more for more tokens (as on a GPU); drafting is free.

    The controller's choices then depend on acceptance alone, not on how busy the
    test machine happens to be (a loaded machine can make every draft look unprofitable)."""

    def verify(self, tokens_fed: int, rows: int = 1) -> float:
        return 1.0 + 0.01 * tokens_fed

    def draft_per_token(self, speculator: str) -> float:
        return 0.0


def test_all_modes_match_target_greedy_across_a_drift(target, layer_skip, real_prompts):
    engines = {m: build_engine(m, target, layer_skip(AGREEING_LAYERS)) for m in MODES}
    engines["atlas"].policy.costs = FixedCosts()
    chosen: set[str] = set()
    for prompt in real_prompts[:5] + real_prompts[-5:]:
        ids = encode(target.tokenizer, prompt)
        params = SamplingParams(max_tokens=32)
        expected = engines["none"].generate(ids, params).token_ids
        for mode, engine in engines.items():
            result = engine.generate(ids, params)
            assert result.token_ids == expected, (mode, prompt.prompt_id)
            if mode == "atlas":
                chosen.update(s.speculator for s in result.steps)
    assert "suffix" in chosen  # the controller really speculated
    assert target.live_sequences == 0

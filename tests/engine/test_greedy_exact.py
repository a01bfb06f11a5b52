"""Greedy speculative output is token-for-token the target's own greedy output."""

from __future__ import annotations

import pytest
import torch

from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.static import StaticSpeculator
from atlas_sidecar.tooling.workloads import encode

from .conftest import AGREEING_LAYERS, DISAGREEING_LAYERS

MAX_TOKENS = 32


def test_none_engine_equals_hugging_face_greedy(target, real_prompts):
    engine = Engine(target, target.tokenizer)
    for prompt in real_prompts[:3] + real_prompts[-3:]:
        ids = encode(target.tokenizer, prompt)
        ours = engine.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
        hf = target.model.generate(
            torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
            min_new_tokens=MAX_TOKENS,
        )[0, len(ids):].tolist()  # fmt: skip
        assert ours.token_ids == hf, prompt.prompt_id


def test_static_speculator_greedy_matches_target_on_24_real_prompts(
    target, layer_skip, real_prompts
):
    plain = Engine(target, target.tokenizer)
    spec = Engine(target, target.tokenizer, StaticSpeculator(layer_skip(AGREEING_LAYERS)), 4)
    partial_steps = 0
    assert len(real_prompts) >= 20
    for prompt in real_prompts:
        ids = encode(target.tokenizer, prompt)
        params = SamplingParams(max_tokens=MAX_TOKENS)
        expected = plain.generate(ids, params)
        got = spec.generate(ids, params)
        assert got.token_ids == expected.token_ids, prompt.prompt_id
        assert got.text == expected.text
        assert got.finish_reason == expected.finish_reason
        partial_steps += sum(0 < s.accepted < s.drafted for s in got.steps)
    # The drafter must really have been tested: some drafts partly rejected.
    assert partial_steps > 10


@pytest.mark.parametrize("lookahead", [1, 2, 7, 16])
def test_any_lookahead_is_lossless(target, layer_skip, real_prompts, lookahead):
    plain = Engine(target, target.tokenizer)
    spec = Engine(
        target, target.tokenizer, StaticSpeculator(layer_skip(DISAGREEING_LAYERS)), lookahead
    )
    for prompt in (real_prompts[0], real_prompts[-1]):
        ids = encode(target.tokenizer, prompt)
        params = SamplingParams(max_tokens=20)
        assert spec.generate(ids, params).token_ids == plain.generate(ids, params).token_ids


def test_every_sequence_is_released(target, layer_skip, real_prompts):
    drafter = layer_skip(AGREEING_LAYERS)
    spec = Engine(target, target.tokenizer, StaticSpeculator(drafter), 4)
    ids = encode(target.tokenizer, real_prompts[0])
    spec.generate(ids, SamplingParams(max_tokens=8))
    for _ in spec.generate_stream(ids, SamplingParams(max_tokens=8)):
        break  # a consumer that walks away mid-stream
    assert target.live_sequences == 0
    assert drafter.live_sequences == 0

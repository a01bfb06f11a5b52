"""KV rollback, stop strings across draft boundaries, EOS, and bad input."""

from __future__ import annotations

import time

import pytest
import torch

from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.base import DraftRequest
from atlas_sidecar.engine.speculators.static import StaticSpeculator
from atlas_sidecar.errors import RequestError
from atlas_sidecar.tooling.workloads import encode

from .conftest import AGREEING_LAYERS


@pytest.fixture(scope="module")
def spec(target, layer_skip):
    return Engine(target, target.tokenizer, StaticSpeculator(layer_skip(AGREEING_LAYERS)), 4)


def test_kv_cache_after_partial_acceptance_equals_a_fresh_prefill(target, spec, real_prompts):
    ids = encode(target.tokenizer, real_prompts[2])
    seq = spec.start(ids, SamplingParams(max_tokens=40))
    try:
        partial = False
        while not seq.finished and not partial:
            spec.step(seq)
            partial = 0 < seq.steps[-1].accepted < seq.steps[-1].drafted
        assert partial, "no partially accepted draft in 40 tokens"
        context = seq.prompt + seq.output
        # Invariant: the cache covers everything but the pending last token.
        assert target.cached_len(seq.seq_id) == len(context) - 1
        next_logits = target.forward(seq.seq_id, [context[-1]])[-1]
    finally:
        spec.release(seq)
    target.start("fresh")
    try:
        fresh_logits = target.forward("fresh", context)[-1]
    finally:
        target.release("fresh")
    torch.testing.assert_close(next_logits, fresh_logits, rtol=1e-4, atol=1e-4)


def _step_boundaries(result) -> list[int]:
    """Output positions where a new target step begins (after the prefill token)."""
    positions, pos = [], 1
    for step in result.steps:
        positions.append(pos)
        pos += step.accepted + 1
    return positions


def test_stop_string_straddling_a_draft_boundary_ends_output_like_the_target(
    target, spec, real_prompts
):
    tok = target.tokenizer
    ids = encode(tok, real_prompts[0])
    free = spec.generate(ids, SamplingParams(max_tokens=40))
    # Pick a boundary after several multi-token steps; the stop string is the text of
    # the last token before it and the first token after it.
    boundary = next(b for b in _step_boundaries(free) if b >= 8)
    stop = tok.decode(free.token_ids[boundary - 1 : boundary + 1])
    assert stop.strip(), "boundary tokens decode to whitespace only"
    params = SamplingParams(max_tokens=40, stop=(stop,))
    plain = Engine(target, tok).generate(ids, params)
    got = spec.generate(ids, params)
    assert got.token_ids == plain.token_ids
    assert got.text == plain.text
    assert got.finish_reason == "stop"
    assert stop not in got.text
    full_text = tok.decode(free.token_ids, skip_special_tokens=True)
    assert full_text.startswith(got.text)
    assert len(got.token_ids) <= boundary + 1


def test_stop_string_inside_one_accepted_chunk(target, spec, real_prompts):
    tok = target.tokenizer
    ids = encode(tok, real_prompts[0])
    free = spec.generate(ids, SamplingParams(max_tokens=40))
    boundaries = _step_boundaries(free)
    # A step that accepted at least two draft tokens: stop on its middle token.
    index = next(i for i, s in enumerate(free.steps) if s.accepted >= 2)
    middle = boundaries[index] + 1
    stop = tok.decode(free.token_ids[middle : middle + 1])
    params = SamplingParams(max_tokens=40, stop=(stop,))
    plain = Engine(target, tok).generate(ids, params)
    got = spec.generate(ids, params)
    assert (got.token_ids, got.text, got.finish_reason) == (
        plain.token_ids, plain.text, "stop",
    )  # fmt: skip


def test_eos_ends_generation_with_stop(target, spec):
    ids = encode(target.tokenizer, "Answer with one word, yes or no: is the sky blue?")
    got = spec.generate(ids, SamplingParams(max_tokens=100))
    plain = Engine(target, target.tokenizer).generate(ids, SamplingParams(max_tokens=100))
    assert got.token_ids == plain.token_ids
    assert got.finish_reason == "stop"
    assert got.token_ids[-1] in target.eos_token_ids
    assert len(got.token_ids) < 100
    assert got.text and "<|im_end|>" not in got.text


def test_max_tokens_is_exact_even_mid_draft(target, spec, real_prompts):
    ids = encode(target.tokenizer, real_prompts[0])
    for n in (1, 2, 3, 5, 9):
        got = spec.generate(ids, SamplingParams(max_tokens=n, ignore_eos=True))
        assert len(got.token_ids) == n
        assert got.finish_reason == "length"


@pytest.mark.parametrize(
    ("prompt_ids", "params", "field"),
    [
        ([], SamplingParams(), "prompt"),
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
        ([1, 2], SamplingParams(max_tokens=-5), "max_tokens"),
        ([1, 2], SamplingParams(max_tokens=10**9), "max_tokens"),
        ([1, 2], SamplingParams(temperature=-1.0), "temperature"),
        ([1, 2], SamplingParams(temperature=1.0, top_p=0.0), "top_p"),
        ([1, 2], SamplingParams(top_k=-1), "top_k"),
        ([1, 2], SamplingParams(stop=("",)), "stop"),
        ([1, 10**9], SamplingParams(), "prompt_token_ids"),
        ([-1], SamplingParams(), "prompt_token_ids"),
    ],
)
def test_bad_requests_name_the_field_and_leak_nothing(target, spec, prompt_ids, params, field):
    with pytest.raises(RequestError) as info:
        spec.generate(prompt_ids, params)
    assert info.value.field == field
    assert target.live_sequences == 0


def test_prompt_longer_than_the_context_is_rejected(target, spec):
    too_long = [1] * target.max_context
    with pytest.raises(RequestError, match="exceed the context"):
        spec.generate(too_long, SamplingParams(max_tokens=1))


def test_a_draft_models_first_call_does_not_bill_its_prompts_prefill_to_one_token(
    layer_skip, real_prompts
):
    # The first call on a sequence feeds its whole prompt to the draft model. Drafting
    # one token there measures no steady step; reporting nothing would have the
    # controller time the whole call, prefill and all, as that one token's cost (and
    # never ask the drafter again, it would look so dear).
    speculator = StaticSpeculator(layer_skip(AGREEING_LAYERS))
    prompt = encode(layer_skip(AGREEING_LAYERS).tokenizer, real_prompts[0])
    assert len(prompt) > 40
    started = time.perf_counter()
    (draft,) = speculator.propose([DraftRequest("p", prompt, 1, SamplingParams())])
    call_s = time.perf_counter() - started
    speculator.release("p")
    assert len(draft.tokens) == 1
    assert draft.token_cost_s is not None
    assert draft.token_cost_s < call_s / 4

"""Sampled requests through SGLang follow the target's distribution exactly.

The stand-in draws with SGLang's own sampling functions from the real model, so the
distribution checked here is the one SGLang samples from. As tests/engine/test_sampling:
an empirical histogram of the tokens produced at one position is compared with the
target's probabilities by total-variation distance, with fixed seeds, and a negative
control shows the same check catches output that trusts the draft.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from atlas_sidecar import models
from atlas_sidecar.engine.backends.base import SampledItem
from atlas_sidecar.engine.backends.sglang import SGLangBackend, target_spec
from atlas_sidecar.engine.build import build_engine
from atlas_sidecar.engine.capabilities import TargetCapabilities
from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.sampling import SamplingParams, probs_from_logits
from atlas_sidecar.errors import RequestError

# top_k alone: SGLang's filter and ATLAS's probs_from_logits agree (ties aside), and 20
# tokens keep the histogram small enough for a few thousand draws.
PARAMS = SamplingParams(temperature=1.0, top_k=20, max_tokens=8)
DRAWS = 2_000
LANES = 8


def total_variation(counts: Counter[int], probs: torch.Tensor) -> float:
    n = sum(counts.values())
    support = set(counts) | set(torch.nonzero(probs).flatten().tolist())
    return 0.5 * sum(abs(counts.get(t, 0) / n - float(probs[t])) for t in support)


def _rows(runner, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] logits: row i is the distribution after ids[i]."""
    runner.start("probe")
    try:
        return runner.forward("probe", ids)
    finally:
        runner.release("probe")


def _probs(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return probs_from_logits(row[None], params)[0]


@pytest.fixture(scope="module")
def position(torch_target, draft_model, prompts) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """A prefix after which the target's and a real drafter's (SmolLM2's first 27
    layers) top-k distributions half agree, so a draft is both accepted and rejected,
    and the rejection rule tells from matching; the target's top token is no sure thing.
    (prefix, the target's logits after it, the drafter's)."""
    for ids in reversed(prompts):
        target, drafter = _rows(torch_target, ids), _rows(draft_model, ids)
        for end in range(8, len(ids) + 1):
            p, q = _probs(target[end - 1], PARAMS), _probs(drafter[end - 1], PARAMS)
            overlap = float(torch.minimum(p, q).sum())
            matched = float((p * q).sum())
            if 0.3 < overlap < 0.75 and overlap - matched > 0.1 and 0.2 < float(p.max()) < 0.8:
                return ids[:end], target[end - 1], drafter[end - 1]
    raise AssertionError("no position where the drafter half agrees with the target")


def _draws(
    backend: SGLangBackend, ids: list[int], drafts: list[int], probs, params, seed: int
) -> tuple[Counter[int], int]:
    """The token produced at the position after ``ids`` for each draft token, and how
    many drafts were accepted: SGLang verifies a one-token draft per sequence,
    ``LANES`` sequences a call, as the engine's batched step would."""
    generator = torch.Generator().manual_seed(seed)
    lanes = [f"s{i}" for i in range(LANES)]
    for lane in lanes:
        backend.start(lane)
        backend.forward(lane, ids[:-1])
    produced: Counter[int] = Counter()
    accepted = 0
    try:
        for at in range(0, len(drafts), LANES):
            batch = drafts[at : at + LANES]
            items = [
                SampledItem(lane, [ids[-1], token], 1, probs, params, generator)
                for lane, token in zip(lanes, batch, strict=False)
            ]
            for token, (kept, bonus) in zip(batch, backend.verify_sampled_many(items), strict=True):
                produced[token if kept else bonus] += 1
                accepted += kept
            for item in items:
                backend.truncate(item.seq_id, len(ids) - 1)
    finally:
        for lane in lanes:
            backend.release(lane)
    return produced, accepted


def _coarse(counts: Counter[int], probs: torch.Tensor, keep: list[int]):
    """Counts and probabilities over ``keep`` and one bucket (id V) for the rest."""
    rest = len(probs)
    coarse = Counter({t: counts.get(t, 0) for t in keep})
    coarse[rest] = sum(n for t, n in counts.items() if t not in keep)
    p = torch.zeros(len(probs) + 1)
    p[keep] = probs[keep]
    p[rest] = 1.0 - float(probs[keep].sum())
    return coarse, p


def test_drafter_really_disagrees_with_the_target(position):
    _, target, drafter = position
    p, q = _probs(target, PARAMS), _probs(drafter, PARAMS)
    assert 0.5 * float((p - q).abs().sum()) > 0.25


def test_deterministic_draft_output_follows_the_target_through_sglang(
    backend, position, no_rejections
):
    ids, target, _ = position
    p = _probs(target, PARAMS)
    guess = int(p.argmax())  # a suffix-index-like drafter always proposes one token
    produced, accepted = _draws(backend, ids, [guess] * DRAWS, None, PARAMS, seed=99)
    # Sampling noise over 20 tokens at n=2000 is about 0.04.
    assert total_variation(produced, p) < 0.075
    assert abs(accepted / DRAWS - float(p[guess])) < 0.04  # rejection sampling's p(x)
    # Negative control: always the guess (all accepted) is visibly wrong.
    assert total_variation(Counter({guess: DRAWS}), p) > 0.2


@pytest.mark.parametrize("logprobs", ["tempered", "original"])
def test_sampled_draft_output_follows_the_target_through_sglang(
    logprobs, standin, position, no_rejections
):
    """Tempered logprobs: rejection sampling with SGLang's p over its top k, accepting
    sum(min(p, q)); a server returning raw logprobs (SGLANG_RETURN_ORIGINAL_LOGPROB):
    its draws are matched, accepting sum(p * q). The output is p either way."""
    ids, target, drafter = position
    p, q = _probs(target, PARAMS), _probs(drafter, PARAMS)
    standin.return_original_logprob = logprobs == "original"
    backend = SGLangBackend(standin.url, target_spec(models.TEST_MODEL))
    backend.wait_ready(timeout_s=30.0)
    assert backend.tempered_logprobs == (logprobs == "tempered")
    generator = torch.Generator().manual_seed(1234)
    drafted = torch.multinomial(q, DRAWS, replacement=True, generator=generator).tolist()
    produced, accepted = _draws(backend, ids, drafted, q[None], PARAMS, seed=1234)
    assert total_variation(produced, p) < 0.075
    # Negative control: trusting the draft is visibly wrong under the same check.
    assert total_variation(Counter(drafted), p) > 0.15
    rule = torch.minimum(p, q) if logprobs == "tempered" else p * q
    assert abs(accepted / DRAWS - float(rule.sum())) < 0.04


@pytest.mark.parametrize("candidates", [16, 0])
def test_unfiltered_sampling_draws_the_residual_exactly(
    candidates, backend, position, no_rejections
):
    """No top-k or top-p: p is exact at the draft token and at SGLang's draws, and a
    rejection is settled by more SGLang draws there (kept with probability
    max(0, 1 - q/p)) or, with none (``residual_candidates`` 0), by SGLang's full
    distribution there."""
    params = SamplingParams(temperature=0.7, max_tokens=8)
    ids, target, drafter = position
    p, q = _probs(target, params), _probs(drafter, params)
    draws = 1_000 if candidates else 200
    backend.residual_candidates = candidates
    generator = torch.Generator().manual_seed(5)
    drafted = torch.multinomial(q, draws, replacement=True, generator=generator).tolist()
    calls = backend.calls
    produced, accepted = _draws(backend, ids, drafted, q[None], params, seed=5)
    verify_calls = LANES + draws // LANES  # the lanes' prefixes, then one call a round
    assert backend.calls - calls > verify_calls  # some rejections took a residual call
    assert abs(accepted / draws - float(torch.minimum(p, q).sum())) < 0.08
    keep = torch.topk(p, 5).indices.tolist()
    coarse, coarse_p = _coarse(produced, p, keep)
    # Sampling noise over 6 buckets is about 0.03 at n=1000, 0.07 at n=200.
    assert total_variation(coarse, coarse_p) < (0.08 if candidates else 0.15)
    trusted, _ = _coarse(Counter(drafted), p, keep)
    assert total_variation(trusted, coarse_p) > 0.1


def test_sampled_engine_steps_are_seeded_and_verified_in_one_call(
    backend, draft_model, prompts, no_rejections
):
    engine = build_engine("static", backend, draft_model, 4)
    params = dict(temperature=1.0, top_p=0.95, max_tokens=12)
    a = engine.generate(prompts[-1], SamplingParams(seed=7, **params))
    b = engine.generate(prompts[-1], SamplingParams(seed=7, **params))
    others = {tuple(engine.generate(prompts[-1], SamplingParams(seed=s, **params)).token_ids)
              for s in range(8, 11)}  # fmt: skip
    assert a.token_ids == b.token_ids
    assert len(others | {tuple(a.token_ids)}) > 1
    assert a.drafted > 0
    seqs = [engine.start(p, SamplingParams(seed=3, **params)) for p in prompts]
    calls = backend.calls
    try:
        engine.step_many(seqs)
    finally:
        for seq in seqs:
            engine.release(seq)
    assert backend.calls - calls == 1  # every sequence's draws in one /generate
    assert backend.live_sequences == 0


class _GreedyOnlySGLang(SGLangBackend):
    """SGLang as a backend that cannot verify sampled drafts (no exact sampling)."""

    capabilities = TargetCapabilities(
        verifies_trees=False, exact_logits=False, exact_sampling=False, exposes_features=False
    )


def test_sampled_requests_are_refused_on_a_backend_without_exact_sampling(standin, prompts):
    greedy_only = _GreedyOnlySGLang(standin.url, target_spec(models.TEST_MODEL))
    engine = Engine(greedy_only, greedy_only.tokenizer)
    with pytest.raises(RequestError) as info:
        engine.start(prompts[0], SamplingParams(max_tokens=4, temperature=0.8))
    assert info.value.field == "temperature"
    assert greedy_only.live_sequences == 0

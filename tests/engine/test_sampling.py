"""Sampled speculative decoding follows the target's distribution exactly.

Uses real distributions: SmolLM2 as the target and its first 12 layers as a drafter
that disagrees with it most of the time. Each check compares an empirical histogram
with the target's probabilities by total-variation distance, and a negative control
shows the same check catches a sampler that simply trusts the draft.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.sampling import (
    SamplingParams,
    probs_from_logits,
    verify_by_samples,
    verify_sampled,
)
from atlas_sidecar.engine.speculators.static import StaticSpeculator
from atlas_sidecar.tooling.workloads import encode

from .conftest import DISAGREEING_LAYERS

PARAMS = SamplingParams(temperature=1.0, top_k=20, max_tokens=8)


def total_variation(counts: Counter[int], probs: torch.Tensor) -> float:
    n = sum(counts.values())
    support = set(counts) | set(torch.nonzero(probs).flatten().tolist())
    return 0.5 * sum(abs(counts.get(t, 0) / n - float(probs[t])) for t in support)


def next_token_probs(runner, ids: list[int], params: SamplingParams) -> torch.Tensor:
    runner.start("probe")
    try:
        return probs_from_logits(runner.forward("probe", ids)[-1:], params)[0]
    finally:
        runner.release("probe")


@pytest.fixture(scope="module")
def distributions(target, layer_skip, real_prompts):
    ids = encode(target.tokenizer, real_prompts[-2])
    p = next_token_probs(target, ids, PARAMS)
    q = next_token_probs(layer_skip(DISAGREEING_LAYERS), ids, PARAMS)
    return p, q


def test_drafter_really_disagrees_with_the_target(distributions):
    p, q = distributions
    assert 0.5 * float((p - q).abs().sum()) > 0.2


def test_rejection_sampling_output_follows_target_distribution(distributions):
    p, q = distributions
    generator = torch.Generator().manual_seed(1234)
    target_probs = torch.stack([p, p])
    draws = 8_000
    drafted = torch.multinomial(q, draws, replacement=True, generator=generator).tolist()
    produced: Counter[int] = Counter()
    trusted: Counter[int] = Counter()
    for token in drafted:
        accepted, correction = verify_sampled([token], q[None], target_probs, generator)
        produced[token if accepted == 1 else correction] += 1
        trusted[token] += 1
    # Sampling noise over 20 tokens at n=8000 is about 0.015.
    assert total_variation(produced, p) < 0.04
    # Negative control: trusting the draft is visibly wrong under the same check.
    assert total_variation(trusted, p) > 0.2


def test_deterministic_draft_still_gives_target_distribution(distributions):
    p, q = distributions
    generator = torch.Generator().manual_seed(99)
    guess = int(q.argmax())  # a suffix-index-like drafter always proposes one token
    produced: Counter[int] = Counter()
    for _ in range(8_000):
        accepted, correction = verify_sampled([guess], None, torch.stack([p, p]), generator)
        produced[guess if accepted else correction] += 1
    assert total_variation(produced, p) < 0.04


def test_engine_second_token_follows_target_conditional(target, layer_skip, real_prompts):
    """End to end: the first drafted position, over many seeds, through Engine."""
    params = SamplingParams(temperature=0.7, top_k=8, max_tokens=2)
    drafter = layer_skip(DISAGREEING_LAYERS)
    engine = Engine(target, target.tokenizer, StaticSpeculator(drafter), lookahead=1)
    ids = encode(target.tokenizer, "Name a colour.")
    outputs = [
        engine.generate(ids, SamplingParams(**{**params.__dict__, "seed": seed})).token_ids
        for seed in range(300)
    ]
    first = Counter(out[0] for out in outputs).most_common(1)[0][0]
    seconds = Counter(out[1] for out in outputs if out[0] == first)
    assert sum(seconds.values()) >= 100
    p = next_token_probs(target, ids + [first], params)
    q = next_token_probs(drafter, ids + [first], params)
    tolerance = 0.15  # n >= 100 draws over <= 8 tokens
    assert total_variation(seconds, p) < tolerance
    # The check has power here only if the drafter's own distribution would fail it.
    assert 0.5 * float((p - q).abs().sum()) > tolerance + 0.05


def test_same_seed_same_output_and_different_seeds_differ(target, layer_skip, real_prompts):
    engine = Engine(target, target.tokenizer, StaticSpeculator(layer_skip(DISAGREEING_LAYERS)))
    ids = encode(target.tokenizer, real_prompts[-3])
    params = dict(temperature=1.0, top_p=0.95, max_tokens=12)
    a = engine.generate(ids, SamplingParams(seed=7, **params)).token_ids
    b = engine.generate(ids, SamplingParams(seed=7, **params)).token_ids
    others = {tuple(engine.generate(ids, SamplingParams(seed=s, **params)).token_ids)
              for s in range(8, 12)}  # fmt: skip
    assert a == b
    assert len(others | {tuple(a)}) > 1


def test_top_p_and_top_k_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    top_k = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.count_nonzero(top_k) == 2
    top_p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    kept = torch.nonzero(top_p[0]).flatten().tolist()
    assert kept == [0, 1]  # 0.64 < 0.7, so the second token is needed
    torch.testing.assert_close(top_p.sum(), torch.tensor(1.0))


def test_draws_match_the_draft_prefix_then_give_the_targets_token():
    assert verify_by_samples([5, 6, 7], [5, 6, 9, 1]) == (2, 9)
    assert verify_by_samples([5, 6], [5, 6, 8]) == (2, 8)
    assert verify_by_samples([5], [4, 5]) == (0, 4)
    with pytest.raises(ValueError):
        verify_by_samples([5, 6], [5, 6])

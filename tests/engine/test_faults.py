"""A batched step is all or nothing: a fault in one sequence changes no other output.

Faults are injected into one sequence of a batch of four, at each stage of a step:
the drafter (a draft model with its own KV cache), the target's batched forward, and
that sequence's verification. Each fires after the real work of its stage has run, so
the caches are as a real fault would leave them (drafted tokens in the draft caches,
unverified rows in every target cache, some caches already cut to their accepted
tokens). Float32, greedy: every other sequence must produce, token for token, what the
target alone produces for it.
"""

from __future__ import annotations

import pytest

from atlas_sidecar.engine.build import build_engine
from atlas_sidecar.engine.core import Engine, Sequence
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.errors import StepFailed
from atlas_sidecar.tooling.workloads import encode

from ..faults import STAGES, Fault, inject
from .conftest import DISAGREEING_LAYERS

BAD = 1  # the faulty sequence's place in the batch: one before it, two after


def inject_into(
    monkeypatch: pytest.MonkeyPatch, engine: Engine, stage: str, bad: Sequence
) -> None:
    """Make every step that includes ``bad`` (after its first) fail at ``stage``."""
    inject(monkeypatch, engine, stage,
           lambda seq_ids: bad.seq_id in seq_ids and len(bad.steps) >= 1)  # fmt: skip


@pytest.fixture(scope="module")
def batch(target, real_prompts):
    """Four prompts (two code, two chat), their params and their solo greedy outputs."""
    prompts = [encode(target.tokenizer, p) for p in real_prompts[:2] + real_prompts[-2:]]
    params = [SamplingParams(max_tokens=n) for n in (12, 16, 10, 14)]
    plain = Engine(target, target.tokenizer)
    expected = [plain.generate(ids, sp).token_ids for ids, sp in zip(prompts, params, strict=True)]
    return prompts, params, expected


@pytest.mark.parametrize("stage", STAGES)
def test_a_failed_batched_step_puts_every_sequence_back_as_it_was(
    target, layer_skip, batch, monkeypatch, stage
):
    prompts, params, _ = batch
    engine = build_engine("static", target, layer_skip(DISAGREEING_LAYERS))
    draft = engine.policy.speculator.runner  # type: ignore[union-attr]
    seqs = [engine.start(ids, sp) for ids, sp in zip(prompts, params, strict=True)]
    try:
        engine.step_many(seqs)
        before = [
            (list(s.output), len(s.steps), s.stop.finish_reason, target.cached_len(s.seq_id),
             draft.cached_len(s.seq_id))
            for s in seqs
        ]  # fmt: skip
        inject_into(monkeypatch, engine, stage, seqs[BAD])
        with pytest.raises(Fault):
            engine.step_many(seqs)
        after = [
            (list(s.output), len(s.steps), s.stop.finish_reason, target.cached_len(s.seq_id),
             draft.cached_len(s.seq_id))
            for s in seqs
        ]  # fmt: skip
        for seq, (out, steps, finish, cached, drafted), now in zip(seqs, before, after,
                                                                   strict=True):  # fmt: skip
            # The target's cache covers prompt + output[:-1] again; the draft cache holds
            # no more than it did (what it drafted past the accepted tokens is gone).
            assert cached == len(seq.prompt) + len(out) - 1
            assert now[:4] == (out, steps, finish, cached), (stage, seq.seq_id)
            assert now[4] <= drafted, (stage, seq.seq_id)
    finally:
        for seq in seqs:
            engine.release(seq)
    assert target.live_sequences == 0


@pytest.mark.parametrize("stage", STAGES)
def test_a_fault_in_one_sequence_fails_it_alone_and_the_others_stay_exact(
    target, layer_skip, batch, monkeypatch, stage
):
    prompts, params, expected = batch
    engine = build_engine("static", target, layer_skip(DISAGREEING_LAYERS))
    seqs = [engine.start(ids, sp) for ids, sp in zip(prompts, params, strict=True)]
    inject_into(monkeypatch, engine, stage, seqs[BAD])
    failed: dict[str, Exception] = {}
    try:
        while live := [s for s in seqs if not s.finished and s.seq_id not in failed]:
            for seq, outcome in zip(live, engine.step_isolated(live), strict=True):
                if isinstance(outcome, Exception):
                    failed[seq.seq_id] = outcome
                    engine.release(seq)
        assert list(failed) == [seqs[BAD].seq_id]
        error = failed[seqs[BAD].seq_id]
        assert isinstance(error, StepFailed) and isinstance(error.__cause__, Fault)
        assert "failed on this request (Fault)" in str(error)
        for i, (seq, want) in enumerate(zip(seqs, expected, strict=True)):
            if i != BAD:
                assert seq.output == want, (stage, i)
    finally:
        for seq in seqs:
            engine.release(seq)
    assert target.live_sequences == 0

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

from atlas_sidecar.engine import Engine, Sequence
from atlas_sidecar.errors import StepFailed
from atlas_sidecar.modes import build_engine
from atlas_sidecar.sampling import SamplingParams
from atlas_sidecar.workloads import encode

from .conftest import DISAGREEING_LAYERS

STAGES = ("draft", "forward", "accept")
BAD = 1  # the faulty sequence's place in the batch: one before it, two after


class Fault(RuntimeError):
    """The injected failure."""


def inject(monkeypatch: pytest.MonkeyPatch, engine: Engine, stage: str, bad: Sequence) -> None:
    """Make every step that includes ``bad`` (after its first) fail at ``stage``."""

    def armed(seq_ids: set[str]) -> bool:
        return bad.seq_id in seq_ids and len(bad.steps) >= 1

    if stage == "draft":
        drafter = engine.policy.speculator  # type: ignore[union-attr]
        propose = drafter.propose

        def faulty_propose(requests):
            drafts = propose(requests)  # the draft caches hold the drafted tokens now
            if armed({r.seq_id for r in requests}):
                raise Fault("drafter")
            return drafts

        monkeypatch.setattr(drafter, "propose", faulty_propose)
    elif stage == "forward":
        forward_many = engine.target.forward_many

        def faulty_forward(items, *args, **kwargs):
            out = forward_many(items, *args, **kwargs)  # every cache grew by its draft
            if armed({item.seq_id for item in items}):
                raise Fault("forward")
            return out

        monkeypatch.setattr(engine.target, "forward_many", faulty_forward)
    else:
        accept_path = engine._accept_path

        def faulty_accept(seq, draft, logits):
            if armed({seq.seq_id}):
                raise Fault("accept")
            return accept_path(seq, draft, logits)

        monkeypatch.setattr(engine, "_accept_path", faulty_accept)


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
        inject(monkeypatch, engine, stage, seqs[BAD])
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
    inject(monkeypatch, engine, stage, seqs[BAD])
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

"""Fault injection for the serving-under-faults tests: one sequence of a batched step
fails at a stage of the step, after that stage's real work has run (so the caches are
as a real fault would leave them)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from atlas_sidecar.engine.core import Engine

STAGES = ("draft", "forward", "accept")


class Fault(RuntimeError):
    """The injected failure."""


def inject(
    monkeypatch: pytest.MonkeyPatch,
    engine: Engine,
    stage: str,
    armed: Callable[[set[str]], bool],
) -> None:
    """Make every step whose sequences ``armed`` picks fail at ``stage``: the drafter
    (its draft caches then hold the drafted tokens), the target's batched forward (every
    cache grew by its draft) or one sequence's verification."""
    if stage == "draft":
        drafter = engine.policy.speculator  # type: ignore[attr-defined]
        propose = drafter.propose

        def faulty_propose(requests):
            drafts = propose(requests)
            if armed({r.seq_id for r in requests}):
                raise Fault("drafter")
            return drafts

        monkeypatch.setattr(drafter, "propose", faulty_propose)
    elif stage == "forward":
        forward_many = engine.target.forward_many

        def faulty_forward(items, *args, **kwargs):
            fail = armed({item.seq_id for item in items})  # decided before the forward runs
            out = forward_many(items, *args, **kwargs)
            if fail:
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

"""One adaptive drafter in several published versions at once: stable, canary, previous.

A new version of an adaptive speculator (the suffix index, the neural head) is put into
service without a restart by swapping drafter instances between decoding steps. Each
sequence is pinned to the version it started with, so a swap never changes the drafter
under a request in flight (its output would still be the target's, but its acceptance
figures would mix two versions). A canary version drafts for a fraction of the new
sequences, chosen by a hash of the sequence id, so the fraction holds under any arrival
order; the stable version drafts for the rest. The version before the stable one is
kept, so a rollback is a pointer swap, not a reload.

Every method runs on the engine's worker thread (``install`` and the verdicts too: the
server queues them between steps), so there is no lock.

Memory: at most three instances are held (stable, canary, previous); one dropped by a
verdict or a newer install lives on only while sequences pinned to it finish.

A drafter that learns online in the replica (the neural head) has one learner for all
its instances; ``on_stable(old, new)`` runs whenever the stable instance changes, so the
learner can move to the new one (``neural_train.hand_over_learning``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from atlas_sidecar.engine.speculators.base import Drafter, DraftRequest
from atlas_sidecar.engine.tree import DraftTree

BASE_VERSION = "base"  # what a replica drafts with before any published version


def canary_share(seq_id: str) -> float:
    """A sequence's place in [0, 1): the canary takes those below its fraction."""
    digest = hashlib.blake2b(seq_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass
class Slot:
    version: str
    drafter: Drafter


class VersionedDrafter:
    """A Drafter (same name and capabilities as its versions) that routes each sequence
    to the version it was pinned to when first seen.

    The engine calls a drafter only through the ``Drafter`` protocol, and each of those
    calls names its sequence, so routing them is enough: the neural head reads the
    target's recorded features itself, by sequence id, whichever instance drafts."""

    def __init__(
        self,
        version: str,
        drafter: Drafter,
        on_stable: Callable[[Drafter, Drafter], None] | None = None,
    ) -> None:
        """``on_stable(old, new)``: called on the worker right after the stable instance
        changes (an install at fraction 1.0, a promotion, a rollback to the previous)."""
        self.name = drafter.name
        self.capabilities = drafter.capabilities
        self.stable = Slot(version, drafter)
        self.canary: Slot | None = None
        self.previous: Slot | None = None
        self.canary_fraction = 0.0
        self.on_stable = on_stable
        self._pinned: dict[str, Slot] = {}

    # -- versions ------------------------------------------------------------------------

    def install(
        self, version: str, drafter: Drafter, canary_fraction: float, canary: bool | None = None
    ) -> None:
        """A new version: the canary for ``canary_fraction`` of new sequences, or the
        stable version at once (the old stable becomes the previous). ``canary`` None:
        a canary below 1.0, stable at 1.0; True: a canary even at 1.0 (the operator's
        canary may take every new request and still be rolled back)."""
        if drafter.name != self.name:
            raise ValueError(f"version {version} drafts as {drafter.name!r}, not {self.name!r}")
        if not 0.0 <= canary_fraction <= 1.0:
            raise ValueError(f"canary fraction {canary_fraction} is not in [0, 1]")
        if not (canary_fraction < 1.0 if canary is None else canary):
            old = self.stable
            self.previous, self.stable, self.canary = old, Slot(version, drafter), None
            self._stable_changed(old)
            return
        self.canary, self.canary_fraction = Slot(version, drafter), canary_fraction

    def set_canary_fraction(self, fraction: float) -> None:
        """The canary's share of new sequences from now on; those pinned keep theirs."""
        if self.canary is None:
            raise ValueError(f"{self.name}: no canary to give a fraction")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"canary fraction {fraction} is not in [0, 1]")
        self.canary_fraction = fraction

    def promote(self) -> str:
        """The canary becomes stable; return its version."""
        if self.canary is None:
            raise ValueError(f"{self.name}: no canary to promote")
        old = self.stable
        self.previous, self.stable, self.canary = old, self.canary, None
        self._stable_changed(old)
        return self.stable.version

    def roll_back(self) -> str:
        """Drop the canary, or, with none, go back to the previous version; return the
        version now stable. Sequences pinned to a dropped version finish on it."""
        if self.canary is not None:
            self.canary = None
        elif self.previous is not None:
            old, self.stable, self.previous = self.stable, self.previous, None
            self._stable_changed(old)
        else:
            raise ValueError(f"{self.name}: nothing to roll back to")
        return self.stable.version

    def versions(self) -> dict[str, str]:
        """Role -> version, for stats."""
        slots = {"stable": self.stable, "canary": self.canary, "previous": self.previous}
        return {role: slot.version for role, slot in slots.items() if slot is not None}

    def version_of(self, seq_id: str) -> str:
        return self._slot(seq_id).version

    def instances(self) -> list[Drafter]:
        """The drafter instances held (stable first), each once: what a caller that
        needs the drafters themselves (their learners, their memory) looks through."""
        found: list[Drafter] = []
        for slot in (self.stable, self.canary, self.previous):
            if slot is not None and all(slot.drafter is not d for d in found):
                found.append(slot.drafter)
        return found

    def _stable_changed(self, old: Slot) -> None:
        if self.on_stable is not None and old.drafter is not self.stable.drafter:
            self.on_stable(old.drafter, self.stable.drafter)

    # -- the drafter interface -----------------------------------------------------------

    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        groups: dict[int, tuple[Slot, list[int]]] = {}
        for index, request in enumerate(requests):
            slot = self._slot(request.seq_id)
            groups.setdefault(id(slot), (slot, []))[1].append(index)
        drafts: list[DraftTree | None] = [None] * len(requests)
        for slot, indices in groups.values():
            for index, draft in zip(
                indices, slot.drafter.propose([requests[i] for i in indices]), strict=True
            ):
                drafts[index] = draft
        assert all(d is not None for d in drafts)
        return drafts  # type: ignore[return-value]

    def observe_context(self, seq_id: str, context: list[int]) -> None:
        self._slot(seq_id).drafter.observe_context(seq_id, context)

    def rollback(self, seq_id: str, context: list[int]) -> None:
        self._slot(seq_id).drafter.rollback(seq_id, context)

    def release(self, seq_id: str) -> None:
        slot = self._pinned.pop(seq_id, None)
        if slot is not None:
            slot.drafter.release(seq_id)

    def _slot(self, seq_id: str) -> Slot:
        slot = self._pinned.get(seq_id)
        if slot is None:
            canary = self.canary is not None and canary_share(seq_id) < self.canary_fraction
            slot = self.canary if canary and self.canary is not None else self.stable
            self._pinned[seq_id] = slot
        return slot

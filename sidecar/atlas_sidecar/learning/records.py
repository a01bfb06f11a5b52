"""What the sidecar mirrors to the trainer for each finished request, and how the
trainer reads back what it ingested.

A record carries token ids only, never text: the trainer needs ids to learn, and text
would put prompts in one more place that logs and dumps can leak. Target features are
not mirrored either: the trainer recomputes them by running the target over the ids
(it has the target's weights and, in the cluster, a GPU), which costs the trainer a
forward per record instead of costing every serving pod bytes on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MAX_RECORD_TOKENS = 65536  # prompt + output; a longer request is mirrored as its tail


@dataclass(frozen=True)
class TrafficRecord:
    """One finished request as the trainer sees it.

    ``request_id`` is unique across replicas and restarts (the mirror makes it
    ``<replica>/<uuid>``); delivery is at-least-once, so the trainer de-duplicates on it.
    The ``step_*`` tuples are parallel, one entry per decoding step: which speculator
    drafted ("none" for a step without a draft), how many tokens it drafted, how many
    the target accepted.
    """

    request_id: str
    replica: str
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    step_speculators: tuple[str, ...]
    step_drafted: tuple[int, ...]
    step_accepted: tuple[int, ...]
    weight_version: str
    finished_at: float  # unix seconds, the replica's clock
    sampled: bool  # temperature > 0: accept lengths are not comparable to greedy ones

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.prompt_ids + self.output_ids


class TrafficSource(Protocol):
    """The trainer's ingested traffic, in ingest order; ``seq`` is the store's own
    monotonically increasing position (not the replica's clock)."""

    def read(self, after: int = 0, limit: int = 1000) -> list[tuple[int, TrafficRecord]]:
        """Up to ``limit`` records with seq > ``after``, oldest first."""
        ...

    def count(self) -> int: ...

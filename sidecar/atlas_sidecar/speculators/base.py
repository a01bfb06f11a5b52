"""The one shape every speculator has: propose drafts for a batch of sequences.

The engine does not care which drafter it holds (static draft model, suffix index,
neural head): each gets the sequences' full token contexts and a lookahead, and
returns draft tokens with a confidence per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from atlas_sidecar.sampling import SamplingParams


@dataclass
class DraftRequest:
    seq_id: str
    context: list[int]  # prompt + every token accepted so far
    lookahead: int  # how many tokens to propose (may return fewer)
    params: SamplingParams
    generator: torch.Generator | None = None
    # For drafters that pay per token: called with the confidences so far after each
    # drafted token; False stops the draft early (the controller's goodput test).
    keep_going: Callable[[list[float]], bool] | None = None


@dataclass
class Draft:
    tokens: list[int]
    # The drafter's own probability of each token: what the controller trusts.
    confidences: list[float]
    # [len(tokens), V]: the distribution each token was sampled from, for rejection
    # sampling. None means the drafter is deterministic (a one-hot q).
    probs: torch.Tensor | None = None
    # Which kind of evidence produced it (e.g. "suffix:3" for a 3-gram match): the
    # controller learns acceptance per bucket.
    bucket: str = ""

    @classmethod
    def empty(cls) -> Draft:
        return cls(tokens=[], confidences=[])


class Drafter(Protocol):
    name: str

    def propose(self, requests: list[DraftRequest]) -> list[Draft]: ...

    def release(self, seq_id: str) -> None:
        """Forget a finished sequence's state."""
        ...

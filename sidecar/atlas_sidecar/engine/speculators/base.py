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

from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.tree import DraftTree


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


# The old name, kept so that code not yet switched to DraftTree keeps working.
Draft = DraftTree


class Drafter(Protocol):
    name: str

    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]: ...

    def release(self, seq_id: str) -> None:
        """Forget a finished sequence's state."""
        ...


def rollback_drafter(drafter: Drafter, seq_id: str, context: list[int]) -> None:
    """Undo a failed step: the drafter keeps no state for ``seq_id`` past ``context``
    (the sequence's accepted tokens, as the step began), and any state it holds is
    consistent again, so the step can be retried as if it had never run.

    A drafter that keeps per-sequence state beyond the accepted tokens (a draft model's
    KV cache of drafted tokens) defines ``rollback(seq_id, context)``; one whose state
    only ever follows the accepted context (the suffix index, the neural head, which
    reads the target's own rolled-back hidden states) needs none."""
    hook = getattr(drafter, "rollback", None)
    if hook is not None:
        hook(seq_id, context)

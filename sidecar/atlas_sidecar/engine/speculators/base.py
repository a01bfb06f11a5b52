"""The one shape every speculator has: propose drafts for a batch of sequences.

The engine does not care which drafter it holds (static draft model, suffix index,
neural head): each gets the sequences' full token contexts and a lookahead, and
returns draft tokens with a confidence per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from atlas_sidecar.engine.capabilities import SpeculatorCapabilities
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.stoprule import StopRule
from atlas_sidecar.engine.tree import DraftTree


@dataclass
class DraftRequest:
    seq_id: str
    context: list[int]  # prompt + every token accepted so far
    lookahead: int  # how many tokens to propose (may return fewer)
    params: SamplingParams
    generator: torch.Generator | None = None
    # For drafters that pay per token: asked with the confidences so far after each
    # drafted token; stop once it says no (the plan's goodput test). None: draft on
    # to ``lookahead``.
    stop: StopRule | None = None
    # May the draft branch? False when sampling (rejection sampling takes one path) or
    # when the target verifies chains only (``TargetCapabilities.verifies_trees``).
    trees: bool = True




class Drafter(Protocol):
    """A speculator. Its drafts keep the request's contract: at most ``lookahead``
    nodes, a chain unless ``trees``, tokens of the target's vocabulary; the engine
    verifies them as they are (a draft outside the contract is a bug, dropped)."""

    name: str
    capabilities: SpeculatorCapabilities

    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]: ...

    def observe_context(self, seq_id: str, context: list[int]) -> None:
        """The sequence's accepted tokens as a step begins, whether or not this drafter
        drafts the step. A drafter that ``learns_online`` from the target's features
        (the neural head) learns from every request this way, not only its own steps;
        one that learns from what it is asked (the suffix index) ignores it."""

    def rollback(self, seq_id: str, context: list[int]) -> None:
        """Undo a failed step: keep no state for ``seq_id`` past ``context`` (the
        sequence's accepted tokens as the step began), so the step can be retried as if
        it had never run. A drafter whose state only follows the accepted context (the
        suffix index; the neural head, which reads the target's own rolled-back hidden
        states) has nothing to undo."""
        ...

    def release(self, seq_id: str) -> None:
        """Forget a finished sequence's state."""
        ...

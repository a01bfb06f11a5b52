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
    # A draft tree: parents[i] is the index of token i's parent among ``tokens``, or -1
    # for the sequence's last token. None is a chain. Parents precede their children,
    # and a node's first child is its drafter's favourite (the "main chain").
    parents: list[int] | None = None
    # Seconds one more drafted token costs (this sequence's share of a batched draft
    # step), as the drafter measured it without one-off work such as a draft model's
    # first prefill of the prompt. None: the controller times the whole call.
    token_cost_s: float | None = None
    # A draft model's second choice at each token of a chain, with its probability:
    # (token, probability) per position. The controller may add them to the draft as
    # siblings (a tree), verified in the same forward at no drafting cost.
    runners_up: list[tuple[int, float]] | None = None

    @classmethod
    def empty(cls) -> Draft:
        return cls(tokens=[], confidences=[])

    @property
    def is_tree(self) -> bool:
        return self.parents is not None and self.parents != list(range(-1, len(self.tokens) - 1))

    def chain_parents(self) -> list[int]:
        return self.parents if self.parents is not None else list(range(-1, len(self.tokens) - 1))

    def subset(self, nodes: list[int]) -> Draft:
        """The draft restricted to ``nodes`` (ascending, closed under parents)."""
        parents = self.chain_parents()
        where = {old: new for new, old in enumerate(nodes)}
        kept_parents = [-1 if parents[i] < 0 else where[parents[i]] for i in nodes]
        return Draft(
            tokens=[self.tokens[i] for i in nodes],
            confidences=[self.confidences[i] for i in nodes],
            probs=None if self.probs is None else self.probs[nodes],
            bucket=self.bucket,
            parents=None if self.parents is None else kept_parents,
            token_cost_s=self.token_cost_s,
        )

    def main_nodes(self) -> list[int]:
        """The nodes of the path that always follows the first child."""
        nodes, current = [], -1
        for i, parent in enumerate(self.chain_parents()):
            if parent == current:
                nodes.append(i)
                current = i
        return nodes

    def main_chain(self) -> Draft:
        """The path that always follows the first child: a tree reduced to a chain."""
        if not self.is_tree:
            return self
        chain = self.subset(self.main_nodes())
        chain.parents = None
        return chain

    def with_runners_up(self) -> Draft:
        """The chain with each position's runner-up as a sibling of its token (after
        every chain token, so each node's first child stays the favourite)."""
        if self.is_tree or not self.runners_up:
            return self
        picks = [(i, t, p) for i, (t, p) in enumerate(self.runners_up) if p > 0.0]
        return Draft(
            tokens=[*self.tokens, *(t for _, t, _ in picks)],
            confidences=[*self.confidences, *(p for _, _, p in picks)],
            bucket=self.bucket,
            parents=[*range(-1, len(self.tokens) - 1), *(i - 1 for i, _, _ in picks)],
            token_cost_s=self.token_cost_s,
        )


class Drafter(Protocol):
    name: str
    capabilities: SpeculatorCapabilities

    def propose(self, requests: list[DraftRequest]) -> list[Draft]: ...

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

"""The one draft type: a chain or a tree of drafted tokens, and how to walk it.

Every place that follows a draft (greedy verification with the target's tokens, the
controller's shadow scoring with the tokens that were accepted, attention positions)
walks the tree through these methods, so the tie rule (the lowest-indexed matching
child wins, as in the kernels of ``atlas_kernels``) is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
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
    def empty(cls) -> DraftTree:
        return cls(tokens=[], confidences=[])

    @property
    def is_tree(self) -> bool:
        return self.parents is not None and self.parents != list(range(-1, len(self.tokens) - 1))

    def chain_parents(self) -> list[int]:
        return self.parents if self.parents is not None else list(range(-1, len(self.tokens) - 1))

    def children(self) -> dict[int, list[int]]:
        """Parent index (-1: the root) -> its child nodes in index order."""
        children: dict[int, list[int]] = {}
        for i, parent in enumerate(self.chain_parents()):
            children.setdefault(parent, []).append(i)
        return children

    def depths(self) -> list[int]:
        """Depth of each node (children of the root have depth 0); parents must precede
        children, else ValueError, since attention positions are built from these."""
        return depths(self.chain_parents())

    def walk(self, tokens: Sequence[int]) -> tuple[list[int], list[int]]:
        """Follow ``tokens`` from the root: (matched path root to leaf, rejected nodes).

        Each step takes the lowest-indexed child whose token is the next token (the
        kernels' tie rule). ``rejected`` is every other child of the root and of each
        matched node that was checked against a token, in the order checked.
        """
        children = self.children()
        path: list[int] = []
        rejected: list[int] = []
        current = -1
        for token in tokens:
            kids = children.get(current, [])
            nxt = next((c for c in kids if self.tokens[c] == token), None)
            rejected.extend(c for c in kids if c != nxt)
            if nxt is None:
                break
            path.append(nxt)
            current = nxt
        return path, rejected

    def reach(self, accept_probs: list[float]) -> list[float]:
        """P(a node and all its ancestors are accepted), given each node's own
        acceptance probability: the product along its path from the root."""
        return reach(accept_probs, self.chain_parents())

    def subset(self, nodes: list[int]) -> DraftTree:
        """The draft restricted to ``nodes`` (ascending, closed under parents)."""
        parents = self.chain_parents()
        where = {old: new for new, old in enumerate(nodes)}
        kept_parents = [-1 if parents[i] < 0 else where[parents[i]] for i in nodes]
        return DraftTree(
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

    def main_chain(self) -> DraftTree:
        """The path that always follows the first child: a tree reduced to a chain."""
        if not self.is_tree:
            return self
        chain = self.subset(self.main_nodes())
        chain.parents = None
        return chain

    def with_runners_up(self) -> DraftTree:
        """The chain with each position's runner-up as a sibling of its token (after
        every chain token, so each node's first child stays the favourite)."""
        if self.is_tree or not self.runners_up:
            return self
        picks = [(i, t, p) for i, (t, p) in enumerate(self.runners_up) if p > 0.0]
        return DraftTree(
            tokens=[*self.tokens, *(t for _, t, _ in picks)],
            confidences=[*self.confidences, *(p for _, _, p in picks)],
            bucket=self.bucket,
            parents=[*range(-1, len(self.tokens) - 1), *(i - 1 for i, _, _ in picks)],
            token_cost_s=self.token_cost_s,
        )


def reach(accept_probs: list[float], parents: list[int]) -> list[float]:
    """``DraftTree.reach`` for a shape given by its parents alone (a plan's chain
    before any token is drafted)."""
    out: list[float] = []
    for p, parent in zip(accept_probs, parents, strict=True):
        out.append(p * (out[parent] if parent >= 0 else 1.0))
    return out


def depths(parents: list[int]) -> list[int]:
    """``DraftTree.depths`` for a shape given by its parents alone (a target backend's
    forward item)."""
    out: list[int] = []
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"tree parent {parent} of node {i} must precede it")
        out.append(0 if parent < 0 else out[parent] + 1)
    return out


def ancestry(parents: list[int]) -> torch.Tensor:
    """[n, n] bool: entry (i, j) is True when node j is node i or one of its ancestors
    (what a tree forward's node i may attend to among the new tokens)."""
    mask = torch.eye(len(parents), dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i] |= mask[parent]
    return mask

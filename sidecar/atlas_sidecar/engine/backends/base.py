"""The interface every target backend implements (torch in-process, SGLang, Triton)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from atlas_sidecar.engine.capabilities import TargetCapabilities
from atlas_sidecar.engine.sampling import SamplingParams


@dataclass
class ForwardItem:
    """Tokens to append to one sequence's cache in a batched forward.

    ``parents`` makes the tokens a tree: ``parents[i]`` is the index of token i's
    parent among ``tokens``, or -1 for the end of the cached prefix. Token i then
    attends to the cache and to its ancestors only, at position cached_len + depth(i).
    ``None`` is a plain chain (each token follows the one before it).
    """

    seq_id: str
    tokens: list[int]
    parents: list[int] | None = None


class TargetBackend(Protocol):
    """A causal LM with a per-sequence KV cache.

    A sequence's cache covers a prefix of its tokens. ``forward`` appends tokens and
    returns the logits at each of them (row i predicts the token after tokens[i]);
    ``truncate`` rolls the cache back to a length, dropping rejected draft tokens.
    """

    capabilities: TargetCapabilities
    vocab_size: int
    max_context: int
    eos_token_ids: frozenset[int]
    device: torch.device

    def start(self, seq_id: str) -> None: ...

    def forward(self, seq_id: str, tokens: list[int]) -> torch.Tensor: ...

    def forward_many(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        """Several sequences (chains or trees) in one forward; see ForwardItem."""
        ...

    def truncate(self, seq_id: str, length: int) -> None: ...

    def keep(self, seq_id: str, prefix: int, path: list[int]) -> None:
        """After a tree forward: keep ``prefix`` cached tokens plus the nodes on ``path``."""
        ...

    def cached_len(self, seq_id: str) -> int: ...

    def release(self, seq_id: str) -> None: ...


@dataclass
class SampledItem:
    """Tokens to append to one sequence's cache, the last ``drafted`` of them a draft
    chain to verify by sampling (``params``, not greedy): the target's own token is
    drawn after each of the last ``drafted + 1`` tokens. ``probs`` ([drafted, V]) are
    the drafter's distributions, None for a deterministic drafter; ``generator`` is the
    sequence's, so a seeded request reproduces."""

    seq_id: str
    tokens: list[int]
    drafted: int
    probs: torch.Tensor | None
    params: SamplingParams
    generator: torch.Generator


class SamplingTarget(TargetBackend, Protocol):
    """A target whose rows are not exact (``capabilities.exact_logits`` False) but which
    verifies sampled drafts itself (``capabilities.exact_sampling``)."""

    def verify_sampled_many(self, items: list[SampledItem]) -> list[tuple[int, int]]:
        """Append each item's tokens; per item (draft tokens accepted, the target's own
        next token), the output following the target's sampling distribution exactly.
        The caller truncates the rejected draft tokens, as after ``forward_many``."""
        ...


class RemoteTarget(TargetBackend, Protocol):
    """A target served by another process (``capabilities.remote``)."""

    def probe(self, timeout_s: float) -> str | None:
        """None when the server answers its health check within ``timeout_s``, else why
        not, in a few words (a log line; never a secret)."""
        ...

    def top2_gap(self, ids: list[int]) -> float | None:
        """The target's top-2 logit gap after ``ids``, where the server can tell it
        (tooling: is a divergence a near-tie?); None where it cannot."""
        ...

"""The interface every target backend implements (torch in-process, SGLang, Triton)."""

from __future__ import annotations

from typing import Protocol

import torch


class TargetBackend(Protocol):
    """A causal LM with a per-sequence KV cache.

    A sequence's cache covers a prefix of its tokens. ``forward`` appends tokens and
    returns the logits at each of them (row i predicts the token after tokens[i]);
    ``truncate`` rolls the cache back to a length, dropping rejected draft tokens.
    """

    vocab_size: int
    max_context: int
    eos_token_ids: frozenset[int]
    device: torch.device

    def start(self, seq_id: str) -> None: ...

    def forward(self, seq_id: str, tokens: list[int]) -> torch.Tensor: ...

    def truncate(self, seq_id: str, length: int) -> None: ...

    def cached_len(self, seq_id: str) -> int: ...

    def release(self, seq_id: str) -> None: ...

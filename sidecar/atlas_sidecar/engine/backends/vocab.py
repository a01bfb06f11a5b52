"""A draft model's LM head over the part of the vocabulary that traffic uses.

A small draft model spends a large share of each drafted token in its LM head (a
vocabulary of ~150k rows against a hidden size under 1k; figures: docs/design-notes.md,
"Backends and kernels"). A draft token only
helps when the target picks it, and the target's picks in practice come from a few tens
of thousands of tokens: the lowest ids (byte-level BPE merges come roughly in order of
frequency), the end-of-sequence tokens, and whatever the served prompts and outputs
contain (identifiers, other languages), which the vocabulary learns as it sees them.

Only ever for drafts: a token outside the vocabulary cannot be drafted (its logit is
-inf), so at worst a draft is rejected where the target chose a rare token. The target
verifies every draft token: output stays exactly the target's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from atlas_sidecar.engine.backends.int8 import Int8Linear

BASE_TOKENS = 32_768  # the lowest ids, in the vocabulary from the start
CAPACITY = 49_152  # rows at most: room for 16k tokens learned from traffic


class DraftVocabulary:
    """An LM head restricted to a growing set of token ids; logits elsewhere are -inf.

    Rows are copied out of the model's head into buffers of ``capacity`` rows, filled in
    order, so learning a token writes one row and never moves the others. Once full, it
    learns no more (the set it has covers what traffic used first). An int8 head's rows
    stay int8 at any row count: a drafter's forward asks for a few rows of logits (its
    sequences' last tokens), where the int8 kernel is the faster."""

    def __init__(
        self,
        head: nn.Linear | Int8Linear,
        vocab_size: int,
        always: Iterable[int] = (),
        base: int = BASE_TOKENS,
        capacity: int = CAPACITY,
    ) -> None:
        self.vocab_size = vocab_size
        # Where rows are copied from: the int8 weights and scales, or the native weights.
        self._source: torch.Tensor = head.qweight if isinstance(head, Int8Linear) else head.weight
        self._source_scale: torch.Tensor | None = (
            head.scale if isinstance(head, Int8Linear) else None
        )
        self._source_bias: torch.Tensor | None = head.bias
        self._dtype = head.dtype if isinstance(head, Int8Linear) else head.weight.dtype
        capacity = min(capacity, vocab_size)
        device = self._source.device
        self.ids = torch.empty(capacity, dtype=torch.long, device=device)
        self._rows = torch.empty(capacity, self._source.shape[1], dtype=self._source.dtype,
                                 device=device)  # fmt: skip
        self._scale = None if self._source_scale is None else torch.empty(
            capacity, dtype=self._source_scale.dtype, device=device
        )  # fmt: skip
        self._bias = None if self._source_bias is None else torch.empty(
            capacity, dtype=self._source_bias.dtype, device=device
        )  # fmt: skip
        self.size = 0
        self._members: set[int] = set()
        self.learn([*always, *range(min(base, vocab_size))])

    def __contains__(self, token: int) -> bool:
        return token in self._members

    def learn(self, tokens: Iterable[int]) -> int:
        """Add tokens not yet in the vocabulary (while there is room); returns how many."""
        new = [t for t in dict.fromkeys(tokens) if t not in self._members
               and 0 <= t < self.vocab_size][: len(self.ids) - self.size]  # fmt: skip
        if not new:
            return 0
        index = torch.tensor(new, dtype=torch.long, device=self.ids.device)
        rows = slice(self.size, self.size + len(new))
        self.ids[rows] = index
        self._rows[rows] = self._source.index_select(0, index)
        if self._scale is not None and self._source_scale is not None:
            self._scale[rows] = self._source_scale.index_select(0, index)
        if self._bias is not None and self._source_bias is not None:
            self._bias[rows] = self._source_bias.index_select(0, index)
        self._members.update(new)
        self.size += len(new)
        return len(new)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., vocab_size] logits, -inf outside the vocabulary."""
        flat = hidden.reshape(-1, hidden.shape[-1]).to(self._dtype)
        n = self.size
        if self._scale is not None:
            sub = torch.ops.aten._weight_int8pack_mm(flat, self._rows[:n], self._scale[:n])
        else:
            sub = nn.functional.linear(flat, self._rows[:n])
        if self._bias is not None:
            sub = sub + self._bias[:n]
        out = sub.new_full((flat.shape[0], self.vocab_size), float("-inf"))
        out[:, self.ids[:n]] = sub
        return out.reshape(*hidden.shape[:-1], self.vocab_size)

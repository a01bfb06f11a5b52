"""Grouped-query attention for a few query tokens, for every model on the CPU.

Decoding feeds one token per forward (a draft model's every token, the target's own
steps) and verification a few. There, PyTorch's CPU SDPA costs far more than the
problem, and with a mask (a tree, or sequences padded side by side in a batch) Hugging
Face repeats the keys per query head first. Grouping the query heads that share a
key/value head into one matrix and doing two small matmuls is cheaper for up to
``MAX_QUERY`` queries, in draft and target forwards alike. Longer queries (a prompt's
prefill) keep SDPA, which wins there. Figures: docs/design-notes.md, "Backends and
kernels".

The target uses it in every mode (``none`` (no speculation) and the peers included), so every
mode verifies against the same target; tests in float32 check they agree exactly.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "atlas_grouped"
MAX_QUERY = 16  # query tokens up to which the grouped matmuls beat SDPA (design notes)


def grouped_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``query`` [b, heads, q, d]; ``key``/``value`` [b, kv_heads, k, d]; a bool or
    additive ``attention_mask`` [b, 1, q, k] or None (no mask: every key is visible,
    as for one query token). Returns [b, q, heads, d], as Hugging Face expects."""
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if q_len > MAX_QUERY or dropout or heads % kv_heads or (attention_mask is None and q_len > 1):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    grouped = query.reshape(batch, kv_heads, group * q_len, dim)  # heads h*group.. share kv h
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float().mul_(scale)
    if attention_mask is not None:
        scores = scores.view(batch, kv_heads, group, q_len, k_len)
        mask = attention_mask[:, :, None]  # [b, 1, 1, q, k] against [b, kv, group, q, k]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
        scores = scores.view(batch, kv_heads, group * q_len, k_len)
    weights = scores.softmax(dim=-1).to(value.dtype)
    out = torch.matmul(weights, value).view(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> None:
    """Name ``grouped_attention`` to Hugging Face, on first use: its registries live in
    modules that import torch._dynamo, and with it Triton, which must not happen on
    importing the sidecar (start-up time; Triton's interpreter mode, read at its import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_grouped_attention(model: Any) -> None:
    """Switch ``model`` (on the CPU) to ``grouped_attention``."""
    _register()
    model.set_attn_implementation(NAME)

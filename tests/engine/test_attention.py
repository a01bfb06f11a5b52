"""The grouped attention every CPU model runs: the same numbers as plain attention."""

from __future__ import annotations

import pytest
import torch

from atlas_sidecar.engine.backends import attention
from atlas_sidecar.engine.backends.attention import MAX_QUERY, grouped_attention
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner

from .conftest import SMOL


class Layer:  # what the attention reads of a Hugging Face attention module
    is_causal = True

    def __init__(self, groups: int) -> None:
        self.num_key_value_groups = groups


def plain_attention(query, key, value, mask, tiled=False):
    """Every query head against its key/value head, in float64: the definition, not a
    kernel. Head h uses kv head h // group (Hugging Face's ``repeat_kv``); ``tiled``
    pairs them the other way (h % kv_heads), a wrong attention for a negative control."""
    group = query.shape[1] // key.shape[1]
    if tiled:
        key, value = key.repeat(1, group, 1, 1), value.repeat(1, group, 1, 1)
    else:
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = query.double() @ key.double().transpose(-1, -2) / query.shape[-1] ** 0.5
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    return (scores.softmax(-1) @ value.double()).transpose(1, 2)  # [b, q, heads, d]


def tree_mask(batch: int, q_len: int, past: int) -> torch.Tensor:
    """Query i sees the cache (row 0 all of it, the others a shorter one, as padded
    rows do), itself, and the earlier nodes of even index (its ancestors in a tree)."""
    mask = torch.zeros(batch, 1, q_len, past + q_len, dtype=torch.bool)
    for row in range(batch):
        mask[row, 0, :, : past if row == 0 else past // 2] = True
        for i in range(q_len):
            mask[row, 0, i, past + i] = True
            mask[row, 0, i, past : past + i : 2] = True
    return mask


CASES = [(1, "none")] + [(q, kind) for q in (1, 3, MAX_QUERY) for kind in ("bool", "additive")]


@pytest.mark.parametrize(("q_len", "mask_kind"), CASES)  # no mask: one query token only
def test_grouped_attention_is_plain_attention(q_len, mask_kind):
    torch.manual_seed(0)
    batch, heads, kv_heads, dim, past = 3, 6, 2, 16, 40
    query = torch.randn(batch, heads, q_len, dim)
    key = torch.randn(batch, kv_heads, past + q_len, dim)
    value = torch.randn(batch, kv_heads, past + q_len, dim)
    mask = None if mask_kind == "none" else tree_mask(batch, q_len, past)
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    out, weights = grouped_attention(Layer(heads // kv_heads), query, key, value, mask)
    assert weights is None and out.shape == (batch, q_len, heads, dim)
    expected = plain_attention(query, key, value, mask)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    tiled = plain_attention(query, key, value, mask, tiled=True)
    assert not torch.allclose(out.double(), tiled, atol=1e-2)


def test_longer_queries_keep_sdpa_and_agree():
    torch.manual_seed(1)
    q_len, past = MAX_QUERY + 4, 10
    query = torch.randn(2, 4, q_len, 8)
    key, value = torch.randn(2, 2, past + q_len, 8), torch.randn(2, 2, past + q_len, 8)
    mask = tree_mask(2, q_len, past)
    out, _ = grouped_attention(Layer(2), query, key, value, mask)
    assert torch.allclose(out.double(), plain_attention(query, key, value, mask), atol=1e-5)


def test_a_cpu_runner_uses_it_and_decodes_as_a_whole_forward_does():
    runner = CausalLMRunner.load(SMOL, dtype="fp32", num_layers=2)
    assert runner.model.config._attn_implementation == attention.NAME
    tokens = runner.tokenizer.encode("def add(a, b):\n    return a + b\n")
    runner.start("whole")
    whole = runner.forward("whole", tokens)
    runner.start("steps")
    runner.forward("steps", tokens[:-5])
    steps = [runner.forward("steps", [t]) for t in tokens[-5:]]
    assert torch.allclose(torch.cat(steps), whole[-5:], atol=1e-4)

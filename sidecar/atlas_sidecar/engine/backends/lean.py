"""A lean decode forward for Qwen2-family draft models on the CPU.

A draft model feeds one token per forward, so reading its weights (int8, ``int8.py``)
should be the whole cost; on the CPU the Hugging Face forward around them costs more
than the weights do, in many small operations, module calls and mask set-up per token
(figures: docs/design-notes.md, "Backends and kernels"). This forward runs the same
layers with less of it: the q/k/v projections as one int8 matmul and gate/up as another
(their int8 rows concatenated, the modules' own weights becoming views of them, so no
memory is added), the rotary embedding once for queries and keys together, and attention
per sequence on its own tokens, with no padding and no 4D mask (``attention.py``'s
grouped matmuls). Several sequences share every matmul (their tokens are rows).

Only for drafts, and only for chains of a few tokens (a draft step, a cache catch-up):
anything else, and every target forward, stays on Hugging Face's forward, so the target
is always the target. The caches are the runner's own ``DynamicCache`` layers, so both
forwards may run on the same sequence in turn. Tests check it against Hugging Face's
forward on the real draft model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from atlas_sidecar.engine.backends.attention import MAX_QUERY, grouped_attention
from atlas_sidecar.engine.backends.int8 import INT8_MAX_ROWS, Int8Linear

MODEL_TYPES = ("qwen2",)  # decoders with exactly this layer layout (biased q/k/v, SwiGLU)
# New tokens per sequence up to which it is used (a draft step's sync): as many as the
# grouped attention takes.
MAX_TOKENS = MAX_QUERY


def supports(model: Any) -> bool:
    """A Qwen2-family model with full attention everywhere and SiLU gates."""
    config = model.config
    return (
        getattr(config, "model_type", None) in MODEL_TYPES
        and not getattr(model.get_decoder(), "has_sliding_layers", False)
        and getattr(config, "hidden_act", None) == "silu"
    )


class _Fused:
    """Several linear layers over the same input as one: their outputs side by side.

    Int8 layers are fused (rows concatenated, each layer's ``qweight`` and ``scale`` a
    view into the result); above ``INT8_MAX_ROWS`` rows, or for native layers, each
    layer runs on its own, as ``Int8Linear`` would."""

    def __init__(self, linears: list[nn.Module]) -> None:
        self.linears = linears
        self.qweight: torch.Tensor | None = None
        int8 = [m for m in linears if isinstance(m, Int8Linear)]
        if len(int8) == len(linears):
            self.qweight = torch.cat([m.qweight for m in int8])
            self.scale = torch.cat([m.scale for m in int8])
            start = 0
            for m in int8:
                end = start + m.out_features
                m.qweight, m.scale = self.qweight[start:end], self.scale[start:end]
                start = end
            self.bias = None
            if any(m.bias is not None for m in int8):
                self.bias = torch.cat([
                    torch.zeros(m.out_features, dtype=m.dtype) if m.bias is None else m.bias
                    for m in int8
                ])  # fmt: skip
            self.dtype = int8[0].dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is None or x.shape[0] > INT8_MAX_ROWS:
            return torch.cat([m(x) for m in self.linears], dim=-1)
        out = torch.ops.aten._weight_int8pack_mm(x.to(self.dtype), self.qweight, self.scale)
        return out if self.bias is None else out + self.bias


class LeanDecoder:
    """The decoder of a Qwen2-family model (``supports``), for chains of few tokens."""

    def __init__(self, model: Any) -> None:
        if not supports(model):
            raise ValueError(f"no lean forward for {type(model).__name__}")
        decoder = model.get_decoder()
        config = model.config
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.norm = (decoder.norm.weight, decoder.norm.variance_epsilon)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = [
            (
                (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                _Fused([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                layer.self_attn.o_proj,
                (layer.post_attention_layernorm.weight,
                 layer.post_attention_layernorm.variance_epsilon),
                _Fused([layer.mlp.gate_proj, layer.mlp.up_proj]),
                layer.mlp.down_proj,
            )
            for layer in decoder.layers
        ]  # fmt: skip

    def run(self, tokens: list[list[int]], caches: list[Any]) -> torch.Tensor:
        """Append each sequence's tokens to its cache (``DynamicCache``, full attention);
        returns the final hidden states of all of them, sequence after sequence
        [sum of lengths, hidden]."""
        device = self.embed.weight.device
        lengths = [len(t) for t in tokens]
        past = [cache.get_seq_length() for cache in caches]
        ids = torch.tensor([t for seq in tokens for t in seq], device=device)
        positions = torch.cat([torch.arange(p, p + n) for p, n in zip(past, lengths, strict=True)])
        hidden = self.embed(ids)
        cos, sin = self.rotary(hidden, positions.to(device)[None])
        cos, sin = cos[0, :, None], sin[0, :, None]  # [rows, 1, head_dim]
        # Within a sequence's new tokens, query i sees keys up to its own position.
        causal = [
            None if n == 1 else torch.arange(p + n) <= p + torch.arange(n)[:, None]
            for p, n in zip(past, lengths, strict=True)
        ]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for index, (norm_in, qkv, o_proj, norm_post, gate_up, down) in enumerate(self.layers):
            states = qkv(_rms_norm(hidden, *norm_in))
            rows = states.shape[0]
            qk = states[:, : q_size + kv_size].view(rows, self.heads + self.kv_heads, self.head_dim)
            qk = qk * cos + _rotate_half(qk) * sin
            query, key = qk[:, : self.heads], qk[:, self.heads :]
            value = states[:, q_size + kv_size :].view(rows, self.kv_heads, self.head_dim)
            attended = []
            start = 0
            for cache, n, mask in zip(caches, lengths, causal, strict=True):
                rows_of = slice(start, start + n)
                start += n
                keys, values = cache.layers[index].update(
                    key[rows_of].transpose(0, 1)[None], value[rows_of].transpose(0, 1)[None]
                )
                # [n, heads, d] -> [1, heads, n, d]; back as [1, n, heads, d].
                out, _ = grouped_attention(
                    None,
                    query[rows_of].transpose(0, 1)[None],
                    keys,
                    values,
                    None if mask is None else mask[None, None],
                )
                attended.append(out.reshape(n, q_size))
            hidden = hidden + o_proj(torch.cat(attended) if len(attended) > 1 else attended[0])
            mlp_in = gate_up(_rms_norm(hidden, *norm_post))
            gate, up = mlp_in.chunk(2, dim=-1)
            hidden = hidden + down(nn.functional.silu(gate) * up)
        return _rms_norm(hidden, *self.norm)


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As Qwen2RMSNorm: normalised in float32, scaled in the model's dtype."""
    normed = nn.functional.rms_norm(hidden.float(), (hidden.shape[-1],), eps=eps)
    return weight * normed.to(hidden.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

"""Weight-only int8 for draft models: half the bytes of bf16 read per drafted token.

A draft model decodes one token per forward, so on a CPU its cost is reading every
weight once: memory bandwidth. Int8 weights with one scale per output channel halve
that, with the same greedy token (figures: docs/design-notes.md, "Backends and
kernels"). Only ever for drafts: the target's weights are untouched, and verification
keeps the output exactly the target's.

The int8 kernel only wins while a forward has few rows: a prefill or cache catch-up of
many tokens is compute-bound, where it is several times slower than the native matmul.
So each layer keeps its native weight as well and uses it above ``INT8_MAX_ROWS`` rows:
more memory (1.5x the native weights), never a slower forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

WEIGHT_FORMATS = ("int8", "native")
INT8_MAX_ROWS = 4  # tokens in one forward up to which the int8 kernel is the faster


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights and a per-output-channel scale."""

    qweight: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        quantized = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", quantized.contiguous())
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.register_buffer("weight", linear.weight.detach())
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.dtype)
        if flat.shape[0] > INT8_MAX_ROWS:
            out = nn.functional.linear(flat, self.weight, self.bias)
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale)
            if self.bias is not None:
                out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def int8_supported(device: torch.device | str) -> bool:
    """The int8 matmul used here has a CPU kernel; GPUs keep their native weights."""
    return torch.device(device).type == "cpu"


def quantize_int8(model: Any) -> int:
    """Replace every ``nn.Linear`` of ``model`` (decoder and LM head) in place.

    Returns how many were replaced. Embeddings stay as they are (a tied LM head gets
    its own int8 copy)."""
    if not int8_supported(next(model.parameters()).device):
        raise ValueError("int8 draft weights need the CPU (use --draft-weights native)")
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
                replaced += 1
    return replaced

"""Bytes: what a request's KV cache can grow to, and what the server may spend on them.

The batch is bounded by sequence count (``max_batch``), but a sequence's KV cache grows
with its tokens, so 16 long requests can need far more memory than 16 short ones. The
scheduler admits a request only while the worst-case KV bytes of everything admitted
fit a budget: per token, layers x kv heads x head dim x dtype size x 2 (keys and
values), for the prompt, every token it may generate, and the widest draft on top.
"""

from __future__ import annotations

import os
from typing import Any

# Of the memory free when the server starts, the share KV caches may reserve: the rest
# is for activations, padded batch copies, allocator slack and the process itself.
GPU_FREE_SHARE = 0.8
CPU_AVAILABLE_SHARE = 0.5


def kv_bytes_per_token(target: Any) -> int:
    """KV cache bytes one token costs in ``target`` (0: unknown, no byte bound)."""
    model = getattr(target, "model", None)
    config = getattr(model, "config", None)
    dtype = getattr(target, "dtype", None)
    if config is None or dtype is None:
        return 0
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers) * kv_heads * head_dim * dtype.itemsize * 2


def default_kv_budget(target: Any) -> int:
    """What KV caches may reserve: a share of the device memory free now (0: unknown)."""
    device = getattr(target, "device", None)
    if device is not None and getattr(device, "type", "") == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free * GPU_FREE_SHARE)
    available = _mem_available()
    return int(available * CPU_AVAILABLE_SHARE) if available else 0


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"

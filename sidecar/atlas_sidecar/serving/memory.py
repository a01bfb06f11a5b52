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


def batch_peak_bytes(needs: list[int]) -> int:
    """Peak KV bytes of sequences whose caches need ``needs`` bytes at worst, during a
    batched step: the caches themselves plus, for two or more, the padded copy the torch
    backend's batched target forward builds of them (every row padded to the longest
    cache). One sequence is verified on its own cache, with no copy."""
    if len(needs) < 2:
        return sum(needs)
    return sum(needs) + len(needs) * max(needs)


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


def register_memory_metrics(stats: Any, engine: Any, scheduler: Any, service: Any) -> None:
    """Gauges, in bytes, of everything serving grows, read when /metrics is scraped.

    The process's own RSS (``process_resident_memory_bytes``) comes from
    prometheus_client's process collector on the same registry (ServingStats)."""
    from prometheus_client import Gauge

    r = stats.registry
    kv = Gauge("atlas_kv_cache_bytes", "Worst-case KV cache bytes: admitted requests "
               "(reserved) and what they may total (budget; 0: no byte bound)", ["kind"],
               registry=r)  # fmt: skip
    kv.labels("reserved").set_function(lambda: scheduler.kv_reserved)
    kv.labels("budget").set_function(lambda: scheduler.kv_budget_bytes)
    drafters = _drafters(engine)
    if _suffix_indexes(drafters):
        # Listed at each scrape: a versioned index's instances change with rollouts (a
        # canary and the previous version are held in memory too, and count).
        index = Gauge("atlas_suffix_index_bytes", "Suffix n-gram index bytes: global, and "
                      "the live requests' own (local)", ["scope"], registry=r)  # fmt: skip
        index.labels("global").set_function(
            lambda: sum(d.global_nbytes for d in _suffix_indexes(drafters))
        )
        index.labels("local").set_function(
            lambda: sum(d.local_nbytes for d in _suffix_indexes(drafters))
        )
    learners = _learners(drafters)
    if learners:
        learner = Gauge("atlas_learner_buffer_bytes", "Neural learner bytes: replay buffer, "
                        "and finished requests queued for it", ["buffer"], registry=r)  # fmt: skip
        learner.labels("replay").set_function(
            lambda: sum(x.distiller.buffer.nbytes for x in learners)
        )
        learner.labels("queue").set_function(
            lambda: sum(getattr(x, "queued_bytes", 0) for x in learners)
        )
    streams = Gauge("atlas_stream_pending", "Events and tokens waiting for the live RPCs' "
                    "readers (token events coalesce: at most 2 events an RPC)", ["unit"],
                    registry=r)  # fmt: skip
    streams.labels("events").set_function(
        lambda: sum(b.pending_entries for b in list(service.buffers))
    )
    streams.labels("tokens").set_function(
        lambda: sum(b.pending_tokens for b in list(service.buffers))
    )


def _suffix_indexes(drafters: list[Any]) -> list[Any]:
    """The suffix indexes behind the drafters, a versioned one's instances included."""
    found = []
    for drafter in drafters:
        instances = drafter.instances() if hasattr(drafter, "instances") else [drafter]
        found += [d for d in instances if hasattr(d, "global_nbytes")]
    return found


def _learners(drafters: list[Any]) -> list[Any]:
    """The online learners behind the drafters, each once: a versioned head's instances
    (``VersionedDrafter.instances``) share one, whichever instance is stable."""
    found: list[Any] = []
    for drafter in drafters:
        instances = drafter.instances() if hasattr(drafter, "instances") else [drafter]
        for instance in instances:
            learner = getattr(instance, "learner", None)
            if learner is not None and all(learner is not x for x in found):
                found.append(learner)
    return found


def _drafters(engine: Any) -> list[Any]:
    policy = getattr(engine, "policy", None)
    found = list(getattr(policy, "speculators", {}).values())
    found.append(getattr(policy, "speculator", None))
    return [d for d in found if d is not None]

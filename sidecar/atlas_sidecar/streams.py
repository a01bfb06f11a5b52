"""Throughput with concurrent streams: every mode decodes the same prompts N at a time.

What a busy server sees: N sequences verified together in one target forward per
step (``Engine.step_many``), each drafting and accepting on its own. Speculation
competes with batching for the same forward, so the question is whether a mode keeps
up with plain batched decoding (``target_only`` at the same N), not with one stream.

Rounds alternate between modes (each mode runs every batch of prompts in turn), so a
noisy machine slows all modes alike; ratios are to ``target_only`` in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from atlas_sidecar.engine import Engine
from atlas_sidecar.sampling import SamplingParams


@dataclass
class StreamRun:
    tokens: int = 0
    seconds: float = 0.0
    forwards: int = 0
    outputs: list[list[int]] = field(default_factory=list)
    speculated_steps: int = 0
    steps: int = 0


def run_streams(
    engines: dict[str, Engine],
    prompts: list[list[int]],
    streams: int,
    max_tokens: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Decode ``prompts`` ``streams`` at a time with each engine; tokens/s per mode."""
    if streams < 1:
        raise ValueError("streams must be >= 1")
    runs = {mode: StreamRun() for mode in engines}
    params = SamplingParams(max_tokens=max_tokens)
    for start in range(0, len(prompts), streams):
        batch = prompts[start : start + streams]
        for mode, engine in engines.items():
            run = runs[mode]
            began = time.perf_counter()
            seqs = [engine.start(ids, params) for ids in batch]
            try:
                while live := [s for s in seqs if not s.finished]:
                    engine.step_many(live)
                    run.forwards += 1
            finally:
                for seq in seqs:
                    engine.release(seq)
            run.seconds += time.perf_counter() - began
            for seq in seqs:
                run.tokens += len(seq.output)
                run.outputs.append(list(seq.output))
                run.steps += len(seq.steps)
                run.speculated_steps += sum(1 for s in seq.steps if s.drafted)
            log(f"streams={streams} batch {start // streams + 1}: {mode:<12} "
                f"{run.tokens / run.seconds:6.2f} tok/s so far")  # fmt: skip
    base = runs.get("target_only")
    out: dict[str, Any] = {"streams": streams, "prompts": len(prompts), "modes": {}}
    for mode, run in runs.items():
        rate = run.tokens / run.seconds if run.seconds else 0.0
        base_rate = base.tokens / base.seconds if base and base.seconds else None
        out["modes"][mode] = {
            "tokens_per_s": round(rate, 3),
            "speedup": round(rate / base_rate, 3) if base_rate else None,
            "target_forwards": run.forwards,
            "speculated_share": round(run.speculated_steps / run.steps, 3) if run.steps else 0.0,
            "outputs_match": run.outputs == base.outputs if base else None,
        }
    return out


def format_streams(result: dict[str, Any]) -> str:
    lines = [f"{result['streams']} concurrent streams, {result['prompts']} prompts:"]
    for mode, m in result["modes"].items():
        speedup = "-" if m["speedup"] is None else f"{m['speedup']:.2f}x"
        lines.append(
            f"  {mode:<12} {m['tokens_per_s']:7.2f} tok/s  {speedup:>6}  "
            f"forwards {m['target_forwards']:4d}  speculated {m['speculated_share']:.0%}  "
            f"match {'yes' if m['outputs_match'] else 'NO'}"
        )
    return "\n".join(lines)

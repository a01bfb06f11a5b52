"""Throughput with concurrent streams: every mode serves the same requests N at a time.

What a busy server sees (``server/scheduler.py``): N slots, each step one target forward
for every live sequence (``Engine.step_many``), and a finished request's slot taken by
the next waiting one at once (continuous batching). Each sequence drafts and accepts on
its own. Speculation competes with batching for the same forward, so the question is
whether a mode keeps up with plain batched decoding (mode ``none``, no speculation, at the same N),
not with one stream.

The modes take their steps in turn (one step of each, then the next), so a noisy
machine slows all of them alike; ratios are to mode ``none`` in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from atlas_sidecar.engine.core import Engine, Sequence
from atlas_sidecar.engine.sampling import SamplingParams


@dataclass
class StreamRun:
    """One mode's pass over the requests."""

    engine: Engine
    waiting: list[int]  # prompt indices not yet admitted, in order
    live: list[tuple[int, Sequence]] = field(default_factory=list)
    outputs: dict[int, list[int]] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    forwards: int = 0
    speculated_steps: int = 0
    steps: int = 0

    @property
    def done(self) -> bool:
        return not self.waiting and not self.live


def run_streams(
    engines: dict[str, Engine],
    prompts: list[list[int]],
    streams: int,
    max_tokens: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Serve ``prompts`` ``streams`` at a time with each engine; tokens/s per mode."""
    if streams < 1:
        raise ValueError("streams must be >= 1")
    params = SamplingParams(max_tokens=max_tokens)
    runs = {mode: StreamRun(engine, list(range(len(prompts)))) for mode, engine in engines.items()}
    reported = dict.fromkeys(runs, 0)
    try:
        while not all(run.done for run in runs.values()):
            for mode, run in runs.items():
                if not run.done:
                    _step(run, prompts, streams, params)
                finished = len(run.outputs)
                if finished - reported[mode] >= streams or (run.done and finished > reported[mode]):
                    reported[mode] = finished
                    log(f"streams={streams} {mode:<12} {finished:4d}/{len(prompts)} "
                        f"done, {run.tokens / run.seconds:6.2f} tok/s so far")  # fmt: skip
    finally:
        for run in runs.values():
            for _, seq in run.live:
                run.engine.release(seq)
    base = runs.get("none")
    out: dict[str, Any] = {"streams": streams, "prompts": len(prompts), "modes": {}}
    # Every mode's outputs in prompt order, for a caller to check (not for the JSON).
    out["outputs"] = {
        mode: [run.outputs[i] for i in range(len(prompts))] for mode, run in runs.items()
    }
    for mode, run in runs.items():
        rate = run.tokens / run.seconds if run.seconds else 0.0
        base_rate = base.tokens / base.seconds if base and base.seconds else None
        same = sum(run.outputs[i] == base.outputs[i] for i in run.outputs) if base else None
        out["modes"][mode] = {
            "tokens_per_s": round(rate, 3),
            "speedup": round(rate / base_rate, 3) if base_rate else None,
            "target_forwards": run.forwards,
            "speculated_share": round(run.speculated_steps / run.steps, 3) if run.steps else 0.0,
            "outputs_match": same == len(prompts) if base else None,
            "outputs_matching": same,
        }
    return out


def _step(run: StreamRun, prompts: list[list[int]], streams: int, params: SamplingParams) -> None:
    """Admit waiting requests into free slots (prefill), then one step of the batch."""
    began = time.perf_counter()
    while run.waiting and len(run.live) < streams:
        index = run.waiting.pop(0)
        run.live.append((index, run.engine.start(prompts[index], params)))
    unfinished = [seq for _, seq in run.live if not seq.finished]
    if unfinished:
        run.engine.step_many(unfinished)
        run.forwards += 1
    still = []
    for index, seq in run.live:
        if not seq.finished:
            still.append((index, seq))
            continue
        run.engine.release(seq)
        run.outputs[index] = list(seq.output)
        run.tokens += len(seq.output)
        run.steps += len(seq.steps)
        run.speculated_steps += sum(1 for s in seq.steps if s.drafted)
    run.live = still
    run.seconds += time.perf_counter() - began


def format_streams(result: dict[str, Any]) -> str:
    lines = [f"{result['streams']} concurrent streams, {result['prompts']} prompts:"]
    for mode, m in result["modes"].items():
        speedup = "-" if m["speedup"] is None else f"{m['speedup']:.2f}x"
        matching = m.get("outputs_matching")
        match = "-" if matching is None else f"{matching}/{result['prompts']}"
        lines.append(
            f"  {mode:<12} {m['tokens_per_s']:7.2f} tok/s  {speedup:>6}  "
            f"forwards {m['target_forwards']:4d}  speculated {m['speculated_share']:.0%}  "
            f"outputs as none {match}"
        )
    return "\n".join(lines)

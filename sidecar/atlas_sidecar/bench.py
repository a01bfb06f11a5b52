"""``atlas bench``: speculative modes side by side on real prompt sets, one run.

Every mode decodes the same prompts with the same target; speedups are ratios to
``target_only`` measured in the same run (the machine is noisy: never compare across
runs). Greedy outputs of every mode are checked against ``target_only``'s.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlas_sidecar import workloads
from atlas_sidecar.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine import DEFAULT_LOOKAHEAD, Engine, GenerationResult
from atlas_sidecar.modes import MODES, NEEDS_DRAFT, build_engine
from atlas_sidecar.sampling import SamplingParams

# A divergence in bf16 is acceptable only at a near-tie of the target's top-2 logits.
NEAR_TIE_LOGITS = 0.5


@dataclass
class BenchConfig:
    target: str
    draft: str
    dtype: str = "bf16"
    device: str = "cpu"
    workload: str = "drift"
    prompts_file: str | None = None
    per_phase: int = 3
    max_new_tokens: int = 64
    modes: tuple[str, ...] = MODES
    lookahead: int = DEFAULT_LOOKAHEAD


@dataclass
class ModeRun:
    results: list[GenerationResult] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)


def load_prompts(config: BenchConfig) -> list[workloads.Prompt]:
    if config.prompts_file:
        return workloads.load_trace(config.prompts_file)
    n = config.per_phase
    table: dict[str, Callable[[], list[workloads.Prompt]]] = {
        "drift": lambda: workloads.drift(n),
        "python": lambda: workloads.humaneval(n),
        "rust": lambda: workloads.humaneval_rust(n),
        "chat": lambda: workloads.mtbench(n),
    }
    if config.workload not in table:
        raise ValueError(f"unknown workload {config.workload!r}; choose from {', '.join(table)}")
    return table[config.workload]()


def _aggregate(results: list[GenerationResult]) -> dict[str, float]:
    tokens = sum(len(r.token_ids) for r in results)
    seconds = sum(r.elapsed_s for r in results)
    forwards = sum(len(r.steps) for r in results)
    gained = sum(r.accepted + len(r.steps) for r in results)
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 3) if seconds else 0.0,
        "accept_len": round(gained / forwards, 3) if forwards else 0.0,
    }


def run(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    unknown = set(config.modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; available: {', '.join(MODES)}")
    prompts = load_prompts(config)
    log(f"loading target {config.target} ({config.dtype}) and draft {config.draft}")
    target = CausalLMRunner.load(config.target, dtype=config.dtype, device=config.device)
    draft = None
    if NEEDS_DRAFT & set(config.modes):
        draft = CausalLMRunner.load(config.draft, dtype=config.dtype, device=config.device)
    engines = {m: build_engine(m, target, draft, config.lookahead) for m in config.modes}
    # target_only first: it is the reference for speedups and output matching.
    modes = sorted(config.modes, key=lambda m: m != "target_only")
    runs = {mode: ModeRun() for mode in modes}
    encoded = [workloads.encode(target.tokenizer, p) for p in prompts]
    # One untimed warm-up so that no mode pays for first-call allocations.
    Engine(target, target.tokenizer).generate(encoded[0], SamplingParams(max_tokens=2))
    for index, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
        params = SamplingParams(max_tokens=prompt.max_new_tokens or config.max_new_tokens)
        for mode in modes:
            result = engines[mode].generate(ids, params)
            runs[mode].results.append(result)
            runs[mode].phases.append(prompt.phase)
            log(
                f"[{index + 1}/{len(prompts)}] {prompt.phase:<7} {mode:<12} "
                f"{result.tokens_per_s:6.2f} tok/s  accept_len {result.accept_len:5.2f}"
            )
    summary = report(config, prompts, runs)
    if "target_only" in runs:
        for mode, mode_run in runs.items():
            summary["modes"][mode]["divergences"] = divergences(
                target, encoded, prompts, runs["target_only"].results, mode_run.results
            )
    return summary


def divergences(
    target: CausalLMRunner,
    encoded: list[list[int]],
    prompts: list[workloads.Prompt],
    reference: list[GenerationResult],
    results: list[GenerationResult],
) -> list[dict[str, Any]]:
    """Where a mode's greedy output first left target_only's, and the target's top-2 gap there.

    In float32 there must be none; in bf16 a k-token verify forward and a 1-token decode
    round differently, which flips the argmax only where the top two logits nearly tie.
    """
    found = []
    for ids, prompt, ref, got in zip(encoded, prompts, reference, results, strict=True):
        if got.token_ids == ref.token_ids:
            continue
        pairs = zip(ref.token_ids, got.token_ids, strict=False)
        position = next(
            (i for i, (a, b) in enumerate(pairs) if a != b),
            min(len(ref.token_ids), len(got.token_ids)),
        )
        target.start("__divergence__")
        try:
            logits = target.forward("__divergence__", ids + ref.token_ids[:position])[-1]
        finally:
            target.release("__divergence__")
        top2 = logits.topk(2).values.tolist()
        gap = top2[0] - top2[1]
        found.append({
            "prompt": prompt.prompt_id, "position": position,
            "top2_gap": round(gap, 4), "near_tie": gap <= NEAR_TIE_LOGITS,
        })  # fmt: skip
    return found


def report(
    config: BenchConfig, prompts: list[workloads.Prompt], runs: dict[str, ModeRun]
) -> dict[str, Any]:
    reference = runs.get("target_only")
    phase_names = list(dict.fromkeys(p.phase for p in prompts))
    out: dict[str, Any] = {
        "workload": config.prompts_file or config.workload,
        "target": config.target,
        "draft": config.draft,
        "dtype": config.dtype,
        "device": config.device,
        "max_new_tokens": config.max_new_tokens,
        "prompts": len(prompts),
        "modes": {},
    }
    base = _aggregate(reference.results) if reference else None
    for mode, mode_run in runs.items():
        overall = _aggregate(mode_run.results)
        entry: dict[str, Any] = dict(overall)
        entry["speedup"] = _ratio(overall, base)
        entry["outputs_match"] = (
            all(
                r.token_ids == ref.token_ids
                for r, ref in zip(mode_run.results, reference.results, strict=True)
            )
            if reference
            else None
        )
        entry["phases"] = []
        for phase in phase_names:
            pairs = zip(mode_run.results, mode_run.phases, strict=True)
            picked = [r for r, p in pairs if p == phase]
            phase_base = (
                _aggregate([r for r, p in zip(reference.results, reference.phases, strict=True)
                            if p == phase])
                if reference else None
            )  # fmt: skip
            stats = _aggregate(picked)
            entry["phases"].append({"name": phase, **stats, "speedup": _ratio(stats, phase_base)})
        entry["match_rate"] = (
            round(sum(r.token_ids == ref.token_ids
                      for r, ref in zip(mode_run.results, reference.results, strict=True))
                  / len(mode_run.results), 3)
            if reference else None
        )  # fmt: skip
        entry["speculators"] = _speculator_use(mode_run.results)
        entry["per_request"] = [
            {"phase": p, "accept_len": round(r.accept_len, 3),
             "tokens_per_s": round(r.tokens_per_s, 3)}
            for r, p in zip(mode_run.results, mode_run.phases, strict=True)
        ]  # fmt: skip
        out["modes"][mode] = entry
    return out


def _speculator_use(results: list[GenerationResult]) -> dict[str, int]:
    """How many verify steps each speculator served (or "none")."""
    counts: dict[str, int] = {}
    for result in results:
        for step in result.steps:
            counts[step.speculator] = counts.get(step.speculator, 0) + 1
    return counts


def _ratio(stats: dict[str, float], base: dict[str, float] | None) -> float | None:
    if not base or not base["tokens_per_s"]:
        return None
    return round(stats["tokens_per_s"] / base["tokens_per_s"], 3)


def format_table(result: dict[str, Any]) -> str:
    phases = [p["name"] for p in next(iter(result["modes"].values()))["phases"]]
    header = ["mode", "tok/s", "speedup", "accept_len", "match"] + [f"{p} x" for p in phases]
    notes = []
    rows = [header]
    for mode, m in result["modes"].items():
        rows.append(
            [mode, f"{m['tokens_per_s']:.2f}", _fmt(m["speedup"]), f"{m['accept_len']:.2f}",
             "yes" if m["outputs_match"] else f"{m['match_rate']:.0%}"]
            + [_fmt(p["speedup"]) for p in m["phases"]]
        )  # fmt: skip
        for d in m.get("divergences", []):
            tie = "near-tie" if d["near_tie"] else "NOT a near-tie: a bug"
            notes.append(f"{mode}: {d['prompt']} diverges at token {d['position']}, "
                         f"target top-2 gap {d['top2_gap']} ({tie})")  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + notes)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def write_json(result: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main(config: BenchConfig, out: str | None) -> int:
    started = time.perf_counter()
    result = run(config, log=lambda s: print(s, file=sys.stderr, flush=True))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(format_table(result))
    if out:
        write_json(result, out)
        print(f"wrote {out}")
    # Divergences are a failure unless every one is at a near-tie (bf16 rounding).
    found = [d for m in result["modes"].values() for d in m.get("divergences", [])]
    bad = [d for d in found if not d["near_tie"]]
    return 1 if bad else 0

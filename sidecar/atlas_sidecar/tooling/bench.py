"""``atlas bench``: speculative modes and peers side by side on real prompt sets, one run.

Every mode decodes the same prompts with the same target; speedups are ratios to
``none`` (no speculation) measured in the same run (the machine is noisy: never compare across
runs). Greedy outputs of every mode are checked against ``none``'s. Peers
(``peers``: Hugging Face assisted generation and prompt lookup, arctic-inference suffix
decoding) run as extra modes. Per request, the acceptance curve and the speedup show how
each mode follows the stream's domain shifts; ``recovery`` counts how many requests a
mode needs after each shift (see ``recovery``).

The target may be a server (``--backend sglang|triton``): our modes then verify through
it, the draft model still runs here, and the peers (which need the target's weights in
this process) are skipped. Each controller's learned costs are in the JSON, so the
per-call overhead of a remote target and the lookahead it leads to can be read off.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from atlas_sidecar.engine import build as our_modes
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.controller import Controller, ControllerConfig
from atlas_sidecar.engine.core import DEFAULT_LOOKAHEAD, Engine, GenerationResult
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.neural import WeightsError
from atlas_sidecar.learning.published import apply_version, open_published
from atlas_sidecar.learning.store import StoreError, Version
from atlas_sidecar.tooling import peers, workloads
from atlas_sidecar.tooling.streams import format_streams, run_streams

# A divergence in bf16 is acceptable only at a near-tie of the target's top-2 logits.
NEAR_TIE_LOGITS = 0.5
# A mode has recovered from a domain shift at the first request whose accept_len is at
# least (1 - RECOVERY_TOLERANCE) x its mean over the later requests of that phase.
RECOVERY_TOLERANCE = 0.10
# A streams run serves at least this many requests a slot, so that its N slots are full
# for most of the run (a batch that only drains is the tail of a run, not N streams).
REQUESTS_PER_SLOT = 3


def all_modes() -> tuple[str, ...]:
    """Every mode ``atlas_sidecar.engine.build`` offers now, then the peers."""
    return tuple(dict.fromkeys((*our_modes.MODES, *peers.PEERS)))


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
    modes: tuple[str, ...] = field(default_factory=all_modes)
    lookahead: int = DEFAULT_LOOKAHEAD
    streams: int = 0  # > 0: also decode the prompts this many at a time (our modes)
    draft_weights: str = "auto"  # int8 on CPU (``backends/int8.py``); the target keeps dtype
    backend: str = "torch"  # what ``target`` passed to ``run`` is, for the record
    snapshot: str | None = None  # a published version: our modes also run started from it


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


def run(
    config: BenchConfig, log: Callable[[str], None] = print, target: Any = None
) -> dict[str, Any]:
    """The bench; ``target``: a ready target backend (a server's), else ``config.target``
    is loaded here."""
    known = all_modes()
    unknown = set(config.modes) - set(known)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; available: {', '.join(known)}")
    prompts = load_prompts(config)
    need_draft = bool((our_modes.NEEDS_DRAFT | peers.NEEDS_DRAFT) & set(config.modes))
    target, draft = load_models(config, need_draft, log, target)
    published = open_snapshot(config, target, log)
    decoders: dict[str, peers.Decoder] = {}
    unavailable: dict[str, str] = {}
    for mode in config.modes:
        if mode not in peers.PEERS:
            decoders.update(ours_cold_and_warm(config, mode, target, draft, published))
            continue
        if not isinstance(target, CausalLMRunner):
            unavailable[mode] = f"needs the target in this process, not --backend {config.backend}"
            continue
        try:
            decoders[mode] = peers.build_peer(mode, target, draft)
        except peers.PeerUnavailable as exc:
            unavailable[mode] = str(exc)
            log(f"skipping peer {mode}: {exc}")
    encoded = [workloads.encode(target.tokenizer, p) for p in prompts]
    runs = decode_interleaved(config, target, prompts, encoded, decoders, unavailable, log)
    costs = {mode: c for mode, d in decoders.items() if (c := controller_costs(d)) is not None}
    for decoder in decoders.values():
        if isinstance(decoder, Engine):
            our_modes.close_engine(decoder)
    summary = report(config, prompts, runs)
    summary["unavailable"] = unavailable
    for mode, snapshot in costs.items():
        summary["modes"][mode]["costs"] = snapshot
    if config.streams > 0:
        stream, stream_ids = stream_prompts(config, prompts), encoded
        if stream is not prompts:
            log(f"streams: {len(stream)} requests (the same phases, more prompts of each) "
                f"so that {config.streams} are live at once")  # fmt: skip
            stream_ids = [workloads.encode(target.tokenizer, p) for p in stream]
        summary["streams"] = concurrent(config, target, draft, stream, stream_ids, log, published)
    add_divergences(summary, target, encoded, prompts, runs)
    if published is not None:
        summary["snapshot"] = {"version": published.id, "parent": published.manifest.parent,
                               "window": published.manifest.window,
                               "metrics": published.manifest.metrics,
                               "first_requests": first_requests(prompts, runs)}  # fmt: skip
    return summary


WARM_SUFFIX = "+snapshot"  # a mode started from --snapshot's version, beside its cold twin
FIRST_REQUESTS = 2  # of each phase: where a warm start shows, before online learning caught up


def ours_cold_and_warm(
    config: BenchConfig,
    mode: str,
    target: Any,
    draft: CausalLMRunner | None,
    published: Version | None,
) -> dict[str, Engine]:
    """One of our modes cold, and, with a snapshot, the same mode started from it as
    ``<mode>+snapshot`` (only where the version holds something that mode uses): the two
    decode the same prompts interleaved, so the learning loop's gain is measured side by
    side in one run, not across two runs on a machine whose speed drifts."""
    engines = {mode: build_ours(config, mode, target, draft, None)}
    if published is None:
        return engines
    warm = our_modes.build_engine(mode, target, draft, config.lookahead)
    try:
        loaded = apply_version(warm, published, target.vocab_size)
    except (WeightsError, ValueError) as err:  # the snapshot's and calibration's too
        our_modes.close_engine(warm)
        for engine in engines.values():
            our_modes.close_engine(engine)
        raise ValueError(f"--snapshot {published.id}: {err}") from err
    if not loaded:  # nothing in the version for this mode: its twin would be the same
        our_modes.close_engine(warm)
        return engines
    engines[mode + WARM_SUFFIX] = warm
    return engines


def first_requests(
    prompts: list[workloads.Prompt], runs: dict[str, ModeRun]
) -> list[dict[str, Any]]:
    """Per phase and mode with a warm twin: accept_len and tok/s over the phase's first
    FIRST_REQUESTS requests, cold against started from the snapshot."""
    out = []
    for start, end, phase in phase_segments([p.phase for p in prompts]):
        picked = range(start, min(end, start + FIRST_REQUESTS))
        for mode, mode_run in runs.items():
            warm_run = runs.get(mode + WARM_SUFFIX)
            if warm_run is None:
                continue
            cold = _aggregate([mode_run.results[i] for i in picked])
            warm = _aggregate([warm_run.results[i] for i in picked])
            out.append({"phase": phase, "mode": mode, "requests": len(picked),
                        "cold_accept_len": cold["accept_len"],
                        "warm_accept_len": warm["accept_len"],
                        "cold_tokens_per_s": cold["tokens_per_s"],
                        "warm_tokens_per_s": warm["tokens_per_s"]})  # fmt: skip
    return out


def first_request_lines(result: dict[str, Any]) -> list[str]:
    rows = (result.get("snapshot") or {}).get("first_requests") or []
    if not rows:
        return []
    lines = [f"from snapshot {result['snapshot']['version']} vs cold, the first "
             f"{FIRST_REQUESTS} requests of each phase (accept_len, tok/s):"]  # fmt: skip
    for r in rows:
        gain = (r["warm_tokens_per_s"] / r["cold_tokens_per_s"]
                if r["cold_tokens_per_s"] else None)  # fmt: skip
        lines.append(f"  {r['phase']:<7} {r['mode']:<8} accept_len {r['cold_accept_len']:.2f}"
                     f" -> {r['warm_accept_len']:.2f}, tok/s {r['cold_tokens_per_s']:.2f} -> "
                     f"{r['warm_tokens_per_s']:.2f} ({_fmt(gain)})")  # fmt: skip
    return lines


def controller_costs(decoder: peers.Decoder) -> dict[str, Any] | None:
    """What an engine's controller learned a verify forward and a drafted token cost."""
    if isinstance(decoder, Engine) and isinstance(decoder.policy, Controller):
        return decoder.policy.costs.snapshot()
    return None


def open_snapshot(
    config: BenchConfig, target: CausalLMRunner, log: Callable[[str], None]
) -> Version | None:
    """The version ``--snapshot`` names, verified against its manifest and the target
    (ValueError naming what is wrong: the command reports it, as a bad flag)."""
    if config.snapshot is None:
        return None
    try:
        version = open_published(config.snapshot, target)
    except StoreError as err:
        raise ValueError(f"--snapshot {config.snapshot}: {err}") from err
    files = ", ".join(f.name for f in version.manifest.files)
    log(f"engines start from published version {version.id} ({files})")
    return version


def build_ours(
    config: BenchConfig,
    mode: str,
    target: CausalLMRunner,
    draft: CausalLMRunner | None,
    published: Version | None,
    controller: ControllerConfig | None = None,
) -> Engine:
    """One of our engines, started from the published version when there is one: its
    suffix index, neural head and calibration priors, as a replica would start."""
    engine = our_modes.build_engine(mode, target, draft, config.lookahead, config=controller)
    if published is not None:
        try:
            apply_version(engine, published, target.vocab_size)
        except (WeightsError, ValueError) as err:  # the snapshot's and calibration's too
            our_modes.close_engine(engine)
            raise ValueError(f"--snapshot {published.id}: {err}") from err
    return engine


def load_models(
    config: BenchConfig, need_draft: bool, log: Callable[[str], None], target: Any = None
) -> tuple[Any, CausalLMRunner | None]:
    if target is None:
        log(f"loading target {config.target} ({config.dtype}) and draft {config.draft}")
        target = CausalLMRunner.load(config.target, dtype=config.dtype, device=config.device)
    draft = None
    if need_draft:
        draft = CausalLMRunner.load(
            config.draft, dtype=config.dtype, device=config.device, weights=config.draft_weights
        )
    return target, draft


def add_divergences(
    summary: dict[str, Any],
    target: Any,  # a CausalLMRunner, or a server's backend
    encoded: list[list[int]],
    prompts: list[workloads.Prompt],
    runs: dict[str, ModeRun],
) -> None:
    """Each mode's ``divergences`` from none's outputs (when none ran)."""
    if "none" not in runs:
        return
    reference = [r.token_ids for r in runs["none"].results]
    for mode, mode_run in runs.items():
        summary["modes"][mode]["divergences"] = divergences(
            target, encoded, prompts, reference, [r.token_ids for r in mode_run.results]
        )


def decode_interleaved(
    config: BenchConfig,
    target: Any,  # a CausalLMRunner, or a server's backend
    prompts: list[workloads.Prompt],
    encoded: list[list[int]],
    decoders: dict[str, peers.Decoder],
    unavailable: dict[str, str],
    log: Callable[[str], None],
) -> dict[str, ModeRun]:
    """Every decoder on every prompt, prompt-major (for each prompt, every decoder in
    turn), so that slow drift of the machine's speed affects all alike; ``none`` first.

    A peer that fails is dropped and named in ``unavailable``; one of ours raises."""
    # Untimed warm-ups so that no mode pays for first-call allocations (only where a
    # warm-up leaves no trace: not in the speculators that learn from every request).
    Engine(target, target.tokenizer).generate(encoded[0], SamplingParams(max_tokens=2))
    for mode, decoder in list(decoders.items()):
        if isinstance(decoder, peers.HFGenerate):
            try:
                decoder.generate(encoded[0], SamplingParams(max_tokens=2))
            except Exception as exc:  # a peer's failure is reported, never fatal
                unavailable[mode] = f"failed to warm up: {type(exc).__name__}: {exc}"
                log(f"skipping peer {mode}: {unavailable[mode]}")
                del decoders[mode]
    # none first: it is the reference for speedups and output matching.
    runs = {mode: ModeRun() for mode in sorted(decoders, key=lambda m: m != "none")}
    for index, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
        params = SamplingParams(max_tokens=prompt.max_new_tokens or config.max_new_tokens)
        for mode in list(runs):
            try:
                result = decoders[mode].generate(ids, params)
            except Exception as exc:  # a peer's failure is reported, never fatal
                if mode not in peers.PEERS:
                    raise
                unavailable[mode] = f"failed on {prompt.prompt_id}: {type(exc).__name__}: {exc}"
                log(f"dropping peer {mode}: {unavailable[mode]}")
                del runs[mode]
                continue
            _learn_between_requests(decoders[mode])
            runs[mode].results.append(result)
            runs[mode].phases.append(prompt.phase)
            log(
                f"[{index + 1}/{len(prompts)}] {prompt.phase:<7} {mode:<16} "
                f"{result.tokens_per_s:6.2f} tok/s  accept_len {result.accept_len:5.2f}"
            )
    return runs


def _learn_between_requests(decoder: peers.Decoder) -> None:
    """Let one of our engines' online learners train on its last request now, untimed:
    what a server does while idle between requests. Otherwise they would train while the
    next mode decodes, on the same cores (a peer's HF generate leaves the target looking
    idle to them), and slow that mode down."""
    if not isinstance(decoder, Engine):
        return
    for learner in our_modes.neural_learners(decoder):
        if not learner.wait_idle():
            raise RuntimeError("the neural learner did not finish within its timeout")


def stream_prompts(
    config: BenchConfig, prompts: list[workloads.Prompt]
) -> list[workloads.Prompt]:
    """The requests of the streams run: the bench's own, or, for a built-in workload with
    fewer than ``REQUESTS_PER_SLOT`` a slot, more prompts of each phase in the same order
    (a user's trace is served as it is)."""
    wanted = REQUESTS_PER_SLOT * config.streams
    if config.prompts_file or len(prompts) >= wanted:
        return prompts
    phases = len({p.phase for p in prompts})
    return load_prompts(replace(config, per_phase=-(-wanted // phases)))


def concurrent(
    config: BenchConfig,
    target: Any,  # a CausalLMRunner, or a server's backend
    draft: CausalLMRunner | None,
    prompts: list[workloads.Prompt],
    encoded: list[list[int]],
    log: Callable[[str], None],
    published: Version | None = None,
) -> dict[str, Any]:
    """Our modes on the same prompts, ``config.streams`` sequences per target forward.

    Fresh engines: the ones of the request stream have already learned these prompts'
    outputs. Peers decode one request at a time, so they are not in this table. An
    output that differs from none's at the same number of streams is checked
    like the one-stream ones (``divergences``)."""
    ours = [m for m in config.modes if m not in peers.PEERS]
    if "none" not in ours:
        ours.insert(0, "none")  # the reference at the same number of streams
    engines: dict[str, Engine] = {}
    for mode in ours:
        engines.update(ours_cold_and_warm(config, mode, target, draft, published))
    try:
        result = run_streams(engines, encoded, config.streams, config.max_new_tokens, log)
    finally:
        for engine in engines.values():
            our_modes.close_engine(engine)
    outputs = result.pop("outputs")
    for mode, entry in result["modes"].items():
        entry["divergences"] = divergences(
            target, encoded, prompts, outputs["none"], outputs[mode]
        )
    return result


def divergences(
    target: Any,  # a CausalLMRunner, or a server's backend
    encoded: list[list[int]],
    prompts: list[workloads.Prompt],
    reference: list[list[int]],
    results: list[list[int]],
) -> list[dict[str, Any]]:
    """Where a mode's greedy output first left none's, and the target's top-2 gap there.

    In float32 there must be none; in bf16 a k-token verify forward and a 1-token decode
    round differently, which flips the argmax only where the top two logits nearly tie.
    """
    found = []
    for ids, prompt, ref, got in zip(encoded, prompts, reference, results, strict=True):
        if got == ref:
            continue
        pairs = zip(ref, got, strict=False)
        position = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ref), len(got)))
        if target.capabilities.remote:  # a server's rows carry its argmax only: ask it
            gap = target.top2_gap(ids + ref[:position])
            found.append({"prompt": prompt.prompt_id, "position": position,
                          "top2_gap": None if gap is None else round(gap, 4),
                          "near_tie": gap is not None and gap <= NEAR_TIE_LOGITS})  # fmt: skip
            continue
        target.start("__divergence__")
        try:
            logits = target.forward("__divergence__", ids + ref[:position])[-1]
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
    reference = runs.get("none")
    phase_names = list(dict.fromkeys(p.phase for p in prompts))
    out: dict[str, Any] = {
        "workload": config.prompts_file or config.workload,
        "target": config.target,
        "draft": config.draft,
        "draft_weights": config.draft_weights,
        "backend": config.backend,
        "dtype": config.dtype,
        "device": config.device,
        "max_new_tokens": config.max_new_tokens,
        "prompts": len(prompts),
        "phase_starts": [
            {"index": start, "phase": name}
            for start, _, name in phase_segments([p.phase for p in prompts])
        ],
        "recovery_tolerance": RECOVERY_TOLERANCE,
        "modes": {},
    }
    base = _aggregate(reference.results) if reference else None
    for mode, mode_run in runs.items():
        overall = _aggregate(mode_run.results)
        entry: dict[str, Any] = dict(overall)
        entry["speedup"] = _ratio(overall, base)
        matches = (
            [r.token_ids == ref.token_ids
             for r, ref in zip(mode_run.results, reference.results, strict=True)]
            if reference else None
        )  # fmt: skip
        entry["outputs_match"] = all(matches) if matches is not None else None
        entry["match_rate"] = round(sum(matches) / len(matches), 3) if matches else None
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
        entry["speculators"] = _speculator_use(mode_run.results)
        drafts = [s.drafted for r in mode_run.results for s in r.steps if s.drafted]
        entry["drafted_per_step"] = round(statistics.fmean(drafts), 2) if drafts else 0.0
        entry["curve"] = curve(prompts, mode_run, reference)
        entry["recovery"] = recovery([c["accept_len"] for c in entry["curve"]], mode_run.phases)
        out["modes"][mode] = entry
    out.update(best_peer(out["modes"]))
    return out


def curve(
    prompts: list[workloads.Prompt], mode_run: ModeRun, reference: ModeRun | None
) -> list[dict[str, Any]]:
    """Per request, in stream order: accept_len, tok/s and speedup on that same request."""
    points = []
    for index, (prompt, result) in enumerate(zip(prompts, mode_run.results, strict=True)):
        base = reference.results[index].tokens_per_s if reference else 0.0
        points.append({
            "index": index, "phase": prompt.phase, "prompt": prompt.prompt_id,
            "accept_len": round(result.accept_len, 3),
            "tokens_per_s": round(result.tokens_per_s, 3),
            "speedup": round(result.tokens_per_s / base, 3) if base else None,
        })  # fmt: skip
    return points


def phase_segments(phases: list[str]) -> list[tuple[int, int, str]]:
    """(start, end, name) of each run of consecutive requests with the same phase."""
    segments: list[tuple[int, int, str]] = []
    for index, phase in enumerate(phases):
        if segments and segments[-1][2] == phase:
            start, _, name = segments[-1]
            segments[-1] = (start, index + 1, name)
        else:
            segments.append((index, index + 1, phase))
    return segments


def recovery(
    accept_lens: list[float], phases: list[str], tolerance: float = RECOVERY_TOLERANCE
) -> list[dict[str, Any]]:
    """After each domain shift, how many requests a mode needs to reach its new level.

    For the phase after a shift, with per-request accept_len a[0..n-1] in stream order,
    ``requests`` is the smallest i such that a[i] >= (1 - tolerance) * mean(a[i+1..n-1]):
    the requests of the new phase that ran before the mode was back within ``tolerance``
    of (or above) its level over the rest of the phase. 0 means no dip. ``None`` when no
    request qualifies before the phase's last one (never recovered, or a phase of one
    request, which has no "rest" to compare with).
    """
    out = []
    segments = phase_segments(phases)
    for (_, _, before), (start, end, name) in itertools.pairwise(segments):
        values = accept_lens[start:end]
        requests = next(
            (i for i in range(len(values) - 1)
             if values[i] >= (1 - tolerance) * statistics.fmean(values[i + 1 :])),
            None,
        )  # fmt: skip
        out.append({
            "from": before, "to": name, "shift_at": start, "phase_requests": len(values),
            "requests": requests,
        })  # fmt: skip
    return out


def best_peer(mode_entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The fastest peer in this run, and ATLAS's overall tokens/s relative to it."""
    ran = {m: e for m, e in mode_entries.items() if m in peers.PEERS}
    best = max(ran, key=lambda m: ran[m]["tokens_per_s"], default=None)
    atlas = mode_entries.get("atlas")
    ratio = None
    if best is not None and atlas is not None and ran[best]["tokens_per_s"]:
        ratio = round(atlas["tokens_per_s"] / ran[best]["tokens_per_s"], 3)
    return {"best_peer": best, "atlas_vs_best_peer": ratio}


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
    lines = [f"{mode}: unavailable: {why}" for mode, why in result.get("unavailable", {}).items()]
    if not result["modes"]:
        return "\n".join(lines + ["no mode ran"])
    phases = [p["name"] for p in next(iter(result["modes"].values()))["phases"]]
    header = ["mode", "tok/s", "speedup", "accept_len", "match"] + [f"{p} x" for p in phases]
    notes = []
    recoveries = []
    rows = [header]
    for mode, m in result["modes"].items():
        rows.append(
            [mode, f"{m['tokens_per_s']:.2f}", _fmt(m["speedup"]), f"{m['accept_len']:.2f}",
             "-" if m["outputs_match"] is None
             else "yes" if m["outputs_match"] else f"{m['match_rate']:.0%}"]
            + [_fmt(p["speedup"]) for p in m["phases"]]
        )  # fmt: skip
        notes += [f"{mode}: {divergence_line(d)}" for d in m.get("divergences", [])]
        if m["recovery"]:
            shifts = ", ".join(f"{r['to']} {_fmt_recovery(r)}" for r in m["recovery"])
            recoveries.append(f"  {mode}: {shifts}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    table.insert(1, "  ".join("-" * w for w in widths))
    if recoveries:
        tolerance = f"{result.get('recovery_tolerance', RECOVERY_TOLERANCE):.0%}"
        table.append(f"recovery: requests after a shift until accept_len is within {tolerance} "
                     "of the phase's later mean")  # fmt: skip
        table += recoveries
    table += cost_lines(result["modes"])
    table += first_request_lines(result)
    if result.get("best_peer"):
        ratio = result.get("atlas_vs_best_peer")
        vs = "" if ratio is None else f"; atlas vs best peer: {ratio:.2f}x tok/s"
        table.append(f"best peer: {result['best_peer']}{vs}")
    return "\n".join(table + notes + lines)


def cost_lines(modes: dict[str, Any]) -> list[str]:
    """A controller's learned verify cost at 1 token and at its largest measured feed,
    with the draft length it chose: a remote target's per-call overhead shows in the
    first figure, and in a longer chosen lookahead."""
    lines = []
    for mode, m in modes.items():
        verify = (m.get("costs") or {}).get("verify_s") or {}
        if not verify:
            continue
        largest = max(verify)
        lines.append(f"{mode}: verify {verify.get(1, verify[min(verify)]) * 1e3:.1f} ms at 1 "
                     f"token, {verify[largest] * 1e3:.1f} ms at {largest}; drafted "
                     f"{m['drafted_per_step']:.2f} tokens a drafting step")  # fmt: skip
    return lines


def divergence_line(d: dict[str, Any]) -> str:
    if d["top2_gap"] is None:
        return (f"{d['prompt']} diverges at token {d['position']} (the server does not "
                "tell its top-2 gap, so it counts as a bug)")  # fmt: skip
    tie = "near-tie" if d["near_tie"] else "NOT a near-tie: a bug"
    return (f"{d['prompt']} diverges at token {d['position']}, "
            f"target top-2 gap {d['top2_gap']} ({tie})")  # fmt: skip


def _fmt_recovery(shift: dict[str, Any]) -> str:
    if shift["requests"] is not None:
        return str(shift["requests"])
    return "never" if shift.get("phase_requests", 2) > 1 else "- (one request)"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def write_json(result: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Two panels over the request index: accept_len and speedup, one line per mode,
    with the phase boundaries marked and named."""
    # The bench extra; a bare Figure needs neither pyplot nor a GUI backend.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(11, 7), layout="constrained")
    accept_ax, speedup_ax = figure.subplots(2, 1, sharex=True)
    for mode, m in result["modes"].items():
        xs = [p["index"] for p in m["curve"]]
        accept_ax.plot(xs, [p["accept_len"] for p in m["curve"]], marker="o", label=mode)
        speedups = [float("nan") if p["speedup"] is None else p["speedup"] for p in m["curve"]]
        speedup_ax.plot(xs, speedups, marker="o", label=mode)
    for ax in (accept_ax, speedup_ax):
        for start in result["phase_starts"]:
            if start["index"] > 0:
                ax.axvline(start["index"] - 0.5, color="grey", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    requests = max((len(m["curve"]) for m in result["modes"].values()), default=0)
    starts = result["phase_starts"]
    ends = [s["index"] for s in starts[1:]] + [requests]
    for start, end in zip(starts, ends, strict=True):
        middle = (start["index"] + end - 1) / 2
        accept_ax.text(middle, 1.01, start["phase"], ha="center", va="bottom",
                       transform=accept_ax.get_xaxis_transform())  # fmt: skip
    speedup_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    speedup_ax.axhline(1.0, color="black", linewidth=0.8)
    accept_ax.set_ylabel("accepted tokens / target forward")
    speedup_ax.set_ylabel("speedup vs none (no speculation)")
    speedup_ax.set_xlabel("request index (stream order)")
    accept_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    figure.suptitle(f"atlas bench: {result['workload']}, target {result['target']} "
                    f"({result['dtype']})")  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main(
    config: BenchConfig, out: str | None, plot_path: str | None = None, target: Any = None
) -> int:
    started = time.perf_counter()
    result = run(config, log=lambda s: print(s, file=sys.stderr, flush=True), target=target)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(format_table(result))
    if "streams" in result:
        print(format_streams(result["streams"]))
        for mode, m in result["streams"]["modes"].items():
            for d in m["divergences"]:
                print(f"  {mode} at {result['streams']['streams']} streams: {divergence_line(d)}")
    if out:
        write_json(result, out)
        print(f"wrote {out}")
    plot_path = plot_path or (str(Path(out).with_suffix(".png")) if out else None)
    if plot_path:
        try:
            plot(result, plot_path)
            print(f"wrote {plot_path}")
        except ImportError as exc:
            print(f"no plot: matplotlib is missing ({exc}); pip install '.[bench]'")
    return exit_code(result)


def exit_code(result: dict[str, Any]) -> int:
    """Divergences are a failure unless every one is at a near-tie (bf16 rounding)."""
    tables = [result["modes"], result.get("streams", {}).get("modes", {})]
    found = [d for modes in tables for m in modes.values() for d in m.get("divergences", [])]
    bad = [d for d in found if not d["near_tie"]]
    return 1 if bad else 0

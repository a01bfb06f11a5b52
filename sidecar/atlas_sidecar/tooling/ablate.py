"""``atlas bench --ablate``: what each part of the ``atlas`` controller is worth.

One run, the same loaded target and draft, the same prompts: ``none`` (the reference),
the full controller, and the controller with each part of ``ControllerConfig`` switched
off in turn, each a fresh engine. Variants are interleaved per prompt (as ``bench.run``
does with modes) so that slow drift of the machine's speed affects all alike. A part's
worth is full tok/s / tok/s without it: above 1, the controller is slower without it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from atlas_sidecar.engine import build as our_modes
from atlas_sidecar.engine.controller import ControllerConfig
from atlas_sidecar.engine.core import Engine
from atlas_sidecar.tooling import bench, peers, workloads

FULL = "full"


def variants(parts: Sequence[str] | None = None) -> dict[str, ControllerConfig | None]:
    """Variant name -> controller config (None: ``none``, no speculation), in run order."""
    chosen = ControllerConfig.parts() if not parts else tuple(parts)
    full = ControllerConfig()
    out: dict[str, ControllerConfig | None] = {"none": None, FULL: full}
    for part in chosen:
        out[f"-{part}"] = full.without(part)  # raises on an unknown part
    return out


def parse_parts(spec: str | None) -> tuple[str, ...]:
    """``--ablate`` alone (empty or "all"): every part; else a comma-separated list."""
    if not spec or spec == "all":
        return ControllerConfig.parts()
    parts = tuple(p.strip() for p in spec.split(",") if p.strip())
    for part in parts:
        ControllerConfig().without(part)  # validates the name
    return parts


def run(
    config: bench.BenchConfig,
    parts: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    target: Any = None,
) -> dict[str, Any]:
    """``target``: a ready target backend (a server's), else ``config.target`` is loaded."""
    prompts = bench.load_prompts(config)
    target, draft = bench.load_models(config, need_draft=True, log=log, target=target)
    published = bench.open_snapshot(config, target, log)
    configs = variants(parts)
    decoders: dict[str, peers.Decoder] = {}
    for name, cfg in configs.items():
        mode = "none" if cfg is None else "atlas"
        decoders[name] = bench.build_ours(config, mode, target, draft, published, cfg)
    encoded = [workloads.encode(target.tokenizer, p) for p in prompts]
    unavailable: dict[str, str] = {}
    try:
        runs = bench.decode_interleaved(
            config, target, prompts, encoded, decoders, unavailable, log
        )
    finally:
        for decoder in decoders.values():
            if isinstance(decoder, Engine):
                our_modes.close_engine(decoder)
    summary = bench.report(config, prompts, runs)
    summary.pop("best_peer", None)
    summary.pop("atlas_vs_best_peer", None)
    summary["ablated"] = [name[1:] for name in configs if name.startswith("-")]
    summary["configs"] = {
        name: None if cfg is None else {p: getattr(cfg, p) for p in cfg.parts()}
        for name, cfg in configs.items()
    }
    full = summary["modes"][FULL]
    for name, entry in summary["modes"].items():
        entry["worth"] = _worth(full["tokens_per_s"], entry["tokens_per_s"], name)
        for phase, full_phase in zip(entry["phases"], full["phases"], strict=True):
            phase["worth"] = _worth(full_phase["tokens_per_s"], phase["tokens_per_s"], name)
    bench.add_divergences(summary, target, encoded, prompts, runs)
    return summary


def _worth(full: float, variant: float, name: str) -> float | None:
    """full / variant tok/s for an ablated variant (None for none and full)."""
    if not name.startswith("-") or not variant:
        return None
    return round(full / variant, 3)


def format_table(result: dict[str, Any]) -> str:
    modes = result["modes"]
    phases = [p["name"] for p in next(iter(modes.values()))["phases"]]
    header = ["variant", "tok/s", *(f"{p} tok/s" for p in phases), "speedup",
              *(f"{p} x" for p in phases), "worth", "accept_len", "match"]  # fmt: skip
    rows = [header]
    notes = []
    for name, m in modes.items():
        rows.append(
            [name, f"{m['tokens_per_s']:.2f}", *(f"{p['tokens_per_s']:.2f}" for p in m["phases"]),
             bench._fmt(m["speedup"]), *(bench._fmt(p["speedup"]) for p in m["phases"]),
             bench._fmt(m["worth"]), f"{m['accept_len']:.2f}", _match(m)]
        )  # fmt: skip
        notes += [f"{name}: {bench.divergence_line(d)}" for d in m.get("divergences", [])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    table.insert(1, "  ".join("-" * w for w in widths))
    table.append("worth: full tok/s / tok/s without the part (> 1: the part speeds atlas up)")
    return "\n".join(table + notes)


def _match(m: dict[str, Any]) -> str:
    if m["outputs_match"] is None:
        return "-"
    if m["outputs_match"]:
        return "yes"
    near = all(d["near_tie"] for d in m.get("divergences", []))
    return f"{m['match_rate']:.0%}" + (" (near-ties)" if near else "")


def main(
    config: bench.BenchConfig, parts: Sequence[str] | None, out: str | None, target: Any = None
) -> int:
    started = time.perf_counter()
    result = run(config, parts, log=lambda s: print(s, file=sys.stderr, flush=True), target=target)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(format_table(result))
    if out:
        bench.write_json(result, out)
        print(f"wrote {out}")
    return bench.exit_code(result)

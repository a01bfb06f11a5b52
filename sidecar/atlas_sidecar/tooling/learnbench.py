"""What the learning loop gives a replica, measured through the real loop.

``python -m atlas_sidecar.tooling.learnbench`` serves a stream of traffic (the drift
workload's phases, prompts the bench does not ask: from ``--per-phase`` on in each
dataset) through a real server whose finished requests are mirrored to a real
``atlas trainer`` process; waits until the trainer has published a version holding all
of it; then runs ``atlas bench --snapshot`` on that version: each of our modes cold
against the same mode started from the version, interleaved per prompt, on the bench's
own prompts (the first ``--per-phase`` of each phase). It prints the bench's table,
with the first requests of each phase cold against warm, and writes its JSON (the
version's manifest, the traffic served) and plot.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from atlas_sidecar import models
from atlas_sidecar.tooling import bench, workloads

PUBLISH_WAIT_S = 1800.0


def traffic_prompts(skip: int, per_phase: int) -> list[workloads.Prompt]:
    """The drift workload's phases, prompts ``skip..skip+per_phase`` of each dataset."""
    n = skip + per_phase
    return (workloads.humaneval(n)[skip:] + workloads.humaneval_rust(n)[skip:]
            + workloads.mtbench(n)[skip:])  # fmt: skip


def start_trainer(args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen[str], int]:
    """``atlas trainer`` as the Job runs it, on a free loopback port; (process, port)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "atlas_sidecar.cli", "trainer", "--port", "0",
         "--traffic-db", str(work / "traffic.sqlite"), "--weights-store", str(work / "weights"),
         "--state-dir", str(work / "state"), "--target", args.target, "--dtype", args.dtype,
         "--round-interval", "10", "--max-records", "4096",
         "--max-train-steps", str(args.train_steps), "--max-round-seconds", "1200"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    for line in process.stderr:
        if match := re.search(r"trainer ingest on [\d.]+:(\d+)", line):
            # Keep draining its log (a full pipe would block the trainer), as ours.
            threading.Thread(target=_forward, args=(process.stderr,), daemon=True).start()
            return process, int(match.group(1))
    raise RuntimeError("the trainer exited before it listened")


def _forward(stream: Any) -> None:
    for line in stream:
        print(f"trainer: {line}", end="", file=sys.stderr, flush=True)


def serve_traffic(args: argparse.Namespace, target: Any, draft: Any, port: int,
                  prompts: list[workloads.Prompt]) -> int:  # fmt: skip
    """The replica: ``atlas`` mode, every finished request mirrored; returns how many."""
    from atlas_sidecar.engine.build import build_engine, close_engine
    from atlas_sidecar.serving.app import ServerConfig, ServerThread
    from atlas_sidecar.serving.client import AtlasClient
    from atlas_sidecar.serving.mirror import MirrorConfig

    engine = build_engine("atlas", target, draft)
    config = ServerConfig(port=0, metrics_port=None,
                          mirror=MirrorConfig(f"127.0.0.1:{port}", "learnbench"))  # fmt: skip
    try:
        with ServerThread(engine, config) as server, AtlasClient(server.address) as client:
            for index, prompt in enumerate(prompts):
                ids = workloads.encode(target.tokenizer, prompt)
                done = client.generate(token_ids=ids, max_tokens=args.max_new_tokens)
                print(f"traffic [{index + 1}/{len(prompts)}] {prompt.phase:<7} "
                      f"{len(done.token_ids)} tokens", file=sys.stderr, flush=True)  # fmt: skip
    finally:
        close_engine(engine)
    return len(prompts)


def wait_for_version(store_dir: Path, records: int, limit_s: float) -> Path:
    """The first version whose training window holds all ``records`` mirrored."""
    from atlas_sidecar.learning.store import DirectoryStore

    store = DirectoryStore(store_dir)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        latest = store.latest() if store_dir.exists() else None
        if latest and int(store.manifest(latest).window.get("last_seq", 0)) >= records:
            return store_dir / latest
        time.sleep(2.0)
    raise RuntimeError(f"no version holding all {records} records in {limit_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m atlas_sidecar.tooling.learnbench",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--target", default=models.DEFAULT_TARGET)
    p.add_argument("--draft", default=models.DEFAULT_DRAFT)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--per-phase", type=int, default=4, help="bench prompts a phase")
    p.add_argument("--traffic-per-phase", type=int, default=8,
                   help="prompts a phase served through the loop before the bench")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=200, help="head steps a round")
    p.add_argument("--modes", default="none,suffix,atlas")
    p.add_argument("--out", default="bench-out/learn.json")
    p.add_argument("--work-dir", help="the trainer's files (default: a temporary directory)")
    args = p.parse_args(argv)
    from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner

    models.pull(args.target)
    models.pull(args.draft)
    with tempfile.TemporaryDirectory(prefix="atlas-learnbench-") as scratch:
        work = Path(args.work_dir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        target = CausalLMRunner.load(args.target, dtype=args.dtype)
        draft = CausalLMRunner.load(args.draft, dtype=args.dtype, weights="auto")
        prompts = traffic_prompts(args.per_phase, args.traffic_per_phase)
        trainer, port = start_trainer(args, work)
        try:
            served = serve_traffic(args, target, draft, port, prompts)
            version = wait_for_version(work / "weights", served, PUBLISH_WAIT_S)
        finally:
            trainer.send_signal(signal.SIGTERM)
            trainer.wait(600)
        del draft
        print(f"trainer published {version.name} from {served} mirrored requests",
              file=sys.stderr, flush=True)  # fmt: skip
        config = bench.BenchConfig(
            target=args.target, draft=args.draft, dtype=args.dtype, per_phase=args.per_phase,
            max_new_tokens=args.max_new_tokens, modes=tuple(args.modes.split(",")),
            snapshot=str(version),
        )  # fmt: skip
        return bench.main(config, args.out, target=target)


if __name__ == "__main__":
    raise SystemExit(main())

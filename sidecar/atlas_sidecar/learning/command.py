"""``atlas trainer``: the trainer Job's entry point.

One process does two things at once. The ingest server (gRPC, ``atlas.trainer.v1``)
takes the traffic every replica mirrors and commits it to the traffic store (SQLite in
WAL mode) before it acks. A training loop runs a bounded round every
``--round-interval`` seconds: it reads the records past its checkpoint, learns (the
global suffix index, the neural head, calibration priors) and publishes a version to the
weights store (a directory, the PVC in the cluster, or ``s3://``). SIGTERM stops
ingest first (replicas spill and re-send), lets the running round finish (its bound is
``--max-round-seconds``) and exits 0; ``--max-runtime`` does the same on a clock, so a
Job ends before its deadline kills it. With ``--report-endpoint`` each round ends with a
report to the operator (``report.py``): the newest version and accept lengths per
version, patched into the AtlasEndpoint's status, which drives the rollout.

A SIGKILL at any moment loses nothing acked (the store commits before the ack) and
leaves no torn version (the manifest is written last), and the trainer resumes from its
checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from atlas_sidecar.learning.report import AcceptWindow, pod_namespace

log = logging.getLogger(__name__)

DEFAULT_INGEST_PORT = 50060


def add_trainer_parser(sub: Any, add_model_args: Any) -> None:
    p = sub.add_parser("trainer", help="ingest mirrored traffic, learn, publish versions")
    p.add_argument("--host", default="127.0.0.1", help="ingest address (0.0.0.0 in a pod)")
    p.add_argument("--port", type=int, default=DEFAULT_INGEST_PORT,
                   help="ingest gRPC port (0: any free port)")  # fmt: skip
    p.add_argument("--traffic-db", required=True,
                   help="the traffic store's SQLite file (created if absent)")  # fmt: skip
    p.add_argument("--traffic-max-bytes", type=int, default=4 << 30,
                   help="traffic kept, oldest dropped first")  # fmt: skip
    p.add_argument("--traffic-max-age", type=float, default=7 * 86400.0,
                   help="seconds a record is kept")  # fmt: skip
    p.add_argument("--weights-store", required=True,
                   help="where versions are published: a directory, file:///path or "
                        "s3://bucket/prefix")  # fmt: skip
    p.add_argument("--state-dir", required=True,
                   help="the trainer's checkpoint and scratch files")  # fmt: skip
    p.add_argument("--revision", default=os.environ.get("ATLAS_MODEL_REVISION", ""),
                   help="the target's revision, recorded in every version's identity")  # fmt: skip
    p.add_argument("--round-interval", type=float, default=300.0,
                   help="seconds between the starts of two training rounds")  # fmt: skip
    p.add_argument("--max-records", type=int, default=512, help="records read per round")
    p.add_argument("--max-train-steps", type=int, default=200, help="head steps per round")
    p.add_argument("--max-round-seconds", type=float, default=600.0,
                   help="feature collection and training time per round")  # fmt: skip
    p.add_argument("--max-runtime", type=float, default=None,
                   help="stop cleanly after this many seconds (a Job's deadline)")  # fmt: skip
    p.add_argument("--report-endpoint", default=None, metavar="NAME",
                   help="after each round, patch this AtlasEndpoint's status with the "
                        "newest version and accept lengths per version (default: off)")  # fmt: skip
    p.add_argument("--report-namespace", default=None, metavar="NS",
                   help="the endpoint's namespace (default: $POD_NAMESPACE, else the "
                        "pod's service-account namespace)")  # fmt: skip
    p.add_argument("--report-window", type=float, default=AcceptWindow.max_age_s,
                   help="seconds of recent traffic an accept length is measured on")  # fmt: skip
    p.add_argument("--report-min-steps", type=int, default=AcceptWindow.min_steps,
                   help="drafting steps a version needs before its accept length is "
                        "reported")  # fmt: skip
    p.add_argument("--log-level", default="info")
    add_model_args(p)
    p.set_defaults(func=cmd_trainer)


def check_args(args: argparse.Namespace) -> None:
    if args.round_interval <= 0 or args.max_round_seconds <= 0:
        raise ValueError("--round-interval and --max-round-seconds must be positive")
    if args.max_records < 1 or args.max_train_steps < 0:
        raise ValueError("--max-records must be >= 1 and --max-train-steps >= 0")
    if args.max_runtime is not None and args.max_runtime <= 0:
        raise ValueError("--max-runtime must be positive")
    if args.report_namespace and not args.report_endpoint:
        raise ValueError("--report-namespace needs --report-endpoint")
    if args.report_window <= 0 or args.report_min_steps < 1:
        raise ValueError("--report-window must be positive and --report-min-steps >= 1")


def report_namespace(args: argparse.Namespace) -> str:
    """The endpoint's namespace: the flag, else the pod's own (a trainer reports to the
    endpoint that runs it, in its namespace)."""
    namespace = args.report_namespace or pod_namespace()
    if not namespace:
        raise ValueError("--report-endpoint needs --report-namespace outside a pod")
    return namespace


def cmd_trainer(args: argparse.Namespace) -> int:
    from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
    from atlas_sidecar.learning.ingest import IngestConfig
    from atlas_sidecar.learning.store import open_store
    from atlas_sidecar.learning.traffic import TrafficStore
    from atlas_sidecar.learning.trainer import Trainer, TrainerConfig

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    check_args(args)
    store = open_store(args.weights_store)
    Path(args.traffic_db).parent.mkdir(parents=True, exist_ok=True)
    traffic = TrafficStore(args.traffic_db, args.traffic_max_bytes, args.traffic_max_age)
    target = CausalLMRunner.load(args.target, dtype=args.dtype, device=args.device)
    config = TrainerConfig(max_records=args.max_records, max_train_steps=args.max_train_steps,
                           max_seconds=args.max_round_seconds)  # fmt: skip
    trainer = Trainer(traffic, store, target, args.state_dir, config, revision=args.revision)
    reporter = None
    if args.report_endpoint:
        from atlas_sidecar.learning.report import StatusReporter, newest_version

        window = AcceptWindow(max_age_s=args.report_window, min_steps=args.report_min_steps)
        reporter = StatusReporter(
            args.report_endpoint, report_namespace(args), traffic,
            lambda: newest_version(store, trainer.identity), window)  # fmt: skip
    stop = threading.Event()
    rounds = threading.Thread(target=_rounds, args=(trainer, args.round_interval, stop, reporter),
                              name="atlas-trainer-rounds")  # fmt: skip
    rounds.start()
    try:
        asyncio.run(_serve(traffic, IngestConfig(host=args.host, port=args.port),
                           args.max_runtime))  # fmt: skip
    finally:
        stop.set()
        rounds.join()
        traffic.close()
    log.info("trainer stopped")
    return 0


async def _serve(traffic: Any, config: Any, max_runtime: float | None) -> None:
    """Ingest until SIGTERM/SIGINT or ``max_runtime``."""
    from atlas_sidecar.learning.ingest import IngestServer

    server = IngestServer(traffic, config)
    port = await server.start()
    log.info("trainer ingest on %s:%d", config.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), max_runtime)
    except TimeoutError:
        log.info("--max-runtime %.0f s reached: stopping", max_runtime)
    await server.stop()


def _rounds(trainer: Any, interval_s: float, stop: threading.Event,
            reporter: Any = None) -> None:  # fmt: skip
    """A round every ``interval_s`` (from the start of the last), until ``stop``; a
    failed round is logged and the next one tries again from the checkpoint. After each
    round, published or not, the reporter (if any) tells the operator where things are:
    the newest version, and accept lengths that move with the traffic between publishes."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            result = trainer.run_round()
            if result.version:
                log.info("round published %s: %d new records, metrics %s",
                         result.version, result.records, result.metrics)  # fmt: skip
        except Exception:  # noqa: BLE001 - a bad round must not end the trainer
            log.exception("training round failed; retrying at the next interval")
        if reporter is not None:
            reporter.report()  # never raises: a failed report waits for a later round
        stop.wait(max(0.0, interval_s - (time.monotonic() - started)))

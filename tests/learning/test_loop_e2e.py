"""The learning loop end to end on the small real model: a replica's traffic flows
through the mirror into a real ``atlas trainer`` process, which publishes a version; a
second replica swaps it in while a stream is in flight (that stream stays exactly the
target's greedy output) and then drafts better on that domain than it did before."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from atlas_sidecar import models
from atlas_sidecar.engine.build import build_engine
from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.learning import replica
from atlas_sidecar.learning.published import SUFFIX_FILE, target_identity
from atlas_sidecar.learning.store import DirectoryStore
from atlas_sidecar.serving.app import ServerConfig, ServerThread
from atlas_sidecar.serving.client import AtlasClient
from atlas_sidecar.serving.mirror import MirrorConfig
from atlas_sidecar.tooling import workloads

REPO = Path(__file__).resolve().parents[2]
PROMPTS = 4  # HumanEval prompts the first replica serves (the second asks them again)
TOKENS = 48
ADMIN = "admin-token-for-tests"


def start_trainer(tmp: Path) -> tuple[subprocess.Popen[str], int]:
    """``atlas trainer`` as the Job runs it, on a free port; (process, port)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "atlas_sidecar.cli", "trainer", "--port", "0",
         "--traffic-db", str(tmp / "traffic.sqlite"), "--weights-store", str(tmp / "weights"),
         "--state-dir", str(tmp / "state"), "--target", models.TEST_MODEL, "--dtype", "fp32",
         "--round-interval", "2", "--max-train-steps", "10", "--max-round-seconds", "60"],
        stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    seen = []
    for line in process.stderr:  # type: ignore[union-attr]
        seen.append(line)
        if match := re.search(r"trainer ingest on [\d.]+:(\d+)", line):
            return process, int(match.group(1))
    raise AssertionError("the trainer never reported its port:\n" + "".join(seen[-20:]))


def serve_requests(target, mirror: MirrorConfig, prompts: list[list[int]]) -> None:
    """Replica A: the suffix speculator, every finished request mirrored."""
    engine = build_engine("suffix", target)
    config = ServerConfig(port=0, metrics_port=None, mirror=mirror)
    with ServerThread(engine, config) as server, AtlasClient(server.address) as client:
        for ids in prompts:
            client.generate(token_ids=ids, max_tokens=TOKENS)


def wait_for_version(store: DirectoryStore, limit_s: float = 180.0) -> str:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if (latest := store.latest()) is not None:
            return latest
        time.sleep(0.5)
    raise AssertionError(f"the trainer published nothing in {limit_s:.0f} s")


def test_mirrored_traffic_trains_a_version_that_a_replica_swaps_in_live(target, tmp_path):
    tok = target.tokenizer
    chosen = workloads.humaneval(40 + PROMPTS + 1)[40:]
    prompts = [workloads.encode(tok, p) for p in chosen]
    greedy = SamplingParams(max_tokens=TOKENS)
    want = [Engine(target, tok).generate(ids, greedy).token_ids for ids in prompts]
    trainer, port = start_trainer(tmp_path)
    try:
        serve_requests(target, MirrorConfig(f"127.0.0.1:{port}", "replica-a"),
                       prompts[:PROMPTS])  # fmt: skip
        store = DirectoryStore(tmp_path / "weights")
        version = wait_for_version(store)
        assert SUFFIX_FILE in {f.name for f in store.manifest(version).files}
    finally:
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(timeout=120) == 0
    # Replica B: cold, never mirrored; the version comes from A's traffic.
    engine = build_engine("suffix", target, versioned=True)
    rollout = replica.build_rollout(store, target_identity(target), engine, target.vocab_size, 0.0)
    server = ServerThread(engine, ServerConfig(port=0, metrics_port=None, admin_token=ADMIN))
    server.server.use_rollout(rollout)
    with server, AtlasClient(server.address) as client:
        admin = AtlasClient(server.address, token=ADMIN)
        for ids, expected in zip(prompts[:PROMPTS], want, strict=False):
            assert client.generate(token_ids=ids, max_tokens=TOKENS).token_ids == expected
        stream = client.generate_stream(token_ids=prompts[PROMPTS], max_tokens=TOKENS)
        got = list(next(stream).token_ids)
        assert admin.rollout_weights(version).applied
        chunks = list(stream)
        got += [t for c in chunks for t in c.token_ids]
        assert got == want[PROMPTS] and chunks[-1].weight_version == "base"
        for ids, expected in zip(prompts[:PROMPTS], want, strict=False):
            done = client.generate(token_ids=ids, max_tokens=TOKENS)
            assert done.token_ids == expected and done.weight_version == version
        by_version = {v.version: v for v in admin.stats().versions}
        admin.close()
    # The same domain's requests: the trainer's version drafts far better than cold.
    assert by_version[version].accept_len > by_version["base"].accept_len + 0.5, by_version


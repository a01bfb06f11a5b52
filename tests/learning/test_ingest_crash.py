"""SIGKILL of the trainer's ingest process mid-stream loses nothing it acked, and the
mirror delivers the rest once it is back."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from atlas_sidecar.learning.traffic import TrafficStore
from atlas_sidecar.serving.mirror import Mirror, MirrorConfig

from .conftest import free_port, make_record, metric, wait_until

CHILD = """
import asyncio, sys
from atlas_sidecar.learning.ingest import IngestConfig, run_ingest
from atlas_sidecar.learning.traffic import TrafficStore

store = TrafficStore(sys.argv[1], max_bytes=1 << 30, max_age_s=86400)
ready = lambda port: print(f"ready {port}", flush=True)
asyncio.run(run_ingest(store, IngestConfig(port=int(sys.argv[2])), on_ready=ready))
"""
RECORDS = 1500


def start_trainer(db: Path, port: int) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(db), str(port)],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout is not None
    assert child.stdout.readline().strip() == f"ready {port}"
    return child


def stored_ids(db: Path) -> list[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [row[0] for row in conn.execute("SELECT request_id FROM traffic")]


def test_sigkill_mid_ingest_keeps_every_acked_record_and_the_rest_follow(tmp_path):
    db, port = tmp_path / "traffic.db", free_port()
    child = start_trainer(db, port)
    registry = CollectorRegistry()
    config = MirrorConfig(url=f"127.0.0.1:{port}", replica="r0", spill_dir=tmp_path / "spill",
                          ack_timeout_s=1.0, retry_max_s=0.3)  # fmt: skip
    mirror = Mirror(config, registry)
    acked: list[str] = []
    on_ack = mirror._on_ack

    def spy(session, ack) -> None:  # what the trainer acked, as the mirror reads it
        acked.extend(ack.request_ids)
        on_ack(session, ack)

    mirror._on_ack = spy  # type: ignore[method-assign]
    mirror.start()
    records = [make_record(i, tokens=64) for i in range(RECORDS)]
    offering = threading.Thread(target=lambda: [(mirror.offer(r), time.sleep(0.001))
                                                for r in records])  # fmt: skip
    offering.start()
    try:
        wait_until(lambda: len(acked) >= 100, "the trainer acking")
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        time.sleep(0.2)  # acks already on the wire reach the spy
        acked_at_kill = set(acked)
        assert len(acked_at_kill) < RECORDS, "the kill came after everything was acked"
        store = TrafficStore(db, max_bytes=1 << 30, max_age_s=86400)  # recovers the WAL
        present = {r.request_id for _, r in store.read(limit=RECORDS)}
        store.close()
        assert acked_at_kill <= present, sorted(acked_at_kill - present)[:5]
        child = start_trainer(db, port)
        offering.join(60)
        wait_until(lambda: len(stored_ids(db)) >= RECORDS, "the unacked re-delivered", 60)
    finally:
        mirror.close()
        child.kill()
        child.wait(30)
    ids = stored_ids(db)
    assert sorted(ids) == sorted(r.request_id for r in records)  # each exactly once
    assert metric(registry, "atlas_mirror_dropped_records_total", reason="spill_full") == 0

"""SIGKILL of a real ``atlas trainer`` in the middle of publishing a version: no reader
ever sees a torn version, and the restarted trainer learns every ingested record exactly
once (the versions' training windows tile the traffic with no gap and no overlap)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from atlas_sidecar import models
from atlas_sidecar.learning.records import TrafficRecord
from atlas_sidecar.learning.store import TMP_PREFIX, DirectoryStore, StoreError
from atlas_sidecar.learning.traffic import TrafficStore

REPO = Path(__file__).resolve().parents[2]
RECORDS = 120
PER_ROUND = 40  # --max-records: three versions for the whole traffic
TOKENS = 96
ATTEMPTS = 6  # kills until one lands mid-publish (each attempt is one publish or more)


def records() -> list[TrafficRecord]:
    now = time.time()
    out = []
    for i in range(RECORDS):
        prompt = tuple(100 + (i * 7 + j) % 2000 for j in range(TOKENS))
        out.append(TrafficRecord(
            request_id=f"r{i % 3}/{i:08x}", replica=f"r{i % 3}", prompt_ids=prompt,
            output_ids=prompt[:8], step_speculators=("suffix", "none"), step_drafted=(4, 0),
            step_accepted=(3, 0), weight_version="base", finished_at=now, sampled=False,
        ))  # fmt: skip
    return out


def start_trainer(tmp: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "atlas_sidecar.cli", "trainer", "--port", "0",
         "--traffic-db", str(tmp / "traffic.sqlite"), "--weights-store", str(tmp / "weights"),
         "--state-dir", str(tmp / "state"), "--target", models.TEST_MODEL, "--dtype", "fp32",
         "--round-interval", "0.2", "--max-records", str(PER_ROUND),
         "--max-train-steps", "2", "--max-round-seconds", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def staging(root: Path) -> set[str]:
    try:
        return {p.name for p in root.iterdir() if p.name.startswith(TMP_PREFIX)}
    except FileNotFoundError:
        return set()


class Reader(threading.Thread):
    """A sidecar's view of the store, as fast as it can look: every version ``latest``
    names must open whole (every file's sha256 checked)."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root, self.stop, self.opened, self.errors = root, threading.Event(), set(), []

    def run(self) -> None:
        while not self.stop.is_set():
            if not (self.root / "latest").exists():
                time.sleep(0.005)
                continue
            store = DirectoryStore(self.root)
            try:
                version = store.latest()
                if version is not None:
                    opened = store.open_version(version)
                    for f in opened.manifest.files:
                        opened.read(f.name)
                    self.opened.add(version)
            except StoreError as exc:
                self.errors.append(str(exc))


def kill_mid_publish(trainer: subprocess.Popen[bytes], root: Path, limit_s: float) -> bool:
    """SIGKILL ``trainer`` the moment a publish is staging; True if it died mid-publish
    (its staging directory is left behind)."""
    before = staging(root)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and trainer.poll() is None:
        if staging(root) - before:
            trainer.send_signal(signal.SIGKILL)
            trainer.wait(30)
            return bool(staging(root) - before)
        time.sleep(0.0005)
    trainer.kill()
    trainer.wait(30)
    return False


def test_sigkill_mid_publish_leaves_no_torn_version_and_loses_no_record(tmp_path):
    models.pull(models.TEST_MODEL)
    traffic = TrafficStore(tmp_path / "traffic.sqlite", max_bytes=1 << 30, max_age_s=86400)
    assert traffic.add(records()) == RECORDS
    traffic.close()
    root = tmp_path / "weights"
    reader = Reader(root)
    reader.start()
    killed_mid_publish = 0
    try:
        for _ in range(ATTEMPTS):
            killed_mid_publish += kill_mid_publish(start_trainer(tmp_path), root, 120.0)
            if killed_mid_publish >= 1:
                break
        assert killed_mid_publish >= 1, "no kill landed while a version was being staged"
        trainer = start_trainer(tmp_path)
        try:
            store = DirectoryStore(root)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                latest = store.latest()
                if latest and store.manifest(latest).window.get("last_seq") == RECORDS:
                    break
                time.sleep(0.2)
            else:
                raise AssertionError("the restarted trainer never caught up with the traffic")
        finally:
            trainer.send_signal(signal.SIGTERM)
            assert trainer.wait(120) == 0
    finally:
        reader.stop.set()
        reader.join(30)
    assert not reader.errors, reader.errors[:3]
    assert reader.opened, "the reader never saw a version"
    store = DirectoryStore(root)
    windows = []
    for version in store.versions():
        opened = store.open_version(version)  # whole: every file's sha256 checks
        windows.append((opened.manifest.window["first_seq"], opened.manifest.window["last_seq"]))
    windows.sort()
    # Every record learned exactly once: the windows tile 1..RECORDS.
    assert windows[0][0] == 1 and windows[-1][1] == RECORDS, windows
    for (_, last), (first, _) in zip(windows, windows[1:], strict=False):
        assert first == last + 1, windows

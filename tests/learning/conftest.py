"""Mirror <-> trainer fixtures: a real TrafficStore behind a real ingest server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from atlas_sidecar.learning.ingest import IngestConfig, IngestServerThread
from atlas_sidecar.learning.records import TrafficRecord
from atlas_sidecar.learning.traffic import TrafficStore
from atlas_sidecar.serving.mirror import Mirror, MirrorConfig


def make_record(i: int, replica: str = "r0", tokens: int = 8) -> TrafficRecord:
    return TrafficRecord(
        request_id=f"{replica}/{i:08x}",
        replica=replica,
        prompt_ids=tuple(range(i, i + tokens)),
        output_ids=(7, 8, 9),
        step_speculators=("static", "none", "suffix"),
        step_drafted=(3, 0, 2),
        step_accepted=(2, 0, 1),
        weight_version="v000001",
        finished_at=1700000000.5 + i,
        sampled=bool(i % 2),
    )


class GatedStore(TrafficStore):
    """A real store whose ``add`` waits while the gate is closed: a stalled trainer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()

    def add(self, records: Iterable[TrafficRecord]) -> int:
        if not self.gate.is_set():
            self.waiting.set()
            self.gate.wait(60)
        return super().add(records)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], bool], what: str, limit_s: float = 30.0) -> None:
    """Poll until ``condition`` holds; the limit only guards against a hang."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[GatedStore]:
    s = GatedStore(tmp_path / "traffic.db", max_bytes=64 << 20, max_age_s=3600)
    yield s
    s.gate.set()
    s.close()


@pytest.fixture
def trainer(store: GatedStore) -> Iterator[IngestServerThread]:
    with IngestServerThread(store, IngestConfig(port=0)) as thread:
        yield thread
        store.gate.set()  # a failed test may leave it shut: the server's writer must finish


@pytest.fixture
def mirror_for(tmp_path: Path) -> Iterator[Callable[..., tuple[Mirror, CollectorRegistry]]]:
    mirrors: list[Mirror] = []

    def make(url: str, **config: Any) -> tuple[Mirror, CollectorRegistry]:
        config.setdefault("spill_dir", tmp_path / "spill")
        registry = CollectorRegistry()
        mirror = Mirror(MirrorConfig(url=url, replica="r0", **config), registry).start()
        mirrors.append(mirror)
        return mirror, registry

    yield make
    for mirror in mirrors:
        mirror.close()

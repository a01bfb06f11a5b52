"""Fixtures of the learning tests:

- moto's S3 server (a real HTTP server in a subprocess on a loopback port, not the
  in-process mock) with one harness per store kind, so the shared contract tests run
  against ``DirectoryStore`` and ``ObjectStore`` alike;
- the small real model (SmolLM2-135M, fp32, recording hidden states) with traffic of
  real prompts it answered greedily, for the trainer's tests;
- a real TrafficStore behind a real ingest server on loopback, for the mirror's tests.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from atlas_sidecar import models
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.build import build_engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.neural_train import TrainConfig
from atlas_sidecar.learning.ingest import IngestConfig, IngestServerThread
from atlas_sidecar.learning.records import TrafficRecord
from atlas_sidecar.learning.store import LATEST, MANIFEST, DirectoryStore, version_number
from atlas_sidecar.learning.traffic import TrafficStore
from atlas_sidecar.learning.trainer import Trainer, TrainerConfig
from atlas_sidecar.serving.mirror import Mirror, MirrorConfig
from atlas_sidecar.tooling import workloads

# Fake credentials for moto only; set before any client is made, never real ones.
MOTO_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _wait_listening(port: int, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"moto server exited: {log.read_text()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"moto server did not listen in 30 s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a moto S3 server for the whole session.

    Its working directory is a fresh empty one: ``python -m`` puts the cwd first on
    sys.path, and a stray module there (a ``cmd.py``) would shadow the stdlib.
    """
    workdir = tmp_path_factory.mktemp("moto")
    log = workdir / "server.log"
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in MOTO_ENV.items():
            patch.setenv(key, value)
        patch.delenv("AWS_PROFILE", raising=False)
        with open(log, "wb") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ),
            )  # fmt: skip
        try:
            _wait_listening(port, server, log)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=10)


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> tuple[Any, str]:
    """A fresh bucket per test and a client on it."""
    from atlas_sidecar.learning.objectstore import _client

    client = _client(moto_endpoint)
    bucket = f"atlas-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


class DirHarness:
    """Reach under a ``DirectoryStore`` to damage it the way a disk or a person could."""

    kind = "dir"

    def __init__(self, root: Path) -> None:
        self.root = root

    def make(self, **options: Any) -> DirectoryStore:
        return DirectoryStore(self.root, **options)

    def read_raw(self, version: str, name: str) -> bytes:
        return (self.root / version / name).read_bytes()

    def write_raw(self, version: str, name: str, data: bytes) -> None:
        (self.root / version / name).write_bytes(data)

    def remove_raw(self, version: str, name: str) -> None:
        (self.root / version / name).unlink()

    def set_latest(self, version: str) -> None:
        (self.root / LATEST).write_text(version + "\n")

    def rename_version(self, old: str, new: str) -> None:
        os.rename(self.root / old, self.root / new)
        path = self.root / new / MANIFEST
        path.write_text(path.read_text().replace(old, new))

    def leftovers(self) -> list[str]:
        return [p.name for p in self.root.iterdir() if p.name.startswith(".tmp-")]


class S3Harness:
    """The same for an ``ObjectStore``: objects under ``bucket/prefix``."""

    kind = "s3"

    def __init__(self, client: Any, bucket: str, endpoint: str) -> None:
        self.client, self.bucket, self.endpoint = client, bucket, endpoint
        self.prefix = "weights/target-a"

    def make(self, **options: Any) -> Any:
        from atlas_sidecar.learning.objectstore import ObjectStore

        options.setdefault("client", self.client)
        return ObjectStore(self.bucket, self.prefix, **options)

    def key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts])

    def read_raw(self, version: str, name: str) -> bytes:
        obj = self.client.get_object(Bucket=self.bucket, Key=self.key(version, name))
        return bytes(obj["Body"].read())

    def write_raw(self, version: str, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(version, name), Body=data)

    def remove_raw(self, version: str, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(version, name))

    def set_latest(self, version: str) -> None:
        self.client.put_object(
            Bucket=self.bucket, Key=self.key(LATEST), Body=(version + "\n").encode()
        )

    def rename_version(self, old: str, new: str) -> None:
        names = [k.rsplit("/", 1)[1] for k in self.keys() if k.startswith(self.key(old) + "/")]
        for name in names:
            data = self.read_raw(old, name)
            if name == MANIFEST:
                data = data.replace(old.encode(), new.encode())
            self.write_raw(new, name, data)
            self.remove_raw(old, name)

    def keys(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + "/"
        )
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def leftovers(self) -> list[str]:
        """Keys of ids without a manifest, and incomplete multipart uploads."""
        keys = self.keys()
        done = {k.rsplit("/", 1)[0] for k in keys if k.endswith("/" + MANIFEST)}
        orphans = [
            k
            for k in keys
            if version_number(k.split("/")[2]) is not None and k.rsplit("/", 1)[0] not in done
        ]
        uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix)
        return orphans + [u["Key"] for u in uploads.get("Uploads", [])]


@pytest.fixture(params=["dir", "s3"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> DirHarness | S3Harness:
    """Each contract test once per store kind."""
    if request.param == "dir":
        return DirHarness(tmp_path / "store")
    client, bucket = request.getfixturevalue("s3_bucket")
    return S3Harness(client, bucket, request.getfixturevalue("moto_endpoint"))
TRAFFIC_SKIP = 20  # HumanEval prompts from 20 on: the bench asks the first ones
TRAFFIC_PROMPTS = 12
TRAFFIC_TOKENS = 48
FAST = TrainerConfig(
    max_train_steps=30,
    max_record_tokens=256,
    heldout_fraction=0.34,  # two of six records
    train=TrainConfig(batch_size=64, buffer_tokens=20_000),
)
FIRST = 6  # records of the first round; the rest arrive later


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Small-batch work on a small model: one thread is as fast, never oversubscribes a
    shared machine, and makes training runs repeat exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def target() -> CausalLMRunner:
    models.pull(models.TEST_MODEL)
    torch.manual_seed(0)
    return CausalLMRunner.load(models.TEST_MODEL, dtype="fp32", record_hidden=True)


@pytest.fixture(scope="session")
def python_traffic(target: CausalLMRunner) -> list[TrafficRecord]:
    """HumanEval prompts answered greedily by the target through the suffix engine, as a
    replica would mirror them: the engine's real per-step drafted/accepted counts."""
    engine = build_engine("suffix", target)
    prompts = workloads.humaneval(TRAFFIC_SKIP + TRAFFIC_PROMPTS)[TRAFFIC_SKIP:]
    records = []
    for i, prompt in enumerate(prompts):
        ids = workloads.encode(target.tokenizer, prompt)
        result = engine.generate(ids, SamplingParams(max_tokens=TRAFFIC_TOKENS))
        records.append(record_of(f"replica-{i % 2}/{prompt.prompt_id}", ids, result))
    return records


@pytest.fixture(scope="session")
def first_round(tmp_path_factory, target, python_traffic):
    """One round over the first records into an empty store: (root, source, result);
    the store is ``root/store``, the trainer's state ``root/state``."""
    root = tmp_path_factory.mktemp("first")
    source = MemorySource(python_traffic[:FIRST])
    trainer = Trainer(source, DirectoryStore(root / "store"), target, root / "state", FAST)
    return root, source, trainer.run_round()


def record_of(request_id: str, prompt: list[int], result) -> TrafficRecord:
    return TrafficRecord(
        request_id=request_id,
        replica=request_id.split("/")[0],
        prompt_ids=tuple(prompt),
        output_ids=tuple(result.token_ids),
        step_speculators=tuple(s.speculator for s in result.steps),
        step_drafted=tuple(s.drafted for s in result.steps),
        step_accepted=tuple(s.accepted for s in result.steps),
        weight_version="",
        finished_at=0.0,
        sampled=False,
    )


class MemorySource:
    """A TrafficSource in memory: seq is the position in ingest order, from 1."""

    def __init__(self, records: list[TrafficRecord] | None = None) -> None:
        self.rows: list[tuple[int, TrafficRecord]] = []
        self.add(records or [])

    def add(self, records: list[TrafficRecord]) -> None:
        for record in records:
            self.rows.append((len(self.rows) + 1, record))

    def read(self, after: int = 0, limit: int = 1000) -> list[tuple[int, TrafficRecord]]:
        return [row for row in self.rows if row[0] > after][:limit]

    def count(self) -> int:
        return len(self.rows)


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


def swap_mid_stream(engine, rollout, ids: list[int], want: list[int], version: str,
                    max_tokens: int) -> dict[str, Any]:  # fmt: skip
    """Serve ``engine`` with ``rollout``; ask for ``version`` while a stream of ``ids`` is
    in flight and check both ends: the stream equals ``want`` and finishes on "base",
    installed at a step boundary while it still decoded; a new request equals ``want``
    on ``version``, which is then stable with "base" previous. Returns GetStats's
    per-version entries and the served weight version (key "weight_version")."""
    from atlas_sidecar.serving.app import ServerConfig, ServerThread
    from atlas_sidecar.serving.client import AtlasClient

    config = ServerConfig(port=0, metrics_port=None, admin_token="admin-secret")
    server = ServerThread(engine, config)
    server.server.use_rollout(rollout)
    server.start()
    try:
        admin = AtlasClient(server.address, timeout=120, token="admin-secret")
        with admin, AtlasClient(server.address, timeout=120) as client:
            chunks = client.generate_stream(token_ids=ids, max_tokens=max_tokens)
            got = list(next(chunks).token_ids)
            assert admin.rollout_weights(version).applied
            for _ in range(500):  # installed at the next step boundary
                if rollout.pending is None:
                    break
                time.sleep(0.01)
            assert rollout.pending is None
            assert server.server.scheduler.active == 1  # ...while the stream still decodes
            last = None
            for last in chunks:
                got += list(last.token_ids)
            assert got == want  # exact, and it finished on the version it started with
            assert last is not None and last.weight_version == "base"
            again = client.generate(token_ids=ids, max_tokens=max_tokens)
            assert list(again.token_ids) == want  # the new version's drafts, verified
            assert again.weight_version == version
            stats: dict[str, Any] = {v.version: v for v in admin.stats().versions}
            assert stats[version].role == "stable" and stats["base"].role == "previous"
            stats["weight_version"] = admin.stats().weight_version
            return stats
    finally:
        server.stop()

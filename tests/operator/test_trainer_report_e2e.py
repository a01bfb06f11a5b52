"""The loop closed in the cluster: the trainer's reporter patches its AtlasEndpoint's status
in the Kubernetes emulator, and the real operator turns that into the rollout ConfigMap
(a first version served at once, the next one in canary, a canary that drafts worse
rolled back). The reporter only ever touches the status subresource, and an apiserver
that refuses it never makes it raise."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from operator_harness import NAMESPACE, ApiServer, eventually
from test_operator_e2e import ENDPOINTS, NAME, all_children_exist, endpoint, send

from atlas_sidecar.learning import report
from atlas_sidecar.learning.records import TrafficRecord
from atlas_sidecar.learning.report import AcceptWindow, StatusReporter, newest_version
from atlas_sidecar.learning.store import DirectoryStore, TargetIdentity
from atlas_sidecar.learning.traffic import TrafficStore

pytestmark = pytest.mark.flaky(reruns=1)  # as test_operator_e2e.py: kopf's stop, rarely
ENDPOINT = "atlas.ai/v1alpha1/atlasendpoints"
REPO = Path(__file__).resolve().parents[2]
TARGET = TargetIdentity("m", "r", 8, 16)
_ids = iter(range(1_000_000))


def records(version: str, accepted: int, n: int = 20, sampled: bool = False) -> list[TrafficRecord]:
    return [TrafficRecord(
        request_id=f"r0/{next(_ids):08x}", replica="r0", prompt_ids=(5, 6, 7), output_ids=(8,),
        step_speculators=("suffix",) * 10 + ("none",), step_drafted=(4,) * 10 + (0,),
        step_accepted=(accepted,) * 10 + (0,), weight_version=version,
        finished_at=time.time(), sampled=sampled) for _ in range(n)]  # fmt: skip


class Trainer:
    """What ``atlas trainer`` wires: its traffic store, weights store and reporter."""

    def __init__(self, tmp: Path, endpoint_name: str = NAME) -> None:
        self.traffic = TrafficStore(tmp / "traffic.sqlite", 1 << 26, 86400)
        self.store = DirectoryStore(tmp / "weights")
        self.clock = [0.0]
        self.reporter = StatusReporter(
            endpoint_name, NAMESPACE, self.traffic, lambda: newest_version(self.store, TARGET),
            AcceptWindow(min_steps=50), clock=lambda: self.clock[0])  # fmt: skip

    def publish(self) -> str:
        return self.store.publish({"suffix.bin": b"index"}, target=TARGET).version

    async def report(self) -> bool:
        ok: bool = await asyncio.to_thread(self.reporter.report)  # the emulator is in this loop
        return ok


def reporter_requests(apiserver: ApiServer) -> list[Any]:
    return [r for r in apiserver._requests
            if r.headers.get("User-Agent", "").startswith(report.USER_AGENT)]


def status(apiserver: ApiServer) -> dict[str, Any]:
    return dict(apiserver.get(ENDPOINT, NAME)["status"])


def rollout(apiserver: ApiServer) -> dict[str, str]:
    return dict(apiserver.get("v1/configmaps", f"{NAME}-rollout")["data"])


async def test_reported_versions_and_accept_lengths_drive_the_rollout(
        apiserver: ApiServer, operator: Any, tmp_path: Path) -> None:
    await send(apiserver, "POST", ENDPOINTS, endpoint(rollout={
        "canaryFraction": 0.25, "canaryDurationSeconds": 3600, "maxAcceptLengthDrop": 0.1}))
    await eventually(lambda: all_children_exist(apiserver), message="all children")
    trainer = Trainer(tmp_path)

    # Nothing published: the report says nothing of a version.
    assert await trainer.report()
    assert "latestPublishedVersion" not in status(apiserver)

    # The first version: nothing serves yet, so the operator serves it at once.
    first = trainer.publish()
    assert await trainer.report()
    assert status(apiserver)["latestPublishedVersion"] == first
    await eventually(lambda: rollout(apiserver)["weight-version"] == first,
                     message="first version served")

    # Traffic drafted by it, then a second version: it goes to canary.
    trainer.traffic.add(records(first, accepted=3))
    second = trainer.publish()
    assert await trainer.report()
    data = await eventually(lambda: (d := rollout(apiserver))["canary-version"] == second and d,
                            message="second version in canary")
    assert data == {"weight-version": first, "canary-version": second, "canary-fraction": "0.25"}
    assert status(apiserver)["acceptLengthByVersion"] == {first: 3.0}

    # The canary drafts worse on greedy traffic (its sampled traffic, however good, does
    # not count): the report carries it and the operator rolls the canary back.
    trainer.traffic.add(records(second, accepted=4, sampled=True))
    trainer.traffic.add(records(second, accepted=1))
    assert await trainer.report()
    assert status(apiserver)["acceptLengthByVersion"] == {first: 3.0, second: 1.0}
    await eventually(lambda: rollout(apiserver)["canary-version"] == ""
                     and second in status(apiserver)["rollout"]["rejectedVersions"],
                     message="canary rolled back")
    assert rollout(apiserver)["weight-version"] == first
    assert [e for e in apiserver.live("v1/events") if e.get("reason") == "CanaryRolledBack"]

    # The trainer only ever touched its endpoint's status subresource, with get and patch.
    requests = reporter_requests(apiserver)
    assert requests
    assert {(r.method.value, r.resource.plural, r.name, r.subresource) for r in requests} \
        <= {("GET", "atlasendpoints", NAME, "status"), ("PATCH", "atlasendpoints", NAME, "status")}
    assert all(str(r.url.path).endswith(f"/atlasendpoints/{NAME}/status") for r in requests)
    trainer.traffic.close()


async def test_a_refusing_apiserver_never_raises_and_the_report_lands_once_allowed(
        apiserver: ApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trainer = Trainer(tmp_path)
    trainer.publish()
    # No endpoint yet: 404.
    assert not await trainer.report()
    await send(apiserver, "POST", ENDPOINTS, endpoint())
    # Forbidden (RBAC without the grant): 403.
    trainer.clock[0] += report.BACKOFF_MAX_S
    apiserver.forbidden.add("atlasendpoints")
    assert not await trainer.report()
    apiserver.forbidden.clear()
    assert not await trainer.report()  # still backing off: not even tried
    trainer.clock[0] += report.BACKOFF_MAX_S
    assert await trainer.report()
    assert status(apiserver)["latestPublishedVersion"] == "v000001"
    assert "endpoint not found (404)" in caplog.text and "forbidden (403)" in caplog.text
    trainer.traffic.close()


async def test_an_apiserver_that_is_away_is_a_failed_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import socket

    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: k, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    trainer = Trainer(tmp_path)
    trainer.publish()
    assert not await trainer.report()
    assert "apiserver unreachable" in caplog.text
    trainer.traffic.close()


async def test_a_real_trainer_reports_what_it_publishes_and_the_operator_serves_it(
        apiserver: ApiServer, operator: Any, tmp_path: Path) -> None:
    """`atlas trainer` with the report flags (that the Job renders them is
    test_contract.py's), on traffic already ingested: its first round publishes, its
    report lands, and the operator serves the version."""
    import os
    import signal
    import subprocess
    import sys

    from atlas_sidecar import models

    models.pull(models.TEST_MODEL)
    await send(apiserver, "POST", ENDPOINTS, endpoint())  # canaryFraction 0: served at once
    await eventually(lambda: all_children_exist(apiserver), message="all children")
    traffic = TrafficStore(tmp_path / "traffic.sqlite", 1 << 26, 86400)
    traffic.add([TrafficRecord(
        request_id=f"r0/{i:08x}", replica="r0", prompt_ids=tuple(100 + i + j for j in range(24)),
        output_ids=(5, 6, 7, 8), step_speculators=("suffix",), step_drafted=(4,),
        step_accepted=(2,), weight_version="base", finished_at=time.time(), sampled=False)
        for i in range(8)])  # fmt: skip
    traffic.close()
    log = tmp_path / "trainer.log"
    trainer = subprocess.Popen(
        [sys.executable, "-m", "atlas_sidecar.cli", "trainer", "--port", "0",
         "--traffic-db", str(tmp_path / "traffic.sqlite"),
         "--weights-store", str(tmp_path / "weights"), "--state-dir", str(tmp_path / "state"),
         "--target", models.TEST_MODEL, "--dtype", "fp32", "--round-interval", "1",
         "--max-train-steps", "1", "--max-round-seconds", "60",
         "--report-endpoint", NAME, "--report-namespace", NAMESPACE,
         "--report-min-steps", "1"],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
            [str(REPO / "sidecar"), str(REPO / "operator"), os.environ.get("PYTHONPATH", "")])})
    try:
        await eventually(lambda: status(apiserver).get("latestPublishedVersion") == "v000001",
                         timeout=240, message="the trainer's report")
        assert status(apiserver)["acceptLengthByVersion"] == {"base": 2.0}
        await eventually(lambda: rollout(apiserver)["weight-version"] == "v000001",
                         message="the reported version served")
    finally:
        trainer.send_signal(signal.SIGTERM)
        await asyncio.to_thread(trainer.wait, 120)
    assert trainer.returncode == 0, log.read_text()[-2000:]
    requests = reporter_requests(apiserver)
    assert requests and all(r.subresource == "status" for r in requests)

"""The trainer's status report: accept length per version from the traffic store (greedy
drafting steps only, a bounded recent window, a minimum of evidence, a bounded map), the
merge patch that keeps the status's map bounded, and failures that never raise."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from atlas_operator import crd
from atlas_sidecar.learning import report
from atlas_sidecar.learning.records import TrafficRecord
from atlas_sidecar.learning.report import AcceptWindow, StatusReporter, accept_lengths
from atlas_sidecar.learning.store import DirectoryStore, TargetIdentity
from atlas_sidecar.learning.traffic import TrafficStore

SECRET_TOKENS = (31337, 31338)  # in every prompt: must never reach a log line
_ids = iter(range(1_000_000))


def rec(version: str, steps: list[tuple[str, int, int]], sampled: bool = False) -> TrafficRecord:
    names, drafted, accepted = zip(*steps, strict=True) if steps else ((), (), ())
    i = next(_ids)
    return TrafficRecord(
        request_id=f"r0/{i:08x}", replica="r0", prompt_ids=SECRET_TOKENS,
        output_ids=(1, 2, 3), step_speculators=tuple(names), step_drafted=tuple(drafted),
        step_accepted=tuple(accepted), weight_version=version, finished_at=time.time(),
        sampled=sampled,
    )  # fmt: skip


@pytest.fixture
def traffic(tmp_path: Path) -> Any:
    store = TrafficStore(tmp_path / "traffic.sqlite", max_bytes=1 << 26, max_age_s=86400)
    yield store
    store.close()


def test_greedy_drafting_steps_of_each_version_only(traffic: TrafficStore) -> None:
    mixed = [("suffix", 4, 3), ("none", 0, 0), ("neural", 4, 1), ("suffix", 0, 0)]
    traffic.add([rec("v000001", mixed) for _ in range(6)])  # 2 drafting steps each: 2.0
    traffic.add([rec("v000001", [("suffix", 4, 4)] * 9, sampled=True) for _ in range(5)])
    traffic.add([rec("v000002", [("suffix", 5, 1), ("none", 0, 0)]) for _ in range(10)])
    traffic.add([rec("v000002", [("none", 0, 0)] * 50) for _ in range(5)])  # no drafts
    traffic.add([rec("", [("suffix", 4, 4)] * 10)])  # no version: nothing to judge
    window = AcceptWindow(min_steps=10)
    assert accept_lengths(traffic, window) == {"v000002": 1.0, "v000001": 2.0}
    # A version is judged only on enough drafting steps: a canary not on three.
    assert accept_lengths(traffic, AcceptWindow(min_steps=11)) == {"v000001": 2.0}


def test_the_window_is_recent_traffic_bounded_per_version_and_in_reads(
        traffic: TrafficStore, monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now - 7200)  # stored two hours ago
    traffic.add([rec("v000001", [("suffix", 4, 0)] * 10) for _ in range(10)])
    monkeypatch.undo()
    traffic.add([rec("v000001", [("suffix", 4, 4)] * 10) for _ in range(10)])
    traffic.add([rec("v000001", [("suffix", 4, 2)] * 10) for _ in range(10)])
    window = AcceptWindow(min_steps=10)
    # The two-hour-old traffic is out of the half-hour window.
    assert accept_lengths(traffic, window) == {"v000001": 3.0}
    assert accept_lengths(traffic, AcceptWindow(min_steps=10, max_age_s=3 * 3600)) == \
        {"v000001": pytest.approx(2.0)}
    # Only the newest records of a version count.
    assert accept_lengths(traffic, AcceptWindow(min_steps=10, per_version=10)) == \
        {"v000001": 2.0}
    # Reads are bounded (pages newest first): the newest 5 records, then no more.
    pages: list[int] = []
    original = traffic.read_newest

    def counting(*args: Any) -> Any:
        rows = original(*args)
        pages.append(len(rows))
        return rows

    monkeypatch.setattr(traffic, "read_newest", counting)
    assert accept_lengths(traffic, AcceptWindow(min_steps=10, max_scan=5, page=2)) == \
        {"v000001": 2.0}
    assert pages == [2, 2, 1]


def test_the_map_holds_the_newest_versions_within_the_crds_bound(traffic: TrafficStore) -> None:
    for n in range(1, 13):
        traffic.add([rec(f"v{n:06d}", [("suffix", 4, n % 5)] * 10)])
    traffic.add([rec("base", [("suffix", 4, 1)] * 10)])  # no number: after the numbered ones
    lengths = accept_lengths(traffic, AcceptWindow(min_steps=10))
    assert list(lengths) == [f"v{n:06d}" for n in range(12, 4, -1)]
    assert lengths["v000012"] == 2.0
    status = crd.status_schema()["properties"]
    assert AcceptWindow.max_versions <= status["acceptLengthByVersion"]["maxProperties"]
    assert report.MAX_VERSION_CHARS == status["latestPublishedVersion"]["maxLength"]
    assert status["acceptLengthByVersion"]["additionalProperties"] == \
        {"type": "number", "minimum": 0}


def test_the_patch_replaces_the_map_and_is_empty_when_nothing_changed() -> None:
    current = {"latestPublishedVersion": "v000002",
               "acceptLengthByVersion": {"v000001": 2.0, "v000002": 1.5}}
    assert report.status_patch(current, "v000002", {"v000001": 2.0, "v000002": 1.5}) == {}
    assert report.status_patch(current, "v000003", {"v000002": 1.75, "v000003": 3.0}) == {
        "latestPublishedVersion": "v000003",
        "acceptLengthByVersion": {"v000001": None, "v000002": 1.75, "v000003": 3.0}}
    # Nothing published yet: the version is left alone, not cleared.
    assert report.status_patch({}, None, {}) == {}


def test_newest_version_is_this_targets(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "weights")
    mine, other = TargetIdentity("m", "r", 8, 16), TargetIdentity("other", "r", 8, 16)
    assert report.newest_version(store, mine) is None
    store.publish({"suffix.bin": b"1"}, target=mine)
    store.publish({"suffix.bin": b"2"}, target=other)
    assert report.newest_version(store, mine) == "v000001"
    assert report.newest_version(store, None) == "v000002"


class FakeApi:
    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self.error: Exception | None = None
        self.calls: list[str] = []

    def get_status(self, namespace: str, name: str) -> dict[str, Any]:
        self.calls.append("get")
        if self.error is not None:
            raise self.error
        return self.status

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.calls.append("patch")
        for key, value in patch.items():
            if isinstance(value, dict):
                merged = {**self.status.get(key, {}), **value}
                self.status[key] = {k: v for k, v in merged.items() if v is not None}
            else:
                self.status[key] = value


class HttpError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"({status}) body echoing {SECRET_TOKENS}")
        self.status = status


def test_failures_are_logged_once_per_kind_back_off_and_recover(
        traffic: TrafficStore, caplog: pytest.LogCaptureFixture) -> None:
    traffic.add([rec("v000001", [("suffix", 4, 3)] * 20)])
    clock = [0.0]
    api = FakeApi()
    reporter = StatusReporter("coder", "serving", traffic, lambda: "v000001",
                              AcceptWindow(min_steps=10), api=api, clock=lambda: clock[0])
    caplog.set_level(logging.INFO, logger=report.__name__)

    api.error = HttpError(403)
    assert reporter.report() is False
    assert reporter.report() is False  # backing off: not even tried
    assert api.calls == ["get"]
    for _ in range(3):  # past each backoff, tried again; the same kind is not logged again
        clock[0] += report.BACKOFF_MAX_S
        assert reporter.report() is False
    api.error = HttpError(404)
    clock[0] += report.BACKOFF_MAX_S
    assert reporter.report() is False
    api.error = ConnectionRefusedError()
    clock[0] += report.BACKOFF_MAX_S
    assert reporter.report() is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert [w.split("failed: ")[1].split(";")[0] for w in warnings] == \
        ["forbidden (403)", "endpoint not found (404)", "apiserver unreachable"]

    api.error = None
    clock[0] += report.BACKOFF_MAX_S
    assert reporter.report() is True
    assert api.status == {"latestPublishedVersion": "v000001",
                          "acceptLengthByVersion": {"v000001": 3.0}}
    calls = len(api.calls)
    assert reporter.report() is True  # no backoff after a success; nothing to patch
    assert api.calls[calls:] == ["get"]
    text = caplog.text
    assert "works again" in text
    assert not any(str(t) in text for t in SECRET_TOKENS)
    assert "r0/" not in text  # no request ids either


def test_an_unreadable_store_is_a_failed_report_not_an_exception(
        traffic: TrafficStore, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> str:
        raise report.StoreUnavailable("bucket away")

    api = FakeApi()
    reporter = StatusReporter("coder", "serving", traffic, broken, api=api)
    assert reporter.report() is False
    assert api.calls == []
    assert "weights store unreadable" in caplog.text


def test_namespace_from_the_downward_api_or_the_service_account(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "from-env")
    assert report.pod_namespace() == "from-env"
    monkeypatch.delenv("POD_NAMESPACE")
    (tmp_path / "namespace").write_text("from-file\n")
    monkeypatch.setattr(report, "NAMESPACE_FILE", str(tmp_path / "namespace"))
    assert report.pod_namespace() == "from-file"
    monkeypatch.setattr(report, "NAMESPACE_FILE", str(tmp_path / "absent"))
    assert report.pod_namespace() is None


def test_the_trainer_reports_only_when_asked(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from atlas_sidecar import cli
    from atlas_sidecar.learning.command import check_args, report_namespace

    base = ["trainer", "--traffic-db", "t", "--weights-store", "w", "--state-dir", "s",
            "--target", "m"]  # fmt: skip
    args = cli.build_parser().parse_args(base)
    check_args(args)
    assert args.report_endpoint is None  # off by default: no kubernetes client needed
    with pytest.raises(ValueError, match="--report-namespace needs --report-endpoint"):
        check_args(cli.build_parser().parse_args([*base, "--report-namespace", "ns"]))
    args = cli.build_parser().parse_args([*base, "--report-endpoint", "coder",
                                          "--report-window", "60", "--report-min-steps", "5"])
    check_args(args)
    assert (args.report_window, args.report_min_steps) == (60.0, 5)
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.setattr(report, "NAMESPACE_FILE", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="outside a pod"):
        report_namespace(args)
    monkeypatch.setenv("POD_NAMESPACE", "serving")
    assert report_namespace(args) == "serving"
    # The kubernetes client is imported on the first report, not with the command.
    code = ("import sys; from atlas_sidecar.learning import command, report; "
            "sys.exit('kubernetes' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

"""The trainer's report to the operator: what it published, and how each version drafts.

The operator's rollout (operator/atlas_operator/rollout.py) moves the rollout ConfigMap
from the endpoint's ``status.latestPublishedVersion`` and ``status.acceptLengthByVersion``.
The trainer is the one that knows both, so after every round (a publish or not) it
merge-patches them into the status subresource of its own AtlasEndpoint. Its
ServiceAccount may get and patch that subresource and nothing else, so the reporter
never reads or writes anything else.

Accept length of a version: the mean accepted tokens per drafting step, measured on the
mirrored traffic the trainer ingested, counting

- greedy records only: sampled acceptance is not comparable;
- drafting steps only: speculator not "none", at least one token drafted;
- a bounded recent window: records stored (the trainer's clock) in the last
  ``max_age_s``, the newest ``per_version`` records of each version, and ``max_scan``
  records read at most, newest first a page at a time: bounded time and memory however
  much traffic is kept;
- versions with at least ``min_steps`` drafting steps: a canary is not judged on three;
- the ``max_versions`` newest versions (the CRD bounds the map, maxProperties 32).

The map is replaced, not merged: keys the window no longer holds are nulled in the
patch, so the status never outgrows its bound.

Failures (no credentials, 403, 404, the apiserver away, the weights store unreadable)
never stop ingest or training: each kind is logged once until a report succeeds again,
and attempts back off exponentially. Only version ids and counts are logged, nothing of
the traffic. The ``kubernetes`` client is imported on the first report: a trainer
without ``--report-endpoint`` does not need it.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from atlas_sidecar.learning.records import TrafficRecord
from atlas_sidecar.learning.store import (
    StoreError,
    StoreUnavailable,
    TargetIdentity,
    WeightsStore,
    version_number,
)

log = logging.getLogger(__name__)

GROUP, API_VERSION, PLURAL = "atlas.ai", "v1alpha1", "atlasendpoints"
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
USER_AGENT = "atlas-trainer"
MAX_VERSION_CHARS = 128  # the status's version fields' maxLength (crd.py)
MAX_MANIFESTS = 64  # manifests read per report looking for this target's newest version
REQUEST_TIMEOUT_S = 10.0  # a report must not hold the rounds for long
BACKOFF_BASE_S = 10.0
BACKOFF_MAX_S = 600.0


@dataclass(frozen=True)
class AcceptWindow:
    """Which traffic an accept length is measured on (see the module docstring)."""

    max_age_s: float = 1800.0
    per_version: int = 512
    min_steps: int = 200
    max_versions: int = 8
    max_scan: int = 8192
    page: int = 256


class RecentTraffic(Protocol):
    def read_newest(self, before: int | None = None, limit: int = 1000,
                    since: float = 0.0) -> list[tuple[int, TrafficRecord]]: ...


class StatusApi(Protocol):
    """The two calls the reporter makes, both on the status subresource."""

    def get_status(self, namespace: str, name: str) -> Mapping[str, Any]: ...

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None: ...


def accept_lengths(traffic: RecentTraffic, window: AcceptWindow,
                   now: float | None = None) -> dict[str, float]:
    """Mean accepted tokens per drafting step by weight version, over the window."""
    since = (time.time() if now is None else now) - window.max_age_s
    totals: dict[str, list[int]] = {}  # version -> [records, steps, accepted]
    before: int | None = None
    scanned = 0
    while scanned < window.max_scan:
        rows = traffic.read_newest(before, min(window.page, window.max_scan - scanned), since)
        if not rows:
            break
        scanned += len(rows)
        before = rows[-1][0]
        for _, record in rows:
            _add(totals, record, window.per_version)
    # Newest first: by version number, then versions without one by their latest traffic
    # (dicts keep insertion order, and the scan goes newest first).
    recency = {version: i for i, version in enumerate(totals)}
    measured = [v for v, (_, steps, _) in totals.items() if steps >= window.min_steps]
    measured.sort(key=lambda v: (version_number(v) is not None, version_number(v) or 0,
                                 -recency[v]), reverse=True)  # fmt: skip
    return {v: round(totals[v][2] / totals[v][1], 4) for v in measured[:window.max_versions]}


def _add(totals: dict[str, list[int]], record: TrafficRecord, per_version: int) -> None:
    version = record.weight_version
    steps = (record.step_speculators, record.step_drafted, record.step_accepted)
    if record.sampled or not version or len(version) > MAX_VERSION_CHARS \
            or len({len(s) for s in steps}) != 1:
        return
    entry = totals.setdefault(version, [0, 0, 0])
    if entry[0] >= per_version:
        return
    entry[0] += 1
    for name, drafted, accepted in zip(*steps, strict=True):
        if name != "none" and drafted > 0 and 0 <= accepted <= drafted:
            entry[1] += 1
            entry[2] += accepted


def newest_version(store: WeightsStore, target: TargetIdentity | None) -> str | None:
    """The newest version in ``store`` made for ``target``, by its manifest alone: the
    sidecars verify every file before serving one, and hashing them all here each round
    would cost a read of every file."""
    for version in list(reversed(store.versions()))[:MAX_MANIFESTS]:
        try:
            manifest = store.manifest(version)
        except StoreUnavailable:
            raise  # no verdict: an older version must not be reported past it
        except StoreError:
            continue  # deleted meanwhile, or corrupt: the sidecars refuse it too
        if target is None or target.mismatch(manifest.target) is None:
            return version
    return None


def status_patch(current: Mapping[str, Any], latest: str | None,
                 accept: Mapping[str, float]) -> dict[str, Any]:
    """The merge patch of ``.status`` that makes it say ``latest`` and ``accept`` (the
    map whole: keys not in ``accept`` are nulled); empty when it already does."""
    patch: dict[str, Any] = {}
    if latest and current.get("latestPublishedVersion") != latest:
        patch["latestPublishedVersion"] = latest
    old = current.get("acceptLengthByVersion")
    old = old if isinstance(old, dict) else {}
    changes: dict[str, float | None] = {k: v for k, v in accept.items() if old.get(k) != v}
    changes |= {k: None for k in old if k not in accept}
    if changes:
        patch["acceptLengthByVersion"] = changes
    return patch


def pod_namespace() -> str | None:
    """$POD_NAMESPACE (the downward API), else the namespace of the pod's service account."""
    if namespace := os.environ.get("POD_NAMESPACE", "").strip():
        return namespace
    try:
        return Path(NAMESPACE_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


class KubeStatusApi:
    """``get`` and merge-``patch`` of one AtlasEndpoint's status subresource, with the
    ``kubernetes`` client: in-cluster credentials in a pod, else $KUBECONFIG."""

    def __init__(self, api_client: Any) -> None:
        self.api = api_client

    @classmethod
    def connect(cls) -> KubeStatusApi:
        import kubernetes

        configuration = kubernetes.client.Configuration()
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        else:
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                               client_configuration=configuration)  # fmt: skip
        configuration.retries = 1  # the next round retries; a blackholed apiserver costs little
        api_client = kubernetes.client.ApiClient(configuration)
        api_client.user_agent = USER_AGENT
        return cls(api_client)

    def _call(self, method: str, namespace: str, name: str, body: Any = None,
              content_type: str = "application/json") -> Any:  # fmt: skip
        from kubernetes.client.exceptions import ApiException

        path = (f"/apis/{GROUP}/{API_VERSION}/namespaces/{quote(namespace, safe='')}/"
                f"{PLURAL}/{quote(name, safe='')}/status")  # fmt: skip
        request = self.api.param_serialize(
            method, path, header_params={"Content-Type": content_type,
                                         "Accept": "application/json"},
            body=body, auth_settings=["BearerToken"])  # fmt: skip
        response = self.api.call_api(*request, _request_timeout=REQUEST_TIMEOUT_S)
        data = response.read()
        if not 200 <= response.status <= 299:
            raise ApiException(status=response.status, reason=response.reason)
        return json.loads(data) if data else None

    def get_status(self, namespace: str, name: str) -> Mapping[str, Any]:
        body = self._call("GET", namespace, name) or {}
        status = body.get("status")
        return status if isinstance(status, dict) else {}

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        self._call("PATCH", namespace, name, {"status": dict(patch)},
                   content_type="application/merge-patch+json")  # fmt: skip


def failure_kind(err: BaseException) -> str:
    """What went wrong, in a few words, without the error's text (which could echo the
    request): the unit of 'logged once'."""
    status = getattr(err, "status", None)
    if isinstance(status, int) and status:
        return {401: "unauthorized (401)", 403: "forbidden (403)",
                404: "endpoint not found (404)"}.get(status, f"HTTP {status}")  # fmt: skip
    if isinstance(err, StoreError):
        return "weights store unreadable"
    if isinstance(err, sqlite3.Error):
        return "traffic store unreadable"
    module = type(err).__module__
    if module.startswith("urllib3") or isinstance(err, OSError | TimeoutError):
        return "apiserver unreachable"
    if module.startswith("kubernetes.config"):
        return "no Kubernetes credentials"
    return type(err).__name__


class StatusReporter:
    """Reports ``latest()`` and the window's accept lengths to ``namespace/endpoint``'s
    status; ``report()`` never raises (see the module docstring for why and how)."""

    def __init__(
        self,
        endpoint: str,
        namespace: str,
        traffic: RecentTraffic,
        latest: Callable[[], str | None],
        window: AcceptWindow | None = None,
        api: StatusApi | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self.namespace = namespace
        self.traffic = traffic
        self.latest = latest
        self.window = window or AcceptWindow()
        self._api = api
        self._clock = clock
        self._failures = 0
        self._next_attempt = float("-inf")
        self._logged: set[str] = set()
        self._reported: str | None = None

    def report(self) -> bool:
        """One report now, unless backing off after a failure; True if the status says
        what the trainer knows (patched, or already so)."""
        now = self._clock()
        if now < self._next_attempt:
            return False
        try:
            latest = self.latest()
            accept = accept_lengths(self.traffic, self.window)
            if self._api is None:
                self._api = KubeStatusApi.connect()
            current = self._api.get_status(self.namespace, self.endpoint)
            patch = status_patch(current, latest, accept)
            if patch:
                self._api.patch_status(self.namespace, self.endpoint, patch)
        except Exception as err:  # noqa: BLE001 - reporting must never stop the trainer
            self._failed(err, now)
            return False
        if self._logged:
            log.info("status report to %s/%s works again", self.namespace, self.endpoint)
        self._failures, self._next_attempt, self._logged = 0, float("-inf"), set()
        if latest and latest != self._reported:
            log.info("reported version %s to %s/%s (accept length measured for %d versions)",
                     latest, self.namespace, self.endpoint, len(accept))  # fmt: skip
            self._reported = latest
        return True

    def _failed(self, err: BaseException, now: float) -> None:
        self._failures += 1
        delay = min(BACKOFF_BASE_S * 2 ** (self._failures - 1), BACKOFF_MAX_S)
        self._next_attempt = now + delay
        kind = failure_kind(err)
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("status report to %s/%s failed: %s; retrying with backoff (logged "
                        "once until it works)", self.namespace, self.endpoint, kind)  # fmt: skip

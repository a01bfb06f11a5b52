"""kopf handlers: reconcile AtlasEndpoints into children, roll out weights, report status.

One path does all the work, `reconcile()`, called from:
  - create / update / resume of an endpoint, and a periodic timer (drift, trainer rounds,
    canary clocks): full reconcile, children applied;
  - any event of an endpoint (e.g. the trainer patched a published version) and any event
    of an owned Deployment or Job: rollout and status only.
Every step is idempotent: reading is cheap, writing happens only when something differs.
Handlers are sync (kopf runs them in its thread pool); a per-endpoint lock keeps a timer and
an event from interleaving on the same endpoint.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

from atlas_operator import API_VERSION, GROUP, KIND, MANAGED_BY, PLURAL, VERSION
from atlas_operator import rollout as rollouts
from atlas_operator import status as statuses
from atlas_operator.kube import Kube, apply, load_api_client
from atlas_operator.render import (
    Owner,
    controlled_by,
    owner_from_body,
    render_children,
    render_trainer_job,
    rollout_configmap_name,
    selector_labels,
    selector_string,
    trainer_children,
    trainer_name,
)
from atlas_operator.spec import InvalidSpecError, validate_endpoint

RESYNC_SECONDS = float(os.environ.get("ATLAS_RESYNC_SECONDS", "30"))
RETRY_SECONDS = float(os.environ.get("ATLAS_RETRY_SECONDS", "15"))
MAX_WORKERS = int(os.environ.get("ATLAS_MAX_WORKERS", "8"))
# How long a silent peer still counts as alive: a crashed active replica is replaced after it.
PEERING_LIFETIME_S = int(os.environ.get("ATLAS_PEERING_LIFETIME", "60"))

# False when the operator watches a fixed list of namespaces (main.py sets it from
# --namespace): then it reads nothing cluster-scoped (see configure()).
scan_cluster = True

_kube: Kube | None = None
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = Kube(load_api_client())
    return _kube


def reset_client() -> None:
    """Forget the API client (tests start a fresh operator against a fresh emulator)."""
    global _kube
    _kube = None
    with _locks_guard:
        _locks.clear()


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


# --- kopf wiring -----------------------------------------------------------------------


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Progress and diff-base in annotations, not in .status: the status schema is
    # structural and would prune kopf's fields.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    # Only warnings become Kubernetes Events by themselves; the rest we post on purpose.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = MAX_WORKERS
    settings.peering.lifetime = PEERING_LIFETIME_S
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # Namespace-scoped (rbac.scope=namespace in the chart): no namespace listing and no CRD
    # watch, which a Role cannot grant; kopf would retry their 403s for about a minute
    # before falling back to the given namespaces and the startup discovery.
    settings.scanning.disabled = not scan_cluster
    # Read at startup (not import): how long one API request may take.
    settings.networking.request_timeout = float(os.environ.get("ATLAS_REQUEST_TIMEOUT", "60"))


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # kopf's own readers; the same sources load_api_client() uses.
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return kopf.login_with_service_account(**kwargs)
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def on_endpoint_changed(body: kopf.Body, **_: Any) -> None:
    reconcile(body["metadata"]["namespace"], body["metadata"]["name"], apply_children=True)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def on_resync(body: kopf.Body, **_: Any) -> None:
    reconcile(body["metadata"]["namespace"], body["metadata"]["name"], apply_children=True)


@kopf.on.event(GROUP, VERSION, PLURAL)
def on_endpoint_event(event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    if event.get("type") == "DELETED":
        # The children go with it: their ownerReferences hand them to the garbage collector.
        with _locks_guard:
            _locks.pop((namespace, name), None)
        return
    reconcile(namespace, name, apply_children=False)


@kopf.on.event("apps", "v1", "deployments", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
@kopf.on.event("batch", "v1", "jobs", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
def on_child_event(body: kopf.Body, **_: Any) -> None:
    owner = next((ref for ref in body["metadata"].get("ownerReferences") or []
                  if ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION), None)
    if owner is not None:
        reconcile(body["metadata"]["namespace"], owner["name"], apply_children=False)


# --- the reconcile path ----------------------------------------------------------------


def reconcile(namespace: str, name: str, apply_children: bool) -> None:
    """Bring one endpoint's children, rollout and status up to date."""
    with _lock(namespace, name):
        api = kube()
        try:
            body = api.get(API_VERSION, KIND, namespace, name)  # fresh: timers hold old bodies
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            _reconcile(api, body, apply_children)
        except ApiException as e:
            if e.status in (409, 429) or e.status >= 500:
                raise kopf.TemporaryError(f"API {e.status}: {e.reason}",
                                          delay=RETRY_SECONDS) from e
            raise


def _reconcile(api: Kube, body: dict[str, Any], apply_children: bool) -> None:
    owner = owner_from_body(body)
    status: dict[str, Any] = dict(body.get("status") or {})
    generation = body["metadata"].get("generation")
    now = _now()
    try:
        spec = validate_endpoint(body)
    except InvalidSpecError as e:
        _report_failure(api, body, status, "InvalidSpec", f"invalid spec: {e}", generation)
        return

    trainer_status = dict(status.get("trainer") or {})
    pvc: dict[str, Any] | None = None  # the live data PVC, as the apply left it
    if apply_children:
        try:
            for child in render_children(owner, spec):
                live = _apply_child(api, child)
                if child["kind"] == "PersistentVolumeClaim":
                    pvc = live
            trainer_status = _sync_trainer(api, body, owner, spec, trainer_status, now)
        except ApiException as e:
            if e.status in (400, 403, 422):
                # The apiserver rejected what the spec renders to (say, a bad quantity):
                # retrying at once would not help. Report it; the resync timer retries.
                _report_failure(api, body, status, "ApplyFailed",
                                f"a child was rejected ({e.status}): {_api_message(e)}",
                                generation)
                return
            raise
    else:
        trainer_status = _observe_trainer(api, owner, spec, trainer_status)

    configmap = api.get("v1", "ConfigMap", owner.namespace, rollout_configmap_name(owner))
    published = rollouts.published_version(body["metadata"].get("annotations") or {}, status)
    accept = {str(k): float(v) for k, v in (status.get("acceptLengthByVersion") or {}).items()}
    plan = None
    if configmap is not None:
        state = rollouts.state_from(configmap.get("data") or {}, status)
        plan = rollouts.plan_rollout(spec["rollout"], state, published, accept, now)
        data = plan.configmap_data()
        if (configmap.get("data") or {}) != data:
            # Only the data changes: the pod template is untouched, so no pod restarts.
            api.patch("v1", "ConfigMap", owner.namespace, configmap["metadata"]["name"],
                      {"data": data})
        for event in plan.events:
            _event(body, type_=event.type, reason=event.reason, message=event.message)

    deployment = api.get("apps/v1", "Deployment", owner.namespace, owner.name)
    ready = int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)
    pods = [] if deployment is None or ready >= spec["replicas"] else \
        api.list("v1", "Pod", owner.namespace, selector_labels(owner))

    conditions = list(status.get("conditions") or [])
    stamp = rollouts.format_time(now)
    for type_, (ok, reason, message) in statuses.serving_conditions(
            spec["replicas"], deployment, pods).items():
        conditions = statuses.set_condition(conditions, type_, ok, reason, message, stamp,
                                            generation)
    if apply_children:  # what it depends on (spec, the PVC) changes only with a full one
        before = statuses.get_condition(conditions, "StorageAccessible")
        ok, reason, message = _storage_condition(spec, pvc)
        conditions = statuses.set_condition(conditions, "StorageAccessible", ok, reason,
                                            message, stamp, generation)
        if not ok and (before is None or (before.get("status"), before.get("message"))
                       != ("False", message)):
            _event(body, type_="Warning", reason="StorageAccessMode", message=message)
    ok, reason, message = statuses.trainer_condition(
        spec["trainer"]["enabled"], trainer_status.get("phase", "Pending"),
        int(trainer_status.get("restarts") or 0), trainer_status.pop("message", ""))
    conditions = statuses.set_condition(conditions, "TrainerReady", ok, reason, message, stamp,
                                        generation)
    rejected = list(plan.state.rejected) if plan else list(
        (status.get("rollout") or {}).get("rejectedVersions") or [])
    ok, reason, message = statuses.degraded_condition(
        published, rejected, int(trainer_status.get("restarts") or 0))
    conditions = statuses.set_condition(conditions, "SpeculatorDegraded", ok, reason, message,
                                        stamp, generation)

    serving = plan.state.serving if plan else status.get("servingWeightVersion", "")
    desired: dict[str, Any] = {
        "replicas": int(((deployment or {}).get("status") or {}).get("replicas") or 0),
        "readyReplicas": ready,
        "selector": selector_string(owner),
        "servingWeightVersion": serving or None,
        "canaryWeightVersion": (plan.state.canary or None) if plan else None,
        "latestPublishedVersion": published or None,
        "recentAcceptLength": accept.get(serving) if serving else None,
        "trainer": trainer_status,
        "conditions": conditions,
    }
    if plan is not None:
        desired["rollout"] = rollouts.rollout_status(plan)
    if apply_children:  # the generation is reconciled only once its children are applied
        desired["observedGeneration"] = generation
    _patch_status(api, owner, status, desired)


def _storage_condition(spec: dict[str, Any],
                       pvc: dict[str, Any] | None) -> tuple[bool, str, str]:
    """StorageAccessible from the live PVC's access mode (its spec is immutable, so a
    changed storage.accessMode never reaches it), or the spec's without one."""
    requested = spec["storage"]["accessMode"]
    modes = ((pvc or {}).get("spec") or {}).get("accessModes") or [requested]
    return statuses.storage_condition(str(modes[0]), spec["replicas"],
                                      spec["trainer"]["enabled"], requested)


def _apply_child(api: Kube, child: dict[str, Any]) -> dict[str, Any]:
    """Apply one child; returns the live object."""
    kind = child["kind"]
    if kind == "ConfigMap":
        return apply(api, child, create_only=("data",)).object  # data: the rollout's
    if kind == "PersistentVolumeClaim":
        applied = apply(api, child, create_only=("spec",))  # a PVC spec is immutable...
        _grow_pvc(api, child, applied.object)  # ...except that its size may grow
        return applied.object
    return apply(api, child).object


def _grow_pvc(api: Kube, desired: dict[str, Any], live: dict[str, Any]) -> None:
    want = desired["spec"]["resources"]["requests"]["storage"]
    have = ((live.get("spec") or {}).get("resources") or {}).get("requests", {}).get("storage")
    if have is not None and parse_quantity(str(want)) > parse_quantity(str(have)):
        meta = desired["metadata"]
        api.patch("v1", "PersistentVolumeClaim", meta["namespace"], meta["name"],
                  {"spec": {"resources": {"requests": {"storage": want}}}})


def _sync_trainer(api: Kube, body: dict[str, Any], owner: Owner, spec: dict[str, Any],
                  trainer_status: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    """Keep one trainer Job: create it, recreate it after a finished round (schedule) or a
    failure (exponential backoff). When the trainer is disabled, delete the Job and the
    rest of the trainer's children (Service, ServiceAccount, Role, RoleBinding), which
    render_children no longer renders."""
    name = trainer_name(owner)
    restarts = int(trainer_status.get("restarts") or 0)
    if not spec["trainer"]["enabled"]:
        for api_version, kind, child in trainer_children(owner):
            _delete_controlled(api, owner, api_version, kind, child)
        return {"phase": "Disabled", "restarts": 0}
    desired = render_trainer_job(owner, spec)
    live = api.get("batch/v1", "Job", owner.namespace, name)
    job = statuses.job_state(live)
    # A Job may not say when it finished: then the first time we saw it finished counts.
    seen_before = trainer_status.get("phase") in ("Failed", "BackingOff", "Succeeded")
    remembered = rollouts.parse_time(trainer_status.get("lastFinishedAt")) if seen_before \
        else None
    finished = job.finished_at or remembered or now
    result: dict[str, Any] = {"phase": job.phase, "restarts": restarts, "message": job.message,
                              "lastFinishedAt": rollouts.format_time(finished)
                              if job.phase in ("Succeeded", "Failed") else
                              trainer_status.get("lastFinishedAt")}
    if job.phase == "Failed":
        delay = statuses.restart_delay_s(spec["trainer"]["restartBackoffSeconds"], restarts)
        if now < finished + dt.timedelta(seconds=delay):
            result.update(phase="BackingOff",
                          message=f"{job.message}; next attempt in "
                                  f"{int((finished - now).total_seconds()) + delay}s")
            return result
        api.delete("batch/v1", "Job", owner.namespace, name)
        apply(api, desired)
        _event(body, type_="Warning", reason="TrainerRestarted",
                   message=f"trainer Job failed; recreated (restart {restarts + 1})")
        return {**result, "phase": "Pending", "restarts": restarts + 1,
                "message": "trainer Job recreated after a failure"}
    if job.phase == "Succeeded":
        interval = spec["trainer"]["schedule"]["roundIntervalSeconds"]
        if now >= finished + dt.timedelta(seconds=interval):
            api.delete("batch/v1", "Job", owner.namespace, name)
            apply(api, desired)
            return {**result, "phase": "Pending", "restarts": 0,
                    "message": "next training round started"}
        return {**result, "restarts": 0}
    # Pending or Running: make sure it matches the spec (its pod template is immutable, so a
    # changed trainer spec recreates the Job).
    apply(api, desired, recreate_on_change=("spec",))
    return result


def _delete_controlled(api: Kube, owner: Owner, api_version: str, kind: str,
                       name: str) -> None:
    """Delete a child only if this endpoint controls it (render.controlled_by): reading
    first costs a GET per resync, and never deletes what the operator did not make."""
    live = api.get(api_version, kind, owner.namespace, name)
    if live is not None and controlled_by(live, owner):
        api.delete(api_version, kind, owner.namespace, name)


def _observe_trainer(api: Kube, owner: Owner, spec: dict[str, Any],
                     trainer_status: dict[str, Any]) -> dict[str, Any]:
    if not spec["trainer"]["enabled"]:
        return {"phase": "Disabled", "restarts": 0}
    job = statuses.job_state(api.get("batch/v1", "Job", owner.namespace, trainer_name(owner)))
    phase = trainer_status.get("phase")
    # BackingOff is a decision of the full reconcile; an event must not erase it.
    if not (job.phase == "Failed" and phase == "BackingOff"):
        phase = job.phase
    return {**trainer_status, "phase": phase, "message": job.message}


def _report_failure(api: Kube, body: dict[str, Any], status: dict[str, Any], reason: str,
                    message: str, generation: int | None) -> None:
    """Ready=False with the reason, and a Warning event the first time it is seen: no crash
    loop and no event storm while the spec stays broken."""
    conditions = list(status.get("conditions") or [])
    before = statuses.get_condition(conditions, "Ready")
    conditions = statuses.set_condition(conditions, "Ready", False, reason, message,
                                        rollouts.format_time(_now()), generation)
    owner = owner_from_body(body)
    _patch_status(api, owner, status, {"conditions": conditions,
                                       "observedGeneration": generation})
    if before is None or (before.get("reason"), before.get("message")) != (reason, message):
        _event(body, type_="Warning", reason=reason, message=message)


def _patch_status(api: Kube, owner: Owner, current: Mapping[str, Any],
                  desired: Mapping[str, Any]) -> None:
    patch = statuses.status_patch(current, desired)
    if patch:
        api.patch(API_VERSION, KIND, owner.namespace, owner.name, {"status": patch},
                  subresource="status")


def _event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """A Kubernetes Event on the endpoint (kopf posts it in the background, thread-safely)."""
    kopf.event(kopf.Body(body), type=type_, reason=reason, message=message)  # type: ignore[arg-type]


def _api_message(e: ApiException) -> str:
    try:
        return str(json.loads(e.body or "{}").get("message") or e.reason)[:512]
    except (ValueError, AttributeError):
        return str(e.reason)

"""Pure computation of an AtlasEndpoint's status and conditions from its children.

Conditions (all standard `metav1.Condition` shaped):
    Ready               serving pods are ready (and the spec is valid and applied)
    TargetReady         the SGLang containers are ready
    SidecarReady        the ATLAS sidecar containers are ready
    TrainerReady        the trainer Job runs, finished its round, or is disabled
    SpeculatorDegraded  the newest published weights were rolled back, or the trainer keeps
                        failing: speculation runs on older weights
    StorageAccessible   every pod that mounts the data PVC can, given its access mode
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Condition = dict[str, Any]
TRAINER_FAILING_AFTER = 3  # consecutive failed Jobs before speculation counts as degraded


def set_condition(conditions: Sequence[Condition], type_: str, ok: bool | None, reason: str,
                  message: str, now: str, generation: int | None) -> list[Condition]:
    """Upsert one condition; lastTransitionTime moves only when the status flips, so that a
    status write happens only when something real changed."""
    status = "Unknown" if ok is None else "True" if ok else "False"
    out: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.get("type") != type_:
            out.append(dict(cond))
            continue
        found = True
        since = cond.get("lastTransitionTime") if cond.get("status") == status else now
        out.append(_condition(type_, status, reason, message, since or now, generation))
    if not found:
        out.append(_condition(type_, status, reason, message, now, generation))
    return out


def _condition(type_: str, status: str, reason: str, message: str, since: str,
               generation: int | None) -> Condition:
    cond: Condition = {"type": type_, "status": status, "reason": reason,
                       "message": message[:2048], "lastTransitionTime": since}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def get_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.get("type") == type_), None)


# --- trainer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JobState:
    phase: str  # Pending, Running, Succeeded or Failed
    finished_at: dt.datetime | None = None
    message: str = ""


def job_state(job: Mapping[str, Any] | None) -> JobState:
    if job is None:
        return JobState("Pending", message="trainer Job not created yet")
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        when = _parse(cond.get("lastTransitionTime")) or _parse(status.get("completionTime"))
        if cond.get("type") == "Complete":
            return JobState("Succeeded", when, "training round complete")
        if cond.get("type") == "Failed":
            detail = cond.get("message") or cond.get("reason") or "failed"
            return JobState("Failed", when, f"trainer Job failed: {detail}")
    if status.get("active"):
        return JobState("Running", message="trainer running")
    return JobState("Pending", message="trainer pod not running yet")


def _parse(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def restart_delay_s(base_s: int, restarts: int, cap_s: int = 3600) -> int:
    """Exponential backoff before recreating a failed trainer Job."""
    return int(min(cap_s, base_s * 2 ** min(restarts, 16)))


# --- serving ---------------------------------------------------------------------------


def _containers_ready(pods: Sequence[Mapping[str, Any]], container: str) -> int:
    return sum(1 for pod in pods for cs in (pod.get("status") or {}).get("containerStatuses", [])
               if cs.get("name") == container and cs.get("ready"))


def serving_conditions(desired: int, deployment: Mapping[str, Any] | None,
                       pods: Sequence[Mapping[str, Any]]) -> dict[str, tuple[bool, str, str]]:
    """(ok, reason, message) for Ready, TargetReady and SidecarReady."""
    if desired == 0:
        off = (False, "ScaledToZero", "spec.replicas is 0")
        return {"Ready": off, "TargetReady": off, "SidecarReady": off}
    if deployment is None:
        wait = (False, "Pending", "serving Deployment not created yet")
        return {"Ready": wait, "TargetReady": wait, "SidecarReady": wait}
    ready = int((deployment.get("status") or {}).get("readyReplicas") or 0)
    if ready >= desired:
        msg = f"{ready}/{desired} serving pods ready"
        return {"Ready": (True, "Serving", msg), "TargetReady": (True, "PodsReady", msg),
                "SidecarReady": (True, "PodsReady", msg)}
    # A pod is ready only when both containers are: the pods tell which one is lagging.
    target, sidecar = _containers_ready(pods, "sglang"), _containers_ready(pods, "sidecar")
    return {
        "Ready": (False, "PodsNotReady", f"{ready}/{desired} serving pods ready"),
        "TargetReady": (target >= desired, "PodsReady" if target >= desired else "NotReady",
                        f"{target}/{desired} SGLang containers ready"),
        "SidecarReady": (sidecar >= desired, "PodsReady" if sidecar >= desired else "NotReady",
                         f"{sidecar}/{desired} sidecar containers ready"),
    }


def trainer_condition(enabled: bool, phase: str, restarts: int,
                      message: str) -> tuple[bool, str, str]:
    if not enabled:
        return True, "Disabled", "trainer disabled: the adaptive drafter is not retrained"
    if phase == "Running":
        return True, "Running", message
    if phase == "Succeeded":
        return True, "RoundComplete", message
    if phase in ("Failed", "BackingOff"):
        return False, phase, f"{message} ({restarts} consecutive restarts)"
    return False, "Pending", message


SHARED_ACCESS_MODE = "ReadWriteMany"


def storage_condition(access_mode: str, replicas: int, trainer: bool,
                      requested: str | None = None) -> tuple[bool, str, str]:
    """StorageAccessible: whether the data PVC's access mode lets every pod that mounts
    it do so. Each serving replica and the trainer pod mount it. ReadWriteMany shares it
    across nodes. ReadWriteOnce attaches it to one node: with several pods, those
    scheduled elsewhere hang in ContainerCreating (Multi-Attach), the rest work, so this
    warns instead of refusing the spec (pods pinned to one node are fine). ReadWriteOncePod
    admits one pod at all: the others stay Pending. One pod (replicas <= 1, no trainer)
    fits any mode.

    Why the default stays ReadWriteMany rather than following the replica count: a
    PVC's access modes are immutable and the operator creates it once, while replicas
    change later through the scale subresource (kubectl scale, an HPA) with no chance to
    re-pick; the trainer, on by default, is a second pod, often on another node (a CPU
    node with trainer.gpuCount 0). ReadWriteOnce is an explicit choice for one pod.

    `access_mode` is the live PVC's; `requested` the spec's, when it differs: the spec
    was changed after the PVC was made, which changes nothing."""
    pods = replicas + (1 if trainer else 0)
    who = f"{replicas} serving pod{'s' if replicas != 1 else ''}" + \
        (" and the trainer pod" if trainer else "")
    note = "" if requested in (None, access_mode) else (
        f" (storage.accessMode asks {requested}, but a PVC's access modes are immutable: "
        "the PVC must be deleted and recreated to change them)")
    if access_mode == SHARED_ACCESS_MODE:
        return True, "SharedAcrossNodes", f"{access_mode}: {who} mount the data volume " \
            f"from any node{note}"
    if pods <= 1:
        return True, "SinglePod", f"{access_mode}: one pod mounts the data volume{note}"
    if access_mode == "ReadWriteOncePod":
        return False, "SinglePodAccessMode", (
            f"ReadWriteOncePod lets one pod mount the data volume, but {who} mount it: "
            f"all but one stay Pending; use storage.accessMode ReadWriteMany{note}")
    return False, "SingleNodeAccessMode", (
        f"{access_mode} attaches the data volume to one node, but {who} mount it: pods "
        "scheduled on any other node hang in ContainerCreating (Multi-Attach error); use "
        f"storage.accessMode ReadWriteMany, or keep every pod on one node{note}")


def degraded_condition(published: str, rejected: Sequence[str],
                       trainer_restarts: int) -> tuple[bool, str, str]:
    if published and rejected and rejected[-1] == published:
        return True, "CanaryRolledBack", f"weight version {published} was rolled back"
    if trainer_restarts >= TRAINER_FAILING_AFTER:
        return True, "TrainerFailing", f"trainer failed {trainer_restarts} times in a row"
    return False, "AsExpected", "speculators serve the newest accepted weights"


def strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_none(v) for k, v in value.items() if v is not None}
    return value


def status_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """Only the top-level status fields that changed (None in `desired` deletes a field)."""
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        if strip_none(value) != strip_none(current.get(key)) \
                and not (value is None and key not in current):
            patch[key] = value
    return patch

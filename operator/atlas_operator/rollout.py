"""Hot rollout of adaptive weight versions: a pure decision from what the trainer published.

The trainer publishes a version by patching the AtlasEndpoint: annotation
`atlas.ai/published-version` or `status.latestPublishedVersion` (the annotation wins when
both are set). It may also report `status.acceptLengthByVersion` measured on mirrored
traffic. The operator then writes the rollout ConfigMap the sidecars read:

    weight-version    the version every sidecar serves
    canary-version    a candidate served to `canary-fraction` of requests ("" = none)
    canary-fraction   "0".."1"

A candidate is promoted after `rollout.canaryDurationSeconds`, or rolled back (and never
retried) if its accept length falls more than `maxAcceptLengthDrop` below the serving one.
The pod template never changes, so no pod restarts: kubelet refreshes the mounted files.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from atlas_operator import (
    CANARY_FRACTION_KEY,
    CANARY_VERSION_KEY,
    PUBLISHED_VERSION_ANNOTATION,
    WEIGHT_VERSION_KEY,
)

MAX_REJECTED_VERSIONS = 16  # the status list is bounded (CRD maxItems)


@dataclass(frozen=True)
class RolloutState:
    serving: str = ""
    canary: str = ""
    canary_started_at: dt.datetime | None = None
    rejected: tuple[str, ...] = ()


@dataclass(frozen=True)
class RolloutEvent:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class RolloutPlan:
    state: RolloutState
    canary_fraction: float
    events: list[RolloutEvent] = field(default_factory=list)

    def configmap_data(self) -> dict[str, str]:
        fraction = self.canary_fraction if self.state.canary else 0.0
        return {WEIGHT_VERSION_KEY: self.state.serving, CANARY_VERSION_KEY: self.state.canary,
                CANARY_FRACTION_KEY: f"{fraction:g}"}


def published_version(annotations: Mapping[str, str], status: Mapping[str, Any]) -> str:
    return str(annotations.get(PUBLISHED_VERSION_ANNOTATION)
               or status.get("latestPublishedVersion") or "")


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def format_time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def state_from(configmap_data: Mapping[str, str], status: Mapping[str, Any]) -> RolloutState:
    """The ConfigMap is the truth of what sidecars serve; status keeps the bookkeeping."""
    rollout = status.get("rollout") or {}
    return RolloutState(
        serving=configmap_data.get(WEIGHT_VERSION_KEY, ""),
        canary=configmap_data.get(CANARY_VERSION_KEY, ""),
        canary_started_at=parse_time(rollout.get("canaryStartedAt")),
        rejected=tuple(rollout.get("rejectedVersions") or ()),
    )


def plan_rollout(policy: Mapping[str, Any], state: RolloutState, published: str,
                 accept_by_version: Mapping[str, float], now: dt.datetime) -> RolloutPlan:
    """What the ConfigMap should say now. `policy` is the defaulted `spec.rollout`."""
    fraction = float(policy["canaryFraction"])
    duration = dt.timedelta(seconds=int(policy["canaryDurationSeconds"]))
    fresh = bool(published) and published not in (state.serving, state.canary) \
        and published not in state.rejected

    if state.canary:
        canary_len = accept_by_version.get(state.canary)
        serving_len = accept_by_version.get(state.serving)
        if (policy["autoRollback"] and canary_len is not None and serving_len is not None
                and canary_len < (1.0 - float(policy["maxAcceptLengthDrop"])) * serving_len):
            rejected = (*state.rejected, state.canary)[-MAX_REJECTED_VERSIONS:]
            return RolloutPlan(
                RolloutState(serving=state.serving, rejected=rejected), fraction,
                [RolloutEvent("Warning", "CanaryRolledBack",
                              f"weight version {state.canary} rolled back: accept length "
                              f"{canary_len:.3g} vs {serving_len:.3g} serving")])
        if fresh:  # a newer candidate supersedes the one in canary: restart the clock
            return RolloutPlan(
                RolloutState(state.serving, published, now, state.rejected), fraction,
                [RolloutEvent("Normal", "CanaryStarted",
                              f"weight version {published} in canary (replaces "
                              f"{state.canary}) for {fraction:g} of requests")])
        started = state.canary_started_at
        if started is None:  # bookkeeping lost (status wiped): start the clock again
            return RolloutPlan(RolloutState(state.serving, state.canary, now, state.rejected),
                               fraction)
        if now - started >= duration:
            return RolloutPlan(
                RolloutState(serving=state.canary, rejected=state.rejected), fraction,
                [RolloutEvent("Normal", "WeightsPromoted",
                              f"weight version {state.canary} promoted after canary")])
        return RolloutPlan(state, fraction)

    if not fresh:
        return RolloutPlan(state, fraction)
    if fraction <= 0 or duration.total_seconds() == 0 or not state.serving:
        # Nothing to compare against (first version), or the policy asks for no canary.
        return RolloutPlan(
            RolloutState(serving=published, rejected=state.rejected), fraction,
            [RolloutEvent("Normal", "WeightsPromoted", f"serving weight version {published}")])
    return RolloutPlan(
        RolloutState(state.serving, published, now, state.rejected), fraction,
        [RolloutEvent("Normal", "CanaryStarted",
                      f"weight version {published} in canary for {fraction:g} of requests")])


def rollout_status(plan: RolloutPlan) -> dict[str, Any]:
    state = plan.state
    return {
        "phase": "Canary" if state.canary else "Idle",
        "canaryStartedAt": format_time(state.canary_started_at)
        if state.canary and state.canary_started_at else None,
        "rejectedVersions": list(state.rejected),
    }

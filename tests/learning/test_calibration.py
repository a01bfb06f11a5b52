"""The controller's calibration priors: merged by the trainer from every replica's
per-step counts, validated on load, and steering a plan before a replica has evidence."""

from __future__ import annotations

import json

import pytest

from atlas_sidecar.engine.controller import (
    CALIBRATION_FORMAT,
    CalibrationError,
    Controller,
    parse_calibration,
)
from atlas_sidecar.learning.records import TrafficRecord
from atlas_sidecar.learning.trainer import merge_calibration
from tests.speculators.test_controller import ScriptedModelDrafter, costs, request


def _record(steps: list[tuple[str, int, int]], sampled: bool = False) -> TrafficRecord:
    names, drafted, accepted = zip(*steps, strict=True)
    return TrafficRecord("r/1", "r", (1, 2), (3,), names, drafted, accepted, "", 0.0, sampled)


def _priors(static: tuple[float, float]) -> bytes:
    entry = {"drafted": static[0], "accepted": static[1], "steps": 1}
    return json.dumps({"format": CALIBRATION_FORMAT, "speculators": {"static": entry}}).encode()


def test_merge_adds_greedy_steps_to_the_parents_counts():
    records = [
        _record([("suffix", 8, 6), ("none", 0, 0), ("static", 4, 1)]),
        _record([("suffix", 8, 2)]),
        _record([("suffix", 100, 100)], sampled=True),  # not comparable: left out
    ]
    merged = json.loads(merge_calibration(_priors((10, 5)), records, 1e6))["speculators"]
    assert merged["suffix"] == {"drafted": 16, "accepted": 8, "steps": 2, "rate": 0.5}
    assert merged["static"] == {"drafted": 14, "accepted": 6, "steps": 2, "rate": 6 / 14}
    assert "none" not in merged


def test_merge_fades_old_counts_past_the_bound():
    merged = json.loads(merge_calibration(_priors((4000, 1000)), [], 1000))["speculators"]
    assert merged["static"]["drafted"] == 1000 and merged["static"]["accepted"] == 250


def test_traffic_priors_steer_the_plan_before_any_evidence():
    fresh = Controller([ScriptedModelDrafter([0.9] * 16)], 16, costs(0.05))
    assert fresh.draft(request())[0] == "static"  # the default prior: 0.75 a token
    told = Controller([ScriptedModelDrafter([0.9] * 16)], 16, costs(0.05))
    assert told.load_calibration(_priors((1000, 20))) == {"static": 0.02}
    assert told.draft(request())[0] == "none"  # the traffic says it is rarely right


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[]",
        json.dumps({"format": "other/1", "speculators": {}}).encode(),
        _priors((10, 11)),  # more accepted than drafted
        _priors((10, -1)),
        json.dumps({"format": CALIBRATION_FORMAT, "speculators": {"x": {"drafted": 1}}}).encode(),
    ],
)
def test_bad_calibration_refused(raw):
    controller = Controller([ScriptedModelDrafter([0.9] * 16)], 16, costs(0.05))
    with pytest.raises(CalibrationError):
        controller.load_calibration(raw)
    assert controller.acceptance.priors == {}
    with pytest.raises(CalibrationError):
        merge_calibration(raw, [], 1e6)
    assert parse_calibration(_priors((4, 2))) == {"static": 0.5}

"""The speculators' declared capabilities drive mode building, not their names."""

import pytest

from atlas_sidecar.engine.capabilities import (
    MODES,
    SPECULATORS,
    SpeculatorCapabilities,
    TargetCapabilities,
    needs_draft_model,
    usable,
)
from atlas_sidecar.engine.controller import ControllerConfig
from atlas_sidecar.engine.speculators.neural import NeuralSpeculator
from atlas_sidecar.engine.speculators.static import StaticSpeculator
from atlas_sidecar.engine.speculators.suffix import SuffixSpeculator


def test_every_shipped_speculator_class_declares_what_the_registry_says():
    classes = {c.name: c for c in (SuffixSpeculator, StaticSpeculator, NeuralSpeculator)}
    assert set(classes) == set(SPECULATORS)
    for name, cls in classes.items():
        assert cls.capabilities == SPECULATORS[name]
        assert callable(cls.rollback) and callable(cls.release)


def test_one_vocabulary_of_modes():
    assert MODES[0] == "none" and MODES[-1] == "atlas"
    assert "target_only" not in MODES


def test_a_remote_target_without_hidden_states_rules_out_the_neural_head():
    remote = TargetCapabilities(verifies_trees=False, exact_logits=False, exposes_features=False)
    assert not usable("neural", remote, have_draft_model=True)
    assert usable("suffix", remote, have_draft_model=False)
    assert usable("static", remote, have_draft_model=True)
    assert not usable("static", remote, have_draft_model=False)
    assert usable("neural", TargetCapabilities(), have_draft_model=False)


def test_draft_model_needs_follow_the_capabilities():
    assert needs_draft_model("static") and needs_draft_model("atlas")
    assert not needs_draft_model("suffix") and not needs_draft_model("none")
    assert not SpeculatorCapabilities().needs_draft_model


def test_controller_config_parts_switch_off_one_at_a_time():
    full = ControllerConfig()
    assert all(getattr(full, part) for part in full.parts())
    for part in full.parts():
        off = full.without(part)
        assert not getattr(off, part)
        assert sum(not getattr(off, p) for p in full.parts()) == 1
    with pytest.raises(ValueError, match="unknown controller part"):
        full.without("magic")

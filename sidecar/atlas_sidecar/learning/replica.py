"""A serving replica's side of the learning loop: which of its drafters take published
versions, how each is loaded from a version's files, and the identity versions must have.

The suffix index and the neural head are versioned (``VersionedDrafter``: canary,
pinning, rollback): a new instance is built from the version's ``suffix.bin``, or
``head.safetensors``, off the worker. The controller's calibration priors are applied
at install.

A head instance needs no features of its own: every instance reads the hidden states
the target records per sequence, so a second head costs only its weights. The replica's
online learner follows the stable instance (``neural_train.hand_over_learning``): a
head installed as stable goes on learning from this replica's traffic, a canary serves
the published head unchanged (its acceptance is that version's), and every instance
hands its finished requests to the one learner.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from atlas_sidecar.engine.controller import Controller, parse_calibration
from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.speculators.neural import NeuralSpeculator, load_weights
from atlas_sidecar.engine.speculators.suffix import SuffixSpeculator
from atlas_sidecar.learning.published import CALIBRATION_FILE, HEAD_FILE, SUFFIX_FILE
from atlas_sidecar.learning.rollout import Applier, Loader, Rollout
from atlas_sidecar.learning.store import TargetIdentity, Version, WeightsStore
from atlas_sidecar.learning.versioned import VersionedDrafter

log = logging.getLogger(__name__)


def _has(version: Version, name: str) -> bool:
    return any(f.name == name for f in version.manifest.files)


def suffix_loader(vocab_size: int) -> Loader:
    def load(version: Version) -> SuffixSpeculator | None:
        if not _has(version, SUFFIX_FILE):
            return None
        speculator = SuffixSpeculator()
        speculator.load_snapshot_bytes(version.read(SUFFIX_FILE), vocab_size)
        return speculator

    return load


def neural_loader(drafter: VersionedDrafter) -> Loader:
    """A new head instance on the target of ``drafter``'s stable one, serving the
    version's ``head.safetensors`` (parsed and checked: the target's identity, every
    tensor's shape, finite values; a bad file raises, so the rollout refuses it). It
    hands finished requests to the stable instance's learner."""

    def load(version: Version) -> NeuralSpeculator | None:
        if not _has(version, HEAD_FILE):
            return None
        template = drafter.stable.drafter
        assert isinstance(template, NeuralSpeculator)
        speculator = NeuralSpeculator(template.target, template.config, template.dtype)
        raw = version.read(HEAD_FILE)
        speculator.swap(load_weights(speculator, raw, f"{version.id}/{HEAD_FILE}"))
        speculator.learner = template.learner
        return speculator

    return load


def calibration_applier(controller: Controller) -> Applier:
    def prepare(version: Version) -> Callable[[], None] | None:
        if not _has(version, CALIBRATION_FILE):
            return None
        raw = version.read(CALIBRATION_FILE)
        parse_calibration(raw)  # validated here, off the worker: a bad file refuses

        def apply() -> None:
            controller.load_calibration(raw)

        return apply

    return prepare


def versioned_drafters(engine: Engine) -> dict[str, VersionedDrafter]:
    return {d.name: d for d in engine.policy.drafters() if isinstance(d, VersionedDrafter)}


def build_rollout(
    store: WeightsStore,
    identity: TargetIdentity | None,
    engine: Engine,
    vocab_size: int,
    canary_fraction: float,
) -> Rollout:
    """The rollout over ``engine``'s versioned drafters (built with ``versioned=True``).
    A version's head is skipped on a replica that runs none (over SGLang, say)."""
    drafters = versioned_drafters(engine)
    appliers: dict[str, Any] = {}
    if isinstance(engine.policy, Controller):
        appliers["calibration"] = calibration_applier(engine.policy)
    loaders = {"suffix": suffix_loader(vocab_size)}
    if "neural" in drafters:
        loaders["neural"] = neural_loader(drafters["neural"])
    return Rollout(store, identity, drafters, loaders,
                   canary_fraction=canary_fraction, appliers=appliers)  # fmt: skip

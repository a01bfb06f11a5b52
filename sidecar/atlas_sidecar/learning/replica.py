"""A serving replica's side of the learning loop: which of its drafters take published
versions, how each is loaded from a version's files, and the identity versions must have.

The suffix index is versioned (``VersionedDrafter``: canary, pinning, rollback): a new
instance is built from the version's ``suffix.bin``. The controller's calibration
priors are applied at install. The neural head stays with the replica's own online
learner: a published head is not swapped in yet (it would need a second head instance
recording the target's features beside the first), so a version's ``head.safetensors``
is skipped with a log line, never half-loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from atlas_sidecar.engine.controller import Controller, parse_calibration
from atlas_sidecar.engine.core import Engine
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


def calibration_applier(controller: Controller) -> Applier:
    def prepare(version: Version) -> Callable[[], None] | None:
        if _has(version, HEAD_FILE):
            log.info("version %s: its neural head is not hot-swapped (the replica's "
                     "own learner keeps training its head)", version.id)  # fmt: skip
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
    """The rollout over ``engine``'s versioned drafters (built with ``versioned=True``)."""
    drafters = versioned_drafters(engine)
    appliers: dict[str, Any] = {}
    if isinstance(engine.policy, Controller):
        appliers["calibration"] = calibration_applier(engine.policy)
    return Rollout(store, identity, drafters, {"suffix": suffix_loader(vocab_size)},
                   canary_fraction=canary_fraction, appliers=appliers)  # fmt: skip

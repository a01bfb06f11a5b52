"""What a published version holds for an engine, and how an engine starts from one.

A version the trainer publishes holds up to three files, each optional:

- ``suffix.bin``: the global suffix index over every replica's traffic
  (``SuffixSpeculator.save_snapshot``), so a new replica drafts warm;
- ``head.safetensors``: the neural head (``neural.save_weights``), published only when
  it beat its parent on held-out recent traffic;
- ``calibration.json``: the controller's priors per speculator (``parse_calibration``).

``apply_version`` loads them into a built engine's drafters and controller: what
``atlas bench --snapshot`` does, and what a replica does on start or hot swap.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from atlas_sidecar.engine.controller import Controller
from atlas_sidecar.engine.speculators.neural import NeuralSpeculator
from atlas_sidecar.engine.speculators.neural import TargetIdentity as HeadIdentity
from atlas_sidecar.engine.speculators.suffix import SuffixSpeculator
from atlas_sidecar.learning.store import DirectoryStore, StoreError, TargetIdentity, Version

if TYPE_CHECKING:
    from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
    from atlas_sidecar.engine.core import Engine

SUFFIX_FILE = "suffix.bin"
HEAD_FILE = "head.safetensors"
CALIBRATION_FILE = "calibration.json"


def target_identity(target: CausalLMRunner, revision: str = "") -> TargetIdentity:
    """The store's identity of ``target``: its name, sizes and LM head fingerprint (the
    neural head's, so a model swapped under the same name is refused)."""
    head = HeadIdentity.of(target)
    return TargetIdentity(head.name, revision, head.hidden_size, head.vocab_size,
                          head.lm_head_sha256)  # fmt: skip


def open_published(path: str | os.PathLike[str], target: CausalLMRunner) -> Version:
    """The version in directory ``path`` (``<store>/v000042``), every file verified
    against its manifest and the manifest's target against ``target``.

    The revision is taken from the manifest: a local path does not say which revision
    it is, and the LM head fingerprint catches another model under the same name."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise StoreError(f"{path}: not a published version (no manifest.json)")
    store = DirectoryStore(path.parent)
    manifest = store.manifest(path.name)
    identity = replace(target_identity(target), revision=manifest.target.revision)
    return store.open_version(path.name, identity)


def apply_version(engine: Engine, version: Version, vocab_size: int) -> list[str]:
    """Load the version's files into the engine's drafters and controller; returns the
    files loaded. Each loader validates its file first and raises on a bad one (the
    suffix index and the head then stay as they were)."""
    names = {f.name for f in version.manifest.files}
    loaded: list[str] = []
    for drafter in engine.policy.drafters():
        if isinstance(drafter, SuffixSpeculator) and SUFFIX_FILE in names:
            drafter.load_snapshot_bytes(version.read(SUFFIX_FILE), vocab_size)
            loaded.append(SUFFIX_FILE)
        elif isinstance(drafter, NeuralSpeculator) and HEAD_FILE in names:
            assert version.paths is not None, "a head is loaded from a directory store"
            drafter.load(version.paths[HEAD_FILE])
            loaded.append(HEAD_FILE)
    if isinstance(engine.policy, Controller) and CALIBRATION_FILE in names:
        engine.policy.load_calibration(version.read(CALIBRATION_FILE))
        loaded.append(CALIBRATION_FILE)
    return loaded

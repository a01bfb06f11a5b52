"""The trainer on the small real model: what one round learns and publishes, that a
head is published only when it beats its parent on held-out traffic, and that its
checkpoint survives a restart without learning anything twice or skipping anything."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from atlas_sidecar.engine.controller import parse_calibration
from atlas_sidecar.engine.speculators.neural import NeuralSpeculator
from atlas_sidecar.engine.speculators.neural_train import TrainConfig, collect, replay_accept_len
from atlas_sidecar.engine.speculators.suffix import SuffixSpeculator
from atlas_sidecar.learning.published import (
    CALIBRATION_FILE,
    HEAD_FILE,
    SUFFIX_FILE,
    target_identity,
)
from atlas_sidecar.learning.store import DirectoryStore
from atlas_sidecar.learning.trainer import CHECKPOINT, Trainer

from .conftest import FAST, FIRST, MemorySource


def _replayed(target, version, records, lookahead=FAST.lookahead) -> float:
    """The published head's greedy accept_len on ``records``, replayed independently."""
    speculator = NeuralSpeculator(target)
    speculator.load(version.paths[HEAD_FILE])
    scores = []
    for record in records:
        (sequence,) = collect(target, [list(record.tokens)], FAST.max_record_tokens)
        scores.append(replay_accept_len(speculator, sequence, len(record.prompt_ids), lookahead))
    return sum(scores) / len(scores)


def test_round_publishes_a_head_that_beats_its_start(first_round, target, python_traffic):
    root, _, result = first_round
    store = DirectoryStore(root / "store")
    assert result.version == store.latest() == "v000001"
    assert result.records == FIRST and result.head_published
    version = store.open_version(result.version, target_identity(target))
    manifest = version.manifest
    assert {f.name for f in manifest.files} == {SUFFIX_FILE, HEAD_FILE, CALIBRATION_FILE}
    assert manifest.parent is None
    assert manifest.window == {
        "first_seq": 1,
        "last_seq": FIRST,
        "first_request_id": python_traffic[0].request_id,
        "last_request_id": python_traffic[FIRST - 1].request_id,
    }
    heldout = python_traffic[FIRST - 2 : FIRST]  # the newest third, kept out of training
    assert manifest.metrics["head_accept_len"] > manifest.metrics["head_accept_len_parent"]
    assert _replayed(target, version, heldout) == pytest.approx(manifest.metrics["head_accept_len"])


def test_published_suffix_and_calibration(first_round, target, python_traffic):
    root, _, result = first_round
    version = DirectoryStore(root / "store").open_version(result.version)
    suffix = SuffixSpeculator()
    assert suffix.load_snapshot_bytes(version.read(SUFFIX_FILE), target.vocab_size) == FIRST
    assert suffix.global_size == sum(len(r.tokens) for r in python_traffic[:FIRST])
    calibration = json.loads(version.read(CALIBRATION_FILE))["speculators"]["suffix"]
    records = python_traffic[:FIRST]
    drafted, accepted = _suffix_steps(records, "drafted"), _suffix_steps(records, "accepted")
    assert (calibration["drafted"], calibration["accepted"]) == (drafted, accepted)
    assert parse_calibration(version.read(CALIBRATION_FILE))["suffix"] == accepted / drafted


def _suffix_steps(records, which: str) -> int:
    """The records' drafted or accepted tokens on their suffix steps."""
    return sum(
        n
        for r in records
        for s, n in zip(r.step_speculators, getattr(r, f"step_{which}"), strict=True)
        if s == "suffix"
    )


def test_nothing_new_publishes_nothing(first_round, target):
    root, source, _ = first_round
    store = DirectoryStore(root / "store")
    restarted = Trainer(source, store, target, root / "state", FAST)  # a new process
    assert restarted.checkpoint.seq == FIRST
    result = restarted.run_round()
    assert result.version is None and result.records == 0
    assert store.versions() == ["v000001"]


def _copy(first_round, tmp_path):
    root, _, _ = first_round
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    return DirectoryStore(tmp_path / "store")


def test_second_round_beats_its_parent(first_round, target, python_traffic, tmp_path):
    store = _copy(first_round, tmp_path)
    source = MemorySource(python_traffic)
    config = dataclasses.replace(FAST, max_train_steps=120)
    result = Trainer(source, store, target, tmp_path / "state", config).run_round()
    expected = (FIRST + 1, len(python_traffic), len(python_traffic) - FIRST)
    assert (result.first_seq, result.last_seq, result.records) == expected
    manifest = store.manifest(result.version)
    assert manifest.parent == "v000001" and result.head_published
    heldout = python_traffic[-2:]
    parent = store.open_version("v000001")
    child = store.open_version(result.version)
    assert _replayed(target, child, heldout) > _replayed(target, parent, heldout)
    suffix = SuffixSpeculator()
    assert suffix.load_snapshot_bytes(child.read(SUFFIX_FILE)) == len(python_traffic)


def test_worse_head_is_not_published(first_round, target, python_traffic, tmp_path):
    store = _copy(first_round, tmp_path)
    source = MemorySource(python_traffic)
    wrecked = TrainConfig(batch_size=64, lr=3.0, grad_clip=1e9, buffer_tokens=20_000)
    config = dataclasses.replace(FAST, max_train_steps=20, train=wrecked)
    result = Trainer(source, store, target, tmp_path / "state", config).run_round()
    assert result.version == "v000002" and not result.head_published
    metrics = result.metrics
    assert metrics["head_accept_len"] < metrics["head_accept_len_parent"]
    parent, child = store.manifest("v000001"), store.manifest("v000002")
    head = {f.name: f.sha256 for f in parent.files}[HEAD_FILE]
    assert {f.name: f.sha256 for f in child.files}[HEAD_FILE] == head  # the parent's, carried


NO_HEAD = dataclasses.replace(FAST, max_train_steps=0)


def test_checkpoint_survives_restart(target, python_traffic, tmp_path):
    store = DirectoryStore(tmp_path / "store")
    source = MemorySource(python_traffic[:3])
    first = Trainer(source, store, target, tmp_path / "state", NO_HEAD).run_round()
    assert (first.first_seq, first.last_seq, first.version) == (1, 3, "v000001")
    source.add(python_traffic[3:5])
    second = Trainer(source, store, target, tmp_path / "state", NO_HEAD).run_round()
    assert (second.first_seq, second.last_seq, second.records) == (4, 5, 2)
    suffix = SuffixSpeculator()
    assert suffix.load_snapshot_bytes(store.open_version("v000002").read(SUFFIX_FILE)) == 5


def test_killed_before_checkpoint_resumes_from_manifest(target, python_traffic, tmp_path):
    store = DirectoryStore(tmp_path / "store")
    source = MemorySource(python_traffic[:3])
    Trainer(source, store, target, tmp_path / "state", NO_HEAD).run_round()
    (tmp_path / "state" / CHECKPOINT).unlink()  # killed after publishing, before the checkpoint
    restarted = Trainer(source, store, target, tmp_path / "state", NO_HEAD)
    assert restarted.checkpoint.seq == 3
    assert restarted.run_round().version is None


def test_redelivered_records_are_not_learned_twice(target, python_traffic, tmp_path):
    store = DirectoryStore(tmp_path / "store")
    source = MemorySource(python_traffic[:3])
    Trainer(source, store, target, tmp_path / "state", NO_HEAD).run_round()
    source.add([python_traffic[1], python_traffic[3]])  # at-least-once: one comes again
    result = Trainer(source, store, target, tmp_path / "state", NO_HEAD).run_round()
    assert (result.records, result.skipped, result.version) == (1, 1, "v000002")
    suffix = SuffixSpeculator()
    assert suffix.load_snapshot_bytes(store.open_version("v000002").read(SUFFIX_FILE)) == 4


def test_corrupt_checkpoint_refused(target, tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / CHECKPOINT).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt trainer checkpoint"):
        Trainer(MemorySource(), DirectoryStore(tmp_path / "store"), target, tmp_path / "state")


def test_a_round_is_bounded_and_the_next_goes_on(target, python_traffic, tmp_path):
    store = DirectoryStore(tmp_path / "store")
    source = MemorySource(python_traffic[:5])
    bounded = dataclasses.replace(NO_HEAD, max_records=2, suffix_tokens=400)
    trainer = Trainer(source, store, target, tmp_path / "state", bounded)
    rounds = [trainer.run_round() for _ in range(4)]
    assert [(r.first_seq, r.last_seq) for r in rounds] == [(1, 2), (3, 4), (5, 5), (None, None)]
    assert store.versions() == ["v000001", "v000002", "v000003"]
    suffix = SuffixSpeculator()
    suffix.load_snapshot_bytes(store.open_version("v000003").read(SUFFIX_FILE))
    assert 0 < suffix.global_size <= 400  # the trainer's index keeps to its budget
    assert list(suffix._global_docs[-1]) == list(python_traffic[4].tokens)


def test_records_with_ids_outside_the_vocabulary_are_skipped(target, python_traffic, tmp_path):
    good = python_traffic[0]
    bad = dataclasses.replace(good, request_id="r/bad", output_ids=(target.vocab_size,))
    source = MemorySource([bad, good])
    store = DirectoryStore(tmp_path / "store")
    result = Trainer(source, store, target, tmp_path / "state", NO_HEAD).run_round()
    assert (result.records, result.skipped, result.version) == (1, 1, "v000001")
    assert store.manifest("v000001").window["first_request_id"] == good.request_id

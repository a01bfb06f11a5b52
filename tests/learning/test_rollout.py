"""Hot rollout: versions verified, loaded off the worker, swapped between steps, pinned
per sequence; canary, promote, roll back; bad versions refused while serving goes on."""

from __future__ import annotations

import json
import threading

import pytest

from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.base import DraftRequest
from atlas_sidecar.engine.speculators.suffix import SuffixSpeculator
from atlas_sidecar.learning.rollout import Rollout, RolloutRefused
from atlas_sidecar.learning.store import DirectoryStore, TargetIdentity, Version
from atlas_sidecar.learning.versioned import VersionedDrafter, canary_share

from .conftest import swap_mid_stream

TARGET = TargetIdentity("smollm2-135m-instruct", "main", 576, 49152)
OTHER = TargetIdentity("qwen2.5-coder-1.5b-instruct", "main", 1536, 151936)
DOC_A = [5, 6, 7, 8, 9, 10, 11, 12]
DOC_B = [5, 6, 7, 40, 41, 42, 43, 44]


def suffix_knowing(*docs: list[int]) -> SuffixSpeculator:
    speculator = SuffixSpeculator()
    for doc in docs:
        speculator.add_document(doc)
    return speculator


def draft_for(drafter, seq_id: str, context: list[int]) -> list[int]:
    request = DraftRequest(seq_id, context, 4, SamplingParams(max_tokens=8), trees=False)
    tree = drafter.propose([request])[0]
    return [tree.tokens[i] for i in tree.main_nodes()]


def load_docs(version: Version) -> SuffixSpeculator | None:
    """The test's file format: suffix.json, a list of token documents."""
    if "suffix.json" not in {f.name for f in version.manifest.files}:
        return None
    return suffix_knowing(*json.loads(version.read("suffix.json")))


# -- VersionedDrafter ------------------------------------------------------------------


def test_sequences_stay_on_the_version_they_started_with():
    drafter = VersionedDrafter("v1", suffix_knowing(DOC_A))
    assert draft_for(drafter, "old", [5, 6, 7]) == [8, 9, 10, 11]
    drafter.install("v2", suffix_knowing(DOC_B), canary_fraction=1.0)
    assert draft_for(drafter, "old", [5, 6, 7]) == [8, 9, 10, 11]  # pinned to v1
    assert draft_for(drafter, "new", [5, 6, 7]) == [40, 41, 42, 43]
    assert drafter.version_of("old") == "v1" and drafter.version_of("new") == "v2"
    assert drafter.versions() == {"stable": "v2", "previous": "v1"}
    drafter.release("old")
    drafter.release("new")
    assert drafter.roll_back() == "v1"
    assert draft_for(drafter, "later", [5, 6, 7]) == [8, 9, 10, 11]


def test_a_canary_takes_its_fraction_of_new_sequences_by_id():
    drafter = VersionedDrafter("v1", suffix_knowing(DOC_A))
    drafter.install("v2", suffix_knowing(DOC_B), canary_fraction=0.25)
    ids = [f"req-{i}" for i in range(2000)]
    on_canary = [s for s in ids if drafter.version_of(s) == "v2"]
    assert 0.21 < len(on_canary) / len(ids) < 0.29
    assert all(canary_share(s) < 0.25 for s in on_canary)
    assert draft_for(drafter, on_canary[0], [5, 6, 7]) == [40, 41, 42, 43]
    assert drafter.promote() == "v2"
    assert drafter.versions() == {"stable": "v2", "previous": "v1"}
    assert drafter.version_of("req-new") == "v2"


def test_a_rolled_back_canary_serves_no_new_sequence():
    drafter = VersionedDrafter("v1", suffix_knowing(DOC_A))
    drafter.install("v2", suffix_knowing(DOC_B), canary_fraction=0.5)
    assert drafter.roll_back() == "v1"
    assert {drafter.version_of(f"r{i}") for i in range(200)} == {"v1"}
    with pytest.raises(ValueError, match="no canary"):
        drafter.promote()


def test_a_batch_mixing_versions_gets_each_draft_from_its_own():
    drafter = VersionedDrafter("v1", suffix_knowing(DOC_A))
    drafter.propose([DraftRequest("a", [5, 6, 7], 4, SamplingParams(max_tokens=8))])
    drafter.install("v2", suffix_knowing(DOC_B), canary_fraction=1.0)
    requests = [DraftRequest(s, [5, 6, 7], 4, SamplingParams(max_tokens=8), trees=False)
                for s in ("b", "a", "c")]  # fmt: skip
    chains = [[t.tokens[i] for i in t.main_nodes()] for t in drafter.propose(requests)]
    assert chains == [[40, 41, 42, 43], [8, 9, 10, 11], [40, 41, 42, 43]]


# -- Rollout ------------------------------------------------------------------------------


class Worker:
    """Stands for the scheduler: tasks run when the test says a step boundary came."""

    def __init__(self) -> None:
        self.tasks: list = []

    def between_steps(self, task) -> None:
        self.tasks.append(task)

    def boundary(self) -> None:
        tasks, self.tasks = self.tasks, []
        for task in tasks:
            task()


@pytest.fixture
def rollout(tmp_path):
    store = DirectoryStore(tmp_path / "weights")
    drafter = VersionedDrafter("base", suffix_knowing(DOC_A))
    worker = Worker()
    refused: list[tuple[str, str]] = []
    r = Rollout(
        store, TARGET, {"suffix": drafter}, {"suffix": load_docs}, worker.between_steps,
        on_refused=lambda v, why: refused.append((v, why)),
    )  # fmt: skip
    return r, store, drafter, worker, refused


def test_a_published_version_is_installed_only_at_a_step_boundary(rollout):
    r, store, drafter, worker, refused = rollout
    version = store.publish({"suffix.json": json.dumps([DOC_B]).encode()}, target=TARGET).version
    result = r.request(version)
    assert result.installed == ("suffix",) and r.pending == version
    assert draft_for(drafter, "s1", [5, 6, 7]) == [8, 9, 10, 11]  # not yet: mid-step
    worker.boundary()
    assert r.pending is None
    assert draft_for(drafter, "s2", [5, 6, 7]) == [40, 41, 42, 43]
    assert r.serving() == {"suffix": {"stable": version, "previous": "base"}}
    assert not refused


def test_corrupt_wrong_target_and_unloadable_versions_are_refused(rollout):
    r, store, drafter, worker, refused = rollout
    good = store.publish({"suffix.json": json.dumps([DOC_B]).encode()}, target=TARGET).version
    path = store.root / good / "suffix.json"
    raw = bytearray(path.read_bytes())
    raw[3] ^= 0x01
    path.write_bytes(bytes(raw))
    other = store.publish({"suffix.json": json.dumps([DOC_B]).encode()}, target=OTHER).version
    broken = store.publish({"suffix.json": b"[[1, 2"}, target=TARGET).version
    empty = store.publish({"notes.txt": b"nothing to load"}, target=TARGET).version
    for version, why in ((good, "sha256|size"), (other, "made for target"),
                         (broken, "JSONDecodeError"), (empty, "nothing"),
                         ("v999999", "v999999")):  # fmt: skip
        with pytest.raises(RolloutRefused, match=why):
            r.request(version)
    worker.boundary()
    assert [v for v, _ in refused] == [good, other, broken, empty, "v999999"]
    assert draft_for(drafter, "s", [5, 6, 7]) == [8, 9, 10, 11]  # still base
    assert r.serving() == {"suffix": {"stable": "base"}}


def test_a_canary_rollout_then_verdicts(tmp_path):
    store = DirectoryStore(tmp_path / "weights")
    drafter = VersionedDrafter("base", suffix_knowing(DOC_A))
    worker = Worker()
    r = Rollout(store, TARGET, {"suffix": drafter}, {"suffix": load_docs},
                worker.between_steps, canary_fraction=0.1)  # fmt: skip
    version = store.publish({"suffix.json": json.dumps([DOC_B]).encode()}, target=TARGET).version
    assert r.request(version).canary_fraction == 0.1
    worker.boundary()
    assert r.serving() == {"suffix": {"stable": "base", "canary": version}}
    r.roll_back()
    worker.boundary()
    assert r.serving() == {"suffix": {"stable": "base"}}
    r.request(version)
    r.promote()
    worker.boundary()
    assert r.serving() == {"suffix": {"stable": version, "previous": "base"}}


def test_rollouts_from_two_threads_are_prepared_one_at_a_time(rollout):
    r, store, drafter, worker, _ = rollout
    versions = [
        store.publish({"suffix.json": json.dumps([DOC_B]).encode()}, target=TARGET).version
        for _ in range(2)
    ]
    threads = [threading.Thread(target=r.request, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    worker.boundary()
    assert drafter.stable.version in versions and drafter.previous is not None


# -- through a real server ---------------------------------------------------------------


MAX_TOKENS = 64


def test_a_version_swapped_in_mid_stream_leaves_that_stream_exact(target, tmp_path):
    from atlas_sidecar.engine.core import Engine
    from atlas_sidecar.tooling.workloads import Prompt, encode

    tok = target.tokenizer
    text = "Write a Python function that returns the square of a number."
    ids = encode(tok, Prompt("t", "t", (("user", text),)))
    want = Engine(target, tok).generate(ids, SamplingParams(max_tokens=MAX_TOKENS)).token_ids
    store = DirectoryStore(tmp_path / "weights")
    # The new version knows this request's answer: its drafts are all accepted.
    version = store.publish({"suffix.json": json.dumps([ids + want]).encode()},
                            target=TARGET).version  # fmt: skip
    drafter = VersionedDrafter("base", SuffixSpeculator())
    engine = Engine(target, tok, drafter, lookahead=8)
    rollout = Rollout(store, TARGET, {"suffix": drafter}, {"suffix": load_docs})
    stats = swap_mid_stream(engine, rollout, ids, want, version, MAX_TOKENS)
    assert stats[version].accept_len > stats["base"].accept_len + 1.0
    assert stats["weight_version"] == version

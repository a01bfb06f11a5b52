"""Hot rollout of the neural head: a published ``head.safetensors`` drafts for new
sequences (stable or canary) while the ones in flight keep their head; the replica's
learner follows the stable instance; a bad head is refused and the old one serves on;
output stays the target's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load, save

from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.base import DraftRequest
from atlas_sidecar.engine.speculators.neural import NeuralSpeculator, save_weights
from atlas_sidecar.engine.speculators.neural_train import (
    OnlineLearner,
    TrainConfig,
    hand_over_learning,
)
from atlas_sidecar.learning.published import HEAD_FILE, target_identity
from atlas_sidecar.learning.replica import neural_loader
from atlas_sidecar.learning.rollout import Rollout, RolloutRefused
from atlas_sidecar.learning.store import DirectoryStore
from atlas_sidecar.learning.versioned import VersionedDrafter, canary_share
from atlas_sidecar.tooling import workloads

from .conftest import swap_mid_stream

SMALL = TrainConfig(batch_size=32, steps_per_request=1, buffer_tokens=4096)
LOOKAHEAD = 5


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


def head_bytes(target, seed: int, tmp_path) -> bytes:
    """A head file as the trainer publishes one: a distinct head per seed."""
    speculator = NeuralSpeculator(target, seed=seed)
    return save_weights(speculator.weights, speculator.identity,
                        tmp_path / f"head-{seed}.safetensors").read_bytes()  # fmt: skip


def reference(target, raw: bytes, tmp_path) -> NeuralSpeculator:
    """A NeuralSpeculator loaded the ordinary way from the same file."""
    path = tmp_path / "reference.safetensors"
    path.write_bytes(raw)
    speculator = NeuralSpeculator(target, seed=99)
    speculator.load(path)
    return speculator


@pytest.fixture(scope="module")
def prompt(target) -> list[int]:
    return workloads.encode(target.tokenizer, workloads.humaneval(1)[0])


@pytest.fixture
def live(target, prompt):
    """Start sequences on the target as the engine would: its cache covers all but the
    pending token, so a head has the feature of ``context[-2]`` to draft from."""
    started: list[str] = []

    def start(seq_id: str) -> str:
        target.start(seq_id)
        target.forward(seq_id, prompt[:-1])
        started.append(seq_id)
        return seq_id

    yield start
    for seq_id in started:
        target.release(seq_id)


def draft(drafter, seq_id: str, context: list[int]) -> list[int]:
    request = DraftRequest(seq_id, context, LOOKAHEAD, SamplingParams(max_tokens=8),
                           trees=False)  # fmt: skip
    return drafter.propose([request])[0].tokens


@pytest.fixture
def served(target, tmp_path):
    """A versioned base head with its own online learner, a store and a rollout."""
    identity = target_identity(target)
    base = NeuralSpeculator(target, seed=0)
    learner = OnlineLearner(base, SMALL, background=False)
    drafter = VersionedDrafter("base", base, on_stable=hand_over_learning)
    store = DirectoryStore(tmp_path / "weights")
    worker = Worker()
    refused: list[tuple[str, str]] = []

    def rollout(fraction: float = 0.0) -> Rollout:
        return Rollout(store, identity, {"neural": drafter}, {"neural": neural_loader(drafter)},
                       worker.between_steps, canary_fraction=fraction,
                       on_refused=lambda v, why: refused.append((v, why)))  # fmt: skip

    def publish(raw: bytes) -> str:
        return store.publish({HEAD_FILE: raw}, target=identity).version

    return base, learner, drafter, rollout, publish, worker, refused


def test_a_published_head_goes_stable_new_sequences_draft_with_it_and_learn_on(
    target, prompt, live, served, tmp_path
):
    base, learner, drafter, rollout, publish, worker, refused = served
    raw = head_bytes(target, 7, tmp_path)
    version = publish(raw)
    want_new = draft(reference(target, raw, tmp_path), live("ref"), prompt)
    old = live("old")
    before = draft(drafter, old, prompt)  # pinned to base
    assert before == draft(base, live("base-ref"), prompt) and before != want_new

    r = rollout()
    assert r.request(version).installed == ("neural",)
    assert draft(drafter, live("early"), prompt) == before  # not yet: mid-step
    worker.boundary()
    assert r.serving() == {"neural": {"stable": version, "previous": "base"}}
    new = live("new")
    assert draft(drafter, new, prompt) == want_new  # the published head drafts for it
    assert draft(drafter, old, prompt) == before  # the one in flight keeps its head
    assert not refused

    # The learner moved to the new stable instance; the base stops changing.
    installed = drafter.stable.drafter
    assert isinstance(installed, NeuralSpeculator) and installed is not base
    assert learner.speculator is installed and installed.learner is learner
    base_weights, installed_version = base.weights, installed.version
    drafter.release(new)
    assert learner.distiller.sequences_seen == 1
    assert installed.version == installed_version + 1  # learning on from the published head
    assert base.weights is base_weights
    drafter.release(old)  # the old sequence's traffic still reaches the one learner
    assert learner.distiller.sequences_seen == 2 and base.weights is base_weights
    assert drafter.instances() == [installed, base]


def test_a_head_canary_takes_its_sequences_then_promote_and_roll_back(
    target, prompt, live, served, tmp_path
):
    base, learner, drafter, rollout, publish, worker, _ = served
    raw = head_bytes(target, 8, tmp_path)
    version = publish(raw)
    want_canary = draft(reference(target, raw, tmp_path), live("ref"), prompt)
    want_stable = draft(base, live("base-ref"), prompt)
    r = rollout(0.5)
    r.request(version)
    worker.boundary()
    assert r.serving() == {"neural": {"stable": "base", "canary": version}}
    ids = [f"seq-{i}" for i in range(40)]
    canary_id = next(i for i in ids if canary_share(i) < 0.5)
    stable_id = next(i for i in ids if canary_share(i) >= 0.5)
    assert draft(drafter, live(canary_id), prompt) == want_canary
    assert draft(drafter, live(stable_id), prompt) == want_stable
    canary = drafter.canary.drafter if drafter.canary else None
    assert isinstance(canary, NeuralSpeculator)
    assert learner.speculator is base  # the canary serves the published head unchanged
    canary_weights = canary.weights
    drafter.release(canary_id)  # its traffic trains the stable head, not the canary
    assert canary.weights is canary_weights and learner.distiller.sequences_seen == 1

    r.promote()
    worker.boundary()
    assert r.serving() == {"neural": {"stable": version, "previous": "base"}}
    assert learner.speculator is canary
    assert draft(drafter, live("after-promote"), prompt) == want_canary
    r.roll_back()
    worker.boundary()
    assert r.serving() == {"neural": {"stable": "base"}}
    assert learner.speculator is base
    assert draft(drafter, live("after-rollback"), prompt) == draft(base, live("b2"), prompt)
    # Pinned to the base instance throughout (whose head has learned meanwhile).
    assert drafter.version_of(stable_id) == "base"
    assert draft(drafter, stable_id, prompt) == draft(base, live("b3"), prompt)


def _damaged(raw: bytes, kind: str) -> bytes:
    if kind == "garbage":
        return b"\x00not a safetensors file" * 10
    tensors = load(raw)
    size = int.from_bytes(raw[:8], "little")
    metadata = json.loads(raw[8 : 8 + size])["__metadata__"]
    if kind == "wrong shape":
        tensors["head.down.weight"] = tensors["head.down.weight"][:, :-1].contiguous()
    elif kind == "not finite":
        tensors["head.fuse.weight"][0, 0] = float("inf")
    elif kind == "other target":
        meta = json.loads(metadata["atlas"])
        meta["target"]["hidden_size"] = 1536
        metadata = {"atlas": json.dumps(meta)}
    return save(tensors, metadata=metadata)


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("wrong shape", r"WeightsError: v\d+/head.safetensors: down.weight has shape"),
        ("not finite", "non-finite"),
        ("garbage", "corrupt or truncated"),
        ("other target", "made for target"),
    ],
)
def test_a_bad_head_published_through_the_store_is_refused_and_the_old_serves_on(
    target, prompt, live, served, tmp_path, kind, why
):
    base, learner, drafter, rollout, publish, worker, refused = served
    version = publish(_damaged(head_bytes(target, 9, tmp_path), kind))  # its sha256 is right
    before = draft(drafter, live("a"), prompt)
    r = rollout()
    with pytest.raises(RolloutRefused, match=why):
        r.request(version)
    worker.boundary()
    assert [v for v, _ in refused] == [version]
    assert r.serving() == {"neural": {"stable": "base"}}
    assert draft(drafter, live("b"), prompt) == before
    assert learner.speculator is base


def test_a_head_from_a_remote_store_is_read_from_its_bytes(target, prompt, live, tmp_path):
    """An object store hands the loader verified bytes, not a path."""
    from atlas_sidecar.learning.store import Version

    raw = head_bytes(target, 11, tmp_path)
    store = DirectoryStore(tmp_path / "weights")
    opened = store.open_version(
        store.publish({HEAD_FILE: raw}, target=target_identity(target)).version,
        target_identity(target),
    )
    remote = Version(opened.manifest, blobs={HEAD_FILE: raw})
    drafter = VersionedDrafter("base", NeuralSpeculator(target))
    speculator = neural_loader(drafter)(remote)
    assert speculator is not None and speculator.learner is None
    want = draft(reference(target, raw, tmp_path), live("ref"), prompt)
    assert draft(speculator, live("s"), prompt) == want


def test_a_versioned_neural_engine_rolls_out_heads_and_closes_its_one_learner(target, tmp_path):
    from atlas_sidecar.engine.build import build_engine, close_engine, neural_learners
    from atlas_sidecar.learning.replica import build_rollout
    from atlas_sidecar.serving.memory import _learners

    engine = build_engine("neural", target, versioned=True)
    try:
        drafter = engine.policy.drafters()[0]
        assert isinstance(drafter, VersionedDrafter) and drafter.on_stable is hand_over_learning
        learners = neural_learners(engine)
        assert len(learners) == 1
        store = DirectoryStore(tmp_path / "weights")
        r = build_rollout(store, target_identity(target), engine, target.vocab_size, 0.0)
        assert set(r.loaders) == {"suffix", "neural"}
        worker = Worker()
        r.between_steps = worker.between_steps
        version = store.publish({HEAD_FILE: head_bytes(target, 12, tmp_path)},
                                target=target_identity(target)).version  # fmt: skip
        r.request(version)
        worker.boundary()
        assert neural_learners(engine) == learners  # one learner across both instances
        assert _learners(engine.policy.drafters()) == learners  # the memory gauge's
        assert learners[0].speculator is drafter.stable.drafter
    finally:
        close_engine(engine)


# -- through a real server ---------------------------------------------------------------


MAX_TOKENS = 48


def test_a_head_swapped_in_mid_stream_leaves_that_stream_exact(target, tmp_path):
    from atlas_sidecar.engine.core import Engine
    from atlas_sidecar.tooling.workloads import Prompt, encode

    tok = target.tokenizer
    text = "Write a Python function that returns the square of a number."
    ids = encode(tok, Prompt("t", "t", (("user", text),)))
    want = Engine(target, tok).generate(ids, SamplingParams(max_tokens=MAX_TOKENS)).token_ids
    identity = target_identity(target)
    store = DirectoryStore(tmp_path / "weights")
    version = store.publish({HEAD_FILE: head_bytes(target, 13, tmp_path)},
                            target=identity).version  # fmt: skip
    base = NeuralSpeculator(target, seed=0)
    drafter = VersionedDrafter("base", base, on_stable=hand_over_learning)
    engine = Engine(target, tok, drafter, lookahead=4)
    rollout = Rollout(store, identity, {"neural": drafter}, {"neural": neural_loader(drafter)})
    stats = swap_mid_stream(engine, rollout, ids, want, version, MAX_TOKENS)
    assert stats[version].drafted > 0
    assert torch.equal(base.weights.vocab, drafter.previous.drafter.weights.vocab)


def test_a_head_adopted_during_a_training_step_is_taken_over_before_the_next(target):
    """``adopt`` runs on the worker and must not wait for a step: it leaves the new head
    for the trainer, which switches before it steps or publishes again."""
    base = NeuralSpeculator(target, seed=0)
    learner = OnlineLearner(base, SMALL, background=False)
    new = NeuralSpeculator(target, seed=14)
    new_weights = new.weights
    with learner._lock:  # a training step under way
        learner.adopt(new)
        assert learner.distiller.speculator is base and learner.speculator is new
        assert new.learner is learner
    learner.train_now(0)
    assert learner.distiller.speculator is new and learner.speculator is new
    assert new.weights is not new_weights  # published to the new head, from its weights
    assert torch.equal(new.weights.vocab, new_weights.vocab)
    for key, value in new_weights.head.state_dict().items():
        assert torch.equal(new.weights.head.state_dict()[key], value)

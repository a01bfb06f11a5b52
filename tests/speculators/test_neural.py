"""The neural speculator: lossless drafting, honest sampling distributions, distillation
that really learns, safe weight files, bounded memory. Real model (SmolLM2-135M, fp32)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

from atlas_sidecar import models
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.build import build_engine, neural_learners
from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.base import DraftRequest
from atlas_sidecar.engine.speculators.neural import (
    FinishedSequence,
    NeuralSpeculator,
    WeightsError,
)
from atlas_sidecar.engine.speculators.neural_train import (
    OnlineLearner,
    ReplayBuffer,
    TrainConfig,
    collect,
    distill_loss,
    first_token_acceptance,
    replay_accept_len,
    select_vocab,
    sequence_bytes,
    warm_start_texts,
)
from atlas_sidecar.tooling import workloads
from atlas_sidecar.tooling.workloads import encode

SMALL = TrainConfig(batch_size=64, steps_per_request=2, buffer_tokens=20_000)
TEXT_TOKENS = 192
TRAIN_STEPS = 80


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small-batch work on a small model: one thread is as fast and never oversubscribes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target() -> CausalLMRunner:
    models.pull(models.TEST_MODEL)
    torch.manual_seed(0)
    return CausalLMRunner.load(models.TEST_MODEL, dtype="fp32", record_hidden=True)


@pytest.fixture(scope="module")
def texts(target):
    """Warm-start texts (none of the bench's first prompts): Python, then Rust."""
    all_texts = warm_start_texts(target.tokenizer)
    python, rust = all_texts[:24], all_texts[144:154]
    train = collect(target, python[:18] + rust[:7], max_tokens=TEXT_TOKENS)
    heldout = collect(target, python[18:] + rust[7:], max_tokens=TEXT_TOKENS)
    return train, heldout


@pytest.fixture(scope="module")
def trained(target, texts):
    """A head distilled from the training texts, and figures from before and after."""
    train, heldout = texts
    speculator = NeuralSpeculator(target)
    learner = OnlineLearner(speculator, SMALL, background=False)
    probe = ReplayBuffer(100_000)
    for s in heldout:
        probe.add(s)
    batch = probe.sample(256, SMALL.unroll, torch.Generator().manual_seed(0))
    assert batch is not None

    def heldout_loss() -> float:
        d = learner.distiller
        with torch.no_grad():
            return float(distill_loss(d.head, batch, d.embedding, d.rows, d.bias, SMALL)[0])

    before = {"loss": heldout_loss(), "acceptance": first_token_acceptance(speculator, heldout)}
    for s in train:
        learner.distiller.add(s)
    learner.distiller.refresh_vocab(force=True)
    learner.train_now(TRAIN_STEPS)
    after = {"loss": heldout_loss(), "acceptance": first_token_acceptance(speculator, heldout)}
    speculator.learner = None  # frozen from here on: the other tests compare its drafts
    return speculator, before, after


def _request(seq_id: str, context: list[int], lookahead: int, params=None, generator=None):
    return DraftRequest(seq_id, context, lookahead, params or SamplingParams(), generator)


@pytest.fixture
def live(target, real_prompt_ids):
    """A live target sequence in the engine's state: cache covers context[:-1]."""
    context = real_prompt_ids
    target.start("live")
    target.forward("live", context[:-1])
    yield context
    target.release("live")


@pytest.fixture(scope="module")
def real_prompt_ids(target) -> list[int]:
    return encode(target.tokenizer, workloads.humaneval(1)[0])


# -- lossless ----------------------------------------------------------------------------


def test_greedy_output_equals_target_greedy_on_real_prompts(target, trained):
    speculator = trained[0]
    plain = Engine(target, target.tokenizer)
    spec = Engine(target, target.tokenizer, speculator, lookahead=4)
    prompts = workloads.humaneval(2)[1:] + workloads.humaneval_rust(1) + workloads.mtbench(2)
    accepted = partial = 0
    for prompt in prompts:
        ids = encode(target.tokenizer, prompt)
        params = SamplingParams(max_tokens=24)
        got = spec.generate(ids, params)
        assert got.token_ids == plain.generate(ids, params).token_ids, prompt.prompt_id
        accepted += got.accepted
        partial += sum(0 < s.accepted < s.drafted for s in got.steps)
    # Exactness was tested on drafts the target partly took and partly refused.
    assert accepted > 0 and partial > 0


def test_sampled_drafts_are_distributions_over_the_target_vocabulary(trained, live):
    speculator = trained[0]
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8)
    draft = speculator.propose(
        [_request("live", live, 4, params, torch.Generator().manual_seed(3))]
    )[0]
    assert draft.probs is not None
    assert draft.probs.shape == (len(draft.tokens), speculator.target.vocab_size)
    torch.testing.assert_close(draft.probs.sum(-1), torch.ones(len(draft.tokens)))
    outside = torch.ones(speculator.target.vocab_size, dtype=torch.bool)
    outside[speculator.weights.vocab] = False
    assert float(draft.probs[:, outside].abs().sum()) == 0.0
    for i, token in enumerate(draft.tokens):
        assert draft.confidences[i] == pytest.approx(float(draft.probs[i, token]))


def test_sampled_tokens_follow_the_distribution_the_draft_reports(trained, live):
    """Rejection sampling is exact only if q is what the token was really drawn from."""
    speculator = trained[0]
    params = SamplingParams(temperature=1.0, top_k=8, max_tokens=8)
    generator = torch.Generator().manual_seed(11)
    draws = 1_000
    counts: Counter[int] = Counter()
    q = None
    for _ in range(draws):
        draft = speculator.propose([_request("live", live, 1, params, generator)])[0]
        counts[draft.tokens[0]] += 1
        q = draft.probs[0] if q is None else q
    assert q is not None
    support = set(counts) | set(torch.nonzero(q).flatten().tolist())
    tv = 0.5 * sum(abs(counts.get(t, 0) / draws - float(q[t])) for t in support)
    assert tv < 0.08  # sampling noise over <= 8 tokens at n=1000 is at most about 0.04
    assert len(counts) > 1  # really sampled, not greedy


def test_sampled_generation_through_the_engine_runs_and_is_reproducible(target, trained):
    engine = Engine(target, target.tokenizer, trained[0], lookahead=3)
    ids = encode(target.tokenizer, workloads.mtbench(1)[0])
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=5)
    first = engine.generate(ids, params)
    assert first.token_ids == engine.generate(ids, params).token_ids
    assert first.drafted > 0


# -- learning ----------------------------------------------------------------------------


def test_training_lowers_heldout_loss_and_raises_acceptance(trained):
    _, before, after = trained
    assert after["loss"] < before["loss"]
    assert after["acceptance"] > before["acceptance"]


def test_trained_head_is_accepted_more_through_the_engine(target, trained):
    cold = Engine(target, target.tokenizer, NeuralSpeculator(target), lookahead=4)
    warm = Engine(target, target.tokenizer, trained[0], lookahead=4)
    ids = encode(target.tokenizer, workloads.humaneval(1)[0])  # not among the training texts
    params = SamplingParams(max_tokens=32)
    assert warm.generate(ids, params).accept_len > cold.generate(ids, params).accept_len


def test_offline_replay_scores_a_head_exactly_as_the_engine_does(target, trained):
    """Scoring candidates on recent traffic needs no target forward per draft."""
    speculator = trained[0]
    engine = Engine(target, target.tokenizer, speculator, lookahead=4)
    ids = encode(target.tokenizer, workloads.humaneval_rust(1)[0])
    result = engine.generate(ids, SamplingParams(max_tokens=24))
    sequence = collect(target, [ids + result.token_ids], max_tokens=4096)[0]
    assert result.accepted > 0
    assert replay_accept_len(speculator, sequence, len(ids), 4) == pytest.approx(result.accept_len)


def test_finished_requests_train_the_head_and_publish_new_versions(target, real_prompt_ids):
    speculator = NeuralSpeculator(target)
    learner = OnlineLearner(speculator, SMALL, background=False)
    engine = Engine(target, target.tokenizer, speculator, lookahead=2)
    for _ in range(2):
        engine.generate(real_prompt_ids, SamplingParams(max_tokens=6))
    stats = learner.stats()
    assert stats["sequences_seen"] == 2
    assert stats["steps"] == 2 * SMALL.steps_per_request
    # Every token the drafter saw but the last is a position with a target feature.
    assert 2 * len(real_prompt_ids) <= stats["examples_seen"] <= 2 * (len(real_prompt_ids) + 5)
    assert speculator.version == stats["version"] == 2


def test_background_learner_never_blocks_submit_and_drops_when_full(target, texts):
    speculator = NeuralSpeculator(target)
    config = TrainConfig(batch_size=16, steps_per_request=1, queue_size=1)
    learner = OnlineLearner(speculator, config, background=True)
    try:
        with learner._lock:  # training is busy: the queue fills, submit must not wait
            for s in texts[0][:5]:
                learner.submit(s)
            assert learner.dropped >= 3  # one in training at most, one queued
        assert learner.wait_idle(timeout=60)
        stats = learner.stats()
        assert stats["sequences_seen"] == 5 - learner.dropped
        assert stats["steps"] == stats["sequences_seen"] and stats["errors"] == 0
        assert speculator.version == stats["version"] > 0
    finally:
        learner.close()
    assert not learner._thread or not learner._thread.is_alive()


def test_training_publishes_new_snapshots_and_never_edits_a_served_one(target, texts):
    """Drafts read one snapshot per call; training must never write into it."""
    speculator = NeuralSpeculator(target)
    learner = OnlineLearner(speculator, TrainConfig(batch_size=16), background=False)
    for s in texts[0][:3]:
        learner.distiller.add(s)
    served = speculator.weights
    frozen = {k: v.clone() for k, v in served.head.state_dict().items()}
    learner.train_now(3)
    assert speculator.weights is not served and speculator.version == served.version + 1
    for key, value in served.head.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    changed = speculator.weights.head.state_dict()
    assert any(not torch.equal(changed[k], frozen[k]) for k in frozen)


def test_replay_buffer_stays_bounded_and_evicts_the_oldest():
    buffer = ReplayBuffer(max_tokens=100)

    def seq(first: int, n: int) -> FinishedSequence:
        return FinishedSequence(list(range(first, first + n + 1)), torch.zeros(n, 4))

    for i in range(10):
        buffer.add(seq(1000 * i, 30))
        assert buffer.tokens <= 100
    assert len(buffer) == 3
    assert buffer._sequences[0].tokens[0] == 7000  # the three newest
    buffer.add(seq(0, 250))  # bigger than the whole buffer: its most recent part stays
    assert buffer.tokens == 100 and len(buffer) == 1
    assert buffer._sequences[0].tokens[-1] == 250


def test_draft_vocabulary_follows_traffic_and_keeps_end_of_sequence():
    counts = torch.zeros(50, dtype=torch.long)
    counts[[40, 41, 42]] = torch.tensor([5, 9, 1])
    vocab = select_vocab(counts, torch.arange(10), size=6, always=frozenset({49}))
    assert vocab.tolist() == [49, 41, 40, 42, 0, 1]


# -- weights files -----------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_drafts(target, trained, live, tmp_path):
    speculator = trained[0]
    path = speculator.save(tmp_path / "head.safetensors")
    fresh = NeuralSpeculator(target, seed=1)
    request = _request("live", live, 5)
    assert fresh.propose([request])[0].tokens != speculator.propose([request])[0].tokens
    fresh.load(path)
    a, b = speculator.propose([request])[0], fresh.propose([request])[0]
    assert a.tokens == b.tokens and a.confidences == b.confidences
    assert fresh.version == speculator.version
    assert torch.equal(fresh.weights.vocab, speculator.weights.vocab)
    assert not list(tmp_path.glob(".*.tmp"))  # written via a temporary file, renamed


def _corrupt(kind: str, good: bytes, path) -> None:
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 10)
    else:
        tensors = load_file(path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["atlas"])
        if kind == "other target":
            meta["target"]["lm_head_sha256"] = "0" * 64
            meta["target"]["name"] = "some-other-model"
        elif kind == "wrong shape":
            tensors["head.down.weight"] = tensors["head.down.weight"][:, :-1].contiguous()
        elif kind == "not finite":
            tensors["head.fuse.weight"][0, 0] = float("nan")
        save_file(tensors, path, metadata={"atlas": json.dumps(meta)})


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "corrupt or truncated"),
        ("garbage", "corrupt or truncated"),
        ("other target", "made for target 'some-other-model'"),
        ("wrong shape", "down.weight has shape"),
        ("not finite", "non-finite"),
    ],
)
def test_bad_weights_file_is_refused_and_the_old_weights_stay(
    target, trained, live, tmp_path, kind, message
):
    speculator = trained[0]
    path = speculator.save(tmp_path / "head.safetensors")
    _corrupt(kind, path.read_bytes(), path)
    request = _request("live", live, 4)
    before, version = speculator.propose([request])[0], speculator.version
    with pytest.raises(WeightsError, match=message):
        speculator.load(path)
    after = speculator.propose([request])[0]
    assert speculator.version == version and after.tokens == before.tokens


def test_missing_weights_file_is_a_clear_error(trained, tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        trained[0].load(tmp_path / "absent.safetensors")


# -- per-sequence state --------------------------------------------------------------------


def test_release_frees_per_sequence_state(target, trained, real_prompt_ids):
    speculator = NeuralSpeculator(target)
    speculator.swap(trained[0].weights)
    engine = Engine(target, target.tokenizer, speculator, lookahead=3)
    engine.generate(real_prompt_ids, SamplingParams(max_tokens=6))
    for _ in engine.generate_stream(real_prompt_ids, SamplingParams(max_tokens=12)):
        break  # a consumer that walks away mid-stream
    assert speculator.live_sequences == 0
    assert target.live_sequences == 0


def test_needs_a_target_that_records_hidden_states(target):
    with pytest.raises(ValueError, match="record_hidden"):
        NeuralSpeculator(CausalLMRunner(target.model, target.tokenizer))


# -- modes -------------------------------------------------------------------------------


def test_neural_mode_records_hidden_states_is_lossless_and_hands_requests_to_its_learner(
    target, real_prompt_ids
):
    runner = CausalLMRunner(target.model, target.tokenizer)  # as bench and serve load it
    engine = build_engine("neural", runner)
    assert runner.record_hidden
    (learner,) = neural_learners(engine)
    try:
        assert learner.background
        params = SamplingParams(max_tokens=12)
        expected = Engine(runner, runner.tokenizer).generate(real_prompt_ids, params).token_ids
        assert engine.generate(real_prompt_ids, params).token_ids == expected
        assert learner.submitted == 1  # learned from in the background, between requests
    finally:
        learner.close()
    assert runner.live_sequences == 0


def test_replay_buffer_stays_within_its_byte_budget():
    # 64 fp32 features a position: 256 bytes, plus 8 for the token's list slot.
    def seq(first: int, n: int) -> FinishedSequence:
        return FinishedSequence(list(range(first, first + n + 1)), torch.zeros(n, 64))

    one = sequence_bytes(seq(0, 30))
    assert one == 30 * 64 * 4 + 31 * 8
    buffer = ReplayBuffer(max_tokens=10**6, max_bytes=3 * one + one // 2)
    for i in range(10):
        buffer.add(seq(1000 * i, 30))
        assert buffer.nbytes <= buffer.max_bytes
    assert len(buffer) == 3 and buffer._sequences[0].tokens[0] == 7000  # the newest
    buffer.add(seq(0, 1000))  # bigger than the whole budget: its most recent part stays
    assert len(buffer) == 1 and buffer.nbytes <= buffer.max_bytes
    assert buffer._sequences[0].tokens[-1] == 1000


def test_background_learner_bounds_its_queue_in_bytes(target, texts):
    speculator = NeuralSpeculator(target)
    sequences = texts[0][:6]
    budget = sequence_bytes(sequences[0]) + sequence_bytes(sequences[1])
    config = TrainConfig(batch_size=16, steps_per_request=1, queue_size=100, queue_bytes=budget)
    learner = OnlineLearner(speculator, config, background=True)
    try:
        with learner._lock:  # training is busy: submits pile up against the byte bound
            for s in sequences:
                learner.submit(s)
                assert learner.queued_bytes <= budget
            assert learner.dropped >= 3  # one in training at most, two fit the bytes
        assert learner.wait_idle(timeout=60)
        assert learner.queued_bytes == 0
        assert learner.stats()["sequences_seen"] == len(sequences) - learner.dropped
    finally:
        learner.close()

"""Batched and tree verification: ragged sequences in one forward, trees with a mask."""

from __future__ import annotations

import pytest
import torch

from atlas_sidecar.engine.backends.base import ForwardItem
from atlas_sidecar.engine.build import build_engine
from atlas_sidecar.engine.capabilities import SpeculatorCapabilities
from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.tree import DraftTree
from atlas_sidecar.tooling.workloads import encode

from .conftest import AGREEING_LAYERS

TOL = 1e-3  # float32: a batched forward rounds a little differently, never more


def _ids(target, texts):
    return [target.tokenizer.encode(t) for t in texts]


def test_ragged_batched_forward_matches_one_sequence_at_a_time(target):
    prompts = _ids(target, ["def fib(n):\n    return", "Hello there, how are", "fn main() {"])
    steps = [[5, 6, 7], [8], [9, 10]]
    try:
        single, batched = [], []
        for i, ids in enumerate(prompts):
            target.start(f"one-{i}")
            target.start(f"many-{i}")
            single.append(target.forward(f"one-{i}", ids))
        batched = target.forward_many([ForwardItem(f"many-{i}", p) for i, p in enumerate(prompts)])
        for a, b in zip(single, batched, strict=True):
            assert a.shape == b.shape
            assert (a - b).abs().max() < TOL
        single = [target.forward(f"one-{i}", s) for i, s in enumerate(steps)]
        batched = target.forward_many([ForwardItem(f"many-{i}", s) for i, s in enumerate(steps)])
        for i, (a, b) in enumerate(zip(single, batched, strict=True)):
            assert (a - b).abs().max() < TOL
            assert target.cached_len(f"one-{i}") == target.cached_len(f"many-{i}")
    finally:
        for i in range(3):
            target.release(f"one-{i}")
            target.release(f"many-{i}")


def test_tree_forward_sees_only_ancestors_and_keep_leaves_the_accepted_path(target):
    ids = _ids(target, ["def add(a, b):\n    return"])[0]
    for name in ("tree", "chain"):
        target.start(name)
        target.forward(name, ids)
    try:
        prefix = target.cached_len("tree")
        # Root 11 with children 12 and 13; 14 under 13. The path 11 -> 13 -> 14 must
        # give exactly what the chain [11, 13, 14] gives: 12 is invisible to it.
        tree = target.forward_many([ForwardItem("tree", [11, 12, 13, 14], [-1, 0, 0, 2])])[0]
        chain = target.forward("chain", [11, 13, 14])
        assert (tree[[0, 2, 3]] - chain).abs().max() < TOL
        target.keep("tree", prefix, [0, 2, 3])
        assert target.cached_len("tree") == target.cached_len("chain")
        after_tree = target.forward("tree", [15])
        after_chain = target.forward("chain", [15])
        assert (after_tree - after_chain).abs().max() < TOL
    finally:
        target.release("tree")
        target.release("chain")


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([ForwardItem("bad", [])], "at least one token"),
        ([ForwardItem("bad", [1]), ForwardItem("bad", [2])], "once per forward"),
        ([ForwardItem("bad", [1, 2], [1, -1])], "must precede"),
        ([ForwardItem("bad", [1, 2], [-1])], "parents"),
    ],
)
def test_malformed_forward_items_are_refused(target, items, message):
    target.start("bad")
    target.forward("bad", [1, 2, 3])
    try:
        with pytest.raises(ValueError, match=message):
            target.forward_many(items)
    finally:
        target.release("bad")


class TreeDrafter:
    """Drafts a two-branch tree whose SECOND branch is the target's real continuation."""

    name = "tree"
    capabilities = SpeculatorCapabilities(drafts_trees=True)

    def observe_context(self, seq_id, context):
        pass

    def rollback(self, seq_id, context):
        pass

    def __init__(
        self,
        continuation: dict[tuple[int, ...], list[int]],
        default: list[int] | None = None,
        honours_trees: bool = True,
    ) -> None:
        self.continuation = continuation
        self.default = default or []
        self.honours_trees = honours_trees  # False: a buggy drafter, trees regardless

    def propose(self, requests):
        drafts = []
        for r in requests:
            right = self.continuation.get(tuple(r.context), self.default)[:2]
            if len(right) < 2 or r.lookahead < 4:
                drafts.append(DraftTree.empty())
                continue
            wrong = [(right[0] + 1) % 1000, right[1]]
            tree = DraftTree(tokens=[*wrong, *right], confidences=[0.5] * 4,
                             parents=[-1, 0, -1, 2])  # fmt: skip
            drafts.append(tree if r.trees or not self.honours_trees else tree.main_chain())
        return drafts

    def release(self, seq_id):
        pass


def test_engine_accepts_the_branch_the_target_agrees_with(target, real_prompts):
    ids = encode(target.tokenizer, real_prompts[0])
    params = SamplingParams(max_tokens=24)
    expected = Engine(target, target.tokenizer).generate(ids, params).token_ids
    # The drafter knows the target's continuation after every prefix of the output.
    full = ids + expected
    continuation = {tuple(full[:n]): full[n:] for n in range(len(ids), len(full))}
    engine = Engine(target, target.tokenizer, TreeDrafter(continuation), lookahead=4)
    result = engine.generate(ids, params)
    assert result.token_ids == expected
    # Every full tree was verified down its second branch: 2 of its 4 tokens accepted.
    trees = [s for s in result.steps if s.drafted == 4]
    assert len(trees) >= 5
    assert all(s.accepted == 2 for s in trees)
    assert target.live_sequences == 0


def test_sampling_asks_for_chains_and_a_tree_drafted_anyway_is_dropped(target, real_prompts):
    ids = encode(target.tokenizer, real_prompts[0])
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=1)
    engine = Engine(target, target.tokenizer, TreeDrafter({}, default=[1, 2]), lookahead=4)
    result = engine.generate(ids, params)
    assert result.steps[0].drafted == 2  # the drafter's main chain, as asked
    assert len(result.token_ids) == 8
    buggy = TreeDrafter({}, default=[1, 2], honours_trees=False)
    result = Engine(target, target.tokenizer, buggy, lookahead=4).generate(ids, params)
    assert result.steps[0].drafted == 0  # the contract broken: nothing verified
    assert len(result.token_ids) == 8


@pytest.mark.parametrize("mode", ["none", "static", "suffix", "atlas"])
def test_batched_steps_give_each_sequence_its_own_greedy_output(
    target, layer_skip, real_prompts, mode
):
    prompts = real_prompts[:3] + real_prompts[-3:]
    params = [SamplingParams(max_tokens=n) for n in (12, 20, 16, 24, 8, 20)]
    plain = Engine(target, target.tokenizer)
    expected = [
        plain.generate(encode(target.tokenizer, p), sp).token_ids
        for p, sp in zip(prompts, params, strict=True)
    ]
    engine = build_engine(mode, target, layer_skip(AGREEING_LAYERS))
    seqs = [
        engine.start(encode(target.tokenizer, p), sp) for p, sp in zip(prompts, params, strict=True)
    ]
    try:
        while live := [s for s in seqs if not s.finished]:
            engine.step_many(live)
        for seq, want in zip(seqs, expected, strict=True):
            assert seq.output == want, (mode, seq.seq_id)
    finally:
        for seq in seqs:
            engine.release(seq)
    assert target.live_sequences == 0


def test_step_many_refuses_duplicates_and_finished_sequences(target):
    engine = Engine(target, target.tokenizer)
    seq = engine.start([1, 2, 3], SamplingParams(max_tokens=1))
    try:
        with pytest.raises(ValueError, match="distinct unfinished"):
            engine.step_many([seq])
    finally:
        engine.release(seq)
    assert torch.is_grad_enabled()  # inference mode did not leak out of the backend

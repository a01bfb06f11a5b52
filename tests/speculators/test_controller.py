"""The controller: goodput arithmetic, calibration, backing off, and exactness on a model."""

from __future__ import annotations

import time

import pytest

from atlas_sidecar.engine.capabilities import NEURAL, STATIC, SUFFIX
from atlas_sidecar.engine.controller import (
    DECAY,
    AcceptanceStats,
    Controller,
    CostModel,
    expected_tokens,
)
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.base import DraftRequest
from atlas_sidecar.engine.tree import DraftTree, reach


class ScriptedDrafter:
    """Proposes a fixed draft with fixed confidences (free, like the suffix index)."""

    name = "suffix"
    capabilities = SUFFIX

    def __init__(
        self, tokens: list[int], confidences: list[float], parents: list[int] | None = None
    ) -> None:
        self.draft = DraftTree(tokens, confidences, bucket="suffix", parents=parents)

    def propose(self, requests):
        return [self.draft.subset(list(range(min(r.lookahead, len(self.draft.tokens)))))
                for r in requests]  # fmt: skip

    def observe_context(self, seq_id, context):
        pass

    def rollback(self, seq_id, context):
        pass

    def release(self, seq_id):
        pass


def costs(per_token: float) -> CostModel:
    model = CostModel()
    for n in (1, 2, 4, 8, 16, 17):
        model.observe_verify(n, 0.1 + per_token * (n - 1))
    return model


def request(lookahead: int = 16, context: list[int] | None = None) -> DraftRequest:
    return DraftRequest("s", context or [1, 2, 3], lookahead, SamplingParams())


def test_expected_tokens_sums_prefix_acceptance():
    assert expected_tokens([]) == [1.0]
    assert expected_tokens([0.5, 0.5]) == [1.0, 1.5, 1.75]


def test_verify_cost_interpolates_and_extrapolates():
    model = costs(0.01)
    assert model.verify(3) == pytest.approx(0.12)
    assert model.verify(33) == pytest.approx(0.42)


def test_a_slow_sample_of_a_small_size_does_not_make_bigger_ones_look_cheaper():
    model = CostModel()
    for size, seconds in ((1, 0.2), (2, 0.1), (4, 0.12), (8, 0.2)):
        model.observe_verify(size, seconds)
    assert model.verify(1) == pytest.approx(0.1)  # never more than feeding 2 tokens
    assert model.verify(3) == pytest.approx(0.11)
    assert model.verify(6) == pytest.approx(0.16)


def test_a_batch_is_costed_from_its_own_measured_steps():
    model = costs(0.01)  # one sequence: 0.1 s + 0.01 s per extra token
    assert model.verify(16, rows=8) == pytest.approx(model.verify(16))  # nothing batched yet
    model.observe_verify(8, 0.3, rows=8)  # 8 rows of 1 token
    model.observe_verify(32, 0.5, rows=8)  # 8 rows of 4 tokens
    assert model.verify(8) == pytest.approx(0.17)  # one sequence is unchanged
    assert model.verify(16, rows=8) == pytest.approx(0.3 + 0.2 / 3)  # between measured widths
    # Beyond them: the one-sequence curve's shape from the nearest measured size.
    assert model.verify(48, rows=8) == pytest.approx(0.5 + 0.16)
    # A row count never run: the batch extra of the nearest one at the same width,
    # scaled by rows (8 rows of 4 tokens cost 0.5 - 0.41 more than 32 tokens of one).
    assert model.verify(16, rows=4) == pytest.approx(0.25 + 0.09 * 3 / 7)


def test_a_batchs_fixed_extra_cost_makes_a_wider_draft_relatively_cheaper():
    def plans(model: CostModel) -> set[str]:
        controller = Controller([ScriptedDrafter([7] * 8, [0.3] * 8)], 16, model)
        batch = [DraftRequest(f"s{i}", [1, 2, 3], 16, SamplingParams()) for i in range(8)]
        return {name for name, _ in controller.draft_many(batch)}

    # One sequence of 16 tokens costs 1.47x one of 8: a 0.35-likely token does not pay.
    assert plans(costs(0.01)) == {"none"}
    # Eight rows cost 0.2 s more than one row of as many tokens, whatever their width:
    # 16 tokens over 8 rows now cost 1.22x 8 tokens, and the same draft pays.
    batched = costs(0.01)
    batched.observe_verify(8, 0.37, rows=8)
    assert plans(batched) == {"suffix"}


def test_confident_draft_is_taken_in_full_when_verification_is_cheap():
    controller = Controller([ScriptedDrafter([7] * 8, [0.95] * 8)], 16, costs(0.001))
    name, draft = controller.draft(request())
    assert name == "suffix"
    assert len(draft.tokens) == 8


def test_controller_backs_off_when_verification_is_expensive():
    # Each extra verified token costs as much as a whole step: speculation cannot win.
    controller = Controller([ScriptedDrafter([7] * 8, [0.55] * 8)], 16, costs(0.1))
    name, draft = controller.draft(request())
    assert name == "none"
    assert draft.tokens == []


def test_lookahead_is_cut_where_confidence_drops():
    drafter = ScriptedDrafter([7] * 8, [0.95, 0.95, 0.95, 0.05, 0.05, 0.05, 0.05, 0.05])
    controller = Controller([drafter], 16, costs(0.01))
    _, draft = controller.draft(request())
    assert len(draft.tokens) == 3


def test_calibration_learns_that_a_bucket_is_overconfident():
    stats = AcceptanceStats()
    before = stats.prob("suffix:1", 0.95)
    for _ in range(50):
        stats.observe("suffix:1", accepted=[], rejected=[0.95])
    assert before > 0.9
    assert stats.prob("suffix:1", 0.95) < 0.2
    assert stats.prob("suffix:4", 0.95) > 0.9  # other buckets keep their own evidence


def test_rejected_drafts_turn_the_controller_off():
    # Each step scores the last draft's first token, rejected: the bucket's calibrated
    # odds fall from 0.75 until a draft no longer pays for its verify tokens.
    drafter = ScriptedDrafter([7] * 8, [0.75] * 8)
    controller = Controller([drafter], 16, costs(0.01))
    context = [1, 2, 3]
    assert controller.draft(request(context=context))[0] == "suffix"
    for _ in range(40):
        context = context + [99]  # the target never produces the drafted 7
        if controller.draft(request(context=context))[0] == "none":
            break
    assert controller.draft(request(context=context + [99]))[0] == "none"


def test_path_probability_multiplies_down_the_tree():
    assert reach([0.5, 0.5, 0.2], [-1, 0, -1]) == [0.5, 0.25, 0.2]


def test_tree_cut_keeps_the_likeliest_nodes_and_their_ancestors():
    # Root branches: 0 (0.9) -> 1 (0.9) -> 2 (0.9); 3 (0.3) a weak sibling of 0;
    # 4 (0.1) under 3. The weak branch goes first, every kept node keeps its parent.
    drafter = ScriptedDrafter([5, 6, 7, 8, 9], [0.95, 0.95, 0.95, 0.35, 0.15],
                              parents=[-1, 0, 1, -1, 3])  # fmt: skip
    controller = Controller([drafter], 16, costs(0.01))
    _, draft = controller.draft(request())
    assert draft.tokens[:3] == [5, 6, 7]
    assert 9 not in draft.tokens
    parents = draft.chain_parents()
    assert all(p < i for i, p in enumerate(parents))


def test_big_batches_back_off_to_no_speculation():
    # Verification cost linear in the tokens of the whole batch (compute-bound): at one
    # sequence a confident draft pays; at 32 sequences each extra token costs too much.
    model = CostModel()
    for n in (1, 8, 16, 32, 64, 128, 256, 512):
        model.observe_verify(n, 0.1 + 0.01 * n)
    controller = Controller([ScriptedDrafter([7] * 8, [0.7] * 8)], 16, model)
    assert controller.draft(request(), batch_size=1)[0] == "suffix"
    assert controller.draft(request(), batch_size=32)[0] == "none"


def test_acceptance_learns_from_the_accepted_path_and_its_rejected_children():
    drafter = ScriptedDrafter([5, 6, 7], [0.95, 0.95, 0.95], parents=[-1, -1, 0])
    controller = Controller([drafter], 16, costs(0.01))
    controller.draft(request())
    # The target then produced 5, 8: node 0 accepted; node 1 lost to it at the root,
    # node 2 lost to 8 under it.
    controller.draft(request(context=[1, 2, 3, 5, 8]))
    assert controller.acceptance.snapshot()["suffix/9"] == pytest.approx(1 / 3, abs=0.01)


def test_a_free_drafter_learns_from_nodes_the_plan_cut():
    # Verification is expensive enough that the plan keeps only part of the draft; what
    # the target then produced still scores every node of the whole draft.
    drafter = ScriptedDrafter([7] * 8, [0.65] * 8)
    controller = Controller([drafter], 16, costs(0.02))
    _, draft = controller.draft(request())
    assert 0 < len(draft.tokens) < 8
    controller.draft(request(context=[1, 2, 3] + [7] * 9))
    cell = controller.acceptance._cells[("suffix", 6)]
    assert cell.accepted == pytest.approx(sum(DECAY**k for k in range(8)))  # 8, faded
    assert cell.rejected == 0.0


def test_a_shadow_is_scored_only_as_far_as_the_target_has_gone():
    drafter = ScriptedDrafter([7, 7, 7], [0.95] * 3)
    controller = Controller([drafter], 16, costs(0.001))
    controller.draft(request())
    controller.draft(request(context=[1, 2, 3, 7]))  # one token known: one node decided
    cell = controller.acceptance._cells[("suffix", 9)]
    assert (cell.accepted, cell.rejected) == (1.0, 0.0)
    controller.release("s")
    assert controller.sequences == {}


class SleepyModel:
    """A backend whose every forward takes at least 5 ms."""

    def __init__(self) -> None:
        self.live: set[str] = set()

    def start(self, seq_id):
        self.live.add(seq_id)

    def forward(self, seq_id, tokens):
        time.sleep(0.005)

    def forward_many(self, items):
        assert all(item.seq_id in self.live for item in items)
        time.sleep(0.001 * sum(len(item.tokens) for item in items))

    def truncate(self, seq_id, length):
        pass

    def release(self, seq_id):
        self.live.discard(seq_id)


def test_a_draft_models_cost_is_known_before_its_first_draft():
    model, costs = SleepyModel(), CostModel()
    assert costs.draft_per_token("static") == 0.0  # unknown: it would look free
    costs.profile_drafter("static", model)
    assert costs.draft_per_token("static") >= 0.005
    assert model.live == set()  # the profiling sequence is released


def test_batched_costs_are_profiled_before_the_first_batch():
    model, costs = SleepyModel(), CostModel()
    costs.profile_batched(model, rows=(4, 8), widths=(1, 4))
    assert sorted(costs.batched) == [4, 8]
    assert costs.batched[8].sizes == [8, 32] and costs.batched[4].sizes == [4, 16]
    # Measured, not guessed: 32 tokens at 1 ms each take at least 32 ms.
    assert costs.verify(32, rows=8) >= 0.032 and costs.verify(16, rows=4) >= 0.016
    assert model.live == set()  # every profiling sequence is released


class PerSequenceDrafter:
    """A free drafter with a fixed draft per sequence."""

    name = "suffix"
    capabilities = SUFFIX

    def __init__(self, drafts: dict[str, DraftTree]) -> None:
        self.drafts = drafts

    def propose(self, requests):
        return [self.drafts[r.seq_id] for r in requests]

    def observe_context(self, seq_id, context):
        pass

    def rollback(self, seq_id, context):
        pass

    def release(self, seq_id):
        pass


@pytest.mark.parametrize("per_token, cut", [(0.02, True), (0.0001, False)])
def test_a_batch_shares_one_width_because_its_rows_are_padded(per_token, cut):
    # Sequence a has a long confident draft, b one good token. Alone, a would verify
    # all 8; in a batch every row is padded to a's width, so when tokens cost compute
    # (per_token 0.02) the batch is better off with a shorter a. When verifying more
    # tokens is nearly free (a GPU), a keeps its whole draft.
    drafter = PerSequenceDrafter({
        "a": DraftTree([7] * 8, [0.95] * 8, bucket="suffix"),
        "b": DraftTree([7] * 8, [0.95] + [0.05] * 7, bucket="suffix"),
    })  # fmt: skip
    model = CostModel()
    for n in (1, 2, 4, 8, 16, 32):
        model.observe_verify(n, 0.1 + per_token * n)
    controller = Controller([drafter], 16, model)
    alone = controller._best_cut("suffix", [0.95] * 8, list(range(-1, 7)), 16, 2)
    assert alone.lookahead == 8
    requests = [DraftRequest(s, [1, 2, 3], 16, SamplingParams()) for s in ("a", "b")]
    (_, a), (_, b) = controller.draft_many(requests)
    assert b.tokens[:1] == [7]
    if cut:
        assert 1 <= len(a.tokens) < 8
    else:
        assert len(a.tokens) == 8


class ScriptedModelDrafter:
    """A draft model (pays per token) whose confidences follow a script; it stops where
    the controller's early exit says so, and records how far it went."""

    name = "static"
    capabilities = STATIC

    def __init__(self, confidences: list[float]) -> None:
        self.confidences = confidences
        self.lengths: list[int] = []

    def propose(self, requests):
        drafts = []
        for r in requests:
            draft = DraftTree([], [])
            for confidence in self.confidences[: r.lookahead]:
                draft.tokens.append(7)
                draft.confidences.append(confidence)
                if r.stop is not None and not r.stop.keep_going(draft.confidences):
                    break
            self.lengths.append(len(draft.tokens))
            drafts.append(draft)
        return drafts

    def observe_context(self, seq_id, context):
        pass

    def rollback(self, seq_id, context):
        pass

    def release(self, seq_id):
        pass


def test_a_model_draft_runs_on_while_its_run_says_the_next_token_will_be_taken():
    # Earlier traffic: a run of confident tokens was taken whole, low-confidence first
    # tokens were not. Pooled over them the drafter's rate is middling, so a plan made
    # before drafting is short; once a draft is under way on confident tokens, what
    # followed such tokens before says the next is likely taken: the draft runs past
    # the plan, and stops once its confidence drops.
    drafter = ScriptedModelDrafter([0.99] * 12 + [0.2] * 4)
    controller = Controller([drafter], 16, costs(0.004))
    controller.costs.observe_draft("static", 1, 0.01)
    for _ in range(10):
        controller.observe("t", "static", DraftTree([7] * 13, [0.99] * 12 + [0.2]), list(range(12)))
        for _ in range(12):
            controller.observe("t", "static", DraftTree([7], [0.2]), [])
    controller.release("t")
    planned = controller._best_cut(
        "static", [controller.acceptance.rate("static")] * 16, list(range(-1, 15)), 16, 1
    )
    assert planned.lookahead < 8
    name, draft = controller.draft(request())
    assert name == "static"
    assert 12 <= len(draft.tokens) <= 13


def test_a_model_draft_runs_on_while_its_tokens_stay_confident():
    # Earlier traffic: a confident first token was taken and an unsure one after it was
    # not, every time. So tokens after a confident one were mostly rejected, and the
    # drafter's pooled rate is middling; yet each token's own confidence told which. A
    # run of confident tokens is costed at the last one's odds: it drafts on until an
    # unsure token, which stops it.
    drafter = ScriptedModelDrafter([0.99] * 10 + [0.2] * 6)
    controller = Controller([drafter], 16, costs(0.004))
    controller.costs.observe_draft("static", 1, 0.01)
    for _ in range(20):
        controller.observe("t", "static", DraftTree([7, 7], [0.99, 0.2]), [0])
    controller.release("t")
    name, draft = controller.draft(request())
    assert name == "static"
    assert len(draft.tokens) == 11


class ScriptedNeural(ScriptedModelDrafter):
    name = "neural"


def test_a_model_drafter_is_chosen_by_what_its_steps_gained_not_by_its_pooled_rate():
    # The draft model's steps either run long and are taken (9 of 10 tokens) or stop
    # after a few unsure tokens that miss: its pooled token rate is middling, but a step
    # gains 5.5 tokens on average. The cheap neural head's tokens are taken about as
    # often, but its drafts stay short: 2 tokens a step. Valued as flat chains at their
    # pooled rates the cheap head wins; by what their steps gained per second (the step
    # costs included), the draft model does.
    static, neural = ScriptedModelDrafter([0.99] * 16), ScriptedNeural([0.8] * 16)
    model = costs(0.004)
    model.observe_draft("static", 1, 0.02)
    model.observe_draft("neural", 1, 0.004)
    controller = Controller([static, neural], 16, model)
    for _ in range(10):
        controller.observe("t", "static", DraftTree([7] * 10, [0.99] * 9 + [0.2]), list(range(9)))
        controller.observe("t", "static", DraftTree([7] * 3, [0.3, 0.2, 0.2]), [])
        controller.observe("t", "neural", DraftTree([7] * 2, [0.8, 0.6]), [0])
    controller.release("t")
    assert controller.acceptance.rate("static") < 0.8
    name, _ = controller.draft(request())
    assert name == "static"
    # A request where the draft model's steps gain little turns to the neural head.
    for _ in range(3):
        controller.observe("s", "static", DraftTree([7] * 4, [0.99] * 4), [])
    name, _ = controller.draft(request())
    assert name == "neural"


@pytest.mark.parametrize(("step_s", "drafted"), [(0.03, 16), (0.2, 7)])
def test_a_model_draft_runs_past_a_step_in_the_verify_cost_when_the_tokens_beyond_pay(
    step_s, drafted
):
    # Verifying 1-8 tokens costs the same, 9-17 a step more. At 7 drafted tokens one
    # more costs the whole step: alone it loses, but the eight after it ride along
    # almost free, so a confident draft runs on to the cap; where the step costs more
    # than all of them gain, it stops at 7.
    drafter = ScriptedModelDrafter([0.95] * 16)
    model = CostModel()
    for n in range(1, 18):
        model.observe_verify(n, 0.1 if n <= 8 else 0.1 + step_s)
    model.observe_draft("static", 1, 0.005)
    controller = Controller([drafter], 16, model)
    name, draft = controller.draft(request())
    assert name == "static"
    assert len(draft.tokens) == drafted


class RunnerUpDrafter(ScriptedModelDrafter):
    """A draft model that also reports its second choice at each position."""

    def propose(self, requests):
        drafts = super().propose(requests)
        for draft in drafts:
            draft.runners_up = [(8, 1.0 - c) for c in draft.confidences]
        return drafts


def test_a_draft_models_unsure_runner_up_is_verified_beside_its_favourite():
    drafter = RunnerUpDrafter([0.99, 0.99, 0.55, 0.99])
    model = costs(0.002)
    model.observe_draft("static", 1, 0.005)
    controller = Controller([drafter], 4, model)  # chains of 4 at most
    name, draft = controller.draft(request(lookahead=8))
    assert name == "static"
    # The chain as drafted, then the one runner-up likely enough to pay for its place:
    # 8 beside the unsure third token (a child of the second), the favourites first.
    assert draft.tokens == [7, 7, 7, 7, 8]
    assert draft.parents == [-1, 0, 1, 2, 1]
    assert draft.main_chain().tokens == [7, 7, 7, 7]
    # The request bounds the nodes, runners-up included.
    assert controller.draft(request(lookahead=4))[1].tokens == [7, 7, 7, 7]
    # Where the request asks for chains (sampling; a target without tree verification),
    # the chain alone.
    chains = DraftRequest("t", [1, 2, 3], 8, SamplingParams(temperature=0.8), trees=False)
    assert not controller.draft(chains)[1].is_tree


def test_runners_up_become_siblings_after_the_whole_chain():
    draft = DraftTree([5, 6, 7], [0.9, 0.6, 0.8], runners_up=[(1, 0.05), (2, 0.3), (3, 0.0)])
    tree = draft.with_runners_up()
    assert tree.tokens == [5, 6, 7, 1, 2]  # a runner-up the drafter could not pick is left out
    assert tree.parents == [-1, 0, 1, -1, 0]
    assert tree.main_chain().tokens == [5, 6, 7]


def test_learning_drafters_see_every_steps_context_also_on_steps_they_do_not_draft():
    class Learner(ScriptedModelDrafter):
        name = "neural"
        capabilities = NEURAL

        def __init__(self):
            super().__init__([0.01] * 16)
            self.seen = []

        def observe_context(self, seq_id, context):
            self.seen.append((seq_id, list(context)))

    learner = Learner()
    model = costs(0.001)
    model.observe_draft("neural", 1, 1.0)  # a second a token: never worth it
    controller = Controller([ScriptedDrafter([7] * 8, [0.99] * 8), learner], 16, model)
    for step in range(3):
        name, _ = controller.draft(DraftRequest("s", [1, 2, 3 + step], 16, SamplingParams()))
        assert name == "suffix"
    assert learner.seen == [("s", [1, 2, 3]), ("s", [1, 2, 4]), ("s", [1, 2, 5])]

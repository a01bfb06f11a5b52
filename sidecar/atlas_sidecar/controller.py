"""Which speculator drafts, and how far ahead: chosen per step to maximise goodput.

Goodput of a plan = expected tokens gained / expected seconds, where
- expected tokens = 1 + sum_j P(first j draft tokens all accepted): the target always
  adds one token of its own;
- P comes from the drafters' own per-token confidences, calibrated online into
  acceptance probabilities per speculator and evidence bucket (``AcceptanceStats``),
  and nudged by the request's own recent acceptance;
- seconds = measured draft cost + measured verify cost for that many tokens
  (``CostModel``: profiled at start-up, then learned from every step).

Speculating is only one of the options: when no plan beats one plain target step per
second, the controller drafts nothing. Nothing here is a user knob: the constants are
priors that the measurements quickly outweigh.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from atlas_sidecar.backends.base import TargetBackend
from atlas_sidecar.speculators.base import Draft, Drafter, DraftRequest

EWMA = 0.2  # weight of a new cost sample
DECAY = 0.997  # per observation: old acceptance evidence fades, so drift is followed
PRIOR_STRENGTH = 4.0  # pseudo-observations behind a confidence before any evidence
CONFIDENCE_BINS = 10
SEQUENCE_WEIGHT = 0.5  # how much a request's own history moves the global estimate


class CostModel:
    """Seconds per target forward by tokens fed, and per drafted token by speculator."""

    def __init__(self) -> None:
        self._verify: dict[int, float] = {}
        self._draft_per_token: dict[str, float] = {}

    def profile(self, target: TargetBackend, sizes: tuple[int, ...] = (1, 2, 4, 8, 16)) -> None:
        """Measure the target's forward cost at a few sizes (a short prefix in cache)."""
        seq_id = "__cost_profile__"
        target.start(seq_id)
        try:
            target.forward(seq_id, [0] * 16)  # warm-up and a realistic cache
            for size in sizes:
                for _ in range(2):
                    target.truncate(seq_id, 16)
                    started = time.perf_counter()
                    target.forward(seq_id, [0] * size)
                    self.observe_verify(size, time.perf_counter() - started)
        finally:
            target.release(seq_id)

    def observe_verify(self, tokens_fed: int, seconds: float) -> None:
        old = self._verify.get(tokens_fed)
        self._verify[tokens_fed] = seconds if old is None else old + EWMA * (seconds - old)

    def observe_draft(self, speculator: str, tokens: int, seconds: float) -> None:
        if tokens <= 0:
            return
        per_token = seconds / tokens
        old = self._draft_per_token.get(speculator)
        self._draft_per_token[speculator] = (
            per_token if old is None else old + EWMA * (per_token - old)
        )

    def verify(self, tokens_fed: int) -> float:
        """Interpolated from measured sizes; linear beyond them."""
        if tokens_fed in self._verify:
            return self._verify[tokens_fed]
        if not self._verify:
            return 1.0  # no measurement yet: every plan is costed the same
        sizes = sorted(self._verify)
        i = bisect.bisect_left(sizes, tokens_fed)
        if i == 0:
            return self._verify[sizes[0]]
        if i == len(sizes):
            if len(sizes) == 1:
                return self._verify[sizes[-1]]
            lo, hi = sizes[-2], sizes[-1]
        else:
            lo, hi = sizes[i - 1], sizes[i]
        slope = (self._verify[hi] - self._verify[lo]) / (hi - lo)
        return max(self._verify[lo] + slope * (tokens_fed - lo), 1e-6)

    def draft_per_token(self, speculator: str) -> float:
        return self._draft_per_token.get(speculator, 0.0)

    def snapshot(self) -> dict[str, object]:
        return {
            "verify_s": {k: round(v, 5) for k, v in sorted(self._verify.items())},
            "draft_s_per_token": {k: round(v, 6) for k, v in self._draft_per_token.items()},
        }


def _bin(confidence: float) -> int:
    return min(int(confidence * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)


@dataclass
class _Beta:
    accepted: float = 0.0
    rejected: float = 0.0


class AcceptanceStats:
    """P(draft token accepted | speculator bucket, confidence bin), learned online."""

    def __init__(self) -> None:
        self._cells: dict[tuple[str, int], _Beta] = {}

    def prob(self, bucket: str, confidence: float) -> float:
        cell = self._cells.get((bucket, _bin(confidence)))
        prior = (_bin(confidence) + 0.5) / CONFIDENCE_BINS
        if cell is None:
            return prior
        n = cell.accepted + cell.rejected
        return (cell.accepted + PRIOR_STRENGTH * prior) / (n + PRIOR_STRENGTH)

    def rate(self, bucket: str, prior: float = 0.75) -> float:
        """P(accepted) for the bucket's tokens at any confidence: for planning before a draft."""
        accepted = sum(c.accepted for (b, _), c in self._cells.items() if b == bucket)
        rejected = sum(c.rejected for (b, _), c in self._cells.items() if b == bucket)
        return (accepted + PRIOR_STRENGTH * prior) / (accepted + rejected + PRIOR_STRENGTH)

    def observe(self, bucket: str, confidences: list[float], accepted: int) -> None:
        """Tokens up to the first rejection are evidence; the ones after it are unseen."""
        for i, confidence in enumerate(confidences[: accepted + 1]):
            cell = self._cells.setdefault((bucket, _bin(confidence)), _Beta())
            cell.accepted *= DECAY
            cell.rejected *= DECAY
            if i < accepted:
                cell.accepted += 1.0
            else:
                cell.rejected += 1.0

    def snapshot(self) -> dict[str, float]:
        return {
            f"{bucket}/{b}": round(c.accepted / max(c.accepted + c.rejected, 1e-9), 3)
            for (bucket, b), c in sorted(self._cells.items())
        }


@dataclass
class _SequenceMemory:
    """A request's own acceptance so far, per speculator: its domain, learned live."""

    accepted: dict[str, float] = field(default_factory=dict)
    drafted: dict[str, float] = field(default_factory=dict)

    def ratio(self, name: str) -> float | None:
        drafted = self.drafted.get(name, 0.0)
        return self.accepted.get(name, 0.0) / drafted if drafted >= 1 else None


@dataclass
class Plan:
    speculator: str  # "none" or a speculator's name
    lookahead: int
    expected_tokens: float
    expected_s: float

    @property
    def goodput(self) -> float:
        return self.expected_tokens / self.expected_s if self.expected_s > 0 else 0.0


def expected_tokens(accept_probs: list[float]) -> list[float]:
    """E[tokens gained] for each lookahead 0..len: 1 + sum of prefix-acceptance products."""
    out, alive, total = [1.0], 1.0, 1.0
    for p in accept_probs:
        alive *= p
        total += alive
        out.append(total)
    return out


class Controller:
    """Plans each step for each sequence; learns from what the target accepted."""

    def __init__(
        self,
        speculators: list[Drafter],
        max_lookahead: int,
        costs: CostModel | None = None,
        free_drafters: tuple[str, ...] = ("suffix",),
    ) -> None:
        self.speculators = {s.name: s for s in speculators}
        self.max_lookahead = max_lookahead
        self.costs = costs or CostModel()
        self.acceptance = AcceptanceStats()
        # Drafters cheap enough to always ask for a full-length draft, then cut it.
        self.free_drafters = free_drafters
        self._memory: dict[str, _SequenceMemory] = {}
        self.choices: dict[str, int] = {}

    @property
    def name(self) -> str:
        return "atlas"

    def _accept_prob(
        self, seq_id: str, name: str, bucket: str, confidence: float | None
    ) -> float:
        """Calibrated P(accept) for a token; ``confidence=None``: before drafting it."""
        if confidence is None:
            p = self.acceptance.rate(bucket)
        else:
            p = self.acceptance.prob(bucket, confidence)
        own = self._memory.get(seq_id, _SequenceMemory()).ratio(name)
        return p if own is None else (1 - SEQUENCE_WEIGHT) * p + SEQUENCE_WEIGHT * own

    def _best_cut(self, name: str, probs: list[float], cap: int) -> Plan:
        draft_s = self.costs.draft_per_token(name)
        gains = expected_tokens(probs[:cap])
        plans = [
            Plan(name, k, gains[k], self.costs.verify(k + 1) + draft_s * k)
            for k in range(len(gains))
        ]
        return max(plans, key=lambda p: p.goodput)

    def draft(self, request: DraftRequest) -> tuple[str, Draft]:
        """Choose a speculator and lookahead for one sequence; return (name, its draft)."""
        cap = min(request.lookahead, self.max_lookahead)
        baseline = Plan("none", 0, 1.0, self.costs.verify(1))
        best, best_draft = baseline, Draft.empty()
        if cap <= 0:
            return self._chose(best), best_draft
        for name, speculator in self.speculators.items():
            if name in self.free_drafters:
                draft = speculator.propose([_with_lookahead(request, cap)])[0]
                probs = [
                    self._accept_prob(request.seq_id, name, draft.bucket or name, c)
                    for c in draft.confidences
                ]
                plan = self._best_cut(name, probs, cap)
                draft = _cut(draft, plan.lookahead)
            else:
                # A model drafter pays per token: plan from its typical acceptance first.
                typical = self._accept_prob(request.seq_id, name, name, None)
                plan = self._best_cut(name, [typical] * cap, cap)
                draft = Draft.empty()
            if plan.goodput > best.goodput and plan.lookahead > 0:
                best, best_draft = plan, draft
        if best.speculator != "none" and best.speculator not in self.free_drafters:
            best_draft = self._draft_with_early_exit(request, best)
        return self._chose(best), best_draft

    def _draft_with_early_exit(self, request: DraftRequest, plan: Plan) -> Draft:
        """Run a model drafter, stopping once another token no longer pays for itself."""
        name = plan.speculator

        def keep_going(confidences: list[float]) -> bool:
            probs = [self._accept_prob(request.seq_id, name, name, c) for c in confidences]
            typical = self._accept_prob(request.seq_id, name, name, None)
            now = self._best_cut(name, probs, len(probs))
            ahead = self._best_cut(name, probs + [typical], len(probs) + 1)
            return ahead.lookahead == len(probs) + 1 and ahead.goodput >= now.goodput

        planned = _with_lookahead(request, plan.lookahead)
        planned.keep_going = keep_going
        draft = self.speculators[name].propose([planned])[0]
        draft.bucket = draft.bucket or name
        return draft

    def _chose(self, plan: Plan) -> str:
        key = f"{plan.speculator}:{plan.lookahead}"
        self.choices[key] = self.choices.get(key, 0) + 1
        return plan.speculator

    def observe(
        self, seq_id: str, name: str, draft: Draft, accepted: int, draft_s: float,
        verify_s: float,
    ) -> None:  # fmt: skip
        self.costs.observe_verify(len(draft.tokens) + 1, verify_s)
        if name == "none" or not draft.tokens:
            return
        if name not in self.free_drafters:
            self.costs.observe_draft(name, len(draft.tokens), draft_s)
        else:
            self.costs.observe_draft(name, 1, draft_s)  # free drafters cost per call
        bucket = draft.bucket or name
        self.acceptance.observe(bucket, draft.confidences, accepted)
        memory = self._memory.setdefault(seq_id, _SequenceMemory())
        seen = min(accepted + 1, len(draft.tokens))
        memory.accepted[name] = memory.accepted.get(name, 0.0) + accepted
        memory.drafted[name] = memory.drafted.get(name, 0.0) + seen

    def release(self, seq_id: str) -> None:
        self._memory.pop(seq_id, None)
        for speculator in self.speculators.values():
            speculator.release(seq_id)


def _with_lookahead(request: DraftRequest, lookahead: int) -> DraftRequest:
    return DraftRequest(
        request.seq_id, request.context, lookahead, request.params, request.generator
    )


def _cut(draft: Draft, length: int) -> Draft:
    return Draft(
        tokens=draft.tokens[:length],
        confidences=draft.confidences[:length],
        probs=None if draft.probs is None else draft.probs[:length],
        bucket=draft.bucket,
    )


class FixedPolicy:
    """One speculator at a fixed lookahead (or none): the baseline modes."""

    def __init__(self, speculator: Drafter | None, lookahead: int) -> None:
        self.speculator = speculator
        self.lookahead = lookahead if speculator is not None else 0
        self.name = speculator.name if speculator is not None else "none"

    def draft(self, request: DraftRequest) -> tuple[str, Draft]:
        lookahead = min(request.lookahead, self.lookahead)
        if self.speculator is None or lookahead <= 0:
            return "none", Draft.empty()
        return self.name, self.speculator.propose([_with_lookahead(request, lookahead)])[0]

    def observe(self, *args: object) -> None:
        pass

    def release(self, seq_id: str) -> None:
        if self.speculator is not None:
            self.speculator.release(seq_id)


DraftPolicy = Controller | FixedPolicy

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
import json
import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import TypeVar

from atlas_sidecar.engine.backends.base import ForwardItem, TargetBackend
from atlas_sidecar.engine.speculators.base import Drafter, DraftRequest
from atlas_sidecar.engine.stoprule import Calibration, StopRule
from atlas_sidecar.engine.tree import DraftTree, reach

EWMA = 0.2  # weight of a new cost sample
# Per observation: old acceptance evidence fades, so drift is followed. A cell's
# estimate rests on about its last 1 / (1 - DECAY) observations: a workload shift
# (one domain's long suffix matches were right, the next one's are not) turns it
# around within a few steps of a batch, not after hundreds of rejections.
DECAY = 0.98
PRIOR_STRENGTH = 4.0  # pseudo-observations behind a confidence before any evidence
# Upper edges of the confidence bins: tenths, and the top tenth split finer, where a
# draft model's tokens crowd and a long draft's odds hang on 0.97 against 0.995 a token.
CONFIDENCE_EDGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.97, 0.99, 1.0)
# A model drafter's steps so far, before it drafts: how many of the traffic's steps its
# request's own are worth (_Steps).
STEP_PRIOR = 2.0

# The trainer's calibration priors (``parse_calibration``): per speculator, the share
# of its drafted tokens the target accepted across all replicas' traffic.
CALIBRATION_FORMAT = "atlas-calibration/1"

K = TypeVar("K")


class CalibrationError(ValueError):
    """Calibration priors that are not valid JSON of ``CALIBRATION_FORMAT``."""


def parse_calibration(raw: bytes | str) -> dict[str, float]:
    """Speculator name -> prior acceptance rate, from the trainer's calibration file.

    Refused whole (CalibrationError) unless every entry has drafted >= accepted >= 0
    and the rate they give: a bad file must not steer planning."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        priors = {}
        for name, entry in dict(data["speculators"]).items():
            drafted, accepted = float(entry["drafted"]), float(entry["accepted"])
            if not 0 <= accepted <= drafted or not math.isfinite(drafted):
                raise ValueError(f"{name}: accepted {accepted} of drafted {drafted}")
            if drafted > 0:
                priors[str(name)] = accepted / drafted
        return priors
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CalibrationError(f"not {CALIBRATION_FORMAT} calibration: {err}") from err


@dataclass(frozen=True)
class ControllerConfig:
    """The corrections the planner stacks on the drafters' own confidences, each one
    switchable so that ``atlas bench --ablate`` can price it (tokens/s with and without,
    side by side in one run). All on is the shipped controller.

    - ``calibration``: confidences become acceptance probabilities learned per
      speculator, evidence bucket and confidence bin (off: the confidence itself).
    - ``step_goodput``: among model drafters, only the one whose steps gained most
      tokens per second so far competes for a sequence.
    - ``early_exit``: a model drafter stops drafting once one more token no longer
      pays for itself, judged as its confidences arrive.
    - ``runners_up``: a draft model's second choices are verified as siblings of its
      chain where the plan says they pay (one sequence, greedy).
    """

    calibration: bool = True
    step_goodput: bool = True
    early_exit: bool = True
    runners_up: bool = True

    @classmethod
    def parts(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def without(self, part: str) -> ControllerConfig:
        """This configuration with ``part`` switched off."""
        if part not in self.parts():
            raise ValueError(f"unknown controller part {part!r}; one of {', '.join(self.parts())}")
        return replace(self, **{part: False})


class CostCurve:
    """Seconds of a forward by its size, from measured sizes: interpolated between them,
    linear beyond them.

    Feeding more tokens never costs less, and a busy machine only ever makes a forward
    slower, so a size is costed at most as much as any larger measured size (one slow
    sample of one token must not make every 1-token draft look free)."""

    def __init__(self) -> None:
        self.points: dict[int, float] = {}
        # Measured sizes, ascending, and their envelope: rebuilt after an observation
        # (once a step), read by every plan of the step.
        self.sizes: list[int] = []
        self._envelope: dict[int, float] = {}

    def observe(self, size: int, seconds: float) -> None:
        _ewma(self.points, size, seconds)
        self.sizes = sorted(self.points)
        lowest = math.inf
        for known in reversed(self.sizes):
            lowest = min(lowest, self.points[known])
            self._envelope[known] = lowest

    def __call__(self, size: int) -> float:
        if not self.points:
            return 1.0  # no measurement yet: every plan is costed the same
        sizes, envelope = self.sizes, self._envelope
        if size in envelope:
            return envelope[size]
        i = bisect.bisect_left(sizes, size)
        if i == 0:
            return envelope[sizes[0]]
        if i == len(sizes):
            if len(sizes) == 1:
                return envelope[sizes[-1]]
            lo, hi = sizes[-2], sizes[-1]
        else:
            lo, hi = sizes[i - 1], sizes[i]
        slope = (envelope[hi] - envelope[lo]) / (hi - lo)
        return max(envelope[lo] + slope * (size - lo), 1e-6)


class CostModel:
    """Seconds per target forward by tokens fed and rows, and per drafted token by
    speculator.

    One sequence: a curve by tokens fed, profiled at start-up and learned from every
    one-sequence step. A batch of several costs more than one sequence fed as many
    tokens (each row's cache is gathered, padded and attended on its own), and by an
    amount that changes with the width: each row count gets a curve of its own, learned
    from the batched steps run. Where it has no measurement, it follows the one-sequence
    curve's shape from its nearest measured size; a row count never run takes the
    batch extra of the nearest one that was, at the same width, scaled by its rows."""

    def __init__(self) -> None:
        self.single = CostCurve()
        self.batched: dict[int, CostCurve] = {}
        self._draft_per_token: dict[str, float] = {}

    def profile(
        self, target: TargetBackend, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    ) -> None:
        """Measure the target's forward cost at a few sizes (a short prefix in cache)."""
        for size, seconds in _time_forwards(target, sizes):
            self.observe_verify(size, seconds)

    def profile_batched(
        self,
        target: TargetBackend,
        rows: tuple[int, ...] = (4, 8),
        widths: tuple[int, ...] = (1, 4, 16),
    ) -> None:
        """Measure batched forwards of a few row counts and widths: a prior for the
        batched curves, so that a server's first batches are not costed as one sequence
        (which makes a wide draft look nearly free at 8 rows)."""
        for count in rows:
            for width, seconds in _time_forwards(target, widths, rows=count, prefix=64):
                self.observe_verify(count * width, seconds, count)

    def profile_drafter(self, speculator: str, model: TargetBackend) -> None:
        """A draft model's cost per drafted token: one single-token forward.

        Measured up front so that the first plans already see what it costs (a drafter
        of unknown cost looks free and is picked for everything until measured)."""
        for _, seconds in _time_forwards(model, (1,)):
            self.observe_draft(speculator, 1, seconds)

    def observe_verify(self, tokens_fed: int, seconds: float, rows: int = 1) -> None:
        """One forward of ``rows`` sequences, ``tokens_fed`` in all (padding included)."""
        if rows > 1:
            self.batched.setdefault(rows, CostCurve()).observe(tokens_fed, seconds)
        else:
            self.single.observe(tokens_fed, seconds)

    def observe_draft(self, speculator: str, tokens: int, seconds: float) -> None:
        if tokens > 0:
            _ewma(self._draft_per_token, speculator, seconds / tokens)

    def verify(self, tokens_fed: int, rows: int = 1) -> float:
        """Seconds of a forward feeding ``tokens_fed`` tokens in all to ``rows`` sequences."""
        if rows <= 1:
            return self.single(tokens_fed)
        if rows in self.batched:
            return self._batched(rows, tokens_fed)
        if not self.batched:
            return self.single(tokens_fed)
        near = min(self.batched, key=lambda r: (abs(r - rows), r))
        width = tokens_fed / rows
        near_tokens = max(round(width * near), near)
        extra = self._batched(near, near_tokens) - self.single(near_tokens)
        return max(self.single(tokens_fed) + extra * (rows - 1) / (near - 1), 1e-6)

    def _batched(self, rows: int, tokens_fed: int) -> float:
        curve = self.batched[rows]
        lo, hi = curve.sizes[0], curve.sizes[-1]
        if lo <= tokens_fed <= hi:
            return curve(tokens_fed)
        edge = lo if tokens_fed < lo else hi
        return max(curve(edge) + self.single(tokens_fed) - self.single(edge), 1e-6)

    def draft_per_token(self, speculator: str) -> float:
        return self._draft_per_token.get(speculator, 0.0)

    def snapshot(self) -> dict[str, object]:
        return {
            "verify_s": {k: round(v, 5) for k, v in sorted(self.single.points.items())},
            "batched_verify_s": {
                rows: {k: round(v, 5) for k, v in sorted(curve.points.items())}
                for rows, curve in sorted(self.batched.items())
            },
            "draft_s_per_token": {k: round(v, 6) for k, v in self._draft_per_token.items()},
        }


def _ewma(table: dict[K, float], key: K, sample: float) -> None:
    old = table.get(key)
    table[key] = sample if old is None else old + EWMA * (sample - old)


def _time_forwards(
    model: TargetBackend,
    sizes: tuple[int, ...],
    rows: int = 1,
    prefix: int = 16,
    repeats: int = 2,
) -> list[tuple[int, float]]:
    """Seconds of one forward of ``rows`` sequences feeding each size's tokens apiece,
    after a ``prefix``-token context each (warm-up and a realistic cache): the fastest of
    ``repeats``."""
    seq_ids, out = [f"__cost_profile_{r}__" for r in range(rows)], []

    def feed(tokens: int) -> None:
        if rows == 1:
            model.forward(seq_ids[0], [0] * tokens)
        else:
            model.forward_many([ForwardItem(seq_id, [0] * tokens) for seq_id in seq_ids])

    try:
        for seq_id in seq_ids:
            model.start(seq_id)
        feed(prefix)
        for size in sizes:
            samples = []
            for _ in range(repeats):
                for seq_id in seq_ids:
                    model.truncate(seq_id, prefix)
                started = time.perf_counter()
                feed(size)
                samples.append(time.perf_counter() - started)
            out.append((size, min(samples)))  # noise on a shared machine only adds time
    finally:
        for seq_id in seq_ids:
            model.release(seq_id)
    return out


def _bin(confidence: float) -> int:
    return min(bisect.bisect_right(CONFIDENCE_EDGES, confidence), len(CONFIDENCE_EDGES) - 1)


def _bin_middle(index: int) -> float:
    low = CONFIDENCE_EDGES[index - 1] if index else 0.0
    return (low + CONFIDENCE_EDGES[index]) / 2


@dataclass
class _Beta:
    accepted: float = 0.0
    rejected: float = 0.0


class AcceptanceStats:
    """P(draft token accepted | speculator bucket, confidence bin), learned online."""

    def __init__(self) -> None:
        self._cells: dict[tuple[str, int], _Beta] = {}
        # Per speculator, the acceptance rate seen across the traffic (the trainer's
        # calibration): the prior of ``rate`` before this process has evidence.
        self.priors: dict[str, float] = {}

    def prob(self, bucket: str, confidence: float) -> float:
        cell = self._cells.get((bucket, _bin(confidence)))
        prior = _bin_middle(_bin(confidence))  # before any evidence: the confidence's own
        if cell is None:
            return prior
        n = cell.accepted + cell.rejected
        return (cell.accepted + PRIOR_STRENGTH * prior) / (n + PRIOR_STRENGTH)

    def rate(self, bucket: str, prior: float = 0.75) -> float:
        """P(accepted) for the bucket's tokens at any confidence: for planning before a draft.

        The prior is the traffic's rate for the bucket's speculator when the trainer
        published one (``priors``), else ``prior``."""
        prior = self.priors.get(bucket.split(":", 1)[0], prior)
        accepted = sum(c.accepted for (b, _), c in self._cells.items() if b == bucket)
        rejected = sum(c.rejected for (b, _), c in self._cells.items() if b == bucket)
        return (accepted + PRIOR_STRENGTH * prior) / (accepted + rejected + PRIOR_STRENGTH)

    def observe(self, bucket: str, accepted: list[float], rejected: list[float]) -> None:
        """Confidences of draft tokens the target accepted, and of ones it rejected."""
        for confidence, outcome in [(c, True) for c in accepted] + [(c, False) for c in rejected]:
            cell = self._cells.setdefault((bucket, _bin(confidence)), _Beta())
            cell.accepted *= DECAY
            cell.rejected *= DECAY
            if outcome:
                cell.accepted += 1.0
            else:
                cell.rejected += 1.0

    def snapshot(self) -> dict[str, float]:
        return {
            f"{bucket}/{b}": round(c.accepted / max(c.accepted + c.rejected, 1e-9), 3)
            for (bucket, b), c in sorted(self._cells.items())
        }


@dataclass
class _Steps:
    """A model drafter's steps: tokens each gained and what each cost (modelled seconds:
    its drafting and the verify forward), summed with old steps fading.

    Its plan before drafting rests on its pooled acceptance rate, a flat chain; but its
    early exit makes its drafts long where they are taken and short where they are not,
    so the rate undersells a drafter whose stretches run long (a draft model on code:
    6-15 tokens a step) against a cheap one whose tokens are taken as often but whose
    drafts stay short (the neural head). What its steps gained per second is what it
    is worth against another model drafter. Not against the suffix index, whose plan
    rests on the match at hand: valued at its steps' average, the draft model would take
    steps the index makes for free (docs/design-notes.md, "Controller and planning")."""

    tokens: float = 0.0
    seconds: float = 0.0
    count: float = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        self.tokens = DECAY * self.tokens + tokens
        self.seconds = DECAY * self.seconds + seconds
        self.count = DECAY * self.count + 1.0

    def goodput(self, prior: _Steps | None = None, weight: float = 0.0) -> float | None:
        """Tokens per second; with ``prior``'s mean step worth ``weight`` steps."""
        tokens, seconds = self.tokens, self.seconds
        if prior is not None and prior.count > 0:
            tokens += weight * prior.tokens / prior.count
            seconds += weight * prior.seconds / prior.count
        return tokens / seconds if seconds > 0 else None


@dataclass
class SequenceState:
    """All the controller keeps for one sequence in flight, released as one: its model
    drafters' steps, and each free drafter's last whole draft (its shadow, scored
    against what the target produced next)."""

    steps: dict[str, _Steps] = field(default_factory=dict)
    # Per free drafter: (context length when drafted, its whole draft).
    shadows: dict[str, tuple[int, DraftTree]] = field(default_factory=dict)


@dataclass
class Plan:
    speculator: str  # "none" or a speculator's name
    nodes: list[int]  # the draft tokens (tree nodes) to verify
    expected_tokens: float
    expected_s: float
    # Every node the cut considered, likeliest first (``nodes`` are the first
    # ``lookahead`` of them), and the expected tokens gained with the first n of them.
    order: list[int] = field(default_factory=list)
    gains: list[float] = field(default_factory=lambda: [1.0])

    def capped(self, width: int) -> Plan:
        """The same plan with at most ``width`` nodes (its likeliest ones)."""
        if self.lookahead <= width:
            return self
        if width == 0:
            return Plan("none", [], 1.0, self.expected_s)
        nodes = sorted(self.order[:width])
        return Plan(self.speculator, nodes, self.gains[width], self.expected_s, self.order,
                    self.gains)  # fmt: skip

    @property
    def lookahead(self) -> int:
        return len(self.nodes)

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
    """Plans each step for each sequence; learns from what the target accepted.

    In a batch of B sequences, a plan of k draft tokens is costed at its share of a
    forward in which every sequence feeds k + 1 tokens: verify(B * (k + 1)) / B. When
    the target is compute-bound at that size (large batches), speculating stops paying
    and the controller drafts nothing.
    """

    def __init__(
        self,
        speculators: list[Drafter],
        max_lookahead: int,
        costs: CostModel | None = None,
        config: ControllerConfig | None = None,
    ) -> None:
        self.config = config or ControllerConfig()
        self.speculators = {s.name: s for s in speculators}
        self.max_lookahead = max_lookahead
        self.costs = costs or CostModel()
        self.acceptance = AcceptanceStats()
        # Drafters cheap enough to always ask for a full-length draft, then cut it.
        self.free_drafters = tuple(s.name for s in speculators if s.capabilities.free)
        # Shown every step's context, also on steps they do not draft (``observe_context``).
        self.learners = [s for s in speculators if s.capabilities.learns_online]
        self.sequences: dict[str, SequenceState] = {}
        self.choices: dict[str, int] = {}
        self._steps = {name: _Steps() for name in self.speculators}

    @property
    def name(self) -> str:
        return "atlas"

    def load_calibration(self, raw: bytes | str) -> dict[str, float]:
        """Start from the trainer's calibration priors (``parse_calibration``): planning
        before this replica has evidence of its own follows all replicas' traffic."""
        priors = parse_calibration(raw)
        self.acceptance.priors = {k: min(max(v, 0.0), 0.99) for k, v in priors.items()}
        return priors

    def _state(self, seq_id: str) -> SequenceState:
        return self.sequences.setdefault(seq_id, SequenceState())

    def _accept_prob(
        self,
        seq_id: str,
        name: str,
        bucket: str,
        confidence: float | None,
    ) -> float:
        """Calibrated P(accept) for a token; ``confidence=None``: before drafting it."""
        if confidence is None:
            return self.acceptance.rate(bucket)
        if self.config.calibration:
            return self.acceptance.prob(bucket, confidence)
        return min(max(confidence, 0.0), 0.99)

    def _verify_share(self, tokens_per_seq: int, batch_size: int) -> float:
        return self.costs.verify(batch_size * tokens_per_seq, batch_size) / batch_size

    def _best_cut(
        self,
        name: str,
        probs: list[float],
        parents: list[int],
        cap: int,
        batch_size: int,
        drafted: bool = False,
    ) -> Plan:
        """The most goodput-efficient subtree: the nodes most likely to be reached.
        ``drafted``: the nodes exist already (their drafting cost is spent)."""
        reached = reach(probs, parents)
        # Ancestors are at least as likely as their descendants and come first on ties,
        # so every top-n set is closed under parents.
        order = sorted(range(len(reached)), key=lambda i: (-reached[i], i))[:cap]
        draft_s = 0.0 if drafted else self.costs.draft_per_token(name)
        gains = [1.0]
        for node in order:
            gains.append(gains[-1] + reached[node])
        best = Plan(name, [], 1.0, self._verify_share(1, batch_size), order, gains)
        for n in range(1, len(order) + 1):
            seconds = self._verify_share(n + 1, batch_size) + draft_s * n
            plan = Plan(name, sorted(order[:n]), gains[n], seconds, order, gains)
            if plan.goodput > best.goodput:
                best = plan
        return best

    def _share_width(self, plans: list[Plan], batch: int) -> list[Plan]:
        """Cap the plans of a batch at one width: its rows are padded to the widest.

        Each plan was costed as if every row fed as many tokens as it does; one long
        draft makes every row of the forward that wide. Pick the cap that maximises
        the whole batch's expected tokens per second, and cut longer plans to it."""
        widest = max((plan.lookahead for plan in plans), default=0)
        idle = batch - len(plans)  # sequences in the forward that draft nothing
        best_width, best_rate = widest, 0.0
        for width in range(widest + 1):
            tokens = idle + sum(plan.gains[min(plan.lookahead, width)] for plan in plans)
            draft_s = sum(
                self.costs.draft_per_token(plan.speculator) * min(plan.lookahead, width)
                for plan in plans
                if plan.speculator not in self.free_drafters
            )
            rate = tokens / (self.costs.verify(batch * (width + 1), batch) + draft_s)
            if rate > best_rate:
                best_width, best_rate = width, rate
        return [plan.capped(best_width) for plan in plans]

    def draft(self, request: DraftRequest, batch_size: int = 1) -> tuple[str, DraftTree]:
        """Choose a speculator and lookahead for one sequence; return (name, its draft)."""
        return self.draft_many([request], batch_size)[0]

    def draft_many(
        self, requests: list[DraftRequest], batch_size: int | None = None
    ) -> list[tuple[str, DraftTree]]:
        """Plan every sequence of a batch, then draft: each chosen model drafter runs
        once for all its sequences. Returns (speculator, draft) per sequence."""
        batch = batch_size or len(requests)
        for request in requests:
            self._score_shadows(request)
            for drafter in self.learners:
                drafter.observe_context(request.seq_id, request.context)
        free = self._free_drafts(requests)
        chosen = [
            self._choose(request, {name: drafts[i] for name, drafts in free.items()}, batch)
            for i, request in enumerate(requests)
        ]
        plans = [plan for plan, _ in chosen]
        if batch > 1:
            plans = self._share_width(plans, batch)
        drafts = self._drafts(requests, plans, [draft for _, draft in chosen], batch)
        return [(self._chose(plan), draft) for plan, draft in zip(plans, drafts, strict=True)]

    def _free_drafts(self, requests: list[DraftRequest]) -> dict[str, list[DraftTree]]:
        """Each free drafter's full-length draft for every sequence, each kept as that
        drafter's shadow (scored next step whether or not it is chosen)."""
        free: dict[str, list[DraftTree]] = {}
        for name in self.free_drafters:
            asked = [_with_lookahead(r, min(r.lookahead, self.max_lookahead)) for r in requests]
            free[name] = self._propose(name, asked, per_call=True)
            for request, draft in zip(requests, free[name], strict=True):
                if draft.tokens:
                    self._state(request.seq_id).shadows[name] = (len(request.context), draft)
        return free

    def _choose(
        self, request: DraftRequest, free: dict[str, DraftTree], batch: int
    ) -> tuple[Plan, DraftTree]:
        """One sequence's best plan, drafting nothing included (with a free drafter's
        plan, the draft it cuts from)."""
        best, best_draft = Plan("none", [], 1.0, self._verify_share(1, batch)), DraftTree.empty()
        cap = min(request.lookahead, self.max_lookahead)
        if cap <= 0:
            return best, best_draft
        options = [
            self._option(request, name, free.get(name), cap, batch) for name in self.speculators
        ]
        if batch == 1:
            options = self._one_model_drafter(request.seq_id, options)
        for plan, draft in options:
            if plan.goodput > best.goodput and plan.lookahead > 0:
                best, best_draft = plan, draft
        return best, best_draft

    def _option(
        self, request: DraftRequest, name: str, draft: DraftTree | None, cap: int, batch: int
    ) -> tuple[Plan, DraftTree]:
        """Speculator ``name``'s best plan: the best cut of a free drafter's ``draft``;
        for a model drafter, which pays per token, a chain at its typical acceptance."""
        if draft is not None:
            bucket = draft.bucket or name
            probs = [self._accept_prob(request.seq_id, name, bucket, c) for c in draft.confidences]
            return self._best_cut(name, probs, draft.chain_parents(), cap, batch), draft
        typical = self._accept_prob(request.seq_id, name, name, None)
        chain = list(range(-1, cap - 1))
        return self._best_cut(name, [typical] * cap, chain, cap, batch), DraftTree.empty()

    def _drafts(
        self, requests: list[DraftRequest], plans: list[Plan], cut_from: list[DraftTree], batch: int
    ) -> list[DraftTree]:
        """The draft each plan names: a free drafter's the nodes it chose of its draft;
        a model drafter's made now, all of its sequences in one call."""
        drafts = [
            draft.subset(plan.nodes) if plan.speculator in self.free_drafters else DraftTree.empty()
            for plan, draft in zip(plans, cut_from, strict=True)
        ]
        for name in self.speculators:
            picked = [i for i, plan in enumerate(plans) if plan.speculator == name]
            if name in self.free_drafters or not picked:
                continue
            asked = [self._model_request(requests[i], plans[i], batch) for i in picked]
            for i, draft in zip(picked, self._propose(name, asked), strict=True):
                drafts[i] = self._maybe_runners_up(requests[i], name, draft, batch)
        return drafts

    def _model_request(self, request: DraftRequest, plan: Plan, batch: int) -> DraftRequest:
        """What a model drafter is asked for. One sequence: the plan's length was chosen
        before any token was seen, so the stop rule may draft past it while the run
        keeps paying. In a batch the shared width (``_share_width``) is the cap."""
        if not self.config.early_exit:
            return _with_lookahead(request, plan.lookahead)
        cap = min(request.lookahead, self.max_lookahead) if batch == 1 else plan.lookahead
        stop = self._stop_rule(request.seq_id, plan.speculator, batch, cap)
        return _with_lookahead(request, cap, stop)

    def _maybe_runners_up(
        self, request: DraftRequest, name: str, draft: DraftTree, batch: int
    ) -> DraftTree:
        """A model draft with its runners-up where they pay: one greedy sequence only
        (in a batch every row would be padded to the wider draft)."""
        if batch == 1 and request.trees and self.config.runners_up and draft.runners_up:
            return self._add_runners_up(request, name, draft)
        return draft

    def _one_model_drafter(
        self, seq_id: str, options: list[tuple[Plan, DraftTree]]
    ) -> list[tuple[Plan, DraftTree]]:
        """For one sequence: the free drafters' plans, and of the model drafters' only
        that of the one whose steps gained most per second so far (``_Steps``: the
        request's own, after its first, else the traffic's). Its plan then competes
        with the free drafters' and with drafting nothing, as before. While a model
        drafter has no steps yet, all their plans compete (so each gets tried)."""
        models = [o for o in options if o[0].speculator not in self.free_drafters]
        if len(models) < 2 or not self.config.step_goodput:
            return options
        memory = self.sequences.get(seq_id)
        rates: dict[str, float] = {}
        for plan, _ in models:
            name = plan.speculator
            own = memory.steps.get(name) if memory is not None else None
            traffic = self._steps[name]
            rate = own.goodput(traffic, STEP_PRIOR) if own is not None else traffic.goodput()
            if rate is None:
                return options
            rates[name] = rate
        best = max(rates, key=rates.__getitem__)
        return [o for o in options if o[0].speculator in self.free_drafters + (best,)]

    def _add_runners_up(self, request: DraftRequest, name: str, draft: DraftTree) -> DraftTree:
        """The draft model's chain with the runners-up worth verifying beside it.

        Where the favourite is unsure, the target often picks the drafter's second
        choice: as a sibling it costs one more token in the verify forward and no
        drafting (the measured share is in docs/design-notes.md). Only
        for one sequence (in a batch every row would be padded to the wider draft)."""
        tree = draft.with_runners_up()
        bucket = tree.bucket or name
        probs = [self._accept_prob(request.seq_id, name, bucket, c) for c in tree.confidences]
        cap = min(len(tree.tokens), request.lookahead)  # the request's bound on nodes
        plan = self._best_cut(name, probs, tree.chain_parents(), cap, 1, drafted=True)
        return tree.subset(plan.nodes)

    def _stop_rule(self, seq_id: str, name: str, batch: int, cap: int) -> StopRule:
        """The plan's rule for when model drafter ``name`` stops (see ``StopRule``),
        with this sequence's calibration and the verify costs of every length to
        ``cap`` fixed now."""
        bins = None
        if self.config.calibration:
            bins = tuple(
                self.acceptance.prob(name, _bin_middle(b)) for b in range(len(CONFIDENCE_EDGES))
            )
        return StopRule(
            Calibration(CONFIDENCE_EDGES, bins),
            cap,
            tuple(self._verify_share(n + 1, batch) for n in range(cap + 1)),
            self.costs.draft_per_token(name),
        )

    def _propose(
        self, name: str, requests: list[DraftRequest], per_call: bool = False
    ) -> list[DraftTree]:
        """Run a speculator and learn its cost: per drafted token (as the drafter measured
        it, if it did), or per call if free."""
        started = time.perf_counter()
        drafts = self.speculators[name].propose(requests)
        seconds = time.perf_counter() - started
        reported = [d.token_cost_s for d in drafts if d.token_cost_s is not None]
        if reported:
            self.costs.observe_draft(name, 1, sum(reported) / len(reported))
        elif per_call:
            self.costs.observe_draft(name, 1, seconds / max(len(requests), 1))
        else:
            self.costs.observe_draft(name, sum(len(d.tokens) for d in drafts), seconds)
        return drafts

    def _chose(self, plan: Plan) -> str:
        key = f"{plan.speculator}:{plan.lookahead}"
        self.choices[key] = self.choices.get(key, 0) + 1
        return plan.speculator

    def observe_verify(self, tokens_fed: int, seconds: float, rows: int = 1) -> None:
        """One target forward over ``tokens_fed`` tokens (all ``rows`` sequences of the
        batch, padding included)."""
        self.costs.observe_verify(tokens_fed, seconds, rows)

    def observe(self, seq_id: str, name: str, draft: DraftTree, path: list[int]) -> None:
        """The target accepted the draft nodes ``path`` (root to leaf) and no more."""
        state = self._state(seq_id)
        if name == "none" or not draft.tokens or name in self.free_drafters:
            return  # free drafters learn from their whole draft instead (_score_shadows)
        # The step as the cost model prices it (one sequence: drafted chain + verify).
        seconds = self.costs.draft_per_token(name) * len(draft.main_nodes())
        seconds += self._verify_share(len(draft.tokens) + 1, 1)
        self._steps[name].observe(len(path) + 1, seconds)
        state.steps.setdefault(name, _Steps()).observe(len(path) + 1, seconds)
        # Every other child of the root and of the accepted nodes met the target and lost.
        children, on_path = draft.children(), set(path)
        rejected = [c for node in (-1, *path) for c in children.get(node, []) if c not in on_path]
        self._learn(name, draft, path, rejected)

    def _score_shadows(self, request: DraftRequest) -> None:
        """Score each free drafter's last draft of this sequence against the tokens the
        target produced since: evidence on every node those tokens decide, including
        nodes the plan cut and drafts another speculator was chosen over."""
        state = self.sequences.get(request.seq_id)
        if state is None:
            return
        shadows, state.shadows = state.shadows, {}
        for name, (length, draft) in shadows.items():
            path, rejected = draft.walk(request.context[length:])
            self._learn(name, draft, path, rejected)

    def _learn(self, name: str, draft: DraftTree, path: list[int], rejected: list[int]) -> None:
        """Acceptance evidence: nodes the target took and checked nodes it did not."""
        self.acceptance.observe(
            draft.bucket or name,
            accepted=[draft.confidences[i] for i in path],
            rejected=[draft.confidences[i] for i in rejected],
        )

    def rollback(self, seq_id: str, context: list[int]) -> None:
        """A step that drafted after ``context`` failed: roll the drafters back.

        What the failed step learned stays: scoring the last step's shadows (their
        outcome was already known, and the retry does not score them again) and its
        timings. A failure inside ``observe`` itself leaves the earlier sequences'
        evidence counted, and counted again on the retry: it only weighs the estimates
        that pick drafts, which the target verifies, so no output changes."""
        for speculator in self.speculators.values():
            speculator.rollback(seq_id, context)

    def drafters(self) -> list[Drafter]:
        return list(self.speculators.values())

    def release(self, seq_id: str) -> None:
        self.sequences.pop(seq_id, None)
        for speculator in self.speculators.values():
            speculator.release(seq_id)


def _with_lookahead(
    request: DraftRequest, lookahead: int, stop: StopRule | None = None
) -> DraftRequest:
    return replace(request, lookahead=lookahead, stop=stop)


class FixedPolicy:
    """One speculator at a fixed lookahead (or none): the baseline modes."""

    def __init__(self, speculator: Drafter | None, lookahead: int) -> None:
        self.speculator = speculator
        self.lookahead = lookahead if speculator is not None else 0
        self.name = speculator.name if speculator is not None else "none"

    def draft_many(
        self, requests: list[DraftRequest], batch_size: int | None = None
    ) -> list[tuple[str, DraftTree]]:
        out: list[tuple[str, DraftTree]] = [("none", DraftTree.empty()) for _ in requests]
        picked = [i for i, r in enumerate(requests) if min(r.lookahead, self.lookahead) > 0]
        if self.speculator is None or not picked:
            return out
        planned = [
            _with_lookahead(requests[i], min(requests[i].lookahead, self.lookahead)) for i in picked
        ]
        for i, draft in zip(picked, self.speculator.propose(planned), strict=True):
            out[i] = (self.name, draft)
        return out

    def drafters(self) -> list[Drafter]:
        return [self.speculator] if self.speculator is not None else []

    def observe(self, *args: object) -> None:
        pass

    def observe_verify(self, tokens_fed: int, seconds: float, rows: int = 1) -> None:
        pass

    def rollback(self, seq_id: str, context: list[int]) -> None:
        if self.speculator is not None:
            self.speculator.rollback(seq_id, context)

    def release(self, seq_id: str) -> None:
        if self.speculator is not None:
            self.speculator.release(seq_id)


DraftPolicy = Controller | FixedPolicy

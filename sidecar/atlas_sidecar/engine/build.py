"""Named decoding modes, built once from loaded models: what CLI, bench and server offer."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.controller import Controller, ControllerConfig, CostModel
from atlas_sidecar.engine.core import DEFAULT_LOOKAHEAD, Engine
from atlas_sidecar.engine.speculators.base import Draft, Drafter, DraftRequest
from atlas_sidecar.engine.speculators.neural import NeuralSpeculator, load_cached
from atlas_sidecar.engine.speculators.neural_train import OnlineLearner
from atlas_sidecar.engine.speculators.static import StaticSpeculator
from atlas_sidecar.engine.speculators.suffix import SuffixSpeculator

# Suffix drafts are nearly free, so they may run long; the controller cuts them.
SUFFIX_LOOKAHEAD = 16
ATLAS_MAX_LOOKAHEAD = 32
MODES = ("none", "static", "suffix", "neural", "atlas")
NEEDS_DRAFT = frozenset({"static", "atlas"})

if TYPE_CHECKING:
    from atlas_sidecar.engine.backends.sglang import SGLangBackend

log = logging.getLogger(__name__)


class LearningController(Controller):
    """The controller, also showing every step's context to the neural speculator.

    The controller asks a model drafter only on the steps it picks it for; the neural
    head must learn from every request (above all from those it is not yet good at)."""

    def __init__(
        self,
        speculators: list[Drafter],
        max_lookahead: int,
        costs: CostModel,
        neural: NeuralSpeculator,
        config: ControllerConfig | None = None,
    ) -> None:
        super().__init__(speculators, max_lookahead, costs, config=config)
        self.neural = neural

    def draft_many(
        self, requests: list[DraftRequest], batch_size: int | None = None
    ) -> list[tuple[str, Draft]]:
        for request in requests:
            self.neural.observe_context(request.seq_id, request.context)
        return super().draft_many(requests, batch_size)


def neural_speculator(target: CausalLMRunner, learn: bool = True) -> NeuralSpeculator:
    """The neural speculator on ``target``, warm-started from ``$ATLAS_HOME`` when a head
    for this target is cached there (``python -m atlas_sidecar.engine.speculators.neural_train``
    writes one), learning from every finished request in a background thread that trains
    while no request is in flight.

    It reads the target's final hidden states, so the target starts recording them here:
    this must happen before any sequence is started on it."""
    if not target.record_hidden:
        if target.live_sequences:
            raise RuntimeError("enable record_hidden on the target before starting sequences")
        target.record_hidden = True
    speculator = NeuralSpeculator(target)
    if load_cached(speculator, log=log.warning):
        log.info("neural head: warm start version %d", speculator.version)
    if learn:
        OnlineLearner(speculator, background=True)
    return speculator


def build_engine(
    mode: str,
    target: CausalLMRunner | SGLangBackend,
    draft: CausalLMRunner | None = None,
    lookahead: int = DEFAULT_LOOKAHEAD,
    config: ControllerConfig | None = None,
) -> Engine:
    """An engine for ``mode``; ``draft`` is the static speculator's model runner;
    ``config`` switches the ``atlas`` controller's corrections (default: all on).

    A target whose hidden states the sidecar cannot read (SGLang's, in another
    process) has no neural speculator: ``atlas`` then picks among suffix and static."""
    tokenizer = target.tokenizer
    if mode == "none":
        return Engine(target, tokenizer)
    if mode == "suffix":
        return Engine(target, tokenizer, SuffixSpeculator(), lookahead=SUFFIX_LOOKAHEAD)
    if not isinstance(target, CausalLMRunner):
        return _remote_target_engine(mode, target, draft, lookahead, config)
    if mode == "neural":
        return Engine(target, tokenizer, neural_speculator(target), lookahead=lookahead)
    if mode in NEEDS_DRAFT and draft is None:
        raise ValueError(f"mode {mode!r} needs a draft model")
    assert draft is not None
    if mode == "static":
        return Engine(target, tokenizer, StaticSpeculator(draft), lookahead=lookahead)
    if mode == "atlas":
        neural = neural_speculator(target)
        costs = CostModel()
        costs.profile(target)
        costs.profile_batched(target)
        costs.profile_drafter(StaticSpeculator.name, draft)
        controller = LearningController(
            [SuffixSpeculator(), StaticSpeculator(draft), neural],
            ATLAS_MAX_LOOKAHEAD,
            costs,
            neural,
            config,
        )
        return Engine(target, tokenizer, policy=controller)
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


def _remote_target_engine(
    mode: str,
    target: SGLangBackend,
    draft: CausalLMRunner | None,
    lookahead: int,
    config: ControllerConfig | None,
) -> Engine:
    if mode not in NEEDS_DRAFT:
        raise ValueError(f"mode {mode!r} needs the target's hidden states, not available here")
    if draft is None:
        raise ValueError(f"mode {mode!r} needs a draft model")
    if mode == "static":
        return Engine(target, target.tokenizer, StaticSpeculator(draft), lookahead=lookahead)
    costs = CostModel()
    costs.profile(target)
    costs.profile_batched(target)
    costs.profile_drafter(StaticSpeculator.name, draft)
    speculators: list[Drafter] = [SuffixSpeculator(), StaticSpeculator(draft)]
    controller = Controller(speculators, ATLAS_MAX_LOOKAHEAD, costs, config=config)
    return Engine(target, target.tokenizer, policy=controller)


def neural_learners(engine: Engine) -> list[OnlineLearner]:
    """The online learners behind an engine's neural speculators.

    A benchmark that wants the learning a server does in its idle time between requests
    calls ``wait_idle()`` on each after a request, and reports their ``stats()``."""
    policy = engine.policy
    drafters = list(getattr(policy, "speculators", {}).values())
    drafters.append(getattr(policy, "speculator", None))
    return [
        d.learner
        for d in drafters
        if isinstance(d, NeuralSpeculator) and isinstance(d.learner, OnlineLearner)
    ]


def close_engine(engine: Engine) -> None:
    """Stop an engine's background work (the neural learners' training threads).

    Call before the process exits: a daemon thread killed inside a torch op at
    interpreter shutdown can abort the process."""
    for learner in neural_learners(engine):
        learner.close()

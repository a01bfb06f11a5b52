"""Named decoding modes, built once from loaded models: what CLI, bench and server offer."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.capabilities import (
    CONTROLLER,
    MODES,
    NO_SPECULATOR,
    SPECULATORS,
    needs_draft_model,
    usable,
)
from atlas_sidecar.engine.controller import Controller, ControllerConfig, CostModel
from atlas_sidecar.engine.core import DEFAULT_LOOKAHEAD, Engine
from atlas_sidecar.engine.speculators.base import Drafter
from atlas_sidecar.engine.speculators.neural import NeuralSpeculator, load_cached
from atlas_sidecar.engine.speculators.neural_train import OnlineLearner, hand_over_learning
from atlas_sidecar.engine.speculators.static import StaticSpeculator
from atlas_sidecar.engine.speculators.suffix import SuffixSpeculator
from atlas_sidecar.learning.versioned import BASE_VERSION, VersionedDrafter

# Suffix drafts are nearly free, so they may run long; the controller cuts them.
SUFFIX_LOOKAHEAD = 16
ATLAS_MAX_LOOKAHEAD = 32
# The modes that must have a draft model loaded, from the speculators' capabilities.
NEEDS_DRAFT = frozenset(mode for mode in MODES if needs_draft_model(mode))

if TYPE_CHECKING:
    from atlas_sidecar.engine.backends.sglang import SGLangBackend

log = logging.getLogger(__name__)


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
    versioned: bool = False,
) -> Engine:
    """An engine for ``mode``: ``none``, one speculator of ``SPECULATORS``, or ``atlas``
    (the controller over every speculator the target and the loaded models allow).
    ``draft`` is the draft model's runner; ``config`` switches the controller's
    corrections (default: all on). ``versioned``: the suffix index and the neural head
    take published versions while serving (``learning.versioned``; hot rollout)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if needs_draft_model(mode) and draft is None:
        raise ValueError(f"mode {mode!r} needs a draft model")
    if mode == NO_SPECULATOR:
        return Engine(target, target.tokenizer)
    if mode != CONTROLLER:
        if not usable(mode, target.capabilities, draft is not None):
            raise ValueError(f"mode {mode!r} needs the target's hidden states, not available here")
        speculator = _speculator(mode, target, draft, versioned)
        reach = SUFFIX_LOOKAHEAD if speculator.capabilities.free else lookahead
        return Engine(target, target.tokenizer, speculator, lookahead=reach)
    names = [n for n in SPECULATORS if usable(n, target.capabilities, draft is not None)]
    speculators = [_speculator(name, target, draft, versioned) for name in names]
    return Engine(target, target.tokenizer, policy=_controller(target, draft, speculators, config))


def _speculator(
    name: str,
    target: CausalLMRunner | SGLangBackend,
    draft: CausalLMRunner | None,
    versioned: bool = False,
) -> Drafter:
    if name == "suffix":
        suffix = SuffixSpeculator()
        return VersionedDrafter(BASE_VERSION, suffix) if versioned else suffix
    if name == "static":
        assert draft is not None
        return StaticSpeculator(draft)
    assert name == "neural" and isinstance(target, CausalLMRunner)
    neural = neural_speculator(target)
    if versioned:  # its learner follows the stable instance (``hand_over_learning``)
        return VersionedDrafter(BASE_VERSION, neural, on_stable=hand_over_learning)
    return neural


def _controller(
    target: CausalLMRunner | SGLangBackend,
    draft: CausalLMRunner | None,
    speculators: list[Drafter],
    config: ControllerConfig | None,
) -> Controller:
    """The controller over ``speculators``, its costs profiled on the loaded models (a
    drafter of unknown cost would look free and be picked for everything at first)."""
    costs = CostModel()
    costs.profile(target)
    costs.profile_batched(target)
    for speculator in speculators:
        if speculator.capabilities.needs_draft_model:
            assert draft is not None
            costs.profile_drafter(speculator.name, draft)
    return Controller(speculators, ATLAS_MAX_LOOKAHEAD, costs, config=config)


def neural_learners(engine: Engine) -> list[OnlineLearner]:
    """The online learners behind an engine's neural speculators.

    A benchmark that wants the learning a server does in its idle time between requests
    calls ``wait_idle()`` on each after a request, and reports their ``stats()``. A
    versioned head's instances share one learner: it is listed once."""
    found: list[OnlineLearner] = []
    for d in drafter_instances(engine):
        learner = d.learner if isinstance(d, NeuralSpeculator) else None
        if isinstance(learner, OnlineLearner) and all(learner is not x for x in found):
            found.append(learner)
    return found


def drafter_instances(engine: Engine) -> list[Drafter]:
    """An engine's drafters, a versioned one's instances in its place."""
    found: list[Drafter] = []
    for d in engine.policy.drafters():
        found.extend(d.instances() if isinstance(d, VersionedDrafter) else [d])
    return found


def close_engine(engine: Engine) -> None:
    """Stop an engine's background work (the neural learners' training threads).

    Call before the process exits: a daemon thread killed inside a torch op at
    interpreter shutdown can abort the process."""
    for learner in neural_learners(engine):
        learner.close()

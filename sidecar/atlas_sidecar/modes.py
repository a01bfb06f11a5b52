"""Named decoding modes, built once from loaded models: what CLI, bench and server offer."""

from __future__ import annotations

from atlas_sidecar.backends.torch_backend import CausalLMRunner
from atlas_sidecar.controller import Controller, CostModel
from atlas_sidecar.engine import DEFAULT_LOOKAHEAD, Engine
from atlas_sidecar.speculators.static import StaticSpeculator
from atlas_sidecar.speculators.suffix import SuffixSpeculator

# Suffix drafts are nearly free, so they may run long; the controller cuts them.
SUFFIX_LOOKAHEAD = 16
ATLAS_MAX_LOOKAHEAD = 16
MODES = ("target_only", "static", "suffix", "atlas")
NEEDS_DRAFT = frozenset({"static", "atlas"})


def build_engine(
    mode: str,
    target: CausalLMRunner,
    draft: CausalLMRunner | None = None,
    lookahead: int = DEFAULT_LOOKAHEAD,
) -> Engine:
    """An engine for ``mode``; ``draft`` is the static speculator's model runner."""
    tokenizer = target.tokenizer
    if mode in ("target_only", "none"):
        return Engine(target, tokenizer)
    if mode == "suffix":
        return Engine(target, tokenizer, SuffixSpeculator(), lookahead=SUFFIX_LOOKAHEAD)
    if mode in NEEDS_DRAFT and draft is None:
        raise ValueError(f"mode {mode!r} needs a draft model")
    assert draft is not None
    if mode == "static":
        return Engine(target, tokenizer, StaticSpeculator(draft), lookahead=lookahead)
    if mode == "atlas":
        costs = CostModel()
        costs.profile(target)
        controller = Controller(
            [SuffixSpeculator(), StaticSpeculator(draft)], ATLAS_MAX_LOOKAHEAD, costs
        )
        return Engine(target, tokenizer, policy=controller)
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")

"""What each speculator and target backend can do, declared once, so that the engine,
the controller and ``build_engine`` decide by capability, never by name or probing.

A speculator class declares ``capabilities`` (a ``SpeculatorCapabilities``); a target
backend declares ``capabilities`` (a ``TargetCapabilities``). ``SPECULATORS`` is the
registry of the speculators this package ships, by name: the modes ``build_engine``
offers are ``none``, each of these, and ``atlas`` (the controller over every one the
target supports).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpeculatorCapabilities:
    """- ``free``: a draft costs about nothing per token (an index lookup), so the
      controller asks for a full-length draft and cuts it after seeing its
      confidences; a model-based drafter pays per token, so it is asked for a planned
      length instead.
    - ``learns_online``: it improves from served traffic while running.
    - ``drafts_trees``: its drafts may branch (several candidates at a position).
    - ``needs_draft_model``: it runs a separate draft model, which must be loaded.
    - ``needs_target_features``: it reads the target's hidden states, so it runs only
      on a target in this process (``TargetCapabilities.exposes_features``).
    """

    free: bool = False
    learns_online: bool = False
    drafts_trees: bool = False
    needs_draft_model: bool = False
    needs_target_features: bool = False


@dataclass(frozen=True)
class TargetCapabilities:
    """- ``verifies_trees``: one forward can verify a branching draft (tree attention);
      without it the engine verifies each draft's main chain.
    - ``exact_logits``: forward rows carry the target's full distribution, so the engine
      verifies sampled requests from them.
    - ``exact_sampling``: without exact rows, the backend verifies sampled drafts
      itself, losslessly, against draws from its own sampler
      (``SamplingTarget.verify_sampled_many``). With neither, greedy requests only.
    - ``exposes_features``: the target's final hidden states are readable here, for
      speculators that draft from them.
    - ``remote``: the target is a server in another process (``RemoteTarget``): it can
      go away and come back, so the sidecar watches its health and says NOT_SERVING
      while it is away.
    """

    verifies_trees: bool = True
    exact_logits: bool = True
    exact_sampling: bool = False
    exposes_features: bool = True
    remote: bool = False


SUFFIX = SpeculatorCapabilities(free=True, learns_online=True, drafts_trees=True)
STATIC = SpeculatorCapabilities(needs_draft_model=True)
NEURAL = SpeculatorCapabilities(learns_online=True, needs_target_features=True)

# The shipped speculators, by name (each class's ``name`` and ``capabilities``).
SPECULATORS: dict[str, SpeculatorCapabilities] = {
    "suffix": SUFFIX,
    "static": STATIC,
    "neural": NEURAL,
}
NO_SPECULATOR = "none"
CONTROLLER = "atlas"
MODES = (NO_SPECULATOR, *SPECULATORS, CONTROLLER)


def usable(name: str, target: TargetCapabilities, have_draft_model: bool) -> bool:
    """Whether speculator ``name`` can run on ``target`` with what was loaded."""
    caps = SPECULATORS[name]
    if caps.needs_target_features and not target.exposes_features:
        return False
    return have_draft_model or not caps.needs_draft_model


def needs_draft_model(mode: str) -> bool:
    """Whether ``mode`` must have a draft model loaded (``atlas``: it runs the static
    speculator among its choices)."""
    if mode == CONTROLLER:
        return any(c.needs_draft_model for c in SPECULATORS.values())
    return mode in SPECULATORS and SPECULATORS[mode].needs_draft_model

"""Speculators: everything that proposes draft tokens for the target to verify."""

from atlas_sidecar.engine.speculators.base import Drafter, DraftRequest
from atlas_sidecar.engine.speculators.static import StaticSpeculator
from atlas_sidecar.engine.tree import DraftTree

__all__ = ["DraftRequest", "DraftTree", "Drafter", "StaticSpeculator"]

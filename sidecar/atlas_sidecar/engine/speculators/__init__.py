"""Speculators: everything that proposes draft tokens for the target to verify."""

from atlas_sidecar.engine.speculators.base import Draft, Drafter, DraftRequest
from atlas_sidecar.engine.speculators.static import StaticSpeculator

__all__ = ["Draft", "DraftRequest", "Drafter", "StaticSpeculator"]

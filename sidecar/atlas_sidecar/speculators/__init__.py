"""Speculators: everything that proposes draft tokens for the target to verify."""

from atlas_sidecar.speculators.base import Draft, Drafter, DraftRequest
from atlas_sidecar.speculators.static import StaticSpeculator

__all__ = ["Draft", "DraftRequest", "Drafter", "StaticSpeculator"]

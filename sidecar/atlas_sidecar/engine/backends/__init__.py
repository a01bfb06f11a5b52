"""Target backends: run the target model for prefill and draft verification."""

from atlas_sidecar.engine.backends.base import TargetBackend
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner

__all__ = ["CausalLMRunner", "TargetBackend"]

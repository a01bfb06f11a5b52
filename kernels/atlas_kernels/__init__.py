"""GPU kernels for speculative verification, each with a PyTorch reference.

Triton is imported only when a kernel runs, so the package imports with torch alone.
"""

from .dispatch import (
    greedy_accept,
    rejection_sample,
    tree_accept,
    tree_attention_mask,
    triton_available,
)
from .reference import (
    greedy_accept_reference,
    rejection_residual_reference,
    rejection_sample_reference,
    tree_accept_reference,
    tree_attention_mask_reference,
)

__all__ = [
    "greedy_accept",
    "greedy_accept_reference",
    "rejection_residual_reference",
    "rejection_sample",
    "rejection_sample_reference",
    "tree_accept",
    "tree_accept_reference",
    "tree_attention_mask",
    "tree_attention_mask_reference",
    "triton_available",
]

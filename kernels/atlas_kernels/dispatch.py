"""Dispatchers: the Triton kernel on CUDA tensors, the PyTorch reference elsewhere."""

from __future__ import annotations

import functools
import importlib.util

import torch

from . import reference


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _kernel_wanted(tensor: torch.Tensor, use_kernel: bool | None) -> bool:
    if use_kernel is None:
        return tensor.is_cuda and triton_available()
    if use_kernel and not triton_available():
        raise RuntimeError("use_kernel=True but triton is not installed")
    return use_kernel


def _check_draft(logits: torch.Tensor, draft_tokens: torch.Tensor, per_seq: torch.Tensor) -> None:
    if logits.dim() != 3 or draft_tokens.dim() != 2:
        raise ValueError(
            f"logits must be [N, K+1, V] and draft_tokens [N, K]; got "
            f"{tuple(logits.shape)} and {tuple(draft_tokens.shape)}"
        )
    rows, num_draft = draft_tokens.shape
    if logits.shape[:2] != (rows, num_draft + 1) or per_seq.shape != (rows,):
        raise ValueError(
            f"shapes disagree: logits {tuple(logits.shape)}, draft_tokens "
            f"{tuple(draft_tokens.shape)}, per-sequence lengths {tuple(per_seq.shape)}"
        )
    if logits.shape[2] == 0:
        raise ValueError("empty vocabulary")


def greedy_accept(
    logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    *,
    use_kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy acceptance of a batch of ragged draft chains, on the logits' device.

    ``logits`` [N, K+1, V] (fp32/bf16/fp16), ``draft_tokens`` [N, K] int,
    ``draft_lens`` [N] int (<= K). Returns (accepted [N], bonus [N]) int64; see
    ``reference.greedy_accept_reference`` for the contract. ``use_kernel``: None
    picks the Triton kernel for CUDA tensors, True forces it, False the reference.
    """
    _check_draft(logits, draft_tokens, draft_lens)
    draft_tokens = draft_tokens.to(logits.device)
    draft_lens = draft_lens.to(logits.device)
    if _kernel_wanted(logits, use_kernel):
        from . import triton_impl

        return triton_impl.greedy_accept(logits, draft_tokens, draft_lens)
    return reference.greedy_accept_reference(logits, draft_tokens, draft_lens)


def tree_accept(
    logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    num_nodes: torch.Tensor,
    *,
    use_kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy acceptance down a batch of ragged draft trees, on the logits' device.

    ``parents`` [N, K] int: each node's parent node, -1 for the pending token;
    parents precede children. ``num_nodes`` [N] int (<= K). Returns (path [N, K]
    node indices root to leaf then -1, length [N], bonus [N]), int64; the same
    result as ``DraftTree.walk``-style greedy verification in
    ``atlas_sidecar.engine.sampling.verify`` per sequence.
    """
    _check_draft(logits, draft_tokens, num_nodes)
    if parents.shape != draft_tokens.shape:
        raise ValueError(f"parents {tuple(parents.shape)} vs drafts {tuple(draft_tokens.shape)}")
    draft_tokens = draft_tokens.to(logits.device)
    parents = parents.to(logits.device)
    num_nodes = num_nodes.to(logits.device)
    if _kernel_wanted(logits, use_kernel):
        from . import triton_impl

        return triton_impl.tree_accept(logits, draft_tokens, parents, num_nodes)
    return reference.tree_accept_reference(logits, draft_tokens, parents, num_nodes)


def tree_attention_mask(
    parents: torch.Tensor,
    num_nodes: torch.Tensor,
    past_lens: torch.Tensor,
    pad_past: int,
    *,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """[N, 1, K+1, pad_past + K+1] bool mask of one batched tree forward.

    New tokens are the pending token then the K draft nodes (``parents`` [N, K] as
    in ``tree_accept``; a chain is parents -1, 0, 1, ...). Query q of row r sees
    its own past keys [0, past_lens[r]), not the padding up to ``pad_past``, and
    among the new tokens itself and its ancestors; padding tokens (past
    num_nodes[r] + 1) see the past and themselves. On the parents' device.
    """
    if parents.dim() != 2 or num_nodes.shape != (parents.shape[0],):
        raise ValueError(f"parents must be [N, K], num_nodes [N]; got {tuple(parents.shape)}")
    if past_lens.shape != num_nodes.shape or pad_past < 0:
        raise ValueError(f"past_lens must be [N] and pad_past >= 0; got {pad_past}")
    num_nodes = num_nodes.to(parents.device)
    past_lens = past_lens.to(parents.device)
    if _kernel_wanted(parents, use_kernel):
        from . import triton_impl

        return triton_impl.tree_attention_mask(parents, num_nodes, past_lens, pad_past)
    return reference.tree_attention_mask_reference(parents, num_nodes, past_lens, pad_past)


def rejection_sample(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_tokens: torch.Tensor,
    generator: torch.Generator | None,
    *,
    use_kernel: bool | None = None,
) -> tuple[int, int]:
    """Rejection sampling of one draft chain: (accepted draft tokens, next token).

    ``target_probs`` [K+1, V], ``draft_probs`` [K, V] or None (one-hot q),
    ``draft_tokens`` [K]. The generator is drawn from exactly as in
    ``reference.rejection_sample_reference`` (K uniforms, then one multinomial), by
    the kernel too, so seeded output does not depend on which one runs.
    ``use_kernel``: None picks the Triton kernel for CUDA tensors, True forces it
    (fp32/bf16/fp16 probabilities), False the reference.
    """
    num_draft = draft_tokens.shape[0]
    if target_probs.dim() != 2 or target_probs.shape[0] != num_draft + 1:
        raise ValueError(
            f"target_probs must be [K+1, V] for {num_draft} draft tokens; "
            f"got {tuple(target_probs.shape)}"
        )
    if draft_probs is not None and tuple(draft_probs.shape) != (num_draft, target_probs.shape[1]):
        raise ValueError(
            f"draft_probs {tuple(draft_probs.shape)} vs target {tuple(target_probs.shape)}"
        )
    draft_tokens = draft_tokens.to(target_probs.device)
    if draft_probs is not None:
        draft_probs = draft_probs.to(target_probs.device)
    if _kernel_wanted(target_probs, use_kernel):
        from . import triton_impl

        return triton_impl.rejection_sample(target_probs, draft_probs, draft_tokens, generator)
    return reference.rejection_sample_reference(target_probs, draft_probs, draft_tokens, generator)

"""Triton kernels for batched verification: argmax, acceptance and tree masks on device.

Imported lazily by the dispatcher, never at package import. Greedy and tree
acceptance run in two launches and no host synchronisation:

1. ``_partial_argmax_kernel``: one program per (row, vocabulary split) computes
   the first index of the maximum over its split in blocks of ``BLOCK_V``; rows past
   a sequence's draft are skipped, so padding costs no memory traffic.
2. ``_greedy_accept_kernel`` / ``_tree_accept_kernel``: one program per sequence
   merges the splits into the target's token per row and walks the draft.

Ties go to the lowest index and a NaN counts as the maximum (its first occurrence
wins), exactly like ``torch.argmax``.

Rejection sampling of one chain also runs in two launches, on randomness the host
draws from the request's generator exactly as the reference does:

1. ``_rejection_partial_kernel``: one program per vocabulary split finds the first
   rejected draft position (K gathers) and runs torch.multinomial's exponential race
   over its split, argmax(r / E), both for the residual r = max(p - q, 0) and for p.
2. ``_rejection_merge_kernel``: merges the splits and takes the residual's winner,
   or p's where the residual is zero everywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference

# Elements of the vocabulary one program reduces per loop iteration.
DEFAULT_BLOCK_V = 2048
# Enough programs in flight to keep every SM of a large GPU streaming logits.
TARGET_PROGRAMS = 1024
# Sentinel index larger than any vocabulary (fits int32).
_NO_INDEX: tl.constexpr = tl.constexpr(2**31 - 1)


@triton.jit
def _partial_argmax_kernel(
    logits_ptr,
    limit_ptr,
    part_val_ptr,
    part_idx_ptr,
    stride_seq,
    stride_row,
    vocab,
    num_draft,
    split_len,
    num_splits,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)  # seq * (num_draft + 1) + position
    split = tl.program_id(1)
    seq = row // (num_draft + 1)
    position = row % (num_draft + 1)
    limit = tl.minimum(tl.maximum(tl.load(limit_ptr + seq).to(tl.int32), 0), num_draft)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, vocab)
    hi = tl.where(position <= limit, hi, lo)  # rows past the draft: an empty loop
    base = logits_ptr + seq.to(tl.int64) * stride_seq + position.to(tl.int64) * stride_row
    offsets = tl.arange(0, BLOCK_V)
    # Per lane: its best value so far and the first index holding it.
    best_val = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK_V], _NO_INDEX, tl.int32)
    first_nan = tl.full([BLOCK_V], _NO_INDEX, tl.int32)
    for start in range(lo, hi, BLOCK_V):
        index = start + offsets
        in_range = index < hi
        x = tl.load(base + index, mask=in_range, other=float("-inf")).to(tl.float32)
        is_nan = x != x
        first_nan = tl.minimum(first_nan, tl.where(is_nan & in_range, index, _NO_INDEX))
        x = tl.where(is_nan, float("-inf"), x)
        # Strictly greater keeps the earlier index; an unset lane takes its first value
        # so that a row of -inf still yields its first index.
        take = in_range & ((x > best_val) | (best_idx == _NO_INDEX))
        best_val = tl.where(take, x, best_val)
        best_idx = tl.where(take, index, best_idx)
    row_max = tl.max(best_val, axis=0)
    row_idx = tl.min(tl.where(best_val == row_max, best_idx, _NO_INDEX), axis=0)
    row_nan = tl.min(first_nan, axis=0)
    has_nan = row_nan < _NO_INDEX
    out = row.to(tl.int64) * num_splits + split
    tl.store(part_val_ptr + out, tl.where(has_nan, float("nan"), row_max))
    tl.store(part_idx_ptr + out, tl.where(has_nan, row_nan, row_idx))


@triton.jit
def _merge_splits(
    part_val_ptr, part_idx_ptr, seq, limit, num_draft, num_splits, ROWS: tl.constexpr
):
    """[ROWS] int32: the target's token after each row of ``seq`` (rows > limit: junk)."""
    positions = tl.arange(0, ROWS)
    live = positions <= limit
    base = (seq.to(tl.int64) * (num_draft + 1) + positions) * num_splits
    best_val = tl.load(part_val_ptr + base, mask=live, other=float("-inf"))
    best_idx = tl.load(part_idx_ptr + base, mask=live, other=0)
    # Splits come in vocabulary order: a later split wins only when strictly better.
    for split in range(1, num_splits):
        val = tl.load(part_val_ptr + base + split, mask=live, other=float("-inf"))
        idx = tl.load(part_idx_ptr + base + split, mask=live, other=0)
        best_is_nan = best_val != best_val
        val_is_nan = val != val
        take = (~best_is_nan) & (val_is_nan | (val > best_val))
        best_val = tl.where(take, val, best_val)
        best_idx = tl.where(take, idx, best_idx)
    return best_idx


@triton.jit
def _greedy_accept_kernel(
    part_val_ptr,
    part_idx_ptr,
    draft_ptr,
    lens_ptr,
    accepted_ptr,
    bonus_ptr,
    stride_draft_seq,
    stride_draft_pos,
    num_draft,
    num_splits,
    ROWS: tl.constexpr,
):
    seq = tl.program_id(0)
    limit = tl.minimum(tl.maximum(tl.load(lens_ptr + seq).to(tl.int32), 0), num_draft)
    tokens = _merge_splits(part_val_ptr, part_idx_ptr, seq, limit, num_draft, num_splits, ROWS)
    positions = tl.arange(0, ROWS)
    drafted = positions < limit
    draft = tl.load(
        draft_ptr + seq.to(tl.int64) * stride_draft_seq + positions * stride_draft_pos,
        mask=drafted,
        other=-1,
    )
    match = drafted & (draft.to(tl.int64) == tokens.to(tl.int64))
    # The first position that does not match; position ``limit`` never matches.
    accepted = tl.min(tl.where(match, ROWS, positions), axis=0)
    bonus = tl.sum(tl.where(positions == accepted, tokens, 0), axis=0)
    tl.store(accepted_ptr + seq, accepted.to(tl.int64))
    tl.store(bonus_ptr + seq, bonus.to(tl.int64))


@triton.jit
def _tree_accept_kernel(
    part_val_ptr,
    part_idx_ptr,
    draft_ptr,
    parents_ptr,
    nodes_ptr,
    path_ptr,
    length_ptr,
    bonus_ptr,
    stride_draft_seq,
    stride_draft_pos,
    stride_parent_seq,
    stride_parent_pos,
    num_draft,
    num_splits,
    ROWS: tl.constexpr,
):
    seq = tl.program_id(0)
    limit = tl.minimum(tl.maximum(tl.load(nodes_ptr + seq).to(tl.int32), 0), num_draft)
    tokens = _merge_splits(part_val_ptr, part_idx_ptr, seq, limit, num_draft, num_splits, ROWS)
    rows = tl.arange(0, ROWS)  # row 0: the pending token; row j+1: node j
    nodes = tl.arange(0, ROWS)
    in_tree = nodes < limit
    draft = tl.load(
        draft_ptr + seq.to(tl.int64) * stride_draft_seq + nodes * stride_draft_pos,
        mask=in_tree,
        other=-1,
    ).to(tl.int64)
    parent = tl.load(
        parents_ptr + seq.to(tl.int64) * stride_parent_seq + nodes * stride_parent_pos,
        mask=in_tree,
        other=-2,
    ).to(tl.int32)
    current = tl.full([], -1, tl.int32)
    length = tl.full([], 0, tl.int32)
    path = tl.full([ROWS], -1, tl.int32)
    for step in range(0, num_draft):  # a path has at most K nodes
        wanted = tl.sum(tl.where(rows == current + 1, tokens, 0), axis=0).to(tl.int64)
        candidate = in_tree & (parent == current) & (draft == wanted)
        child = tl.min(tl.where(candidate, nodes, ROWS), axis=0)
        found = (child < ROWS) & (length == step)  # a row that stops matching stays stopped
        path = tl.where(found & (nodes == step), child, path)
        length += found.to(tl.int32)
        current = tl.where(found, child, current)
    bonus = tl.sum(tl.where(rows == current + 1, tokens, 0), axis=0)
    out = seq.to(tl.int64) * num_draft + nodes
    tl.store(path_ptr + out, path.to(tl.int64), mask=nodes < num_draft)
    tl.store(length_ptr + seq, length.to(tl.int64))
    tl.store(bonus_ptr + seq, bonus.to(tl.int64))


@triton.jit
def _tree_attention_mask_kernel(
    parents_ptr,
    nodes_ptr,
    past_ptr,
    mask_ptr,
    stride_parent_seq,
    stride_parent_pos,
    num_draft,
    pad_past,
    WIDTH: tl.constexpr,
    BLOCK_PAST: tl.constexpr,
):
    seq = tl.program_id(0)
    query = tl.program_id(1)
    width = num_draft + 1
    limit = tl.minimum(tl.maximum(tl.load(nodes_ptr + seq).to(tl.int32), 0), num_draft)
    past = tl.minimum(tl.maximum(tl.load(past_ptr + seq).to(tl.int32), 0), pad_past)
    row_ptr = mask_ptr + (seq.to(tl.int64) * width + query) * (pad_past + width)
    offsets = tl.arange(0, BLOCK_PAST)
    for start in range(0, pad_past, BLOCK_PAST):
        key = start + offsets
        tl.store(row_ptr + key, (key < past).to(tl.uint8), mask=key < pad_past)
    # Parent of each new token in token indices; -1 for the pending token and padding.
    tokens = tl.arange(0, WIDTH)
    in_tree = (tokens >= 1) & (tokens <= limit)
    node_parent = tl.load(
        parents_ptr + seq.to(tl.int64) * stride_parent_seq + (tokens - 1) * stride_parent_pos,
        mask=in_tree,
        other=-2,
    ).to(tl.int32)
    token_parent = tl.where(in_tree, node_parent + 1, -1)
    seen = tokens == query
    current = query
    for _ in range(0, num_draft):  # walk up: a path from the root has at most K nodes
        up = tl.sum(tl.where(tokens == current, token_parent, 0), axis=0)
        current = tl.where(current >= 0, up, -1)
        seen = seen | ((tokens == current) & (current >= 0))
    tl.store(row_ptr + pad_past + tokens, seen.to(tl.uint8), mask=tokens < width)


@triton.jit
def _first_rejection(
    target_ptr,
    draft_probs_ptr,
    draft_ptr,
    uniform_ptr,
    stride_target,
    stride_draft_probs,
    stride_draft,
    vocab,
    num_draft,
    HAS_DRAFT_PROBS: tl.constexpr,
    ROWS: tl.constexpr,
):
    """(first rejected position, or K if none; its draft token) of one chain.

    Token i is accepted when q(x_i) > 0 and u_i * q(x_i) < p(x_i), tested in float64
    like the reference's Python floats: the product of two float32 values is exact
    there, so the kernel and the reference agree on every comparison. A token outside
    the vocabulary reads p = 0 and is rejected (the reference raises).
    """
    positions = tl.arange(0, ROWS)
    drafted = positions < num_draft
    token = tl.load(draft_ptr + positions * stride_draft, mask=drafted, other=0).to(tl.int64)
    in_vocab = drafted & (token >= 0) & (token < vocab)
    rows = positions.to(tl.int64)
    p = tl.load(target_ptr + rows * stride_target + token, mask=in_vocab, other=0.0)
    p = p.to(tl.float32).to(tl.float64)
    if HAS_DRAFT_PROBS:
        q = tl.load(draft_probs_ptr + rows * stride_draft_probs + token, mask=in_vocab, other=0.0)
        q = q.to(tl.float64)
    else:
        q = tl.full([ROWS], 1.0, tl.float64)  # a deterministic drafter: q one-hot
    u = tl.load(uniform_ptr + positions, mask=drafted, other=1.0).to(tl.float64)
    accept = (q > 0) & (u * q < p)
    rejected = tl.min(tl.where(drafted & ~accept, positions, ROWS), axis=0)
    rejected = tl.minimum(rejected, num_draft)
    rejected_token = tl.sum(tl.where(positions == rejected, token, 0), axis=0)
    return rejected, rejected_token


@triton.jit
def _rejection_partial_kernel(
    target_ptr,
    draft_probs_ptr,
    draft_ptr,
    uniform_ptr,
    expo_ptr,
    part_val_ptr,
    part_idx_ptr,
    part_mass_ptr,
    stride_target,
    stride_draft_probs,
    stride_draft,
    vocab,
    num_draft,
    split_len,
    HAS_DRAFT_PROBS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    split = tl.program_id(0)
    # Every split finds the same rejected position: K gathers, cheaper than a launch.
    rejected, rejected_token = _first_rejection(
        target_ptr,
        draft_probs_ptr,
        draft_ptr,
        uniform_ptr,
        stride_target,
        stride_draft_probs,
        stride_draft,
        vocab,
        num_draft,
        HAS_DRAFT_PROBS,
        ROWS,
    )
    residual_mode = rejected < num_draft
    lo = split * split_len
    hi = tl.minimum(lo + split_len, vocab)
    q_hi = tl.where(residual_mode, hi, lo)  # all accepted: q is not read
    p_row = target_ptr + rejected.to(tl.int64) * stride_target
    q_row = draft_probs_ptr + rejected.to(tl.int64) * stride_draft_probs
    offsets = tl.arange(0, BLOCK_V)
    # Per lane: the best ratio so far and the first index holding it, for the residual
    # max(p - q, 0) and for p itself (the fallback when the residual is all zero).
    res_val = tl.full([BLOCK_V], float("-inf"), tl.float32)
    res_idx = tl.full([BLOCK_V], _NO_INDEX, tl.int32)
    row_val = tl.full([BLOCK_V], float("-inf"), tl.float32)
    row_idx = tl.full([BLOCK_V], _NO_INDEX, tl.int32)
    mass = tl.zeros([BLOCK_V], tl.float32)
    for start in range(lo, hi, BLOCK_V):
        index = start + offsets
        in_range = index < hi
        p = tl.load(p_row + index, mask=in_range, other=0.0).to(tl.float32)
        expo = tl.load(expo_ptr + index, mask=in_range, other=1.0)
        if HAS_DRAFT_PROBS:
            q = tl.load(q_row + index, mask=index < q_hi, other=0.0)
            residual = tl.maximum(p - q.to(tl.float32), 0.0)
        else:
            residual = tl.where(residual_mode & (index == rejected_token), 0.0, p)
        mass += tl.where(in_range, residual, 0.0)
        # Correctly rounded, as torch divides: ratios that nearly tie compare the same.
        ratio = tl.math.div_rn(residual, expo)
        take = in_range & (ratio > res_val)  # strictly greater keeps the earlier index
        res_val = tl.where(take, ratio, res_val)
        res_idx = tl.where(take, index, res_idx)
        ratio = tl.math.div_rn(p, expo)
        take = in_range & (ratio > row_val)
        row_val = tl.where(take, ratio, row_val)
        row_idx = tl.where(take, index, row_idx)
    out = split.to(tl.int64) * 2
    best = tl.max(res_val, axis=0)
    tl.store(part_val_ptr + out, best)
    tl.store(part_idx_ptr + out, tl.min(tl.where(res_val == best, res_idx, _NO_INDEX), axis=0))
    best = tl.max(row_val, axis=0)
    tl.store(part_val_ptr + out + 1, best)
    tl.store(part_idx_ptr + out + 1, tl.min(tl.where(row_val == best, row_idx, _NO_INDEX), axis=0))
    tl.store(part_mass_ptr + split, tl.sum(mass, axis=0))


@triton.jit
def _first_max(values, indices):
    """The index at the first maximum of ``values`` (indices ascending with position)."""
    best = tl.max(values, axis=0)
    return tl.min(tl.where(values == best, indices, _NO_INDEX), axis=0)


@triton.jit
def _rejection_merge_kernel(
    target_ptr,
    draft_probs_ptr,
    draft_ptr,
    uniform_ptr,
    part_val_ptr,
    part_idx_ptr,
    part_mass_ptr,
    out_ptr,
    stride_target,
    stride_draft_probs,
    stride_draft,
    vocab,
    num_draft,
    num_splits,
    HAS_DRAFT_PROBS: tl.constexpr,
    ROWS: tl.constexpr,
    SPLITS: tl.constexpr,
):
    rejected, _ = _first_rejection(
        target_ptr,
        draft_probs_ptr,
        draft_ptr,
        uniform_ptr,
        stride_target,
        stride_draft_probs,
        stride_draft,
        vocab,
        num_draft,
        HAS_DRAFT_PROBS,
        ROWS,
    )
    splits = tl.arange(0, SPLITS)
    live = splits < num_splits
    # Splits come in vocabulary order, each with the first index of its maximum, so
    # the first split index at the overall maximum is the global first index.
    res_val = tl.load(part_val_ptr + splits * 2, mask=live, other=float("-inf"))
    res_idx = tl.load(part_idx_ptr + splits * 2, mask=live, other=_NO_INDEX)
    row_val = tl.load(part_val_ptr + splits * 2 + 1, mask=live, other=float("-inf"))
    row_idx = tl.load(part_idx_ptr + splits * 2 + 1, mask=live, other=_NO_INDEX)
    mass = tl.sum(tl.load(part_mass_ptr + splits, mask=live, other=0.0), axis=0)
    # An all-zero residual (p == q where q > 0) samples p itself, as the reference does.
    token = tl.where(mass <= 0.0, _first_max(row_val, row_idx), _first_max(res_val, res_idx))
    tl.store(out_ptr, rejected.to(tl.int64))
    tl.store(out_ptr + 1, token.to(tl.int64))


def _check_runnable(tensor: torch.Tensor) -> None:
    if not tensor.is_cuda and not _interpreting():
        raise RuntimeError(
            "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
            f"imported); got a tensor on {tensor.device}"
        )


def _interpreting() -> bool:
    return type(_partial_argmax_kernel).__name__ == "InterpretedFunction"


def _rows_pow2(num_draft: int) -> int:
    return triton.next_power_of_2(num_draft + 1)


def _target_tokens(
    logits: torch.Tensor,
    limits: torch.Tensor,
    block_v: int | None,
    num_splits: int | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stage 1: per (row, split) partial argmax. Returns (values, indices, num_splits)."""
    _check_runnable(logits)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, width, vocab = logits.shape
    block = block_v or min(DEFAULT_BLOCK_V, triton.next_power_of_2(vocab))
    blocks = triton.cdiv(vocab, block)
    if num_splits is None:
        num_splits = max(1, min(blocks, TARGET_PROGRAMS // max(1, rows * width)))
    # Whole blocks per split, so every split but the last starts on a block boundary.
    split_len = triton.cdiv(blocks, num_splits) * block
    num_splits = triton.cdiv(vocab, split_len)
    part_val = torch.empty(rows * width, num_splits, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(rows * width, num_splits, dtype=torch.int32, device=logits.device)
    _partial_argmax_kernel[(rows * width, num_splits)](
        logits,
        limits,
        part_val,
        part_idx,
        logits.stride(0),
        logits.stride(1),
        vocab,
        width - 1,
        split_len,
        num_splits,
        BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return part_val, part_idx, num_splits


def greedy_accept(
    logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    *,
    block_v: int | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.greedy_accept_reference`` (same contract)."""
    rows, num_draft = draft_tokens.shape
    part_val, part_idx, splits = _target_tokens(logits, draft_lens, block_v, num_splits)
    accepted = torch.empty(rows, dtype=torch.long, device=logits.device)
    bonus = torch.empty(rows, dtype=torch.long, device=logits.device)
    _greedy_accept_kernel[(rows,)](
        part_val,
        part_idx,
        draft_tokens,
        draft_lens,
        accepted,
        bonus,
        draft_tokens.stride(0),
        draft_tokens.stride(1),
        num_draft,
        splits,
        ROWS=_rows_pow2(num_draft),
    )
    return accepted, bonus


def tree_accept(
    logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    num_nodes: torch.Tensor,
    *,
    block_v: int | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.tree_accept_reference`` (same contract)."""
    rows, num_draft = draft_tokens.shape
    part_val, part_idx, splits = _target_tokens(logits, num_nodes, block_v, num_splits)
    path = torch.empty(rows, num_draft, dtype=torch.long, device=logits.device)
    length = torch.empty(rows, dtype=torch.long, device=logits.device)
    bonus = torch.empty(rows, dtype=torch.long, device=logits.device)
    _tree_accept_kernel[(rows,)](
        part_val,
        part_idx,
        draft_tokens,
        parents,
        num_nodes,
        path,
        length,
        bonus,
        draft_tokens.stride(0),
        draft_tokens.stride(1),
        parents.stride(0),
        parents.stride(1),
        num_draft,
        splits,
        ROWS=_rows_pow2(num_draft),
    )
    return path, length, bonus


def tree_attention_mask(
    parents: torch.Tensor,
    num_nodes: torch.Tensor,
    past_lens: torch.Tensor,
    pad_past: int,
    *,
    block_past: int = 1024,
) -> torch.Tensor:
    """Triton version of ``reference.tree_attention_mask_reference`` (same contract)."""
    _check_runnable(parents)
    rows, num_draft = parents.shape
    width = num_draft + 1
    mask = torch.empty(rows, 1, width, pad_past + width, dtype=torch.bool, device=parents.device)
    _tree_attention_mask_kernel[(rows, width)](
        parents,
        num_nodes,
        past_lens,
        mask.view(torch.uint8),
        parents.stride(0),
        parents.stride(1),
        num_draft,
        pad_past,
        WIDTH=_rows_pow2(num_draft),
        BLOCK_PAST=block_past,
    )
    return mask


def rejection_sample(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_tokens: torch.Tensor,
    generator: torch.Generator | None,
    *,
    block_v: int | None = None,
    num_splits: int | None = None,
) -> tuple[int, int]:
    """Triton version of ``reference.rejection_sample_reference`` (same contract).

    Draws what the reference draws, in its order, from ``generator`` on the target's
    device: ``torch.rand(K)``, then the V float32 exponentials one
    ``torch.multinomial`` sample consumes (it returns argmax(row / E)). The kernels
    then run the accept test and that exponential race over vocabulary splits, on
    the unnormalised residual: argmax(r / (s E)) = argmax(r / E) for a sum s > 0.
    So the result and the generator's state equal the reference's, except where two
    tokens' r / E agree to within the rounding of the skipped division by s.
    """
    _check_runnable(target_probs)
    if reference.sampling_dtype(target_probs) != torch.float32:
        raise ValueError(
            f"the kernel samples in float32: target_probs must be fp32, bf16 or fp16, not "
            f"{target_probs.dtype} (use_kernel=False runs the reference)"
        )
    device = target_probs.device
    num_draft = draft_tokens.shape[0]
    vocab = target_probs.shape[1]
    uniforms = torch.rand(num_draft, generator=generator, device=device)
    expo = torch.empty(vocab, dtype=torch.float32, device=device).exponential_(
        1, generator=generator
    )
    if target_probs.stride(-1) != 1:
        target_probs = target_probs.contiguous()
    has_draft_probs = draft_probs is not None
    if draft_probs is None:
        draft_probs = target_probs  # never read
    elif draft_probs.stride(-1) != 1:
        draft_probs = draft_probs.contiguous()
    draft_tokens = draft_tokens.to(device)
    block = block_v or min(DEFAULT_BLOCK_V, triton.next_power_of_2(vocab))
    blocks = triton.cdiv(vocab, block)
    if num_splits is None:
        num_splits = max(1, min(blocks, TARGET_PROGRAMS))
    # Whole blocks per split, so every split but the last starts on a block boundary.
    split_len = triton.cdiv(blocks, num_splits) * block
    num_splits = triton.cdiv(vocab, split_len)
    part_val = torch.empty(num_splits, 2, dtype=torch.float32, device=device)
    part_idx = torch.empty(num_splits, 2, dtype=torch.int32, device=device)
    part_mass = torch.empty(num_splits, dtype=torch.float32, device=device)
    out = torch.empty(2, dtype=torch.long, device=device)
    common = (
        target_probs.stride(0),
        draft_probs.stride(0),
        draft_tokens.stride(0),
        vocab,
        num_draft,
    )
    _rejection_partial_kernel[(num_splits,)](
        target_probs,
        draft_probs,
        draft_tokens,
        uniforms,
        expo,
        part_val,
        part_idx,
        part_mass,
        *common,
        split_len,
        HAS_DRAFT_PROBS=has_draft_probs,
        ROWS=_rows_pow2(num_draft),
        BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
    )
    _rejection_merge_kernel[(1,)](
        target_probs,
        draft_probs,
        draft_tokens,
        uniforms,
        part_val,
        part_idx,
        part_mass,
        out,
        *common,
        num_splits,
        HAS_DRAFT_PROBS=has_draft_probs,
        ROWS=_rows_pow2(num_draft),
        SPLITS=triton.next_power_of_2(num_splits),
    )
    accepted, token = out.tolist()
    return accepted, token

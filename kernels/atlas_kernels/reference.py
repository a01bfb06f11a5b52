"""Pure-PyTorch references for the verification kernels: the spec, on any device.

Every function here is batched and free of per-sequence Python loops and host
round trips (loops run over draft positions, never over sequences), so it is also
the fallback the dispatcher uses where Triton cannot run. The Triton kernels in
``triton_impl`` must return exactly what these return.
"""

from __future__ import annotations

import torch


def _tokens_after(logits: torch.Tensor) -> torch.Tensor:
    """[N, K+1] int64: the target's greedy token after each row (ties: lowest index)."""
    return logits.argmax(dim=-1)


def greedy_accept_reference(
    logits: torch.Tensor, draft_tokens: torch.Tensor, draft_lens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy acceptance of ragged draft chains: (accepted [N], bonus [N]), int64.

    ``logits`` [N, K+1, V]: row 0 follows the pending token, row j+1 follows draft
    token j. ``draft_tokens`` [N, K]: sequence i drafts its first ``draft_lens[i]``
    entries (clamped to [0, K]); the rest is padding and never read as a match.
    ``accepted[i]`` is the longest draft prefix equal to the target's argmax,
    ``bonus[i]`` the target's argmax right after that prefix.
    """
    num_draft = draft_tokens.shape[1]
    tokens = _tokens_after(logits)
    lens = draft_lens.to(device=logits.device, dtype=torch.long).clamp(0, num_draft)
    positions = torch.arange(num_draft, device=logits.device)
    match = (draft_tokens.to(torch.long) == tokens[:, :num_draft]) & (positions < lens[:, None])
    accepted = match.to(torch.long).cumprod(dim=1).sum(dim=1)
    bonus = tokens.gather(1, accepted[:, None]).squeeze(1)
    return accepted, bonus


def tree_accept_reference(
    logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    num_nodes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy acceptance down ragged draft trees: (path [N, K], length [N], bonus [N]).

    ``parents[i, j]`` is node j's parent among the draft nodes (-1: the pending
    token); parents precede children. Sequence i has ``num_nodes[i]`` nodes (clamped
    to [0, K]). ``logits`` row 0 follows the pending token, row j+1 follows node j.
    From the pending token, step to the child whose token is the target's argmax
    (the lowest-indexed such child), until none matches. ``path[i]`` holds the
    accepted node indices root to leaf, then -1; ``bonus[i]`` is the target's
    argmax after the last accepted node. All int64.
    """
    rows, num_draft = draft_tokens.shape
    device = logits.device
    tokens = _tokens_after(logits)
    nodes = torch.arange(num_draft, device=device)
    valid = nodes < num_nodes.to(device=device, dtype=torch.long).clamp(0, num_draft)[:, None]
    parents = parents.to(torch.long)
    draft = draft_tokens.to(torch.long)
    current = torch.full((rows,), -1, dtype=torch.long, device=device)
    length = torch.zeros(rows, dtype=torch.long, device=device)
    path = torch.full((rows, num_draft), -1, dtype=torch.long, device=device)
    # A path has at most K nodes; a row that stops matching stays stopped.
    for step in range(num_draft):
        wanted = tokens.gather(1, (current + 1)[:, None])
        candidates = valid & (parents == current[:, None]) & (draft == wanted)
        child = torch.where(candidates, nodes, num_draft).min(dim=1).values
        found = (child < num_draft) & (length == step)
        path[:, step] = torch.where(found, child, -1)
        length += found.to(torch.long)
        current = torch.where(found, child, current)
    bonus = tokens.gather(1, (current + 1)[:, None]).squeeze(1)
    return path, length, bonus


def tree_attention_mask_reference(
    parents: torch.Tensor, num_nodes: torch.Tensor, past_lens: torch.Tensor, pad_past: int
) -> torch.Tensor:
    """The 4D mask of one batched tree forward: [N, 1, K+1, pad_past + K+1] bool.

    Keys are [past | padding up to ``pad_past`` | new tokens]; the new tokens are the
    pending token (index 0) then the draft nodes (index j+1 for node j). Query q of
    row r sees the first ``past_lens[r]`` keys (clamped to [0, pad_past]), never the
    padding, and among the new tokens itself and its ancestors. New tokens past
    ``num_nodes[r] + 1`` are padding: they see the past and themselves only, so no
    row of the mask is all False.
    """
    rows, num_draft = parents.shape
    width = num_draft + 1
    device = parents.device
    limit = num_nodes.to(device=device, dtype=torch.long).clamp(0, num_draft)
    # Parent of each new token in token indices; -1 for the pending token and padding.
    token_parent = torch.full((rows, width), -1, dtype=torch.long, device=device)
    in_tree = torch.arange(num_draft, device=device) < limit[:, None]
    token_parent[:, 1:] = torch.where(in_tree, parents.to(torch.long) + 1, -1)
    tokens = torch.arange(width, device=device)
    seen = tokens[None, :, None] == tokens[None, None, :]  # [1, q, key]: itself
    seen = seen.expand(rows, width, width).clone()
    current = tokens.expand(rows, width).clone()
    for _ in range(num_draft):  # a path from the root has at most K nodes
        up = token_parent.gather(1, current.clamp(min=0))
        current = torch.where(current >= 0, up, -1)
        seen |= (current[:, :, None] == tokens[None, None, :]) & (current[:, :, None] >= 0)
    past = past_lens.to(device=device, dtype=torch.long).clamp(0, pad_past)
    sees_past = torch.arange(pad_past, device=device)[None, :] < past[:, None]
    mask = torch.empty(rows, 1, width, pad_past + width, dtype=torch.bool, device=device)
    mask[:, 0, :, :pad_past] = sees_past[:, None, :]
    mask[:, 0, :, pad_past:] = seen
    return mask


def sampling_dtype(target_probs: torch.Tensor) -> torch.dtype:
    """The dtype rejection sampling computes in: float32, or float64 for float64 input."""
    return torch.promote_types(target_probs.dtype, torch.float32)


def rejection_residual_reference(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_tokens: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[int, torch.Tensor]:
    """Rejection sampling of one draft chain, given its pre-drawn uniforms.

    ``target_probs`` [K+1, V]: p after the pending token, then after each draft
    token. ``draft_probs`` [K, V]: q each draft token was drawn from; None is a
    deterministic drafter (q one-hot on its token). ``uniforms`` [K]. Token i is
    accepted when u_i * q(x_i) < p(x_i) (and q(x_i) > 0); the first rejected
    position returns (i, norm(max(p - q, 0))) (p itself when that is all zero: p == q
    and the rejection was impossible in exact arithmetic); if all K are accepted,
    (K, p's last row). The caller samples the next token from that row.

    The returned row is float32 for half-precision inputs (float64 stays float64):
    sampling from a bf16 row would divide in bf16, where quotients tie often and the
    tie goes to the lowest index, a bias; and one sampling dtype whatever the outcome
    lets the Triton kernel draw its randomness before it knows which row it samples.

    One sequence, on the host: the comparisons are made in Python floats on the K
    gathered probabilities, and only the rejected row is copied, so a [K+1, V]
    distribution over a large vocabulary is read once, not per position.
    """
    num_draft = draft_tokens.shape[0]
    if num_draft == 0:
        return 0, target_probs[0].to(sampling_dtype(target_probs))
    positions = torch.arange(num_draft, device=target_probs.device)
    tokens = draft_tokens.to(device=target_probs.device, dtype=torch.long)
    p_tok = target_probs[positions, tokens].tolist()
    q_tok = [1.0] * num_draft if draft_probs is None else draft_probs[positions, tokens].tolist()
    for i, (u, p, q) in enumerate(zip(uniforms.tolist(), p_tok, q_tok, strict=True)):
        if q > 0 and u * q < p:
            continue
        row = target_probs[i].to(sampling_dtype(target_probs))
        if draft_probs is None:
            residual = row.clone()
            residual[int(tokens[i])] = 0.0
        else:
            residual = (row - draft_probs[i].to(row.dtype)).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:
            residual = row
        return i, residual / residual.sum()
    return num_draft, target_probs[num_draft].to(sampling_dtype(target_probs))


def rejection_sample_reference(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_tokens: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Speculative (rejection) sampling of one chain: (accepted, next token).

    Draws exactly ``torch.rand(K)`` then one ``torch.multinomial`` from
    ``generator``, in that order, so a seeded request reproduces; see
    ``rejection_residual_reference`` for the rule. (One multinomial sample is drawn
    as torch's exponential race: V draws E ~ Exp(1) in the row's dtype, then
    argmax(row / E); the Triton kernel draws the same and runs the race itself.)
    """
    uniforms = torch.rand(draft_tokens.shape[0], generator=generator, device=target_probs.device)
    accepted, row = rejection_residual_reference(target_probs, draft_probs, draft_tokens, uniforms)
    return accepted, int(torch.multinomial(row, 1, generator=generator).item())

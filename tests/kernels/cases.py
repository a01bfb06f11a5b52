"""Random verification inputs with the hard cases built in: ties, ragged drafts, trees."""

from __future__ import annotations

import torch


def tied_logits(
    rows: int, num_draft: int, vocab: int, dtype: torch.dtype, generator: torch.Generator
) -> torch.Tensor:
    """[rows, K+1, V] logits on a coarse grid, so every row has many exact ties at its max."""
    levels = torch.randint(-4, 4, (rows, num_draft + 1, vocab), generator=generator)
    return (levels.to(torch.float32) * 0.5).to(dtype)


def greedy_case(
    rows: int, num_draft: int, vocab: int, dtype: torch.dtype, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, draft_tokens, draft_lens): drafts follow the argmax, then break at random."""
    logits = tied_logits(rows, num_draft, vocab, dtype, generator)
    target = logits.argmax(dim=-1)
    draft = target[:, :num_draft].clone()
    lens = torch.randint(0, num_draft + 1, (rows,), generator=generator)
    for row in range(rows):
        breaks_at = int(torch.randint(0, num_draft + 2, (1,), generator=generator))
        if breaks_at < num_draft:  # otherwise the whole draft agrees
            draft[row, breaks_at] = (draft[row, breaks_at] + 1) % vocab
        padding = slice(int(lens[row]), num_draft)
        # Padding that would match if read: a kernel that ignores draft_lens fails.
        draft[row, padding] = target[row, padding]
    return logits, draft, lens


def random_parents(num_nodes: int, generator: torch.Generator) -> list[int]:
    """A random tree in which parents precede children (-1: the pending token)."""
    return [int(torch.randint(-1, node, (1,), generator=generator)) for node in range(num_nodes)]


def tree_case(
    rows: int, num_draft: int, vocab: int, dtype: torch.dtype, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, draft_tokens, parents, num_nodes) where many nodes match the target,
    siblings often share a token (the lowest index must win) and padding would match."""
    logits = tied_logits(rows, num_draft, vocab, dtype, generator)
    target = logits.argmax(dim=-1)
    draft = torch.randint(0, vocab, (rows, num_draft), generator=generator)
    parents = torch.full((rows, num_draft), -1, dtype=torch.long)
    num_nodes = torch.randint(0, num_draft + 1, (rows,), generator=generator)
    for row in range(rows):
        parents[row] = torch.tensor(random_parents(num_draft, generator), dtype=torch.long)
        for node in range(num_draft):
            if float(torch.rand(1, generator=generator)) < 0.7:
                draft[row, node] = target[row, int(parents[row, node]) + 1]
    return logits, draft, parents, num_nodes


def rejection_case(
    num_draft: int,
    vocab: int,
    target_dtype: torch.dtype,
    draft_dtype: torch.dtype | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(target_probs [K+1, V], draft_probs [K, V] or None, draft_tokens [K]) for one chain.

    ``draft_dtype`` None is a deterministic drafter (random tokens, q one-hot). At each
    position the target agrees with the drafter with chance 0.5 (p = q, or p one-hot
    on the token), which accepts it whatever the uniform, so drafts are accepted whole
    as well as cut early; with chance 0.3 p is a mix of that and a random row, so a
    rejected token still holds most of p's mass and must be left out of the residual.
    About a third of p and q is zero (top-k-like), so residuals have zeros."""

    def probs(rows: int) -> torch.Tensor:
        logits = torch.randn(rows, vocab, generator=generator) * 2.0
        cut = torch.rand(rows, vocab, generator=generator) < 0.3
        cut[:, 0] = False  # keep every row a distribution
        return logits.masked_fill(cut, float("-inf")).softmax(dim=-1)

    target = probs(num_draft + 1)
    if draft_dtype is None:
        draft = None
        tokens = torch.randint(0, vocab, (num_draft,), generator=generator)
    else:
        draft = probs(num_draft)
        tokens = (
            torch.multinomial(draft, 1, generator=generator)[:, 0]
            if num_draft
            else torch.zeros(0, dtype=torch.long)
        )
    for i in range(num_draft):
        if draft is None:
            agree = torch.nn.functional.one_hot(tokens[i], vocab).to(torch.float32)
        else:
            agree = draft[i]
        roll = float(torch.rand(1, generator=generator))
        if roll < 0.5:
            target[i] = agree
        elif roll < 0.8:  # close: rejections leave a small, peaked residual
            weight = 0.3 + 0.6 * float(torch.rand(1, generator=generator))
            target[i] = weight * agree + (1.0 - weight) * target[i]
    draft = None if draft is None else draft.to(draft_dtype)
    return target.to(target_dtype), draft, tokens

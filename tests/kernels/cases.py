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

"""sampling.verify returns what the per-sequence loops it replaced returned.

The old loops are copied here as the oracle, including verify_sampled's exact use of
the generator, so seeded sampled output is unchanged by the move to atlas_kernels.
"""

from __future__ import annotations

import pytest
import torch

from atlas_sidecar.engine.sampling import SamplingParams, probs_from_logits, verify
from atlas_sidecar.engine.tree import DraftTree

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8, top_k=5)


def old_verify_greedy(draft, target_logits):
    target_tokens = target_logits.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(draft) and draft[accepted] == target_tokens[accepted]:
        accepted += 1
    return accepted, target_tokens[accepted]


def old_verify_tree_greedy(draft, parents, target_logits):
    target_tokens = target_logits.argmax(dim=-1).tolist()
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        children.setdefault(parent, []).append(i)
    path, current = [], -1
    while True:
        wanted = target_tokens[current + 1]
        nxt = next((c for c in children.get(current, []) if draft[c] == wanted), None)
        if nxt is None:
            return path, wanted
        path.append(nxt)
        current = nxt


def old_verify_sampled(draft, draft_probs, target_probs, generator):
    uniforms = torch.rand(len(draft), generator=generator, device=target_probs.device).tolist()
    for i, token in enumerate(draft):
        p = target_probs[i]
        q_token = 1.0 if draft_probs is None else float(draft_probs[i, token])
        if q_token > 0 and uniforms[i] * q_token < float(p[token]):
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[token] = 0.0
        else:
            residual = (p - draft_probs[i]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:
            residual = p
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator).item())
    last = target_probs[len(draft)]
    return len(draft), int(torch.multinomial(last, 1, generator=generator).item())


def _logits(gen, rows, vocab):
    # Few distinct values so drafts often match the argmax.
    return torch.randint(0, 4, (rows, vocab), generator=gen).float()


@pytest.mark.parametrize("seed", range(40))
def test_greedy_chain(seed):
    gen = torch.Generator().manual_seed(seed)
    k = int(torch.randint(0, 6, (1,), generator=gen))
    logits = _logits(gen, k + 1, 7)
    tokens = logits.argmax(-1)[:k].tolist()
    if k and seed % 3 == 0:
        tokens[-1] = (tokens[-1] + 1) % 7
    accepted, bonus = old_verify_greedy(tokens, logits)
    assert verify(DraftTree(tokens, [1.0] * k), logits, GREEDY, None) == (
        list(range(accepted)),
        bonus,
    )


@pytest.mark.parametrize("seed", range(40))
def test_greedy_tree(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 9, (1,), generator=gen))
    parents = [int(torch.randint(-1, i, (1,), generator=gen)) for i in range(n)]
    tokens = torch.randint(0, 3, (n,), generator=gen).tolist()
    logits = _logits(gen, n + 1, 3)
    draft = DraftTree(tokens, [1.0] * n, parents=parents)
    assert verify(draft, logits, GREEDY, None) == old_verify_tree_greedy(tokens, parents, logits)


@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("seed", range(25))
def test_sampled_chain_same_draws(seed, one_hot):
    gen = torch.Generator().manual_seed(seed)
    k = int(torch.randint(0, 5, (1,), generator=gen))
    logits = torch.randn(k + 1, 11, generator=gen)
    q = torch.softmax(torch.randn(k, 11, generator=gen), -1)
    tokens = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(k)]
    probs = None if one_hot else q
    draft = DraftTree(tokens, [1.0] * k, probs=probs)
    for trial in range(5):
        g_old = torch.Generator().manual_seed(1000 * seed + trial)
        g_new = torch.Generator().manual_seed(1000 * seed + trial)
        accepted, token = old_verify_sampled(
            tokens, probs, probs_from_logits(logits, SAMPLED), g_old
        )
        assert verify(draft, logits, SAMPLED, g_new) == (list(range(accepted)), token)
        assert torch.equal(g_old.get_state(), g_new.get_state())

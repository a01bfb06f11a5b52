"""The Triton rejection-sampling kernel, run by Triton's interpreter on CPU.

Given the same seed it draws what the reference draws, so it must return the same
(accepted, token) and leave the generator in the same state; and what it emits must
follow the target's distribution, whatever the drafter proposed.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from atlas_kernels import rejection_sample, rejection_sample_reference

from .cases import rejection_case

pytest.importorskip("triton")

# (vocab, block_v, num_splits): V never a multiple of the block; None: the default split.
VOCABS = [(50, 16, 2), (777, 128, 3), (3001, 512, None)]
# Draft probability dtypes; None: a deterministic drafter (q one-hot).
DRAFTERS = [torch.float32, torch.bfloat16, None]


def _same_draws(kernels, target, draft, tokens, seed, **kwargs):
    """(kernel's result, reference's result), each from a fresh generator seeded alike;
    also checks that both consumed the generator alike."""
    g_kernel = torch.Generator().manual_seed(seed)
    g_reference = torch.Generator().manual_seed(seed)
    got = kernels.rejection_sample(target, draft, tokens, g_kernel, **kwargs)
    expected = rejection_sample_reference(target, draft, tokens, g_reference)
    assert torch.equal(g_kernel.get_state(), g_reference.get_state())
    return got, expected


@pytest.mark.parametrize("draft_dtype", DRAFTERS, ids=["q-fp32", "q-bf16", "deterministic"])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16], ids=["p-fp32", "p-bf16"])
@pytest.mark.parametrize(("vocab", "block_v", "splits"), VOCABS)
def test_rejection_kernel_equals_reference_for_the_same_seed(
    kernels, vocab, block_v, splits, target_dtype, draft_dtype
):
    generator = torch.Generator().manual_seed(vocab)
    outcomes = set()
    for num_draft in range(9):
        for trial in range(2):
            target, draft, tokens = rejection_case(
                num_draft, vocab, target_dtype, draft_dtype, generator
            )
            got, expected = _same_draws(
                kernels,
                target,
                draft,
                tokens,
                100 * num_draft + trial,
                block_v=block_v,
                num_splits=splits,
            )
            assert got == expected, (num_draft, trial)
            if num_draft:
                outcomes.add("whole" if got[0] == num_draft else "cut")
    # Both branches ran: the bonus draw from p and the residual draw.
    assert outcomes == {"whole", "cut"}


def test_all_zero_residual_samples_the_target_row(kernels):
    """A draft token q gives no mass is rejected; when p == q the residual is zero
    everywhere and the next token comes from p itself, never from a zero-mass token."""
    vocab = 300
    generator = torch.Generator().manual_seed(5)
    target, draft, _ = rejection_case(3, vocab, torch.float32, torch.float32, generator)
    target[0] = draft[0]
    zero_mass = torch.nonzero(draft[0] == 0).flatten()
    tokens = torch.tensor([int(zero_mass[0]), 0, 0])
    for seed in range(6):
        got, expected = _same_draws(kernels, target, draft, tokens, seed, block_v=64)
        assert got == expected and got[0] == 0
        assert float(target[0, got[1]]) > 0


def test_rejection_kernel_reads_strided_rows(kernels):
    generator = torch.Generator().manual_seed(9)
    target, draft, tokens = rejection_case(5, 700, torch.float32, torch.float32, generator)
    wide = torch.zeros(12, 700)
    wide[::2] = target  # every other row: a row stride of 2V
    wider = torch.zeros(8, 700)
    wider[:5] = draft  # the first K rows of a longer draft, as verify slices them
    for seed in range(4):
        got, expected = _same_draws(kernels, wide[::2], wider[:5], tokens, seed, block_v=128)
        assert got == expected


def test_a_token_outside_the_vocabulary_is_rejected(kernels):
    target = torch.full((3, 40), 1 / 40)
    target[0] = torch.nn.functional.one_hot(torch.tensor(3), 40)  # accepts token 3
    tokens = torch.tensor([3, 40])  # the second is not a token; the reference raises
    accepted, token = kernels.rejection_sample(
        target, None, tokens, torch.Generator().manual_seed(0), block_v=16
    )
    assert accepted == 1 and 0 <= token < 40


def test_dispatcher_runs_the_kernel_when_forced(kernels):
    generator = torch.Generator().manual_seed(21)
    target, draft, tokens = rejection_case(4, 900, torch.bfloat16, torch.float32, generator)
    for seed in range(4):
        g_kernel = torch.Generator().manual_seed(seed)
        g_reference = torch.Generator().manual_seed(seed)
        assert rejection_sample(
            target, draft, tokens, g_kernel, use_kernel=True
        ) == rejection_sample_reference(target, draft, tokens, g_reference)
    with pytest.raises(ValueError, match="float32"):
        rejection_sample(target.double(), None, tokens, None, use_kernel=True)


# A target and a drafter that disagree: the drafter puts its mass where p has little.
P = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
Q = torch.tensor([0.05, 0.05, 0.1, 0.2, 0.3, 0.3])
# Chi-square critical value, 5 degrees of freedom, p = 0.001.
CHI2_CRITICAL = 20.52


def chi_square(counts: Counter[int], probs: torch.Tensor) -> float:
    n = sum(counts.values())
    return sum((counts.get(t, 0) - n * float(p)) ** 2 / (n * float(p)) for t, p in enumerate(probs))


@pytest.mark.parametrize("deterministic", [False, True], ids=["sampled-draft", "fixed-guess"])
def test_first_emitted_token_follows_the_target_distribution(kernels, deterministic):
    """Two drafted tokens per trial; the first emitted token is the first draft token
    if accepted, else the kernel's residual draw. Its histogram must fit p, and must
    not fit what two common mistakes produce: trusting the draft, and drawing from p
    (not the residual) on rejection."""
    generator = torch.Generator().manual_seed(2024)
    target = torch.stack([P, P.flip(0), P])
    draft = None if deterministic else torch.stack([Q, Q])
    trials = 800
    produced: Counter[int] = Counter()
    trusted: Counter[int] = Counter()
    for _ in range(trials):
        if deterministic:
            tokens = torch.tensor([0, 1])  # always guesses p's mode
        else:
            tokens = torch.multinomial(draft, 1, generator=generator)[:, 0]
        accepted, token = kernels.rejection_sample(target, draft, tokens, generator)
        first = int(tokens[0]) if accepted >= 1 else token
        produced[first] += 1
        trusted[int(tokens[0])] += 1
    assert chi_square(produced, P) < CHI2_CRITICAL
    q = torch.zeros(6) if deterministic else Q
    if deterministic:
        q[0] = 1.0
    else:
        assert chi_square(trusted, P) > 10 * CHI2_CRITICAL
    # Resampling from p on rejection: min(p, q) + (1 - sum(min(p, q))) p.
    overlap = torch.minimum(P, q)
    wrong = overlap + (1 - overlap.sum()) * P
    assert chi_square(produced, wrong) > 3 * CHI2_CRITICAL

"""The PyTorch references agree with the engine's own verification and masks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from atlas_kernels import (
    greedy_accept,
    greedy_accept_reference,
    rejection_residual_reference,
    tree_accept,
    tree_accept_reference,
    tree_attention_mask,
    tree_attention_mask_reference,
)
from atlas_sidecar.engine.backends.base import ForwardItem
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.sampling import verify_greedy, verify_tree_greedy

from .cases import greedy_case, random_parents, tree_case


@pytest.mark.parametrize("seed", range(20))
def test_greedy_reference_equals_verify_greedy_per_sequence(seed):
    generator = torch.Generator().manual_seed(seed)
    num_draft = seed % 7
    logits, draft, lens = greedy_case(5, num_draft, 50, torch.float32, generator)
    accepted, bonus = greedy_accept_reference(logits, draft, lens)
    for row in range(5):
        n = int(lens[row])
        expected = verify_greedy(draft[row, :n].tolist(), logits[row, : n + 1])
        assert (int(accepted[row]), int(bonus[row])) == expected


@pytest.mark.parametrize("seed", range(30))
def test_tree_reference_equals_verify_tree_greedy_per_sequence(seed):
    generator = torch.Generator().manual_seed(seed)
    num_draft = 1 + seed % 9
    # A vocabulary this small makes sibling clashes and deep paths common.
    logits, draft, parents, num_nodes = tree_case(4, num_draft, 6, torch.float32, generator)
    path, length, bonus = tree_accept_reference(logits, draft, parents, num_nodes)
    for row in range(4):
        n = int(num_nodes[row])
        expected_path, expected_bonus = verify_tree_greedy(
            draft[row, :n].tolist(), parents[row, :n].tolist(), logits[row, : n + 1]
        )
        assert path[row, : int(length[row])].tolist() == expected_path
        assert (path[row, int(length[row]) :] == -1).all()
        assert int(bonus[row]) == expected_bonus


def test_a_chain_of_parents_is_accepted_like_a_chain():
    generator = torch.Generator().manual_seed(0)
    logits, draft, lens = greedy_case(6, 5, 40, torch.float32, generator)
    chain = torch.arange(-1, 4).expand(6, 5)
    path, length, bonus = tree_accept_reference(logits, draft, chain, lens)
    accepted, chain_bonus = greedy_accept_reference(logits, draft, lens)
    assert torch.equal(length, accepted) and torch.equal(bonus, chain_bonus)


def _tiny_runner() -> CausalLMRunner:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    return CausalLMRunner(LlamaForCausalLM(config).eval(), tokenizer=None)


@pytest.mark.parametrize("seed", range(4))
def test_mask_reference_equals_the_torch_backends_batched_tree_mask(seed, monkeypatch):
    """Capture the mask ``CausalLMRunner._forward_padded`` really builds."""
    generator = torch.Generator().manual_seed(seed)
    runner = _tiny_runner()
    past_lens = [3, 0, 7][: 2 + seed % 2]
    node_counts = [int(torch.randint(0, 6, (1,), generator=generator)) for _ in past_lens]
    node_counts[seed % len(node_counts)] = 6  # the batch is as wide as the widest tree
    items = []
    for index, (past, count) in enumerate(zip(past_lens, node_counts, strict=True)):
        seq_id = f"s{index}"
        runner.start(seq_id)
        if past:
            runner.forward(seq_id, list(range(1, past + 1)))
        parents = random_parents(count, generator)
        tokens = list(range(count + 1))
        items.append(ForwardItem(seq_id, tokens, [-1, *(p + 1 for p in parents)]))
    captured: list[torch.Tensor] = []
    run = runner._run

    def spy(ids, cache, positions, mask):
        captured.append(mask)
        return run(ids, cache, positions, mask)

    monkeypatch.setattr(runner, "_run", spy)
    runner.forward_many(items)
    parents_tensor = torch.full((len(items), 6), -1, dtype=torch.long)
    for row, item in enumerate(items):
        node_parents = [p - 1 for p in item.parents[1:]]
        parents_tensor[row, : len(node_parents)] = torch.tensor(node_parents, dtype=torch.long)
    mask = tree_attention_mask_reference(
        parents_tensor, torch.tensor(node_counts), torch.tensor(past_lens), max(past_lens)
    )
    assert torch.equal(mask, captured[0])


def test_dispatchers_use_the_reference_for_cpu_tensors():
    generator = torch.Generator().manual_seed(1)
    logits, draft, parents, num_nodes = tree_case(3, 4, 30, torch.float32, generator)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            tree_accept(logits, draft, parents, num_nodes),
            tree_accept_reference(logits, draft, parents, num_nodes),
            strict=True,
        )
    )
    accepted, bonus = greedy_accept(logits, draft, num_nodes)
    assert accepted.dtype == bonus.dtype == torch.long
    past = torch.tensor([0, 2, 5])
    assert torch.equal(
        tree_attention_mask(parents, num_nodes, past, 5),
        tree_attention_mask_reference(parents, num_nodes, past, 5),
    )


def test_package_imports_and_runs_without_triton():
    script = """
import sys
import torch
import atlas_kernels
assert "triton" not in sys.modules, "imported triton at package import"
sys.modules["triton"] = None  # now as if triton were not installed
atlas_kernels.triton_available.cache_clear()
logits = torch.zeros(2, 3, 10)
accepted, bonus = atlas_kernels.greedy_accept(logits, torch.zeros(2, 2, dtype=torch.long),
                                              torch.tensor([2, 1]))
assert accepted.tolist() == [2, 1] and bonus.tolist() == [0, 0]
try:
    atlas_kernels.greedy_accept(logits, torch.zeros(2, 2, dtype=torch.long),
                                torch.tensor([2, 1]), use_kernel=True)
except RuntimeError as error:
    assert "triton is not installed" in str(error)
else:
    raise AssertionError("use_kernel=True without triton must fail")
"""
    subprocess.run([sys.executable, "-c", script], check=True)


@pytest.mark.parametrize(
    ("logits_shape", "draft_shape", "lens_shape"),
    [((2, 3), (2, 2), (2,)), ((2, 4, 5), (2, 2), (2,)), ((2, 3, 5), (2, 2), (3,))],
)
def test_mismatched_shapes_are_refused(logits_shape, draft_shape, lens_shape):
    with pytest.raises(ValueError):
        greedy_accept(
            torch.zeros(logits_shape),
            torch.zeros(draft_shape, dtype=torch.long),
            torch.zeros(lens_shape, dtype=torch.long),
        )


@pytest.mark.parametrize("draft_dtype", [torch.float32, torch.bfloat16, None])
def test_rejection_reference_samples_half_precision_rows_in_float32(draft_dtype):
    """Whichever branch ends the chain, the row to sample from bf16 probabilities is
    float32, so the kernel knows the dtype of the exponentials before the branch."""
    target = torch.tensor([[0.25, 0.75, 0.0], [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
    draft = torch.tensor([[0.75, 0.25, 0.0], [0.5, 0.5, 0.0]])
    draft = None if draft_dtype is None else draft.to(draft_dtype)
    endings = [
        ([0, 0], [0.99, 0.0], 0),  # rejected at once: a non-zero residual
        ([1, 0], [0.0, 0.0], 2),  # all accepted: the last row, unnormalised
        ([1, 2], [0.0, 0.5], 1),  # q = p = 0 at token 2: with q, an all-zero residual
    ]
    for tokens, uniforms, accepted in endings:
        got, row = rejection_residual_reference(
            target.to(torch.bfloat16), draft, torch.tensor(tokens), torch.tensor(uniforms)
        )
        assert got == accepted and row.dtype == torch.float32, tokens

"""The Triton kernels, run by Triton's interpreter on CPU, return exactly the references.

Small blocks and forced vocabulary splits make every reduction cross block and
split boundaries, with V never a multiple of the block.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from atlas_kernels import (
    greedy_accept,
    greedy_accept_reference,
    tree_accept,
    tree_accept_reference,
    tree_attention_mask_reference,
)

from .cases import greedy_case, tree_case

pytest.importorskip("triton")

# (rows, num_draft, vocab, dtype, block_v, num_splits): V never a multiple of the block.
SHAPES = [
    (4, 8, 3001, torch.float32, 1024, 2),
    (4, 8, 3001, torch.bfloat16, 512, 3),
    (3, 5, 2000, torch.float16, 256, 1),
    (2, 16, 1500, torch.bfloat16, 1024, None),
    (4, 1, 700, torch.float32, 128, 4),
    (1, 0, 900, torch.float32, 256, 2),
]


def _equal(got, expected) -> bool:
    return all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize(("rows", "num_draft", "vocab", "dtype", "block_v", "splits"), SHAPES)
def test_greedy_kernel_equals_reference_on_ragged_tied_drafts(
    kernels, rows, num_draft, vocab, dtype, block_v, splits
):
    generator = torch.Generator().manual_seed(rows * 100 + num_draft)
    for _ in range(2):
        logits, draft, lens = greedy_case(rows, num_draft, vocab, dtype, generator)
        got = kernels.greedy_accept(logits, draft, lens, block_v=block_v, num_splits=splits)
        assert _equal(got, greedy_accept_reference(logits, draft, lens))


def test_greedy_kernel_all_accepted_and_none_accepted(kernels):
    generator = torch.Generator().manual_seed(7)
    logits, _, _ = greedy_case(4, 6, 2500, torch.bfloat16, generator)
    target = logits.argmax(dim=-1)
    full = torch.full((4,), 6)
    accepted, bonus = kernels.greedy_accept(logits, target[:, :6], full, block_v=512)
    assert accepted.tolist() == [6] * 4 and torch.equal(bonus, target[:, 6])
    wrong = (target[:, :6] + 1) % 2500
    accepted, bonus = kernels.greedy_accept(logits, wrong, full, block_v=512)
    assert accepted.tolist() == [0] * 4 and torch.equal(bonus, target[:, 0])


def test_argmax_takes_the_first_of_ties_across_blocks_and_splits(kernels):
    vocab = 3000
    logits = torch.zeros(3, 2, vocab)
    logits[0, 0, [2999, 1700, 1024]] = 5.0  # a tie in three blocks: 1024 wins
    logits[1, :] = float("-inf")  # all -inf: index 0, like torch.argmax
    logits[2, 0, [10, 2000]] = float("nan")  # NaN is the maximum; the first one wins
    logits[2, 1, 2500] = float("inf")
    draft = torch.zeros(3, 1, dtype=torch.long)
    lens = torch.ones(3, dtype=torch.long)
    for splits in (1, 3):
        got = kernels.greedy_accept(logits, draft, lens, block_v=512, num_splits=splits)
        assert _equal(got, greedy_accept_reference(logits, draft, lens))
    assert logits.argmax(dim=-1)[:, 0].tolist() == [1024, 0, 10]


def test_greedy_kernel_reads_strided_logits(kernels):
    generator = torch.Generator().manual_seed(3)
    logits, draft, lens = greedy_case(4, 5, 1200, torch.float32, generator)
    wide = torch.zeros(4, 9, 1200)
    wide[:, 2:8] = logits  # the backend's logits[:, :n] of a wider batch look like this
    view = wide[:, 2:8]
    got = kernels.greedy_accept(view, draft, lens.to(torch.int32), block_v=256, num_splits=2)
    assert _equal(got, greedy_accept_reference(logits, draft, lens))


@pytest.mark.parametrize(("rows", "num_draft", "vocab", "dtype", "block_v", "splits"), SHAPES)
def test_tree_kernel_equals_reference_on_random_trees(
    kernels, rows, num_draft, vocab, dtype, block_v, splits
):
    generator = torch.Generator().manual_seed(rows * 10 + num_draft)
    for _ in range(2):
        # A coarse vocabulary slice of tied logits: argmaxes repeat, so siblings clash.
        logits, draft, parents, num_nodes = tree_case(rows, num_draft, vocab, dtype, generator)
        got = kernels.tree_accept(
            logits, draft, parents, num_nodes, block_v=block_v, num_splits=splits
        )
        assert _equal(got, tree_accept_reference(logits, draft, parents, num_nodes))


def test_tree_kernel_accepts_a_whole_deep_path_and_picks_the_lowest_sibling(kernels):
    vocab = 1000
    logits = torch.zeros(1, 6, vocab)
    for row, token in enumerate([7, 8, 9, 9, 4, 5]):  # row j+1 follows node j
        logits[0, row, token] = 1.0
    # Nodes 0 and 1 both match the pending row's 7: node 0 wins, then its child 2 (8),
    # then 2's child 4 (9); node 4's row says 5.
    draft = torch.tensor([[7, 7, 8, 8, 9]])
    parents = torch.tensor([[-1, -1, 0, 1, 2]])
    nodes = torch.tensor([5])
    path, length, bonus = kernels.tree_accept(logits, draft, parents, nodes, block_v=256)
    assert path.tolist() == [[0, 2, 4, -1, -1]] and length.tolist() == [3]
    assert bonus.tolist() == [5]
    assert _equal((path, length, bonus), tree_accept_reference(logits, draft, parents, nodes))


@pytest.mark.parametrize(("num_draft", "pad_past", "block_past"), [(6, 0, 16), (9, 40, 16)])
def test_mask_kernel_equals_reference(kernels, num_draft, pad_past, block_past):
    generator = torch.Generator().manual_seed(num_draft)
    _, _, parents, num_nodes = tree_case(4, num_draft, 10, torch.float32, generator)
    past = torch.randint(0, pad_past + 1, (4,), generator=generator)
    got = kernels.tree_attention_mask(parents, num_nodes, past, pad_past, block_past=block_past)
    assert torch.equal(got, tree_attention_mask_reference(parents, num_nodes, past, pad_past))


def test_dispatchers_run_the_kernel_when_forced(kernels):
    generator = torch.Generator().manual_seed(11)
    logits, draft, parents, num_nodes = tree_case(2, 4, 900, torch.bfloat16, generator)
    assert _equal(
        tree_accept(logits, draft, parents, num_nodes, use_kernel=True),
        tree_accept_reference(logits, draft, parents, num_nodes),
    )
    assert _equal(
        greedy_accept(logits, draft, num_nodes, use_kernel=True),
        greedy_accept_reference(logits, draft, num_nodes),
    )


def test_kernels_refuse_cpu_tensors_when_not_interpreted():
    script = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch
from atlas_kernels import triton_impl
try:
    triton_impl.greedy_accept(torch.zeros(1, 2, 8), torch.zeros(1, 1, dtype=torch.long),
                              torch.ones(1, dtype=torch.long))
except RuntimeError as error:
    assert "CUDA" in str(error), error
else:
    raise AssertionError("a compiled kernel must not be handed CPU tensors")
try:
    triton_impl.rejection_sample(torch.full((2, 8), 0.125), None,
                                 torch.zeros(1, dtype=torch.long), None)
except RuntimeError as error:
    assert "CUDA" in str(error), error
else:
    raise AssertionError("a compiled kernel must not be handed CPU tensors")
"""
    subprocess.run([sys.executable, "-c", script], check=True, env=_compiled_env())


def _compiled_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


def test_kernels_compile_for_an_h100_without_a_gpu():
    """Triton's real compiler (to sm_90 cubin with ptxas) accepts every kernel: the
    interpreter alone would let constructs through that do not compile."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton has no NVIDIA backend here")
    script = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from atlas_kernels import triton_impl as k

        def build(fn, types, constants, num_warps=4):
            names = fn.arg_names
            signature = {n: types.get(n, "i32") for n in names}
            signature.update({n: "constexpr" for n in constants})
            consts = {(names.index(n),): v for n, v in constants.items()}
            compiled = triton.compile(
                ASTSource(fn, signature, consts),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": num_warps},
            )
            assert compiled.asm["cubin"], fn
        partial = {"part_val_ptr": "*fp32", "part_idx_ptr": "*i32"}
        build(k._partial_argmax_kernel,
              {"logits_ptr": "*bf16", "limit_ptr": "*i64", **partial,
               "stride_seq": "i64", "stride_row": "i64"}, {"BLOCK_V": 2048}, 8)
        build(k._greedy_accept_kernel,
              {**partial, "draft_ptr": "*i64", "lens_ptr": "*i64", "accepted_ptr": "*i64",
               "bonus_ptr": "*i64"}, {"ROWS": 32})
        build(k._tree_accept_kernel,
              {**partial, "draft_ptr": "*i64", "parents_ptr": "*i64", "nodes_ptr": "*i64",
               "path_ptr": "*i64", "length_ptr": "*i64", "bonus_ptr": "*i64"}, {"ROWS": 32})
        build(k._tree_attention_mask_kernel,
              {"parents_ptr": "*i64", "nodes_ptr": "*i64", "past_ptr": "*i64",
               "mask_ptr": "*u8"}, {"WIDTH": 32, "BLOCK_PAST": 1024})
        rejection = {"target_ptr": "*bf16", "draft_ptr": "*i64", "uniform_ptr": "*fp32",
                     "part_val_ptr": "*fp32", "part_idx_ptr": "*i32", "part_mass_ptr": "*fp32"}
        for q_type in ("*fp32", "*bf16", "*fp64", None):
            types = {**rejection, "draft_probs_ptr": q_type or "*bf16"}
            has_q = q_type is not None
            build(k._rejection_partial_kernel, {**types, "expo_ptr": "*fp32"},
                  {"HAS_DRAFT_PROBS": has_q, "ROWS": 32, "BLOCK_V": 2048}, 8)
            build(k._rejection_merge_kernel, {**types, "out_ptr": "*i64"},
                  {"HAS_DRAFT_PROBS": has_q, "ROWS": 32, "SPLITS": 128})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=_compiled_env())

"""DraftTree: the one draft type, and the tree walking written once."""

from __future__ import annotations

import torch

from atlas_sidecar.engine.tree import DraftTree

# root -> 0 (5) -> 1 (6) -> 3 (8)
#      -> 2 (7)    -> 4 (9)
#               0 -> 5 (6)   (a second child with the same token as node 1)
TREE = DraftTree(
    tokens=[5, 6, 7, 8, 9, 6],
    confidences=[0.9, 0.8, 0.5, 0.7, 0.2, 0.1],
    parents=[-1, 0, -1, 1, 1, 0],
)


def test_children_in_index_order_with_root_minus_one():
    assert TREE.children() == {-1: [0, 2], 0: [1, 5], 1: [3, 4]}
    assert DraftTree([1, 2, 3], [1, 1, 1]).children() == {-1: [0], 0: [1], 1: [2]}


def test_depths():
    assert TREE.depths() == [0, 1, 0, 2, 2, 1]
    assert DraftTree([1, 2], [1, 1]).depths() == [0, 1]
    bad = DraftTree([1, 2], [1, 1], parents=[1, -1])
    try:
        bad.depths()
    except ValueError:
        pass
    else:
        raise AssertionError("a parent after its child must be refused")


def test_walk_follows_lowest_indexed_matching_child():
    path, rejected = TREE.walk([5, 6, 9, 1])
    assert path == [0, 1, 4]
    # Root's other child 2; node 0's other child 5; node 1's other child 3; node 4 is a leaf.
    assert rejected == [2, 5, 3]


def test_walk_stops_at_first_mismatch():
    path, rejected = TREE.walk([7, 1])
    assert path == [2]
    assert rejected == [0]
    path, rejected = TREE.walk([1])
    assert path == []
    assert rejected == [0, 2]
    assert TREE.walk([]) == ([], [])


def test_reach_is_product_along_the_path():
    probs = [0.5, 0.5, 0.25, 0.5, 1.0, 0.1]
    assert TREE.reach(probs) == [0.5, 0.25, 0.25, 0.125, 0.25, 0.05]
    assert DraftTree([1, 2], [1, 1]).reach([0.5, 0.5]) == [0.5, 0.25]


def test_subset_renumbers_parents_and_rows():
    probs = torch.arange(12.0).reshape(6, 2)
    tree = DraftTree(TREE.tokens, TREE.confidences, probs=probs, bucket="b", parents=TREE.parents)
    sub = tree.subset([0, 1, 4])
    assert sub.tokens == [5, 6, 9]
    assert sub.parents == [-1, 0, 1]
    assert sub.bucket == "b"
    assert torch.equal(sub.probs, probs[[0, 1, 4]])


def test_main_chain_follows_first_children():
    assert TREE.main_nodes() == [0, 1, 3]
    chain = TREE.main_chain()
    assert chain.tokens == [5, 6, 8]
    assert chain.parents is None
    assert not chain.is_tree
    plain = DraftTree([1, 2], [1, 1])
    assert plain.main_chain() is plain


def test_with_runners_up_adds_siblings_after_the_chain():
    chain = DraftTree([1, 2], [0.9, 0.8], runners_up=[(3, 0.1), (4, 0.0)])
    tree = chain.with_runners_up()
    assert tree.tokens == [1, 2, 3]
    assert tree.parents == [-1, 0, -1]
    assert tree.main_chain().tokens == [1, 2]

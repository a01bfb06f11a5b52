"""The suffix speculator: request-local and global evidence, confidences, bounded memory."""

from __future__ import annotations

from atlas_sidecar.sampling import SamplingParams
from atlas_sidecar.speculators.base import DraftRequest
from atlas_sidecar.speculators.suffix import SuffixSpeculator


def propose(spec: SuffixSpeculator, seq_id: str, context: list[int], lookahead: int = 8):
    return spec.propose([DraftRequest(seq_id, context, lookahead, SamplingParams())])[0]


def test_copies_a_continuation_seen_earlier_in_the_same_request():
    spec = SuffixSpeculator()
    context = [5, 6, 7, 8, 9, 10, 1, 2, 5, 6, 7]
    draft = propose(spec, "a", context, 4)
    assert draft.tokens == [8, 9, 10, 1]
    assert all(0 < c < 1 for c in draft.confidences)


def test_index_follows_the_growing_context_within_a_request():
    spec = SuffixSpeculator()
    assert propose(spec, "a", [1, 2, 3]).tokens == []
    assert propose(spec, "a", [1, 2, 3, 4, 1, 2]).tokens[:2] == [3, 4]


def test_finished_requests_become_global_evidence():
    spec = SuffixSpeculator()
    propose(spec, "first", [40, 41, 42, 43, 44, 45])
    spec.release("first")
    draft = propose(spec, "second", [7, 7, 41, 42], 3)
    assert draft.tokens == [43, 44, 45]


def test_majority_wins_and_confidence_reflects_agreement():
    spec = SuffixSpeculator()
    for tail in ([1, 2, 9], [1, 2, 9], [1, 2, 9], [1, 2, 8]):
        spec.add_document([0, *tail])
    draft = propose(spec, "q", [5, 1, 2], 1)
    assert draft.tokens == [9]
    # 3 of 4 witnesses, with one pseudo-count for the unseen: 3 / 5.
    assert abs(draft.confidences[0] - 3 / 5) < 1e-9


def test_longer_matches_are_preferred_over_shorter_ones():
    spec = SuffixSpeculator()
    spec.add_document([1, 2, 3, 100])
    spec.add_document([9, 2, 3, 200])
    assert propose(spec, "q", [1, 2, 3], 1).tokens == [100]


def test_global_memory_is_bounded_by_evicting_the_oldest():
    spec = SuffixSpeculator(global_tokens=10)
    spec.add_document([1, 2, 3, 4, 5, 6])
    spec.add_document([11, 12, 13, 14, 15, 16])
    assert spec.global_size <= 10
    assert propose(spec, "q", [1, 2], 2).tokens == []  # the oldest was evicted
    assert propose(spec, "r", [12, 13], 2).tokens == [14, 15]


def test_split_evidence_grows_a_tree_with_the_favourite_branch_first():
    spec = SuffixSpeculator()
    for tail in ([1, 2, 9, 10, 11], [1, 2, 9, 10, 11], [1, 2, 8, 20, 21]):
        spec.add_document([0, *tail])
    draft = propose(spec, "q", [5, 1, 2], 6)
    assert draft.is_tree
    parents = draft.chain_parents()
    assert all(p < i for i, p in enumerate(parents))
    # Both continuations are in the tree; the main chain follows the majority.
    assert draft.main_chain().tokens[:3] == [9, 10, 11]
    roots = [draft.tokens[i] for i, p in enumerate(parents) if p == -1]
    assert roots == [9, 8]
    reach_9 = draft.confidences[0]
    assert abs(reach_9 - 2 / 4) < 1e-9


def test_agreeing_evidence_is_a_chain():
    spec = SuffixSpeculator()
    spec.add_document([0, 1, 2, 3, 4, 5])
    draft = propose(spec, "q", [7, 1, 2], 3)
    assert draft.tokens == [3, 4, 5]
    assert not draft.is_tree

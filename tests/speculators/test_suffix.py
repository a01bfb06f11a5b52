"""The suffix speculator: request-local and global evidence, confidences, bounded memory."""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections.abc import Callable

from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.base import DraftRequest
from atlas_sidecar.engine.speculators.suffix import WORST_BYTES_PER_TOKEN, SuffixSpeculator


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


def _random_docs(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(count)]


def _real_growth(fill: Callable[[], SuffixSpeculator]) -> tuple[SuffixSpeculator, int]:
    """The speculator ``fill`` builds, and the bytes tracemalloc saw it keep."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        spec = fill()
        gc.collect()
        return spec, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_byte_accounting_matches_what_the_index_really_allocates():
    # Random ids (every n-gram new) and a 40-token vocabulary (n-grams recur, so
    # occurrence lists fill and the oldest drop): the accounting within 5% of the real.
    for vocab in (49152, 40):
        docs = _random_docs(20, 1000, vocab)

        def fill(docs: list[list[int]] = docs) -> SuffixSpeculator:
            spec = SuffixSpeculator(global_tokens=10**9, global_bytes=10**12)
            for doc in docs:
                spec.add_document(doc)
            return spec

        spec, real = _real_growth(fill)
        assert abs(spec.global_nbytes - real) <= 0.05 * real, (vocab, spec.global_nbytes, real)
        assert real / 20_000 < WORST_BYTES_PER_TOKEN  # the bound the tail cut relies on


def test_global_index_stays_within_its_byte_budget_by_evicting_the_oldest():
    budget = 2 << 20
    docs = _random_docs(40, 1000, 49152, seed=1)  # ~30 MB of index unbounded

    def fill() -> SuffixSpeculator:
        spec = SuffixSpeculator(global_tokens=10**9, global_bytes=budget)
        for doc in docs:
            spec.add_document(doc)
        return spec

    spec, real = _real_growth(fill)
    assert spec.global_nbytes <= budget
    assert real <= 1.05 * budget
    assert propose(spec, "q", docs[0][:3], 2).tokens == []  # the oldest was evicted
    assert propose(spec, "r", docs[-1][:3], 2).tokens == docs[-1][3:5]


def test_one_document_over_the_byte_budget_keeps_its_tail():
    spec = SuffixSpeculator(global_bytes=64 * WORST_BYTES_PER_TOKEN)
    doc = _random_docs(1, 1000, 49152, seed=2)[0]
    spec.add_document(doc)
    assert spec.global_size == 64
    assert spec.global_nbytes <= spec.global_bytes
    assert propose(spec, "q", doc[-10:-8], 2).tokens == doc[-8:-6]


def test_a_request_index_stays_within_its_byte_budget_and_keeps_its_newest_tokens():
    budget = 1 << 20
    spec = SuffixSpeculator(local_bytes=budget)
    context = _random_docs(1, 20_000, 49152, seed=3)[0]  # ~15 MB of index unbounded
    for end in range(1000, len(context) + 1, 1000):
        propose(spec, "a", context[:end], 0)
        assert spec.local_nbytes <= budget
    # What it just saw is still evidence: the newest tokens, repeated, are drafted on.
    assert propose(spec, "a", context + context[-50:-48], 3).tokens == context[-48:-45]

"""The suffix speculator: model-free drafts from what was already seen.

Two kinds of evidence, both n-gram indexes over token sequences:
- request-local: the request's own prompt and output, updated as tokens are accepted
  (prompt lookup: code edits, quoted context, repeated identifiers);
- global: recent finished requests (prompt + output), added when a request ends and
  evicted oldest-first under a token budget (a workload's recurring boilerplate).

To draft, the longest n-gram at the end of the context that occurs in either index is
found; every occurrence of it is a candidate continuation. The draft follows the
majority next token among the candidates, keeping only those that agree, so a token's
confidence is the fraction of the evidence behind it. Drafting is a handful of dict
lookups: microseconds, against a target step of tens to hundreds of milliseconds.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from dataclasses import dataclass

from atlas_sidecar.speculators.base import Draft, DraftRequest

MAX_NGRAM = 8
MIN_NGRAM = 1
MAX_OCCURRENCES = 16  # per n-gram per index: the most recent ones are the best evidence
DEFAULT_GLOBAL_TOKENS = 500_000
MAX_LIVE_SEQUENCES = 4096

Occurrence = tuple[list[int], int]  # (a document's tokens, index of the next token)


class NgramIndex:
    """Where each n-gram (1..MAX_NGRAM tokens) ends, for a set of token documents."""

    def __init__(self) -> None:
        self._where: dict[tuple[int, ...], deque[Occurrence]] = {}

    def extend(self, doc: list[int], start: int) -> None:
        """Index n-grams of ``doc`` ending at positions >= ``start`` (doc already holds them)."""
        for end in range(max(start, 0), len(doc)):
            for n in range(MIN_NGRAM, min(MAX_NGRAM, end + 1) + 1):
                key = tuple(doc[end - n + 1 : end + 1])
                where = self._where.get(key)
                if where is None:
                    where = self._where[key] = deque(maxlen=MAX_OCCURRENCES)
                where.append((doc, end + 1))

    def remove(self, doc: list[int]) -> None:
        for end in range(len(doc)):
            for n in range(MIN_NGRAM, min(MAX_NGRAM, end + 1) + 1):
                key = tuple(doc[end - n + 1 : end + 1])
                where = self._where.get(key)
                if where is None:
                    continue
                kept = [occ for occ in where if occ[0] is not doc]
                if kept:
                    self._where[key] = deque(kept, maxlen=MAX_OCCURRENCES)
                else:
                    del self._where[key]

    def lookup(self, key: tuple[int, ...], exclude_end: int | None = None) -> list[Occurrence]:
        """Occurrences of ``key`` with at least one following token, most recent first."""
        found = self._where.get(key)
        if not found:
            return []
        return [(doc, nxt) for doc, nxt in reversed(found) if nxt < len(doc) and nxt != exclude_end]

    def __len__(self) -> int:
        return len(self._where)


@dataclass
class _Local:
    doc: list[int]
    index: NgramIndex


class SuffixSpeculator:
    name = "suffix"

    def __init__(self, global_tokens: int = DEFAULT_GLOBAL_TOKENS) -> None:
        self.global_tokens = global_tokens
        self._global = NgramIndex()
        self._global_docs: deque[list[int]] = deque()
        self._global_size = 0
        self._local: dict[str, _Local] = {}

    # -- the drafter interface ---------------------------------------------------------

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [self._propose_one(r) for r in requests]

    def release(self, seq_id: str) -> None:
        """The request ended: its tokens become global evidence for the ones after it."""
        local = self._local.pop(seq_id, None)
        if local is not None:
            self.add_document(local.doc)

    # -- evidence ----------------------------------------------------------------------

    def add_document(self, tokens: list[int]) -> None:
        """Add a finished sequence (prompt + output) to the global index."""
        if not tokens or self.global_tokens <= 0:
            return
        doc = list(tokens[-self.global_tokens :])
        self._global.extend(doc, 0)
        self._global_docs.append(doc)
        self._global_size += len(doc)
        while self._global_size > self.global_tokens:
            old = self._global_docs.popleft()
            self._global.remove(old)
            self._global_size -= len(old)

    @property
    def global_size(self) -> int:
        return self._global_size

    def _local_index(self, seq_id: str, context: list[int]) -> _Local:
        local = self._local.get(seq_id)
        if local is None or context[: len(local.doc)] != local.doc:
            if local is None and len(self._local) >= MAX_LIVE_SEQUENCES:
                raise RuntimeError(f"too many live sequences (max {MAX_LIVE_SEQUENCES})")
            local = self._local[seq_id] = _Local(doc=[], index=NgramIndex())
        start = len(local.doc)
        local.doc.extend(context[start:])
        local.index.extend(local.doc, start)
        return local

    # -- drafting ----------------------------------------------------------------------

    def _candidates(self, local: _Local) -> tuple[int, list[Occurrence]]:
        """The longest suffix n-gram with evidence, and its continuations (local first)."""
        doc = local.doc
        for n in range(min(MAX_NGRAM, len(doc)), MIN_NGRAM - 1, -1):
            key = tuple(doc[-n:])
            # The context's own end is an occurrence with nothing after it yet: skip it.
            found = local.index.lookup(key, exclude_end=len(doc)) + self._global.lookup(key)
            if found:
                return n, found
        return 0, []

    def _propose_one(self, request: DraftRequest) -> Draft:
        """A draft tree grown best-first: the ``lookahead`` likeliest continuations.

        Each node's confidence is the share of its parent's evidence that continues
        with its token; a node's reach is the product down its path. Where the
        evidence agrees the tree is a chain; where it splits, both branches are
        verified in the same forward.
        """
        local = self._local_index(request.seq_id, request.context)
        if request.lookahead <= 0:
            return Draft.empty()
        match_len, candidates = self._candidates(local)
        tokens: list[int] = []
        parents: list[int] = []
        confidences: list[float] = []
        order = itertools.count()  # ties go to the sibling pushed first (the favourite)
        heap: list[tuple[float, int, int, int, float, list[Occurrence]]] = []

        def branch(parent: int, reach: float, evidence: list[Occurrence]) -> None:
            votes = Counter(doc[nxt] for doc, nxt in evidence)
            # Most votes first, ties broken by recency (evidence is most recent first).
            for token in sorted(votes, key=lambda t: -votes[t]):
                confidence = votes[token] / (len(evidence) + 1)  # +1: the unseen
                following = [(d, n + 1) for d, n in evidence if d[n] == token]
                heapq.heappush(heap, (-reach * confidence, next(order), parent, token,
                                      confidence, following))  # fmt: skip

        branch(-1, 1.0, candidates)
        while heap and len(tokens) < request.lookahead:
            neg_reach, _, parent, token, confidence, following = heapq.heappop(heap)
            tokens.append(token)
            parents.append(parent)
            confidences.append(confidence)
            branch(len(tokens) - 1, -neg_reach, [(d, n) for d, n in following if n < len(d)])
        return Draft(
            tokens=tokens,
            confidences=confidences,
            bucket=f"suffix:{min(match_len, 4)}",
            parents=parents,
        )

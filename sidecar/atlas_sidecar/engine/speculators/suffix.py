"""The suffix speculator: model-free drafts from what was already seen.

Two kinds of evidence, both n-gram indexes over token sequences:
- request-local: the request's own prompt and output, updated as tokens are accepted
  (prompt lookup: code edits, quoted context, repeated identifiers);
- global: recent finished requests (prompt + output), added when a request ends and
  evicted oldest-first under a token and a byte budget (a workload's recurring
  boilerplate). A request's own index has a byte budget too: past it, it restarts from
  its newest tokens. Both are bounded in bytes because any client can send random ids.

To draft, the longest n-gram at the end of the context that occurs in either index is
found; every occurrence of it is a candidate continuation. The draft follows the
majority next token among the candidates, keeping only those that agree, so a token's
confidence is the fraction of the evidence behind it. Drafting is a handful of dict
lookups: microseconds, against a target step of tens to hundreds of milliseconds.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import os
import struct
import sys
from array import array
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlas_sidecar.engine.capabilities import SUFFIX
from atlas_sidecar.engine.speculators.base import DraftRequest
from atlas_sidecar.engine.tree import DraftTree

MAX_NGRAM = 8
MIN_NGRAM = 1
MAX_OCCURRENCES = 16  # per n-gram per index: the most recent ones are the best evidence
DEFAULT_GLOBAL_TOKENS = 500_000
# Byte budgets, sized for a sidecar: any client can send random token ids, and each
# token indexes up to MAX_NGRAM new n-grams, so tokens alone do not bound memory.
DEFAULT_GLOBAL_BYTES = 256 << 20
DEFAULT_LOCAL_BYTES = 16 << 20  # per live request
MAX_LIVE_SEQUENCES = 4096
# The most an indexed token costs, measured with random ids (every n-gram new; test_suffix
# keeps it an upper bound): sizes the tail of a document a byte budget can hold.
WORST_BYTES_PER_TOKEN = 1024

# The global index's snapshot (``save_snapshot``): the documents it holds, oldest first,
# as little-endian int32 ids; the index is rebuilt from them on load. Layout:
#   magic(8) format(u32) vocab_size(u32) docs(u32) tokens(u64)
#   doc lengths(u32 x docs) token ids(i32 x tokens) sha256 of all before(32)
SNAPSHOT_MAGIC = b"ATLASSFX"
SNAPSHOT_FORMAT = 1
_SNAPSHOT_HEADER = struct.Struct("<8sIIIQ")
_SNAPSHOT_DIGEST = 32

Occurrence = tuple["Doc", int]  # (a document's tokens, index of the next token)
Doc = list[int] | array

# What the accounting charges, from CPython's own sizes (64-bit): a key is the hash
# of the n-gram (a 64-bit int); a position is one int packing (document, position),
# shared by the n-grams ending there; the dict's table is read from sys.getsizeof,
# which is exact and O(1). An n-gram seen more than once holds a list of occurrences.
# test_suffix checks the sum against tracemalloc's count of what the index allocated.
_KEY_BYTES = sys.getsizeof(1 << 62)
_POS_INT_BYTES = sys.getsizeof(1 << 32)
_LIST_BYTES = sys.getsizeof([])
_POS_BITS = 32
_POS_MASK = (1 << _POS_BITS) - 1


def _list_bytes(n: int) -> int:
    """A list of ``n`` occurrences: built with 2, grown by append to 8 then 16 slots."""
    return _LIST_BYTES + 8 * (2 if n <= 2 else 8 if n <= 8 else 16)


def _doc_bytes(doc: Doc) -> int:
    # A live request's doc is a list sharing its ints with the context; global docs
    # are arrays of 4-byte ids.
    return sys.getsizeof(doc)


class NgramIndex:
    """Where each n-gram (1..MAX_NGRAM tokens) ends, for a set of token documents.

    Stored compactly (a tenth of a dict of tuples to deques): the key is
    ``hash(ngram)``, and an occurrence is one int, ``doc_id << 32 | next_position``;
    an n-gram seen once holds that int, one seen more often a list of them (oldest
    first, at most MAX_OCCURRENCES). Lookups check the n-gram against the document,
    so a hash collision costs a comparison, never a wrong candidate.
    """

    def __init__(self) -> None:
        self._where: dict[int, int | list[int]] = {}
        self._docs: dict[int, Doc] = {}  # doc id -> tokens
        self._ids: dict[int, int] = {}  # id(doc) -> doc id (the doc is kept alive above)
        self._doc_sizes: dict[int, int] = {}  # doc id -> bytes charged for its tokens
        self._next_id = 0
        self._positions = 0
        self._list_bytes = 0
        self._doc_bytes = 0

    def extend(self, doc: Doc, start: int) -> None:
        """Index n-grams of ``doc`` ending at positions >= ``start`` (doc already holds them)."""
        doc_id = self._ids.get(id(doc))
        if doc_id is None:
            doc_id = self._ids[id(doc)] = self._next_id
            self._next_id += 1
            self._docs[doc_id] = doc
        where = self._where
        base = doc_id << _POS_BITS
        for end in range(max(start, 0), len(doc)):
            occ = base | (end + 1)
            for n in range(MIN_NGRAM, min(MAX_NGRAM, end + 1) + 1):
                key = hash(tuple(doc[end - n + 1 : end + 1]))
                found = where.get(key)
                if found is None:
                    where[key] = occ
                elif isinstance(found, int):
                    where[key] = [found, occ]
                    self._list_bytes += _list_bytes(2)
                elif len(found) >= MAX_OCCURRENCES:
                    del found[0]  # the oldest goes, as a deque's maxlen would drop it
                    found.append(occ)
                else:
                    self._list_bytes += _list_bytes(len(found) + 1) - _list_bytes(len(found))
                    found.append(occ)
        self._positions += len(doc) - max(start, 0)
        self._charge_doc(doc_id)

    def remove(self, doc: Doc) -> None:
        doc_id = self._ids.pop(id(doc), None)
        if doc_id is None:
            return
        where = self._where
        for end in range(len(doc)):
            for n in range(MIN_NGRAM, min(MAX_NGRAM, end + 1) + 1):
                key = hash(tuple(doc[end - n + 1 : end + 1]))
                found = where.get(key)
                if found is None:
                    continue
                if isinstance(found, int):
                    if found >> _POS_BITS == doc_id:
                        del where[key]
                    continue
                kept = [occ for occ in found if occ >> _POS_BITS != doc_id]
                if len(kept) == len(found):
                    continue
                self._list_bytes -= _list_bytes(len(found))
                if len(kept) > 1:
                    found[:] = kept  # in place: the list keeps its allocation
                    self._list_bytes += _list_bytes(len(found))
                elif kept:
                    where[key] = kept[0]
                else:
                    del where[key]
        del self._docs[doc_id]
        self._doc_bytes -= self._doc_sizes.pop(doc_id)
        self._positions -= len(doc)

    def lookup(self, key: tuple[int, ...], exclude_end: int | None = None) -> list[Occurrence]:
        """Occurrences of ``key`` with at least one following token, most recent first."""
        found = self._where.get(hash(key))
        if found is None:
            return []
        n = len(key)
        out: list[Occurrence] = []
        for occ in [found] if isinstance(found, int) else reversed(found):
            doc = self._docs[occ >> _POS_BITS]
            nxt = occ & _POS_MASK
            if nxt < len(doc) and nxt != exclude_end and tuple(doc[nxt - n : nxt]) == key:
                out.append((doc, nxt))
        return out

    @property
    def nbytes(self) -> int:
        """Bytes this index holds, its documents included (see the note above)."""
        return (
            sys.getsizeof(self._where)
            + len(self._where) * _KEY_BYTES
            + self._positions * _POS_INT_BYTES
            + self._list_bytes
            + self._doc_bytes
        )

    def _charge_doc(self, doc_id: int) -> None:
        size = _doc_bytes(self._docs[doc_id])
        self._doc_bytes += size - self._doc_sizes.get(doc_id, 0)
        self._doc_sizes[doc_id] = size

    def __len__(self) -> int:
        return len(self._where)


class SnapshotError(ValueError):
    """A suffix snapshot that is corrupt, truncated, of another format or vocabulary."""


def encode_snapshot(docs: list[Doc], vocab_size: int) -> bytes:
    """The snapshot bytes of ``docs`` (oldest first) for a ``vocab_size`` vocabulary."""
    lengths = np.array([len(d) for d in docs], dtype="<u4")
    tokens = np.concatenate([np.asarray(d, dtype="<i4") for d in docs] or [np.zeros(0, "<i4")])
    header = _SNAPSHOT_HEADER.pack(
        SNAPSHOT_MAGIC, SNAPSHOT_FORMAT, vocab_size, len(docs), int(tokens.size)
    )
    body = header + lengths.tobytes() + tokens.astype("<i4").tobytes()
    return body + hashlib.sha256(body).digest()


def decode_snapshot(data: bytes, vocab_size: int | None = None) -> list[np.ndarray]:
    """The documents of a snapshot, oldest first; SnapshotError naming what is wrong.

    Checked before anything is used: magic, format, size, checksum, the vocabulary it
    was made for (``vocab_size`` when given) and every id within it. No pickle: the file
    may come from anywhere, and ids are plain int32 arrays."""
    if len(data) < _SNAPSHOT_HEADER.size + _SNAPSHOT_DIGEST:
        raise SnapshotError(f"suffix snapshot truncated ({len(data)} bytes)")
    magic, fmt, vocab, docs, tokens = _SNAPSHOT_HEADER.unpack_from(data)
    if magic != SNAPSHOT_MAGIC:
        raise SnapshotError("not a suffix snapshot (bad magic)")
    if fmt != SNAPSHOT_FORMAT:
        raise SnapshotError(f"suffix snapshot format {fmt}, this reads {SNAPSHOT_FORMAT}")
    expected = _SNAPSHOT_HEADER.size + 4 * docs + 4 * tokens + _SNAPSHOT_DIGEST
    if len(data) != expected:
        raise SnapshotError(f"suffix snapshot has {len(data)} bytes, its header says {expected}")
    if hashlib.sha256(data[:-_SNAPSHOT_DIGEST]).digest() != data[-_SNAPSHOT_DIGEST:]:
        raise SnapshotError("suffix snapshot checksum mismatch (corrupt)")
    if vocab_size is not None and vocab != vocab_size:
        raise SnapshotError(f"suffix snapshot made for vocabulary {vocab}, this is {vocab_size}")
    start = _SNAPSHOT_HEADER.size
    lengths = np.frombuffer(data, dtype="<u4", count=docs, offset=start)
    ids = np.frombuffer(data, dtype="<i4", count=tokens, offset=start + 4 * docs)
    if int(lengths.sum(dtype=np.uint64)) != tokens:
        raise SnapshotError("suffix snapshot document lengths do not add up to its tokens")
    if tokens and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise SnapshotError(f"suffix snapshot holds ids outside [0, {vocab})")
    return np.split(ids, np.cumsum(lengths)[:-1]) if docs else []


@dataclass
class _Local:
    doc: list[int]
    index: NgramIndex


class SuffixSpeculator:
    name = "suffix"
    capabilities = SUFFIX

    def __init__(
        self,
        global_tokens: int = DEFAULT_GLOBAL_TOKENS,
        global_bytes: int = DEFAULT_GLOBAL_BYTES,
        local_bytes: int = DEFAULT_LOCAL_BYTES,
    ) -> None:
        self.global_tokens = global_tokens
        self.global_bytes = global_bytes
        self.local_bytes = local_bytes
        self._global = NgramIndex()
        self._global_docs: deque[Doc] = deque()
        self._global_size = 0
        self._local: dict[str, _Local] = {}

    # -- the drafter interface ---------------------------------------------------------

    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        return [self._propose_one(r) for r in requests]

    def observe_context(self, seq_id: str, context: list[int]) -> None:
        """Nothing to do: the index reads each context when it is asked to draft, and
        the controller asks it on every step (it is free)."""

    def rollback(self, seq_id: str, context: list[int]) -> None:
        """Nothing to undo: the index only ever holds accepted tokens."""

    def release(self, seq_id: str) -> None:
        """The request ended: its tokens become global evidence for the ones after it."""
        local = self._local.pop(seq_id, None)
        if local is not None:
            self.add_document(local.doc)

    # -- evidence ----------------------------------------------------------------------

    def add_document(self, tokens: list[int]) -> None:
        """Add a finished sequence (prompt + output) to the global index.

        The oldest documents go while the index is over its token or byte budget. A
        document alone over the byte budget keeps only its tail, the tokens the budget
        holds at the worst measured cost (random ids).
        """
        limit = min(self.global_tokens, self.global_bytes // WORST_BYTES_PER_TOKEN)
        if not tokens or limit <= 0:
            return
        try:
            doc = array("i", tokens[-limit:])  # 4 bytes a token, not a list's 8 + ints
        except OverflowError:
            return  # not token ids of any vocabulary
        self._global.extend(doc, 0)
        self._global_docs.append(doc)
        self._global_size += len(doc)
        while len(self._global_docs) > 1 and (
            self._global_size > self.global_tokens or self._global.nbytes > self.global_bytes
        ):
            old = self._global_docs.popleft()
            self._global.remove(old)
            self._global_size -= len(old)

    # -- snapshots ---------------------------------------------------------------------

    def snapshot_bytes(self, vocab_size: int) -> bytes:
        """The global index as a snapshot: a new or restarted replica loads it and
        drafts from every replica's traffic at once, instead of starting cold."""
        return encode_snapshot(list(self._global_docs), vocab_size)

    def save_snapshot(self, path: str | os.PathLike[str], vocab_size: int) -> Path:
        """Write ``snapshot_bytes`` to ``path`` through a temp file and a rename."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(self.snapshot_bytes(vocab_size))
        os.replace(tmp, path)
        return path

    def load_snapshot_bytes(self, data: bytes, vocab_size: int | None = None) -> int:
        """Replace the global index with a snapshot's documents; returns how many.

        Validated whole before the index is touched (a bad file leaves it as it was).
        Documents are re-added oldest first under this speculator's own budgets, so the
        index equals the saved one when the budgets are the same; only the newest that
        the token budget holds are indexed (older ones would be evicted at once)."""
        docs = decode_snapshot(data, vocab_size)
        kept, total = 0, 0
        for doc in reversed(docs):
            if kept and total + len(doc) > self.global_tokens:
                break
            kept, total = kept + 1, total + len(doc)
        self._global = NgramIndex()
        self._global_docs.clear()
        self._global_size = 0
        for doc in docs[len(docs) - kept :]:
            self.add_document(doc.tolist())
        return kept

    def load_snapshot(self, path: str | os.PathLike[str], vocab_size: int | None = None) -> int:
        """``load_snapshot_bytes`` of a file; SnapshotError if it is not a valid one."""
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise SnapshotError(f"{path}: cannot read suffix snapshot: {err}") from err
        try:
            return self.load_snapshot_bytes(data, vocab_size)
        except SnapshotError as err:
            raise SnapshotError(f"{path}: {err}") from err

    @property
    def global_size(self) -> int:
        return self._global_size

    @property
    def global_nbytes(self) -> int:
        """Bytes the global index holds (documents included)."""
        return self._global.nbytes

    @property
    def local_nbytes(self) -> int:
        """Bytes the live requests' own indexes hold."""
        return sum(local.index.nbytes for local in list(self._local.values()))

    def _local_index(self, seq_id: str, context: list[int]) -> _Local:
        local = self._local.get(seq_id)
        if local is None or context[: len(local.doc)] != local.doc:
            if local is None and len(self._local) >= MAX_LIVE_SEQUENCES:
                raise RuntimeError(f"too many live sequences (max {MAX_LIVE_SEQUENCES})")
            local = self._local[seq_id] = _Local(doc=[], index=NgramIndex())
        start = len(local.doc)
        local.doc.extend(context[start:])
        local.index.extend(local.doc, start)
        if local.index.nbytes > self.local_bytes:
            # Over its budget, a request's index restarts from its newest half (within
            # the budget at the worst cost): its freshest tokens are its best evidence.
            keep = min(len(local.doc) // 2, self.local_bytes // (2 * WORST_BYTES_PER_TOKEN))
            local.index = NgramIndex()
            local.index.extend(local.doc, len(local.doc) - keep)
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

    def _propose_one(self, request: DraftRequest) -> DraftTree:
        """A draft tree grown best-first: the ``lookahead`` likeliest continuations.

        Each node's confidence is the share of its parent's evidence that continues
        with its token; a node's reach is the product down its path. Where the
        evidence agrees the tree is a chain; where it splits, both branches are
        verified in the same forward.
        """
        local = self._local_index(request.seq_id, request.context)
        if request.lookahead <= 0:
            return DraftTree.empty()
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
        tree = DraftTree(
            tokens=tokens,
            confidences=confidences,
            bucket=f"suffix:{min(match_len, 4)}",
            parents=parents,
        )
        return tree if request.trees else tree.main_chain()

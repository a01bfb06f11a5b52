"""The suffix index's snapshot: a saved index drafts exactly as the live one did; a
corrupt, truncated, foreign or wrong-vocabulary file is refused and changes nothing."""

from __future__ import annotations

import struct

import pytest

from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.base import DraftRequest
from atlas_sidecar.engine.speculators.suffix import (
    SNAPSHOT_MAGIC,
    SnapshotError,
    SuffixSpeculator,
)

VOCAB = 49152


def _drafts(speculator: SuffixSpeculator, contexts: list[list[int]]):
    params = SamplingParams()
    requests = [DraftRequest(f"probe-{i}", c, 8, params) for i, c in enumerate(contexts)]
    out = [(d.tokens, d.parents, d.confidences) for d in speculator.propose(requests)]
    for request in requests:
        speculator._local.pop(request.seq_id, None)  # probes are not traffic
    return out


def _probes(records) -> list[list[int]]:
    """Contexts that end inside the traffic: prompts and prefixes of the outputs."""
    probes = []
    for record in records:
        tokens = list(record.tokens)
        for cut in (len(record.prompt_ids), len(record.prompt_ids) + 10, len(tokens) - 5):
            probes.append(tokens[:cut])
    return probes


def test_round_trip_drafts_as_the_live_index(python_traffic, tmp_path):
    # A token budget that evicts the oldest documents: the snapshot holds the survivors.
    live = SuffixSpeculator(global_tokens=1200)
    for record in python_traffic:
        live.add_document(list(record.tokens))
    assert live.global_size < sum(len(r.tokens) for r in python_traffic)
    path = live.save_snapshot(tmp_path / "suffix.bin", VOCAB)
    loaded = SuffixSpeculator(global_tokens=1200)
    assert loaded.load_snapshot(path, VOCAB) == len(live._global_docs)
    assert loaded.global_size == live.global_size
    # The same n-grams (bytes differ: the live dict's table keeps its size after evictions).
    assert len(loaded._global) == len(live._global)
    assert loaded.global_nbytes <= live.global_nbytes
    probes = _probes(python_traffic)
    expected = _drafts(live, probes)
    assert sum(len(tokens) for tokens, _, _ in expected) > 100  # the index really drafts
    assert _drafts(loaded, probes) == expected


def test_smaller_budget_keeps_the_newest(python_traffic):
    live = SuffixSpeculator()
    for record in python_traffic:
        live.add_document(list(record.tokens))
    small = SuffixSpeculator(global_tokens=len(python_traffic[-1].tokens) + 1)
    assert small.load_snapshot_bytes(live.snapshot_bytes(VOCAB), VOCAB) == 1
    assert list(small._global_docs[0]) == list(python_traffic[-1].tokens)


def _snapshot(python_traffic) -> bytes:
    live = SuffixSpeculator()
    for record in python_traffic[:3]:
        live.add_document(list(record.tokens))
    return live.snapshot_bytes(VOCAB)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:-1], "bytes"),
        (lambda b: b[:20], "truncated"),
        (lambda b: b"NOTATLAS" + b[8:], "bad magic"),
        (lambda b: b[:8] + struct.pack("<I", 2) + b[12:], "format 2"),
        (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "checksum"),
        (lambda b: b"\x80\x04\x95" + b[3:], "bad magic"),  # a pickle is not a snapshot
    ],
)
def test_corrupt_snapshot_refused(python_traffic, tmp_path, damage, message):
    good = _snapshot(python_traffic)
    assert good.startswith(SNAPSHOT_MAGIC)
    path = tmp_path / "suffix.bin"
    path.write_bytes(damage(good))
    speculator = SuffixSpeculator()
    speculator.add_document([1, 2, 3, 4])
    with pytest.raises(SnapshotError, match=message):
        speculator.load_snapshot(path, VOCAB)
    assert speculator.global_size == 4  # a refused file leaves the index as it was


def test_wrong_vocabulary_refused(python_traffic):
    with pytest.raises(SnapshotError, match="vocabulary 49152, this is 32000"):
        SuffixSpeculator().load_snapshot_bytes(_snapshot(python_traffic), 32000)


def test_ids_outside_the_vocabulary_refused(python_traffic):
    live = SuffixSpeculator()
    live.add_document([5, 6, VOCAB + 7])
    with pytest.raises(SnapshotError, match="outside"):
        SuffixSpeculator().load_snapshot_bytes(live.snapshot_bytes(VOCAB), VOCAB)


def test_missing_file_refused(tmp_path):
    with pytest.raises(SnapshotError, match="cannot read"):
        SuffixSpeculator().load_snapshot(tmp_path / "nothing.bin", VOCAB)

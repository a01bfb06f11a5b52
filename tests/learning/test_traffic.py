"""The trainer's traffic store: round trips, de-duplication, retention, the wire bounds."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from atlas_sidecar.learning.records import MAX_RECORD_TOKENS, TrafficRecord
from atlas_sidecar.learning.traffic import TrafficStore
from atlas_sidecar.learning.wire import BadRecord, decode, encode, to_proto

from .conftest import make_record as record


def test_records_round_trip_in_ingest_order_with_a_cursor(tmp_path: Path) -> None:
    store = TrafficStore(tmp_path / "t.db", max_bytes=1 << 20, max_age_s=3600)
    records = [record(i) for i in range(5)]
    assert store.add(records[:3]) == 3
    assert store.add(records[3:]) == 2
    rows = store.read(after=0, limit=100)
    assert [r for _, r in rows] == records
    seqs = [seq for seq, _ in rows]
    assert seqs == sorted(seqs)
    assert [r for _, r in store.read(after=seqs[1], limit=2)] == records[2:4]
    assert store.count() == 5
    store.close()


def test_duplicates_are_stored_once(tmp_path: Path) -> None:
    store = TrafficStore(tmp_path / "t.db", max_bytes=1 << 20, max_age_s=3600)
    assert store.add([record(1), record(2)]) == 2
    assert store.add([record(2), record(3), record(3)]) == 1
    assert store.count() == 3
    ids = [r.request_id for _, r in store.read()]
    assert sorted(ids) == sorted({record(i).request_id for i in (1, 2, 3)})
    store.close()


def test_committed_records_survive_a_reopen_and_wal_mode_is_on(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = TrafficStore(path, max_bytes=1 << 20, max_age_s=3600)
    store.add([record(i) for i in range(4)])
    store.close()
    again = TrafficStore(path, max_bytes=1 << 20, max_age_s=3600)
    assert again.count() == 4
    assert again.stored_bytes > 0
    again.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_retention_by_bytes_drops_the_oldest_first(tmp_path: Path) -> None:
    one = len(encode(record(0))) + len(record(0).request_id)
    store = TrafficStore(tmp_path / "t.db", max_bytes=3 * one + one // 2, max_age_s=3600)
    for i in range(6):
        store.add([record(i)])
        assert store.stored_bytes <= store.max_bytes
    assert [r.request_id for _, r in store.read()] == [record(i).request_id for i in (3, 4, 5)]
    store.close()


def test_retention_by_age_drops_what_is_older(tmp_path: Path, monkeypatch) -> None:
    store = TrafficStore(tmp_path / "t.db", max_bytes=1 << 20, max_age_s=60)
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now - 120)
    store.add([record(1), record(2)])
    monkeypatch.setattr(time, "time", lambda: now)
    store.add([record(3)])
    assert [r.request_id for _, r in store.read()] == [record(3).request_id]
    assert store.stored_bytes == len(encode(record(3))) + len(record(3).request_id)
    store.close()


def test_a_record_outside_the_bounds_does_not_decode() -> None:
    long = TrafficRecord(**{**vars(record(1)), "prompt_ids": (1,) * (MAX_RECORD_TOKENS + 1)})
    with pytest.raises(BadRecord, match="tokens"):
        decode(encode(long))
    skewed = to_proto(record(1))
    skewed.step_accepted.append(4)
    with pytest.raises(BadRecord, match="parallel"):
        decode(skewed.SerializeToString())
    unnamed = to_proto(record(1))
    unnamed.step_speculator[0] = 9
    with pytest.raises(BadRecord, match="speculator"):
        decode(unnamed.SerializeToString())
    with pytest.raises(BadRecord, match="not a MirrorRecord"):
        decode(b"\xff\xff\xff")

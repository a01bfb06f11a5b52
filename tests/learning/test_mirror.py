"""The mirror against a real ingest server on loopback: delivery, spill, replay, bounds."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from atlas_sidecar.engine.core import StepStats
from atlas_sidecar.learning.ingest import IngestConfig, IngestServerThread
from atlas_sidecar.learning.records import MAX_RECORD_TOKENS
from atlas_sidecar.learning.wire import decode, encode
from atlas_sidecar.serving.mirror import build_record, sampled_in
from atlas_sidecar.serving.spill import Spill

from .conftest import free_port, make_record, metric, wait_until


def ids_in(store) -> list[str]:
    return [r.request_id for _, r in store.read(limit=10000)]


def test_offered_records_arrive_once_and_are_acked(store, trainer, mirror_for) -> None:
    mirror, registry = mirror_for(trainer.address)
    records = [make_record(i) for i in range(20)]
    assert all(mirror.offer(r) for r in records)
    wait_until(lambda: store.count() == 20, "every record stored")
    stored = sorted((r for _, r in store.read(limit=100)), key=lambda r: r.request_id)
    assert stored == records
    wait_until(lambda: metric(registry, "atlas_mirror_acked_records_total") == 20, "acks")
    wait_until(lambda: mirror.queue_bytes == 0, "the queue emptied by the acks")
    assert metric(registry, "atlas_mirror_records_total") == 20


def test_a_record_offered_twice_is_stored_once(store, trainer, mirror_for) -> None:
    mirror, registry = mirror_for(trainer.address)
    for i in (1, 2, 2, 3, 1):
        mirror.offer(make_record(i))
    wait_until(lambda: metric(registry, "atlas_mirror_acked_records_total") == 5, "acks")
    assert sorted(ids_in(store)) == [make_record(i).request_id for i in (1, 2, 3)]
    assert trainer.server.service.duplicates == 2


def test_unreachable_trainer_spills_then_catches_up_exactly_once(tmp_path, store, mirror_for):
    port = free_port()
    mirror, registry = mirror_for(f"127.0.0.1:{port}", retry_max_s=0.5)
    records = [make_record(i) for i in range(40)]
    for r in records:
        assert mirror.offer(r)
    wait_until(lambda: metric(registry, "atlas_mirror_spilled_records_total") == 40, "spilled")
    assert mirror.queue_bytes == 0
    assert metric(registry, "atlas_mirror_spill_bytes") > 0
    with IngestServerThread(store, IngestConfig(port=port)):
        more = [make_record(i) for i in range(40, 50)]
        for r in more:
            mirror.offer(r)
        wait_until(lambda: store.count() == 50, "catch-up")
        wait_until(lambda: metric(registry, "atlas_mirror_spill_bytes") == 0, "spill deleted")
    got = ids_in(store)
    assert sorted(got) == sorted(r.request_id for r in records + more)
    assert len(got) == len(set(got))
    assert not list((tmp_path / "spill").glob("spill-*.log"))


def test_past_the_spill_bound_records_are_dropped_and_counted(store, mirror_for) -> None:
    # Room for 5 frames (8-byte headers) and a segment's magic, with its reserve; even
    # numbers only, so that every record has the same size whichever go first.
    bound = 5 * (len(encode(make_record(0))) + 8) + 16
    mirror, registry = mirror_for(f"127.0.0.1:{free_port()}", spill_bytes=bound)
    for i in range(0, 24, 2):
        mirror.offer(make_record(i))

    def dropped() -> float:
        return metric(registry, "atlas_mirror_dropped_records_total", reason="spill_full")

    wait_until(lambda: metric(registry, "atlas_mirror_spilled_records_total") + dropped() == 12,
               "spilled or dropped")  # fmt: skip
    assert metric(registry, "atlas_mirror_spilled_records_total") == 5
    assert dropped() == 7
    assert metric(registry, "atlas_mirror_spill_bytes") <= bound


def test_past_the_queue_bound_offers_are_refused_at_once(mirror_for) -> None:
    three = sum(len(encode(make_record(i))) for i in range(3))
    mirror, registry = mirror_for(f"127.0.0.1:{free_port()}", spill_dir=None,
                                  queue_bytes=three)  # fmt: skip
    started = time.monotonic()
    accepted = [mirror.offer(make_record(i)) for i in range(5)]
    assert time.monotonic() - started < 1.0
    assert accepted == [True, True, True, False, False]
    assert metric(registry, "atlas_mirror_dropped_records_total", reason="queue_full") == 2
    assert mirror.queue_bytes == three


def test_a_stalled_trainer_is_left_for_the_spill_and_caught_up(store, trainer, mirror_for):
    mirror, registry = mirror_for(trainer.address, ack_timeout_s=0.5, retry_max_s=0.3)
    store.gate.clear()
    started = time.monotonic()
    for i in range(10):
        assert mirror.offer(make_record(i))
    assert time.monotonic() - started < 1.0  # offering never waits on the trainer
    wait_until(store.waiting.is_set, "the trainer's handler blocked")
    wait_until(lambda: metric(registry, "atlas_mirror_spilled_records_total") > 0,
               "records spilled once the trainer stalled")  # fmt: skip
    store.gate.set()
    wait_until(lambda: store.count() == 10, "catch-up after the stall")
    assert len(set(ids_in(store))) == 10


def test_a_torn_spill_tail_is_skipped_with_a_log_line(tmp_path, store, caplog) -> None:
    spill_dir = tmp_path / "spill"
    spill = Spill(spill_dir, 1 << 20)
    assert spill.append([encode(make_record(i)) for i in range(3)]) == 3
    spill.close()
    (segment,) = spill_dir.glob("spill-*.log")
    whole = segment.read_bytes()
    segment.write_bytes(whole + encode(make_record(3))[:5])  # a crash mid-frame-write
    caplog.set_level(logging.WARNING, logger="atlas_sidecar.serving.spill")
    reopened = Spill(spill_dir, 1 << 20)
    replay = reopened.rewind()
    frames = []
    while (frame := reopened.next_frame(replay)) is not None:
        frames.append(frame[1])
    assert frames == [encode(make_record(i)) for i in range(3)]
    assert any("torn" in r.getMessage() and segment.name in r.getMessage()
               for r in caplog.records)  # fmt: skip
    reopened.close()


def test_sampling_is_a_deterministic_fraction_of_ids() -> None:
    ids = [f"r0/{i:032x}" for i in range(4000)]
    chosen = [i for i in ids if sampled_in(i, 0.25)]
    assert 800 < len(chosen) < 1200
    assert chosen == [i for i in ids if sampled_in(i, 0.25)]
    assert all(sampled_in(i, 1.0) for i in ids[:10])
    assert not any(sampled_in(i, 0.0) for i in ids[:10])


def test_close_spills_what_is_unacked_for_the_next_process(tmp_path: Path, mirror_for) -> None:
    mirror, registry = mirror_for(f"127.0.0.1:{free_port()}", spill_dir=tmp_path / "s2",
                                  retry_min_s=30, retry_max_s=30, drain_s=0.1)  # fmt: skip
    time.sleep(0.3)  # the first stream has failed; the next try is 30 s away
    for i in range(4):
        mirror.offer(make_record(i))
    mirror.close()
    assert metric(registry, "atlas_mirror_spilled_records_total") == 4
    spill = Spill(tmp_path / "s2", 1 << 20)
    assert spill.next_frame(spill.rewind()) is not None
    spill.close()


def test_a_torn_spill_left_by_a_crash_is_replayed_up_to_the_tear(
    tmp_path, store, trainer, mirror_for, caplog
) -> None:
    spill = Spill(tmp_path / "spill", 1 << 20)
    spill.append([encode(make_record(i)) for i in range(3)])
    spill.close()
    (segment,) = (tmp_path / "spill").glob("spill-*.log")
    with segment.open("ab") as f:
        f.write(encode(make_record(3))[:7])  # the process died mid-write
    caplog.set_level(logging.WARNING, logger="atlas_sidecar.serving.spill")
    mirror, registry = mirror_for(trainer.address)
    wait_until(lambda: store.count() == 3, "the whole frames replayed")
    wait_until(lambda: not segment.exists(), "the replayed segment deleted")
    wait_until(lambda: metric(registry, "atlas_mirror_spill_bytes") == 0, "its bytes released")
    assert sorted(ids_in(store)) == [make_record(i).request_id for i in range(3)]
    assert any("torn" in r.getMessage() for r in caplog.records)


def test_a_long_request_is_mirrored_as_its_tail() -> None:
    steps = [StepStats("static", 3, 2, 0.0, 0.0)] * 10
    cap = MAX_RECORD_TOKENS
    record = build_record("r/1", "r", list(range(cap)), list(range(cap, cap + 100)), steps,
                          "v1", False)  # fmt: skip
    assert record.tokens == tuple(range(100, cap + 100))
    assert record.output_ids == tuple(range(cap, cap + 100))
    only_output = build_record("r/2", "r", [1, 2], list(range(cap + 5)), steps, "v1", True)
    assert only_output.prompt_ids == () and only_output.output_ids == tuple(range(5, cap + 5))
    short = build_record("r/3", "r", [1, 2], [3], steps[:1], "v1", False)
    assert (short.prompt_ids, short.output_ids) == ((1, 2), (3,))
    assert (short.step_speculators, short.step_drafted, short.step_accepted) == (
        ("static",), (3,), (2,),
    )  # fmt: skip
    assert decode(encode(record)) == record  # within the wire's bounds


def test_a_lagging_trainer_gets_the_queue_excess_through_the_spill(store, trainer, mirror_for):
    eight = sum(len(encode(make_record(i))) for i in range(8))
    mirror, registry = mirror_for(trainer.address, queue_bytes=eight, ack_timeout_s=60)
    store.gate.clear()  # slow, not gone: the stream stays up, acks just do not come yet
    for i in range(20):
        assert mirror.offer(make_record(i)), f"record {i} refused"
        time.sleep(0.05)
    assert metric(registry, "atlas_mirror_spilled_records_total") > 0
    assert mirror.queue_bytes <= eight
    store.gate.set()
    wait_until(lambda: store.count() == 20, "every record, live and spilled")
    assert len(set(ids_in(store))) == 20
    assert metric(registry, "atlas_mirror_dropped_records_total", reason="queue_full") == 0


def test_a_stale_replay_neither_reads_nor_acks_the_spill(tmp_path) -> None:
    spill = Spill(tmp_path / "spill", 1 << 20)
    spill.append([encode(make_record(i)) for i in range(2)])
    old = spill.rewind()
    segment, _ = spill.next_frame(old)
    new = spill.rewind()  # the next stream: the old one's reader may still be running
    assert spill.next_frame(old) is None
    spill.acked(segment, old)  # a late ack of the old stream: void
    frames = [spill.next_frame(new), spill.next_frame(new), spill.next_frame(new)]
    assert [f[1] for f in frames[:2]] == [encode(make_record(i)) for i in range(2)]
    assert frames[2] is None and segment.path.exists()
    spill.acked(segment, new)
    assert segment.path.exists()  # one frame still unacked
    spill.acked(segment, new)
    assert not segment.path.exists() and spill.bytes == 0
    spill.close()

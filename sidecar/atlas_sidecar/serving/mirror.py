"""Traffic mirroring: each finished request, as a TrafficRecord, streamed to the trainer.

``Mirror.offer`` is called on the scheduler's worker and never waits on the network or
the disk: it encodes the record and appends it to an in-memory queue bounded in bytes
(over the bound, the record is dropped and counted). A background thread streams the
queue to the trainer (atlas.trainer.v1.Trainer/Ingest) and forgets a record only once
the trainer acked its request id: at-least-once, the trainer de-duplicates.

While the trainer is unreachable (no stream, or no ack for ``ack_timeout_s`` with
records in flight: a stalled trainer counts as gone) the thread moves the queue to the
spill (``spill.py``, bounded in bytes, fsynced), and replays it once a stream is up
again, alternating with live records. At shutdown, what is not acked goes to the spill
too, for the next process to replay. Without a spill directory, records wait in the
queue until its bound and are dropped past it or at shutdown (all counted).

Privacy: only request ids, counts and gRPC status codes are logged, never token ids.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from atlas_sidecar.engine.core import GenerationResult, StepStats
from atlas_sidecar.learning.records import MAX_RECORD_TOKENS, TrafficRecord
from atlas_sidecar.learning.wire import MAX_MESSAGE_BYTES, encode
from atlas_sidecar.serving.proto import trainer_v1_pb2 as tpb
from atlas_sidecar.serving.spill import Segment, Spill

log = logging.getLogger(__name__)

INGEST_METHOD = "/atlas.trainer.v1.Trainer/Ingest"


@dataclass(frozen=True)
class MirrorConfig:
    url: str  # the trainer's host:port
    replica: str  # request ids are "<replica>/<uuid>"
    fraction: float = 1.0  # of finished requests mirrored (by a hash of the request id)
    queue_bytes: int = 64 << 20  # encoded records held in memory, unsent or unacked
    spill_dir: Path | None = None  # None: no spill
    spill_bytes: int = 1 << 30
    window: int = 256  # records sent and not acked yet, at most
    ack_timeout_s: float = 10.0  # records in flight and no ack this long: trainer stalled
    retry_min_s: float = 0.2  # reconnect backoff, doubling up to retry_max_s
    retry_max_s: float = 5.0
    drain_s: float = 2.0  # at close: time to get the queue acked before spilling it


class MirrorMetrics:
    """Prometheus counters on the server's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.mirrored = Counter("atlas_mirror_records", "Records queued for the trainer",
                                registry=r)  # fmt: skip
        self.acked = Counter("atlas_mirror_acked_records", "Records the trainer acked",
                             registry=r)  # fmt: skip
        self.spilled = Counter("atlas_mirror_spilled_records", "Records written to the spill",
                               registry=r)  # fmt: skip
        self.dropped = Counter(
            "atlas_mirror_dropped_records",
            "Records lost: queue or spill full, too large, refused by the trainer, shutdown",
            ["reason"], registry=r,
        )  # fmt: skip
        self.queue_bytes = Gauge("atlas_mirror_queue_bytes", "Encoded records in memory",
                                 registry=r)  # fmt: skip
        self.spill_bytes = Gauge("atlas_mirror_spill_bytes", "Bytes in the spill directory",
                                 registry=r)  # fmt: skip


@dataclass(eq=False)
class _Entry:
    request_id: str
    data: bytes  # the encoded MirrorRecord
    segment: Segment | None = None  # None: in memory, counted in the queue's bytes


@dataclass(eq=False)
class _Session:
    """One Ingest stream: what it has in flight, keyed by request id."""

    inflight: dict[str, list[_Entry]]
    last_progress: float  # monotonic: the last ack, or when the first record went out
    replay: int = 0  # the spill's replay this stream reads
    ended: bool = False
    acked: int = 0
    spill_bytes: int = 0  # replayed from the spill and in flight
    memory_bytes: int = 0  # from the queue and in flight (still counted in the queue)
    from_spill: bool = False  # whose turn it is, when both the queue and the spill wait

    def stalled(self, now: float, timeout_s: float) -> bool:
        return bool(self.inflight) and now - self.last_progress > timeout_s


def build_record(
    request_id: str,
    replica: str,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    steps: Sequence[StepStats],
    weight_version: str,
    sampled: bool,
) -> TrafficRecord:
    """The record, capped to MAX_RECORD_TOKENS tokens (and steps) as a tail: the end of
    a long request is what its output depends on most."""
    output = tuple(output_ids[-MAX_RECORD_TOKENS:])
    room = MAX_RECORD_TOKENS - len(output)
    prompt = tuple(prompt_ids[max(0, len(prompt_ids) - room) :]) if room else ()
    steps = steps[-MAX_RECORD_TOKENS:]
    return TrafficRecord(
        request_id=request_id,
        replica=replica,
        prompt_ids=prompt,
        output_ids=output,
        step_speculators=tuple(s.speculator for s in steps),
        step_drafted=tuple(s.drafted for s in steps),
        step_accepted=tuple(s.accepted for s in steps),
        weight_version=weight_version,
        finished_at=time.time(),
        sampled=sampled,
    )


def sampled_in(request_id: str, fraction: float) -> bool:
    """Deterministic per id: the same id is always in or always out."""
    if fraction >= 1.0:
        return True
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * (1 << 64)


class Mirror:
    """Off unless built: ``atlas serve --mirror-url`` makes one (see ``commands.py``)."""

    def __init__(
        self,
        config: MirrorConfig,
        registry: CollectorRegistry,
        weight_version: Callable[[], str] = lambda: "",
    ) -> None:
        if not 0.0 <= config.fraction <= 1.0:
            raise ValueError("the mirror fraction must be within [0, 1]")
        if config.queue_bytes <= 0 or config.spill_bytes <= 0 or config.window < 1:
            raise ValueError("queue_bytes, spill_bytes and window must be positive")
        self.config = config
        self.weight_version = weight_version
        self.metrics = MirrorMetrics(registry)
        self.spill = Spill(config.spill_dir, config.spill_bytes) if config.spill_dir else None
        self._cond = threading.Condition()
        self._queue: deque[_Entry] = deque()  # unsent, in memory
        self._queue_bytes = 0  # memory entries: unsent, in flight or being spilled
        self._session: _Session | None = None
        self._accepting = True
        self._drain_until = float("inf")
        self._dropping = False  # a drop was logged; the next accepted record logs again
        self.metrics.queue_bytes.set_function(lambda: self._queue_bytes)
        self.metrics.spill_bytes.set_function(lambda: self.spill.bytes if self.spill else 0)
        self._channel = grpc.insecure_channel(config.url, options=_channel_options(config))
        self._ingest = self._channel.stream_stream(
            INGEST_METHOD,
            request_serializer=lambda data: data,  # already encoded
            response_deserializer=tpb.IngestAck.FromString,
        )
        self._thread = threading.Thread(target=self._run, name="atlas-mirror", daemon=True)

    def start(self) -> Mirror:
        self._thread.start()
        return self

    # -- the serving side (any thread; never blocks on I/O) ---------------------------

    def observe(
        self,
        prompt_ids: Sequence[int],
        result: GenerationResult,
        sampled: bool,
        weight_version: str = "",
    ) -> bool:
        """Mirror one finished request (if sampled in); True if it was queued.
        ``weight_version``: the version it drafted with ("": the server's serving one)."""
        request_id = f"{self.config.replica}/{uuid.uuid4().hex}"
        if not sampled_in(request_id, self.config.fraction):
            return False
        version = weight_version or self.weight_version()
        record = build_record(request_id, self.config.replica, prompt_ids, result.token_ids,
                              result.steps, version, sampled)  # fmt: skip
        return self.offer(record)

    def offer(self, record: TrafficRecord) -> bool:
        """Queue the record if it is sampled in and fits; True if queued."""
        if not sampled_in(record.request_id, self.config.fraction):
            return False
        data = encode(record)
        with self._cond:
            if not self._accepting:
                reason = "shutdown"
            elif len(data) > MAX_MESSAGE_BYTES:
                reason = "too_large"
            elif self._queue_bytes + len(data) > self.config.queue_bytes:
                reason = "queue_full"
            else:
                self._queue.append(_Entry(record.request_id, data))
                self._queue_bytes += len(data)
                self._dropping = False
                self._cond.notify_all()
                reason = ""
        if reason:
            self._drop(reason)
            return False
        self.metrics.mirrored.inc()
        return True

    def _drop(self, reason: str, n: int = 1) -> None:
        self.metrics.dropped.labels(reason).inc(n)
        if not self._dropping:
            self._dropping = True
            log.warning("mirror: dropping records (%s); see atlas_mirror_dropped_records", reason)

    @property
    def queue_bytes(self) -> int:
        return self._queue_bytes

    # -- shutdown ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop taking records, give the trainer ``drain_s`` to ack the queue, spill
        the rest (or drop it, counted, without a spill), and stop."""
        with self._cond:
            self._accepting = False
            self._drain_until = time.monotonic() + self.config.drain_s
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(self.config.drain_s + self.config.ack_timeout_s + 10)
        else:
            self._spill_memory()
        self._channel.close()
        if self.spill is not None:
            self.spill.close()

    def _done(self) -> bool:
        with self._cond:
            return self._done_locked()

    # -- the sender thread ------------------------------------------------------------

    def _run(self) -> None:
        """Stream while the trainer answers; between streams, spill and back off."""
        backoff = self.config.retry_min_s
        connected = True
        while not self._done():
            session = self._stream()
            self._spill_memory()
            if session.acked:
                backoff = self.config.retry_min_s
            if connected != bool(session.acked):
                connected = bool(session.acked)
                if connected:
                    log.info("mirror: trainer %s is back", self.config.url)
                else:
                    log.warning("mirror: trainer %s unreachable; spilling until it is back",
                                self.config.url)  # fmt: skip
            self._wait(backoff)
            backoff = min(backoff * 2, self.config.retry_max_s)
        self._spill_memory()

    def _wait(self, seconds: float) -> None:
        """Sleep between streams, spilling what arrives meanwhile."""
        until = time.monotonic() + seconds
        while not self._done() and (left := until - time.monotonic()) > 0:
            with self._cond:
                self._cond.wait(min(left, 0.25))
            self._spill_memory()

    def _stream(self) -> _Session:
        """One Ingest stream, until it breaks, stalls or the mirror closes."""
        session = _Session(inflight={}, last_progress=time.monotonic())
        if self.spill is not None:
            session.replay = self.spill.rewind()
        with self._cond:
            self._session = session
        call = self._ingest(self._requests(session), wait_for_ready=False)
        reader = threading.Thread(target=self._read_acks, args=(session, call),
                                  name="atlas-mirror-acks", daemon=True)  # fmt: skip
        reader.start()
        while self._streaming(session):
            self._spill_memory(seal=True)  # the trainer lags: the queue's excess to disk
        call.cancel()
        reader.join(10)
        self._end(session)
        return session

    def _streaming(self, session: _Session) -> bool:
        """Wait a little; False once the stream is over (broken, stalled, closing).
        True early when the queue is over half its bound, to spill what is unsent."""
        with self._cond:
            while not session.ended and not self._done_locked():
                self._cond.wait(0.25)
                if session.stalled(time.monotonic(), self.config.ack_timeout_s):
                    log.warning("mirror: no ack from the trainer for %.0f s; reconnecting",
                                self.config.ack_timeout_s)  # fmt: skip
                    return False
                over = self._queue_bytes > self.config.queue_bytes // 2
                if self.spill is not None and over and self._queue:
                    return True
        return False

    def _done_locked(self) -> bool:
        if self._accepting:
            return False
        idle = not self._queue and not (self._session and self._session.inflight)
        return idle or time.monotonic() >= self._drain_until

    def _end(self, session: _Session) -> None:
        """Records the stream left unacked: memory ones back to the queue's front; spill
        ones stay in their segments (rewound at the next stream)."""
        with self._cond:
            session.ended = True
            self._session = None
            for entries in session.inflight.values():
                for entry in entries:
                    if entry.segment is None:
                        self._queue.appendleft(entry)
            session.inflight.clear()
            session.spill_bytes = session.memory_bytes = 0
            self._cond.notify_all()

    def _requests(self, session: _Session) -> Iterator[bytes]:
        """The stream's messages (consumed on a gRPC thread): queue and spill in turns,
        at most ``window`` in flight, and at most half the queue's bytes from each: the
        other half takes new records while the trainer lags, and is spilled past that
        (see ``_streaming``)."""
        while True:
            spill_waiting = self.spill is not None and self.spill.frames_waiting
            with self._cond:
                while not session.ended and len(session.inflight) >= self.config.window:
                    self._cond.wait(0.25)
                if session.ended:
                    return
                spill_first = spill_waiting and session.from_spill
                session.from_spill = not session.from_spill
                entry = None if spill_first else self._take_memory(session)
            if entry is None:
                entry = self._take_spill(session)
            if entry is None and spill_first:
                with self._cond:
                    entry = self._take_memory(session)
            if entry is None:
                with self._cond:
                    self._cond.wait(0.25)
                continue
            yield entry.data

    def _take_memory(self, session: _Session) -> _Entry | None:
        """The next live record (holding the lock)."""
        half = self.config.queue_bytes // 2
        if session.ended or not self._queue or session.memory_bytes >= half:
            return None
        entry = self._queue.popleft()
        self._in_flight(session, entry)
        return entry

    def _take_spill(self, session: _Session) -> _Entry | None:
        if self.spill is None or session.spill_bytes >= self.config.queue_bytes // 2:
            return None
        frame = self.spill.next_frame(session.replay)  # disk I/O: outside the mirror's lock
        if frame is None:
            return None
        segment, data = frame
        request_id = _request_id(data)
        if not request_id:  # checksummed, so written so: nothing the trainer could store
            self.spill.acked(segment, session.replay)
            self._drop("corrupt")
            return None
        entry = _Entry(request_id, data, segment)
        with self._cond:
            if session.ended:
                return None  # its segment is rewound by the next stream
            self._in_flight(session, entry)
        return entry

    def _in_flight(self, session: _Session, entry: _Entry) -> None:
        if not session.inflight:
            session.last_progress = time.monotonic()  # the stall clock starts now
        session.inflight.setdefault(entry.request_id, []).append(entry)
        if entry.segment is not None:
            session.spill_bytes += len(entry.data)
        else:
            session.memory_bytes += len(entry.data)

    def _read_acks(self, session: _Session, call: grpc.Call) -> None:
        try:
            for ack in call:  # type: ignore[attr-defined]
                self._on_ack(session, ack)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code != grpc.StatusCode.CANCELLED:
                # Every retry while the trainer is down: the transitions are logged above.
                log.debug("mirror: ingest stream ended: %s", getattr(code, "name", code))
        finally:
            with self._cond:
                session.ended = True
                self._cond.notify_all()

    def _on_ack(self, session: _Session, ack: tpb.IngestAck) -> None:
        done: list[_Entry] = []
        with self._cond:
            if session.ended:
                return
            for request_id in ack.request_ids:
                done.extend(session.inflight.pop(request_id, ()))
            acked = len(done)
            for request_id in ack.rejected_ids:
                done.extend(session.inflight.pop(request_id, ()))
            self._queue_bytes -= sum(len(e.data) for e in done if e.segment is None)
            session.spill_bytes -= sum(len(e.data) for e in done if e.segment is not None)
            session.memory_bytes -= sum(len(e.data) for e in done if e.segment is None)
            session.acked += acked
            session.last_progress = time.monotonic()
            self._cond.notify_all()
        for entry in done:
            if entry.segment is not None and self.spill is not None:
                self.spill.acked(entry.segment, session.replay)
        self.metrics.acked.inc(acked)
        if len(done) > acked:
            self._drop("rejected", len(done) - acked)

    def _spill_memory(self, seal: bool = False) -> None:
        """Move the unsent queue to the spill (the trainer is not taking it); without a
        spill, keep it until the mirror closes, then drop it (counted). ``seal``: during
        a stream, so that its replay can read the new segment."""
        with self._cond:
            if self.spill is None and self._accepting:
                return
            entries = list(self._queue)
            self._queue.clear()
        if not entries:
            return
        written = self.spill.append([e.data for e in entries], seal) if self.spill else 0
        with self._cond:
            self._queue_bytes -= sum(len(e.data) for e in entries)
        self.metrics.spilled.inc(written)
        if written < len(entries):
            self._drop("spill_full" if self.spill else "shutdown", len(entries) - written)


def _request_id(data: bytes) -> str:
    """The id of an encoded record; "" if it does not parse."""
    message = tpb.MirrorRecord()
    try:
        message.ParseFromString(data)
    except Exception:  # noqa: BLE001 - whatever the parser raises on bad bytes
        return ""
    return str(message.request_id)


def _channel_options(config: MirrorConfig) -> list[tuple[str, int]]:
    """Reconnect fast once the trainer is back (gRPC's default backoff grows to 120 s)."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", int(config.retry_min_s * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(config.retry_min_s * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(config.retry_max_s * 1000)),
        ("grpc.keepalive_time_ms", 30000),
        ("grpc.keepalive_timeout_ms", 10000),
    ]

"""The mirror's spill: encoded records on local disk while the trainer is unreachable.

Append-only segment files ``spill-<n>.log`` in one directory: an 8-byte magic, then
frames of ``<u32 length><u32 crc32><payload>``. A segment is only appended to by the
process that created it, and is sealed (never appended to again) before it is replayed,
so a torn tail (a crash mid-write) can only sit at the end of a segment: replay stops
there with a warning and the frames before it are kept. A segment is deleted once every
frame read from it was acked; a replay cut short (the stream broke) rewinds to the
segment's start, so some frames may go twice (the trainer de-duplicates).

Bounded: frames that would take the directory past ``max_bytes`` are refused (the
mirror counts them as dropped). One process per directory (an flock), since two
writers would number segments over each other.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from atlas_sidecar.learning.wire import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

MAGIC = b"ATLSPIL1"
FRAME = struct.Struct("<II")  # payload length, crc32 of the payload
MAX_SEGMENT_BYTES = 8 << 20
_NAME = re.compile(r"spill-(\d{8})\.log")


class SpillLocked(RuntimeError):
    """Another process holds the spill directory."""


@dataclass(eq=False)
class Segment:
    number: int
    path: Path
    size: int
    pending: int = 0  # frames read (sent) and not acked yet
    exhausted: bool = False  # read to its end (or to a torn tail) since the last rewind
    offset: int = len(MAGIC)
    reader: IO[bytes] | None = field(default=None, repr=False)

    def rewind(self) -> None:
        self.close()
        self.pending, self.exhausted, self.offset = 0, False, len(MAGIC)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def read_next(self) -> bytes | None:
        """The next frame's payload; None at the end or at a torn or corrupt frame
        (logged: the rest of the segment is skipped)."""
        try:
            return self._frame()
        except _Torn as why:
            log.warning("spill segment %s: %s at byte %d; skipping its %d remaining bytes",
                        self.path.name, why, self.offset, self.size - self.offset)  # fmt: skip
            return None

    def _frame(self) -> bytes | None:
        if self.reader is None:
            self.reader = self.path.open("rb")
            if self.reader.read(len(MAGIC)) != MAGIC:
                raise _Torn("not a spill segment (bad magic)")
            self.reader.seek(self.offset)
        header = self.reader.read(FRAME.size)
        if not header:
            return None
        if len(header) < FRAME.size:
            raise _Torn("torn frame header")
        length, crc = FRAME.unpack(header)
        if length > MAX_MESSAGE_BYTES:
            raise _Torn(f"frame length {length} over the bound")
        payload = self.reader.read(length)
        if len(payload) < length:
            raise _Torn("torn frame")
        if zlib.crc32(payload) != crc:
            raise _Torn("checksum mismatch")
        self.offset += FRAME.size + length
        return payload


class _Torn(Exception):
    """A frame that cannot be read whole: the segment ends before it."""


class Spill:
    """Thread-safe: appends (the mirror's sender), reads and acks (the stream's threads)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = max(min(MAX_SEGMENT_BYTES, max_bytes // 8), 4096)
        directory.mkdir(parents=True, exist_ok=True)
        self._lockfile = (directory / ".lock").open("a")
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise SpillLocked(f"{directory} is in use by another mirror") from None
        self._lock = threading.Lock()
        self.segments: list[Segment] = self._existing()
        self.bytes = sum(s.size for s in self.segments)
        self._next = max((s.number for s in self.segments), default=0) + 1
        self._writer: IO[bytes] | None = None
        self._replay = 0  # bumped by each rewind: a stale replay's reads and acks are void
        if self.segments:
            log.info("spill %s: %d segments (%d bytes) left to replay",
                     directory, len(self.segments), self.bytes)  # fmt: skip

    def _existing(self) -> list[Segment]:
        found = []
        for path in self.directory.iterdir():
            if m := _NAME.fullmatch(path.name):
                found.append(Segment(int(m.group(1)), path, path.stat().st_size))
        return sorted(found, key=lambda s: s.number)

    def append(self, payloads: list[bytes], seal: bool = False) -> int:
        """Write what fits the bound, durably (fsync); return how many were written.
        ``seal``: close the segment after, so a replay under way can read it."""
        written = 0
        with self._lock:
            for payload in payloads:
                frame = FRAME.pack(len(payload), zlib.crc32(payload)) + payload
                if self.bytes + len(frame) + len(MAGIC) > self.max_bytes:
                    continue
                self._writable().write(frame)
                self.segments[-1].size += len(frame)
                self.bytes += len(frame)
                written += 1
            if self._writer is not None:
                self._writer.flush()
                os.fsync(self._writer.fileno())
                if seal:
                    self._seal()
        return written

    def _writable(self) -> IO[bytes]:
        """The segment being appended to: a new one when there is none or it is full."""
        if self._writer is not None and self.segments[-1].size >= self.segment_bytes:
            self._seal()
        if self._writer is None:
            path = self.directory / f"spill-{self._next:08d}.log"
            self._next += 1
            self._writer = path.open("xb")
            self._writer.write(MAGIC)
            self.segments.append(Segment(self._next - 1, path, len(MAGIC)))
            self.bytes += len(MAGIC)
        return self._writer

    def _seal(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def rewind(self) -> int:
        """Before a replay: seal the segment being written, read every one from its
        start; return the replay's number, for ``next_frame`` and ``acked``."""
        with self._lock:
            self._seal()
            for segment in self.segments:
                segment.rewind()
            self._replay += 1
            return self._replay

    def next_frame(self, replay: int) -> tuple[Segment, bytes] | None:
        """The oldest unread frame (counted pending until ``acked``), or None; always
        None for a replay that a later rewind made stale (a stream's late reader)."""
        with self._lock:
            if replay != self._replay:
                return None
            for segment in list(self.segments):
                if segment.exhausted or (self._writer and segment is self.segments[-1]):
                    continue
                payload = segment.read_next()
                if payload is not None:
                    segment.pending += 1
                    return segment, payload
                segment.exhausted = True
                self._drop_if_done(segment)
        return None

    def acked(self, segment: Segment, replay: int) -> None:
        with self._lock:
            if replay != self._replay:
                return  # rewound since: the frame is unread again
            segment.pending -= 1
            self._drop_if_done(segment)

    def _drop_if_done(self, segment: Segment) -> None:
        if segment.exhausted and segment.pending <= 0 and segment in self.segments:
            segment.close()
            segment.path.unlink(missing_ok=True)
            self.segments.remove(segment)
            self.bytes -= segment.size

    @property
    def frames_waiting(self) -> bool:
        with self._lock:
            readable = self.segments[:-1] if self._writer else self.segments
            return any(not s.exhausted for s in readable)

    def close(self) -> None:
        with self._lock:
            self._seal()
            for segment in self.segments:
                segment.close()
            self._lockfile.close()

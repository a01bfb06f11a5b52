"""One RPC's events, from the scheduler's thread to its handler, in O(1) entries.

The scheduler never waits for a client: a stream whose reader is slow (or gone quiet,
with gRPC's flow-control window full) would pile up one event per step in an unbounded
queue. Token events carry text and ids that simply concatenate, so pending ones merge
into one: whatever the reader's pace, a stream holds at most one pending token event
and its final event, and the tokens in them are the ones the request generates anyway
(at most its max_tokens). Nothing is dropped or reordered, so the output stays exact;
a production server would rather send bigger chunks to a slow reader than fail it or
stall the batch for it.
"""

from __future__ import annotations

import asyncio
import threading

from atlas_sidecar.serving.scheduler import Event, TokensEvent


class EventBuffer:
    """put() from any thread, ``await get()`` on the loop; token events coalesce."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._ids: list[int] = []
        self._texts: list[str] = []
        self._has_tokens = False
        self._final: Event | None = None
        self._ready = asyncio.Event()
        self._wake_scheduled = False

    def put(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, TokensEvent):
                self._ids.extend(event.token_ids)
                self._texts.append(event.text)
                self._has_tokens = True
            elif self._final is None:
                self._final = event
            wake = not self._wake_scheduled
            self._wake_scheduled = True
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:
                pass  # the loop closed: the RPC is long gone

    async def get(self) -> Event:
        """The next event: all tokens pending (merged), else the final event."""
        while True:
            with self._lock:
                if self._has_tokens:
                    event = TokensEvent(self._ids, "".join(self._texts))
                    self._ids, self._texts, self._has_tokens = [], [], False
                    return event
                if self._final is not None:
                    return self._final
                self._ready.clear()
                self._wake_scheduled = False
            await self._ready.wait()

    @property
    def pending_entries(self) -> int:
        """Events waiting to be read: at most 2 (merged tokens, the final event)."""
        return int(self._has_tokens) + int(self._final is not None)

    @property
    def pending_tokens(self) -> int:
        return len(self._ids)

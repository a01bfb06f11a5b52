"""Health follows a remote target: while SGLang or Triton is away, the sidecar says
NOT_SERVING, and SERVING again once the target answers, with no restart.

Kubernetes then takes the pod out of its Service while its target restarts (readiness),
and clients that check health route elsewhere; the sidecar itself stays up, because
restarting it would not bring the target back sooner and would lose its learned state.
A request that meets the target away fails with UNAVAILABLE (the backend's bounded
retries are spent first) and wakes the watch at once, so health does not lag a
known failure by a polling interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_S = 2.0
DOWN_INTERVAL_S = 0.5  # while away, probe more often: SERVING soon after it is back


class TargetWatch:
    """Probes the target (``probe`` returns None when healthy, else why not) on a
    worker thread, and calls ``on_change(up)`` on the event loop when that flips."""

    def __init__(
        self,
        probe: Callable[[float], str | None],
        on_change: Callable[[bool], Awaitable[None]],
        interval_s: float = PROBE_INTERVAL_S,
        timeout_s: float = PROBE_TIMEOUT_S,
        down_interval_s: float = DOWN_INTERVAL_S,
    ) -> None:
        self.probe = probe
        self.on_change = on_change
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.down_interval_s = down_interval_s
        self.up = True  # the server starts once the target answered
        self.flips = 0
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            interval = self.interval_s if self.up else self.down_interval_s
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                pass
            self._wake.clear()
            reason = await self._loop.run_in_executor(None, self.probe, self.timeout_s)
            up = reason is None
            if up != self.up:
                self.up = up
                self.flips += 1
                if up:
                    log.info("the target answers again: health SERVING")
                else:
                    log.warning("the target is unavailable (%s): health NOT_SERVING until "
                                "it answers", reason)  # fmt: skip
                await self.on_change(up)

    def nudge(self) -> None:
        """Probe now (any thread): a request just found the target away."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

"""An asyncio server run on its own event loop in a daemon thread (tests, notebooks)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any


class LoopThread:
    """``start`` runs a server's start coroutine on the thread's loop and returns its
    result; ``stop`` runs its stop coroutine (a failure there is swallowed: the loop
    ends either way), then ends the loop and the thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def start(self, coroutine: Coroutine[Any, Any, Any], timeout_s: float) -> Any:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def stop(self, stopping: Callable[[], Coroutine[Any, Any, Any]], timeout_s: float) -> None:
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(stopping(), self.loop)
        with contextlib.suppress(Exception):
            future.result(timeout_s)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

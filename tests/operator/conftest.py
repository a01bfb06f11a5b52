"""Fixtures for the operator tests: the emulated apiserver and the real operator on it."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from operator_harness import ApiServer, emulated_apiserver, running_operator


@pytest.fixture
async def apiserver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ApiServer]:
    kubeconfig = tmp_path / "kubeconfig"
    async with emulated_apiserver(kubeconfig) as emulator:
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield emulator
    await _report_stuck_tasks()


async def _report_stuck_tasks() -> None:
    """Cancel what outlived the test and name anything that will not end (with where it
    waits): the event loop's close would otherwise wait on it without a word."""
    rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    _, stuck = await asyncio.wait(rest, timeout=5) if rest else (set(), set())
    for task in stuck:
        where, coro = [], task.get_coro()
        while (frame := getattr(coro, "cr_frame", None)) is not None:
            where.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
            coro = getattr(coro, "cr_await", None)
        print(f"stuck after the test: {task.get_name()} at {' > '.join(where)}", file=sys.stderr)


@pytest.fixture
async def operator(apiserver: ApiServer) -> AsyncIterator[asyncio.Task]:
    async with running_operator() as task:
        yield task

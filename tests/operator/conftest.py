"""Fixtures for the operator tests: the emulated apiserver and the real operator on it."""

from __future__ import annotations

import asyncio
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


@pytest.fixture
async def operator(apiserver: ApiServer) -> AsyncIterator[asyncio.Task]:
    async with running_operator() as task:
        yield task

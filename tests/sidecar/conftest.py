"""Real gRPC on loopback around a real small model (SmolLM2-135M, float32, loaded once).

The served engine speculates with a static drafter that is the target's own weights
behind a second runner (its own KV caches): drafts are always right in float32, so
responses carry real speculation statistics at little extra cost. Reference outputs
come from the target alone (no speculator) and are computed before any server starts:
the engine is not thread-safe, and once a server runs, its worker owns it.
"""

from __future__ import annotations

import contextlib
import gc
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from atlas_sidecar import models
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.core import Engine, GenerationResult
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.static import StaticSpeculator
from atlas_sidecar.serving.app import ServerConfig, ServerThread
from atlas_sidecar.serving.client import AtlasClient
from atlas_sidecar.tooling.workloads import Prompt, encode

LOOKAHEAD = 3
MAX_TOKENS = 8
# 16 short, distinct chat prompts: one per concurrent stream.
PROMPTS = [
    "Name a color.",
    "Say hello in French.",
    "What is 2 + 2?",
    "Write one word about the sea.",
    "Name a planet.",
    "Give me a fruit.",
    "What is the capital of Italy?",
    "Name a programming language.",
    "Say something kind.",
    "Name an animal that flies.",
    "What day comes after Monday?",
    "Name a musical instrument.",
    "What is H2O?",
    "Name a month of the year.",
    "Give a synonym for happy.",
    "What color is the sky?",
]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@dataclass
class Served:
    """The engine's parts, to check from outside that nothing leaks."""

    target: CausalLMRunner
    draft: CausalLMRunner
    speculator: StaticSpeculator
    engine: Engine

    def live_caches(self) -> int:
        return self.target.live_sequences + self.draft.live_sequences

    def idle(self) -> bool:
        return self.live_caches() == 0


@pytest.fixture(scope="session", autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def served() -> Served:
    models.pull(models.TEST_MODEL)
    target = CausalLMRunner.load(models.TEST_MODEL, dtype="fp32")
    draft = CausalLMRunner(target.model, target.tokenizer)  # same weights, own caches
    speculator = StaticSpeculator(draft)
    engine = Engine(target, target.tokenizer, speculator, lookahead=LOOKAHEAD)
    return Served(target, draft, speculator, engine)


@pytest.fixture(scope="session")
def reference(served: Served) -> dict[str, GenerationResult]:
    """The target alone, greedy, MAX_TOKENS tokens, for every prompt in PROMPTS."""
    plain = Engine(served.target, served.target.tokenizer)
    tok = served.target.tokenizer
    params = SamplingParams(max_tokens=MAX_TOKENS)
    return {
        text: plain.generate(encode(tok, Prompt("t", "t", (("user", text),))), params)
        for text in PROMPTS
    }


@contextlib.contextmanager
def serving(engine: Engine, **config: Any) -> Iterator[ServerThread]:
    """A server on a free loopback port for the duration of a ``with``.

    Several may exist at once around the shared engine: only the one a test is
    calling has work, and an idle server never touches the engine.
    """
    thread = ServerThread(engine, ServerConfig(port=0, **config)).start()
    try:
        yield thread
    finally:
        thread.stop()


def wait_until(condition: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    """Poll until ``condition`` holds; the limit only guards against a hang."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def live_dynamic_caches() -> int:
    gc.collect()
    # type(), not isinstance(): some module proxies warn when their __class__ is read.
    return sum(type(o) is DynamicCache for o in gc.get_objects())


@pytest.fixture
def client_for() -> Iterator[Callable[..., AtlasClient]]:
    clients: list[AtlasClient] = []

    def make(server: ServerThread, **settings: Any) -> AtlasClient:
        client = AtlasClient(server.address, **settings)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(name: str, cwd: Path) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=cwd,
    )  # fmt: skip


def _make_leaf(name: str, cn: str, extensions: str, cwd: Path) -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
        cwd=cwd,
    )  # fmt: skip
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A test CA, a server certificate for localhost, and a client certificate."""
    d = tmp_path_factory.mktemp("certs")
    _make_ca("ca", d)
    _make_ca("other", d)
    _make_leaf(
        "server", "localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n", d,
    )  # fmt: skip
    _make_leaf("client", "atlas-test-client", "extendedKeyUsage=clientAuth\n", d)
    return Certs(
        d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
        d / "other.pem",
    )  # fmt: skip

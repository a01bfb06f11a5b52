"""Assemble and run the sidecar: gRPC server, scheduler, health, reflection, metrics, TLS.

``SidecarServer`` is the whole serving face around one Engine. ``serve`` runs it until
SIGTERM/SIGINT and then drains: health turns NOT_SERVING, new RPCs are refused, the
requests in flight finish (up to ``drain_timeout_s``), then the worker stops. If the
worker dies instead, every request fails with UNAVAILABLE, health turns NOT_SERVING and
``serve`` raises ``WorkerDied``: ``atlas serve`` exits non-zero, and Kubernetes restarts it.
``ServerThread`` runs one on a background thread (tests, notebooks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from atlas_sidecar.engine import Engine
from atlas_sidecar.server.auth import TokenAuth
from atlas_sidecar.server.metrics import ServingStats
from atlas_sidecar.server.requests import Limits
from atlas_sidecar.server.scheduler import DEFAULT_PREFILL_BUDGET, Scheduler, WorkerDied
from atlas_sidecar.server.service import ADMIN_METHODS, SERVICE_NAME, AtlasService, ModelInfo
from atlas_sidecar.server.weights import WeightVersions

log = logging.getLogger(__name__)

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9090
WEIGHT_FILE_POLL_S = 5.0
DEATH_GRACE_S = 2.0  # after the worker died: time for the failed RPCs' statuses to go out


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None  # set: mutual TLS, clients must present a cert

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=self.client_ca_file.read_bytes() if self.client_ca_file else None,
            require_client_auth=self.client_ca_file is not None,
        )


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    max_batch: int = 16  # sequences decoding at once
    max_queue: int = 64  # requests waiting for a batch slot before RESOURCE_EXHAUSTED
    prefill_budget: int = DEFAULT_PREFILL_BUDGET  # prompt tokens prefilled per round
    max_message_bytes: int = 4 << 20
    max_concurrent_streams: int = 256  # per connection
    limits: Limits = field(default_factory=Limits)
    tls: TlsConfig | None = None
    auth_token: str | None = None
    admin_token: str | None = None  # defaults to auth_token
    weight_version_file: Path | None = None
    drain_timeout_s: float = 30.0
    # A second, plaintext gRPC port on 127.0.0.1 serving only grpc.health.v1: what an
    # exec probe (``python -m atlas_sidecar.server.healthcheck``) asks when the main port
    # has TLS, which kubelet's own gRPC probe cannot speak. None: none; 0: any free port.
    health_port: int | None = None
    log_prompts: bool = False
    target_model: str = ""


class SidecarServer:
    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.stats = ServingStats()
        self.weights = WeightVersions(config.weight_version_file)
        self.scheduler = Scheduler(
            engine,
            self.stats,
            max_batch=config.max_batch,
            max_queue=config.max_queue,
            max_prompt_tokens=config.limits.max_prompt_tokens,
            on_death=self._worker_died,
            prefill_budget=config.prefill_budget,
        )
        self.service = AtlasService(
            self.scheduler,
            self.stats,
            self.weights,
            config.limits,
            ModelInfo(
                target_model=config.target_model,
                lookahead=engine.lookahead,
                live_sequences=_live(engine),
            ),
            log_prompts=config.log_prompts,
        )
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self.worker_error: BaseException | None = None  # what killed the worker, if it died
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._died = asyncio.Event()
        self._metrics_http: Any = None
        self._poller: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Bind and start serving; return the gRPC port."""
        cfg = self.config
        admin_token = cfg.admin_token or cfg.auth_token
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.max_concurrent_streams", cfg.max_concurrent_streams),
            ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share
        ]
        server = grpc.aio.server(
            interceptors=[TokenAuth(cfg.auth_token, admin_token, ADMIN_METHODS)],
            options=options,
        )
        server.add_generic_rpc_handlers((self.service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls is not None:
            self.port = server.add_secure_port(address, cfg.tls.credentials())
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        if cfg.health_port is not None:
            await self._start_health_port(cfg.health_port)
        self._loop = asyncio.get_running_loop()
        self.scheduler.start()
        await server.start()
        self._server = server
        self._start_metrics()
        self.stats.set_weight_version("serving", self.weights.serving)
        if cfg.weight_version_file is not None:
            self._poller = asyncio.create_task(self._poll_weight_file())
        serving = health_pb2.HealthCheckResponse.SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, serving)
        log.info("serving %s on %s:%d (%s)", SERVICE_NAME, cfg.host, self.port,
                 "TLS" if cfg.tls else "plaintext")  # fmt: skip
        return self.port

    async def _start_health_port(self, port: int) -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.health_port = server.add_insecure_port(f"127.0.0.1:{port}")
        if self.health_port == 0:
            raise OSError(f"could not bind 127.0.0.1:{port} (health)")
        await server.start()
        self._health_server = server
        log.info("health (plaintext, loopback) on 127.0.0.1:%d", self.health_port)

    def _worker_died(self, error: BaseException) -> None:
        """On the worker thread, after it failed every request: stop serving."""
        self.worker_error = error
        if self._loop is not None and not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._not_serving(), self._loop)

    async def _not_serving(self) -> None:
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, not_serving)
        self._died.set()

    async def wait_died(self) -> None:
        """Return once the worker has died and health says NOT_SERVING."""
        await self._died.wait()

    def _start_metrics(self) -> None:
        if self.config.metrics_port is None:
            return
        http, _ = start_http_server(
            self.config.metrics_port, addr=self.config.host, registry=self.stats.registry
        )
        self._metrics_http = http
        self.metrics_port = int(http.server_port)
        log.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)

    async def _poll_weight_file(self) -> None:
        # The operator updates a mounted ConfigMap; the kubelet swaps the file under us.
        while True:
            await asyncio.sleep(WEIGHT_FILE_POLL_S)
            if self.weights.poll_file():
                log.info("rollout file asks for weight version %s", self.weights.requested)
                self.stats.set_weight_version("requested", self.weights.requested)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: refuse new requests, let those in flight finish, then stop."""
        grace = self.config.drain_timeout_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        self.scheduler.stop_accepting()
        if self._poller is not None:
            self._poller.cancel()
        if self._server is not None:
            await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(None)
        await asyncio.get_running_loop().run_in_executor(None, self.scheduler.close, 10.0)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _live(engine: Engine) -> Callable[[], int]:
    def count() -> int:  # backends without the counter report 0
        return int(getattr(engine.target, "live_sequences", 0))

    return count


async def serve(engine: Engine, config: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return; raise ``WorkerDied`` (after
    a short stop) if the scheduler's worker dies."""
    server = SidecarServer(engine, config)
    await server.start()
    loop = asyncio.get_running_loop()
    stopping: asyncio.Task[None] | None = None

    def on_signal(signum: int) -> None:
        nonlocal stopping
        if stopping is None:
            log.info("signal %d: draining (up to %.0f s)", signum, config.drain_timeout_s)
            stopping = loop.create_task(server.stop())

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    ends = [loop.create_task(server.wait_stopped()), loop.create_task(server.wait_died())]
    await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
    for task in ends:
        task.cancel()
    if server.worker_error is not None:
        if stopping is None:
            stopping = loop.create_task(server.stop(DEATH_GRACE_S))
        await stopping
        raise WorkerDied("the scheduler's worker died") from server.worker_error


class ServerThread:
    """A SidecarServer on its own event loop in a background thread."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.server = SidecarServer(engine, config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="atlas-grpc",
                                        daemon=True)  # fmt: skip

    @property
    def address(self) -> str:
        host = self.server.config.host
        return f"{'localhost' if host in ('127.0.0.1', '::1') else host}:{self.server.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(60)
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self.server.stop(grace_s), self._loop)
        with contextlib.suppress(Exception):
            future.result(grace_s + 30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

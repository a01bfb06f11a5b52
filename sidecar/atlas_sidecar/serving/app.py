"""Assemble and run the sidecar: gRPC server, scheduler, health, reflection, metrics, TLS.

``SidecarServer`` is the whole serving face around one Engine. ``serve`` runs it until
SIGTERM/SIGINT and then drains: health turns NOT_SERVING, new RPCs are refused, the
requests in flight finish (up to ``drain_timeout_s``), then the worker stops. If the
worker dies instead, every request fails with UNAVAILABLE, health turns NOT_SERVING and
``serve`` raises ``WorkerDied``: ``atlas serve`` exits non-zero, and Kubernetes restarts it.
A remote target (SGLang, Triton) that goes away turns health NOT_SERVING until it is
back (``targetwatch``); the sidecar stays up.
``ServerThread`` runs one on a background thread (tests, notebooks).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from atlas_sidecar.engine.backends.base import RemoteTarget
from atlas_sidecar.engine.core import Engine
from atlas_sidecar.learning.rollout import Rollout
from atlas_sidecar.learning.store import StoreError
from atlas_sidecar.learning.versioned import BASE_VERSION
from atlas_sidecar.serving.auth import TokenAuth
from atlas_sidecar.serving.loopthread import LoopThread
from atlas_sidecar.serving.memory import default_kv_budget, register_memory_metrics
from atlas_sidecar.serving.metrics import ServingStats
from atlas_sidecar.serving.mirror import Mirror, MirrorConfig
from atlas_sidecar.serving.requests import Limits
from atlas_sidecar.serving.rolloutfiles import RolloutDir, RolloutFollower
from atlas_sidecar.serving.scheduler import DEFAULT_PREFILL_BUDGET, Scheduler, WorkerDied
from atlas_sidecar.serving.service import ADMIN_METHODS, SERVICE_NAME, AtlasService, ModelInfo
from atlas_sidecar.serving.targetwatch import TargetWatch
from atlas_sidecar.serving.weights import WeightVersions

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
        """Credentials that re-read the files when they change, with no restart.

        gRPC asks the fetcher before each new handshake; it answers with a new
        configuration only when a file's (mtime, size, inode) moved, so a certificate
        rotated in place (cert-manager, a kubelet-refreshed Secret mount) is served to the
        next connection. Connections already open keep the certificate they shook hands
        with. A rotation caught half-written (unreadable files) keeps the last good one.
        """
        return grpc.dynamic_ssl_server_credentials(
            self.configuration(),
            _CertificateWatcher(self),
            require_client_authentication=self.client_ca_file is not None,
        )

    def signature(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in (self.cert_file, self.key_file, self.client_ca_file):
            if path is not None:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def configuration(self) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=self.client_ca_file.read_bytes() if self.client_ca_file else None,
        )


class _CertificateWatcher:
    """The certificate-configuration fetcher: a new configuration when the files change."""

    def __init__(self, tls: TlsConfig) -> None:
        self.tls = tls
        self.seen = tls.signature()
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:
            try:
                now = self.tls.signature()
                if now == self.seen:
                    return None
                configuration = self.tls.configuration()
            except OSError as exc:
                log.warning("TLS files unreadable, keeping the current certificate: %s", exc)
                return None
            self.seen = now
            log.info("TLS certificate files changed: new connections get the new certificate")
            return configuration


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    max_batch: int = 16  # sequences decoding at once
    max_queue: int = 64  # requests waiting for a batch slot before RESOURCE_EXHAUSTED
    # Worst-case KV bytes of the admitted requests (None: a share of the memory free at
    # start, see server/memory.py; 0: no byte bound, max_batch only).
    kv_budget_bytes: int | None = None
    max_message_bytes: int = 4 << 20  # largest message received (and sent)
    prefill_budget: int = DEFAULT_PREFILL_BUDGET  # prompt tokens prefilled per round
    max_concurrent_streams: int = 256  # per connection
    # RPCs in flight over all connections; past it gRPC answers RESOURCE_EXHAUSTED before
    # a handler runs (the batch and queue hold max_batch + max_queue generations).
    max_concurrent_rpcs: int | None = 1024
    # A request that waits in the queue longer than this fails with RESOURCE_EXHAUSTED
    # (overloaded; retry elsewhere or later) instead of using up its whole deadline.
    queue_timeout_s: float | None = 60.0
    # Keepalive: the server pings an idle transport every keepalive_time_s and drops it
    # when no ack comes within keepalive_timeout_s (dead peers, half-open NAT entries).
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    # Clients may ping (even with no call open) at most this often; faster pingers get
    # GOAWAY (too_many_pings): a misbehaving client cannot make the server ack floods.
    min_client_ping_interval_s: float = 10.0
    permit_keepalive_without_calls: bool = True
    # Connections idle (no RPC) this long are closed; every connection is closed after
    # max_connection_age_s (clients reconnect and get rebalanced over replicas), its RPCs
    # given max_connection_age_grace_s to finish. None: no limit.
    max_connection_idle_s: float | None = 300.0
    max_connection_age_s: float | None = 3600.0
    max_connection_age_grace_s: float | None = 600.0
    limits: Limits = field(default_factory=Limits)
    tls: TlsConfig | None = None
    auth_token: str | None = None
    # Admin RPCs need exactly this token; None: they are refused (never the data token).
    admin_token: str | None = None
    metrics_host: str = "127.0.0.1"  # Prometheus /metrics; a pod needs 0.0.0.0
    weight_version_file: Path | None = None
    drain_timeout_s: float = 30.0
    # A second, plaintext gRPC port on 127.0.0.1 serving only grpc.health.v1: what an
    # exec probe (``python -m atlas_sidecar.serving.healthcheck``) asks when the main port
    # has TLS, which kubelet's own gRPC probe cannot speak. None: none; 0: any free port.
    health_port: int | None = None
    log_prompts: bool = False
    target_model: str = ""
    # With a rollout: install each new version the weights store verifies, as long as
    # the rollout directory names none (there, the operator picks versions).
    follow_latest: bool = False
    rollout_poll_s: float = WEIGHT_FILE_POLL_S  # how often the rollout files are read
    mirror: MirrorConfig | None = None  # None: no traffic mirroring to a trainer


class SidecarServer:
    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.stats = ServingStats()
        self.weights = WeightVersions(config.weight_version_file)
        # The whole rollout ConfigMap: the directory holding the weight-version file.
        self.rollout_dir: RolloutDir | None = None
        if config.weight_version_file is not None:
            path = config.weight_version_file
            self.rollout_dir = RolloutDir(path.parent, path.name)
        self.mirror: Mirror | None = None
        if config.mirror is not None:
            self.mirror = Mirror(config.mirror, self.stats.registry, lambda: self.weights.serving)
        self.scheduler = Scheduler(
            engine,
            self.stats,
            max_batch=config.max_batch,
            max_queue=config.max_queue,
            max_prompt_tokens=config.limits.max_prompt_tokens,
            queue_timeout_s=config.queue_timeout_s,
            kv_budget_bytes=(
                default_kv_budget(engine.target)
                if config.kv_budget_bytes is None
                else config.kv_budget_bytes
            ),
            on_death=self._worker_died,
            prefill_budget=config.prefill_budget,
            on_unavailable=self._target_failed,
            on_finished=self.mirror.observe if self.mirror is not None else None,
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
        register_memory_metrics(self.stats, engine, self.scheduler, self.service)
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
        self._stopping = False
        self.rollout: Rollout | None = None
        self._follower: asyncio.Task[None] | None = None
        # A remote target (SGLang, Triton) can go away and come back: health follows it.
        self.target_watch: TargetWatch | None = None
        self._watcher: asyncio.Task[None] | None = None
        if engine.target.capabilities.remote:
            remote = cast(RemoteTarget, engine.target)
            self.target_watch = TargetWatch(remote.probe, self._target_changed)

    def use_rollout(self, rollout: Rollout) -> None:
        """Serve hot rollouts through ``rollout`` (before ``start``): versions asked for
        by the rollout file or RolloutWeights are installed between steps, and every
        new sequence is pinned to the weights it drafts with."""
        self.rollout = rollout
        self.service.rollout = rollout
        # The rollout file's version is installed at start, not assumed: until then the
        # replica drafts with what it started with.
        if self.weights.serving != BASE_VERSION:
            self.weights.requested, self.weights.serving = self.weights.serving, BASE_VERSION
        self.scheduler.pin_version = rollout.pin
        rollout.between_steps = self.scheduler.between_steps
        rollout.on_refused = self._rollout_refused
        rollout.on_change = self._rollout_changed

    def _rollout_refused(self, version: str, reason: str) -> None:
        self.stats.rollout_refused.inc()

    def _rollout_changed(self) -> None:
        """On the worker, after an install or a verdict: report what serves now."""
        assert self.rollout is not None
        roles = self.rollout.roles()
        self.weights.serving = roles.get("stable", self.weights.serving)
        self.stats.set_weight_version("serving", self.weights.serving)
        self.stats.set_weight_version("canary", roles.get("canary", ""))

    async def start(self) -> int:
        """Bind and start serving; return the gRPC port."""
        cfg = self.config
        server = grpc.aio.server(
            # No fallback to the data token: a data client must never open admin RPCs.
            interceptors=[TokenAuth(cfg.auth_token, cfg.admin_token, ADMIN_METHODS)],
            options=grpc_options(cfg),
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
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
        if self.mirror is not None:
            self.mirror.start()
            log.info("mirroring %g of finished requests to %s", self.mirror.config.fraction,
                     self.mirror.config.url)  # fmt: skip
        self.scheduler.start()
        await server.start()
        self._server = server
        self._start_metrics()
        self.stats.set_weight_version("serving", self.weights.serving)
        if self.rollout is not None:
            self._follower = asyncio.create_task(self._follow_rollouts())
        elif cfg.weight_version_file is not None:
            self._poller = asyncio.create_task(self._poll_weight_file())
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.target_watch is not None:
            self._watcher = asyncio.create_task(self.target_watch.run())
        log.info("serving %s on %s:%d (%s)", SERVICE_NAME, cfg.host, self.port,
                 "TLS" if cfg.tls else "plaintext")  # fmt: skip
        if warning := plaintext_token_warning(cfg):
            log.warning("%s", warning)
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
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._died.set()

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _target_failed(self) -> None:
        """On the worker thread: a request found the remote target away."""
        if self.target_watch is not None:
            self.target_watch.nudge()

    async def _target_changed(self, up: bool) -> None:
        # A draining or dead server stays NOT_SERVING whatever its target does.
        if self._stopping or self._died.is_set():
            return
        status = health_pb2.HealthCheckResponse
        await self._set_health(status.SERVING if up else status.NOT_SERVING)

    async def wait_died(self) -> None:
        """Return once the worker has died and health says NOT_SERVING."""
        await self._died.wait()

    def _start_metrics(self) -> None:
        if self.config.metrics_port is None:
            return
        # Its own host, loopback by default: the metrics page has no auth.
        http, _ = start_http_server(
            self.config.metrics_port, addr=self.config.metrics_host, registry=self.stats.registry
        )
        self._metrics_http = http
        self.metrics_port = int(http.server_port)
        log.info("metrics on http://%s:%d/metrics", self.config.metrics_host, self.metrics_port)

    async def _poll_weight_file(self) -> None:
        """With no rollout: record the weight-version the operator asks for (GetStats,
        metrics); nothing is installed."""
        while True:
            await asyncio.sleep(self.config.rollout_poll_s)
            if self.weights.poll_file():
                log.info("rollout file asks for weight version %s", self.weights.requested)
                self.stats.set_weight_version("requested", self.weights.requested)
                await self._install(self.weights.requested)

    async def _follow_rollouts(self) -> None:
        """Serve what the rollout directory says (stable, then canary, at start; each
        change after), read every ``rollout_poll_s``. Once the files have named a
        version they drive alone; until then (a laptop, no ConfigMap) ``follow_latest``
        installs each newer version the store publishes."""
        assert self.rollout is not None
        follower = RolloutFollower(self.rollout, self._install_as)
        loop = asyncio.get_running_loop()
        files_drive = False
        tried = ""
        files = self.rollout_dir
        while True:
            want = None if files is None else await loop.run_in_executor(None, files.read)
            if want is not None and want.names_a_version:
                if not files_drive and self.config.follow_latest:
                    log.info("the rollout files name versions: they drive rollouts, "
                             "--follow-latest stands by")  # fmt: skip
                files_drive = True
                if want.stable and want.stable != self.weights.requested:
                    self.weights.requested = want.stable
                    self.stats.set_weight_version("requested", want.stable)
                try:
                    await follower.follow(want)
                except Exception:  # noqa: BLE001 - e.g. the worker's queue full: next poll
                    log.exception("following the rollout files failed; tried again next poll")
            elif self.config.follow_latest and not files_drive:
                latest = await loop.run_in_executor(None, self._store_latest)
                if latest and latest != tried and latest not in self.rollout.roles().values():
                    tried = latest
                    await self._install(latest)
            await asyncio.sleep(self.config.rollout_poll_s)

    async def _install_as(
        self, version: str, canary_fraction: float | None, stable: bool
    ) -> bool | None:
        """The follower's install: True queued, False refused (logged, counted), None
        failed for a passing reason (the worker's queue full): tried again next poll."""
        try:
            applied, message = await self.service.install(version, canary_fraction, stable)
        except Exception as exc:  # noqa: BLE001 - serving goes on; the next poll retries
            log.error("rollout of %s failed, tried again next poll: %r", version, exc)
            return None
        log.log(logging.INFO if applied else logging.ERROR, "rollout of %s: %s", version, message)
        return applied

    def _store_latest(self) -> str | None:
        assert self.rollout is not None
        try:
            return self.rollout.store.latest()
        except StoreError as exc:  # unreachable for now: serving goes on
            log.warning("weights store: %s", exc)
            return None

    async def _install(self, version: str) -> None:
        applied, message = await self.service.install(version)
        log.log(logging.INFO if applied else logging.ERROR, "rollout of %s: %s", version, message)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: refuse new requests, let those in flight finish, then stop."""
        grace = self.config.drain_timeout_s if grace_s is None else grace_s
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        self.scheduler.stop_accepting()
        for task in (self._poller, self._watcher, self._follower):
            if task is not None:
                task.cancel()
        if self._server is not None:
            await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(None)
        await asyncio.get_running_loop().run_in_executor(None, self.scheduler.close, 10.0)
        if self.mirror is not None:  # after the worker: no more finished requests
            await asyncio.get_running_loop().run_in_executor(None, self.mirror.close)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def grpc_options(cfg: ServerConfig) -> list[tuple[str, Any]]:
    """The gRPC server's channel arguments, from the config."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.max_concurrent_streams", cfg.max_concurrent_streams),
        ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share
        ("grpc.keepalive_time_ms", _ms(cfg.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(cfg.keepalive_timeout_s)),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(cfg.min_client_ping_interval_s)),
        ("grpc.keepalive_permit_without_calls", int(cfg.permit_keepalive_without_calls)),
    ]
    for name, seconds in (
        ("grpc.max_connection_idle_ms", cfg.max_connection_idle_s),
        ("grpc.max_connection_age_ms", cfg.max_connection_age_s),
        ("grpc.max_connection_age_grace_ms", cfg.max_connection_age_grace_s),
    ):
        if seconds is not None:
            options.append((name, _ms(seconds)))
    return options


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def plaintext_token_warning(cfg: ServerConfig) -> str | None:
    """A bearer token sent in plaintext over a network can be read off the wire."""
    if cfg.tls is not None or not (cfg.auth_token or cfg.admin_token):
        return None
    if cfg.host in LOOPBACK_HOSTS or cfg.host.startswith("127."):
        return None
    return (
        f"bearer tokens are configured but {cfg.host}:{cfg.port} is plaintext and not "
        "loopback: anyone on the network path can read them; enable TLS (--tls-cert, "
        "--tls-key) or bind to 127.0.0.1"
    )


def _live(engine: Engine) -> Callable[[], int]:
    def count() -> int:  # backends without the counter report 0
        return int(getattr(engine.target, "live_sequences", 0))

    return count


async def serve(engine: Engine, config: ServerConfig, rollout: Rollout | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return; raise ``WorkerDied`` (after
    a short stop) if the scheduler's worker dies. ``rollout``: hot rollout of versions."""
    server = SidecarServer(engine, config)
    if rollout is not None:
        server.use_rollout(rollout)
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
        self._runner = LoopThread("atlas-grpc")

    @property
    def address(self) -> str:
        host = self.server.config.host
        return f"{'localhost' if host in ('127.0.0.1', '::1') else host}:{self.server.port}"

    def start(self) -> ServerThread:
        self._runner.start(self.server.start(), 60)
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        self._runner.stop(lambda: self.server.stop(grace_s), grace_s + 30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

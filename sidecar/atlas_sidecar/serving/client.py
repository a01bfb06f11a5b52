"""Python client for the ATLAS sidecar: sync and async, streaming, retries, typed results.

    from atlas_sidecar.serving.client import AtlasClient

    with AtlasClient("localhost:50051") as client:
        print(client.generate("Write a haiku about gRPC", max_tokens=64).text)
        for chunk in client.generate_stream(messages=[{"role": "user", "content": "Hi"}]):
            print(chunk.text, end="", flush=True)

Calls that fail with UNAVAILABLE (server starting, restarting, draining) or with
RESOURCE_EXHAUSTED (queue full or waited too long: overloaded) are retried with
exponential backoff, within the call's deadline; a stream is retried only before
its first message, so no token is ever delivered twice. Every other failure raises
``AtlasError`` with the gRPC status code and the server's message (which names the
offending field for bad input).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atlas_sidecar.serving.proto import atlas_v1_pb2 as pb
from atlas_sidecar.serving.proto import atlas_v1_pb2_grpc as pb_grpc

DEFAULT_ENDPOINT = "localhost:50051"
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20
_FINISH_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}

Message = Mapping[str, str] | tuple[str, str]


class AtlasError(Exception):
    """A call failed; ``code`` is the gRPC status, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> AtlasError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code, details or "")


# -- typed results -------------------------------------------------------------------


@dataclass(frozen=True)
class SpeculatorUsage:
    name: str
    steps: int
    drafted: int
    accepted: int


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    target_forwards: int
    drafted: int
    accepted: int
    accept_len: float
    speculators: tuple[SpeculatorUsage, ...]
    time_to_first_token_s: float
    elapsed_s: float

    @classmethod
    def from_pb(cls, usage: pb.Usage) -> Usage:
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            target_forwards=usage.target_forwards,
            drafted=usage.drafted,
            accepted=usage.accepted,
            accept_len=usage.accept_len,
            speculators=tuple(
                SpeculatorUsage(s.name, s.steps, s.drafted, s.accepted) for s in usage.speculators
            ),
            time_to_first_token_s=usage.time_to_first_token_s,
            elapsed_s=usage.elapsed_s,
        )


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    usage: Usage
    weight_version: str

    @classmethod
    def from_pb(cls, response: pb.GenerateResponse) -> Completion:
        return cls(
            request_id=response.request_id,
            text=response.text,
            token_ids=list(response.token_ids),
            finish_reason=_FINISH_NAMES.get(response.finish_reason, ""),
            usage=Usage.from_pb(response.usage),
            weight_version=response.weight_version,
        )


@dataclass(frozen=True)
class Chunk:
    """One stream message: new text and tokens; the last one has finish_reason and usage."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    weight_version: str = ""  # the last one's: the weights the request drafted with

    @classmethod
    def from_pb(cls, response: pb.GenerateStreamResponse) -> Chunk:
        last = response.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        return cls(
            request_id=response.request_id,
            text=response.text,
            token_ids=list(response.token_ids),
            finish_reason=_FINISH_NAMES.get(response.finish_reason) if last else None,
            usage=Usage.from_pb(response.usage) if last else None,
            weight_version=response.weight_version,
        )


@dataclass(frozen=True)
class SpeculatorStats:
    steps: int
    drafted: int
    accepted: int
    accept_len: float


@dataclass(frozen=True)
class VersionStats:
    """One adaptive weight version's figures (hot rollout; see GetStats)."""

    version: str
    role: str  # stable, canary, previous or "" (retired)
    steps: int
    drafted: int
    accepted: int
    accept_len: float
    tokens: int
    tokens_per_second: float


@dataclass(frozen=True)
class Stats:
    requests_total: int
    requests_ok: int
    requests_failed: int
    requests_cancelled: int
    requests_active: int
    requests_queued: int
    prompt_tokens: int
    completion_tokens: int
    tokens_per_second: float
    speculators: dict[str, SpeculatorStats]
    live_sequences: int
    target_model: str
    lookahead: int
    weight_version: str
    requested_weight_version: str
    uptime_s: float
    versions: tuple[VersionStats, ...] = ()

    @classmethod
    def from_pb(cls, r: pb.GetStatsResponse) -> Stats:
        return cls(
            requests_total=r.requests_total,
            requests_ok=r.requests_ok,
            requests_failed=r.requests_failed,
            requests_cancelled=r.requests_cancelled,
            requests_active=r.requests_active,
            requests_queued=r.requests_queued,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            tokens_per_second=r.tokens_per_second,
            speculators={
                s.name: SpeculatorStats(s.steps, s.drafted, s.accepted, s.accept_len)
                for s in r.speculators
            },
            live_sequences=r.live_sequences,
            target_model=r.target_model,
            lookahead=r.lookahead,
            weight_version=r.weight_version,
            requested_weight_version=r.requested_weight_version,
            uptime_s=r.uptime_s,
            versions=tuple(
                VersionStats(v.version, v.role, v.steps, v.drafted, v.accepted, v.accept_len,
                             v.tokens, v.tokens_per_second)  # fmt: skip
                for v in r.versions
            ),
        )


@dataclass(frozen=True)
class Rollout:
    serving_version: str
    requested_version: str
    applied: bool
    message: str


def _action(name: str) -> str:
    """``install``, ``promote`` or ``roll_back`` as the proto enum's name."""
    full = f"ROLLOUT_ACTION_{name.upper()}"
    if full not in pb.RolloutAction.keys():
        raise ValueError(f"unknown rollout action {name!r}: install, promote or roll_back")
    return full


# -- requests ------------------------------------------------------------------------


def build_request(
    prompt: str | None = None,
    *,
    messages: Iterable[Message] | None = None,
    token_ids: Sequence[int] | None = None,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    request_id: str = "",
) -> pb.GenerateRequest:
    """A GenerateRequest from exactly one of ``prompt`` (raw text, no chat template),
    ``messages`` (chat, rendered with the model's template) or ``token_ids``."""
    given = [name for name, v in (("prompt", prompt), ("messages", messages),
                                  ("token_ids", token_ids)) if v is not None]  # fmt: skip
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, messages, token_ids (got {given})")
    sampling = pb.SamplingParams(
        temperature=temperature, top_k=top_k, stop=list(stop), ignore_eos=ignore_eos
    )
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    request = pb.GenerateRequest(sampling=sampling, request_id=request_id)
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.messages.messages.extend(_chat_message(m) for m in messages)
    else:
        request.prompt_token_ids.ids.extend(token_ids or ())
    return request


def _chat_message(message: Message) -> pb.ChatMessage:
    if isinstance(message, tuple):
        role, content = message
    else:
        role, content = message["role"], message["content"]
    return pb.ChatMessage(role=role, content=content)


# -- channels, retries, deadlines ------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, for UNAVAILABLE and RESOURCE_EXHAUSTED.

    An overloaded server sheds load with RESOURCE_EXHAUSTED (queue full, queue wait over
    its bound): room frees as requests finish, so the call is worth repeating later. A
    message over a size limit is RESOURCE_EXHAUSTED too, and is never retried.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    retryable: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset(
            {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
        )
    )

    def backoff_s(self, attempt: int) -> float:
        """Sleep before retry number ``attempt`` (1-based): full jitter, capped."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return random.uniform(0.5 * ceiling, ceiling)


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class ChannelSettings:
    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = None
    tls: bool = False
    ca_cert: Path | None = None  # PEM; None: the system's roots
    client_cert: Path | None = None  # with client_key: mutual TLS
    client_key: Path | None = None
    server_name: str | None = None  # override the name checked against the cert
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @property
    def secure(self) -> bool:
        return self.tls or self.ca_cert is not None or self.client_cert is not None

    def options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # We retry ourselves, with our own policy and deadline.
            ("grpc.enable_retries", 0),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("mutual TLS needs both client_cert and client_key")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert.read_bytes() if self.ca_cert else None,
            private_key=self.client_key.read_bytes() if self.client_key else None,
            certificate_chain=self.client_cert.read_bytes() if self.client_cert else None,
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


class _Deadline:
    """One deadline for a call and all its retries."""

    def __init__(self, timeout_s: float | None) -> None:
        self.at = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def allows_sleep(self, seconds: float) -> bool:
        return self.at is None or time.monotonic() + seconds < self.at


def _should_retry(error: grpc.RpcError, policy: RetryPolicy, attempt: int) -> bool:
    code = error.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _MESSAGE_TOO_LARGE in (
        error.details() or ""
    ):
        return False  # the same message is too large every time
    return attempt < policy.max_attempts and code in policy.retryable


# grpc's own wording for a message over a size limit ("Received message larger than max").
_MESSAGE_TOO_LARGE = "message larger than max"


# -- the clients -----------------------------------------------------------------------


class AtlasClient:
    """Blocking client. ``timeout`` is the default deadline (seconds) for each call."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout: float | None = None,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, shared safely
        **settings: Any,
    ) -> None:
        self.settings = ChannelSettings(endpoint=endpoint, **settings)
        self.timeout = timeout
        self.retry = retry
        s = self.settings
        if s.secure:
            self.channel = grpc.secure_channel(endpoint, s.credentials(), options=s.options())
        else:
            self.channel = grpc.insecure_channel(endpoint, options=s.options())
        self.stub = pb_grpc.AtlasStub(self.channel)

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> Completion:
        request = build_request(prompt, **kwargs)
        response = self._unary(self.stub.Generate, request, timeout)
        return Completion.from_pb(response)

    def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[Chunk]:
        """Chunks as the server accepts tokens; breaking out of the loop cancels the call."""
        request = build_request(prompt, **kwargs)
        deadline = _Deadline(self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            call = self.stub.GenerateStream(
                request, timeout=deadline.remaining(), metadata=self.settings.metadata()
            )
            received = False
            try:
                for response in call:
                    received = True
                    yield Chunk.from_pb(response)
                return
            except grpc.RpcError as error:
                if received or not self._backoff(error, attempt, deadline):
                    raise AtlasError.from_rpc(error) from None
            finally:
                call.cancel()  # a no-op once the stream has ended

    def stats(self, timeout: float | None = None) -> Stats:
        return Stats.from_pb(self._unary(self.stub.GetStats, pb.GetStatsRequest(), timeout))

    def reset_stats(self, timeout: float | None = None) -> None:
        self._unary(self.stub.ResetStats, pb.ResetStatsRequest(), timeout)

    def rollout_weights(
        self, version: str = "", timeout: float | None = None, action: str = "install"
    ) -> Rollout:
        """Install ``version`` (hot, a canary if the server has a fraction), or
        ``action`` "promote" / "roll_back" the canary."""
        request = pb.RolloutWeightsRequest(version=version, action=_action(action))
        r = self._unary(self.stub.RolloutWeights, request, timeout)
        return Rollout(r.serving_version, r.requested_version, r.applied, r.message)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The health service's status name for ``service`` ("" is the whole server)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        deadline = _Deadline(self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(
                    request, timeout=deadline.remaining(), metadata=self.settings.metadata()
                )
            except grpc.RpcError as error:
                if not self._backoff(error, attempt, deadline):
                    raise AtlasError.from_rpc(error) from None

    def _backoff(self, error: grpc.RpcError, attempt: int, deadline: _Deadline) -> bool:
        """Sleep before a retry and return True, or return False: give up."""
        if not _should_retry(error, self.retry, attempt):
            return False
        pause = self.retry.backoff_s(attempt)
        if not deadline.allows_sleep(pause):
            return False
        time.sleep(pause)
        return True

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AtlasClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAtlasClient:
    """The asyncio client: the same calls as ``AtlasClient``, awaited."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout: float | None = None,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, shared safely
        **settings: Any,
    ) -> None:
        self.settings = ChannelSettings(endpoint=endpoint, **settings)
        self.timeout = timeout
        self.retry = retry
        s = self.settings
        if s.secure:
            self.channel = grpc.aio.secure_channel(endpoint, s.credentials(), options=s.options())
        else:
            self.channel = grpc.aio.insecure_channel(endpoint, options=s.options())
        self.stub = pb_grpc.AtlasStub(self.channel)

    async def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> Completion:
        request = build_request(prompt, **kwargs)
        return Completion.from_pb(await self._unary(self.stub.Generate, request, timeout))

    async def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[Chunk]:
        request = build_request(prompt, **kwargs)
        deadline = _Deadline(self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            call = self.stub.GenerateStream(
                request, timeout=deadline.remaining(), metadata=self.settings.metadata()
            )
            received = False
            try:
                async for response in call:
                    received = True
                    yield Chunk.from_pb(response)
                return
            except grpc.RpcError as error:
                if received or not await self._backoff(error, attempt, deadline):
                    raise AtlasError.from_rpc(error) from None
            finally:
                call.cancel()

    async def stats(self, timeout: float | None = None) -> Stats:
        response = await self._unary(self.stub.GetStats, pb.GetStatsRequest(), timeout)
        return Stats.from_pb(response)

    async def reset_stats(self, timeout: float | None = None) -> None:
        await self._unary(self.stub.ResetStats, pb.ResetStatsRequest(), timeout)

    async def rollout_weights(
        self, version: str = "", timeout: float | None = None, action: str = "install"
    ) -> Rollout:
        request = pb.RolloutWeightsRequest(version=version, action=_action(action))
        r = await self._unary(self.stub.RolloutWeights, request, timeout)
        return Rollout(r.serving_version, r.requested_version, r.applied, r.message)

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        deadline = _Deadline(self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(
                    request, timeout=deadline.remaining(), metadata=self.settings.metadata()
                )
            except grpc.RpcError as error:
                if not await self._backoff(error, attempt, deadline):
                    raise AtlasError.from_rpc(error) from None

    async def _backoff(self, error: grpc.RpcError, attempt: int, deadline: _Deadline) -> bool:
        if not _should_retry(error, self.retry, attempt):
            return False
        pause = self.retry.backoff_s(attempt)
        if not deadline.allows_sleep(pause):
            return False
        await asyncio.sleep(pause)
        return True

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncAtlasClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

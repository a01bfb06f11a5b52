"""The atlas.v1.Atlas servicer: requests in, scheduler jobs, responses and status codes out.

Handlers run on the asyncio event loop and never touch the engine: they parse and
bound the request, hand a ``Job`` to the scheduler, and relay its events. Whatever
way an RPC ends (finished, bad input, client gone, deadline, shutdown), the
``finally`` cancels the job, so no sequence outlives its RPC.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from atlas_sidecar.engine.core import GenerationResult
from atlas_sidecar.errors import BackendUnavailable, RequestError, StepFailed
from atlas_sidecar.learning.rollout import Rollout, RolloutRefused
from atlas_sidecar.serving.metrics import ServingStats, VersionTotals
from atlas_sidecar.serving.proto import atlas_v1_pb2 as pb
from atlas_sidecar.serving.requests import Limits, ParsedRequest, api_field, parse_generate_request
from atlas_sidecar.serving.scheduler import (
    Cancelled,
    DeadlineExceeded,
    DoneEvent,
    Event,
    FailedEvent,
    Job,
    QueueFull,
    QueueTimeout,
    Scheduler,
    ShuttingDown,
    TokensEvent,
)
from atlas_sidecar.serving.streambuf import EventBuffer
from atlas_sidecar.serving.weights import WeightVersions

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Atlas"].full_name
ADMIN_METHODS = frozenset({f"/{SERVICE_NAME}/ResetStats", f"/{SERVICE_NAME}/RolloutWeights"})
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


class RpcFailure(Exception):
    """Ends an RPC with ``code``; raised inside handlers, turned into an abort once."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Malformed:
    """Bytes that did not parse as the request message: answered INVALID_ARGUMENT."""

    message_type: str
    error: str


def _lenient(message_cls: Any) -> Callable[[bytes], Any]:
    # grpc answers a deserializer exception with INTERNAL; a client's garbage is its
    # own mistake, so parse failures reach the handler and become INVALID_ARGUMENT.
    # Any exception, not only DecodeError: whatever the parser raises on bytes a client
    # chose is still the client's garbage.
    def parse(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except Exception as exc:  # noqa: BLE001
            return Malformed(message_cls.DESCRIPTOR.full_name, str(exc))

    return parse


@dataclass(frozen=True)
class ModelInfo:
    target_model: str
    lookahead: int
    live_sequences: Callable[[], int]


class AtlasService:
    def __init__(
        self,
        scheduler: Scheduler,
        stats: ServingStats,
        weights: WeightVersions,
        limits: Limits,
        model: ModelInfo,
        log_prompts: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.stats = stats
        self.weights = weights
        self.limits = limits
        self.model = model
        self.log_prompts = log_prompts
        self.started_at = time.monotonic()
        self.buffers: set[EventBuffer] = set()  # the live RPCs' (memory metrics)
        self.rollout: Rollout | None = None  # hot rollout, with a weights store

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Any, req: Any, resp: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=_lenient(req), response_serializer=resp.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Generate": unary(self.Generate, pb.GenerateRequest, pb.GenerateResponse),
                "GenerateStream": grpc.unary_stream_rpc_method_handler(
                    self.GenerateStream,
                    request_deserializer=_lenient(pb.GenerateRequest),
                    response_serializer=pb.GenerateStreamResponse.SerializeToString,
                ),
                "GetStats": unary(self.GetStats, pb.GetStatsRequest, pb.GetStatsResponse),
                "ResetStats": unary(self.ResetStats, pb.ResetStatsRequest, pb.ResetStatsResponse),
                "RolloutWeights": unary(
                    self.RolloutWeights, pb.RolloutWeightsRequest, pb.RolloutWeightsResponse
                ),
            },
        )

    # -- Generate / GenerateStream --------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        response = pb.GenerateResponse()
        async for event, parsed in self._run("Generate", request, context, stream=False):
            if isinstance(event, DoneEvent):
                response = pb.GenerateResponse(
                    request_id=parsed.request_id,
                    text=event.result.text,
                    token_ids=event.result.token_ids,
                    finish_reason=_FINISH.get(
                        event.result.finish_reason, pb.FINISH_REASON_UNSPECIFIED
                    ),
                    usage=_usage(event.result, event.ttft_s),
                    weight_version=event.weight_version or self.weights.serving,
                )
        return response

    async def GenerateStream(
        self, request: pb.GenerateRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async for event, parsed in self._run("GenerateStream", request, context, stream=True):
            if isinstance(event, TokensEvent):
                yield pb.GenerateStreamResponse(
                    request_id=parsed.request_id, text=event.text, token_ids=event.token_ids
                )
            elif isinstance(event, DoneEvent):
                yield pb.GenerateStreamResponse(
                    request_id=parsed.request_id,
                    text=event.text,
                    token_ids=event.token_ids,
                    finish_reason=_FINISH.get(
                        event.result.finish_reason, pb.FINISH_REASON_UNSPECIFIED
                    ),
                    usage=_usage(event.result, event.ttft_s),
                    weight_version=event.weight_version or self.weights.serving,
                )

    async def _run(
        self,
        rpc: str,
        request: pb.GenerateRequest | Malformed,
        context: grpc.aio.ServicerContext,
        stream: bool,
    ) -> AsyncIterator[tuple[Event, ParsedRequest]]:
        """Submit the request and yield its events until done; abort on any failure."""
        started = time.monotonic()
        code = grpc.StatusCode.OK
        job: Job | None = None
        events: EventBuffer | None = None
        try:
            parsed = self._parse(request)
            events = EventBuffer(asyncio.get_running_loop())  # O(1) entries a stream
            self.buffers.add(events)
            job = self._submit(parsed, events, context, stream)
            while True:
                event = await events.get()
                if isinstance(event, FailedEvent):
                    raise _failure(event.error, parsed)
                yield event, parsed
                if isinstance(event, DoneEvent):
                    self._log_done(rpc, parsed, event)
                    return
        except RpcFailure as failure:
            code = failure.code
            await context.abort(failure.code, failure.message)
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away or its deadline passed: grpc cancels this task.
            code = _cancel_code(context)
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", rpc)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        finally:
            self.buffers.discard(events)
            if job is not None:
                self.scheduler.cancel(job)
            self.stats.rpc_finished(rpc, code.name, time.monotonic() - started)

    def _parse(self, request: pb.GenerateRequest | Malformed) -> ParsedRequest:
        if isinstance(request, Malformed):
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request: not a valid {request.message_type} message ({request.error})",
            )
        try:
            return parse_generate_request(request, self.limits)
        except RequestError as exc:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    def _submit(
        self,
        parsed: ParsedRequest,
        events: EventBuffer,
        context: grpc.aio.ServicerContext,
        stream: bool,
    ) -> Job:
        sink = events.put  # called from the scheduler's thread
        remaining = context.time_remaining()
        job = Job(
            request_id=parsed.request_id,
            prompt=parsed.prompt,
            params=parsed.params,
            sink=sink,
            stream=stream,
            deadline=None if remaining is None else time.monotonic() + remaining,
        )
        try:
            self.scheduler.submit(job)
            # However the RPC ends, even with this handler stuck mid-write, the job goes.
            context.add_done_callback(lambda _: self.scheduler.cancel(job))
        except QueueFull as exc:
            raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except ShuttingDown as exc:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        return job

    def _log_done(self, rpc: str, parsed: ParsedRequest, event: DoneEvent) -> None:
        summary = event.result.summary()
        if self.log_prompts:
            summary["prompt"] = parsed.prompt.text or parsed.prompt.messages
        log.info("%s %s done %s", rpc, parsed.request_id, summary)

    # -- stats and admin ------------------------------------------------------------

    async def GetStats(
        self, request: pb.GetStatsRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> pb.GetStatsResponse:
        snap = self.stats.snapshot()
        return pb.GetStatsResponse(
            requests_total=snap.requests_total,
            requests_ok=snap.requests_ok,
            requests_failed=snap.requests_failed,
            requests_cancelled=snap.requests_cancelled,
            requests_active=self.scheduler.active,
            requests_queued=self.scheduler.queued,
            prompt_tokens=snap.prompt_tokens,
            completion_tokens=snap.completion_tokens,
            tokens_per_second=self.stats.recent_tokens_per_s(),
            speculators=[
                pb.SpeculatorStats(
                    name=name,
                    steps=t.steps,
                    drafted=t.drafted,
                    accepted=t.accepted,
                    accept_len=t.accept_len,
                )  # fmt: skip
                for name, t in sorted(snap.speculators.items())
            ],
            live_sequences=self.model.live_sequences(),
            target_model=self.model.target_model,
            lookahead=self.model.lookahead,
            weight_version=self.weights.serving,
            requested_weight_version=self.weights.requested,
            uptime_s=time.monotonic() - self.started_at,
            versions=self._version_stats(snap.versions),
        )

    def _version_stats(self, versions: dict[str, VersionTotals]) -> list[pb.VersionStats]:
        roles = {v: role for role, v in (self.rollout.roles() if self.rollout else {}).items()}
        return [
            pb.VersionStats(
                version=version, role=roles.get(version, ""), steps=t.steps,
                drafted=t.drafted, accepted=t.accepted, accept_len=t.accept_len,
                tokens=t.tokens, tokens_per_second=t.tokens_per_s,
            )  # fmt: skip
            for version, t in versions.items()
        ]

    async def ResetStats(
        self, request: pb.ResetStatsRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> pb.ResetStatsResponse:
        self.stats.reset()
        log.info("stats reset")
        return pb.ResetStatsResponse()

    async def RolloutWeights(
        self, request: pb.RolloutWeightsRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> pb.RolloutWeightsResponse:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: malformed")
        assert isinstance(request, pb.RolloutWeightsRequest)
        if request.action != pb.ROLLOUT_ACTION_INSTALL:
            return await self._verdict(request.action, context)
        try:
            version = self.weights.request(request.version)
        except RequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.stats.set_weight_version("requested", version)
        log.info("rollout of weight version %s requested (serving %s)", version,
                 self.weights.serving)  # fmt: skip
        applied, message = await self.install(version)
        return pb.RolloutWeightsResponse(
            serving_version=self.weights.serving, requested_version=version,
            applied=applied, message=message,
        )  # fmt: skip

    async def install(
        self, version: str, canary_fraction: float | None = None, stable: bool = False
    ) -> tuple[bool, str]:
        """Hand ``version`` to the rollout (verified and loaded on a worker thread), as
        ``Rollout.request`` takes it; (queued, what happened)."""
        if self.rollout is None:
            return False, "recorded only: this sidecar has no weights store (--weights-store)"
        loop = asyncio.get_running_loop()
        request = functools.partial(self.rollout.request, version, canary_fraction, stable)
        try:
            result = await loop.run_in_executor(None, request)
        except RolloutRefused as exc:
            return False, f"refused: {exc}"
        role = ("stable" if result.stable
                else f"canary for {result.canary_fraction:.0%} of new requests")  # fmt: skip
        return True, f"queued for the next step boundary as {role}: {', '.join(result.installed)}"

    async def _verdict(
        self, action: int, context: grpc.aio.ServicerContext
    ) -> pb.RolloutWeightsResponse:
        if self.rollout is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "no weights store (--weights-store): no rollout to give a verdict on",
            )
        assert self.rollout is not None
        if action == pb.ROLLOUT_ACTION_PROMOTE:
            self.rollout.promote()
        elif action == pb.ROLLOUT_ACTION_ROLL_BACK:
            self.rollout.roll_back()
        else:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"action: unknown {action}")
        name = pb.RolloutAction.Name(action)
        log.info("rollout verdict %s queued", name)
        return pb.RolloutWeightsResponse(
            serving_version=self.weights.serving, applied=True,
            message=f"{name} queued for the next step boundary",
        )  # fmt: skip


def _failure(error: Exception, parsed: ParsedRequest) -> RpcFailure:
    """The status a scheduler failure maps to."""
    if isinstance(error, RequestError):
        field = api_field(error.field, parsed.prompt.field)
        message = str(error)
        reason = message[len(error.field) + 2 :] if message.startswith(error.field) else message
        return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {reason}")
    if isinstance(error, QueueTimeout):
        return RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    if isinstance(error, DeadlineExceeded):
        return RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, str(error))
    if isinstance(error, Cancelled):
        return RpcFailure(grpc.StatusCode.CANCELLED, str(error))
    if isinstance(error, ShuttingDown | BackendUnavailable):
        return RpcFailure(grpc.StatusCode.UNAVAILABLE, str(error))
    if isinstance(error, StepFailed):  # this request alone; its cause is in the server log
        log.error("request %s failed: %r", parsed.request_id, error.__cause__)
        return RpcFailure(grpc.StatusCode.INTERNAL, f"{error}; see the server log")
    log.error("request %s failed: %r", parsed.request_id, error)
    return RpcFailure(grpc.StatusCode.INTERNAL, "internal error; see the server log")


def _cancel_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _usage(result: GenerationResult, ttft_s: float) -> pb.Usage:
    by_speculator: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for step in result.steps:
        counts = by_speculator[step.speculator]
        counts[0] += 1
        counts[1] += step.drafted
        counts[2] += step.accepted
    return pb.Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=len(result.token_ids),
        target_forwards=len(result.steps) + 1,
        drafted=result.drafted,
        accepted=result.accepted,
        accept_len=result.accept_len,
        speculators=[
            pb.SpeculatorUsage(name=name, steps=s, drafted=d, accepted=a)
            for name, (s, d, a) in sorted(by_speculator.items())
        ],
        time_to_first_token_s=ttft_s,
        elapsed_s=result.elapsed_s,
    )

"""Overload over real gRPC: queue bounds, queue timeout, RPC bound, and client retries."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest

from atlas_sidecar.serving.app import ServerConfig, ServerThread, grpc_options
from atlas_sidecar.serving.client import NO_RETRY, AtlasError, RetryPolicy
from atlas_sidecar.serving.proto import atlas_v1_pb2 as pb
from atlas_sidecar.serving.proto import atlas_v1_pb2_grpc as pb_grpc

from .conftest import PROMPTS, serving, wait_until

# Long enough that nothing finishes on its own while a test holds it open.
LONG = pb.SamplingParams(max_tokens=2000, ignore_eos=True)
PATIENT = RetryPolicy(max_attempts=100_000, initial_backoff_s=0.02, max_backoff_s=0.1)


def _refusals(server: ServerThread, rpc: str = "Generate") -> float:
    value = server.server.stats.registry.get_sample_value(
        "atlas_requests_total", {"rpc": rpc, "code": "RESOURCE_EXHAUSTED"}
    )
    return value or 0.0


@contextmanager
def holding(server: ServerThread, running: int, queued: int) -> Iterator[None]:
    """Long streams: ``running`` decoding, then ``queued`` waiting; cancelled on exit."""
    calls = []
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.AtlasStub(channel)
        try:
            for i in range(running + queued):
                request = pb.GenerateRequest(prompt=PROMPTS[i], sampling=LONG)
                call = stub.GenerateStream(request, timeout=300)
                calls.append(call)
                if i < running:
                    next(call)  # decoding: it holds a batch slot
            wait_until(lambda: server.server.scheduler.queued == queued, "the queue to fill")
            yield
        finally:
            for call in calls:
                call.cancel()
    wait_until(lambda: server.server.scheduler.active == 0, "the held streams to go")


def test_a_full_queue_is_retried_until_the_deadline_then_until_room_frees(served, client_for):
    with serving(served.engine, max_batch=1, max_queue=1) as server:
        client = client_for(server, retry=PATIENT)
        with holding(server, running=1, queued=1):
            # Full for good: the client backs off and retries, and gives up by its deadline.
            before = _refusals(server)
            with pytest.raises(AtlasError) as raised:
                client.generate("Hi", max_tokens=2, timeout=1.0)
            assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            tries = _refusals(server) - before
            assert 2 <= tries < PATIENT.max_attempts
            # Full now, room later: the retrying call succeeds once the holders go.
            outcome: dict[str, object] = {}

            def call() -> None:
                try:
                    outcome["result"] = client.generate("Hi", max_tokens=2, timeout=120)
                except AtlasError as exc:
                    outcome["error"] = exc

            caller = threading.Thread(target=call)
            refused = _refusals(server)
            caller.start()
            wait_until(lambda: _refusals(server) >= refused + 2, "the call to be refused")
        caller.join(120)
        assert "error" not in outcome, outcome.get("error")
        assert len(outcome["result"].token_ids) == 2  # type: ignore[attr-defined]


def test_a_request_queued_past_the_queue_timeout_is_resource_exhausted(served, client_for):
    with serving(served.engine, max_batch=1, max_queue=4, queue_timeout_s=0.2) as server:
        client = client_for(server, retry=NO_RETRY)
        with holding(server, running=1, queued=0):
            for call in (
                lambda: client.generate("Hi", max_tokens=2, timeout=120),
                lambda: list(client.generate_stream("Hi", max_tokens=2, timeout=120)),
            ):
                with pytest.raises(AtlasError) as raised:
                    call()
                assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "in the queue (limit 0.2 s)" in raised.value.details
            assert server.server.scheduler.queued == 0  # the expired ones left the queue
    assert served.idle()


def test_rpcs_past_max_concurrent_rpcs_are_resource_exhausted(served, client_for):
    with serving(served.engine, max_concurrent_rpcs=2) as server:
        client = client_for(server, retry=NO_RETRY)
        with holding(server, running=2, queued=0):
            with pytest.raises(AtlasError) as raised:
                client.stats(timeout=30)
            assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Room again once they go (their handlers finish a little after the cancel).
        patient = client_for(server, retry=PATIENT)
        assert patient.stats(timeout=60).requests_active == 0


def test_hardening_settings_become_grpc_channel_arguments():
    options = dict(grpc_options(ServerConfig(
        keepalive_time_s=30, keepalive_timeout_s=5, min_client_ping_interval_s=15,
        permit_keepalive_without_calls=False, max_connection_idle_s=None,
        max_connection_age_s=120, max_connection_age_grace_s=7.5, max_message_bytes=1234,
    )))  # fmt: skip
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 15_000
    assert options["grpc.keepalive_permit_without_calls"] == 0
    assert "grpc.max_connection_idle_ms" not in options  # None: no bound
    assert options["grpc.max_connection_age_ms"] == 120_000
    assert options["grpc.max_connection_age_grace_ms"] == 7_500
    assert options["grpc.max_receive_message_length"] == 1234
    defaults = dict(grpc_options(ServerConfig()))
    assert defaults["grpc.max_connection_idle_ms"] == 300_000

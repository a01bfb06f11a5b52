"""The client library against a scripted server: retries, backoff, deadlines, typed results."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from atlas_sidecar.serving.client import (
    NO_RETRY,
    AsyncAtlasClient,
    AtlasClient,
    AtlasError,
    RetryPolicy,
    build_request,
)
from atlas_sidecar.serving.proto import atlas_v1_pb2 as pb
from atlas_sidecar.serving.proto import atlas_v1_pb2_grpc as pb_grpc

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.01)


class Scripted(pb_grpc.AtlasServicer):
    """Fails the first ``failures`` calls with ``code``, then answers."""

    def __init__(self) -> None:
        self.failures = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.details = "scripted failure"
        self.calls = 0
        self.lock = threading.Lock()

    def _maybe_fail(self, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls += 1
            fail = self.calls <= self.failures
        if fail:
            context.abort(self.code, self.details)

    def Generate(self, request, context):
        self._maybe_fail(context)
        return pb.GenerateResponse(
            request_id="r1", text="ok", token_ids=[1, 2], finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(completion_tokens=2, drafted=3, accepted=1, accept_len=1.5,
                           speculators=[pb.SpeculatorUsage(name="static", steps=1)]),
        )  # fmt: skip

    def GenerateStream(self, request, context) -> Iterator[pb.GenerateStreamResponse]:
        yield pb.GenerateStreamResponse(request_id="r1", text="o", token_ids=[1])
        self._maybe_fail(context)
        yield pb.GenerateStreamResponse(
            request_id="r1", text="k", token_ids=[2], finish_reason=pb.FINISH_REASON_STOP,
            usage=pb.Usage(completion_tokens=2),
        )  # fmt: skip


@pytest.fixture
def scripted() -> Iterator[tuple[Scripted, str]]:
    servicer = Scripted()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_AtlasServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_unavailable_is_retried_until_the_call_succeeds(scripted):
    servicer, address = scripted
    servicer.failures = 2
    with AtlasClient(address, retry=FAST_RETRY) as client:
        result = client.generate("hi")
    assert servicer.calls == 3
    assert result.text == "ok" and result.token_ids == [1, 2]
    assert result.finish_reason == "length"
    assert result.usage.speculators[0].name == "static"


def test_an_overloaded_server_is_retried_until_the_call_succeeds(scripted):
    servicer, address = scripted
    servicer.failures = 3
    servicer.code = grpc.StatusCode.RESOURCE_EXHAUSTED
    servicer.details = "queue full (64 requests waiting); retry later"
    with AtlasClient(address, retry=FAST_RETRY) as client:
        assert client.generate("hi").text == "ok"
    assert servicer.calls == 4


def test_a_message_over_the_size_limit_is_not_retried(scripted):
    servicer, address = scripted
    servicer.failures = 100
    servicer.code = grpc.StatusCode.RESOURCE_EXHAUSTED
    servicer.details = "Received message larger than max (5000000 vs. 4194304)"
    with AtlasClient(address, retry=FAST_RETRY) as client, pytest.raises(AtlasError) as raised:
        client.generate("hi")
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert servicer.calls == 1


def test_retries_stop_after_max_attempts(scripted):
    servicer, address = scripted
    servicer.failures = 100
    with AtlasClient(address, retry=FAST_RETRY) as client, pytest.raises(AtlasError) as raised:
        client.generate("hi")
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == FAST_RETRY.max_attempts


def test_other_errors_are_not_retried(scripted):
    servicer, address = scripted
    servicer.failures = 1
    servicer.code = grpc.StatusCode.INVALID_ARGUMENT
    with AtlasClient(address, retry=FAST_RETRY) as client, pytest.raises(AtlasError) as raised:
        client.generate("hi")
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details == "scripted failure"
    assert servicer.calls == 1


def test_a_stream_is_not_retried_after_its_first_message(scripted):
    servicer, address = scripted
    servicer.failures = 1
    received = []
    with AtlasClient(address, retry=FAST_RETRY) as client, pytest.raises(AtlasError):
        for chunk in client.generate_stream("hi"):
            received.append(chunk)
    assert [c.text for c in received] == ["o"]  # never a duplicated token
    assert servicer.calls == 1


def test_retries_never_outlive_the_deadline(scripted):
    servicer, address = scripted
    servicer.failures = 100
    slow = RetryPolicy(max_attempts=100, initial_backoff_s=5.0, max_backoff_s=5.0)
    with AtlasClient(address, retry=slow, timeout=0.5) as client, pytest.raises(AtlasError):
        client.generate("hi")
    assert servicer.calls == 1  # a 2.5-5 s backoff does not fit in 0.5 s: give up at once


def test_an_unreachable_server_is_unavailable():
    with AtlasClient("127.0.0.1:1", retry=NO_RETRY, timeout=5) as client:
        with pytest.raises(AtlasError) as raised:
            client.generate("hi")
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


async def test_async_client_retries_and_streams(scripted):
    servicer, address = scripted
    servicer.failures = 1
    async with AsyncAtlasClient(address, retry=FAST_RETRY) as client:
        result = await client.generate("hi")
        chunks = [c async for c in client.generate_stream("hi")]
    assert result.text == "ok"
    assert "".join(c.text for c in chunks) == "ok"
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage is not None
    assert chunks[0].finish_reason is None and chunks[0].usage is None


def test_build_request_takes_exactly_one_input():
    with pytest.raises(ValueError):
        build_request()
    with pytest.raises(ValueError):
        build_request("a", token_ids=[1])
    req = build_request(messages=[("system", "be brief"), {"role": "user", "content": "hi"}],
                        max_tokens=5, seed=3, stop=["\n"])  # fmt: skip
    assert [m.role for m in req.messages.messages] == ["system", "user"]
    assert req.sampling.max_tokens == 5 and req.sampling.seed == 3
    assert not req.sampling.HasField("top_p")  # unset: the server's default


def test_backoff_grows_and_is_capped():
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2.0)
    for attempt, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)):
        pause = policy.backoff_s(attempt)
        assert ceiling / 2 <= pause <= ceiling

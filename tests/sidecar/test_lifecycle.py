"""Cancellation, deadlines, backpressure and graceful shutdown, over real gRPC."""

from __future__ import annotations

import threading

import grpc
import pytest

from atlas_sidecar.serving.client import NO_RETRY, AtlasClient, AtlasError

from .conftest import MAX_TOKENS, PROMPTS, chat, live_dynamic_caches, serving, wait_until

# Long enough that nothing finishes on its own while a test holds it open.
LONG = {"max_tokens": 2000, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(served, reference):
    with serving(served.engine, max_batch=4, max_queue=8) as s:
        yield s


def test_cancelling_mid_stream_frees_the_sequence_and_later_requests_run(
    server, served, reference, client_for
):
    client = client_for(server)
    caches_before = live_dynamic_caches()
    for _ in range(3):
        stream = client.generate_stream(messages=chat(PROMPTS[0]), **LONG)
        received = [next(stream), next(stream)]
        assert all(c.finish_reason is None for c in received)
        stream.close()  # cancels the RPC
        wait_until(served.idle, "the cancelled sequence's caches to be freed")
    # Nothing accumulates: no KV cache object survives the cancelled requests.
    assert live_dynamic_caches() <= caches_before
    stats = client.stats()
    assert stats.requests_cancelled >= 3
    assert stats.live_sequences == 0 and stats.requests_active == 0
    result = client.generate(messages=chat(PROMPTS[1]), max_tokens=MAX_TOKENS)
    assert result.token_ids == reference[PROMPTS[1]].token_ids


def test_deadline_exceeded_ends_the_request_and_frees_it(server, served, client_for):
    client = client_for(server, retry=NO_RETRY)
    with pytest.raises(AtlasError) as raised:
        client.generate(messages=chat(PROMPTS[2]), timeout=0.5, **LONG)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(AtlasError) as raised:
        list(client.generate_stream(messages=chat(PROMPTS[2]), timeout=0.5, **LONG))
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(served.idle, "the expired sequences to be freed")


def _hold_stream(client: AtlasClient, text: str, started: threading.Event) -> None:
    """Read a long stream until the server cancels it; signal once it produced a token."""
    try:
        for _ in client.generate_stream(messages=chat(text), **LONG):
            started.set()
    except AtlasError:
        pass


def test_full_queue_answers_resource_exhausted(served, reference, client_for):
    with serving(served.engine, max_batch=1, max_queue=1) as server:
        client = client_for(server, retry=NO_RETRY)
        first_running = threading.Event()
        holders = [
            threading.Thread(target=_hold_stream, args=(client, PROMPTS[0], first_running)),
            threading.Thread(target=_hold_stream, args=(client, PROMPTS[1], threading.Event())),
        ]
        holders[0].start()
        first_running.wait(60)  # the one batch slot is taken
        holders[1].start()
        wait_until(lambda: client.stats().requests_queued == 1, "the second request to queue")
        with pytest.raises(AtlasError) as raised:
            client.generate(messages=chat(PROMPTS[2]), max_tokens=2)
        assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in raised.value.details
        server.stop(grace_s=0.1)  # cancels the held streams
    # Nothing is left behind.
    for holder in holders:
        holder.join(30)
    assert served.idle()


def test_graceful_shutdown_drains_requests_in_flight(served, reference, client_for):
    text = PROMPTS[3]
    with serving(served.engine) as server:
        client = client_for(server, retry=NO_RETRY)
        stream = client.generate_stream(messages=chat(text), max_tokens=MAX_TOKENS)
        chunks = [next(stream)]
        stopper = threading.Thread(target=server.stop, kwargs={"grace_s": 60})
        stopper.start()
        wait_until(lambda: not server.server.scheduler.accepting, "the drain to begin")
        with pytest.raises(AtlasError) as raised:
            client.generate(messages=chat(text), max_tokens=2)
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        chunks.extend(stream)  # the request in flight still runs to its end
        stopper.join(60)
    assert [t for c in chunks for t in c.token_ids] == reference[text].token_ids
    assert chunks[-1].finish_reason == reference[text].finish_reason
    assert served.idle()

"""Generate and GenerateStream over real gRPC: the same tokens as the target alone."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from atlas_sidecar import cli
from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.serving.client import AsyncAtlasClient, AtlasClient
from atlas_sidecar.tooling import loadtest
from atlas_sidecar.tooling.workloads import Prompt, encode

from .conftest import LOOKAHEAD, MAX_TOKENS, PROMPTS, chat, serving, wait_until


@pytest.fixture(scope="module")
def server(served, reference):
    with serving(served.engine, metrics_port=0, target_model="smollm2-135m-instruct") as s:
        yield s


@pytest.fixture
def client(server, client_for):
    return client_for(server)


def test_unary_returns_the_target_alone_tokens(client, reference):
    for text in PROMPTS[:2]:
        result = client.generate(messages=chat(text), max_tokens=MAX_TOKENS)
        assert result.token_ids == reference[text].token_ids
        assert result.text == reference[text].text
        assert result.finish_reason == reference[text].finish_reason


def test_stream_gives_the_same_tokens_and_text_as_unary(client, reference):
    text = PROMPTS[2]
    chunks = list(client.generate_stream(messages=chat(text), max_tokens=MAX_TOKENS))
    assert [t for c in chunks for t in c.token_ids] == reference[text].token_ids
    assert "".join(c.text for c in chunks) == reference[text].text
    # Tokens arrive step by step, not all at once, and only the last chunk finishes.
    assert len(chunks) > 1
    assert [c.finish_reason is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(reference[text].token_ids)


def test_usage_reports_the_speculation_that_served_the_request(client, reference):
    result = client.generate(messages=chat(PROMPTS[0]), max_tokens=MAX_TOKENS)
    usage = result.usage
    assert usage.prompt_tokens == reference[PROMPTS[0]].prompt_tokens
    assert usage.completion_tokens == MAX_TOKENS
    # The drafter is the target itself: its drafts are (all but near-ties) accepted.
    assert usage.drafted > 0
    assert usage.accepted > 0
    assert usage.accept_len > 1.0
    assert usage.target_forwards < MAX_TOKENS
    assert "static" in {s.name for s in usage.speculators}
    assert sum(s.drafted for s in usage.speculators) == usage.drafted


def served_reference(served, ids, params):
    """The target alone: only safe to call while the server's worker is idle."""
    return Engine(served.target, served.target.tokenizer).generate(ids, params).token_ids


def test_raw_prompt_and_token_ids_match_the_engine(client, served):
    tok = served.target.tokenizer
    text = "The quick brown fox"
    ids = encode(tok, text, chat=False)
    expected = served_reference(served, ids, SamplingParams(max_tokens=6))
    assert client.generate(text, max_tokens=6).token_ids == expected
    assert client.generate(token_ids=ids, max_tokens=6).token_ids == expected


def test_seeded_sampling_is_reproducible_across_unary_and_stream(client):
    kwargs = {"messages": chat(PROMPTS[3]), "max_tokens": 10, "temperature": 0.9, "seed": 7}
    unary = client.generate(**kwargs)
    streamed = [t for c in client.generate_stream(**kwargs) for t in c.token_ids]
    assert unary.token_ids == streamed
    assert len(unary.token_ids) > 0


def test_stop_string_cuts_the_text_and_the_stream_text_adds_up_to_it(client, reference):
    text = PROMPTS[4]
    full = reference[text].text
    stop = full[len(full) // 2 :][:3]
    assert stop.strip(), f"pick another prompt: {full!r}"
    unary = client.generate(messages=chat(text), max_tokens=MAX_TOKENS, stop=[stop])
    chunks = list(client.generate_stream(messages=chat(text), max_tokens=MAX_TOKENS, stop=[stop]))
    assert unary.finish_reason == "stop"
    assert unary.text == full[: full.index(stop)]
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == unary.token_ids


async def test_sixteen_concurrent_streams_all_complete_correctly(server, served, reference):
    async with AsyncAtlasClient(server.address) as client:

        async def stream(text: str) -> tuple[list[int], str]:
            tokens, pieces = [], []
            async for chunk in client.generate_stream(messages=chat(text), max_tokens=MAX_TOKENS):
                tokens.extend(chunk.token_ids)
                pieces.append(chunk.text)
            return tokens, "".join(pieces)

        results = await asyncio.gather(*(stream(text) for text in PROMPTS))
    for text, (tokens, joined) in zip(PROMPTS, results, strict=True):
        assert tokens == reference[text].token_ids, text
        assert joined == reference[text].text, text
    assert served.idle()


def test_sync_client_streams_from_many_threads(server, reference):
    errors: list[BaseException] = []

    def one(text: str) -> None:
        try:
            with AtlasClient(server.address) as c:
                got = [t for ch in c.generate_stream(messages=chat(text), max_tokens=4)
                       for t in ch.token_ids]  # fmt: skip
            assert got == reference[text].token_ids[:4]
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(t,)) for t in PROMPTS[:4]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_get_stats_counts_requests_tokens_and_speculators(client, served):
    before = client.stats()
    client.generate(messages=chat(PROMPTS[5]), max_tokens=5)
    after = client.stats()
    assert after.requests_ok == before.requests_ok + 1
    assert after.completion_tokens == before.completion_tokens + 5
    assert after.speculators["static"].accepted > before.speculators.get("static", None).accepted
    assert after.live_sequences == 0
    assert after.requests_active == 0 and after.requests_queued == 0
    assert after.target_model == "smollm2-135m-instruct"
    assert after.lookahead == LOOKAHEAD
    assert after.weight_version == "base"


def test_health_reports_serving_and_reflection_lists_the_services(client, server):
    assert client.health() == "SERVING"
    assert client.health("atlas.v1.Atlas") == "SERVING"
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in response.list_services_response.service}
    assert {"atlas.v1.Atlas", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint_exposes_the_serving_metrics(client, server):
    client.generate(messages=chat(PROMPTS[6]), max_tokens=4)
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    for name in (
        'atlas_requests_total{code="OK",rpc="Generate"}',
        "atlas_request_duration_seconds_bucket",
        "atlas_time_to_first_token_seconds_count",
        "atlas_completion_tokens_total",
        "atlas_tokens_per_second",
        'atlas_accept_length_bucket{le="4.0",speculator="static"}',
        'atlas_controller_choices_total{lookahead="3",speculator="static"}',
        "atlas_queue_depth",
        "atlas_active_sequences",
        'atlas_weight_version_info{role="serving",version="base"} 1.0',
    ):
        assert name in body, name


def test_generate_command_with_endpoint_prints_the_served_text(server, reference, capsys):
    text = PROMPTS[7]
    code = cli.main(
        ["generate", text, "--endpoint", server.address, "--max-tokens", str(MAX_TOKENS)]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == reference[text].text + "\n"
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["completion_tokens"] == len(reference[text].token_ids)
    assert "static" in stats["speculators"]


async def test_loadtest_level_reports_throughput_and_latency(server):
    prompts = [Prompt("t", "t", (("user", t),)) for t in PROMPTS[:2]]
    async with AsyncAtlasClient(server.address) as client:
        row = await loadtest.run_level(client, "spec", prompts, 2, duration_s=0.1, max_tokens=3)
    assert row.requests >= 2 and row.errors == 0
    assert row.tokens == 3 * row.requests
    assert 0 < row.latency_p50_s <= row.latency_p99_s
    assert row.tokens_per_s > 0
    assert row.accept_len > 1.0
    wait_until(lambda: server.server.scheduler.active == 0, "the batch to empty")

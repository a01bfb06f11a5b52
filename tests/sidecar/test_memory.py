"""Bounded memory while serving: KV bytes at admission, stream queues, memory metrics."""

from __future__ import annotations

import asyncio
import threading
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.speculators.suffix import SuffixSpeculator
from atlas_sidecar.serving.client import NO_RETRY, AtlasError
from atlas_sidecar.serving.memory import kv_bytes_per_token
from atlas_sidecar.serving.scheduler import Event, FailedEvent, TokensEvent
from atlas_sidecar.serving.streambuf import EventBuffer
from atlas_sidecar.tooling.workloads import Prompt, encode

from .conftest import LOOKAHEAD, MAX_TOKENS, PROMPTS, chat, serving, wait_until

LONG_TOKENS = 2000  # nothing finishes on its own while a test holds it open


def _prompt_len(served, text: str) -> int:
    return len(encode(served.target.tokenizer, Prompt("t", "t", (("user", text),))))


@pytest.mark.parametrize("short_of", ["caches", "batch copy"])
def test_kv_budget_admits_by_worst_case_bytes_and_queues_the_rest(
    served, reference, client_for, short_of
):
    per_token = kv_bytes_per_token(served.target)
    # SmolLM2-135M in float32: 30 layers x 3 kv heads x 64 dims x 4 bytes x (K, V).
    assert per_token == 30 * 3 * 64 * 4 * 2
    long_need = (_prompt_len(served, PROMPTS[0]) + LONG_TOKENS + LOOKAHEAD) * per_token
    short_need = (_prompt_len(served, PROMPTS[1]) + MAX_TOKENS + LOOKAHEAD) * per_token
    # The long one fits alone. Beside it, the short one's cache does not fit ("caches"),
    # or both caches fit but not with the padded copy a two-row step makes of them.
    budget = long_need + (short_need // 2 if short_of == "caches" else short_need)
    with serving(served.engine, max_batch=4, max_queue=8, kv_budget_bytes=budget) as server:
        client = client_for(server, retry=NO_RETRY)
        # A request that could never fit is refused at once, saying why.
        with pytest.raises(AtlasError) as raised:
            client.generate(messages=chat(PROMPTS[2]), max_tokens=2 * LONG_TOKENS)
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "KV cache" in raised.value.details and "budget" in raised.value.details

        long = client.generate_stream(
            messages=chat(PROMPTS[0]), max_tokens=LONG_TOKENS, ignore_eos=True
        )
        next(long)  # admitted and decoding
        results: list = []
        short = threading.Thread(
            target=lambda: results.append(
                client.generate(messages=chat(PROMPTS[1]), max_tokens=MAX_TOKENS)
            )
        )
        short.start()
        # A free batch slot, but not the bytes: the short request waits in the queue.
        wait_until(lambda: client.stats().requests_queued == 1, "the short request to queue")
        for _ in range(3):  # rounds of the long stream, each with an admission pass
            next(long)
        assert client.stats().requests_queued == 1
        assert client.stats().requests_active == 1 and not results
        assert server.server.scheduler.kv_reserved == long_need
        # The long one goes (cancelled; its bytes come back): the short one runs, exact.
        long.close()
        short.join(120)
        assert results[0].token_ids == reference[PROMPTS[1]].token_ids
        wait_until(served.idle, "the caches to be freed")
        assert server.server.scheduler.kv_reserved == 0


def test_a_stream_that_is_not_read_holds_two_entries_and_loses_nothing():
    async def scenario() -> tuple[list[int], str, int, Event]:
        events = EventBuffer(asyncio.get_running_loop())
        ids = list(range(10_000))

        def produce() -> None:  # the scheduler's thread: one event a token
            for i in ids:
                events.put(TokensEvent([i], f"<{i}>"))
            events.put(FailedEvent(RuntimeError("end")))

        worker = threading.Thread(target=produce)
        worker.start()
        await asyncio.to_thread(worker.join)  # nobody reads while all 10,001 arrive
        entries = events.pending_entries
        merged = await events.get()
        assert isinstance(merged, TokensEvent)
        return merged.token_ids, merged.text, entries, await events.get()

    token_ids, text, entries, final = asyncio.run(scenario())
    assert entries == 2  # the merged tokens and the final event, not 10,001
    assert token_ids == list(range(10_000))
    assert text == "".join(f"<{i}>" for i in range(10_000))
    assert isinstance(final, FailedEvent)


def test_a_slow_stream_reader_still_gets_the_whole_exact_output(served, reference, client_for):
    text = PROMPTS[4]
    with serving(served.engine) as server:
        client = client_for(server, retry=NO_RETRY)
        stream = client.generate_stream(messages=chat(text), max_tokens=MAX_TOKENS)
        chunks = [next(stream)]
        # The reader pauses until the server has generated everything (gRPC's window
        # and the coalescing buffer hold the rest; the unit test above bounds the latter).
        wait_until(lambda: client.stats().requests_active == 0, "the request to finish")
        chunks.extend(stream)
    assert [t for c in chunks for t in c.token_ids] == reference[text].token_ids
    assert "".join(c.text for c in chunks) == reference[text].text
    assert chunks[-1].finish_reason == reference[text].finish_reason


def _scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_export_process_memory_and_the_bounded_structures_in_bytes(
    served, reference, client_for
):
    suffix = SuffixSpeculator()
    engine = Engine(served.target, served.target.tokenizer, suffix, lookahead=LOOKAHEAD)
    per_token = kv_bytes_per_token(served.target)
    budget = 1 << 30
    with serving(engine, metrics_port=0, kv_budget_bytes=budget) as server:
        client = client_for(server, retry=NO_RETRY)
        long = client.generate_stream(
            messages=chat(PROMPTS[0]), max_tokens=LONG_TOKENS, ignore_eos=True
        )
        next(long)
        # The request's own index is built at its first draft, a step after its prefill.
        local = ("atlas_suffix_index_bytes", (("scope", "local"),))
        wait_until(lambda: _scrape(server)[local] > 0, "the request's own index")
        during = _scrape(server)
        long.close()
        result = client.generate(messages=chat(PROMPTS[5]), max_tokens=MAX_TOKENS)
        assert result.token_ids == reference[PROMPTS[5]].token_ids
        wait_until(served.idle, "the caches to be freed")
        after = _scrape(server)
    rss = after[("process_resident_memory_bytes", ())]
    assert 100 << 20 < rss < 64 << 30  # a process holding a 135M-parameter model
    long_need = (_prompt_len(served, PROMPTS[0]) + LONG_TOKENS + LOOKAHEAD) * per_token
    assert during[("atlas_kv_cache_bytes", (("kind", "reserved"),))] == long_need
    assert after[("atlas_kv_cache_bytes", (("kind", "reserved"),))] == 0
    assert after[("atlas_kv_cache_bytes", (("kind", "budget"),))] == budget
    # Both finished requests went into the global index: its bytes, as it counts them.
    glob = after[("atlas_suffix_index_bytes", (("scope", "global"),))]
    assert glob == suffix.global_nbytes and 0 < glob < suffix.global_bytes
    assert after[("atlas_stream_pending", (("unit", "events"),))] == 0


def test_the_suffix_gauge_counts_every_version_a_rollout_holds():
    """A versioned index (hot rollout) holds stable, canary and previous instances: all
    are in memory, so all count, whichever changed since the gauge was registered."""
    from atlas_sidecar.engine.speculators.suffix import SuffixSpeculator
    from atlas_sidecar.learning.versioned import VersionedDrafter
    from atlas_sidecar.serving.memory import _suffix_indexes

    base, new = SuffixSpeculator(), SuffixSpeculator()
    versioned = VersionedDrafter("base", base)
    assert _suffix_indexes([versioned]) == [base]
    versioned.install("v000001", new, 0.5)
    assert _suffix_indexes([versioned]) == [base, new]
    versioned.promote()
    assert _suffix_indexes([versioned]) == [new, base]  # the previous one is kept

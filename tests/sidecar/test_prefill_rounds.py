"""The scheduler prefills a long prompt in chunks between the running streams' steps.

A round prefills at most ``prefill_budget`` prompt tokens, then steps every running
sequence: a stream already decoding keeps getting tokens while a long prompt is fed
(one step per round, so at least as many as the prompt has chunks), and the long
prompt's output is still the target's own greedy output (float32).
"""

from __future__ import annotations

import math
import queue
import threading

from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.serving.metrics import ServingStats
from atlas_sidecar.serving.requests import PromptInput
from atlas_sidecar.serving.scheduler import Cancelled, DoneEvent, FailedEvent, Job, Scheduler
from atlas_sidecar.tooling.workloads import encode

from .conftest import MAX_TOKENS, PROMPTS

BUDGET = 16
WAIT_S = 120.0  # only guards against a hang
LONG_TEXT = " ".join(f"Item {i}: a line of a long document about the sea." for i in range(20))


def test_a_long_prompt_is_prefilled_in_chunks_while_a_running_stream_keeps_decoding(served):
    tokenizer = served.engine.tokenizer
    long_ids = encode(tokenizer, LONG_TEXT, chat=False)
    chunks = math.ceil(len(long_ids) / BUDGET)
    assert chunks >= 8
    params = SamplingParams(max_tokens=MAX_TOKENS)
    expected = Engine(served.target, tokenizer).generate(long_ids, params).token_ids

    order: list[str] = []  # what happened, in order, across both requests
    lock = threading.Lock()
    long_done: queue.Queue[object] = queue.Queue()
    running_started = threading.Event()

    def running_sink(event):
        with lock:
            order.append("running")
        running_started.set()

    def long_sink(event):
        with lock:
            order.append("long-done")
        long_done.put(event)

    scheduler = Scheduler(served.engine, ServingStats(), prefill_budget=BUDGET)
    prompt = PromptInput("messages", messages=(("user", PROMPTS[0]),))
    endless = SamplingParams(max_tokens=2000, ignore_eos=True)
    running = Job("running", prompt, endless, running_sink, stream=True)
    scheduler.submit(running)
    scheduler.start()
    try:
        assert running_started.wait(WAIT_S)
        with lock:
            order.append("long-submitted")
        long_job = Job("long", PromptInput("token_ids", token_ids=tuple(long_ids)), params,
                       long_sink)  # fmt: skip
        scheduler.submit(long_job)
        done = long_done.get(timeout=WAIT_S)
        assert isinstance(done, DoneEvent)
        assert done.result.token_ids == expected
        with lock:
            between = order[order.index("long-submitted") : order.index("long-done")]
        # One step of the running stream per round, one chunk of the prompt per round.
        assert between.count("running") >= chunks
    finally:
        scheduler.cancel(running)
        scheduler.close(timeout=WAIT_S)
    assert served.idle()


def test_a_request_cancelled_while_its_prompt_is_prefilled_leaves_within_a_round(served):
    tokenizer = served.engine.tokenizer
    long_ids = encode(tokenizer, LONG_TEXT, chat=False)
    events: queue.Queue[object] = queue.Queue()
    scheduler = Scheduler(served.engine, ServingStats(), prefill_budget=BUDGET)
    job = Job("long", PromptInput("token_ids", token_ids=tuple(long_ids)),
              SamplingParams(max_tokens=MAX_TOKENS), events.put)  # fmt: skip
    prefill = served.engine.prefill
    fed: list[int] = []

    def cancelling_prefill(seq, max_tokens):
        n = prefill(seq, max_tokens)
        fed.append(n)
        if len(fed) == 2:
            scheduler.cancel(job)  # mid-prefill: the next round must drop it
        return n

    served.engine.prefill = cancelling_prefill  # type: ignore[method-assign]
    try:
        scheduler.submit(job)
        scheduler.start()
        event = events.get(timeout=WAIT_S)
    finally:
        del served.engine.prefill
        scheduler.close(timeout=WAIT_S)
    assert isinstance(event, FailedEvent) and isinstance(event.error, Cancelled)
    assert fed == [BUDGET, BUDGET]  # not one chunk more
    assert served.idle()

"""Serving under faults: the scheduler confines a failed step to the request at fault.

Four requests are admitted into one batch; a fault is injected into one of them at a
stage of a step (its draft, the batched target forward, its verification). It must
fail alone with a clear error, and every other request must still get, token for
token, the target's own greedy output (float32).
"""

from __future__ import annotations

import queue

import pytest

from atlas_sidecar.engine.core import Engine, Sequence
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.errors import StepFailed
from atlas_sidecar.serving.metrics import ServingStats
from atlas_sidecar.serving.requests import PromptInput
from atlas_sidecar.serving.scheduler import DoneEvent, Event, FailedEvent, Job, Scheduler
from atlas_sidecar.tooling.workloads import Prompt, encode

from ..faults import STAGES, Fault, inject
from .conftest import MAX_TOKENS, PROMPTS

BAD = 1  # the faulty request's place in the batch
WAIT_S = 120.0  # only guards against a hang


def submit_all(scheduler: Scheduler, texts: list[str]) -> list[queue.Queue[Event]]:
    """Queue every request before the worker starts, so they are admitted together."""
    sinks: list[queue.Queue[Event]] = []
    for i, text in enumerate(texts):
        events: queue.Queue[Event] = queue.Queue()
        sinks.append(events)
        prompt = PromptInput("messages", messages=(("user", text),))
        job = Job(f"req-{i}", prompt, SamplingParams(max_tokens=MAX_TOKENS), events.put)
        scheduler.submit(job)
    return sinks


def last_event(events: queue.Queue[Event]) -> Event:
    while True:
        event = events.get(timeout=WAIT_S)
        if isinstance(event, DoneEvent | FailedEvent):
            return event


def inject_into(
    monkeypatch: pytest.MonkeyPatch, engine: Engine, stage: str, bad_prompt: int
) -> None:
    """Fail, at ``stage``, every step that includes the sequence whose prompt is
    ``bad_prompt`` tokens long, once its prompt is in (the sequences are created inside
    the worker)."""
    bad: dict[str, Sequence] = {}

    def armed(seq_ids: set[str]) -> bool:
        return any(not bad[s].prefilling for s in seq_ids if s in bad)

    begin = engine.begin

    def tracking_begin(ids, params):
        seq = begin(ids, params)
        if len(ids) == bad_prompt:
            bad[seq.seq_id] = seq
        return seq

    monkeypatch.setattr(engine, "begin", tracking_begin)
    inject(monkeypatch, engine, stage, armed)


@pytest.mark.parametrize("stage", STAGES)
def test_the_scheduler_fails_the_faulty_request_alone_and_the_rest_stay_exact(
    served, reference, monkeypatch, stage
):
    texts = PROMPTS[:4]
    engine = served.engine
    scheduler = Scheduler(engine, ServingStats())
    tokenizer = engine.tokenizer
    lengths = [len(encode(tokenizer, Prompt("t", "t", (("user", t),)))) for t in texts]
    assert len(set(lengths)) == len(lengths)  # the fault finds its sequence by length
    inject_into(monkeypatch, engine, stage, lengths[BAD])
    sinks = submit_all(scheduler, texts)
    scheduler.start()
    try:
        outcomes = [last_event(events) for events in sinks]
    finally:
        scheduler.close(timeout=WAIT_S)
    for i, (text, outcome) in enumerate(zip(texts, outcomes, strict=True)):
        if i == BAD:
            assert isinstance(outcome, FailedEvent), stage
            assert isinstance(outcome.error, StepFailed)
            assert isinstance(outcome.error.__cause__, Fault)
        else:
            assert isinstance(outcome, DoneEvent), (stage, i, outcome)
            assert outcome.result.token_ids == reference[text].token_ids, (stage, i)
    assert served.idle()

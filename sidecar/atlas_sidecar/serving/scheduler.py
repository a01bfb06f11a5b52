"""The scheduler: one worker thread owns the engine and steps its batch together.

The engine (and the tokenizer) is synchronous torch code and not thread-safe, so every
call into it happens on this one thread. Requests wait in a bounded queue, are admitted
into the batch (tokenized and prefilled) as slots free up, and each round every admitted
sequence takes one draft+verify step in one batched target forward: continuous batching
at step granularity. Prompts are prefilled in chunks, at most ``prefill_budget`` tokens a
round, so a long prompt delays the running streams by about one chunk's forward a round.
The controller sees the batch size and drafts less as it grows.

Results travel back to the caller as events through the job's ``sink`` (thread-safe).
A cancelled or expired job is released before the next step any sequence takes, so
its KV cache is freed within one step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from atlas_sidecar.engine.core import Engine, GenerationResult, Sequence
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.errors import BackendUnavailable, RequestError
from atlas_sidecar.serving.memory import batch_peak_bytes, format_bytes, kv_bytes_per_token
from atlas_sidecar.serving.metrics import ServingStats
from atlas_sidecar.serving.requests import PromptInput
from atlas_sidecar.tooling.workloads import Prompt, encode

log = logging.getLogger(__name__)


DEFAULT_PREFILL_BUDGET = 512  # prompt tokens prefilled per round, all admitted prompts together
MAX_BETWEEN = 64  # swaps and verdicts waiting for the worker; a rollout makes a few


class QueueFull(Exception):
    """The waiting queue is at its bound: back off and retry."""


class ShuttingDown(Exception):
    """The server is draining or stopped and takes no new work."""


class QueueTimeout(Exception):
    """The request waited in the queue past the server's bound: overloaded, retry later."""


class WorkerDied(ShuttingDown):
    """The worker thread died: nothing is served until the process restarts."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before it finished."""


class Cancelled(Exception):
    """The caller cancelled the request."""


@dataclass
class TokensEvent:
    token_ids: list[int]
    text: str  # text newly safe to show (streams only)


@dataclass
class DoneEvent:
    result: GenerationResult
    token_ids: list[int]  # the last step's tokens; the whole output is in ``result``
    text: str  # the rest of the text (streams only); the whole text is in ``result``
    ttft_s: float
    weight_version: str = ""  # the adaptive weights it drafted with ("": not versioned)


@dataclass
class FailedEvent:
    error: Exception


Event = TokensEvent | DoneEvent | FailedEvent
Sink = Callable[[Event], None]
# Told of every finished request (its prompt ids, its result, whether it was sampled),
# on the worker: it must not block (the mirror only queues).
# (prompt ids, result, sampled, the weight version it drafted with or "")
FinishHook = Callable[[list[int], GenerationResult, bool, str], object]


@dataclass(eq=False)
class Job:
    """One request as the scheduler sees it."""

    request_id: str
    prompt: PromptInput
    params: SamplingParams
    sink: Sink
    stream: bool = False
    deadline: float | None = None  # time.monotonic() value
    submitted_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    seq: Sequence | None = None
    ttft_s: float = 0.0
    emitted_text: str = ""
    ids: list[int] | None = None  # the prompt's token ids, once tokenized
    kv_bytes: int = 0  # KV bytes reserved for it while admitted
    closed: bool = False  # its last event (done or failed) was sent
    weight_version: str = ""  # pinned at admission (``Scheduler.pin_version``)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        stats: ServingStats,
        max_batch: int = 16,
        max_queue: int = 64,
        max_prompt_tokens: int = 8192,
        queue_timeout_s: float | None = None,
        kv_budget_bytes: int = 0,
        on_death: Callable[[BaseException], None] | None = None,
        prefill_budget: int = DEFAULT_PREFILL_BUDGET,
        on_unavailable: Callable[[], None] | None = None,
        pin_version: Callable[[str], str] | None = None,
        on_finished: FinishHook | None = None,
    ) -> None:
        """``on_death`` is called (on the worker thread) if the worker dies, after every
        request has been failed: the server stops serving and exits (see ``_run``).
        ``on_unavailable`` is called (on the worker thread) when a request failed
        because a remote target did not answer: the server re-checks its health.
        ``pin_version(seq_id)`` pins a new sequence to the adaptive weights it will draft
        with and names them (hot rollout), so its figures count for that version.
        ``on_finished`` is told of each request that finished (the traffic mirror)."""
        if max_batch < 1 or max_queue < 0 or prefill_budget < 1:
            raise ValueError("max_batch and prefill_budget must be >= 1, max_queue >= 0")
        self.engine = engine
        # Admission in bytes (0: by count only): the worst-case KV bytes of admitted
        # requests stay within kv_budget_bytes; the rest wait in the queue.
        self.kv_budget_bytes = kv_budget_bytes
        self.kv_bytes_per_token = kv_bytes_per_token(engine.target) if kv_budget_bytes else 0
        self.kv_reserved = 0  # the worker's own; read by metrics
        self._deferred = 0  # jobs of this admission pass put back in the queue
        self.stats = stats
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prompt_tokens = max_prompt_tokens
        self.queue_timeout_s = queue_timeout_s  # None: a request may wait its whole deadline
        self.prefill_budget = prefill_budget
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()  # guarded by _cond
        self._active: list[Job] = []  # the worker's own
        self._prefilling: list[Job] = []  # admitted, prompt not all in yet (the worker's own)
        self._accepting = True
        self._stopping = False
        self.on_death = on_death
        self.on_unavailable = on_unavailable
        self.pin_version = pin_version
        self.on_finished = on_finished
        self.failure: BaseException | None = None  # what killed the worker, if it died
        self._admitting: list[Job] = []  # taken off the queue this round (the worker's own)
        self._between: deque[Callable[[], None]] = deque()  # guarded by _cond
        self._thread = threading.Thread(target=self._run, name="atlas-scheduler", daemon=True)

    # -- the caller's side (any thread) ------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self.failure is not None:
                raise WorkerDied("the serving worker failed; the server is restarting")
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"queue full ({self.max_queue} requests waiting); retry later")
            self._pending.append(job)
            self._cond.notify()
        self._publish_load()

    def between_steps(self, task: Callable[[], None]) -> None:
        """Run ``task`` on the worker between two decoding rounds, never during one: a
        drafter swapped there is seen whole by every step. A task that raises is logged
        and serving goes on. Bounded: past MAX_BETWEEN waiting tasks, QueueFull."""
        with self._cond:
            if len(self._between) >= MAX_BETWEEN:
                raise QueueFull(f"{MAX_BETWEEN} tasks already wait for the worker")
            self._between.append(task)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job; a no-op if it already finished. Its cache goes before the next step."""
        job.cancelled = True
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
            self._cond.notify()
        self._publish_load()

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def close(self, timeout: float | None = None) -> None:
        """Fail whatever is left with ShuttingDown and stop the worker."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self._active) + len(self._prefilling)

    # -- the worker ---------------------------------------------------------------

    def _run(self) -> None:
        """The worker, supervised: an exception escaping the loop (outside a step's own
        handling) leaves the engine in an unknown state, so nothing more is served.
        Every request, waiting or in flight, fails with ``WorkerDied`` (UNAVAILABLE, so
        clients retry elsewhere) rather than hanging, new ones are refused, and
        ``on_death`` tells the server, which turns NOT_SERVING and exits non-zero so
        that Kubernetes restarts the process."""
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - supervised: whatever kills the loop
            log.critical("the scheduler's worker died; failing every request", exc_info=exc)
            self.failure = exc
            self._fail_all(WorkerDied(
                f"the serving worker failed ({type(exc).__name__}); the server is restarting"
            ))  # fmt: skip
            if self.on_death is not None:
                self.on_death(exc)

    def _fail_all(self, error: ShuttingDown) -> None:
        """Refuse new work and fail every job, waiting or admitted, with ``error``."""
        with self._cond:
            self._accepting = False
            leftover = list(self._pending)
            self._pending.clear()
        # A job being admitted when the worker died is in neither the queue nor the batch.
        jobs = dict.fromkeys([*self._active, *self._prefilling, *self._admitting, *leftover])
        for job in [job for job in jobs if not job.closed]:
            try:
                self._fail(job, error)
            except Exception:  # noqa: BLE001 - the engine may be what broke; tell the rest
                log.exception("request %s: could not release it", job.request_id)
                if job in self._active:
                    self._active.remove(job)
                job.closed = True
                job.sink(FailedEvent(error))
        with contextlib.suppress(Exception):
            self._publish_load()

    def _loop(self) -> None:
        while True:
            admitted = self._wait_for_work()
            if admitted is None:
                break
            self._run_between()
            self._admitting = admitted
            for job in admitted:
                self._admit(job)
            self._round()
            self._publish_load()
        self._fail_all(ShuttingDown("the server stopped"))

    def _wait_for_work(self) -> list[Job] | None:
        """Block until there is work; return the jobs to admit now (None: stop)."""
        with self._cond:
            while (not self._stopping and not self._pending and not self._active
                   and not self._prefilling and not self._between):  # fmt: skip
                self._cond.wait()
            if self._stopping:
                return None
            self._expire_queued(time.monotonic())
            self._deferred = 0
            admitted: list[Job] = []
            taken = len(self._active) + len(self._prefilling)
            while self._pending and taken + len(admitted) < self.max_batch:
                admitted.append(self._pending.popleft())
            return admitted

    def _run_between(self) -> None:
        with self._cond:
            tasks = list(self._between)
            self._between.clear()
        for task in tasks:
            try:
                task()
            except Exception:  # noqa: BLE001 - a failed swap must not stop serving
                log.exception("a task between steps failed; serving goes on")

    def _expire_queued(self, now: float) -> None:
        """Fail queued jobs that waited past queue_timeout_s (called holding _cond)."""
        limit = self.queue_timeout_s
        if limit is None:
            return
        for job in [j for j in self._pending if now - j.submitted_at > limit]:
            self._pending.remove(job)
            waited = now - job.submitted_at
            job.sink(FailedEvent(QueueTimeout(
                f"waited {waited:.1f} s in the queue (limit {limit:g} s): the server is"
                " overloaded; retry later"
            )))  # fmt: skip

    def _admit(self, job: Job) -> None:
        """Tokenize and open the sequence; ``_prefill`` feeds its prompt in chunks."""
        if job.cancelled:
            return
        try:
            if job.expired(time.monotonic()):
                raise DeadlineExceeded("deadline exceeded while queued")
            ids = job.ids = job.ids if job.ids is not None else self._encode(job.prompt)
            if not self._reserve_kv(job, len(ids)):
                self._defer(job)
                return
            job.seq = self.engine.begin(ids, job.params)
            if self.pin_version is not None:
                job.weight_version = self.pin_version(job.seq.seq_id)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to its caller
            self._fail(job, exc)
            return
        self._prefilling.append(job)

    def _prefill(self) -> None:
        """Prefill admitted prompts, oldest first, ``prefill_budget`` tokens in all this
        round: a long prompt then holds the running sequences' next step back by about
        one chunk's forward, not by its whole prefill. A prompt whose last chunk is in
        joins the batch with its first token (it comes out of the prefill)."""
        budget = self.prefill_budget
        for job in list(self._prefilling):
            if budget <= 0:
                break
            assert job.seq is not None
            try:
                budget -= self.engine.prefill(job.seq, budget)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to its caller
                self._fail(job, exc)
                continue
            if job.seq.prefilling:
                continue
            self._prefilling.remove(job)
            job.ttft_s = time.monotonic() - job.submitted_at
            self.stats.first_token(job.ttft_s, len(job.seq.prompt))
            self._active.append(job)
            self._progress(job, list(job.seq.output))

    def _round(self) -> None:
        """One draft + verify step for every admitted sequence, in one batched forward."""
        # Cancelled and expired requests go first: their caches are freed before the
        # batch spends a forward on them.
        self._reap()
        self._prefill()
        jobs = list(self._active)
        if not jobs:
            return
        seqs = [job.seq for job in jobs if job.seq is not None]
        # A failed batched step is rolled back whole and retried without the sequence
        # at fault, which fails alone: the others' outputs are what they would have been.
        for job, outcome in zip(jobs, self.engine.step_isolated(seqs), strict=True):
            assert job.seq is not None
            if isinstance(outcome, Exception):
                log.error("request %s: engine step failed", job.request_id,
                          exc_info=outcome.__cause__ or outcome)  # fmt: skip
                self._fail(job, outcome)
                continue
            self.stats.step(job.seq.steps[-1], len(outcome), job.weight_version)
            self._progress(job, outcome)

    def _reap(self) -> None:
        now = time.monotonic()
        for job in [*self._active, *self._prefilling]:
            if job.cancelled:
                self._fail(job, Cancelled("cancelled by the caller"))
            elif job.expired(now):
                self._fail(job, DeadlineExceeded("deadline exceeded"))

    def _progress(self, job: Job, added: list[int]) -> None:
        seq = job.seq
        assert seq is not None
        if seq.finished:
            self._finish(job, added)
        elif job.stream:
            job.sink(TokensEvent(added, self._text_delta(job)))

    def _finish(self, job: Job, added: list[int]) -> None:
        assert job.seq is not None
        result = job.seq.result()
        self._release(job)
        self._tell_finished(job, result)
        tail = ""
        if job.stream:
            tail = result.text[len(job.emitted_text) :]
            if not result.text.startswith(job.emitted_text):
                log.warning("request %s: streamed text is not a prefix of the final text",
                            job.request_id)  # fmt: skip
        job.closed = True
        job.sink(DoneEvent(result, added, tail, job.ttft_s, job.weight_version))

    def _tell_finished(self, job: Job, result: GenerationResult) -> None:
        """The hook's failure is logged, never the request's: it already succeeded."""
        if self.on_finished is None or job.ids is None:
            return
        try:
            self.on_finished(job.ids, result, not job.params.greedy, job.weight_version)
        except Exception:  # noqa: BLE001 - mirroring must never fail serving
            log.exception("request %s: the finish hook failed", job.request_id)

    def _fail(self, job: Job, error: Exception) -> None:
        self._release(job)
        job.closed = True
        job.sink(FailedEvent(error))
        if isinstance(error, BackendUnavailable) and self.on_unavailable is not None:
            self.on_unavailable()

    def _reserve_kv(self, job: Job, prompt_tokens: int) -> bool:
        """Reserve the job's worst-case KV bytes; False: not now (it waits, in order).

        It is admitted only while the admitted caches at their worst, with the copy a
        batched step makes of them, fit the budget (``batch_peak_bytes``)."""
        if not self.kv_bytes_per_token:
            return True
        tokens = prompt_tokens + job.params.max_tokens + self.engine.lookahead
        need = tokens * self.kv_bytes_per_token
        if need > self.kv_budget_bytes:
            raise RequestError(
                "max_tokens",
                f"{prompt_tokens} prompt tokens + max_tokens {job.params.max_tokens} + "
                f"lookahead {self.engine.lookahead} need {format_bytes(need)} of KV cache, "
                f"more than the server's budget of {format_bytes(self.kv_budget_bytes)}",
            )
        admitted = [j.kv_bytes for j in (*self._active, *self._prefilling) if j.kv_bytes]
        if self._deferred or batch_peak_bytes([*admitted, need]) > self.kv_budget_bytes:
            return False
        job.kv_bytes = need
        self.kv_reserved += need
        return True

    def _defer(self, job: Job) -> None:
        """Back to the queue, ahead of later arrivals and behind this pass's others."""
        with self._cond:
            if not job.cancelled:
                self._pending.insert(self._deferred, job)
                self._deferred += 1

    def _release(self, job: Job) -> None:
        self.kv_reserved -= job.kv_bytes
        job.kv_bytes = 0
        if job.seq is not None:
            self.engine.release(job.seq)
        if job in self._active:
            self._active.remove(job)
        if job in self._prefilling:
            self._prefilling.remove(job)

    def _publish_load(self) -> None:
        self.stats.set_load(len(self._pending), len(self._active) + len(self._prefilling))

    # -- tokenizer work (worker thread only: fast tokenizers are not thread-safe) --

    def _encode(self, prompt: PromptInput) -> list[int]:
        tokenizer = self.engine.tokenizer
        if prompt.token_ids is not None:
            ids = list(prompt.token_ids)
        elif prompt.messages is not None:
            try:
                ids = encode(tokenizer, Prompt("api", "request", prompt.messages), chat=True)
            except Exception as exc:  # noqa: BLE001 - templates raise for bad conversations
                raise RequestError("messages", f"the chat template refused them: {exc}") from exc
        else:
            ids = encode(tokenizer, prompt.text or "", chat=False)
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(
                "prompt", f"{len(ids)} tokens exceed the limit of {self.max_prompt_tokens}"
            )
        return ids

    def _text_delta(self, job: Job) -> str:
        """New text that is safe to show: the final text will start with it."""
        assert job.seq is not None
        text = job.seq.stop.decode()
        # An incomplete UTF-8 character decodes to U+FFFD until its last byte arrives.
        text = text.rstrip("\ufffd")
        # Hold back a tail that could still grow into a stop string (the final text is
        # cut before it).
        text = text[: len(text) - _stop_prefix_len(text, job.params.stop)]
        if len(text) <= len(job.emitted_text) or not text.startswith(job.emitted_text):
            return ""
        delta = text[len(job.emitted_text) :]
        job.emitted_text = text
        return delta


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest

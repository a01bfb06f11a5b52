"""Distilling the neural speculator's head from the target: online, and as a warm start.

The teacher is the target itself. From a finished sequence (its tokens and the target's
final hidden states) every position i gives an example: from (f_i, token_{i+1}) predict
f_{i+1} (smooth L1) and the target's next-token distribution at f_{i+1}, restricted to
the draft vocabulary (soft cross-entropy). Training also unrolls the head on its own
predictions for a few steps, as it drafts, so errors that compound are trained away.

Online, finished requests arrive through a bounded queue (``submit`` never blocks
serving); a background thread adds them to a bounded replay buffer and runs a bounded
number of steps per request, then publishes a new weights snapshot to the speculator.
Offline, ``warm_start`` runs the target once over real texts (teacher forcing) and
trains on its own features and predictions.

    python -m atlas_sidecar.engine.speculators.neural_train --target qwen2.5-coder-1.5b-instruct
"""

from __future__ import annotations

import argparse
import atexit
import bisect
import queue
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.speculators.base import Drafter
from atlas_sidecar.engine.speculators.neural import (
    DraftHead,
    FinishedSequence,
    HeadWeights,
    NeuralSpeculator,
    default_weights_path,
)
from atlas_sidecar.tooling import workloads

WARM_START_SKIP = 20  # the bench's prompts come first in each set: never train on them
MAX_TEXT_TOKENS = 1024


@dataclass
class TrainConfig:
    batch_size: int = 256  # positions per step
    unroll: int = 2  # head steps per example, each fed the head's own prediction
    lr: float = 1e-3
    cls_weight: float = 1.0  # soft cross-entropy vs the feature regression
    grad_clip: float = 1.0
    buffer_tokens: int = 65_536  # replay buffer bound (positions); oldest evicted
    # ... and in bytes: a position holds the target's hidden state (hidden x 4 bytes in
    # fp32: 65,536 positions of a 3584-wide target would be 940 MB).
    buffer_bytes: int = 256 << 20
    queue_bytes: int = 128 << 20  # online: finished requests waiting, in bytes
    steps_per_request: int = 4  # online: training steps per finished request
    queue_size: int = 16  # online: finished requests waiting; more are dropped
    threads: int = 1  # online: torch threads of the training thread
    idle_poll_s: float = 0.01  # online: how often a waiting step checks that serving is idle
    idle_grace_s: float = 0.05  # online: how long serving must have been idle (not a gap
    # between two back-to-back requests) before a step starts
    vocab_refresh_tokens: int = 4096  # re-rank the draft vocabulary after this many new
    seed: int = 0


@dataclass
class Batch:
    features: torch.Tensor  # [B, unroll + 1, hidden]: f_i .. f_{i+unroll}
    tokens: torch.Tensor  # [B, unroll]: token_{i+1} .. token_{i+unroll}


def sequence_bytes(sequence: FinishedSequence) -> int:
    """What a finished sequence holds: its features' storage and its token list's slots."""
    features = sequence.features
    return features.element_size() * features.nelement() + 8 * len(sequence.tokens)


def tail(sequence: FinishedSequence, max_bytes: int) -> FinishedSequence:
    """The sequence, or its most recent part that fits ``max_bytes`` (>= 1 position)."""
    if sequence_bytes(sequence) <= max_bytes or len(sequence) <= 1:
        return sequence
    per_position = sequence_bytes(sequence) / len(sequence)
    keep = max(1, int(max_bytes // per_position))
    return FinishedSequence(sequence.tokens[-(keep + 1) :], sequence.features[-keep:].clone())


class ReplayBuffer:
    """Finished sequences, at most ``max_tokens`` positions and ``max_bytes`` in all; the
    oldest go first."""

    def __init__(self, max_tokens: int, max_bytes: int | None = None) -> None:
        if max_tokens <= 0:
            raise ValueError("the replay buffer needs room for at least one position")
        self.max_tokens = max_tokens
        self.max_bytes = max_bytes
        self._sequences: deque[FinishedSequence] = deque()
        self.tokens = 0
        self.nbytes = 0

    def add(self, sequence: FinishedSequence) -> None:
        if len(sequence) > self.max_tokens:  # keep its most recent part
            keep = self.max_tokens
            sequence = FinishedSequence(
                sequence.tokens[-(keep + 1) :], sequence.features[-keep:].clone()
            )
        if self.max_bytes is not None:
            sequence = tail(sequence, self.max_bytes)
        self._sequences.append(sequence)
        self.tokens += len(sequence)
        self.nbytes += sequence_bytes(sequence)
        while self.tokens > self.max_tokens or (
            self.max_bytes is not None and self.nbytes > self.max_bytes
        ):
            old = self._sequences.popleft()
            self.tokens -= len(old)
            self.nbytes -= sequence_bytes(old)

    def __len__(self) -> int:
        return len(self._sequences)

    def sample(self, batch_size: int, unroll: int, generator: torch.Generator) -> Batch | None:
        """Uniform over positions that have ``unroll`` real successors; None if none do."""
        sequences = [s for s in self._sequences if len(s) > unroll]
        ends = []
        total = 0
        for s in sequences:
            total += len(s) - unroll
            ends.append(total)
        if total == 0:
            return None
        picks = torch.randint(total, (batch_size,), generator=generator).tolist()
        features, tokens = [], []
        for pick in picks:
            which = bisect.bisect_right(ends, pick)
            s = sequences[which]
            i = pick - (ends[which - 1] if which else 0)
            features.append(s.features[i : i + unroll + 1])
            tokens.append(s.tokens[i + 1 : i + unroll + 1])
        return Batch(torch.stack(features), torch.tensor(tokens, dtype=torch.long))


def distill_loss(
    head: DraftHead,
    batch: Batch,
    embedding: torch.Tensor,
    rows: torch.Tensor,
    bias: torch.Tensor | None,
    config: TrainConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Feature regression + soft cross-entropy to the target, over ``unroll`` head steps.

    ``embedding`` is the target's input embedding, ``rows``/``bias`` its LM head for the
    draft vocabulary (all frozen, float32)."""
    device = rows.device
    real = batch.features.to(device=device, dtype=torch.float32)
    tokens = batch.tokens.to(device)
    feature = real[:, 0]
    total = torch.zeros((), device=device)
    metrics: dict[str, float] = {}
    for step in range(tokens.shape[1]):
        feature = head(feature, F.embedding(tokens[:, step], embedding).float())
        wanted = real[:, step + 1]
        regression = F.smooth_l1_loss(feature, wanted)
        with torch.no_grad():
            teacher = F.linear(wanted, rows, bias).softmax(dim=-1)
        student = F.linear(feature, rows, bias).log_softmax(dim=-1)
        cross_entropy = -(teacher * student).sum(dim=-1).mean()
        total = total + regression + config.cls_weight * cross_entropy
        agree = (student.argmax(-1) == teacher.argmax(-1)).float().mean()
        metrics[f"agree@{step + 1}"] = float(agree)
    return total / tokens.shape[1], metrics


def select_vocab(
    counts: torch.Tensor, previous: torch.Tensor, size: int, always: frozenset[int]
) -> torch.Tensor:
    """The ``size`` most frequent tokens; ties (and unseen tokens) keep the previous
    vocabulary's order, then lowest id first. ``always`` (end of sequence) is kept."""
    vocab_size = counts.numel()
    prior = torch.arange(vocab_size, dtype=torch.long) + len(previous)
    prior[previous] = torch.arange(len(previous), dtype=torch.long)
    order = torch.argsort(prior - counts.to(torch.long) * (2 * vocab_size + 1))
    must = [t for t in sorted(always) if t < vocab_size]
    chosen = [t for t in order[: size + len(must)].tolist() if t not in always]
    return torch.tensor((must + chosen)[:size], dtype=torch.long)


class Distiller:
    """The trainable float32 copy of the head, its optimizer, data and counters.

    Not thread-safe: ``OnlineLearner`` serialises access."""

    def __init__(self, speculator: NeuralSpeculator, config: TrainConfig | None = None) -> None:
        self.speculator = speculator
        self.config = config or TrainConfig()
        target = speculator.target
        self.device = target.device
        current = speculator.weights
        self.head = DraftHead(speculator.config).to(self.device)
        self.head.load_state_dict({k: v.float() for k, v in current.head.state_dict().items()})
        self.head.train()
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.config.lr)
        self.buffer = ReplayBuffer(self.config.buffer_tokens, self.config.buffer_bytes)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.counts = torch.zeros(target.vocab_size, dtype=torch.long)
        self.embedding = target.model.get_input_embeddings().weight.detach()
        self.version = current.version
        self._set_vocab(current.vocab)
        self._new_tokens = 0
        self.sequences_seen = 0
        self.examples_seen = 0
        self.steps = 0
        self.last_loss: float | None = None
        self.last_metrics: dict[str, float] = {}
        self.train_s = 0.0

    def _set_vocab(self, vocab: torch.Tensor) -> None:
        lm_head = self.speculator.target.model.get_output_embeddings()
        index = vocab.to(lm_head.weight.device)
        self.vocab = vocab
        self.rows = lm_head.weight.detach().index_select(0, index).float()
        bias = getattr(lm_head, "bias", None)
        self.bias = None if bias is None else bias.detach().index_select(0, index).float()

    def add(self, sequence: FinishedSequence) -> None:
        self.buffer.add(sequence)
        tokens = torch.tensor(sequence.tokens, dtype=torch.long)
        self.counts += torch.bincount(tokens, minlength=self.counts.numel())[: self.counts.numel()]
        self._new_tokens += len(sequence.tokens)
        self.sequences_seen += 1
        self.examples_seen += len(sequence)

    def refresh_vocab(self, force: bool = False) -> bool:
        """Re-rank the draft vocabulary by the tokens seen; True if it changed."""
        if not force and self._new_tokens < self.config.vocab_refresh_tokens:
            return False
        self._new_tokens = 0
        size = self.speculator.config.draft_vocab_size
        always = self.speculator.target.eos_token_ids
        vocab = select_vocab(self.counts, self.vocab, size, always)
        if torch.equal(vocab, self.vocab):
            return False
        self._set_vocab(vocab)
        return True

    def step(self) -> float | None:
        """One optimizer step on a replay batch; None while there is nothing to learn."""
        started = time.perf_counter()
        batch = self.buffer.sample(self.config.batch_size, self.config.unroll, self.generator)
        if batch is None:
            return None
        self.head.train()
        loss, metrics = distill_loss(
            self.head, batch, self.embedding, self.rows, self.bias, self.config
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.steps += 1
        self.last_loss = float(loss.detach())
        self.last_metrics = metrics
        self.train_s += time.perf_counter() - started
        return self.last_loss

    def snapshot(self) -> HeadWeights:
        """The head as trained so far, as a new serving version (not yet swapped in)."""
        self.version += 1
        meta = {"steps": self.steps, "examples_seen": self.examples_seen}
        return self.speculator.make_weights(self.head.state_dict(), self.vocab, self.version, meta)

    def publish(self) -> HeadWeights:
        self.refresh_vocab()
        weights = self.snapshot()
        self.speculator.swap(weights)
        return weights

    def restart_from(self, speculator: NeuralSpeculator) -> None:
        """Train ``speculator``'s head from its current weights on, and publish to it.

        The replay buffer and the token counts stay: they hold the target's features
        and tokens, whichever head drafted those requests. The optimizer starts afresh:
        its moments were those of other weights."""
        current = speculator.weights
        self.speculator = speculator
        self.head.load_state_dict({k: v.float() for k, v in current.head.state_dict().items()})
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.config.lr)
        self.version = current.version
        self._set_vocab(current.vocab)

    def stats(self) -> dict[str, Any]:
        return {
            "sequences_seen": self.sequences_seen,
            "examples_seen": self.examples_seen,
            "buffer_tokens": self.buffer.tokens,
            "buffer_bytes": self.buffer.nbytes,
            "steps": self.steps,
            "last_loss": None if self.last_loss is None else round(self.last_loss, 4),
            "train_s": round(self.train_s, 3),
            "version": self.version,
            **{k: round(v, 3) for k, v in self.last_metrics.items()},
        }


class OnlineLearner:
    """Learns from finished requests without ever blocking serving.

    ``background=True``: a daemon thread takes finished sequences from a bounded queue
    (``submit`` drops them when it is full), adds each to the replay buffer, runs up to
    ``steps_per_request`` steps while no sequence is live on the target, and publishes a
    new weights version. ``background=False`` does the same in the caller of ``submit``
    (deterministic, for tests and benchmarks).

    One learner serves every instance of a hot-swapped head (``VersionedDrafter``): all
    of them hand it their finished sequences (the features are the target's, whichever
    head drafted), and it trains and publishes to one, the stable instance
    (``adopt``). A canary's head stays exactly the published one, so its acceptance
    judges that version; an instance no longer stable stops changing.
    """

    def __init__(
        self,
        speculator: NeuralSpeculator,
        config: TrainConfig | None = None,
        background: bool = True,
    ) -> None:
        self.config = config or TrainConfig()
        self.distiller = Distiller(speculator, self.config)
        self.background = background
        self.submitted = 0
        self.dropped = 0
        self.errors = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._queue: queue.Queue[FinishedSequence | None] = queue.Queue(self.config.queue_size)
        self.queued_bytes = 0  # of the sequences in _queue, bounded by config.queue_bytes
        self._queued_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._adopting: NeuralSpeculator | None = None  # set by adopt, taken under _lock
        self._adopt_lock = threading.Lock()  # held only to set or take _adopting
        speculator.learner = self
        if background:
            self._thread = threading.Thread(
                target=self._run, name="atlas-neural-trainer", daemon=True
            )
            self._thread.start()
            _RUNNING.add(self)

    def submit(self, sequence: FinishedSequence) -> None:
        self.submitted += 1
        if not self.background:
            self._learn(sequence)
            return
        # Bounded in bytes as well as in count: a long request's features are large.
        sequence = tail(sequence, min(self.config.buffer_bytes, self.config.queue_bytes))
        size = sequence_bytes(sequence)
        with self._queued_lock:
            if self.queued_bytes + size > self.config.queue_bytes:
                self.dropped += 1
                return
            try:
                self._queue.put_nowait(sequence)
            except queue.Full:
                self.dropped += 1
                return
            self.queued_bytes += size

    def _dequeued(self, sequence: FinishedSequence | None) -> None:
        if sequence is not None:
            with self._queued_lock:
                self.queued_bytes -= sequence_bytes(sequence)

    def adopt(self, speculator: NeuralSpeculator) -> None:
        """From now on, train ``speculator``'s head (from its weights: a published head
        goes on learning from this replica's traffic) and publish to it, no longer to
        the one trained so far; its finished sequences come here too.

        Called on the worker as the stable instance changes, which must not wait for a
        training step: when a step holds the lock, the trainer takes the new head over
        before its next step or publication, so nothing trained on the old head is
        ever published to the new one."""
        speculator.learner = self
        with self._adopt_lock:
            self._adopting = speculator
        if self._lock.acquire(blocking=False):
            try:
                self._take_over()
            finally:
                self._lock.release()

    def _take_over(self) -> None:
        """With ``_lock`` held: switch to the head ``adopt`` named, if any."""
        with self._adopt_lock:
            speculator, self._adopting = self._adopting, None
        if speculator is not None and speculator is not self.distiller.speculator:
            self.distiller.restart_from(speculator)

    @property
    def speculator(self) -> NeuralSpeculator:
        """The head trained and published to (after any ``adopt`` still pending)."""
        with self._adopt_lock:
            return self._adopting or self.distiller.speculator

    def _learn(self, sequence: FinishedSequence) -> None:
        with self._lock:
            self._take_over()
            self.distiller.add(sequence)
        for _ in range(self.config.steps_per_request):
            if self.background and not self._wait_for_idle_serving():
                break
            with self._lock:
                self._take_over()
                self.distiller.step()
        with self._lock:
            self._take_over()
            self.distiller.publish()

    def _wait_for_idle_serving(self) -> bool:
        """Block until no sequence has been live on the target for a moment; False once
        closed.

        On a CPU, training beside a decoding step would slow it (the cores are shared,
        and so is the GIL), so steps run while serving is idle; a request that arrives
        meanwhile waits for at most one step."""
        target = self.distiller.speculator.target
        idle_since: float | None = None
        while not self._stop.is_set():
            now = time.monotonic()
            if target.live_sequences:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= self.config.idle_grace_s:
                return True
            self._stop.wait(self.config.idle_poll_s)
        return False

    def _run(self) -> None:
        # Per-thread in torch's OpenMP pool: serving keeps its own thread count.
        torch.set_num_threads(self.config.threads)
        while not self._stop.is_set():
            sequence = self._queue.get()
            self._dequeued(sequence)
            try:
                if sequence is None:
                    return
                self._learn(sequence)
            except Exception as exc:  # a bad sequence must not end online learning
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                self._queue.task_done()

    def train_now(self, steps: int) -> float | None:
        """Synchronously: take in whatever is queued, run ``steps`` steps, publish."""
        with self._lock:
            self._take_over()
            while True:
                try:
                    sequence = self._queue.get_nowait()
                except queue.Empty:
                    break
                self._dequeued(sequence)
                if sequence is not None:
                    self.distiller.add(sequence)
                self._queue.task_done()
            loss = None
            for _ in range(steps):
                loss = self.distiller.step()
            self.distiller.publish()
            return loss

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until every submitted sequence has been learned from; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Stop the training thread after its current step; queued sequences are dropped."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            try:
                self._queue.put_nowait(None)  # wake it if it is waiting for work
            except queue.Full:
                pass
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        """Counters (read without the training lock: a step may be under way)."""
        return {
            **self.distiller.stats(),
            "submitted": self.submitted,
            "queued": self._queue.qsize(),
            "queued_bytes": self.queued_bytes,
            "dropped": self.dropped,
            "errors": self.errors,
            "last_error": self.last_error,
        }


def hand_over_learning(old: Drafter, new: Drafter) -> None:
    """``VersionedDrafter``'s ``on_stable`` for the neural head: the replica's learner
    moves to the new stable instance (it goes on learning from the installed head), and
    the old one stops changing (kept as it was, for a rollback)."""
    learner = getattr(old, "learner", None)
    if isinstance(learner, OnlineLearner) and isinstance(new, NeuralSpeculator):
        learner.adopt(new)


# Stopped at exit: a daemon thread killed inside a torch op aborts the interpreter.
_RUNNING: weakref.WeakSet[OnlineLearner] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for learner in list(_RUNNING):
        learner.close()


# -- evaluation ---------------------------------------------------------------------------


@torch.inference_mode()
def first_token_acceptance(
    speculator: NeuralSpeculator, sequences: Sequence[FinishedSequence], chunk: int = 256
) -> float:
    """How often the head's first greedy draft token is the target's own next token.

    For every position i: the draft from (f_i, token_{i+1}) against the argmax of the
    target's full LM head at f_{i+1}: the first test greedy verification applies."""
    weights = speculator.weights
    target = speculator.target
    embed = target.model.get_input_embeddings()
    lm_head = target.model.get_output_embeddings()
    hits = total = 0
    for s in sequences:
        n = len(s)
        for start in range(0, n - 1, chunk):
            end = min(start + chunk, n - 1)
            features = s.features[start:end].to(target.device, speculator.dtype)
            tokens = torch.tensor(s.tokens[start + 1 : end + 1], device=target.device)
            predicted = weights.head(features, embed(tokens).to(speculator.dtype))
            drafted = weights.vocab[weights.logits(predicted).argmax(-1).cpu()]
            wanted = lm_head(s.features[start + 1 : end + 1].to(target.device)).argmax(-1)
            hits += int((drafted == wanted.cpu()).sum())
            total += end - start
    return hits / total if total else 0.0


@torch.inference_mode()
def replay_accept_len(
    speculator: NeuralSpeculator, sequence: FinishedSequence, prompt_len: int, lookahead: int
) -> float:
    """The engine's greedy accept_len for this drafter, replayed offline.

    ``sequence`` is a prompt and the target's own greedy output after it, with the
    target's features (``collect``). Each step drafts ``lookahead`` tokens from the
    feature before the pending token, as the engine does, and accepts the prefix that
    matches the target's output: scoring a head on recent traffic costs no target
    forward."""
    weights = speculator.weights
    target = speculator.target
    embed = target.model.get_input_embeddings()
    tokens = sequence.tokens
    end = len(sequence) + 1  # the last token whose context has every feature needed
    position = prompt_len + 1  # the prefill produced the first output token
    steps = gained = 0
    while position < end:
        feature = sequence.features[position - 2 : position - 1].to(target.device, speculator.dtype)
        token = torch.tensor([tokens[position - 1]], device=target.device)
        room = min(lookahead, end - position - 1)
        accepted = 0
        for i in range(room):
            feature = weights.head(feature, embed(token).to(speculator.dtype))
            drafted = int(weights.vocab[int(weights.logits(feature).argmax(-1))])
            if drafted != tokens[position + i]:
                break
            accepted += 1
            token = torch.tensor([drafted], device=target.device)
        steps += 1
        gained += accepted + 1
        position += accepted + 1
    return gained / steps if steps else 0.0


# -- offline warm start -------------------------------------------------------------------


def _assistant_text(tokenizer: Any, user: str, reply: str) -> list[int]:
    chat = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(chat, tokenize=True)
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer.encode(user + "\n" + reply)]


def warm_start_texts(
    tokenizer: Any, skip: int = WARM_START_SKIP, chat: int = 0
) -> list[list[int]]:
    """Real texts in the chat template, none of them among the bench's first prompts.

    HumanEval and HumanEval-Rust: the prompt as the bench asks it, the canonical solution
    as the reply. MT-Bench: each question, with the reference answer where there is one.
    Then ``chat`` ShareGPT conversations' first exchanges (MT-Bench has few reference
    answers: without them the head sees almost no chat replies)."""
    texts: list[list[int]] = []
    for key, language in (("humaneval", "Python"), ("humaneval-rust", "Rust")):
        for row in workloads.read_jsonl(workloads.SOURCES[key])[skip:]:
            (_, user), = workloads.code_prompt(language, row["prompt"])  # fmt: skip
            code = row["prompt"].rstrip() + "\n" + row["canonical_solution"]
            reply = f"```{language.lower()}\n{code.strip()}\n```"
            texts.append(_assistant_text(tokenizer, user, reply))
    for row in workloads.read_jsonl(workloads.SOURCES["mtbench"])[skip:]:
        references = row.get("reference") or []
        for i, turn in enumerate(row["turns"]):
            reply = references[i] if i < len(references) else ""
            texts.append(_assistant_text(tokenizer, turn, reply))
    for question, reply in workloads.sharegpt(chat) if chat > 0 else []:
        texts.append(_assistant_text(tokenizer, question, reply))
    return texts


@torch.inference_mode()
def collect(
    target: CausalLMRunner, texts: Sequence[str | list[int]], max_tokens: int = MAX_TEXT_TOKENS
) -> list[FinishedSequence]:
    """Run the target once over each text (teacher forcing); keep its final hidden states."""
    decoder = target.model.get_decoder()
    out = []
    for text in texts:
        ids = target.tokenizer.encode(text) if isinstance(text, str) else list(text)
        ids = [int(t) for t in ids][:max_tokens]
        if len(ids) < 3:
            continue
        hidden = decoder(input_ids=torch.tensor([ids], device=target.device)).last_hidden_state
        out.append(FinishedSequence(ids, hidden[0, :-1].to("cpu").clone()))
    return out


def warm_start(
    speculator: NeuralSpeculator,
    texts: Sequence[str | list[int]],
    steps: int,
    config: TrainConfig | None = None,
    holdout: float = 0.1,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the head on the target's features over ``texts``; serve the result.

    A ``holdout`` fraction of the texts is kept out of training to report the head's
    first-token acceptance before and after. Returns timings and those figures."""
    say = log or (lambda _: None)
    started = time.perf_counter()
    sequences = collect(speculator.target, texts)
    collect_s = time.perf_counter() - started
    tokens = sum(len(s) for s in sequences)
    say(f"collected {len(sequences)} texts, {tokens} positions in {collect_s:.1f}s")
    held = max(1, int(len(sequences) * holdout)) if holdout > 0 and len(sequences) > 1 else 0
    train, heldout = sequences[held:], sequences[:held]
    config = config or TrainConfig()
    config = TrainConfig(**{**asdict(config), "buffer_tokens": max(tokens, 1)})
    distiller = Distiller(speculator, config)
    for s in train:
        distiller.add(s)
    distiller.refresh_vocab(force=True)
    speculator.swap(distiller.snapshot())
    before = first_token_acceptance(speculator, heldout) if heldout else None
    started = time.perf_counter()
    first_loss = None
    for i in range(steps):
        loss = distiller.step()
        first_loss = loss if first_loss is None else first_loss
        if log and (i + 1) % max(1, steps // 10) == 0:
            say(f"step {i + 1}/{steps}: loss {distiller.last_loss} {distiller.last_metrics}")
    train_s = time.perf_counter() - started
    distiller.publish()
    after = first_token_acceptance(speculator, heldout) if heldout else None
    report = {
        "texts": len(sequences),
        "positions": tokens,
        "collect_s": round(collect_s, 1),
        "steps": steps,
        "train_s": round(train_s, 1),
        "first_loss": first_loss,
        "last_loss": distiller.last_loss,
        "heldout_texts": held,
        "heldout_acceptance_before": before,
        "heldout_acceptance_after": after,
    }
    say(f"warm start: {report}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--skip", type=int, default=WARM_START_SKIP)
    parser.add_argument("--chat", type=int, default=200, help="ShareGPT conversations")
    parser.add_argument("--max-texts", type=int, default=None,
                        help="at most this many texts, taken evenly across the sources")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="default: $ATLAS_HOME/drafters/")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target = CausalLMRunner.load(args.target, dtype=args.dtype, record_hidden=True)
    speculator = NeuralSpeculator(target)
    texts = warm_start_texts(target.tokenizer, skip=args.skip, chat=args.chat)
    if args.max_texts and len(texts) > args.max_texts:
        texts = texts[:: -(-len(texts) // args.max_texts)]
    config = TrainConfig(batch_size=args.batch_size)
    warm_start(speculator, texts, args.steps, config, log=lambda s: print(s, file=sys.stderr))
    out = Path(args.out) if args.out else default_weights_path(speculator.identity)
    print(f"wrote {speculator.save(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

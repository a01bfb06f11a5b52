"""The decoding loop: prefill -> draft -> verify -> accept -> repeat.

Follow one request: ``start`` validates it and prefills the target, which yields the
first token. Each ``step`` asks the speculator for a draft after the sequence's
context, runs the target once over [pending token] + draft, accepts the longest
verified prefix plus one token from the target itself, and rolls the target's cache
back past the rejected tokens. Greedy output is token-for-token the target's own;
sampled output follows the target's distribution (see ``sampling``).

Cache invariant between steps: the target's cache covers ``prompt + output[:-1]``;
the last output token is pending, fed at the head of the next verify forward.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from atlas_sidecar.engine.backends.base import (
    ForwardItem,
    SampledItem,
    SamplingTarget,
    TargetBackend,
)
from atlas_sidecar.engine.controller import DraftPolicy, FixedPolicy
from atlas_sidecar.engine.detokenize import IncrementalDetokenizer
from atlas_sidecar.engine.sampling import (
    SamplingParams,
    make_generator,
    match_vocab,
    verify,
)
from atlas_sidecar.engine.speculators.base import Drafter, DraftRequest
from atlas_sidecar.engine.tree import DraftTree
from atlas_sidecar.errors import BackendUnavailable, RequestError, StepFailed

log = logging.getLogger(__name__)

DEFAULT_LOOKAHEAD = 4
MAX_LOOKAHEAD = 64

_seq_ids = itertools.count()


@dataclass
class StepStats:
    speculator: str
    drafted: int
    accepted: int
    draft_s: float
    verify_s: float


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    prefill_s: float
    steps: list[StepStats]
    elapsed_s: float

    @property
    def drafted(self) -> int:
        return sum(s.drafted for s in self.steps)

    @property
    def accepted(self) -> int:
        return sum(s.accepted for s in self.steps)

    @property
    def accept_len(self) -> float:
        """Mean tokens gained per target verify forward (1.0 = no speculation gain)."""
        return (self.accepted + len(self.steps)) / len(self.steps) if self.steps else 0.0

    @property
    def draft_s(self) -> float:
        return sum(s.draft_s for s in self.steps)

    @property
    def verify_s(self) -> float:
        return sum(s.verify_s for s in self.steps)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "completion_tokens": len(self.token_ids),
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "target_forwards": len(self.steps) + 1,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "accept_len": round(self.accept_len, 3),
            "prefill_s": round(self.prefill_s, 4),
            "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4),
            "elapsed_s": round(self.elapsed_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
        }


@dataclass(frozen=True)
class StopMark:
    tokens: int
    text: str
    cut_at_stop_string: bool
    finish_reason: str | None


class StopChecker:
    """Finds where output ends: EOS, a stop string, or max_tokens.

    Checked token by token, so a stop string that straddles a draft boundary (or lies
    inside one accepted chunk) ends the output exactly where the target alone would.
    The text is kept by an incremental detokenizer: each token re-decodes a short tail,
    not the whole output (which made a request quadratic on the worker thread).
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, eos_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.params = params
        self.eos_ids = frozenset() if params.ignore_eos else eos_ids
        self.longest_stop = max((len(s) for s in params.stop), default=0)
        self.tokens: list[int] = []
        self.text = ""
        self.cut_at_stop_string = False
        self.finish_reason: str | None = None
        self._detokenizer = IncrementalDetokenizer(tokenizer)

    def add(self, token: int) -> bool:
        """Append one token; return True when the output is finished."""
        self.tokens.append(token)
        if token in self.eos_ids:
            self.finish_reason = "stop"
        elif self.params.stop:
            before = len(self.text)
            self.text = self.decode()
            start = max(0, before - self.longest_stop + 1)
            hits = [i for s in self.params.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.cut_at_stop_string = True
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def mark(self) -> StopMark:
        """Where the output stands, for ``restore`` after a failed step."""
        return StopMark(len(self.tokens), self.text, self.cut_at_stop_string, self.finish_reason)

    def restore(self, mark: StopMark) -> None:
        """Back to ``mark``: tokens since are dropped, and the text is then decoded
        afresh (a retried step may add other tokens of the same count, which a
        detokenizer that only compares lengths and the last token would take for the
        ones it saw)."""
        del self.tokens[mark.tokens :]
        self.text, self.cut_at_stop_string = mark.text, mark.cut_at_stop_string
        self.finish_reason = mark.finish_reason
        self._detokenizer = IncrementalDetokenizer(self.tokenizer)

    def decode(self) -> str:
        """The text of every token so far (special tokens skipped), as a full decode."""
        return self._detokenizer.sync(self.tokens)

    def final_text(self) -> str:
        return self.text if self.cut_at_stop_string else self.decode()


@dataclass
class Sequence:
    """One request in flight."""

    seq_id: str
    prompt: list[int]
    params: SamplingParams
    stop: StopChecker
    generator: torch.Generator | None
    started_at: float
    prefill_s: float = 0.0
    steps: list[StepStats] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens in the target's cache (prefill may go in chunks)

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    @property
    def output(self) -> list[int]:
        return self.stop.tokens

    @property
    def finished(self) -> bool:
        return self.stop.finish_reason is not None

    def result(self) -> GenerationResult:
        return GenerationResult(
            token_ids=list(self.output),
            text=self.stop.final_text(),
            finish_reason=self.stop.finish_reason or "length",
            prompt_tokens=len(self.prompt),
            prefill_s=self.prefill_s,
            steps=list(self.steps),
            elapsed_s=time.perf_counter() - self.started_at,
        )


@dataclass
class _Mark:
    """What a failed step must put back in a sequence, saved before the step: the
    length of its stats, its stop checker's mark, its sampling RNG state."""

    steps: int
    stop: StopMark
    rng: torch.Tensor | None

    @classmethod
    def of(cls, seq: Sequence) -> _Mark:
        rng = seq.generator.get_state() if seq.generator is not None else None
        return cls(len(seq.steps), seq.stop.mark(), rng)

    def restore(self, seq: Sequence) -> None:
        del seq.steps[self.steps :]
        seq.stop.restore(self.stop)
        if seq.generator is not None and self.rng is not None:
            seq.generator.set_state(self.rng)


class Engine:
    """Speculative decoding over one target backend.

    Drafts come from a policy: one speculator at a fixed lookahead (``speculator``,
    ``lookahead``), or the confidence-aware controller (``policy``) choosing among
    several per step.
    """

    def __init__(
        self,
        target: TargetBackend,
        tokenizer: Any,
        speculator: Drafter | None = None,
        lookahead: int = DEFAULT_LOOKAHEAD,
        policy: DraftPolicy | None = None,
    ) -> None:
        if not 0 <= lookahead <= MAX_LOOKAHEAD:
            raise ValueError(f"lookahead must be in 0..{MAX_LOOKAHEAD}, got {lookahead}")
        self.target = target
        self.tokenizer = tokenizer
        self.policy: DraftPolicy = policy or FixedPolicy(speculator, lookahead)
        # The cap on drafted tokens per step; the controller picks its own below it.
        if policy is not None:
            self.lookahead = MAX_LOOKAHEAD
        else:
            self.lookahead = lookahead if speculator is not None else 0

    # -- one request, start to finish ------------------------------------------------

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        seq = self.start(prompt_ids, params)
        try:
            while not seq.finished:
                self.step(seq)
            return seq.result()
        finally:
            self.release(seq)

    def generate_stream(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> Iterator[tuple[list[int], Sequence]]:
        """Yield (newly accepted tokens, sequence) after prefill and after every step."""
        seq = self.start(prompt_ids, params)
        try:
            yield list(seq.output), seq
            while not seq.finished:
                yield self.step(seq), seq
        finally:
            self.release(seq)

    # -- the pieces a scheduler drives ---------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise RequestError("prompt", "must not be empty")
        vocab = self.target.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestError("prompt_token_ids", f"token ids must be in [0, {vocab})")
        room = self.target.max_context - len(prompt_ids)
        if room <= 0:
            raise RequestError(
                "prompt",
                f"{len(prompt_ids)} tokens exceed the context of {self.target.max_context}",
            )
        params.validate(max_new_tokens=room)
        caps = self.target.capabilities
        if not params.greedy and not (caps.exact_logits or caps.exact_sampling):
            raise RequestError(
                "temperature",
                "this target backend verifies greedy decoding only (temperature 0): "
                "its rows carry the target's choice, not its distribution",
            )

    def start(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Validate, prefill the target, and take the first token."""
        seq = self.begin(prompt_ids, params)
        self.prefill(seq, len(seq.prompt))
        return seq

    def begin(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Validate and open the sequence's cache; ``prefill`` then feeds its prompt."""
        self.validate(prompt_ids, params)
        seq = Sequence(
            seq_id=f"seq-{next(_seq_ids)}",
            prompt=list(prompt_ids),
            params=params,
            stop=StopChecker(self.tokenizer, params, self.target.eos_token_ids),
            generator=make_generator(params, self.target.device),
            started_at=time.perf_counter(),
        )
        self.target.start(seq.seq_id)
        return seq

    def prefill(self, seq: Sequence, max_tokens: int) -> int:
        """Feed the target up to ``max_tokens`` more prompt tokens (at least one); with
        the prompt's last, take the first output token. Returns how many were fed.

        A chunk attends to the chunks before it through the cache, so chunks give the
        whole prompt's prefill (up to float rounding), and a scheduler can spread a long
        prompt over rounds between the running sequences' steps. On failure the
        sequence is released."""
        if not seq.prefilling:
            raise ValueError(f"{seq.seq_id} is already prefilled")
        started = time.perf_counter()
        end = min(len(seq.prompt), seq.prefilled + max(1, max_tokens))
        chunk = seq.prompt[seq.prefilled : end]
        done = end == len(seq.prompt)
        first: int | None = None
        try:
            if done and self._sampled_by_target(seq):
                first = self._sample_many([seq], [chunk], [DraftTree.empty()])[0][1]
            else:
                logits = self.target.forward(seq.seq_id, chunk)[-1:]
                first = self._accept(seq, DraftTree.empty(), logits)[1] if done else None
        except BaseException:
            self.release(seq)
            raise
        fed, seq.prefilled = end - seq.prefilled, end
        seq.prefill_s += time.perf_counter() - started
        if first is not None:
            seq.stop.add(first)
        return fed

    def step(self, seq: Sequence) -> list[int]:
        """One draft + verify round; return the tokens it added to the output."""
        return self.step_many([seq])[0]

    def step_many(self, seqs: list[Sequence]) -> list[list[int]]:
        """One draft + verify round for several sequences, verified in one target forward.

        Each sequence drafts its own chain or tree and accepts its own number of tokens;
        the time of the shared draft and verify calls is split evenly in the step stats.
        Returns the tokens each sequence added to its output.

        All or nothing: if any part of the step raises (a drafter, the forward, one
        sequence's verification), every sequence is put back as it was before the step
        (``_rollback``) and the error propagates; ``step_isolated`` then finds the
        sequence at fault. What is saved beforehand is a few lengths per sequence: the
        cache invariant says where each cache is cut back to.
        """
        if not seqs:
            return []
        if len({seq.seq_id for seq in seqs}) != len(seqs) or any(
            s.finished or s.prefilling for s in seqs
        ):
            raise ValueError("step_many takes distinct unfinished sequences, prefilled")
        marks = [_Mark.of(seq) for seq in seqs]
        try:
            return self._step_many(seqs)
        except BaseException:
            for seq, mark in zip(seqs, marks, strict=True):
                self._rollback(seq, mark)
            raise

    def step_isolated(
        self, seqs: list[Sequence]
    ) -> list[list[int] | StepFailed | BackendUnavailable]:
        """``step_many``, confining a failure to the sequences that cause it.

        A failed batched step leaves every sequence as it was, so the batch is halved
        and each half stepped again, down to the sequences that fail on their own: each
        of those gets a ``StepFailed`` (and stays as it was, for the caller to release),
        or the ``BackendUnavailable`` it met (a remote target away: UNAVAILABLE, not the
        request's fault), the others take their step exactly as they would have. One bad
        sequence in a batch of B costs about 2 log2(B) more forwards."""
        try:
            return list(self.step_many(seqs))
        except Exception as exc:  # noqa: BLE001 - any failure is confined, then reported
            if len(seqs) == 1:
                if isinstance(exc, BackendUnavailable):
                    return [exc]  # the target is away, not this request at fault: retryable
                # The message names the error's type only; the cause (chained) is logged.
                failed = StepFailed(
                    f"the engine failed on this request ({type(exc).__name__}); "
                    "the other requests went on"
                )
                failed.__cause__ = exc
                return [failed]
        half = len(seqs) // 2
        return self.step_isolated(seqs[:half]) + self.step_isolated(seqs[half:])

    def _rollback(self, seq: Sequence, mark: _Mark) -> None:
        """Put a sequence back as ``mark`` saw it: its output, stop state, stats and
        sampling generator; the target's cache (and recorded hidden states) cut back to
        ``prompt + output[:-1]`` (rows appended past it, rejected tree branches and
        half-done forwards included: the prefix itself is never rewritten); the
        policy's plan and its drafters' state past the accepted context."""
        mark.restore(seq)
        self.target.truncate(seq.seq_id, len(seq.prompt) + len(seq.output) - 1)
        self.policy.rollback(seq.seq_id, seq.prompt + seq.output)

    def _step_many(self, seqs: list[Sequence]) -> list[list[int]]:
        t0 = time.perf_counter()
        drafts = self._draft(seqs)
        t1 = time.perf_counter()
        width, outcomes = self._verify(seqs, [draft for _, draft in drafts])
        t2 = time.perf_counter()
        share = len(seqs)
        added_all = [
            self._commit(seq, name, draft, path, bonus, (t1 - t0) / share, (t2 - t1) / share)
            for seq, (name, draft), (path, bonus) in zip(seqs, drafts, outcomes, strict=True)
        ]
        # The policy learns last: a step that fails before here taught it nothing.
        # A batched forward pads every row to the widest: that is the size it cost.
        self.policy.observe_verify(width * len(seqs), t2 - t1, len(seqs))
        for seq, (name, draft), (path, _) in zip(seqs, drafts, outcomes, strict=True):
            self.policy.observe(seq.seq_id, name, draft, path)
        return added_all

    def _verify(
        self, seqs: list[Sequence], drafts: list[DraftTree]
    ) -> tuple[int, list[tuple[list[int], int]]]:
        """One target forward over every sequence's [pending token] + draft; each
        accepts its path and its cache keeps just the verified prefix (prompt + output,
        its pending token included, + the accepted nodes). Sampled sequences on a
        target without exact rows are verified by the target itself, in one more call.
        Returns the forward's width (the longest row) and, per sequence, (accepted
        nodes, the target's own token)."""
        by_rows = [i for i, seq in enumerate(seqs) if not self._sampled_by_target(seq)]
        by_target = [i for i, seq in enumerate(seqs) if self._sampled_by_target(seq)]
        outcomes: dict[int, tuple[list[int], int]] = {}
        if by_rows:
            items = [
                ForwardItem(
                    seqs[i].seq_id,
                    [seqs[i].output[-1], *drafts[i].tokens],
                    [-1, *(p + 1 for p in drafts[i].chain_parents())]
                    if drafts[i].is_tree else None,
                )
                for i in by_rows
            ]  # fmt: skip
            for i, logits in zip(by_rows, self.target.forward_many(items), strict=True):
                outcomes[i] = self._accept_path(seqs[i], drafts[i], logits)
        if by_target:
            done = self._sample_many(
                [seqs[i] for i in by_target],
                [[seqs[i].output[-1], *drafts[i].tokens] for i in by_target],
                [drafts[i] for i in by_target],
            )
            for i, (accepted, token) in zip(by_target, done, strict=True):
                outcomes[i] = (list(range(accepted)), token)
        for i, (seq, draft) in enumerate(zip(seqs, drafts, strict=True)):
            self._keep_verified(seq, draft, outcomes[i][0])
        return 1 + max(len(d.tokens) for d in drafts), [outcomes[i] for i in range(len(seqs))]

    def _keep_verified(self, seq: Sequence, draft: DraftTree, path: list[int]) -> None:
        """Cut the target's cache back to prompt + output (its pending token included)
        + the accepted draft nodes."""
        prefix = len(seq.prompt) + len(seq.output) - 1
        if draft.is_tree:
            self.target.keep(seq.seq_id, prefix, [0, *(j + 1 for j in path)])
        else:
            self.target.truncate(seq.seq_id, prefix + 1 + len(path))

    def _sampled_by_target(self, seq: Sequence) -> bool:
        """Whether the target verifies this sequence's drafts itself: a sampled request
        on a backend whose rows are not its distribution (``exact_logits`` False)."""
        return not seq.params.greedy and not self.target.capabilities.exact_logits

    def _sample_many(
        self, seqs: list[Sequence], tokens: list[list[int]], drafts: list[DraftTree]
    ) -> list[tuple[int, int]]:
        """Append ``tokens`` to each sequence, the last of them its draft chain, and let
        the target verify the drafts by its own sampling (one call for all)."""
        target = cast(SamplingTarget, self.target)
        items = []
        for seq, toks, draft in zip(seqs, tokens, drafts, strict=True):
            if seq.generator is None or draft.is_tree:
                raise AssertionError("sampled sequences have a generator and chain drafts")
            probs = draft.probs
            if probs is not None:
                probs = match_vocab(probs[: len(draft.tokens)], self.target.vocab_size)
            items.append(SampledItem(
                seq.seq_id, toks, len(draft.tokens), probs, seq.params, seq.generator
            ))  # fmt: skip
        return target.verify_sampled_many(items)

    def _commit(
        self,
        seq: Sequence,
        name: str,
        draft: DraftTree,
        path: list[int],
        bonus: int,
        draft_s: float,
        verify_s: float,
    ) -> list[int]:
        """Record the step and add its accepted tokens and the target's own to the
        output, up to where the output ends; return the tokens added."""
        seq.steps.append(StepStats(
            speculator=name if draft.tokens else "none",
            drafted=len(draft.tokens),
            accepted=len(path),
            draft_s=draft_s,
            verify_s=verify_s,
        ))  # fmt: skip
        added: list[int] = []
        for token in [*(draft.tokens[i] for i in path), bonus]:
            added.append(token)
            if seq.stop.add(token):
                break
        return added

    def _draft(self, seqs: list[Sequence]) -> list[tuple[str, DraftTree]]:
        """Ask the policy for each sequence's draft (none where no room is left)."""
        drafts: list[tuple[str, DraftTree]] = [("none", DraftTree.empty()) for _ in seqs]
        requests, where = [], []
        for i, seq in enumerate(seqs):
            # The target always adds one token of its own, so draft at most remaining - 1.
            lookahead = min(self.lookahead, seq.params.max_tokens - len(seq.output) - 1)
            if lookahead > 0:
                requests.append(DraftRequest(
                    seq.seq_id, seq.prompt + seq.output, lookahead, seq.params, seq.generator,
                    trees=seq.params.greedy and self.target.capabilities.verifies_trees,
                ))  # fmt: skip
                where.append(i)
        if requests:
            planned = self.policy.draft_many(requests, batch_size=len(seqs))
            for i, request, (name, draft) in zip(where, requests, planned, strict=True):
                drafts[i] = (name, self._kept(name, draft, request))
        return drafts

    def _kept(self, name: str, draft: DraftTree, request: DraftRequest) -> DraftTree:
        """The draft if it keeps its request's contract, else none: a drafter's bug may
        cost a step its speculation, never a token (the target verifies nothing it
        cannot, and a token outside its vocabulary would index out of its logits)."""
        problem = draft_breach(draft, request, self.target.vocab_size)
        if problem is None:
            return draft
        log.error("speculator %s broke its draft contract (%s): draft dropped", name, problem)
        return DraftTree.empty()

    def _accept_path(
        self, seq: Sequence, draft: DraftTree, logits: torch.Tensor
    ) -> tuple[list[int], int]:
        """The accepted draft nodes (root to leaf) and the target's own next token."""
        if draft.is_tree and not seq.params.greedy:
            raise AssertionError("sampled drafts are chains (DraftRequest.trees)")
        return verify(draft, logits, seq.params, seq.generator)

    def release(self, seq: Sequence) -> None:
        """Free the sequence's caches (speculators, then target); safe to call twice.

        Speculators go first: a learning drafter may still read the target's recorded
        hidden states of the finished sequence."""
        self.policy.release(seq.seq_id)
        self.target.release(seq.seq_id)

    def _accept(self, seq: Sequence, draft: DraftTree, logits: torch.Tensor) -> tuple[int, int]:
        path, bonus = verify(draft, logits, seq.params, seq.generator)
        return len(path), bonus


def draft_breach(draft: DraftTree, request: DraftRequest, vocab: int) -> str | None:
    """What in ``draft`` breaks its request's contract (``Drafter``), or None."""
    if len(draft.tokens) > request.lookahead:
        return f"{len(draft.tokens)} nodes for a lookahead of {request.lookahead}"
    if draft.is_tree and not request.trees:
        return "a tree where a chain was asked for"
    if any(not 0 <= token < vocab for token in draft.tokens):
        return "a token outside the target's vocabulary"
    return None

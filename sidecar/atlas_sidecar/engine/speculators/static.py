"""The static speculator: a smaller draft model of the target's tokenizer family.

It keeps its own KV cache per sequence and re-syncs it from the sequence's context on
every call, so it needs no notification of what the target accepted: the common
prefix of its cache and the context survives, the rest is recomputed.
"""

from __future__ import annotations

import time

import torch

from atlas_sidecar.engine.backends.base import ForwardItem
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.backends.vocab import DraftVocabulary
from atlas_sidecar.engine.capabilities import STATIC
from atlas_sidecar.engine.sampling import probs_from_logits
from atlas_sidecar.engine.speculators.base import DraftRequest
from atlas_sidecar.engine.tree import DraftTree


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


STEADY_SYNC_TOKENS = 33  # a step's accepted tokens (lookahead 32) plus the target's own


class StaticSpeculator:
    name = "static"
    capabilities = STATIC

    def __init__(self, runner: CausalLMRunner) -> None:
        self.runner = runner
        runner.use_lean_decoder()  # a draft model's forward, where it has one (``lean.py``)
        # Its own draft vocabulary (``vocab.py``), learned from the contexts it is given.
        self.vocabulary = DraftVocabulary(
            runner.model.get_output_embeddings(), runner.vocab_size, runner.eos_token_ids
        )
        self._cached_tokens: dict[str, list[int]] = {}
        self._typical_cost: float | None = None  # recent seconds per drafted token

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        """Draft for every request together: one batched draft forward per token."""
        live = [r for r in requests if r.lookahead > 0 and r.context]
        drafts = {r.seq_id: _Growing() for r in live}
        shares: list[float] = []  # per draft forward: its seconds / sequences in it
        catch_up: list[float] = []  # per long catch-up: its seconds per token fed
        logits = self._sync(live, shares, catch_up)
        while live:
            still = []
            for request, row in zip(live, logits, strict=True):
                draft = drafts[request.seq_id]
                draft.add(row, request)
                stop_early = request.stop is not None and not request.stop.keep_going(
                    draft.confidences
                )
                if len(draft.tokens) < request.lookahead and not stop_early:
                    still.append(request)  # the last draft token need not be fed
            live = still
            if live:
                items = [ForwardItem(r.seq_id, [drafts[r.seq_id].tokens[-1]]) for r in live]
                started = time.perf_counter()
                logits = [out[-1] for out in self._forward(items)]
                shares.append((time.perf_counter() - started) / len(items))
                for r in live:
                    self._cached_tokens[r.seq_id].append(drafts[r.seq_id].tokens[-1])
        # A call that only caught its caches up (one drafted token each) measured no
        # steady step: it reports the recent cost, not the catch-up's. Before any step
        # was measured, the catch-up's cost per token fed: a lower bound, which drafting
        # more soon corrects (the whole call's time, a prompt's prefill billed to one
        # drafted token, would make the drafter look too dear ever to be asked again).
        cost = self._typical_cost
        if cost is None and catch_up:
            cost = min(catch_up)
        if shares:
            cost = sum(shares) / len(shares)
            old = self._typical_cost
            self._typical_cost = cost if old is None else old + 0.2 * (cost - old)
        return [
            drafts[r.seq_id].done(cost) if r.seq_id in drafts else DraftTree.empty()
            for r in requests
        ]

    def _sync(
        self, requests: list[DraftRequest], shares: list[float], catch_up: list[float]
    ) -> list[torch.Tensor]:
        """Bring each draft cache up to its context; return the logits after its last token.

        In steady state this feeds the last step's accepted tokens, at about the cost of
        one decode step, and counts as one in ``shares``. A longer catch-up (the whole
        prompt at first, or the tokens since this sequence last drafted here) is paid
        once, not per drafted token, so it is not (``catch_up`` gets its seconds per
        token fed); and it runs on its own, so that the other sequences are not padded
        to its length."""
        items = []
        for request in requests:
            seq_id, context = request.seq_id, request.context
            cached = self._cached_tokens.get(seq_id)
            if cached is None:
                self.runner.start(seq_id)
                cached = []
            # Keep at least one token to feed: we need fresh logits for the last position.
            keep = min(common_prefix_len(cached, context), len(context) - 1)
            self.runner.truncate(seq_id, keep)
            self._cached_tokens[seq_id] = list(context)
            items.append(ForwardItem(seq_id, context[keep:]))
        for item in items:
            self.vocabulary.learn(item.tokens)
        logits: dict[str, torch.Tensor] = {}
        steady = [item for item in items if len(item.tokens) <= STEADY_SYNC_TOKENS]
        for item in items:
            if len(item.tokens) > STEADY_SYNC_TOKENS:
                started = time.perf_counter()
                logits[item.seq_id] = self._forward([item])[0][-1]
                catch_up.append((time.perf_counter() - started) / len(item.tokens))
        if steady:
            started = time.perf_counter()
            for item, out in zip(steady, self._forward(steady), strict=True):
                logits[item.seq_id] = out[-1]
            shares.append((time.perf_counter() - started) / len(steady))
        return [logits[item.seq_id] for item in items]

    def _forward(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        """Each item's logits after its last token only (all a drafter reads)."""
        return self.runner.forward_many(items, self.vocabulary, last_only=True)

    def observe_context(self, seq_id: str, context: list[int]) -> None:
        """Nothing to learn: the draft model's weights are fixed; its caches catch up
        with the context when it is next asked to draft."""

    def rollback(self, seq_id: str, context: list[int]) -> None:
        """After a failed step: keep only the cached prefix of ``context`` that every
        layer really holds (a failed call may have recorded tokens its forward never
        finished, or started a cache it never recorded), so the next call re-syncs."""
        cached = self._cached_tokens.get(seq_id)
        if cached is None:
            self.runner.release(seq_id)
            return
        keep = min(common_prefix_len(cached, context), self.runner.cached_len(seq_id))
        self.runner.truncate(seq_id, keep)
        self._cached_tokens[seq_id] = cached[:keep]

    def release(self, seq_id: str) -> None:
        self._cached_tokens.pop(seq_id, None)
        self.runner.release(seq_id)


class _Growing:
    """A draft being built one token at a time."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.confidences: list[float] = []
        self.sampled_from: list[torch.Tensor] = []
        self.runners_up: list[tuple[int, float]] = []  # greedy only

    def add(self, logits: torch.Tensor, request: DraftRequest) -> None:
        if request.params.greedy:
            probs = logits.float().softmax(dim=-1)
            best = probs.topk(2)
            token = int(best.indices[0])
            self.runners_up.append((int(best.indices[1]), float(best.values[1])))
        else:
            probs = probs_from_logits(logits[None], request.params)[0]
            token = int(torch.multinomial(probs, 1, generator=request.generator))
            self.sampled_from.append(probs)
        self.tokens.append(token)
        self.confidences.append(float(probs[token]))

    def done(self, token_cost_s: float | None) -> DraftTree:
        probs = torch.stack(self.sampled_from) if self.sampled_from else None
        return DraftTree(
            self.tokens,
            self.confidences,
            probs,
            token_cost_s=token_cost_s,
            runners_up=self.runners_up or None,
        )

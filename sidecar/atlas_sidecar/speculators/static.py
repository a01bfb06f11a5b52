"""The static speculator: a smaller draft model of the target's tokenizer family.

It keeps its own KV cache per sequence and re-syncs it from the sequence's context on
every call, so it needs no notification of what the target accepted: the common
prefix of its cache and the context survives, the rest is recomputed.
"""

from __future__ import annotations

import torch

from atlas_sidecar.backends.torch_backend import CausalLMRunner
from atlas_sidecar.sampling import probs_from_logits
from atlas_sidecar.speculators.base import Draft, DraftRequest


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class StaticSpeculator:
    name = "static"

    def __init__(self, runner: CausalLMRunner) -> None:
        self.runner = runner
        self._cached_tokens: dict[str, list[int]] = {}

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [self._propose_one(r) for r in requests]

    def _sync(self, seq_id: str, context: list[int]) -> torch.Tensor:
        """Bring the draft cache up to ``context``; return the logits after its last token."""
        cached = self._cached_tokens.get(seq_id)
        if cached is None:
            self.runner.start(seq_id)
            cached = []
        # Keep at least one token to feed: we need fresh logits for the last position.
        keep = min(common_prefix_len(cached, context), len(context) - 1)
        self.runner.truncate(seq_id, keep)
        logits = self.runner.forward(seq_id, context[keep:])[-1]
        self._cached_tokens[seq_id] = list(context)
        return logits

    @torch.inference_mode()
    def _propose_one(self, request: DraftRequest) -> Draft:
        if request.lookahead <= 0 or not request.context:
            return Draft.empty()
        params = request.params
        logits = self._sync(request.seq_id, request.context)
        tokens: list[int] = []
        confidences: list[float] = []
        sampled_from: list[torch.Tensor] = []
        for step in range(request.lookahead):
            if params.greedy:
                probs = logits.float().softmax(dim=-1)
                token = int(probs.argmax())
            else:
                probs = probs_from_logits(logits[None], params)[0]
                token = int(torch.multinomial(probs, 1, generator=request.generator))
                sampled_from.append(probs)
            tokens.append(token)
            confidences.append(float(probs[token]))
            if request.keep_going is not None and not request.keep_going(confidences):
                break
            if step + 1 < request.lookahead:  # the last draft token need not be fed
                logits = self.runner.forward(request.seq_id, [token])[-1]
                self._cached_tokens[request.seq_id].append(token)
        draft_probs = torch.stack(sampled_from) if sampled_from else None
        return Draft(tokens=tokens, confidences=confidences, probs=draft_probs)

    def release(self, seq_id: str) -> None:
        self._cached_tokens.pop(seq_id, None)
        self.runner.release(seq_id)

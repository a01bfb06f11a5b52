"""Sampling parameters, logits -> probabilities, and lossless draft verification.

Greedy verification accepts the longest prefix of the draft that equals the target's
argmax. Sampled verification is standard speculative (rejection) sampling
(Leviathan et al. 2023, Chen et al. 2023): accept draft token x with probability
min(1, p(x)/q(x)), on rejection sample from norm(max(p - q, 0)); if every token is
accepted, sample one more from p. The output then follows the target's distribution
exactly, whatever the drafter proposed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from atlas_sidecar.errors import RequestError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# A sampled request's temperature lies in [MIN_TEMPERATURE, MAX_TEMPERATURE] (0 is
# greedy). The floor keeps logits / temperature finite: fp32 (and bf16, same exponent)
# overflows past ~3.4e38, and a tiny positive temperature (1e-300) turns every logit into
# +-inf and the softmax into NaN. At 0.01 a logit gap of 0.1 is already 22000:1, so the
# distribution is greedy in all but exact ties, and logits up to 3e36 still divide
# finitely. Anything below is refused with the range, not silently made greedy.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0
MAX_SEED = (1 << 64) - 1  # torch generators take an unsigned 64-bit seed


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; ``temperature == 0`` means greedy."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, max_new_tokens: int) -> None:
        """Raise RequestError naming the field; ``max_new_tokens`` is what the context allows."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise RequestError("max_tokens", f"must be a positive integer, got {self.max_tokens}")
        if self.max_tokens > max_new_tokens:
            raise RequestError(
                "max_tokens",
                f"{self.max_tokens} exceeds what the model's context leaves ({max_new_tokens})",
            )
        # Written so NaN fails every comparison and is refused too.
        if not (
            self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE
        ):
            raise RequestError(
                "temperature",
                f"must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}],"
                f" got {self.temperature}",
            )
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError("top_k", f"must be >= 0, got {self.top_k}")
        seed = self.seed
        if seed is not None and not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):
            raise RequestError("seed", f"must be in [0, 2**64 - 1], got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise RequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise RequestError("stop", f"stop strings must have 1..{MAX_STOP_CHARS} characters")


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[n, V] logits -> [n, V] float32 probabilities after temperature, top-k and top-p."""
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p (keeps at least one).
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def verify_greedy(draft: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """Return (number of draft tokens accepted, the target's next token after them)."""
    target_tokens = target_logits.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(draft) and draft[accepted] == target_tokens[accepted]:
        accepted += 1
    return accepted, target_tokens[accepted]


def verify_tree_greedy(
    draft: list[int], parents: list[int], target_logits: torch.Tensor
) -> tuple[list[int], int]:
    """Greedy acceptance down a draft tree: the path of nodes the target agrees with.

    ``target_logits`` has one row for the sequence's pending token, then one per draft
    node. Returns (accepted node indices root to leaf, the target's token after them).
    """
    target_tokens = target_logits.argmax(dim=-1).tolist()
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        children.setdefault(parent, []).append(i)
    path: list[int] = []
    current = -1
    while True:
        wanted = target_tokens[current + 1]
        nxt = next((c for c in children.get(current, []) if draft[c] == wanted), None)
        if nxt is None:
            return path, wanted
        path.append(nxt)
        current = nxt


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


def verify_sampled(
    draft: list[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Rejection-sample the draft against ``target_probs`` ([k+1, V]).

    ``draft_probs`` ([k, V]) is the distribution each draft token was drawn from; None
    means the drafter is deterministic (q is one-hot on the drafted token).
    """
    uniforms = torch.rand(len(draft), generator=generator, device=target_probs.device).tolist()
    for i, token in enumerate(draft):
        p = target_probs[i]
        q_token = 1.0 if draft_probs is None else float(draft_probs[i, token])
        if q_token > 0 and uniforms[i] * q_token < float(p[token]):
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[token] = 0.0
        else:
            residual = (p - draft_probs[i]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q: any rejection is impossible in exact math
            residual = p
        return i, _sample(residual / residual.sum(), generator)
    return len(draft), _sample(target_probs[len(draft)], generator)

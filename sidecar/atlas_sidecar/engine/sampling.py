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

import atlas_kernels
from atlas_sidecar.engine.tree import DraftTree
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


GREEDY = SamplingParams()


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


def match_vocab(probs: torch.Tensor, vocab: int) -> torch.Tensor:
    """Pad or cut a drafter's distributions to the target's vocabulary size (float32):
    a draft model's vocabulary may be padded differently from the target's."""
    if probs.shape[-1] == vocab:
        return probs.to(torch.float32)
    if probs.shape[-1] > vocab:
        return probs[..., :vocab].float()
    return torch.nn.functional.pad(probs.float(), (0, vocab - probs.shape[-1]))


def verify(
    draft: DraftTree,
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[list[int], int]:
    """Verify a draft against the target's ``logits`` (one row for the pending token,
    then one per draft node): (accepted node indices root to leaf, the target's next
    token).

    The one verification entry point; the acceptance rules live in ``atlas_kernels``
    (Triton on CUDA, the PyTorch reference elsewhere) so they are written once: greedy
    chains take the longest prefix equal to the target's argmax, greedy trees step to
    the lowest-indexed child equal to it, sampled chains are rejection-sampled.
    Sampled trees are refused: multi-branch rejection sampling is not implemented, and
    the engine reduces them to their main chain first.
    """
    logits = logits[: len(draft.tokens) + 1]
    tokens = torch.tensor(draft.tokens, dtype=torch.long, device=logits.device)
    if params.greedy:
        if draft.is_tree:
            parents = torch.tensor(draft.chain_parents(), dtype=torch.long, device=logits.device)
            num = torch.tensor([len(draft.tokens)], device=logits.device)
            path, length, bonus = atlas_kernels.tree_accept(
                logits[None], tokens[None], parents[None], num
            )
            return path[0, : int(length[0])].tolist(), int(bonus[0])
        num = torch.tensor([len(draft.tokens)], device=logits.device)
        accepted, bonus = atlas_kernels.greedy_accept(logits[None], tokens[None], num)
        return list(range(int(accepted[0]))), int(bonus[0])
    if draft.is_tree:
        raise ValueError("sampled verification takes a chain; reduce the tree to main_chain()")
    target_probs = probs_from_logits(logits, params)
    draft_probs = draft.probs
    if draft_probs is not None:
        draft_probs = match_vocab(draft_probs[: len(draft.tokens)], target_probs.shape[-1])
    accepted, token = atlas_kernels.rejection_sample(target_probs, draft_probs, tokens, generator)
    return list(range(accepted)), token


def verify_by_samples(draft: list[int], samples: list[int]) -> tuple[int, int]:
    """Sampled verification from the target's own draws: ``samples[k]`` drawn from the
    target's distribution after the pending token and ``draft[:k]`` (k = 0..len(draft)),
    independently of the draft. Accept while the draw equals the draft token; the first
    draw that differs (or the last) is the target's token. The output is then the
    target's draws, so it follows its distribution exactly whatever the drafter did; for
    a deterministic drafter (one-hot q) it is rejection sampling itself (accept x with
    probability p(x), else a token from p without x), for any other a lossless rule
    that accepts sum(p * q) instead of sum(min(p, q))."""
    if len(samples) != len(draft) + 1:
        raise ValueError(f"{len(draft)} draft tokens need {len(draft) + 1} draws")
    accepted = 0
    while accepted < len(draft) and samples[accepted] == draft[accepted]:
        accepted += 1
    return accepted, samples[accepted]


def verify_greedy(draft: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """Return (number of draft tokens accepted, the target's next token after them);
    a thin wrapper over ``verify`` for callers holding plain token lists."""
    path, bonus = verify(DraftTree(list(draft), []), target_logits, GREEDY, None)
    return len(path), bonus


def verify_tree_greedy(
    draft: list[int], parents: list[int], target_logits: torch.Tensor
) -> tuple[list[int], int]:
    """Greedy acceptance down a draft tree: (accepted nodes root to leaf, the target's
    token after them); a thin wrapper over ``verify``."""
    return verify(DraftTree(list(draft), [], parents=list(parents)), target_logits, GREEDY, None)


def verify_sampled(
    draft: list[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Rejection-sample the draft against ``target_probs`` ([k+1, V]); ``draft_probs``
    ([k, V]) or None for a deterministic drafter. A thin wrapper over
    ``atlas_kernels.rejection_sample`` for callers holding probabilities already."""
    tokens = torch.tensor(draft, dtype=torch.long, device=target_probs.device)
    return atlas_kernels.rejection_sample(
        target_probs[: len(draft) + 1], draft_probs, tokens, generator
    )

"""Other systems' speculative decoding, run on our target for ``atlas bench``.

Each peer decodes like an engine (``generate(prompt_ids, params) -> GenerationResult``)
with the same loaded target model, greedy only, so the bench can compare it with our
modes on the same prompts in the same run:

- ``hf_assisted``: Hugging Face assisted generation, ``generate(assistant_model=...)``
  with our draft model and HF's own defaults (20 assistant tokens, cut short when the
  assistant's confidence falls under 0.4);
- ``hf_prompt_lookup``: Hugging Face prompt lookup, ``prompt_lookup_num_tokens=10``;
- ``arctic_suffix``: Snowflake arctic-inference's suffix tree (vLLM's ``suffix``
  method), driven by a speculative loop over our target: a per-request tree of the
  prompt and a global tree of every earlier response, with the defaults of
  arctic-inference's vLLM plugin.

A peer that cannot run here raises ``PeerUnavailable`` with the reason when built.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.core import GenerationResult, StepStats, StopChecker
from atlas_sidecar.engine.sampling import SamplingParams, verify_greedy

PEERS = ("hf_assisted", "hf_prompt_lookup", "arctic_suffix")
NEEDS_DRAFT = frozenset({"hf_assisted"})

PROMPT_LOOKUP_TOKENS = 10

# arctic-inference's vLLM plugin defaults for the ``suffix`` method (its vllm/config.py:
# suffix_cache_max_depth, suffix_cache_max_requests, suffix_max_spec_factor,
# suffix_max_spec_offset, suffix_min_token_prob; 16 speculative tokens when unset).
ARCTIC_TREE_DEPTH = 64
ARCTIC_MAX_CACHED_REQUESTS = 100_000
ARCTIC_SPEC_TOKENS = 16
ARCTIC_MAX_SPEC_FACTOR = 1.0
ARCTIC_MAX_SPEC_OFFSET = 0.0
ARCTIC_MIN_TOKEN_PROB = 0.1

MAKE_PEERS_HINT = "run `make peers` (builds arctic-inference 0.3.0 from source into .venv)"

_request_ids = itertools.count()


class PeerUnavailable(RuntimeError):
    """A peer cannot run here (a missing package, no draft model); the message says why."""


class Decoder(Protocol):
    """What the bench drives: our engines and the peers alike."""

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult: ...


def build_peer(name: str, target: CausalLMRunner, draft: CausalLMRunner | None = None) -> Decoder:
    if name == "hf_assisted":
        if draft is None:
            raise PeerUnavailable("hf_assisted needs a draft model")
        return HFGenerate(target, name, assistant_model=draft.model)
    if name == "hf_prompt_lookup":
        return HFGenerate(target, name, prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS)
    if name == "arctic_suffix":
        return ArcticSuffix(target)
    raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")


def _require_greedy(params: SamplingParams) -> None:
    if not params.greedy or params.stop or params.ignore_eos:
        raise ValueError("peers run plain greedy decoding only (no stop strings, no ignore_eos)")


# -- Hugging Face generate(): assisted generation and prompt lookup -----------------


@dataclass
class _TargetCall:
    """One forward of the target inside ``generate``, seen by hooks."""

    cached: int  # tokens already in its KV cache
    fed: int  # tokens in this forward
    started: float
    ended: float = 0.0


class HFGenerate:
    """``target.model.generate(...)`` with HF's own speculation, greedy.

    Forward hooks on the target record each of its forwards (cache length, tokens fed,
    time), so the result has one ``StepStats`` per target forward like our engine's.
    HF's first forward prefills the prompt and verifies the first draft at once, so it
    counts as a verify step: accept_len = new tokens / target forwards.
    """

    def __init__(self, target: CausalLMRunner, name: str, **speculation: Any) -> None:
        self.target = target
        self.name = name
        self.speculation = speculation
        self.models = [target.model] + [m for m in [speculation.get("assistant_model")] if m]

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        _require_greedy(params)
        calls: list[_TargetCall] = []
        eos = sorted(self.target.eos_token_ids)
        started = time.perf_counter()
        with _clean_generation_configs(self.models), _record_calls(self.target.model, calls):
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.target.device)
            out = self.target.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=params.max_tokens,
                eos_token_id=eos,
                pad_token_id=eos[0] if eos else None,
                **self.speculation,
            )
        elapsed = time.perf_counter() - started
        tokens = out[0, len(prompt_ids) :].tolist()
        steps = _steps_from_calls(self.name, calls, len(prompt_ids), len(tokens), started)
        stop = StopChecker(self.target.tokenizer, params, self.target.eos_token_ids)
        for token in tokens:
            stop.add(token)
        return GenerationResult(
            token_ids=tokens,
            text=stop.final_text(),
            finish_reason=stop.finish_reason or "length",
            prompt_tokens=len(prompt_ids),
            prefill_s=0.0,  # merged into the first verify forward
            steps=steps,
            elapsed_s=elapsed,
        )


@contextmanager
def _clean_generation_configs(models: list[Any]) -> Iterator[None]:
    """Swap in a generation config holding only the special tokens while ``generate`` runs.

    A model's own config may carry sampling defaults (repetition_penalty, top_k...) that
    HF merges into every call; greedy must mean the target's plain argmax, as ours.
    """
    from transformers import GenerationConfig

    saved = [m.generation_config for m in models]
    try:
        for model, old in zip(models, saved, strict=True):
            model.generation_config = GenerationConfig(
                bos_token_id=old.bos_token_id,
                eos_token_id=old.eos_token_id,
                pad_token_id=old.pad_token_id,
            )
        yield
    finally:
        for model, old in zip(models, saved, strict=True):
            model.generation_config = old


@contextmanager
def _record_calls(model: torch.nn.Module, calls: list[_TargetCall]) -> Iterator[None]:
    def before(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        # transformers >= 5.24 passes the cache as ``cache`` (``past_key_values`` before).
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = int(cache.get_seq_length()) if cache is not None else 0
        fed = int(ids.shape[1]) if ids is not None else 0
        calls.append(_TargetCall(cached, fed, time.perf_counter()))

    def after(*_: Any) -> None:
        calls[-1].ended = time.perf_counter()

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _steps_from_calls(
    name: str, calls: list[_TargetCall], prompt_len: int, new_tokens: int, started: float
) -> list[StepStats]:
    """Per-forward drafted/accepted counts from the target's cache lengths.

    Between forwards HF crops the cache to everything but the newest token, so forward
    i+1 starts at sequence length ``cached + 1``; forward i gained the difference.
    """
    lengths = [prompt_len] + [c.cached + 1 for c in calls[1:]] + [prompt_len + new_tokens]
    steps = []
    previous_end = started
    for i, call in enumerate(calls):
        gained = lengths[i + 1] - lengths[i]
        drafted = call.fed - (lengths[i] - call.cached)
        if gained < 1 or drafted < 0:
            raise RuntimeError(f"{name}: unexpected target forwards {calls}")
        steps.append(
            StepStats(
                speculator=name if drafted else "none",
                drafted=drafted,
                accepted=gained - 1,
                draft_s=call.started - previous_end,
                verify_s=call.ended - call.started,
            )
        )
        previous_end = call.ended
    return steps


# -- arctic-inference suffix decoding over our target ---------------------------------


class ArcticSuffix:
    """vLLM's ``suffix`` method: arctic-inference's suffix trees draft, our target verifies.

    The loop is vLLM's (arctic-inference's ``model_runner``): a request starts with its
    prompt in a local tree and a slot in the global tree; every step speculates from the
    last ``ARCTIC_TREE_DEPTH`` tokens, verifies the chain in one target forward (greedy),
    and appends the sampled tokens (accepted + the target's own) to the request's
    response, which every later request then drafts from. ``speculate`` returns a chain
    here (vLLM does not ask for trees), verified as is.
    """

    name = "arctic_suffix"

    def __init__(self, target: CausalLMRunner) -> None:
        try:
            from arctic_inference.suffix_decoding import SuffixDecodingCache
        except ImportError as exc:
            raise PeerUnavailable(
                f"arctic-inference is not installed ({exc}); {MAKE_PEERS_HINT}"
            ) from exc
        self.target = target
        self.cache = SuffixDecodingCache(
            max_tree_depth=ARCTIC_TREE_DEPTH, max_cached_requests=ARCTIC_MAX_CACHED_REQUESTS
        )

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        _require_greedy(params)
        target, cache = self.target, self.cache
        request_id = f"bench-{next(_request_ids)}"
        started = time.perf_counter()
        stop = StopChecker(target.tokenizer, params, target.eos_token_ids)
        steps: list[StepStats] = []
        target.start(request_id)
        cache.start_request(request_id, prompt_ids)
        try:
            first = int(target.forward(request_id, prompt_ids)[-1].argmax())
            prefill_s = time.perf_counter() - started
            stop.add(first)
            cache.add_active_response(request_id, [first])
            while stop.finish_reason is None:
                output = stop.tokens
                t0 = time.perf_counter()
                # The target adds one token of its own: draft at most what is left but one.
                room = min(ARCTIC_SPEC_TOKENS, params.max_tokens - len(output) - 1)
                draft = self._draft(request_id, prompt_ids + output, room) if room > 0 else []
                t1 = time.perf_counter()
                logits = target.forward(request_id, [output[-1], *draft])
                accepted, bonus = verify_greedy(draft, logits)
                target.truncate(request_id, len(prompt_ids) + len(output) + accepted)
                t2 = time.perf_counter()
                steps.append(StepStats(self.name if draft else "none", len(draft), accepted,
                                       t1 - t0, t2 - t1))  # fmt: skip
                added = []
                for token in [*draft[:accepted], bonus]:
                    added.append(token)
                    if stop.add(token):
                        break
                cache.add_active_response(request_id, added)
        finally:
            cache.stop_request(request_id)
            target.release(request_id)
        return GenerationResult(
            token_ids=list(stop.tokens),
            text=stop.final_text(),
            finish_reason=stop.finish_reason or "length",
            prompt_tokens=len(prompt_ids),
            prefill_s=prefill_s,
            steps=steps,
            elapsed_s=time.perf_counter() - started,
        )

    def _draft(self, request_id: str, context: list[int], room: int) -> list[int]:
        result = self.cache.speculate(
            request_id,
            context[-ARCTIC_TREE_DEPTH:],
            max_spec_tokens=room,
            max_spec_factor=ARCTIC_MAX_SPEC_FACTOR,
            max_spec_offset=ARCTIC_MAX_SPEC_OFFSET,
            min_token_prob=ARCTIC_MIN_TOKEN_PROB,
            use_tree_spec=False,
        )
        # A chain has parents -1, 0, 1, ...; keep that prefix should a tree ever come back.
        chain = []
        for i, (token, parent) in enumerate(zip(result.token_ids, result.parents, strict=True)):
            if parent != i - 1:
                break
            chain.append(int(token))
        return chain[:room]

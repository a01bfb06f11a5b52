"""Turn an atlas.v1 GenerateRequest into engine inputs, refusing anything out of bounds.

Everything that can be checked without the tokenizer is checked here, on the event
loop, so a bad request is refused before it takes a queue slot. Errors are
``RequestError`` naming the API field (``sampling.top_p``, ``messages[2].role``).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from atlas_sidecar.engine.sampling import MAX_STOP_STRINGS, SamplingParams
from atlas_sidecar.errors import RequestError
from atlas_sidecar.serving.proto import atlas_v1_pb2 as pb

DEFAULT_MAX_TOKENS = 128
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_REQUEST_ID_CHARS = 128

# The engine names sampling fields bare; the API nests them under ``sampling``.
_API_FIELD = {
    name: f"sampling.{name}"
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
}


@dataclass(frozen=True)
class Limits:
    """Bounds on one request. The gRPC message size cap comes on top of these."""

    max_prompt_chars: int = 100_000  # text, or the sum of all message contents
    max_prompt_tokens: int = 8192  # after tokenization; the model's context may be smaller
    max_messages: int = 256
    max_tokens: int = 4096  # new tokens per request


@dataclass(frozen=True)
class PromptInput:
    """Exactly one of the three ways to give a prompt; ``field`` names which."""

    field: str
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ParsedRequest:
    request_id: str
    prompt: PromptInput
    params: SamplingParams


def api_field(engine_field: str, prompt_field: str) -> str:
    """Map a field named by the engine to the API's name for it."""
    if engine_field == "prompt":
        return prompt_field
    if engine_field == "prompt_token_ids":
        return "prompt_token_ids"
    return _API_FIELD.get(engine_field, engine_field)


def parse_generate_request(request: pb.GenerateRequest, limits: Limits) -> ParsedRequest:
    return ParsedRequest(
        request_id=_request_id(request.request_id),
        prompt=_prompt(request, limits),
        params=_sampling(request.sampling, limits),
    )


def _request_id(given: str) -> str:
    if not given:
        return uuid.uuid4().hex[:16]
    if len(given) > MAX_REQUEST_ID_CHARS or not given.isprintable():
        raise RequestError(
            "request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable characters"
        )
    return given


def _prompt(request: pb.GenerateRequest, limits: Limits) -> PromptInput:
    which = request.WhichOneof("input")
    if which == "prompt":
        text = request.prompt
        if not text.strip():
            raise RequestError("prompt", "must not be empty")
        if len(text) > limits.max_prompt_chars:
            raise RequestError(
                "prompt", f"{len(text)} characters exceed the limit of {limits.max_prompt_chars}"
            )
        return PromptInput("prompt", text=text)
    if which == "messages":
        return PromptInput("messages", messages=_messages(request.messages.messages, limits))
    if which == "prompt_token_ids":
        ids = tuple(request.prompt_token_ids.ids)
        if not ids:
            raise RequestError("prompt_token_ids", "must not be empty")
        if len(ids) > limits.max_prompt_tokens:
            raise RequestError(
                "prompt_token_ids",
                f"{len(ids)} tokens exceed the limit of {limits.max_prompt_tokens}",
            )
        if min(ids) < 0:
            raise RequestError("prompt_token_ids", "token ids must not be negative")
        return PromptInput("prompt_token_ids", token_ids=ids)
    raise RequestError("input", "one of prompt, messages or prompt_token_ids is required")


def _messages(messages: list[pb.ChatMessage], limits: Limits) -> tuple[tuple[str, str], ...]:
    if not messages:
        raise RequestError("messages", "must hold at least one message")
    if len(messages) > limits.max_messages:
        raise RequestError(
            "messages", f"{len(messages)} messages exceed the limit of {limits.max_messages}"
        )
    total = 0
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise RequestError(
                f"messages[{i}].role", f"must be one of {', '.join(sorted(CHAT_ROLES))}"
            )
        total += len(message.content)
    if total > limits.max_prompt_chars:
        raise RequestError(
            "messages", f"{total} characters exceed the limit of {limits.max_prompt_chars}"
        )
    if not any(m.content.strip() for m in messages):
        raise RequestError("messages", "every message is empty")
    return tuple((m.role, m.content) for m in messages)


def _sampling(sampling: pb.SamplingParams, limits: Limits) -> SamplingParams:
    max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    top_p = sampling.top_p if sampling.HasField("top_p") else 1.0
    if max_tokens > limits.max_tokens:
        raise RequestError(
            "sampling.max_tokens", f"{max_tokens} exceeds the server's limit of {limits.max_tokens}"
        )
    # Checked before building the tuple: the engine's own check comes after.
    if len(sampling.stop) > MAX_STOP_STRINGS:
        raise RequestError("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings")
    for name, value in (("temperature", sampling.temperature), ("top_p", top_p)):
        if not math.isfinite(value):
            raise RequestError(f"sampling.{name}", f"must be a finite number, got {value}")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=sampling.temperature,
        top_p=top_p,
        top_k=sampling.top_k,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(sampling.stop),
        ignore_eos=sampling.ignore_eos,
    )
    try:
        params.validate(max_new_tokens=limits.max_tokens)
    except RequestError as exc:
        raise RequestError(api_field(exc.field, "prompt"), _reason(exc)) from None
    return params


def _reason(exc: RequestError) -> str:
    """The message of a RequestError without its ``field: `` prefix."""
    text = str(exc)
    prefix = f"{exc.field}: "
    return text[len(prefix) :] if text.startswith(prefix) else text

"""The target model behind an SGLang server: the sidecar drafts, SGLang verifies.

SGLang keeps the KV cache itself (a radix cache keyed by token prefix), so this backend
keeps only each sequence's token list: what it calls "cached" is the prefix SGLang has
seen. A verify forward of new tokens ``t[P:P+n]`` after a cached prefix ``t[:P]`` is one
native ``POST /generate`` (several sequences: one call with lists):

    {"input_ids": t[:P+n], "return_logprob": true, "logprob_start_len": P,
     "top_logprobs_num": 1,
     "sampling_params": {"max_new_tokens": 1, "temperature": 0, "top_k": 1,
                         "ignore_eos": true, "skip_special_tokens": false}}

SGLang matches its cached prefix up to ``logprob_start_len`` at most and computes the
rest. Its ``meta_info.input_top_logprobs`` then has n entries: entry 0 is None, entry k
(k >= 1) is the top-1 ``[logprob, token_id, text]`` of the distribution after position
``P + k - 1``; the one generated token (``output_ids[0]``, with
``meta_info.output_top_logprobs[0]``) is the greedy choice after the last position
``P + n - 1``. That is the target's choice after each of the n new tokens: exactly what
greedy verification needs.

The rows returned are not logits: each holds the chosen token's logprob and -inf
elsewhere, so only the argmax is meaningful (``capabilities.exact_logits`` and
``exact_sampling`` are False). The engine therefore refuses sampled requests on this
backend rather than sample from a wrong distribution, and reduces tree drafts to their
main chain (``capabilities.verifies_trees`` is False): SGLang's /generate verifies one
token path per request, not a tree.

Faults: every call has a timeout and idempotent calls (all of them: a greedy
one-token generate on a given prefix answers the same) are retried a bounded number of
times on connection failures. A call that still fails raises ``SGLangUnavailable`` (a
``BackendUnavailable``, which the server answers with UNAVAILABLE); no token is ever
made up. The sequences of a call SGLang did not answer fail fast from then on (until
released): the scheduler's one-by-one retry of a failed batch would otherwise wait out
the timeout once per sequence. A call SGLang refused (``SGLangError``, e.g. HTTP 400)
leaves its sequences as they were, so that retry finds the one at fault.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import torch

from atlas_sidecar.engine.backends.base import ForwardItem
from atlas_sidecar.engine.capabilities import TargetCapabilities
from atlas_sidecar.errors import BackendUnavailable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 2
HEALTH_TIMEOUT_S = 600.0
# A fixed text the sidecar's tokenizer and SGLang's must split the same way.
TOKENIZER_PROBE = "def quicksort(xs):\n    return sorted(xs)  # Grüße, 世界! 12345\n"


class SGLangUnavailable(BackendUnavailable):
    """SGLang did not answer (down, restarting, too slow) within the bounded retries."""


class SGLangError(RuntimeError):
    """SGLang answered, but not as this backend expects (a refused request, a bad shape)."""


@dataclass(frozen=True)
class TargetSpec:
    """What the sidecar knows of the target without its weights: from ``--target``."""

    tokenizer: Any
    vocab_size: int
    max_context: int
    eos_token_ids: frozenset[int]


def target_spec(ref: str) -> TargetSpec:
    """The target's tokenizer, vocabulary size, context and EOS ids, from its config
    files only (no weights are loaded: SGLang holds the model)."""
    import os

    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from atlas_sidecar import models

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    location, gguf_file = models.resolve(ref)
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    config = AutoConfig.from_pretrained(location, **kwargs)
    text = config.get_text_config()
    eos: set[int] = set()
    sources: list[Any] = [config, tokenizer]
    try:
        sources.insert(0, GenerationConfig.from_pretrained(location, **kwargs))
    except OSError:
        pass  # no generation_config.json: the config's and tokenizer's EOS
    for source in sources:
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, list | tuple):
            eos.update(int(v) for v in value)
    return TargetSpec(
        tokenizer=tokenizer,
        vocab_size=int(getattr(text, "vocab_size", 0) or len(tokenizer)),
        max_context=int(getattr(text, "max_position_embeddings", 0) or 32768),
        eos_token_ids=frozenset(eos),
    )


class SGLangBackend:
    """A ``TargetBackend`` over SGLang's native HTTP API, for greedy chains."""

    # SGLang verifies one token path per request, its rows carry the target's argmax
    # only (greedy requests only), and its hidden states live in another process.
    capabilities = TargetCapabilities(
        verifies_trees=False, exact_logits=False, exact_sampling=False, exposes_features=False
    )

    def __init__(
        self,
        url: str,
        spec: TargetSpec,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--sglang-url must be http://host:port, got {url!r}")
        self.url = f"http://{parts.hostname}:{parts.port or 80}"
        self._host, self._port = parts.hostname, parts.port or 80
        self.tokenizer = spec.tokenizer
        self.vocab_size = spec.vocab_size
        self.max_context = spec.max_context
        self.eos_token_ids = spec.eos_token_ids
        self.device = torch.device("cpu")
        self.timeout_s = timeout_s
        self.retries = retries
        self._tokens: dict[str, list[int]] = {}
        self._poisoned: set[str] = set()
        self._local = threading.local()
        self.calls = 0  # /generate calls made (tests and overhead figures read it)

    # -- start-up --------------------------------------------------------------------

    def wait_ready(self, timeout_s: float = HEALTH_TIMEOUT_S, poll_s: float = 1.0) -> None:
        """Wait for SGLang's ``GET /health`` (it loads the model first), then check that
        it serves the sidecar's model: drafts are token ids, so both must tokenize alike.
        A ``--context-length`` SGLang was started with (``/get_server_info``'s
        ``context_length``) lowers ``max_context``, so requests it would refuse are
        refused here first, as INVALID_ARGUMENT."""
        deadline = time.monotonic() + timeout_s
        log.info("waiting up to %.0f s for SGLang at %s", timeout_s, self.url)
        last = "no answer yet"
        while True:
            try:
                status, _ = self._request("GET", "/health", None, timeout_s=min(10.0, timeout_s))
                if status == 200:
                    break
                last = f"HTTP {status}"
            except (OSError, http.client.HTTPException) as exc:
                last = repr(exc)
            if time.monotonic() >= deadline:
                raise SGLangUnavailable(
                    f"SGLang at {self.url} not healthy after {timeout_s:.0f} s ({last})"
                )
            time.sleep(poll_s)
        info = self._get_json("/get_model_info")
        log.info(
            "SGLang is up at %s: model %s (%s)",
            self.url, info.get("model_path"), info.get("architectures"),
        )  # fmt: skip
        self.check_model(info)
        server = self._get_json("/get_server_info")
        context = server.get("context_length") if isinstance(server, dict) else None
        if isinstance(context, int) and 0 < context < self.max_context:
            log.info("SGLang serves a context of %d tokens (the model's: %d)",
                     context, self.max_context)  # fmt: skip
            self.max_context = context

    def check_model(self, info: dict[str, Any]) -> None:
        """Refuse a server that would verify different tokens than the sidecar drafts."""
        if info.get("is_generation") is False:
            raise SGLangError(f"SGLang at {self.url} serves an embedding model, not a generator")
        status, body = self._request(
            "POST", "/tokenize", {"prompt": TOKENIZER_PROBE, "add_special_tokens": False}
        )
        if status != 200 or not isinstance(body, dict) or "tokens" not in body:
            raise SGLangError(f"SGLang at {self.url}: /tokenize answered HTTP {status}: {body}")
        ours = list(self.tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False))
        if list(body["tokens"]) != ours:
            raise SGLangError(
                f"tokenizer mismatch: SGLang ({info.get('model_path')}) splits the probe text "
                f"into {body['tokens'][:12]}..., the sidecar's --target into {ours[:12]}...; "
                "serve the same model on both sides"
            )
        for eos in sorted(self.eos_token_ids):
            piece = self.tokenizer.convert_ids_to_tokens(eos)
            status, body = self._request(
                "POST", "/tokenize", {"prompt": piece, "add_special_tokens": False}
            )
            if status != 200 or list(body.get("tokens", [])) != [eos]:
                raise SGLangError(
                    f"EOS mismatch: the sidecar's EOS {eos} ({piece!r}) is "
                    f"{body.get('tokens')} to SGLang ({info.get('model_path')})"
                )
        log.info("SGLang tokenizer matches the sidecar's (probe text and EOS %s)",
                 sorted(self.eos_token_ids))  # fmt: skip

    # -- TargetBackend ---------------------------------------------------------------

    def start(self, seq_id: str) -> None:
        if seq_id in self._tokens:
            raise ValueError(f"sequence {seq_id} already started")
        self._tokens[seq_id] = []

    def forward(self, seq_id: str, tokens: list[int]) -> torch.Tensor:
        return self.forward_many([ForwardItem(seq_id, tokens)])[0]

    def forward_many(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        """Append each item's tokens; rows [n, V] whose argmax is the target's greedy
        choice after each new token (all other entries -inf). One HTTP call."""
        if not items:
            return []
        for item in items:
            if item.parents is not None:
                raise ValueError("the SGLang backend verifies chains only")
            if item.seq_id in self._poisoned:
                raise SGLangUnavailable(f"sequence {item.seq_id}: an earlier SGLang call failed")
            if not item.tokens:
                raise ValueError("a forward needs at least one token")
        prefixes = [len(self._tokens[item.seq_id]) for item in items]
        inputs = [self._tokens[item.seq_id] + list(item.tokens) for item in items]
        body = {
            "input_ids": inputs,
            "return_logprob": True,
            "logprob_start_len": prefixes,
            "top_logprobs_num": 1,
            "sampling_params": [_GREEDY_ONE] * len(items),
        }
        try:
            answers = self._generate(body, len(items))
            rows = [
                self._rows(answer, len(item.tokens))
                for answer, item in zip(answers, items, strict=True)
            ]
        except SGLangUnavailable:
            # Down or too slow: a retry of these sequences one by one (the scheduler's
            # fallback) would wait out the timeout once per sequence.
            self._poisoned.update(item.seq_id for item in items)
            raise
        for item, full in zip(items, inputs, strict=True):
            self._tokens[item.seq_id] = full
        return rows

    def truncate(self, seq_id: str, length: int) -> None:
        tokens = self._tokens[seq_id]
        if not 0 <= length <= len(tokens):
            raise ValueError(f"cannot truncate {seq_id} of {len(tokens)} tokens to {length}")
        del tokens[length:]

    def keep(self, seq_id: str, prefix: int, path: list[int]) -> None:
        raise NotImplementedError("the SGLang backend verifies chains only")

    def cached_len(self, seq_id: str) -> int:
        return len(self._tokens[seq_id])

    def release(self, seq_id: str) -> None:
        self._tokens.pop(seq_id, None)
        self._poisoned.discard(seq_id)

    @property
    def live_sequences(self) -> int:
        return len(self._tokens)

    # -- the wire --------------------------------------------------------------------

    def _generate(self, body: dict[str, Any], count: int) -> list[dict[str, Any]]:
        self.calls += 1
        status, answer = self._call("POST", "/generate", body)
        if status != 200:
            message = answer.get("error", answer) if isinstance(answer, dict) else answer
            raise SGLangError(f"SGLang refused a verify call (HTTP {status}): {message}")
        if not isinstance(answer, list) or len(answer) != count:
            raise SGLangError(f"SGLang answered {type(answer).__name__}, not {count} results")
        return answer

    def _rows(self, answer: dict[str, Any], n: int) -> torch.Tensor:
        """[n, V]: row i has the target's choice after new token i at its logprob."""
        meta = answer.get("meta_info") or {}
        inputs = meta.get("input_top_logprobs")
        outputs = meta.get("output_top_logprobs")
        output_ids = answer.get("output_ids")
        if not (isinstance(inputs, list) and len(inputs) == n and outputs and output_ids):
            raise SGLangError(f"SGLang's answer lacks the logprobs asked for: {meta}")
        picks = [_top1(entry) for entry in inputs[1:]] + [_top1(outputs[0])]
        if picks[-1][1] != output_ids[0]:
            raise SGLangError(
                f"SGLang generated {output_ids[0]} but ranks {picks[-1][1]} first: not greedy"
            )
        rows = torch.full((n, self.vocab_size), -math.inf)
        for i, (logprob, token) in enumerate(picks):
            if not 0 <= token < self.vocab_size:
                raise SGLangError(f"SGLang chose token {token}, outside the vocabulary")
            rows[i, token] = logprob if math.isfinite(logprob) else 0.0
        return rows

    def _get_json(self, path: str) -> Any:
        status, body = self._call("GET", path, None)
        if status != 200:
            raise SGLangError(f"SGLang {path}: HTTP {status}: {body}")
        return body

    def _call(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """One idempotent call, retried on connection failures and 502/503/504 (bounded
        by ``retries`` and the timeout); a timeout is not retried (it would only wait
        longer than the caller's deadline)."""
        deadline = time.monotonic() + self.timeout_s
        failure = ""
        for attempt in range(self.retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                status, answer = self._request(method, path, body, timeout_s=left)
            except TimeoutError as exc:
                raise SGLangUnavailable(
                    f"SGLang at {self.url} did not answer {path} within {self.timeout_s:.1f} s"
                ) from exc
            except (OSError, http.client.HTTPException) as exc:
                failure = repr(exc)
            else:
                if status not in (502, 503, 504):
                    return status, answer
                failure = f"HTTP {status}"
            if attempt < self.retries:
                time.sleep(min(0.05 * 2**attempt, max(0.0, deadline - time.monotonic())))
        raise SGLangUnavailable(
            f"SGLang at {self.url} unavailable for {path} after {self.retries + 1} tries: {failure}"
        )

    def _request(
        self, method: str, path: str, body: Any, timeout_s: float | None = None
    ) -> tuple[int, Any]:
        """One HTTP exchange on this thread's keep-alive connection."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self._host, self._port)
            self._local.conn = conn
        conn.timeout = timeout_s or self.timeout_s
        if conn.sock is not None:
            conn.sock.settimeout(conn.timeout)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except BaseException:
            conn.close()
            self._local.conn = None
            raise
        if response.will_close:
            conn.close()
            self._local.conn = None
        kind = response.getheader("Content-Type") or ""
        return response.status, json.loads(raw) if "json" in kind and raw else raw.decode()


# One greedy token after the input: the target's choice after its last position.
_GREEDY_ONE = {
    "max_new_tokens": 1,
    "temperature": 0.0,
    "top_k": 1,
    "ignore_eos": True,
    "skip_special_tokens": False,
}


def _top1(entry: Any) -> tuple[float, int]:
    """``[[logprob, token_id, text]]`` (top_logprobs_num = 1) -> (logprob, token_id)."""
    if not entry or not isinstance(entry[0], list | tuple) or len(entry[0]) < 2:
        raise SGLangError(f"unexpected top-logprob entry from SGLang: {entry!r}")
    logprob, token = entry[0][0], entry[0][1]
    return (float(logprob) if logprob is not None else 0.0), int(token)

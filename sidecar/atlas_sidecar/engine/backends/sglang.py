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
elsewhere, so only the argmax is meaningful (``capabilities.exact_logits`` is False),
and the engine reduces tree drafts to their main chain (``capabilities.verifies_trees``
is False): SGLang's /generate verifies one token path per request, not a tree.

Sampled requests are verified by SGLang's own sampler (``verify_sampled_many``;
``capabilities.exact_sampling``). SGLang's input logprobs are of the raw logits
(``layers/logprob_processor.py``: ``InputLogprobProcessor`` takes a plain
``log_softmax``), so the tempered, filtered distribution it samples from cannot be
rebuilt from them short of the whole vocabulary at every position. Instead one call
for all of a step's sampled sequences (its greedy ones go in the call above) holds, per
sequence, a seeded one-token generate after the pending token and after each
draft token (``input_ids`` = prefix + [pending, *draft[:k]], the request's
temperature, top_p, top_k and a ``sampling_seed`` drawn from its generator):

- By default the draws are matched (``sampling.verify_by_samples``): accept while the
  draw equals the draft token, the first other draw is the target's token. The output
  is SGLang's draws, so it is exact for any drafter; for a deterministic one (q
  one-hot) it is rejection sampling itself.
- A drafter with probabilities and no top-p gets rejection sampling proper
  (``_by_ratio``), when SGLang's output logprobs are of the tempered softmax it
  samples from (``layers/sampler.py``: ``log(softmax(logits / T))``, unless the server
  sets ``SGLANG_RETURN_ORIGINAL_LOGPROB``; ``check_logprobs`` finds out at start-up):
  ``token_ids_logprob`` gives p(x) at each draft token, and with top-k,
  ``top_logprobs_num = top_k + 1`` gives the whole support to renormalize over. A
  rejection's residual is drawn from that support, or (no filter) SGLang's own draw
  there is kept with probability max(0, 1 - q(y)/p(y)), else more of its draws there,
  and else the whole distribution there is fetched (``_draw_residuals``). Top-p is
  left to matching: its kept set depends on the mass of every token above the cut.

A fresh seed per call matters: SGLang's deterministic mode derives a draw from the seed
and the position only.

Faults: every call has a timeout and idempotent calls (all of them: a greedy one-token
generate on a given prefix answers the same, and a sampled one whose answer was never
seen leaves no draw used) are retried a bounded number of times on connection
failures. A call that still fails raises ``SGLangUnavailable`` (a
``BackendUnavailable``, which the server answers with UNAVAILABLE); no token is ever
made up. The sequences of a call SGLang did not answer fail fast from then on (until
released): the scheduler's one-by-one retry of a failed batch would otherwise wait out
the timeout once per sequence. A call SGLang refused (``SGLangError``, e.g. HTTP 400)
leaves its sequences as they were, so that retry finds the one at fault.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import torch

from atlas_sidecar.engine.backends.base import ForwardItem, SampledItem
from atlas_sidecar.engine.backends.remote import (  # noqa: F401  (re-exported)
    TOKENIZER_PROBE,
    RemoteSequences,
    TargetSpec,
    target_spec,
)
from atlas_sidecar.engine.capabilities import TargetCapabilities
from atlas_sidecar.engine.sampling import SamplingParams, verify_by_samples
from atlas_sidecar.errors import BackendUnavailable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 2
HEALTH_TIMEOUT_S = 600.0
# Hot enough that tempered logprobs differ from raw ones by far more than rounding.
PROBE_TEMPERATURE = 10.0
# Each is kept with probability max(0, 1 - q/p): together they settle a rejection unless
# p and q nearly agree, which is when a rejection is rare (a full distribution is big).
RESIDUAL_CANDIDATES = 16


class SGLangUnavailable(BackendUnavailable):
    """SGLang did not answer (down, restarting, too slow) within the bounded retries."""


class SGLangError(RuntimeError):
    """SGLang answered, but not as this backend expects (a refused request, a bad shape)."""


def health(url: str, timeout_s: float = 10.0) -> str | None:
    """None when SGLang's ``GET /health`` answers 200 (its model is loaded and its
    scheduler alive), else why not, in a few words."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                      timeout=timeout_s)  # fmt: skip
    try:
        conn.request("GET", "/health")
        status = conn.getresponse().status
        return None if status == 200 else f"HTTP {status}"
    except (OSError, http.client.HTTPException) as exc:
        return repr(exc)
    finally:
        conn.close()


def wait_healthy(url: str, timeout_s: float = HEALTH_TIMEOUT_S, poll_s: float = 1.0) -> None:
    """Wait for SGLang's ``GET /health`` (200 once its model is loaded), at most
    ``timeout_s``; else ``SGLangUnavailable``. In a pod the sidecar waits here before it
    reads the target's tokenizer: SGLang downloads the model into the shared cache
    first, so until it is healthy the files may not be there."""
    deadline = time.monotonic() + timeout_s
    log.info("waiting up to %.0f s for SGLang at %s", timeout_s, url)
    while (last := health(url, min(10.0, timeout_s))) is not None:
        if time.monotonic() >= deadline:
            raise SGLangUnavailable(f"SGLang at {url} not healthy after {timeout_s:.0f} s ({last})")
        time.sleep(poll_s)


class SGLangBackend(RemoteSequences):
    """A ``TargetBackend`` over SGLang's native HTTP API: chains, greedy or sampled."""

    # SGLang verifies one token path per request, its rows carry the target's argmax
    # only (sampled drafts are verified by its sampler), and its hidden states live in
    # another process.
    capabilities = TargetCapabilities(
        verifies_trees=False, exact_logits=False, exact_sampling=True,
        exposes_features=False, remote=True,
    )  # fmt: skip

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
        RemoteSequences.__init__(self, spec)
        self._local = threading.local()
        self.calls = 0  # /generate calls made (tests and overhead figures read it)
        # Whether SGLang's output logprobs are of the tempered softmax it samples from
        # (``wait_ready`` checks); until known, drafts are verified by matching draws.
        self.tempered_logprobs = False
        # SGLang draws tried per open residual before its full distribution is fetched.
        self.residual_candidates = RESIDUAL_CANDIDATES

    # -- start-up --------------------------------------------------------------------

    def wait_ready(self, timeout_s: float = HEALTH_TIMEOUT_S, poll_s: float = 1.0) -> None:
        """Wait for SGLang's ``GET /health`` (it loads the model first), then check that
        it serves the sidecar's model: drafts are token ids, so both must tokenize alike.
        A ``--context-length`` SGLang was started with (``/get_server_info``'s
        ``context_length``) lowers ``max_context``, so requests it would refuse are
        refused here first, as INVALID_ARGUMENT."""
        wait_healthy(self.url, timeout_s, poll_s)
        info = self._get_json("/get_model_info")
        log.info(
            "SGLang is up at %s: model %s (%s)",
            self.url, info.get("model_path"), info.get("architectures"),
        )  # fmt: skip
        self.check_model(info)
        self.tempered_logprobs = self.check_logprobs()
        server = self._get_json("/get_server_info")
        context = server.get("context_length") if isinstance(server, dict) else None
        if isinstance(context, int) and 0 < context < self.max_context:
            log.info("SGLang serves a context of %d tokens (the model's: %d)",
                     context, self.max_context)  # fmt: skip
            self.max_context = context

    def probe(self, timeout_s: float) -> str | None:
        """None while SGLang is healthy, else why not (``RemoteTarget``)."""
        return health(self.url, timeout_s)

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

    def check_logprobs(self) -> bool:
        """Whether SGLang's output logprobs are of the tempered distribution it samples
        from, ``log(softmax(logits / T))`` (its default, ``layers/sampler.py``), not of
        the raw logits (a server run with ``SGLANG_RETURN_ORIGINAL_LOGPROB``): the
        top token after the probe text at temperature 10 must be far less likely
        than greedily. Without it, sampled drafts are verified by matching draws."""
        ids = list(self.tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False))
        hot = {**_GREEDY_ONE, "temperature": PROBE_TEMPERATURE, "top_k": -1}
        body = {
            "input_ids": [ids, ids],
            "return_logprob": True,
            "top_logprobs_num": 1,
            "sampling_params": [_GREEDY_ONE, hot],
        }
        greedy, tempered = self._generate(body, 2)
        raw = _top1(greedy["meta_info"]["output_top_logprobs"][0])
        scaled = _top1(tempered["meta_info"]["output_top_logprobs"][0])
        tempered_ok = raw[1] == scaled[1] and scaled[0] < raw[0] - 0.5
        if not tempered_ok:
            log.warning("SGLang's output logprobs are not tempered (%s, then %s at T=%g): "
                        "a drafter's probabilities go unused", raw, scaled, PROBE_TEMPERATURE)
        return tempered_ok

    def top2_gap(self, ids: list[int]) -> float | None:
        """The target's top-2 logit gap after ``ids`` (``RemoteTarget``): a logprob
        difference is the logit difference, so two output top logprobs give it."""
        body = {"input_ids": [list(ids)], "return_logprob": True, "top_logprobs_num": 2,
                "logprob_start_len": len(ids) - 1, "sampling_params": [_GREEDY_ONE]}  # fmt: skip
        top = _output_top(self._generate(body, 1)[0])
        if len(top) < 2:
            raise SGLangError(f"SGLang answered {len(top)} top logprobs, not 2")
        return float(top[0][0]) - float(top[1][0])

    # -- TargetBackend ---------------------------------------------------------------

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
            self._check(item.seq_id, item.tokens)
        prefixes = [len(self._tokens[item.seq_id]) for item in items]
        inputs = [self._tokens[item.seq_id] + list(item.tokens) for item in items]
        body = {
            "input_ids": inputs,
            "return_logprob": True,
            "logprob_start_len": prefixes,
            "top_logprobs_num": 1,
            "sampling_params": [_GREEDY_ONE] * len(items),
        }
        with self._failing_fast([item.seq_id for item in items]):
            answers = self._generate(body, len(items))
            rows = [
                self._rows(answer, len(item.tokens))
                for answer, item in zip(answers, items, strict=True)
            ]
        for item, full in zip(items, inputs, strict=True):
            self._tokens[item.seq_id] = full
        return rows

    def verify_sampled_many(self, items: list[SampledItem]) -> list[tuple[int, int]]:
        """Append each item's tokens and verify its draft against SGLang's own draws: a
        seeded one-token generate after each of the last ``drafted + 1`` tokens, all
        items in one HTTP call. A drafter's probabilities are used where SGLang's are
        exact (``_by_ratio``), else the draws are matched (``verify_by_samples``)."""
        if not items:
            return []
        for item in items:
            self._check(item.seq_id, item.tokens)
            if not 0 <= item.drafted < len(item.tokens) or item.params.greedy:
                raise ValueError("a sampled item has a sampled request and fewer drafted tokens")
        ratio = [self._ratio_exact(item) for item in items]
        body = self._sampled_body(items, ratio)
        results: list[tuple[int, int | None]] = []
        with self._failing_fast([item.seq_id for item in items]):
            answers = self._generate(body, len(body["input_ids"]))
            for item, exact in zip(items, ratio, strict=True):
                mine, answers = answers[: item.drafted + 1], answers[item.drafted + 1 :]
                draft = list(item.tokens[len(item.tokens) - item.drafted :])
                if exact:
                    results.append(_by_ratio(draft, item, mine))
                else:
                    results.append(verify_by_samples(draft, self._draws(mine)))
            self._draw_residuals(items, results)
        done = []
        for item, (accepted, token) in zip(items, results, strict=True):
            assert token is not None  # _draw_residuals drew every one left open
            self._tokens[item.seq_id] = self._tokens[item.seq_id] + list(item.tokens)
            done.append((accepted, token))
        return done

    def _sampled_body(self, items: list[SampledItem], ratio: list[bool]) -> dict[str, Any]:
        """The /generate body: per item, a one-token draw after each of its last
        ``drafted + 1`` tokens, with one fresh seed; where the ratio rule applies, the
        draws' logprobs, the draft token's (``token_ids_logprob``) and with top-k the
        top k + 1 (``top_logprobs_num``), never input logprobs."""
        inputs, params, asked, tops = [], [], [], []
        for item, exact in zip(items, ratio, strict=True):
            full = self._tokens[item.seq_id] + list(item.tokens)
            one = _sampled_one(item.params, _seed(item.generator))
            for k in range(item.drafted + 1):
                end = len(full) - item.drafted + k
                inputs.append(full[:end])
                params.append(one)
                asked.append([full[min(end, len(full) - 1)]])  # the draft token there
                tops.append(item.params.top_k + 1 if exact and item.params.top_k else 0)
        body: dict[str, Any] = {"input_ids": inputs, "sampling_params": params}
        if any(ratio):
            body.update(
                return_logprob=True, logprob_start_len=-1, token_ids_logprob=asked,
                top_logprobs_num=tops,
            )  # fmt: skip
        return body

    def _ratio_exact(self, item: SampledItem) -> bool:
        """Whether SGLang's logprobs give the probabilities it samples from for this
        item: its output logprobs are tempered (``tempered_logprobs``, checked at
        start-up) and no top-p filter applies (its kept set needs the mass of every
        token above the cut). Then p is ``exp(logprob)``, or with top-k the tempered
        softmax renormalized over the top k (``_top_k_probs``)."""
        return bool(
            self.tempered_logprobs and item.probs is not None and item.drafted > 0
            and item.params.top_p >= 1.0
        )  # fmt: skip

    def _draws(self, answers: list[dict[str, Any]]) -> list[int]:
        return [_first_token(answer, self.vocab_size) for answer in answers]

    def _draw_residuals(
        self, items: list[SampledItem], results: list[tuple[int, int | None]]
    ) -> None:
        """For each item rejected at position k without a token yet (``_by_ratio`` left
        it None), draw the target's token from the residual norm(max(p - q, 0)): first
        by rejection from ``residual_candidates`` more SGLang draws there (one call for
        all), then, for any still open, from SGLang's full distribution there. Tries
        bounded, then an exact draw: the residual exactly either way."""
        open_ = [i for i, (_, token) in enumerate(results) if token is None]
        if open_ and self.residual_candidates > 0:
            candidates = self.residual_candidates
            body = self._at_rejections(items, results, open_, candidates)
            answers = self._generate(body, len(open_) * candidates)
            for n, i in enumerate(open_):
                item, k = items[i], results[i][0]
                assert item.probs is not None  # only the ratio rule leaves a token open
                for answer in answers[n * candidates : (n + 1) * candidates]:
                    y = _first_token(answer, self.vocab_size)
                    p_y = math.exp(_output_logprob(answer))
                    u = float(torch.rand((), generator=item.generator))
                    if u * p_y < p_y - float(item.probs[k, y]):
                        results[i] = (k, y)
                        break
            open_ = [i for i in open_ if results[i][1] is None]
        if open_:
            body = self._at_rejections(items, results, open_, 1)
            body["top_logprobs_num"] = self.vocab_size
            for i, answer in zip(open_, self._generate(body, len(open_)), strict=True):
                item, k = items[i], results[i][0]
                assert item.probs is not None
                p = _distribution(answer, self.vocab_size)
                results[i] = (k, _residual_draw(p, item.probs[k], item.generator))

    def _at_rejections(
        self, items: list[SampledItem], results: list[tuple[int, int | None]],
        where: list[int], draws: int,
    ) -> dict[str, Any]:  # fmt: skip
        """A /generate body of ``draws`` seeded one-token draws, with their logprobs, at
        the rejected position of each item in ``where``."""
        inputs, params = [], []
        for i in where:
            item, k = items[i], results[i][0]
            full = self._tokens[item.seq_id] + list(item.tokens)
            for _ in range(draws):
                inputs.append(full[: len(full) - item.drafted + k])
                params.append(_sampled_one(item.params, _seed(item.generator)))
        return {
            "input_ids": inputs,
            "return_logprob": True,
            "logprob_start_len": -1,
            "sampling_params": params,
        }

    def _check(self, seq_id: str, tokens: list[int]) -> None:
        if seq_id in self._poisoned:
            raise SGLangUnavailable(f"sequence {seq_id}: an earlier SGLang call failed")
        if not tokens:
            raise ValueError("a forward needs at least one token")

    @contextlib.contextmanager
    def _failing_fast(self, seq_ids: list[str]) -> Iterator[None]:
        """A call SGLang did not answer (down or too slow) fails its sequences fast from
        then on: the scheduler's retry of them one by one would wait out the timeout
        once per sequence."""
        try:
            yield
        except SGLangUnavailable:
            self._poisoned.update(seq_ids)
            raise

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
# What a request leaves unset SGLang fills from its preferred sampling params (a model's
# generation_config.json under --sampling-defaults model): a repetition penalty or min_p
# there would change even a greedy choice. Every call sets them neutral.
_NEUTRAL = {
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
}
_GREEDY_ONE = {
    "max_new_tokens": 1,
    "temperature": 0.0,
    "top_k": 1,
    **_NEUTRAL,
    "ignore_eos": True,
    "skip_special_tokens": False,
}


def _sampled_one(params: SamplingParams, seed: int) -> dict[str, Any]:
    """One token drawn by SGLang's sampler with the request's temperature, top-p and
    top-k (ATLAS's top_k 0, no filter, is SGLang's -1) and a seed of its own."""
    return {
        "max_new_tokens": 1,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k or -1,
        **_NEUTRAL,
        "sampling_seed": seed,
        "ignore_eos": True,
        "skip_special_tokens": False,
    }


def _seed(generator: torch.Generator) -> int:
    """A fresh seed from the sequence's generator for each call: SGLang's deterministic
    mode derives a draw from (seed, position) only, so a seed reused at a position
    would repeat the draw (unseeded requests all get seed 42 there)."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator))


def _by_ratio(
    draft: list[int], item: SampledItem, answers: list[dict[str, Any]]
) -> tuple[int, int | None]:
    """Rejection sampling with SGLang's exact p: accept draft token x with probability
    min(1, p(x)/q(x)); at the first rejection draw from the residual norm(max(p - q, 0)).
    With top-k, p is known over its whole support, so the residual is drawn here. Without
    a filter p is known at x and at SGLang's own draw y there (independent of the draft),
    and y is kept with probability max(0, 1 - q(y)/p(y)): one rejection-sampling step
    towards the residual; if it is not kept the token is None, for the caller to draw
    from the residual over the full distribution. All accepted: the last draw."""
    probs, generator, top_k = item.probs, item.generator, item.params.top_k
    assert probs is not None  # the ratio rule is for drafters with probabilities
    vocab = probs.shape[-1]
    for k, x in enumerate(draft):
        p = _top_k_probs(answers[k], top_k, vocab) if top_k else None
        if top_k and p is None:  # a tie at the top-k cut: SGLang's draw decides
            y = _first_token(answers[k], vocab)
            if y == x:
                continue
            return k, y
        p_x = float(p[x]) if p is not None else math.exp(_asked_logprob(answers[k]))
        if float(torch.rand((), generator=generator)) * float(probs[k, x]) < p_x:
            continue
        if p is not None:
            return k, _residual_draw(p, probs[k], generator)
        y = _first_token(answers[k], vocab)
        p_y = math.exp(_output_logprob(answers[k]))
        keep = float(torch.rand((), generator=generator)) * p_y < p_y - float(probs[k, y])
        return k, (y if keep else None)
    return len(draft), _first_token(answers[-1], vocab)


def _top_k_probs(answer: dict[str, Any], top_k: int, vocab: int) -> torch.Tensor | None:
    """SGLang's top-k sampling distribution at an output position, [V]: the tempered
    softmax over the top ``top_k`` of ``output_top_logprobs`` (asked for top_k + 1),
    renormalized. None when the k-th and the next tie: which one SGLang's sort keeps
    is its own, so no p is exact there."""
    entries = _output_top(answer)
    if len(entries) > top_k and entries[top_k][0] == entries[top_k - 1][0]:
        return None
    p = torch.zeros(vocab)
    for logprob, token, *_ in entries[:top_k]:
        if logprob is not None and 0 <= token < vocab:
            p[token] = math.exp(logprob)
    return p / p.sum()


def _residual_draw(p: torch.Tensor, q: torch.Tensor, generator: torch.Generator) -> int:
    """A token from norm(max(p - q, 0)) (from p if rounding leaves it empty)."""
    residual = (p - q.float()).clamp(min=0)
    weights = residual if float(residual.sum()) > 0 else p
    return int(torch.multinomial(weights, 1, generator=generator))


def _output_top(answer: dict[str, Any]) -> list[Any]:
    try:
        return list(answer["meta_info"]["output_top_logprobs"][0])
    except (KeyError, IndexError, TypeError) as exc:
        raise SGLangError(f"SGLang's answer lacks output_top_logprobs: {answer}") from exc


def _asked_logprob(answer: dict[str, Any]) -> float:
    """The logprob of the id asked in ``token_ids_logprob`` at the output position."""
    try:
        value = answer["meta_info"]["output_token_ids_logprobs"][0][0][0]
    except (KeyError, IndexError, TypeError) as exc:
        raise SGLangError(f"SGLang's answer lacks output_token_ids_logprobs: {answer}") from exc
    return -math.inf if value is None else float(value)


def _output_logprob(answer: dict[str, Any]) -> float:
    try:
        value = answer["meta_info"]["output_token_logprobs"][0][0]
    except (KeyError, IndexError, TypeError) as exc:
        raise SGLangError(f"SGLang's answer lacks output_token_logprobs: {answer}") from exc
    return -math.inf if value is None else float(value)


def _distribution(answer: dict[str, Any], vocab: int) -> torch.Tensor:
    """[V] probabilities from ``output_top_logprobs`` over the whole vocabulary (a
    logprob SGLang's JSON wrote as null, -inf, is 0)."""
    p = torch.zeros(vocab)
    for logprob, token, *_ in _output_top(answer):
        if logprob is not None and 0 <= token < vocab:
            p[token] = math.exp(logprob)
    return p


def _first_token(answer: Any, vocab: int) -> int:
    ids = answer.get("output_ids") if isinstance(answer, dict) else None
    if not ids or not isinstance(ids[0], int) or not 0 <= ids[0] < vocab:
        raise SGLangError(f"SGLang's answer lacks a sampled token in the vocabulary: {answer}")
    return ids[0]


def _top1(entry: Any) -> tuple[float, int]:
    """``[[logprob, token_id, text]]`` (top_logprobs_num = 1) -> (logprob, token_id)."""
    if not entry or not isinstance(entry[0], list | tuple) or len(entry[0]) < 2:
        raise SGLangError(f"unexpected top-logprob entry from SGLang: {entry!r}")
    logprob, token = entry[0][0], entry[0][1]
    return (float(logprob) if logprob is not None else 0.0), int(token)

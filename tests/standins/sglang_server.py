"""A loopback SGLang stand-in for tests: SGLang's native HTTP API over a real small model.

Never on the serving path. It serves the routes ``SGLangBackend`` uses, in SGLang's own
wire format (field names copied from SGLang 0.5.23's ``entrypoints/http_server.py``,
``managers/tokenizer_manager.py`` and ``managers/scheduler_components/
logprob_result_processor.py``):

- ``POST /generate``: the body goes through SGLang's own checks, in SGLang's order:
  ``api_contract.generate_contract_error`` (the JSON schema), the ``GenerateReqInput``
  dataclass as FastAPI parses it (pydantic), ``normalize_batch_and_arguments()``, then
  per request ``SamplingParams(**params).normalize(tokenizer)`` / ``.verify(vocab)``, the
  token-id range and context-length checks, and the scheduler's
  ``logprob_start_len <= len(input_ids)``. Whatever SGLang would refuse gets a 400 with
  ``{"error": {"message": ...}}`` (``_create_error_response``'s shape).
- Answers: ``text``, ``output_ids`` and ``meta_info`` with ``id``, ``finish_reason``
  (``{"type": "length", "length": n}`` or ``{"type": "stop", "matched": id}``),
  ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``, and with
  ``return_logprob`` ``input_token_logprobs`` / ``output_token_logprobs`` as
  ``[logprob, token_id, null]``, ``input_top_logprobs`` / ``output_top_logprobs`` as
  lists of those, and with ``token_ids_logprob`` ``input_token_ids_logprobs`` /
  ``output_token_ids_logprobs`` as lists of those (one per asked id, in its order). As
  in SGLang, the input lists start at ``logprob_start_len`` and their first entry is
  ``None`` (``[None] + logprobs[:-1]``): entry k (k >= 1) is the distribution after
  input position ``logprob_start_len + k - 1``.
- A list body (``input_ids`` a list of lists) is a batch: a list of answers.
- ``GET /health``, ``GET /health_generate``, ``GET /get_model_info``,
  ``GET /get_server_info``, ``POST /flush_cache``, ``POST /tokenize``.

Decoding is SGLang's (``layers/sampler.py``, ``Sampler.forward``'s standard path):
greedy (temperature 0 is top_k 1) takes the argmax; a sampled token comes from SGLang's
own PyTorch sampling functions (``sglang_types.sampler``) over
``softmax(logits / temperature)`` with the request's ``top_k``, ``top_p`` and ``min_p``.
The output logprobs are SGLang's too: ``log(softmax(logits / temperature))`` for a
sampled request (before top-k/top-p), the raw ``log_softmax(logits)`` for a greedy one
(and for every one with ``return_original_logprob``, SGLang's
``SGLANG_RETURN_ORIGINAL_LOGPROB``); input logprobs are always raw. Seeds work as under
SGLang's ``--enable-deterministic-inference``: a sample depends only on the request's
``sampling_seed`` (42 when absent, as SGLang's) and the position, its noise drawn by
torch's generator seeded from both (SGLang hashes them with a Triton kernel a CPU
cannot run). Penalties are not applied, so a request with one is answered 400.

Prefix caching stands in for SGLang's radix cache: the longest cached token prefix is
reused, never past ``logprob_start_len`` (SGLang caps its prefix match there too, so the
logits from that position on are computed), and ``cached_tokens`` reports it. A
one-token request without input logprobs reuses the last-position logits of the same
input if it saw it lately (SGLang would compute that one position again, to the same
logits), so tests can draw thousands of samples at one position.

Faults for tests: ``delay_s`` (every /generate answers that much later),
``die_after_requests`` (the server closes its socket and stops mid-request on the n-th
/generate, with no answer), ``stop()`` / ``start()`` (a restart on the same port).
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pydantic
import torch

from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner

STANDIN_VERSION = "0.5.23"  # the SGLang whose wire format and checks this follows
CACHE_ENTRIES = 16
LOGITS_MEMO_ENTRIES = 64


class _Died(Exception):
    """The fault ``die_after_requests``: drop the connection without answering."""


class SGLangStandin:
    """SGLang's HTTP API on 127.0.0.1 over ``runner`` (a CausalLMRunner), in a thread."""

    def __init__(self, runner: CausalLMRunner, model_path: str, port: int = 0) -> None:
        from sglang.srt.entrypoints.api_contract import generate_contract_error
        from sglang.srt.sampling.sampling_params import SamplingParams

        from tests.standins.sglang_types import GenerateReqInput

        self.runner = runner
        self.model_path = model_path
        self.tokenizer = runner.tokenizer
        self.context_len = runner.max_context
        self.vocab_size = runner.vocab_size
        self._contract_error = generate_contract_error
        self._adapter = pydantic.TypeAdapter(GenerateReqInput)
        self._sampling_params = SamplingParams
        self._lock = threading.Lock()  # one model, one forward at a time (as one GPU)
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._cache_ids = itertools.count()
        self._last_logits: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self._rids = itertools.count()
        self.port = port
        self._delay_s = 0.0
        self._calm = threading.Event()  # set: a delay in progress ends at once
        self.die_after_requests: int | None = None
        self.return_original_logprob = False  # as SGLang's SGLANG_RETURN_ORIGINAL_LOGPROB
        self.generate_calls = 0
        self.rejected: list[str] = []  # every 400 answered, for tests to assert on
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------

    @property
    def delay_s(self) -> float:
        return self._delay_s

    @delay_s.setter
    def delay_s(self, seconds: float) -> None:
        """Every /generate waits this long first; setting 0 ends the waits under way."""
        self._delay_s = seconds
        if seconds:
            self._calm.clear()
        else:
            self._calm.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SGLangStandin:
        standin = self

        class Handler(_Handler):
            owner = standin

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop the KV cache (a restart starts cold, as SGLang's)."""
        server, self._server = self._server, None
        self.delay_s = 0.0
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            self._drop_cache()

    def _drop_cache(self) -> None:
        for cache_id in self._cache:
            self.runner.release(cache_id)
        self._cache.clear()
        self._last_logits.clear()

    # -- /generate -------------------------------------------------------------------

    def generate(self, body: Any) -> tuple[int, Any]:
        """SGLang's checks, then greedy decoding; (HTTP status, JSON answer)."""
        self.generate_calls += 1
        if self.die_after_requests is not None:
            self.die_after_requests -= 1
            if self.die_after_requests <= 0:
                self.die_after_requests = None
                raise _Died()
        if self._delay_s:
            self._calm.wait(self._delay_s)
        try:
            requests = self._validate(body)
        except (ValueError, TypeError, pydantic.ValidationError) as exc:
            self.rejected.append(str(exc))
            return 400, {"error": {"message": str(exc)}}
        with self._lock:
            answers = [self._run_one(**request) for request in requests]
        return 200, answers if isinstance(body.get("input_ids"), list) and isinstance(
            body["input_ids"][0], list
        ) else answers[0]

    def _validate(self, body: Any) -> list[dict[str, Any]]:
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        error = self._contract_error(body)
        if error is not None:
            raise ValueError(error)
        obj = self._adapter.validate_python(body)
        obj.normalize_batch_and_arguments()
        if obj.input_ids is None:
            raise ValueError("the stand-in serves input_ids requests only (no text)")
        items = [obj] if obj.is_single else [obj[i] for i in range(obj.batch_size)]
        requests = []
        for item in items:
            ids = list(item.input_ids)
            params = self._sampling_params(**dict(item.sampling_params or {}))
            params.normalize(self.tokenizer)
            params.verify(self.vocab_size)
            if not ids:
                raise ValueError("input_ids cannot be empty.")
            if any(t < 0 or t >= self.vocab_size for t in ids):
                raise ValueError(f"token id out of range; valid range is [0, {self.vocab_size}).")
            if len(ids) >= self.context_len:
                raise ValueError(
                    f"The input ({len(ids)} tokens) is longer than the model's context "
                    f"length ({self.context_len} tokens)."
                )
            if params.max_new_tokens is not None and params.max_new_tokens + len(ids) > (
                self.context_len
            ):
                raise ValueError("Requested token count exceeds the model's maximum context")
            if (params.repetition_penalty, params.frequency_penalty,
                    params.presence_penalty) != (1.0, 0.0, 0.0):  # fmt: skip
                raise ValueError("the stand-in applies no penalties")
            start = item.logprob_start_len if item.return_logprob else -1
            if start is None or start == -1:
                start = len(ids)
            if start > len(ids):
                raise ValueError(
                    f"req.logprob_start_len={start} is higher than the number of input "
                    f"tokens len(req.origin_input_ids)={len(ids)}. Please use a smaller "
                    "logprob_start_len."
                )
            requests.append({
                "ids": ids,
                "max_new_tokens": 128 if params.max_new_tokens is None else params.max_new_tokens,
                "stop_ids": set(params.stop_token_ids or ()) | (
                    set() if params.ignore_eos else set(self.runner.eos_token_ids)
                ),
                "logprob": bool(item.return_logprob),
                "start": start,
                "top_n": int(item.top_logprobs_num or 0),
                "sampling": params,
                "token_ids": list(item.token_ids_logprob or ()),
                "rid": item.rid or f"standin-{next(self._rids)}",
            })  # fmt: skip
        return requests

    def _prefill(self, ids: list[int], start: int) -> tuple[str, int, torch.Tensor]:
        """Logits after every position from ``min(start, len - 1)`` on, reusing the
        longest cached prefix (never past that position)."""
        limit = min(start, len(ids) - 1)
        best, best_len = None, -1
        for cache_id, tokens in self._cache.items():
            common = 0
            for a, b in zip(tokens, ids[:limit], strict=False):
                if a != b:
                    break
                common += 1
            if common > best_len:
                best, best_len = cache_id, common
        if best is None or (best_len == 0 and len(self._cache) < CACHE_ENTRIES):
            best, best_len = f"standin-cache-{next(self._cache_ids)}", 0
            self.runner.start(best)
            self._cache[best] = []
        self._cache.move_to_end(best)
        self.runner.truncate(best, best_len)
        logits = self.runner.forward(best, ids[best_len:])
        self._cache[best] = list(ids)
        while len(self._cache) > CACHE_ENTRIES:
            old, _ = self._cache.popitem(last=False)
            self.runner.release(old)
        return best, best_len, logits

    def _logits(
        self, ids: list[int], start: int, max_new_tokens: int
    ) -> tuple[str, int, torch.Tensor]:
        """``_prefill``; but one token with no input logprobs needs the last position's
        logits only, and a repeated input (a test's thousands of draws at one position)
        reuses them."""
        key = tuple(ids) if start == len(ids) and max_new_tokens == 1 else None
        if key is not None and key in self._last_logits:
            self._last_logits.move_to_end(key)
            return "", len(ids) - 1, self._last_logits[key][None]
        cache_id, cached, logits = self._prefill(ids, start)
        if key is not None:
            self._last_logits[key] = logits[-1].clone()
            while len(self._last_logits) > LOGITS_MEMO_ENTRIES:
                self._last_logits.popitem(last=False)
        return cache_id, cached, logits

    def _run_one(
        self, ids: list[int], max_new_tokens: int, stop_ids: set[int], logprob: bool,
        start: int, top_n: int, sampling: Any, token_ids: list[int], rid: str,
    ) -> dict[str, Any]:  # fmt: skip
        cache_id, cached, logits = self._logits(ids, start, max_new_tokens)
        first = cached  # logits[j] is the distribution after ids[first + j]
        rows = torch.log_softmax(logits.float(), dim=-1)
        meta: dict[str, Any] = {"id": rid}
        if logprob:
            input_lp: list[Any] = [None]
            input_top: list[Any] = [None]
            input_ids_lp: list[Any] = [None]
            for pos in range(start, len(ids) - 1):
                row = rows[pos - first]
                nxt = ids[pos + 1]
                input_lp.append([float(row[nxt]), nxt, None])
                input_top.append(_top(row, top_n))
                input_ids_lp.append(_picked(row, token_ids))
            meta["input_token_logprobs"] = input_lp[: len(ids) - start]
            if top_n > 0:
                meta["input_top_logprobs"] = input_top[: len(ids) - start]
            if token_ids:
                meta["input_token_ids_logprobs"] = input_ids_lp[: len(ids) - start]
        output: list[int] = []
        out_lp: list[Any] = []
        out_top: list[Any] = []
        out_ids_lp: list[Any] = []
        finish: dict[str, Any] = {"type": "length", "length": max_new_tokens}
        seq = list(ids)
        original = self.return_original_logprob
        token, row = _sample(logits[-1], sampling, len(seq) - 1, original)
        while len(output) < max_new_tokens:
            output.append(token)
            out_lp.append([float(row[token]), token, None])
            out_top.append(_top(row, top_n))
            out_ids_lp.append(_picked(row, token_ids))
            if token in stop_ids:
                finish = {"type": "stop", "matched": token}
                break
            if len(output) == max_new_tokens:
                break
            seq.append(token)
            logits = self.runner.forward(cache_id, [token])
            token, row = _sample(logits[-1], sampling, len(seq) - 1, original)
            self._cache[cache_id] = list(seq)
        meta.update({
            "finish_reason": finish,
            "prompt_tokens": len(ids),
            "weight_version": "default",
            "num_retractions": 0,
            "reasoning_tokens": 0,
            "completion_tokens": len(output),
            "cached_tokens": cached,
        })  # fmt: skip
        if logprob:
            meta["output_token_logprobs"] = out_lp
            meta["output_token_logprobs_length"] = len(out_lp)
            if top_n > 0:
                meta["output_top_logprobs"] = out_top
            if token_ids:
                meta["output_token_ids_logprobs"] = out_ids_lp
        text = self.tokenizer.decode(output, skip_special_tokens=True)
        return {"text": text, "output_ids": output, "meta_info": meta}

    # -- the other routes ------------------------------------------------------------

    def model_info(self) -> dict[str, Any]:
        config = self.runner.model.config
        return {
            "model_path": self.model_path,
            "served_model_name": self.model_path,
            "tokenizer_path": self.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": getattr(config, "model_type", None),
            "architectures": getattr(config, "architectures", None),
        }

    def server_info(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.model_path,
            "context_length": self.context_len,
            "skip_tokenizer_init": False,
            "version": STANDIN_VERSION,
            "internal_states": [],
        }

    def tokenize(self, body: Any) -> tuple[int, Any]:
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str):
            return 400, {"object": "error", "message": "Expected str prompt", "code": 400}
        tokens = self.tokenizer.encode(prompt, add_special_tokens=body.get(
            "add_special_tokens", True
        ))  # fmt: skip
        return 200, {"tokens": tokens, "count": len(tokens), "max_model_len": self.context_len}


def _sample(
    logits: torch.Tensor, params: Any, position: int, original: bool
) -> tuple[int, torch.Tensor]:
    """The next token after ``logits`` (one position's) and the logprobs SGLang returns
    with it, as ``Sampler.forward``: greedy when every ``top_k`` is at most 1 (SGLang
    turns temperature 0 into top_k 1), else its PyTorch sampler on the tempered softmax;
    ``original``: the raw logprobs, as under ``SGLANG_RETURN_ORIGINAL_LOGPROB``."""
    from sglang.srt.sampling.sampling_params import TOP_K_ALL

    from tests.standins.sglang_types import sampler

    logits = logits.float()
    if params.top_k <= 1:
        return int(torch.argmax(logits)), torch.log_softmax(logits, dim=-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    seed = 42 if params.sampling_seed is None else params.sampling_seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash((seed, position)) & (2**63 - 1))
        if params.top_p == 1.0 and params.top_k == TOP_K_ALL and params.min_p <= 0:
            token = sampler.sampling_from_probs_torch(probs[None].clone())
        else:
            token = sampler.top_k_top_p_min_p_sampling_from_probs_torch(
                probs[None].clone(),
                torch.tensor([params.top_k]),
                torch.tensor([params.top_p]),
                torch.tensor([params.min_p]),
                params.min_p > 0,
                None,
                torch.tensor([position]),
            )
    return int(token[0]), torch.log_softmax(logits, dim=-1) if original else torch.log(probs)


def _picked(row: torch.Tensor, token_ids: list[int]) -> list[list[Any]]:
    """``token_ids_logprob``'s entry at one position: the logprob of each asked id."""
    return [[float(row[t]), t, None] for t in token_ids]


def _top(row: torch.Tensor, n: int) -> list[list[Any]]:
    if n <= 0:
        return []
    values, indices = torch.topk(row, n)
    return [[float(v), int(i), None] for v, i in zip(values, indices, strict=True)]


class _Handler(BaseHTTPRequestHandler):
    owner: SGLangStandin
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn

    def setup(self) -> None:
        super().setup()
        # As uvicorn: no Nagle, or headers and body written apart wait for a delayed ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        pass

    def _send(self, status: int, payload: Any, text: bool = False) -> None:
        data = payload.encode() if text else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if text else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"null")

    def do_GET(self) -> None:  # noqa: N802 - stdlib's name
        owner = self.owner
        if self.path in ("/health", "/health_generate"):
            self._send(200, "", text=True)
        elif self.path in ("/get_model_info", "/model_info"):
            self._send(200, owner.model_info())
        elif self.path in ("/get_server_info", "/server_info"):
            self._send(200, owner.server_info())
        elif self.path == "/flush_cache":
            self._flush()
        else:
            self._send(404, {"detail": "Not Found"})

    def do_POST(self) -> None:  # noqa: N802 - stdlib's name
        owner = self.owner
        try:
            body = self._body()
        except ValueError:
            self._send(400, {"error": {"message": "malformed JSON"}})
            return
        if self.path == "/generate":
            try:
                status, payload = owner.generate(body)
            except _Died:
                # Mid-request death: no answer, the socket closes, the server stops.
                self.close_connection = True
                threading.Thread(target=owner.stop, daemon=True).start()
                return
            self._send(status, payload)
        elif self.path == "/flush_cache":
            self._flush()
        elif self.path == "/tokenize":
            self._send(*owner.tokenize(body))
        else:
            self._send(404, {"detail": "Not Found"})

    def _flush(self) -> None:
        with self.owner._lock:
            self.owner._drop_cache()
        self._send(200, "Cache flushed.\n", text=True)


def main(argv: list[str] | None = None) -> int:
    """Serve a registry model on a port, to run ``atlas bench --backend sglang`` (or a
    sidecar) against by hand: ``python -m tests.standins.sglang_server --model M``."""
    import argparse
    import signal

    from atlas_sidecar import models

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default=models.TEST_MODEL)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runner = CausalLMRunner.load(args.model, dtype=args.dtype)
    standin = SGLangStandin(runner, args.model, port=args.port).start()
    print(f"SGLang stand-in serving {args.model} on {standin.url}", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    standin.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

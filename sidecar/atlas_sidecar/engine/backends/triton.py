"""The target model behind a Triton Inference Server running TensorRT-LLM: the sidecar
drafts, TensorRT-LLM verifies, over Triton's gRPC (KServe v2) protocol (``tritonclient``).

What a Triton user runs for an LLM is tensorrtllm_backend's ``tensorrt_llm`` model
(``all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt``), and what TensorRT-LLM
offers an outside drafter is its Draft-Target-Model mode: an engine built with
``trtllm-build --speculative_decoding_mode=draft_tokens_external --max_draft_len=K``
takes the draft in a request's ``draft_input_ids`` and answers the accepted draft tokens
plus the target's own (TensorRT-LLM's ``examples/draft_target_model/README.md``, "Triton
Inference Server workflow"; its client is tensorrtllm_backend's
``inflight_batcher_llm/client/e2e_grpc_speculative_decoding_client.py``). That is the
route here. The other route, ``return_context_logits``, needs an engine built with
``--gather_context_logits`` and ships [input length, vocab] fp32 logits back for the
whole context on every step: hundreds of MB per call at a real context, so no one runs it.

Tensor names, datatypes and shapes relied on (config.pbtxt above; the batch dimension
comes first, ``max_batch_size`` > 0):

- inputs: ``input_ids`` INT32 [1, L]; ``input_lengths`` INT32 [1, 1];
  ``request_output_len`` INT32 [1, 1]; ``draft_input_ids`` INT32 [1, K] (optional);
  ``runtime_top_k`` INT32 [1, 1] (optional; 1: greedy). Older configs declare some of
  these UINT32: the datatypes sent are the ones the server's ModelMetadata declares.
- outputs: ``output_ids`` INT32 [1, beam, T]; ``sequence_length`` INT32 [1, beam].
  ``output_ids`` holds the input too unless the model's ``exclude_input_in_output``
  parameter (ModelConfig) is true.
- ``end_id`` is not sent: the engine decides where a sequence stops, the server never
  cuts a verify short at EOS.

A verify of new tokens ``[pending, d1..dk]`` after a cached prefix ``p`` is one
ModelInfer per sequence: ``input_ids`` = p + [pending], ``draft_input_ids`` = d1..dk,
``request_output_len`` = k + 1, greedy. TensorRT-LLM answers tokens ``g`` with
``g[i] == d(i+1)`` for each accepted draft token, then its own choice; it may go on
generating to k + 1 tokens. So ``g[i]`` is the target's choice after new token i, for i
up to the first disagreement; the rows after it are unknown (all -inf) and greedy
verification never reads them. Several sequences are several concurrent ModelInfers:
Triton's in-flight batcher batches them (one request cannot carry ragged drafts). The
engine refuses drafts longer than its ``--max_draft_len`` (``max_draft_len`` here; it is
not readable over the wire), and the controller may draft longer (a suffix draft costs
nothing): a longer draft is verified in several requests, the next one sent only when
the previous one's draft was all accepted.

``forward`` (one sequence: the engine's prefill, which reads the last row only) sends
all its tokens as context and ``request_output_len`` 1: its last row is the target's
choice after them, the rows before are unknown. ``forward_many`` is the verify above.

Rows are not logits: the chosen token at 0, -inf elsewhere, so only the argmax means
anything (``capabilities.exact_logits`` False: the engine refuses sampled requests), and
a request verifies one token path (``verifies_trees`` False: drafts become chains).

Faults: every call has a deadline; UNAVAILABLE answers (the server down, restarting,
or the connection dropped) are retried a bounded number of times, the calls being
idempotent. A call that still fails raises ``TritonUnavailable`` (a
``BackendUnavailable``: the server answers UNAVAILABLE); its sequences fail fast from
then on, until released. A refused call (INVALID_ARGUMENT ...) raises ``TritonError``
and leaves its sequences as they were.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import numpy as np
import torch

from atlas_sidecar.engine.backends.base import ForwardItem
from atlas_sidecar.engine.backends.remote import TOKENIZER_PROBE, RemoteSequences, TargetSpec
from atlas_sidecar.engine.capabilities import TargetCapabilities
from atlas_sidecar.errors import BackendUnavailable

log = logging.getLogger(__name__)

DEFAULT_MODEL = "tensorrt_llm"
TOKENIZER_MODEL = "preprocessing"  # tensorrtllm_backend's tokenizer model, if served
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 3
READY_TIMEOUT_S = 600.0
# The engine's trtllm-build --max_draft_len (not readable over the wire): longer drafts
# are verified in several requests. 10 is TensorRT-LLM's Draft-Target-Model example.
DEFAULT_MAX_DRAFT_LEN = 10
REQUIRED_INPUTS = ("input_ids", "input_lengths", "request_output_len", "draft_input_ids")
REQUIRED_OUTPUTS = ("output_ids", "sequence_length")
INTEGER_TYPES = {"INT32": np.int32, "UINT32": np.uint32, "INT64": np.int64, "UINT64": np.uint64}
# Retried: the server or the connection is away. Everything else is an answer.
RETRIED = ("StatusCode.UNAVAILABLE",)
# A restarted server is found again within a second (gRPC's default backoff: 120 s).
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class TritonUnavailable(BackendUnavailable):
    """Triton did not answer (down, restarting, too slow) within the bounded retries."""


class TritonError(RuntimeError):
    """Triton answered, but not as this backend expects (a refused request, a bad shape)."""


def grpc_address(url: str) -> str:
    """``host:port`` from ``host:port`` or ``grpc://host:port`` (Triton's gRPC port)."""
    address = url.removeprefix("grpc://")
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        raise ValueError(f"--triton-url must be host:port (Triton's gRPC port), got {url!r}")
    return address


class TritonBackend(RemoteSequences):
    """A ``TargetBackend`` over a TensorRT-LLM model in Triton, for greedy chains."""

    capabilities = TargetCapabilities(
        verifies_trees=False, exact_logits=False, exposes_features=False, remote=True
    )

    def __init__(
        self,
        url: str,
        spec: TargetSpec,
        model: str = DEFAULT_MODEL,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        max_draft_len: int = DEFAULT_MAX_DRAFT_LEN,
    ) -> None:
        import tritonclient.grpc as grpcclient

        if max_draft_len < 1:
            raise ValueError(f"max_draft_len must be at least 1, got {max_draft_len}")
        self.url = grpc_address(url)
        self.model = model
        self.tokenizer = spec.tokenizer
        self.vocab_size = spec.vocab_size
        self.max_context = spec.max_context
        self.eos_token_ids = spec.eos_token_ids
        self.device = torch.device("cpu")
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_draft_len = max_draft_len
        self.exclude_input_in_output = False  # tensorrtllm_backend's default
        self._types = {name: "INT32" for name in (*REQUIRED_INPUTS, "runtime_top_k")}
        self._client = grpcclient.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        RemoteSequences.__init__(self, spec)
        self.calls = 0  # ModelInfer calls made (tests and overhead figures read it)

    # -- start-up --------------------------------------------------------------------

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, poll_s: float = 1.0) -> None:
        """Wait for the server to be live and the model ready (TensorRT-LLM loads its
        engine first), then read the model's metadata and config and check the tokenizer:
        drafts are token ids, so both sides must tokenize alike."""
        deadline = time.monotonic() + timeout_s
        log.info("waiting up to %.0f s for Triton at %s, model %s", timeout_s, self.url,
                 self.model)  # fmt: skip
        while (last := self.probe(min(10.0, timeout_s))) is not None:
            if time.monotonic() >= deadline:
                raise TritonUnavailable(
                    f"Triton at {self.url} not ready after {timeout_s:.0f} s ({last})"
                )
            time.sleep(poll_s)
        self.check_model()
        self.check_tokenizer()

    def top2_gap(self, ids: list[int]) -> float | None:
        """None (``RemoteTarget``): the draft-tokens model returns tokens, no logits."""
        return None

    def probe(self, timeout_s: float) -> str | None:
        """None while the server is live and the model ready, else why not
        (``RemoteTarget``)."""
        try:
            if not self._client.is_server_live(client_timeout=timeout_s):
                return "server not live"
            if not self._client.is_model_ready(self.model, client_timeout=timeout_s):
                return f"model {self.model} not ready"
            return None
        except Exception as exc:  # noqa: BLE001 - tritonclient raises its own type
            return str(exc)

    def check_model(self) -> None:
        """Take the datatypes the model declares, and refuse a model without the tensors
        a draft verify needs (not a TensorRT-LLM ``tensorrt_llm`` model)."""
        meta = self._call(lambda t: self._client.get_model_metadata(
            self.model, as_json=True, client_timeout=t))  # fmt: skip
        inputs = {i["name"]: i["datatype"] for i in meta.get("inputs", [])}
        outputs = {o["name"] for o in meta.get("outputs", [])}
        missing = [n for n in REQUIRED_INPUTS if n not in inputs]
        missing += [n for n in REQUIRED_OUTPUTS if n not in outputs]
        if missing:
            raise TritonError(
                f"model {self.model} at {self.url} lacks {missing}: serve tensorrtllm_backend's "
                "tensorrt_llm model, its engine built with "
                "--speculative_decoding_mode=draft_tokens_external"
            )
        for name in (*REQUIRED_INPUTS, "runtime_top_k"):
            if name in inputs and inputs[name] not in INTEGER_TYPES:
                raise TritonError(f"input {name} is {inputs[name]}, not an integer type")
        self._types = {n: inputs[n] for n in (*REQUIRED_INPUTS, "runtime_top_k") if n in inputs}
        config = self._call(lambda t: self._client.get_model_config(
            self.model, as_json=True, client_timeout=t))  # fmt: skip
        params = config.get("config", {}).get("parameters", {})
        flag = params.get("exclude_input_in_output", {}).get("string_value", "")
        self.exclude_input_in_output = flag.strip().lower() in ("true", "1", "yes")
        log.info("Triton model %s (%s) is up at %s; exclude_input_in_output=%s",
                 self.model, meta.get("platform"), self.url,
                 self.exclude_input_in_output)  # fmt: skip

    def check_tokenizer(self, model: str = TOKENIZER_MODEL) -> None:
        """Tokenize a probe text with the server's own tokenizer model (tensorrtllm_backend's
        ``preprocessing``: QUERY -> INPUT_ID, OUT_END_ID) and refuse a mismatch; without
        that model there is nothing to compare with, and a warning says so."""
        try:
            ready = self._client.is_model_ready(model, client_timeout=self.timeout_s)
        except Exception:  # noqa: BLE001 - an unknown model may be an error, not False
            ready = False
        if not ready:
            log.warning("Triton serves no %r model: the tokenizer cannot be checked; serve "
                        "the same model on both sides", model)  # fmt: skip
            return
        result = self._call(lambda t: self._client.infer(
            model, _preprocessing_inputs(TOKENIZER_PROBE), client_timeout=t))  # fmt: skip
        theirs = [int(t) for t in result.as_numpy("INPUT_ID").reshape(-1)]
        ours = {
            tuple(self.tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=special))
            for special in (False, True)
        }
        if tuple(theirs) not in ours:
            raise TritonError(
                f"tokenizer mismatch: Triton's {model} splits the probe text into "
                f"{theirs[:12]}..., the sidecar's --target into {min(ours)[:12]}...; "
                "serve the same model on both sides"
            )
        end = result.as_numpy("OUT_END_ID")
        if end is not None and int(end.reshape(-1)[0]) not in self.eos_token_ids:
            raise TritonError(
                f"EOS mismatch: Triton's end id {int(end.reshape(-1)[0])} is not among the "
                f"sidecar's EOS {sorted(self.eos_token_ids)}"
            )
        log.info("Triton tokenizer matches the sidecar's (probe text and EOS %s)",
                 sorted(self.eos_token_ids))  # fmt: skip

    # -- TargetBackend ---------------------------------------------------------------

    def forward(self, seq_id: str, tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens`` as context (a prefill): only the last row is the target's
        choice (after them); the rows before are -inf."""
        return self._run([ForwardItem(seq_id, tokens)], drafts=False)[0]

    def forward_many(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        """Verify each item's ``tokens[1:]`` as a draft after ``tokens[0]``: row i is the
        target's choice after tokens[i], up to the first draft token it rejected (the
        rows after it are -inf). One concurrent ModelInfer per item (more for a draft
        past ``max_draft_len`` that is accepted that far)."""
        return self._run(items, drafts=True)

    def close(self) -> None:
        self._client.close()

    # -- verify calls ------------------------------------------------------------------

    def _run(self, items: list[ForwardItem], drafts: bool) -> list[torch.Tensor]:
        if not items:
            return []
        for item in items:
            if item.parents is not None:
                raise ValueError("the Triton backend verifies chains only")
            if item.seq_id in self._poisoned:
                raise TritonUnavailable(f"sequence {item.seq_id}: an earlier Triton call failed")
            if not item.tokens:
                raise ValueError("a forward needs at least one token")
        rows = [torch.full((len(i.tokens), self.vocab_size), -math.inf) for i in items]
        # The row each item's next request fills first: its context ends at that token.
        first = [0 if drafts else len(item.tokens) - 1 for item in items]
        active = list(range(len(items)))
        try:
            while active:
                active = self._round_of_verifies(items, rows, first, active)
        except TritonUnavailable:
            # Down or too slow: the scheduler's one-by-one retry would wait it out again.
            self._poisoned.update(item.seq_id for item in items)
            raise
        for item in items:
            self._tokens[item.seq_id] = self._tokens[item.seq_id] + list(item.tokens)
        return rows

    def _round_of_verifies(
        self, items: list[ForwardItem], rows: list[torch.Tensor], first: list[int],
        active: list[int],
    ) -> list[int]:  # fmt: skip
        """One concurrent request per active item, its draft cut at ``max_draft_len``
        (the engine's limit: TensorRT-LLM refuses longer ones). An item whose cut draft
        was all accepted, and whose next fed token is the target's own, goes on from
        there; returns those."""
        sent = []
        for k in active:
            tokens, at = items[k].tokens, first[k]
            context = self._tokens[items[k].seq_id] + tokens[: at + 1]
            sent.append((context, tokens[at + 1 : at + 1 + self.max_draft_len]))
        results = self._infer_many([self._inputs(c, d) for c, d in sent])
        again = []
        for k, (context, draft), result in zip(active, sent, results, strict=True):
            last = self._fill(rows[k], first[k], self._generated(result, context), draft)
            tokens = items[k].tokens
            if last + 1 < len(tokens) and int(rows[k][last].argmax()) == tokens[last + 1]:
                first[k] = last + 1
                again.append(k)
        return again

    def _fill(self, rows: torch.Tensor, at: int, generated: list[int], draft: list[int]) -> int:
        """Row ``at + i`` gets generated[i] (the target's choice after the context's last
        token, then after each draft token) up to the first draft token it did not choose;
        returns the last row filled."""
        for i, token in enumerate(generated[: len(draft) + 1]):
            rows[at + i, token] = 0.0
            if i < len(draft) and token != draft[i]:
                return at + i
        if len(generated) <= len(draft):
            raise TritonError(
                f"Triton accepted the whole draft but answered {len(generated)} tokens "
                f"for a request of {len(draft) + 1}"
            )
        return at + len(draft)

    def _inputs(self, context: list[int], draft: list[int]) -> list[Any]:
        """One request: context, draft, greedy, k + 1 tokens (the e2e client's shape)."""
        values: dict[str, list[int]] = {
            "input_ids": context,
            "input_lengths": [len(context)],
            "request_output_len": [len(draft) + 1],
        }
        if draft:
            values["draft_input_ids"] = draft
        if "runtime_top_k" in self._types:
            values["runtime_top_k"] = [1]
        return [_tensor(name, data, self._types[name]) for name, data in values.items()]

    def _generated(self, result: Any, context: list[int]) -> list[int]:
        """The tokens the server generated (beam 0), without the input it echoes."""
        ids = result.as_numpy("output_ids")
        lengths = result.as_numpy("sequence_length")
        if ids is None or lengths is None or ids.ndim != 3 or lengths.ndim != 2:
            raise TritonError("Triton's answer lacks output_ids [1, beam, T] / sequence_length")
        tokens = [int(t) for t in ids[0, 0, : int(lengths[0, 0])]]
        if not self.exclude_input_in_output:
            if tokens[: len(context)] != context:
                raise TritonError("Triton's output_ids do not start with the input sent")
            tokens = tokens[len(context) :]
        if not tokens or any(not 0 <= t < self.vocab_size for t in tokens):
            raise TritonError(f"Triton generated {tokens[:8]}: none, or outside the vocabulary")
        return tokens

    # -- the wire --------------------------------------------------------------------

    def _infer_many(self, requests: list[list[Any]]) -> list[Any]:
        """Concurrent ModelInfers, all or nothing; the UNAVAILABLE ones are retried (a
        bounded number of times, within one deadline)."""
        deadline = time.monotonic() + self.timeout_s
        results: list[Any] = [None] * len(requests)
        pending = list(range(len(requests)))
        failure = ""
        for attempt in range(self.retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            errors = self._round(requests, pending, results, left)
            self._raise_answers(errors)
            if not errors:
                return results
            pending, failure = sorted(errors), str(next(iter(errors.values())))
            if attempt < self.retries:
                time.sleep(min(0.25 * 2**attempt, max(0.0, deadline - time.monotonic())))
        raise TritonUnavailable(
            f"Triton at {self.url} unavailable after {self.retries + 1} tries: {failure}"
        )

    def _round(
        self, requests: list[list[Any]], pending: list[int], results: list[Any], left: float
    ) -> dict[int, Any]:
        """Send ``pending`` at once; fill ``results``; return the errors by index."""
        errors: dict[int, Any] = {}
        done = threading.Semaphore(0)

        def finish(index: int, result: Any, error: Any) -> None:
            if error is None:
                results[index] = result
            else:
                errors[index] = error
            done.release()

        for index in pending:
            self.calls += 1
            try:
                self._client.async_infer(
                    self.model, requests[index],
                    lambda result, error, index=index: finish(index, result, error),
                    client_timeout=left,
                )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - refused before it was sent
                finish(index, None, exc)
        for _ in pending:
            if not done.acquire(timeout=left + 5.0):  # gRPC's deadline ends every call first
                raise TritonUnavailable(f"Triton at {self.url}: a call outlived its deadline")
        return errors

    def _raise_answers(self, errors: dict[int, Any]) -> None:
        """A deadline is not retried (it would outlast the caller's); a refusal is the
        request's fault, not the server's absence."""
        for error in errors.values():
            status = error.status() if hasattr(error, "status") else ""
            if status == "StatusCode.DEADLINE_EXCEEDED":
                raise TritonUnavailable(
                    f"Triton at {self.url} did not answer within {self.timeout_s:.1f} s"
                )
            if status not in RETRIED:
                raise TritonError(f"Triton refused a call ({status}): {error}")

    def _call(self, call: Any) -> Any:
        """One idempotent non-infer call (metadata, config, the tokenizer probe), with
        the same deadline and UNAVAILABLE retries as a verify."""
        deadline = time.monotonic() + self.timeout_s
        failure = ""
        for attempt in range(self.retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                return call(left)
            except Exception as exc:  # noqa: BLE001 - tritonclient's InferenceServerException
                self._raise_answers({0: exc})
                failure = str(exc)
            if attempt < self.retries:
                time.sleep(min(0.25 * 2**attempt, max(0.0, deadline - time.monotonic())))
        raise TritonUnavailable(f"Triton at {self.url} unavailable: {failure}")


def _tensor(name: str, data: list[int], datatype: str) -> Any:
    """An [1, len] InferInput of ``datatype`` (batch dimension first)."""
    import tritonclient.grpc as grpcclient

    array = np.asarray([data], dtype=INTEGER_TYPES[datatype])
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _preprocessing_inputs(text: str) -> list[Any]:
    """``preprocessing``'s QUERY (BYTES [1, 1]) and REQUEST_OUTPUT_LEN (INT32 [1, 1])."""
    import tritonclient.grpc as grpcclient

    query = grpcclient.InferInput("QUERY", [1, 1], "BYTES")
    query.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
    return [query, _tensor("REQUEST_OUTPUT_LEN", [1], "INT32")]

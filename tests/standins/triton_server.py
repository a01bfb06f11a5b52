"""A loopback Triton stand-in for tests: Triton's gRPC (KServe v2) service, built from
``tritonclient``'s own generated modules (``service_pb2_grpc.GRPCInferenceServiceServicer``),
serving a real small model as tensorrtllm_backend's ``tensorrt_llm`` model.

Never on the serving path. It serves ServerLive, ServerReady, ModelReady, ModelMetadata,
ModelConfig and ModelInfer for two models:

- ``tensorrt_llm``: the inputs and outputs of tensorrtllm_backend's
  ``all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt`` (``TRTLLM_INPUTS`` /
  ``TRTLLM_OUTPUTS``), with TensorRT-LLM's Draft-Target-Model behaviour: the draft in
  ``draft_input_ids`` is accepted while it equals the target's greedy choice, the
  target's own token follows, and generation goes on to ``request_output_len`` tokens
  (or ``end_id``). ``exclude_input_in_output`` is a model parameter, as in Triton.
- ``preprocessing``: QUERY -> INPUT_ID, REQUEST_INPUT_LEN, OUT_END_ID, with the model's
  tokenizer (tensorrtllm_backend's ``preprocessing`` model).

Requests are checked as Triton checks them before a backend sees them, and refused with
INVALID_ARGUMENT: an unknown model, input or requested output; a missing required input;
a datatype other than the config's; a shape that does not match the config's dims after
the batch dimension; raw contents of the wrong size. Then as TensorRT-LLM would: a draft
longer than ``max_draft_len``, a context past ``max_context``. What it does not do:
sampling (only ``runtime_top_k`` 1 is served), context or generation logits, batches of
more than one request per ModelInfer, typed (non-raw) contents.

Prefix caching stands in for ``enable_kv_cache_reuse``: the longest cached prefix is
reused. Faults for tests: ``delay_s`` (every ModelInfer answers that much later),
``die_after_requests`` (the server stops mid-request on the n-th ModelInfer, with no
answer), ``stop()`` / ``start()`` (a restart on the same port).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import OrderedDict
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import torch
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner

CACHE_ENTRIES = 16
_standin_ids = itertools.count()  # stand-ins may share a runner: their cache ids differ
MAX_BATCH_SIZE = 64
_OPTIONAL_SCALARS = {
    "draft_acceptance_threshold": "FP32", "end_id": "INT32", "pad_id": "INT32",
    "beam_width": "INT32", "temperature": "FP32", "runtime_top_k": "INT32",
    "runtime_top_p": "FP32", "runtime_top_p_min": "FP32", "runtime_top_p_decay": "FP32",
    "runtime_top_p_reset_ids": "INT32", "len_penalty": "FP32", "early_stopping": "BOOL",
    "repetition_penalty": "FP32", "min_length": "INT32", "beam_search_diversity_rate": "FP32",
    "presence_penalty": "FP32", "frequency_penalty": "FP32", "random_seed": "UINT64",
    "return_log_probs": "BOOL", "return_context_logits": "BOOL",
    "return_generation_logits": "BOOL", "stop": "BOOL", "streaming": "BOOL",
    "prompt_vocab_size": "INT32", "lora_task_id": "UINT64",
}  # fmt: skip
# (name, datatype, dims after the batch dimension, optional), from config.pbtxt.
TRTLLM_INPUTS: list[tuple[str, str, list[int], bool]] = [
    ("input_ids", "INT32", [-1], False),
    ("input_lengths", "INT32", [1], False),
    ("request_output_len", "INT32", [1], False),
    ("draft_input_ids", "INT32", [-1], True),
    ("draft_logits", "FP32", [-1, -1], True),
    ("stop_words_list", "INT32", [2, -1], True),
    ("bad_words_list", "INT32", [2, -1], True),
    ("embedding_bias", "FP32", [-1], True),
    ("prompt_embedding_table", "FP16", [-1, -1], True),
    ("lora_weights", "FP16", [-1, -1], True),
    ("lora_config", "INT32", [-1, 3], True),
    *((name, dtype, [1], True) for name, dtype in _OPTIONAL_SCALARS.items()),
]
TRTLLM_OUTPUTS: list[tuple[str, str, list[int]]] = [
    ("output_ids", "INT32", [-1, -1]),
    ("sequence_length", "INT32", [-1]),
    ("cum_log_probs", "FP32", [-1]),
    ("output_log_probs", "FP32", [-1, -1]),
    ("context_logits", "FP32", [-1, -1]),
    ("generation_logits", "FP32", [-1, -1, -1]),
]
PREPROCESSING_INPUTS: list[tuple[str, str, list[int], bool]] = [
    ("QUERY", "BYTES", [1], False),
    ("DECODER_QUERY", "BYTES", [1], True),
    ("REQUEST_OUTPUT_LEN", "INT32", [1], False),
    ("BAD_WORDS_DICT", "BYTES", [-1], True),
    ("STOP_WORDS_DICT", "BYTES", [-1], True),
    ("EMBEDDING_BIAS_WORDS", "BYTES", [-1], True),
    ("EMBEDDING_BIAS_WEIGHTS", "FP32", [-1], True),
    ("END_ID", "INT32", [1], True),
    ("PAD_ID", "INT32", [1], True),
]
PREPROCESSING_OUTPUTS: list[tuple[str, str, list[int]]] = [
    ("INPUT_ID", "INT32", [-1]),
    ("REQUEST_INPUT_LEN", "INT32", [1]),
    ("OUT_END_ID", "INT32", [1]),
    ("OUT_PAD_ID", "INT32", [1]),
]
NUMPY = {
    "INT32": np.int32, "UINT32": np.uint32, "INT64": np.int64, "UINT64": np.uint64,
    "FP32": np.float32, "FP16": np.float16, "BOOL": np.bool_,
}  # fmt: skip


class Refused(Exception):
    """A request Triton (or TensorRT-LLM) would refuse: INVALID_ARGUMENT."""


class _Model:
    """One served model's declared tensors (what ModelMetadata and ModelConfig say)."""

    def __init__(self, name: str, platform: str, inputs: list[Any], outputs: list[Any],
                 parameters: dict[str, str]) -> None:  # fmt: skip
        self.name, self.platform = name, platform
        self.inputs = {n: (dtype, dims, optional) for n, dtype, dims, optional in inputs}
        self.outputs = {n: (dtype, dims) for n, dtype, dims in outputs}
        self.parameters = parameters

    def metadata(self) -> Any:
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=self.name, versions=["1"], platform=self.platform,
            inputs=[tensor(name=n, datatype=d, shape=[-1, *s]) for n, (d, s, _) in
                    self.inputs.items()],
            outputs=[tensor(name=n, datatype=d, shape=[-1, *s]) for n, (d, s) in
                     self.outputs.items()],
        )  # fmt: skip

    def config(self) -> Any:
        kind = {"BYTES": "TYPE_STRING"}
        return model_config_pb2.ModelConfig(
            name=self.name, backend=self.platform, max_batch_size=MAX_BATCH_SIZE,
            input=[model_config_pb2.ModelInput(
                name=n, data_type=kind.get(d, f"TYPE_{d}"), dims=s, optional=o)
                for n, (d, s, o) in self.inputs.items()],
            output=[model_config_pb2.ModelOutput(
                name=n, data_type=kind.get(d, f"TYPE_{d}"), dims=s)
                for n, (d, s) in self.outputs.items()],
            parameters={k: model_config_pb2.ModelParameter(string_value=v)
                        for k, v in self.parameters.items()},
        )  # fmt: skip

    def decode(self, request: Any) -> dict[str, np.ndarray]:
        """The request's inputs as arrays, after Triton's checks (``Refused`` if not)."""
        if len(request.raw_input_contents) != len(request.inputs):
            raise Refused("the stand-in reads raw_input_contents only")
        arrays = {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            if tensor.name not in self.inputs:
                raise Refused(f"unexpected inference input '{tensor.name}' for model "
                              f"'{self.name}'")  # fmt: skip
            dtype, dims, _ = self.inputs[tensor.name]
            if tensor.datatype != dtype:
                raise Refused(f"unexpected datatype TYPE_{tensor.datatype} for inference "
                              f"input '{tensor.name}', expecting TYPE_{dtype}")  # fmt: skip
            shape = list(tensor.shape)
            ok = len(shape) == len(dims) + 1 and all(
                d in (-1, s) for d, s in zip(dims, shape[1:], strict=True)
            )
            if not ok or not 1 <= shape[0] <= MAX_BATCH_SIZE:
                raise Refused(f"unexpected shape for input '{tensor.name}' for model "
                              f"'{self.name}'. Expected [-1,{','.join(map(str, dims))}], "
                              f"got {shape}")  # fmt: skip
            arrays[tensor.name] = _array(raw, dtype, shape, tensor.name)
        missing = [n for n, (_, _, opt) in self.inputs.items() if not opt and n not in arrays]
        if missing:
            raise Refused(f"expected {len(missing)} more inputs for model '{self.name}': "
                          f"{missing}")  # fmt: skip
        if any(a.shape[0] != 1 for a in arrays.values()):
            raise Refused("the stand-in serves one request per ModelInfer (batch 1)")
        for output in request.outputs:
            if output.name not in self.outputs:
                raise Refused(f"unexpected inference output '{output.name}' for model "
                              f"'{self.name}'")  # fmt: skip
        return arrays


def _array(raw: bytes, dtype: str, shape: list[int], name: str) -> np.ndarray:
    if dtype == "BYTES":
        values = deserialize_bytes_tensor(raw)
        if values.size != math.prod(shape):
            raise Refused(f"input '{name}': {values.size} elements for shape {shape}")
        return values.reshape(shape)
    size = math.prod(shape) * np.dtype(NUMPY[dtype]).itemsize
    if len(raw) != size:
        raise Refused(f"input byte size mismatch for input '{name}': expected {size} "
                      f"bytes, got {len(raw)}")  # fmt: skip
    return np.frombuffer(raw, dtype=NUMPY[dtype]).reshape(shape)


class TritonStandin:
    """Triton's gRPC service on 127.0.0.1 over ``runner`` (a CausalLMRunner), in threads."""

    def __init__(
        self,
        runner: CausalLMRunner,
        exclude_input_in_output: bool = True,
        max_draft_len: int = 10,
        port: int = 0,
    ) -> None:
        self.runner = runner
        self.tokenizer = runner.tokenizer
        self.max_context = runner.max_context
        self.max_draft_len = max_draft_len
        self.models = {
            "tensorrt_llm": _Model("tensorrt_llm", "tensorrtllm", TRTLLM_INPUTS, TRTLLM_OUTPUTS,
                                   {"exclude_input_in_output": str(exclude_input_in_output),
                                    "enable_kv_cache_reuse": "True"}),
            "preprocessing": _Model("preprocessing", "python", PREPROCESSING_INPUTS,
                                    PREPROCESSING_OUTPUTS, {"add_special_tokens": "False"}),
        }  # fmt: skip
        self.exclude_input_in_output = exclude_input_in_output
        self._lock = threading.Lock()  # one model, one forward at a time (as one GPU)
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._cache_ids = itertools.count()
        self._prefix = f"triton-standin-{next(_standin_ids)}"
        self.port = port
        self._delay_s = 0.0
        self._calm = threading.Event()  # set: a delay in progress ends at once
        self.die_after_requests: int | None = None
        self.infer_calls = 0
        self.max_in_flight = 0  # most ModelInfers in the server at once
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self._stopped = threading.Event()
        self.rejected: list[str] = []  # every INVALID_ARGUMENT answered
        self._server: grpc.Server | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def delay_s(self) -> float:
        return self._delay_s

    @delay_s.setter
    def delay_s(self, seconds: float) -> None:
        """Every ModelInfer waits this long first; setting 0 ends the waits under way."""
        self._delay_s = seconds
        if seconds:
            self._calm.clear()
        else:
            self._calm.set()

    def start(self) -> TritonStandin:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(self), server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self._server = server
        self._stopped.clear()
        return self

    def stop(self) -> None:
        """Stop at once, calls in flight cut off; drop the KV cache (a cold restart)."""
        server, self._server = self._server, None
        self.delay_s = 0.0
        self._stopped.set()
        if server is not None:
            server.stop(grace=None).wait()
        with self._lock:
            for cache_id in self._cache:
                self.runner.release(cache_id)
            self._cache.clear()

    # -- tensorrt_llm --------------------------------------------------------------------

    def trtllm(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """TensorRT-LLM's answer: output_ids [1, 1, T], sequence_length [1, 1]."""
        length = int(inputs["input_lengths"].reshape(-1)[0])
        ids = [int(t) for t in inputs["input_ids"][0]]
        if length != len(ids) or length < 1:
            raise Refused(f"input_lengths {length} does not match input_ids of {len(ids)}")
        draft = [int(t) for t in inputs.get("draft_input_ids", np.zeros((1, 0)))[0]]
        out_len = int(inputs["request_output_len"].reshape(-1)[0])
        self._check_request(inputs, ids, draft, out_len)
        end = inputs.get("end_id")
        with self._lock:
            generated = self._generate(ids, draft, out_len, None if end is None else int(end))
        tokens = generated if self.exclude_input_in_output else ids + generated
        return {
            "output_ids": np.array([[tokens]], dtype=np.int32),
            "sequence_length": np.array([[len(tokens)]], dtype=np.int32),
        }

    def _check_request(self, inputs: dict[str, np.ndarray], ids: list[int], draft: list[int],
                       out_len: int) -> None:  # fmt: skip
        vocab = self.runner.vocab_size
        if out_len < 1:
            raise Refused("request_output_len must be at least 1")
        if len(draft) > self.max_draft_len:
            raise Refused(f"draft tokens ({len(draft)}) exceed max_draft_len "
                          f"({self.max_draft_len})")  # fmt: skip
        if any(not 0 <= t < vocab for t in ids + draft):
            raise Refused(f"token ids must be in [0, {vocab})")
        if len(ids) + len(draft) + out_len > self.max_context:
            raise Refused(f"{len(ids)} input + {out_len} output tokens exceed max_seq_len "
                          f"{self.max_context}")  # fmt: skip
        if int(inputs.get("runtime_top_k", np.ones(1)).reshape(-1)[0]) != 1:
            raise Refused("the stand-in decodes greedily only (runtime_top_k 1)")
        for flag in ("return_context_logits", "return_generation_logits", "streaming"):
            if flag in inputs and bool(inputs[flag].reshape(-1)[0]):
                raise Refused(f"the stand-in does not serve {flag}")

    def _generate(self, ids: list[int], draft: list[int], out_len: int,
                  end_id: int | None) -> list[int]:  # fmt: skip
        """The draft accepted while it is the greedy choice, then greedy to ``out_len``."""
        cache_id, rows = self._prefill(ids + draft, len(ids))
        generated: list[int] = []
        for i, token in enumerate([*draft, None]):
            choice = int(torch.argmax(rows[i]))
            generated.append(choice)
            if choice != token or choice == end_id or len(generated) == out_len:
                break
        seq = ids + generated
        self.runner.truncate(cache_id, len(seq) - 1)
        while len(generated) < out_len and generated[-1] != end_id:
            row = self.runner.forward(cache_id, [generated[-1]])[-1]
            generated.append(int(torch.argmax(row)))
            seq.append(generated[-1])
        self._cache[cache_id] = seq[:-1]
        return generated

    def _prefill(self, ids: list[int], start: int) -> tuple[str, torch.Tensor]:
        """Logits after positions ``start - 1`` on, reusing the longest cached prefix
        (never past that position)."""
        best, best_len = None, -1
        for cache_id, tokens in self._cache.items():
            common = 0
            for a, b in zip(tokens, ids[: start - 1], strict=False):
                if a != b:
                    break
                common += 1
            if common > best_len:
                best, best_len = cache_id, common
        if best is None or (best_len == 0 and len(self._cache) < CACHE_ENTRIES):
            best, best_len = f"{self._prefix}-{next(self._cache_ids)}", 0
            self.runner.start(best)
        self._cache[best] = []
        self._cache.move_to_end(best)
        self.runner.truncate(best, min(best_len, self.runner.cached_len(best)))
        logits = self.runner.forward(best, ids[best_len:])
        self._cache[best] = list(ids)
        while len(self._cache) > CACHE_ENTRIES:
            old, _ = self._cache.popitem(last=False)
            self.runner.release(old)
        return best, logits[start - 1 - best_len :]

    # -- preprocessing -----------------------------------------------------------------

    def preprocessing(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        text = inputs["QUERY"].reshape(-1)[0].decode()
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        return {
            "INPUT_ID": np.array([ids], dtype=np.int32),
            "REQUEST_INPUT_LEN": np.array([[len(ids)]], dtype=np.int32),
            "OUT_END_ID": np.array([[eos]], dtype=np.int32),
            "OUT_PAD_ID": np.array([[eos if pad is None else pad]], dtype=np.int32),
        }


class _Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 RPCs the backend uses; the rest answer UNIMPLEMENTED (the base's)."""

    def __init__(self, owner: TritonStandin) -> None:
        self.owner = owner

    def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's name
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.ModelReadyResponse(ready=request.name in self.owner.models)

    def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return self._model(request.name, context).metadata()

    def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.ModelConfigResponse(config=self._model(request.name, context).config())

    def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        owner = self.owner
        with owner._count_lock:
            owner.infer_calls += 1
            owner._in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner._in_flight)
        try:
            return self._infer(request, context)
        finally:
            with owner._count_lock:
                owner._in_flight -= 1

    def _infer(self, request: Any, context: Any) -> Any:
        owner = self.owner
        if owner.die_after_requests is not None:
            owner.die_after_requests -= 1
            if owner.die_after_requests <= 0:
                owner.die_after_requests = None
                threading.Thread(target=owner.stop, daemon=True).start()
                owner._stopped.wait(30.0)  # cut off by the stop; never answered
                context.abort(grpc.StatusCode.UNAVAILABLE, "server stopped")
        if owner.delay_s:
            owner._calm.wait(owner.delay_s)
        model = self._model(request.model_name, context)
        try:
            inputs = model.decode(request)
            run = owner.trtllm if model.name == "tensorrt_llm" else owner.preprocessing
            outputs = run(inputs)
        except Refused as exc:
            owner.rejected.append(str(exc))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"[request id: {request.id}] {exc}")
        wanted = [o.name for o in request.outputs] or list(outputs)
        return _response(request, [(n, model.outputs[n][0], outputs[n]) for n in wanted
                                   if n in outputs])  # fmt: skip

    def _model(self, name: str, context: Any) -> _Model:
        if name not in self.owner.models:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"Request for unknown model: '{name}' is not found")  # fmt: skip
        return self.owner.models[name]


def _response(request: Any, outputs: list[tuple[str, str, np.ndarray]]) -> Any:
    tensor = service_pb2.ModelInferResponse.InferOutputTensor
    raw = [
        serialize_byte_tensor(a).tobytes() if d == "BYTES" else a.astype(NUMPY[d]).tobytes()
        for _, d, a in outputs
    ]
    return service_pb2.ModelInferResponse(
        model_name=request.model_name, model_version="1", id=request.id,
        outputs=[tensor(name=n, datatype=d, shape=list(a.shape)) for n, d, a in outputs],
        raw_output_contents=raw,
    )  # fmt: skip

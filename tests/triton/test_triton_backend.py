"""TritonBackend: greedy output through Triton (TensorRT-LLM's draft-token mode) equals
the torch backend's, token for token, and a fault fails a request as UNAVAILABLE, never
with a wrong token."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from atlas_sidecar import models
from atlas_sidecar.engine.backends.base import ForwardItem
from atlas_sidecar.engine.backends.sglang import target_spec
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.backends.triton import (
    TritonBackend,
    TritonError,
    TritonUnavailable,
    grpc_address,
)
from atlas_sidecar.engine.build import build_engine
from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.errors import BackendUnavailable, RequestError
from atlas_sidecar.serving.app import ServerConfig, ServerThread
from atlas_sidecar.serving.client import AtlasClient, AtlasError
from atlas_sidecar.tooling.workloads import Prompt, encode
from tests.health import NOT_SERVING, SERVING, wait_health
from tests.standins.triton_server import TritonStandin

from .conftest import AGREEING_LAYERS, MAX_TOKENS

GREEDY = SamplingParams(max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def reference(torch_target: CausalLMRunner, prompts: list[list[int]]) -> list[list[int]]:
    engine = Engine(torch_target, torch_target.tokenizer)
    return [engine.generate(p, GREEDY).token_ids for p in prompts]


def _torch_rows(torch_target: CausalLMRunner, ids: list[int]) -> list[int]:
    """The torch backend's greedy choice after every position of ``ids``."""
    torch_target.start("ref")
    try:
        return torch_target.forward("ref", ids).argmax(-1).tolist()
    finally:
        torch_target.release("ref")


def _tensor(name: str, values: list, datatype: str = "INT32") -> grpcclient.InferInput:
    array = np.array([values], dtype=np.int64 if datatype == "INT64" else np.int32)
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


# -- exactness ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "static", "atlas"])
def test_greedy_output_through_triton_equals_the_torch_backend(
    mode, backend, draft_model, prompts, reference, no_rejections
):
    engine = build_engine(mode, backend, draft_model if mode != "none" else None, 4)
    results = [engine.generate(p, GREEDY) for p in prompts]
    assert [r.token_ids for r in results] == reference
    if mode != "none":  # the drafts were verified by the server, not skipped
        assert sum(r.accepted for r in results) > 0
    assert backend.live_sequences == 0


def test_batched_steps_send_one_concurrent_request_per_sequence_and_equal_torch(
    backend, standin, draft_model, prompts, reference, no_rejections
):
    engine = build_engine("static", backend, draft_model, 4)
    seqs = [engine.start(p, GREEDY) for p in prompts[1:3]]  # a HumanEval, an MT-Bench
    calls_before, sent = backend.calls, 0
    standin.max_in_flight = 0
    try:
        while live := [s for s in seqs if not s.finished]:
            engine.step_many(live)
            sent += len(live)
    finally:
        for seq in seqs:
            engine.release(seq)
    assert [s.output for s in seqs] == reference[1:3]
    assert backend.calls - calls_before == sent  # one ModelInfer per sequence a step
    assert standin.max_in_flight > 1  # sent together, for Triton's in-flight batcher


def test_forward_is_context_and_forward_many_a_draft_verify(
    backend, torch_target, prompts, no_rejections
):
    prompt = prompts[0]
    want = _torch_rows(torch_target, prompt + [504, 3458, 314])
    backend.start("s")
    try:
        rows = backend.forward("s", prompt)
        assert int(rows[-1].argmax()) == want[len(prompt) - 1]
        assert rows[:-1].isinf().all()  # no per-position choice for context tokens
        right = want[len(prompt) - 1]  # the target's own next token, then a wrong draft
        rows = backend.forward_many([ForwardItem("s", [right, right, 504])])[0]
        choices = _torch_rows(torch_target, prompt + [right, right, 504])[len(prompt) :]
        assert int(rows[0].argmax()) == choices[0]
        if choices[0] != right:  # the first draft token rejected: the rest is unknown
            assert rows[1:].isinf().all()
        else:
            assert int(rows[1].argmax()) == choices[1]
        assert backend.cached_len("s") == len(prompt) + 3
    finally:
        backend.release("s")


def test_a_draft_past_max_draft_len_is_verified_in_several_requests(
    standin, prompts, reference, no_rejections
):
    backend = TritonBackend(standin.url, target_spec(models.TEST_MODEL), max_draft_len=2)
    backend.wait_ready(timeout_s=30)
    greedy = reference[1]  # the target's own tokens after prompts[1]: all accepted
    assert len(greedy) >= 8
    wrong = (greedy[3] + 1) % backend.vocab_size
    for seq in ("long", "cut"):
        backend.start(seq)
        backend.forward(seq, prompts[1])
    try:
        calls = standin.infer_calls
        long, cut = backend.forward_many([
            ForwardItem("long", greedy[:7]),  # 6 drafts: 2 + 2 + 2, each all accepted
            ForwardItem("cut", [*greedy[:3], wrong, *greedy[4:6]]),  # ends in request 1
        ])  # fmt: skip
        assert standin.infer_calls - calls == 4
        assert long.argmax(-1).tolist() == greedy[1:8]
        assert cut[:3].argmax(-1).tolist() == greedy[1:4]
        assert cut[3:].isinf().all()
    finally:
        backend.release("long")
        backend.release("cut")
        backend.close()


def test_tree_items_are_refused_not_verified_wrong(backend):
    backend.start("t")
    with pytest.raises(ValueError, match="chains only"):
        backend.forward_many([ForwardItem("t", [1, 2, 3], [-1, 0, 0])])
    backend.release("t")


def test_sampled_requests_are_refused_on_a_greedy_only_backend(backend, prompts):
    engine = Engine(backend, backend.tokenizer)
    with pytest.raises(RequestError) as info:
        engine.start(prompts[0], SamplingParams(max_tokens=4, temperature=0.8))
    assert info.value.field == "temperature"
    assert backend.live_sequences == 0


def test_output_ids_with_the_input_echoed_are_read_right(served_model, draft_model, prompts,
                                                         reference):  # fmt: skip
    standin = TritonStandin(served_model, exclude_input_in_output=False).start()
    backend = TritonBackend(standin.url, target_spec(models.TEST_MODEL))
    try:
        backend.wait_ready(timeout_s=30)
        assert backend.exclude_input_in_output is False
        engine = build_engine("static", backend, draft_model, 4)
        assert engine.generate(prompts[2], GREEDY).token_ids == reference[2]
        assert standin.rejected == []
    finally:
        backend.close()
        standin.stop()


# -- the stand-in holds the backend to Triton's checks -------------------------------------


def test_standin_refuses_what_triton_refuses(standin):
    client = grpcclient.InferenceServerClient(standin.url)
    ok = [_tensor("input_ids", [1, 504, 3458]), _tensor("input_lengths", [3]),
          _tensor("request_output_len", [2]), _tensor("draft_input_ids", [314]),
          _tensor("runtime_top_k", [1])]  # fmt: skip
    assert client.infer("tensorrt_llm", ok).as_numpy("output_ids").shape[:2] == (1, 1)
    bad = [
        [*ok, _tensor("no_such_input", [1])],
        [_tensor("input_ids", [1, 504, 3458], "INT64"), *ok[1:]],  # the wrong datatype
        [*ok[:1], _tensor("input_lengths", [3, 3]), *ok[2:]],  # the wrong shape
        ok[1:],  # input_ids missing
        [*ok[:3], _tensor("draft_input_ids", list(range(11))), ok[4]],  # > max_draft_len
    ]
    for inputs in bad:
        with pytest.raises(InferenceServerException) as info:
            client.infer("tensorrt_llm", inputs)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
    with pytest.raises(InferenceServerException, match="unexpected inference output"):
        client.infer("tensorrt_llm", ok, outputs=[grpcclient.InferRequestedOutput("nope")])
    assert len(standin.rejected) == len(bad) + 1
    standin.rejected.clear()
    meta = client.get_model_metadata("tensorrt_llm", as_json=True)
    assert {"input_ids", "draft_input_ids", "return_context_logits"} <= {
        i["name"] for i in meta["inputs"]
    }
    client.close()


def test_standin_answers_as_tensorrt_llms_draft_mode(standin, torch_target):
    """Accepted draft tokens, the target's own, then greedy on to request_output_len."""
    ids = [1, 504, 3458, 314]
    choices = _torch_rows(torch_target, ids)
    draft = [choices[-1], (choices[-1] + 1) % 1000, 7]
    client = grpcclient.InferenceServerClient(standin.url)
    result = client.infer("tensorrt_llm", [
        _tensor("input_ids", ids), _tensor("input_lengths", [4]),
        _tensor("request_output_len", [4]), _tensor("draft_input_ids", draft),
        _tensor("runtime_top_k", [1]),
    ])  # fmt: skip
    client.close()
    out = result.as_numpy("output_ids")[0, 0].tolist()
    greedy = _torch_rows(torch_target, ids + out[:-1])[len(ids) - 1 :]
    assert out[0] == draft[0] and out[1] != draft[1]  # one accepted, then the target's
    assert out == greedy and len(out) == 4
    assert result.as_numpy("sequence_length").tolist() == [[4]]


# -- start-up -----------------------------------------------------------------------------


def test_urls_are_grpc_host_port():
    assert grpc_address("grpc://triton:8001") == "triton:8001"
    with pytest.raises(ValueError, match="host:port"):
        grpc_address("http://triton:8000")


def test_startup_refuses_a_model_that_cannot_take_drafts(standin):
    backend = TritonBackend(standin.url, target_spec(models.TEST_MODEL), model="preprocessing")
    with pytest.raises(TritonError, match="draft_tokens_external"):
        backend.wait_ready(timeout_s=30)


def test_startup_refuses_a_server_with_another_tokenizer(standin):
    qwen = "qwen2.5-coder-0.5b-instruct"
    if not models.is_pulled(qwen):
        pytest.skip(f"{qwen} is not pulled (its tokenizer is the mismatch)")
    backend = TritonBackend(standin.url, target_spec(qwen))
    with pytest.raises(TritonError, match="tokenizer mismatch"):
        backend.wait_ready(timeout_s=30)


def test_startup_gives_up_on_an_absent_server_with_a_clear_error(standin):
    url = standin.url
    standin.stop()
    backend = TritonBackend(url, target_spec(models.TEST_MODEL))
    with pytest.raises(TritonUnavailable, match="not ready after"):
        backend.wait_ready(timeout_s=0.5, poll_s=0.1)


# -- faults ---------------------------------------------------------------------------------


def test_killed_mid_request_fails_unavailable_then_the_next_request_succeeds(
    backend, standin, draft_model, prompts, reference
):
    engine = build_engine("static", backend, draft_model, 4)
    standin.die_after_requests = 3  # the prefill and a step answer, the next call dies
    with pytest.raises(BackendUnavailable):
        engine.generate(prompts[0], GREEDY)
    assert not standin.running
    assert backend.live_sequences == 0
    standin.start()  # back on the same port, cold cache
    assert engine.generate(prompts[0], GREEDY).token_ids == reference[0]


def test_a_slow_server_fails_the_call_at_its_timeout(standin, prompts, reference):
    backend = TritonBackend(standin.url, target_spec(models.TEST_MODEL), timeout_s=2.0)
    backend.wait_ready(timeout_s=30)
    engine = Engine(backend, backend.tokenizer)
    standin.delay_s = 600.0  # ends when reset below
    started = time.monotonic()
    with pytest.raises(TritonUnavailable, match="did not answer"):
        engine.generate(prompts[0], GREEDY)
    assert time.monotonic() - started < 4.0
    standin.delay_s = 0.0
    assert engine.generate(prompts[0], GREEDY).token_ids == reference[0]
    backend.close()


def test_sequences_of_an_unanswered_call_fail_fast_after_it(backend, standin, prompts):
    backend.start("s")
    try:
        backend.forward("s", prompts[0])
        standin.die_after_requests = 1
        with pytest.raises(TritonUnavailable):
            backend.forward("s", [504])
        standin.start()
        calls = standin.infer_calls
        with pytest.raises(TritonUnavailable, match="an earlier Triton call failed"):
            backend.forward("s", [504])
        assert standin.infer_calls == calls  # no second wait on Triton
    finally:
        backend.release("s")
    backend.start("s")  # released, the id is usable again
    assert backend.forward("s", prompts[0]).shape[0] == len(prompts[0])
    backend.release("s")


def test_a_refused_call_leaves_its_sequences_usable(backend, standin, torch_target, prompts):
    backend.start("good")
    backend.start("bad")
    try:
        backend.forward("good", prompts[0])
        with pytest.raises(TritonError, match="INVALID_ARGUMENT"):
            backend.forward_many([ForwardItem("good", [504]), ForwardItem("bad", [10**6])])
        assert backend.cached_len("good") == len(prompts[0])  # as before the refused call
        row = backend.forward("good", [504])[-1]
        assert int(row.argmax()) == _torch_rows(torch_target, [*prompts[0], 504])[-1]
    finally:
        backend.release("good")
        backend.release("bad")
    assert len(standin.rejected) == 1
    standin.rejected.clear()


# -- over gRPC --------------------------------------------------------------------------------


CHAT = "Name a color."


@pytest.fixture(scope="module")
def chat_reference(torch_target: CausalLMRunner) -> list[int]:
    ids = encode(torch_target.tokenizer, Prompt("t", "t", (("user", CHAT),)))
    return Engine(torch_target, torch_target.tokenizer).generate(ids, GREEDY).token_ids


def test_grpc_generate_over_triton_is_exact_faults_unavailable_and_health_follows(
    backend, standin, draft_model, chat_reference
):
    engine = build_engine("static", backend, draft_model, 4)
    server = ServerThread(engine, ServerConfig(port=0, metrics_port=None)).start()
    try:
        with AtlasClient(server.address, timeout=120) as client:
            chat = [{"role": "user", "content": CHAT}]
            result = client.generate(messages=chat, max_tokens=MAX_TOKENS)
            assert list(result.token_ids) == chat_reference
            standin.die_after_requests = 1
            with pytest.raises(AtlasError) as info:
                client.generate(messages=chat, max_tokens=MAX_TOKENS)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            wait_health(server.address, NOT_SERVING, within_s=5.0)
            standin.start()
            wait_health(server.address, SERVING)
            standin.delay_s = 600.0  # ends when reset below
            with pytest.raises(AtlasError) as info:
                client.generate(messages=chat, max_tokens=MAX_TOKENS, timeout=1.0)
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            standin.delay_s = 0.0
            result = client.generate(messages=chat, max_tokens=MAX_TOKENS)
            assert list(result.token_ids) == chat_reference
    finally:
        server.stop()


def test_atlas_serve_backend_triton_answers_like_the_torch_backend(
    standin: TritonStandin, chat_reference, no_rejections
):
    process = subprocess.Popen(
        [sys.executable, "-m", "atlas_sidecar.cli", "serve", "--port", "0",
         "--metrics-port", "0", "--backend", "triton", "--triton-url", standin.url,
         "--target", models.TEST_MODEL, "--dtype", "fp32", "--speculator", "static",
         "--draft-num-layers", str(AGREEING_LAYERS), "--triton-wait", "60"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port, seen = None, []
        for line in process.stderr:  # type: ignore[union-attr]
            seen.append(line)
            if match := re.search(r"serving atlas\.v1\.Atlas on [\d.]+:(\d+)", line):
                port = int(match.group(1))
                break
        assert port, "the server never reported its port:\n" + "".join(seen[-20:])
        assert any("Triton tokenizer matches" in line for line in seen)
        with AtlasClient(f"127.0.0.1:{port}", timeout=120) as client:
            chat = [{"role": "user", "content": CHAT}]
            result = client.generate(messages=chat, max_tokens=MAX_TOKENS)
        assert list(result.token_ids) == chat_reference
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()

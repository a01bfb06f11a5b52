"""SGLangBackend: greedy output through SGLang equals the torch backend's, token for
token, and a fault fails a request as UNAVAILABLE, never with a wrong token."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest
import torch

from atlas_sidecar import models
from atlas_sidecar.engine.backends.base import ForwardItem
from atlas_sidecar.engine.backends.sglang import (
    SGLangBackend,
    SGLangError,
    SGLangUnavailable,
    target_spec,
)
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.build import build_engine
from atlas_sidecar.engine.controller import FixedPolicy
from atlas_sidecar.engine.core import Engine, draft_breach
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.base import DraftRequest
from atlas_sidecar.engine.speculators.suffix import SuffixSpeculator
from atlas_sidecar.engine.tree import DraftTree
from atlas_sidecar.errors import BackendUnavailable, RequestError
from atlas_sidecar.serving.app import ServerConfig, ServerThread
from atlas_sidecar.serving.client import AtlasClient, AtlasError
from atlas_sidecar.tooling.workloads import Prompt, encode
from tests.health import NOT_SERVING, SERVING, health, wait_health
from tests.standins.sglang_server import SGLangStandin

from .conftest import AGREEING_LAYERS, MAX_TOKENS

GREEDY = SamplingParams(max_tokens=MAX_TOKENS)


def _torch_outputs(torch_target: CausalLMRunner, prompts: list[list[int]]) -> list[list[int]]:
    engine = Engine(torch_target, torch_target.tokenizer)
    return [engine.generate(p, GREEDY).token_ids for p in prompts]


@pytest.fixture(scope="module")
def reference(torch_target: CausalLMRunner, prompts: list[list[int]]) -> list[list[int]]:
    return _torch_outputs(torch_target, prompts)


def _post(url: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- exactness ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "static", "atlas"])
def test_greedy_output_through_sglang_equals_the_torch_backend(
    mode, backend, draft_model, prompts, reference, no_rejections
):
    engine = build_engine(mode, backend, draft_model if mode != "none" else None, 4)
    results = [engine.generate(p, GREEDY) for p in prompts]
    assert [r.token_ids for r in results] == reference
    assert all(len(r.token_ids) > 0 for r in results)
    if mode != "none":  # the drafts were verified by SGLang, not skipped
        assert sum(r.accepted for r in results) > 0
    assert backend.live_sequences == 0


def test_batched_steps_verify_every_sequence_in_one_call_and_equal_torch(
    backend, draft_model, prompts, reference, no_rejections
):
    engine = build_engine("static", backend, draft_model, 4)
    seqs = [engine.start(p, GREEDY) for p in prompts]
    rounds = 0
    calls_before = backend.calls
    try:
        while live := [s for s in seqs if not s.finished]:
            engine.step_many(live)
            rounds += 1
    finally:
        for seq in seqs:
            engine.release(seq)
    assert [s.output for s in seqs] == reference
    assert backend.calls - calls_before == rounds  # one /generate a step, all sequences


class _Recording(FixedPolicy):
    """The suffix index as a fixed policy, keeping every request and draft it made."""

    def __init__(self) -> None:
        super().__init__(SuffixSpeculator(), 8)
        self.seen: list[tuple[DraftRequest, DraftTree]] = []

    def draft_many(self, requests, batch_size=None):
        out = super().draft_many(requests, batch_size)
        self.seen += [(r, d) for r, (_, d) in zip(requests, out, strict=True)]
        return out


def test_a_backend_without_trees_gets_chains(backend, torch_target, prompts, reference):
    """The engine asks for chains where the target verifies chains only; the suffix
    index, whose evidence splits on a repeated prompt, then drafts its main chain."""
    repeated = prompts[0] + reference[0] + prompts[0]
    for target, trees in ((torch_target, True), (backend, False)):
        policy = _Recording()
        policy.speculator.add_document(prompts[0] + reference[0])
        policy.speculator.add_document(prompts[0] + reference[0][:3] + [reference[0][0]])
        Engine(target, target.tokenizer, policy=policy).generate(repeated, GREEDY)
        assert policy.seen and all(r.trees is trees for r, _ in policy.seen)
        assert any(d.is_tree for _, d in policy.seen) is trees


def test_a_draft_that_breaks_its_contract_is_dropped_not_verified():
    request = DraftRequest("s", [1, 2], lookahead=2, params=GREEDY, trees=False)
    tree = DraftTree(tokens=[11, 12], confidences=[0.9, 0.5], parents=[-1, -1])
    assert draft_breach(tree, request, 100) == "a tree where a chain was asked for"
    assert draft_breach(tree.main_chain(), request, 100) is None
    too_long = DraftTree(tokens=[11, 12, 13], confidences=[0.9] * 3)
    assert draft_breach(too_long, request, 100) == "3 nodes for a lookahead of 2"
    assert draft_breach(DraftTree(tokens=[11, 100], confidences=[0.9] * 2), request, 100) == (
        "a token outside the target's vocabulary"
    )


def test_tree_items_are_refused_not_verified_wrong(backend):
    backend.start("t")
    with pytest.raises(ValueError, match="chains only"):
        backend.forward_many([ForwardItem("t", [1, 2, 3], [-1, 0, 0])])
    backend.release("t")


# -- the stand-in holds the backend to SGLang's checks -------------------------------------


def test_standin_refuses_what_sglang_refuses(standin):
    ok = {
        "input_ids": [1, 2, 3],
        "return_logprob": True,
        "logprob_start_len": 1,
        "top_logprobs_num": 1,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0},
    }
    assert _post(standin.url + "/generate", ok)[0] == 200
    bad = [
        {**ok, "logprob_start_len": 4},  # past the input
        {**ok, "sampling_params": {"max_new_tokens": 1, "temperature": -1}},
        {**ok, "input_ids": [1, 2, 10**9]},  # outside the vocabulary
        {**ok, "input_ids": "not ids"},
        {**ok, "sampling_params": {"max_new_tokens": 1, "temperature": 0.7, "top_p": 1.5}},
        {**ok, "sampling_params": {"max_new_tokens": 1, "sampling_seed": 2**63}},
    ]
    for body in bad:
        status, answer = _post(standin.url + "/generate", body)
        assert status == 400, body
        assert answer["error"]["message"]
    assert len(standin.rejected) == len(bad)
    standin.rejected.clear()


def test_standin_answers_in_sglangs_logprob_layout(standin, torch_target):
    ids = [1, 504, 3458, 314, 260]
    status, answer = _post(standin.url + "/generate", {
        "input_ids": ids, "return_logprob": True, "logprob_start_len": 2, "top_logprobs_num": 1,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0},
    })  # fmt: skip
    assert status == 200
    meta = answer["meta_info"]
    torch_target.start("layout")
    try:
        rows = torch_target.forward("layout", ids)
    finally:
        torch_target.release("layout")
    assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"]) == 3
    for k in (1, 2):  # entry k: the distribution after position 2 + k - 1
        assert meta["input_top_logprobs"][k][0][1] == int(rows[2 + k - 1].argmax())
        assert meta["input_token_logprobs"][k][1] == ids[2 + k]
    assert answer["output_ids"] == [int(rows[-1].argmax())]
    assert meta["finish_reason"]["type"] in ("length", "stop")
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (len(ids), 1)


def test_standin_samples_as_sglang_with_tempered_output_logprobs(standin, torch_target):
    """A sampled token from SGLang's top-k sampler, reproducible by seed; output
    logprobs of the tempered softmax (raw ones as SGLANG_RETURN_ORIGINAL_LOGPROB)."""
    ids = [1, 504, 3458, 314, 260]
    torch_target.start("sampled")
    try:
        row = torch_target.forward("sampled", ids)[-1].float()
    finally:
        torch_target.release("sampled")
    tempered, raw = torch.log_softmax(row / 0.5, dim=-1), torch.log_softmax(row, dim=-1)
    asked = int(row.argsort()[-3])

    def sample(seed: int) -> dict[str, Any]:
        status, answer = _post(standin.url + "/generate", {
            "input_ids": ids, "return_logprob": True, "top_logprobs_num": 5,
            "token_ids_logprob": [asked],
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.5, "top_k": 5,
                                "sampling_seed": seed},
        })  # fmt: skip
        assert status == 200, answer
        return answer

    answers = [sample(seed) for seed in range(12)]
    tokens = [a["output_ids"][0] for a in answers]
    assert set(tokens) <= set(row.topk(5).indices.tolist())
    assert sample(3)["output_ids"] == answers[3]["output_ids"]
    meta = answers[0]["meta_info"]
    assert [e[1] for e in meta["output_top_logprobs"][0]] == row.topk(5).indices.tolist()
    assert meta["output_token_ids_logprobs"][0][0][1] == asked
    torch.testing.assert_close(
        meta["output_token_ids_logprobs"][0][0][0], float(tempered[asked]), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        meta["output_token_logprobs"][0][0], float(tempered[tokens[0]]), atol=1e-4, rtol=0
    )
    standin.return_original_logprob = True
    meta = sample(0)["meta_info"]
    torch.testing.assert_close(
        meta["output_token_ids_logprobs"][0][0][0], float(raw[asked]), atol=1e-4, rtol=0
    )


# -- start-up -----------------------------------------------------------------------------


def test_startup_takes_sglangs_shorter_context(standin):
    standin.context_len = 512
    try:
        backend = SGLangBackend(standin.url, target_spec(models.TEST_MODEL))
        assert backend.max_context == 8192  # the model's own
        backend.wait_ready(timeout_s=30)
        assert backend.max_context == 512
        with pytest.raises(RequestError):  # refused before SGLang would refuse it
            Engine(backend, backend.tokenizer).start([1] * 600, GREEDY)
    finally:
        standin.context_len = standin.runner.max_context


def test_startup_refuses_a_server_with_another_tokenizer(standin):
    qwen = "qwen2.5-coder-0.5b-instruct"
    if not models.is_pulled(qwen):
        pytest.skip(f"{qwen} is not pulled (its tokenizer is the mismatch)")
    backend = SGLangBackend(standin.url, target_spec(qwen))
    with pytest.raises(SGLangError, match="tokenizer mismatch"):
        backend.wait_ready(timeout_s=30)


def test_startup_gives_up_on_an_absent_server_with_a_clear_error(standin):
    url = standin.url
    standin.stop()
    backend = SGLangBackend(url, target_spec(models.TEST_MODEL))
    with pytest.raises(SGLangUnavailable, match="not healthy after"):
        backend.wait_ready(timeout_s=0.5, poll_s=0.1)


# -- faults ---------------------------------------------------------------------------------


def test_killed_mid_request_fails_unavailable_then_the_next_request_succeeds(
    backend, standin, draft_model, prompts, reference
):
    engine = build_engine("static", backend, draft_model, 4)
    standin.die_after_requests = 3  # the prefill and a step answer, the next call dies
    with pytest.raises(BackendUnavailable):
        engine.generate(prompts[0], GREEDY)
    assert standin._server is None or standin.die_after_requests is None
    assert backend.live_sequences == 0
    standin.stop()
    standin.start()  # back on the same port, cold cache
    assert engine.generate(prompts[0], GREEDY).token_ids == reference[0]


def test_a_slow_server_fails_the_call_at_its_timeout(standin, prompts, reference):
    backend = SGLangBackend(standin.url, target_spec(models.TEST_MODEL), timeout_s=5.0)
    backend.wait_ready(timeout_s=30)
    engine = Engine(backend, backend.tokenizer)
    standin.delay_s = 600.0  # ends when reset below
    with pytest.raises(SGLangUnavailable, match="did not answer"):
        engine.generate(prompts[0], GREEDY)
    standin.delay_s = 0.0
    assert engine.generate(prompts[0], GREEDY).token_ids == reference[0]


# -- over gRPC --------------------------------------------------------------------------------


CHAT = "Name a color."


@pytest.fixture(scope="module")
def chat_reference(torch_target: CausalLMRunner) -> list[int]:
    ids = encode(torch_target.tokenizer, Prompt("t", "t", (("user", CHAT),)))
    return Engine(torch_target, torch_target.tokenizer).generate(ids, GREEDY).token_ids


def test_grpc_generate_over_sglang_is_exact_and_faults_are_unavailable(
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
            standin.stop()
            standin.start()
            standin.delay_s = 600.0  # ends when reset below
            with pytest.raises(AtlasError) as info:
                client.generate(messages=chat, max_tokens=MAX_TOKENS, timeout=1.0)
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            standin.delay_s = 0.0
            result = client.generate(messages=chat, max_tokens=MAX_TOKENS)
            assert list(result.token_ids) == chat_reference
    finally:
        server.stop()


def test_health_is_not_serving_while_sglang_is_away_and_serving_once_back(
    backend, standin, draft_model, chat_reference
):
    engine = build_engine("static", backend, draft_model, 4)
    server = ServerThread(engine, ServerConfig(port=0, metrics_port=None)).start()
    chat = [{"role": "user", "content": CHAT}]
    try:
        assert health(server.address) == SERVING
        with AtlasClient(server.address, timeout=120) as client:
            standin.die_after_requests = 1  # dies mid-request
            with pytest.raises(AtlasError) as info:
                client.generate(messages=chat, max_tokens=MAX_TOKENS)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            # The failed request wakes the watch: no polling interval of lag.
            assert wait_health(server.address, NOT_SERVING, within_s=1.5) < 1.5
            time.sleep(1.0)  # still away: health stays NOT_SERVING
            assert health(server.address) == NOT_SERVING
            standin.start()  # back, cold cache, no sidecar restart
            wait_health(server.address, SERVING)
            result = client.generate(messages=chat, max_tokens=MAX_TOKENS)
            assert list(result.token_ids) == chat_reference
            standin.stop()  # away with no request to notice: the probe finds it
            wait_health(server.address, NOT_SERVING, within_s=5.0)
            standin.start()
            wait_health(server.address, SERVING)
        assert server.server.target_watch is not None
        assert server.server.target_watch.flips == 4
    finally:
        server.stop()


def test_atlas_serve_backend_sglang_answers_like_the_torch_backend(
    standin: SGLangStandin, chat_reference, no_rejections
):
    process = subprocess.Popen(
        [sys.executable, "-m", "atlas_sidecar.cli", "serve", "--port", "0",
         "--metrics-port", "0", "--backend", "sglang", "--sglang-url", standin.url,
         "--target", models.TEST_MODEL, "--dtype", "fp32", "--speculator", "static",
         "--draft-num-layers", str(AGREEING_LAYERS), "--sglang-wait", "60"],
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
        assert any("SGLang tokenizer matches" in line for line in seen)
        with AtlasClient(f"127.0.0.1:{port}", timeout=120) as client:
            chat = [{"role": "user", "content": CHAT}]
            result = client.generate(messages=chat, max_tokens=MAX_TOKENS)
        assert list(result.token_ids) == chat_reference
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_top2_gap_through_sglang_is_the_targets_logit_gap(backend, torch_target, prompts):
    ids = prompts[0]
    torch_target.start("gap")
    try:
        logits = torch_target.forward("gap", ids)[-1]
    finally:
        torch_target.release("gap")
    top = logits.topk(2).values.tolist()
    assert backend.top2_gap(ids) == pytest.approx(top[0] - top[1], abs=1e-3)


def test_atlas_bench_backend_sglang_verifies_through_the_server(standin, no_rejections, tmp_path):
    from atlas_sidecar.cli import main

    out = tmp_path / "bench.json"
    calls = standin.generate_calls
    code = main(["bench", "--backend", "sglang", "--sglang-url", standin.url,
                 "--sglang-wait", "30", "--target", models.TEST_MODEL,
                 "--draft", models.TEST_MODEL, "--dtype", "fp32", "--workload", "python",
                 "--per-phase", "1", "--max-new-tokens", "12",
                 "--modes", "none,static,atlas,hf_prompt_lookup", "--out", str(out),
                 "--plot", str(tmp_path / "bench.png")])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "sglang"
    assert "in this process" in result["unavailable"]["hf_prompt_lookup"]
    for mode in ("none", "static", "atlas"):
        assert result["modes"][mode]["outputs_match"], mode
    assert result["modes"]["static"]["accept_len"] > 1.0
    assert result["modes"]["atlas"]["costs"]["verify_s"]  # the controller timed the server
    # Every forward went to the server: at least a prefill and a step per mode.
    assert standin.generate_calls - calls >= 6


def test_a_refused_call_leaves_its_sequences_usable(backend, standin, torch_target, prompts):
    backend.start("good")
    backend.start("bad")
    try:
        backend.forward("good", prompts[0])
        with pytest.raises(SGLangError, match="HTTP 400"):
            backend.forward_many([ForwardItem("good", [504]), ForwardItem("bad", [10**9])])
        assert backend.cached_len("good") == len(prompts[0])  # as before the refused call
        row = backend.forward("good", [504])[-1]
        torch_target.start("ref")
        try:
            expected = torch_target.forward("ref", [*prompts[0], 504])[-1]
        finally:
            torch_target.release("ref")
        assert int(row.argmax()) == int(expected.argmax())
    finally:
        backend.release("good")
        backend.release("bad")
    assert len(standin.rejected) == 1
    standin.rejected.clear()


def test_sequences_of_an_unanswered_call_fail_fast_after_it(backend, standin, prompts):
    backend.start("s")
    try:
        backend.forward("s", prompts[0])
        standin.die_after_requests = 1
        with pytest.raises(SGLangUnavailable):
            backend.forward("s", [504])
        standin.stop()
        standin.start()
        calls = standin.generate_calls
        with pytest.raises(SGLangUnavailable, match="an earlier SGLang call failed"):
            backend.forward("s", [504])
        assert standin.generate_calls == calls  # no second wait on SGLang
    finally:
        backend.release("s")
    backend.start("s")  # released, the id is usable again
    assert backend.forward("s", prompts[0]).shape[0] == len(prompts[0])
    backend.release("s")

"""Peers decode with our target and give exactly its greedy output."""

from __future__ import annotations

import json
import sys

import pytest

from atlas_sidecar import models
from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.tooling import bench, peers, workloads

SMOL = models.TEST_MODEL
TOKENS = 12


def _peer(name, target, draft):
    if name == "arctic_suffix":
        pytest.importorskip("arctic_inference.suffix_decoding", reason="run `make peers`")
    return peers.build_peer(name, target, draft)


@pytest.fixture(scope="module")
def prompts(target):
    chosen = workloads.humaneval(1) + workloads.mtbench(1)
    return [workloads.encode(target.tokenizer, p) for p in chosen]


@pytest.fixture(scope="module")
def reference(target, prompts):
    engine = Engine(target, target.tokenizer)
    return [engine.generate(ids, SamplingParams(max_tokens=TOKENS)).token_ids for ids in prompts]


@pytest.mark.parametrize("name", peers.PEERS)
def test_peer_output_is_the_targets_greedy_output(name, target, draft, prompts, reference):
    peer = _peer(name, target, draft)
    for index, (ids, expected) in enumerate(zip(prompts, reference, strict=True)):
        result = peer.generate(ids, SamplingParams(max_tokens=TOKENS))
        assert result.token_ids == expected
        if index == 0:  # the code prompt: every peer finds drafts the target accepts
            assert result.accepted > 0
        # Every new token is accounted for by a target forward: accepted drafts plus the
        # target's own token per forward (arctic: plus the first token, from prefill).
        gained = result.accepted + len(result.steps)
        prefill_token = 1 if name == "arctic_suffix" else 0
        assert gained + prefill_token == len(result.token_ids)
        assert result.accept_len >= 1.0
    assert target.live_sequences == 0


def test_arctic_drafts_from_earlier_responses(target, prompts):
    """Its global cache of responses outlives a request, as in vLLM: the same chat
    request a second time is drafted almost entirely from the first response."""
    pytest.importorskip("arctic_inference.suffix_decoding", reason="run `make peers`")
    peer = peers.build_peer("arctic_suffix", target)
    chat = prompts[1]
    first = peer.generate(chat, SamplingParams(max_tokens=16))
    second = peer.generate(chat, SamplingParams(max_tokens=16))
    assert second.token_ids == first.token_ids
    assert second.accept_len > first.accept_len
    assert second.accept_len >= 2 * first.accept_len


def test_peers_refuse_sampling(target, draft, prompts):
    peer = peers.build_peer("hf_prompt_lookup", target, draft)
    with pytest.raises(ValueError, match="greedy"):
        peer.generate(prompts[0], SamplingParams(max_tokens=4, temperature=0.7))


def test_hf_assisted_without_a_draft_is_unavailable(target):
    with pytest.raises(peers.PeerUnavailable, match="draft"):
        peers.build_peer("hf_assisted", target, None)


def test_missing_arctic_is_skipped_with_the_reason(monkeypatch, tmp_path):
    """Without arctic-inference the bench still runs, says why, and records it."""
    monkeypatch.setitem(sys.modules, "arctic_inference.suffix_decoding", None)
    trace = tmp_path / "trace.jsonl"
    row = {"phase": "sql", "prompt": "Write SQL to count rows.", "max_new_tokens": 4}
    trace.write_text(json.dumps(row) + "\n")
    config = bench.BenchConfig(
        target=SMOL, draft=SMOL, dtype="fp32", prompts_file=str(trace),
        modes=("none", "arctic_suffix"),
    )  # fmt: skip
    messages: list[str] = []
    result = bench.run(config, log=messages.append)
    assert set(result["modes"]) == {"none"}
    assert "make peers" in result["unavailable"]["arctic_suffix"]
    assert any("skipping peer arctic_suffix" in m for m in messages)
    assert "arctic_suffix: unavailable" in bench.format_table(result)
    assert result["best_peer"] is None and result["atlas_vs_best_peer"] is None

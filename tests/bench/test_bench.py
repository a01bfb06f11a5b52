"""`atlas bench` produces the documented JSON shape, the curve, the plot, and checks
outputs against none."""

from __future__ import annotations

import json
import struct

import pytest

from atlas_sidecar import models
from atlas_sidecar.cli import main
from atlas_sidecar.engine.speculators.neural_train import OnlineLearner
from atlas_sidecar.tooling import bench, peers

SMOL = models.TEST_MODEL
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND"
    return width, height


def _check_issue_shape(result: dict) -> None:
    """The shape issue 3 asks for (other fields are welcome)."""
    assert isinstance(result["workload"], str) and isinstance(result["target"], str)
    for mode in result["modes"].values():
        for key in ("tokens_per_s", "speedup", "accept_len"):
            assert isinstance(mode[key], float), key
        assert isinstance(mode["outputs_match"], bool)
        for phase in mode["phases"]:
            assert isinstance(phase["name"], str)
            for key in ("tokens_per_s", "speedup", "accept_len"):
                assert isinstance(phase[key], float), key
    assert "best_peer" in result and "atlas_vs_best_peer" in result


def test_bench_drift_reports_every_mode_phase_and_request(tmp_path, capsys, monkeypatch):
    models.pull(SMOL)
    waited = []  # learners are let finish each request before the next mode decodes
    real_wait_idle = OnlineLearner.wait_idle

    def wait_idle(self, timeout=60.0):
        waited.append(self.submitted)
        return real_wait_idle(self, timeout)

    monkeypatch.setattr(OnlineLearner, "wait_idle", wait_idle)
    out = tmp_path / "quick.json"
    code = main([
        "bench", "--target", SMOL, "--draft", SMOL, "--dtype", "fp32",
        "--per-phase", "1", "--max-new-tokens", "6", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    _check_issue_shape(result)
    assert result["workload"] == "drift"
    assert sorted(waited) == [1, 1, 2, 2, 3, 3]  # neural's and atlas's, after each request
    ran = set(result["modes"]) | set(result["unavailable"])
    assert ran == set(bench.all_modes())
    assert set(peers.PEERS) - {"arctic_suffix"} <= set(result["modes"])
    for name, mode in result["modes"].items():
        assert mode["outputs_match"] is True, name
        assert [p["name"] for p in mode["phases"]] == ["python", "rust", "chat"]
        assert [c["phase"] for c in mode["curve"]] == ["python", "rust", "chat"]
        assert [c["index"] for c in mode["curve"]] == [0, 1, 2]
        assert all(c["speedup"] > 0 for c in mode["curve"])
        # One request a phase: no later requests to compare with, so null.
        assert [(r["to"], r["requests"]) for r in mode["recovery"]] == [
            ("rust", None), ("chat", None),
        ]  # fmt: skip
    assert result["modes"]["none"]["speedup"] == 1.0
    assert result["modes"]["none"]["accept_len"] == 1.0
    assert [c["speedup"] for c in result["modes"]["none"]["curve"]] == [1.0] * 3
    assert result["modes"]["static"]["accept_len"] > 1.5  # self-drafting agrees
    assert result["modes"]["hf_assisted"]["accept_len"] > 1.5  # so does HF's
    assert result["best_peer"] in peers.PEERS
    best = result["modes"][result["best_peer"]]["tokens_per_s"]
    expected = round(result["modes"]["atlas"]["tokens_per_s"] / best, 3)
    assert result["atlas_vs_best_peer"] == pytest.approx(expected, abs=1e-3)
    table = capsys.readouterr().out
    assert "static" in table and "speedup" in table and "hf_prompt_lookup" in table
    assert "recovery" in table and "best peer" in table
    width, height = _png_size(out.with_suffix(".png"))  # the plot lies next to the JSON
    assert width > 400 and height > 300


def test_bench_takes_a_users_trace_with_phases(tmp_path):
    trace = tmp_path / "trace.jsonl"
    rows = [
        {"phase": "sql", "prompt": "Write SQL to count rows in table users.", "max_new_tokens": 5},
        {"phase": "sql", "prompt": "Write SQL to list the ten newest orders.", "max_new_tokens": 5},
        {"phase": "haiku", "prompt": "Write a haiku about rain.", "max_new_tokens": 5},
        {"phase": "haiku", "prompt": "Write a haiku about snow.", "max_new_tokens": 5},
    ]
    trace.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out, plot = tmp_path / "trace.json", tmp_path / "plots" / "curve.png"
    code = main([
        "bench", "--target", SMOL, "--dtype", "fp32", "--prompts", str(trace),
        "--modes", "none,suffix,hf_prompt_lookup", "--out", str(out), "--plot", str(plot),
    ])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    _check_issue_shape(result)
    assert result["workload"] == str(trace)
    assert set(result["modes"]) == {"none", "suffix", "hf_prompt_lookup"}
    assert result["phase_starts"] == [{"index": 0, "phase": "sql"}, {"index": 2, "phase": "haiku"}]
    assert result["best_peer"] == "hf_prompt_lookup"
    assert result["atlas_vs_best_peer"] is None  # atlas did not run
    for mode in result["modes"].values():
        assert mode["tokens"] == 20
        assert [p["name"] for p in mode["phases"]] == ["sql", "haiku"]
        (shift,) = mode["recovery"]
        assert (shift["from"], shift["to"], shift["shift_at"]) == ("sql", "haiku", 2)
    _png_size(plot)
    assert not out.with_suffix(".png").exists()


def test_bench_streams_decodes_n_at_a_time_with_fresh_engines(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    prompts = ["Count to five.", "Name three colors.", "Say hello in French.", "What is 2+2?"]
    trace.write_text("".join(json.dumps({"phase": "chat", "prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "streams.json"
    code = main([
        "bench", "--target", SMOL, "--dtype", "fp32", "--prompts", str(trace), "--streams", "2",
        "--max-new-tokens", "8", "--modes", "suffix,hf_prompt_lookup", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    streams = json.loads(out.read_text())["streams"]
    assert (streams["streams"], streams["prompts"]) == (2, 4)
    # none is added as the reference; peers decode one at a time, so they are absent.
    assert set(streams["modes"]) == {"none", "suffix"}
    assert streams["modes"]["none"]["speedup"] == 1.0
    assert "outputs" not in streams  # token lists are checked, not written out
    for mode in streams["modes"].values():
        assert mode["outputs_match"] is True
        assert mode["outputs_matching"] == 4 and mode["divergences"] == []
        assert mode["tokens_per_s"] > 0
        assert 2 <= mode["target_forwards"] <= 2 * 8  # two batches of two, <= 8 steps each
    forwards = {m: v["target_forwards"] for m, v in streams["modes"].items()}
    assert forwards["suffix"] <= forwards["none"]
    assert "2 concurrent streams, 4 prompts" in capsys.readouterr().out


def test_bench_refuses_negative_streams(capsys):
    assert main(["bench", "--streams", "-1"]) == 2
    assert "--streams must be >= 0" in capsys.readouterr().err


def test_plot_draws_hand_made_curves(tmp_path):
    def curve(values: list[float]) -> list[dict]:
        phases = ["python", "python", "rust", "rust"]
        return [{"index": i, "phase": p, "accept_len": v, "speedup": v / 2}
                for i, (p, v) in enumerate(zip(phases, values, strict=True))]  # fmt: skip

    result = {
        "workload": "drift", "target": "t", "dtype": "fp32",
        "phase_starts": [{"index": 0, "phase": "python"}, {"index": 2, "phase": "rust"}],
        "modes": {"none": {"curve": curve([1, 1, 1, 1])},
                  "suffix": {"curve": curve([3, 4, 1, 2])}},
    }  # fmt: skip
    result["modes"]["none"]["curve"][1]["speedup"] = None  # no reference: a gap
    path = tmp_path / "curve.png"
    bench.plot(result, path)
    width, height = _png_size(path)
    assert width > 400 and height > 300


def test_streams_get_enough_requests_to_fill_their_slots():
    config = bench.BenchConfig(target=SMOL, draft=SMOL, per_phase=1, streams=4)
    prompts = bench.load_prompts(config)
    stream = bench.stream_prompts(config, prompts)
    # 3 requests a slot: 12, in 3 phases of 4, in the drift order, the bench's first.
    assert len(stream) == 12
    assert [p.phase for p in stream] == ["python"] * 4 + ["rust"] * 4 + ["chat"] * 4
    assert [p.prompt_id for p in stream[::4]] == [p.prompt_id for p in prompts]
    # Enough already, or a user's own trace: served as they are.
    assert bench.stream_prompts(bench.BenchConfig(SMOL, SMOL, streams=1), prompts) is prompts
    trace = bench.BenchConfig(SMOL, SMOL, prompts_file="t.jsonl", streams=4)
    assert bench.stream_prompts(trace, prompts) is prompts

"""`atlas bench` produces the documented JSON shape and checks outputs against target_only."""

from __future__ import annotations

import json

from atlas_sidecar import bench, models
from atlas_sidecar.cli import main

SMOL = models.TEST_MODEL


def test_bench_drift_reports_every_mode_and_phase(tmp_path, capsys):
    models.pull(SMOL)
    out = tmp_path / "quick.json"
    code = main([
        "bench", "--target", SMOL, "--draft", SMOL, "--dtype", "fp32",
        "--per-phase", "1", "--max-new-tokens", "8", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["workload"] == "drift"
    assert set(result["modes"]) == set(bench.MODES)
    for mode in result["modes"].values():
        assert mode["outputs_match"] is True
        assert [p["name"] for p in mode["phases"]] == ["python", "rust", "chat"]
        assert len(mode["per_request"]) == 3
    assert result["modes"]["target_only"]["speedup"] == 1.0
    assert result["modes"]["target_only"]["accept_len"] == 1.0
    assert result["modes"]["static"]["accept_len"] > 1.5  # self-drafting agrees
    table = capsys.readouterr().out
    assert "static" in table and "speedup" in table


def test_bench_takes_a_users_trace(tmp_path):
    trace = tmp_path / "trace.jsonl"
    row = '{"phase": "sql", "prompt": "Write SQL to count rows.", "max_new_tokens": 6}'
    trace.write_text(row + "\n")
    config = bench.BenchConfig(
        target=SMOL, draft=SMOL, dtype="fp32", prompts_file=str(trace), modes=("target_only",)
    )
    result = bench.run(config, log=lambda _: None)
    (mode,) = result["modes"].values()
    assert mode["tokens"] == 6
    assert mode["phases"][0]["name"] == "sql"

"""`atlas bench --ablate`: none, the full controller and each part switched off, in one
run on the same models and prompts; every variant's float32 output equals none's."""

from __future__ import annotations

import json

import pytest

from atlas_sidecar import cli, models
from atlas_sidecar.engine.controller import ControllerConfig
from atlas_sidecar.tooling import ablate, bench

SMOL = models.TEST_MODEL


def test_ablate_runs_the_parts_asked_and_matches_none(tmp_path, capsys):
    # Two parts: every part runs the same path (a fresh engine with one switch off),
    # and each variant costs a controller build with its cost profiling.
    models.pull(SMOL)
    out = tmp_path / "ablate.json"
    code = cli.main([
        "bench", "--ablate", "early_exit,runners_up",
        "--target", SMOL, "--draft", SMOL, "--dtype", "fp32",
        "--workload", "python", "--per-phase", "1", "--max-new-tokens", "4", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    parts = ("early_exit", "runners_up")
    assert result["ablated"] == list(parts)
    assert list(result["modes"]) == ["none", "full", *(f"-{p}" for p in parts)]
    for name, entry in result["modes"].items():
        assert entry["outputs_match"] is True, name  # float32: identical to none
        assert entry["divergences"] == [], name
        assert [p["name"] for p in entry["phases"]] == ["python"]
        assert entry["tokens_per_s"] > 0
        if name.startswith("-"):
            assert entry["worth"] > 0
            assert all(p["worth"] > 0 for p in entry["phases"])
            assert result["configs"][name][name[1:]] is False
        else:
            assert entry["worth"] is None
    assert result["modes"]["none"]["speedup"] == 1.0
    assert result["configs"]["none"] is None
    assert all(result["configs"]["full"].values())
    table = capsys.readouterr().out
    for name in result["modes"]:
        assert f"\n{name} " in table
    assert "worth" in table


def test_ablate_flag_selects_parts_and_reaches_the_ablation(monkeypatch, tmp_path):
    called = {}

    def fake_main(config, parts, out, target=None):
        called.update(config=config, parts=parts, out=out, target=target)
        return 0

    monkeypatch.setattr(ablate, "main", fake_main)
    assert cli.main(["bench", "--quick", "--ablate", "calibration,early_exit"]) == 0
    assert called["parts"] == ("calibration", "early_exit")
    assert called["out"] == "bench-out/ablate.json"
    assert called["target"] is None  # --backend torch: the bench loads the target itself
    assert isinstance(called["config"], bench.BenchConfig)
    assert (called["config"].per_phase, called["config"].max_new_tokens) == (2, 64)
    out = str(tmp_path / "a.json")
    assert cli.main(["bench", "--ablate", "--per-phase", "1", "--out", out]) == 0
    assert called["parts"] == ControllerConfig.parts()
    assert called["out"] == out


def test_unknown_part_is_refused():
    with pytest.raises(ValueError, match="unknown controller part"):
        ablate.parse_parts("calibration,warp_drive")
    assert list(ablate.variants(["calibration"])) == ["none", "full", "-calibration"]

"""The hidden-states cost benchmark ships real tensors through SGLang's encoding."""

from __future__ import annotations

import json

import torch

from atlas_sidecar.tooling import featurecost


def test_a_round_carries_every_state_and_its_bytes_grow_with_them():
    generator = torch.Generator().manual_seed(0)
    small, _ = featurecost.one_round(1, 64, 1, generator)
    large, seconds = featurecost.one_round(5, 64, 4, generator)
    assert seconds > 0
    # About 20 times the floats: the wire grows with them (JSON, ~10 bytes a float).
    assert 15 * small < large < 25 * small
    assert large > 5 * 64 * 4 * 5


def test_main_prints_the_table_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(featurecost, "HIDDEN_SIZES", (32,))
    monkeypatch.setattr(featurecost, "BATCHES", (1, 2))
    out = tmp_path / "f.json"
    assert featurecost.main(["--repeats", "1", "--out", str(out)]) == 0
    rounds = json.loads(out.read_text())["rounds"]
    assert [(r["batch"], r["rows"]) for r in rounds] == [(b, r) for b in (1, 2) for r in (1, 5, 9)]
    assert "KiB on the wire" in capsys.readouterr().out

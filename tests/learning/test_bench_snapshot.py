"""``atlas bench --snapshot``: our engines start from a published version (suffix index,
neural head, calibration priors), so the bench shows what the learning loop gives."""

from __future__ import annotations

import json
import shutil

import pytest

from atlas_sidecar import models
from atlas_sidecar.cli import main
from atlas_sidecar.engine.build import close_engine
from atlas_sidecar.engine.speculators.neural import NeuralSpeculator, read_weights_file
from atlas_sidecar.engine.speculators.suffix import SuffixSpeculator
from atlas_sidecar.learning.published import HEAD_FILE, open_published
from atlas_sidecar.learning.store import StoreError
from atlas_sidecar.tooling import bench, workloads

from .conftest import FIRST, TRAFFIC_SKIP


def _version_dir(first_round):
    root, _, result = first_round
    return root / "store" / result.version


def test_engines_start_from_the_published_version(first_round, target):
    published = open_published(_version_dir(first_round), target)
    config = bench.BenchConfig(target=models.TEST_MODEL, draft=models.TEST_MODEL)
    engine = bench.build_ours(config, "atlas", target, target, published)
    try:
        drafters = {d.name: d for d in engine.policy.drafters()}
        suffix, neural = drafters["suffix"], drafters["neural"]
        assert isinstance(suffix, SuffixSpeculator) and isinstance(neural, NeuralSpeculator)
        assert len(suffix._global_docs) == FIRST
        _, meta = read_weights_file(published.paths[HEAD_FILE])
        assert neural.version == meta["version"] > 0
        assert set(engine.policy.acceptance.priors) == {"suffix"}
    finally:
        close_engine(engine)


def _bench(tmp_path, trace, name, *extra) -> dict:
    out = tmp_path / f"{name}.json"
    code = main([
        "bench", "--target", models.TEST_MODEL, "--dtype", "fp32", "--prompts", str(trace),
        "--max-new-tokens", "24", "--modes", "none,suffix", "--out", str(out), *extra,
    ])  # fmt: skip
    assert code == 0
    return json.loads(out.read_text())


def test_bench_snapshot_starts_warm(first_round, tmp_path):
    """A prompt the traffic asked before: from the snapshot, the suffix index drafts its
    answer from the first step; its cold twin in the same run has only the prompt."""
    prompt = workloads.humaneval(TRAFFIC_SKIP + 1)[TRAFFIC_SKIP]
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"phase": "python", "prompt": prompt.messages[0][1]}) + "\n")
    result = _bench(tmp_path, trace, "warm", "--snapshot", str(_version_dir(first_round)))
    cold, warm = result["modes"]["suffix"], result["modes"]["suffix" + bench.WARM_SUFFIX]
    assert set(result["modes"]) == {"none", "suffix", "suffix" + bench.WARM_SUFFIX}
    assert result["snapshot"]["version"] == first_round[2].version
    assert cold["outputs_match"] is True and warm["outputs_match"] is True
    assert warm["accept_len"] > cold["accept_len"] + 1
    (row,) = result["snapshot"]["first_requests"]
    assert (row["phase"], row["mode"], row["requests"]) == ("python", "suffix", 1)
    assert row["warm_accept_len"] == warm["accept_len"]


def test_bench_refuses_a_directory_that_is_not_a_version(tmp_path, target, capsys):
    with pytest.raises(StoreError, match="not a published version"):
        open_published(tmp_path, target)
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    code = main(["bench", "--target", models.TEST_MODEL, "--dtype", "fp32", "--prompts",
                 str(trace), "--modes", "none", "--snapshot", str(tmp_path)])  # fmt: skip
    assert code == 2
    assert "--snapshot" in capsys.readouterr().err


def test_bench_refuses_a_tampered_version(first_round, target, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(first_round[0] / "store", copy)
    version = copy / first_round[2].version
    head = version / HEAD_FILE
    data = bytearray(head.read_bytes())
    data[-1] ^= 1  # one bit flipped
    head.write_bytes(bytes(data))
    config = bench.BenchConfig(target=models.TEST_MODEL, draft=models.TEST_MODEL,
                               snapshot=str(version))  # fmt: skip
    with pytest.raises(ValueError, match="sha256"):
        bench.open_snapshot(config, target, print)


def test_learnbench_traffic_is_not_what_the_bench_asks():
    """The loop learns from other prompts of the same phases: a warm start measured on
    prompts it was trained on would show memory, not learning."""
    from atlas_sidecar.tooling import learnbench

    traffic = learnbench.traffic_prompts(skip=3, per_phase=4)
    asked = workloads.drift(3)
    assert [p.phase for p in traffic] == ["python"] * 4 + ["rust"] * 4 + ["chat"] * 4
    assert not {p.prompt_id for p in traffic} & {p.prompt_id for p in asked}

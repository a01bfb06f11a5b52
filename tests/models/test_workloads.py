"""Real prompt sets from packages, and users' JSONL traces."""

from __future__ import annotations

import pytest

from atlas_sidecar import workloads


def test_real_prompt_sets_load_with_their_phases():
    drift = workloads.drift(3)
    assert [p.phase for p in drift] == ["python"] * 3 + ["rust"] * 3 + ["chat"] * 3
    assert "def has_close_elements" in drift[0].messages[0][1]
    assert "fn " in drift[3].messages[0][1]
    assert len(workloads.humaneval()) == 164
    assert len(workloads.mtbench()) == 80


def test_trace_file_is_parsed(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"phase": "sql", "prompt": "SELECT 1", "max_new_tokens": 5}\n\n'
        '{"prompt": "hello"}\n'
    )
    prompts = workloads.load_trace(trace)
    assert [(p.phase, p.max_new_tokens) for p in prompts] == [("sql", 5), ("default", None)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"phase": "x"}', "'prompt' must be"),
        ('{"prompt": ""}', "'prompt' must be"),
        ('{"prompt": "a", "max_new_tokens": -1}', "'max_new_tokens'"),
    ],
)
def test_malformed_trace_lines_name_the_line(tmp_path, line, message):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(workloads.WorkloadError, match=f"t.jsonl:2: .*{message}"):
        workloads.load_trace(trace)


def test_empty_trace_is_an_error(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n")
    with pytest.raises(workloads.WorkloadError, match="no prompts"):
        workloads.load_trace(trace)

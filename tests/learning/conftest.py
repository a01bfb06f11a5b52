"""The small real model (SmolLM2-135M, fp32, recording hidden states) and traffic of
real prompts it answered greedily, for the trainer's tests."""

from __future__ import annotations

import pytest
import torch

from atlas_sidecar import models
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.build import build_engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.learning.records import TrafficRecord
from atlas_sidecar.tooling import workloads

TRAFFIC_PROMPTS = 12  # HumanEval prompts 20.. (the bench asks the first ones)
TRAFFIC_TOKENS = 48


@pytest.fixture(scope="session")
def target() -> CausalLMRunner:
    models.pull(models.TEST_MODEL)
    torch.manual_seed(0)
    return CausalLMRunner.load(models.TEST_MODEL, dtype="fp32", record_hidden=True)


@pytest.fixture(scope="session")
def python_traffic(target: CausalLMRunner) -> list[TrafficRecord]:
    """HumanEval prompts answered greedily by the target through the suffix engine, as a
    replica would mirror them: the engine's real per-step drafted/accepted counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = build_engine("suffix", target)
    prompts = workloads.humaneval(20 + TRAFFIC_PROMPTS)[20:]
    records = []
    for i, prompt in enumerate(prompts):
        ids = workloads.encode(target.tokenizer, prompt)
        result = engine.generate(ids, SamplingParams(max_tokens=TRAFFIC_TOKENS))
        records.append(record_of(f"replica-{i % 2}/{prompt.prompt_id}", ids, result))
    torch.set_num_threads(before)
    return records


def record_of(request_id: str, prompt: list[int], result) -> TrafficRecord:
    return TrafficRecord(
        request_id=request_id,
        replica=request_id.split("/")[0],
        prompt_ids=tuple(prompt),
        output_ids=tuple(result.token_ids),
        step_speculators=tuple(s.speculator for s in result.steps),
        step_drafted=tuple(s.drafted for s in result.steps),
        step_accepted=tuple(s.accepted for s in result.steps),
        weight_version="",
        finished_at=0.0,
        sampled=False,
    )


class MemorySource:
    """A TrafficSource in memory: seq is the position in ingest order, from 1."""

    def __init__(self, records: list[TrafficRecord] | None = None) -> None:
        self.rows: list[tuple[int, TrafficRecord]] = []
        self.add(records or [])

    def add(self, records: list[TrafficRecord]) -> None:
        for record in records:
            self.rows.append((len(self.rows) + 1, record))

    def read(self, after: int = 0, limit: int = 1000) -> list[tuple[int, TrafficRecord]]:
        return [row for row in self.rows if row[0] > after][:limit]

    def count(self) -> int:
        return len(self.rows)

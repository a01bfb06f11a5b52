"""The small real model (SmolLM2-135M, fp32, recording hidden states) and traffic of
real prompts it answered greedily, for the trainer's tests."""

from __future__ import annotations

import pytest
import torch

from atlas_sidecar import models
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.build import build_engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.neural_train import TrainConfig
from atlas_sidecar.learning.records import TrafficRecord
from atlas_sidecar.learning.store import DirectoryStore
from atlas_sidecar.learning.trainer import Trainer, TrainerConfig
from atlas_sidecar.tooling import workloads

TRAFFIC_SKIP = 20  # HumanEval prompts from 20 on: the bench asks the first ones
TRAFFIC_PROMPTS = 12
TRAFFIC_TOKENS = 48
FAST = TrainerConfig(
    max_train_steps=30,
    max_record_tokens=256,
    heldout_fraction=0.34,  # two of six records
    train=TrainConfig(batch_size=64, buffer_tokens=20_000),
)
FIRST = 6  # records of the first round; the rest arrive later


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Small-batch work on a small model: one thread is as fast, never oversubscribes a
    shared machine, and makes training runs repeat exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def target() -> CausalLMRunner:
    models.pull(models.TEST_MODEL)
    torch.manual_seed(0)
    return CausalLMRunner.load(models.TEST_MODEL, dtype="fp32", record_hidden=True)


@pytest.fixture(scope="session")
def python_traffic(target: CausalLMRunner) -> list[TrafficRecord]:
    """HumanEval prompts answered greedily by the target through the suffix engine, as a
    replica would mirror them: the engine's real per-step drafted/accepted counts."""
    engine = build_engine("suffix", target)
    prompts = workloads.humaneval(TRAFFIC_SKIP + TRAFFIC_PROMPTS)[TRAFFIC_SKIP:]
    records = []
    for i, prompt in enumerate(prompts):
        ids = workloads.encode(target.tokenizer, prompt)
        result = engine.generate(ids, SamplingParams(max_tokens=TRAFFIC_TOKENS))
        records.append(record_of(f"replica-{i % 2}/{prompt.prompt_id}", ids, result))
    return records


@pytest.fixture(scope="session")
def first_round(tmp_path_factory, target, python_traffic):
    """One round over the first records into an empty store: (root, source, result);
    the store is ``root/store``, the trainer's state ``root/state``."""
    root = tmp_path_factory.mktemp("first")
    source = MemorySource(python_traffic[:FIRST])
    trainer = Trainer(source, DirectoryStore(root / "store"), target, root / "state", FAST)
    return root, source, trainer.run_round()


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

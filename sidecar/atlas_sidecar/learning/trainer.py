"""The trainer: learns from every replica's traffic what one replica cannot, and publishes it.

Each ``run_round`` reads the records past its checkpoint (bounded: records, train steps,
seconds) and builds a version on the newest one in the store (its parent):

- the global suffix index: the parent's snapshot plus the new records, bounded in bytes;
- the neural head: the parent's head distilled further on the new records (the target's
  features recomputed by running the target over their ids), scored on the newest
  records held out of training against the parent's head, and carried over unchanged
  unless it beats it: a worse head is never published;
- the controller's calibration priors: the parent's per-speculator counts plus the new
  records' drafted/accepted (greedy records only: sampled acceptance is not comparable).

The checkpoint (last seq, recent request ids for de-duplication) is written atomically
after the publish; a trainer killed in between resumes from the newest manifest's
window, which names the last seq it holds, so nothing is learned twice or skipped.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.controller import CALIBRATION_FORMAT, parse_calibration
from atlas_sidecar.engine.speculators.neural import (
    FinishedSequence,
    NeuralSpeculator,
    load_cached,
    save_weights,
)
from atlas_sidecar.engine.speculators.neural_train import (
    Distiller,
    TrainConfig,
    collect,
    first_token_acceptance,
    replay_accept_len,
)
from atlas_sidecar.engine.speculators.suffix import DEFAULT_GLOBAL_TOKENS, SuffixSpeculator
from atlas_sidecar.learning.published import (
    CALIBRATION_FILE,
    HEAD_FILE,
    SUFFIX_FILE,
    target_identity,
)
from atlas_sidecar.learning.records import TrafficRecord, TrafficSource
from atlas_sidecar.learning.store import FileSource, Version, WeightsStore, _write_durable

Featured = list[tuple[TrafficRecord, FinishedSequence]]  # records with the target's features
CHECKPOINT = "checkpoint.json"
CHECKPOINT_FORMAT = "atlas-trainer-checkpoint/1"


@dataclass(frozen=True)
class TrainerConfig:
    """Bounds on one round, and what a head must do to be published."""

    max_records: int = 512  # read per round
    max_train_steps: int = 200
    max_seconds: float = 600.0  # feature collection + training; evaluation is bounded apart
    max_record_tokens: int = 1024  # a longer record is learned from its first tokens
    heldout_fraction: float = 0.2  # the newest records of a round, kept out of training
    max_heldout: int = 32
    lookahead: int = 5  # the replayed engine's draft length
    min_gain: float = 0.0  # the new head must beat its parent's score by more than this
    suffix_tokens: int = DEFAULT_GLOBAL_TOKENS
    suffix_bytes: int = 64 << 20
    calibration_max_drafted: float = 1e6  # past this, old counts are scaled down: they fade
    seen_ids: int = 65_536  # request ids remembered to drop redelivered records
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class RoundResult:
    records: int = 0  # new records learned from
    skipped: int = 0  # redelivered or malformed
    first_seq: int | None = None
    last_seq: int | None = None
    version: str | None = None  # published, or None
    head_published: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


class Checkpoint:
    """The last seq learned from and the recent request ids, in ``state_dir``."""

    def __init__(self, seq: int = 0, seen: Sequence[str] = (), max_seen: int = 65_536) -> None:
        self.seq = seq
        self.seen: deque[str] = deque(seen, maxlen=max_seen)
        self._seen_set = set(self.seen)

    @classmethod
    def load(cls, state_dir: Path, max_seen: int) -> Checkpoint:
        """The saved checkpoint (a fresh one if none); ValueError if it is corrupt: a
        trainer must not silently start over and learn everything twice."""
        path = state_dir / CHECKPOINT
        if not path.exists():
            return cls(max_seen=max_seen)
        try:
            data = json.loads(path.read_bytes())
            if data.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return cls(int(data["seq"]), [str(s) for s in data["seen"]], max_seen)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: corrupt trainer checkpoint: {err}") from err

    def save(self, state_dir: Path) -> None:
        data = {"format": CHECKPOINT_FORMAT, "seq": self.seq, "seen": list(self.seen)}
        _write_durable(state_dir / CHECKPOINT, json.dumps(data).encode())

    def is_new(self, request_id: str) -> bool:
        return request_id not in self._seen_set

    def remember(self, request_id: str) -> None:
        if len(self.seen) == self.seen.maxlen:
            self._seen_set.discard(self.seen[0])
        self.seen.append(request_id)
        self._seen_set.add(request_id)


def valid_record(record: TrafficRecord, vocab_size: int) -> bool:
    """Ids within the vocabulary and parallel step tuples: anything else is not learned
    from (the suffix snapshot would refuse the ids, the calibration the counts)."""
    steps = {len(record.step_speculators), len(record.step_drafted), len(record.step_accepted)}
    ids = record.tokens
    return bool(ids) and len(steps) == 1 and all(0 <= t < vocab_size for t in ids)


def merge_calibration(parent: bytes | None, records: Sequence[TrafficRecord],
                      max_drafted: float) -> bytes:  # fmt: skip
    """The parent's per-speculator counts plus the greedy records' steps, scaled down
    past ``max_drafted`` so that old traffic fades."""
    counts: dict[str, list[float]] = {}
    if parent is not None:
        parse_calibration(parent)  # validated before its counts are trusted
        for name, entry in json.loads(parent)["speculators"].items():
            counts[name] = [float(entry["drafted"]), float(entry["accepted"]),
                            float(entry.get("steps", 0))]  # fmt: skip
    for record in records:
        if record.sampled:
            continue
        steps = zip(record.step_speculators, record.step_drafted, record.step_accepted,
                    strict=True)  # fmt: skip
        for name, drafted, accepted in steps:
            if name != "none" and 0 <= accepted <= drafted and drafted > 0:
                entry = counts.setdefault(name, [0.0, 0.0, 0.0])
                entry[0], entry[1], entry[2] = entry[0] + drafted, entry[1] + accepted, entry[2] + 1
    for entry in counts.values():
        if entry[0] > max_drafted:
            scale = max_drafted / entry[0]
            entry[:] = [value * scale for value in entry]
    speculators = {name: {"drafted": d, "accepted": a, "steps": s, "rate": a / d if d else 0.0}
                   for name, (d, a, s) in sorted(counts.items())}  # fmt: skip
    return json.dumps({"format": CALIBRATION_FORMAT, "speculators": speculators}).encode()


class Trainer:
    """Learns from ``source`` and publishes to ``store`` for ``target`` (see the module
    docstring). ``state_dir`` holds the checkpoint and scratch files."""

    def __init__(
        self,
        source: TrafficSource,
        store: WeightsStore,
        target: CausalLMRunner,
        state_dir: str | os.PathLike[str],
        config: TrainerConfig | None = None,
        revision: str = "",
    ) -> None:
        self.source = source
        self.store = store
        self.target = target
        self.config = config or TrainerConfig()
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not target.record_hidden:
            if target.live_sequences:
                raise RuntimeError("enable record_hidden on the target before starting sequences")
            target.record_hidden = True
        self.identity = target_identity(target, revision)
        self.checkpoint = Checkpoint.load(self.state_dir, self.config.seen_ids)
        self.checkpoint.seq = max(self.checkpoint.seq, self._published_seq())

    def _published_seq(self) -> int:
        """The last seq the newest version for this target holds (0 if none)."""
        parent = self.store.latest_verified(self.identity)
        return int(parent.manifest.window.get("last_seq", 0)) if parent is not None else 0

    def run_round(self) -> RoundResult:
        """Read, learn, publish (if anything new arrived), then advance the checkpoint."""
        deadline = time.monotonic() + self.config.max_seconds
        rows = self.source.read(after=self.checkpoint.seq, limit=self.config.max_records)
        if not rows:
            return RoundResult()
        fresh = self._fresh(rows)
        result = RoundResult(len(fresh), len(rows) - len(fresh), rows[0][0], rows[-1][0])
        if fresh:
            self._publish(fresh, rows[-1][0], result, deadline)
        self.checkpoint.seq = rows[-1][0]
        self.checkpoint.save(self.state_dir)
        return result

    def _fresh(self, rows: list[tuple[int, TrafficRecord]]) -> list[tuple[int, TrafficRecord]]:
        """Rows not seen before (delivery is at-least-once) whose record is valid."""
        fresh = []
        for seq, record in rows:
            if self.checkpoint.is_new(record.request_id) and valid_record(
                record, self.target.vocab_size
            ):
                fresh.append((seq, record))
            self.checkpoint.remember(record.request_id)
        return fresh

    def _publish(self, rows: list[tuple[int, TrafficRecord]], last_seq: int,
                 result: RoundResult, deadline: float) -> None:  # fmt: skip
        parent = self.store.latest_verified(self.identity)
        records = [record for _, record in rows]
        with tempfile.TemporaryDirectory(dir=self.state_dir, prefix=".round-") as scratch:
            files: dict[str, FileSource] = {
                SUFFIX_FILE: self._suffix(parent, records),
                CALIBRATION_FILE: merge_calibration(
                    _read(parent, CALIBRATION_FILE), records, self.config.calibration_max_drafted
                ),
            }
            head, metrics = self._head(parent, records, deadline, Path(scratch))
            if head is not None:
                files[HEAD_FILE] = head
            window = _window(rows, last_seq)
            metrics["records"] = float(len(records))
            manifest = self.store.publish(
                files, target=self.identity, parent=parent.id if parent else None,
                window=window, metrics=metrics,
            )  # fmt: skip
        result.version = manifest.version
        result.head_published = bool(metrics.get("head_published"))
        result.metrics = metrics

    def _suffix(self, parent: Version | None, records: list[TrafficRecord]) -> bytes:
        """The parent's global index plus the new records, bounded in tokens and bytes."""
        suffix = SuffixSpeculator(self.config.suffix_tokens, self.config.suffix_bytes)
        previous = _read(parent, SUFFIX_FILE)
        if previous is not None:
            suffix.load_snapshot_bytes(previous, self.target.vocab_size)
        for record in records:
            suffix.add_document(list(record.tokens))
        return suffix.snapshot_bytes(self.target.vocab_size)

    # -- the neural head -----------------------------------------------------------------

    def _head(self, parent: Version | None, records: list[TrafficRecord], deadline: float,
              scratch: Path) -> tuple[FileSource | None, dict[str, float]]:  # fmt: skip
        """The head file to publish (new if it beat the parent's, else the parent's) and
        the evaluation's figures."""
        carried = _local_file(parent, HEAD_FILE, scratch)
        held = self._heldout_count(len(records))
        if held == 0:
            return carried, {"head_published": 0.0}
        speculator = self._parent_head(carried)
        heldout = self._features(records[-held:])
        before = self._score(speculator, heldout)
        steps = self._distil(speculator, records[:-held], deadline, fresh=carried is None)
        after = self._score(speculator, heldout)
        metrics = {f"{k}_parent": v for k, v in before.items()} | after | {"train_steps": steps}
        key = "head_accept_len" if "head_accept_len" in after else "head_first_token"
        better = steps > 0 and after[key] > before[key] + self.config.min_gain
        metrics["head_published"] = float(better)
        if not better:
            return carried, metrics
        return save_weights(speculator.weights, speculator.identity, scratch / HEAD_FILE), metrics

    def _parent_head(self, head: Path | None) -> NeuralSpeculator:
        """A speculator serving the parent's head, or what a replica starts from without
        one (the warm-start head cached in ``$ATLAS_HOME``, else the initial head)."""
        speculator = NeuralSpeculator(self.target)
        if head is not None:
            speculator.load(head)
        else:
            load_cached(speculator)
        return speculator

    def _heldout_count(self, records: int) -> int:
        if records < 2:
            return 0
        held = max(1, int(records * self.config.heldout_fraction))
        return min(held, self.config.max_heldout, records - 1)

    def _features(self, records: Sequence[TrafficRecord]) -> Featured:
        """Each record with the target's features over its (first) tokens."""
        out = []
        for record in records:
            found = collect(self.target, [list(record.tokens)], self.config.max_record_tokens)
            if found:
                out.append((record, found[0]))
        return out

    def _distil(self, speculator: NeuralSpeculator, records: list[TrafficRecord],
                deadline: float, fresh: bool) -> int:  # fmt: skip
        """Train the speculator's head on ``records`` within the round's bounds; the
        result is swapped in. Returns the steps run."""
        distiller = Distiller(speculator, self.config.train)
        for record in records:
            if time.monotonic() > deadline:
                break
            for _, sequence in self._features([record]):
                distiller.add(sequence)
        distiller.refresh_vocab(force=fresh)
        steps = 0
        while steps < self.config.max_train_steps and time.monotonic() < deadline:
            if distiller.step() is None:
                break
            steps += 1
        if steps:
            speculator.swap(distiller.snapshot())
        return steps

    def _score(self, speculator: NeuralSpeculator, heldout: Featured) -> dict[str, float]:
        """Replayed greedy accept_len on the greedy held-out records whose prompt fits,
        and first-token acceptance on all of them."""
        scores: dict[str, float] = {
            "head_first_token": first_token_acceptance(speculator, [s for _, s in heldout])
        }
        greedy = [
            replay_accept_len(speculator, s, len(r.prompt_ids), self.config.lookahead)
            for r, s in heldout
            if not r.sampled and len(r.prompt_ids) < len(s)
        ]
        if greedy:
            scores["head_accept_len"] = sum(greedy) / len(greedy)
        return scores


def _read(version: Version | None, name: str) -> bytes | None:
    if version is None or name not in {f.name for f in version.manifest.files}:
        return None
    return version.read(name)


def _local_file(version: Version | None, name: str, scratch: Path) -> Path | None:
    """A version's file as a local path: its own in a directory store, else its verified
    bytes written to ``scratch`` (a remote store hands out bytes)."""
    if version is None or name not in {f.name for f in version.manifest.files}:
        return None
    if version.paths is not None:
        return version.paths[name]
    path = scratch / f"parent-{name}"
    path.write_bytes(version.read(name))
    return path


def _window(rows: list[tuple[int, TrafficRecord]], last_seq: int) -> dict[str, Any]:
    """What a version was trained on: its first and last records' seqs and request ids.
    ``last_seq`` is the last seq read (redelivered ones after the last new included): a
    trainer restarted before its checkpoint was written resumes after it."""
    return {
        "first_seq": rows[0][0],
        "last_seq": last_seq,
        "first_request_id": rows[0][1].request_id,
        "last_request_id": rows[-1][1].request_id,
    }

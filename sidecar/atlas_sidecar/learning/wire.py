"""TrafficRecord <-> atlas.trainer.v1.MirrorRecord, with the bounds both ends enforce.

The same bytes travel the wire, sit in the mirror's spill file and in the trainer's
store, so there is one encoding and one validation: a record that decodes here is
within MAX_RECORD_TOKENS and its step lists are parallel, whoever sent it.
"""

from __future__ import annotations

from atlas_sidecar.learning.records import MAX_RECORD_TOKENS, TrafficRecord
from atlas_sidecar.serving.proto import trainer_v1_pb2 as tpb

# 65536 tokens and as many steps cost at most ~1.3 MB as varints; 2 MiB leaves room.
MAX_MESSAGE_BYTES = 2 << 20
MAX_ID_CHARS = 256  # request_id, replica, weight_version
MAX_SPECULATORS = 64  # distinct speculator names in one record


class BadRecord(ValueError):
    """A record outside the bounds or inconsistent: refused, never stored."""


def to_proto(record: TrafficRecord) -> tpb.MirrorRecord:
    names = sorted(set(record.step_speculators))
    index = {name: i for i, name in enumerate(names)}
    return tpb.MirrorRecord(
        request_id=record.request_id,
        replica=record.replica,
        prompt_ids=record.prompt_ids,
        output_ids=record.output_ids,
        speculators=names,
        step_speculator=[index[name] for name in record.step_speculators],
        step_drafted=record.step_drafted,
        step_accepted=record.step_accepted,
        weight_version=record.weight_version,
        finished_at=record.finished_at,
        sampled=record.sampled,
    )


def from_proto(message: tpb.MirrorRecord) -> TrafficRecord:
    """The record, or BadRecord naming the first bound it breaks."""
    _check(message)
    names = list(message.speculators)
    return TrafficRecord(
        request_id=message.request_id,
        replica=message.replica,
        prompt_ids=tuple(message.prompt_ids),
        output_ids=tuple(message.output_ids),
        step_speculators=tuple(names[i] for i in message.step_speculator),
        step_drafted=tuple(message.step_drafted),
        step_accepted=tuple(message.step_accepted),
        weight_version=message.weight_version,
        finished_at=message.finished_at,
        sampled=message.sampled,
    )


def encode(record: TrafficRecord) -> bytes:
    return to_proto(record).SerializeToString()


def decode(data: bytes) -> TrafficRecord:
    """The record in ``data``; BadRecord if it does not parse or breaks a bound."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise BadRecord(f"{len(data)} bytes, over {MAX_MESSAGE_BYTES}")
    message = tpb.MirrorRecord()
    try:
        message.ParseFromString(data)
    except Exception as exc:  # noqa: BLE001 - whatever the parser raises on bad bytes
        raise BadRecord(f"not a MirrorRecord: {exc}") from None
    return from_proto(message)


def _check(m: tpb.MirrorRecord) -> None:
    if not m.request_id:
        raise BadRecord("request_id is empty")
    for name in ("request_id", "replica", "weight_version"):
        if len(getattr(m, name)) > MAX_ID_CHARS:
            raise BadRecord(f"{name} is over {MAX_ID_CHARS} characters")
    if len(m.prompt_ids) + len(m.output_ids) > MAX_RECORD_TOKENS:
        raise BadRecord(f"over {MAX_RECORD_TOKENS} tokens")
    steps = len(m.step_speculator)
    if steps > MAX_RECORD_TOKENS or len(m.step_drafted) != steps or len(m.step_accepted) != steps:
        raise BadRecord("step lists are not parallel or over the bound")
    if len(m.speculators) > MAX_SPECULATORS or any(len(s) > MAX_ID_CHARS for s in m.speculators):
        raise BadRecord("too many or too long speculator names")
    if steps and max(m.step_speculator) >= len(m.speculators):
        raise BadRecord("a step names a speculator that is not in the table")

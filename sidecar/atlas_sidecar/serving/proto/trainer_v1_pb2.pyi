# ruff: noqa
# mypy: ignore-errors
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class MirrorRecord(_message.Message):
    __slots__ = ("request_id", "replica", "prompt_ids", "output_ids", "speculators", "step_speculator", "step_drafted", "step_accepted", "weight_version", "finished_at", "sampled")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    SPECULATORS_FIELD_NUMBER: _ClassVar[int]
    STEP_SPECULATOR_FIELD_NUMBER: _ClassVar[int]
    STEP_DRAFTED_FIELD_NUMBER: _ClassVar[int]
    STEP_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    replica: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    output_ids: _containers.RepeatedScalarFieldContainer[int]
    speculators: _containers.RepeatedScalarFieldContainer[str]
    step_speculator: _containers.RepeatedScalarFieldContainer[int]
    step_drafted: _containers.RepeatedScalarFieldContainer[int]
    step_accepted: _containers.RepeatedScalarFieldContainer[int]
    weight_version: str
    finished_at: float
    sampled: bool
    def __init__(self, request_id: _Optional[str] = ..., replica: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., output_ids: _Optional[_Iterable[int]] = ..., speculators: _Optional[_Iterable[str]] = ..., step_speculator: _Optional[_Iterable[int]] = ..., step_drafted: _Optional[_Iterable[int]] = ..., step_accepted: _Optional[_Iterable[int]] = ..., weight_version: _Optional[str] = ..., finished_at: _Optional[float] = ..., sampled: _Optional[bool] = ...) -> None: ...

class IngestAck(_message.Message):
    __slots__ = ("request_ids", "rejected_ids")
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    rejected_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ..., rejected_ids: _Optional[_Iterable[str]] = ...) -> None: ...

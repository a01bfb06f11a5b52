"""The ingest server on loopback, spoken to with a raw gRPC stream: acks follow commits,
bad records are refused by id, and the server's bounds hold."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
import pytest

from atlas_sidecar.learning.ingest import IngestConfig, IngestServerThread
from atlas_sidecar.learning.wire import MAX_MESSAGE_BYTES, encode, to_proto
from atlas_sidecar.serving.mirror import INGEST_METHOD
from atlas_sidecar.serving.proto import trainer_v1_pb2 as tpb

from .conftest import make_record


def ingest_call(address: str) -> tuple[grpc.Channel, queue.Queue[bytes | None], Iterator]:
    """A raw Ingest stream: put encoded records (None ends it), iterate its acks."""
    channel = grpc.insecure_channel(address, options=[
        ("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES),
        ("grpc.use_local_subchannel_pool", 1),  # a connection of its own, as replicas have
    ])  # fmt: skip
    outbox: queue.Queue[bytes | None] = queue.Queue()
    call = channel.stream_stream(INGEST_METHOD, request_serializer=lambda b: b,
                                 response_deserializer=tpb.IngestAck.FromString)  # fmt: skip
    return channel, outbox, call(iter(outbox.get, None), timeout=30)


def test_an_ack_names_records_already_committed(store, trainer) -> None:
    channel, outbox, acks = ingest_call(trainer.address)
    for i in range(5):
        outbox.put(encode(make_record(i)))
    seen: list[str] = []
    while len(seen) < 5:
        ack = next(acks)
        assert all(store.has(request_id) for request_id in ack.request_ids)  # before the ack
        seen.extend(ack.request_ids)
    assert sorted(seen) == [make_record(i).request_id for i in range(5)]
    outbox.put(None)
    channel.close()


def test_a_malformed_record_is_rejected_by_id_and_not_stored(store, trainer) -> None:
    channel, outbox, acks = ingest_call(trainer.address)
    bad = to_proto(make_record(1))
    bad.step_accepted.append(1)  # the step lists no longer parallel
    outbox.put(bad.SerializeToString())
    ack = next(acks)
    assert list(ack.rejected_ids) == [make_record(1).request_id]
    assert not ack.request_ids and store.count() == 0
    assert trainer.server.service.rejected == 1
    outbox.put(None)
    channel.close()


def test_a_message_over_the_bound_is_refused(store, trainer) -> None:
    channel, outbox, acks = ingest_call(trainer.address)
    outbox.put(b"\x0a" + b"\xff" * (MAX_MESSAGE_BYTES + 10))
    with pytest.raises(grpc.RpcError) as failure:
        next(acks)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert store.count() == 0
    channel.close()


def test_streams_past_the_bound_are_refused(store) -> None:
    with IngestServerThread(store, IngestConfig(port=0, max_concurrent_streams=1)) as server:
        first, outbox, acks = ingest_call(server.address)
        outbox.put(encode(make_record(1)))
        assert list(next(acks).request_ids) == [make_record(1).request_id]  # the stream is open
        second, second_outbox, refused = ingest_call(server.address)
        with pytest.raises(grpc.RpcError) as failure:
            next(refused)
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        outbox.put(None)
        second_outbox.put(None)
        first.close()
        second.close()


def test_the_api_is_a_bidirectional_stream_in_its_own_versioned_package() -> None:
    service = tpb.DESCRIPTOR.services_by_name["Trainer"]
    assert tpb.DESCRIPTOR.package == "atlas.trainer.v1"
    ingest = service.methods_by_name["Ingest"]
    assert ingest.client_streaming and ingest.server_streaming
    assert f"/{service.full_name}/Ingest" == INGEST_METHOD

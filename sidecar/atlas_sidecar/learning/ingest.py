"""The trainer's atlas.trainer.v1.Trainer servicer: mirrored records in, acks out.

Each Ingest stream reads ahead into a bounded queue; the handler takes what has
arrived (up to a batch's bounds), commits it to the TrafficStore in one transaction and
only then acks the batch's request ids. So an ack always names committed records, and
a record the trainer dies holding is unacked, and the mirror sends it again.

Commits run on one writer thread for every stream (SQLite has one writer anyway), off
the event loop, so a slow disk stalls the streams' acks, never the loop. Bounded: gRPC
refuses messages over ``max_message_bytes`` and calls past ``max_concurrent_streams``;
a stream holds at most ``read_ahead`` messages and a batch ``max_batch_bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from atlas_sidecar.learning.traffic import TrafficStore
from atlas_sidecar.learning.wire import MAX_MESSAGE_BYTES, BadRecord, decode
from atlas_sidecar.serving.loopthread import LoopThread
from atlas_sidecar.serving.proto import trainer_v1_pb2 as tpb

log = logging.getLogger(__name__)

SERVICE_NAME = tpb.DESCRIPTOR.services_by_name["Trainer"].full_name
DEFAULT_INGEST_PORT = 50061


@dataclass(frozen=True)
class IngestConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_INGEST_PORT  # 0: any free port
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_concurrent_streams: int = 64  # Ingest calls at once, over all connections
    read_ahead: int = 4  # messages a stream buffers before its sender is flow-controlled
    max_batch_records: int = 512
    max_batch_bytes: int = 8 << 20
    # Memory at worst: max_concurrent_streams x (read_ahead x max_message_bytes +
    # max_batch_bytes), 1 GiB by default, when every stream sends the largest records.


class IngestService:
    """Stores each batch, then acks it. Counters are for logs and tests."""

    def __init__(self, store: TrafficStore, config: IngestConfig) -> None:
        self.store = store
        self.config = config
        self.stored = 0  # newly stored records
        self.duplicates = 0
        self.rejected = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="atlas-ingest-store")

    def handler(self) -> grpc.GenericRpcHandler:
        ingest = grpc.stream_stream_rpc_method_handler(
            self.Ingest,
            request_deserializer=bytes,  # decoded, and validated, on the writer thread
            response_serializer=tpb.IngestAck.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Ingest": ingest})

    async def Ingest(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tpb.IngestAck]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(self.config.read_ahead)
        reader = asyncio.create_task(_pump(requests, queue))
        loop = asyncio.get_running_loop()
        try:
            while batch := await self._batch(queue):
                yield await loop.run_in_executor(self._writer, self._commit, batch)
        finally:
            reader.cancel()

    async def _batch(self, queue: asyncio.Queue[bytes | None]) -> list[bytes]:
        """What has arrived, at least one message (empty: the stream ended)."""
        first = await queue.get()
        if first is None:
            return []
        batch, size = [first], len(first)
        cfg = self.config
        while len(batch) < cfg.max_batch_records and size < cfg.max_batch_bytes:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if item is None:
                queue.put_nowait(None)  # the end, for the next call; room: one was taken
                break
            batch.append(item)
            size += len(item)
        return batch

    def _commit(self, batch: list[bytes]) -> tpb.IngestAck:
        """On the writer thread: decode, store in one transaction, name what is stored."""
        records, rejected = [], []
        for data in batch:
            try:
                records.append(decode(data))
            except BadRecord as exc:
                request_id = _request_id(data)
                log.warning("rejected mirrored record %r: %s", request_id, exc)
                if request_id:
                    rejected.append(request_id)
        added = self.store.add(records)
        self.stored += added
        self.duplicates += len(records) - added
        self.rejected += len(rejected)
        ids = list(dict.fromkeys(r.request_id for r in records))
        return tpb.IngestAck(request_ids=ids, rejected_ids=rejected)

    def close(self) -> None:
        self._writer.shutdown(wait=True)


async def _pump(requests: AsyncIterator[bytes], queue: asyncio.Queue[bytes | None]) -> None:
    """Read the stream ahead into ``queue``; None marks its end."""
    try:
        async for message in requests:
            await queue.put(message)
    except Exception as exc:  # noqa: BLE001 - the client went away: the call is over
        log.debug("ingest stream ended: %r", exc)
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(None)
        return
    await queue.put(None)


def _request_id(data: bytes) -> str:
    """The request id of a record that failed validation, if it parses at all."""
    with contextlib.suppress(Exception):
        return str(tpb.MirrorRecord.FromString(data).request_id)[:256]
    return ""


class IngestServer:
    """The Trainer service on ``config.host:config.port`` (grpc.aio)."""

    def __init__(self, store: TrafficStore, config: IngestConfig) -> None:
        self.config = config
        self.service = IngestService(store, config)
        self.port = 0
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        cfg = self.config
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.max_concurrent_streams", cfg.max_concurrent_streams),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=cfg.max_concurrent_streams,
        )
        server.add_generic_rpc_handlers((self.service.handler(),))
        self.port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if self.port == 0:
            raise OSError(f"could not bind {cfg.host}:{cfg.port}")
        await server.start()
        self._server = server
        log.info("trainer ingest (%s) on %s:%d", SERVICE_NAME, cfg.host, self.port)
        return self.port

    async def stop(self, grace_s: float | None = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
        await asyncio.get_running_loop().run_in_executor(None, self.service.close)


async def run_ingest(
    store: TrafficStore, config: IngestConfig, on_ready: Callable[[int], Any] | None = None
) -> None:
    """Serve ingest until SIGTERM or SIGINT (what ``atlas trainer`` runs); ``on_ready``
    gets the bound port."""
    server = IngestServer(store, config)
    port = await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if on_ready is not None:
        on_ready(port)
    await stop.wait()
    await server.stop()


class IngestServerThread:
    """An IngestServer on its own event loop in a background thread (tests, notebooks)."""

    def __init__(self, store: TrafficStore, config: IngestConfig) -> None:
        self.server = IngestServer(store, config)
        self._runner = LoopThread("atlas-ingest")

    @property
    def address(self) -> str:
        return f"{self.server.config.host}:{self.server.port}"

    def start(self) -> IngestServerThread:
        self._runner.start(self.server.start(), 30)
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        self._runner.stop(lambda: self.server.stop(grace_s), grace_s + 30)

    def __enter__(self) -> IngestServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Reading a sidecar's grpc.health.v1 status from tests."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status


def wait_health(address: str, want: int, within_s: float = 15.0) -> float:
    """Seconds until health says ``want``; fails the test past ``within_s``."""
    start = time.monotonic()
    while (status := health(address)) != want:
        assert time.monotonic() - start < within_s, f"health stayed {status}, wanted {want}"
        time.sleep(0.05)
    return time.monotonic() - start

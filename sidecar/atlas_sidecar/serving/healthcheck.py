"""``python -m atlas_sidecar.serving.healthcheck``: the sidecar's liveness/readiness probe.

Asks the standard gRPC health service (``grpc.health.v1``) on the loopback health port
(``atlas serve --health-port``), which is plaintext, and exits 0 if it is SERVING, 1 if
not (NOT_SERVING, unreachable, or no answer in time). kubelet's own gRPC probe cannot
speak TLS; this one runs inside the container as an exec probe. It imports only grpc,
not the engine (torch), so a probe every few seconds stays cheap.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(port: int, service: str = "", timeout_s: float = 3.0, host: str = "127.0.0.1") -> str:
    """The serving status's name (SERVING, NOT_SERVING, ...), or UNREACHABLE."""
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the loopback health port")
    parser.add_argument("--service", default="", help="'' (the server) or atlas.v1.Atlas")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = check(args.port, args.service, args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())

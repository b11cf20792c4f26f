"""``python -m tidelog.ops.grpc_health [HOST:PORT] [--tls-ca FILE]``: one gRPC health check
(``grpc.health.v1.Health/Check``) of a node's client listener; exit status 0 when it answers
SERVING, 1 otherwise. The container image's HEALTHCHECK (Dockerfile); it imports only grpc so
that it costs little every few seconds. Kubernetes uses its own gRPC probes instead."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:9092"


def check(address: str, tls_ca: bytes | None = None, timeout_s: float = 3.0) -> bool:
    if tls_ca is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_ca))
    with channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tidelog.ops.grpc_health")
    p.add_argument("address", nargs="?", default=DEFAULT_ADDRESS)
    p.add_argument("--tls-ca", help="PEM CA of the listener's certificate (a TLS listener).")
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    ca = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            ca = f.read()
    return 0 if check(args.address, ca, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())

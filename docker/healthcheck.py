"""Container HEALTHCHECK for Docker/Compose: a grpc.health.v1 Check against the local server.

Exit 0 when the server answers SERVING, 1 otherwise (NOT_SERVING during warm-up and while
draining after SIGTERM, or no answer). Kubernetes ignores image HEALTHCHECKs and uses the
native gRPC probes in k8s/ instead. The address follows the server's own settings:
LOSSD_PORT, and LOSSD_HOST unless it is a wildcard (then loopback).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    host = os.environ.get("LOSSD_HOST", "") or "127.0.0.1"
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    port = os.environ.get("LOSSD_PORT", "") or "50051"
    service = sys.argv[1] if len(sys.argv) > 1 else ""
    try:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=3)
    except grpc.RpcError as exc:
        print(f"healthcheck: {host}:{port}: {exc.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"healthcheck: {host}:{port}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

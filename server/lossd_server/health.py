"""The standard grpc.health.v1 service of a lossd server, or of a pod of worker processes.

One :class:`Health` reports every service of a server SERVING or NOT_SERVING together (and
the server as a whole, the empty name), on the serving port and, with ``--health-port``, on
a plaintext port of its own that takes no token. Its owner decides when: a server
(:mod:`lossd_server.app`) once its device passed a warm-up evaluation, a supervisor
(:mod:`lossd_server.serve.supervisor`) while every worker is ready. Both use this one
class; neither sets statuses by hand.

No torch here: the supervisor, which never touches a device, imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lossd.kserve.v2 import grpc_service_pb2 as kserve_pb
from lossd.v1 import loss_service_pb2 as pb

SERVICES = (pb.DESCRIPTOR.services_by_name["LossService"].full_name,
            kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name)
"""The services a lossd server serves (both fronts): what a pod's health reports on."""


class Health:
    """grpc.health.v1 for ``services``: NOT_SERVING until :meth:`set_serving` says
    otherwise. Register it on a server with :meth:`add_to_server`; :meth:`bind` gives it a
    port of its own, which :meth:`start` and :meth:`stop` open and close."""

    def __init__(self, services: Sequence[str]) -> None:
        self.servicer = grpc_health.HealthServicer(experimental_non_blocking=True)
        self.names = ("", *services)
        self._server: grpc.Server | None = None
        self.set_serving(False)

    def add_to_server(self, server: grpc.Server) -> None:
        """Answer health checks on ``server`` too."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    def bind(self, host: str, port: int) -> int:
        """A plaintext server of its own on ``host:port`` (0 picks a free port), answering
        health checks only; returns the bound port. Raises OSError when it cannot bind."""
        self._server = grpc.server(futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="lossd-health"),
            options=[("grpc.so_reuseport", 0)])  # a taken port fails loudly
        self.add_to_server(self._server)
        return bind(self._server, host, port, None)

    def start(self) -> None:
        """Open the port of :meth:`bind`, if any."""
        if self._server is not None:
            self._server.start()

    def stop(self) -> None:
        """Close the port of :meth:`bind`, if any."""
        if self._server is not None:
            self._server.stop(0).wait()

    def set_serving(self, serving: bool) -> None:
        """Every name SERVING, or every name NOT_SERVING (ignored once draining)."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self.names:
            self.servicer.set(name, status)

    def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for good: a draining server never turns SERVING again."""
        self.servicer.enter_graceful_shutdown()


def bind(server: grpc.Server, host: str, port: int,
         credentials: grpc.ServerCredentials | None) -> int:
    """Add ``host:port`` to ``server`` (TLS with ``credentials``, else plaintext); returns
    the bound port. Raises OSError naming the address when it cannot bind: a port taken
    (gRPC returns 0 or raises RuntimeError) fails loudly, not silently."""
    address = f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind {address} (in use?)")
    return int(bound)

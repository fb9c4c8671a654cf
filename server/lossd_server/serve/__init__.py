"""``lossd serve``: the server in this process, or N serving processes under a supervisor.

    lossd serve                          # --processes auto
    lossd serve --processes 4 --port 50051
    python -m lossd_server.serve --processes 1

One module per job, each importing only those above it in this list:

* :mod:`~lossd_server.serve.host`: the host: how many processes (``--processes auto``),
  on which devices, with how many torch threads; the set-up of every serving process.
* :mod:`~lossd_server.serve.single`: ``--processes 1``, the server in this process.
* :mod:`~lossd_server.serve.worker`: one worker process of a pod, and the two pipes it
  talks over with its supervisor.
* :mod:`~lossd_server.serve.supervisor`: ``--processes N``: N workers on one port, one
  ``/metrics`` and one health endpoint for the pod, restarts, drain.
* :mod:`~lossd_server.serve.command`: the ``lossd serve`` command that picks one of them.

This package is the top of the server's dependency graph: nothing in the server imports
it. Importing it imports no torch and no gRPC (``lossd serve --help`` stays quick, and a
supervisor never loads torch); the serving modules import the server when they serve.
"""

from lossd_server.serve.command import add_command, main, run
from lossd_server.serve.host import (
    EXIT_CONFIG,
    GPU_PROCESSES,
    available_cpus,
    resolve_processes,
    torch_threads,
    tune_allocator,
    visible_gpus,
)
from lossd_server.serve.single import serve_single
from lossd_server.serve.supervisor import Supervisor, reserve_port

__all__ = [
    "EXIT_CONFIG",
    "GPU_PROCESSES",
    "Supervisor",
    "add_command",
    "available_cpus",
    "main",
    "reserve_port",
    "resolve_processes",
    "run",
    "serve_single",
    "torch_threads",
    "tune_allocator",
    "visible_gpus",
]

"""The ``lossd serve`` command: parse the flags, then serve in this process, run a
supervisor of worker processes, or (``--worker``, as a supervisor starts it) be a worker.

``lossd serve`` and ``python -m lossd_server.serve`` are the same command. A configuration
error (a bad flag, no torch, a port taken) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from typing import Any

import lossd
from lossd_server import logs
from lossd_server import settings as settings_mod
from lossd_server.serve import worker
from lossd_server.serve.host import EXIT_CONFIG, resolve_processes
from lossd_server.serve.single import serve_single
from lossd_server.serve.supervisor import Supervisor


def add_command(subparsers: Any) -> None:
    """Add ``serve`` to the ``lossd`` command (entry point group ``lossd.commands``)."""
    parser = subparsers.add_parser(
        "serve", help="run the gRPC server",
        description="Run the lossd gRPC server. Every flag can also be set through the "
                    "LOSSD_* environment variable named in its help; a flag wins.")
    settings_mod.add_arguments(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``lossd serve`` with parsed flags: a worker, one process, or a supervisor."""
    if getattr(args, "worker", False):
        worker.main()
    if importlib.util.find_spec("torch") is None:
        print("lossd serve: torch is not installed; in a lossd checkout: pip install "
              "'.[server]' (or the wheel of make dist: pip install "
              f"'dist/lossd-{lossd.__version__}-py3-none-any.whl[server]'); see "
              "docs/install.md", file=sys.stderr)
        return EXIT_CONFIG
    try:
        settings = settings_mod.from_args(args)
        settings.check()
        processes = resolve_processes(settings)
    except ValueError as exc:
        print(f"lossd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(settings.log_level, settings.log_format)
    try:
        if processes == 1:
            return serve_single(settings)
        return Supervisor(settings, processes).run()
    except (ValueError, OSError) as exc:
        print(f"lossd: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lossd_server.serve [flags]``: the same as ``lossd serve [flags]``."""
    parser = argparse.ArgumentParser(prog="lossd")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return int(args.run(args))

"""The ``lossd`` command: ``lossd serve`` runs the server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lossd_server import logs
from lossd_server import settings as settings_mod


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lossd",
        description="lossd: per-sample losses and batch aggregates as a gRPC service.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve", help="run the gRPC server",
        description="Run the lossd gRPC server. Every flag can also be set through the "
                    "LOSSD_* environment variable named in its help; a flag wins.")
    settings_mod.add_arguments(serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from lossd_server.app import serve

        s = settings_mod.from_args(args)
        logs.configure(s.log_level, s.log_format)
        try:
            return serve(s)
        except (ValueError, OSError) as exc:
            print(f"lossd: {exc}", file=sys.stderr)
            return 2
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

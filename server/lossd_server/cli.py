"""``lossd serve``. The ``lossd`` command itself lives in ``lossd._cli`` (it also runs
without the server installed); ``python -m lossd_server.cli serve ...`` works too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lossd_server import logs
from lossd_server import settings as settings_mod


def run_serve(args: argparse.Namespace) -> int:
    """Run the server with settings from parsed flags and LOSSD_* variables."""
    from lossd_server.app import serve

    s = settings_mod.from_args(args)
    logs.configure(s.log_level, s.log_format)
    try:
        return serve(s)
    except (ValueError, OSError) as exc:
        print(f"lossd: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    from lossd._cli import main as lossd_main

    return lossd_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())

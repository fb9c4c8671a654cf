"""``python -m lossd_server.serve [flags]``: ``lossd serve [flags]`` (how a supervisor
starts its workers, with ``--worker``)."""

from lossd_server.serve.command import main

raise SystemExit(main())

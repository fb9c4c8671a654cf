"""The ``lossd`` command.

    lossd serve ...     run the server (needs ``lossd[server]``; added by the server through
                        the ``lossd.commands`` entry point group)
    lossd eval ...      stream prediction/target files through a server
    lossd losses ...    print a server's loss catalogue
    lossd --version     print the package version

Every ``--help`` shows each option's default. Output to a pipe closed early (``lossd losses
| head -1``) ends the command quietly with exit status 141, the status a shell reports for
``cat`` stopped the same way (SIGPIPE, 128 + 13).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from lossd import __version__, _eval
from lossd._client import LossClient
from lossd._errors import DeadlineExceeded, LossdError, Unavailable

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

EVAL_EPILOG = """exit codes: 0 done; 1 the server rejected the input; 2 usage or local input
error (missing file, shape mismatch); 3 the server could not be reached or timed out.

examples:
  lossd eval --target 127.0.0.1:50051 --loss cross_entropy logits.npy labels.npy \\
      --batch-size 4096 --option label_smoothing=0.1 --out losses.csv --top 10 \\
      --report report.html
  lossd eval --loss gaussian_nll_loss means.npy y.npy --input var=var.npy
  lossd eval --loss triplet_margin_loss anchors.npy -i positive=p.npy -i negative=n.npy"""

EXIT_BROKEN_PIPE = 141
"""Exit status when stdout's reader went away: 128 + SIGPIPE, what a shell reports for a
tool the signal stopped, so ``set -o pipefail`` scripts see lossd as they see ``cat``."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that keeps the description's and epilog's line breaks and ends each option's
    help with its default, unless the default is "not given" (None, False, an empty list)
    or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == []
                or default is argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse's parser (subcommands get the same class), except that a closed stdout
    reaches :func:`main`: argparse drops the error, so ``--help`` into a closed pipe would
    exit 0 or 141 depending on whether the help outgrows the output buffer."""

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        if message:
            try:
                (file or sys.stderr).write(message)
            except BrokenPipeError:
                raise
            except (AttributeError, OSError):  # no stream at all, as argparse
                pass


def build_parser() -> argparse.ArgumentParser:
    """The ``lossd`` parser: ``eval``, ``losses`` and the installed commands."""
    parser = _Parser(
        prog="lossd",
        description="lossd: per-sample losses and batch aggregates as a gRPC service.")
    parser.add_argument("--version", action="version", version=f"lossd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_installed_commands(sub)

    ev = sub.add_parser("eval", help="evaluate prediction/target files on a server",
                        description="Stream predictions and targets (.npy, .pt or "
                                    ".safetensors; name a tensor as FILE:KEY) in batches over "
                                    "EvaluateStream and print the aggregates.",
                        epilog=EVAL_EPILOG, formatter_class=HelpFormatter)
    ev.add_argument("predictions", help="predictions file, (N, ...)")
    ev.add_argument("targets", nargs="?", default=None,
                    help="targets file, (N, ...); left out for a loss without targets")
    ev.add_argument("--target", default="127.0.0.1:50051", help="server address (gRPC target)")
    ev.add_argument("--loss", default="cross_entropy", help="loss name (see `lossd losses`)")
    ev.add_argument("--weights", help="per-sample weights file, (N,)")
    ev.add_argument("--input", "-i", action="append", default=[], metavar="NAME=FILE",
                    help="an extra input of the loss, e.g. var=var.npy (repeatable; see "
                         "`lossd losses`)")
    ev.add_argument("--batch-size", type=int, default=4096, help="samples per streamed batch")
    ev.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                    help="a loss option, e.g. label_smoothing=0.1 or class_weights=1,2,3 "
                         "(repeatable)")
    ev.add_argument("--tag", help="tag for the server's loss metrics (a model or run name)")
    ev.add_argument("--out", help="write per-sample losses to this .npy or .csv file")
    ev.add_argument("--top", type=int, default=0, metavar="K",
                    help="print the K hardest samples of the whole run (kept by the server); "
                         "with --report, the report lists the same K (default: 0, none "
                         f"printed; a report then lists {_eval.REPORT_HARDEST})")
    ev.add_argument("--report", metavar="REPORT.html",
                    help="write a self-contained HTML report: loss histogram, per-class "
                         "breakdown, accuracy and calibration, quantiles, the hardest samples "
                         "(--top of them); needs matplotlib: pip install 'matplotlib>=3.8' (see "
                         "docs/install.md)")
    ev.add_argument("--class-names", metavar="A,B,C|FILE",
                    help="name the classes (index -> name) in the per-class table and the "
                         "hardest samples: a comma list, or a text file of one name a line")
    ev.add_argument("--timeout", type=float, default=None,
                    help="deadline for the whole run, s (default: none)")
    ev.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar on stderr (default: when stderr is a terminal)")

    ev.add_argument("--save", metavar="RESULT.lossd",
                    help="save the stream's result (exact state) for `lossd merge`")
    mg = sub.add_parser("merge", help="merge results saved by `lossd eval --save` (shards)",
                        description="Merge results of disjoint parts of one data set (saved by "
                        "`lossd eval --save` or result.save) into the result of one stream "
                        "over all of them, exactly. No server needed.",
                        formatter_class=HelpFormatter)
    mg.add_argument("results", nargs="+", metavar="RESULT.lossd", help="saved results, in order")
    mg.add_argument("--report", metavar="REPORT.html", help="write an HTML report of the merge")
    mg.add_argument("--json", metavar="OUT.json", help="write the merged result as JSON")
    ls = sub.add_parser("losses", help="print a server's loss catalogue",
                        formatter_class=HelpFormatter)
    ls.add_argument("--target", default="127.0.0.1:50051", help="server address (gRPC target)")
    return parser


def _losses(target: str) -> int:
    try:
        with LossClient(target, timeout=10) as client:
            catalogue = client.losses()
    except (Unavailable, DeadlineExceeded) as exc:
        print(f"lossd losses: cannot reach {target}: {exc}", file=sys.stderr)
        return _eval.EXIT_UNREACHABLE
    except LossdError as exc:
        print(f"lossd losses: {exc}", file=sys.stderr)
        return _eval.EXIT_REJECTED
    for info in catalogue:
        source = "" if info.source in ("", "lossd") else f"  [plugin: {info.source}]"
        print(f"{info.name}: {info.description}{source}")
        targets = (f"targets ({info.targets}) {' | '.join(info.target_shapes)}"
                   if info.targets != "none" else "no targets")
        print(f"    predictions {' | '.join(info.prediction_shapes)}; {targets}")
        for i in info.inputs:
            optional = ", optional" if i.optional else ""
            print(f"    input {i.name}: {' | '.join(i.shapes)} "
                  f"({'int' if 'int64' in i.dtypes else 'float'}{optional})  {i.description}")
        for o in info.options:
            choices = f" ({'|'.join(o.choices)})" if o.choices else ""
            print(f"    {o.name}: {o.type} = {o.default}{choices}  {o.description}")
    return _eval.EXIT_OK


COMMANDS_GROUP = "lossd.commands"
"""Entry points adding subcommands: each names a function ``add(subparsers)`` that adds its
parser and sets its ``run(args) -> int`` default. The server adds ``serve`` this way, so
this client never imports the server."""


def _add_installed_commands(sub: Any) -> None:
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            add = ep.load()
        except ImportError as exc:  # e.g. the server's dependencies are missing
            broken = sub.add_parser(ep.name, help=f"(unavailable: {exc})")
            broken.set_defaults(run=lambda args, exc=exc, name=ep.name: _unavailable(name, exc))
            continue
        add(sub)
    if "serve" not in sub.choices:
        missing = sub.add_parser("serve", help="run the gRPC server (needs lossd[server])")
        missing.set_defaults(run=lambda args: _unavailable("serve", None))


def _unavailable(name: str, exc: ImportError | None) -> int:
    why = f" ({exc})" if exc is not None else ""
    print(f"lossd {name}: the server is not installed{why}; pip install 'lossd[server]'",
          file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lossd`` command; returns the exit status (argparse exits itself on usage
    errors, ``--help`` and ``--version``)."""
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except BrokenPipeError:
        # The reader is gone: send what is still buffered nowhere, so the interpreter's
        # own flush at exit stays quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    run = getattr(args, "run", None)
    if run is not None:
        return int(run(args))
    if args.command == "losses":
        return _losses(args.target)
    if args.command == "merge":
        return _eval.merge(paths=args.results, report=args.report, json_out=args.json)
    return _eval.run(target=args.target, loss=args.loss, predictions=args.predictions,
                     targets=args.targets, weights=args.weights, inputs=args.input,
                     batch_size=args.batch_size,
                     out=args.out, top=args.top, tag=args.tag, options=args.option,
                     timeout=args.timeout, progress=args.progress, report=args.report,
                     class_names=args.class_names, save=args.save)


if __name__ == "__main__":
    raise SystemExit(main())

"""``lossd eval``: stream .npy/.pt/.safetensors files through EvaluateStream; and
``lossd merge``: merge the results such runs saved (``--save``), one per shard.

Exit codes (also in ``lossd eval --help``): 0 done; 1 the server rejected the input
(e.g. a class index out of range); 2 usage or local input error (missing file, shape
mismatch, unknown format); 3 the server could not be reached or timed out.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from lossd import _report
from lossd._client import LossClient
from lossd._errors import DeadlineExceeded, LossdError, Unavailable
from lossd._result import Aggregates, Hardest, class_names_of
from lossd.state import MergeError, load_result
from lossd.state import merge as merge_results

EXIT_OK, EXIT_REJECTED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class InputError(Exception):
    """A local problem with the files or flags (exit code 2)."""


def load_array(spec: str) -> Any:
    """An array from ``path.npy`` (memory-mapped), ``path.pt`` or ``path.safetensors[:key]``.

    .pt and .safetensors files holding several tensors need ``:key``.
    """
    path_text, _, key = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    path = Path(path_text)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    if suffix == ".pt":
        try:
            import torch
        except ImportError:
            raise InputError(f"{path}: reading .pt files needs torch installed") from None
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return _pick(path, obj if not isinstance(obj, torch.Tensor) else {"": obj}, key)
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise InputError(f"{path}: reading .safetensors needs `pip install safetensors`"
                             ) from None
        try:
            return _pick(path, load_file(str(path)), key)
        except Exception as exc:  # safetensors raises its own error types
            if isinstance(exc, InputError):
                raise
            raise InputError(f"{path}: {exc}") from None
    raise InputError(f"{path}: unknown format {suffix!r}; use .npy, .pt or .safetensors")


def _pick(path: Path, tensors: Any, key: str) -> Any:
    if not isinstance(tensors, dict):
        raise InputError(f"{path}: holds a {type(tensors).__name__}, not a tensor")
    if key:
        if key not in tensors:
            raise InputError(f"{path}: no tensor {key!r}; has {', '.join(map(str, tensors))}")
        return tensors[key]
    if len(tensors) != 1:
        raise InputError(f"{path}: holds {len(tensors)} tensors; name one as "
                         f"{path}:<key> ({', '.join(map(str, tensors))})")
    return next(iter(tensors.values()))


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value``: ints, floats, true/false, comma lists (tensors), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise InputError(f"--option {text!r}: expected key=value")
    low = raw.lower()
    if low in ("true", "false"):
        return key, low == "true"
    for kind in (int, float):
        try:
            return key, kind(raw)
        except ValueError:
            pass
    if "," in raw:
        try:
            return key, [float(x) for x in raw.split(",")]
        except ValueError:
            pass
    return key, raw


@dataclass
class Progress:
    """A one-line progress report on a terminal: samples, samples/s and ETA."""

    total: int
    out: TextIO
    enabled: bool
    done: int = 0
    start: float = 0.0

    def __post_init__(self) -> None:
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate else float("inf")
        self.out.write(f"\r{self.done:,}/{self.total:,} samples  {rate:,.0f} samples/s  "
                       f"ETA {eta:,.1f}s ")
        self.out.flush()

    def close(self) -> None:
        if self.enabled:
            self.out.write("\n")


def _batches(predictions: Any, targets: Any, weights: Any, inputs: dict[str, Any], size: int
             ) -> Iterator[tuple[Any, ...]]:
    for i in range(0, len(predictions), size):
        part = slice(i, i + size)
        yield (predictions[part], None if targets is None else targets[part],
               None if weights is None else weights[part],
               {name: arr[part] for name, arr in inputs.items()})


def parse_class_names(text: str) -> tuple[str, ...]:
    """``--class-names``: a text file of one name a line (blank lines left out), or else a
    comma list."""
    path = Path(text)
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        names = [name.strip() for name in text.split(",")]
    names = [name for name in names if name]
    if not names:
        raise InputError(f"--class-names {text!r}: no names")
    try:
        checked = class_names_of(names)
    except ValueError as exc:
        raise InputError(f"--{exc}".replace("class_names", "class-names", 1)) from None
    assert checked is not None
    return checked


def parse_input(text: str) -> tuple[str, str]:
    """``name=FILE`` of ``--input``."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise InputError(f"--input {text!r}: expected name=FILE")
    return name, path


def format_aggregates(loss: str, a: Aggregates) -> str:
    rows: list[tuple[str, Any]] = [("loss", loss), ("count", a.count), ("sum", a.sum),
                                   ("mean", a.mean)]
    if a.weighted_mean is not None:
        rows += [("weighted_sum", a.weighted_sum), ("weighted_mean", a.weighted_mean),
                 ("weight_sum", a.weight_sum)]
    rows += [("ignored", a.ignored), ("omitted", a.omitted)]
    if a.accuracy is not None:
        rows.append(("accuracy", a.accuracy))
    for k, v in (a.top_k_accuracy or {}).items():
        if k != 1:
            rows.append((f"top_{k}_accuracy", v))
    if a.ece is not None:
        rows.append(("ece", a.ece))
    if a.quantiles is not None:
        rows += [(f"q{level:g}", v) for level, v in a.quantiles.items()]
        rows.append(("max", a.quantiles.max))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:.10g}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                     for k, v in rows)


def format_hardest(h: Hardest) -> str:
    """The hardest samples as a table: index (position in the files), loss and, where
    known, target, predicted class (by name where class names are given) and confidence."""
    columns = ["index", "loss"] + [c for c in ("target", "predicted", "confidence")
                                   if any(getattr(s, c) is not None for s in h)]
    lines = [f"top {len(h)} hardest samples", "  ".join(f"{c:>10}" for c in columns)]
    for s in h:
        cells = [f"{s.index:>10}", f"{s.loss:>10.6g}"]
        for c in columns[2:]:
            v = getattr(s, f"{c}_name", None) or getattr(s, c)
            cells.append(f"{'-':>10}" if v is None else f"{v:>10.6g}" if isinstance(v, float)
                         else f"{v:>10}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def class_targets(predictions: Any, targets: Any) -> bool:
    """Whether targets look like class indices for these predictions: integers shaped
    (N, d1, ...) against predictions (N, C, d1, ...)."""
    dtype = np.dtype(str(getattr(targets, "dtype", "float")).removeprefix("torch."))
    return dtype.kind in "iu" and len(getattr(predictions, "shape", ())) >= 2 and \
        len(targets.shape) == len(predictions.shape) - 1


def write_losses(path: Path, losses: np.ndarray) -> None:
    if path.suffix.lower() == ".csv":
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "loss"])
            w.writerows((i, repr(float(v))) for i, v in enumerate(losses))
    elif path.suffix.lower() == ".npy":
        np.save(path, losses)
    else:
        raise InputError(f"--out {path}: use a .npy or .csv file")


REPORT_HARDEST = 20
"""Hardest samples a report lists when ``--top`` does not say: a screenful of table."""


def run(*, target: str, loss: str, predictions: str, targets: str | None, weights: str | None,
        batch_size: int, out: str | None, top: int, tag: str | None, options: Sequence[str],
        timeout: float | None, progress: bool | None, report: str | None = None,
        inputs: Sequence[str] = (), class_names: str | None = None, save: str | None = None,
        stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """The body of ``lossd eval``; returns the exit code.

    ``top``: the server keeps the K hardest samples of the stream (nothing is collected
    here for it); they are printed, and a report lists the same K (``REPORT_HARDEST`` when
    ``top`` is 0). ``report``: write an HTML report there (needs matplotlib); it asks the
    server for the quantiles, the hardest samples and, for class-index targets, the
    per-class breakdown, accuracy (top-1 and top-5) and calibration. ``inputs``: the loss's
    extra tensors, ``name=FILE`` each; ``targets`` None for a loss without targets.
    ``class_names``: ``--class-names`` (a comma list or a file), naming the classes in the
    hardest samples and the report. ``save``: write the stream's result there (its exact
    state, with the analyses a report shows; ``lossd merge`` combines such shards).
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        opts = dict(parse_option(o) for o in options)
        pred = load_array(predictions)
        targ = load_array(targets) if targets else None
        w = load_array(weights) if weights else None
        extra = {name: load_array(path) for name, path in map(parse_input, inputs)}
        names = parse_class_names(class_names) if class_names else None
        shape = tuple(getattr(pred, "shape", ()))
        if not shape or shape[0] == 0:
            raise InputError(f"{predictions}: no samples (shape {shape}); predictions need "
                             "a batch dimension with at least one sample")
        n = len(pred)
        named = [("targets", targ), ("weights", w),
                 *((f"input {name}", arr) for name, arr in extra.items())]
        for name, arr in named:
            if arr is not None and len(arr) != n:
                raise InputError(f"{name} has {len(arr)} samples, predictions {n}")
        if batch_size < 1:
            raise InputError("--batch-size must be at least 1")
        if top < 0:
            raise InputError("--top must be at least 0")
        for path in (out, report, save):
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        if report:
            _report.check()  # fail now, not after the whole stream
    except (InputError, _report.ReportError) as exc:
        print(f"lossd eval: {exc}", file=stderr)
        return EXIT_USAGE

    analyses: dict[str, Any] = {}
    if top:
        analyses["hardest"] = top
    if report or save:  # a saved shard keeps what a merged report shows
        analyses.update(hardest=top or REPORT_HARDEST, quantiles=True)
        if class_targets(pred, targ):
            classes = pred.shape[1]
            analyses.update(per_class=True, diagnostics=True,
                            top_k=(1, 5) if classes >= 5 else (1,))
    keep = bool(out or report)
    bar = Progress(n, stderr, stderr.isatty() if progress is None else progress)
    per_sample: list[np.ndarray] = []
    last = None
    try:
        with LossClient(target, timeout=timeout) as client:
            # The stream's figures come once, at its end (running=False): only they print.
            for last in client.evaluate_stream(_batches(pred, targ, w, extra, batch_size),
                                               loss=loss, tag=tag, class_names=names,
                                               running=False, **analyses, **opts):
                if keep:
                    per_sample.append(last.per_sample)
                bar.update(last.per_sample.shape[0])
    except (Unavailable, DeadlineExceeded) as exc:
        bar.close()
        print(f"lossd eval: cannot reach {target}: {exc}", file=stderr)
        return EXIT_UNREACHABLE
    except LossdError as exc:
        bar.close()
        print(f"lossd eval: {exc}", file=stderr)
        return EXIT_REJECTED
    bar.close()
    assert last is not None and last.running is not None
    running = last.running
    losses = np.concatenate(per_sample) if per_sample else np.zeros(0, np.float32)
    print(format_aggregates(loss, running), file=stdout)
    if top > 0 and running.hardest is not None:
        print("\n" + format_hardest(running.hardest), file=stdout)
    if out:
        try:
            write_losses(Path(out), losses)
        except InputError as exc:
            print(f"lossd eval: {exc}", file=stderr)
            return EXIT_USAGE
    if save:
        running.save(save)
        print(f"\nsaved: {save} (merge shards with `lossd merge`)", file=stdout)
    if report:
        page = _report.render(loss=loss, aggregates=running, losses=losses, options=opts,
                              sources={"predictions": predictions,
                                       **({"targets": targets} if targets else {}),
                                       **({"weights": weights} if weights else {}),
                                       **dict(map(parse_input, inputs))},
                              target=target, samples=n)
        Path(report).write_text(page, encoding="utf-8")
        print(f"\nreport: {report}", file=stdout)
    return EXIT_OK


def merge(*, paths: Sequence[str], report: str | None = None, json_out: str | None = None,
          stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """The body of ``lossd merge``: the results saved at ``paths`` (``lossd eval --save``,
    ``result.save``), merged in order and printed as ``lossd eval`` prints a stream's;
    ``report``: an HTML report of the merge; ``json_out``: its ``to_dict()`` as JSON."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        if report:
            _report.check()
        parts = [load_result(p) for p in paths]
        merged = merge_results(parts)
    except (OSError, MergeError, _report.ReportError) as exc:
        what = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) else exc
        print(f"lossd merge: {what}", file=stderr)
        return EXIT_USAGE
    assert merged.state is not None
    loss = merged.state.loss
    print(format_aggregates(loss, merged), file=stdout)
    print(f"\nmerged {len(parts)} results: {merged.state.samples} samples, "
          f"{merged.state.batches} batches", file=stdout)
    if merged.hardest is not None:
        print("\n" + format_hardest(merged.hardest), file=stdout)
    for path in (json_out, report):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if json_out:
        Path(json_out).write_text(json.dumps(merged.to_dict(), default=str) + "\n",
                                  encoding="utf-8")
        print(f"\njson: {json_out}", file=stdout)
    if report:
        options = dict(line.split("=", 1) for line in merged.state.options.splitlines())
        page = _report.render(loss=loss, aggregates=merged, losses=None, options=options,
                              sources={"merged": ", ".join(paths)}, target="",
                              samples=merged.state.samples)
        Path(report).write_text(page, encoding="utf-8")
        print(f"\nreport: {report}", file=stdout)
    return EXIT_OK

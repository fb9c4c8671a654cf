"""One shard of a sharded evaluation: evaluate a contiguous slice of a data set on a lossd
server and save the shard's exact result, for ``lossd merge`` to turn the shards into the
result of one evaluation over the whole set.

    for i in 0 1 2; do      # three shards in turn here; a cluster runs them side by side
        .venv/bin/python examples/sharded_eval.py --address 127.0.0.1:50051 \\
            --shards 3 --index $i --out-dir results
    done
    .venv/bin/lossd merge results/shard-*.lossd --json results/merged.json \\
        --report results/report.html

On Kubernetes an Indexed Job runs it, one pod per shard (k8s/jobs/sharded-eval/;
docs/deploy.md, "Sharded evaluation"): the shard index is ``JOB_COMPLETION_INDEX``, which
Kubernetes sets in each pod, the count ``SHARDS`` (``--index`` and ``--shards`` override
them); a second Job merges the files the pods left on a shared volume.

Shard i of n takes samples [i*N//n, (i+1)*N//n): contiguous and in order, so the merged
result is the one a single stream over the set gives, hardest sample indices included. Each
sample goes with its data-set index as its sample id (``lossd.Batch``), so the merged
hardest samples name data-set items. The result is saved as ``shard-<i>.lossd``, the index
zero-padded to the width of the last one so that a shell glob lists the shards in order.

The data: by default a seeded synthetic classifier's logits over imbalanced classes, the
same in every pod; ``--predictions`` and ``--targets`` take .npy files instead, mapped
rather than read, so a pod reads only its slice. To adapt the script, make
``open_dataset`` return your arrays, or run your model over the slice in ``batches``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lossd import Aggregates, Batch, LossClient

SAMPLES = 10_000      # the synthetic set's size; a real one is what makes sharding pay
CLASSES = 10
CLASS_DECAY = 0.7     # class c has CLASS_DECAY**c of the first class's share: imbalanced
BATCH = 1_000         # samples per stream message
HARDEST = 20          # hardest samples each shard keeps; the merge keeps the set's HARDEST
WAIT_SECONDS = 300.0  # a Job can start before the server is ready (its startup: minutes)
EXIT_USAGE = 2        # argparse's too: a retry cannot help (the Job fails the index at once)


def parse_args(argv: Sequence[str] | None = None,
               environ: Mapping[str, str] = os.environ) -> argparse.Namespace:
    """The flags; ``--index`` and ``--shards`` default to ``JOB_COMPLETION_INDEX`` and
    ``SHARDS`` from ``environ``, and a shard index must be given one way or the other."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="the lossd server")
    # argparse converts a string default with `type`, so the environment's text is checked
    # exactly as a flag's would be.
    parser.add_argument("--index", type=int, default=environ.get("JOB_COMPLETION_INDEX"),
                        help="this shard, from 0 (default: $JOB_COMPLETION_INDEX)")
    parser.add_argument("--shards", type=int, default=environ.get("SHARDS", "1"),
                        help="the number of shards (default: $SHARDS, else 1)")
    parser.add_argument("--out-dir", type=Path, default=Path("."),
                        help="where shard-<index>.lossd goes (in a Job: the shared volume)")
    parser.add_argument("--predictions", type=Path, help="a .npy of the whole set's predictions")
    parser.add_argument("--targets", type=Path, help="a .npy of its class-index targets")
    parser.add_argument("--samples", type=int, default=SAMPLES,
                        help="the synthetic set's size (without --predictions)")
    parser.add_argument("--seed", type=int, default=0, help="the synthetic set's seed")
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--hardest", type=int, default=HARDEST)
    parser.add_argument("--wait", type=float, default=WAIT_SECONDS,
                        help="seconds to wait for the server to be ready")
    args = parser.parse_args(argv)
    if args.index is None:
        parser.error("no shard index: pass --index or set JOB_COMPLETION_INDEX "
                     "(an Indexed Job sets it)")
    if not 0 <= args.index < args.shards:
        parser.error(f"shard index {args.index} is not in [0, {args.shards})")
    if (args.predictions is None) != (args.targets is None):
        parser.error("--predictions and --targets go together")
    return args


def shard_bounds(index: int, shards: int, samples: int) -> tuple[int, int]:
    """The samples [start, stop) of shard ``index`` of ``shards``: contiguous, in order,
    their sizes within one of each other."""
    return index * samples // shards, (index + 1) * samples // shards


def shard_path(out_dir: Path, index: int, shards: int) -> Path:
    """``out_dir/shard-<index>.lossd``, the index padded to the width of the last one."""
    return out_dir / f"shard-{index:0{len(str(shards - 1))}d}.lossd"


def synthetic_dataset(samples: int = SAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits (samples, CLASSES) float32 of a fair classifier and int64 targets: the same
    for every pod that asks with the same seed."""
    rng = np.random.default_rng(seed)
    shares = CLASS_DECAY ** np.arange(CLASSES)
    targets = rng.choice(CLASSES, size=samples, p=shares / shares.sum())
    logits = rng.standard_normal((samples, CLASSES)).astype(np.float32)
    logits[np.arange(samples), targets] += 2.0
    return logits, targets.astype(np.int64)


def open_dataset(args: argparse.Namespace) -> tuple[Any, Any]:
    """The whole set's predictions and targets; slicing them must be cheap (a memory map)."""
    if args.predictions is not None:
        return (np.load(args.predictions, mmap_mode="r"),
                np.load(args.targets, mmap_mode="r"))
    return synthetic_dataset(args.samples, args.seed)


def batches(predictions: Any, targets: Any, start: int, stop: int, size: int
            ) -> Iterator[Batch]:
    """The shard's samples in stream batches, each sample's id its data-set index."""
    for lo in range(start, stop, size):
        hi = min(stop, lo + size)
        yield Batch(np.asarray(predictions[lo:hi]), np.asarray(targets[lo:hi]),
                    sample_ids=np.arange(lo, hi, dtype=np.int64))


def save(result: Aggregates, path: Path) -> None:
    """``result.save(path)`` through a temporary name, so that a pod killed while writing
    (and retried by the Job) never leaves a partial file for the merge to read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    result.save(partial)
    os.replace(partial, path)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    predictions, targets = open_dataset(args)
    start, stop = shard_bounds(args.index, args.shards, len(predictions))
    if start == stop:
        print(f"shard {args.index} of {args.shards} is empty: the set has only "
              f"{len(predictions)} samples", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    with LossClient(args.address) as client:
        client.wait_for_ready(args.wait)
        result = client.evaluate_all(batches(predictions, targets, start, stop, args.batch_size),
                                     per_class=True, accuracy=True, hardest=args.hardest,
                                     quantiles=True)
    path = shard_path(args.out_dir, args.index, args.shards)
    save(result, path)
    print(f"shard {args.index} of {args.shards}: samples {start} to {stop - 1}, "
          f"mean loss {result.mean:.6f}, accuracy {result.accuracy:.4f}; saved {path}")


if __name__ == "__main__":
    main()

"""Train a small classifier with lossd in the loop, end to end.

    .venv/bin/python examples/train_loop.py --address 127.0.0.1:50051   # with make serve

A tiny MLP learns synthetic, imbalanced 4-class data in which 3 % of the training labels
are flipped. The training step keeps torch's own ``F.cross_entropy``: its logits are
already on the job's device and nothing there is analysed per sample (the README's "When a
loss service pays"). lossd does what a local loss gives no one for free:

- after each epoch, the per-sample losses of the whole training set (``client.evaluate``
  with ``hardest=K``): the K hardest samples, which on this data are mostly the flipped
  labels; the next epoch leaves them out of the step (weight 0);
- a validation pass over one stream (``client.evaluate_stream`` with ``per_class`` and
  ``accuracy``): the running loss and accuracy of each class, the rare ones included,
  without gathering the logits anywhere.

It prints one line per epoch and the last validation's per-class table.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from lossd import LossClient

CLASS_SHARES = (0.70, 0.20, 0.07, 0.03)   # imbalanced: the last class is 3 % of the data
FEATURES = 16
FLIPPED_SHARE = 0.03                        # training labels replaced by another class
BATCH = 64
VALIDATION_BATCH = 250                      # one stream message per validation batch


def make_data(n: int, rng: np.random.Generator, centres: np.ndarray
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples around each class's centre, classes drawn with CLASS_SHARES."""
    labels = rng.choice(len(CLASS_SHARES), size=n, p=CLASS_SHARES)
    features = centres[labels] + rng.standard_normal((n, FEATURES))
    return torch.from_numpy(features.astype(np.float32)), torch.from_numpy(labels)


def flip_labels(labels: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
    """Replace FLIPPED_SHARE of ``labels`` (in place) by another class; their positions."""
    n, classes = len(labels), len(CLASS_SHARES)
    flipped = rng.choice(n, size=int(FLIPPED_SHARE * n), replace=False)
    labels[flipped] = torch.from_numpy(
        (labels[flipped].numpy() + rng.integers(1, classes, len(flipped))) % classes)
    return np.sort(flipped)


def batches(x: torch.Tensor, y: torch.Tensor, size: int
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (features, labels) slices of ``size`` samples."""
    for i in range(0, len(x), size):
        yield x[i:i + size], y[i:i + size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="the lossd server")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    centres = 0.5 * rng.standard_normal((len(CLASS_SHARES), FEATURES))
    x_train, y_train = make_data(3000, rng, centres)
    x_val, y_val = make_data(1000, rng, centres)
    flipped = flip_labels(y_train, rng)

    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, len(CLASS_SHARES)))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    keep = torch.ones(len(x_train))           # per-sample weight of the next epoch's steps

    with LossClient(args.address) as client:
        for epoch in range(1, args.epochs + 1):
            model.train()
            order = torch.randperm(len(x_train))
            for i in range(0, len(order), BATCH):
                idx = order[i:i + BATCH]
                per_sample = F.cross_entropy(model(x_train[idx]), y_train[idx],
                                             reduction="none")
                w = keep[idx]
                loss = (per_sample * w).sum() / w.sum().clamp(min=1)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()

            model.eval()
            with torch.no_grad():
                # The training set's per-sample losses: the hardest are left out next epoch.
                # K is the number of flipped labels, so "caught" reads as a share of them.
                train = client.evaluate(model(x_train), y_train, loss="cross_entropy",
                                        hardest=len(flipped), tag="train_loop")
                assert train.hardest is not None
                hardest = train.hardest.indices
                keep = torch.ones(len(x_train))
                keep[torch.from_numpy(hardest)] = 0.0
                caught = len(np.intersect1d(hardest, flipped))

                # Validation over one stream; each result carries the running analyses.
                stream = ((model(xb), yb) for xb, yb in batches(x_val, y_val,
                                                                VALIDATION_BATCH))
                *_, last = client.evaluate_stream(stream, loss="cross_entropy",
                                                  per_class=True, accuracy=True,
                                                  tag="train_loop")
            running = last.running
            assert running is not None
            print(f"epoch {epoch}: train loss {train.mean:.4f}, hardest {len(hardest)}: "
                  f"{caught} flipped labels; validation loss {running.mean:.4f}, "
                  f"accuracy {running.accuracy:.4f}")

    assert running is not None and running.per_class is not None
    print(f"validation per class (after epoch {args.epochs}):")
    print("class  share  count  mean loss  accuracy")
    for cls, agg in running.per_class.items():
        print(f"{cls:5d}  {CLASS_SHARES[cls]:5.2f}  {agg.count:5d}  {agg.mean:9.4f}  "
              f"{agg.accuracy:8.4f}")


if __name__ == "__main__":
    main()

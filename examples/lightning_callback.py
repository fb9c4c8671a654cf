"""Validate a PyTorch Lightning model with lossd's callback, end to end.

    .venv/bin/python examples/lightning_callback.py --address 127.0.0.1:50051   # make serve

A tiny MLP learns synthetic, imbalanced 3-class data. Its ``validation_step`` returns the
logits and targets; ``LossdCallback`` streams them to the server from a background thread
(the step does not wait) and logs, at each epoch's end, the mean loss, accuracy, ECE, loss
quantiles and each class's loss and accuracy by name; ``--report-dir`` adds an HTML
report per epoch. Nothing else in the module knows about lossd.

It prints the last epoch's lossd metrics as Lightning holds them
(``trainer.callback_metrics``), each class's as the loggers get them (from
``callback.last``, here with no logger), then the hardest validation samples.
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lossd.integrations.lightning import LossdCallback

CLASSES = ("common", "uncommon", "rare")
SHARES = (0.75, 0.20, 0.05)
FEATURES = 16


def make_data(n: int, g: torch.Generator, centres: torch.Tensor) -> TensorDataset:
    """``n`` samples around their class's centre, classes drawn with SHARES."""
    labels = torch.multinomial(torch.tensor(SHARES), n, replacement=True, generator=g)
    return TensorDataset(centres[labels] + torch.randn(n, FEATURES, generator=g), labels)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, len(CLASSES)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
                      ) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
                        ) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"logits": self(x), "targets": y}   # what LossdCallback reads

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="the lossd server")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--report-dir", help="write an HTML report per epoch here")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    centres = 0.6 * torch.randn(len(CLASSES), FEATURES, generator=g)
    train = DataLoader(make_data(2000, g, centres), batch_size=64, shuffle=True)
    val = DataLoader(make_data(1000, g, centres), batch_size=250)

    callback = LossdCallback(args.address, class_names=CLASSES, hardest=5,
                             report_dir=args.report_dir)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(Classifier(), train, val)

    for key, value in sorted(trainer.callback_metrics.items()):
        if key.startswith("lossd/"):
            print(f"{key} {float(value):.4f}")
    last = callback.last["val"]
    if last.per_class is not None and last.per_class.accuracy is not None:
        for name, loss, accuracy in zip(last.per_class.labels, last.per_class.mean,
                                        last.per_class.accuracy, strict=True):
            print(f"lossd/val/class/{name}/loss {loss:.4f}")
            print(f"lossd/val/class/{name}/accuracy {accuracy:.4f}")
    hardest = last.hardest or ()
    print("hardest validation samples (index, loss, target, predicted):")
    for h in hardest:
        print(f"{h.index} {h.loss:.4f} {h.target_name} {h.predicted_name}")


if __name__ == "__main__":
    main()

"""Evaluate a Hugging Face model with lossd as the Trainer's ``compute_metrics``, end to end.

    .venv/bin/python examples/hf_trainer.py --address 127.0.0.1:50051   # with make serve

A tiny BERT, built from a config (nothing is downloaded), learns to classify synthetic
token sequences into 3 classes (the class is the first token's remainder by 3). With
``batch_eval_metrics=True`` the Trainer hands each evaluation batch to ``LossdMetrics``,
which streams it to the server and drops it: the Trainer keeps no logits, however large
the evaluation set; the last batch's call returns the metrics.

It prints the last evaluation's metrics, one ``name value`` line each.
"""

from __future__ import annotations

import argparse

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from lossd.integrations.hf import LossdMetrics

CLASSES = ("zero", "one", "two")
VOCAB = 30
LENGTH = 8


def make_data(n: int, g: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """``n`` token sequences; each one's label is its first token modulo 3."""
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    return [{"input_ids": row, "labels": row[0] % len(CLASSES)} for row in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="the lossd server")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--output-dir", default="/tmp/lossd-hf-example",
                        help="the Trainer's output directory (nothing is saved there)")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=len(CLASSES)))
    training = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, learning_rate=1e-3,
        per_device_train_batch_size=32, per_device_eval_batch_size=100,
        eval_strategy="epoch", batch_eval_metrics=True, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, logging_strategy="no")
    trainer = Trainer(model=model, args=training, train_dataset=make_data(1000, g),
                      eval_dataset=make_data(500, g),
                      compute_metrics=LossdMetrics(args.address, class_names=CLASSES))
    trainer.train()
    for name, value in sorted(trainer.evaluate().items()):
        print(f"{name} {value:.4f}")


if __name__ == "__main__":
    main()

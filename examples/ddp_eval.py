"""Evaluate a model under DDP, every rank its own shard, the ranks merged exactly, end to end.

    torchrun --standalone --nproc_per_node 2 examples/ddp_eval.py --address 127.0.0.1:50051

Each rank (gloo on CPU; nccl, one GPU a rank, where CUDA is available) runs the same seeded
model over its shard of a seeded, imbalanced 5-class validation set (a
``DistributedSampler``: rank r gets samples r, r + W, r + 2W, ...) and streams the logits
to the lossd server with each sample's dataset index as its sample id. Then
``lossd.distributed.gather(shard, dst=0)`` sends each rank's exact result (its state,
kilobytes, not its logits) to rank 0, which merges them in rank order: the same figures as
one stream over the whole set (sums and means bit for bit, per class, accuracy,
quantiles, the hardest samples), without any rank holding another's logits.

Rank 0 prints its own shard's size, then the merged metrics, one ``name value`` a line,
then the hardest samples by dataset index. A rank whose evaluation fails still takes part
(it passes its exception to ``gather``), so rank 0 reports which rank failed instead of
every rank waiting.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lossd import Aggregates, Batch, LossClient, LossdError
from lossd.distributed import gather
from lossd.integrations import flat_metrics

CLASSES = ("a", "b", "c", "d", "e")
SHARES = (0.40, 0.25, 0.15, 0.12, 0.08)
FEATURES = 16
SEED = 21


def centres() -> torch.Tensor:
    """Each class's centre in feature space (seeded)."""
    return 0.6 * torch.randn(len(CLASSES), FEATURES,
                             generator=torch.Generator().manual_seed(SEED))


def make_data(n: int) -> TensorDataset:
    """The validation set: ``n`` samples around their class's centre (classes drawn with
    SHARES), and each sample's index, its id."""
    g = torch.Generator().manual_seed(SEED + 1)
    labels = torch.multinomial(torch.tensor(SHARES), n, replacement=True, generator=g)
    features = centres()[labels] + torch.randn(n, FEATURES, generator=g)
    return TensorDataset(features, labels, torch.arange(n))


def make_model() -> torch.nn.Linear:
    """The model every rank evaluates, the same on each (as after a DDP training): the
    linear classifier of the nearest class centre, logit_c = x . centre_c - |centre_c|^2/2
    (what training it would approach), blind to the classes' shares."""
    c = centres()
    model = torch.nn.Linear(FEATURES, len(CLASSES))
    with torch.no_grad():
        model.weight.copy_(c)
        model.bias.copy_(-0.5 * (c * c).sum(dim=1))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()

    if torch.cuda.is_available():
        # nccl: object collectives use the current device, so each rank sets its own.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend, device = "nccl", torch.device("cuda")
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(backend)
    try:
        data = make_data(args.samples)
        # shuffle=False: rank r's shard in index order. A set that does not divide by the
        # world size is padded with its first samples, which would then count twice.
        sampler = DistributedSampler(data, shuffle=False)
        loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler)
        model = make_model().to(device).eval()
        shard: Aggregates | LossdError
        try:
            with LossClient(args.address) as client, torch.no_grad():
                shard = client.evaluate_all(
                    (Batch(model(x.to(device)), y.to(device), sample_ids=ids.numpy())
                     for x, y, ids in loader),
                    per_class=True, accuracy=True, diagnostics=True, hardest=5,
                    quantiles=True, class_names=CLASSES)
        except LossdError as exc:
            shard = exc                      # take part all the same: rank 0 says who failed
        merged = gather(shard, dst=0)
        if dist.get_rank() == 0:
            assert merged is not None
            print(f"ranks {dist.get_world_size()} ({backend}), rank 0's shard "
                  f"{len(sampler)} samples, merged {merged.count} samples")
            for name, value in flat_metrics(merged).items():
                print(f"{name} {value:.6f}")
            print("hardest samples (dataset index, loss, target, predicted):")
            for h in merged.hardest or ():
                print(f"{h.sample_id} {h.loss:.6f} {h.target_name} {h.predicted_name}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

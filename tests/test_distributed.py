"""lossd.distributed.gather: the results of torch.distributed ranks merged exactly, against a
real server.

Two gloo ranks on CPU (spawned processes, a file:// rendezvous), each streaming its
``DistributedSampler`` shard (no shuffle, a set that divides evenly, so the shards' union is
the set once): what ``gather`` gives every rank (with ``dst=0`` rank 0 only) equals one
stream over rank 0's batches then rank 1's, every field; and, the order aside, one stream
over the whole set: sums and means bit for bit, per class, accuracy, quantiles, and the
hardest samples by sample id (the dataset index). A rank with nothing takes part and is
left out; a rank that failed, sent no state or a result of other analyses makes every
merging rank raise MergeError naming it. ``LossdMetric.compute`` across the same ranks
returns the whole set's metrics on each, and leaves them out on both when one rank's server
is dead (``strict``: raised on both, after both took part). Without torch.distributed,
``gather`` is the local merge, and needs no torch.
"""

from __future__ import annotations

import json
import pickle
import socket
import subprocess
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from lossd import Aggregates, Batch, LossClient, MergeError, Unavailable, merge
from lossd.distributed import gather
from tests.conftest import ROOT

WORLD = 2
N = 64          # divides by WORLD: no padding, each rank 32 samples, 4 batches of 8
CLASSES = ("ant", "bee", "cat", "dog")
BATCH = 8
ANALYSES: dict[str, Any] = dict(per_class=True, accuracy=True, diagnostics=True, top_k=2,
                                hardest=6, quantiles=True, hardest_batches=3)


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation set: seeded logits and class targets (sample ids: the indices)."""
    g = torch.Generator().manual_seed(21)
    return torch.randn(N, len(CLASSES), generator=g), torch.randint(0, len(CLASSES), (N,),
                                                                     generator=g)


def batches(indices: list[int]) -> list[Batch]:
    """The set's samples at ``indices`` in batches of BATCH, each sample's id its index."""
    logits, targets = dataset()
    out = []
    for at in range(0, len(indices), BATCH):
        ids = torch.tensor(indices[at:at + BATCH])
        out.append(Batch(logits[ids], targets[ids], sample_ids=ids.numpy()))
    return out


def shard(rank: int) -> list[Batch]:
    """Rank ``rank``'s batches as a DataLoader with a DistributedSampler gives them."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    logits, targets = dataset()
    data = TensorDataset(logits, targets, torch.arange(N))
    sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=False)
    return [Batch(x, y, sample_ids=i.numpy())
            for x, y, i in DataLoader(data, batch_size=BATCH, sampler=sampler)]


def dead_address() -> str:
    """An address where nothing listens (a port bound and closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def outcome(call: Any) -> Any:
    """What a rank reports of ``call()``: the merged result's saved bytes, None, or the
    MergeError's message."""
    try:
        result = call()
    except MergeError as exc:
        return f"MergeError: {exc}"
    return None if result is None else result.to_bytes()


def rank_main(rank: int, init: str, address: str, dead: str, out: str) -> None:
    """One rank of the run (spawned): evaluate its shard, gather in every way, and write
    what each gave to ``out``/rank{rank}.pickle."""
    import torch.distributed as dist

    from lossd.integrations.torchmetrics import LossdMetric

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        with LossClient(address) as client:
            mine = client.evaluate_all(shard(rank), class_names=CLASSES, **ANALYSES)
            other = client.evaluate_all(shard(rank), class_names=CLASSES,
                                        **{**ANALYSES, "top_k": 3})
            stateless = client.evaluate(*shard(rank)[0][:2])
        second = rank == 1
        got = {
            "all": outcome(lambda: gather(mine)),
            "dst": outcome(lambda: gather(mine, dst=0)),
            "rank0_only": outcome(lambda: gather(None if second else mine)),
            "none": outcome(lambda: gather(None)),
            "mismatch": outcome(lambda: gather(other if second else mine)),
            "failed": outcome(lambda: gather(Unavailable("server gone") if second else mine)),
            "failed_dst": outcome(lambda: gather(Unavailable("gone") if second else mine,
                                                 dst=0)),
            "stateless": outcome(lambda: gather(stateless if second else mine)),
        }
        metric = LossdMetric(address, class_names=CLASSES, top_k=2)
        for b in shard(rank)[:2]:
            metric.update(b.predictions, b.targets)
        half = metric.compute()                   # update goes on after compute
        for b in shard(rank)[2:]:
            metric.update(b.predictions, b.targets)
        got["metric_half"] = {k: v.item() for k, v in half.items()}
        got["metric"] = {k: v.item() for k, v in metric.compute().items()}
        broken = LossdMetric(dead if second else address, client_options={"retry_attempts": 1})
        # The dead server's warning comes at the update or at the compute, whichever
        # meets the failed stream first.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            broken.update(*shard(rank)[0][:2])
            got["broken"] = {k: v.item() for k, v in broken.compute().items()}
        got["broken_warnings"] = [str(w.message) for w in caught]
        strict = LossdMetric(dead if second else address, strict=True,
                             client_options={"retry_attempts": 1})
        # As above, the error comes at the update or at the compute; a rank whose update
        # raised still takes part in the compute, a collective.
        try:
            strict.update(*shard(rank)[0][:2])
        except Exception as exc:
            got["strict"] = f"{type(exc).__name__}: {exc}"
        try:
            strict.compute()
            got.setdefault("strict", "no error")
        except Exception as exc:
            got.setdefault("strict", f"{type(exc).__name__}: {exc}")
        Path(out, f"rank{rank}.pickle").write_bytes(pickle.dumps(got))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(address: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each of the two ranks reported."""
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("ranks")
    mp.spawn(rank_main, args=(str(tmp / "init"), address, dead_address(), str(tmp)),
             nprocs=WORLD, join=True)
    return [pickle.loads((tmp / f"rank{r}.pickle").read_bytes()) for r in range(WORLD)]


def same(a: Aggregates | None, b: Aggregates | None) -> bool:
    """Equal aggregates, every field (NaN equal to NaN)."""
    return json.dumps(a and a.to_dict(), sort_keys=True) == \
        json.dumps(b and b.to_dict(), sort_keys=True)


def loaded(saved: Any) -> Aggregates:
    assert isinstance(saved, bytes), saved
    return Aggregates.from_bytes(saved)


def test_gather_equals_one_stream_over_the_shards_in_rank_order(
        address: str, ranks: list[dict[str, Any]]) -> None:
    with LossClient(address) as client:
        want = client.evaluate_all(shard(0) + shard(1), class_names=CLASSES, **ANALYSES)
        whole = client.evaluate_all(batches(list(range(N))), class_names=CLASSES,
                                    **ANALYSES)
        first = client.evaluate_all(shard(0), class_names=CLASSES, **ANALYSES)
    for got in ranks:
        merged = loaded(got["all"])
        assert same(merged, want)
        assert merged.count == N
        # The whole set in its own order: every figure the same (sums and means bit for
        # bit, per class, accuracy, calibration, quantiles); the hardest by sample id.
        assert (merged.sum, merged.mean) == (whole.sum, whole.mean)
        mine, theirs = merged.to_dict(), whole.to_dict()
        for key in set(mine) - {"hardest", "hardest_batches"}:
            assert json.dumps(mine[key]) == json.dumps(theirs[key]), key
        assert merged.hardest is not None and whole.hardest is not None
        assert [(h.sample_id, h.loss) for h in merged.hardest] == \
            [(h.sample_id, h.loss) for h in whole.hardest]
        # Indices are positions in rank order: rank 1's sample 2r+1 sits at N/2 + r.
        assert [h.index for h in merged.hardest] == [
            i // 2 + (N // 2 if i % 2 else 0) for i in (h.sample_id for h in whole.hardest)]
        assert loaded(got["rank0_only"]) is not None
        assert same(loaded(got["rank0_only"]), first)      # rank 1's None left out
        assert got["none"] is None                          # nothing anywhere
    assert same(loaded(ranks[0]["dst"]), want) and ranks[1]["dst"] is None


def test_gather_names_the_rank_that_cannot_merge(ranks: list[dict[str, Any]]) -> None:
    for got in ranks:
        assert got["mismatch"].startswith("MergeError: analyses differ: top_k")
        assert "(rank 1, against rank 0)" in got["mismatch"]
        assert got["failed"] == "MergeError: rank 1 failed: Unavailable: UNAVAILABLE: server gone"
        assert got["stateless"].startswith(
            "MergeError: rank 1 sent a result without mergeable state")
    assert ranks[0]["failed_dst"] == "MergeError: rank 1 failed: Unavailable: UNAVAILABLE: gone"
    assert ranks[1]["failed_dst"] is None                   # only dst merges


def test_torchmetrics_compute_merges_the_ranks(address: str,
                                               ranks: list[dict[str, Any]]) -> None:
    from lossd.integrations import flat_metrics

    analyses = dict(per_class=True, accuracy=True, diagnostics=True, top_k=2, quantiles=True)
    with LossClient(address) as client:
        half = client.evaluate_all(shard(0)[:2] + shard(1)[:2], class_names=CLASSES,
                                   **analyses)
        want = client.evaluate_all(shard(0) + shard(1), class_names=CLASSES, **analyses)
    for got in ranks:
        assert got["metric_half"] == flat_metrics(half)
        assert got["metric"] == flat_metrics(want) and got["metric"]["count"] == N
        assert got["broken"] == {}
    assert any("LossdMetric left out" in w and "rank 1 failed" in w
               for w in ranks[0]["broken_warnings"]), ranks[0]["broken_warnings"]
    assert any("LossdMetric left out" in w and "UNAVAILABLE" in w
               for w in ranks[1]["broken_warnings"]), ranks[1]["broken_warnings"]
    # strict: each raises, once both took part: the failed rank its error, the other
    # a MergeError naming it.
    assert ranks[0]["strict"].startswith("MergeError: rank 1 failed: Unavailable:")
    assert ranks[1]["strict"].startswith("Unavailable: UNAVAILABLE:")


def test_without_torch_distributed_gather_is_the_local_merge(address: str) -> None:
    with LossClient(address) as client:
        r = client.evaluate_all(shard(0), class_names=CLASSES, **ANALYSES)
        batch = client.evaluate(*shard(0)[0][:2])
    assert same(gather(r), r) and same(gather(r, dst=0), merge([r]))
    assert gather(None) is None
    with pytest.raises(MergeError, match="rank 0 sent a result without mergeable state"):
        gather(batch)
    with pytest.raises(MergeError, match="rank 0 failed: ValueError: bad"):
        gather(ValueError("bad"))
    with pytest.raises(TypeError, match="a dict, not a LossResult"):
        gather({"mean": 1.0})  # type: ignore[arg-type]


def test_import_lossd_distributed_needs_no_torch() -> None:
    """Importing it imports no torch; without torch, ``gather`` is the local merge."""
    code = ("import sys; sys.modules['torch'] = None; import lossd.distributed as d; "
            "print(d.gather(None), 'torch' in sys.modules and sys.modules['torch'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"]

"""The loss comparison on a CUDA server, and bad input that must not poison its context."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from loss_reference import CASES, Case, check_case

import lossd
from lossd import LossClient
from lossd_server.app import LossdServer
from tests.conftest import EngineBlocker

pytestmark = pytest.mark.gpu


def test_server_runs_on_cuda(gpu_server: LossdServer) -> None:
    assert gpu_server.engine.device.type == "cuda"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_torch_on_cuda(gpu_client: LossClient, case: Case) -> None:
    check_case(gpu_client, case, device="cuda")


def _assert_cuda_serves(gpu_client: LossClient) -> None:
    """A valid request right after: served, and equal to torch on the same device."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 7, generator=g)
    t = torch.randint(0, 7, (64,), generator=g)
    r = gpu_client.evaluate(x, t, loss="cross_entropy", label_smoothing=0.1)
    want = F.cross_entropy(x.cuda(), t.cuda(), label_smoothing=0.1, reduction="none").cpu()
    assert torch.equal(torch.from_numpy(r.per_sample), want)
    assert r.count == 64
    torch.cuda.synchronize()  # this process's context is healthy too


@pytest.mark.parametrize(("loss", "x", "t", "kwargs", "value"), [
    ("cross_entropy", torch.randn(8, 5), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]), {}, "5"),
    ("cross_entropy", torch.randn(8, 5), torch.tensor([0, 1, -1, 3, 4, 0, 0, 1]), {}, "-1"),
    ("cross_entropy", torch.randn(8, 5), torch.tensor([0, 1, -7, 3, 4, 0, -1, 1]),
     {"ignore_index": -1}, "-7"),
    ("nll_loss", torch.randn(8, 5).log_softmax(1), torch.full((8,), 1000, dtype=torch.int32),
     {}, "1000"),
    ("cross_entropy", torch.randn(2, 3, 4, 4), torch.full((2, 4, 4), 3), {}, "3"),
], ids=["too-big", "negative", "negative-with-ignore-index", "nll-int32", "dense"])
def test_out_of_range_class_index_on_cuda(gpu_client: LossClient, loss: str, x: torch.Tensor,
                                          t: torch.Tensor, kwargs: dict[str, object],
                                          value: str) -> None:
    with pytest.raises(lossd.InvalidArgument) as info:
        gpu_client.evaluate(x, t, loss=loss, **kwargs)
    assert info.value.message.startswith(f"targets: class index {value} out of range")
    _assert_cuda_serves(gpu_client)


def test_cuda_tensors_in(gpu_client: LossClient) -> None:
    """The client takes CUDA tensors (bfloat16 and non-contiguous too)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g).cuda()
    t = torch.rand(32, 6, generator=g).cuda()
    w = torch.rand(32, generator=g).cuda()
    r = gpu_client.evaluate(x.t().contiguous().t(), t, loss="binary_cross_entropy_with_logits",
                            weights=w)
    want = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1)
    assert np.array_equal(r.per_sample, want.cpu().numpy())
    rb = gpu_client.evaluate(x.bfloat16(), t.bfloat16(), loss="mse_loss")
    want_b = F.mse_loss(x.bfloat16().float(), t.bfloat16().float(), reduction="none").mean(1)
    assert np.array_equal(rb.per_sample, want_b.cpu().numpy())


def test_split_and_stream_on_cuda(gpu_server: LossdServer, gpu_client: LossClient) -> None:
    g = torch.Generator().manual_seed(2)
    n, c = 20_000, 8
    x = torch.randn(n, c, generator=g)
    t = torch.randint(0, c, (n,), generator=g)
    t[::11] = -100
    w = torch.rand(n, generator=g)
    unary = gpu_client.evaluate(x, t, weights=w)
    with LossClient(f"127.0.0.1:{gpu_server.port}", max_message_bytes=100_000,
                    timeout=120) as small:
        split = small.evaluate(x, t, weights=w)
    assert np.array_equal(split.per_sample, unary.per_sample)
    assert split.aggregates == unary.aggregates
    parts = [(x[i:i + 5000], t[i:i + 5000], w[i:i + 5000]) for i in range(0, n, 5000)]
    results = list(gpu_client.evaluate_stream(parts))
    assert results[-1].running == unary.aggregates


def test_shared_memory_on_cuda(gpu_server: LossdServer, gpu_client: LossClient,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Through shared memory on CUDA, the inputs are copied once into pinned memory at
    decode (so the caller cannot change them after validation) and the device copy goes
    straight from there: the same answers as the socket, and an out-of-range index
    written after validation never reaches the kernel."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 100, generator=g)
    t = torch.randint(0, 100, (4096,), generator=g)
    w = torch.rand(4096, generator=g)
    with gpu_client.shared_memory(8 << 20) as shm:
        for kwargs in ({}, {"weights": w}, {"label_smoothing": 0.1}):
            a, b = shm.evaluate(x, t, **kwargs), gpu_client.evaluate(x, t, **kwargs)
            assert np.array_equal(a.per_sample, b.per_sample)
            assert a.aggregates == b.aggregates
        blocker = EngineBlocker(gpu_server.engine, monkeypatch)
        answer: list[lossd.LossResult] = []
        worker = threading.Thread(target=lambda: answer.append(shm.evaluate(x, t)))
        worker.start()
        deadline = 30.0
        while blocker.entered == 0 and deadline > 0:
            threading.Event().wait(0.01)
            deadline -= 0.01
        targets_at = x.numel() * 4 + (-(x.numel() * 4) % 64)  # the client's layout
        np.frombuffer(shm.buffer, np.int64, count=4096, offset=targets_at)[:] = 10**9
        blocker.release.set()
        worker.join(60)
    want = F.cross_entropy(x.cuda(), t.cuda(), reduction="none").cpu()
    assert torch.equal(torch.from_numpy(answer[0].per_sample), want)
    _assert_cuda_serves(gpu_client)

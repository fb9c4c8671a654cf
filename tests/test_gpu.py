"""The loss comparison on a CUDA server, and bad input that must not poison its context."""

from __future__ import annotations

import threading
from pathlib import Path

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


_LOG_PROBS = F.log_softmax(torch.randn(2, 6, 4), dim=2)


@pytest.mark.parametrize(("loss", "x", "t", "kwargs", "field", "problem"), [
    ("binary_cross_entropy", torch.tensor([0.5, 1.5]), torch.tensor([1.0, 0.0]), {},
     "predictions", "value 1.5 at sample 1 is not a probability"),
    ("binary_cross_entropy", torch.tensor([0.5, 0.5]), torch.tensor([1.0, -2.0]), {},
     "targets", "value -2.0 at sample 1 is not a probability"),
    ("multi_margin_loss", torch.randn(3, 4), torch.tensor([0, 4, 1]), {}, "targets",
     "class index 4 out of range [0, 4)"),
    ("multilabel_margin_loss", torch.randn(2, 3), torch.tensor([[0, 3, -1], [1, -1, 0]]), {},
     "targets", "class index 3 out of range [-1, 3)"),
    ("ctc_loss", _LOG_PROBS, torch.tensor([[1, 9], [2, 3]]),
     {"inputs": {"input_lengths": [6, 6], "target_lengths": [2, 2]}}, "targets",
     "label 9 out of range [0, 4)"),
    ("ctc_loss", _LOG_PROBS, torch.tensor([[1, 2], [2, 3]]),
     {"inputs": {"input_lengths": [6, 60], "target_lengths": [2, 2]}}, "inputs.input_lengths",
     "60 at sample 1 outside [0, 6]"),
    ("ctc_loss", _LOG_PROBS, torch.tensor([[1, 2], [2, 3]]),
     {"inputs": {"input_lengths": [6, 6], "target_lengths": [2, 5]}}, "inputs.target_lengths",
     "5 at sample 1 outside [0, 2]"),
], ids=["bce-prediction", "bce-target", "multi-margin-class", "multilabel-class", "ctc-label",
        "ctc-input-length", "ctc-target-length"])
def test_bad_input_of_the_new_losses_never_reaches_a_cuda_kernel(
        gpu_client: LossClient, loss: str, x: torch.Tensor, t: torch.Tensor,
        kwargs: dict[str, object], field: str, problem: str) -> None:
    with pytest.raises(lossd.InvalidArgument) as info:
        gpu_client.evaluate(x, t, loss=loss, **kwargs)  # type: ignore[arg-type]
    assert info.value.message.startswith(f"{field}: "), info.value.message
    assert problem in info.value.message, info.value.message
    _assert_cuda_serves(gpu_client)


def test_plugin_on_cuda(gpu_client: LossClient, example_plugin: Path) -> None:
    """The example plugin (loaded through its entry point) computes on the device, with
    its gradient; the result equals torch's on CUDA."""
    g = torch.Generator().manual_seed(4)
    x, teacher = torch.randn(256, 10, 7, generator=g), torch.randn(256, 10, 7, generator=g)
    t = torch.randint(0, 10, (256, 7), generator=g)
    t[::5, 0] = -100
    r = gpu_client.evaluate(x, t, loss="knowledge_distillation", inputs={"teacher": teacher},
                            gradient="mean")
    xc = x.cuda().requires_grad_(True)
    tc = t.cuda()
    valid = tc != -100
    soft = F.kl_div(F.log_softmax(xc / 2, 1), F.log_softmax(teacher.cuda() / 2, 1),
                    log_target=True, reduction="none").sum(1)
    hard = F.cross_entropy(xc, tc.clamp(min=0), reduction="none")
    per_position = (0.5 * 4 * soft + 0.5 * hard) * valid
    per = per_position.sum(1) / valid.sum(1)
    per.mean().backward()
    torch.testing.assert_close(torch.from_numpy(r.per_sample), per.detach().cpu(), rtol=1e-5,
                               atol=1e-6)
    assert xc.grad is not None and r.gradient is not None
    torch.testing.assert_close(torch.from_numpy(r.gradient), xc.grad.cpu(), rtol=1e-4,
                               atol=1e-6)


def test_a_plugin_answering_from_the_wrong_device_is_internal(
        gpu_client: LossClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lossd_server import plugins
    from lossd_server.catalogue import LOSSES

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "testplugin_cpu_answer.py").write_text(
        "from lossd_server.plugins import register\n"
        "register('testplugin_cpu_answer', lambda x, t: (x - t).abs().cpu(), options={}, "
        "targets='values')\n")
    try:
        plugins.load(["testplugin_cpu_answer"], entry_points=False)
        with pytest.raises(lossd.InternalError) as info:
            gpu_client.evaluate(torch.ones(4, 2), torch.zeros(4, 2), loss="testplugin_cpu_answer")
        assert info.value.message.startswith(
            "loss 'testplugin_cpu_answer': its function returned a tensor on cpu; expected cuda")
        _assert_cuda_serves(gpu_client)
    finally:
        LOSSES.remove("testplugin_cpu_answer")
        plugins._loaded.pop("testplugin_cpu_answer", None)


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

"""Every loss and option through the real client and server, against torch.nn.functional."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_reference import (
    CASES,
    WIRE_FLOATS,
    Case,
    check_aggregates,
    check_case,
    predictions_for,
    targets_for,
    torchvision_sigmoid_focal_loss,
)

from lossd import LossClient
from lossd_server.losses import BUILTINS, all_options

HYPOTHESIS = settings(max_examples=25, deadline=None, derandomize=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_torch(client: LossClient, case: Case) -> None:
    check_case(client, case)


def test_cases_cover_every_loss_and_option() -> None:
    """The table above exercises every built-in loss, every option of each (lossd's own
    ignore_index too) and every extra input."""
    used: dict[str, set[str]] = {}
    for case in CASES:
        used.setdefault(case.loss, set()).update(case.opts, case.inputs)
    assert set(used) == {spec.name for spec in BUILTINS}
    for spec in BUILTINS:
        wanted = {o.name for o in all_options(spec)} - {"nan_policy"}
        assert wanted | {i.name for i in spec.inputs} <= used[spec.name], spec.name


def test_the_catalogue_is_every_loss_of_torch_nn_functional() -> None:
    """Every loss torch.nn.functional defines is a built-in (and sigmoid_focal_loss,
    torchvision's)."""
    torch_losses = {name for name in dir(F) if name.endswith("_loss")} | {
        "cross_entropy", "kl_div", "binary_cross_entropy", "binary_cross_entropy_with_logits"}
    assert {spec.name for spec in BUILTINS} == torch_losses | {"sigmoid_focal_loss"}


def test_focal_reference_is_torchvision_formula() -> None:
    """The reference focal loss, checked by hand on one value: -a (1-p)^g log p."""
    x, t = torch.tensor([0.3], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    p = 1 / (1 + math.exp(-0.3))
    want = -0.25 * (1 - p) ** 2 * math.log(p)
    got = torchvision_sigmoid_focal_loss(x, t, alpha=0.25, gamma=2)
    assert math.isclose(float(got), want, rel_tol=1e-12)


def test_all_ignored_samples(client: LossClient) -> None:
    """A sample whose every target is ignore_index: 0.0, not counted, counted in ignored."""
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([[0, 1, 2, 1], [9, 9, 9, 9], [2, 9, 0, 9], [9, 9, 9, 9], [1, 1, 1, 1]])
    w = torch.tensor([1.0, 5.0, 2.0, 7.0, 0.5])
    r = client.evaluate(x, t, loss="cross_entropy", ignore_index=9, weights=w)
    assert r.per_sample[1] == 0.0 and r.per_sample[3] == 0.0
    for i in (0, 2, 4):
        want = F.cross_entropy(x[i:i + 1], t[i:i + 1], ignore_index=9)
        torch.testing.assert_close(torch.tensor(r.per_sample[i]), want)
    assert (r.count, r.ignored, r.omitted) == (3, 2, 0)
    counted = torch.tensor([True, False, True, False, True])
    check_aggregates(r.aggregates, torch.from_numpy(r.per_sample), counted, w, ignored=2)
    assert r.weight_sum == 3.5

    everything = client.evaluate(x[[1, 3]], t[[1, 3]], loss="cross_entropy", ignore_index=9)
    assert everything.per_sample.tolist() == [0.0, 0.0]
    assert (everything.count, everything.ignored, everything.sum) == (0, 2, 0.0)
    assert math.isnan(everything.mean)


@given(n=st.integers(1, 24), c=st.integers(1, 7), dtype=st.sampled_from(sorted(WIRE_FLOATS)),
       int32=st.booleans(), cw=st.booleans(), ignore=st.booleans(),
       smoothing=st.one_of(st.none(), st.floats(0.0, 1.0)), weighted=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
@HYPOTHESIS
def test_cross_entropy_random(client: LossClient, n: int, c: int, dtype: str, int32: bool,
                              cw: bool, ignore: bool, smoothing: float | None, weighted: bool,
                              seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * 3).to(WIRE_FLOATS[dtype])
    t = torch.randint(0, c, (n,), generator=g)
    opts: dict[str, object] = {}
    if cw:
        opts["class_weights"] = torch.rand(c, generator=g) * 2
    if ignore:
        opts["ignore_index"] = -7
        t[torch.rand(n, generator=g) < 0.3] = -7
    if smoothing is not None:
        opts["label_smoothing"] = smoothing
    w = torch.rand(n, generator=g) + 0.01 if weighted else None
    check_case(client, Case("random", "cross_entropy", x, t.to(torch.int32) if int32 else t,
                            opts, w))


_SAME_SHAPE_OPTIONS = {
    "binary_cross_entropy_with_logits": st.fixed_dictionaries({}),
    "mse_loss": st.fixed_dictionaries({}),
    "l1_loss": st.fixed_dictionaries({}),
    "smooth_l1_loss": st.fixed_dictionaries({"beta": st.floats(0.0, 4.0)}),
    "huber_loss": st.fixed_dictionaries({"delta": st.floats(1e-3, 4.0)}),
    "kl_div": st.fixed_dictionaries({"log_target": st.booleans()}),
    "sigmoid_focal_loss": st.fixed_dictionaries(
        {"alpha": st.one_of(st.just(-1.0), st.floats(0.0, 1.0)), "gamma": st.floats(0.0, 5.0)}),
    "poisson_nll_loss": st.fixed_dictionaries(
        {"log_input": st.booleans(), "full": st.booleans(), "eps": st.floats(1e-9, 1.0)}),
}


@given(data=st.data(), loss=st.sampled_from(sorted(_SAME_SHAPE_OPTIONS)),
       n=st.integers(1, 20), c=st.one_of(st.none(), st.integers(1, 6)),
       dtype=st.sampled_from(sorted(WIRE_FLOATS)), weighted=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
@HYPOTHESIS
def test_same_shape_losses_random(client: LossClient, data: st.DataObject, loss: str, n: int,
                                  c: int | None, dtype: str, weighted: bool,
                                  seed: int) -> None:
    opts = data.draw(_SAME_SHAPE_OPTIONS[loss], label="options")
    if loss == "kl_div" and c is None:
        c = 3  # kl_div takes (N, C)
    shape = (n,) if c is None else (n, c)
    g = torch.Generator().manual_seed(seed)
    x = predictions_for(loss, shape, g, log_input=opts.get("log_input", True))
    t = targets_for(loss, shape, g, log_target=opts.get("log_target", False))
    w = torch.rand(n, generator=g) + 0.01 if weighted else None
    cd = WIRE_FLOATS[dtype]
    check_case(client, Case("random", loss, x.to(cd), t.to(cd), opts, w))


def test_float64_aggregates_use_float64_losses(client: LossClient) -> None:
    """float64 in: per_sample is the float64 loss rounded to float32, aggregates are not."""
    x = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    t = torch.tensor([1.0 / 3, 0.7, -0.9], dtype=torch.float64)
    r = client.evaluate(x, t, loss="mse_loss")
    l64 = F.mse_loss(x, t, reduction="none")
    assert np.array_equal(r.per_sample, l64.float().numpy())
    assert r.sum == math.fsum(l64.tolist())
    assert r.mean == math.fsum(l64.tolist()) / 3


def test_mixed_wire_dtypes(client: LossClient) -> None:
    """float16 predictions with float64 targets: both are computed in float32."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, generator=g).half()
    t = torch.randn(8, 3, generator=g, dtype=torch.float64)
    r = client.evaluate(x, t, loss="huber_loss", delta=0.5)
    want = F.huber_loss(x.float(), t.float(), delta=0.5, reduction="none").mean(dim=1)
    assert torch.equal(torch.from_numpy(r.per_sample), want)

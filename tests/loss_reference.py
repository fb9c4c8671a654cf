"""Reference losses for the tests, computed with torch.nn.functional, not with lossd_server.

Shared by ``test_losses`` (CPU server) and ``test_gpu`` (CUDA server). A :class:`Case` is
one request (inputs as sent on the wire) and :func:`check_case` evaluates it through a
real client and compares per-sample values and aggregates with the reference.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lossd import Aggregates, LossClient, LossResult

Tensor = torch.Tensor

WIRE_FLOATS = {"float32": torch.float32, "float16": torch.float16,
               "bfloat16": torch.bfloat16, "float64": torch.float64}
CLASS_LOSSES = ("cross_entropy", "nll_loss")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the service computes in: float64 stays, the rest run in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def torchvision_sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25,
                                   gamma: float = 2, reduction: str = "none") -> Tensor:
    """A copy of torchvision.ops.sigmoid_focal_loss (torchvision is not installed here)."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    if reduction == "none":
        pass
    elif reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss


def torch_loss(loss: str, x: Tensor, t: Tensor, opts: dict[str, Any],
               reduction: str) -> Tensor:
    """torch's loss for ``loss`` with lossd's option names mapped to torch's."""
    o = dict(opts)
    o.pop("nan_policy", None)
    if "class_weights" in o:
        o["weight"] = o.pop("class_weights")
    if loss == "cross_entropy":
        return F.cross_entropy(x, t, reduction=reduction, **o)
    if loss == "nll_loss":
        return F.nll_loss(x, t, reduction=reduction, **o)
    if loss == "binary_cross_entropy_with_logits":
        return F.binary_cross_entropy_with_logits(x, t, reduction=reduction, **o)
    if loss == "sigmoid_focal_loss":
        return torchvision_sigmoid_focal_loss(x, t, reduction=reduction, **o)
    fn = getattr(F, loss)  # mse_loss, l1_loss, smooth_l1_loss, huber_loss, kl_div, poisson_nll
    return fn(x, t, reduction=reduction, **o)


@dataclass
class Case:
    """One request as the client sends it; ``exact``: per-sample values must be bitwise."""

    id: str
    loss: str
    x: Tensor
    t: Tensor
    opts: dict[str, Any] = field(default_factory=dict)
    w: Tensor | None = None

    @property
    def class_index(self) -> bool:
        return not self.t.dtype.is_floating_point

    @property
    def exact(self) -> bool:
        """Plain (N,) or (N, C) inputs: the service must match torch bit for bit."""
        return self.x.dim() <= 2


@dataclass
class Expected:
    per_sample: Tensor  # compute dtype, (N,)
    ignored: Tensor  # bool (N,): samples with no valid position


def _on(device: str, v: Any, dtype: torch.dtype) -> Any:
    if isinstance(v, list):  # sent as a float64 tensor, used in the compute dtype
        return torch.tensor(v, dtype=dtype, device=device)
    return v.to(device, dtype) if isinstance(v, Tensor) else v


def expected(case: Case, device: str = "cpu") -> Expected:
    """Per-sample reference values on ``device``, in the service's compute dtype."""
    cd = compute_dtype(case.x.dtype)
    x = case.x.to(device).to(cd)
    t = case.t.to(device).long() if case.class_index else case.t.to(device).to(cd)
    opts = {k: _on(device, v, cd) for k, v in case.opts.items() if k != "nan_policy"}
    n = x.shape[0]
    if case.class_index:
        ignore = opts.get("ignore_index", -100)
        valid = t != ignore
        ignored = ~valid.reshape(n, -1).any(dim=1)
        if t.dim() == 1:  # (N, C): torch's elementwise value is the sample's value
            return Expected(torch_loss(case.loss, x, t, opts, "none"), ignored)
        rows = []
        for i in range(n):
            xi, ti = x[i:i + 1], t[i:i + 1]
            if ignored[i]:
                rows.append(torch.zeros((), dtype=cd, device=device))
            elif "class_weights" in opts:  # torch's 'mean' would divide by the weight sum
                rows.append(torch_loss(case.loss, xi, ti, opts, "sum") / valid[i].sum())
            else:
                rows.append(torch_loss(case.loss, xi, ti, opts, "mean"))
        return Expected(torch.stack(rows), ignored)
    no_ignored = torch.zeros(n, dtype=torch.bool, device=device)
    if case.exact:
        e = torch_loss(case.loss, x, t, opts, "none")
        if case.loss == "kl_div":
            return Expected(e.sum(dim=1), no_ignored)
        return Expected(e if e.dim() == 1 else e.mean(dim=1), no_ignored)
    rows = []
    for i in range(n):
        xi, ti = x[i:i + 1], t[i:i + 1]
        if case.loss == "kl_div":  # the class dim is summed, the other positions averaged
            rows.append(torch_loss(case.loss, xi, ti, opts, "sum") * (x.shape[1] / xi.numel()))
        else:
            rows.append(torch_loss(case.loss, xi, ti, opts, "mean"))
    return Expected(torch.stack(rows), no_ignored)


def close(got: float, want: float, scale: float, *, rel: float = 1e-12) -> bool:
    """|got - want| within ``rel`` of ``scale`` (the sum of magnitudes for a sum)."""
    if math.isnan(want):
        return math.isnan(got)
    return abs(got - want) <= rel * max(scale, abs(want))


def check_aggregates(agg: Aggregates, losses: Tensor, counted: Tensor, w: Tensor | None, *,
                     ignored: int, omitted: int = 0, rel: float = 1e-12) -> None:
    """``agg`` against float64 torch expressions over the counted samples."""
    lc = losses.detach().double().cpu()[counted.cpu()]
    count = int(counted.sum())
    assert (agg.count, agg.ignored, agg.omitted) == (count, ignored, omitted)
    scale = float(lc.abs().sum())
    assert close(agg.sum, float(lc.sum()), scale, rel=rel), (agg.sum, float(lc.sum()))
    if count:
        assert close(agg.mean, float(lc.sum()) / count, scale / count, rel=rel)
    else:
        assert math.isnan(agg.mean)
    if w is None:
        assert (agg.weighted_sum, agg.weighted_mean, agg.weight_sum) == (None, None, None)
        return
    wc = w.double().cpu()[counted.cpu()]
    ws, wsum = float((wc * lc).sum()), float(wc.sum())
    wscale = float((wc * lc.abs()).sum())
    assert agg.weighted_sum is not None and agg.weight_sum is not None
    assert agg.weighted_mean is not None
    assert close(agg.weighted_sum, ws, wscale, rel=rel), (agg.weighted_sum, ws)
    assert close(agg.weight_sum, wsum, wsum, rel=rel), (agg.weight_sum, wsum)
    if wsum:
        assert close(agg.weighted_mean, ws / wsum, wscale / wsum, rel=rel)
    else:
        assert math.isnan(agg.weighted_mean)


def check_case(client: LossClient, case: Case, device: str = "cpu") -> LossResult:
    """Evaluate ``case`` through ``client`` and compare with the torch reference."""
    r = client.evaluate(case.x, case.t, loss=case.loss, weights=case.w, **case.opts)
    exp = expected(case, device)
    got = torch.from_numpy(r.per_sample)
    assert r.per_sample.dtype.name == "float32" and r.per_sample.shape == (case.x.shape[0],)
    want = exp.per_sample.float().cpu()
    if case.exact:
        assert torch.equal(got, want), (case.id, got, want)
        agg_losses = exp.per_sample  # the float64 values for float64 inputs
    else:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
        # The aggregates sum exactly the float32 values the server returned.
        agg_losses = got.double() if compute_dtype(case.x.dtype) == torch.float32 \
            else exp.per_sample
    ignored = exp.ignored.cpu()
    check_aggregates(r.aggregates, agg_losses, ~ignored, case.w, ignored=int(ignored.sum()))
    return r


# ---------------------------------------------------------------------------------------
# Inputs


def gen(name: str) -> torch.Generator:
    """A generator seeded from the case name: every case is reproducible on its own."""
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def predictions_for(loss: str, shape: tuple[int, ...], g: torch.Generator, *,
                    log_input: bool = True) -> Tensor:
    x = torch.randn(shape, generator=g) * 2
    if loss in ("nll_loss", "kl_div"):
        return F.log_softmax(x, dim=1)
    if loss == "poisson_nll_loss" and not log_input:
        r = torch.rand(shape, generator=g) * 4
        r.view(-1)[::7] = 0.0  # rate 0: the eps term matters
        return r
    return x


def targets_for(loss: str, shape: tuple[int, ...], g: torch.Generator, *,
                log_target: bool = False, soft: bool = False) -> Tensor:
    if loss in ("binary_cross_entropy_with_logits", "sigmoid_focal_loss"):
        if soft:
            return torch.rand(shape, generator=g)
        return torch.bernoulli(torch.full(shape, 0.5), generator=g)
    if loss == "kl_div":
        logits = torch.randn(shape, generator=g)
        return F.log_softmax(logits, 1) if log_target else F.softmax(logits, 1)
    if loss == "poisson_nll_loss":
        return torch.poisson(torch.rand(shape, generator=g) * 5, generator=g)
    if loss == "cross_entropy":  # probabilities
        return F.softmax(torch.randn(shape, generator=g) * 2, dim=1)
    return torch.randn(shape, generator=g) * 2


def class_targets(shape: tuple[int, ...], n_classes: int, g: torch.Generator) -> Tensor:
    return torch.randint(0, n_classes, shape, generator=g)


def weights_for(n: int, g: torch.Generator) -> Tensor:
    w = torch.rand(n, generator=g) * 3
    w[::5] = 0.0  # zero weights are legal
    return w


def build_cases() -> list[Case]:
    """Every loss with each of its options, on the wire dtypes; ids are unique."""
    cases: list[Case] = []
    n, c = 12, 5

    def add(id_: str, loss: str, x: Tensor, t: Tensor, opts: dict[str, Any] | None = None,
            weighted: bool = False) -> None:
        # Weights travel in the predictions' dtype (each wire float dtype is accepted).
        w = weights_for(x.shape[0], gen(id_ + "/w")).to(x.dtype) if weighted else None
        cases.append(Case(id_, loss, x, t, opts or {}, w))

    # cross_entropy / nll_loss with class indices, every option, every wire dtype.
    for loss in CLASS_LOSSES:
        variants: list[tuple[str, dict[str, Any]]] = [
            ("default", {}),
            ("class_weights", {"class_weights": torch.tensor([0.5, 2.0, 1.0, 0.0, 3.0])}),
            ("ignore_index", {"ignore_index": 2}),
            ("ignore_index_neg", {"ignore_index": -1}),
        ]
        if loss == "cross_entropy":
            variants += [("label_smoothing", {"label_smoothing": 0.2}),
                         ("all_options", {"class_weights": [1.0, 2.0, 0.5, 0.25, 4.0],
                                          "ignore_index": 3, "label_smoothing": 0.1})]
        for vname, opts in variants:
            for dname, dtype in WIRE_FLOATS.items():
                for tname in ("int64", "int32"):
                    if tname == "int32" and dname != "float32":
                        continue
                    id_ = f"{loss}-{vname}-{dname}-{tname}"
                    g = gen(id_)
                    x = predictions_for(loss, (n, c), g).to(dtype)
                    t = class_targets((n,), c, g)
                    if opts.get("ignore_index") == -1:
                        t[::4] = -1
                    t = t.to(getattr(torch, tname))
                    add(id_, loss, x, t, opts, weighted=dname != "float16")

    # cross_entropy with probability targets.
    for vname, opts in [("default", {}), ("label_smoothing", {"label_smoothing": 0.3}),
                        ("class_weights", {"class_weights": torch.rand(c, generator=gen("cw"))})]:
        for dname, dtype in WIRE_FLOATS.items():
            id_ = f"cross_entropy-probs-{vname}-{dname}"
            g = gen(id_)
            add(id_, "cross_entropy", predictions_for("cross_entropy", (n, c), g).to(dtype),
                targets_for("cross_entropy", (n, c), g).to(dtype), opts, weighted=True)

    # Same-shape losses: (N,) and (N, C), each option, each wire dtype.
    same: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
        ("binary_cross_entropy_with_logits", "default", {}, {}),
        ("binary_cross_entropy_with_logits", "soft", {}, {"soft": True}),
        ("binary_cross_entropy_with_logits", "pos_weight",
         {"pos_weight": torch.tensor([0.5, 1.0, 2.0, 3.0, 0.1])}, {}),
        ("binary_cross_entropy_with_logits", "class_weights",
         {"class_weights": torch.tensor([1.0, 0.0, 2.0, 0.5, 1.5])}, {}),
        ("binary_cross_entropy_with_logits", "pos_weight_scalar",
         {"pos_weight": torch.tensor([2.5])}, {}),
        ("mse_loss", "default", {}, {}),
        ("l1_loss", "default", {}, {}),
        ("smooth_l1_loss", "default", {}, {}),
        ("smooth_l1_loss", "beta", {"beta": 0.3}, {}),
        ("smooth_l1_loss", "beta0", {"beta": 0.0}, {}),
        ("huber_loss", "default", {}, {}),
        ("huber_loss", "delta", {"delta": 2.5}, {}),
        ("kl_div", "default", {}, {}),
        ("kl_div", "log_target", {"log_target": True}, {"log_target": True}),
        ("sigmoid_focal_loss", "default", {}, {}),
        ("sigmoid_focal_loss", "alpha_gamma", {"alpha": 0.6, "gamma": 1.5}, {}),
        ("sigmoid_focal_loss", "alpha_off_gamma0", {"alpha": -1.0, "gamma": 0}, {}),
        ("poisson_nll_loss", "default", {}, {}),
        ("poisson_nll_loss", "full", {"full": True}, {}),
        ("poisson_nll_loss", "rates", {"log_input": False}, {"log_input": False}),
        ("poisson_nll_loss", "rates_full_eps", {"log_input": False, "full": True, "eps": 0.1},
         {"log_input": False}),
    ]
    for loss, vname, opts, kind in same:
        shapes: list[tuple[int, ...]] = [(n, c)]
        if loss != "kl_div" and not any(k in opts for k in ("pos_weight", "class_weights")):
            shapes.append((n,))
        for shape in shapes:
            for dname, dtype in WIRE_FLOATS.items():
                id_ = f"{loss}-{vname}-{'x'.join(map(str, shape))}-{dname}"
                g = gen(id_)
                x = predictions_for(loss, shape, g, log_input=kind.get("log_input", True))
                t = targets_for(loss, shape, g, log_target=kind.get("log_target", False),
                                soft=kind.get("soft", False))
                add(id_, loss, x.to(dtype), t.to(dtype), opts, weighted=dname != "bfloat16")

    # Samples whose every position is ignored: 0.0, left out of the aggregates.
    g = gen("all-ignored")
    t = class_targets((n,), c, g)
    t[[0, 3, 4]] = 7
    add("cross_entropy-all_ignored", "cross_entropy", torch.randn(n, c, generator=g), t,
        {"ignore_index": 7, "label_smoothing": 0.1}, weighted=True)

    # Dense (N, C, d1, d2) inputs.
    dense = (6, 4, 3, 2)
    for loss in CLASS_LOSSES:
        for vname, opts in [("default", {}), ("ignore_index", {"ignore_index": 1}),
                            ("class_weights", {"class_weights": torch.tensor([1.0, 2, 0.5, 3])}),
                            ("label_smoothing", {"label_smoothing": 0.25, "ignore_index": 0})]:
            if loss == "nll_loss" and vname == "label_smoothing":
                continue
            for dname in ("float32", "float16", "float64"):
                id_ = f"{loss}-dense-{vname}-{dname}"
                g = gen(id_)
                x = predictions_for(loss, dense, g).to(WIRE_FLOATS[dname])
                t = class_targets((dense[0], *dense[2:]), dense[1], g)
                if "ignore_index" in opts:
                    t[2] = opts["ignore_index"]  # sample 2: every position ignored
                    t[3, 0] = opts["ignore_index"]  # sample 3: some positions ignored
                add(id_, loss, x, t, opts, weighted=True)
    g = gen("cross_entropy-dense-probs")
    add("cross_entropy-dense-probs", "cross_entropy", torch.randn(dense, generator=g),
        targets_for("cross_entropy", dense, g), {"label_smoothing": 0.1}, weighted=True)
    for loss, opts in [("mse_loss", {}), ("l1_loss", {}), ("smooth_l1_loss", {"beta": 0.5}),
                       ("huber_loss", {"delta": 0.7}), ("kl_div", {}),
                       ("kl_div", {"log_target": True}),
                       ("binary_cross_entropy_with_logits",
                        {"pos_weight": torch.tensor([1.0, 2.0])}),
                       ("sigmoid_focal_loss", {"alpha": 0.3}),
                       ("poisson_nll_loss", {"full": True})]:
        id_ = f"{loss}-dense-{'-'.join(opts) or 'default'}"
        g = gen(id_)
        add(id_, loss, predictions_for(loss, dense, g),
            targets_for(loss, dense, g, log_target=bool(opts.get("log_target"))), opts,
            weighted=True)
    ids = [case.id for case in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


CASES = build_cases()

"""Reference losses for the tests, computed with torch.nn.functional, not with lossd_server.

Shared by ``test_losses`` (CPU server) and ``test_gpu`` (CUDA server). A :class:`Case` is
one request (inputs as sent on the wire) and :func:`check_case` evaluates it through a
real client and compares per-sample values and aggregates with the reference.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
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


DISTANCES = {"pairwise_distance": None,
             "cosine_distance": lambda a, b: 1.0 - F.cosine_similarity(a, b)}


def torch_loss(loss: str, x: Tensor, t: Tensor | None, opts: dict[str, Any],
               reduction: str, inputs: dict[str, Tensor] | None = None) -> Tensor:
    """torch's loss for ``loss`` with lossd's option and input names mapped to torch's."""
    o = dict(opts)
    o.pop("nan_policy", None)
    extra = inputs or {}
    if "class_weights" in o:
        o["weight"] = o.pop("class_weights")
    if loss == "cross_entropy":
        return F.cross_entropy(x, t, reduction=reduction, **o)
    if loss == "nll_loss":
        return F.nll_loss(x, t, reduction=reduction, **o)
    if loss == "sigmoid_focal_loss":
        return torchvision_sigmoid_focal_loss(x, t, reduction=reduction, **o)
    if loss == "gaussian_nll_loss":
        return F.gaussian_nll_loss(x, t, extra["var"], reduction=reduction, **o)
    if loss == "ctc_loss":  # the wire has the batch first
        return F.ctc_loss(x.transpose(0, 1), t, extra["input_lengths"],
                          extra["target_lengths"], reduction=reduction, **o)
    if loss in ("margin_ranking_loss", "cosine_embedding_loss"):
        return getattr(F, loss)(x, extra["input2"], t, reduction=reduction, **o)
    if loss == "triplet_margin_loss":
        return F.triplet_margin_loss(x, extra["positive"], extra["negative"],
                                     reduction=reduction, **o)
    if loss == "triplet_margin_with_distance_loss":
        o["distance_function"] = DISTANCES[o.get("distance_function", "pairwise_distance")]
        return F.triplet_margin_with_distance_loss(x, extra["positive"], extra["negative"],
                                                   reduction=reduction, **o)
    if loss == "binary_cross_entropy" and bool(torch.isnan(x).any()):
        # torch refuses a NaN probability; lossd's documented answer is a NaN loss there.
        nan = torch.isnan(x)
        out = F.binary_cross_entropy(torch.where(nan, 0.5, x), t, reduction="none", **o)
        out = torch.where(nan, torch.nan, out)
        return out if reduction == "none" else getattr(out, reduction)()
    if loss == "multi_margin_loss":
        o.pop("ignore_index", None)  # lossd's, applied by the caller (expected)
    # mse_loss, l1_loss, smooth_l1_loss, huber_loss, kl_div, poisson_nll_loss,
    # binary_cross_entropy(_with_logits), hinge_embedding_loss, soft_margin_loss,
    # multilabel_margin_loss, multilabel_soft_margin_loss, multi_margin_loss
    fn = getattr(F, loss)
    return fn(x, t, reduction=reduction, **o)


# Losses whose class-index targets carry ignore_index (lossd applies it for those torch
# gives no ignore_index of its own).
CLASS_INDEX_LOSSES = (*CLASS_LOSSES, "multi_margin_loss")
INT_INPUTS = ("input_lengths", "target_lengths")


@dataclass
class Case:
    """One request as the client sends it; ``exact``: per-sample values must be bitwise."""

    id: str
    loss: str
    x: Tensor
    t: Tensor | None
    opts: dict[str, Any] = field(default_factory=dict)
    w: Tensor | None = None
    inputs: dict[str, Tensor] = field(default_factory=dict)

    @property
    def class_index(self) -> bool:
        """Targets are class indices with ignore_index (one per position)."""
        return (self.loss in CLASS_INDEX_LOSSES and self.t is not None
                and not self.t.dtype.is_floating_point)

    @property
    def exact(self) -> bool:
        """Plain (N,) or (N, C) inputs: the service must match torch bit for bit."""
        return self.x.dim() <= 2 or self.loss == "ctc_loss"


@dataclass
class Expected:
    per_sample: Tensor  # compute dtype, (N,)
    ignored: Tensor  # bool (N,): samples with no valid position


def _on(device: str, v: Any, dtype: torch.dtype) -> Any:
    if isinstance(v, list):  # sent as a float64 tensor, used in the compute dtype
        return torch.tensor(v, dtype=dtype, device=device)
    return v.to(device, dtype) if isinstance(v, Tensor) else v


def _sample_of(v: Tensor, i: int) -> Tensor:
    return v[i:i + 1]


def expected(case: Case, device: str = "cpu") -> Expected:
    """Per-sample reference values on ``device``, in the service's compute dtype."""
    cd = compute_dtype(case.x.dtype)
    x = case.x.to(device).to(cd)
    t = None
    if case.t is not None:
        t = (case.t.to(device).to(cd) if case.t.dtype.is_floating_point
             else case.t.to(device).long())
    opts = {k: _on(device, v, cd) for k, v in case.opts.items() if k != "nan_policy"}
    inputs = {k: v.to(device).long() if k in INT_INPUTS else v.to(device).to(cd)
              for k, v in case.inputs.items()}
    n = x.shape[0]
    if case.class_index:
        assert t is not None
        ignore = opts.get("ignore_index", -100)
        valid = t != ignore
        ignored = ~valid.reshape(n, -1).any(dim=1)
        if case.loss == "multi_margin_loss":  # torch has no ignore_index: the kept rows
            out = torch.zeros(n, dtype=cd, device=device)
            keep = valid
            if bool(keep.any()):
                out[keep] = torch_loss(case.loss, x[keep], t[keep], opts, "none")
            return Expected(out, ignored)
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
        e = torch_loss(case.loss, x, t, opts, "none", inputs)
        if case.loss == "kl_div":
            return Expected(e.sum(dim=1), no_ignored)
        return Expected(e if e.dim() == 1 else e.mean(dim=1), no_ignored)
    rows = []
    for i in range(n):
        xi = x[i:i + 1]
        ti = None if t is None else t[i:i + 1]
        ii = {k: _sample_of(v, i) for k, v in inputs.items()}
        if case.loss == "kl_div":  # the class dim is summed, the other positions averaged
            assert ti is not None
            rows.append(torch_loss(case.loss, xi, ti, opts, "sum") * (x.shape[1] / xi.numel()))
        else:
            rows.append(torch_loss(case.loss, xi, ti, opts, "mean", ii))
    return Expected(torch.stack(rows), no_ignored)


def close(got: float, want: float, scale: float, *, rel: float = 1e-12) -> bool:
    """|got - want| within ``rel`` of ``scale`` (the sum of magnitudes for a sum)."""
    if math.isnan(want):
        return math.isnan(got)
    if math.isinf(want) or math.isinf(scale):
        return got == want
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
    r = client.evaluate(case.x, case.t, loss=case.loss, weights=case.w,
                        inputs=case.inputs or None, **case.opts)
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

    def add(id_: str, loss: str, x: Tensor, t: Tensor | None,
            opts: dict[str, Any] | None = None, weighted: bool = False,
            inputs: dict[str, Tensor] | None = None) -> None:
        # Weights travel in the predictions' dtype (each wire float dtype is accepted).
        w = weights_for(x.shape[0], gen(id_ + "/w")).to(x.dtype) if weighted else None
        cases.append(Case(id_, loss, x, t, opts or {}, w, inputs or {}))

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
    add_the_rest_of_torch(add)
    ids = [case.id for case in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


def pm_one(shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    """Targets of 1 and -1."""
    return torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)


def probabilities(shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    """Probabilities with some exact 0s and 1s (torch clamps their log at -100)."""
    p = torch.sigmoid(torch.randn(shape, generator=g) * 3)
    p.view(-1)[::7] = 0.0
    p.view(-1)[3::11] = 1.0
    return p


def class_lists(n: int, c: int, g: torch.Generator) -> Tensor:
    """multilabel_margin_loss targets: each row a few distinct classes, then -1 (and, after
    it, arbitrary entries torch does not read)."""
    t = torch.full((n, c), -1, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(0, c + 1, (1,), generator=g))
        t[i, :k] = torch.randperm(c, generator=g)[:k]
        if k + 1 < c:
            t[i, k + 1:] = torch.randint(0, c, (c - k - 1,), generator=g)
    return t


def ctc_case(g: torch.Generator, *, n: int = 6, steps: int = 12, c: int = 5, s: int = 4,
             blank: int = 0, impossible: bool = False) -> tuple[Tensor, Tensor,
                                                               dict[str, Tensor]]:
    """Batch-first log-probabilities (N, T, C), padded labels (N, S) without the blank,
    and lengths; ``impossible``: sample 0 has more labels than frames (an infinite loss)."""
    x = F.log_softmax(torch.randn(n, steps, c, generator=g) * 2, dim=2)
    labels = [k for k in range(c) if k != blank]
    t = torch.tensor(labels)[torch.randint(0, len(labels), (n, s), generator=g)]
    input_lengths = torch.randint(2 * s, steps + 1, (n,), generator=g)  # room for repeats
    target_lengths = torch.randint(0, s + 1, (n,), generator=g)
    if impossible:
        input_lengths[0], target_lengths[0] = 1, s
    t[target_lengths == 0, 0] = 99  # padding beyond a sample's length is not read
    return x, t, {"input_lengths": input_lengths, "target_lengths": target_lengths}


Make = Callable[[torch.Generator, tuple[int, ...]], tuple[Tensor, Tensor | None,
                                                           dict[str, Tensor]]]
"""(generator, predictions shape) -> (predictions, targets, inputs) in float32/int64."""


def _bce(g: torch.Generator, shape: tuple[int, ...]) -> Any:
    return probabilities(shape, g), torch.rand(shape, generator=g), {}


def _gaussian(var_shape: Callable[[tuple[int, ...]], tuple[int, ...]]) -> Make:
    def make(g: torch.Generator, shape: tuple[int, ...]) -> Any:
        var = torch.rand(var_shape(shape), generator=g) * 2
        var.view(-1)[::5] = 1e-9  # below eps: clamped
        return torch.randn(shape, generator=g), torch.randn(shape, generator=g), {"var": var}
    return make


def _ctc(**kwargs: Any) -> Make:
    return lambda g, shape: ctc_case(g, **kwargs)


def _ranked(g: torch.Generator, shape: tuple[int, ...]) -> Any:
    return (torch.randn(shape, generator=g), pm_one(shape, g),
            {"input2": torch.randn(shape, generator=g)})


def _hinge(g: torch.Generator, shape: tuple[int, ...]) -> Any:
    return torch.rand(shape, generator=g) * 2, pm_one(shape, g), {}


def _cosine(g: torch.Generator, shape: tuple[int, ...]) -> Any:
    return (torch.randn(shape, generator=g), pm_one((shape[0],), g),
            {"input2": torch.randn(shape, generator=g)})


def _triplet(g: torch.Generator, shape: tuple[int, ...]) -> Any:
    return (torch.randn(shape, generator=g), None,
            {"positive": torch.randn(shape, generator=g),
             "negative": torch.randn(shape, generator=g)})


def _lists(tname: str) -> Make:
    return lambda g, shape: (torch.randn(shape, generator=g),
                             class_lists(shape[0], shape[1], g).to(getattr(torch, tname)), {})


def _multilabel(g: torch.Generator, shape: tuple[int, ...]) -> Any:
    return (torch.randn(shape, generator=g),
            torch.bernoulli(torch.full(shape, 0.5), generator=g), {})


def _classes(ignored: int | None = None, tname: str = "int64") -> Make:
    """Class indices; with ``ignored``, every third sample's is that value."""
    def make(g: torch.Generator, shape: tuple[int, ...]) -> Any:
        t = torch.randint(0, shape[1], (shape[0],), generator=g)
        if ignored is not None:
            t[::3] = ignored
        return torch.randn(shape, generator=g) * 2, t.to(getattr(torch, tname)), {}
    return make


def _soft(g: torch.Generator, shape: tuple[int, ...]) -> Any:
    return torch.randn(shape, generator=g) * 2, pm_one(shape, g), {}


def the_rest_of_torch() -> list[tuple[str, str, dict[str, Any], Make, tuple[int, ...]]]:
    """(loss, variant, options, inputs maker, predictions shape) for the losses of
    torch.nn.functional beyond the first ten: every option, plain and dense shapes."""
    n, c = 12, 5
    plain, two, dense = (n,), (n, c), (4, 3, 2)
    cases: list[tuple[str, str, dict[str, Any], Make, tuple[int, ...]]] = []
    for shape in (plain, two, dense):
        cases += [("binary_cross_entropy", "default", {}, _bce, shape),
                  ("gaussian_nll_loss", "default", {}, _gaussian(lambda s: s), shape),
                  ("margin_ranking_loss", "default", {}, _ranked, shape),
                  ("hinge_embedding_loss", "default", {}, _hinge, shape),
                  ("soft_margin_loss", "default", {}, _soft, shape)]
    for shape in (two, dense):
        cases += [("triplet_margin_loss", "default", {}, _triplet, shape),
                  ("triplet_margin_with_distance_loss", "default", {}, _triplet, shape)]
    cases += [
        ("binary_cross_entropy", "class_weights",
         {"class_weights": torch.tensor([1.0, 0.0, 2.0, 0.5, 1.5])}, _bce, two),
        ("gaussian_nll_loss", "full", {"full": True}, _gaussian(lambda s: s), two),
        ("gaussian_nll_loss", "eps", {"eps": 0.05, "full": True}, _gaussian(lambda s: s), two),
        ("gaussian_nll_loss", "var_one_fewer_dim", {}, _gaussian(lambda s: s[:-1]), two),
        ("gaussian_nll_loss", "var_last_dim_1", {}, _gaussian(lambda s: (*s[:-1], 1)), two),
        ("gaussian_nll_loss", "var_dim1_of_1", {}, _gaussian(lambda s: (s[0], 1, s[2])), dense),
        ("ctc_loss", "default", {}, _ctc(), (6, 12, 5)),
        ("ctc_loss", "blank_last", {"blank": 4}, _ctc(blank=4), (6, 12, 5)),
        ("ctc_loss", "zero_infinity", {"zero_infinity": True}, _ctc(impossible=True),
         (6, 12, 5)),
        ("ctc_loss", "infinite", {}, _ctc(impossible=True), (6, 12, 5)),
        ("margin_ranking_loss", "margin", {"margin": 0.5}, _ranked, two),
        ("hinge_embedding_loss", "margin", {"margin": 0.7}, _hinge, two),
        ("cosine_embedding_loss", "default", {}, _cosine, two),
        ("cosine_embedding_loss", "margin", {"margin": 0.3}, _cosine, two),
        ("multilabel_margin_loss", "int64", {}, _lists("int64"), two),
        ("multilabel_margin_loss", "int32", {}, _lists("int32"), two),
        ("multilabel_soft_margin_loss", "default", {}, _multilabel, two),
        ("multilabel_soft_margin_loss", "default", {}, _multilabel, (4, 3, 5)),
        ("multilabel_soft_margin_loss", "class_weights",
         {"class_weights": torch.tensor([0.5, 1.0, 2.0, 0.0, 1.5])}, _multilabel, two),
        ("multi_margin_loss", "int32", {}, _classes(tname="int32"), two),
        # lossd's ignore_index (torch's multi_margin_loss has none): the default and a class.
        ("multi_margin_loss", "ignore_index", {}, _classes(ignored=-100), two),
        ("multi_margin_loss", "ignore_index_class", {"ignore_index": 2, "p": 2},
         _classes(ignored=2), two),
    ]
    for variant, opts in (("margin", {"margin": 0.5}), ("p1", {"p": 1.0}),
                          ("eps", {"eps": 1e-3}), ("swap", {"swap": True}),
                          ("all", {"margin": 2.0, "p": 3.0, "eps": 0.0, "swap": True})):
        cases.append(("triplet_margin_loss", variant, opts, _triplet, two))
    for variant, opts in (("cosine", {"distance_function": "cosine_distance"}),
                          ("margin", {"margin": 0.25}), ("swap", {"swap": True}),
                          ("all", {"distance_function": "cosine_distance", "margin": 0.1,
                                   "swap": True})):
        cases.append(("triplet_margin_with_distance_loss", variant, opts, _triplet, two))
    for variant, opts in (("default", {}), ("p2", {"p": 2}), ("margin", {"margin": 0.5}),
                          ("class_weights",
                           {"class_weights": torch.tensor([1.0, 2.0, 0.5, 0.0, 3.0])}),
                          ("all", {"p": 2, "margin": 2.0, "class_weights": [1.0] * 5})):
        cases.append(("multi_margin_loss", variant, opts, _classes(), two))
    return cases


def add_the_rest_of_torch(add: Any) -> None:
    """:func:`the_rest_of_torch` on every wire float dtype (weighted but for float16)."""
    for loss, variant, opts, make, shape in the_rest_of_torch():
        for dname, dtype in WIRE_FLOATS.items():
            id_ = f"{loss}-{variant}-{'x'.join(map(str, shape))}-{dname}"
            x, t, inputs = make(gen(id_), shape)
            if t is not None and t.dtype.is_floating_point:
                t = t.to(dtype)
            add(id_, loss, x.to(dtype), t, opts, weighted=dname != "float16",
                inputs={k: v if k in INT_INPUTS else v.to(dtype) for k, v in inputs.items()})


CASES = build_cases()

"""The client's surface: accepted inputs, results, the catalogue, splitting, streams, errors."""

from __future__ import annotations

import dataclasses
import math
import re
import socket
import types
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lossd
from lossd import LossClient
from lossd._errors import from_rpc_error
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd.wire import to_tensor
from lossd_server.app import LossdServer


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def same_aggregates(a: lossd.Aggregates | None, b: lossd.Aggregates | None) -> bool:
    """Equal field by field (the figures: not the state behind them), nan equal to nan."""
    assert a is not None and b is not None
    for f in dataclasses.fields(lossd.Aggregates):
        if not f.compare:
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if not (x == y or (isinstance(x, float) and isinstance(y, float)
                           and math.isnan(x) and math.isnan(y))):
            return False
    return True


def assert_same_result(a: lossd.LossResult, b: lossd.LossResult) -> None:
    """Bitwise the same per-sample values (nan where nan) and equal aggregates."""
    assert a.per_sample.dtype == b.per_sample.dtype
    assert np.array_equal(a.per_sample.view(np.uint32), b.per_sample.view(np.uint32))
    assert same_aggregates(a.aggregates, b.aggregates), (a.aggregates, b.aggregates)


# ---------------------------------------------------------------------------------------
# Inputs


def test_numpy_inputs(client: LossClient) -> None:
    rng = _rng(0)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    t = rng.integers(0, 4, 6)
    want = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), reduction="none")
    for xs, ts in [(x, t), (x, t.astype(np.int32)), (x.astype(">f4"), t.astype(">i8"))]:
        r = client.evaluate(xs, ts)
        assert np.array_equal(r.per_sample, want.numpy())
    r16 = client.evaluate(x.astype(np.float16), t)
    want16 = F.cross_entropy(torch.from_numpy(x.astype(np.float16)).float(),
                             torch.from_numpy(t), reduction="none")
    assert np.array_equal(r16.per_sample, want16.numpy())
    r64 = client.evaluate(x.astype(np.float64), t)
    want64 = F.cross_entropy(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(t),
                             reduction="none")
    assert np.array_equal(r64.per_sample, want64.float().numpy())


def test_non_contiguous_numpy(client: LossClient) -> None:
    rng = _rng(1)
    base = rng.standard_normal((8, 10)).astype(np.float32)
    x, t = base[::2, 1::3], base[1::2, 1::3]  # (4, 3) strided views
    assert not x.flags.c_contiguous
    r = client.evaluate(x, t, loss="mse_loss")
    want = F.mse_loss(torch.tensor(x), torch.tensor(t), reduction="none").mean(1)
    assert np.array_equal(r.per_sample, want.numpy())
    f = np.asfortranarray(base)
    assert not f.flags.c_contiguous
    r = client.evaluate(f, np.zeros((8, 10), np.float32), loss="l1_loss")
    want = F.l1_loss(torch.tensor(base), torch.zeros(8, 10), reduction="none").mean(1)
    assert np.array_equal(r.per_sample, want.numpy())


def test_torch_tensors(client: LossClient) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 6, generator=g)
    t = torch.randint(0, 6, (10,), generator=g)
    want = F.cross_entropy(x, t, reduction="none")
    assert torch.equal(torch.from_numpy(client.evaluate(x, t).per_sample), want)
    # Non-contiguous: a transposed tensor and a strided slice.
    xt = x.t().contiguous().t()
    assert not xt.is_contiguous()
    assert torch.equal(torch.from_numpy(client.evaluate(xt, t).per_sample), want)
    wide = torch.randn(10, 12, generator=g)
    assert torch.equal(torch.from_numpy(client.evaluate(wide[:, ::2], t).per_sample),
                       F.cross_entropy(wide[:, ::2], t, reduction="none"))
    # requires_grad, and int32 targets.
    xg = x.clone().requires_grad_(True)
    assert torch.equal(torch.from_numpy(client.evaluate(xg, t.int()).per_sample), want)


def test_torch_bfloat16(client: LossClient) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 6, generator=g).bfloat16()
    t = torch.rand(10, 6, generator=g).bfloat16()
    r = client.evaluate(x, t, loss="binary_cross_entropy_with_logits",
                        weights=torch.rand(10, generator=g).bfloat16() + 0.5)
    want = F.binary_cross_entropy_with_logits(x.float(), t.float(), reduction="none").mean(1)
    assert np.array_equal(r.per_sample, want.numpy())
    # Non-contiguous bfloat16.
    xt = x.t().contiguous().t()
    r2 = client.evaluate(xt, t, loss="binary_cross_entropy_with_logits")
    assert np.array_equal(r2.per_sample, want.numpy())


def test_nested_lists(client: LossClient) -> None:
    r = client.evaluate([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], [0, 2],
                        class_weights=[1.0, 2.0, 0.5])
    x = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    want = F.cross_entropy(x, torch.tensor([0, 2]), weight=torch.tensor([1.0, 2.0, 0.5],
                           dtype=torch.float64), reduction="none")
    assert np.array_equal(r.per_sample, want.float().numpy())
    r = client.evaluate([1.0, 2.0, 4.0], [1, 1, 1.5], loss="mse_loss", weights=[1, 2.0, 0])
    assert r.per_sample.tolist() == [0.0, 1.0, 6.25]
    assert (r.sum, r.weighted_sum, r.weight_sum) == (7.25, 2.0, 3.0)


def test_unsupported_inputs_fail_before_the_call(client: LossClient) -> None:
    with pytest.raises(TypeError, match=r"^targets: bool arrays"):
        client.evaluate(np.zeros((2, 2), np.float32), np.zeros((2, 2), bool), loss="mse_loss")
    with pytest.raises(TypeError, match=r"^predictions: dtype uint8"):
        client.evaluate(np.zeros((2, 2), np.uint8), np.zeros(2, np.int64))
    with pytest.raises(TypeError, match=r"unsupported torch dtype torch.uint8"):
        client.evaluate(torch.zeros(2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match=r"^options.class_weights: unsupported value"):
        client.evaluate(np.zeros((2, 2), np.float32), np.zeros(2, np.int64),
                        class_weights={"a": 1})


def test_none_options_are_left_out(client: LossClient) -> None:
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 3])
    a = client.evaluate(x, t, class_weights=None, label_smoothing=None)
    assert_same_result(a, client.evaluate(x, t))


# ---------------------------------------------------------------------------------------
# Results


def test_result_shape_dtype_and_writable(client: LossClient) -> None:
    r = client.evaluate(torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]))
    assert r.per_sample.dtype == np.float32 and r.per_sample.shape == (5,)
    assert r.per_sample.flags.writeable
    r.per_sample[0] = 42.0  # owned by the caller
    assert r.per_sample[0] == 42.0
    assert r.running is None
    assert (r.weighted_sum, r.weighted_mean, r.weight_sum) == (None, None, None)
    assert (r.sum, r.mean, r.count, r.ignored, r.omitted) == (
        r.aggregates.sum, r.aggregates.mean, 5, 0, 0)
    assert re.fullmatch(r"LossResult\(n=5, mean=[0-9.e+-]+, count=5\)", repr(r))
    for f64 in (r.sum, r.mean):
        assert isinstance(f64, float)


def test_weighted_results(client: LossClient) -> None:
    x, t = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 0.0])
    r = client.evaluate(x, t, loss="mse_loss", weights=torch.tensor([1.0, 0.0, 2.0]))
    assert (r.sum, r.mean, r.count) == (14.0, 14.0 / 3, 3)
    assert (r.weighted_sum, r.weight_sum, r.weighted_mean) == (19.0, 3.0, 19.0 / 3)
    assert "weighted_mean=6.33333" in repr(r)


# ---------------------------------------------------------------------------------------
# The catalogue

CATALOGUE: dict[str, dict[str, tuple[str, str]]] = {
    "cross_entropy": {"class_weights": ("tensor", "none"), "ignore_index": ("int", "-100"),
                      "label_smoothing": ("float", "0.0")},
    "nll_loss": {"class_weights": ("tensor", "none"), "ignore_index": ("int", "-100")},
    "binary_cross_entropy_with_logits": {"class_weights": ("tensor", "none"),
                                         "pos_weight": ("tensor", "none")},
    "binary_cross_entropy": {"class_weights": ("tensor", "none")},
    "mse_loss": {},
    "l1_loss": {},
    "smooth_l1_loss": {"beta": ("float", "1.0")},
    "huber_loss": {"delta": ("float", "1.0")},
    "kl_div": {"log_target": ("bool", "false")},
    "sigmoid_focal_loss": {"alpha": ("float", "0.25"), "gamma": ("float", "2.0")},
    "poisson_nll_loss": {"log_input": ("bool", "true"), "full": ("bool", "false"),
                         "eps": ("float", "1e-08")},
    "gaussian_nll_loss": {"full": ("bool", "false"), "eps": ("float", "1e-06")},
    "ctc_loss": {"blank": ("int", "0"), "zero_infinity": ("bool", "false")},
    "margin_ranking_loss": {"margin": ("float", "0.0")},
    "hinge_embedding_loss": {"margin": ("float", "1.0")},
    "cosine_embedding_loss": {"margin": ("float", "0.0")},
    "triplet_margin_loss": {"margin": ("float", "1.0"), "p": ("float", "2.0"),
                            "eps": ("float", "1e-06"), "swap": ("bool", "false")},
    "triplet_margin_with_distance_loss": {"distance_function": ("str", "pairwise_distance"),
                                          "margin": ("float", "1.0"),
                                          "swap": ("bool", "false")},
    "multilabel_margin_loss": {},
    "multilabel_soft_margin_loss": {"class_weights": ("tensor", "none")},
    "multi_margin_loss": {"p": ("int", "1"), "margin": ("float", "1.0"),
                          "class_weights": ("tensor", "none"),
                          "ignore_index": ("int", "-100")},  # lossd's own
    "soft_margin_loss": {},
}
# (extra inputs, what the targets are) where not (none, "values").
INPUTS_AND_TARGETS: dict[str, tuple[tuple[str, ...], str]] = {
    "cross_entropy": ((), "classes_or_probabilities"),
    "nll_loss": ((), "classes"),
    "gaussian_nll_loss": (("var",), "values"),
    "ctc_loss": (("input_lengths", "target_lengths"), "sequences"),
    "margin_ranking_loss": (("input2",), "values"),
    "cosine_embedding_loss": (("input2",), "sample_values"),
    "triplet_margin_loss": (("positive", "negative"), "none"),
    "triplet_margin_with_distance_loss": (("positive", "negative"), "none"),
    "multilabel_margin_loss": ((), "class_sets"),
    "multi_margin_loss": ((), "classes"),
}
FLOATS = ("float32", "float16", "bfloat16", "float64")
INDEXES = ("int64", "int32")


def test_catalogue(client: LossClient) -> None:
    infos = client.losses()
    assert all(isinstance(i, lossd.LossInfo) for i in infos)
    by_name = {i.name: i for i in infos}
    assert len(by_name) == len(infos)
    assert {name for name, i in by_name.items() if i.source == "lossd"} == set(CATALOGUE)
    assert list(by_name)[:len(CATALOGUE)] == [i.name for i in infos if i.source == "lossd"]
    for name, want in CATALOGUE.items():
        info = by_name[name]
        assert info.description
        got = {o.name: (o.type, o.default) for o in info.options}
        assert got == {**want, "nan_policy": ("str", "propagate")}, name
        nan_policy = next(o for o in info.options if o.name == "nan_policy")
        assert nan_policy.choices == ("propagate", "raise", "omit")
        assert all(o.description for o in info.options)
        assert all(isinstance(o, lossd.OptionInfo) for o in info.options)
        assert set(info.prediction_dtypes) == set(FLOATS)
        assert info.prediction_shapes
        inputs, targets = INPUTS_AND_TARGETS.get(name, ((), "values"))
        assert tuple(i.name for i in info.inputs) == inputs, name
        assert all(isinstance(i, lossd.InputInfo) and i.description and i.shapes and
                   not i.optional for i in info.inputs)
        assert info.targets == targets, name
        wanted_dtypes = {"values": FLOATS, "sample_values": FLOATS, "none": (),
                         "classes_or_probabilities": (*INDEXES, *FLOATS)}.get(targets, INDEXES)
        assert set(info.target_dtypes) == set(wanted_dtypes), name
        assert bool(info.target_shapes) == (targets != "none"), name
        if name in ("cross_entropy", "nll_loss", "kl_div"):
            assert "(N, C)" in info.prediction_shapes
            assert "(N, C, d1, ...)" in info.prediction_shapes
    assert by_name["ctc_loss"].inputs[0].dtypes == INDEXES
    assert by_name["gaussian_nll_loss"].inputs[0].dtypes == FLOATS


def test_catalogue_dtypes_are_accepted(client: LossClient) -> None:
    """Every advertised dtype is served, for every built-in (a reference case of each, its
    tensors cast to each advertised dtype)."""
    from loss_reference import CASES

    for info in client.losses():
        if info.source != "lossd":
            continue
        for td in info.target_dtypes or (None,):
            integer = td is not None and td.startswith("int")
            case = next(c for c in CASES if c.loss == info.name and c.x.dtype == torch.float32
                        and (c.t is None or (not c.t.dtype.is_floating_point) == integer))
            for pd in info.prediction_dtypes:
                t = None if case.t is None or td is None else case.t.to(getattr(torch, td))
                inputs = {k: v.to(getattr(torch, pd)) if v.dtype.is_floating_point else v
                          for k, v in case.inputs.items()}
                r = client.evaluate(case.x.to(getattr(torch, pd)), t, loss=info.name,
                                    inputs=inputs, **case.opts)
                assert r.count + r.ignored == case.x.shape[0], (info.name, pd, td)


# ---------------------------------------------------------------------------------------
# Large batches and splitting


def test_batch_over_4mb_in_one_call(client: LossClient) -> None:
    n = 1_100_000  # 8.8 MB of request, 4.4 MB of per-sample losses back
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(n, generator=g), torch.randn(n, generator=g)
    r = client.evaluate(x, t, loss="mse_loss")
    want = F.mse_loss(x, t, reduction="none")
    assert r.per_sample.shape == (n,)
    assert np.array_equal(r.per_sample, want.numpy())
    assert r.count == n
    assert math.isclose(r.sum, float(want.double().sum()), rel_tol=1e-12)


def test_raw_message_over_4mb(server: LossdServer) -> None:
    x = torch.zeros(700_000)  # 5.6 MB in one message, past gRPC's default 4 MB
    req = pb.EvaluateRequest(loss="l1_loss", predictions=to_tensor(x, field="p"),
                             targets=to_tensor(x + 1, field="t"))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        resp = pb_grpc.LossServiceStub(channel).Evaluate(req, timeout=60)
    assert resp.aggregates.count == 700_000 and resp.aggregates.sum == 700_000.0


def _split_client(server: LossdServer, max_bytes: int = 100_000) -> LossClient:
    return LossClient(f"127.0.0.1:{server.port}", max_message_bytes=max_bytes, timeout=60)


def test_split_batch_is_bitwise_the_unary_result(server: LossdServer,
                                                 client: LossClient) -> None:
    g = torch.Generator().manual_seed(5)
    n, c = 20_000, 10  # ~1 MB: 10+ messages of 100 kB
    x = torch.randn(n, c, generator=g) * 4
    x[::997, 3] = math.nan  # omitted
    t = torch.randint(0, c, (n,), generator=g)
    t[::13] = -1  # ignored
    w = torch.rand(n, generator=g)
    opts = {"ignore_index": -1, "label_smoothing": 0.05, "nan_policy": "omit",
            "class_weights": torch.rand(c, generator=g)}
    unary = client.evaluate(x, t, weights=w, **opts)
    with _split_client(server) as small:
        split = small.evaluate(x, t, weights=w, **opts)
    assert split.running is None
    assert_same_result(split, unary)
    assert unary.omitted > 0 and unary.ignored > 0 and unary.count > 0


def test_batches_over_split_bytes_go_in_parts_with_the_same_result(
        server: LossdServer, client: LossClient) -> None:
    """A batch that fits one message but exceeds ``split_bytes`` is sent in parts over a
    stream, under the unary deadline, with the one message's result."""
    from lossd.requests import DEFAULT_SPLIT_BYTES, Requests

    g = torch.Generator().manual_seed(8)
    x, t = torch.randn(50_000, 10, generator=g), torch.randint(0, 10, (50_000,), generator=g)
    whole = LossClient(f"127.0.0.1:{server.port}", split_bytes=None)
    with whole, LossClient(f"127.0.0.1:{server.port}", split_bytes=400_000,
                           timeout=30, stream_timeout=0.001) as parts:
        # stream_timeout would expire at once: the parts keep the unary deadline instead.
        assert_same_result(parts.evaluate(x, t), whole.evaluate(x, t))
    built = Requests(1 << 26, 400_000).build("cross_entropy", x, t, None, None, {})
    assert len(built) == 8 and Requests(1 << 26, 400_000).one_message(built)
    assert len(Requests(1 << 26, DEFAULT_SPLIT_BYTES).build(
        "cross_entropy", x, t, None, None, {})) == 1
    # Gradient requests are never split for split_bytes.
    assert len(Requests(1 << 26, 400_000).build("cross_entropy", x, t, None, None, {},
                                                 "mean")) == 1


def test_split_float64_batch_is_bitwise_the_unary_result(server: LossdServer,
                                                         client: LossClient) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(30_000, generator=g, dtype=torch.float64) * 1e3
    t = torch.randn(30_000, generator=g, dtype=torch.float64)
    unary = client.evaluate(x, t, loss="huber_loss", delta=3.0, weights=x.abs())
    with _split_client(server) as small:
        assert_same_result(small.evaluate(x, t, loss="huber_loss", delta=3.0,
                                          weights=x.abs()), unary)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16,
                                   torch.float64])
def test_split_batch_rejects_zero_weight_sum(server: LossdServer, client: LossClient,
                                             dtype: torch.dtype) -> None:
    """A split batch follows Evaluate's rule for weights summing to zero, not a chunk's."""
    x, t = torch.randn(30_000, 3), torch.randint(0, 3, (30_000,))
    w = torch.zeros(30_000, dtype=dtype)
    with pytest.raises(lossd.InvalidArgument, match=r"^INVALID_ARGUMENT: weights: sum to zero"):
        client.evaluate(x, t, weights=w)
    with _split_client(server) as small, \
            pytest.raises(lossd.InvalidArgument, match=r"weights: sum to zero") as info:
        small.evaluate(x, t, weights=w)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_split_batch_rejects_bad_weights(server: LossdServer) -> None:
    x, t = torch.randn(30_000, 3), torch.randint(0, 3, (30_000,))
    w = torch.ones(30_000)
    w[25_000] = -1.0
    with _split_client(server) as small, \
            pytest.raises(lossd.InvalidArgument, match=r"weights: negative value -1.0"):
        small.evaluate(x, t, weights=w)


def test_max_message_bytes_must_leave_room() -> None:
    with pytest.raises(ValueError, match=r"max_message_bytes"):
        LossClient("127.0.0.1:1", max_message_bytes=1000)


# ---------------------------------------------------------------------------------------
# Streams


def _batches(seed: int, sizes: list[int], c: int = 5) -> list[tuple[Any, Any, Any]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, c, generator=g) * 3
        t = torch.randint(0, c, (n,), generator=g)
        t[torch.rand(n, generator=g) < 0.2] = -100
        out.append((x, t, torch.rand(n, generator=g) * 2))
    return out


def test_stream_running_aggregates_are_exact(client: LossClient) -> None:
    batches = _batches(7, [17, 1, 40, 8, 3])
    x, t, w = batches[1]
    batches[1] = (x, torch.full_like(t, -100), w)  # a batch with every sample ignored
    batches[3] = (*batches[3][:2], torch.zeros(8))  # weights summing to zero mid-stream
    results = list(client.evaluate_stream(iter(batches), loss="cross_entropy",
                                          label_smoothing=0.2))
    assert len(results) == len(batches)
    for k, (r, (x, t, w)) in enumerate(zip(results, batches, strict=True)):
        upto = [torch.cat([b[i] for b in batches[:k + 1]]) for i in range(3)]
        whole = client.evaluate(*upto[:2], weights=upto[2], label_smoothing=0.2)
        assert same_aggregates(r.running, whole.aggregates), (k, r.running, whole.aggregates)
        want = F.cross_entropy(x, t, label_smoothing=0.2, reduction="none")
        assert torch.equal(torch.from_numpy(r.per_sample), want)
        if k != 3:
            alone = client.evaluate(x, t, weights=w, label_smoothing=0.2)
            assert same_aggregates(r.aggregates, alone.aggregates), k
    assert results[1].aggregates.count == 0 and results[1].aggregates.ignored == 1
    assert results[3].aggregates.weight_sum == 0.0
    assert math.isnan(results[3].aggregates.weighted_mean or 0.0)
    last = results[-1].running
    assert last is not None and last.count == sum(r.count for r in results)


def test_stream_without_weights(client: LossClient) -> None:
    batches = [(x, t) for x, t, _ in _batches(8, [5, 6])]
    results = list(client.evaluate_stream(batches, loss="nll_loss"))
    assert len(results) == 2
    assert results[-1].running is not None
    assert results[-1].running.weighted_mean is None and results[-1].running.weight_sum is None
    whole = client.evaluate(torch.cat([batches[0][0], batches[1][0]]),
                            torch.cat([batches[0][1], batches[1][1]]), loss="nll_loss")
    assert results[-1].running == whole.aggregates


def test_stream_from_a_generator(client: LossClient) -> None:
    def batches() -> Any:
        for i in range(3):
            yield torch.full((2,), float(i)), torch.zeros(2)

    results = list(client.evaluate_stream(batches(), loss="l1_loss"))
    assert [r.sum for r in results] == [0.0, 2.0, 4.0]
    assert [r.running.sum for r in results if r.running] == [0.0, 2.0, 6.0]


def test_stream_split_batches_keep_exact_running(server: LossdServer,
                                                 client: LossClient) -> None:
    batches = _batches(9, [3000, 5, 4000])
    with _split_client(server, 70_000) as small:
        results = list(small.evaluate_stream(batches, loss="cross_entropy"))
    whole = client.evaluate(*[torch.cat([b[i] for b in batches]) for i in range(2)],
                            weights=torch.cat([b[2] for b in batches]))
    assert results[-1].running == whole.aggregates
    assert np.array_equal(np.concatenate([r.per_sample for r in results]), whole.per_sample)


def test_stream_yields_one_result_per_split_batch(server: LossdServer,
                                                  client: LossClient) -> None:
    batches = _batches(12, [3000, 5, 2500])
    with _split_client(server, 70_000) as small:
        results = list(small.evaluate_stream(batches))
    assert len(results) == len(batches)
    for (x, t, w), r in zip(batches, results, strict=True):
        alone = client.evaluate(x, t, weights=w)  # one message: the reference
        assert np.array_equal(r.per_sample, alone.per_sample)
        assert r.aggregates == alone.aggregates
    whole = client.evaluate(*[torch.cat([b[i] for b in batches]) for i in range(2)],
                            weights=torch.cat([b[2] for b in batches]))
    assert results[-1].running == whole.aggregates


def test_errors_in_a_split_batch_name_the_sample_in_the_batch(server: LossdServer) -> None:
    x = torch.randn(3000, 12)
    t = torch.randint(0, 12, (3000,))
    t[2500] = 99
    with _split_client(server, 70_000) as small, pytest.raises(lossd.InvalidArgument) as info:
        small.evaluate(x, t)
    assert info.value.message.startswith("targets: class index 99 out of range [0, 12) at "
                                         "sample 2500 ")


def test_stream_weights_on_some_batches_only(client: LossClient) -> None:
    (x0, t0, w0), (x1, t1, _) = _batches(10, [4, 4])
    for batches in ([(x0, t0, w0), (x1, t1)], [(x0, t0), (x1, t1, w0)]):
        with pytest.raises(lossd.InvalidArgument) as info:
            list(client.evaluate_stream(batches))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.message == ("weights: must be given on every batch of a stream or "
                                      "on none (batch 1 of the stream)")
    assert client.evaluate(x0, t0).count > 0


def test_stream_loss_change(server: LossdServer, client: LossClient) -> None:
    x = torch.randn(3, 4)

    def req(loss: str, t: torch.Tensor) -> pb.EvaluateRequest:
        return pb.EvaluateRequest(loss=loss, predictions=to_tensor(x, field="p"),
                                  targets=to_tensor(t, field="t"))

    reqs = [req("cross_entropy", torch.tensor([0, 1, 2])), req("mse_loss", torch.zeros(3, 4))]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = pb_grpc.LossServiceStub(channel).EvaluateStream(iter(reqs), timeout=30)
        first = next(stream)
        assert first.aggregates.count == 3
        with pytest.raises(grpc.RpcError) as info:
            next(stream)
    err: Any = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == ("loss: 'mse_loss' differs from the stream's first batch "
                             "('cross_entropy') (batch 1 of the stream)")
    typed = from_rpc_error(err)
    assert isinstance(typed, lossd.InvalidArgument) and typed.message == err.details()
    assert client.evaluate(x, torch.zeros(3, 4), loss="mse_loss").count == 3


def test_stream_bad_batch_midway(client: LossClient) -> None:
    (x0, t0, _), (x1, t1, _) = _batches(11, [4, 4])
    t1 = t1.clone()
    t1[2] = 99
    got = []
    with pytest.raises(lossd.InvalidArgument, match=r"targets: class index 99"):
        for r in client.evaluate_stream([(x0, t0), (x1, t1), (x0, t0)]):
            got.append(r)
    assert len(got) == 1


# ---------------------------------------------------------------------------------------
# Errors and the public surface

ERRORS = {
    "InvalidArgument": grpc.StatusCode.INVALID_ARGUMENT,
    "ResourceExhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "Unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "PermissionDenied": grpc.StatusCode.PERMISSION_DENIED,
    "NotFound": grpc.StatusCode.NOT_FOUND,
    "Unavailable": grpc.StatusCode.UNAVAILABLE,
    "DeadlineExceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "Cancelled": grpc.StatusCode.CANCELLED,
    "Unimplemented": grpc.StatusCode.UNIMPLEMENTED,
    "InternalError": grpc.StatusCode.INTERNAL,
}


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_error_hierarchy() -> None:
    assert issubclass(lossd.LossdError, Exception)
    assert lossd.LossdError("x").code == grpc.StatusCode.UNKNOWN
    for name, code in ERRORS.items():
        cls = getattr(lossd, name)
        assert issubclass(cls, lossd.LossdError) and cls is not lossd.LossdError
        assert cls.code == code
        exc = from_rpc_error(_FakeRpcError(code, "what: went wrong"))
        assert type(exc) is cls
        assert (exc.code, exc.message) == (code, "what: went wrong")
        assert str(exc) == f"{code.name}: what: went wrong"
    other = from_rpc_error(_FakeRpcError(grpc.StatusCode.ABORTED, ""))
    assert type(other) is lossd.LossdError
    assert (other.code, other.message) == (grpc.StatusCode.ABORTED, "ABORTED")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server_is_unavailable() -> None:
    with LossClient(f"127.0.0.1:{_free_port()}", timeout=10) as c:
        with pytest.raises(lossd.Unavailable) as info:
            c.losses()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(lossd.LossdError):
            c.evaluate([1.0], [1.0], loss="mse_loss")


def test_closed_client_fails(server: LossdServer) -> None:
    c = LossClient(f"127.0.0.1:{server.port}")
    assert c.losses()
    c.close()
    with pytest.raises((ValueError, lossd.LossdError)):  # grpc: "...on closed channel!"
        c.losses()


def test_public_modules_for_advanced_use() -> None:
    """lossd.wire, lossd.requests and lossd.channel publish exactly their ``__all__``: what
    the server shares with the client, and what callers that make the calls themselves
    (bench/) need; each name is defined once, in the client's private modules."""
    import lossd.channel
    import lossd.requests
    import lossd.wire
    from lossd import _channel, _requests, _wire

    for module in (lossd.wire, lossd.requests, lossd.channel):
        assert module.__doc__
        assert set(module.__all__) == {n for n in vars(module) if not n.startswith("_")}
    assert lossd.wire.WIRE_DTYPES is _wire.WIRE_DTYPES
    assert lossd.requests.Requests is _requests.Requests
    assert lossd.channel.channel_options is _channel.channel_options


def test_public_names() -> None:
    public = {name for name, value in vars(lossd).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert len(lossd.__all__) == len(set(lossd.__all__))
    assert set(lossd.__all__) == public | {"__version__"}
    for name in lossd.__all__:
        assert hasattr(lossd, name), name
    assert {"LossClient", "LossResult", "Aggregates", "LossInfo", "OptionInfo", "InputInfo",
            "LossdError",
            "SharedMemory", "AsyncLossClient", *ERRORS} <= set(lossd.__all__)
    assert re.fullmatch(r"\d+\.\d+\.\d+", lossd.__version__)
    assert dataclasses.is_dataclass(lossd.Aggregates)


def test_address_forms_dial_what_they_say(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22: no port dials 50051 (not gRPC's 443); http:// and grpc:// are plaintext,
    https:// and grpcs:// TLS (443 by default)."""
    dialled: list[tuple[str, bool]] = []

    def insecure(target: str, options: Any = None) -> grpc.Channel:
        dialled.append((target, False))
        return real_insecure("127.0.0.1:1", options=options)

    def secure(target: str, credentials: Any, options: Any = None) -> grpc.Channel:
        dialled.append((target, credentials is not None))
        return real_insecure("127.0.0.1:1", options=options)

    real_insecure = grpc.insecure_channel
    monkeypatch.setattr(grpc, "insecure_channel", insecure)
    monkeypatch.setattr(grpc, "secure_channel", secure)
    forms = {"127.0.0.1": ("127.0.0.1:50051", False),
             "lossd-0.lossd": ("lossd-0.lossd:50051", False),
             "[::1]": ("[::1]:50051", False),
             "127.0.0.1:7000": ("127.0.0.1:7000", False),
             "http://127.0.0.1:7000": ("127.0.0.1:7000", False),
             "grpc://lossd": ("lossd:50051", False),
             "https://lossd.example.com": ("lossd.example.com:443", True),
             "grpcs://lossd.example.com:8443/": ("lossd.example.com:8443", True),
             "dns:///lossd-headless": ("dns:///lossd-headless:50051", False),
             "ipv4:10.0.0.1:50051,10.0.0.2:50051": ("ipv4:10.0.0.1:50051,10.0.0.2:50051",
                                                   False)}
    for target in forms:
        LossClient(target, env={}).close()
    assert dict(zip(forms, dialled, strict=True)) == forms
    with pytest.raises(ValueError, match="means TLS, but tls=False"):
        LossClient("https://lossd.example.com", tls=False, env={})

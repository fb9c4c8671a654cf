"""Bad input through the real client and server: INVALID_ARGUMENT naming the field, and the
server keeps serving. Wire-level cases go through the generated stub with raw messages."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import start_server

import lossd
from lossd import LossClient
from lossd._wire import to_tensor
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server.app import LossdServer

G = torch.Generator().manual_seed(0)
X = torch.randn(4, 3, generator=G)
T = torch.tensor([0, 1, 2, 1])
W = torch.tensor([1.0, 2.0, 0.5, 1.5])
REG_X = torch.randn(4, 3, generator=G)
REG_T = torch.randn(4, 3, generator=G)


@pytest.fixture(scope="module")
def stub(server: LossdServer) -> Iterator[pb_grpc.LossServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.LossServiceStub(channel)


def assert_serves(client: LossClient) -> None:
    """A valid request right after a rejected one is served, and served correctly."""
    r = client.evaluate(X, T, loss="cross_entropy", weights=W, label_smoothing=0.1)
    want = F.cross_entropy(X, T, label_smoothing=0.1, reduction="none")
    assert torch.equal(torch.from_numpy(r.per_sample), want)
    assert r.count == 4 and r.weight_sum == 5.0


def assert_invalid(client: LossClient, call: Callable[[], Any], field: str,
                   problem: str) -> lossd.InvalidArgument:
    with pytest.raises(lossd.InvalidArgument) as info:
        call()
    exc = info.value
    assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(exc, lossd.LossdError)
    assert exc.message.startswith(f"{field}: "), exc.message
    assert problem in exc.message, exc.message
    assert_serves(client)
    return exc


# (id, loss, predictions, targets, keyword arguments, field, problem)
CLIENT_CASES: list[tuple[str, str, Any, Any, dict[str, Any], str, str]] = [
    # Unknown loss or option.
    ("unknown-loss", "cross_entropyy", X, T, {}, "loss", "unknown loss 'cross_entropyy'"),
    ("missing-loss", "", X, T, {}, "loss", "missing"),
    ("unknown-option", "cross_entropy", X, T, {"smoothing": 0.1}, "options.smoothing",
     "unknown option"),
    ("other-loss-option", "cross_entropy", X, T, {"beta": 1.0}, "options.beta",
     "unknown option"),
    ("mse-class-weights", "mse_loss", REG_X, REG_T, {"class_weights": [1.0, 1.0, 1.0]},
     "options.class_weights", "unknown option"),
    # Option of the wrong type.
    ("str-for-float", "cross_entropy", X, T, {"label_smoothing": "0.1"},
     "options.label_smoothing", "expected float, got str"),
    ("bool-for-float", "cross_entropy", X, T, {"label_smoothing": True},
     "options.label_smoothing", "expected float, got bool"),
    ("float-for-int", "cross_entropy", X, T, {"ignore_index": 1.0}, "options.ignore_index",
     "expected int, got float"),
    ("int-for-bool", "kl_div", F.log_softmax(REG_X, 1), F.softmax(REG_T, 1),
     {"log_target": 1}, "options.log_target", "expected bool, got int"),
    ("int-for-str", "mse_loss", REG_X, REG_T, {"nan_policy": 1}, "options.nan_policy",
     "expected str, got int"),
    ("float-for-tensor", "cross_entropy", X, T, {"class_weights": 0.5},
     "options.class_weights", "expected tensor, got float"),
    ("tensor-for-float", "huber_loss", REG_X, REG_T, {"delta": [1.0]}, "options.delta",
     "expected float, got tensor"),
    # Option value out of range.
    ("label-smoothing-high", "cross_entropy", X, T, {"label_smoothing": 1.5},
     "options.label_smoothing", "must be in [0.0, 1.0]"),
    ("label-smoothing-negative", "cross_entropy", X, T, {"label_smoothing": -0.1},
     "options.label_smoothing", "must be in [0.0, 1.0]"),
    ("label-smoothing-nan", "cross_entropy", X, T, {"label_smoothing": math.nan},
     "options.label_smoothing", "must be finite"),
    ("beta-negative", "smooth_l1_loss", REG_X, REG_T, {"beta": -1.0}, "options.beta",
     "must be >= 0.0"),
    ("delta-zero", "huber_loss", REG_X, REG_T, {"delta": 0}, "options.delta", "must be > 0.0"),
    ("delta-inf", "huber_loss", REG_X, REG_T, {"delta": math.inf}, "options.delta",
     "must be finite"),
    ("alpha-high", "sigmoid_focal_loss", REG_X, (REG_T > 0).float(), {"alpha": 1.5},
     "options.alpha", "must be in [0, 1] or -1"),
    ("alpha-negative", "sigmoid_focal_loss", REG_X, (REG_T > 0).float(), {"alpha": -0.5},
     "options.alpha", "must be in [0, 1] or -1"),
    ("gamma-negative", "sigmoid_focal_loss", REG_X, (REG_T > 0).float(), {"gamma": -1.0},
     "options.gamma", "must be >= 0.0"),
    ("eps-zero", "poisson_nll_loss", REG_X, REG_T.abs(), {"eps": 0.0}, "options.eps",
     "must be > 0.0"),
    ("nan-policy-choice", "mse_loss", REG_X, REG_T, {"nan_policy": "skip"},
     "options.nan_policy", "must be one of propagate, raise, omit"),
    ("class-weights-shape", "cross_entropy", X, T, {"class_weights": [1.0, 2.0]},
     "options.class_weights", "expected (3,)"),
    ("class-weights-int", "cross_entropy", X, T, {"class_weights": [1, 2, 3]},
     "options.class_weights", "dtype int64 not accepted"),
    ("class-weights-nan", "cross_entropy", X, T, {"class_weights": [1.0, math.nan, 1.0]},
     "options.class_weights", "non-finite"),
    ("pos-weight-shape", "binary_cross_entropy_with_logits", REG_X, (REG_T > 0).float(),
     {"pos_weight": [1.0, 2.0]}, "options.pos_weight", "expected (3,)"),
    ("ignore-index-probs", "cross_entropy", X, F.softmax(REG_T, 1), {"ignore_index": 0},
     "options.ignore_index", "not supported with probability targets"),
    # dtype not accepted.
    ("int-targets-mse", "mse_loss", REG_X, T, {}, "targets", "dtype int64 not accepted"),
    ("float-targets-nll", "nll_loss", F.log_softmax(X, 1), REG_T, {}, "targets",
     "dtype float32 not accepted by nll_loss"),
    ("int-predictions", "cross_entropy", T.reshape(4, 1).repeat(1, 3), T, {}, "predictions",
     "dtype int64 not accepted"),
    ("int32-predictions", "mse_loss", np.ones((4, 3), np.int32), REG_T, {}, "predictions",
     "dtype int32 not accepted"),
    ("int-weights", "cross_entropy", X, T, {"weights": [1, 2, 3, 4]}, "weights",
     "dtype int64 not accepted"),
    # Shapes.
    ("targets-shape-mse", "mse_loss", REG_X, REG_T[:, :2], {}, "targets",
     "shape (4, 2) does not match predictions (4, 3)"),
    ("targets-batch-mse", "mse_loss", REG_X, REG_T[:3], {}, "targets", "does not match"),
    ("targets-shape-ce", "cross_entropy", X, torch.tensor([0, 1, 2]), {}, "targets",
     "class indices must be (4)"),
    ("targets-dense-ce", "cross_entropy", X, T.reshape(4, 1), {}, "targets",
     "does not match"),
    ("targets-shape-probs", "cross_entropy", X, torch.rand(4, 4), {}, "targets",
     "does not match predictions (4, 3)"),
    ("predictions-1d-ce", "cross_entropy", X[:, 0], T, {}, "predictions", "has 1 dims"),
    ("predictions-1d-kl", "kl_div", REG_X[:, 0], REG_T[:, 0], {}, "predictions",
     "has 1 dims"),
    ("predictions-0d", "mse_loss", np.float32(1.0), np.float32(1.0), {}, "predictions",
     "has 0 dims"),
    ("weights-long", "cross_entropy", X, T, {"weights": torch.ones(5)}, "weights",
     "expected (4,)"),
    ("weights-2d", "cross_entropy", X, T, {"weights": torch.ones(4, 1)}, "weights",
     "expected (4,)"),
    # Out-of-range class index.
    ("class-too-big", "cross_entropy", X, torch.tensor([0, 3, 1, 1]), {}, "targets",
     "class index 3 out of range [0, 3) at sample 1"),
    ("class-negative", "cross_entropy", X, torch.tensor([0, 1, -1, 1]), {}, "targets",
     "class index -1 out of range [0, 3) at sample 2"),
    ("class-negative-ignore", "cross_entropy", X, torch.tensor([-1, 1, -5, 1]),
     {"ignore_index": -1}, "targets", "class index -5 out of range [0, 3) at sample 2"),
    ("class-ignore-in-range", "cross_entropy", X, torch.tensor([3, 1, 2, 1]),
     {"ignore_index": 1}, "targets", "class index 3 out of range"),
    ("class-int32", "nll_loss", F.log_softmax(X, 1),
     torch.tensor([0, 1, 2, 100], dtype=torch.int32), {}, "targets", "class index 100"),
    ("class-dense", "cross_entropy", torch.randn(2, 3, 4, generator=G),
     torch.tensor([[0, 1, 2, 0], [1, 2, 7, 0]]), {}, "targets",
     "class index 7 out of range [0, 3) at sample 1"),
    ("class-huge", "cross_entropy", X, torch.tensor([0, 2**40, 1, 1]), {}, "targets",
     f"class index {2**40} out of range"),
    # Weights.
    ("weights-negative", "cross_entropy", X, T, {"weights": [1.0, -0.5, 1.0, 1.0]},
     "weights", "negative value -0.5 at sample 1"),
    ("weights-nan", "cross_entropy", X, T, {"weights": [1.0, 1.0, math.nan, 1.0]},
     "weights", "non-finite value at sample 2"),
    ("weights-inf", "cross_entropy", X, T, {"weights": [math.inf, 1.0, 1.0, 1.0]},
     "weights", "non-finite value at sample 0"),
    ("weights-zero-sum", "cross_entropy", X, T, {"weights": torch.zeros(4)}, "weights",
     "sum to zero"),
    ("weights-negative-zero", "mse_loss", REG_X, REG_T, {"weights": [-0.0] * 4}, "weights",
     "sum to zero"),
    # Empty batch.
    ("empty-batch", "cross_entropy", torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), {},
     "predictions", "empty batch (N = 0)"),
    ("empty-batch-mse", "mse_loss", np.zeros(0, np.float32), np.zeros(0, np.float32), {},
     "predictions", "empty batch"),
    ("no-classes", "cross_entropy", torch.zeros(4, 0), T, {}, "predictions",
     "has no elements"),
    ("empty-list", "mse_loss", [], [], {}, "predictions", "empty batch"),
    # Targets left out, or given to a loss that takes none; extra inputs.
    ("targets-missing", "mse_loss", REG_X, None, {}, "targets",
     "missing; mse_loss takes same as predictions"),
    ("targets-for-triplet", "triplet_margin_loss", REG_X, REG_T,
     {"inputs": {"positive": REG_X, "negative": REG_T}}, "targets",
     "triplet_margin_loss takes no targets; leave them out"),
    ("input-unknown", "mse_loss", REG_X, REG_T, {"inputs": {"var": REG_T}}, "inputs.var",
     "unknown input for mse_loss; accepted: none"),
    ("input-missing", "margin_ranking_loss", REG_X, torch.ones(4, 3), {}, "inputs.input2",
     "missing; margin_ranking_loss takes input2"),
    ("input-shape", "margin_ranking_loss", REG_X, torch.ones(4, 3),
     {"inputs": {"input2": REG_T[:, :2]}}, "inputs.input2",
     "shape (4, 2) does not match predictions (4, 3)"),
    ("input-int", "triplet_margin_loss", REG_X, None,
     {"inputs": {"positive": REG_X, "negative": torch.ones(4, 3, dtype=torch.long)}},
     "inputs.negative", "dtype int64 not accepted"),
    ("input-batch-first", "gaussian_nll_loss", REG_X, REG_T, {"inputs": {"var": torch.ones(3)}},
     "inputs.var", "the batch dimension N = 4 comes first"),
    # binary_cross_entropy takes probabilities (a CUDA kernel would assert otherwise).
    ("bce-above-1", "binary_cross_entropy", torch.tensor([[0.2, 1.5], [0.1, 0.3]]),
     torch.rand(2, 2), {}, "predictions", "value 1.5 at sample 0 is not a probability in [0, 1]"),
    ("bce-negative", "binary_cross_entropy", torch.tensor([0.2, 0.5, -1e-6]), torch.rand(3), {},
     "predictions", "at sample 2 is not a probability"),
    ("bce-inf", "binary_cross_entropy", torch.tensor([0.5, math.inf]), torch.rand(2), {},
     "predictions", "value inf at sample 1"),
    ("bce-target-above-1", "binary_cross_entropy", torch.rand(3), torch.tensor([0.0, 1.0, 2.0]),
     {}, "targets", "value 2.0 at sample 2 is not a probability"),
    ("bce-target-nan", "binary_cross_entropy", torch.rand(3), torch.tensor([0.0, math.nan, 1.0]),
     {}, "targets", "value nan at sample 1"),
    ("bce-bfloat16", "binary_cross_entropy", torch.tensor([0.5, 1.25]).bfloat16(),
     torch.rand(2), {}, "predictions", "value 1.25 at sample 1"),
    # gaussian_nll_loss: var by torch's rules, N first, >= 0.
    ("var-negative", "gaussian_nll_loss", REG_X, REG_T,
     {"inputs": {"var": torch.tensor([[1.0, 1, 1], [1, 1, 1], [1, -0.5, 1], [1, 1, 1]])}},
     "inputs.var", "negative value -0.5 at sample 2; a variance is >= 0"),
    ("var-shape", "gaussian_nll_loss", REG_X, REG_T, {"inputs": {"var": torch.ones(4, 2)}},
     "inputs.var", "shape (4, 2) does not fit predictions (4, 3)"),
    ("var-int", "gaussian_nll_loss", REG_X, REG_T, {"inputs": {"var": torch.ones(4, 3).long()}},
     "inputs.var", "dtype int64 not accepted"),
    ("gaussian-eps", "gaussian_nll_loss", REG_X, REG_T, {"inputs": {"var": torch.ones(4, 3)},
                                                         "eps": -1.0},
     "options.eps", "must be >= 0.0"),
    # ctc_loss: lengths within the tensors, labels within the classes, not blank.
    *[(f"ctc-{name}", "ctc_loss", F.log_softmax(torch.randn(2, 5, 4, generator=G), 2), t,
       {"inputs": {"input_lengths": il, "target_lengths": tl}, **opts}, field, problem)
      for name, t, il, tl, opts, field, problem in [
          ("input-length", torch.tensor([[1, 2], [3, 1]]), [5, 6], [2, 2], {},
           "inputs.input_lengths", "6 at sample 1 outside [0, 5] (T, predictions dim 1)"),
          ("input-length-negative", torch.tensor([[1, 2], [3, 1]]), [-1, 5], [2, 2], {},
           "inputs.input_lengths", "-1 at sample 0 outside [0, 5]"),
          ("target-length", torch.tensor([[1, 2], [3, 1]]), [5, 5], [2, 3], {},
           "inputs.target_lengths", "3 at sample 1 outside [0, 2] (S, targets dim 1)"),
          ("label", torch.tensor([[1, 4], [3, 1]]), [5, 5], [2, 2], {}, "targets",
           "label 4 out of range [0, 4) at sample 0"),
          ("label-negative", torch.tensor([[1, 2], [-3, 1]]), [5, 5], [2, 2], {}, "targets",
           "label -3 out of range"),
          ("blank-label", torch.tensor([[1, 2], [3, 0]]), [5, 5], [2, 2], {}, "targets",
           "the blank label 0 at sample 1"),
          ("blank-option", torch.tensor([[1, 2], [3, 1]]), [5, 5], [2, 2], {"blank": 4},
           "options.blank", "4 out of range [0, 4)"),
          ("float-lengths", torch.tensor([[1, 2], [3, 1]]), [5.0, 5.0], [2, 2], {},
           "inputs.input_lengths", "dtype float64 not accepted; send int64 or int32"),
          ("lengths-shape", torch.tensor([[1, 2], [3, 1]]), [[5], [5]], [2, 2], {},
           "inputs.input_lengths", "expected (2,), one per sample"),
          ("targets-1d", torch.tensor([1, 2, 3, 1]), [5, 5], [2, 2], {}, "targets",
           "expected (N, S) label sequences with N = 2"),
          ("float-targets", torch.rand(2, 2), [5, 5], [2, 2], {}, "targets",
           "dtype float32 not accepted by ctc_loss; send int64 or int32 labels"),
      ]],
    ("ctc-2d", "ctc_loss", REG_X, torch.ones(4, 1).long(),
     {"inputs": {"input_lengths": [3] * 4, "target_lengths": [1] * 4}}, "predictions",
     "has 2 dims; ctc_loss takes (N, T, C)"),
    # The other losses' own rules.
    ("triplet-margin", "triplet_margin_loss", REG_X, None,
     {"inputs": {"positive": REG_X, "negative": REG_T}, "margin": 0.0}, "options.margin",
     "must be > 0.0"),
    ("triplet-1d", "triplet_margin_loss", REG_X[:, 0], None,
     {"inputs": {"positive": REG_X[:, 0], "negative": REG_T[:, 0]}}, "predictions",
     "has 1 dims"),
    ("distance-function", "triplet_margin_with_distance_loss", REG_X, None,
     {"inputs": {"positive": REG_X, "negative": REG_T}, "distance_function": "l1"},
     "options.distance_function", "must be one of pairwise_distance, cosine_distance"),
    ("multilabel-range", "multilabel_margin_loss", REG_X,
     torch.tensor([[0, 1, -1], [2, -1, 0], [3, 0, 0], [-1, 0, 0]]), {}, "targets",
     "class index 3 out of range [-1, 3) at sample 2"),
    ("multilabel-below", "multilabel_margin_loss", REG_X,
     torch.tensor([[0, 1, -1], [2, -1, 0], [1, -2, 0], [-1, 0, 0]]), {}, "targets",
     "class index -2 out of range"),
    ("multilabel-shape", "multilabel_margin_loss", REG_X, T, {}, "targets",
     "class lists are shaped as the predictions"),
    ("multi-margin-p", "multi_margin_loss", X, T, {"p": 3}, "options.p",
     "must be one of 1, 2, got 3"),
    ("multi-margin-class", "multi_margin_loss", X, torch.tensor([0, 1, 2, 3]), {}, "targets",
     "class index 3 out of range [0, 3) at sample 3 (ignore_index is -100)"),
    ("multi-margin-3d", "multi_margin_loss", torch.randn(4, 3, 2), torch.zeros(4, 2).long(), {},
     "predictions", "has 3 dims; multi_margin_loss takes (N, C)"),
    ("multi-margin-weights", "multi_margin_loss", X, T, {"class_weights": [1.0, 2.0]},
     "options.class_weights", "expected (3,), one weight per class (predictions dim 1)"),
    ("cosine-targets", "cosine_embedding_loss", REG_X, REG_T, {"inputs": {"input2": REG_T}},
     "targets", "does not match predictions (4, 3); one value per sample, (4)"),
    ("soft-margin-weights", "multilabel_soft_margin_loss", REG_X, REG_T,
     {"class_weights": [1.0, 2.0]}, "options.class_weights",
     "expected (3,), one weight per class (the last dim of predictions)"),
]


@pytest.mark.parametrize(("loss", "x", "t", "kwargs", "field", "problem"),
                         [c[1:] for c in CLIENT_CASES], ids=[c[0] for c in CLIENT_CASES])
def test_rejected(client: LossClient, loss: str, x: Any, t: Any, kwargs: dict[str, Any],
                  field: str, problem: str) -> None:
    assert_invalid(client, lambda: client.evaluate(x, t, loss=loss, **kwargs), field, problem)


INDICES_OR_PROBABILITIES = ("class indices (int64/int32) of shape (N, ...), here (4), or class "
                            "probabilities shaped like the predictions, here (4, 3)")
# Issue 22: each message names the fix, not only the fault.
POINTING_CASES: list[tuple[str, str, Any, Any, dict[str, Any], str, str]] = [
    ("float-indices-ce", "cross_entropy", X, T.float(), {}, "targets",
     f"dtype float32 with the shape of class indices, (4): cross_entropy takes "
     f"{INDICES_OR_PROBABILITIES}; send the class indices as int64 (targets.long())"),
    ("float-other-shape-ce", "cross_entropy", X, torch.rand(4, 4), {}, "targets",
     f"shape (4, 4) does not match predictions (4, 3); cross_entropy takes "
     f"{INDICES_OR_PROBABILITIES}"),
    ("float-targets-nll-shape", "nll_loss", F.log_softmax(X, 1), T.float(), {}, "targets",
     "send int64 or int32 class indices of shape (N, ...)"),
    ("typo-loss", "cross_entopy", X, T, {}, "loss",
     "unknown loss 'cross_entopy'; did you mean 'cross_entropy'? one of "),
    ("torch-class-name", "CrossEntropyLoss", X, T, {}, "loss",
     "unknown loss 'CrossEntropyLoss'; did you mean 'cross_entropy'?"),
    ("torch-module-path", "nn.CrossEntropyLoss", X, T, {}, "loss", "did you mean 'cross_entropy'?"),
    ("torch-functional", "F.cross_entropy", X, T, {}, "loss", "did you mean 'cross_entropy'?"),
    ("torch-functional-full", "torch.nn.functional.mse_loss", REG_X, REG_T, {}, "loss",
     "did you mean 'mse_loss'?"),
    ("torch-bce-class", "BCEWithLogitsLoss", REG_X, (REG_T > 0).float(), {}, "loss",
     "did you mean 'binary_cross_entropy_with_logits'?"),
    ("torch-nll-class", "NLLLoss", F.log_softmax(X, 1), T, {}, "loss",
     "did you mean 'nll_loss'?"),
    ("option-typo", "cross_entropy", X, T, {"label_smothing": 0.1}, "options.label_smothing",
     "unknown option for cross_entropy; did you mean 'label_smoothing'?; accepted: "),
    ("torch-weight", "cross_entropy", X, T, {"weight": [1.0, 2.0, 3.0]}, "options.weight",
     "lossd calls torch's weight class_weights; per-sample weights go in weights="),
    ("torch-weight-mse", "mse_loss", REG_X, REG_T, {"weight": [1.0, 2.0, 3.0]},
     "options.weight", "mse_loss takes no class weights; per-sample weights go in weights="),
    ("torch-reduction", "cross_entropy", X, T, {"reduction": "mean"}, "options.reduction",
     "lossd takes no reduction: every result carries every reduction (per_sample, sum, "
     "mean, and weighted_sum / weighted_mean with weights=), so there is nothing to choose"),
]


@pytest.mark.parametrize(("loss", "x", "t", "kwargs", "field", "problem"),
                         [c[1:] for c in POINTING_CASES], ids=[c[0] for c in POINTING_CASES])
def test_errors_point_at_the_fix(client: LossClient, loss: str, x: Any, t: Any,
                                 kwargs: dict[str, Any], field: str, problem: str) -> None:
    assert_invalid(client, lambda: client.evaluate(x, t, loss=loss, **kwargs), field, problem)


def test_no_suggestion_for_a_name_like_no_loss(client: LossClient) -> None:
    exc = assert_invalid(client, lambda: client.evaluate(X, T, loss="zzzz"), "loss",
                         "unknown loss 'zzzz'; one of ")
    assert "did you mean" not in exc.message


@pytest.mark.parametrize("nan_policy", ["propagate", "omit", "raise"])
def test_binary_cross_entropy_nan_predictions_follow_nan_policy(client: LossClient,
                                                                nan_policy: str) -> None:
    """torch refuses a NaN probability (a CUDA kernel asserts on it); lossd gives that
    sample a NaN loss, like every loss, and nan_policy decides."""
    x = torch.tensor([[0.2, 0.9], [math.nan, 0.5], [1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.5]])
    if nan_policy == "raise":
        assert_invalid(client, lambda: client.evaluate(x, t, loss="binary_cross_entropy",
                                                       nan_policy="raise"),
                       "predictions", "non-finite value at sample 1")
        return
    r = client.evaluate(x, t, loss="binary_cross_entropy", nan_policy=nan_policy)
    want = F.binary_cross_entropy(x[[0, 2]], t[[0, 2]], reduction="none").mean(1)
    assert torch.equal(torch.from_numpy(r.per_sample[[0, 2]]), want)
    assert math.isnan(r.per_sample[1])
    assert (r.count, r.omitted) == ((2, 1) if nan_policy == "omit" else (3, 0))


def test_ignore_index_outside_range_is_accepted(client: LossClient) -> None:
    """A target equal to ignore_index is no class index, even outside [0, C)."""
    t = torch.tensor([255, 1, 2, 255])
    r = client.evaluate(X, t, loss="cross_entropy", ignore_index=255)
    want = F.cross_entropy(X, t, ignore_index=255, reduction="none")
    assert torch.equal(torch.from_numpy(r.per_sample), want)
    assert (r.count, r.ignored) == (2, 2)


def test_zero_weight_sum_of_counted_samples_is_accepted(client: LossClient) -> None:
    """Only weights summing to zero over the request are rejected, not zero single weights."""
    r = client.evaluate(X, T, loss="cross_entropy", weights=[0.0, 0.0, 1.0, 0.0])
    assert r.weight_sum == 1.0
    assert r.weighted_mean == r.weighted_sum == float(r.per_sample[2])


# ---------------------------------------------------------------------------------------
# Wire-level: raw messages through the generated stub.


def raw_request(**fields: Any) -> pb.EvaluateRequest:
    req = pb.EvaluateRequest(loss=fields.pop("loss", "cross_entropy"))
    for name in ("predictions", "targets", "weights"):
        value = fields.pop(name, {"predictions": X, "targets": T, "weights": None}[name])
        if value is not None:
            getattr(req, name).CopyFrom(value if isinstance(value, pb.Tensor)
                                        else to_tensor(value, field=name))
    for name, value in fields.pop("options", {}).items():
        req.options[name].CopyFrom(value)
    for name, value in fields.pop("inputs", {}).items():
        req.inputs[name].CopyFrom(value)
    assert not fields
    return req


def _truncated(value: Any, drop: int = 1) -> pb.Tensor:
    t = to_tensor(value, field="x")
    t.data = t.data[:-drop] if drop > 0 else t.data + b"\0" * -drop
    return t


WIRE_CASES: list[tuple[str, Callable[[], pb.EvaluateRequest], str, str]] = [
    ("unknown-dtype",
     lambda: raw_request(predictions=pb.Tensor(dtype=99, shape=[4, 3], data=b"\0" * 48)),
     "predictions.dtype", "DType(99) not accepted"),
    ("unspecified-dtype",
     lambda: raw_request(targets=pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[4],
                                           data=b"\0" * 32)),
     "targets.dtype", "not accepted"),
    ("predictions-short", lambda: raw_request(predictions=_truncated(X)),
     "predictions.data", "47 bytes; shape [4, 3] of float32 needs 48"),
    ("predictions-long", lambda: raw_request(predictions=_truncated(X, -4)),
     "predictions.data", "52 bytes"),
    ("targets-short", lambda: raw_request(targets=_truncated(T, 8)), "targets.data",
     "24 bytes; shape [4] of int64 needs 32"),
    ("weights-short", lambda: raw_request(weights=_truncated(W, 2)), "weights.data",
     "14 bytes"),
    ("shape-without-data", lambda: raw_request(predictions=pb.Tensor(
        dtype=pb.FLOAT32, shape=[4, 3])), "predictions.data", "0 bytes"),
    ("bfloat16-odd", lambda: raw_request(predictions=pb.Tensor(
        dtype=pb.BFLOAT16, shape=[4, 3], data=b"\0" * 23)), "predictions.data",
     "23 bytes; shape [4, 3] of bfloat16 needs 24"),
    ("option-tensor-short", lambda: raw_request(options={
        "class_weights": pb.OptionValue(tensor_value=_truncated(torch.ones(3)))}),
     "options.class_weights.data", "11 bytes"),
    ("negative-dim", lambda: raw_request(predictions=pb.Tensor(
        dtype=pb.FLOAT32, shape=[-4, -3], data=b"\0" * 48)), "predictions.shape",
     "negative dimension"),
    ("missing-predictions", lambda: pb.EvaluateRequest(
        loss="cross_entropy", targets=to_tensor(T, field="t")), "predictions", "missing"),
    ("missing-targets", lambda: pb.EvaluateRequest(
        loss="cross_entropy", predictions=to_tensor(X, field="p")), "targets", "missing"),
    ("option-without-value", lambda: raw_request(options={
        "label_smoothing": pb.OptionValue()}), "options.label_smoothing", "no value set"),
    ("int-option-for-float", lambda: raw_request(options={
        "label_smoothing": pb.OptionValue(int_value=2)}), "options.label_smoothing",
     "must be in [0.0, 1.0], got 2.0"),
    ("input-dtype", lambda: raw_request(
        loss="gaussian_nll_loss", predictions=REG_X, targets=REG_T,
        inputs={"var": pb.Tensor(dtype=99, shape=[4, 3], data=b"\0" * 48)}),
     "inputs.var.dtype", "DType(99) not accepted"),
    ("input-short", lambda: raw_request(loss="gaussian_nll_loss", predictions=REG_X,
                                        targets=REG_T, inputs={"var": _truncated(REG_T)}),
     "inputs.var.data", "47 bytes; shape [4, 3] of float32 needs 48"),
    ("input-without-value", lambda: raw_request(loss="gaussian_nll_loss", predictions=REG_X,
                                                targets=REG_T, inputs={"var": pb.Tensor()}),
     "inputs.var.dtype", "DType(0) not accepted"),
]


@pytest.mark.parametrize(("make", "field", "problem"), [c[1:] for c in WIRE_CASES],
                         ids=[c[0] for c in WIRE_CASES])
def test_rejected_on_the_wire(client: LossClient, stub: pb_grpc.LossServiceStub,
                              make: Callable[[], pb.EvaluateRequest], field: str,
                              problem: str) -> None:
    req = make()
    for call in (lambda: stub.Evaluate(req, timeout=30),
                 lambda: list(stub.EvaluateStream(iter([req]), timeout=30))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        err: Any = info.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith(f"{field}: "), err.details()
        assert problem in err.details(), err.details()
    assert_serves(client)


def test_int_option_accepted_for_float(stub: pb_grpc.LossServiceStub) -> None:
    """Integers are accepted where a float is expected (the proto's rule)."""
    req = raw_request(loss="huber_loss", predictions=REG_X, targets=REG_T,
                      options={"delta": pb.OptionValue(int_value=2)})
    resp = stub.Evaluate(req, timeout=30)
    got = np.frombuffer(resp.per_sample.data, np.float32)
    want = F.huber_loss(REG_X, REG_T, delta=2.0, reduction="none").mean(1)
    assert np.array_equal(got, want.numpy())


# ---------------------------------------------------------------------------------------
# nan_policy.

NAN_X = REG_X.clone()
NAN_X[1, 2] = math.nan
NAN_X[3, 0] = math.inf


def test_nan_policy_propagate(client: LossClient) -> None:
    for kwargs in ({}, {"nan_policy": "propagate"}):
        r = client.evaluate(NAN_X, REG_T, loss="mse_loss", weights=W, **kwargs)
        assert np.isnan(r.per_sample[1]) and np.isposinf(r.per_sample[3])
        assert np.isfinite(r.per_sample[[0, 2]]).all()
        assert (r.count, r.omitted, r.ignored) == (4, 0, 0)
        assert math.isnan(r.sum) and math.isnan(r.mean) and math.isnan(r.weighted_mean or 0)
        assert r.weight_sum == 5.0


def test_nan_policy_raise(client: LossClient) -> None:
    assert_invalid(client, lambda: client.evaluate(NAN_X, REG_T, loss="mse_loss",
                                                   nan_policy="raise"),
                   "predictions", "non-finite value at sample 1 (nan_policy='raise')")
    inf_only = REG_X.clone()
    inf_only[2, 1] = -math.inf
    assert_invalid(client, lambda: client.evaluate(inf_only, REG_T, loss="mse_loss",
                                                   nan_policy="raise"),
                   "predictions", "non-finite value at sample 2")
    r = client.evaluate(REG_X, REG_T, loss="mse_loss", nan_policy="raise")
    want = F.mse_loss(REG_X, REG_T, reduction="none").mean(1)
    assert torch.equal(torch.from_numpy(r.per_sample), want)


def test_nan_policy_omit(client: LossClient) -> None:
    r = client.evaluate(NAN_X, REG_T, loss="mse_loss", weights=W, nan_policy="omit")
    want = F.mse_loss(NAN_X, REG_T, reduction="none").mean(1)
    torch.testing.assert_close(torch.from_numpy(r.per_sample), want, rtol=0, atol=0,
                               equal_nan=True)
    assert (r.count, r.omitted, r.ignored) == (2, 2, 0)
    kept = want[[0, 2]].double()
    assert r.sum == math.fsum(kept.tolist())
    assert r.mean == r.sum / 2
    assert r.weight_sum == 1.5
    assert r.weighted_sum == math.fsum((kept * W[[0, 2]].double()).tolist())
    assert r.weighted_mean == r.weighted_sum / 1.5


def test_nan_policy_omit_ignored_sample_counts_as_ignored(client: LossClient) -> None:
    x = X.clone()
    x[0, 0] = math.nan  # ignored and non-finite: ignored
    x[2, 1] = math.nan  # non-finite: omitted
    t = torch.tensor([-100, 1, 2, 0])
    r = client.evaluate(x, t, loss="cross_entropy", nan_policy="omit")
    assert (r.count, r.ignored, r.omitted) == (2, 1, 1)
    assert r.sum == math.fsum(r.per_sample[[1, 3]].astype(np.float64).tolist())
    assert r.per_sample[0] == 0.0


def test_nan_policy_omit_everything(client: LossClient) -> None:
    r = client.evaluate(torch.full((2, 3), math.nan), torch.zeros(2, 3), loss="l1_loss",
                        nan_policy="omit")
    assert (r.count, r.omitted) == (0, 2)
    assert r.sum == 0.0 and math.isnan(r.mean)


def test_infinite_losses_of_both_signs(client: LossClient) -> None:
    """Finite inputs whose losses overflow to +inf and -inf: the sum is nan, not an error."""
    x = torch.tensor([[3e38], [-3e38], [0.0]])
    t = torch.tensor([[2.0], [2.0], [1.0]])
    r = client.evaluate(x, t, loss="kl_div", weights=[1.0, 1.0, 1.0])
    want = F.kl_div(x, t, reduction="none").sum(1)
    assert torch.equal(torch.from_numpy(r.per_sample), want)
    assert want[0] == -math.inf and want[1] == math.inf
    assert r.count == 3
    assert math.isnan(r.sum) and math.isnan(r.mean) and math.isnan(r.weighted_sum or 0)
    assert r.weight_sum == 3.0


# ---------------------------------------------------------------------------------------
# Message size.


@pytest.fixture(scope="module")
def small_server() -> Iterator[LossdServer]:
    srv = start_server(max_message_mb=1)
    yield srv
    srv.stop(0)


def test_too_large_request_raw(small_server: LossdServer) -> None:
    x = torch.randn(300_000)  # 1.2 MB of predictions, 2.4 MB in all
    req = raw_request(loss="mse_loss", predictions=x, targets=x)
    with grpc.insecure_channel(f"127.0.0.1:{small_server.port}") as channel:
        stub = pb_grpc.LossServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Evaluate(req, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        ok = stub.Evaluate(raw_request(loss="mse_loss", predictions=x[:10], targets=x[:10]),
                           timeout=30)
        assert ok.aggregates.count == 10 and ok.aggregates.sum == 0.0


def test_too_large_request_client(small_server: LossdServer) -> None:
    x = torch.randn(300_000)
    address = f"127.0.0.1:{small_server.port}"
    with LossClient(address, max_message_bytes=8 << 20, timeout=30) as c:
        with pytest.raises(lossd.ResourceExhausted) as info:
            c.evaluate(x, x, loss="mse_loss")
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert isinstance(info.value, lossd.LossdError)
        assert c.evaluate(x[:10], torch.ones(10), loss="mse_loss").count == 10
    # A client told the server's limit splits the batch and gets it through.
    with LossClient(address, max_message_bytes=small_server.settings.max_message_bytes,
                    timeout=30) as c:
        t = torch.ones(300_000)
        r = c.evaluate(x, t, loss="l1_loss")
        assert r.count == 300_000 and r.per_sample.shape == (300_000,)
        assert np.array_equal(r.per_sample, F.l1_loss(x, t, reduction="none").numpy())


@pytest.mark.parametrize(("model", "parameters", "field", "problem"), [
    ("CrossEntropyLoss", {}, "model_name",
     "unknown model 'CrossEntropyLoss'; did you mean 'cross_entropy'? the models are"),
    ("cross_entropy", {"label_smothing": 0.1}, "parameters.label_smothing",
     "unknown parameter for model cross_entropy; did you mean 'label_smoothing'?; accepted: "),
    ("cross_entropy", {"reduction": "mean"}, "parameters.reduction",
     "unknown parameter for model cross_entropy; lossd takes no reduction: every result "
     "carries every reduction"),
])
def test_kserve_errors_point_at_the_fix_too(server: LossdServer, model: str,
                                            parameters: dict[str, Any], field: str,
                                            problem: str) -> None:
    """The hints live in the server's validation, so the Open Inference front has them."""
    from lossd.kserve.v2 import grpc_service_pb2 as kpb
    from lossd.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc

    req = kpb.ModelInferRequest(model_name=model)
    for (name, value), tensor in zip((("PREDICTIONS", X), ("TARGETS", T)),
                                     (req.inputs.add(), req.inputs.add()), strict=True):
        tensor.name, tensor.shape[:] = name, list(value.shape)
        tensor.datatype = "FP32" if value.is_floating_point() else "INT64"
        req.raw_input_contents.append(value.numpy().tobytes())
    for name, value in parameters.items():
        if isinstance(value, float):
            req.parameters[name].double_param = value
        else:
            req.parameters[name].string_param = value
    with (grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
          pytest.raises(grpc.RpcError) as info):
        kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=30)
    assert info.value.details().startswith(f"{field}: {problem}"), info.value.details()

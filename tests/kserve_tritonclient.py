"""The Open Inference Protocol (KServe v2) endpoint, driven by the real ``tritonclient[grpc]``.

Every inference is compared with lossd's native API on the same server: per-sample values
bit for bit, aggregates exactly.

tritonclient registers its own copy of the protocol (``inference.*`` messages) in
protobuf's default descriptor pool, and so does the lossd server (``lossd.kserve.v2``):
the two cannot share a process. So this module is not collected by the suite's pytest
(whose conftest imports the server); ``tests/test_kserve.py`` runs it in a pytest process
of its own, and the server here is ``lossd serve`` in a subprocess. This process imports
tritonclient and ``lossd.LossClient`` (``lossd.v1`` only), never ``lossd.kserve`` or
``lossd_server``. Standalone, with the example plugin installed into DIR
(``pip install --no-deps --target DIR examples/plugin``)::

    PYTHONPATH=DIR .venv/bin/python -m pytest --noconftest tests/kserve_tritonclient.py
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

import lossd
from lossd import LossClient, LossResult

MAX_MESSAGE_MB = 1
SCALARS = ("SUM", "MEAN", "COUNT", "IGNORED", "OMITTED")
WEIGHTED = ("WEIGHTED_SUM", "WEIGHTED_MEAN", "WEIGHT_SUM")
ANALYSIS_OUTPUTS = ("CLASSES", "CLASS_COUNT", "CLASS_SUM", "CLASS_MEAN", "CLASS_WEIGHTED_SUM",
                    "CLASS_WEIGHTED_MEAN", "CLASS_WEIGHT_SUM", "CLASS_CORRECT",
                    "CLASS_ACCURACY", "ACCURACY", "CORRECT", "ACCURACY_COUNT", "TOP_K",
                    "TOP_K_CORRECT", "TOP_K_ACCURACY", "PREDICTED", "CONFIDENCE", "ECE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``lossd serve`` in a subprocess on a free port, once it answers ServerReady."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("lossd") / "server.log"
    cmd = [sys.executable, "-m", "lossd._cli", "serve", "--processes", "2", "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", "-1", "--device", "cpu",
           "--max-message-mb", str(MAX_MESSAGE_MB), "--grace-seconds", "1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parent.parent)
    addr = f"127.0.0.1:{port}"
    try:
        with grpcclient.InferenceServerClient(addr) as probe:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"lossd serve exited with {proc.returncode}:\n"
                                f"{log_path.read_text()}")
                try:
                    if probe.is_server_ready():
                        break
                except InferenceServerException:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"lossd serve not ready after 60 s:\n{log_path.read_text()}")
                time.sleep(0.05)
        yield addr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def triton(address: str) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(address) as c:
        yield c


@pytest.fixture(scope="module")
def native(address: str) -> Iterator[LossClient]:
    with LossClient(address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    """tritonclient's generated stub, for requests tritonclient itself does not build."""
    with grpc.insecure_channel(address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def infer(triton: grpcclient.InferenceServerClient, model: str, inputs: dict[str, np.ndarray],
          *, outputs: list[str] | None = None, **kwargs: Any) -> grpcclient.InferResult:
    tensors = []
    for name, arr in inputs.items():
        t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        tensors.append(t.set_data_from_numpy(arr))
    requested = None if outputs is None else [grpcclient.InferRequestedOutput(o)
                                              for o in outputs]
    return triton.infer(model, tensors, outputs=requested, **kwargs)


def bits(value: Any) -> bytes:
    return np.asarray(value, dtype=np.float64).tobytes()


def assert_same(result: grpcclient.InferResult, expected: LossResult) -> None:
    """PER_SAMPLE bit for bit, every aggregate exactly (NaN included)."""
    per_sample = result.as_numpy("PER_SAMPLE")
    assert per_sample.dtype == np.float32
    assert per_sample.shape == expected.per_sample.shape
    assert per_sample.tobytes() == expected.per_sample.tobytes()
    for name, want in (("SUM", expected.sum), ("MEAN", expected.mean)):
        got = result.as_numpy(name)
        assert got.dtype == np.float64 and got.shape == (1,)
        assert bits(got[0]) == bits(want), name
    for name, count in (("COUNT", expected.count), ("IGNORED", expected.ignored),
                        ("OMITTED", expected.omitted)):
        got = result.as_numpy(name)
        assert got.dtype == np.int64 and got.tolist() == [count], name
    names = [o.name for o in result.get_response().outputs]
    if expected.weighted_mean is None:
        assert names == ["PER_SAMPLE", *SCALARS]
    else:
        assert names == ["PER_SAMPLE", *SCALARS, *WEIGHTED]
        for name, want in (("WEIGHTED_SUM", expected.weighted_sum),
                           ("WEIGHTED_MEAN", expected.weighted_mean),
                           ("WEIGHT_SUM", expected.weight_sum)):
            assert bits(result.as_numpy(name)[0]) == bits(want), name


def rejected(exc: pytest.ExceptionInfo[InferenceServerException], code: str,
             prefix: str) -> None:
    assert exc.value.status() == f"StatusCode.{code}", str(exc.value)
    assert exc.value.message().startswith(prefix), exc.value.message()


RNG = np.random.default_rng(7)
LOGITS = RNG.standard_normal((33, 5)).astype(np.float32)
LABELS = RNG.integers(0, 5, 33)
WEIGHTS_ = RNG.random(33).astype(np.float32)


# ---- health and metadata ---------------------------------------------------------------

def test_server_live_ready_and_metadata(triton: grpcclient.InferenceServerClient) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert (meta.name, meta.version, list(meta.extensions)) == ("lossd", lossd.__version__,
                                                                ["parameters"])


def test_every_loss_is_a_ready_model(triton: grpcclient.InferenceServerClient,
                                     native: LossClient) -> None:
    names = [info.name for info in native.losses()]
    assert "cross_entropy" in names and "mse_loss" in names
    for name in names:
        assert triton.is_model_ready(name)
        assert triton.is_model_ready(name, "1")
        assert not triton.is_model_ready(name, "2")
    assert not triton.is_model_ready("no_such_loss")


def test_model_metadata(triton: grpcclient.InferenceServerClient) -> None:
    def tensors(ts: Any) -> list[tuple[str, str, list[int]]]:
        return [(t.name, t.datatype, list(t.shape)) for t in ts]

    outputs = [("PER_SAMPLE", "FP32", [-1]), ("SUM", "FP64", [1]), ("MEAN", "FP64", [1]),
               ("COUNT", "INT64", [1]), ("IGNORED", "INT64", [1]), ("OMITTED", "INT64", [1]),
               ("WEIGHTED_SUM", "FP64", [1]), ("WEIGHTED_MEAN", "FP64", [1]),
               ("WEIGHT_SUM", "FP64", [1])]
    ce = triton.get_model_metadata("cross_entropy")
    assert (ce.name, list(ce.versions), ce.platform) == ("cross_entropy", ["1"], "lossd")
    assert tensors(ce.inputs) == [("PREDICTIONS", "FP32", [-1, -1]), ("TARGETS", "INT64", [-1]),
                                  ("WEIGHTS", "FP32", [-1]), ("SAMPLE_IDS", "INT64", [-1]),
                                  ("CLASS_WEIGHTS", "FP32", [-1])]
    assert tensors(ce.outputs)[:len(outputs)] == outputs
    # Class-index models also list the analyses' outputs; value models do not.
    assert [t.name for t in ce.outputs][len(outputs):] == list(ANALYSIS_OUTPUTS)
    mse = triton.get_model_metadata("mse_loss", "1")
    assert tensors(mse.outputs) == outputs
    assert tensors(mse.inputs) == [("PREDICTIONS", "FP32", [-1]), ("TARGETS", "FP32", [-1]),
                                   ("WEIGHTS", "FP32", [-1]), ("SAMPLE_IDS", "INT64", [-1])]
    bce = triton.get_model_metadata("binary_cross_entropy_with_logits")
    assert [t.name for t in bce.inputs][-2:] == ["CLASS_WEIGHTS", "POS_WEIGHT"]
    with pytest.raises(InferenceServerException) as exc:
        triton.get_model_metadata("no_such_loss")
    rejected(exc, "NOT_FOUND", "model_name: unknown model 'no_such_loss'")
    with pytest.raises(InferenceServerException) as exc:
        triton.get_model_metadata("mse_loss", "2")
    rejected(exc, "NOT_FOUND", "model_version:")


def example_inputs(name: str) -> dict[str, np.ndarray] | None:
    """Valid float32 inputs for a model, by their Open Inference Protocol names: a
    reference case of the built-in (tests/loss_reference.py) with default options, or the
    example plugin's (None for another model)."""
    from loss_reference import CASES

    rng = np.random.default_rng(11)
    if name == "charbonnier":
        x = rng.standard_normal((6, 3)).astype(np.float32)
        return {"PREDICTIONS": x, "TARGETS": rng.standard_normal((6, 3)).astype(np.float32)}
    if name == "knowledge_distillation":
        return {"PREDICTIONS": rng.standard_normal((6, 3)).astype(np.float32),
                "TARGETS": rng.integers(0, 3, 6).astype(np.int64),
                "TEACHER": rng.standard_normal((6, 3)).astype(np.float32)}
    for case in CASES:
        if case.loss == name and case.x.dtype == torch.float32 and not case.opts and (
                case.t is None or case.t.dtype in (torch.float32, torch.int64)):
            arrays = {"PREDICTIONS": case.x.numpy()}
            if case.t is not None:
                arrays["TARGETS"] = case.t.numpy()
            arrays.update({k.upper(): v.numpy() for k, v in case.inputs.items()})
            return arrays
    return None


def test_metadata_is_what_infer_takes_and_gives(triton: grpcclient.InferenceServerClient,
                                                native: LossClient) -> None:
    """Inputs as each model's metadata lists them (names, canonical datatypes, ranks) infer,
    and outputs are as described; every built-in and the example plugin's losses."""
    tried = []
    for info in native.losses():
        arrays = example_inputs(info.name)
        if arrays is None:
            continue
        meta = triton.get_model_metadata(info.name)
        listed = {t.name: t for t in meta.inputs}
        optional = {"WEIGHTS", "SAMPLE_IDS",
                    *(o.name.upper() for o in info.options if o.type == "tensor")}
        assert set(arrays) == set(listed) - optional, info.name
        for name, arr in arrays.items():
            assert listed[name].datatype == np_to_triton_dtype(arr.dtype), (info.name, name)
            assert len(listed[name].shape) <= arr.ndim, (info.name, name)
        n = arrays["PREDICTIONS"].shape[0]
        w = np.random.default_rng(2).random(n).astype(np.float32)
        result = infer(triton, info.name, {**arrays, "WEIGHTS": w})
        described = {o.name: o for o in meta.outputs}
        for out in result.get_response().outputs:
            assert out.datatype == described[out.name].datatype
            assert [n if d == -1 else d for d in described[out.name].shape] == list(out.shape)
        extra = {i.name: arrays[i.name.upper()] for i in info.inputs}
        assert_same(result, native.evaluate(arrays["PREDICTIONS"], arrays.get("TARGETS"),
                                            loss=info.name, weights=w, inputs=extra))
        tried.append(info.name)
    assert {"ctc_loss", "triplet_margin_loss", "gaussian_nll_loss", "charbonnier",
            "knowledge_distillation"} <= set(tried)
    assert len(tried) == len(native.losses())


# ---- inference equals the native API ----------------------------------------------------

def test_cross_entropy_raw_fp32_int64(triton: grpcclient.InferenceServerClient,
                                      native: LossClient) -> None:
    result = infer(triton, "cross_entropy", {"PREDICTIONS": LOGITS, "TARGETS": LABELS},
                   request_id="req-1")
    assert result.get_response().id == "req-1"
    assert result.get_response().model_name == "cross_entropy"
    assert_same(result, native.evaluate(LOGITS, LABELS, loss="cross_entropy"))


def test_weights(triton: grpcclient.InferenceServerClient, native: LossClient) -> None:
    result = infer(triton, "cross_entropy",
                   {"PREDICTIONS": LOGITS, "TARGETS": LABELS, "WEIGHTS": WEIGHTS_})
    assert_same(result, native.evaluate(LOGITS, LABELS, loss="cross_entropy",
                                        weights=WEIGHTS_))


def test_parameters_are_loss_options(triton: grpcclient.InferenceServerClient,
                                     native: LossClient) -> None:
    x = RNG.standard_normal((8, 4, 3)).astype(np.float32)
    t = RNG.integers(0, 4, (8, 3))
    t[2] = 1  # sample 2 entirely ignored
    t[5, 0] = 1
    opts = {"label_smoothing": 0.2, "ignore_index": 1}
    result = infer(triton, "cross_entropy", {"PREDICTIONS": x, "TARGETS": t}, parameters=opts)
    expected = native.evaluate(x, t, loss="cross_entropy", **opts)
    assert expected.ignored == 1
    assert_same(result, expected)
    assert not np.array_equal(result.as_numpy("PER_SAMPLE"),
                              native.evaluate(x, t, loss="cross_entropy").per_sample)


def test_nan_policy_and_bool_parameters(triton: grpcclient.InferenceServerClient,
                                        native: LossClient) -> None:
    x = RNG.standard_normal((6, 4)).astype(np.float32)
    x[3, 1] = np.nan
    t = RNG.random((6, 4)).astype(np.float32)
    opts = {"nan_policy": "omit", "log_input": False, "full": True, "eps": 1e-6}
    result = infer(triton, "poisson_nll_loss", {"PREDICTIONS": np.abs(x), "TARGETS": t},
                   parameters=opts)
    expected = native.evaluate(np.abs(x), t, loss="poisson_nll_loss", **opts)
    assert expected.omitted == 1
    assert_same(result, expected)


@pytest.mark.parametrize("dtype", ["FP16", "BF16", "FP64"])
def test_reduced_and_double_precision(triton: grpcclient.InferenceServerClient,
                                      native: LossClient, dtype: str) -> None:
    if dtype == "BF16":
        as_torch = torch.from_numpy(LOGITS).to(torch.bfloat16)
        sent = as_torch.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        expected = native.evaluate(as_torch, LABELS.astype(np.int32), weights=WEIGHTS_)
    else:
        sent = LOGITS.astype(np.float16 if dtype == "FP16" else np.float64)
        expected = native.evaluate(sent, LABELS.astype(np.int32), weights=WEIGHTS_)
    result = infer(triton, "cross_entropy", {"PREDICTIONS": sent,
                                             "TARGETS": LABELS.astype(np.int32),
                                             "WEIGHTS": WEIGHTS_})
    assert_same(result, expected)


def test_regression_loss(triton: grpcclient.InferenceServerClient, native: LossClient) -> None:
    x = RNG.standard_normal((10, 2, 3)).astype(np.float32)
    y = RNG.standard_normal((10, 2, 3)).astype(np.float32)
    assert_same(infer(triton, "mse_loss", {"PREDICTIONS": x, "TARGETS": y}),
                native.evaluate(x, y, loss="mse_loss"))
    result = infer(triton, "huber_loss", {"PREDICTIONS": x, "TARGETS": y}, model_version="1",
                   parameters={"delta": 0.5})
    assert_same(result, native.evaluate(x, y, loss="huber_loss", delta=0.5))


def test_tensor_options_are_inputs(triton: grpcclient.InferenceServerClient,
                                   native: LossClient) -> None:
    cw = np.array([0.5, 2.0, 1.0, 1.0, 3.0], dtype=np.float32)
    assert_same(infer(triton, "cross_entropy",
                      {"PREDICTIONS": LOGITS, "TARGETS": LABELS, "CLASS_WEIGHTS": cw}),
                native.evaluate(LOGITS, LABELS, class_weights=cw))
    x = RNG.standard_normal((7, 3)).astype(np.float32)
    y = (RNG.random((7, 3)) > 0.5).astype(np.float32)
    pw = np.array([1.0, 4.0, 0.25], dtype=np.float32)
    assert_same(infer(triton, "binary_cross_entropy_with_logits",
                      {"POS_WEIGHT": pw, "TARGETS": y, "PREDICTIONS": x}),
                native.evaluate(x, y, loss="binary_cross_entropy_with_logits", pos_weight=pw))


def test_per_class_and_accuracy_outputs(triton: grpcclient.InferenceServerClient,
                                        native: LossClient) -> None:
    """tritonclient asks for the analyses by output name and parameter; the values are
    the native API's."""
    names = ["CLASSES", "CLASS_COUNT", "CLASS_WEIGHTED_MEAN", "CLASS_ACCURACY", "ACCURACY",
             "TOP_K_ACCURACY"]
    result = infer(triton, "cross_entropy", {"PREDICTIONS": LOGITS, "TARGETS": LABELS,
                                             "WEIGHTS": WEIGHTS_},
                   outputs=names, parameters={"top_k": "1,2", "label_smoothing": 0.1})
    expected = native.evaluate(LOGITS, LABELS, weights=WEIGHTS_, per_class=True,
                               accuracy=True, top_k=(1, 2), label_smoothing=0.1)
    pc = expected.per_class
    assert pc is not None and pc.weighted_mean is not None and pc.accuracy is not None
    assert [o.name for o in result.get_response().outputs] == names
    assert result.as_numpy("CLASSES").tolist() == pc.classes.tolist()
    assert result.as_numpy("CLASS_COUNT").tolist() == pc.count.tolist()
    assert result.as_numpy("CLASS_WEIGHTED_MEAN").tobytes() == pc.weighted_mean.tobytes()
    assert result.as_numpy("CLASS_ACCURACY").tobytes() == pc.accuracy.tobytes()
    assert result.as_numpy("ACCURACY").tolist() == [expected.accuracy]
    assert expected.top_k_accuracy is not None
    assert result.as_numpy("TOP_K_ACCURACY").tolist() == list(expected.top_k_accuracy.values())
    with pytest.raises(InferenceServerException) as exc:
        infer(triton, "mse_loss", {"PREDICTIONS": LOGITS, "TARGETS": LOGITS},
              outputs=["ACCURACY"])
    rejected(exc, "INVALID_ARGUMENT", "parameters.accuracy: needs class-index targets")


def test_requested_outputs_only(triton: grpcclient.InferenceServerClient,
                                native: LossClient) -> None:
    result = infer(triton, "cross_entropy",
                   {"PREDICTIONS": LOGITS, "TARGETS": LABELS, "WEIGHTS": WEIGHTS_},
                   outputs=["WEIGHTED_MEAN", "PER_SAMPLE"])
    assert [o.name for o in result.get_response().outputs] == ["WEIGHTED_MEAN", "PER_SAMPLE"]
    expected = native.evaluate(LOGITS, LABELS, weights=WEIGHTS_)
    assert bits(result.as_numpy("WEIGHTED_MEAN")[0]) == bits(expected.weighted_mean)
    assert result.as_numpy("PER_SAMPLE").tobytes() == expected.per_sample.tobytes()
    assert result.as_numpy("SUM") is None


def test_typed_contents(stub: service_pb2_grpc.GRPCInferenceServiceStub,
                        native: LossClient) -> None:
    """InferTensorContents (tritonclient always sends raw), with tritonclient's messages."""
    w64 = WEIGHTS_.astype(np.float64)
    req = service_pb2.ModelInferRequest(model_name="cross_entropy", id="typed")
    x = req.inputs.add(name="PREDICTIONS", datatype="FP32", shape=LOGITS.shape)
    x.contents.fp32_contents.extend(LOGITS.ravel().tolist())
    t = req.inputs.add(name="TARGETS", datatype="INT64", shape=LABELS.shape)
    t.contents.int64_contents.extend(LABELS.tolist())
    w = req.inputs.add(name="WEIGHTS", datatype="FP64", shape=w64.shape)
    w.contents.fp64_contents.extend(w64.tolist())
    req.parameters["label_smoothing"].double_param = 0.05
    resp = stub.ModelInfer(req, timeout=30)
    assert resp.id == "typed"
    out = {o.name: (o, raw) for o, raw in zip(resp.outputs, resp.raw_output_contents,
                                              strict=True)}
    expected = native.evaluate(LOGITS, LABELS, weights=w64, label_smoothing=0.05)
    assert out["PER_SAMPLE"][1] == expected.per_sample.tobytes()
    assert out["WEIGHTED_MEAN"][1] == bits(expected.weighted_mean)
    assert out["COUNT"][1] == np.int64(expected.count).tobytes()

    # INT32 class indices as int_contents; int64_param for an int option.
    req = service_pb2.ModelInferRequest(model_name="nll_loss")
    x = req.inputs.add(name="PREDICTIONS", datatype="FP32", shape=LOGITS.shape)
    x.contents.fp32_contents.extend(LOGITS.ravel().tolist())
    t = req.inputs.add(name="TARGETS", datatype="INT32", shape=LABELS.shape)
    t.contents.int_contents.extend(LABELS.tolist())
    req.parameters["ignore_index"].int64_param = 2
    req.outputs.add(name="SUM")
    resp = stub.ModelInfer(req, timeout=30)
    expected = native.evaluate(LOGITS, LABELS.astype(np.int32), loss="nll_loss", ignore_index=2)
    assert [o.name for o in resp.outputs] == ["SUM"]
    assert resp.raw_output_contents[0] == bits(expected.sum)

    # FP16 has no typed contents.
    req = service_pb2.ModelInferRequest(model_name="mse_loss")
    for name in ("PREDICTIONS", "TARGETS"):
        req.inputs.add(name=name, datatype="FP16", shape=[2]).contents.fp32_contents.extend(
            [1.0, 2.0])
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("PREDICTIONS.contents: FP16 has no typed contents")


# ---- errors -----------------------------------------------------------------------------

def test_unknown_model_and_version(triton: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as exc:
        infer(triton, "no_such_loss", {"PREDICTIONS": LOGITS, "TARGETS": LABELS})
    rejected(exc, "NOT_FOUND", "model_name: unknown model 'no_such_loss'")
    with pytest.raises(InferenceServerException) as exc:
        infer(triton, "cross_entropy", {"PREDICTIONS": LOGITS, "TARGETS": LABELS},
              model_version="7")
    rejected(exc, "NOT_FOUND", "model_version: cross_entropy has no version '7'")


@pytest.mark.parametrize(("inputs", "kwargs", "prefix"), [
    ({"PREDICTIONS": LOGITS, "TARGETS": np.where(LABELS == 0, 7, LABELS)}, {},
     "TARGETS: class index 7 out of range [0, 5) at sample"),
    ({"PREDICTIONS": LOGITS, "TARGETS": LABELS}, {"parameters": {"label_smoothing": 2.0}},
     "parameters.label_smoothing: must be in [0.0, 1.0], got 2.0"),
    ({"PREDICTIONS": LOGITS, "TARGETS": LABELS}, {"parameters": {"ignore_index": "x"}},
     "parameters.ignore_index: expected int, got str"),
    ({"PREDICTIONS": LOGITS, "TARGETS": LABELS}, {"parameters": {"beta": 1.0}},
     "parameters.beta: unknown parameter for model cross_entropy; accepted: ignore_index, "
     "label_smoothing, nan_policy"),
    ({"PREDICTIONS": LOGITS}, {}, "TARGETS: missing input"),
    ({"PREDICTIONS": LOGITS, "TARGETS": LABELS, "LABELS": LABELS}, {},
     "LABELS: unknown input for model cross_entropy"),
    ({"PREDICTIONS": LOGITS.astype(np.int8), "TARGETS": LABELS}, {},
     "PREDICTIONS.datatype: 'INT8' not accepted"),
    ({"PREDICTIONS": LOGITS, "TARGETS": LABELS[:5]}, {},
     "TARGETS: shape (5) does not match predictions (33, 5)"),
    ({"PREDICTIONS": LOGITS, "TARGETS": LABELS, "WEIGHTS": -WEIGHTS_}, {},
     "WEIGHTS: negative value"),
    ({"PREDICTIONS": LOGITS, "TARGETS": LABELS, "CLASS_WEIGHTS": WEIGHTS_[:2]}, {},
     "CLASS_WEIGHTS: shape (2); expected (5,)"),
    ({"PREDICTIONS": LOGITS, "TARGETS": LABELS}, {"outputs": ["WEIGHTED_SUM"]},
     "outputs.WEIGHTED_SUM: produced only when the request has input WEIGHTS"),
    ({"PREDICTIONS": LOGITS, "TARGETS": LABELS}, {"outputs": ["LOSS"]},
     "outputs.LOSS: unknown output"),
])
def test_bad_request_names_the_field(triton: grpcclient.InferenceServerClient,
                                     inputs: dict[str, np.ndarray], kwargs: dict[str, Any],
                                     prefix: str) -> None:
    with pytest.raises(InferenceServerException) as exc:
        infer(triton, "cross_entropy", inputs, **kwargs)
    rejected(exc, "INVALID_ARGUMENT", prefix)


def test_extra_inputs_and_no_targets(triton: grpcclient.InferenceServerClient) -> None:
    """Extra inputs are named in capitals; a loss without targets takes no TARGETS."""
    meta = triton.get_model_metadata("ctc_loss")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("PREDICTIONS", "FP32", [-1, -1, -1]), ("TARGETS", "INT64", [-1, -1]),
        ("WEIGHTS", "FP32", [-1]), ("SAMPLE_IDS", "INT64", [-1]),
        ("INPUT_LENGTHS", "INT64", [-1]),
        ("TARGET_LENGTHS", "INT64", [-1])]
    triplet = triton.get_model_metadata("triplet_margin_loss")
    assert [t.name for t in triplet.inputs] == ["PREDICTIONS", "WEIGHTS", "SAMPLE_IDS",
                                                "POSITIVE", "NEGATIVE"]
    x = RNG.standard_normal((4, 3)).astype(np.float32)
    cases = [
        ("triplet_margin_loss", {"PREDICTIONS": x, "POSITIVE": x, "NEGATIVE": x, "TARGETS": x},
         "TARGETS: unknown input for model triplet_margin_loss"),
        ("triplet_margin_loss", {"PREDICTIONS": x, "POSITIVE": x},
         "NEGATIVE: missing; triplet_margin_loss takes negative"),
        ("gaussian_nll_loss", {"PREDICTIONS": x, "TARGETS": x, "VAR": -x * x - 1},
         "VAR: negative value"),
        ("ctc_loss", {"PREDICTIONS": RNG.standard_normal((2, 5, 3)).astype(np.float32),
                      "TARGETS": np.array([[1, 2], [2, 1]]),
                      "INPUT_LENGTHS": np.array([5, 6]), "TARGET_LENGTHS": np.array([2, 2])},
         "INPUT_LENGTHS: 6 at sample 1 outside [0, 5]"),
        ("binary_cross_entropy", {"PREDICTIONS": x, "TARGETS": np.abs(x) / 10},
         "PREDICTIONS: value"),
    ]
    for model, inputs, prefix in cases:
        with pytest.raises(InferenceServerException) as exc:
            infer(triton, model, inputs)
        rejected(exc, "INVALID_ARGUMENT", prefix)


def test_raw_size_must_match_shape(triton: grpcclient.InferenceServerClient) -> None:
    x = grpcclient.InferInput("PREDICTIONS", list(LOGITS.shape), "FP32")
    x.set_data_from_numpy(LOGITS).set_shape([33, 6])
    t = grpcclient.InferInput("TARGETS", list(LABELS.shape), "INT64").set_data_from_numpy(LABELS)
    with pytest.raises(InferenceServerException) as exc:
        triton.infer("cross_entropy", [x, t])
    rejected(exc, "INVALID_ARGUMENT", "raw_input_contents[0]: 660 bytes; PREDICTIONS of shape "
                                      "[33, 6] and datatype FP32 needs 792")


def test_message_limit(triton: grpcclient.InferenceServerClient) -> None:
    n = MAX_MESSAGE_MB * 1024 * 1024 // 4 // 4 + 1
    x = np.zeros((n, 4), dtype=np.float32)
    with pytest.raises(InferenceServerException) as exc:
        infer(triton, "cross_entropy", {"PREDICTIONS": x, "TARGETS": np.zeros(n, np.int64)})
    assert exc.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


def test_this_process_never_loaded_lossds_copy_of_the_protocol() -> None:
    assert not any(m == "lossd.kserve" or m.startswith(("lossd.kserve.", "lossd_server"))
                   for m in sys.modules)

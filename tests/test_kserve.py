"""The Open Inference Protocol (KServe v2) endpoint (issue 7).

The checks with the real ``tritonclient[grpc]`` live in ``tests/kserve_tritonclient.py`` and
run in a pytest process of their own: tritonclient and the lossd server each register the
protocol's ``inference.*`` messages in protobuf's default descriptor pool, and this process
has the server's copy (conftest imports the server). Here: that run, and the endpoint
beside LossService in-process with lossd's own generated stub.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lossd import LossClient
from lossd.kserve.v2 import grpc_service_pb2 as pb
from lossd.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from lossd_server.app import LossdServer

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).with_name("kserve_tritonclient.py")


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                    reason="tritonclient[grpc] not installed (dev extra)")
def test_tritonclient_in_a_process_of_its_own(example_plugin_dir: Path) -> None:
    # Its `lossd serve` serves the example plugin too, installed on PYTHONPATH.
    path = [str(example_plugin_dir), *filter(None, [os.environ.get("PYTHONPATH")])]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASES), "--noconftest", "-p", "no:cacheprovider",
         "-q", "-rfEs"], env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    report = proc.stdout[-12000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    assert " passed" in report and "skipped" not in report, report


@pytest.fixture
def stub(server: LossdServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def test_served_beside_the_loss_service(stub: pb_grpc.GRPCInferenceServiceStub,
                                        client: LossClient) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
    assert stub.ModelReady(pb.ModelReadyRequest(name="kl_div"), timeout=30).ready
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 4)).astype(np.float64)
    t = rng.integers(0, 4, 9).astype(np.int32)
    req = pb.ModelInferRequest(model_name="cross_entropy")
    req.inputs.add(name="PREDICTIONS", datatype="FP64", shape=x.shape)
    req.inputs.add(name="TARGETS", datatype="INT32", shape=t.shape)
    req.raw_input_contents.extend([x.tobytes(), t.tobytes()])
    req.outputs.add(name="PER_SAMPLE")
    req.outputs.add(name="MEAN")
    resp = stub.ModelInfer(req, timeout=30)
    expected = client.evaluate(x, t)
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [
        ("PER_SAMPLE", "FP32", [9]), ("MEAN", "FP64", [1])]
    assert resp.raw_output_contents[0] == expected.per_sample.tobytes()
    assert resp.raw_output_contents[1] == np.float64(expected.mean).tobytes()


def test_contents_and_raw_are_exclusive(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    req = pb.ModelInferRequest(model_name="mse_loss")
    x = req.inputs.add(name="PREDICTIONS", datatype="FP32", shape=[2])
    x.contents.fp32_contents.extend([1.0, 2.0])
    req.inputs.add(name="TARGETS", datatype="FP32", shape=[2])
    req.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("raw_input_contents: 1 entries for 2 inputs")
    req.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req, timeout=30)
    assert err.value.details().startswith("PREDICTIONS.contents: set together with "
                                          "raw_input_contents")


@pytest.mark.parametrize(("shape", "code", "problem"), [
    ([2**40, 2**40, 0], grpc.StatusCode.INVALID_ARGUMENT, "dimensions too large"),
    ([0, 2**62], grpc.StatusCode.RESOURCE_EXHAUSTED, "has a dimension over"),
])
def test_claimed_shapes_are_checked_before_decoding(
        stub: pb_grpc.GRPCInferenceServiceStub, shape: list[int], code: grpc.StatusCode,
        problem: str) -> None:
    """Found by tests/test_wire_fuzz.py: typed contents under a shape with a zero and huge
    dimensions ended INTERNAL. Shapes are now checked as the native API checks them."""
    req = pb.ModelInferRequest(model_name="mse_loss")
    req.inputs.add(name="PREDICTIONS", datatype="FP32", shape=shape)
    req.inputs.add(name="TARGETS", datatype="FP32", shape=shape)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req, timeout=30)
    assert err.value.code() == code
    assert err.value.details().startswith(f"PREDICTIONS.shape: {shape}"), err.value.details()
    assert problem in err.value.details()


def test_no_elements_under_huge_dimensions_decode_without_a_limit() -> None:
    from lossd_server import kserve

    req = pb.ModelInferRequest(model_name="mse_loss")
    req.inputs.add(name="PREDICTIONS", datatype="FP32", shape=[0, 2**62])
    req.inputs.add(name="TARGETS", datatype="FP32", shape=[0, 2**62])
    batch = kserve.decode_request(req, max_elements=0)  # (validation refuses N = 0 later)
    assert batch.predictions.shape == (0, 2**62) and batch.predictions.numel() == 0


def test_max_elements_applies_to_model_infer() -> None:
    from tests.conftest import start_server

    srv = start_server(max_elements=100)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            req = pb.ModelInferRequest(model_name="mse_loss")
            for name in ("PREDICTIONS", "TARGETS"):
                req.inputs.add(name=name, datatype="FP32", shape=[60])
                req.raw_input_contents.append(np.zeros(60, np.float32).tobytes())
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details().startswith("TARGETS.shape: [60] brings the request to 120")
        assert srv.metrics.registry.get_sample_value(
            "lossd_rejected_requests_total", {"method": "ModelInfer", "reason": "too_large"}) == 1
    finally:
        srv.stop(0)


def test_model_infer_goes_through_admission_and_metrics() -> None:
    """ModelInfer shares the native service's queue and is counted in its metrics."""
    import grpc
    import numpy as np

    from lossd.kserve.v2 import grpc_service_pb2 as kpb
    from lossd.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
    from tests.conftest import metric_value, start_server

    srv = start_server(metrics_port=0, concurrency=1)
    try:
        assert srv.service is not None
        x = np.zeros((3, 4), np.float32)
        t = np.array([0, 1, 2], np.int64)
        req = kpb.ModelInferRequest(model_name="cross_entropy", inputs=[
            kpb.ModelInferRequest.InferInputTensor(name="PREDICTIONS", datatype="FP32",
                                                   shape=[3, 4]),
            kpb.ModelInferRequest.InferInputTensor(name="TARGETS", datatype="INT64", shape=[3])],
            raw_input_contents=[x.tobytes(), t.tobytes()])
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            kpb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
            with srv.service.admission.slot():  # the only slot is taken: the call waits
                future = kpb_grpc.GRPCInferenceServiceStub(ch).ModelInfer.future(req, timeout=10)
                with pytest.raises(grpc.FutureTimeoutError):
                    future.result(timeout=0.5)
            future.result(timeout=10)
        assert srv.metrics_port
        assert metric_value(srv.metrics_port, "lossd_requests_total", method="ModelInfer",
                            loss="cross_entropy", code="OK") == 2
    finally:
        srv.stop(0)


def _infer(stub: pb_grpc.GRPCInferenceServiceStub, model: str, x: np.ndarray, t: np.ndarray,
           outputs: list[str], **parameters: object) -> dict[str, np.ndarray]:
    req = pb.ModelInferRequest(model_name=model)
    for name, a in (("PREDICTIONS", x), ("TARGETS", t)):
        dtype = {"float32": "FP32", "int64": "INT64"}[str(a.dtype)]
        req.inputs.add(name=name, datatype=dtype, shape=a.shape)
        req.raw_input_contents.append(a.tobytes())
    for name in outputs:
        req.outputs.add(name=name)
    for key, value in parameters.items():
        field = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
        setattr(req.parameters[key], field, value)
    resp = stub.ModelInfer(req, timeout=30)
    dt = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8"}
    return {o.name: np.frombuffer(raw, dt[o.datatype]).reshape(tuple(o.shape))
            for o, raw in zip(resp.outputs, resp.raw_output_contents, strict=True)}


def test_per_class_and_accuracy_outputs_by_name(stub: pb_grpc.GRPCInferenceServiceStub,
                                                client: LossClient) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 6)).astype(np.float32)
    t = rng.integers(0, 6, 50)
    native = client.evaluate(x, t, per_class=True, accuracy=True, top_k=(1, 3),
                             diagnostics=True)
    assert native.per_class is not None and native.predicted is not None
    got = _infer(stub, "cross_entropy", x, t, ["CLASSES", "CLASS_COUNT", "CLASS_MEAN",
                                                "CLASS_ACCURACY", "ACCURACY", "CORRECT",
                                                "TOP_K_ACCURACY", "PREDICTED", "CONFIDENCE",
                                                "ECE"], top_k="1,3")
    assert got["CLASSES"].tolist() == native.per_class.classes.tolist()
    assert got["CLASS_COUNT"].tolist() == native.per_class.count.tolist()
    assert got["CLASS_MEAN"].tolist() == native.per_class.mean.tolist()
    assert native.per_class.accuracy is not None
    assert got["CLASS_ACCURACY"].tolist() == native.per_class.accuracy.tolist()
    assert got["ACCURACY"].tolist() == [native.accuracy]
    assert got["CORRECT"].tolist() == [native.aggregates.correct]
    assert native.top_k_accuracy is not None
    assert got["TOP_K_ACCURACY"].tolist() == list(native.top_k_accuracy.values())
    assert got["PREDICTED"].tolist() == native.predicted.tolist()
    assert got["CONFIDENCE"].tobytes() == native.confidence.tobytes()  # type: ignore[union-attr]
    assert got["ECE"].tolist() == [native.ece]
    # Parameters instead of listed outputs: every output the request produces.
    everything = _infer(stub, "cross_entropy", x, t, [], per_class=True, accuracy=True)
    assert {"CLASS_SUM", "CLASS_CORRECT", "ACCURACY", "ACCURACY_COUNT"} <= set(everything)
    assert "PREDICTED" not in everything and "CLASS_WEIGHT_SUM" not in everything


def test_class_outputs_need_class_targets(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(grpc.RpcError) as err:
        _infer(stub, "mse_loss", x, x, ["CLASS_MEAN"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("parameters.per_class: needs class-index targets")
    with pytest.raises(grpc.RpcError) as err:
        _infer(stub, "cross_entropy", x, np.zeros(3, np.int64), ["TOP_K_ACCURACY"])
    assert err.value.details().startswith("outputs.TOP_K_ACCURACY: needs parameter top_k")
    with pytest.raises(grpc.RpcError) as err:
        _infer(stub, "cross_entropy", x, np.zeros(3, np.int64), [], accuracy="yes")
    assert err.value.details().startswith("parameters.accuracy: expected bool")
    with pytest.raises(grpc.RpcError) as err:
        _infer(stub, "cross_entropy", x, np.zeros(3, np.int64), ["CLASS_MEAN"], per_class=False)
    assert err.value.details().startswith("outputs.CLASS_MEAN: needs parameters.per_class, "
                                          "turned off")

"""A careless or hostile caller's own input (issue 19, items 10-13 and 14a): it gets
INVALID_ARGUMENT naming the field, or its own failure, never another caller's; nothing it
names forges a log line or makes one longer than 64 KiB.

Every test goes through a real server; raw protobuf where the client would refuse first.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lossd
from lossd import LossClient
from lossd._cli import main
from lossd.kserve.v2 import grpc_service_pb2 as kpb
from lossd.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server.app import LossdServer
from lossd_server.catalogue import LOSSES, register
from lossd_server.errors import RequestError
from tests.conftest import start_server

Tensor = torch.Tensor
X = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
T = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))


# --- losses a careless plugin author might write ------------------------------------------

def fails_on_large(input: Tensor, target: Tensor) -> Tensor:
    """Raises on one caller's values (the culprit of a coalesced call)."""
    if bool((input > 1000).any()):
        raise ValueError("a value this loss cannot take")
    return (input - target).abs()


def scribbles(input: Tensor, target: Tensor) -> Tensor:
    """Writes into its arguments where torch's version counters do not see it."""
    out = F.cross_entropy(input, target, reduction="none")
    input.data.zero_()
    target.numpy()[...] = 0
    return out


class Overlap:
    """How many calls of a loss ran at once, at most."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.most = 0

    def __call__(self, input: Tensor, target: Tensor) -> Tensor:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.5)
        with self.lock:
            self.now -= 1
        return (input - target).abs()


STATEFUL, PURE = Overlap(), Overlap()
REWRITES: list[Callable[[], None]] = []
"""Run by ``probabilities_check`` once it passed: a caller rewriting shared memory then."""


def probabilities_check(predictions: Tensor, targets: Tensor | None,
                        inputs: Mapping[str, Tensor], options: Mapping[str, Any]) -> None:
    if bool(((predictions < 0) | (predictions > 1)).any()):
        raise RequestError("predictions", "not probabilities")
    for rewrite in REWRITES:
        rewrite()


def probabilities(input: Tensor, target: Tensor) -> Tensor:
    if bool(((input < 0) | (input > 1)).any()):  # as torch's binary_cross_entropy refuses
        raise ValueError("not probabilities")
    return F.binary_cross_entropy(input, target, reduction="none")


@pytest.fixture(scope="module", autouse=True)
def hostile_losses(example_plugin: Path) -> Iterator[None]:
    """This module's plugin losses, beside the example plugin's (charbonnier,
    knowledge_distillation), which some tests send bad input."""
    names = ["testhostile_fails_on_large", "testhostile_scribbles", "testhostile_stateful",
             "testhostile_pure", "testhostile_probabilities"]
    register(names[0], fails_on_large, options={}, targets="values")
    register(names[1], scribbles, options={}, targets="classes")
    register(names[2], STATEFUL, options={}, targets="values")
    register(names[3], PURE, options={}, targets="values", thread_safe=True)
    register(names[4], probabilities, options={}, targets="values", check=probabilities_check)
    yield
    for name in names:
        LOSSES.remove(name)


@pytest.fixture(scope="module")
def stub(server: LossdServer) -> Iterator[pb_grpc.LossServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield pb_grpc.LossServiceStub(ch)


@pytest.fixture(scope="module")
def kserve(server: LossdServer) -> Iterator[kpb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield kpb_grpc.GRPCInferenceServiceStub(ch)


def tensor(a: np.ndarray) -> pb.Tensor:
    dtype = {"float32": pb.FLOAT32, "int64": pb.INT64}[str(a.dtype)]
    return pb.Tensor(dtype=dtype, shape=a.shape, data=np.ascontiguousarray(a).tobytes())


def refused(method: Callable[..., object], request: object) -> tuple[grpc.StatusCode, str]:
    """The status and message with which ``method(request)`` fails."""
    with pytest.raises(grpc.RpcError) as info:
        method(request, timeout=30)
    return info.value.code(), str(info.value.details())


def infer(model: str, inputs: dict[str, np.ndarray], **parameters: object
          ) -> kpb.ModelInferRequest:
    req = kpb.ModelInferRequest(model_name=model)
    for name, a in inputs.items():
        req.inputs.add(name=name, datatype={"float32": "FP32", "int64": "INT64"}[str(a.dtype)],
                       shape=a.shape)
        req.raw_input_contents.append(a.tobytes())
    for key, value in parameters.items():
        kind = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
        setattr(req.parameters[key], kind, value)
    return req


# --- 10: one caller's kernel failure is its own ---------------------------------------------

def _four_callers(client: LossClient) -> list[object]:
    """Four concurrent calls; caller 0 sends what the loss cannot take."""
    barrier = threading.Barrier(4)
    results: list[object] = [None] * 4

    def call(i: int) -> None:
        x = X + i if i else X + 1e4
        barrier.wait()
        try:
            results[i] = client.evaluate(x, T, loss="testhostile_fails_on_large")
        except lossd.LossdError as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_a_coalesced_call_that_fails_fails_only_its_culprit() -> None:
    srv = start_server(batching="on", batch_delay_us=500_000)
    try:
        assert srv.service is not None and srv.service.batcher is not None
        # The batcher counts calls in flight once their message arrived, so four concurrent
        # calls may each find the others not yet there; as if all four were, a leader waits
        # (up to the delay) for the others to join.
        srv.service.batcher._in_flight = lambda: 4
        with LossClient(f"127.0.0.1:{srv.port}", timeout=30) as client:
            for _ in range(3):  # until the four calls shared a device call
                results = _four_callers(client)
                assert isinstance(results[0], lossd.InternalError)
                for i, r in enumerate(results[1:], 1):
                    assert isinstance(r, lossd.LossResult), r
                    np.testing.assert_allclose(r.per_sample, ((X + i) - T).abs().mean(1))
                if srv.service.batcher.split_calls:
                    break
        assert srv.service.batcher.split_calls >= 2  # the culprit and at least one other
    finally:
        srv.stop(0)


# --- 11: a plugin's writes and its threads ---------------------------------------------------

def test_a_plugin_writing_into_its_inputs_reaches_neither_the_caller_nor_the_analyses(
        client: LossClient) -> None:
    x = X.numpy() * 5
    t = x.argmax(1)  # every sample right: accuracy 1
    r = client.evaluate(x, t, loss="testhostile_scribbles", accuracy=True, diagnostics=True)
    assert r.accuracy == 1.0
    assert r.predicted is not None and r.predicted.tolist() == t.tolist()
    np.testing.assert_allclose(r.per_sample, F.cross_entropy(
        torch.from_numpy(x), torch.from_numpy(t), reduction="none").numpy(), rtol=1e-6)
    with client.shared_memory(1 << 16) as shm:
        r = shm.evaluate(x, t, loss="testhostile_scribbles", accuracy=True)
        assert r.accuracy == 1.0
        in_region = np.frombuffer(shm.buffer, np.float32, count=x.size).reshape(x.shape)
        assert np.array_equal(in_region, x)  # the caller's memory, untouched


@pytest.mark.parametrize(("loss", "overlap"), [("stateful", 1), ("pure", 2)])
def test_a_plugin_takes_turns_unless_it_says_it_is_thread_safe(
        client: LossClient, loss: str, overlap: int) -> None:
    counter = {"stateful": STATEFUL, "pure": PURE}[loss]
    threads = [threading.Thread(target=client.evaluate, args=(X, T),
                                kwargs={"loss": f"testhostile_{loss}"}) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert counter.most == overlap


# --- 12: the caller's own bad input is INVALID_ARGUMENT naming the field ---------------------

@pytest.mark.parametrize(("loss", "options", "inputs", "targets"), [
    ("gaussian_nll_loss", {"eps": 1e308}, {"var": np.ones((4, 3), np.float32)}, None),
    ("hinge_embedding_loss", {"margin": 1e308}, {}, None),
    ("multi_margin_loss", {"margin": -1e308}, {}, np.array([0, 1, 2, 0])),
    ("charbonnier", {"eps": 1e308}, {}, None),
])
def test_float_options_beyond_float32(client: LossClient, loss: str, options: dict[str, float],
                                      inputs: dict[str, np.ndarray],
                                      targets: np.ndarray | None) -> None:
    (name,) = options
    with pytest.raises(lossd.InvalidArgument) as info:
        client.evaluate(X, T if targets is None else targets, loss=loss, inputs=inputs,
                        **options)
    assert info.value.message.startswith(f"options.{name}: "), info.value.message
    assert "float32's range" in info.value.message


def test_kserve_options_beyond_their_type(kserve: kpb_grpc.GRPCInferenceServiceStub) -> None:
    x, t = X.numpy(), np.array([0, 1, 2, 0])
    for loss, name, kind, value in (("cross_entropy", "ignore_index", "uint64_param", 2**64 - 1),
                                    ("multi_margin_loss", "margin", "double_param", 1e308)):
        req = infer(loss, {"PREDICTIONS": x, "TARGETS": t})
        setattr(req.parameters[name], kind, value)
        code, details = refused(kserve.ModelInfer, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details.startswith(f"parameters.{name}: {value} is beyond"), details


def test_a_gradient_options_make_undefined(client: LossClient) -> None:
    a = torch.randn(4, 3)
    with pytest.raises(lossd.InvalidArgument) as info:
        client.evaluate(X, loss="triplet_margin_loss", inputs={"positive": a, "negative": -a},
                        p=0.0, gradient="mean")
    assert info.value.message.startswith("gradient: triplet_margin_loss with p=0.0 has no "
                                         "gradient"), info.value.message


def test_rank_one_predictions_with_class_targets(
        stub: pb_grpc.LossServiceStub, kserve: kpb_grpc.GRPCInferenceServiceStub) -> None:
    x, t = np.zeros(4, np.float32), np.array([0, 1, 2, 0])
    req = pb.EvaluateRequest(loss="knowledge_distillation", predictions=tensor(x),
                             targets=tensor(t))
    req.inputs["teacher"].CopyFrom(tensor(x))
    code, details = refused(stub.Evaluate, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("predictions: shape (4) has no class dimension"), details
    code, details = refused(kserve.ModelInfer, infer(
        "knowledge_distillation", {"PREDICTIONS": x, "TARGETS": t, "TEACHER": x}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("PREDICTIONS: shape (4) has no class dimension"), details


def test_more_than_64_dimensions(stub: pb_grpc.LossServiceStub,
                                 kserve: kpb_grpc.GRPCInferenceServiceStub) -> None:
    one = pb.Tensor(dtype=pb.FLOAT32, shape=[1] * 65, data=bytes(4))
    code, details = refused(stub.Evaluate, pb.EvaluateRequest(
        loss="mse_loss", predictions=one, targets=one))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT,
                               "predictions.shape: 65 dimensions; at most 64")
    req = kpb.ModelInferRequest(model_name="mse_loss")
    for name in ("PREDICTIONS", "TARGETS"):
        req.inputs.add(name=name, datatype="FP32", shape=[1] * 65)
        req.raw_input_contents.append(bytes(4))
    code, details = refused(kserve.ModelInfer, req)
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT,
                               "PREDICTIONS.shape: 65 dimensions; at most 64")


def test_shared_memory_rewritten_after_the_check_is_answered_from_what_was_checked(
        client: LossClient) -> None:
    p = np.full((4, 3), 0.25, np.float32)
    t = np.ones((4, 3), np.float32)
    with client.shared_memory(1 << 16) as shm:
        def rewrite() -> None:  # the predictions go first in the region
            np.frombuffer(shm.buffer, np.float32, count=p.size)[...] = 2.0

        REWRITES.append(rewrite)
        try:
            r = shm.evaluate(p, t, loss="testhostile_probabilities")
        finally:
            REWRITES.clear()
    np.testing.assert_allclose(r.per_sample, np.full(4, -np.log(0.25), np.float32), rtol=1e-6)


def test_kserve_top_k_takes_ascii_digits_only(kserve: kpb_grpc.GRPCInferenceServiceStub) -> None:
    x, t = X.numpy(), np.array([0, 1, 2, 0])
    for top_k in ("\u0663", "1_0", "1,\u0662"):
        code, details = refused(kserve.ModelInfer, infer(
            "cross_entropy", {"PREDICTIONS": x, "TARGETS": t}, top_k=top_k))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (top_k, details)
        assert details.startswith("parameters.top_k: ") and "comma-separated" in details
    kserve.ModelInfer(infer("cross_entropy", {"PREDICTIONS": x, "TARGETS": t},
                            top_k=" 1, 3"), timeout=30)


# --- 13: names in messages and logs ----------------------------------------------------------

MAX_LINE = 64 * 1024  # the bound: no log line over 64 KiB
FORGED = "2026-01-01 00:00:00,000 ERROR lossd.serve worker 0 died"
HUGE = "n" * (4 << 20)


def test_a_huge_name_is_invalid_argument_with_a_short_message(
        stub: pb_grpc.LossServiceStub, kserve: kpb_grpc.GRPCInferenceServiceStub) -> None:
    x = tensor(X.numpy())
    for field in ("options", "inputs"):
        req = pb.EvaluateRequest(loss="mse_loss", predictions=x, targets=x)
        if field == "options":
            req.options[HUGE].float_value = 1.0
        else:
            req.inputs[HUGE].CopyFrom(x)
        code, details = refused(stub.Evaluate, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details.startswith(f"{field}.'nnn") and len(details) < 1024, details[:200]
    code, details = refused(stub.Evaluate, pb.EvaluateRequest(
        loss=HUGE, predictions=x, targets=x))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "(4194304 characters)" in details
    assert len(details) < 4096
    code, details = refused(kserve.ModelInfer, infer(
        "mse_loss", {"PREDICTIONS": X.numpy(), "TARGETS": X.numpy()}, **{HUGE: 1}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 4096, details[:200]


def _serve(fmt: str) -> tuple[subprocess.Popen[str], int]:
    env = {k: v for k, v in os.environ.items() if k != "LOSSD_AUTH_TOKENS"}
    env.update(LOSSD_LOG_FORMAT=fmt, LOSSD_DEVICE="cpu", LOSSD_METRICS_PORT="-1",
               LOSSD_PORT="0", LOSSD_PROCESSES="1")
    proc = subprocess.Popen([sys.executable, "-m", "lossd._cli", "serve"], env=env,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "lossd serving" in line:
            found = re.search(r"127\.0\.0\.1:(\d+)", line)
            assert found, line
            return proc, int(found.group(1))
    proc.kill()
    raise AssertionError("lossd serve did not start")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_names_forge_no_log_line_and_none_is_over_64_kib(fmt: str) -> None:
    proc, port = _serve(fmt)
    try:
        x = tensor(X.numpy())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.LossServiceStub(ch)
            for name in (f"eps\n{FORGED}", HUGE):
                req = pb.EvaluateRequest(loss="mse_loss", predictions=x, targets=x)
                req.options[name].float_value = 1.0
                req.inputs[name].CopyFrom(x)
                code, _ = refused(stub.Evaluate, req)
                assert code == grpc.StatusCode.INVALID_ARGUMENT
                code, _ = refused(stub.Evaluate, pb.EvaluateRequest(
                    loss=name, predictions=x, targets=x))
                assert code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    lines = err.splitlines()
    assert sum("rejected" in line for line in lines) >= 4, err[-2000:]
    assert all(len(line) <= MAX_LINE for line in lines), max(map(len, lines))
    if fmt == "text":
        assert not [line for line in lines if line.startswith(FORGED)]
    else:
        for line in lines:
            json.loads(line)  # every line one record


# --- 14a: lossd eval on an empty file ---------------------------------------------------------

def test_eval_of_an_empty_file_exits_2_with_a_message(
        server: LossdServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty, targets = tmp_path / "empty.npy", tmp_path / "targets.npy"
    np.save(empty, np.zeros((0, 10), np.float32))
    np.save(targets, np.zeros(0, np.int64))
    code = main(["eval", "--target", f"127.0.0.1:{server.port}", "--loss", "cross_entropy",
                 str(empty), str(targets)])
    assert code == 2
    err = capsys.readouterr().err
    assert "no samples" in err and "Traceback" not in err


def test_a_traceback_forges_no_record_either() -> None:
    """A loss function's exception text (which may carry the caller's words) is part of its
    traceback: in the text format every traceback line is indented under its record."""
    from lossd_server.logs import TextFormatter

    try:
        raise ValueError(f"bad value\n{FORGED}")
    except ValueError:
        record = logging.LogRecord("lossd.engine", logging.ERROR, __file__, 1,
                                   "loss function raised", None, sys.exc_info())
    lines = TextFormatter().format(record).splitlines()
    assert lines[0].endswith("loss function raised")
    assert all(line.startswith("  ") for line in lines[1:]) and len(lines) > 2

"""Server lifecycle: health, reflection, structured logs, internal errors, the CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import lossd
from lossd import LossClient
from lossd_server.app import LossdServer, resolve_device
from tests.conftest import read_json_logs_until_serving, start_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_of(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def test_health_is_serving_after_start(server: LossdServer) -> None:
    assert health_of(server.port) == SERVING
    assert health_of(server.port, "lossd.v1.LossService") == SERVING


def test_health_goes_not_serving_on_graceful_stop() -> None:
    srv = start_server()
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(
            health_pb2.HealthCheckRequest(service="lossd.v1.LossService"), timeout=30)
        assert next(watch).status == SERVING
        stopper = threading.Thread(target=srv.stop, args=(5,))
        stopper.start()
        assert next(watch).status == NOT_SERVING
        watch.cancel()
        stopper.join(timeout=30)


def test_reflection_lists_the_services(server: LossdServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        [resp] = list(stub.ServerReflectionInfo(iter([req]), timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert {"lossd.v1.LossService", "grpc.health.v1.Health"} <= names


def test_reflection_can_be_switched_off() -> None:
    srv = start_server(reflection=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            req = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as exc:
                list(stub.ServerReflectionInfo(iter([req]), timeout=5))
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        srv.stop(0)


def test_internal_error_is_generic_to_the_caller_and_logged_with_traceback(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = start_server()
    try:
        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("secret internal detail")

        monkeypatch.setattr(srv.engine, "evaluate", broken)
        with caplog.at_level(logging.INFO), LossClient(f"127.0.0.1:{srv.port}") as client:
            with pytest.raises(lossd.InternalError) as exc:
                client.evaluate([[0.0, 1.0]], [1])
            assert "secret" not in exc.value.message
            assert exc.value.code == grpc.StatusCode.INTERNAL
            monkeypatch.undo()
            with pytest.raises(lossd.InvalidArgument):
                client.evaluate([[0.0, 1.0]], [5])
        internal = [r for r in caplog.records if r.exc_info]
        assert internal and "secret internal detail" in str(internal[0].exc_info[1])
        rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
        assert rejected and rejected[0].exc_info is None
    finally:
        srv.stop(0)


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="--device"):
        resolve_device("tpu")


def _lossd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lossd._cli", *args]


def test_cli_help_explains_every_flag() -> None:
    out = subprocess.run(_lossd("serve", "--help"), capture_output=True, text=True,
                         check=True, timeout=60).stdout
    for flag in ("--host", "--port", "--metrics-port", "--metrics-host", "--device",
                 "--max-message-mb", "--log-format", "--log-level", "--grace-seconds"):
        assert flag in out
        env = "LOSSD_" + flag[2:].replace("-", "_").upper()
        assert env in out


def test_serve_logs_json_and_drains_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "LOSSD_PORT": "0", "LOSSD_METRICS_PORT": "-1",
           "LOSSD_LOG_FORMAT": "json", "LOSSD_LOG_LEVEL": "debug", "LOSSD_DEVICE": "cpu"}
    proc = subprocess.Popen(_lossd("serve", "--processes", "1"), env=env,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        lines = read_json_logs_until_serving(proc.stderr)
        start = next(x for x in lines if x["msg"] == "lossd starting")
        assert start["settings"]["port"] == 0  # type: ignore[index]
        assert start["device"] == "cpu"
        port = int(str(lines[-1]["address"]).rsplit(":", 1)[1])
        with LossClient(f"127.0.0.1:{port}") as client:
            client.evaluate([[0.0, 1.0], [1.0, 0.0]], [1, 1])
        proc.send_signal(signal.SIGTERM)
        rest = [json.loads(raw) for raw in proc.stderr]
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    request = next(x for x in rest if x["msg"] == "request")
    assert request["method"] == "Evaluate" and request["loss"] == "cross_entropy"
    assert request["n"] == 2 and request["code"] == "OK" and "duration_s" in request
    assert any(x["msg"] == "draining" for x in rest)
    assert rest[-1]["msg"] == "lossd stopped"


def test_a_taken_port_fails_loudly(server: LossdServer) -> None:
    with pytest.raises(OSError, match="cannot bind"):
        start_server(port=server.port)


def test_allocator_tuning_applies_on_glibc() -> None:
    import platform

    from lossd_server.serve import tune_allocator

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert tune_allocator() is True

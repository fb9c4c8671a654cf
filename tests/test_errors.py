"""The one mapping from a server error to its gRPC status (errors.py), and a stream's
running state (service.StreamState), without a server."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import numpy as np
import pytest

from lossd_server import analysis, errors
from lossd_server.describe import sample_offset
from lossd_server.engine import Evaluation
from lossd_server.errors import (
    INTERNAL_MESSAGE,
    RETRY_AFTER,
    LossFailed,
    MalformedMessage,
    Refused,
    RequestError,
    Status,
    abort,
    retry_after,
    status_of,
)
from lossd_server.reduce import Aggregate
from lossd_server.service import StreamState

_BUSY = Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy", reason="queue_full",
                trailers=retry_after(0.0123))


@pytest.mark.parametrize(("exc", "code", "message", "retry_ms", "log_level"), [
    (RequestError("targets", "missing"), grpc.StatusCode.INVALID_ARGUMENT, "targets: missing",
     0, logging.INFO),
    (RequestError("model_name", "unknown", grpc.StatusCode.NOT_FOUND),
     grpc.StatusCode.NOT_FOUND, "model_name: unknown", 0, logging.INFO),
    (MalformedMessage("field number 0"), grpc.StatusCode.INVALID_ARGUMENT,
     "request: malformed protobuf: field number 0", 0, logging.INFO),
    (_BUSY, grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy", 13, logging.INFO),
    (Refused(grpc.StatusCode.CANCELLED, "caller went away", reason="cancelled"),
     grpc.StatusCode.CANCELLED, "caller went away", 0, logging.INFO),
    (LossFailed("mse_loss", "its function raised ValueError"), grpc.StatusCode.INTERNAL,
     "loss 'mse_loss': its function raised ValueError", 0, None),
    (ValueError("a secret the caller must not see"), grpc.StatusCode.INTERNAL,
     INTERNAL_MESSAGE, 0, logging.ERROR),
    (RuntimeError("CUDA error: device-side assert"), grpc.StatusCode.INTERNAL,
     INTERNAL_MESSAGE, 0, logging.ERROR),
])
def test_status_of_each_error(exc: BaseException, code: grpc.StatusCode, message: str,
                              retry_ms: int, log_level: int | None) -> None:
    status = status_of(exc)
    assert (status.code, status.message, status.retry_after_ms, status.log_level) == (
        code, message, retry_ms, log_level)
    assert status.code_number == code.value[0]


def test_retry_after_is_whole_milliseconds_at_least_one() -> None:
    assert retry_after(0.0123) == ((RETRY_AFTER, "13"),)
    assert retry_after(0.0) == ((RETRY_AFTER, "1"),)
    assert Status(grpc.StatusCode.OK, "").retry_after_ms == 0


class _Aborted(Exception):
    pass


class _Context:
    """The part of a grpc.ServicerContext that abort uses."""

    def __init__(self) -> None:
        self.trailers: Any = None
        self.ended: tuple[grpc.StatusCode, str] | None = None

    def set_trailing_metadata(self, trailers: Any) -> None:
        self.trailers = trailers

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.ended = (code, message)
        raise _Aborted


def test_abort_sets_trailers_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    context = _Context()
    with caplog.at_level(logging.INFO), pytest.raises(_Aborted):
        abort(context, _BUSY)  # type: ignore[arg-type]
    assert context.ended == (grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy")
    assert context.trailers == ((RETRY_AFTER, "13"),)
    assert [r.getMessage() for r in caplog.records] == ["refused: server busy"]


def test_abort_internal_error_keeps_its_text_in_the_log(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    context = _Context()
    try:
        raise KeyError("the secret")
    except KeyError as exc:
        with caplog.at_level(logging.INFO), pytest.raises(_Aborted):
            abort(context, exc)  # type: ignore[arg-type]
    assert context.ended == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    assert context.trailers is None
    (record,) = caplog.records
    assert record.exc_info is not None and "the secret" in caplog.text


def test_loss_failed_is_not_logged_again(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO), pytest.raises(_Aborted):
        abort(_Context(), LossFailed("x", "bad output"))  # type: ignore[arg-type]
    assert not caplog.records


def test_errors_is_a_leaf() -> None:
    """errors.py imports only grpc and the standard library (any module may raise)."""
    import ast
    import sys
    from pathlib import Path

    tree = ast.parse(Path(errors.__file__).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
    assert roots - {"__future__", "grpc"} <= set(sys.stdlib_module_names)


# -- a stream's running state ------------------------------------------------------------

def _evaluation(losses: list[float]) -> Evaluation:
    return Evaluation(losses=np.asarray(losses, np.float32),
                      aggregate=Aggregate.of_batch(np.asarray(losses, np.float64), None))


def test_stream_state_checks_every_message_against_the_first() -> None:
    stream = StreamState()
    top = analysis.Request(top_k=(1, 2))
    stream.check("mse_loss", False, top)
    stream.check("mse_loss", False, analysis.Request(top_k=(1, 2)))
    with pytest.raises(RequestError, match=r"^loss: 'l1_loss' differs .* \(batch 0 of"):
        stream.check("l1_loss", False, top)
    with pytest.raises(RequestError, match=r"^weights: must be given on every batch"):
        stream.check("mse_loss", True, top)
    with pytest.raises(RequestError, match=r"^top_k: differs from the stream's first batch"):
        stream.check("mse_loss", False, analysis.Request(top_k=(1,)))


def test_stream_state_batch_and_running_totals() -> None:
    stream = StreamState()
    batch, running, _, _ = stream.add(_evaluation([1.0, 2.0]), more=True)
    assert (batch.count, running.count, stream.offset, stream.index) == (2, 2, 2, 0)
    batch, running, _, _ = stream.add(_evaluation([3.0]), more=False)
    assert (batch.count, batch.sum, running.count) == (3, 6.0, 3)
    assert (stream.offset, stream.index) == (0, 1)
    batch, running, batch_analysis, _ = stream.add(_evaluation([4.0]), more=False)
    assert (batch.count, running.count, running.sum) == (1, 4, 10.0)
    assert batch_analysis is None


def test_stream_state_numbers_samples_and_names_the_batch() -> None:
    stream = StreamState()
    stream.add(_evaluation([1.0, 2.0, 3.0]), more=True)
    with pytest.raises(RequestError, match=r"^weights: bad \(batch 0 of the stream\)$"), \
            stream.evaluating():
        assert sample_offset.get() == 3
        raise RequestError("weights", "bad")
    assert sample_offset.get() == 0


def _imports(module: Any) -> set[str]:
    import ast
    from pathlib import Path

    tree = ast.parse(Path(module.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module:
            names.add(n.module)
            names.update(f"{n.module}.{a.name}" for a in n.names)
    return names


def test_fronts_side_by_side_over_one_protocol_free_service() -> None:
    """The two fronts don't import each other; the service imports no protocol."""
    from lossd_server import kserve, service, servicer

    assert not any(n.startswith("lossd_server.kserve") for n in _imports(servicer))
    assert not any(n.startswith("lossd_server.servicer") for n in _imports(kserve))
    assert not any(n.startswith(("grpc", "lossd.", "lossd_server.servicer",
                                 "lossd_server.kserve")) for n in _imports(service))

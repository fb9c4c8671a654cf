"""The same cases through LossClient and AsyncLossClient: identical results and errors."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from conftest import start_server

import lossd
from lossd import Aggregates, AsyncLossClient, LossClient, LossInfo, LossResult
from lossd.v1 import loss_service_pb2 as pb
from lossd_server.app import LossdServer


class SyncFront:
    def __init__(self, target: str, **kwargs: Any) -> None:
        self.target, self.kwargs = target, kwargs

    def evaluate(self, *args: Any, **kwargs: Any) -> LossResult:
        with LossClient(self.target, **self.kwargs) as c:
            return c.evaluate(*args, **kwargs)

    def evaluate_stream(self, batches: Iterable[Any], **kwargs: Any) -> list[LossResult]:
        with LossClient(self.target, **self.kwargs) as c:
            return list(c.evaluate_stream(batches, **kwargs))

    def losses(self) -> list[LossInfo]:
        with LossClient(self.target, **self.kwargs) as c:
            return c.losses()

    def evaluate_all(self, batches: Iterable[Any], **kwargs: Any) -> Aggregates:
        with LossClient(self.target, **self.kwargs) as c:
            return c.evaluate_all(batches, **kwargs)

    def wait_for_ready(self, timeout: float | None = None) -> None:
        with LossClient(self.target, **self.kwargs) as c:
            c.wait_for_ready(timeout)


class AsyncFront(SyncFront):
    """Each call runs in its own event loop, with its own AsyncLossClient."""

    def _run(self, body: Callable[[AsyncLossClient], Any]) -> Any:
        async def main() -> Any:
            async with AsyncLossClient(self.target, **self.kwargs) as c:
                return await body(c)
        return asyncio.run(main())

    def evaluate(self, *args: Any, **kwargs: Any) -> LossResult:
        return self._run(lambda c: c.evaluate(*args, **kwargs))  # type: ignore[no-any-return]

    def evaluate_stream(self, batches: Iterable[Any], **kwargs: Any) -> list[LossResult]:
        async def collect(c: AsyncLossClient) -> list[LossResult]:
            return [r async for r in c.evaluate_stream(batches, **kwargs)]
        return self._run(collect)  # type: ignore[no-any-return]

    def losses(self) -> list[LossInfo]:
        return self._run(lambda c: c.losses())  # type: ignore[no-any-return]

    def evaluate_all(self, batches: Iterable[Any], **kwargs: Any) -> Aggregates:
        return self._run(lambda c: c.evaluate_all(batches, **kwargs))  # type: ignore[no-any-return]

    def wait_for_ready(self, timeout: float | None = None) -> None:
        self._run(lambda c: c.wait_for_ready(timeout))


@pytest.fixture(params=["sync", "async"])
def front(request: pytest.FixtureRequest, server: LossdServer) -> Callable[..., SyncFront]:
    cls = SyncFront if request.param == "sync" else AsyncFront
    return lambda **kwargs: cls(f"127.0.0.1:{server.port}", **kwargs)


def data(n: int = 64, c: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, c)).astype(np.float32), rng.integers(0, c, n),
            rng.random(n).astype(np.float32))


def test_evaluate_matches_torch(front: Callable[..., SyncFront]) -> None:
    x, t, w = data()
    r = front().evaluate(x, t, weights=w, label_smoothing=0.1)
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t),
                                            label_smoothing=0.1, reduction="none")
    assert np.array_equal(r.per_sample, ref.numpy())
    assert r.weighted_mean == pytest.approx(float((w * ref.numpy()).sum() / w.sum()), rel=1e-6)


def test_split_batch_equals_one_message(front: Callable[..., SyncFront],
                                        client: LossClient) -> None:
    x, t, w = data(4000, 50)
    split = front(max_message_bytes=200_000).evaluate(x, t, weights=w)
    whole = client.evaluate(x, t, weights=w)
    assert np.array_equal(split.per_sample, whole.per_sample)
    assert split.aggregates == whole.aggregates


def test_stream_results_per_batch_with_running_aggregates(front: Callable[..., SyncFront],
                                                          client: LossClient) -> None:
    batches = [data(n, 50, seed) for seed, n in enumerate((2000, 3, 1500))]
    results = front(max_message_bytes=200_000).evaluate_stream(batches)
    assert len(results) == 3
    for (x, t, w), r in zip(batches, results, strict=True):
        assert r.aggregates == client.evaluate(x, t, weights=w).aggregates
    whole = client.evaluate(*(np.concatenate([b[i] for b in batches]) for i in range(2)),
                            weights=np.concatenate([b[2] for b in batches]))
    assert results[-1].running == whole.aggregates


def test_errors_are_the_same_typed_exceptions(front: Callable[..., SyncFront]) -> None:
    x, t, _ = data()
    t[5] = 70
    with pytest.raises(lossd.InvalidArgument) as exc:
        front().evaluate(x, t)
    assert exc.value.message.startswith("targets: class index 70 out of range [0, 7) at "
                                        "sample 5")
    with pytest.raises(lossd.InvalidArgument) as exc:
        front().evaluate_stream([(x, t)])
    assert exc.value.message.startswith("targets: class index 70")


def test_unreachable_server_is_unavailable(front: Callable[..., SyncFront],
                                           server: LossdServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = front(retry_attempts=1)
    f.target = f"127.0.0.1:{port}"
    with pytest.raises(lossd.Unavailable):
        f.evaluate(*data()[:2])


def test_catalogue_and_gradient(front: Callable[..., SyncFront], client: LossClient) -> None:
    assert [i.name for i in front().losses()] == [i.name for i in client.losses()]
    x, t, _ = data(8, 3)
    r = front().evaluate(x, t, gradient="mean")
    assert r.gradient is not None
    assert np.array_equal(r.gradient, client.evaluate(x, t, gradient="mean").gradient)


def test_extra_inputs_and_no_targets(front: Callable[..., SyncFront], client: LossClient) -> None:
    """inputs= on both clients, split along N with the predictions, and streamed."""
    rng = np.random.default_rng(4)
    anchor, positive, negative = (rng.standard_normal((3000, 16)).astype(np.float32)
                                  for _ in range(3))
    inputs = {"positive": positive, "negative": negative}
    whole = client.evaluate(anchor, loss="triplet_margin_loss", inputs=inputs)
    split = front(max_message_bytes=200_000).evaluate(anchor, loss="triplet_margin_loss",
                                                      inputs=inputs)
    assert np.array_equal(split.per_sample, whole.per_sample)
    assert split.aggregates == whole.aggregates
    batches = [(anchor[i:i + 1000], None, None, {k: v[i:i + 1000] for k, v in inputs.items()})
               for i in range(0, 3000, 1000)]
    results = front().evaluate_stream(batches, loss="triplet_margin_loss")
    assert results[-1].running == whole.aggregates


class ShardMissing(KeyError):
    """The caller's own error, raised by its batch generator."""


@pytest.mark.parametrize("sent", [0, 1, 3])
def test_caller_generator_error_reaches_the_caller_unchanged(
        front: Callable[..., SyncFront], server: LossdServer,
        caplog: pytest.LogCaptureFixture, sent: int) -> None:
    """Issue 22: not ``UNKNOWN: Exception iterating requests!``, but the caller's exception
    itself (its type, message and chain), the stream cancelled, nothing left running on the
    server, and nothing in gRPC's log; whether the generator fails at once or after
    ``sent`` batches."""
    x, t, _ = data()

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for _ in range(sent):
            yield x, t
        try:
            {}["shard-7"]
        except KeyError as root:
            raise ShardMissing("shard-7 not in the index") from root

    with pytest.raises(ShardMissing) as info:
        front(retry_attempts=1).evaluate_stream(batches())
    exc = info.value
    assert type(exc) is ShardMissing and exc.args == ("shard-7 not in the index",)
    assert isinstance(exc.__cause__, KeyError) and exc.__cause__.args == ("shard-7",)
    assert "batches" in [frame.name for frame in traceback.extract_tb(exc.__traceback__)]
    assert not [r for r in caplog.records if "iterating requests" in r.getMessage()]
    assert server.gate.wait_idle(10)
    r = front().evaluate_stream([(x, t)])
    assert r[0].count == 64


@pytest.mark.parametrize(("item", "what"), [
    (np.zeros((4, 3), np.float32), "batch 1 is a ndarray of shape (4, 3)"),
    (torch.zeros(4, 3), "batch 1 is a Tensor of shape (4, 3)"),
    ((np.zeros((4, 3), np.float32),), "batch 1 is a tuple of 1 items"),
    ({"predictions": np.zeros(4)}, "batch 1 is a dict"),
])
def test_stream_item_that_is_not_a_batch_is_a_type_error(front: Callable[..., SyncFront],
                                                         server: LossdServer, item: Any,
                                                         what: str) -> None:
    x, t, _ = data()
    with pytest.raises(TypeError) as info:
        front(retry_attempts=1).evaluate_stream([(x, t), item])
    assert str(info.value).startswith(
        f"evaluate_stream: {what}; each batch is a (predictions, targets), (predictions, "
        "targets, weights) or (predictions, targets, weights, inputs) tuple")
    assert server.gate.wait_idle(10)


@pytest.fixture(scope="module")
def metrics_server() -> Iterator[LossdServer]:
    srv = start_server(metrics_port=0)
    yield srv
    srv.stop(0)


@pytest.mark.parametrize("form", ["http://127.0.0.1:{port}", "grpc://127.0.0.1:{port}/",
                                  "HTTP://localhost:{port}", "dns:///127.0.0.1:{port}"])
def test_url_schemes_are_accepted(front: Callable[..., SyncFront], server: LossdServer,
                                  form: str) -> None:
    """Issue 22: ``http://host:port`` gave "Misformatted domain name"."""
    f = front(retry_attempts=1)
    f.target = form.format(port=server.port)
    assert f.evaluate(*data()[:2]).count == 64


def test_unknown_scheme_and_contradictions_are_value_errors(
        front: Callable[..., SyncFront]) -> None:
    f = front()
    f.target = "ftp://127.0.0.1:50051"
    with pytest.raises(ValueError, match="unknown scheme ftp://; give host:port"):
        f.evaluate(*data()[:2])
    f = front(tls=True)
    f.target = "http://127.0.0.1:50051"
    with pytest.raises(ValueError, match="means plaintext, but tls=True"):
        f.evaluate(*data()[:2])


def test_the_metrics_port_is_named(front: Callable[..., SyncFront],
                                   metrics_server: LossdServer) -> None:
    """Issue 22: an HTTP/1 server (lossd's metrics port) gave an HTTP/2 framing error."""
    f = front(retry_attempts=1, timeout=10)
    f.target = f"127.0.0.1:{metrics_server.metrics_port}"
    with pytest.raises(lossd.Unavailable) as info:
        f.evaluate(*data()[:2])
    assert info.value.message.startswith(
        "this looks like an HTTP server, not lossd's gRPC port: e.g. lossd's metrics port "
        "(9464 by default); the gRPC port is 50051"), info.value.message
    assert "gRPC said: " in info.value.message


def test_an_address_without_port_dials_50051(front: Callable[..., SyncFront]) -> None:
    """Issue 22: ``LossClient("127.0.0.1")`` dialled 443."""
    try:
        srv = start_server(port=50051)
    except (OSError, RuntimeError):
        pytest.skip("port 50051 is taken on this machine")
    try:
        f = front(retry_attempts=1, timeout=10)
        f.target = "127.0.0.1"
        assert f.evaluate(*data()[:2]).count == 64
    finally:
        srv.stop(0)


def test_evaluate_all_is_the_streams_final_running_result(front: Callable[..., SyncFront],
                                                         client: LossClient) -> None:
    """Issue 21: ``evaluate_all`` returns the aggregates and analyses over every batch,
    the caller iterating nothing; class names carried into them; no batches: ValueError."""
    batches = [data(n, 7, seed)[:2] for seed, n in enumerate((50, 3, 40))]
    names = [f"c{i}" for i in range(7)]
    kwargs: dict[str, Any] = {"per_class": True, "accuracy": True, "hardest": 5,
                              "quantiles": True, "label_smoothing": 0.1}
    final = front().evaluate_all(iter(batches), class_names=names, **kwargs)
    streamed = list(client.evaluate_stream(batches, **kwargs))
    assert streamed[-1].running is not None
    assert final.to_dict() == streamed[-1].running.with_class_names(names).to_dict()
    assert final.count == 93 and final.per_class is not None
    assert set(final.per_class.to_dict()) <= set(names)
    assert final.hardest is not None and len(final.hardest) == 5
    assert all(h.target is not None and h.target_name == names[h.target] for h in final.hardest)
    with pytest.raises(ValueError, match="evaluate_all: the batches were empty"):
        front().evaluate_all([])


def test_wait_for_ready_against_a_serving_server(front: Callable[..., SyncFront]) -> None:
    front().wait_for_ready(10)


def test_wait_for_ready_on_a_closed_port_raises_deadline_exceeded(
        front: Callable[..., SyncFront]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = front()
    f.target = f"127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(lossd.DeadlineExceeded) as exc:
        f.wait_for_ready(0.5)
    assert 0.4 < time.monotonic() - start < 5
    assert exc.value.message.startswith(f"127.0.0.1:{port} not ready within 0.5 s")


def test_wait_for_ready_waits_for_serving(request: pytest.FixtureRequest) -> None:
    """A server warming up (health NOT_SERVING) is waited for; one that stays so is named."""
    srv = start_server()
    request.addfinalizer(lambda: srv.stop(0))
    srv.set_serving(False)
    for cls in (SyncFront, AsyncFront):
        with pytest.raises(lossd.DeadlineExceeded, match="NOT_SERVING"):
            cls(f"127.0.0.1:{srv.port}").wait_for_ready(0.3)
        timer = threading.Timer(0.3, srv.set_serving, (True,))
        timer.start()
        start = time.monotonic()
        cls(f"127.0.0.1:{srv.port}").wait_for_ready(10)
        assert time.monotonic() - start >= 0.25
        timer.join()
        srv.set_serving(False)


def listlosses_only_server(request: pytest.FixtureRequest,
                           on_call: Callable[[str], object]) -> str:
    """The address of a bare grpc server (stopped after the test) serving only ListLosses,
    empty, calling ``on_call`` with each caller's peer (``ipv4:host:port``)."""
    def list_losses(req: pb.ListLossesRequest, ctx: grpc.ServicerContext
                    ) -> pb.ListLossesResponse:
        on_call(ctx.peer())
        return pb.ListLossesResponse()

    bare = grpc.server(futures.ThreadPoolExecutor(2))
    bare.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "lossd.v1.LossService", {"ListLosses": grpc.unary_unary_rpc_method_handler(
            list_losses, request_deserializer=pb.ListLossesRequest.FromString,
            response_serializer=pb.ListLossesResponse.SerializeToString)})])
    port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    request.addfinalizer(lambda: bare.stop(0))
    return f"127.0.0.1:{port}"


def test_wait_for_ready_without_a_health_service_asks_listlosses(
        front: Callable[..., SyncFront], request: pytest.FixtureRequest) -> None:
    """A server without the health service (behind a proxy that does not route it) is
    ready once it answers ListLosses."""
    asked = threading.Event()
    f = front()
    f.target = listlosses_only_server(request, lambda peer: asked.set())
    f.wait_for_ready(10)
    assert asked.is_set()


def test_each_client_has_a_connection_of_its_own(request: pytest.FixtureRequest) -> None:
    """Clients of one process to one address do not share a connection (grpc would, for
    channels with the same options): a threaded job's clients spread over the serving
    processes of ``lossd serve --processes N``, which the kernel assigns per connection."""
    peers: list[str] = []
    target = listlosses_only_server(request, peers.append)

    with LossClient(target) as a, LossClient(target) as b:
        for client in (a, b, a, b):
            client.losses()
    assert peers[0] != peers[1] and peers[2:] == peers[:2]  # one connection each, kept

    async def two_async_clients() -> None:
        async with AsyncLossClient(target) as a, AsyncLossClient(target) as b:
            for client in (a, b, a, b):
                await client.losses()
    peers.clear()
    asyncio.run(two_async_clients())
    assert peers[0] != peers[1] and peers[2:] == peers[:2]

"""Where lossd's time goes: each stage of one Evaluate call, timed in-process.

The stages are lossd's own functions, called in the order a call runs them, once per
repetition (so every repetition allocates afresh, as a real call does):

client:  ``build`` (``Requests.build``: tensors -> request),
         ``serialize`` (``SerializeToString``, what grpcio does before sending; nothing
         when build already returns bytes);
server:  ``parse`` (the server's request deserializer: ``wire.ParsedRequest`` where it
         exists, else ``EvaluateRequest.FromString``), ``bytesize``
         (``request.ByteSize()``, which the servicer calls for its received-bytes metric),
         ``decode`` (``servicer.decode_request``: message -> tensors), ``validate``
         (``validate.loss/options/batch``), ``to_device`` (device copy and upcast),
         ``loss`` (the catalogue's loss function), ``per_sample`` (reduction to (N,)),
         ``to_host``, ``aggregate`` (``Aggregate.of_batch``: the exact sums), ``encode``
         (``servicer.encode_response`` + ``SerializeToString``);
client:  ``result`` (``EvaluateResponse.FromString`` + ``LossResult.from_proto``).

Also ``engine``: ``Engine.evaluate`` as one call (validate .. aggregate); ``servicer``:
``LossServicer.Evaluate`` as one call (bytesize, decode, engine, encode and the metrics
bookkeeping, without grpcio); and ``floor_client``: the transport floor's one-copy request
encoder. Transport itself is not here: it is the transport floor's end-to-end time.
Run alone::

    python -m bench.stages --workloads large,small
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.workloads import (
    WORKLOADS,
    Data,
    Workload,
    arrays_for_wire,
    make_data,
    request_bytes,
    wire_bytes,
)

CLIENT = ("build", "serialize", "result")
SERVER = ("parse", "bytesize", "decode", "validate", "to_device", "loss", "per_sample", "to_host",
          "aggregate", "encode")


def breakdown(w: Workload, data: Data, device: str = "cpu", reps: int = 5) -> dict[str, Any]:
    """Median milliseconds per stage over ``reps`` repetitions (first one discarded)."""
    import torch

    from lossd import LossResult
    from lossd.requests import DEFAULT_MAX_MESSAGE_BYTES, Requests
    from lossd.v1 import loss_service_pb2 as pb
    from lossd_server import servicer, validate
    from lossd_server import wire as server_wire
    from lossd_server.engine import Engine, compute_dtype
    from lossd_server.reduce import Aggregate, per_sample

    # The server's own request deserializer (a zero-copy parser where it has one).
    parse = getattr(server_wire, "ParsedRequest", pb.EvaluateRequest.FromString)
    dev = torch.device(device)
    engine = Engine(dev)
    try:  # the whole handler, metrics included, as the server builds it
        from lossd_server.metrics import Metrics
        from lossd_server.service import EvaluationService

        handler: Any = servicer.LossServicer(
            EvaluationService(engine, metrics=Metrics(process=False)), max_message_bytes=2**31)
    except Exception:  # an older or newer servicer signature: skip that stage
        handler = None
    builder = Requests(DEFAULT_MAX_MESSAGE_BYTES)
    pred, targ, weights = data.torch()
    wire_arrays = arrays_for_wire(pred, targ, weights)
    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    def rep() -> None:
        reqs = timed("build", lambda: builder.build(w.loss, pred, targ, weights, None,
                                                    builder.options(w.options)))
        wire = timed("serialize", lambda: wire_bytes(reqs[0]))
        req = timed("parse", lambda: parse(wire))
        timed("bytesize", req.ByteSize)
        batch = timed("decode", lambda: servicer.decode_request(req))

        def _validate() -> Any:
            spec = validate.loss(batch.loss)
            opts = validate.options(spec, batch.options)
            ci = validate.batch(spec, batch.predictions, batch.targets, batch.weights, opts)
            opts.pop("nan_policy")
            return spec, opts, ci

        spec, opts, class_index = timed("validate", _validate)

        def _to_device() -> Any:
            dtype = compute_dtype(batch.predictions.dtype)
            p = batch.predictions.to(dev).to(dtype)
            t = batch.targets.to(dev)
            return p, (t.long() if class_index else t.to(dtype))

        p, t = timed("to_device", _to_device)
        values = timed("loss", lambda: spec.fn(p, t, **opts))
        valid = (t != opts["ignore_index"]) if class_index else None
        losses, all_ignored = timed("per_sample", lambda: per_sample(
            values, valid, sum_class_dim=spec.sum_class_dim))
        host = timed("to_host", losses.cpu)
        wts = None if batch.weights is None else batch.weights.to(torch.float64).numpy()
        ign = None if all_ignored is None else all_ignored.cpu().numpy()
        timed("aggregate", lambda: Aggregate.of_batch(host.numpy(), wts, ignored=ign))
        ev = timed("engine", lambda: engine.evaluate(batch))
        out = timed("encode", lambda: servicer.encode_response(ev).SerializeToString())
        if handler is not None:
            timed("servicer", lambda: handler.Evaluate(req, None))
        timed("result", lambda: LossResult.from_proto(pb.EvaluateResponse.FromString(out)))
        timed("floor_client", lambda: request_bytes(w, *wire_arrays))

    for _ in range(reps + 1):
        rep()

    ms = {k: round(statistics.median(v[1:]) * 1e3, 3) for k, v in times.items()}
    ms["client_total"] = round(sum(ms[k] for k in CLIENT), 3)
    ms["server_total"] = round(sum(ms.get(k, 0.0) for k in SERVER), 3)
    return ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="per-stage time of lossd's Evaluate path")
    p.add_argument("--workloads", default="small,large,xl")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    for name in a.workloads.split(","):
        w = WORKLOADS[name]
        ms = breakdown(w, make_data(w), a.device, a.reps)
        print(name, " ".join(f"{k}={v:.2f}" for k, v in ms.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bounded soak: every way in, hostile callers included, against a real ``lossd serve``.

    .venv/bin/python -m bench.soak                          # 32 clients, 60 s
    .venv/bin/python -m bench.soak --clients 8 --seconds 10 --out /tmp/soak
    .venv/bin/python -m bench.soak --processes 2 --name soak_p2   # two serving processes
    .venv/bin/python -m bench.soak --no-hostile             # honest callers only

Not part of the test suite. It starts ``lossd serve`` in its own process (CPU unless
``--device``), then for ``--seconds`` seconds runs, spread over ``--procs`` client
processes:

* ``--clients`` client threads, each with its own ``LossClient`` (the first
  ``--shm-clients`` of them also hold a shared-memory region for the whole run), each
  calling in a loop, at random:

  - ``evaluate``: a valid unary call (one of several losses, N up to 512);
  - ``stream``: a valid ``evaluate_stream`` of three batches;
  - ``split``: one batch larger than the client's message limit, split along N over a
    stream and reassembled;
  - ``shm``: a valid evaluation through the client's shared memory (sealed memfd,
    evaluated on its session's stream); ``shm_invalid``: an invalid one;
  - ``kserve``: a valid ModelInfer (Open Inference Protocol); ``kserve_invalid``: an
    unknown model, a wrong shape or a wrong datatype;
  - ``cancel``: a stream cancelled after its first answer;
  - ``losses``: ListLosses; ``invalid``: an invalid ``evaluate`` (class index out of
    range, shapes that do not match, an unknown loss, NaN with ``nan_policy='raise'``);

  every valid answer checked against torch.nn.functional, every invalid call expected
  INVALID_ARGUMENT (NOT_FOUND for an unknown KServe model);
* ``--long-streams`` streams open for the whole run, a batch every 100 ms, each answer
  and the stream's running aggregates checked;
* callers that die mid-call: every ``--kill-every`` seconds a process that opens shared
  memory and a stream and evaluates in a loop is SIGKILLed at a random moment;
* hostile callers (issue 19; on unless ``--no-hostile``), in a process of their own, from
  ``--hostile-after`` seconds (default: a third of the run) to the end: 80 unary calls
  that never send their message and ``--max-streams`` streams that send nothing (per
  serving process, 1.5 times that over several), one connection each, renewed as the
  server ends them; and one thread each, in a loop, sending as raw protobuf: a request
  with a 2 MiB tag, 8 MiB of empty ``inputs`` or ``options`` map entries, a ``ctc_loss``
  request past the working-memory bound, one sample with C = 8M classes asking for
  ``per_class`` and ``top_k`` 1..16, a 0.4 s ``ctc_loss`` abandoned at a 0.05 s deadline,
  and an option name with a newline. Each hostile call's outcome is counted by code
  against the codes expected of it (``HOSTILE_EXPECTED``: an expected refusal is not a
  lost call, nor is a large message evicted by ``--max-receiving`` while the unsent calls
  churn; the tag and huge-C answers are checked).

A RESOURCE_EXHAUSTED answer to a unary call (the server's admission queue is full), or
to a stream at its door (``--max-streams``), is counted as shed and sent again after the
server's ``retry-after-ms`` hint, up to 20 times. A batch of an admitted stream is never
refused: one refused mid-way is a lost call.

Reported (``soak.json`` and ``soak.md``, or ``--name``, under ``--out``, default
``bench/results/<machine>/``): calls by kind and final outcome, errors by code, lost calls
(honest calls sent but never answered, answered with wrong numbers or an unexpected code:
must be 0), server crashes (must be 0), latency percentiles, and with hostile callers the
honest calls' rate and p50 / p95 / p99 per kind before and during them with the ratio, the
server's RSS in both phases and the hostile calls by outcome; the server's RSS and open
descriptors sampled every second with their trend after a warm-up (the median of the last
quarter against the first, of the hostile phase when there is one; targets: RSS < 5 %,
descriptors back to their idle level once the callers are gone), and the shared-memory
mappings and descriptors left in the server at the end (must be 0).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.peers import free_port

ROOT = Path(__file__).resolve().parent.parent
CALL_TIMEOUT = 30.0
MAX_SHED_RETRIES = 20
MIX = (("evaluate", 0.38), ("stream", 0.08), ("split", 0.04), ("shm", 0.14),
       ("shm_invalid", 0.02), ("kserve", 0.08), ("kserve_invalid", 0.04), ("cancel", 0.04),
       ("losses", 0.03), ("invalid", 0.15))
NO_SHM = {"shm": "evaluate", "shm_invalid": "invalid"}  # for clients without a region
SPLIT_MESSAGE_BYTES = 256 << 10
LONG_STREAM_PERIOD = 0.1


# ---- workloads -----------------------------------------------------------------------


def _cases(seed: int) -> list[dict[str, Any]]:
    """Valid calls with their torch reference values (computed here, once per process)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    out = []
    for i in range(24):
        n = int(rng.choice([8, 64, 256, 512]))
        kind = i % 4
        if kind == 0:
            c = int(rng.choice([10, 100]))
            x = rng.standard_normal((n, c)).astype(np.float32)
            t = rng.integers(0, c, n)
            want = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), reduction="none",
                                   label_smoothing=0.1)
            out.append({"loss": "cross_entropy", "x": x, "t": t,
                        "opts": {"label_smoothing": 0.1}, "want": want.numpy()})
        elif kind == 1:
            x = rng.standard_normal((n, 16)).astype(np.float32)
            t = rng.standard_normal((n, 16)).astype(np.float32)
            want = F.mse_loss(torch.from_numpy(x), torch.from_numpy(t),
                              reduction="none").mean(dim=1)
            out.append({"loss": "mse_loss", "x": x, "t": t, "opts": {}, "want": want.numpy()})
        elif kind == 2:
            x = rng.standard_normal((n, 8)).astype(np.float32)
            t = (rng.random((n, 8)) > 0.5).astype(np.float32)
            want = F.binary_cross_entropy_with_logits(
                torch.from_numpy(x), torch.from_numpy(t), reduction="none").mean(dim=1)
            out.append({"loss": "binary_cross_entropy_with_logits", "x": x, "t": t,
                        "opts": {}, "want": want.numpy()})
        else:
            x = rng.standard_normal(n).astype(np.float32)
            t = rng.standard_normal(n).astype(np.float32)
            want = F.huber_loss(torch.from_numpy(x), torch.from_numpy(t), reduction="none",
                                delta=0.5)
            out.append({"loss": "huber_loss", "x": x, "t": t, "opts": {"delta": 0.5},
                        "want": want.numpy()})
    return out


def _split_case(seed: int) -> dict[str, Any]:
    """A (4096, 64) cross-entropy batch: 1 MiB, split over a stream at 256 KiB."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4096, 64)).astype(np.float32)
    t = rng.integers(0, 64, 4096)
    want = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), reduction="none")
    return {"loss": "cross_entropy", "x": x, "t": t, "opts": {}, "want": want.numpy()}


def _invalid(rng: np.random.Generator) -> dict[str, Any]:
    which = int(rng.integers(0, 4))
    x = rng.standard_normal((16, 5)).astype(np.float32)
    if which == 0:
        return {"loss": "cross_entropy", "x": x, "t": np.full(16, 7), "opts": {}}
    if which == 1:
        return {"loss": "mse_loss", "x": x, "t": np.zeros((16, 4), np.float32), "opts": {}}
    if which == 2:
        return {"loss": "no_such_loss", "x": x, "t": np.zeros(16, np.int64), "opts": {}}
    x[3, 2] = np.nan
    return {"loss": "cross_entropy", "x": x, "t": np.zeros(16, np.int64),
            "opts": {"nan_policy": "raise"}}


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=1e-5, atol=1e-6))


# ---- KServe --------------------------------------------------------------------------


def _model_infer(stub: Any, case: dict[str, Any], *, broken: int | None = None) -> Any:
    from lossd.kserve.v2 import grpc_service_pb2 as kpb

    x, t = case["x"], case["t"]
    req = kpb.ModelInferRequest(model_name=case["loss"])
    tdtype = "INT64" if t.dtype.kind == "i" else "FP32"
    req.inputs.add(name="PREDICTIONS", datatype="FP32", shape=x.shape)
    req.inputs.add(name="TARGETS", datatype=tdtype, shape=t.shape)
    req.raw_input_contents.append(np.ascontiguousarray(x, "<f4").tobytes())
    req.raw_input_contents.append(np.ascontiguousarray(
        t, "<i8" if tdtype == "INT64" else "<f4").tobytes())
    for name, value in case["opts"].items():
        p = req.parameters[name]
        if isinstance(value, float):
            p.double_param = value
        elif isinstance(value, str):
            p.string_param = value
    if broken == 0:
        req.model_name = "no_such_model"
    elif broken == 1:
        del req.inputs[0].shape[:]
        req.inputs[0].shape.extend([x.shape[0] + 1, *x.shape[1:]])
    elif broken == 2:
        req.inputs[0].datatype = "UINT8"
    return stub.ModelInfer(req, timeout=CALL_TIMEOUT)


def _request(case: dict[str, Any]) -> Any:
    """The case as a plain EvaluateRequest message (float32 values, int64 or float32
    targets; float options)."""
    from lossd.v1 import loss_service_pb2 as pb

    x, t = case["x"], case["t"]
    index = t.dtype.kind == "i"
    req = pb.EvaluateRequest(
        loss=case["loss"],
        predictions=pb.Tensor(dtype=pb.FLOAT32, shape=x.shape,
                              data=np.ascontiguousarray(x, "<f4").tobytes()),
        targets=pb.Tensor(dtype=pb.INT64 if index else pb.FLOAT32, shape=t.shape,
                          data=np.ascontiguousarray(t, "<i8" if index else "<f4").tobytes()))
    for name, value in case["opts"].items():
        req.options[name].float_value = value
    return req


def _per_sample_output(resp: Any) -> np.ndarray:
    i = [o.name for o in resp.outputs].index("PER_SAMPLE")
    return np.frombuffer(resp.raw_output_contents[i], "<f4")


# ---- one client ----------------------------------------------------------------------


class _Stats:
    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.lat_ok: list[float] = []
        self.lat_e2e: list[float] = []
        self.shed = 0
        self.shed_final = 0
        self.lost: list[dict[str, Any]] = []
        # (wall-clock start, kind, verdict, latency of the answered attempt, latency with
        # shed retries): the phases before and during the hostile callers are cut from it.
        self.timeline: list[tuple[float, str, str, float, float]] = []

    def record(self, kind: str, outcome: str, detail: str, expected: str, start: float,
               t0: float, *, timed: bool = True) -> None:
        end = time.perf_counter()
        started = time.time() - (end - start)
        self.calls[kind] += 1
        self.outcomes[f"{kind}:{outcome}"] += 1
        if timed:
            verdict = "ok" if outcome == expected else (
                "refused" if outcome == "RESOURCE_EXHAUSTED" else "lost")
            self.timeline.append((started, kind, verdict, end - t0, end - start))
        if outcome == expected:
            if timed:
                self.lat_ok.append(end - t0)
                self.lat_e2e.append(end - start)
        elif outcome != "RESOURCE_EXHAUSTED":
            self.lost.append({"kind": kind, "outcome": outcome, "detail": detail,
                              "started": started})

    def as_dict(self) -> dict[str, Any]:
        return {"calls": dict(self.calls), "outcomes": dict(self.outcomes),
                "lat_ok": self.lat_ok, "lat_e2e": self.lat_e2e, "shed": self.shed,
                "shed_final": self.shed_final, "lost": self.lost, "timeline": self.timeline}


def _shed(exc: Any) -> bool:
    """A refusal the caller should retry: the unary queue is full, or a stream's door."""
    return exc.retry_after is not None and ("busy" in exc.message)


def _client(address: str, seed: int, stop_at: float, cases: list[dict[str, Any]],
            split: dict[str, Any], use_shm: bool, out: list[dict[str, Any]]) -> None:
    import grpc

    import lossd
    from lossd import LossClient
    from lossd.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
    from lossd.v1 import loss_service_pb2_grpc as pb_grpc

    rng = np.random.default_rng(seed)
    kinds, weights = zip(*MIX, strict=True)
    stats = _Stats()
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(LossClient(address, timeout=CALL_TIMEOUT,
                                                stream_timeout=CALL_TIMEOUT))
        splitter = stack.enter_context(LossClient(address, timeout=CALL_TIMEOUT,
                                                  stream_timeout=CALL_TIMEOUT,
                                                  max_message_bytes=SPLIT_MESSAGE_BYTES))
        channel = stack.enter_context(grpc.insecure_channel(address))
        stubs = {"kserve": kpb_grpc.GRPCInferenceServiceStub(channel),
                 "native": pb_grpc.LossServiceStub(channel)}
        shm = None
        if use_shm:
            for _ in range(MAX_SHED_RETRIES):
                try:
                    shm = stack.enter_context(client.shared_memory(1 << 20))
                    break
                except lossd.ResourceExhausted as exc:  # the stream door: retry
                    time.sleep(exc.retry_after or 1.0)
        while time.monotonic() < stop_at:
            kind = str(rng.choice(kinds, p=weights))
            if shm is None:
                kind = NO_SHM.get(kind, kind)
            case = cases[int(rng.integers(0, len(cases)))]
            expected = ("INVALID_ARGUMENT" if kind in ("invalid", "shm_invalid") else
                        "ERROR" if kind == "kserve_invalid" else "OK")
            start = time.perf_counter()
            t0 = start
            outcome, detail = "OK", ""
            for _attempt in range(MAX_SHED_RETRIES + 1):
                t0 = time.perf_counter()
                try:
                    outcome, detail = _call(kind, rng, client, splitter, stubs, shm, case,
                                            split)
                except lossd.ResourceExhausted as exc:
                    if _shed(exc):
                        stats.shed += 1
                        time.sleep(min(1.0, exc.retry_after * (1 + rng.random())))
                        if time.monotonic() < stop_at + CALL_TIMEOUT:
                            continue
                    outcome, detail = "RESOURCE_EXHAUSTED", exc.message[:80]
                except lossd.LossdError as exc:
                    outcome, detail = exc.code.name, exc.message[:120]
                except grpc.RpcError as exc:  # the KServe stub's raw errors
                    code = exc.code()
                    details = exc.details() or ""
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in details:
                        stats.shed += 1
                        time.sleep(0.05 * (1 + rng.random()))
                        continue
                    outcome, detail = code.name, details[:120]
                    if kind == "kserve_invalid" and code in (grpc.StatusCode.INVALID_ARGUMENT,
                                                             grpc.StatusCode.NOT_FOUND):
                        outcome = "ERROR"
                break
            else:  # shed on every attempt: refused in the end, not answered
                stats.shed_final += 1
                outcome, detail = "RESOURCE_EXHAUSTED", "shed on every attempt"
            stats.record(kind, outcome, detail, expected, start, t0)
    out.append(stats.as_dict())


def _call(kind: str, rng: np.random.Generator, client: Any, splitter: Any,
          stubs: dict[str, Any], shm: Any, case: dict[str, Any], split: dict[str, Any]
          ) -> tuple[str, str]:
    """One call of ``kind``: (outcome, detail); raises the client's errors."""
    if kind == "evaluate":
        r = client.evaluate(case["x"], case["t"], loss=case["loss"], **case["opts"])
        return ("OK", "") if _close(r.per_sample, case["want"]) else ("WRONG", case["loss"])
    if kind == "stream":
        got = [r.per_sample for r in client.evaluate_stream(
            [(case["x"], case["t"])] * 3, loss=case["loss"], **case["opts"])]
        ok = len(got) == 3 and all(_close(g, case["want"]) for g in got)
        return ("OK", "") if ok else ("WRONG", case["loss"])
    if kind == "split":
        r = splitter.evaluate(split["x"], split["t"], loss=split["loss"])
        return ("OK", "") if _close(r.per_sample, split["want"]) else ("WRONG", "split")
    if kind == "shm":
        r = shm.evaluate(case["x"], case["t"], loss=case["loss"], **case["opts"])
        return ("OK", "") if _close(r.per_sample, case["want"]) else ("WRONG", "shm")
    if kind in ("invalid", "shm_invalid"):
        bad = _invalid(rng)
        target = client if kind == "invalid" else shm
        target.evaluate(bad["x"], bad["t"], loss=bad["loss"], **bad["opts"])
        return "UNEXPECTED_OK", bad["loss"]
    if kind == "kserve":
        resp = _model_infer(stubs["kserve"], case)
        ok = _close(_per_sample_output(resp), case["want"])
        return ("OK", "") if ok else ("WRONG", "kserve")
    if kind == "kserve_invalid":
        _model_infer(stubs["kserve"], case, broken=int(rng.integers(0, 3)))
        return "UNEXPECTED_OK", "kserve"
    if kind == "cancel":
        import grpc

        from lossd.channel import from_rpc_error

        call = stubs["native"].EvaluateStream(iter([_request(case)] * 5), timeout=CALL_TIMEOUT)
        try:
            first = next(call)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        call.cancel()  # the caller goes away mid-stream
        got = np.frombuffer(first.per_sample.data, "<f4")
        return ("OK", "") if _close(got, case["want"]) else ("WRONG", "cancel")
    if kind == "losses":
        return ("OK", "") if len(client.losses()) >= 10 else ("WRONG", "catalogue")
    raise AssertionError(kind)


def _long_stream(address: str, seed: int, stop_at: float, cases: list[dict[str, Any]],
                 out: list[dict[str, Any]]) -> None:
    """One stream open for the whole run: mse_loss batches every 100 ms, each answer and
    the running aggregates checked (the running sum against math.fsum of every
    per-sample loss so far)."""
    import lossd
    from lossd import LossClient

    stats = _Stats()
    mse = [c for c in cases if c["loss"] == "mse_loss"]
    rng = np.random.default_rng(seed)
    order = [mse[int(i)] for i in rng.integers(0, len(mse), 100_000)]
    sent: list[dict[str, Any]] = []

    def batches() -> Any:
        for case in order:
            if time.monotonic() >= stop_at:
                return
            sent.append(case)
            yield case["x"], case["t"]
            time.sleep(LONG_STREAM_PERIOD)

    start = time.perf_counter()
    outcome, detail = "OK", ""
    total: list[float] = []
    answered = 0
    with LossClient(address, timeout=CALL_TIMEOUT) as client:
        for attempt in range(MAX_SHED_RETRIES + 1):
            try:
                for r in client.evaluate_stream(batches(), loss="mse_loss"):
                    case = sent[answered]
                    answered += 1
                    total.extend(float(v) for v in r.per_sample)
                    if not _close(r.per_sample, case["want"]):
                        outcome, detail = "WRONG", "long stream batch"
                    elif r.running is None or r.running.count != len(total) or not math.isclose(
                            r.running.sum, math.fsum(total), rel_tol=1e-12, abs_tol=1e-12):
                        outcome, detail = "WRONG", "long stream running aggregates"
                break
            except lossd.ResourceExhausted as exc:
                if answered == 0 and _shed(exc) and attempt < MAX_SHED_RETRIES:
                    stats.shed += 1  # refused at the door: retry
                    sent.clear()
                    time.sleep(exc.retry_after or 1.0)
                    continue
                outcome, detail = "RESOURCE_EXHAUSTED_MIDWAY", exc.message[:120]
                break
            except lossd.LossdError as exc:
                outcome, detail = exc.code.name, exc.message[:120]
                break
    if answered != len(sent) and outcome == "OK":
        outcome, detail = "LOST", f"{len(sent) - answered} batches unanswered"
    stats.calls["long_stream_batches"] += answered
    stats.record("long_stream", outcome, detail, "OK", start, start, timed=False)
    out.append(stats.as_dict())


def _process(address: str, first_seed: int, clients: int, shm_clients: int,
             long_streams: int, seconds: float, go: Any, queue: Any) -> None:
    cases = _cases(first_seed)
    split = _split_case(first_seed)
    queue.put("ready")
    go.wait()
    stop_at = time.monotonic() + seconds
    results: list[dict[str, Any]] = []
    threads = [threading.Thread(target=_client, args=(address, first_seed + i, stop_at, cases,
                                                      split, i < shm_clients, results),
                                daemon=True) for i in range(clients)]
    threads += [threading.Thread(target=_long_stream, args=(address, first_seed + 500 + i,
                                                            stop_at, cases, results),
                                 daemon=True) for i in range(long_streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, stop_at - time.monotonic()) + CALL_TIMEOUT * (MAX_SHED_RETRIES + 2))
    queue.put({"results": results, "hung_threads": sum(t.is_alive() for t in threads)})


# ---- callers that die mid-call -------------------------------------------------------

_DYING = """
import sys, numpy as np
from lossd import LossClient
client = LossClient(sys.argv[1], timeout=30)
shm = client.shared_memory(4 << 20)
x = np.random.default_rng(0).standard_normal((2048, 100)).astype(np.float32)
t = np.zeros(2048, np.int64)
def batches():
    while True:
        yield x, t
stream = client.evaluate_stream(batches())
print("ready", flush=True)
while True:
    shm.evaluate(x, t)
    next(stream)
"""


def _killer(address: str, every: float, stop: threading.Event, counts: dict[str, int]
            ) -> None:
    rng = np.random.default_rng(7)
    while not stop.wait(every * (0.5 + rng.random())):
        proc = subprocess.Popen([sys.executable, "-c", _DYING, address], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        ready = proc.stdout.readline() == "ready\n"
        time.sleep(float(rng.uniform(0.0, 1.0)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        counts["killed_mid_call" if ready else "died_before_ready"] += 1


# ---- hostile callers (issue 19) ------------------------------------------------------

EVALUATE = "/lossd.v1.LossService/Evaluate"
EVALUATE_STREAM = "/lossd.v1.LossService/EvaluateStream"
MIB = 1 << 20
HELD_CALLS = 80  # the count: more than every grpcio pool thread of the old server
ABANDON_DEADLINE = 0.05  # the call costs 0.2-0.4 s (2 or 1 torch threads), 1 s loaded
HOSTILE_PAUSE = 0.2  # between one hostile thread's calls: hostile, not a client-side spin
# What each hostile call may end with: its refusal (naming the field or limit), or an
# answer for the calls the server serves by design. Anything else is reported unexpected.
# ``still_open``: held by us until the end (the server never had to end it); ``SHED``:
# RESOURCE_EXHAUSTED "server busy" (the admission queue full; hostile callers do not retry);
# ``EVICTED``: RESOURCE_EXHAUSTED by ``--max-receiving``, the unary call that had waited
# longest for its message when one more call came. That is how unsent calls end; and since
# every caller here is on one host, their churn (each renewed within 0.1 s) also evicts a
# large message (1.5 to 16 MiB) still arriving after ~0.1 s, as on a loaded machine: the
# protection working, allowed for those kinds only. A small message arrives in
# milliseconds: evicted, it would mean the server picked the wrong call.
HOSTILE_EXPECTED = {
    "unsent_unary": {"EVICTED", "UNAVAILABLE", "still_open"},
    "idle_stream": {"UNAVAILABLE", "SHED", "still_open"},
    "tag_2mib": {"OK", "SHED", "EVICTED"},
    "map_inputs": {"RESOURCE_EXHAUSTED", "SHED", "EVICTED"},
    "map_options": {"RESOURCE_EXHAUSTED", "SHED", "EVICTED"},
    "ctc_over_bound": {"RESOURCE_EXHAUSTED", "SHED"},
    "huge_classes": {"OK", "SHED", "EVICTED"},
    "abandon_slow": {"DEADLINE_EXCEEDED", "SHED", "EVICTED"},
    "newline_name": {"INVALID_ARGUMENT", "SHED"},
}


def _tensor(a: np.ndarray) -> Any:
    from lossd.v1 import loss_service_pb2 as pb

    dtypes = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "int64": pb.INT64}
    return pb.Tensor(dtype=dtypes[a.dtype.name], shape=a.shape,
                     data=np.ascontiguousarray(a).tobytes())


def _ctc(n: int, steps: int, classes: int, labels: int) -> Any:
    """A ``ctc_loss`` request: (n, steps, classes) log-probabilities, ``labels`` per target."""
    from lossd.v1 import loss_service_pb2 as pb

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((n, steps, classes)).astype(np.float32)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return pb.EvaluateRequest(
        loss="ctc_loss", predictions=_tensor(log_probs.astype(np.float32)),
        targets=_tensor(rng.integers(1, classes, (n, labels)).astype(np.int64)),
        inputs={"input_lengths": _tensor(np.full(n, steps, np.int64)),
                "target_lengths": _tensor(np.full(n, labels, np.int64))})


def _hostile_requests() -> dict[str, tuple[bytes, float, Any]]:
    """Each direct hostile call: (raw request, deadline, check of an answer or None).

    Built from raw protobuf so that no client-side check stands in the way."""
    from lossd.v1 import loss_service_pb2 as pb

    rng = np.random.default_rng(19)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    t = rng.standard_normal((64, 16)).astype(np.float32)
    want = ((x - t) ** 2).mean(axis=1)
    mse = pb.EvaluateRequest(loss="mse_loss", predictions=_tensor(x), targets=_tensor(t))
    tagged = pb.EvaluateRequest()
    tagged.CopyFrom(mse)
    tagged.tag = "t" * (2 * MIB)
    newline = pb.EvaluateRequest()
    newline.CopyFrom(mse)
    newline.options["reduction\nlossd worker died pid=1"].string_value = "mean"
    huge = np.zeros((1, 8 * MIB), np.float16)  # C = 8M declared, 16 MiB
    huge[0, 3] = 1.0
    classes = pb.EvaluateRequest(loss="cross_entropy", predictions=_tensor(huge),
                                 targets=_tensor(np.array([3], np.int64)), per_class=True,
                                 top_k=list(range(1, 17)))
    plain = mse.SerializeToString()

    def same_losses(raw: bytes) -> bool:
        got = np.frombuffer(pb.EvaluateResponse.FromString(raw).per_sample.data, "<f4")
        return _close(got, want)

    def one_class(raw: bytes) -> bool:
        table = pb.EvaluateResponse.FromString(raw).analysis.per_class
        return list(table.classes) == [3] and list(table.top_k_correct) == [1] * 16

    return {
        "tag_2mib": (tagged.SerializeToString(), CALL_TIMEOUT, same_losses),
        # 8 MiB of empty map entries (field 11 inputs, field 5 options), after a valid call.
        "map_inputs": (plain + b"\x5a\x00" * (4 * MIB), CALL_TIMEOUT, None),
        "map_options": (plain + b"\x2a\x00" * (4 * MIB), CALL_TIMEOUT, None),
        # ~130 kB whose alpha table would be 8250 x 16501 floats (+544 MiB).
        "ctc_over_bound": (_ctc(1, 8250, 2, 8250).SerializeToString(), CALL_TIMEOUT, None),
        "huge_classes": (classes.SerializeToString(), CALL_TIMEOUT, one_class),
        # Within every bound, 0.4 s of one core: abandoned at 0.05 s, it runs on holding a
        # slot (at 0.3 s, a quiet 2-core machine answered it in time).
        "abandon_slow": (_ctc(8, 1500, 30, 1200).SerializeToString(), ABANDON_DEADLINE,
                         None),
        "newline_name": (newline.SerializeToString(), CALL_TIMEOUT, None),
    }


class _HostileStats:
    """Hostile calls by kind and how they ended; the unexpected ones with a detail."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.unexpected: list[dict[str, str]] = []

    def record(self, kind: str, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.outcomes[f"{kind}:{outcome}"] += 1
            if outcome not in HOSTILE_EXPECTED[kind] and len(self.unexpected) < 20:
                self.unexpected.append({"kind": kind, "outcome": outcome,
                                        "detail": detail[:160]})


def _code(call: Any) -> str:
    """A finished raw call's code; a RESOURCE_EXHAUSTED is ``SHED`` for "server busy",
    ``EVICTED`` for ``--max-receiving`` (see ``HOSTILE_EXPECTED``)."""
    code = call.code().name
    details = call.details() or ""
    if code == "RESOURCE_EXHAUSTED" and "busy" in details:
        return "SHED"
    if code == "RESOURCE_EXHAUSTED" and "--max-receiving" in details:
        return "EVICTED"
    return str(code)


def _ended(call: Any) -> tuple[str, str, float]:
    """(code, details, retry-after seconds or 0) of a finished raw call."""
    retry = 0.0
    for key, value in call.trailing_metadata() or ():
        if key == "retry-after-ms":
            retry = int(value) / 1000
    return _code(call), call.details() or "", retry


def _held(address: str, kind: str, count: int, stop: threading.Event,
          stats: _HostileStats) -> None:
    """``count`` calls that open and never send a message, one connection each, renewed as
    the server ends them (after its retry-after hint, if any): ``unsent_unary`` Evaluate
    calls, or ``idle_stream`` EvaluateStream calls."""
    import grpc

    release = threading.Event()  # set once every call is cancelled: no call half-closes

    def never() -> Any:
        release.wait()
        return
        yield b""  # a generator that yields nothing

    # Distinct channel arguments: a connection per channel (no subchannel sharing).
    channels = [grpc.insecure_channel(address, options=[("lossd.soak.hostile", f"{kind}{i}")])
                for i in range(count)]

    def open_call(ch: Any) -> Any:
        if kind == "unsent_unary":
            return ch.stream_unary(EVALUATE).future(never(), timeout=3600)
        return ch.stream_stream(EVALUATE_STREAM)(never(), timeout=3600)

    calls: list[Any] = [open_call(ch) for ch in channels]
    not_before = [0.0] * count
    while not stop.wait(0.1):
        for i, call in enumerate(calls):
            if call is None:
                if time.monotonic() >= not_before[i]:
                    calls[i] = open_call(channels[i])
            elif call.done():
                code, details, retry = _ended(call)
                stats.record(kind, code, details)
                calls[i] = None
                not_before[i] = time.monotonic() + min(2.0, retry)
    for call in calls:
        if call is not None:
            stats.record(kind, "still_open")
            call.cancel()
    release.set()
    for ch in channels:
        ch.close()


def _direct(address: str, kind: str, request: tuple[bytes, float, Any],
            stop: threading.Event, stats: _HostileStats) -> None:
    """One hostile caller sending ``kind``'s raw request in a loop until ``stop``."""
    import grpc

    raw, deadline, check = request
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
               ("lossd.soak.hostile", kind)]
    with grpc.insecure_channel(address, options=options) as ch:
        evaluate = ch.unary_unary(EVALUATE)
        while not stop.is_set():
            try:
                answer = evaluate(raw, timeout=deadline)
                outcome = "OK" if check is None or check(answer) else "WRONG"
                stats.record(kind, outcome)
            except grpc.RpcError as exc:
                stats.record(kind, _code(exc), exc.details() or "")
            stop.wait(HOSTILE_PAUSE)


def _hostile_process(address: str, delay: float, seconds: float, streams: int, go: Any,
                     queue: Any) -> None:
    """Every hostile caller of issue 19, from ``delay`` seconds after ``go`` to the end."""
    requests = _hostile_requests()
    queue.put("ready")
    go.wait()
    stop_at = time.monotonic() + seconds
    time.sleep(delay)
    stop = threading.Event()
    stats = _HostileStats()
    threads = [threading.Thread(target=_held, args=(address, "unsent_unary", HELD_CALLS,
                                                    stop, stats), daemon=True),
               threading.Thread(target=_held, args=(address, "idle_stream", streams, stop,
                                                    stats), daemon=True)]
    threads += [threading.Thread(target=_direct, args=(address, kind, request, stop, stats),
                                 daemon=True) for kind, request in requests.items()]
    for t in threads:
        t.start()
    time.sleep(max(0.0, stop_at - time.monotonic()))
    stop.set()
    for t in threads:
        t.join(CALL_TIMEOUT + 5)
    queue.put({"hostile": {"outcomes": dict(sorted(stats.outcomes.items())),
                           "unexpected": stats.unexpected,
                           "hung_threads": sum(t.is_alive() for t in threads)}})


# ---- the server ----------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """``pid`` and its children: `lossd serve` runs worker processes under a supervisor."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry))
    return [pid, *children]


def _rss(pid: int) -> int:
    """Resident memory of the server: every process of it together."""
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def _descriptors(pid: int) -> tuple[int, int, int]:
    """(open descriptors, of them memfds, memfd mappings) of the server's processes.

    Not counted: prometheus-client's multiprocess files (a worker opens one per metric
    kind the first time it uses one: a few, once, however long the run)."""
    fds = memfds = maps = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{p}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{p}/fd/{fd}")
                    if "/lossd-metrics-" in target and target.endswith(".db"):
                        continue
                    fds += 1
                    memfds += target.startswith("/memfd:")
            maps += sum(1 for line in Path(f"/proc/{p}/maps").read_text().splitlines()
                        if "/memfd:" in line)
    return fds, memfds, maps


def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    keep = ("lossd_requests_total", "lossd_rejected_requests_total",
            "lossd_cancelled_requests_total")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in keep and s.value:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


def _machine(device: str) -> dict[str, Any]:
    try:
        from bench.run import machine_info

        return machine_info(device)
    except Exception:  # the benchmark module changed: a name of our own
        cores = os.cpu_count() or 1
        return {"name": f"{re.sub(r'[^a-z0-9]+', '-', platform.machine().lower())}-{cores}c",
                "cores": cores, "platform": platform.platform()}


def _trend(values: list[float]) -> float:
    """Median of the last quarter against the median of the first, in percent."""
    q = max(1, len(values) // 4)
    first, last = float(np.median(values[:q])), float(np.median(values[-q:]))
    return round(100.0 * (last - first) / first, 2) if first else math.nan


def _mib(n: float) -> float:
    return round(float(n) / 2**20, 1)


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1e3, 2) if values else None


def _wait_ready(server: subprocess.Popen[str], address: str) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, "lossd serve exited"
        with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=2)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.2)


def _stream_limit(server_args: list[str]) -> int:
    """The server's ``--max-streams`` (per serving process) for these arguments."""
    from lossd_server import settings

    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    args, _ = parser.parse_known_args(server_args)
    return settings.from_args(args, env={}).stream_limit


def run(clients: int, seconds: float, procs: int, device: str, warmup: float,
        server_args: list[str], *, shm_clients: int = 8, long_streams: int = 8,
        kill_every: float = 2.0, hostile_after: float | None = None) -> dict[str, Any]:
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
    cmd = [sys.executable, "-m", "lossd_server.serve", "--port", str(port),
           "--metrics-port", str(metrics_port), "--device", device, "--log-level", "warning",
           *server_args]
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (never a pipe: a full one
    server = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=log, text=True)  # blocks it)
    address = f"127.0.0.1:{port}"
    samples: list[dict[str, float]] = []
    deaths = {"killed_mid_call": 0, "died_before_ready": 0}
    crashed_at: float | None = None
    try:
        _wait_ready(server, address)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        shm_per = [shm_clients // procs + (1 if i < shm_clients % procs else 0)
                   for i in range(procs)]
        long_per = [long_streams // procs + (1 if i < long_streams % procs else 0)
                    for i in range(procs)]
        go = ctx.Event()
        workers = [ctx.Process(target=_process, args=(address, 1000 * i, n, shm_per[i],
                                                      long_per[i], seconds, go, queue))
                   for i, n in enumerate(per) if n or long_per[i]]
        seen = set(_tree(server.pid)[1:])  # the worker processes (none with --processes 1)
        server_processes = max(1, len(seen))
        # --max-streams idle streams per serving process; over several processes 1.5 times
        # as many, since SO_REUSEPORT spreads connections at random.
        idle_streams = (_stream_limit(server_args) * server_processes
                        * (3 if server_processes > 1 else 2) // 2)
        if hostile_after is not None:
            workers.append(ctx.Process(target=_hostile_process, args=(
                address, hostile_after, seconds, idle_streams, go, queue)))
        for w in workers:
            w.start()
        for _ in workers:  # each has built its cases and torch's references
            assert queue.get(timeout=300) == "ready"
        idle = _descriptors(server.pid)
        rss_idle = _rss(server.pid)
        gone: set[int] = set()  # workers that died: the supervisor restarts them; a crash
        start_wall = time.time()
        stop_wall = start_wall + seconds
        go.set()
        stop_killing = threading.Event()
        killer = threading.Thread(target=_killer, args=(address, kill_every, stop_killing,
                                                        deaths), daemon=True)
        if kill_every > 0:
            killer.start()
        while time.time() < stop_wall:
            if server.poll() is not None:
                crashed_at = round(time.time() - start_wall, 1)
                break
            fds, memfds, maps = _descriptors(server.pid)
            samples.append({"t": round(time.time() - start_wall, 1), "rss": _rss(server.pid),
                            "fds": fds, "memfds": memfds, "memfd_maps": maps})
            now = set(_tree(server.pid)[1:])
            gone |= seen - now
            seen |= now
            time.sleep(1.0)
        stop_killing.set()
        killer.join(60) if killer.is_alive() else None
        parts = [queue.get(timeout=seconds + CALL_TIMEOUT * (MAX_SHED_RETRIES + 3))
                 for _ in workers]
        for w in workers:
            w.join(30)
        # Every caller gone: sessions released, connections closed.
        settle = time.monotonic() + 20
        while server.poll() is None:
            final = _descriptors(server.pid)
            if ((final[1], final[2]) == (0, 0) and final[0] <= idle[0]) or \
                    time.monotonic() > settle:
                break
            time.sleep(0.5)
        if server.poll() is not None and crashed_at is None:
            crashed_at = round(time.time() - start_wall, 1)
        if server.poll() is None:
            gone |= seen - set(_tree(server.pid)[1:])
        final = _descriptors(server.pid) if server.poll() is None else (-1, -1, -1)
        metrics = _scrape(metrics_port) if server.poll() is None else {}
        samples.append({"t": round(time.time() - start_wall, 1),
                        "rss": _rss(server.pid) if server.poll() is None else 0,
                        "fds": final[0], "memfds": final[1], "memfd_maps": final[2]})
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            exit_code = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            exit_code = server.wait()
        log.seek(0)
        stderr = log.read()
        log.close()
    return _report(locals())


def _phase_latency(timeline: list[tuple[float, str, str, float, float]], start: float,
                   boundary: float | None, seconds: float) -> dict[str, Any]:
    """Honest calls' latency in ms, per kind and for all kinds together, ``before`` the
    hostile callers start and ``during`` them (by the call's start), with the ratio during
    / before of each percentile. ``p50``..: the answered attempt; ``e2e_p50``..: from the
    first attempt, shed retries included (a stream waiting at a full door). Calls refused
    in the end (shed past every retry) and lost ones counted per phase."""
    cut = math.inf if boundary is None else boundary
    length = {"before": min(cut, start + seconds) - start,
              "during": start + seconds - min(cut, start + seconds)}
    phases: dict[str, dict[str, Any]] = {}
    for name, during in (("before", False), ("during", True)):
        rows = [e for e in timeline if (e[0] >= cut) == during]
        table: dict[str, Any] = {}
        for kind in ["all", *sorted({e[1] for e in rows})]:
            mine = [e for e in rows if kind in ("all", e[1])]
            ok = [e[3] for e in mine if e[2] == "ok"]
            e2e = [e[4] for e in mine if e[2] == "ok"]
            table[kind] = {"calls": len(mine),
                           "calls_per_s": round(len(mine) / max(length[name], 1e-9), 1),
                           "refused": sum(e[2] == "refused" for e in mine),
                           "lost": sum(e[2] == "lost" for e in mine),
                           **{f"p{q}": _pct(ok, q) for q in (50, 95, 99)},
                           **{f"e2e_p{q}": _pct(e2e, q) for q in (50, 95, 99)}}
        span = [e[0] - start for e in rows]
        phases[name] = {"from_s": round(min(span), 1) if span else None,
                        "to_s": round(max(span), 1) if span else None,
                        "seconds": round(length[name], 1), "by_kind": table}
    ratio: dict[str, dict[str, float | None]] = {}
    for kind, during in phases["during"]["by_kind"].items():
        before = phases["before"]["by_kind"].get(kind)
        if before:
            ratio[kind] = {q: (round(during[q] / before[q], 2) if during[q] and before[q]
                               else None)
                           for q in ("p50", "p95", "p99", "e2e_p50", "e2e_p95", "e2e_p99")}
    return {**phases, "ratio_during_over_before": ratio}


def _report(v: dict[str, Any]) -> dict[str, Any]:
    samples, warmup, seconds = v["samples"], v["warmup"], v["seconds"]
    hostile = next((p["hostile"] for p in v["parts"] if "hostile" in p), None)
    parts = [p for p in v["parts"] if "results" in p]
    results = [r for p in parts for r in p["results"]]
    calls: collections.Counter[str] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    for r in results:
        calls.update(r["calls"])
        outcomes.update(r["outcomes"])
    lost = [x for r in results for x in r["lost"]]
    lat = [x for r in results for x in r["lat_ok"]]
    e2e = [x for r in results for x in r["lat_e2e"]]
    after = v["hostile_after"]
    # With hostile callers, the RSS trend is their phase's, after its own warm-up.
    settled = warmup if after is None else after + min(warmup, (seconds - after) / 4)
    running = [s for s in samples[:-1] if s["t"] >= settled] or samples[:1]
    for x in lost:
        x["at_s"] = round(x.pop("started") - v["start_wall"], 1)
    boundary = None if after is None else v["start_wall"] + after
    phases = _phase_latency([e for r in results for e in r["timeline"]], v["start_wall"],
                            boundary, seconds)
    before_rss = [s["rss"] for s in samples[:-1]
                  if warmup <= s["t"] < (math.inf if after is None else after)]
    during_rss = [s["rss"] for s in samples[:-1] if after is not None and s["t"] >= after]
    base = running[0]
    end = samples[-1]
    errors: collections.Counter[str] = collections.Counter()
    for key, n in outcomes.items():
        code = key.split(":", 1)[1]
        if code != "OK":
            errors[code] += n
    total = sum(n for k, n in calls.items() if k != "long_stream_batches")
    last_running = running[-1]
    return {
        "clients": v["clients"], "seconds": seconds, "procs": v["procs"],
        "device": v["device"], "server_args": v["server_args"],
        "shm_clients": v["shm_clients"], "long_streams": v["long_streams"],
        "kill_every_s": v["kill_every"],
        "calls": total, "calls_per_s": round(total / seconds, 1), "by_kind": dict(calls),
        "outcomes": dict(sorted(outcomes.items())), "errors_by_code": dict(errors),
        "callers_killed": v["deaths"],
        "shed_retries": sum(r["shed"] for r in results),
        "shed_final": sum(r["shed_final"] for r in results),
        "lost_calls": len(lost) + sum(p["hung_threads"] for p in parts),
        "lost_examples": lost[:10],
        "hung_client_threads": sum(p["hung_threads"] for p in parts),
        "server_processes": v["server_processes"],
        "server_crashes": (0 if v["crashed_at"] is None else 1) + len(v["gone"]),
        "server_crashed_at_s": v["crashed_at"],
        "latency_ms": {"p50": _pct(lat, 50), "p90": _pct(lat, 90), "p99": _pct(lat, 99),
                       "max": _pct(lat, 100)},
        "latency_with_shed_retries_ms": {"p50": _pct(e2e, 50), "p99": _pct(e2e, 99)},
        "rss_mib": {"idle": round(v["rss_idle"] / 2**20, 1),
                    "after_warmup": round(base["rss"] / 2**20, 1),
                    "end_of_load": round(last_running["rss"] / 2**20, 1),
                    "after_callers_left": round(end["rss"] / 2**20, 1),
                    "max": round(max(s["rss"] for s in samples) / 2**20, 1)},
        "rss_growth_after_warmup_pct": round(
            100.0 * (last_running["rss"] - base["rss"]) / base["rss"], 2),
        # Robust to where one sample lands in the allocator's ups and downs: the median of
        # the last quarter of the run after warm-up against the median of its first.
        "rss_trend_after_warmup_pct": _trend([s["rss"] for s in running]),
        "fds_trend_after_warmup_pct": _trend([s["fds"] for s in running]),
        "rss_max_growth_after_warmup_pct": round(
            100.0 * (max(s["rss"] for s in running) - base["rss"]) / base["rss"], 2),
        "fds": {"idle": v["idle"][0], "after_warmup": base["fds"],
                "end_of_load": last_running["fds"],
                "max": max(s["fds"] for s in samples), "after_callers_left": end["fds"]},
        "memfds_max": max(s["memfds"] for s in samples),
        "memfd_maps_max": max(s["memfd_maps"] for s in samples),
        "left_after_callers": {"memfds": end["memfds"], "memfd_maps": end["memfd_maps"]},
        "warmup_s": warmup,
        "hostile_after_s": after,
        "idle_streams": v["idle_streams"] if after is not None else 0,
        "honest_latency_ms": phases,
        "rss_phases_mib": {
            "before_median": _mib(np.median(before_rss)) if before_rss else None,
            "before_max": _mib(max(before_rss)) if before_rss else None,
            "during_median": _mib(np.median(during_rss)) if during_rss else None,
            "during_max": _mib(max(during_rss)) if during_rss else None},
        "hostile": hostile,
        "samples": samples,
        "server_metrics": v["metrics"],
        "server_exit_code": v["exit_code"],
        "server_stderr_tail": v["stderr"][-2000:],
    }


def markdown(r: dict[str, Any]) -> str:
    fds, rss = r["fds"], r["rss_mib"]
    lines = [
        f"# lossd soak: {r['clients']} clients x {r['seconds']:g} s "
        f"({r['machine']['name']}, {r['device']})",
        "",
        f"Run {r['started']}, commit {r.get('git', {}).get('commit', '?')[:12]}; server "
        f"`lossd serve {' '.join(r['server_args']) or '(defaults)'}`; "
        f"{r['procs']} client processes; {r['shm_clients']} clients with shared memory, "
        f"{r['long_streams']} long streams, a caller killed mid-call every ~"
        f"{r['kill_every_s']:g} s. Load average at the end: "
        f"{', '.join(f'{x:.2f}' for x in r['load_avg'])}.",
        "",
        "| figure | value |", "|---|---|",
        f"| calls | {r['calls']} ({r['calls_per_s']}/s); long-stream batches "
        f"{r['by_kind'].get('long_stream_batches', 0)} |",
        f"| lost or wrong answers (must be 0) | **{r['lost_calls']}** |",
        f"| server crashes, worker processes included (must be 0) | "
        f"**{r['server_crashes']}** ({r['server_processes']} serving processes) |",
        f"| callers SIGKILLed mid-call | {r['callers_killed']['killed_mid_call']} |",
        f"| latency p50 / p90 / p99 / max (answered attempt) | {r['latency_ms']['p50']} / "
        f"{r['latency_ms']['p90']} / {r['latency_ms']['p99']} / {r['latency_ms']['max']} ms |",
        f"| latency p50 / p99 incl. shed retries | {r['latency_with_shed_retries_ms']['p50']} "
        f"/ {r['latency_with_shed_retries_ms']['p99']} ms |",
        f"| shed (unary queue full or a stream's door, retried after retry-after-ms) | "
        f"{r['shed_retries']} attempts; {r['shed_final']} calls gave up |",
        f"| server RSS idle / after {r['warmup_s']:g} s warm-up / end of load / callers gone "
        f"/ max | {rss['idle']} / {rss['after_warmup']} / {rss['end_of_load']} / "
        f"{rss['after_callers_left']} / {rss['max']} MiB |",
        f"| RSS growth after warm-up: trend, last quarter vs first (target < 5 %); last "
        f"sample vs first; peak | **{r['rss_trend_after_warmup_pct']} %**; "
        f"{r['rss_growth_after_warmup_pct']} %; {r['rss_max_growth_after_warmup_pct']} % |",
        f"| open descriptors trend after warm-up | {r['fds_trend_after_warmup_pct']} % |",
        f"| server open descriptors idle / after warm-up / end of load / max / callers gone "
        f"| {fds['idle']} / {fds['after_warmup']} / {fds['end_of_load']} / {fds['max']} / "
        f"**{fds['after_callers_left']}** |",
        f"| shared-memory descriptors / mappings: most at once; left when callers gone "
        f"(must be 0) | {r['memfds_max']} / {r['memfd_maps_max']}; **"
        f"{r['left_after_callers']['memfds']} / {r['left_after_callers']['memfd_maps']}** |",
        f"| server exit code after SIGTERM | {r['server_exit_code']} |",
        *_hostile_markdown(r),
        "", "## Calls by kind and outcome", "", "| kind:outcome | calls |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in r["outcomes"].items()),
        "", "## Errors by code (expected: INVALID_ARGUMENT for the invalid calls, "
        "ERROR for kserve_invalid: INVALID_ARGUMENT or NOT_FOUND)", "",
        "| code | calls |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(r["errors_by_code"].items())),
        "", "## Lost calls (examples)", "",
        *(f"- {x}" for x in r["lost_examples"]), *(["none"] if not r["lost_examples"] else []),
        "", "## Server counters", "", "| series | value |", "|---|---|",
        *(f"| `{k}` | {v:g} |" for k, v in sorted(r["server_metrics"].items())),
        "",
    ]
    return "\n".join(lines)


def _hostile_markdown(r: dict[str, Any]) -> list[str]:
    """The honest calls' latency before and during the hostile callers, the server's RSS in
    both phases, and every hostile call's outcome."""
    phases = r["honest_latency_ms"]
    if r["hostile"] is None:
        return []
    rows = []
    for kind, before in phases["before"]["by_kind"].items():
        during = phases["during"]["by_kind"].get(kind)
        ratio = phases["ratio_during_over_before"].get(kind, {})
        if during is None:
            continue
        rows.append(
            f"| {kind} | {before['calls_per_s']} / {during['calls_per_s']} | "
            f"{before['p50']} / {before['p95']} / {before['p99']} | "
            f"{during['p50']} / {during['p95']} / {during['p99']} | "
            f"{ratio.get('p50')} / {ratio.get('p95')} / {ratio.get('p99')} | "
            f"{before['e2e_p50']} / {before['e2e_p99']} | "
            f"{during['e2e_p50']} / {during['e2e_p99']} | "
            f"{before['refused']} / {during['refused']} | "
            f"**{before['lost']} / {during['lost']}** |")
    rss, hostile = r["rss_phases_mib"], r["hostile"]
    expected = ", ".join(f"{k}: {' or '.join(sorted(v))}" for k, v in HOSTILE_EXPECTED.items())
    return [
        "", f"## Honest calls before and during the hostile callers (from "
        f"{r['hostile_after_s']:g} s)", "",
        f"Before: calls started in {phases['before']['from_s']}..{phases['before']['to_s']} "
        f"s (honest callers only); during: {phases['during']['from_s']}.."
        f"{phases['during']['to_s']} s, the hostile callers on. Latency of the answered "
        f"attempt in ms; \"with retries\": from the first attempt, shed retries "
        f"included (a stream waiting at a full door); refused: RESOURCE_EXHAUSTED after "
        f"every retry (not lost). Server "
        f"RSS median / max before (after warm-up): {rss['before_median']} / "
        f"{rss['before_max']} MiB; during: {rss['during_median']} / {rss['during_max']} MiB.",
        "", "| kind | calls/s before / during | before p50 / p95 / p99 | during p50 / p95 "
        "/ p99 | during / before | with retries before p50 / p99 | with retries during p50 "
        "/ p99 | refused before / during | lost before / during |",
        "|---|---|---|---|---|---|---|---|---|", *rows,
        "", f"## Hostile calls by outcome ({HELD_CALLS} unsent unary calls and "
        f"{r['idle_streams']} idle streams held, one connection each, renewed as the server "
        f"ends them; one thread each for the other kinds)", "",
        f"Expected: {expected}.", "", "| kind:outcome | calls |", "|---|---|",
        *(f"| {k} | {n} |" for k, n in hostile["outcomes"].items()),
        "", f"Unexpected hostile outcomes: {len(hostile['unexpected'])}"
        f"{' (first 20)' if len(hostile['unexpected']) >= 20 else ''}; hostile threads "
        f"still running at the end: {hostile['hung_threads']}.",
        *(f"- {x}" for x in hostile["unexpected"]),
    ]


def passed(r: dict[str, Any]) -> bool:
    """0 lost, 0 crashes, exit 0, RSS flat, descriptors back, no shared memory left."""
    return (r["lost_calls"] == 0 and r["server_crashes"] == 0 and r["server_exit_code"] == 0
            and not math.isnan(r["rss_trend_after_warmup_pct"])
            and r["rss_trend_after_warmup_pct"] < 5.0
            and r["fds"]["after_callers_left"] <= r["fds"]["idle"] + 2
            and r["left_after_callers"] == {"memfds": 0, "memfd_maps": 0})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--procs", type=int, default=4, help="client processes (default 4)")
    p.add_argument("--shm-clients", type=int, default=8,
                   help="clients that also hold shared memory (default 8)")
    p.add_argument("--long-streams", type=int, default=8,
                   help="streams open the whole run (default 8)")
    p.add_argument("--kill-every", type=float, default=2.0,
                   help="seconds between callers killed mid-call (0: none; default 2)")
    p.add_argument("--hostile", action=argparse.BooleanOptionalAction, default=True,
                   help="add issue 19's hostile callers after --hostile-after (default on)")
    p.add_argument("--hostile-after", type=float, default=None,
                   help="seconds of honest calls only before the hostile callers start "
                        "(default: a third of the run)")
    p.add_argument("--processes", default=None,
                   help="`lossd serve --processes` (default: the server's own, auto)")
    p.add_argument("--name", default="soak",
                   help="file names under --out: NAME.json and NAME.md (default soak)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before the RSS baseline (default: a sixth of the run, 5..15)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default bench/results/<machine>/)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `lossd serve` argument (repeatable), e.g. --server-arg=--workers=40")
    a = p.parse_args(argv)
    if a.clients < 1 or not 0 < a.seconds <= 3600:
        p.error("--clients >= 1 and 0 < --seconds <= 3600")
    warmup = a.warmup if a.warmup is not None else min(15.0, max(5.0, a.seconds / 6))
    hostile_after = None if not a.hostile else (
        a.hostile_after if a.hostile_after is not None else a.seconds / 3)
    server_args = [*(["--processes", a.processes] if a.processes else []), *a.server_arg]
    machine = _machine(a.device)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    print(f"soak: {a.clients} clients x {a.seconds:g} s on {machine['name']}", flush=True)
    result = run(a.clients, a.seconds, min(a.procs, a.clients), a.device, warmup,
                 server_args, shm_clients=min(a.shm_clients, a.clients),
                 long_streams=a.long_streams, kill_every=a.kill_every,
                 hostile_after=hostile_after)
    result.update(machine=machine, started=started, load_avg=os.getloadavg())
    with contextlib.suppress(Exception):
        from bench.run import git_state

        result["git"] = git_state()
    out = a.out or ROOT / "bench" / "results" / machine["name"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{a.name}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"soak: wrote {out / a.name}.json and {a.name}.md")
    return 0 if passed(result) else 1


if __name__ == "__main__":
    raise SystemExit(main())

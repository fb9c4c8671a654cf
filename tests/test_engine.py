"""The engine: large batches of samplewise losses are evaluated in chunks of samples, with
the very same results as in one piece (lossd_server.engine)."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import torch

from lossd_server import analysis, engine
from lossd_server.engine import Batch, Engine, Evaluation
from lossd_server.errors import RequestError
from tests.loss_reference import CASES, Case

CPU = Engine(torch.device("cpu"))


def _batch(case: Case, analyses: analysis.Request = analysis.NONE, repeat: int = 25
           ) -> Batch:
    """The case's batch repeated along N: 300 samples, enough for several chunks."""
    def more(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.repeat(repeat, *([1] * (t.dim() - 1)))

    opts: dict[str, Any] = {k: (torch.tensor(v, dtype=torch.float64) if isinstance(v, list)
                                else v) for k, v in case.opts.items()}
    x = more(case.x)
    assert x is not None
    inputs = {name: t for name, v in case.inputs.items() if (t := more(v)) is not None}
    return Batch(case.loss, x, more(case.t), more(case.w), opts, analyses=analyses,
                 inputs=inputs)


def _same(a: Evaluation, b: Evaluation) -> None:
    torch.testing.assert_close(a.per_sample, b.per_sample, rtol=0, atol=0, equal_nan=True)
    for name in ("sum", "mean", "count", "ignored", "omitted", "weighted_sum",
                 "weighted_mean", "weight_sum"):
        x, y = getattr(a.aggregate, name), getattr(b.aggregate, name)
        assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), name


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_chunked_evaluation_equals_one_piece(case: Case, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    batch = _batch(case)
    whole = CPU.evaluate(batch)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 1)  # the smallest aligned chunks
    assert len(engine.chunks(batch.predictions)) > 1
    _same(CPU.evaluate(batch), whole)


def test_chunked_analyses_equal_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    wanted = analysis.Request(per_class=True, accuracy=True, top_k=(1, 3), diagnostics=True,
                              hardest=4, quantiles=(0.5, 0.9))
    for case in (c for c in CASES if c.class_index and c.loss == "cross_entropy"):
        whole = CPU.evaluate(_batch(case, wanted))
        with monkeypatch.context() as m:
            m.setattr(engine, "CHUNK_BYTES", 1)
            chunked = CPU.evaluate(_batch(case, wanted))
        _same(chunked, whole)
        assert repr(chunked.analysis) == repr(whole.analysis), case.id


def test_nan_policy_raise_names_the_first_bad_sample_across_chunks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(200, 4)
    x[170, 1] = math.nan
    monkeypatch.setattr(engine, "CHUNK_BYTES", 1)  # chunks of 16 samples
    with pytest.raises(RequestError, match="at sample 170"):
        CPU.evaluate(Batch("cross_entropy", x, torch.zeros(200, dtype=torch.int64),
                           options={"nan_policy": "raise"}))


def test_chunks_bound_the_rows_a_loss_sees_and_start_aligned() -> None:
    x = torch.zeros(1000, 1000)  # 4 MB of float32
    parts = engine.chunks(x, limit=1_000_000)
    assert len(parts) == 5 and parts[0] == slice(0, 248) and parts[-1] == slice(992, 1000)
    assert all(p.start * 1000 % engine.ALIGN_ELEMENTS == 0 for p in parts)
    assert engine.chunks(x[:10]) == [slice(None)]
    bf16 = torch.zeros(1000, 1000, dtype=torch.bfloat16)  # sized as its float32 upcast
    assert engine.chunks(bf16, limit=1_000_000) == parts
    odd = torch.zeros(300, 5)  # 5 elements a row: steps of 64 rows
    assert [p.start for p in engine.chunks(odd, limit=1)] == [0, 64, 128, 192, 256]


def _slow_ctc(n: int = 40, steps: int = 1000, classes: int = 20, labels: int = 400
              ) -> Batch:
    """A ctc_loss batch whose working memory (N x T x (2S + 1)) is 32M elements, its
    inputs under 1M: just under the default --max-elements."""
    g = torch.Generator().manual_seed(0)
    x = torch.log_softmax(torch.randn(n, steps, classes, generator=g), -1)
    t = torch.randint(1, classes, (n, labels), generator=g)
    return Batch("ctc_loss", x, t, inputs={"input_lengths": torch.full((n,), steps),
                                           "target_lengths": torch.full((n,), labels)})


def test_ctc_chunks_are_sized_by_its_working_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its inputs fit one chunk, its alpha tables do not: evaluated in chunks whose share of
    the working memory fits CHUNK_BYTES, bit for bit as in one piece."""
    batch = _slow_ctc()
    work = 40 * 1000 * 801
    parts = engine.chunks(batch.predictions, work=work)
    assert engine.chunks(batch.predictions) == [slice(None)]
    assert len(parts) > 4
    rows = parts[0].stop - parts[0].start
    assert rows * (1000 * 20 + work // 40) * 4 <= engine.CHUNK_BYTES
    chunked = CPU.evaluate(batch)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 1 << 40)
    _same(chunked, CPU.evaluate(batch))


def test_an_abandoned_chunked_evaluation_stops_at_the_next_chunk() -> None:
    """``still_wanted`` is asked between chunks (never before the first, never for a batch
    in one piece); when it raises, the evaluation stops there, computing no further chunk."""
    batch = _slow_ctc()
    chunks = len(engine.chunks(batch.predictions, work=40 * 1000 * 801))
    asked: list[float] = []

    class Gone(Exception):
        pass

    def still_wanted() -> None:
        asked.append(time.monotonic())
        if len(asked) == 2:
            raise Gone

    start = time.monotonic()
    with pytest.raises(Gone):
        CPU.evaluate(batch, still_wanted=still_wanted)
    stopped = time.monotonic() - start
    assert len(asked) == 2 < chunks - 1
    whole_start = time.monotonic()
    CPU.evaluate(batch)
    assert stopped < (time.monotonic() - whole_start) * 0.6  # 2 chunks of 10, with slack

    small = Batch("mse_loss", torch.ones(8), torch.zeros(8))
    CPU.evaluate(small, still_wanted=lambda: pytest.fail("asked for a one-chunk batch"))

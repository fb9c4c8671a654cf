"""Result types: to_dict() and to_pandas(), and the client without torch, pandas or
matplotlib (a subprocess where importing them fails) against a real server."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from lossd import Hardest, LossClient, PerClass, Quantiles
from lossd_server.app import LossdServer

ROOT = Path(__file__).resolve().parent.parent


def _result(client: LossClient, **kwargs: Any):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(11)
    x = rng.standard_normal((80, 5)).astype(np.float32)
    t = rng.integers(0, 5, 80)
    w = rng.random(80).astype(np.float32)
    return client.evaluate(x, t, weights=w, per_class=True, accuracy=True, top_k=(1, 2),
                           diagnostics=True, hardest=4, quantiles=True, **kwargs), t


def test_to_dict_is_json_and_complete(client: LossClient) -> None:
    r, t = _result(client)
    d = r.to_dict()
    json.dumps(d)  # plain values only
    agg = d["aggregates"]
    assert agg["count"] == 80 and agg["accuracy"] == r.accuracy and agg["ece"] == r.ece
    assert agg["per_class"][int(t[0])]["count"] == int((t == t[0]).sum())
    assert agg["per_class"][int(t[0])]["top_k_accuracy"].keys() == {1, 2}
    assert [h["index"] for h in agg["hardest"]] == [h.index for h in r.hardest]
    assert agg["quantiles"]["quantiles"] == dict(r.quantiles.items())
    assert len(d["per_sample"]) == len(d["predicted"]) == len(d["correct"]) == 80
    assert agg["calibration"]["edges"][0] == 0.0 and len(agg["calibration"]["count"]) == 15


def test_to_pandas_tables(client: LossClient) -> None:
    r, t = _result(client)
    samples = r.to_pandas()
    assert list(samples.columns) == ["loss", "predicted", "confidence", "correct"]
    assert samples.index.name == "sample" and len(samples) == 80
    assert np.array_equal(samples["loss"].to_numpy(), r.per_sample)
    classes = r.per_class.to_pandas()
    assert classes.index.name == "class"
    assert classes.loc[int(t[0]), "count"] == int((t == t[0]).sum())
    assert {"weighted_mean", "accuracy", "top_2_accuracy"} <= set(classes.columns)
    hardest = r.hardest.to_pandas()
    assert list(hardest["index"]) == [h.index for h in r.hardest]
    assert r.quantiles.to_pandas()["max"] == r.quantiles.max
    assert len(r.calibration.to_pandas()) == 15
    scalars = r.aggregates.to_pandas()
    assert isinstance(scalars, pd.Series)
    assert scalars["accuracy"] == r.accuracy and scalars["top_2_accuracy"] > 0


def test_types_read_like_their_contents(client: LossClient) -> None:
    r, t = _result(client)
    assert isinstance(r.per_class, PerClass) and isinstance(r.hardest, Hardest)
    assert isinstance(r.quantiles, Quantiles)
    c = int(t[0])
    assert c in r.per_class and r.per_class[c].mean == r.per_class.mean[
        list(r.per_class).index(c)]
    assert len(r.hardest) == 4 and r.hardest[0].loss == r.hardest.losses[0]
    assert set(r.quantiles) == {0.5, 0.9, 0.99} and r.aggregates.max == r.quantiles.max
    assert math.isfinite(r.quantiles[0.5])


NAMES = ("cat", "dog", "bird", "fish", "frog")


def test_class_names_label_the_tables(client: LossClient) -> None:
    """Issue 21: ``class_names=`` name the classes of per_class (``to_pandas``, ``to_dict``,
    lookup by name) and hardest (``target_name``, ``predicted_name``); the numbers stay."""
    r, t = _result(client)
    named, _ = _result(client, class_names=list(NAMES))
    assert named.per_sample.tolist() == r.per_sample.tolist()
    pc = named.per_class
    assert pc is not None and pc.class_names == NAMES
    assert pc.labels == [NAMES[c] for c in pc.classes]
    table = pc.to_pandas()
    assert table.index.name == "class" and list(table.index) == pc.labels
    assert list(table["class_index"]) == pc.classes.tolist()
    c = int(t[0])
    assert table.loc[NAMES[c], "count"] == int((t == c).sum())
    assert pc[NAMES[c]] == pc[c]
    assert named.aggregates.to_dict()["per_class"][NAMES[c]] == r.per_class.to_dict()[c]
    assert named.hardest is not None
    for h, plain in zip(named.hardest, r.hardest, strict=True):
        assert (h.index, h.target, h.predicted) == (plain.index, plain.target, plain.predicted)
        assert h.target_name == NAMES[h.target] and h.predicted_name == NAMES[h.predicted]
        assert h.to_dict() == {**plain.to_dict(), "target_name": h.target_name,
                               "predicted_name": h.predicted_name}
    assert list(named.hardest.to_pandas()["target_name"]) == [h.target_name
                                                               for h in named.hardest]
    assert "target_name" not in r.hardest.to_pandas().columns
    json.dumps(named.to_dict())


def test_class_names_checked_and_short_lists_shown(client: LossClient) -> None:
    r, _ = _result(client)
    short = r.with_class_names(["cat", "dog"])
    assert short.per_class is not None
    assert short.per_class.labels == ["cat", "dog", "2", "3", "4"][:len(short.per_class)]
    assert r.with_class_names(None) is r
    with pytest.raises(TypeError, match="class_names: a sequence of names"):
        r.with_class_names("cat,dog")
    with pytest.raises(ValueError, match="'cat' given twice"):
        r.with_class_names(["cat", "cat"])
    with pytest.raises(KeyError):
        r.per_class["cat"]  # type: ignore[index]


CLIENT_ONLY = """
import builtins, sys
real = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split(".")[0] in ("torch", "pandas", "matplotlib", "lossd_server"):
        raise ImportError(f"No module named {name!r} (blocked)")
    return real(name, *args, **kwargs)
builtins.__import__ = guarded

import numpy as np
import lossd
from lossd._cli import main
rng = np.random.default_rng(0)
x = rng.standard_normal((40, 4)).astype(np.float32)
t = rng.integers(0, 4, 40)
with lossd.LossClient(TARGET) as c:
    r = c.evaluate(x, t, per_class=True, diagnostics=True, hardest=3, quantiles=True)
    runs = list(c.evaluate_stream([(x[:15], t[:15]), (x[15:], t[15:])], per_class=True,
                                  diagnostics=True, hardest=3, quantiles=True))
assert runs[-1].running.per_class.to_dict() == r.per_class.to_dict()
assert r.to_dict()["aggregates"]["hardest"][0]["index"] == r.hardest[0].index
try:
    r.per_class.to_pandas()
except ImportError as exc:
    assert "pip install pandas" in str(exc)
else:
    raise AssertionError("to_pandas without pandas")
np.save("x.npy", x)
np.save("t.npy", t)
code = main(["eval", "--target", TARGET, "x.npy", "t.npy", "--report", "r.html", "--top", "2"])
assert code == 2, code
assert "torch" not in sys.modules and "pandas" not in sys.modules
print("client-only ok")
"""


def test_client_without_torch_pandas_matplotlib(server: LossdServer, tmp_path: Path) -> None:
    script = f"TARGET = '127.0.0.1:{server.port}'\n" + textwrap.dedent(CLIENT_ONLY)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "client-only ok" in proc.stdout
    assert "--report needs matplotlib: pip install 'matplotlib>=3.8'" in proc.stderr

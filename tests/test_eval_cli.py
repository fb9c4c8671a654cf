"""`lossd eval` and `lossd losses` against a real server."""

from __future__ import annotations

import csv
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from lossd import LossClient
from lossd._cli import main
from lossd_server.app import LossdServer


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, Path, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1000, 6)).astype(np.float32)
    t = rng.integers(0, 6, 1000)
    w = rng.random(1000).astype(np.float32)
    paths = tmp_path / "x.npy", tmp_path / "t.npy", tmp_path / "w.npy"
    for p, a in zip(paths, (x, t, w), strict=True):
        np.save(p, a)
    return (*paths, x, t, w)


def target(server: LossdServer) -> str:
    return f"127.0.0.1:{server.port}"


def test_eval_streams_files_and_writes_losses(
        server: LossdServer, client: LossClient, files: tuple, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    xp, tp, wp, x, t, w = files
    out = tmp_path / "out" / "losses.npy"
    code = main(["eval", "--target", target(server), "--loss", "cross_entropy", str(xp),
                 str(tp), "--weights", str(wp), "--batch-size", "128", "-o",
                 "label_smoothing=0.1", "--out", str(out), "--top", "3"])
    printed = capsys.readouterr().out
    assert code == 0
    expected = client.evaluate(x, t, weights=w, label_smoothing=0.1)
    assert np.array_equal(np.load(out), expected.per_sample)
    lines = dict(line.split(None, 1) for line in printed.split("\n\n")[0].splitlines())
    assert float(lines["mean"]) == pytest.approx(expected.mean, rel=1e-9)
    assert float(lines["weighted_mean"]) == pytest.approx(expected.weighted_mean, rel=1e-9)
    assert int(lines["count"]) == 1000
    # --top: the server's hardest over the stream, with their targets
    order = sorted(range(1000), key=lambda i: (-float(expected.per_sample[i]), i))[:3]
    rows = printed.split("top 3 hardest samples\n", 1)[1].splitlines()
    assert rows[0].split() == ["index", "loss", "target"]
    assert [int(r.split()[0]) for r in rows[1:4]] == order
    assert [float(r.split()[1]) for r in rows[1:4]] == pytest.approx(
        [float(expected.per_sample[i]) for i in order], rel=1e-5)
    assert [int(r.split()[2]) for r in rows[1:4]] == [int(t[i]) for i in order]


def test_eval_writes_csv_and_reads_pt_and_safetensors(
        server: LossdServer, client: LossClient, files: tuple, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, _, _, x, t, _ = files
    torch.save(torch.from_numpy(x), tmp_path / "x.pt")
    save_file({"labels": t, "other": t[:3]}, str(tmp_path / "t.safetensors"))
    out = tmp_path / "losses.csv"
    code = main(["eval", "--target", target(server), str(tmp_path / "x.pt"),
                 f"{tmp_path / 't.safetensors'}:labels", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    with out.open() as f:
        rows = list(csv.DictReader(f))
    expected = client.evaluate(x, t).per_sample
    assert len(rows) == 1000
    assert np.array_equal(np.array([float(r["loss"]) for r in rows], np.float32), expected)


def test_eval_extra_inputs_and_no_targets(server: LossdServer, client: LossClient,
                                          tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(8)
    arrays = {name: rng.standard_normal((300, 4)).astype(np.float32)
              for name in ("x", "t", "positive", "negative")}
    arrays["var"] = rng.random((300, 4)).astype(np.float32)
    for name, arr in arrays.items():
        np.save(tmp_path / f"{name}.npy", arr)
    out = tmp_path / "g.npy"
    assert main(["eval", "--target", target(server), "--loss", "gaussian_nll_loss",
                 str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "--input",
                 f"var={tmp_path / 'var.npy'}", "--batch-size", "64", "-o", "full=true",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    want = client.evaluate(arrays["x"], arrays["t"], loss="gaussian_nll_loss",
                           inputs={"var": arrays["var"]}, full=True)
    assert np.array_equal(np.load(out), want.per_sample)
    capsys.readouterr()
    assert main(["eval", "--target", target(server), "--loss", "triplet_margin_loss",
                 str(tmp_path / "x.npy"), "-i", f"positive={tmp_path / 'positive.npy'}",
                 "-i", f"negative={tmp_path / 'negative.npy'}", "--out", str(out)]) == 0
    want = client.evaluate(arrays["x"], loss="triplet_margin_loss",
                           inputs={"positive": arrays["positive"],
                                   "negative": arrays["negative"]})
    assert np.array_equal(np.load(out), want.per_sample)
    assert re.search(r"^count +300$", capsys.readouterr().out, re.M)


@pytest.mark.parametrize("case", ["missing", "mismatch", "format", "ambiguous", "input",
                                  "input-length"])
def test_eval_local_input_errors_exit_2(server: LossdServer, files: tuple, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str], case: str) -> None:
    xp, tp, _, _, t, _ = files
    if case == "missing":
        args, needle = [str(tmp_path / "nope.npy"), str(tp)], "no such file"
    elif case == "mismatch":
        np.save(tmp_path / "short.npy", t[:10])
        args, needle = [str(xp), str(tmp_path / "short.npy")], "targets has 10 samples"
    elif case == "format":
        (tmp_path / "x.txt").write_text("1")
        args, needle = [str(tmp_path / "x.txt"), str(tp)], "unknown format"
    elif case == "ambiguous":
        save_file({"a": t, "b": t}, str(tmp_path / "two.safetensors"))
        args, needle = [str(xp), str(tmp_path / "two.safetensors")], "holds 2 tensors"
    elif case == "input":
        args, needle = [str(xp), str(tp), "--input", "var"], "--input 'var': expected name=FILE"
    else:
        np.save(tmp_path / "short.npy", t[:10])
        args = [str(xp), str(tp), "--input", f"var={tmp_path / 'short.npy'}"]
        needle = "input var has 10 samples, predictions 1000"
    assert main(["eval", "--target", target(server), *args]) == 2
    assert needle in capsys.readouterr().err


def test_eval_server_rejection_exits_1(server: LossdServer, files: tuple, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    xp, _, _, _, t, _ = files
    np.save(tmp_path / "bad.npy", t + 6)
    assert main(["eval", "--target", target(server), str(xp), str(tmp_path / "bad.npy")]) == 1
    assert "targets: class index" in capsys.readouterr().err


def test_eval_unreachable_server_exits_3(files: tuple,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    xp, tp, *_ = files
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["eval", "--target", f"127.0.0.1:{port}", "--timeout", "5", str(xp),
                 str(tp)]) == 3
    assert "cannot reach" in capsys.readouterr().err


def test_losses_prints_the_catalogue(server: LossdServer,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["losses", "--target", target(server)]) == 0
    out = capsys.readouterr().out
    for name in ("cross_entropy", "kl_div", "poisson_nll_loss"):
        assert f"{name}:" in out
    assert "label_smoothing: float = 0.0" in out

"""Make docs/command-line.md's sample report: a real server, an imbalanced synthetic
evaluation set, ``lossd eval --report``, and a headless-Chromium screenshot of the page.

    .venv/bin/python scripts/sample_report.py            # writes docs/report.png
    .venv/bin/python scripts/sample_report.py --html /tmp/report.html   # keep the page too

The data: 20 000 samples of 10 classes with a long-tailed class distribution, logits of a
model that is good on frequent classes, worse and over-confident on rare ones, and a few
mislabelled samples (confidently "wrong" labels), so every section has something to show.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_data(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    n, c = 20_000, 10
    freq = np.arange(1, c + 1, dtype=np.float64) ** -1.3
    t = rng.choice(c, size=n, p=freq / freq.sum())
    skill = np.linspace(3.0, 0.6, c)[t]  # frequent classes are learnt better
    x = rng.standard_normal((n, c)).astype(np.float32) * 1.4
    x[np.arange(n), t] += (skill * rng.uniform(0.5, 1.5, n)).astype(np.float32)
    x *= 1.6  # over-confident
    wrong = rng.choice(n, 60, replace=False)
    t[wrong] = (t[wrong] + rng.integers(1, c, 60)) % c  # mislabelled samples
    xp, tp = folder / "logits.npy", folder / "labels.npy"
    np.save(xp, x)
    np.save(tp, t)
    return xp, tp


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png")
    parser.add_argument("--html", type=Path, default=None, help="also keep the HTML here")
    parser.add_argument("--height", type=int, default=3400)
    a = parser.parse_args()

    from lossd._cli import main as lossd
    from tests import chromium
    from tests.conftest import start_server

    srv = start_server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            xp, tp = make_data(Path(tmp))
            page = a.html or Path(tmp) / "report.html"
            code = lossd(["eval", "--target", f"127.0.0.1:{srv.port}", str(xp), str(tp),
                          "--batch-size", "4096", "--report", str(page), "--no-progress"])
            if code:
                return code
            a.out.parent.mkdir(parents=True, exist_ok=True)
            chromium.screenshot(page, a.out, width=1200, height=a.height)
    finally:
        srv.stop(0)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

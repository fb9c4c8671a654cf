"""``lossd eval --report``: the HTML page, rendered in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lossd._cli import main
from lossd_server.app import LossdServer
from tests import chromium

# Appended to a copy of the report: at the load event (every image loaded and decoded by
# then, or broken), each image's state as JSON.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const out = document.createElement("pre");
  out.id = "lossd-probe";
  out.textContent = JSON.stringify(images.map(i => ({alt: i.alt, complete: i.complete,
    width: i.naturalWidth, height: i.naturalHeight})));
  document.body.appendChild(out);
});
</script>"""


def _files(tmp_path: Path) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(12)
    n, c = 3000, 12
    p = np.arange(1, c + 1, dtype=np.float64) ** -1.2
    t = rng.choice(c, size=n, p=p / p.sum())
    x = rng.standard_normal((n, c)).astype(np.float32)
    x[np.arange(n), t] += rng.uniform(0, 4, n).astype(np.float32)
    w = rng.random(n).astype(np.float32)
    paths = tmp_path / "logits.npy", tmp_path / "labels.npy", tmp_path / "w.npy"
    for path, a in zip(paths, (x, t, w), strict=True):
        np.save(path, a)
    return paths


def _report(server: LossdServer, tmp_path: Path, *extra: str) -> Path:
    xp, tp, wp = _files(tmp_path)
    page = tmp_path / "report.html"
    code = main(["eval", "--target", f"127.0.0.1:{server.port}", str(xp), str(tp),
                 "--weights", str(wp), "--batch-size", "700", "--report", str(page),
                 "--no-progress", *extra])
    assert code == 0
    return page


def _images(html: str) -> list[tuple[str, bytes]]:
    return [(alt, base64.b64decode(data)) for alt, data in re.findall(
        r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)">', html)]


def test_report_is_self_contained(server: LossdServer, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    page = _report(server, tmp_path, "--top", "5")
    html = page.read_text()
    out = capsys.readouterr().out
    assert "report: " in out and "top 5 hardest samples" in out
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert "<link" not in html
    images = _images(html)
    assert [alt for alt, _ in images] == ["loss histogram", "per-class count and mean loss",
                                          "reliability diagram"]
    for _, png in images:
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 200
    for section in ("Summary", "Loss distribution", "Per class", "Accuracy and calibration",
                    "Hardest samples (5)"):  # as many as --top printed
        assert f"<h2>{section}</h2>" in html
    assert "accuracy (top-1)" in html and "top-5 accuracy" in html and "ECE (15 bins)" in html


NAMES = [f"class-{chr(ord('a') + i)}<{i}>" for i in range(12)]


@pytest.mark.parametrize("as_file", [False, True], ids=["list", "file"])
def test_class_names_label_the_report_and_the_hardest(
        server: LossdServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        as_file: bool) -> None:
    """Issue 21: ``--class-names a,b,c`` (or a file, one name a line) names the classes in
    the report's per-class table and hardest samples, and in the printed hardest table."""
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES) + "\n")
    page = _report(server, tmp_path, "--top", "5", "--class-names",
                   str(names) if as_file else ",".join(NAMES))
    html = page.read_text()
    table = html[html.index("<h2>Per class</h2>"):html.index("<h2>Accuracy and calibration")]
    cells = re.findall(r'<td class="k">([^<]*)</td>', table)
    assert cells and all(c.replace("&lt;", "<").replace("&gt;", ">") in NAMES for c in cells)
    hardest = html[html.index("<h2>Hardest samples (5)</h2>"):]
    assert sum(hardest.count(f"<td>{n.replace('<', '&lt;').replace('>', '&gt;')}</td>")
               for n in NAMES) >= 5  # targets (and predictions) by name
    printed = capsys.readouterr().out
    assert any(n in printed for n in NAMES)


def test_class_names_flag_errors_are_usage_errors(server: LossdServer, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    xp, tp, _ = _files(tmp_path)
    assert main(["eval", "--target", f"127.0.0.1:{server.port}", str(xp), str(tp),
                 "--class-names", "a,b,a"]) == 2
    assert "--class-names: 'a' given twice" in capsys.readouterr().err


def test_report_for_values_has_no_class_sections(server: LossdServer, tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    np.save(tmp_path / "x.npy", rng.standard_normal((500, 3)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.standard_normal((500, 3)).astype(np.float32))
    page = tmp_path / "r.html"
    assert main(["eval", "--target", f"127.0.0.1:{server.port}", "--loss", "mse_loss",
                 str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), "--report",
                 str(page)]) == 0
    html = page.read_text()
    assert [alt for alt, _ in _images(html)] == ["loss histogram"]
    assert "<h2>Per class</h2>" not in html and "<h2>Hardest samples (20)</h2>" in html


def test_report_renders_in_chromium(server: LossdServer, tmp_path: Path) -> None:
    page = _report(server, tmp_path)
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium.dump_dom(probed, budget_ms=20000)
    found = re.search(r'<pre id="lossd-probe">(.*?)</pre>', dom, flags=re.S)
    assert found, dom[-2000:]
    states = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    sizes = []
    for _, png in _images(page.read_text()):
        with Image.open(io.BytesIO(png)) as im:
            sizes.append((im.width, im.height))
    assert [s["alt"] for s in states] == ["loss histogram", "per-class count and mean loss",
                                          "reliability diagram"]
    assert all(s["complete"] for s in states)
    assert [(s["width"], s["height"]) for s in states] == sizes  # decoded, at full size
    assert "lossd evaluation: cross_entropy" in dom

    shot = chromium.screenshot(page, tmp_path / "shot.png", width=1200, height=2400)
    with Image.open(shot) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert rgb.shape[:2] == (2400, 1200)
    # The plots drew: their bar colours cover real areas of the page.
    for colour in ((0x4C, 0x72, 0xB0), (0xDD, 0x84, 0x52), (0x55, 0xA8, 0x68)):
        near = (np.abs(rgb - np.array(colour)).sum(axis=2) < 30).sum()
        assert near > 2000, (colour, near)

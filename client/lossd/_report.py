"""``lossd eval --report``: one self-contained HTML page about an evaluation.

The page holds everything inline (PNG images as data URIs, CSS in the head; no script, no
external resource), so it can be mailed, attached to a CI run or opened offline. Sections:
summary; loss histogram (log-scaled counts) with the quantiles marked; per class, count
and mean loss side by side (accuracy beside them) and the classes with the highest mean
loss; accuracy and calibration (reliability diagram) where targets are classes; quantiles;
the hardest samples.

Plots need matplotlib (lossd's ``report`` extra): ``pip install 'matplotlib>=3.8'``.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lossd._result import Aggregates

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #1d2330; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #d8dce4; padding-bottom: 0.2em; }
.meta { color: #5b6475; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { padding: 0.25em 0.8em; text-align: right; border-bottom: 1px solid #eceef2; }
th { background: #f4f6f9; }
td.k, th.k { text-align: left; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 1em 0; }
.card { border: 1px solid #d8dce4; border-radius: 6px; padding: 0.6em 1em; min-width: 9em; }
.card .v { font-size: 1.4em; font-weight: 600; }
.card .l { color: #5b6475; font-size: 0.8em; }
.note { color: #5b6475; font-size: 0.85em; }
"""


class ReportError(Exception):
    """The report cannot be made (matplotlib missing)."""


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ReportError("--report needs matplotlib: pip install 'matplotlib>=3.8' (lossd's "
                          "report extra; see docs/install.md)") from None
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure


def check() -> None:
    """Raise :class:`ReportError` unless the report can be drawn."""
    _matplotlib()


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        return f"{v:.6g}"
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], first_left: bool = True
           ) -> str:
    cls = ' class="k"' if first_left else ""
    head = "".join(f"<th{cls if i == 0 else ''}>{html.escape(h)}</th>"
                   for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls if i == 0 else ''}>{_fmt(v)}</td>"
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _card(label: str, value: Any) -> str:
    return f'<div class="card"><div class="v">{_fmt(value)}</div><div class="l">' \
           f"{html.escape(label)}</div></div>"


def loss_histogram(figure: Any, losses: np.ndarray, a: Aggregates) -> str:
    finite = losses[np.isfinite(losses)].astype(np.float64)
    fig = figure(figsize=(10, 3.6))
    ax = fig.add_subplot()
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 61)
        ax.hist(finite, bins=bins, color="#4c72b0", edgecolor="white", linewidth=0.3)
        ax.set_yscale("log")
        if a.quantiles is not None:
            for level, value in a.quantiles.items():
                if math.isfinite(value):
                    ax.axvline(value, color="#c44e52", linestyle="--", linewidth=1)
                    ax.annotate(f"q{level:g}", (value, 1), xycoords=("data", "axes fraction"),
                                xytext=(2, -12), textcoords="offset points", fontsize=8,
                                color="#c44e52")
    ax.set_xlabel("per-sample loss")
    ax.set_ylabel("samples (log scale)")
    ax.set_title(f"Loss histogram ({finite.size:,} finite losses)")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def per_class_plot(figure: Any, a: Aggregates, max_classes: int = 60) -> tuple[str, str]:
    """Count and mean loss (and accuracy) per class, side by side, classes by count."""
    pc = a.per_class
    assert pc is not None
    order = np.argsort(-pc.count, kind="stable")
    shown = order[:max_classes]
    note = "" if len(order) <= max_classes else (
        f"The {max_classes} most frequent of {len(order)} classes present are shown.")
    panels = 3 if pc.accuracy is not None else 2
    fig = figure(figsize=(11, 3.8))
    axes = fig.subplots(1, panels, sharey=True)
    names = pc.labels
    labels = [str(names[i]) for i in shown]
    y = np.arange(len(shown))
    axes[0].barh(y, pc.count[shown], color="#4c72b0")
    axes[0].set_xlabel("samples")
    axes[0].set_title("count per class")
    axes[1].barh(y, pc.mean[shown], color="#dd8452")
    axes[1].set_xlabel("mean loss")
    axes[1].set_title("mean loss per class")
    if a.mean is not None and math.isfinite(a.mean):
        axes[1].axvline(a.mean, color="#333", linestyle=":", linewidth=1)
    if pc.accuracy is not None:
        axes[2].barh(y, pc.accuracy[shown], color="#55a868")
        axes[2].set_xlim(0, 1)
        axes[2].set_xlabel("accuracy")
        axes[2].set_title("accuracy per class")
        if a.accuracy is not None:
            axes[2].axvline(a.accuracy, color="#333", linestyle=":", linewidth=1)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels, fontsize=7 if len(shown) > 25 else 9)
    axes[0].invert_yaxis()
    axes[0].set_ylabel("class (most frequent first)")
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig), note


def reliability_plot(figure: Any, a: Aggregates) -> str:
    cal = a.calibration
    assert cal is not None
    centers = (cal.edges[:-1] + cal.edges[1:]) / 2
    width = cal.edges[1] - cal.edges[0]
    fig = figure(figsize=(10, 4))
    ax, hx = fig.subplots(1, 2)
    acc = np.nan_to_num(cal.accuracy)
    conf = np.where(cal.count > 0, cal.confidence, centers)
    ax.bar(centers, acc, width=width * 0.95, color="#4c72b0", label="accuracy")
    ax.bar(centers, conf - acc, bottom=acc, width=width * 0.95, color="#c44e52", alpha=0.35,
           label="gap to confidence")
    ax.plot([0, 1], [0, 1], color="#333", linestyle="--", linewidth=1, label="perfect")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (ECE {cal.ece:.4f})")
    ax.legend(loc="upper left", fontsize=8)
    hx.bar(centers, cal.count, width=width * 0.95, color="#8172b2")
    hx.set_xlim(0, 1)
    hx.set_xlabel("confidence")
    hx.set_ylabel("samples")
    hx.set_title("Confidence histogram")
    fig.tight_layout()
    return _png(fig)


def render(*, loss: str, aggregates: Aggregates, losses: np.ndarray | None,
           options: Mapping[str, Any], sources: Mapping[str, str], target: str,
           samples: int) -> str:
    """The report's HTML. ``aggregates``: the stream's running aggregates and analyses;
    ``losses``: every per-sample loss (for the histogram; None where they were not kept,
    as in a merge of saved results: the quantiles stand for the distribution)."""
    figure = _matplotlib()
    a = aggregates
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<h1>lossd evaluation: {html.escape(loss)}</h1>",
             f'<p class="meta">{html.escape(", ".join(f"{k}: {v}" for k, v in sources.items()))}'
             + (f" · server {html.escape(target)}" if target else "") + f" · {when}"
             + (f" · options {html.escape(', '.join(f'{k}={v}' for k, v in options.items()))}"
                if options else "") + "</p>"]

    cards = [_card("samples", samples), _card("counted", a.count), _card("mean loss", a.mean)]
    if a.weighted_mean is not None:
        cards.append(_card("weighted mean loss", a.weighted_mean))
    if a.accuracy is not None:
        cards.append(_card("accuracy (top-1)", a.accuracy))
    for k, v in (a.top_k_accuracy or {}).items():
        if k != 1:
            cards.append(_card(f"top-{k} accuracy", v))
    if a.ece is not None:
        cards.append(_card("ECE (15 bins)", a.ece))
    if a.quantiles is not None:
        cards.append(_card("max loss", a.quantiles.max))
    parts.append('<div class="cards">' + "".join(cards) + "</div>")

    rows: list[tuple[str, Any]] = [("count", a.count), ("sum", a.sum), ("mean", a.mean)]
    if a.weighted_mean is not None:
        rows += [("weighted_sum", a.weighted_sum), ("weighted_mean", a.weighted_mean),
                 ("weight_sum", a.weight_sum)]
    rows += [("ignored", a.ignored), ("omitted", a.omitted)]
    parts += ["<h2>Summary</h2>", _table(["aggregate", "value"], rows)]

    parts.append("<h2>Loss distribution</h2>")
    if losses is not None:
        parts.append(_img(loss_histogram(figure, losses, a), "loss histogram"))
    else:
        parts.append('<p class="note">Per-sample losses are not kept in a merged result; '
                     "the quantiles below describe their distribution.</p>")
    if a.quantiles is not None:
        q = a.quantiles
        qrows = [*[(f"q{level:g}", value) for level, value in q.items()],
                 ("min", q.min), ("max", q.max)]
        parts.append(_table(["quantile", "loss"], qrows))
        parts.append(f'<p class="note">From the server\'s sketch over {q.count:,} losses: each '
                     f"quantile within {q.relative_accuracy:.3%} of the exact one; min and max "
                     "exact." + (f" {q.nan_count} NaN losses left out." if q.nan_count else "")
                     + "</p>")

    if a.per_class is not None and len(a.per_class):
        pc = a.per_class
        image, note = per_class_plot(figure, a)
        parts += ["<h2>Per class</h2>", _img(image, "per-class count and mean loss")]
        if note:
            parts.append(f'<p class="note">{html.escape(note)}</p>')
        worst = np.argsort(-np.nan_to_num(pc.mean, nan=np.inf), kind="stable")[:20]
        header = ["class", "count", "share", "mean loss"]
        if pc.accuracy is not None:
            header.append("accuracy")
        crows = []
        names = pc.labels
        for i in worst:
            row: list[Any] = [names[i], int(pc.count[i]),
                              f"{pc.count[i] / max(1, int(pc.count.sum())):.2%}",
                              float(pc.mean[i])]
            if pc.accuracy is not None:
                row.append(float(pc.accuracy[i]))
            crows.append(row)
        parts += [f"<p>Classes with the highest mean loss ({len(worst)} of {len(pc)}):</p>",
                  _table(header, crows)]

    if a.calibration is not None:
        parts += ["<h2>Accuracy and calibration</h2>",
                  _img(reliability_plot(figure, a), "reliability diagram")]
        cal = a.calibration
        brows = [(f"({cal.edges[b]:.3f}, {cal.edges[b + 1]:.3f}]", int(cal.count[b]),
                  float(cal.accuracy[b]), float(cal.confidence[b]))
                 for b in range(len(cal.count)) if cal.count[b]]
        parts.append(_table(["confidence bin", "samples", "accuracy", "mean confidence"],
                            brows))

    if a.hardest is not None:
        h = a.hardest
        header = ["index", "loss"]
        extra = [name for name in ("target", "predicted", "confidence")
                 if any(getattr(s, name) is not None for s in h)]
        hrows = [[s.index, s.loss, *[getattr(s, f"{name}_name", None) or getattr(s, name)
                                     for name in extra]] for s in h]
        parts += [f"<h2>Hardest samples ({len(h)})</h2>",
                  '<p class="note">The samples with the largest loss over the whole stream '
                  "(index: position from the first sample), exact.</p>",
                  _table(header + extra, hrows)]

    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>lossd report: {html.escape(loss)}</title><style>{_CSS}</style></head>"
            f"<body>\n{body}\n</body></html>\n")

"""Reports a person reads: Markdown with PNG plots, written to any location.

A report is a folder ``<root>/<name>-<time>/`` holding ``report.md`` and its figures; the
Markdown names the figures by relative path, so the folder can be copied or browsed as is.
"""

from __future__ import annotations

import datetime as _dt
import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from .store.location import Location, location


def _plt():
    """matplotlib's pyplot on the Agg backend (files only), imported when a figure is drawn: a report
    without figures (a bulk erasure without verification) does not pay its ~0.5 s import."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@dataclass
class Report:
    """Sections of Markdown and figures, written by :meth:`write`."""

    title: str
    parts: list[str] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)

    def text(self, markdown: str) -> Report:
        self.parts.append(markdown.strip() + "\n")
        return self

    def table(self, header: Sequence[str], rows: Sequence[Sequence]) -> Report:
        lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
        lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
        return self.text("\n".join(lines))

    def figure(self, name: str, fig, caption: str) -> Report:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        _plt().close(fig)
        self.figures[f"{name}.png"] = buf.getvalue()
        return self.text(f"![{caption}]({name}.png)\n\n*{caption}*")

    def write(self, root: str | Location, name: str) -> Location:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        folder = location(root).join(f"{name}-{stamp}-{uuid.uuid4().hex[:4]}")  # reports never collide
        for fname, raw in self.figures.items():
            folder.join(fname).write_bytes(raw)
        body = f"# {self.title}\n\n_generated {stamp}_\n\n" + "\n".join(self.parts)
        folder.join("report.md").write_text(body)
        return folder.join("report.md")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return md(str(v))


_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_{}[]()#+!|~"} | {"<": "&lt;", ">": "&gt;", "&": "&amp;"})


def md(text: str, limit: int = 200) -> str:
    """``text`` (something a user wrote: a request id, a file name, a reason quoting them) as literal
    Markdown: special characters escaped, HTML defused, line breaks and control characters as spaces,
    at most ``limit`` characters. Table cells are escaped this way always."""
    flat = "".join(" " if (ord(c) < 32 or ord(c) == 127) else c for c in str(text))
    if len(flat) > limit:
        flat = flat[: limit - 1] + "…"
    return flat.translate(_MD_SPECIAL)


def bars(labels: Sequence[str], values: Sequence[float], ylabel: str, title: str):
    fig, ax = _plt().subplots(figsize=(5.5, 3.2))
    ax.bar(list(labels), list(values), color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(values)])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


def histogram(values, xlabel: str, title: str, bins: int = 40, vline: float | None = None, log: bool = False):
    fig, ax = _plt().subplots(figsize=(5.5, 3.2))
    ax.hist(list(map(float, values)), bins=bins, color="#4c72b0", log=log)
    if vline is not None:
        ax.axvline(vline, color="#c44e52", linestyle="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    return fig


def line(x, ys: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str, logy: bool = False):
    fig, ax = _plt().subplots(figsize=(5.5, 3.2))
    for label, y in ys.items():
        ax.plot(list(x), list(map(float, y)), label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(ys) > 1:
        ax.legend()
    return fig


def estimate_vs_truth(estimates, errors, title: str = "Error estimate against the exact error"):
    """The sampled requests' error estimates (x) against their errors measured by exact retraining
    (y), log-log, with the diagonal: points below it are covered (estimate >= truth). Requests with a
    non-finite or zero value are left out (a log scale has no place for them); the title says how many."""
    import math
    pairs = [(float(e), float(t)) for e, t in zip(estimates, errors)]
    shown = [(e, t) for e, t in pairs if math.isfinite(e) and math.isfinite(t) and e > 0 and t > 0]
    fig, ax = _plt().subplots(figsize=(4.6, 4.0))
    if shown:
        xs, ys = zip(*shown)
        ax.scatter(xs, ys, s=12, color="#4c72b0")
        lo, hi = min(min(xs), min(ys)), max(max(xs), max(ys))
        ax.plot([lo, hi], [lo, hi], color="#c44e52", linestyle="--", label="estimate = truth")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    covered = sum(e >= t for e, t in pairs)
    ax.set_xlabel("error estimate")
    ax.set_ylabel("error against exact retraining")
    left = len(pairs) - len(shown)
    ax.set_title(f"{title}\n{covered} of {len(pairs)} covered" + (f"; {left} not plotted" if left else ""),
                 fontsize=10)
    return fig


def intervals(y_true, lower, upper, prediction, title: str, limit: int = 60):
    """Prediction intervals of the first ``limit`` test points (sorted by prediction), with the truth."""
    import torch
    order = torch.argsort(prediction)[:limit] if len(prediction) <= limit else \
        torch.argsort(prediction)[torch.linspace(0, len(prediction) - 1, limit).long()]
    fig, ax = _plt().subplots(figsize=(6.5, 3.4))
    xs = range(len(order))
    ax.vlines(xs, lower[order].tolist(), upper[order].tolist(), color="#4c72b0", alpha=0.6, label="interval")
    ax.plot(xs, prediction[order].tolist(), ".", color="#4c72b0", label="prediction")
    if y_true is not None:
        ax.plot(xs, y_true[order].tolist(), "x", color="#c44e52", label="truth")
    ax.set_xlabel("test points (sorted by prediction)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig

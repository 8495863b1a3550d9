"""Small PNG charts for reports (importance bars, quality curves), drawn with matplotlib's Agg backend.

matplotlib is an optional dependency (extra ``plot``): it is imported only when a chart is drawn, and
when it is missing the chart is skipped with a warning and the functions return None.

Example:
    >>> path = bar_chart("importance.png", ["L0", "L1"], [0.4, 0.1], title="importance")  # doctest: +SKIP
    >>> line_chart("sweep.png", [1, 2], {"bits/byte": [2.1, 2.4]}, xlabel="layers removed")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["bar_chart", "line_chart", "scatter_chart"]

log = logging.getLogger(__name__)


def _pyplot() -> Any | None:
    """pyplot on the non-interactive Agg backend, or None (with a warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # never open windows or need a display: reports are written headless
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping the plot (pip install 'slmopt[plot]')")
        return None
    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)  # figures are global state in pyplot; close so long runs do not accumulate them
    return out


def bar_chart(
    path: str | Path,
    labels: Sequence[str],
    values: Sequence[float],
    title: str = "",
    ylabel: str = "",
    xlabel: str = "",
    highlight: Sequence[int] = (),
    muted: Sequence[int] = (),
) -> Path | None:
    """Writes a bar chart PNG; returns its path, or None when matplotlib is missing.

    Args:
        path: the PNG file to write (parent folders are created).
        labels: one label per bar.
        values: one height per bar.
        title / ylabel / xlabel: chart title and axis labels.
        highlight: bar indices drawn in a warning colour (e.g. removed layers).
        muted: bar indices drawn grey (e.g. protected layers).

    Example:
        >>> bar_chart("out/imp.png", ["L0", "L1", "L2"], [0.3, 0.05, 0.1], highlight=[1])  # doctest: +SKIP
        PosixPath('out/imp.png')
    """
    if len(labels) != len(values):
        raise ValueError(f"{len(labels)} labels for {len(values)} values")
    plt = _pyplot()
    if plt is None:
        return None
    colors = [
        "tab:red" if i in highlight else "tab:gray" if i in muted else "tab:blue" for i in range(len(values))
    ]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(values) + 2.0), 3.2))
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, rotation=45 if len(values) > 12 else 0)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def line_chart(
    path: str | Path,
    xs: Sequence[float],
    series: Mapping[str, Sequence[float]],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
) -> Path | None:
    """Writes a line chart PNG with one marked line per series; returns its path or None.

    Example:
        >>> line_chart("out/sweep.png", [0, 1, 2], {"bits/byte": [1.9, 2.0, 2.3]})  # doctest: +SKIP
        PosixPath('out/sweep.png')
    """
    for name, ys in series.items():
        if len(ys) != len(xs):
            raise ValueError(f"series {name!r} has {len(ys)} points for {len(xs)} x values")
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    for name, ys in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=name)
    if all(float(x).is_integer() for x in xs):  # counts (layers removed): no 0.5 ticks
        ax.set_xticks(list(xs))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _save(plt, fig, path)


def scatter_chart(
    path: str | Path,
    xs: Sequence[float],
    ys: Sequence[float],
    labels: Sequence[str],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
) -> Path | None:
    """Writes a labelled scatter PNG joined in x order (a Pareto view); returns its path or None.

    Example:
        >>> scatter_chart("out/pareto.png", [0.1, 0.2], [2.4, 2.1], ["0.5", "1"])  # doctest: +SKIP
        PosixPath('out/pareto.png')
    """
    if not len(xs) == len(ys) == len(labels):
        raise ValueError(f"{len(xs)} x, {len(ys)} y and {len(labels)} labels")
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", linestyle=":")
    for x, y, label in zip(xs, ys, labels, strict=True):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)

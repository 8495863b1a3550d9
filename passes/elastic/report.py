"""Writing a fan-out compile: one ``subnet-<name>/`` folder per variant plus a top-level table and plot.

Each subnet folder holds the engine, ``slmopt.json`` and its own ``report.json``/``report.md`` (its pass
reports include the elastic decisions, so ``--replay`` works from either report). The top-level report
adds one row per subnet: parameters, FLOPs/token, measured latency (ms per token at batch 1, 8 tokens,
on the target backend), held-out quality after elastic (before distillation) and of the final engine,
and ``pareto.png`` (quality vs latency; skipped without matplotlib).

Example:
    >>> row = subnet_row("0.5", out / "subnet-0.5", sub_report, elastic_metrics, options)  # doctest: +SKIP
    >>> write_pareto([row], out)  # doctest: +SKIP
    'pareto.png'
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from slmopt.lowering import get_backend
from slmopt.passes.elastic.latency import time_engine

__all__ = ["subnet_row", "write_pareto"]

log = logging.getLogger(__name__)


def _metric(quality: dict[str, Any] | None) -> float | None:
    if not quality:
        return None
    return quality.get("bits_per_byte") or quality.get("nats_per_token")


def subnet_row(name: str, folder: Path, sub_report: Any, elastic: dict[str, Any], options: Any) -> dict:
    """One table row for a lowered subnet (times its engine on the target backend)."""
    engine = get_backend(options.backend).load(folder, threads=options.threads)
    info = elastic["subnets"].get(name, {})
    after = (sub_report.quality or {}).get("after")
    distill = next((p for p in sub_report.passes if p["name"] == "distill"), None)
    return {
        "budget": name,
        "params": sub_report.params_after,
        "fraction": info.get("fraction"),
        "flops_per_token": info.get("flops_per_token"),
        "ms_per_token": time_engine(engine, sub_report.model.get("vocab_size") or 2),
        "quality_elastic": _metric(info.get("quality")),
        "quality_final": _metric(after),
        "distilled": distill is not None,
        "distill_loss": [distill["metrics"]["loss_before"], distill["metrics"]["loss_after"]]
        if distill
        else None,
        "parity_max_abs_diff": sub_report.parity.get("max_abs_diff"),
        "blocks": info.get("blocks"),
        "kv_groups": info.get("kv_groups"),
        "ffn": info.get("ffn"),
        "folder": folder.name,
    }


def write_pareto(rows: list[dict[str, Any]], folder: Path) -> str | None:
    """``pareto.png``: held-out quality vs ms/token per subnet (None without quality or matplotlib)."""
    points = [
        (r["ms_per_token"], r["quality_final"], r["budget"]) for r in rows if r["quality_final"] is not None
    ]
    if not points:
        return None
    from slmopt import plots

    path = plots.scatter_chart(
        folder / "pareto.png", [p[0] for p in points], [p[1] for p in points], [p[2] for p in points],
        title="elastic subnets: quality vs latency", xlabel="ms per token (batch 1)",
        ylabel="held-out bits/byte (or nats/token)",
    )  # fmt: skip
    return None if path is None else Path(path).name

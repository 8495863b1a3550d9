"""The compile report: ``report.json`` for machines and ``report.md`` for humans.

Example:
    >>> r = CompileReport(pipeline="mask-2to4{method=wanda,...}", source="m", backend="onnxruntime")
    >>> "pipeline" in r.to_dict()
    True
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["CompileReport", "tool_versions"]

_TOOLS = ("slmopt", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy")


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class CompileReport:
    """Everything a compile did and measured; the pass reports keep every decision for replay."""

    pipeline: str
    source: str
    backend: str
    model: dict[str, Any] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, str] = field(default_factory=dict)  # how calibration/eval files became samples
    params_before: int = 0
    params_after: int = 0
    parity: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)  # {"before": {...}, "after": {...}}
    latency: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    lowering: dict[str, Any] = field(default_factory=dict)
    subnets: list[dict[str, Any]] = field(default_factory=list)  # fan-out runs: one row per subnet
    phase_seconds: dict[str, float] = field(default_factory=dict)  # wall seconds: load, passes, lower, bench
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=tool_versions)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def write(self, folder: Path) -> None:
        (folder / "report.json").write_text(self.to_json() + "\n")
        (folder / "report.md").write_text(self.to_markdown())

    # ------------------------------------------------------------------------------------------ markdown
    def to_markdown(self) -> str:
        lines = [
            "# slmopt compile report",
            "",
            f"- model: `{self.source}` ({self.model.get('kind', '?')})",
            f"- pipeline: `{self.pipeline}`",
            f"- backend: {self.backend}",
            f"- parameters: {self.params_before:,} → {self.params_after:,}"
            + (f" ({self.params_after / self.params_before:.3f}×)" if self.params_before else ""),
            f"- total time: {self.seconds:.1f} s",
            *[f"- {role} data: {note}" for role, note in self.data.items()],
            "",
            "## Passes",
            "",
            "| pass | changes | coverage | params before | params after | seconds | warnings |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in self.passes:
            warnings = "; ".join(p.get("warnings", [])) or ""
            coverage = (p.get("metrics", {}).get("coverage") or {}).get("text", "-")
            lines.append(
                f"| `{p['options']}` | {len(p['changes'])} | {coverage} | {p['params_before']:,} "
                f"| {p['params_after']:,} "
                f"| {p['seconds']:.2f} | {warnings} |"
            )
        for p in self.passes:
            rows = p.get("metrics", {}).get("layers")
            if rows:
                lines += ["", f"### {p['name']}: per layer", "", *_table(rows)]
        if self.subnets:
            lines += ["", "## Subnets", "", *_subnet_table(self.subnets)]
        if self.parity:
            lines += ["", "## Parity (engine vs transformed torch program)", "", *_kv(self.parity)]
        if self.checks:
            lines += ["", "## Checks", "", *_kv(self.checks)]
        if self.quality:
            lines += ["", "## Quality (held-out)", "", *_quality(self.quality)]
        if self.latency:
            shape = "×".join(map(str, self.latency.get("shape", [])))
            lines += ["", f"## Latency (input {shape}, same backend and threads, interleaved runs)", ""]
            lines += ["```", self.latency.get("table", ""), "```"]
        if self.artifacts:
            lines += ["", "## Artifacts", "", *[f"- {k}: `{v}`" for k, v in self.artifacts.items()]]
        lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in self.versions.items()), ""]
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "×".join(map(str, value))
    return str(value)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    keys = list(rows[0].keys())
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return out


def _kv(values: dict[str, Any]) -> list[str]:
    return [
        f"- {k}: {_fmt(v) if not isinstance(v, dict) else json.dumps(v, default=str)}"
        for k, v in values.items()
    ]


def _quality(quality: dict[str, Any]) -> list[str]:
    before, after = quality.get("before", {}), quality.get("after", {})
    keys = [
        k for k in ("bits_per_byte", "nats_per_token", "perplexity", "tokens") if k in before or k in after
    ]
    out = ["| metric | before | after | change |", "|---|---|---|---|"]
    for k in keys:
        b, a = before.get(k), after.get(k)
        change = f"{100 * (a - b) / b:+.2f} %" if isinstance(a, float) and isinstance(b, float) and b else ""
        out.append(f"| {k} | {_fmt(b)} | {_fmt(a)} | {change} |")
    return out


def _subnet_table(rows: list[dict[str, Any]]) -> list[str]:
    """Quality before/after distillation = after elastic / final engine (bits/byte, else nats/token)."""
    out = [
        "| budget | params | fraction | FLOPs/token | ms/token | quality (elastic) | quality (final) | distilled "
        "| parity | folder |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flops = f"{r['flops_per_token']:,}" if isinstance(r["flops_per_token"], int) else r["flops_per_token"]
        cells = [r["budget"], f"{r['params']:,}", r["fraction"], flops, r["ms_per_token"]]
        cells += [r["quality_elastic"], r["quality_final"], r["distilled"], r["parity_max_abs_diff"]]
        out.append("| " + " | ".join(_fmt(c) for c in cells) + f" | `{r['folder']}/` |")
    out += ["", "Chosen plans (blocks kept, KV groups and FFN neurons per block):", ""]
    out += [f"- {r['budget']}: blocks {r['blocks']}, groups {r['kv_groups']}, ffn {r['ffn']}" for r in rows]
    return out

"""What ``slmopt.compile`` checks and measures on an engine it has just written.

:func:`parity` compares the engine with the Program it was lowered from, :func:`artifact_checks` reads the
written files back (the N:M pattern of the saved ONNX weights), :func:`bench_latency` times the original
against the engine side by side (``report.latency``).

Example:
    >>> # report.parity = parity(program, engine, data, tolerance=1e-4)
    >>> # report.checks = artifact_checks(pipeline, report, out_dir, set(program.graph_module.state_dict()))
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slmopt.memory import release_freed_memory

if TYPE_CHECKING:
    from slmopt.api import CompileOptions
    from slmopt.data.quality import ModelData
    from slmopt.loaders import LoadedModel
    from slmopt.pipeline.parse import Pipeline
    from slmopt.program import Program
    from slmopt.report import CompileReport

__all__ = ["BENCH_SEQ", "artifact_checks", "bench_latency", "parity"]

log = logging.getLogger(__name__)

BENCH_SEQ = 128  # tokens per call of the before/after latency measurement in the report


def bench_latency(
    original: Program | None, folder: Path, loaded: LoadedModel, options: CompileOptions
) -> dict:
    """Latency of the original vs the engine in ``folder`` (``report.latency``), or {} when not asked.

    Without an in-memory ``original`` the bench loads it again from its source (see
    :func:`slmopt.api._reads_original_after_passes`).
    """
    if not options.bench or loaded.info.kind == "module":
        return {}
    from slmopt.bench import bench_model_vs_compiled  # the same measurement `slmopt bench` makes

    release_freed_memory()  # the parity session and friends: the bench opens two engines of its own
    threads = options.threads or torch.get_num_threads()
    seq = min(BENCH_SEQ, loaded.info.max_seq_len or BENCH_SEQ)
    source = original if original is not None else loaded.info.source
    result = bench_model_vs_compiled(source, folder, threads=threads, seq=seq, progress=options.progress)
    return {**result.to_dict(), "table": result.table(), "shape": [1, seq]}


def parity(program: Program, engine: Any, data: ModelData, tolerance: float) -> dict[str, Any]:
    """Max |engine − program| on sample inputs at two shapes (exercises the dynamic dims)."""
    diffs = []
    for inputs in data.parity_inputs(program):
        expected = program(*inputs).float()
        got = engine(*inputs).float()
        if got.shape != expected.shape:
            raise RuntimeError(f"engine output shape {tuple(got.shape)} != program's {tuple(expected.shape)}")
        diffs.append((got - expected).abs().max().item())
    worst = max(diffs)
    if worst > tolerance:
        log.warning("parity %.3g exceeds tolerance %.1g", worst, tolerance)
    return {"max_abs_diff": worst, "tolerance": tolerance, "passed": worst <= tolerance, "shapes": len(diffs)}


def artifact_checks(
    pipeline: Pipeline, report: CompileReport, folder: Path, present: set[str]
) -> dict[str, Any]:
    """Checks on the written artifacts themselves (the N:M pattern read back from the ONNX file)."""
    checks: dict[str, Any] = {}
    onnx_file = report.artifacts.get("onnx")
    masks = [p for p in pipeline.passes if p.name == "mask-2to4"]
    if not masks or not onnx_file:
        return checks
    from slmopt.backends.onnxrt.check import check_nm_onnx

    n, m = masks[0].config.n, masks[0].config.m
    pass_report = next(r for r in report.passes if r["name"] == "mask-2to4")
    # A later pass may have replaced masked weights (fff swaps the FFN linears for a tree): check the rest.
    names = [c["target"] for c in pass_report["changes"] if c["target"] in present]
    result = check_nm_onnx(folder / onnx_file, n=n, m=m, names=names)
    expected = [r for r in result.rows if r.expected]
    checks[f"onnx_{n}to{m}"] = {
        "passed": result.passed(names),
        "weights_checked": len(expected),
        "weights_masked": len(names),
        "min_valid_fraction": min((r.valid_fraction or 0.0 for r in expected), default=None),
        "negative_zeros": sum(r.negative_zeros for r in expected),
    }
    if not result.passed(names):
        raise RuntimeError(f"the saved ONNX does not hold the {n}:{m} pattern:\n{result.table()}")
    return checks

"""What ``slmopt.compile`` checks and measures on an engine it has just written.

:func:`parity` compares the engine with the Program it was lowered from and :func:`bench_latency` times the
original against the engine side by side (``report.latency``). The written files themselves are checked by
their backend (:meth:`slmopt.lowering.Backend.check_artifacts`).

Example:
    >>> # report.parity = parity(program, engine, data, tolerance=1e-4)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slmopt import bench  # the same measurement `slmopt bench` makes
from slmopt.memory import release_freed_memory

if TYPE_CHECKING:
    from slmopt.api import CompileOptions
    from slmopt.data.quality import ModelData
    from slmopt.loaders import LoadedModel
    from slmopt.program import Program

__all__ = ["BENCH_SEQ", "bench_latency", "parity"]

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
    release_freed_memory()  # the parity session and friends: the bench opens two engines of its own
    threads = options.threads or torch.get_num_threads()
    seq = min(BENCH_SEQ, loaded.info.max_seq_len or BENCH_SEQ)
    source = original if original is not None else loaded.info.source
    result = bench.bench_model_vs_compiled(
        source, folder, threads=threads, seq=seq, progress=options.progress
    )
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

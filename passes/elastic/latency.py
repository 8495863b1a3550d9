"""Latency budgets for ``elastic``: measure candidate subnets on the target backend.

"ms per token" is the median wall time of one batch-1 call on an 8-token input, divided by 8, measured
on the engine the target backend builds (lowered into a temporary folder, loaded, warmed up). Candidates
are the smallest feasible subnet (measured first: if it is too slow the budget is infeasible), then the
parameter-budget plans for fractions 1.0, 0.75, 0.5, 0.35, 0.25, 0.15 from the largest down; the first
that meets the budget wins, and measurements are cached.

Example:
    >>> measure_ms_per_token(program, "onnxruntime")  # doctest: +SKIP
    0.21
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from slmopt.analysis.structure import Structure
    from slmopt.passes.elastic.plan import Orders, Plan, PlanScorer
    from slmopt.pipeline.manager import PassContext
    from slmopt.program import Program

__all__ = ["FRACTIONS", "feasible_latency_plan", "measure_ms_per_token", "time_engine"]

FRACTIONS = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15)
TOKENS = 8
REPEATS = 20
MEASURE_OPTIONS: dict[str, dict[str, Any]] = {"onnxruntime": {"generation": False, "verify": False}}


def measure_ms_per_token(program: Program, backend: str, threads: int | None = None) -> float:
    """Median ms per token of ``program`` lowered by ``backend`` (batch 1, 8 tokens)."""
    from slmopt.lowering import get_backend

    impl = get_backend(backend)
    with tempfile.TemporaryDirectory() as tmp:
        # One graph is enough to time: no KV-cache decoder, no parity run.
        impl.lower(program, Path(tmp), dict(MEASURE_OPTIONS.get(backend, {})))
        return time_engine(impl.load(Path(tmp), threads=threads), program.info.vocab_size or 2)


def time_engine(engine: Any, vocab: int) -> float:
    """Median ms per token of a loaded engine at batch 1 on an 8-token input (3 warm-up calls)."""
    ids = torch.randint(0, vocab, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        engine(ids)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        engine(ids)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / TOKENS


def feasible_latency_plan(
    elastic: Any, program: Program, structure: Structure, orders: Orders, scorer: PlanScorer,
    ms: float, total: int, ctx: PassContext,
) -> tuple[Plan, dict[str, Any]]:  # fmt: skip
    """The largest candidate plan whose measured latency is at most ``ms``; ValueError naming the fastest."""
    from slmopt.passes.elastic.plan import cost
    from slmopt.passes.elastic.surgery import extract

    cache: dict[tuple, float] = elastic.__dict__.setdefault("_latency_cache", {})
    measured: list[dict[str, Any]] = []

    def measure(fraction: float, plan: Plan) -> float:
        if plan.key() not in cache:
            sub = program.clone()
            if plan.key() != elastic._full(structure).key():
                extract(sub, structure, plan)
            cache[plan.key()] = measure_ms_per_token(sub, ctx.backend, ctx.threads)
        measured.append({"fraction": fraction, "ms_per_token": cache[plan.key()]})
        return cache[plan.key()]

    # The smallest subnet first: when even it is too slow, say so after one measurement.
    smallest = elastic._smallest(program, structure, orders, total)
    fastest = measure(cost(program, structure, smallest, total)["params"] / total, smallest)
    if fastest > ms:
        raise ValueError(
            f"latency {ms:g} ms/token cannot be met on {ctx.backend}: the smallest feasible latency is "
            f"{fastest:.3g} ms/token (the smallest subnet, batch 1, {TOKENS} tokens)"
        )
    for fraction in FRACTIONS:
        try:
            plan = (
                elastic._full(structure)
                if fraction >= 1
                else elastic._plan_budget(program, structure, orders, scorer, fraction, total)[0]
            )
        except ValueError:
            continue  # below the smallest feasible parameter budget
        if measure(fraction, plan) <= ms:
            return plan, {"loss": scorer.loss(plan), "measured": measured}
    return smallest, {"loss": scorer.loss(smallest), "measured": measured}

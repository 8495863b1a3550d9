"""``mask-2to4`` (alias ``sparsity``): N:M (default 2:4) weight sparsity for the linears inside blocks.

The graph is unchanged; only weights are rewritten, in place, so tied parameters stay tied and the
parameter count is unchanged. Groups of ``m`` run along each weight's reduction (input) dimension: dim 1 of
an ``nn.Linear`` ``[out, in]`` weight, dim 0 of a transposed ``[in, out]`` (GPT-2 Conv1D / ``addmm``) one.

Methods (see :data:`slmopt.passes.sparsity.methods.PRUNE_METHODS`): ``magnitude`` (data-free), ``wanda`` (``|W|·‖X_j‖``)
and ``sparsegpt`` (OBS mask + weight update, the default: it lost the least on every model we measured).
With calibration data, layers are pruned "true sequentially": blocks in order and, inside a block, one
dataflow group at a time (q/k/v → o → gate/up → down), re-collecting input statistics after each group, so
every layer is fitted to the inputs it will see from the already-pruned layers before it. Each group's
statistics come from a fresh run over the calibration data that stops at the group's inputs: nothing is
cached (memory stays bounded by one batch plus one Gram matrix per input), at the price of re-running
the already-pruned prefix: for L blocks of 4 groups, about 2·L forwards over the calibration set in all.

Example:
    >>> from slmopt.pipeline import parse_pipeline
    >>> str(parse_pipeline("sparsity{method=wanda,layers=0,1}"))
    'mask-2to4{method=wanda,n=2,m=4,layers=0,1,roles=,include_lm_head=false,blocksize=128,damp=0.01}'
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from tqdm.auto import tqdm

from slmopt import analysis
from slmopt.analysis.coverage import check_coverage, coverage_text
from slmopt.data.runner import CALIB_BATCH
from slmopt.passes.sparsity.methods import PRUNE_METHODS, relative_output_error, relative_weight_error
from slmopt.passes.sparsity.stats import InputStats, collect_input_stats, dataflow_groups
from slmopt.pipeline.pass_base import Change, Pass, PassReport, PassResult, register_pass
from slmopt.sparsity import NM_HINT, apply_mask, count_negative_zeros, nm_valid_fraction, validate_nm

if TYPE_CHECKING:
    from slmopt.analysis.structure import LinearInfo
    from slmopt.pipeline.manager import PassContext
    from slmopt.program import Program

__all__ = ["BLOCK_ROLES", "Mask2to4"]

log = logging.getLogger(__name__)

# Roles a user may select with ``roles=``; the LM head is opted in with ``include_lm_head`` instead.
BLOCK_ROLES = ("q", "k", "v", "qkv", "o", "up", "gate", "gate_up", "down", "other")

Method = Literal["magnitude", "wanda", "sparsegpt"]


@dataclass
class _Plan:
    """Which linears to mask, and why others were left alone."""

    linears: list[LinearInfo]
    warnings: list[str] = field(default_factory=list)
    coverage: dict[str, Any] = field(default_factory=dict)  # covered/total block linears


@register_pass("mask-2to4", aliases=("sparsity",))
class Mask2to4(Pass):
    """Masks block linears to N:M sparsity along their reduction dimension.

    Example:
        >>> from slmopt.pipeline import PassContext, PassManager, parse_pipeline
        >>> # prog = capture(...); calib = token ids [n, seq]
        >>> # new, reports = PassManager(parse_pipeline("mask-2to4")).run(prog, PassContext(calib=calib))
        >>> # reports[0].metrics["layers"][0]["valid_group_fraction"]  -> 1.0
    """

    # Elastic reorders neurons (permuting the input dim of down projections), which would break groups.
    run_after = ("elastic",)
    # Calibration rows per forward while collecting statistics (memory bound, not a user option).
    calib_batch_size: ClassVar[int] = CALIB_BATCH

    @dataclass(frozen=True)
    class Config:
        method: Method = field(
            default="sparsegpt",
            metadata={"help": "magnitude (data-free), wanda or sparsegpt (needs --calib; best quality)"},
        )
        n: int = field(default=2, metadata={"help": "weights kept in every group of m (0 < n < m)"})
        m: int = field(default=4, metadata={"help": "group size along the reduction (input) dimension"})
        layers: tuple[int, ...] = field(default=(), metadata={"help": "block indices to mask; empty = all"})
        roles: tuple[str, ...] = field(
            default=(), metadata={"help": f"linear roles to mask ({', '.join(BLOCK_ROLES)}); empty = all"}
        )
        include_lm_head: bool = field(default=False, metadata={"help": "also mask the LM head"})
        blocksize: int = field(default=128, metadata={"help": "sparsegpt: columns per lazy-update block"})
        damp: float = field(
            default=0.01, metadata={"help": "sparsegpt: Hessian damping, fraction of mean diag"}
        )

        def __post_init__(self) -> None:
            if self.method not in PRUNE_METHODS:
                raise ValueError(f"method {self.method!r} is not one of {', '.join(PRUNE_METHODS)}")
            validate_nm(self.n, self.m)
            # Python API users may hand in lists; the frozen config keeps hashable tuples.
            object.__setattr__(self, "layers", tuple(self.layers))
            object.__setattr__(self, "roles", tuple(self.roles))
            if any(not isinstance(i, int) or i < 0 for i in self.layers):
                raise ValueError(f"layers must be block indices >= 0, got {list(self.layers)}")
            bad = sorted(set(self.roles) - set(BLOCK_ROLES))
            if bad:
                raise ValueError(f"unknown roles {bad}; valid roles: {', '.join(BLOCK_ROLES)}")
            if self.blocksize <= 0 or self.blocksize % self.m:
                raise ValueError(f"blocksize must be a positive multiple of m={self.m}, got {self.blocksize}")
            if not (math.isfinite(self.damp) and self.damp >= 0):
                raise ValueError(f"damp must be a finite number >= 0, got {self.damp}")

    def __init__(self, config: Any | None = None) -> None:
        super().__init__(config)
        self._masked: list[tuple[str, int]] = []

    # ------------------------------------------------------------------------------------ selection
    def _plan(self, program: Program) -> _Plan:
        cfg = self.config
        structure = analysis.analyze(program)
        in_blocks = [lin for lin in structure.linears if lin.block is not None]
        if not in_blocks:
            notes = "; ".join(structure.unclassified) or "no transformer blocks were recognised"
            raise ValueError(
                f"no linear layers inside transformer blocks found: analysis saw {len(structure.linears)} "
                f"linear(s) and {len(structure.blocks)} block(s) ({notes}); run `slmopt inspect MODEL`"
            )
        coverage = check_coverage(structure, self.name, narrowed=bool(cfg.layers or cfg.roles))
        present = sorted({lin.block for lin in in_blocks if lin.block is not None})
        missing = sorted(set(cfg.layers) - set(present))
        if missing:
            raise ValueError(f"layers {missing} do not exist; this model's blocks are {present}")
        chosen = [
            lin
            for lin in in_blocks
            if (not cfg.layers or lin.block in cfg.layers) and (not cfg.roles or lin.role in cfg.roles)
        ]
        if not chosen:
            roles = sorted({lin.role for lin in in_blocks})
            raise ValueError(
                f"no linear layers inside transformer blocks found with roles {list(cfg.roles)}; "
                f"roles present: {', '.join(roles)}"
            )
        plan = _Plan([])
        recovery = coverage.get("recovery_maps_left_alone", 0)
        coverage.update(covered=len(chosen), text=coverage_text(len(chosen), coverage["total"], recovery))
        plan.coverage = coverage
        if cfg.include_lm_head:
            if structure.lm_head is None:
                plan.warnings.append("include_lm_head: this model has no LM head")
            else:
                chosen.append(structure.lm_head)
        seen: set[str] = set()
        for lin in chosen:
            if lin.weight in seen:
                plan.warnings.append(
                    f"{lin.weight}: used by several linears; masked once ({lin.node} skipped)"
                )
            elif lin.in_features % cfg.m:
                plan.warnings.append(
                    f"{lin.weight}: input size {lin.in_features} is not a multiple of m={cfg.m}; skipped"
                )
            else:
                plan.linears.append(lin)
            seen.add(lin.weight)
        if not plan.linears:
            raise ValueError("no eligible linear layers: " + "; ".join(plan.warnings))
        plan.warnings.extend(_tied_warnings(program, [lin.weight for lin in plan.linears]))
        return plan

    def requires(self, program: Program, ctx: PassContext) -> None:
        self._plan(program)
        if PRUNE_METHODS[self.config.method].needs_calib:
            ctx.require_calib(self.name)

    # ------------------------------------------------------------------------------------ rewrite
    def call(self, program: Program, ctx: PassContext) -> PassResult:
        started = time.perf_counter()
        cfg = self.config
        method = PRUNE_METHODS[cfg.method]
        report = self.new_report(program)
        plan = self._plan(program)
        report.warnings.extend(plan.warnings)
        # Magnitude does not need data, but uses it when given to report the output-space error.
        calib = ctx.require_calib(self.name) if method.needs_calib else ctx.calib
        by_node = {lin.node: lin for lin in plan.linears}
        if calib is None:
            groups = [[lin.node] for lin in plan.linears]
        else:
            groups = dataflow_groups(program.graph, by_node)
        rows: list[dict[str, Any]] = []
        desc = f"{self.name} ({cfg.method})"
        for group in tqdm(groups, desc=desc, disable=not ctx.progress, leave=False):
            stats = {} if calib is None else collect_input_stats(program, group, calib, self.calib_batch_size)
            for node in group:
                rows.append(self._mask_one(program, by_node[node], stats.get(node), report))
        self._masked = [(row["name"], row["axis"]) for row in rows]
        # The promise backends check in what they write (the pattern must survive export).
        program.lowering_hints[NM_HINT] = {
            "n": cfg.n,
            "m": cfg.m,
            "weights": [c.target for c in report.changes],
        }
        report.metrics["layers"] = rows
        report.metrics["coverage"] = plan.coverage
        report.metrics["totals"] = _totals(rows, program)
        log.info(
            "%s: masked %d linears to %d:%d with %s (zero fraction %.3f)",
            self.name,
            len(rows),
            cfg.n,
            cfg.m,
            cfg.method,
            report.metrics["totals"]["zero_fraction"],
        )
        return PassResult(program, self.finish_report(report, program, started))

    def _mask_one(
        self, program: Program, lin: LinearInfo, stats: InputStats | None, report: PassReport
    ) -> dict[str, Any]:
        cfg = self.config
        param = program.param(lin.weight)
        # Pruners work on [out, in]; a transposed weight is stored [in, out].
        # copy=True: a float32 ``.to`` would alias the parameter, which is overwritten in place below.
        dense = (param.detach().T if lin.transposed else param.detach()).to(torch.float32, copy=True)
        pruned = PRUNE_METHODS[cfg.method].prune(
            dense, stats, cfg.n, cfg.m, blocksize=cfg.blocksize, damp=cfg.damp
        )
        stored = (pruned.T if lin.transposed else pruned).to(param.dtype)
        # Casting to a narrow dtype can underflow a kept weight to -0.0; normalise once more.
        stored = apply_mask(stored, stored != 0)
        with torch.no_grad():
            param.copy_(stored)  # in place: tied parameters stay tied, the parameter count is unchanged
        final = (stored.T if lin.transposed else stored).to(torch.float32)
        if stats is not None and stats.gram is not None:
            error, space = relative_output_error(dense, final, stats.gram), "activation"
        else:
            error, space = relative_weight_error(dense, final), "weight"
        axis = 0 if lin.transposed else 1
        row = {
            "name": lin.weight,
            "node": lin.node,
            "block": lin.block,
            "role": lin.role,
            "shape": list(param.shape),
            "method": cfg.method,
            "n": cfg.n,
            "m": cfg.m,
            "axis": axis,
            "valid_group_fraction": nm_valid_fraction(stored, cfg.n, cfg.m, axis=axis),
            "zero_fraction": float((stored == 0).sum()) / stored.numel(),
            "reconstruction_error": error,
            "error_space": space,
            "calib_tokens": stats.count if stats is not None else 0,
        }
        report.changes.append(
            Change(kind="mask", target=lin.weight, detail={k: v for k, v in row.items() if k != "name"})
        )
        return row

    # ------------------------------------------------------------------------------------ check
    def ensures(self, program: Program, ctx: PassContext) -> None:
        cfg = self.config
        for target, axis in self._masked:
            weight = program.param(target)
            fraction = nm_valid_fraction(weight, cfg.n, cfg.m, axis=axis)
            negatives = count_negative_zeros(weight)
            if fraction != 1.0 or negatives:
                # An explicit raise, not assert: the postcondition must hold under ``python -O`` too.
                raise AssertionError(
                    f"{target}: valid {cfg.n}:{cfg.m} group fraction {fraction} on axis {axis} "
                    f"(must be exactly 1.0), {negatives} negative zero(s)"
                )


def _tied_warnings(program: Program, targets: list[str]) -> list[str]:
    """Warns when a weight to be masked shares storage with a parameter that is not being masked."""
    chosen = set(targets)
    by_ptr: dict[int, list[str]] = {}
    for name, p in program.graph_module.named_parameters(remove_duplicate=False):
        by_ptr.setdefault(p.data_ptr(), []).append(name)
    notes = []
    for target in targets:
        others = [
            o for o in by_ptr.get(program.param(target).data_ptr(), []) if o != target and o not in chosen
        ]
        if others:
            notes.append(f"{target} is tied to {', '.join(others)}; masking it masks those too")
    return notes


def _totals(rows: list[dict[str, Any]], program: Program) -> dict[str, Any]:
    masked = sum(math.prod(r["shape"]) for r in rows)
    zeros = sum(r["zero_fraction"] * math.prod(r["shape"]) for r in rows)
    errors = [r["reconstruction_error"] for r in rows]
    return {
        "layers": len(rows),
        "masked_params": masked,
        "zero_params": round(zeros),
        "zero_fraction": zeros / masked if masked else 0.0,
        "model_zero_fraction": zeros / max(program.num_params(), 1),
        "mean_reconstruction_error": sum(errors) / len(errors) if errors else 0.0,
        "max_reconstruction_error": max(errors, default=0.0),
        "error_space": sorted({r["error_space"] for r in rows}),
        "all_valid": all(r["valid_group_fraction"] == 1.0 for r in rows),
    }

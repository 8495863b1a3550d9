"""The ``fff`` pass (alias ``ffn-to-fff``): convert trained dense FFNs into fast-feedforward leaf trees.

Per FFN, in graph order (so each layer's calibration inputs flow through the layers converted before it):
collect the FFN's inputs on calibration tokens, split its neurons into ``2^depth`` balanced leaves
(recursive bisection of co-activation profiles or weight rows), fit one logistic router per tree node,
refit the leaves' outputs in closed form and re-pick each leaf's neurons for the tokens it serves (a few
rounds, re-fitting the routers), distil the tree locally (soft -> hard routing) against the dense FFN's
outputs, and swap the FFN subgraph for one ``slmopt::fff`` op call (plus a small dense path for
``shared`` always-on neurons). The old up/gate/down weights leave the Program.

On tinylm (held-out bits per byte, every FFN converted): depth 2 (1/4 of neurons active) +1.3 %,
depth 3 (1/8) +2.8 %, against DESIGN §4's baseline +5.8 % and +10.5 % (benchmarks/fff_quality.py).

Example:
    >>> from slmopt.pipeline import PassContext, PassManager, parse_pipeline  # doctest: +SKIP
    >>> ctx = PassContext(calib=tokens)  # doctest: +SKIP
    >>> program, reports = PassManager(parse_pipeline("fff{depth=2}")).run(program, ctx)  # doctest: +SKIP
    >>> reports[0].metrics["weights_read_fraction"]  # doctest: +SKIP
    0.26
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import fx

import slmopt.ops  # noqa: F401 - registers torch.ops.slmopt.fff
from slmopt.analysis.analyze import analyze
from slmopt.analysis.coverage import check_coverage
from slmopt.analysis.structure import FFNInfo
from slmopt.data.runner import PrefixCache
from slmopt.passes.fff.convert import (
    PARTITION_FEATURES,
    DenseFFN,
    FFFTree,
    balanced_bisection,
    default_depth,
    leaf_neurons,
    neuron_importance,
    relative_mse,
)
from slmopt.passes.fff.distill import PRECISIONS, distill_tree
from slmopt.passes.fff.fit import LEAF_REFITS, fit_routers, refit_leaves, reselect_leaves, router_accuracy
from slmopt.passes.fff.graph import collect_branch_inputs, replace_ffn
from slmopt.pipeline.pass_base import Change, Pass, PassResult, register_pass

if TYPE_CHECKING:
    from slmopt.pipeline.manager import PassContext
    from slmopt.program import Program

__all__ = ["FFNToFFF", "TreeShape", "convert_ffn", "distill_precision", "native_bf16"]

log = logging.getLogger(__name__)

_MAX_DEPTH = 12
_HELDOUT = 0.1  # share of the collected tokens kept out of fitting to measure the local loss
# Rounds of "re-pick each leaf's neurons for its tokens, refit, re-route" (k-subspace-style clustering);
# on tinylm depth 3 the local loss went 0.099 -> 0.074 -> 0.067 for 0, 1, 3 rounds, 5 rounds 0.066.
_RESELECT_ROUNDS = 3
_SELECT = 0.05  # share used to choose between fitted stages and distillation checkpoints
_PARTITION_TOKENS = 8192  # co-activation profiles: more tokens change the split little and cost O(T)
# bf16 distillation pays only on large matmuls: at tinylm's 512 x 192 a step is overhead-bound and bf16 is
# no faster; at SmolLM2-135M's 1536 x 576 it is ~3x faster (docs/BENCHMARKS.md, issue 14).
_BF16_MIN_WEIGHTS = 1 << 18


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class TreeShape:
    """The resolved tree shape of one layer: depth, neurons per leaf, always-on shared neurons."""

    depth: int
    leaf_width: int
    shared: int


@register_pass("fff", aliases=("ffn-to-fff",))
class FFNToFFF(Pass):
    """Replaces dense FFN sublayers by ``slmopt::fff`` leaf trees fitted on calibration data.

    Example:
        >>> FFNToFFF(FFNToFFF.Config(depth=2, shared=8)).options_string().startswith("fff{depth=2,")
        True
    """

    @dataclass(frozen=True)
    class Config:
        depth: int | None = field(
            default=None,
            metadata={
                "help": "tree depth (2^depth leaves); none = auto: smallest with <= 1/8 of neurons active"
            },
        )
        leaf_width: int | None = field(
            default=None, metadata={"help": "neurons per leaf; none = auto: (width - shared) / 2^depth"}
        )
        shared: int = field(default=0, metadata={"help": "always-on neurons kept dense (CMoE-style)"})
        layers: tuple[int, ...] = field(
            default=(), metadata={"help": "block indices to convert; empty = all"}
        )
        partition: Literal["coactivation", "weights"] = field(
            default="coactivation", metadata={"help": "neuron features the balanced bisection splits on"}
        )
        refit: Literal["lstsq", "bias", "none"] = field(
            default="lstsq", metadata={"help": "closed-form leaf output refit after routing"}
        )
        distill_steps: int = field(default=300, metadata={"help": "local distillation steps per layer"})
        distill_seconds: float | None = field(
            default=None,
            metadata={
                "help": "distillation time budget across all layers; none = unlimited (distill_steps "
                "binds, results are deterministic). A binding budget makes results machine-dependent"
            },
        )
        lr: float = field(default=1e-3, metadata={"help": "distillation learning rate (Adam)"})
        distill_precision: Literal["auto", "float32", "bfloat16"] = field(
            default="auto",
            metadata={
                "help": "dtype of the distillation matmuls; auto = bfloat16 where the CPU multiplies it "
                f"natively (AMX / AVX512-BF16) and the FFN has >= {_BF16_MIN_WEIGHTS} weights per matrix, "
                "else float32"
            },
        )
        lowering: Literal["moe", "ops", "plugin"] = field(
            default="moe", metadata={"help": "backend lowering hint for the fff op"}
        )
        form: Literal["tree"] = field(default="tree", metadata={"help": "FFF design: leaf tree"})
        calib_tokens: int = field(
            default=16384, metadata={"help": "max FFN input tokens collected per layer"}
        )

        def __post_init__(self) -> None:
            if self.depth is not None and not 1 <= self.depth <= _MAX_DEPTH:
                raise ValueError(f"depth must be in 1..{_MAX_DEPTH} (or none = auto), got {self.depth}")
            if self.leaf_width is not None and self.leaf_width < 1:
                raise ValueError(f"leaf_width must be >= 1 (or none = auto), got {self.leaf_width}")
            for name in ("shared", "distill_steps"):
                if getattr(self, name) < 0:
                    raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
            if self.distill_seconds is not None and self.distill_seconds < 0:
                raise ValueError(f"distill_seconds must be >= 0, got {self.distill_seconds}")
            if not self.lr > 0:
                raise ValueError(f"lr must be > 0, got {self.lr}")
            if self.calib_tokens < 16:
                raise ValueError(f"calib_tokens must be >= 16, got {self.calib_tokens}")
            if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers must be distinct block indices >= 0, got {self.layers}")
            _check_choice("partition", self.partition, tuple(PARTITION_FEATURES))
            _check_choice("refit", self.refit, (*LEAF_REFITS, "none"))
            _check_choice("lowering", self.lowering, ("moe", "ops", "plugin"))
            _check_choice("distill_precision", self.distill_precision, ("auto", *PRECISIONS))
            _check_choice("form", self.form, ("tree",))

    # ------------------------------------------------------------------------------------ checks
    def _targets(self, program: Program) -> list[FFNInfo]:
        structure = analyze(program)
        self._coverage = check_coverage(structure, self.name, narrowed=bool(self.config.layers))
        found = [b.ffn for b in structure.blocks if b.ffn is not None]
        if not found:
            raise ValueError("no feed-forward sublayer found; `slmopt inspect` shows what was found")
        if not self.config.layers:
            return found
        by_block = {f.block: f for f in found}
        missing = [i for i in self.config.layers if i not in by_block]
        if missing:
            raise ValueError(f"layers {missing} have no FFN; blocks with an FFN: {sorted(by_block)}")
        return [by_block[i] for i in sorted(self.config.layers)]

    def _shape(self, ffn: FFNInfo) -> TreeShape:
        cfg, width = self.config, ffn.width
        if cfg.shared >= width:
            raise ValueError(
                f"shared={cfg.shared} must be smaller than the FFN width {width} (block {ffn.block})"
            )
        routed = width - cfg.shared
        if cfg.leaf_width is not None and cfg.leaf_width > routed:
            raise ValueError(
                f"leaf_width={cfg.leaf_width} exceeds the FFN width {width}"
                + (f" minus {cfg.shared} shared neurons" if cfg.shared else "")
                + f" (block {ffn.block})"
            )
        depth = cfg.depth
        if depth is None:
            if cfg.leaf_width:
                depth = max(1, math.ceil(math.log2(routed / cfg.leaf_width)))
            else:
                depth = default_depth(width, cfg.shared)
        leaf_width = cfg.leaf_width or math.ceil(routed / 2**depth)
        if 2**depth > routed:
            raise ValueError(
                f"depth {depth} has {2**depth} leaves, more than the {routed} neurons of block {ffn.block}"
            )
        return TreeShape(depth=min(depth, _MAX_DEPTH), leaf_width=leaf_width, shared=cfg.shared)

    def requires(self, program: Program, ctx: PassContext) -> None:
        for ffn in self._targets(program):
            self._shape(ffn)
        ctx.require_calib(self.name)
        if len(program.example_inputs) != 1:
            raise ValueError("fff needs a single-input program (token ids) to run calibration data through")

    def call(self, program: Program, ctx: PassContext) -> PassResult:
        started = time.perf_counter()
        report = self.new_report(program)
        calib = ctx.require_calib(self.name)
        targets = self._targets(program)
        # No time budget by default: a binding wall-clock limit would make the result depend on machine load.
        budget = math.inf if self.config.distill_seconds is None else self.config.distill_seconds
        rows: list[dict[str, Any]] = []
        dense_weights = read_weights = 0.0
        # Layers are converted in graph order: each collection resumes where the previous one stopped
        # (through the fff op just spliced in), so collecting costs one forward in all, not one per layer.
        cache = PrefixCache()
        for k, ffn in enumerate(targets):
            shape = self._shape(ffn)
            dense = DenseFFN.from_program(program, ffn)
            x = collect_branch_inputs(
                program, ffn.branch_input, calib, self.config.calib_tokens, ctx.seed + ffn.block, cache
            )
            share = budget / (len(targets) - k)  # unused time rolls over to later layers
            tree, detail = convert_ffn(
                dense,
                x,
                shape,
                self.config,
                ctx.seed + ffn.block,
                share,
                ctx.progress,
                f"fff block{ffn.block}",
            )
            budget = max(0.0, budget - detail["distill_seconds"])
            replace_ffn(program, ffn, tree, prefix=f"fff.block{ffn.block}")
            report.changes.append(Change(kind="ffn_to_fff", target=f"block{ffn.block}", detail=detail))
            rows.append({"block": ffn.block, **detail})
            mats = 3 if dense.gated else 2
            dense_weights += mats * dense.width * dense.hidden_size
            read_weights += mats * (shape.leaf_width + shape.shared) * dense.hidden_size
            read_weights += shape.depth * (dense.hidden_size + 1)
            log.info(
                "fff block%d: depth %d x %d (+%d shared), local loss %.4f -> %.4f",
                ffn.block,
                shape.depth,
                shape.leaf_width,
                shape.shared,
                detail["local_loss_before"],
                detail["local_loss_after"],
            )
        cache.clear()
        program.lowering_hints["fff_lowering"] = self.config.lowering
        report.metrics["layers"] = rows
        report.metrics["coverage"] = self._coverage
        report.metrics["weights_read_fraction"] = read_weights / max(dense_weights, 1.0)
        return PassResult(program, self.finish_report(report, program, started))

    def ensures(self, program: Program, ctx: PassContext) -> None:
        ops = [n for n in program.graph.nodes if n.target is torch.ops.slmopt.fff.default]
        if not ops:
            raise AssertionError("fff: no slmopt::fff node in the rewritten graph")
        for node in ops:
            if not isinstance(node.args[0], fx.Node):
                raise AssertionError(f"fff: node {node.name} has no tensor input")


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16), so bf16 autocast pays.

    Example:
        >>> isinstance(native_bf16(), bool)
        True
    """
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def distill_precision(config_value: str, dense: DenseFFN) -> str:
    """Resolves ``distill_precision=auto`` for one FFN (see the Config help).

    Example:
        >>> import torch
        >>> distill_precision("float32", DenseFFN(w1=torch.zeros(4, 2), w2=torch.zeros(4, 2), activation="relu"))
        'float32'
    """
    if config_value != "auto":
        return config_value
    large = dense.width * dense.hidden_size >= _BF16_MIN_WEIGHTS
    return "bfloat16" if large and native_bf16() else "float32"


def convert_ffn(
    dense: DenseFFN,
    x: torch.Tensor,
    shape: TreeShape,
    config: FFNToFFF.Config,
    seed: int = 0,
    seconds: float = math.inf,
    progress: bool = False,
    desc: str = "fff",
    objective: str = "expected",
) -> tuple[FFFTree, dict[str, Any]]:
    """Converts one dense FFN into a leaf tree fitted on its calibration inputs ``x [T, h]``.

    Partition -> routers -> closed-form leaf refit and :data:`_RESELECT_ROUNDS` rounds of neuron
    re-selection (re-fitting the routers in between) -> local distillation -> final refit. Stages and
    checkpoints are chosen on a :data:`_SELECT` split; ``local_loss_*`` are relative MSEs (hard routing)
    on a held-out :data:`_HELDOUT` split that nothing is fitted or chosen on.

    Returns:
        ``(tree, detail)`` where ``detail`` is the report row of this layer.

    Example:
        >>> # tree, detail = convert_ffn(dense, x, TreeShape(2, 128, 0), FFNToFFF.Config())
    """
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    n_val = max(1, int(round(_HELDOUT * x.shape[0])))
    n_sel = max(1, int(round(_SELECT * x.shape[0])))
    # Three disjoint splits: fit on `fit`, choose stages/checkpoints on `sel`, report on `val`.
    x_val, x_sel, x_fit = x[perm[:n_val]], x[perm[n_val : n_val + n_sel]], x[perm[n_val + n_sel :]]
    with torch.no_grad():
        y_fit, y_sel, y_val = dense(x_fit), dense(x_sel), dense(x_val)
        a_fit = dense.activations(x_fit)
        importance = neuron_importance(dense, a_fit)
        order = torch.argsort(importance, descending=True, stable=True)
        shared_idx = order[: shape.shared].sort().values
        routed_idx = order[shape.shared :].sort().values
        feats = PARTITION_FEATURES[config.partition](
            dense.select(routed_idx), a_fit[:_PARTITION_TOKENS, routed_idx]
        )
        groups = [routed_idx[g] for g in balanced_bisection(feats, shape.depth)]
        tree = FFFTree.from_dense(dense, leaf_neurons(groups, shape.leaf_width, importance), shared_idx)
        tree = fit_routers(tree, x_fit, y_fit)
        before = relative_mse(tree(x_val), y_val)
        stages = [tree]  # candidates; the one best on `sel` is kept (a stage may overfit a tiny calib set)
        if config.refit != "none":
            # Alternate: leaves fitted to the routing, routers re-fitted to the better leaves, leaves again.
            tree = refit_leaves(tree, x_fit, y_fit, config.refit)
            for _ in range(_RESELECT_ROUNDS):
                tree = refit_leaves(
                    reselect_leaves(tree, dense, x_fit, shared_idx), x_fit, y_fit, config.refit
                )
                tree = fit_routers(tree, x_fit, y_fit)
            tree = refit_leaves(tree, x_fit, y_fit, config.refit)
            stages.append(tree)
        tree = min(stages, key=lambda t: relative_mse(t(x_sel), y_sel))
    distill_started = time.perf_counter()
    tree, steps = distill_tree(
        tree,
        x_fit,
        y_fit,
        x_val=x_sel,
        y_val=y_sel,
        steps=config.distill_steps,
        seconds=seconds,
        lr=config.lr,
        seed=seed,
        progress=progress,
        desc=desc,
        objective=objective,
        precision=distill_precision(config.distill_precision, dense),
    )
    distill_seconds = time.perf_counter() - distill_started
    with torch.no_grad():
        if steps and config.refit != "none":
            stages = [tree, refit_leaves(tree, x_fit, y_fit, config.refit)]
            tree = min(stages, key=lambda t: relative_mse(t(x_sel), y_sel))
        after = relative_mse(tree(x_val), y_val)
        accuracy = router_accuracy(tree, x_val, y_val)
    detail = {
        "depth": shape.depth,
        "leaf_width": shape.leaf_width,
        "leaves": 2**shape.depth,
        "shared": shape.shared,
        "active_fraction": (shape.leaf_width + shape.shared) / dense.width,
        "local_loss_before": before,
        "local_loss_after": after,
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 3),
        "distill_seconds": round(distill_seconds, 3),
        "distill_precision": distill_precision(config.distill_precision, dense),
        "partition": config.partition,
        "router_accuracy": accuracy,
        "tokens": int(x.shape[0]),
    }
    return tree, detail

"""``prune-attn`` (alias ``prune``): remove the least important attention sublayers (or FFNs, or blocks).

Each chosen sublayer's residual add ``h + branch(norm(h))`` is rewired to ``h`` (or to
``h + recovery(norm(h))``) and dead-code elimination then drops the whole branch and its parameters, so the
Program and every lowered artifact hold no trace of it. For post-norm models (BERT) the add becomes ``h``
feeding the same LayerNorm. Importance comes from :data:`slmopt.passes.importance.IMPORTANCE_METRICS`;
recoveries from :data:`RECOVERIES`. The report records scores, every removal and a ``layers=`` replay
string, plus parameters, attention FLOPs and KV-cache bytes per token before/after.

Example:
    >>> from slmopt.pipeline import PassContext, PassManager, parse_pipeline
    >>> pipeline = parse_pipeline("prune-attn{remove=1,metric=cosine,recover=bias}")
    >>> new_program, reports = PassManager(pipeline).run(program, PassContext(calib=ids))  # doctest: +SKIP
    >>> reports[0].metrics["removed"]  # doctest: +SKIP
    [2]
"""

from __future__ import annotations

import logging
import math
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import fx

from slmopt import distributed
from slmopt.analysis.analyze import analyze
from slmopt.analysis.coverage import RECOVERY_PREFIX, check_coverage
from slmopt.analysis.structure import Structure
from slmopt.data.metrics import cross_entropy_nats, predicted_tokens, summarize_quality
from slmopt.data.runner import CALIB_BATCH, stream_activations
from slmopt.passes.importance import IMPORTANCE_METRICS, Sublayer, Unit, removal_curve, units_of
from slmopt.pipeline.pass_base import Change, Pass, PassResult, register_pass

if typing.TYPE_CHECKING:
    from slmopt.pipeline.manager import PassContext
    from slmopt.program import Program

__all__ = ["RECOVERIES", "BranchStats", "PruneAttention", "Recovery", "fit_bias", "fit_lowrank"]

log = logging.getLogger(__name__)
aten = torch.ops.aten

Metric = Literal["cosine", "loss", "kl"]
Target = Literal["attention", "mlp", "block"]
RecoverName = Literal["none", "bias", "lowrank"]
DEFAULT_KEEP = 0.75  # neither remove= nor keep= given: drop a quarter of the layers
# Relative eigenvalue cut for the normal equations (1e-5 in singular values of the data): LayerNorm outputs
# are rank-deficient up to float32 rounding, and fitting that rounding noise only adds error.
RCOND = 1e-10


# ----------------------------------------------------------------------------------------------- recovery
class BranchStats:
    """Float64 running sums of a branch's input rows ``x`` and output rows ``y`` (Grams only if asked)."""

    def __init__(self, gram: bool) -> None:
        self.gram, self.n, self.sums = gram, 0, {}

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
        parts = {"x": x.sum(0), "y": y.sum(0)} | ({"xx": x.T @ x, "xy": x.T @ y} if self.gram else {})
        for key, value in parts.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.n += x.shape[0]


@dataclass
class Recovery:
    """What replaces a removed branch: ``up(down(x)) + bias`` (``down``/``up`` None for a pure bias)."""

    bias: torch.Tensor
    down: torch.Tensor | None = None  # [rank, in]
    up: torch.Tensor | None = None  # [out, rank]


def fit_bias(stats: BranchStats, rank: int) -> Recovery:
    """The branch's mean output over calibration tokens, added as a constant vector."""
    return Recovery(bias=stats.sums["y"] / stats.n)


def fit_lowrank(stats: BranchStats, rank: int) -> Recovery:
    """Reduced-rank least squares ``y ≈ x A_r + b`` (rank = width gives the ordinary LS solution).

    ``A`` solves the centred normal equations; the rank-r map keeps the top-r principal directions of the
    fitted outputs ``x A`` (``A_r = A V_r V_rᵀ``), the optimal rank-r predictor under squared error.
    """
    mx, my = stats.sums["x"] / stats.n, stats.sums["y"] / stats.n
    cxx = stats.sums["xx"] - stats.n * torch.outer(mx, mx)
    cxy = stats.sums["xy"] - stats.n * torch.outer(mx, my)
    a = torch.linalg.lstsq(cxx, cxy, rcond=RCOND, driver="gelsd").solution  # [in, out]
    _, vecs = torch.linalg.eigh(a.T @ cxx @ a)
    v = vecs[:, -min(rank, *a.shape) :]  # eigh sorts ascending: the last columns are the top directions
    return Recovery(bias=my - mx @ a @ v @ v.T, down=(a @ v).T, up=v)


# name -> (fit(stats, rank), or None for no recovery; whether it needs Gram matrices)
RECOVERIES: dict[str, tuple[Callable[[BranchStats, int], Recovery] | None, bool]] = {
    "none": (None, False),
    "bias": (fit_bias, False),
    "lowrank": (fit_lowrank, True),
}


def _fit(program: Program, subs: Sequence[Sublayer], calib: torch.Tensor | None, recover: str, rank: int):
    """Fits each sublayer's recovery on the current program's activations: ``{residual add: Recovery}``."""
    fit, gram = RECOVERIES[recover]
    if fit is None or calib is None or not subs:
        return {s.residual_add: None for s in subs}
    pairs = {s.residual_add: (s.input_node(program.graph).name, s.branch_output) for s in subs}
    stats = {name: BranchStats(gram) for name in pairs}
    nodes = sorted({n for pair in pairs.values() for n in pair})
    shard = distributed.shard_rows(calib, align=CALIB_BATCH)  # this rank's rows; sums reduced below
    for acts in stream_activations(program, nodes, shard, desc=f"recovery ({recover})"):
        for name, (x, y) in pairs.items():
            stats[name].add(acts[x], acts[y])
    for name in sorted(stats):  # same order on every rank: collectives must match one to one
        for key in sorted(stats[name].sums):
            distributed.all_reduce_sum(stats[name].sums[key])
        stats[name].n = int(distributed.all_reduce_floats([stats[name].n])[0])
    return {name: fit(stats[name], rank) for name in pairs}


# ----------------------------------------------------------------------------------------------- rewrite
def _fake_mode(graph: fx.Graph) -> Any:
    from torch._guards import detect_fake_mode

    return detect_fake_mode([n.meta["val"] for n in graph.nodes if "val" in n.meta])


def _call(graph: fx.Graph, mode: Any, op: Any, *args: fx.Node) -> fx.Node:
    """Adds ``op(*args)`` with the fake ``val`` later analyses read (symbolic batch/sequence dims kept)."""
    node = graph.call_function(op, args)
    if mode is not None and all("val" in a.meta for a in args):
        with mode:
            node.meta["val"] = op(*(a.meta["val"] for a in args))
    return node


def _remove_sublayer(program: Program, sub: Sublayer, recovery: Recovery | None, tag: str) -> None:
    """Rewires the sublayer's residual add to its stream (+ recovery); the branch becomes dead code.

    ``program.recompile()`` (called once after all removals) drops the dead branch and its weights.
    """
    graph = program.graph
    add, stream = next(n for n in graph.nodes if n.name == sub.residual_add), sub.stream(graph)
    if recovery is None:
        add.replace_all_uses_with(stream)
        graph.erase_node(add)
        return
    x, mode = sub.input_node(graph), _fake_mode(graph)
    dtype = stream.meta["val"].dtype if "val" in stream.meta else torch.float32

    def attr(name: str, value: torch.Tensor) -> fx.Node:
        target = f"{RECOVERY_PREFIX}{tag}_{name}"
        program.set_param(target, value.to(dtype))
        node = graph.get_attr(target)
        if mode is not None:
            node.meta["val"] = mode.from_tensor(program.param(target))
        return node

    with graph.inserting_before(add):
        y = attr("bias", recovery.bias)
        if recovery.down is not None and recovery.up is not None:
            down, up = attr("down", recovery.down), attr("up", recovery.up)
            z = _call(graph, mode, aten.linear.default, x, down)
            y = _call(graph, mode, aten.linear.default, z, up, y)
        new = graph.call_function(aten.add.Tensor, (stream, y))
    new.meta = dict(add.meta)  # same value shape/dtype and module hints as the add it replaces
    add.replace_all_uses_with(new)
    graph.erase_node(add)


# ----------------------------------------------------------------------------------------------- costs
def _attention_costs(structure: Structure, removed: set[str], context: int) -> dict[str, Any]:
    """Attention FLOPs per token and KV-cache bytes per token of the attention layers not in ``removed``."""
    flops, kv = 0, 0
    for unit in units_of(structure, "attention"):
        sub = unit.sublayers[0]
        if sub.residual_add in removed:
            continue
        proj = sum(structure.linear(n).in_features * structure.linear(n).out_features for n in sub.linears)
        flops += 2 * proj + 4 * sub.heads * sub.head_dim * context  # projections + QK^T and AV
        kv += 2 * sub.kv_heads * sub.head_dim
    return {"flops": flops, "kv_fp32": 4 * kv, "kv_fp16": 2 * kv}


def _costs(structure: Structure, chosen: Sequence[tuple[Unit, Any]], program: Program, calib) -> dict:
    context = int((calib if calib is not None else program.example_inputs[0]).shape[-1])
    gone = {s.residual_add for u, _ in chosen for s in u.sublayers}
    before, after = _attention_costs(structure, set(), context), _attention_costs(structure, gone, context)
    return {
        "params": {"before": structure.params, "after": program.num_params()},
        "attention_flops_per_token": {"context": context, "before": before["flops"], "after": after["flops"]},
        "kv_cache_bytes_per_token": {
            p: {"before": before[f"kv_{p}"], "after": after[f"kv_{p}"]} for p in ("fp32", "fp16")
        },
    }


def _quality(data: dict[str, Any]) -> Callable[[Callable], dict[str, Any]]:
    def evaluate(fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        tokens = data["tokens"]
        nats = cross_entropy_nats(fn, tokens, progress=False)
        return summarize_quality(nats, predicted_tokens(tokens), data["bytes_per_token"], data["byte_level"])

    return evaluate


# ----------------------------------------------------------------------------------------------- the pass
@register_pass("prune-attn", aliases=("prune",))
class PruneAttention(Pass):
    """Removes the least important attention sublayers (``target=mlp|block`` for FFNs or whole blocks).

    Example:
        >>> p = PruneAttention(PruneAttention.Config(keep=0.5, recover="lowrank", rank=16))
        >>> p.options_string().startswith("prune-attn{")
        True
    """

    @dataclass(frozen=True)
    class Config:
        remove: int | None = field(default=None, metadata={"help": "number of layers to remove"})
        keep: float | None = field(default=None, metadata={"help": f"fraction kept (default {DEFAULT_KEEP})"})
        metric: Metric = field(default="cosine", metadata={"help": "importance: cosine|loss|kl"})
        target: Target = field(default="attention", metadata={"help": "what to remove: attention|mlp|block"})
        protect: tuple[int, ...] = field(default=(0,), metadata={"help": "layer indices never removed"})
        iterative: bool = field(default=False, metadata={"help": "re-score after each removal"})
        layers: tuple[int, ...] = field(default=(), metadata={"help": "remove exactly these (no scoring)"})
        recover: RecoverName = field(default="none", metadata={"help": "replacement: none|bias|lowrank"})
        rank: int = field(default=8, metadata={"help": "rank of the lowrank recovery"})
        sweep: bool = field(default=False, metadata={"help": "quality after removing 1..N layers"})
        samples: int = field(default=256, metadata={"help": "calibration sequences used at most"})

        def __post_init__(self) -> None:
            # Literal types already list the choices at parse time; this also guards direct construction.
            choices = {"metric": IMPORTANCE_METRICS, "target": get_args(Target), "recover": RECOVERIES}
            checks = [
                (getattr(self, k) not in v, f"{k} must be one of {', '.join(v)}") for k, v in choices.items()
            ]
            checks += [
                (self.remove is not None and self.keep is not None, "give remove= or keep=, not both"),
                (bool(self.layers) and {self.remove, self.keep} != {None}, "layers= excludes remove/keep"),
                (self.remove is not None and self.remove < 0, f"remove must be >= 0, got {self.remove}"),
                (
                    self.keep is not None and not 0 < self.keep <= 1,
                    f"keep must be in (0, 1], got {self.keep}",
                ),
                (self.rank < 1, f"rank must be >= 1, got {self.rank}"),
                (self.samples < 1, f"samples must be >= 1, got {self.samples}"),
                (len(set(self.layers)) != len(self.layers), f"layers lists an index twice: {self.layers}"),
                (any(i < 0 for i in self.layers + self.protect), "layer indices must be >= 0"),
            ]
            for message in (m for bad, m in checks if bad):
                raise ValueError(message)

    # -- planning -------------------------------------------------------------------------------------
    def _plan(self, program: Program) -> tuple[Structure, list[Unit], int]:
        """Analyses the model and validates the options against it; returns (structure, units, count)."""
        cfg = self.config
        structure = analyze(program)
        units = units_of(structure, cfg.target)
        self._coverage = check_coverage(structure, self.name, narrowed=bool(cfg.layers))
        what = f"{cfg.target} layer"
        if not units:
            raise ValueError(f"no {what}s found in this model (see `slmopt inspect`)")
        indices = [u.index for u in units]
        for option, values in (("protect", cfg.protect), ("layers", cfg.layers)):
            unknown = sorted(set(values) - set(indices))
            if unknown:
                raise ValueError(f"{option}={unknown}: the model's {what}s are {indices}")
        if set(cfg.layers) & set(cfg.protect):
            raise ValueError(f"layers={cfg.layers} includes protected layers (protect={cfg.protect})")
        free = [i for i in indices if i not in cfg.protect]
        if cfg.layers:
            count = len(cfg.layers)
        elif cfg.remove is not None:
            count = cfg.remove
        else:  # floor: never keep fewer layers than the fraction asked for
            count = math.floor(len(units) * (1 - (cfg.keep or DEFAULT_KEEP)) + 1e-9)
        if count > len(units):
            raise ValueError(f"cannot remove {count} {what}s: the model has {len(units)}")
        if count and not free:
            raise ValueError(f"protect={cfg.protect} covers every {what}: nothing can be removed")
        if count > len(free):
            raise ValueError(f"cannot remove {count} {what}s: only {len(free)} are unprotected {free}")
        needs_logits = IMPORTANCE_METRICS[cfg.metric].needs_logits and not cfg.layers
        if count and needs_logits and program.info.kind != "causal-lm":
            raise ValueError(f"metric={cfg.metric} needs a causal LM's logits; use metric=cosine")
        return structure, units, count

    def _needs_calib(self, count: int) -> bool:
        cfg = self.config
        return cfg.sweep or (count > 0 and (not cfg.layers or cfg.recover != "none"))

    def requires(self, program: Program, ctx: PassContext) -> None:
        _, _, count = self._plan(program)
        if self._needs_calib(count):
            ctx.require_calib(self.name)

    # -- running --------------------------------------------------------------------------------------
    def _score(self, program: Program, units: Sequence[Unit], calib: torch.Tensor, ctx: PassContext):
        scores = IMPORTANCE_METRICS[self.config.metric].score(program, units, calib, progress=ctx.progress)
        log.info(
            "%s importance: %s", self.config.metric, dict(zip((u.label for u in units), scores, strict=True))
        )
        return scores

    def _rank(self, program, units, calib, ctx) -> tuple[dict[int, float], list[Unit]]:
        """First-round scores by layer and the removal order (replay: the given layers, unscored)."""
        cfg = self.config
        if cfg.layers:
            return {}, [next(u for u in units if u.index == i) for i in cfg.layers]
        scores = dict(zip((u.index for u in units), self._score(program, units, calib, ctx), strict=True))
        free = [u for u in units if u.index not in cfg.protect]
        return scores, sorted(free, key=lambda u: (scores[u.index], u.index))

    def _remove(self, program: Program, units: Sequence[Unit], calib: torch.Tensor | None) -> None:
        if not units:
            return  # no recompile either: its dead-code elimination would touch an unchanged program
        subs = [s for u in units for s in u.sublayers]
        fits = _fit(program, subs, calib, self.config.recover, self.config.rank)
        for sub in subs:
            _remove_sublayer(program, sub, fits[sub.residual_add], f"{sub.kind}{sub.block}")
        program.recompile()

    def _choose_and_remove(self, program, ranked, scores, count, calib, ctx) -> list[tuple[Unit, Any]]:
        """Removes ``count`` units; iterative mode re-scores what is left after each removal."""
        if not self.config.iterative or not scores:
            chosen = [(u, scores.get(u.index)) for u in ranked[:count]]
            self._remove(program, [u for u, _ in chosen], calib)
            return chosen
        chosen, remaining = [], list(ranked)
        for _ in range(count):
            now = (
                self._score(program, remaining, calib, ctx)
                if chosen
                else [scores[u.index] for u in remaining]
            )
            pick = min(range(len(remaining)), key=lambda i: (now[i], remaining[i].index))
            chosen.append((remaining.pop(pick), now[pick]))
            self._remove(program, [chosen[-1][0]], calib)
        return chosen

    def call(self, program: Program, ctx: PassContext) -> PassResult:
        started, cfg = time.perf_counter(), self.config
        report, metrics = self.new_report(program), {}
        structure, units, count = self._plan(program)
        self._gone: set[str] = set()  # what ensures() checks is gone
        if count == 0 and not cfg.sweep:
            report.metrics["note"] = "keep=1/remove=0: nothing to remove, the program is unchanged"
            return PassResult(program, self.finish_report(report, program, started))
        calib = ctx.require_calib(self.name)[: cfg.samples] if self._needs_calib(count) else None
        data = self._eval_data(program, ctx, calib)
        scores, ranked = self._rank(program, units, calib, ctx)
        if data is not None:
            metrics["quality"] = {"data": data["name"], "before": _quality(data)(program)}
            if cfg.sweep:  # ablates on the fly, before the graph is rewritten
                metrics["sweep"] = removal_curve(program, ranked, _quality(data))
        chosen = self._choose_and_remove(program, ranked, scores, count, calib, ctx)

        for order, (unit, score) in enumerate(chosen):
            detail = {"index": unit.index, "score": score, "metric": cfg.metric if scores else None}
            detail |= {
                "recovery": cfg.recover,
                "order": order,
                "sublayers": [s.residual_add for s in unit.sublayers],
            }
            detail |= {"rank": cfg.rank} if cfg.recover == "lowrank" else {}
            report.changes.append(Change("remove-sublayer", unit.label, detail))
        # What ensures() checks: the removed linears, and their weights unless a surviving linear shares
        # them (e.g. ALBERT-style shared layers).
        linears = {n for u, _ in chosen for sub in u.sublayers for n in sub.linears}
        owned = {i.node: {i.weight, i.bias} - {None} for i in structure.linears}
        kept = set().union(*(w for n, w in owned.items() if n not in linears))
        self._gone = linears | set().union(*(w for n, w in owned.items() if n in linears)) - kept
        removed = sorted(u.index for u, _ in chosen)
        layers = ",".join(map(str, removed))
        metrics["removed"] = removed
        metrics["replay"] = f"{self.name}{{target={cfg.target},layers={layers},recover={cfg.recover}}}"
        metric = cfg.metric if scores else None
        metrics["importance"] = [
            dict(layer=u.index, target=cfg.target, metric=metric, score=scores.get(u.index),
                 protected=u.index in cfg.protect, removed=u.index in removed)
            for u in units
        ]  # fmt: skip
        metrics |= _costs(structure, chosen, program, calib)
        if data is not None:
            metrics["quality"]["after"] = _quality(data)(program)
        metrics["plots"] = self._plots(ctx, units, scores, removed, metrics.get("sweep"))
        report.metrics.update(metrics, coverage=self._coverage)
        return PassResult(program, self.finish_report(report, program, started))

    def ensures(self, program: Program, ctx: PassContext) -> None:
        nodes = program.graph.nodes
        left = {n.name for n in nodes} | {n.target for n in nodes if n.op == "get_attr"}
        if left & getattr(self, "_gone", set()):
            raise AssertionError(f"removed sublayers left nodes/weights behind: {sorted(left & self._gone)}")

    # -- report helpers -------------------------------------------------------------------------------
    def _eval_data(self, program: Program, ctx: PassContext, calib: torch.Tensor | None) -> dict | None:
        """Held-out tokens from ``ctx.eval_tokens`` (tensor or EvalData); calibration for sweeps."""
        given = ctx.eval_tokens
        if program.info.kind != "causal-lm":
            if given is not None or self.config.sweep:
                log.info("quality before/after needs a causal LM's logits: skipped for %s", program.info.kind)
            return None
        tokens, name = getattr(given, "tokens", given), "eval"
        if tokens is None and self.config.sweep and calib is not None:
            tokens, name = calib, "calibration"
        if tokens is None:
            return None
        bpt = getattr(given, "bytes_per_token", None)
        return {"tokens": tokens, "name": name, "bytes_per_token": bpt, "byte_level": program.info.byte_level}

    def _plots(self, ctx: PassContext, units, scores, removed, sweep) -> list[str]:
        """PNG charts into ``ctx.artifact_dir`` (none when unset or matplotlib is missing)."""
        folder, cfg = ctx.artifact_dir, self.config
        if folder is None:
            return []
        from slmopt import plots

        paths = []
        if scores:
            paths.append(plots.bar_chart(
                Path(folder) / f"{self.name}-importance.png", [f"L{u.index}" for u in units],
                [scores[u.index] for u in units], ylabel="score",
                title=f"{cfg.target} importance ({cfg.metric})", xlabel="red: removed, grey: protected",
                highlight=[i for i, u in enumerate(units) if u.index in removed],
                muted=[i for i, u in enumerate(units) if u.index in cfg.protect],
            ))  # fmt: skip
        if sweep:
            key = "bits_per_byte" if "bits_per_byte" in sweep[0] else "nats_per_token"
            paths.append(plots.line_chart(
                Path(folder) / f"{self.name}-sweep.png", [r["removed"] for r in sweep],
                {key: [r[key] for r in sweep]}, title="quality vs layers removed",
                xlabel=f"{cfg.target} layers removed (importance order)", ylabel=key,
            ))  # fmt: skip
        # Relative to the artifact folder: it is a staging folder that is renamed into place afterwards.
        return [Path(p).name for p in paths if p is not None]

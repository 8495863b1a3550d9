"""Sublayer importance: which attention/FFN sublayers (or whole blocks) a model can lose most cheaply.

A *unit* is what a pruning decision removes: one attention sublayer, one FFN sublayer, or both sublayers
of a block. Its importance is scored by a one-function strategy from :data:`IMPORTANCE_METRICS` (higher =
more important, so the lowest scores are removed first):

* ``cosine``: ``1 − cos(x_in, x_out)`` of the residual stream around the unit, averaged over calibration
  tokens (ShortGPT / LLM-Drop): a unit that barely turns the stream does little.
* ``loss``: increase of the mean next-token loss on the calibration tokens when that unit alone is
  removed (leave-one-out).
* ``kl``: mean ``KL(p_full ‖ p_without)`` of the next-token distribution when that unit alone is removed.

Activations are captured by interpreting the Program's FX graph (:class:`GraphRunner`), which can also
*ablate* units on the fly — the residual add returns its stream operand, exactly what the rewrite does —
so leave-one-out scoring never copies the model.

Example:
    >>> from slmopt.analysis.analyze import analyze
    >>> units = units_of(analyze(program), "attention")  # doctest: +SKIP
    >>> IMPORTANCE_METRICS["cosine"].score(program, units, calib)  # doctest: +SKIP
    [0.41, 0.08, 0.12, 0.10]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import fx

from slmopt import distributed
from slmopt.data.runner import CALIB_BATCH, GraphRunner, calib_batches, stream_activations

if TYPE_CHECKING:
    from slmopt.analysis.structure import AttentionInfo, FFNInfo, Structure
    from slmopt.program import Program

__all__ = [
    "IMPORTANCE_METRICS",
    "GraphRunner",
    "ImportanceFn",
    "ImportanceMetric",
    "Sublayer",
    "Unit",
    "ablated",
    "removal_curve",
    "stream_activations",
    "units_of",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- units
@dataclass(frozen=True)
class Sublayer:
    """One residual sublayer ``residual_add = residual + branch(branch_input)`` (FX node names).

    Attributes:
        kind: ``"attention"`` or ``"mlp"``.
        block: index of its block in the analysis.
        residual_add / residual / branch_input / branch_output / post_norm: as in
            :class:`slmopt.analysis.structure.AttentionInfo`.
        linears: FX node names of the branch's projections.
        heads / kv_heads / head_dim: query and key/value heads, per-head size (attention only; 0 for FFNs).
    """

    kind: str
    block: int
    residual_add: str
    residual: str
    branch_input: str
    branch_output: str
    post_norm: str | None
    linears: tuple[str, ...]
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0

    def stream(self, graph: fx.Graph) -> fx.Node:
        """The add's stream operand *in the current graph* (an earlier removal may have rewired it)."""
        add = _node(graph, self.residual_add)
        return next(a for a in add.args if isinstance(a, fx.Node) and a.name != self.branch_output)

    def input_node(self, graph: fx.Graph) -> fx.Node:
        """What the branch reads: its norm's output, or the stream itself (post-norm models)."""
        return self.stream(graph) if self.branch_input == self.residual else _node(graph, self.branch_input)


@dataclass(frozen=True)
class Unit:
    """What one pruning decision removes: ``target`` sublayer(s) of block ``index``."""

    index: int
    target: str
    sublayers: tuple[Sublayer, ...]

    @property
    def label(self) -> str:
        return f"{self.target}[{self.index}]"

    def replacements(self, graph: fx.Graph) -> dict[str, str]:
        """``{residual add: stream operand}`` — the value each add takes once the unit is gone."""
        return {s.residual_add: s.stream(graph).name for s in self.sublayers}

    def x_in(self, graph: fx.Graph) -> str:
        return self.sublayers[0].stream(graph).name

    def x_out(self) -> str:
        return self.sublayers[-1].residual_add


def _node(graph: fx.Graph, name: str) -> fx.Node:
    for node in graph.nodes:
        if node.name == name:
            return node
    raise KeyError(f"node {name!r} is not in the graph (was it removed by an earlier rewrite?)")


def _sublayer(info: AttentionInfo | FFNInfo, kind: str) -> Sublayer:
    if kind == "attention":
        linears, heads = tuple(info.linears), (info.num_heads, info.num_kv_heads, info.head_dim)
    else:
        linears = tuple(i.node for i in (info.up, info.gate, info.down) if i is not None)
        heads = (0, 0, 0)
    return Sublayer(
        kind,
        info.block,
        info.residual_add,
        info.residual,
        info.branch_input,
        info.branch_output,
        info.post_norm,
        linears,
        *heads,
    )


def units_of(structure: Structure, target: str) -> list[Unit]:
    """The prunable units of an analysed model: ``target`` is ``attention``, ``mlp`` or ``block``.

    Example:
        >>> [u.label for u in units_of(analyze(program), "attention")]  # doctest: +SKIP
        ['attention[0]', 'attention[1]']
    """
    units = []
    for block in structure.blocks:
        parts = {
            "attention": [(block.attention, "attention")],
            "mlp": [(block.ffn, "mlp")],
            "block": [(block.attention, "attention"), (block.ffn, "mlp")],
        }[target]
        subs = tuple(_sublayer(info, kind) for info, kind in parts if info is not None)
        if subs:
            units.append(Unit(block.index, target, subs))
    return units


def ablated(program: Program, replace: Mapping[str, str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``logits_fn(ids)`` for the Program with the adds in ``replace`` short-circuited (no copy)."""
    runner = GraphRunner(program.graph_module, replace=replace)

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        out = runner.forward(*inputs)
        assert out is not None
        return out

    return run


def removal_curve(
    program: Program, ranked: Sequence[Unit], evaluate: Callable[[Callable], dict[str, Any]]
) -> list[dict[str, Any]]:
    """``evaluate(logits_fn)`` with the first k ranked units ablated, for k = 0..len(ranked) (no rewrite).

    Example:
        >>> rows = removal_curve(program, units, lambda fn: {"loss": my_loss(fn)})  # doctest: +SKIP
        >>> [r["removed"] for r in rows]  # doctest: +SKIP
        [0, 1, 2]
    """
    rows = []
    for k in range(len(ranked) + 1):
        replace = {a: s for u in ranked[:k] for a, s in u.replacements(program.graph).items()}
        rows.append(
            {"removed": k, "layers": [u.index for u in ranked[:k]], **evaluate(ablated(program, replace))}
        )
    return rows


# ----------------------------------------------------------------------------------------------- metrics
class ImportanceFn(Protocol):
    """``fn(program, units, calib, batch_size=..., progress=...) -> one score per unit`` (higher = keep)."""

    def __call__(
        self,
        program: Program,
        units: Sequence[Unit],
        calib: torch.Tensor,
        batch_size: int = CALIB_BATCH,
        progress: bool = False,
    ) -> list[float]: ...


def cosine_importance(
    program: Program,
    units: Sequence[Unit],
    calib: torch.Tensor,
    batch_size: int = CALIB_BATCH,
    progress: bool = False,
) -> list[float]:
    """``1 − mean_tokens cos(x_in, x_out)`` of the residual stream around each unit."""
    pairs = [(u.x_in(program.graph), u.x_out()) for u in units]
    sums = [0.0] * len(units)
    count = 0
    nodes = sorted({n for pair in pairs for n in pair})
    shard = distributed.shard_rows(calib, align=batch_size)  # this rank's rows; sums reduced below
    for acts in stream_activations(program, nodes, shard, batch_size, progress, "importance (cosine)"):
        for i, (a, b) in enumerate(pairs):
            cos = F.cosine_similarity(acts[a].double(), acts[b].double(), dim=-1)
            sums[i] += float(cos.sum())
        count += acts[pairs[0][0]].shape[:-1].numel()
    *sums, count = distributed.all_reduce_floats([*sums, count])
    return [1.0 - s / count for s in sums]


def _leave_one_out(
    program: Program,
    units: Sequence[Unit],
    calib: torch.Tensor,
    per_batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[float, int]],
    batch_size: int,
    progress: bool,
    desc: str,
) -> list[float]:
    """Means of ``per_batch(reference output, output without unit, ids) -> (sum, count)`` per unit."""
    if not units:
        return []
    runners = [ablated(program, u.replacements(program.graph)) for u in units]
    sums = [0.0] * len(units)
    count = 0
    shard = distributed.shard_rows(calib, align=batch_size)  # this rank's rows; sums reduced below
    for batch in calib_batches(shard, batch_size, progress, desc):
        ref = program(batch).double()
        for i, run in enumerate(runners):
            total, count_b = per_batch(ref, run(batch).double(), batch)
            sums[i] += total
        count += count_b
    *sums, count = distributed.all_reduce_floats([*sums, count])
    return [s / max(count, 1) for s in sums]


def _ce_increase(ref: torch.Tensor, out: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    # Position t predicts token t+1, so the last position has no target.
    def ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")

    return float(ce(out) - ce(ref)), ids[:, 1:].numel()


def _kl(ref: torch.Tensor, out: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    log_p, log_q = F.log_softmax(ref, dim=-1), F.log_softmax(out, dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum()), ref.shape[:-1].numel()


def loss_importance(
    program: Program,
    units: Sequence[Unit],
    calib: torch.Tensor,
    batch_size: int = CALIB_BATCH,
    progress: bool = False,
) -> list[float]:
    """Increase of the calibration next-token loss (nats per token) when each unit alone is removed."""
    return _leave_one_out(program, units, calib, _ce_increase, batch_size, progress, "importance (loss)")


def kl_importance(
    program: Program,
    units: Sequence[Unit],
    calib: torch.Tensor,
    batch_size: int = CALIB_BATCH,
    progress: bool = False,
) -> list[float]:
    """Mean ``KL(p_full ‖ p_without_unit)`` of the next-token distribution, per token."""
    return _leave_one_out(program, units, calib, _kl, batch_size, progress, "importance (kl)")


@dataclass(frozen=True)
class ImportanceMetric:
    """A table entry: the scoring function and whether it needs a model that outputs logits."""

    score: ImportanceFn
    needs_logits: bool
    help: str


IMPORTANCE_METRICS: dict[str, ImportanceMetric] = {
    "cosine": ImportanceMetric(cosine_importance, False, "1 - cos(x_in, x_out) of the residual stream"),
    "loss": ImportanceMetric(loss_importance, True, "calibration loss increase when removed alone"),
    "kl": ImportanceMetric(kl_importance, True, "KL(full || without) of the next-token distribution"),
}

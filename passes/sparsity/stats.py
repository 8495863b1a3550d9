"""Calibration statistics of linear-layer inputs, collected by interpreting a Program's FX graph.

For every watched linear the collector accumulates the Gram matrix ``G = Σ xxᵀ`` of its input rows in
float64 (``‖X_j‖² = G_jj`` for Wanda, ``H = 2G/N`` for SparseGPT, ``tr(ΔGΔᵀ)`` for the output error), batch
by batch, so activations are never all held at once. Under ``torch.distributed`` each rank streams its own
block of calibration rows and the Grams and counts are all-reduced, so every rank holds the statistics of
the whole calibration set (:mod:`slmopt.distributed`). The interpreter stops as soon as every watched input
has been seen, so collecting statistics for block ``b`` only runs the graph up to block ``b``.

Example:
    >>> import torch
    >>> from slmopt.program import capture, ModelInfo
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> info = ModelInfo(kind="module", source="demo", input_names=["x"], dynamic_dims=[{0: "batch"}])
    >>> prog = capture(net, (torch.randn(2, 4),), info)
    >>> lin = [n.name for n in prog.graph.nodes if n.target == torch.ops.aten.linear.default]
    >>> stats = collect_input_stats(prog, lin, torch.randn(16, 4))
    >>> stats[lin[1]].gram.shape, stats[lin[1]].count
    (torch.Size([8, 8]), 16)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from slmopt import distributed
from slmopt.data.runner import CALIB_BATCH, stream_activations

if TYPE_CHECKING:
    from slmopt.program import Program

__all__ = ["CALIB_BATCH", "InputStats", "activation_node", "collect_input_stats", "dataflow_groups"]

aten = torch.ops.aten

# Calibration rows per forward: bounds activation memory (8 sequences of 2k tokens is a few hundred MB
# for a 7B-class model) while keeping per-call overhead low.

# Which argument of a matmul-like op carries the activation (the others are the weight and bias).
_ACTIVATION_ARG: dict[Any, int] = {
    aten.linear.default: 0,
    aten.addmm.default: 1,
    aten.mm.default: 0,
    aten.matmul.default: 0,
    aten.bmm.default: 0,
}


@dataclass
class InputStats:
    """Running ``Σ xxᵀ`` (float64) and row count of one linear's inputs.

    Attributes:
        gram: ``[in, in]`` sum of outer products of the input rows (None until the first batch).
        count: number of input rows (tokens) accumulated.
    """

    gram: torch.Tensor | None = None
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulates a batch of inputs ``[..., in]``."""
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if self.gram is None:
            self.gram = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
        # One batch's Gram, then one add (not addmm_ into the running sum): the running sum is then a plain
        # sum of per-batch Grams, which a 2-rank all-reduce reproduces bit for bit (see reduce()).
        self.gram += rows.T @ rows
        self.count += rows.shape[0]

    def reduce(self) -> InputStats:
        """Sums ``gram`` and ``count`` over ranks (identity in one process); returns ``self``.

        With batch-aligned shards every rank's Gram is a sum of the same per-batch Grams the single
        process adds, so only the association of that sum changes (exact for 2 ranks with 1 batch each).
        """
        if distributed.is_distributed():
            count = torch.tensor([float(self.count)], dtype=torch.float64)
            distributed.all_reduce_sum(self._gram())
            self.count = int(distributed.all_reduce_sum(count).item())
        return self

    def _gram(self) -> torch.Tensor:
        if self.gram is None:
            raise ValueError("no calibration inputs were accumulated")
        return self.gram

    def sq_norms(self) -> torch.Tensor:
        """``‖X_j‖₂²`` per input feature (the Gram's diagonal)."""
        return torch.diagonal(self._gram()).clone()

    def hessian(self) -> torch.Tensor:
        """SparseGPT's layer Hessian ``2XᵀX / N``."""
        return self._gram() * (2.0 / max(self.count, 1))


def activation_node(node: fx.Node) -> fx.Node:
    """The FX node whose value is ``node``'s activation input (not its weight or bias).

    Uses the op rule table; for other ops, the first tensor argument that is not a ``get_attr``.
    """
    index = _ACTIVATION_ARG.get(node.target)
    if index is not None and isinstance(node.args[index], fx.Node):
        return node.args[index]
    for arg in node.args:
        if isinstance(arg, fx.Node) and arg.op != "get_attr":
            return arg
    raise ValueError(f"cannot find the activation input of node {node.name!r} ({node.target})")


def _depends_on(node: fx.Node, targets: set[fx.Node], positions: dict[fx.Node, int]) -> bool:
    """Whether ``node`` (transitively) reads any of ``targets``.

    A backward search that never walks above the earliest target, so it stays local to one block.
    """
    floor = min(positions[t] for t in targets)
    stack, seen = [node], set()
    while stack:
        cur = stack.pop()
        if cur in targets:
            return True
        if cur in seen or positions[cur] < floor:
            continue
        seen.add(cur)
        stack.extend(cur.all_input_nodes)
    return False


def dataflow_groups(graph: fx.Graph, nodes: Iterable[str]) -> list[list[str]]:
    """Splits linear nodes into sequential groups for "true sequential" pruning.

    Nodes are taken in graph order; a node joins the current group unless its activation depends on a
    node already in the group (q/k/v share a group, o starts the next; gate/up share one, down follows).

    Example:
        >>> # dataflow_groups(prog.graph, ["linear", "linear_1", "linear_2", "linear_3"])
        >>> # [['linear', 'linear_1', 'linear_2'], ['linear_3']]
    """
    positions = {n: i for i, n in enumerate(graph.nodes)}
    by_name = {n.name: n for n in graph.nodes}
    wanted = sorted({by_name[name] for name in nodes}, key=positions.__getitem__)
    groups: list[list[fx.Node]] = []
    for node in wanted:
        if groups and not _depends_on(activation_node(node), set(groups[-1]), positions):
            groups[-1].append(node)
        else:
            groups.append([node])
    return [[n.name for n in group] for group in groups]


def collect_input_stats(
    program: Program,
    nodes: Sequence[str],
    calib: torch.Tensor,
    batch_size: int = CALIB_BATCH,
    progress: bool = False,
    desc: str = "calibration",
) -> dict[str, InputStats]:
    """Runs ``calib`` through ``program`` and returns input statistics for each linear in ``nodes``.

    Linears that read the same activation (q/k/v, gate/up) share one :class:`InputStats` object.

    Args:
        program: a single-input Program (token ids or one tensor).
        nodes: FX node names of the matmul-like nodes to watch.
        calib: calibration inputs ``[n, ...]``; processed ``batch_size`` rows at a time.
        batch_size: rows per forward.
        progress: show a progress bar over batches.
        desc: progress-bar label.

    Returns:
        ``{node name: InputStats}``.
    """
    if len(program.example_inputs) != 1:
        raise ValueError(
            f"calibration needs a single-input program; this one takes {len(program.example_inputs)} inputs"
        )
    by_name = {n.name: n for n in program.graph.nodes}
    missing = [name for name in nodes if name not in by_name]
    if missing:
        raise ValueError(f"nodes not in the graph: {missing}")
    owner = {name: activation_node(by_name[name]).name for name in nodes}
    watch = {act: InputStats() for act in owner.values()}
    # Each rank streams its batch-aligned block of the rows; the sums are all-reduced before use.
    shard = distributed.shard_rows(calib, align=batch_size)
    for values in stream_activations(program, list(watch), shard, batch_size, progress, desc):
        for act, value in values.items():
            watch[act].add(value)
    for act in sorted(watch):  # same order on every rank: collectives must match one to one
        watch[act].reduce()
    return {name: watch[act] for name, act in owner.items()}

"""Elastic subnets: importance orders, subnet plans, their cost, and scoring plans on calibration data.

* :func:`score_orders` ranks, in one pass over the calibration rows, the KV groups of every attention
  (sum of the norms of their query heads' contributions ``x_h W_o,hᵀ``), the query heads inside each
  group, the FFN neurons (``‖x_j‖₂ · ‖W_down[:, j]‖₂`` with ``x`` the down projection's input, i.e. the
  gate⊙up product for gated FFNs) and the blocks (``1 − cos`` of the residual stream around the block).
  Statistics are sums over :func:`slmopt.distributed.shard_rows` and are all-reduced before ranking, so
  every rank of a distributed run makes the same decisions.
* A :class:`Plan` keeps a prefix of each order: which blocks, how many KV groups and FFN neurons per block.
* :class:`PlanScorer` evaluates a plan without copying the model: cut heads/neurons are *masked* (their
  output-projection columns zeroed, exactly what slicing removes) and dropped blocks are short-circuited.

Example:
    >>> orders = score_orders(program, structure, calib)  # doctest: +SKIP
    >>> plan = Plan(blocks=[0, 1], groups={0: 1, 1: 2}, ffn={0: 64, 1: 96})  # doctest: +SKIP
    >>> cost(program, structure, plan, program.num_params())["params"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from slmopt.analysis.graph import GraphView, find_linears
from slmopt.analysis.structure import Structure
from slmopt.data.runner import GraphRunner, stream_activations
from slmopt.distributed import all_reduce_sum, shard_rows
from slmopt.passes.elastic.surgery import attention_layouts
from slmopt.passes.importance import units_of

if TYPE_CHECKING:
    from slmopt.program import Program

__all__ = ["Orders", "Plan", "PlanScorer", "cost", "random_orders", "score_orders"]


@dataclass
class Orders:
    """Importance orders (most important first) per block, plus the block scores (higher = keep)."""

    groups: dict[int, list[int]] = field(default_factory=dict)
    q_orders: dict[int, list[list[int]]] = field(default_factory=dict)  # per block, per group
    neurons: dict[int, list[int]] = field(default_factory=dict)
    block_scores: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Orders:
        """Inverse of :meth:`to_dict` (JSON turns int keys into strings)."""

        def keys(m: dict) -> dict:
            return {int(k): v for k, v in m.items()}

        return cls(keys(d["groups"]), keys(d["q_orders"]), keys(d["neurons"]), keys(d["block_scores"]))


@dataclass
class Plan:
    """One subnet: kept blocks, KV groups kept per block, FFN neurons kept per block (prefixes of Orders)."""

    blocks: list[int]
    groups: dict[int, int]
    ffn: dict[int, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(
            [int(b) for b in d["blocks"]],
            {int(k): int(v) for k, v in d["groups"].items()},
            {int(k): int(v) for k, v in d["ffn"].items()},
        )

    def key(self) -> tuple:
        return (tuple(self.blocks), tuple(sorted(self.groups.items())), tuple(sorted(self.ffn.items())))


def _x_of(program: Program) -> dict[str, str]:
    """Linear node name -> name of its activation input."""
    return {m.node.name: m.x.name for m in find_linears(GraphView(program.graph_module))}


def _cols(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The weight as ``[out, in]``."""
    return w.T if transposed else w


def score_orders(
    program: Program, structure: Structure, calib: torch.Tensor, progress: bool = False
) -> Orders:
    """Ranks groups, heads, neurons and blocks from one streamed pass over ``calib`` (see module doc)."""
    layouts = {lay.block: lay for lay in attention_layouts(structure)}
    xs = _x_of(program)
    units = units_of(structure, "block")
    watch: dict[str, str] = {}
    for b, lay in layouts.items():
        watch[f"a{b}"] = xs[lay.o.node]
    for block in structure.blocks:
        if block.ffn is not None:
            watch[f"f{block.index}"] = xs[block.ffn.down.node]
    pairs = {u.index: (u.x_in(program.graph), u.x_out()) for u in units}
    nodes = sorted(set(watch.values()) | {n for p in pairs.values() for n in p})
    sums: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:
        sums[key] = sums[key] + value if key in sums else value

    for acts in stream_activations(
        program, nodes, shard_rows(calib), progress=progress, desc="elastic scores"
    ):
        for b, lay in layouts.items():
            x = acts[watch[f"a{b}"]].double().reshape(-1, lay.heads, lay.head_dim)
            w = _cols(program.param(lay.o.weight), lay.o.transposed).double()  # [out, H*D]
            w = w.reshape(w.shape[0], lay.heads, lay.head_dim)
            y = torch.einsum("thd,ohd->tho", x, w)  # each head's contribution to the residual stream
            add(f"a{b}", y.pow(2).sum((0, 2)))
        for block in structure.blocks:
            if block.ffn is not None:
                x = acts[watch[f"f{block.index}"]].double()
                add(f"f{block.index}", x.reshape(-1, x.shape[-1]).pow(2).sum(0))
        for i, (a, o) in pairs.items():
            cos = F.cosine_similarity(acts[a].double(), acts[o].double(), dim=-1)
            add(f"c{i}", torch.stack([cos.sum(), torch.tensor(cos.numel(), dtype=torch.double)]))
    for value in sums.values():
        all_reduce_sum(value)  # identical decisions on every rank
    orders = Orders()
    for b, lay in layouts.items():
        head = sums[f"a{b}"].sqrt().reshape(lay.kv_heads, lay.rep)
        orders.groups[b] = _desc(head.sum(1).tolist())
        orders.q_orders[b] = [_desc(row) for row in head.tolist()]
    for block in structure.blocks:
        if block.ffn is not None:
            down = _cols(program.param(block.ffn.down.weight), block.ffn.down.transposed).double()
            orders.neurons[block.index] = _desc((sums[f"f{block.index}"].sqrt() * down.norm(dim=0)).tolist())
    for i in pairs:
        s, n = sums[f"c{i}"].tolist()
        orders.block_scores[i] = 1.0 - s / max(n, 1.0)
    return orders


def _desc(values: Sequence[float]) -> list[int]:
    """Indices by decreasing value (ties: lower index first, so the identity order is stable)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def random_orders(structure: Structure, seed: int) -> Orders:
    """Seeded random orders (the baseline importance ordering must beat)."""
    gen = torch.Generator().manual_seed(seed)
    orders = Orders()
    for lay in attention_layouts(structure):
        orders.groups[lay.block] = torch.randperm(lay.kv_heads, generator=gen).tolist()
        orders.q_orders[lay.block] = [
            torch.randperm(lay.rep, generator=gen).tolist() for _ in range(lay.kv_heads)
        ]
    for block in structure.blocks:
        if block.ffn is not None:
            orders.neurons[block.index] = torch.randperm(block.ffn.width, generator=gen).tolist()
        orders.block_scores[block.index] = float(torch.rand((), generator=gen))
    return orders


# ------------------------------------------------------------------------------------------- cost model
def _numel(program: Program, target: str | None) -> int:
    return 0 if target is None else program.param(target).numel()


def unit_costs(program: Program, structure: Structure) -> dict[int, dict[str, int]]:
    """Per block: parameters per KV group, per FFN neuron, and the block's total."""
    layouts = {lay.block: lay for lay in attention_layouts(structure)}
    out = {}
    for block in structure.blocks:
        group = neuron = 0
        lay = layouts.get(block.index)
        if lay is not None:
            projs = [lay.qkv] if lay.qkv else [lay.q, lay.k, lay.v]
            out_feats = sum(p.out_features for p in projs if p is not None)
            per_out = sum(_numel(program, p.weight) + _numel(program, p.bias) for p in projs if p is not None)
            per_out //= out_feats  # parameters per output feature of q/k/v
            group = per_out * (lay.rep + 2) * lay.head_dim + lay.o.out_features * lay.rep * lay.head_dim
        ffn = block.ffn
        if ffn is not None:
            ups = [p for p in (ffn.up, ffn.gate) if p is not None]
            neuron = sum(p.in_features + (p.bias is not None) for p in ups) + ffn.down.out_features
        out[block.index] = {"group": group, "neuron": neuron, "total": block.params}
    return out


def cost(
    program: Program, structure: Structure, plan: Plan, total: int, context: int = 256
) -> dict[str, int]:
    """Parameters and matmul FLOPs per token of ``plan`` (FLOPs: 2·weights + 4·heads·head_dim·context)."""
    costs = unit_costs(program, structure)
    layouts = {lay.block: lay for lay in attention_layouts(structure)}
    params = total
    flops = 2 * sum(i.in_features * i.out_features for i in structure.linears if i.block is None)
    for block in structure.blocks:
        b, c = block.index, costs[block.index]
        if b not in plan.blocks:
            params -= c["total"]
            continue
        lay = layouts.get(b)
        g = plan.groups.get(b, lay.kv_heads if lay else 0)
        w = plan.ffn.get(b, block.ffn.width if block.ffn else 0)
        cut = (lay.kv_heads - g) * c["group"] if lay else 0
        cut += (block.ffn.width - w) * c["neuron"] if block.ffn else 0
        params -= cut
        weights = sum(i.in_features * i.out_features for i in structure.linears if i.block == b)
        flops += 2 * (weights - cut) + (4 * g * lay.rep * lay.head_dim * context if lay else 0)
    return {"params": params, "flops_per_token": flops}


# ------------------------------------------------------------------------------------------- scoring
class PlanScorer:
    """Calibration loss of a plan on the *reordered* program, by masking instead of slicing (no copies).

    Causal LMs: mean next-token cross-entropy (nats). Other models: mean squared error to the original
    output (the only reference an encoder has).
    """

    def __init__(self, program: Program, structure: Structure, calib: torch.Tensor) -> None:
        self.program, self.structure, self.calib = program, structure, calib
        self.layouts = {lay.block: lay for lay in attention_layouts(structure)}
        self.units = {u.index: u for u in units_of(structure, "block")}
        self.causal = program.info.kind == "causal-lm"
        self.reference = None if self.causal else [program(b) for b in calib.split(8)]
        self.cache: dict[tuple, float] = {}
        self.evaluations = 0

    def _masked(self, plan: Plan) -> dict[str, torch.Tensor]:
        """Weights with the cut heads'/neurons' input columns zeroed: ``{target: masked weight}``."""
        out = {}
        for b in plan.blocks:
            lay = self.layouts.get(b)
            if lay is not None and plan.groups.get(b, lay.kv_heads) < lay.kv_heads:
                keep = plan.groups[b] * lay.rep * lay.head_dim
                out[lay.o.weight] = _zero_inputs(self.program.param(lay.o.weight), lay.o.transposed, keep)
            ffn = self.structure.blocks[b].ffn
            if ffn is not None and plan.ffn.get(b, ffn.width) < ffn.width:
                out[ffn.down.weight] = _zero_inputs(
                    self.program.param(ffn.down.weight), ffn.down.transposed, plan.ffn[b]
                )
        return out

    def loss(self, plan: Plan) -> float:
        key = plan.key()
        if key in self.cache:
            return self.cache[key]
        replace = {
            a: s for b, u in self.units.items() if b not in plan.blocks
            for a, s in u.replacements(self.program.graph).items()
        }  # fmt: skip
        masked = self._masked(plan)
        saved = {t: self.program.param(t) for t in masked}
        for t, w in masked.items():
            self.program.set_param(t, w)
        try:
            runner = GraphRunner(self.program.graph_module, replace=replace)
            total = n = 0.0
            for i, batch in enumerate(self.calib.split(8)):
                out = runner.forward(batch)
                assert out is not None
                if self.causal:
                    logits = out[:, :-1].flatten(0, 1).double()
                    total += float(F.cross_entropy(logits, batch[:, 1:].flatten(), reduction="sum"))
                    n += batch[:, 1:].numel()
                else:
                    total += float((out.double() - self.reference[i].double()).pow(2).sum())
                    n += out.numel()
        finally:
            for t, w in saved.items():
                self.program.set_param(t, w)
        self.evaluations += 1
        self.cache[key] = total / max(n, 1.0)
        return self.cache[key]


def _zero_inputs(w: torch.Tensor, transposed: bool, keep: int) -> torch.Tensor:
    w = w.clone()
    if transposed:
        w[keep:] = 0
    else:
        w[:, keep:] = 0
    return w


def uniform_plan(structure: Structure, blocks: Sequence[int], ratio: float, ffn: int) -> Plan:
    """Same head-group ratio and FFN width in every kept block."""
    groups = {}
    for lay in attention_layouts(structure):
        groups[lay.block] = max(1, min(lay.kv_heads, math.floor(lay.kv_heads * ratio + 0.5)))
    widths = {b.index: min(ffn, b.ffn.width) for b in structure.blocks if b.ffn is not None}
    return Plan(
        sorted(blocks),
        {b: g for b, g in groups.items() if b in blocks},
        {b: w for b, w in widths.items() if b in blocks},
    )

"""Graph utilities for structure analysis: a networkx view of an FX graph, linears and head counting.

Everything here is model-agnostic: it knows aten ops, not module classes. The op tables and the
activation / norm / attention-core matchers live in ``slmopt.analysis.patterns`` and are re-exported here.
``slmopt.analysis.analyze`` combines these pieces into the transformer structure.

Example:
    >>> import torch
    >>> from slmopt.program import ModelInfo, capture
    >>> from slmopt.analysis.graph import GraphView, find_linears, match_activation
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    >>> info = ModelInfo(kind="module", source="demo", input_names=["x"])
    >>> prog = capture(mlp, (torch.randn(2, 4, 8),), info)
    >>> view = GraphView(prog.graph_module)
    >>> [(m.node.name, m.in_features, m.out_features) for m in find_linears(view)]
    [('linear', 8, 16), ('linear_1', 16, 8)]
    >>> match_activation(view, view.nodes["gelu"])[0]
    'gelu'
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import networkx as nx
import torch
from torch import fx

from slmopt.analysis.patterns import (
    ATTENTION_OPS,
    SOFTMAX_OPS,
    TRANSPARENT_OPS,
    AttentionCore,
    NormMatch,
    _param_source,
    _target,
    find_attention_cores,
    find_norms,
    match_activation,
    split_source,
)

__all__ = [
    "ATTENTION_OPS",
    "AttentionCore",
    "SOFTMAX_OPS",
    "TRANSPARENT_OPS",
    "GraphView",
    "MatmulMatch",
    "NormMatch",
    "concrete_numel",
    "consumes_matrix_param",
    "count_heads",
    "find_attention_cores",
    "find_linears",
    "find_norms",
    "match_activation",
    "module_path",
    "params_between",
    "qkv_layout",
    "split_source",
    "val",
]

Node = fx.Node


class GraphView:
    """A read-only view of an FX graph: nodes by name, a networkx DiGraph of live dataflow, cached queries.

    Only *live* nodes (ancestors of the output) take part: dead subgraphs such as BERT's unused pooler or
    export's ``_assert_tensor_metadata`` checks must not look like structure.

    Args:
        gm: the graph module (``Program.graph_module``).
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes: dict[str, Node] = {n.name: n for n in gm.graph.nodes}
        self.order: dict[str, int] = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        self.output: Node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        full = nx.DiGraph()
        full.add_nodes_from(self.nodes)
        full.add_edges_from((i.name, n.name) for n in gm.graph.nodes for i in n.all_input_nodes)
        live = nx.ancestors(full, self.output.name) | {self.output.name}
        self.graph: nx.DiGraph = full.subgraph(live).copy()
        self.ancestors = lru_cache(maxsize=None)(self._ancestors)
        self.descendants = lru_cache(maxsize=None)(self._descendants)

    def _ancestors(self, name: str) -> frozenset[str]:
        return frozenset(nx.ancestors(self.graph, name))

    def _descendants(self, name: str) -> frozenset[str]:
        return frozenset(nx.descendants(self.graph, name))

    def live_nodes(self) -> list[Node]:
        """Live nodes in graph (topological) order."""
        return [n for n in self.gm.graph.nodes if n.name in self.graph]

    def users(self, node: Node) -> list[Node]:
        return [u for u in node.users if u.name in self.graph]

    def between(self, src: Node, dst: Node) -> set[str]:
        """Names of nodes on some path ``src -> ... -> dst`` (both ends excluded)."""
        return set(self.descendants(src.name) & self.ancestors(dst.name))

    def is_ancestor(self, a: Node, b: Node) -> bool:
        return a.name in self.ancestors(b.name)

    def attr(self, node: Node) -> torch.Tensor | None:
        """The tensor a ``get_attr`` node names (parameter, buffer or constant), else None."""
        if node.op != "get_attr":
            return None
        obj: Any = self.gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, torch.Tensor) else None

    def skip_back(self, node: Any, ops: frozenset[Any] = TRANSPARENT_OPS) -> Any:
        """Follows ``node``'s first input upwards while it is one of ``ops``."""
        while isinstance(node, Node) and node.op == "call_function" and node.target in ops and node.args:
            node = node.args[0]
        return node

    def skip_forward(self, node: Node, ops: frozenset[Any] = TRANSPARENT_OPS) -> Node:
        """Follows a single live user downwards while it is one of ``ops``."""
        while True:
            users = self.users(node)
            if len(users) != 1 or users[0].target not in ops or users[0].args[0] is not node:
                return node
            node = users[0]


def val(node: Any) -> Any:
    """The fake tensor (or value) export recorded for ``node``."""
    return node.meta.get("val") if isinstance(node, Node) else None


def concrete_numel(shape: Iterable[Any]) -> int:
    """Product of the *static* dims of a (fake tensor) shape; dynamic batch/sequence dims are SymInts.

    With batch and sequence dynamic this is the number of features per token, whatever the layout:
    ``[b, s, 4, 12]`` and ``[b, 4, s, 12]`` both give 48. A symbolic dim with a constant factor counts
    that factor: BLOOM folds heads into the batch, ``[4*b, s, 12]`` also gives 48.
    """
    return math.prod(int(d) if isinstance(d, int) else _coefficient(d) for d in shape)


def _static(dim: Any, size: int) -> bool:
    return isinstance(dim, int) and dim == size


def _coefficient(dim: Any) -> int:
    """The integer factor of a symbolic dim (``4*s0`` -> 4; ``s0`` or anything else -> 1)."""
    expr = getattr(getattr(dim, "node", None), "expr", None)
    if expr is None or not getattr(expr, "free_symbols", None):
        return 1
    try:
        coeff = expr.as_coeff_Mul()[0]
    except AttributeError:
        return 1
    return int(coeff) if getattr(coeff, "is_Integer", False) and int(coeff) > 0 else 1


def module_path(node: Node) -> str:
    """Innermost ``nn_module_stack`` path of ``node`` ('' when unknown): a naming hint, never a rule."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _cls in reversed(list(stack.values())):
        if isinstance(path, str) and not path.startswith("_"):
            return path
    return ""


# --------------------------------------------------------------------------------------------------
# Linears: one rule per aten op that multiplies an activation by a 2-D parameter.


# op -> (activation arg, weight arg, bias arg, weight operand read as [in, out]); linear reads [out, in].
_MATMUL_RULES: dict[Any, tuple[int, int, int | None, bool]] = {
    torch.ops.aten.linear.default: (0, 1, 2, False),
    torch.ops.aten.addmm.default: (1, 2, 0, True),
    torch.ops.aten.mm.default: (0, 1, None, True),
    torch.ops.aten.matmul.default: (0, 1, None, True),
}


@dataclass
class MatmulMatch:
    """A multiply of an activation by a parameter matrix, as found in the graph."""

    node: Node
    x: Node
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    transposed: bool


def find_linears(view: GraphView) -> list[MatmulMatch]:
    """All live linears (``linear``, ``addmm``, ``mm``/``matmul`` with a parameter weight), in graph order."""
    found = []
    for node in view.live_nodes():
        rule = _MATMUL_RULES.get(node.target) if node.op == "call_function" else None
        if rule is None or len(node.args) <= max(rule[0], rule[1]):
            continue
        x_arg, w_arg, b_arg, in_out = rule
        src = _param_source(view, node.args[w_arg], min_dim=2)
        if src is None or view.attr(src[0]).dim() != 2:  # type: ignore[union-attr]
            continue
        weight, flips = src
        transposed = in_out != bool(flips % 2)  # each transpose on the weight side flips the stored layout
        rows, cols = (int(d) for d in view.attr(weight).shape)  # type: ignore[union-attr]
        bias = _target(view, node.args[b_arg]) if b_arg is not None and len(node.args) > b_arg else None
        in_f, out_f = (rows, cols) if transposed else (cols, rows)
        found.append(MatmulMatch(node, node.args[x_arg], str(weight.target), bias, in_f, out_f, transposed))
    return found


def consumes_matrix_param(view: GraphView, node: Node) -> bool:
    """True when ``node`` reads a parameter of rank >= 2 (a linear, conv, ...): a "parameterised" op."""
    return any(
        (t := view.attr(i)) is not None and t.dim() >= 2 for i in node.all_input_nodes if i.op == "get_attr"
    )


def count_heads(view: GraphView, projection: Node, operand: Node, head_dim: int, tokens: int) -> int | None:
    """Heads of one attention operand, from the fake-tensor shapes between its projection and the core.

    Every tensor on that path whose last dim is ``head_dim`` carries ``heads * head_dim`` features per token
    (``[b, s, h, d]``, ``[b, h, s, d]``, ...); GQA's repeat_kv expands K/V on the way, so the *smallest*
    such width is the projection's own head count.

    Args:
        projection: the linear producing the operand (q, k, v or fused qkv).
        operand: the node fed to the attention core.
        head_dim: per-head size (the operand's last dim).
        tokens: product of static batch/sequence dims (1 when both are dynamic).
    """
    widths = []
    for name in view.between(projection, operand) | {operand.name}:
        value = val(view.nodes[name])
        # Compare static sizes only: a symbolic sequence dim whose example size equals head_dim would
        # otherwise be guarded (specialised) to that size by the comparison.
        if not isinstance(value, torch.Tensor) or value.dim() < 3 or not _static(value.shape[-1], head_dim):
            continue
        width = concrete_numel(value.shape)
        if width % (tokens * head_dim) == 0:
            widths.append(width // tokens)
    return min(widths) // head_dim if widths else None


def params_between(view: GraphView, proj: MatmulMatch, operand: fx.Node) -> list[str]:
    """Parameters read on the way from a projection to the attention core (per-head q/k norms)."""
    found = []
    for name in sorted(view.between(proj.node, operand) | {operand.name}, key=view.order.__getitem__):
        for arg in view.nodes[name].all_input_nodes:
            src = _param_source(view, arg)
            target = str(src[0].target) if src else None
            if target and target not in (proj.weight, proj.bias) and target not in found:
                found.append(target)
    return found


def qkv_layout(view: GraphView, qkv: MatmulMatch, query: fx.Node, head_dim: int) -> str:
    """``interleaved`` when the fused output is viewed as ``[..., heads, 3 * head_dim]`` before the split
    (GPT-NeoX, BLOOM), else ``blocked`` (``[q | k | v]`` along the features, GPT-2)."""
    for name in view.between(qkv.node, query):
        value = val(view.nodes[name])
        if not isinstance(value, torch.Tensor) or value.dim() < 3:
            continue
        # [..., heads, 3 * d] (GPT-NeoX) or [..., heads, 3, d] (BLOOM): q, k, v of one head side by side.
        last, second = value.shape[-1], value.shape[-2]
        if not isinstance(last, int):  # symbolic: comparing would specialise it
            continue
        if last == 3 * head_dim or (last == head_dim and isinstance(second, int) and second == 3):
            return "interleaved"
    return "blocked"

"""Graph patterns: the aten op vocabulary and the matchers for activations, norms and attention cores.

Like ``slmopt.analysis.graph`` (which re-exports every public name here), this is model-agnostic: matchers
recognise aten op patterns in a :class:`slmopt.analysis.graph.GraphView`, never module classes.

Example:
    >>> import torch
    >>> from slmopt.program import ModelInfo, capture
    >>> from slmopt.analysis.graph import GraphView
    >>> from slmopt.analysis.patterns import match_activation
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    >>> info = ModelInfo(kind="module", source="demo", input_names=["x"])
    >>> view = GraphView(capture(mlp, (torch.randn(2, 4, 8),), info).graph_module)
    >>> match_activation(view, view.nodes["gelu"])[0]
    'gelu'
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

if TYPE_CHECKING:
    from slmopt.analysis.graph import GraphView

__all__ = [
    "ACTIVATION_MATCHERS",
    "ATTENTION_OPS",
    "NORM_MATCHERS",
    "SOFTMAX_OPS",
    "TRANSPARENT_OPS",
    "AttentionCore",
    "NormMatch",
    "find_attention_cores",
    "find_norms",
    "match_activation",
    "split_source",
]

Node = fx.Node


@cache
def _ops(*names: str) -> frozenset[Any]:
    """Resolves ``"op.overload"`` names on ``torch.ops.aten``, skipping ones this torch lacks."""
    found = []
    for name in names:
        packet, overload = name.split(".")
        op = getattr(getattr(torch.ops.aten, packet, None), overload, None)
        if op is not None:
            found.append(op)
    return frozenset(found)


# Ops that only cast, alias or reshape an activation: walking through them keeps "the same value". Used to
# see past GPT-2's `view(-1, h)` around addmm, eval-mode dropout and HF's dtype round trips.
TRANSPARENT_OPS = _ops(
    "view.default", "reshape.default", "_unsafe_view.default", "alias.default", "clone.default",
    "contiguous.default", "dropout.default", "to.dtype", "to.dtype_layout", "to.device", "_to_copy.default",
    "type_as.default", "flatten.using_ints", "unflatten.int", "detach.default",
)  # fmt: skip
# Weight-side ops that transpose a 2-D parameter (each one flips the stored layout).
_TRANSPOSE_OPS = _ops("t.default", "transpose.int", "permute.default", "numpy_T.default")
ATTENTION_OPS = _ops("scaled_dot_product_attention.default")
SOFTMAX_OPS = _ops("softmax.int", "_softmax.default", "_safe_softmax.default")
# Pointwise arithmetic an activation written as a formula is built from (NewGELU, x*sigmoid(x), erf GELU).
_POINTWISE_OPS = _ops(
    "mul.Tensor", "mul.Scalar", "add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "rsub.Scalar",
    "div.Tensor", "div.Scalar", "pow.Tensor_Scalar", "tanh.default", "erf.default", "sigmoid.default",
    "neg.default",
)  # fmt: skip


def _target(view: GraphView, arg: Any) -> str | None:
    """The ``get_attr`` target behind a parameter operand (through casts/transposes), else None."""
    src = _param_source(view, arg)
    return str(src[0].target) if src else None


def _param_source(view: GraphView, node: Any, min_dim: int = 1) -> tuple[Node, int] | None:
    """Walks a weight operand up through casts and transposes to its ``get_attr``: (node, flips)."""
    flips = 0
    while isinstance(node, Node) and node.op == "call_function":
        if node.target in _TRANSPOSE_OPS:
            flips += 1
        elif node.target not in TRANSPARENT_OPS:
            return None
        node = node.args[0]
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    tensor = view.attr(node)
    if tensor is None or tensor.dim() < min_dim:
        return None
    return node, flips


# --------------------------------------------------------------------------------------------------
# Activations: a table of matchers, each returning (name, input) or None ("not mine").

_GELU = torch.ops.aten.gelu.default
_UNARY_ACTIVATIONS = {
    torch.ops.aten.silu.default: "silu",
    torch.ops.aten.relu.default: "relu",
}
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class _Formula:
    """An activation written out in pointwise ops, recognised by its key ops and constants."""

    name: str
    key_ops: frozenset[Any]
    required: tuple[float, ...]
    allowed: tuple[float, ...]


_FORMULAS = (
    # GPT-2 NewGELU: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
    _Formula("gelu_tanh", _ops("tanh.default"), (0.044715, _SQRT_2_OVER_PI), (0.5, 1.0, 2.0, 3.0)),
    # erf GELU: 0.5 * x * (1 + erf(x / sqrt(2)))
    _Formula("gelu", _ops("erf.default"), (), (0.5, 1.0, 2.0, math.sqrt(2.0), 1.0 / math.sqrt(2.0))),
    # SiLU: x * sigmoid(x) (no constants: x * sigmoid(1.702 x) is QuickGELU and must not match)
    _Formula("silu", _ops("sigmoid.default"), (), ()),
)
_FORMULA_MAX_NODES = 16


def _match_gelu_op(view: GraphView, node: Node) -> tuple[str, Node] | None:
    if node.target is not _GELU:
        return None
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return ("gelu_tanh" if approximate == "tanh" else "gelu"), node.args[0]


def _match_unary_op(view: GraphView, node: Node) -> tuple[str, Node] | None:
    name = _UNARY_ACTIVATIONS.get(node.target)
    return (name, node.args[0]) if name else None


def _has_close(values: Iterable[float], x: float) -> bool:
    return any(math.isclose(v, x, rel_tol=1e-4) for v in values)


def _match_formula(view: GraphView, node: Node) -> tuple[str, Node] | None:
    """Matches a pointwise subgraph ending at ``node`` with exactly one tensor input against _FORMULAS."""
    if node.target not in _POINTWISE_OPS:
        return None
    inside: set[Node] = set()
    externals: set[Node] = set()
    constants: list[float] = []
    todo = [node]
    while todo:
        cur = todo.pop()
        if cur in inside:
            continue
        inside.add(cur)
        if len(inside) > _FORMULA_MAX_NODES:
            return None
        for arg in cur.args:
            if isinstance(arg, Node) and arg.op == "call_function" and arg.target in _POINTWISE_OPS:
                todo.append(arg)
            elif isinstance(arg, Node):
                externals.add(arg)
            elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
                constants.append(float(arg))
    if len(externals) != 1:
        return None
    ops = {n.target for n in inside}
    for formula in _FORMULAS:
        if not formula.key_ops <= ops:
            continue
        known = formula.required + formula.allowed
        has_required = all(_has_close(constants, r) for r in formula.required)
        only_known = all(_has_close(known, c) for c in constants)
        if has_required and only_known:
            return formula.name, next(iter(externals))
    return None


ACTIVATION_MATCHERS: tuple[Callable[[GraphView, Node], tuple[str, Node] | None], ...] = (
    _match_gelu_op, _match_unary_op, _match_formula,
)  # fmt: skip


def match_activation(view: GraphView, node: Any) -> tuple[str, Node] | None:
    """Recognises an activation ending at ``node``: ``(name, input node)`` or None.

    Names: ``gelu`` (erf), ``gelu_tanh``, ``silu``, ``relu``.
    """
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    return next((hit for matcher in ACTIVATION_MATCHERS if (hit := matcher(view, node)) is not None), None)


# --------------------------------------------------------------------------------------------------
# Norms: LayerNorm / RMSNorm ops and the RMSNorm pattern pow(2) -> mean -> +eps -> rsqrt -> mul -> mul(w).


@dataclass
class NormMatch:
    """A normalisation found in the graph: its output node, input node, kind and parameters."""

    output: Node
    input: Node
    kind: str  # "layernorm" | "rmsnorm"
    weight: str | None
    bias: str | None


# op -> (kind, weight arg, bias arg)
_NORM_OPS: dict[Any, tuple[str, int, int | None]] = {
    torch.ops.aten.layer_norm.default: ("layernorm", 2, 3),
    torch.ops.aten.rms_norm.default: ("rmsnorm", 2, None),
}


def _match_norm_op(view: GraphView, node: Node) -> NormMatch | None:
    if node.target not in _NORM_OPS:
        return None
    kind, w_idx, b_idx = _NORM_OPS[node.target]
    args = [*node.args, None, None, None, None]  # weight/bias may be omitted
    bias = _target(view, args[b_idx]) if b_idx is not None else None
    return NormMatch(output=node, input=node.args[0], kind=kind, weight=_target(view, args[w_idx]), bias=bias)


def _is_op(node: Any, *names: str) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in _ops(*names)


def _match_rms_pattern(view: GraphView, node: Node) -> NormMatch | None:
    """Anchored at ``rsqrt``: x * rsqrt(mean(x^2) + eps), then an optional multiply by a 1-D weight."""
    if not _is_op(node, "rsqrt.default"):
        return None
    add = view.skip_back(node.args[0])
    if not _is_op(add, "add.Tensor", "add.Scalar"):
        return None
    mean = view.skip_back(add.args[0])
    if not _is_op(mean, "mean.dim"):
        return None
    square = view.skip_back(mean.args[0])
    if not (_is_op(square, "pow.Tensor_Scalar") and square.args[1] == 2):
        return None
    x = view.skip_back(square.args[0])
    scaled = [u for u in view.users(node) if _is_op(u, "mul.Tensor") and view.skip_back(u.args[0]) is x]
    scaled += [u for u in view.users(node) if _is_op(u, "mul.Tensor") and view.skip_back(u.args[1]) is x]
    if not scaled:
        return None
    out, weight = view.skip_forward(scaled[0]), None
    for user in view.users(out):
        if _is_op(user, "mul.Tensor"):
            other = user.args[1] if user.args[0] is out else user.args[0]
            weight = _target(view, view.skip_back(other, TRANSPARENT_OPS | _ops("add.Tensor", "add.Scalar")))
            if weight is not None:
                out = user
                break
    return NormMatch(output=out, input=square.args[0], kind="rmsnorm", weight=weight, bias=None)


NORM_MATCHERS: tuple[Callable[[GraphView, Node], NormMatch | None], ...] = (
    _match_norm_op,
    _match_rms_pattern,
)


def find_norms(view: GraphView) -> dict[str, NormMatch]:
    """All live norms, keyed by output node name, in graph order."""
    hits = (m(view, node) for node in view.live_nodes() if node.op == "call_function" for m in NORM_MATCHERS)
    return {hit.output.name: hit for hit in hits if hit is not None}


# --------------------------------------------------------------------------------------------------
# Attention cores: fused scaled-dot-product attention, or softmax(Q @ K^T) @ V written out.

_BATCHED_MATMUL_OPS = _ops("matmul.default", "bmm.default")
_SCORE_WALK_LIMIT = 8  # ops between the score matmul and softmax (scale, mask add, masked_fill, casts)


@dataclass
class AttentionCore:
    """Where attention mixes tokens: ``node`` is the sdpa (or softmax) node, ``out`` its [.., s, d] output."""

    node: Node
    query: Node
    key: Node
    value: Node
    out: Node


_BADDBMM = _ops("baddbmm.default")


def _is_activation_matmul(view: GraphView, node: Any) -> bool:
    if not isinstance(node, Node) or node.target not in _BATCHED_MATMUL_OPS | _BADDBMM:
        return False
    operands = node.args[1:3] if node.target in _BADDBMM else node.args[:2]
    return len(operands) == 2 and all(_param_source(view, a) is None for a in operands)


def _softmax_core(view: GraphView, softmax: Node, region: set[str]) -> AttentionCore | None:
    """softmax(f(Q @ K^T)) @ V: the score matmul is a few pointwise ops above, the V matmul just below."""
    scores, frontier = None, [softmax.args[0]]
    for _ in range(_SCORE_WALK_LIMIT):
        hit = next((n for n in frontier if _is_activation_matmul(view, n)), None)
        if hit is not None:
            scores = hit
            break
        frontier = [a for n in frontier if isinstance(n, Node) for a in n.all_input_nodes if a.name in region]
    if scores is None:
        return None
    # baddbmm(bias, Q, K^T): BLOOM's ALiBi scores carry the bias as the first operand.
    query, key = (scores.args[1], scores.args[2]) if scores.target in _BADDBMM else scores.args[:2]
    probs = view.skip_forward(softmax)
    out = next((u for u in view.users(probs) if _is_activation_matmul(view, u) and u.args[0] is probs), None)
    if out is None:
        return None
    return AttentionCore(node=softmax, query=query, key=key, value=out.args[1], out=out)


def find_attention_cores(view: GraphView, region: set[str]) -> list[AttentionCore]:
    """Attention cores among the nodes named in ``region`` (e.g. one residual branch)."""
    cores = []
    for name in sorted(region, key=view.order.__getitem__):
        node = view.nodes[name]
        if node.target in ATTENTION_OPS:
            q, k, v = (node.kwargs.get(key, node.args[i]) for i, key in enumerate(("query", "key", "value")))
            cores.append(AttentionCore(node=node, query=q, key=k, value=v, out=node))
        elif node.target in SOFTMAX_OPS:
            core = _softmax_core(view, node, region)
            if core is not None:
                cores.append(core)
    return cores


# --------------------------------------------------------------------------------------------------
# Splits: one projection's output cut along its features (Phi-3's fused gate_up, fused QKV).

_SPLIT_OPS = _ops("split.Tensor", "split_with_sizes.default", "chunk.default", "unsafe_split.Tensor")


def _last_dim(value: Any, dim: Any) -> bool:
    return isinstance(dim, int) and isinstance(value, torch.Tensor) and dim in (-1, value.dim() - 1)


def split_source(view: GraphView, node: Any) -> tuple[Node, int, int] | None:
    """``(source, start, stop)`` when ``node`` is a slice of ``source``'s last dim, seen through views.

    Recognises ``chunk``/``split``/``split_with_sizes`` followed by ``getitem`` and ``slice.Tensor``.
    """
    node = view.skip_back(node)
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    if _is_op(node, "slice.Tensor"):
        src, args = node.args[0], [*node.args[1:], 0, 0, None][:3]
        width = getattr(src.meta.get("val"), "shape", [None])[-1] if isinstance(src, Node) else None
        if not _last_dim(src.meta.get("val"), args[0]) or not isinstance(width, int):
            return None
        start, stop = int(args[1] or 0), width if args[2] is None else min(int(args[2]), width)
        return view.skip_back(src), start, stop
    if node.target is not operator.getitem or not isinstance(node.args[0], Node):
        return None
    split, index = node.args[0], node.args[1]
    if split.op != "call_function" or split.target not in _SPLIT_OPS:
        return None
    src = split.args[0]
    value = src.meta.get("val") if isinstance(src, Node) else None
    dim = split.kwargs.get("dim", split.args[2] if len(split.args) > 2 else 0)
    if not _last_dim(value, dim) or not isinstance(value.shape[-1], int):
        return None
    width, how = int(value.shape[-1]), split.args[1]
    if split.target in _ops("chunk.default"):
        step = -(-width // int(how))
        sizes = [min(step, width - i) for i in range(0, width, step)]
    elif isinstance(how, int):
        sizes = [min(how, width - i) for i in range(0, width, how)]
    else:
        sizes = [int(s) for s in how]
    if not isinstance(index, int) or index >= len(sizes):
        return None
    start = sum(sizes[:index])
    return view.skip_back(src), start, start + sizes[index]

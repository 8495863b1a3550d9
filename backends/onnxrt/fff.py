"""ONNX lowerings of ``slmopt::fff``: standard ops, ``com.microsoft.MoE``, or one TensorRT plugin node.

The FFF pass sets ``program.lowering_hints["fff_lowering"]``; the onnxruntime backend passes the hints to
:func:`slmopt.lowering.onnx_translations`, which calls :func:`make` to pick the translation:

* ``ops`` — standard ONNX ops only (opset 18, any runtime). Routing is vectorised over tokens; leaves
  gather each token's leaf weights (``[T, l, h]``) and run batched matvecs.
* ``moe`` — the same routing, then ORT's ``com.microsoft.MoE`` (top-1, ``router_probs`` 0 at the tree's
  leaf and -inf elsewhere: MoE applies a softmax, so the chosen leaf gets weight exactly 1). Verified
  against ORT 1.31 (:data:`MOE_ACTIVATIONS`): fc1 ``[E, l, h]`` (= ``leaf_w1``), fc2 ``[E, h, l]``
  (= ``leaf_w2`` transposed), MoE ``gelu`` is the *tanh* GELU, ``swiglu`` needs ``swiglu_fusion=1``
  (gate/up rows interleaved, ``activation_alpha=1``, ``activation_beta=0``) and the CPU kernel rejects
  fc3. What MoE cannot express exactly lowers with ``ops`` and a warning; erf-GELU leaves use MoE's tanh
  GELU (max abs error ≈ 5e-4 per neuron) unless ``fff_moe_exact`` is set.
* ``plugin`` — one ``slmopt::SlmoptFFF`` node as specified in :mod:`slmopt.backends.fff_spec` (TensorRT plugin;
  ORT cannot run it).

Routing has three forms, chosen by ``fff_routing`` (default ``auto``). ``path`` (``moe`` only, the ``auto``
choice for trees of at most :data:`DENSE_ROUTING_MAX_NODES` nodes without node terms) feeds MoE its
``router_probs`` in 4 ops whatever the depth: Gemm (node logits), Greater, Where(±s), MatMul with the
constant :func:`path_matrix`. Where a leaf index or node terms are needed (``ops``, UltraFastBERT):
``dense`` computes all ``N`` node logits with one Gemm and then costs 3 ops per level (GatherElements of
the precomputed step, ``n + n``, ``+ step``); ``gather`` reads only the ``L`` visited rows and costs 7 ops
per level. ``auto`` takes ``dense`` for trees of at most :data:`DENSE_ROUTING_MAX_NODES` nodes, where
reading every node row costs less than four extra ~1-2 µs ops per level (measured with ``moe``, h = 768,
batch 1, one thread: dense/gather 176/209 µs at L = 4, 76/106 at L = 6, 123/133 at L = 8). ``ops`` copies
each token's leaf weights, which suits small batches; at batch 128 it is slower than the dense FFN,
while ``moe`` groups tokens by leaf (benchmarks/bench_fff_ort.py).

Example:
    >>> from slmopt.lowering import onnx_translations
    >>> register()
    >>> table = onnx_translations({"fff_lowering": "moe"})
    >>> # torch.onnx.export(model, (x,), dynamo=True, custom_translation_table=table)
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx.defs
import torch
from onnxscript import ir
from onnxscript import opset18 as op
from onnxscript.onnx_types import TensorType
from onnxscript.values import Op, Opset

from slmopt.backends import fff_spec
from slmopt.lowering import register_onnx_translation

__all__ = [
    "DENSE_ROUTING_MAX_NODES",
    "LOWERINGS",
    "MOE_ACTIVATIONS",
    "ROUTING_OPS_PER_LEVEL",
    "make",
    "register",
    "routing_margin_mask",
]

logger = logging.getLogger(__name__)

DENSE_ROUTING_MAX_NODES = 255  # L <= 8; UltraFastBERT's 4095-node trees route with gather
# Runtime ops each routing level adds after the first (the tests count them in exported graphs).
ROUTING_OPS_PER_LEVEL = {"dense": 3, "gather": 7}
# (activation, gated) → (MoE activation_type, exact). Anything else falls back to ``ops``.
MOE_ACTIVATIONS: dict[tuple[str, bool], tuple[str, bool]] = {
    ("relu", False): ("relu", True),
    ("silu", False): ("silu", True),
    ("gelu_tanh", False): ("gelu", True),
    ("gelu", False): ("gelu", False),  # MoE's gelu is the tanh approximation
    ("silu", True): ("swiglu", True),
}
_MOE_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
_MOE_OPSET = Opset("com.microsoft", 1)
# The exporter passes ir.Value objects; annotating with onnxscript's TensorType lets it infer the signature.
OnnxTensor = TensorType


def _ints(*values: int) -> ir.Tensor:
    """An int64 1-D constant (shapes, axes, pads)."""
    return ir.tensor(np.array(values, np.int64))


@dataclass
class _FFF:
    """One ``slmopt::fff`` call being lowered: its ONNX values plus static facts."""

    x: ir.Value
    w: dict[str, ir.Value | None]
    spec: fff_spec.FFFSpec
    hidden: int
    dtype: ir.DataType
    hints: dict[str, Any]
    views: dict[str, ir.Value] = field(default_factory=dict)

    def const(self, value: Any, dtype: Any = None) -> ir.Tensor:
        """A constant in x's dtype (or ``dtype``): the recorder cannot infer dtypes of fresh values."""
        return ir.tensor(np.asarray(value, dtype=dtype or self.dtype.numpy()))

    def view(self, *shape: int) -> ir.Value:
        """x reshaped to ``shape`` (``-1`` = tokens), created once per shape."""
        key = str(shape)
        if key not in self.views:
            self.views[key] = op.Reshape(self.x, _ints(*shape))
        return self.views[key]


# ----------------------------------------------------------------------------------------------- pieces
def _gelu(f: _FFF, v: ir.Value) -> ir.Value:
    # (x · (1 + erf(x/√2))) · 0.5: the operand order ORT's GeluFusion turns into one Gelu node.
    inner = op.Add(op.Erf(op.Div(v, f.const(math.sqrt(2.0)))), f.const(1.0))
    return op.Mul(op.Mul(v, inner), f.const(0.5))


def _gelu_tanh(f: _FFF, v: ir.Value) -> ir.Value:
    # x · 0.5 · (1 + tanh(√(2/π)·(x + 0.044715·x³))): the operand order ORT's FastGeluFusion matches.
    inner = op.Add(v, op.Mul(f.const(0.044715), op.Pow(v, f.const(3.0))))
    inner = op.Add(op.Tanh(op.Mul(f.const(math.sqrt(2.0 / math.pi)), inner)), f.const(1.0))
    return op.Mul(op.Mul(v, f.const(0.5)), inner)


_ACTIVATIONS: dict[str, Callable[[_FFF, ir.Value], ir.Value]] = {
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": lambda f, v: op.Mul(v, op.Sigmoid(v)),
    "relu": lambda f, v: op.Relu(v),
}


@dataclass
class _Route:
    """Result of routing: heap index of the reached leaf ``[T, 1]`` and, if asked, (n_k, z_k) per level."""

    node: ir.Value
    path: list[tuple[ir.Value, ir.Value]]


def _route_dense(f: _FFF, need_z: bool) -> _Route:
    """All node logits in one Gemm; per level: GatherElements(step), n + n, + step (3 ops)."""
    logits = op.Gemm(f.view(-1, f.hidden), f.w["node_w"], f.w["node_b"], transB=1)  # [T, N]
    two, one = f.const(2, np.int64), f.const(1, np.int64)
    step = op.Where(op.Greater(logits, f.const(0.0)), two, one)  # 1 + [z > 0]: n' = 2n + step
    starts, ends, axes = _ints(0), _ints(1), _ints(1)
    path = [(f.const([[0]], np.int64), op.Slice(logits, starts, ends, axes))] if need_z else []
    n = op.Slice(step, starts, ends, axes)  # level 0: n = 0 for every token, so n' = step[:, 0]
    for _ in range(1, f.spec.levels):
        if need_z:
            path.append((n, op.GatherElements(logits, n, axis=1)))
        n = op.Add(op.Add(n, n), op.GatherElements(step, n, axis=1))
    return _Route(n, path)


def _route_gather(f: _FFF, need_z: bool) -> _Route:
    """Reads only the visited rows: per level Gather, Mul, ReduceSum, Greater, Where, Add, Add (7 ops).

    The bias rides along as an extra weight column against a constant-1 input column, which saves the
    Gather + Add a separate bias would cost per level.
    """
    w_aug = op.Concat(f.w["node_w"], op.Unsqueeze(f.w["node_b"], _ints(1)), axis=1)
    x_aug = op.Pad(f.view(-1, 1, f.hidden), _ints(0, 0, 0, 0, 0, 1), f.const(1.0))
    two, one, axes = f.const(2, np.int64), f.const(1, np.int64), _ints(2)
    n: ir.Value | None = None
    path = []
    for _ in range(f.spec.levels):
        index = f.const([[0]], np.int64) if n is None else n
        z = op.ReduceSum(op.Mul(op.Gather(w_aug, index, axis=0), x_aug), axes, keepdims=0)  # [T, 1]
        if need_z:
            path.append((index, z))
        step = op.Where(op.Greater(z, f.const(0.0)), two, one)
        n = step if n is None else op.Add(op.Add(n, n), step)
    assert n is not None
    return _Route(n, path)


_ROUTERS: dict[str, Callable[[_FFF, bool], _Route]] = {"dense": _route_dense, "gather": _route_gather}
# ``path`` builds MoE's router_probs without a leaf index (see _path_router), so it is not in _ROUTERS.
ROUTING_MODES = ("auto", *_ROUTERS, "path")


def _routing_mode(f: _FFF) -> str:
    """The routing form for this node; ``path`` only where MoE consumes the router (no node terms)."""
    mode = f.hints.get("fff_routing", "auto")  # (make() has validated the name)
    small = f.spec.num_nodes <= DENSE_ROUTING_MAX_NODES
    if mode == "auto":
        mode = "path" if small else "gather"
    if mode == "path" and (f.spec.has_node_out or not small):
        # Node terms need each level's (n_k, z_k); a [N, E] path matrix of a 4095-node tree is 64 MiB.
        mode = "dense" if small else "gather"
    return mode


def _route(f: _FFF, need_z: bool) -> _Route:
    mode = _routing_mode(f)
    return _ROUTERS["dense" if mode == "path" else mode](f, need_z)


def path_matrix(levels: int) -> np.ndarray:
    """``[N, E]``: +1 where leaf e's path goes right at node n, -1 where it goes left, 0 off its path.

    ``sign(z) @ path_matrix`` is ``levels`` at the leaf every node decision points to, and at most
    ``levels - 2`` at any other leaf (the first node where the paths part counts -1 instead of +1).

    Example:
        >>> path_matrix(1).tolist()
        [[-1.0, 1.0]]
    """
    nodes, leaves = 2**levels - 1, 2**levels
    matrix = np.zeros((nodes, leaves), np.float32)
    for leaf in range(leaves):
        n = 0
        for level in range(levels):
            right = (leaf >> (levels - 1 - level)) & 1  # heap order: leaf bits, most significant first
            matrix[n, leaf] = 1.0 if right else -1.0
            n = 2 * n + 1 + right
    return matrix


# Scale of the path scores: the reached leaf beats every other by >= 2·PATH_SCALE = 64 logits, so MoE's
# softmax gives it exp(0) / (1 + E·exp(-64)) == 1.0 exactly in float32/16; levels · 32 <= 256 fits fp16.
PATH_SCALE = 32.0


def _path_router(f: _FFF) -> ir.Value:
    """``router_probs [T, E]`` in 4 ops: Gemm (all node logits), Greater, Where(±s), MatMul(path matrix).

    ``Greater`` keeps the reference's tie rule: z == 0 goes left (-s), exactly as ``z > 0 goes right``.
    """
    logits = op.Gemm(f.view(-1, f.hidden), f.w["node_w"], f.w["node_b"], transB=1)  # [T, N]
    sign = op.Where(op.Greater(logits, f.const(0.0)), f.const(PATH_SCALE), f.const(-PATH_SCALE))
    return op.MatMul(sign, f.const(path_matrix(f.spec.levels)))


def _node_outputs(f: _FFF, route: _Route) -> ir.Value:
    """UltraFastBERT terms Σ_k act(z_k)·node_out[n_k] as ``[T, 1, h]``."""
    total = None
    for n, z in route.path:
        coef = op.Unsqueeze(_ACTIVATIONS[f.spec.activation](f, z), _ints(2))
        term = op.Mul(coef, op.Gather(f.w["node_out"], n, axis=0))
        total = term if total is None else op.Add(total, term)
    assert total is not None
    return total


def _leaf_bias(f: _FFF, name: str, leaf: ir.Value, shape: tuple[int, ...]) -> ir.Value | None:
    bias = f.w[name]
    if bias is None:
        return None
    return op.Gather(op.Reshape(bias, _ints(*shape)), leaf, axis=0)


def _leaves_ops(f: _FFF, route: _Route) -> ir.Value:
    """Per-token leaf FFN from gathered ``[T, l, h]`` weights, as ``[T, 1, h]``."""
    e, w, h = f.spec.num_leaves, f.spec.leaf_width, f.hidden
    leaf = op.Reshape(op.Sub(route.node, f.const(f.spec.num_nodes, np.int64)), _ints(-1))
    x_col = f.view(-1, h, 1)

    def project(weight: str, bias: str) -> ir.Value:  # [T, l, 1]
        out = op.MatMul(op.Gather(f.w[weight], leaf, axis=0), x_col)
        b = _leaf_bias(f, bias, leaf, (e, w, 1))
        return out if b is None else op.Add(out, b)

    act = _ACTIVATIONS[f.spec.activation]
    up = project("leaf_w1", "leaf_b1")
    hidden = op.Mul(act(f, project("leaf_wg", "leaf_bg")), up) if f.spec.gated else act(f, up)
    out = op.MatMul(op.Reshape(hidden, _ints(-1, 1, w)), op.Gather(f.w["leaf_w2"], leaf, axis=0))
    b2 = _leaf_bias(f, "leaf_b2", leaf, (e, 1, h))
    return out if b2 is None else op.Add(out, b2)


@functools.cache
def _moe_op() -> Op:
    """``com.microsoft::MoE`` with the inputs/attributes we use (the onnx package has no contrib schemas)."""
    schema = onnx.defs.OpSchema
    single, optional = schema.FormalParameterOption.Single, schema.FormalParameterOption.Optional
    names = ("input", "router_probs", "fc1_experts_weights", "fc1_experts_bias", "fc2_experts_weights")
    inputs = [
        schema.FormalParameter(n, "T", param_option=optional if n.endswith("bias") else single)
        for n in (*names, "fc2_experts_bias")
    ]
    kinds = dict(k="INT", activation_type="STRING", normalize_routing_weights="INT", swiglu_fusion="INT")
    kinds |= dict(activation_alpha="FLOAT", activation_beta="FLOAT")
    attrs = [schema.Attribute(n, getattr(schema.AttrType, t), required=False) for n, t in kinds.items()]
    moe = schema(
        "MoE",
        _MOE_OPSET.domain,
        _MOE_OPSET.version,
        inputs=inputs,
        attributes=attrs,
        outputs=[schema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
    )
    return Op(_MOE_OPSET, "MoE", moe)


def _moe_blocker(f: _FFF) -> str | None:
    """Why MoE cannot run this node exactly enough (None: it can)."""
    if not f.spec.has_leaves:
        return "no leaves (UltraFastBERT form)"
    if f.dtype not in _MOE_DTYPES:
        return f"dtype {f.dtype} (MoE runs float/float16)"
    entry = MOE_ACTIVATIONS.get((f.spec.activation, f.spec.gated))
    kind = "gated" if f.spec.gated else "plain"
    if entry is None:
        return f"{kind} {f.spec.activation} leaves have no MoE activation_type"
    if not entry[1] and f.hints.get("fff_moe_exact", False):
        return f"fff_moe_exact is set and MoE approximates {kind} {f.spec.activation} leaves"
    return None


def _interleave(a: ir.Value, b: ir.Value, shape: tuple[int, ...]) -> ir.Value:
    """Rows a0, b0, a1, b1, ... along axis 1 (MoE's ``swiglu_fusion=1`` layout: gate, then up)."""
    axis = _ints(2)
    return op.Reshape(op.Concat(op.Unsqueeze(a, axis), op.Unsqueeze(b, axis), axis=2), _ints(*shape))


def _leaves_moe(f: _FFF, route: _Route | None) -> ir.Value:
    """The reached leaf via ``com.microsoft::MoE`` (k=1, router 0 at the leaf, -inf elsewhere)."""
    e, w, h = f.spec.num_leaves, f.spec.leaf_width, f.hidden
    activation_type, exact = MOE_ACTIVATIONS[(f.spec.activation, f.spec.gated)]
    if not exact:
        logger.info("slmopt::fff -> MoE: %s leaves use MoE's tanh GELU (|err| ≲ 5e-4)", f.spec.activation)
    if route is None:  # path routing: scores straight from the node logits
        router = _path_router(f)
    else:
        leaf_ids = f.const(np.arange(f.spec.num_nodes, f.spec.num_nodes + e), np.int64)
        router = op.Where(op.Equal(route.node, leaf_ids), f.const(0.0), f.const(-np.inf))  # [T, E]
    fc1, fc1_bias, attrs = f.w["leaf_w1"], f.w["leaf_b1"], {}
    if f.spec.gated:
        fc1 = _interleave(f.w["leaf_wg"], fc1, (e, 2 * w, h))
        if fc1_bias is not None or f.w["leaf_bg"] is not None:
            zeros = f.const(np.zeros((e, w)))
            gate_bias = f.w["leaf_bg"] if f.w["leaf_bg"] is not None else zeros
            fc1_bias = _interleave(gate_bias, fc1_bias if fc1_bias is not None else zeros, (e, 2 * w))
        attrs = {"swiglu_fusion": 1, "activation_alpha": 1.0, "activation_beta": 0.0}
    fc2 = op.Transpose(f.w["leaf_w2"], perm=[0, 2, 1])  # [E, h, l]; folded into a constant by ORT
    return _moe_op()(
        f.view(-1, h),  # [T, h]: the rows the router scored (one view shared with the routing Gemm)
        router,
        fc1,
        fc1_bias,
        fc2,
        f.w["leaf_b2"],
        k=1,
        activation_type=activation_type,
        normalize_routing_weights=0,
        **attrs,
    )


# -------------------------------------------------------------------------------------------- lowerings
def _tree(f: _FFF, leaves: Callable[[_FFF, _Route], ir.Value]) -> ir.Value:
    """Routing + node terms + leaves, reshaped back to x's (dynamic) shape."""
    route = _route(f, need_z=f.spec.has_node_out)
    parts = [_node_outputs(f, route)] if f.spec.has_node_out else []
    if f.spec.has_leaves:
        parts.append(leaves(f, route))
    total = parts[0] if len(parts) == 1 else op.Add(parts[0], parts[1])
    return op.Reshape(total, op.Shape(f.x))


def _lower_ops(f: _FFF) -> ir.Value:
    return _tree(f, _leaves_ops)


def _lower_moe(f: _FFF) -> ir.Value:
    blocker = _moe_blocker(f)
    if blocker is not None:
        logger.warning("slmopt::fff cannot lower to com.microsoft.MoE (%s); using standard ops", blocker)
        return _lower_ops(f)
    if _routing_mode(f) == "path":  # no leaf index, no node terms: router scores feed MoE directly
        return op.Reshape(_leaves_moe(f, None), op.Shape(f.x))
    return _tree(f, _leaves_moe)


def _lower_plugin(f: _FFF) -> ir.Value:
    domain = Opset(fff_spec.PLUGIN_DOMAIN, fff_spec.DOMAIN_VERSION)
    plugin = Op(domain, fff_spec.OP_TYPE, fff_spec.onnx_schema())
    return plugin(f.x, *(f.w[name] for name in fff_spec.INPUT_NAMES[1:]), **f.spec.to_attributes())


LOWERINGS: dict[str, Callable[[_FFF], ir.Value]] = {
    "ops": _lower_ops,
    "moe": _lower_moe,
    "plugin": _lower_plugin,
}
DEFAULT_LOWERING = "ops"


def _check_hints(hints: dict[str, Any]) -> str:
    mode = hints.get("fff_lowering", DEFAULT_LOWERING)
    if mode not in LOWERINGS:
        raise ValueError(f"unknown fff_lowering {mode!r}; valid choices: {', '.join(LOWERINGS)}")
    routing = hints.get("fff_routing", "auto")
    if routing not in ROUTING_MODES:
        raise ValueError(f"unknown fff_routing {routing!r}; valid choices: {', '.join(ROUTING_MODES)}")
    return mode


def make(hints: dict[str, Any]) -> Callable[..., ir.Value]:
    """The exporter translation of ``slmopt::fff`` for these lowering hints.

    Args:
        hints: ``fff_lowering`` (``ops`` | ``moe`` | ``plugin``, default ``ops``), ``fff_routing``
            (``auto`` | ``dense`` | ``gather``) and ``fff_moe_exact`` (bool: no approximate MoE GELU).

    Returns:
        A function the exporter traces with onnxscript values (None for absent optional inputs).

    Raises:
        ValueError: an unknown lowering or routing name.

    Example:
        >>> make({"fff_lowering": "plugin"}).__name__
        'slmopt_fff_plugin'
    """
    mode = _check_hints(hints)
    lower = LOWERINGS[mode]

    def slmopt_fff(
        x: OnnxTensor,
        node_w: OnnxTensor,
        node_b: OnnxTensor,
        node_out: OnnxTensor | None = None,
        leaf_w1: OnnxTensor | None = None,
        leaf_b1: OnnxTensor | None = None,
        leaf_wg: OnnxTensor | None = None,
        leaf_bg: OnnxTensor | None = None,
        leaf_w2: OnnxTensor | None = None,
        leaf_b2: OnnxTensor | None = None,
        activation: str = "gelu",
    ) -> OnnxTensor:
        values = (node_w, node_b, node_out, leaf_w1, leaf_b1, leaf_wg, leaf_bg, leaf_w2, leaf_b2)
        w = dict(zip(fff_spec.INPUT_NAMES[1:], values, strict=True))
        shapes = {k: None if v is None else tuple(v.shape) for k, v in w.items()}
        spec = fff_spec.FFFSpec.from_shapes(activation, shapes)
        assert x.dtype is not None, "the exporter types every op input"
        return lower(_FFF(x, w, spec, int(node_w.shape[1]), x.dtype, dict(hints)))

    slmopt_fff.__name__ = slmopt_fff.__qualname__ = f"slmopt_fff_{mode}"
    return slmopt_fff


def register() -> None:
    """Registers :func:`make` as the ONNX translation of ``torch.ops.slmopt.fff.default`` (idempotent).

    Example:
        >>> register()
    """
    import slmopt.ops  # noqa: F401  (defines torch.ops.slmopt.fff)

    register_onnx_translation(torch.ops.slmopt.fff.default, make)


def routing_margin_mask(
    x: torch.Tensor, node_w: torch.Tensor, node_b: torch.Tensor, margin: float = 1e-4
) -> torch.Tensor:
    """Tokens whose routing logits on their path all lie farther than ``margin`` from 0.

    Near-tie tokens may route differently in two correct implementations (summation order), so parity
    checks compare only tokens where this mask is True.

    Args:
        x: ``[..., h]`` input.
        node_w: ``[N, h]`` routing weights.
        node_b: ``[N]`` routing biases.
        margin: Smallest |logit| accepted.

    Returns:
        Bool tensor of shape ``x.shape[:-1]``.

    Example:
        >>> routing_margin_mask(torch.ones(2, 3), torch.ones(1, 3), torch.zeros(1)).tolist()
        [True, True]
    """
    xt = x.detach().reshape(-1, x.shape[-1]).double()
    w, b = node_w.detach().double(), node_b.detach().double()
    n = torch.zeros(xt.shape[0], dtype=torch.long)
    ok = torch.ones(xt.shape[0], dtype=torch.bool)
    for _ in range((node_w.shape[0] + 1).bit_length() - 1):
        z = (xt * w[n]).sum(-1) + b[n]
        ok &= z.abs() > margin
        n = 2 * n + 1 + (z > 0).long()
    return ok.reshape(x.shape[:-1])


# Importing this module is how the onnxruntime backend enables these lowerings; register() is idempotent.
register()

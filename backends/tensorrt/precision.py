"""Precision rewrite of the ONNX model TensorRT parses: fp16/bf16 weights and casts around GEMM-like ops.

TensorRT networks are strongly typed, so precision comes from the ONNX types; :func:`apply_precision`
sets them. ``slmopt.backends.tensorrt.builder`` re-exports :data:`LOW_PRECISION_OPS` and
:func:`apply_precision`.

Example:
    >>> import numpy as np
    >>> w = onnx.numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    >>> x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])
    >>> y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    >>> graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    >>> apply_precision(onnx.helper.make_model(graph), "bf16")["initializers_converted"]
    1
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import onnx
import onnx.numpy_helper
import torch

from slmopt.backends.tensorrt import plugins

__all__ = ["LOW_PRECISION_OPS", "SlotRule", "apply_precision"]


# ------------------------------------------------------------------------------------------- precision
# Mixed precision by one simple rule the strongly typed network then obeys: ops that read weights — linear
# layers (MatMul/Gemm/Conv with a weight initializer), embedding Gathers and the FFF plugin — read
# low-precision inputs (weights converted offline, activations through a Cast) and their outputs are cast
# back to fp32. Everything else stays fp32: norms, softmax, attention scores, rotary tables, residuals and
# the graph's inputs/outputs. A low output feeding another low op is read directly (no Cast pair).
_FLOAT = onnx.TensorProto.FLOAT
_LOW_TYPES = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}
SlotRule = Callable[[onnx.NodeProto, set[str]], tuple[int, ...]]


def _slots(*index: int) -> SlotRule:
    return lambda node, _inits: tuple(i for i in index if i < len(node.input) and node.input[i])


def _with_weight(*index: int) -> SlotRule:
    """A GEMM with a weight operand (a linear layer); activation x activation products (attention scores,
    rotary tables) stay fp32, as they are precision-sensitive."""
    slots = _slots(*index)

    def rule(node: onnx.NodeProto, inits: set[str]) -> tuple[int, ...]:
        found = slots(node, inits)
        return found if any(node.input[i] in inits for i in found) else ()

    return rule


def _embedding(node: onnx.NodeProto, float_inits: set[str]) -> tuple[int, ...]:
    return (0,) if node.input[0] in float_inits else ()  # a Gather of a weight table, not of shapes


# (domain, op type) → which inputs run in the low precision (empty: the op stays fp32).
LOW_PRECISION_OPS: dict[tuple[str, str], SlotRule] = {
    ("", "MatMul"): _with_weight(0, 1),
    ("", "Gemm"): _with_weight(0, 1, 2),
    ("", "Conv"): _with_weight(0, 1, 2),
    ("", "Gather"): _embedding,
    (plugins.fff_spec.PLUGIN_DOMAIN, plugins.fff_spec.OP_TYPE): _slots(*range(len(plugins.PLUGIN_INPUTS))),
}


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:  # in-memory inference stops at 2 GiB protos; missing types are treated as float
        inferred = onnx.shape_inference.infer_shapes(model)
    except (ValueError, onnx.shape_inference.InferenceError):
        inferred = model
    g = inferred.graph
    return {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read inside If/Loop/Scan bodies (outer-scope values they capture count as fp32 uses)."""
    out: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for body in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                out |= {n for sub in body.node for n in sub.input} | _subgraph_reads(body)
    return out


def _convert(tensor: onnx.TensorProto, precision: str) -> onnx.TensorProto:
    values = torch.from_numpy(onnx.numpy_helper.to_array(tensor).copy())
    low = values.to({"fp16": torch.float16, "bf16": torch.bfloat16}[precision])  # round to nearest even
    raw = low.view(torch.int16).numpy().tobytes()
    return onnx.helper.make_tensor(tensor.name, _LOW_TYPES[precision], list(tensor.dims), raw, raw=True)


def apply_precision(model: onnx.ModelProto, precision: str) -> dict[str, int]:
    """Rewrites ``model`` in place so the strongly typed TensorRT network runs in ``precision``.

    Returns:
        Counts: ``low_precision_ops``, ``casts_to_low``, ``casts_to_fp32``, ``initializers_converted``.

    Example:
        >>> import numpy as np
        >>> w = onnx.numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
        >>> x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])
        >>> y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
        >>> graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
        >>> apply_precision(onnx.helper.make_model(graph), "fp16")  # Cast x down, MatMul, Cast y up
        {'low_precision_ops': 1, 'casts_to_low': 1, 'casts_to_fp32': 1, 'initializers_converted': 1}
    """
    stats = dict.fromkeys(("low_precision_ops", "casts_to_low", "casts_to_fp32", "initializers_converted"), 0)
    if precision == "fp32":
        return stats
    graph, low, tag = model.graph, _LOW_TYPES[precision], precision
    inits = {t.name: t for t in graph.initializer}
    float_inits = {n for n, t in inits.items() if t.data_type == _FLOAT}
    types = _elem_types(model)
    plan = []  # low slots per node (empty: the node stays as it is)
    for node in graph.node:
        rule = LOW_PRECISION_OPS.get((node.domain, node.op_type))
        slots = rule(node, float_inits) if rule else ()
        floats = all(
            n in float_inits or (n not in inits and types.get(n, _FLOAT) == _FLOAT)
            for n in (node.input[i] for i in slots)
        )
        plan.append(slots if floats else ())
    uses, low_uses = Counter(_subgraph_reads(graph)), Counter()
    for node, slots in zip(graph.node, plan, strict=True):
        for i, name in enumerate(node.input):
            uses[name] += 1
            low_uses[name] += i in slots
    outputs = {o.name for o in graph.output}
    convert = {n for n in float_inits if low_uses[n] and low_uses[n] == uses[n] and n not in outputs}
    for i, t in enumerate(graph.initializer):
        if t.name in convert:
            graph.initializer[i].CopyFrom(_convert(t, precision))
    stats["initializers_converted"] = len(convert)
    taken = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}

    def fresh(name: str) -> str:
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    nodes, backs, twin = [], [], {}  # twin: fp32 tensor → its low-precision twin; backs: casts to fp32
    for node, slots in zip(list(graph.node), plan, strict=True):
        for i in (i for i in slots if node.input[i] not in convert):
            name = node.input[i]
            if name not in twin:
                twin[name] = fresh(f"{name}__{tag}")
                nodes.append(
                    onnx.helper.make_node(
                        "Cast", [name], [twin[name]], to=low, name=fresh(f"{twin[name]}_cast")
                    )
                )
                stats["casts_to_low"] += 1
            node.input[i] = twin[name]
        nodes.append(node)
        if not slots:
            continue
        stats["low_precision_ops"] += 1
        for j, out in enumerate(node.output):
            twin[out] = node.output[j] = fresh(f"{out}__{tag}")
            backs.append(
                onnx.helper.make_node("Cast", [twin[out]], [out], to=_FLOAT, name=fresh(f"{out}_cast"))
            )
            nodes.append(backs[-1])
    read = {n for node in nodes for n in node.input} | outputs | _subgraph_reads(graph)
    dead = {id(n) for n in backs if n.output[0] not in read}  # fp32 copies nobody reads
    stats["casts_to_fp32"] = len(backs) - len(dead)
    kept = [onnx.NodeProto() for n in nodes if id(n) not in dead]
    for copy, node in zip(kept, (n for n in nodes if id(n) not in dead), strict=True):
        copy.CopyFrom(node)  # copies: `nodes` still references the elements about to be cleared
    del graph.node[:]
    graph.node.extend(kept)
    for value in (*graph.input, *graph.value_info):
        if value.name in convert:
            value.type.tensor_type.elem_type = low
    return stats

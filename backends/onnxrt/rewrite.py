"""Post-export ONNX rewrites that let ONNX Runtime's graph fusions fire on what the torch exporter writes.

ORT fuses known subgraphs into single kernels when the session is created (``SimplifiedLayerNormalization``
for RMSNorm, ``SkipSimplifiedLayerNormalization`` with the residual add before it...). Its pattern
matchers look for one spelling of each subgraph, and the exporter sometimes writes another:

* **RMSNorm.** ``torch.rsqrt`` exports as ``Reciprocal(Sqrt(v))`` and the norm multiplies by it, while
  ORT's ``SimplifiedLayerNormFusion`` matches ``Pow → ReduceMean → Add → Sqrt → Div → Mul`` only
  (checked with ORT 1.31: the ``Reciprocal``/``Mul`` spelling stays 7 unfused nodes per norm, the ``Div``
  spelling becomes one ``SimplifiedLayerNormalization``). :func:`rewrite_for_ort` turns every
  ``Mul(a, Reciprocal(Sqrt(b)))`` into ``Div(a, Sqrt(b))``: the same value up to one rounding (a/s
  instead of a·(1/s)), and after fusion ORT computes the norm in its own kernel anyway.

Rewritten nodes keep the exporter's metadata (``pkg.torch.onnx.name_scopes``), so per-module profiles
(``benchmarks/ort_profile.py``) still attribute them.

Example:
    >>> # counts = rewrite_for_ort(onnx_program.model)  # before onnx_program.save(...)
    >>> # counts["rsqrt_mul_to_div"]
"""

from __future__ import annotations

import logging

import onnx_ir as ir

__all__ = ["rewrite_for_ort"]

log = logging.getLogger(__name__)


def _is_op(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type == op_type


def _rsqrt_mul_to_div(graph: ir.Graph) -> int:
    """``Mul(a, Reciprocal(Sqrt(b)))`` → ``Div(a, Sqrt(b))``; the Reciprocal goes once it has no user."""
    rewritten = 0
    for recip in [n for n in graph if _is_op(n, "Reciprocal")]:
        sqrt_out = recip.inputs[0]
        if sqrt_out is None or not _is_op(sqrt_out.producer(), "Sqrt"):
            continue
        r = recip.outputs[0]
        for mul, index in list(r.uses()):
            if not _is_op(mul, "Mul") or mul.graph is not graph or mul.inputs[0] is mul.inputs[1]:
                continue  # r·r or a use in a subgraph: leave it
            other = mul.inputs[1 - index]
            div = ir.Node(
                "",
                "Div",
                [other, sqrt_out],
                name=(mul.name or "") + "_div",
                metadata_props=dict(mul.metadata_props),
            )
            graph.insert_before(mul, div)
            old = mul.outputs[0]
            new = div.outputs[0]
            name, old.name = old.name, None  # value names stay unique: the Div output takes the Mul's
            new.name, new.type, new.shape = name, old.type, old.shape
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            graph.remove(mul, safe=True)
            rewritten += 1
        if not r.uses() and not r.is_graph_output():
            graph.remove(recip, safe=True)
    return rewritten


def rewrite_for_ort(model: ir.Model) -> dict[str, int]:
    """Rewrites exporter patterns that ONNX Runtime's fusions do not match, in place (main graph only).

    Args:
        model: the exporter's ``onnx_ir`` model (``torch.onnx.ONNXProgram.model``), before it is saved.

    Returns:
        How many nodes each rewrite changed, e.g. ``{"rsqrt_mul_to_div": 61}``.

    Example:
        >>> m = ir.from_proto(__import__("onnx").helper.make_model(
        ...     __import__("onnx").helper.make_graph([], "g", [], [])))
        >>> rewrite_for_ort(m)
        {'rsqrt_mul_to_div': 0}
    """
    counts = {"rsqrt_mul_to_div": _rsqrt_mul_to_div(model.graph)}
    if any(counts.values()):
        log.debug("ONNX rewrites for ORT fusions: %s", counts)
    return counts

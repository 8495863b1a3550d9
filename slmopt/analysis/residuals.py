"""Residual adds on the main stream, including parallel-residual blocks.

A *sequential* sublayer is ``add(h, branch(h))``: ``h`` is an ancestor of the branch. A *parallel* block
(GPT-NeoX, Phi-1/2, GPT-J, Falcon, Cohere, CodeGen) feeds one input ``x`` to several branches and joins
them in one sum, ``x + attn(ln1(x)) + mlp(ln2(x))``, in whatever association the model wrote it
(``(mlp + attn) + x`` in GPT-NeoX). :func:`canonicalize_parallel_sums` re-associates such sums into the
chain ``(x + b1) + b2`` with branches in graph order: a function-preserving rewrite (float addition
order aside) after which every branch has an add of its own, so every pass can remove or replace one
branch by rewiring one add, exactly as for a sequential block. :func:`find_residuals` then reads both
forms: in the chain, ``b2``'s add has stream ``x + b1`` and branch *source* ``x``.

Example:
    >>> from slmopt.analysis.residuals import canonicalize_parallel_sums
    >>> changed = canonicalize_parallel_sums(program.graph_module)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from slmopt.analysis.graph import GraphView, MatmulMatch, NormMatch, consumes_matrix_param, val

__all__ = ["Residual", "branch_tail", "canonicalize_parallel_sums", "find_residuals"]

_ADD = torch.ops.aten.add.Tensor
# Falcon joins its branches with an in-place ``mlp_out += attn_out`` that export keeps as ``add_``.
_ADDS = {_ADD, torch.ops.aten.add_.Tensor}
# Eval-mode no-ops a sum may pass through on its way to the stream (Falcon's dropout_add).
_NOOPS = {
    torch.ops.aten.dropout.default,
    torch.ops.aten.clone.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.contiguous.default,
    torch.ops.aten.detach.default,
}


@dataclass
class Residual:
    """A residual add ``add = stream + branch`` and the nodes of its branch subgraph.

    ``source`` is where the branch starts: the stream itself for a sequential sublayer, the block input
    for the second and later branches of a parallel block.
    """

    add: fx.Node
    stream: fx.Node
    branch: fx.Node
    source: fx.Node
    region: set[str]  # names on paths source -> branch, plus branch
    linears: list[MatmulMatch]


def _tensor_add(node: Any) -> bool:
    """A two-tensor ``add.Tensor`` whose operands have the shape of its result (no broadcasting)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _ADDS):
        return False
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    shapes = [getattr(val(a), "shape", None) for a in (*node.args, node)]
    return shapes[0] is not None and shapes[0] == shapes[1] == shapes[2]


def _sole_user(view: GraphView, node: fx.Node) -> fx.Node | None:
    users = view.users(node)
    return users[0] if len(users) == 1 else None


def _terms(view: GraphView, root: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """Flattens a sum: its terms and the nodes (inner adds, no-ops) that only serve the sum."""
    terms: list[fx.Node] = []
    inner: list[fx.Node] = []
    for arg in root.args:
        node, path = arg, []
        while node.op == "call_function" and node.target in _NOOPS and _sole_user(view, node) is not None:
            path.append(node)
            node = node.args[0]
        if _tensor_add(node) and _sole_user(view, node) is not None:
            sub_terms, sub_inner = _terms(view, node)
            terms += sub_terms
            inner += [*path, node, *sub_inner]
        else:
            terms.append(arg)
    return terms, inner


def _is_chain(node: fx.Node, stream: fx.Node, branches: list[fx.Node]) -> bool:
    """``node`` is already ``(stream + b1) + b2 ...``: the stream innermost, one branch per add."""
    if node is stream:
        return True
    if not _tensor_add(node):
        return False
    a, b = node.args
    return any(y in branches and _is_chain(x, stream, branches) for x, y in ((a, b), (b, a)))


def canonicalize_parallel_sums(gm: fx.GraphModule) -> bool:
    """Rewrites every parallel-residual join ``x + b1 + b2`` into the chain ``(x + b1) + b2``.

    A join is a sum of >= 3 same-shape terms where one term (the block input ``x``) is an ancestor of
    every other term and no other term is an ancestor of another. Sums already in chain form are left
    alone, so the rewrite is idempotent.

    Args:
        gm: the graph module, edited in place (recompiled when anything changed).

    Returns:
        True when a sum was rewritten.

    Example:
        >>> canonicalize_parallel_sums(program.graph_module)  # doctest: +SKIP
        True
    """
    view = GraphView(gm)
    flattened = {n.name for n in view.live_nodes() if _tensor_add(n) and _sole_user(view, n) is not None}
    plans: list[tuple[fx.Node, fx.Node, list[fx.Node], list[fx.Node]]] = []
    for node in view.live_nodes():
        if not _tensor_add(node) or node.name in flattened and _tensor_add(_sole_user(view, node)):
            continue
        terms, inner = _terms(view, node)
        if len(terms) < 3:
            continue
        streams = [t for t in terms if all(t is o or view.is_ancestor(t, o) for o in terms)]
        if len(streams) != 1:
            continue
        stream, branches = streams[0], [t for t in terms if t is not streams[0]]
        if any(view.is_ancestor(a, b) for a in branches for b in branches if a is not b):
            continue
        if _is_chain(node, stream, branches):
            continue
        plans.append((node, stream, sorted(branches, key=lambda n: view.order[n.name]), inner))
    # Back to front: a later join's stream is an earlier join's root, which the earlier rewrite replaces.
    for root, stream, branches, inner in reversed(plans):
        current = stream
        with gm.graph.inserting_before(root):
            for branch in branches:
                current = gm.graph.call_function(_ADD, (current, branch))
                current.meta = dict(root.meta)
        root.replace_all_uses_with(current)
        for dead in [root, *inner]:  # inner runs from the root down: each is user-free once its user goes
            if not dead.users:
                gm.graph.erase_node(dead)
    if plans:
        gm.graph.lint()
        gm.recompile()
    return bool(plans)


def find_residuals(view: GraphView, linears: dict[str, MatmulMatch]) -> list[Residual]:
    """Residual adds on the main stream, in graph order (call after canonicalisation)."""
    found: dict[str, Residual] = {}

    def make(add: fx.Node, stream: fx.Node, branch: fx.Node, source: fx.Node) -> Residual | None:
        region = view.between(source, branch) | {branch.name}
        # A linear counts even when its weight arrives through a transpose (Falcon's x @ W.T `matmul`).
        if not any(n in linears or consumes_matrix_param(view, view.nodes[n]) for n in region):
            return None  # the x + 0.044715 x^3 inside NewGELU, etc.
        hits = [linears[n] for n in sorted(region, key=view.order.__getitem__) if n in linears]
        return Residual(add, stream, branch, source, region, hits)

    for node in view.live_nodes():
        if not _tensor_add(node):
            continue
        a, b = node.args
        found_one: Residual | None = None
        for stream, branch in ((a, b), (b, a)):
            if view.is_ancestor(stream, branch):
                found_one = make(node, stream, branch, stream)
            elif stream.name in found and not view.is_ancestor(branch, stream):
                # Second branch of a canonical parallel join: it reads the first branch's source.
                source = found[stream.name].source
                if view.is_ancestor(source, branch):
                    found_one = make(node, stream, branch, source)
            if found_one is not None:
                break
        if found_one is not None:
            found[node.name] = found_one
    residuals = list(found.values())
    nested = {r.add.name for r in residuals for o in residuals if o is not r and r.add.name in o.region}
    return [r for r in residuals if r.add.name not in nested]


def branch_tail(
    view: GraphView, norms: dict[str, NormMatch], r: Residual
) -> tuple[fx.Node, NormMatch | None]:
    """The branch's last projection output: ``r.branch`` seen back through views, constant scales
    (Granite's residual multiplier) and one norm of the branch output (Gemma-2's sandwich norms)."""
    node, norm = r.branch, None
    while True:
        node = view.skip_back(node)
        if _is_scale(node):
            node = node.args[0]
        elif norm is None and node.name in norms and node.name in r.region:
            norm = norms[node.name]
            node = norm.input
        else:
            return node, norm


def _is_scale(node: Any) -> bool:
    """A multiply or divide by a Python number (the tensor operand first)."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target in (torch.ops.aten.mul.Tensor, torch.ops.aten.mul.Scalar, torch.ops.aten.div.Tensor,
                            torch.ops.aten.div.Scalar)
        and isinstance(node.args[0], fx.Node)
        and isinstance(node.args[1], (int, float))
    )  # fmt: skip

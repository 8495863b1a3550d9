"""Structure analysis: find transformer blocks, attention and FFN sublayers from graph patterns.

The result types (the CONTRACT: ``Structure``, ``BlockInfo``, ``AttentionInfo``, ``FFNInfo``, ``LinearInfo``,
``NormInfo``) live in ``slmopt.analysis.structure`` and are re-exported here.

How ``analyze`` works (``nn_module_stack`` is only used to name blocks and to keep two sublayers of
different modules out of one block):

0. parallel-residual joins ``x + attn(ln1(x)) + mlp(ln2(x))`` are re-associated *in place* into one add
   per branch (``slmopt.analysis.residuals``; function-preserving, idempotent), so every pass removes or
   replaces a branch by rewiring one add;
1. every live multiply of an activation by a parameter matrix is a linear (``slmopt.analysis.graph``);
2. a *residual add* is ``add(h, branch)`` where ``h`` is an ancestor of ``branch`` (or, for a parallel
   block's second branch, where the first branch's source is) and the path between them holds a
   parameterised op; adds nested inside another add's branch are not on the main stream;
3. each branch is matched against a rule table (attention, FFN), seen back through a branch-output norm
   and a constant scale; an FFN's gate and up may be halves of one fused linear; a branch no rule
   claims, and any linear left without a role, is reported in ``Structure.unclassified`` — never guessed;
4. consecutive (attention, FFN) sublayers form blocks.

Example:
    >>> from slmopt.analysis.analyze import analyze
    >>> structure = analyze(program)  # doctest: +SKIP
    >>> print(structure.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from slmopt.analysis.graph import (
    GraphView,
    MatmulMatch,
    count_heads,
    find_linears,
    module_path,
    params_between,
    qkv_layout,
    split_source,
    val,
)
from slmopt.analysis.patterns import (
    TRANSPARENT_OPS,
    NormMatch,
    _param_source,
    find_attention_cores,
    find_norms,
    match_activation,
)
from slmopt.analysis.residuals import Residual, branch_tail, canonicalize_parallel_sums, find_residuals
from slmopt.analysis.structure import AttentionInfo, BlockInfo, FFNInfo, LinearInfo, NormInfo, Structure

__all__ = ["AttentionInfo", "BlockInfo", "FFNInfo", "LinearInfo", "NormInfo", "Structure", "analyze"]


# --------------------------------------------------------------------------------------------------
# Implementation.


@dataclass
class _Ctx:
    view: GraphView
    linears: dict[str, MatmulMatch]
    infos: dict[str, LinearInfo]
    norms: dict[str, NormMatch]


def _branch_input(r: Residual, linear: MatmulMatch) -> fx.Node:
    """What ``linear`` reads, seen through views and casts, stopping at the stream itself (post-norm)."""
    node = linear.x
    while node is not r.source and node.op == "call_function" and node.target in TRANSPARENT_OPS:
        node = node.args[0]
    return node


def _match_attention(ctx: _Ctx, r: Residual) -> AttentionInfo | None:
    view = ctx.view
    cores = find_attention_cores(view, r.region)
    if len(cores) != 1:
        return None
    core = cores[0]

    def feeding(operand: fx.Node) -> list[MatmulMatch]:
        return [m for m in r.linears if view.is_ancestor(m.node, operand)]

    q, k, v = feeding(core.query), feeding(core.key), feeding(core.value)
    o = [m for m in r.linears if view.is_ancestor(core.out, m.node)]
    tail, branch_norm = branch_tail(view, ctx.norms, r)
    if not (len(q) == len(k) == len(v) == len(o) == 1) or tail is not o[0].node:
        return None
    q_val = val(core.query)
    if not isinstance(q_val, torch.Tensor):
        return None  # a node a pass added without shape metadata: report it rather than guess
    head_dim = int(q_val.shape[-1])
    # Static batch/sequence dims (a static capture) multiply every width: divide them back out. Q is
    # [..., batch, heads, seq, dim]; dynamic dims are symbolic and drop out of the product by themselves.
    token_dims = list(q_val.shape[:-1])
    if len(token_dims) >= 3:
        del token_dims[-2]
    tokens = math.prod(int(d) for d in token_dims if isinstance(d, int))  # static dims only
    heads = count_heads(view, q[0].node, core.query, head_dim, tokens)
    kv_heads = count_heads(view, k[0].node, core.key, head_dim, tokens)
    if heads is None or kv_heads is None:
        return None
    projections = {m.node.name for m in q + k + v}
    if len(projections) == 1:
        roles = [(q[0], "qkv")]
    elif len(projections) == 3:
        roles = [(q[0], "q"), (k[0], "k"), (v[0], "v")]
    else:
        return None  # e.g. fused kv with separate q: no contract role for it yet
    if {m.node.name for m in r.linears} != projections | {o[0].node.name}:
        return None
    for match, role in [*roles, (o[0], "o")]:
        ctx.infos[match.node.name].role = role
    return AttentionInfo(
        block=-1,
        residual_add=r.add.name,
        residual=r.stream.name,
        branch_output=r.branch.name,
        branch_input=_branch_input(r, q[0]).name,
        sdpa=core.node.name,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        linears=[m.node.name for m, _ in [*roles, (o[0], "o")]],
        branch_norm=branch_norm.output.name if branch_norm else None,
        projection_output=tail.name,
        qkv_layout=qkv_layout(view, q[0], core.query, head_dim) if len(projections) == 1 else "blocked",
        q_params=params_between(view, q[0], core.query),
        k_params=params_between(view, k[0], core.key),
    )


def _match_ffn(ctx: _Ctx, r: Residual) -> FFNInfo | None:
    view, by_node = ctx.view, {m.node.name: m for m in r.linears}

    def linear_of(node: Any) -> tuple[MatmulMatch, tuple[int, int] | None] | None:
        """The linear behind ``node``, and the feature range it reads when ``node`` is a split of it."""
        hit = by_node.get(getattr(view.skip_back(node), "name", ""))
        if hit is not None:
            return hit, None
        part = split_source(view, node)
        hit = by_node.get(part[0].name) if part else None
        return (hit, part[1:]) if hit is not None and part else None

    tail, branch_norm = branch_tail(view, ctx.norms, r)
    found = linear_of(tail)
    if found is None or found[1] is not None:
        return None
    down = found[0]
    hidden = view.skip_back(down.x)
    act = match_activation(view, hidden)
    gate, up = None, (linear_of(act[1]) if act else None)
    if up is None and getattr(hidden, "target", None) is torch.ops.aten.mul.Tensor:
        # Gated: act(x W_g) * (x W_u), either operand order; W_g and W_u may be halves of one linear.
        for first, second in (hidden.args, hidden.args[::-1]):
            act = match_activation(view, first)
            gate, up = (linear_of(act[1]), linear_of(second)) if act else (None, None)
            if gate is not None and up is not None and gate != up and gate[0] is not down:
                break
            gate = up = None
    if act is None or up is None or (up[1] is not None and gate is None):
        return None  # unknown activation, or a split without a gate
    fused = gate is not None and gate[0] is up[0]
    if fused and (gate[1] is None or up[1] is None):  # type: ignore[index]
        return None
    if len(by_node) != (2 if gate is None or fused else 3):
        return None  # extra linears in the branch: do not guess
    ctx.infos[down.node.name].role = "down"
    views = {}
    for found_, role in ((up, "up"), (gate, "gate")):
        if found_ is None:
            continue
        info = ctx.infos[found_[0].node.name]
        info.role = "gate_up" if fused else role
        views[role] = dataclasses.replace(info, role=role, rows=found_[1]) if fused else info
    return FFNInfo(
        block=-1,
        residual_add=r.add.name,
        residual=r.stream.name,
        branch_output=r.branch.name,
        branch_input=_branch_input(r, up[0]).name,
        kind="gated" if gate else "mlp",
        activation=act[0],
        up=views["up"],
        down=ctx.infos[down.node.name],
        gate=views.get("gate"),
        width=(up[1][1] - up[1][0]) if up[1] else up[0].out_features,
        branch_norm=branch_norm.output.name if branch_norm else None,
        projection_output=tail.name,
    )


# (kind, builder): a builder returns None for "not mine".
_SUBLAYER_RULES: tuple[tuple[str, Callable[[_Ctx, Residual], AttentionInfo | FFNInfo | None]], ...] = (
    ("attention", _match_attention),
    ("ffn", _match_ffn),
)


def _norm_info(match: NormMatch) -> NormInfo:
    return NormInfo(node=match.output.name, kind=match.kind, weight=match.weight, bias=match.bias)


def _block_hint(r: Residual) -> str | None:
    """The innermost indexed module (``...layers.3``) common to the branch's linears, if any."""
    paths = [module_path(m.node).split(".") for m in r.linears]
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    while common and not common[-1].isdigit():
        common.pop()
    return ".".join(common) or None


def _other_layer(a: str | None, b: str | None) -> bool:
    """True when two hints name different items of one module list (``layers.3`` vs ``layers.4``).

    Only then does the hint overrule the graph: ``attns.0`` / ``mlps.0`` (separate lists) say nothing.
    """
    return a is not None and b is not None and a != b and a.rsplit(".", 1)[0] == b.rsplit(".", 1)[0]


def _post_norm(
    ctx: _Ctx, r: Residual, next_r: Residual | None, info: Any, post_norm_model: bool
) -> NormMatch | None:
    """A norm right after the add that *is* the stream afterwards (BERT), not the next pre-norm (GPT-2).

    The last sublayer's norm counts as its post-norm only in a model whose earlier sublayers had one: in
    OLMo-2 (branch-output norms, no pre-norms) the norm after the last add is the final norm.
    """
    for norm in ctx.norms.values():
        if ctx.view.skip_back(norm.input) is not r.add:
            continue
        if next_r is not None and ctx.view.skip_back(next_r.stream) is norm.output:
            return norm
        if next_r is None and post_norm_model and info.branch_input == info.residual:
            return norm
    return None


def _params(view: GraphView, names: set[str]) -> int:
    """Unique parameter elements read by the named nodes (a tensor shared by two get_attrs counts once)."""
    # Through transposes too: Falcon's projections read ``W.T`` (a numpy_T node), not the get_attr itself.
    sources = [_param_source(view, i) for n in names for i in view.nodes[n].all_input_nodes]
    tensors = [view.attr(src[0]) for src in sources if src is not None]
    return sum(t.numel() for t in {id(t): t for t in tensors if t is not None}.values())


def _group_blocks(ctx: _Ctx, residuals: list[Residual], notes: list[str]) -> list[BlockInfo]:
    blocks: list[BlockInfo] = []
    for i, r in enumerate(residuals):
        info = next((x for _, builder in _SUBLAYER_RULES if (x := builder(ctx, r)) is not None), None)
        if info is None:
            ops = sorted({_op_name(ctx.view.nodes[n]) for n in r.region})
            notes.append(
                f"residual add '{r.add.name}' (stream '{r.stream.name}'): branch with linears "
                f"{[m.node.name for m in r.linears]} is neither attention nor FFN (ops: {', '.join(ops)})"
            )
            continue
        hint, current = _block_hint(r), blocks[-1] if blocks else None
        fits = (
            current is not None
            and isinstance(info, FFNInfo)
            and current.ffn is None
            and not _other_layer(hint, current.name)
        )
        if not fits:
            current = BlockInfo(index=len(blocks), name=hint)
            blocks.append(current)
        info.block = current.index
        if isinstance(info, AttentionInfo):
            current.attention = info
        else:
            current.ffn = info
        pre = ctx.norms.get(info.branch_input)
        if pre is not None and info.branch_input != info.residual:
            current.norms.append(_norm_info(pre))
        if info.branch_norm is not None:
            current.norms.append(_norm_info(ctx.norms[info.branch_norm]))
        post_norm_model = i > 0 and any(b.attention and b.attention.post_norm for b in blocks)
        post = _post_norm(ctx, r, residuals[i + 1] if i + 1 < len(residuals) else None, info, post_norm_model)
        if post is not None:
            info.post_norm = post.output.name
            current.norms.append(_norm_info(post))
        names = set(r.region) | ({post.output.name} if post else set())
        current.params += _params(ctx.view, names)
        for name in info.linears if isinstance(info, AttentionInfo) else [m.node.name for m in r.linears]:
            ctx.infos[name].block = current.index
        if isinstance(info, FFNInfo):  # the gate/up views of a fused projection are copies
            for view_info in (info.up, info.gate, info.down):
                if view_info is not None:
                    view_info.block = current.index
    return blocks


def _op_name(node: fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


def _lm_head(ctx: _Ctx) -> LinearInfo | None:
    """The linear whose result *is* the graph output, up to views, casts and scalar ops (e.g. soft-capping)."""
    outputs: list[fx.Node] = []
    fx.node.map_arg(ctx.view.output.args, outputs.append)
    node: Any = outputs[0] if outputs else None
    while isinstance(node, fx.Node) and node.name not in ctx.linears and node.op == "call_function":
        # Unary/scalar ops keep "this is the head's output"; a second tensor operand (a residual) does not.
        if node.target not in TRANSPARENT_OPS and any(isinstance(a, fx.Node) for a in node.args[1:]):
            return None
        node = node.args[0] if node.args else None
    return ctx.infos.get(getattr(node, "name", ""))


def analyze(program: Any) -> Structure:
    """Finds the transformer structure of a captured Program from its graph.

    Args:
        program: a :class:`slmopt.program.Program` (or a bare ``fx.GraphModule``).

    Returns:
        The Structure; anything not recognised is listed in ``Structure.unclassified``.

    Example:
        >>> structure = analyze(program)  # doctest: +SKIP
        >>> [b.attention.num_kv_heads for b in structure.blocks]  # doctest: +SKIP
        [2, 2]
    """
    gm: fx.GraphModule = getattr(program, "graph_module", program)
    canonicalize_parallel_sums(gm)  # one add per branch of a parallel block (function-preserving)
    view = GraphView(gm)
    linears = {m.node.name: m for m in find_linears(view)}
    infos = {
        name: LinearInfo(m.node.name, m.weight, m.bias, m.in_features, m.out_features, m.transposed)
        for name, m in linears.items()
    }
    ctx = _Ctx(view=view, linears=linears, infos=infos, norms=find_norms(view))
    residuals = find_residuals(view, linears)
    notes: list[str] = []
    blocks = _group_blocks(ctx, residuals, notes)

    lm_head = _lm_head(ctx)
    if lm_head is not None and lm_head.role == "other":
        lm_head.role = "lm_head"
    else:
        lm_head = None
    notes.extend(
        f"linear '{i.node}' (weight '{i.weight}', {i.in_features}->{i.out_features}) is outside any "
        "recognised sublayer"
        for i in infos.values()
        if i.role == "other"
    )

    embedding, embedding_params = _token_embedding(view)
    # The norm after the last residual add that is nobody's post-norm: the final norm of pre-norm models.
    used = {n.node for b in blocks for n in b.norms}
    last = residuals[-1].add if residuals else None
    final = [n for n in ctx.norms.values() if view.skip_back(n.input) is last and n.output.name not in used]
    hidden = int(view.attr(embedding).shape[-1]) if embedding is not None else None  # type: ignore[union-attr]
    if hidden is None and residuals:
        hidden = int(val(residuals[0].add).shape[-1])
    return Structure(
        blocks=blocks,
        linears=list(infos.values()),
        hidden_size=hidden,
        embedding=str(embedding.target) if embedding is not None else None,
        lm_head=lm_head,
        params=sum(p.numel() for p in {id(p): p for p in gm.parameters()}.values()),
        unclassified=notes,
        embedding_params=embedding_params,
        final_norm=_norm_info(final[0]) if final else None,
        norms=[_norm_info(n) for n in ctx.norms.values()],
    )


def _token_embedding(view: GraphView) -> tuple[fx.Node | None, int]:
    """The ``aten.embedding`` whose indices come from a graph input (position embeddings come from arange)."""
    for node in view.live_nodes():
        if node.target is not torch.ops.aten.embedding.default:
            continue
        weight, ids = node.args[0], node.args[1]
        from_input = (
            any(view.nodes[a].op == "placeholder" for a in view.ancestors(ids.name))
            or ids.op == "placeholder"
        )
        tensor = view.attr(weight) if isinstance(weight, fx.Node) else None
        if from_input and tensor is not None:
            return weight, tensor.numel()
    return None, 0

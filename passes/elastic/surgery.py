"""Graph surgery for elastic subnets: permute heads/neurons, drop blocks, slice weights, patch shapes.

Heads move in whole GQA groups (a KV head and the query heads that read it); query heads may also be
reordered *within* their group, which is function-preserving because they share the same K/V. FFN
neurons move as rows of up/gate and columns of down. After slicing, every shape constant the graph holds
(``view [B, S, 144]``, ``split 48``, GQA's ``expand [B, Hkv, rep, S, D]`` / ``reshape [B, H, S, D]``) is
patched by running the graph once on its example input and comparing each shape op's input with the one
recorded before slicing (:func:`patch_shape_constants`); fake tensors are then re-propagated so every
node's metadata matches the new sizes.

Example:
    >>> layout = attention_layouts(program, analyze(program))[0]  # doctest: +SKIP
    >>> permute_attention(program, layout, group_order=[1, 0], q_orders=[[0, 1], [1, 0]])  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from slmopt.analysis.structure import LinearInfo, Structure

if TYPE_CHECKING:
    from slmopt.program import Program

__all__ = [
    "AttentionLayout",
    "attention_layouts",
    "drop_blocks",
    "head_channels",
    "patch_shape_constants",
    "refresh_program",
    "select_attention",
    "select_ffn",
]

aten = torch.ops.aten


@dataclass(frozen=True)
class AttentionLayout:
    """Where one attention sublayer's head-structured weights live.

    Attributes:
        block: block index.
        heads / kv_heads / head_dim: query heads, KV heads (groups), per-head size.
        q / k / v: separate projections (None when fused), ``qkv`` the fused one, ``o`` the output.
        qkv_layout: ``blocked`` ([q | k | v]) or ``interleaved`` ([q_h | k_h | v_h] per head).
    """

    block: int
    heads: int
    kv_heads: int
    head_dim: int
    o: LinearInfo
    q: LinearInfo | None = None
    k: LinearInfo | None = None
    v: LinearInfo | None = None
    qkv: LinearInfo | None = None
    qkv_layout: str = "blocked"
    q_params: tuple[str, ...] = ()
    k_params: tuple[str, ...] = ()

    @property
    def rep(self) -> int:
        return self.heads // self.kv_heads


def attention_layouts(structure: Structure) -> list[AttentionLayout]:
    """One layout per attention sublayer; raises ValueError for a layout elastic cannot cut."""
    out = []
    for block in structure.blocks:
        a = block.attention
        if a is None:
            continue
        roles = {structure.linear(n).role: structure.linear(n) for n in a.linears}
        if "o" not in roles or not ({"q", "k", "v"} <= set(roles) or "qkv" in roles):
            raise ValueError(f"attention of block {block.index}: projections {sorted(roles)} not q/k/v/o")
        if a.num_heads % a.num_kv_heads:
            raise ValueError(f"block {block.index}: {a.num_heads} heads not divisible by {a.num_kv_heads}")
        if "qkv" in roles and a.qkv_layout == "interleaved" and a.num_heads != a.num_kv_heads:
            raise ValueError(f"block {block.index}: per-head interleaved QKV with grouped K/V heads")
        out.append(
            AttentionLayout(
                block.index, a.num_heads, a.num_kv_heads, a.head_dim, roles["o"],
                roles.get("q"), roles.get("k"), roles.get("v"), roles.get("qkv"), a.qkv_layout,
                tuple(a.q_params), tuple(a.k_params),
            )
        )  # fmt: skip
    return out


def head_channels(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Feature indices of ``heads`` (each head owns ``head_dim`` consecutive features)."""
    idx = torch.tensor(list(heads), dtype=torch.long)
    return (idx[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _index(program: Program, info: LinearInfo, side: str, idx: torch.Tensor) -> None:
    """Keeps features ``idx`` of a linear's output (``side="out"``, with bias) or input (``"in"``)."""
    # nn.Linear stores [out, in]; GPT-2's Conv1D/addmm stores [in, out] (transposed).
    dim = {("out", False): 0, ("out", True): 1, ("in", False): 1, ("in", True): 0}[(side, info.transposed)]
    program.set_param(info.weight, program.param(info.weight).index_select(dim, idx))
    if side == "out" and info.bias is not None:
        program.set_param(info.bias, program.param(info.bias).index_select(0, idx))


def select_attention(
    program: Program, layout: AttentionLayout, groups: Sequence[int], q_orders: Sequence[Sequence[int]]
) -> None:
    """Keeps KV groups ``groups`` (in that order) with query heads ordered by ``q_orders[group]``.

    A permutation of all groups reorders (function-preserving); a subset slices.
    """
    rep, d = layout.rep, layout.head_dim
    q_heads = [g * rep + r for g in groups for r in q_orders[g]]
    q_idx, kv_idx = head_channels(q_heads, d), head_channels(groups, d)
    if layout.qkv is not None and layout.qkv_layout == "interleaved":  # [q_h | k_h | v_h] per head
        _index(program, layout.qkv, "out", head_channels(q_heads, 3 * d))
    elif layout.qkv is not None:  # fused [q | k | v] along the output features
        hq, hkv = layout.heads * d, layout.kv_heads * d
        _index(program, layout.qkv, "out", torch.cat([q_idx, hq + kv_idx, hq + hkv + kv_idx]))
    else:
        assert layout.q is not None and layout.k is not None and layout.v is not None
        _index(program, layout.q, "out", q_idx)
        _index(program, layout.k, "out", kv_idx)
        _index(program, layout.v, "out", kv_idx)
    _index(program, layout.o, "in", q_idx)
    for target in layout.q_params:
        _index_head_param(program, target, q_heads, layout.heads, d)
    for target in layout.k_params:
        _index_head_param(program, target, list(groups), layout.kv_heads, d)


def _index_head_param(program: Program, target: str, heads: Sequence[int], total: int, d: int) -> None:
    """Keeps ``heads`` of a per-head q/k parameter: ``[heads * d]``, ``[heads, d]``, or ``[d]`` (shared)."""
    p = program.param(target)
    if p.dim() == 1 and p.numel() == total * d:
        program.set_param(target, p.index_select(0, head_channels(heads, d)))
    elif p.dim() == 2 and tuple(p.shape) == (total, d):
        program.set_param(target, p.index_select(0, torch.tensor(list(heads), dtype=torch.long)))
    elif p.numel() != d and total > 1:  # [d]: one norm shared by every head, nothing to cut
        raise ValueError(f"{target}: shape {tuple(p.shape)} is not per-head ({total} heads x {d})")


def select_ffn(program: Program, structure: Structure, block: int, neurons: Sequence[int]) -> None:
    """Keeps FFN neurons ``neurons`` (in that order) of ``block``: rows of up/gate, columns of down."""
    ffn = structure.blocks[block].ffn
    assert ffn is not None
    idx = torch.tensor(list(neurons), dtype=torch.long)
    if ffn.gate is not None and ffn.up.rows is not None and ffn.gate.rows is not None:
        # One fused gate_up weight: cut both halves with the same neurons so gate and up rows stay paired.
        halves = sorted((ffn.gate.rows, ffn.up.rows))
        _index(program, ffn.up, "out", torch.cat([start + idx for start, _ in halves]))
    else:
        for info in (ffn.up, ffn.gate):
            if info is not None:
                _index(program, info, "out", idx)
    _index(program, ffn.down, "in", idx)


def drop_blocks(program: Program, structure: Structure, blocks: Sequence[int]) -> None:
    """Rewires each dropped block's residual adds to their stream; ``recompile`` then removes the branches."""
    from slmopt.passes.importance import units_of

    graph = program.graph
    for unit in units_of(structure, "block"):
        if unit.index not in blocks:
            continue
        for sub in unit.sublayers:  # in order: the FFN's stream may be the attention's (now gone) add
            add = next(n for n in graph.nodes if n.name == sub.residual_add)
            add.replace_all_uses_with(sub.stream(graph))
            graph.erase_node(add)


# ------------------------------------------------------------------------------------------- shape fixes
_SHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
_SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default}
# Feature slices of a fused projection (Phi-3's qkv[..., :q_width]): bounds scale with the cut.
_SLICE_OPS = {aten.slice.Tensor}


class _ShapeRecorder(fx.Interpreter):
    """Records the input shape of every shape op (by node name) on one forward."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and n.target in _SHAPE_OPS | _SPLIT_OPS | _SLICE_OPS:
            self.shapes[n.name] = tuple(self.env[n.args[0]].shape)
        return super().run_node(n)


def _groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pairs of dim groups of two shapes with equal products (how a reshape maps dims)."""
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj = [i] if i < len(a) else [], [j] if j < len(b) else []
        pa = a[i] if i < len(a) else 1
        pb = b[j] if j < len(b) else 1
        i, j = i + bool(gi), j + bool(gj)
        while pa != pb:
            if pa < pb and i < len(a):
                pa, gi, i = pa * a[i], [*gi, i], i + 1
            elif j < len(b):
                pb, gj, j = pb * b[j], [*gj, j], j + 1
            else:
                raise ValueError(f"cannot map shape {list(a)} onto {list(b)}")
        out.append((gi, gj))
    return out


def _scaled(value: int, old: int, new: int, what: str) -> int:
    if (value * new) % old:
        raise ValueError(f"{what}: {value} does not scale by {new}/{old}")
    return value * new // old


def _patch_node(n: fx.Node, old_in: tuple[int, ...], new_in: tuple[int, ...], old_out: Sequence[int]) -> None:
    """Rewrites the constant shape argument of ``n`` for its new input size (one dim changed)."""
    changed = [i for i, (a, b) in enumerate(zip(old_in, new_in, strict=True)) if a != b]
    if len(changed) != 1:
        raise ValueError(f"{n.name}: input changed in dims {changed}; elastic cuts one axis at a time")
    dim, old, new = changed[0], old_in[changed[0]], new_in[changed[0]]
    if n.target in _SLICE_OPS:
        args = [*n.args, 0, 0, None, 1][:5]
        if args[1] % len(old_in) != dim:
            return  # sliced along another axis
        start = _scaled(args[2] or 0, old, new, n.name)
        end = args[3] if args[3] is None or args[3] >= old else _scaled(args[3], old, new, n.name)
        n.args = (args[0], args[1], start, end, *n.args[4:])
        return
    if n.target in _SPLIT_OPS:
        split_dim = n.args[2] if len(n.args) > 2 else 0
        if split_dim % len(old_in) != dim:
            return  # the cut axis is not the split axis: sizes stay
        sizes = n.args[1]
        value = [_scaled(s, old, new, n.name) for s in sizes] if isinstance(sizes, list) else None
        n.args = (n.args[0], value if value is not None else _scaled(sizes, old, new, n.name), *n.args[2:])
        return
    shape = list(n.args[1])
    if n.target is aten.expand.default:
        pos = len(shape) - len(old_in) + dim  # expand aligns dims from the right
        targets = [pos]
    else:
        group = next(g for g in _groups(old_in, list(old_out)) if dim in g[0])
        targets = group[1]
    for pos in targets:
        entry = shape[pos]
        if entry == -1:
            return  # inferred: follows the new input size by itself
        if isinstance(entry, int) and entry != 1 and (entry * new) % old == 0:
            shape[pos] = entry * new // old
            n.args = (n.args[0], shape, *n.args[2:])
            return
    raise ValueError(f"{n.name}: no constant in {shape} can follow the cut {old}->{new} of dim {dim}")


class _ShapePatcher(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, before: dict[str, tuple[int, ...]], outs: dict) -> None:
        super().__init__(gm)
        self.before, self.outs = before, outs

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.before:
            new_in = tuple(self.env[n.args[0]].shape)
            if new_in != self.before[n.name]:
                _patch_node(n, self.before[n.name], new_in, self.outs.get(n.name, ()))
        return super().run_node(n)


def record_shapes(program: Program) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(input shape, output shape) of every shape op on the example input, before slicing."""
    rec = _ShapeRecorder(program.graph_module)
    outs: dict[str, tuple[int, ...]] = {}
    orig = rec.run_node

    def run_node(n: fx.Node) -> Any:
        out = orig(n)
        if n.name in rec.shapes and isinstance(out, torch.Tensor):
            outs[n.name] = tuple(out.shape)
        return out

    rec.run_node = run_node  # type: ignore[method-assign]
    with torch.no_grad():
        rec.run(*program.example_inputs)
    return rec.shapes, outs


def patch_shape_constants(program: Program, before: tuple[dict, dict]) -> int:
    """Fixes every shape constant whose input was cut; returns how many nodes changed."""
    snapshot = {n.name: copy.copy(n.args) for n in program.graph.nodes}
    with torch.no_grad():
        _ShapePatcher(program.graph_module, before[0], before[1]).run(*program.example_inputs)
    program.graph_module.recompile()
    return sum(1 for n in program.graph.nodes if n.name in snapshot and n.args != snapshot[n.name])


def refresh_program(program: Program) -> None:
    """Re-propagates fake tensors so every node's ``meta["val"]`` matches the new sizes.

    Uses the graph's own fake mode and symbolic inputs, so batch/sequence stay symbolic; ~6x faster than a
    re-export (tests re-export the result to prove the graph is consistent).
    """
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    graph = program.graph
    mode = detect_fake_mode([n.meta["val"] for n in graph.nodes if "val" in n.meta])
    inputs = [n.meta["val"] for n in graph.nodes if n.op == "placeholder"]
    FakeTensorProp(program.graph_module, mode).propagate_dont_convert_inputs(*inputs)


def count_groups_kept(total: int, ratio: float) -> int:
    """Groups kept for a width ratio: at least one, rounded to nearest."""
    return max(1, min(total, math.floor(total * ratio + 0.5)))


def reorder(program: Program, structure: Structure, orders: Any) -> None:
    """Permutes every block's KV groups, query heads and FFN neurons into importance order (in place).

    Function-preserving: only the order in which features are stored changes.
    """
    for lay in attention_layouts(structure):
        select_attention(program, lay, orders.groups[lay.block], orders.q_orders[lay.block])
    for block in structure.blocks:
        if block.ffn is not None:
            select_ffn(program, structure, block.index, orders.neurons[block.index])


def extract(program: Program, structure: Structure, plan: Any) -> int:
    """Cuts a *reordered* program down to ``plan`` (prefixes): drops blocks, slices weights, patches shapes.

    ``structure`` must be the analysis of ``program``. Returns the number of shape constants patched.
    """
    dropped = [b.index for b in structure.blocks if b.index not in plan.blocks]
    drop_blocks(program, structure, dropped)
    program.recompile()
    before = record_shapes(program)
    for lay in attention_layouts(structure):
        g = plan.groups.get(lay.block, lay.kv_heads)
        if lay.block in plan.blocks and g < lay.kv_heads:
            select_attention(program, lay, list(range(g)), [list(range(lay.rep))] * lay.kv_heads)
    for block in structure.blocks:
        ffn = block.ffn
        if (
            ffn is not None
            and block.index in plan.blocks
            and plan.ffn.get(block.index, ffn.width) < ffn.width
        ):
            select_ffn(program, structure, block.index, list(range(plan.ffn[block.index])))
    patched = patch_shape_constants(program, before)
    refresh_program(program)
    return patched

"""Graph side of the ``fff`` pass: collect an FFN's inputs from a Program and splice in the fff op.

:func:`collect_branch_inputs` interprets the Program on calibration tokens and keeps (a seeded sample of)
the rows of one node's value, stopping the run there. :func:`replace_ffn` swaps an analysed FFN branch
for ``torch.ops.slmopt.fff.default`` (plus a dense ``linear -> act -> linear`` path for shared neurons),
registers the new parameters, fills ``meta["val"]`` with fake tensors so later passes and re-export see
shapes, and recompiles (the old weights are dropped).

Example:
    >>> # x = collect_branch_inputs(program, ffn.branch_input, calib, max_tokens=4096, seed=0)
    >>> # replace_ffn(program, ffn, tree, prefix="fff.block0")
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

import slmopt.ops  # noqa: F401 - registers torch.ops.slmopt.fff
from slmopt import distributed
from slmopt.data.runner import PrefixCache, stream_activations
from slmopt.passes.fff.layer import OP_PARAMETERS

if TYPE_CHECKING:
    from slmopt.analysis.structure import FFNInfo
    from slmopt.passes.fff.convert import FFFTree
    from slmopt.program import Program

__all__ = ["FFF_OP", "collect_branch_inputs", "replace_ffn"]

log = logging.getLogger(__name__)

FFF_OP = torch.ops.slmopt.fff.default
aten = torch.ops.aten

# Rows per interpreter call: bounds activation memory on long calibration sets.
_BATCH = 8

# activation name -> builder of the aten call (target, args tail, kwargs) applied to the pre-activation.
_ACT_OPS: dict[str, tuple[Any, dict[str, Any]]] = {
    "gelu": (aten.gelu.default, {}),
    "gelu_tanh": (aten.gelu.default, {"approximate": "tanh"}),
    "silu": (aten.silu.default, {}),
    "relu": (aten.relu.default, {}),
}


def collect_branch_inputs(
    program: Program,
    node: str,
    calib: torch.Tensor,
    max_tokens: int,
    seed: int = 0,
    cache: PrefixCache | None = None,
) -> torch.Tensor:
    """Runs ``calib`` through ``program`` up to ``node``; returns up to ``max_tokens`` of its rows.

    Rows are sampled uniformly (seeded) from every batch, so long calibration sets never sit in memory
    at once.

    Args:
        program: a single-input Program.
        node: FX node name whose value to collect (``[..., h]``).
        calib: calibration inputs ``[n, ...]``.
        max_tokens: cap on the rows returned.
        seed: sampling seed.
        cache: resume each batch from the previous collection's cut (same values, a fraction of the
            work when nodes are collected in graph order); see :class:`~slmopt.data.runner.PrefixCache`.

    Returns:
        ``[T, h]`` float32 rows, ``T <= max_tokens``.
    """
    gen = torch.Generator().manual_seed(seed)
    keep: float | None = None
    chunks: list[torch.Tensor] = []
    # Under torch.distributed each rank runs only its block of batches but draws every batch's sample
    # permutation, so the gathered rows equal the single-process sample exactly (and every rank fits the
    # same tree from them).
    first, stop = distributed.shard_bounds(len(calib), _BATCH)
    mine = stream_activations(program, [node], distributed.shard_rows(calib, _BATCH), _BATCH, cache=cache)
    for start in range(0, len(calib), _BATCH):
        rows = None
        if first <= start < stop:
            value = next(mine)[node]
            rows = value.detach().reshape(-1, value.shape[-1]).float()
        if keep is None:  # rows per sample are known after the first batch (rank 0 runs it)
            per_sample = distributed.rank0_decides(
                None if rows is None else rows.shape[0] / len(calib[start : start + _BATCH])
            )
            keep = min(1.0, max_tokens / max(1.0, per_sample * len(calib)))
        count = round(per_sample * len(calib[start : start + _BATCH]))
        take = max(1, round(keep * count))
        perm = torch.randperm(count, generator=gen)[:take]
        if rows is not None:
            chunks.append(rows[perm])
    x = distributed.all_gather_rows(torch.cat(chunks))
    return x[:max_tokens].clone()


def _set_val(node: fx.Node, mode: Any) -> None:
    """Fills ``node.meta['val']`` by running its target on its inputs' fake values."""
    args = fx.map_arg(node.args, lambda n: n.meta["val"])
    kwargs = fx.map_arg(node.kwargs, lambda n: n.meta["val"])
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)


def _param_node(program: Program, target: str, value: torch.Tensor, mode: Any) -> fx.Node:
    program.set_param(target, value)
    node = program.graph.get_attr(target)
    node.meta["val"] = mode.from_tensor(program.param(target), static_shapes=True)
    return node


def replace_ffn(program: Program, ffn: FFNInfo, tree: FFFTree, prefix: str) -> fx.Node:
    """Replaces ``ffn``'s branch (up/gate -> down, incl. bias) by an fff op call; returns its result node.

    Args:
        program: edited in place, then recompiled.
        ffn: the analysed FFN (its ``branch_input`` feeds the op, ``branch_output``'s users read the result).
        tree: the fitted tree (and shared neurons).
        prefix: ``get_attr`` prefix of the new parameters, e.g. ``fff.block3``.
    """
    graph = program.graph
    nodes = {n.name: n for n in graph.nodes}
    # The op replaces the projections only: a branch-output norm or constant scale after them stays.
    x, out = nodes[ffn.branch_input], nodes[ffn.projection_output or ffn.branch_output]
    x_val = x.meta.get("val")
    if x_val is None or not hasattr(x_val, "fake_mode"):
        raise ValueError(f"node {x.name!r} has no fake-tensor metadata; re-capture the model")
    mode = x_val.fake_mode
    dtype = x_val.dtype
    meta = {k: out.meta[k] for k in ("nn_module_stack", "stack_trace") if k in out.meta}

    def param(name: str, t: torch.Tensor | None) -> fx.Node | None:
        return None if t is None else _param_node(program, f"{prefix}.{name}", t.to(dtype), mode)

    def call(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> fx.Node:
        node = graph.call_function(target, args, kwargs or {})
        node.meta.update(meta)
        _set_val(node, mode)
        return node

    with graph.inserting_before(out):
        tensors = [
            param(name, getattr(tree, name))
            for name in OP_PARAMETERS
            if name != "node_out"  # trees converted from an FFN route only; their nodes add nothing
        ]
        node_w, node_b, w1, b1, wg, bg, w2, b2 = tensors  # OP_PARAMETERS order, node_out left out
        result = call(FFF_OP, (x, node_w, node_b, None, w1, b1, wg, bg, w2, b2, tree.activation))
        if tree.shared is not None:
            s = tree.shared
            target, act_kwargs = _ACT_OPS[s.activation]
            up = call(aten.linear.default, (x, param("shared.w1", s.w1), param("shared.b1", s.b1)))
            if s.wg is not None:
                gate = call(aten.linear.default, (x, param("shared.wg", s.wg), param("shared.bg", s.bg)))
                hidden = call(aten.mul.Tensor, (call(target, (gate,), act_kwargs), up))
            else:
                hidden = call(target, (up,), act_kwargs)
            # linear's weight is [out, in]: the neuron-major w2 [s, h] transposed.
            down = call(aten.linear.default, (hidden, param("shared.w2", s.w2.T.contiguous()), None))
            result = call(aten.add.Tensor, (result, down))
        if out.meta.get("val") is not None and out.meta["val"].dtype != dtype:
            result = call(aten._to_copy.default, (result,), {"dtype": out.meta["val"].dtype})
    out.replace_all_uses_with(result)
    program.recompile()  # the old up/gate/down chain is dead now; recompile drops it and its weights
    log.debug("replaced FFN %s..%s by %s", ffn.branch_input, ffn.branch_output, result.name)
    return result

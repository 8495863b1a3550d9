"""KV cache as a graph transform on a final (already rewritten) causal-LM Program.

The passes keep working on the plain ``input_ids -> logits`` Program; :func:`add_kv_cache` turns the
*result* into a generation graph, so it composes with every pass: attention layers removed by
``prune-attn`` are simply not in the graph any more (no cache slot), FFF ops and sliced heads are untouched.

The transform:

* every ``aten.scaled_dot_product_attention`` becomes a call of :func:`attend_with_cache`, which appends the
  new keys/values (the per-KV-head tensors ``[B, Hkv, S, D]``, found by walking back through HF's GQA
  ``unsqueeze → expand → reshape`` chain, after RoPE) to the past ones, repeats KV heads for GQA, builds the
  causal mask of query positions ``P..P+S-1`` against keys ``0..P+S-1`` — limited to the layer's sliding
  window when its original mask has one (read from the graph, :mod:`slmopt.generation.window`) — and
  runs SDPA. Re-exporting the
  graph traces that Python function into standard aten ops, so the ONNX exporter sees nothing custom;
* every ``arange(S)`` over the input's sequence length (HF's ``cache_position``) is offset by the past
  length ``P`` (read from the first past key's shape), so RoPE and learned position embeddings see
  positions ``P..P+S-1``. The original mask subgraph becomes dead and is removed;
* new inputs ``past_key_values.{i}.key/value`` ``[B, Hkv, P, D]`` (``P`` may be 0: prefill) and outputs
  ``present.{i}.key/value`` ``[B, Hkv, P+S, D]`` after the logits; ``i`` counts the *remaining* attention
  layers, :attr:`CacheSlot.block` records the original block index.

A self-check (prefill, a chunk after a past, then a one-token decode, vs the original's full forward on ids
longer than any sliding window; :mod:`slmopt.generation.check`) refuses to return a wrong graph for an
unfamiliar model family.

Example:
    >>> from tests.models import capture_model  # doctest: +SKIP
    >>> cached, layout = add_kv_cache(capture_model("llama"))  # doctest: +SKIP
    >>> layout.input_names()[:3], layout.kv_bytes_per_token()  # doctest: +SKIP
    (['input_ids', 'past_key_values.0.key', 'past_key_values.0.value'], 512)
"""

from __future__ import annotations

import copy
import logging
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from slmopt.analysis.analyze import analyze
from slmopt.errors import UserError
from slmopt.generation.check import DEFAULT_CHECK_TOLERANCE, check_cache_program, check_ids, run_in_steps
from slmopt.generation.layout import CacheLayout, CacheSlot, empty_past
from slmopt.generation.window import attention_windows, probe_length
from slmopt.program import Program

__all__ = [
    "CacheLayout",
    "CacheSlot",
    "add_kv_cache",
    "attend_with_cache",
    "check_cache_program",
    "check_ids",
    "empty_past",
    "run_in_steps",
]

log = logging.getLogger(__name__)

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_ARANGE = torch.ops.aten.arange.default
_SYM_SIZE = torch.ops.aten.sym_size.int
# Ops of HF's ``repeat_kv`` (GQA): k[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, H, S, D).
_RESHAPES = {torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}
_EXPANDS = {torch.ops.aten.expand.default}
_UNSQUEEZES = {torch.ops.aten.unsqueeze.default}
# Dtype assertions keep dead mask code alive (they count as side effects); they only restate export facts.
_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def attend_with_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    scale: float | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention of ``S`` new queries over ``P`` cached + ``S`` new keys; returns ``(out, k', v')``.

    ``q`` is ``[B, H, S, D]``; ``k, v`` are ``[B, Hkv, S, D]``; ``past_k, past_v`` ``[B, Hkv, P, D]``. Key
    heads are repeated ``H // Hkv`` times in HF's order (head ``h`` reads KV head ``h // n_rep``). With a
    sliding ``window``, the query at position ``p`` sees only keys ``p - window + 1 .. p`` (HF's
    ``sliding_window`` convention); the cache still keeps every key, the mask does the limiting.

    Example:
        >>> q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
        >>> out, pk, pv = attend_with_cache(q, k, k, torch.zeros(1, 2, 0, 8), torch.zeros(1, 2, 0, 8))
        >>> tuple(out.shape), tuple(pk.shape)
        ((1, 4, 3, 8), (1, 2, 3, 8))
    """
    keys = torch.cat([past_k, k], dim=2)
    values = torch.cat([past_v, v], dim=2)
    b, hkv, t, d = keys.shape
    s, p = q.shape[2], past_k.shape[2]
    n_rep = q.shape[1] // hkv
    rep_k, rep_v = keys, values
    if n_rep > 1:
        # The same unsqueeze/expand/reshape HF uses: exports to standard ops (repeat_interleave may not).
        rep_k = keys[:, :, None].expand(b, hkv, n_rep, t, d).reshape(b, hkv * n_rep, t, d)
        rep_v = values[:, :, None].expand(b, hkv, n_rep, t, d).reshape(b, hkv * n_rep, t, d)
    query_pos = torch.arange(s, device=q.device) + p
    key_pos = torch.arange(t, device=q.device)
    mask = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        mask = mask & (key_pos[None, :] > query_pos[:, None] - window)
    out = F.scaled_dot_product_attention(q, rep_k, rep_v, attn_mask=mask, scale=scale)
    return out, keys, values


def _kv_source(node: Any) -> Any:
    """The per-KV-head tensor behind SDPA's k/v argument (skips HF's GQA repeat chain, if any)."""
    if (
        isinstance(node, fx.Node)
        and node.target in _RESHAPES
        and isinstance(node.args[0], fx.Node)
        and node.args[0].target in _EXPANDS
    ):
        unsq = node.args[0].args[0]
        if isinstance(unsq, fx.Node) and unsq.target in _UNSQUEEZES and unsq.args[1] == 2:
            return unsq.args[0]
    return node


def _shape(node: Any) -> tuple[Any, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _slots(program: Program, sdpas: list[fx.Node]) -> list[CacheSlot]:
    """Cache slots for the SDPA nodes: head counts from shapes (else analysis), original block indices."""
    by_node = {}
    try:
        for block in analyze(program).blocks:
            if block.attention is not None and block.attention.sdpa:
                by_node[block.attention.sdpa] = block
    except Exception as err:  # noqa: BLE001 - analysis is only a source of names/indices here
        log.info("analysis failed (%s); cache slots get no block index", err)
    slots = []
    for i, node in enumerate(sdpas):
        q_shape, k_shape = _shape(node.args[0]), _shape(_kv_source(node.args[1]))
        block = by_node.get(node.name)
        if q_shape is None or k_shape is None:
            if block is None:
                raise UserError(f"cannot tell the head counts of attention {node.name} (no shape metadata)")
            att = block.attention
            heads, kv_heads, dim = att.num_heads, att.num_kv_heads, att.head_dim
        else:
            heads, kv_heads, dim = int(q_shape[1]), int(k_shape[1]), int(k_shape[3])
        index = _module_block(node)
        if index is None and block is not None:
            index = block.index
        slots.append(CacheSlot(i, index, node.name, heads, kv_heads, dim))
    return slots


def _module_block(node: fx.Node) -> int | None:
    """The layer number in the module path export recorded for ``node`` (``model.layers.2.self_attn``: 2).

    Preferred over analysis' block index: after passes have removed sublayers or replaced FFNs, analysis
    may find fewer blocks and number them consecutively, while the module path keeps the original layer.
    """
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        numbers = [int(part) for part in str(path).split(".") if part.isdigit()]
        if len(numbers) == 1:
            return numbers[0]
    return None


def _seq_sizes(graph: fx.Graph, ids: fx.Node) -> set[fx.Node]:
    return {
        n for n in graph.nodes if n.op == "call_function" and n.target is _SYM_SIZE and n.args == (ids, 1)
    }


def _offset_positions(graph: fx.Graph, ids: fx.Node, past_len: fx.Node) -> int:
    """Offsets every ``arange(S)`` over the input's sequence length by the past length; returns how many."""
    seq = _seq_sizes(graph, ids)
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _ARANGE or len(node.args) != 1:
            continue
        if node.args[0] not in seq:
            continue
        with graph.inserting_after(node):
            shifted = graph.call_function(torch.ops.aten.add.Tensor, (node, past_len))
        node.replace_all_uses_with(shifted, delete_user_cb=lambda user, new=shifted: user is not new)
        count += 1
    return count


def add_kv_cache(
    program: Program, check: bool = True, tolerance: float = DEFAULT_CHECK_TOLERANCE
) -> tuple[Program, CacheLayout]:
    """Returns a generation Program ``(input_ids, *past) -> (logits, *present)`` and its cache layout.

    Args:
        program: a causal-LM Program (``input_ids -> logits``), after any passes; not modified.
        check: run the prefill+decode vs full-forward self-check (see :func:`check_cache_program`).
        tolerance: max |diff| the self-check accepts, relative to max(1, max |logits|).

    Raises:
        UserError: not a causal LM, attention without SDPA, no attention left, or a failed self-check.

    Example:
        >>> cached, layout = add_kv_cache(program)  # doctest: +SKIP
        >>> logits, *present = cached.graph_module(ids, *empty_past(layout, ids.shape[0]))  # doctest: +SKIP
    """
    family = (program.info.config or {}).get("model_type") or program.info.source
    if program.info.kind != "causal-lm":
        raise UserError(
            f"a KV cache needs a causal LM (input ids -> logits); this model is {program.info.kind!r}"
        )
    # The transform rewrites the graph, never a weight: share the tensors instead of copying them (a second
    # copy of the weights would double the peak memory of lowering a large model).
    source = program.graph_module
    shared = {id(t): t for t in (*source.parameters(), *source.buffers())}
    gm = copy.deepcopy(source, memo=shared)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UserError(f"a KV cache needs a model with one input (token ids), got {len(placeholders)}")
    ids = placeholders[0]
    sdpas = [n for n in graph.nodes if n.op == "call_function" and n.target is _SDPA]
    if not sdpas:
        softmax = any(n.target is torch.ops.aten._softmax.default or n.target is torch.ops.aten.softmax.int
                      for n in graph.nodes)  # fmt: skip
        why = "hand-written softmax(QK^T)V attention is not supported" if softmax else "no attention remains"
        raise UserError(f"cannot add a KV cache to {family}: {why} (need scaled_dot_product_attention)")
    slots = _slots(program, sdpas)
    probe = probe_length(program.info.config, program.info.max_seq_len)
    for slot, window in zip(slots, attention_windows(gm, sdpas, probe), strict=True):
        slot.window = window

    # Plain calling convention: positional tensors in, a flat tuple out (no pytree specs, no export guards).
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    graph._codegen = fx.graph.CodeGen()
    pasts: list[fx.Node] = []
    last = placeholders[-1]
    for slot in slots:
        for kind in ("key", "value"):
            with graph.inserting_after(last):
                last = graph.placeholder(f"past_key_values_{slot.index}_{kind}")
            pasts.append(last)
    with graph.inserting_after(last):
        past_len = graph.call_function(_SYM_SIZE, (pasts[0], 2))
    shifted = _offset_positions(graph, ids, past_len)
    if shifted == 0:
        log.warning("no arange over the sequence length found in %s: positions are not offset", family)

    presents: list[fx.Node] = []
    for slot, node in zip(slots, sdpas, strict=True):
        q, k, v = node.args[:3]
        extra = dict(zip(("attn_mask", "dropout_p", "is_causal"), node.args[3:], strict=False))
        extra.update(node.kwargs)
        if extra.get("dropout_p", 0.0):
            raise UserError(f"attention {node.name} uses dropout; capture the model in eval mode")
        with graph.inserting_before(node):
            call = graph.call_function(
                attend_with_cache,
                (q, _kv_source(k), _kv_source(v), pasts[2 * slot.index], pasts[2 * slot.index + 1]),
                {"scale": extra.get("scale"), "window": slot.window},
            )
            out, pk, pv = (graph.call_function(operator.getitem, (call, j)) for j in range(3))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        presents += [pk, pv]
    output = next(n for n in graph.nodes if n.op == "output")
    logits = output.args[0]
    while isinstance(logits, (tuple, list)):
        logits = logits[0]
    output.args = ((logits, *presents),)
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in _ASSERTS]:
        graph.erase_node(node)

    dtype = _DTYPE_NAMES.get(_param_dtype(gm), "float32")
    layout = CacheLayout(
        slots=slots,
        dtype=dtype,
        vocab_size=program.info.vocab_size,
        max_seq_len=program.info.max_seq_len,
        num_blocks=int((program.info.config or {}).get("num_hidden_layers") or 0) or len(slots),
        extra={"model_type": family},
    )
    info = copy.deepcopy(program.info)
    info.input_names = layout.input_names()
    info.dynamic_dims = [{0: "batch", 1: "seq"}] + [{0: "batch", 2: "past"}] * (2 * len(slots))
    ctx = info.max_seq_len or 1 << 16
    # Export specialises example sizes 0/1, so the example has past 4 / seq 3; the declared range still
    # admits P = 0 (prefill) and S = 1 (decode).
    info.dim_bounds = {**info.dim_bounds, "past": (0, ctx), "seq": (1, ctx)}
    batch = int(program.example_inputs[0].shape[0])
    gen = torch.Generator().manual_seed(0)
    example_ids = torch.randint(0, int(info.vocab_size or 2), (batch, 3), generator=gen)
    past = [
        torch.randn(t.shape[:2] + (4,) + t.shape[3:], generator=gen).to(t.dtype)
        for t in empty_past(layout, batch)
    ]
    cached = Program(
        graph_module=gm,
        example_inputs=(example_ids, *past),
        info=info,
        history=copy.deepcopy(program.history) + [{"name": "kv-cache", "slots": len(slots)}],
        lowering_hints=copy.deepcopy(program.lowering_hints),
    )
    cached.recompile()
    if check:
        check_cache_program(program, cached, layout, tolerance=tolerance)
    return cached, layout


def _param_dtype(gm: fx.GraphModule) -> torch.dtype:
    for p in gm.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32

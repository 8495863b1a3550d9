"""Which keys each attention layer may see: causal, or causal within a sliding window, read from the graph.

The KV-cache transform rebuilds every attention mask for "``S`` new queries after ``P`` cached keys", so it
must know the mask each ``scaled_dot_product_attention`` of the original graph applies. Sliding-window
families (Gemma-2/3, StarCoder2, Mistral, Qwen2 with ``use_sliding_window``) mix full-causal and windowed
layers, and their configs spell that differently (``sliding_window``, ``layer_types``,
``max_window_layers``). Instead of interpreting each config, :func:`attention_windows` *evaluates the mask
subgraph* of the captured program on a probe length longer than any window the config mentions, and reads
the window off the mask: query ``q`` sees keys ``q - w + 1 .. q``. Only the nodes the masks depend on run
(shape arithmetic, ``arange``, comparisons: no weights), so a probe of thousands of tokens stays cheap.

A mask that is neither causal nor a causal sliding window (bidirectional, chunked, ALiBi-style additive
bias) is refused with one line: a cache built for it would give wrong tokens.

Example:
    >>> # attention_windows(program, sdpa_nodes)  -> [8, None, 8]  (Gemma-3: local, global, local)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from slmopt.errors import UserError

__all__ = ["PROBE_MIN", "attention_windows", "probe_length", "window_pattern"]

log = logging.getLogger(__name__)

# The shortest probe: windows below this are found even when the config names none.
PROBE_MIN = 256


def probe_length(config: dict[str, Any] | None, max_seq_len: int | None) -> int:
    """A sequence length longer than any window the config mentions (capped by the context).

    Example:
        >>> probe_length({"sliding_window": 4096}, 32768), probe_length({}, 64)
        (4098, 64)
    """
    hints = [
        int(v)
        for k, v in (config or {}).items()
        if "window" in k and isinstance(v, int) and not isinstance(v, bool) and v > 0
    ]
    length = max([PROBE_MIN, *(h + 2 for h in hints)])
    return min(length, max_seq_len) if max_seq_len else length


def window_pattern(length: int, window: int | None) -> torch.Tensor:
    """The ``[length, length]`` boolean mask of causal attention, limited to ``window`` keys if given.

    Example:
        >>> window_pattern(4, 2).int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    pos = torch.arange(length)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[None, :] > pos[:, None] - window
    return allowed


def _allowed(mask: torch.Tensor, node: str) -> torch.Tensor:
    """``[L, L]`` boolean "may attend" matrix from a boolean or additive float mask of any batch/heads."""
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if bool((mask[~blocked] != 0).any()):
            raise UserError(
                f"attention {node} adds a position bias to its scores (not a plain mask); a KV cache for "
                "it is not supported"
            )
        allowed = ~blocked
    flat = allowed.reshape(-1, *allowed.shape[-2:])
    if not bool((flat == flat[:1]).all()):
        raise UserError(f"attention {node} masks each batch row or head differently; not supported")
    return flat[0]


def _mask_values(gm: fx.GraphModule, masks: list[fx.Node], ids: torch.Tensor) -> list[torch.Tensor]:
    """Runs only the subgraph the mask nodes depend on, with ``ids`` as the input."""
    needed: set[fx.Node] = set()
    stack = list(masks)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node in needed or node.op == "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[m] for m in masks))
    sub = fx.GraphModule(gm, graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UserError(f"a KV cache needs a model with one input (token ids), got {len(placeholders)}")
    with torch.no_grad():
        return list(sub(ids))


def attention_windows(gm: fx.GraphModule, sdpas: list[fx.Node], length: int) -> list[int | None]:
    """The sliding window of every SDPA node (None: full causal), read from its mask at ``length`` tokens.

    Args:
        gm: the captured causal LM (one input: token ids ``[B, S]``).
        sdpas: its ``scaled_dot_product_attention`` nodes.
        length: the probe length; a window ``>= length`` cannot be told from full causal attention, so
            pass one longer than any window the model may have (:func:`probe_length`).

    Raises:
        UserError: a mask that is neither causal nor causal-within-a-window.
    """
    masked = [n for n in sdpas if _mask_arg(n) is not None]
    windows: dict[str, int | None] = {n.name: None for n in sdpas}
    if not masked:
        return [None] * len(sdpas)
    ids = torch.zeros(1, length, dtype=torch.long)
    try:
        values = _mask_values(gm, [_mask_arg(n) for n in masked], ids)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - the self-check decides; say why the probe was skipped
        log.warning("could not evaluate the attention masks at %d tokens (%s); assuming causal", length, err)
        return [None] * len(sdpas)
    for node, mask in zip(masked, values, strict=True):
        allowed = _allowed(mask, node.name)
        if tuple(allowed.shape) != (length, length):
            raise UserError(f"attention {node.name}: mask of shape {tuple(mask.shape)} at {length} tokens")
        window = int(allowed[-1].sum())
        window_or_none = None if window >= length else window
        if window < 1 or not torch.equal(allowed, window_pattern(length, window_or_none)):
            raise UserError(
                f"attention {node.name} uses a mask that is neither causal nor a causal sliding window "
                "(bidirectional or chunked attention); a KV cache for it is not supported"
            )
        windows[node.name] = window_or_none
    return [windows[n.name] for n in sdpas]


def _mask_arg(node: fx.Node) -> fx.Node | None:
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    return mask if isinstance(mask, fx.Node) else None

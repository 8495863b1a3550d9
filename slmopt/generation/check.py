"""Self-checks of a KV-cache graph: cached prefill, chunk and decode must equal the original full forward.

Split out of :mod:`slmopt.generation.kv_cache` (which calls :func:`check_cache_program` on every graph it builds) and
shared with the ONNX decoder check of :mod:`slmopt.backends.onnxrt.generation`: both run the same ids
(:func:`check_ids`, longer than any sliding window) through the same three-call schedule
(:func:`run_in_steps`).

Example:
    >>> # diff = check_cache_program(program, cached, layout)  # raises UserError on a wrong graph
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from slmopt.errors import UserError
from slmopt.generation.layout import CacheLayout, empty_past

if TYPE_CHECKING:
    from slmopt.program import Program

__all__ = ["DEFAULT_CHECK_TOLERANCE", "check_cache_program", "check_ids", "run_in_steps"]

DEFAULT_CHECK_TOLERANCE = 1e-4


def check_ids(original: Program, layout: CacheLayout) -> torch.Tensor:
    """Token ids for the cache self-checks: the example ids, lengthened past every sliding window.

    A check shorter than a window cannot tell a windowed layer from a full-causal one, so the ids are at
    least ``max(window) + 4`` long (within the context); fixed seed, so the check is repeatable.
    """
    ids = original.example_inputs[0]
    windows = [s.window for s in layout.slots if s.window is not None]
    length = max(int(ids.shape[1]), 2, *(w + 4 for w in windows))
    if original.info.max_seq_len:
        length = min(length, int(original.info.max_seq_len))
    if length <= ids.shape[1]:
        return ids
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, int(original.info.vocab_size or 2), (int(ids.shape[0]), length), generator=gen)


def run_in_steps(step: Any, ids: torch.Tensor, past: list[Any]) -> torch.Tensor:
    """Logits of ``ids`` run as prefill of the first half, a chunk with a past, then one decode step.

    ``step(ids, past) -> (logits, present)``. The three calls cover a prefill (``P = 0``), a multi-token
    call after a past, and a one-token decode, each crossing any sliding window the check ids exceed.
    """
    seq = int(ids.shape[1])
    cuts = sorted({0, seq // 2, seq - 1, seq})
    pieces = []
    for start, end in zip(cuts, cuts[1:], strict=False):
        logits, past = step(ids[:, start:end], past)
        pieces.append(logits)
    return torch.cat(pieces, dim=1).float()


def check_cache_program(
    original: Program, cached: Program, layout: CacheLayout, tolerance: float = DEFAULT_CHECK_TOLERANCE
) -> float:
    """Cached prefill + chunk + decode vs the original's full forward, past any window; returns max |diff|.

    Raises:
        UserError: naming the model family, when the cache graph disagrees with the original.
    """
    family = layout.extra.get("model_type", original.info.source)
    ids = check_ids(original, layout)

    def step(chunk: torch.Tensor, past: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        logits, *present = cached.graph_module(chunk, *past)
        return logits, present

    with torch.no_grad():
        full = original(ids).float()
        got = run_in_steps(step, ids, empty_past(layout, int(ids.shape[0])))
    if got.shape != full.shape:
        raise UserError(f"KV-cache graph of {family}: logits shape {tuple(got.shape)} != {tuple(full.shape)}")
    diff = float((got - full).abs().max())
    limit = tolerance * max(1.0, float(full.abs().max()))
    if not diff <= limit:
        raise UserError(
            f"KV-cache transform is not supported for this {family} model: prefill+decode differs from the "
            f"full forward by {diff:.3g} (> {limit:.3g}) over {ids.shape[1]} tokens; its positions or "
            "masking follow a pattern slmopt does not recognise"
        )
    return diff

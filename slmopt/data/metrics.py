"""Quality metrics: next-token cross entropy, bits per byte, perplexity and output parity.

The model under test is a plain callable ``logits_fn(input_ids [b, s]) -> logits [b, s, V]`` so the
same code measures a ``torch.nn.Module``, an exported ``GraphModule`` or an ONNX Runtime session
(wrap ``session.run`` in a lambda; NumPy results are accepted).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = [
    "LogitsFn",
    "cross_entropy_nats",
    "bits_per_byte",
    "perplexity",
    "max_abs_diff",
    "predicted_tokens",
    "summarize_quality",
]

LogitsFn = Callable[[torch.Tensor], Any]


def _as_logits(out: Any) -> torch.Tensor:
    """Accept a tensor, a NumPy array, an HF ``ModelOutput`` (``.logits``) or a tuple/list (first item)."""
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        if not out:
            raise ValueError("logits_fn returned an empty sequence")
        out = out[0]
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"logits_fn must return a tensor or array of logits, got {type(out).__name__}")
    return out


def predicted_tokens(tokens: torch.Tensor) -> int:
    """Number of next-token predictions scored for ``tokens [n, seq]``: ``n * (seq - 1)``.

    Example:
        >>> predicted_tokens(torch.zeros(4, 256, dtype=torch.long))
        1020
    """
    return int(tokens.shape[0]) * max(int(tokens.shape[1]) - 1, 0)


@torch.no_grad()
def cross_entropy_nats(
    logits_fn: LogitsFn,
    tokens: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Mean next-token negative log-likelihood in nats per token.

    Every window is scored on its positions ``1 .. seq-1``: the logits at position ``t`` predict the
    token at ``t + 1``. The sum is accumulated in float64 so the mean does not depend on batch size.

    Args:
        logits_fn: Maps ``LongTensor [b, s]`` to logits ``[b, s, V]`` (tensor, array or HF output).
        tokens: ``LongTensor [n, seq]`` with ``seq >= 2``.
        batch_size: Windows per call of ``logits_fn``.
        progress: Show a tqdm progress bar.

    Returns:
        Mean NLL over all ``n * (seq - 1)`` predictions.

    Example:
        >>> uniform = lambda ids: torch.zeros(*ids.shape, 256)
        >>> round(cross_entropy_nats(uniform, torch.zeros(2, 8, dtype=torch.long), progress=False), 6)
        5.545177
    """
    if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n >= 1, seq >= 2], got shape {tuple(tokens.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokens = tokens.long()
    total = 0.0
    for start in tqdm(
        range(0, tokens.shape[0], batch_size), desc="eval", unit="batch", disable=not progress, leave=False
    ):
        batch = tokens[start : start + batch_size]
        logits = _as_logits(logits_fn(batch))
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(batch.shape):
            raise ValueError(
                f"logits_fn returned shape {tuple(logits.shape)} for input {tuple(batch.shape)}; "
                "expected [batch, seq, vocab]"
            )
        if int(batch.max()) >= logits.shape[-1]:
            raise ValueError(f"token id {int(batch.max())} >= logits vocab size {logits.shape[-1]}")
        pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        nll = F.cross_entropy(pred, batch[:, 1:].reshape(-1), reduction="none")
        total += float(nll.double().sum())
    return total / predicted_tokens(tokens)


def bits_per_byte(nats_per_token: float, bytes_per_token: float = 1.0) -> float:
    """Convert nats per token to bits per byte of text.

    Args:
        nats_per_token: Mean next-token NLL in nats.
        bytes_per_token: UTF-8 bytes per token (1.0 for byte-level models).

    Example:
        >>> round(bits_per_byte(math.log(2.0)), 6)
        1.0
    """
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be > 0, got {bytes_per_token}")
    return nats_per_token / math.log(2.0) / bytes_per_token


def perplexity(nats_per_token: float) -> float:
    """Per-token perplexity ``exp(nats)`` (``inf`` on overflow).

    Example:
        >>> perplexity(0.0)
        1.0
    """
    try:
        return math.exp(nats_per_token)
    except OverflowError:
        return math.inf


def max_abs_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Largest absolute elementwise difference, computed in float64; NaN if either side has NaN.

    Args:
        a: Tensor or array.
        b: Tensor or array of the same shape.

    Example:
        >>> max_abs_diff(torch.tensor([1.0, 2.0]), np.array([1.0, 2.5]))
        0.5
    """
    ta = torch.as_tensor(a).detach().cpu().double()
    tb = torch.as_tensor(b).detach().cpu().double()
    if ta.shape != tb.shape:
        raise ValueError(f"shape mismatch: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    if ta.numel() == 0:
        return 0.0
    if torch.isnan(ta).any() or torch.isnan(tb).any():
        return math.nan
    diff = (ta - tb).abs()
    # inf - inf is NaN; equal infinities are a match, not a mismatch.
    diff = torch.where(ta == tb, torch.zeros_like(diff), diff)
    return float(diff.max())


def summarize_quality(
    nats_per_token: float,
    num_tokens: int,
    bytes_per_token: float | None = None,
    byte_level: bool = False,
) -> dict[str, float | int]:
    """Collect the usual quality figures for a report.

    Args:
        nats_per_token: Mean next-token NLL (from :func:`cross_entropy_nats`).
        num_tokens: Predictions scored (see :func:`predicted_tokens`).
        bytes_per_token: UTF-8 bytes per token, if known (see :class:`slmopt.data.windows.EvalData`).
        byte_level: The model reads one token per byte (implies ``bytes_per_token=1``).

    Returns:
        ``{nats_per_token, bits_per_token, perplexity, tokens}`` plus ``bits_per_byte`` when the
        bytes per token are known.

    Example:
        >>> summarize_quality(math.log(2.0), 100, byte_level=True)["bits_per_byte"]
        1.0
    """
    out: dict[str, float | int] = {
        "nats_per_token": float(nats_per_token),
        "bits_per_token": float(nats_per_token) / math.log(2.0),
        "perplexity": perplexity(nats_per_token),
        "tokens": int(num_tokens),
    }
    if byte_level:
        bytes_per_token = 1.0
    if bytes_per_token is not None:
        out["bits_per_byte"] = bits_per_byte(nats_per_token, bytes_per_token)
    return out

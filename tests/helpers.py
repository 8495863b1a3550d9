"""Helpers shared by the test rooms: one cached capture per zoo model, and a quiet pipeline run.

Example:
    >>> from tests.helpers import captured, run_pipeline
    >>> # manager, program, reports = run_pipeline(captured("llama"), "mask-2to4", calib=ids)
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmopt.pipeline.manager import PassContext, PassManager
from slmopt.pipeline.parse import parse_pipeline
from slmopt.pipeline.pass_base import PassReport
from slmopt.program import Program
from tests.models import VOCAB, capture_model

__all__ = ["activation", "captured", "run_pipeline", "save_token_ids"]


@functools.cache
def captured(name: str) -> Program:
    """A zoo model captured once per session (capture dominates test time).

    Shared by every test: read it, never modify it. The PassManager works on its own copy, and
    ``captured(name).clone()`` gives a private one.
    """
    return capture_model(name)


def run_pipeline(
    program: Program, pipeline: str, calib: torch.Tensor | None = None, **ctx_fields: Any
) -> tuple[PassManager, Program, list[PassReport]]:
    """Runs ``pipeline`` on a copy of ``program`` without progress bars.

    Args:
        program: the input (left untouched).
        pipeline: a pipeline string such as ``"prune-attn{remove=1}"``.
        calib: calibration inputs, if the passes need them.
        **ctx_fields: any other :class:`PassContext` field (``seed``, ``eval_tokens``, ``artifact_dir``...).

    Returns:
        The manager (its ``variants`` after a fan-out), the transformed Program and the pass reports.
    """
    manager = PassManager(parse_pipeline(pipeline))
    new, reports = manager.run(program, PassContext(calib=calib, progress=False, **ctx_fields))
    return manager, new, reports


def activation(name: str, z: torch.Tensor) -> torch.Tensor:
    """Activations written out from their formulas (independent of torch.nn.functional and slmopt.ops).

    ``gelu`` (erf), ``gelu_tanh``, ``silu``; anything else is ReLU.
    """
    if name == "gelu":
        return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    if name == "silu":
        return z / (1 + torch.exp(-z))
    return z.clamp_min(0)


def save_token_ids(path: Path, size: int | tuple[int, ...], seed: int = 0, vocab: int = VOCAB) -> Path:
    """Writes seeded random token ids (int64 ``.npy``) for ``--calib``/``--eval``; returns ``path``."""
    np.save(path, np.random.default_rng(seed).integers(0, vocab, size=size, dtype=np.int64))
    return path


def hf_greedy(model: torch.nn.Module, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """The reference for every generation test: Hugging Face greedy decoding with full recompute (no
    cache), and the smallest top-1/top-2 logit gap it met (a near-tie makes an id comparison fragile)."""
    gap = math.inf
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids, use_cache=False).logits[:, -1].float()
            top = logits.topk(2, dim=-1).values
            gap = min(gap, float((top[:, 0] - top[:, 1]).min()))
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids, gap

"""What the tinylm quality benchmarks share: the reference model's calibration/held-out windows and bits/byte.

Example:
    >>> # program, calib, heldout = load_reference(Path("~/.cache/slmopt/tinylm").expanduser(), 256, 64, 64)
    >>> # bits_per_byte(program, heldout)
"""

from __future__ import annotations

from pathlib import Path

import torch

from slmopt.data.metrics import cross_entropy_nats, predicted_tokens, summarize_quality
from slmopt.data.windows import DataSpec, eval_windows, load_tokens
from slmopt.loaders import load_program
from slmopt.program import Program

__all__ = ["bits_per_byte", "load_reference"]


def bits_per_byte(program: Program, tokens: torch.Tensor) -> float:
    """Held-out bits per byte of ``program`` on byte-level ``tokens`` windows."""
    nats = cross_entropy_nats(program, tokens, progress=False)
    return summarize_quality(nats, predicted_tokens(tokens), byte_level=True)["bits_per_byte"]


def load_reference(
    model: Path, seq: int, calib_samples: int, eval_samples: int
) -> tuple[Program, torch.Tensor, torch.Tensor]:
    """The captured model, its seeded calibration windows and its held-out windows (same in every script)."""
    program, _ = load_program(model)
    calib = load_tokens(DataSpec(str(model / "calib.txt"), seq, calib_samples, seed=0), byte_level=True)
    heldout = eval_windows(model / "heldout.txt", seq, eval_samples, byte_level=True).tokens
    return program, calib, heldout

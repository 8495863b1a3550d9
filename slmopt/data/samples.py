"""Calibration and evaluation samples as users hand them over: text is windowed, id rows are used as given.

A text file (or a 1-D stream of token ids) has no sample boundaries, so it is cut into windows of
``seq_len`` tokens (256 unless ``--seq-len`` says otherwise). A 2-D array of token ids ``[rows, tokens]``
already *is* a set of samples the user chose: without ``--seq-len`` every row is used whole, whatever its
length (only rows longer than the model's context are cut, to the context). ``--seq-len`` still cuts rows
into windows, as before. Each function also returns one line saying what was done, for the report.

Example:
    >>> # tokens, note = calibration_tokens("ids.npy", seq_len=None, num_samples=64, seed=0, context=1024)
    >>> # note == "8 rows of 64 tokens from ids.npy, used as given (2-D token ids, no --seq-len)"
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from slmopt.data.windows import ARRAY_SUFFIXES, DataSpec, EvalData, eval_windows, load_tokens, token_array

__all__ = ["DEFAULT_SEQ_LEN", "calibration_tokens", "evaluation_data"]

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 256  # window length for text and 1-D id streams when --seq-len is not given


def _rows_as_given(path: str | Path, seq_len: int | None, vocab_size: int | None) -> torch.Tensor | None:
    """The rows of a 2-D token-id file when no window length was asked for; None otherwise."""
    if seq_len is not None or Path(path).suffix not in ARRAY_SUFFIXES:
        return None
    rows, rank = token_array(path, vocab_size)
    if rank != 2:
        return None
    if rows.shape[1] < 2:
        raise ValueError(f"token file {path} has rows of {rows.shape[1]} token; need at least 2 per row")
    return rows


def _window(seq_len: int | None, context: int | None) -> int:
    length = seq_len or DEFAULT_SEQ_LEN
    return min(length, context) if context else length


def _too_long(rows: torch.Tensor | None, context: int | None) -> str:
    if rows is None or not context or rows.shape[1] <= context:
        return ""
    return f"; its rows of {rows.shape[1]} tokens exceed the model's context of {context}, so they were cut"


def calibration_tokens(
    path: str | Path,
    *,
    seq_len: int | None,
    num_samples: int,
    seed: int = 0,
    context: int | None = None,
    tokenizer: Any = None,
    byte_level: bool = False,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, str]:
    """Calibration token ids ``[n, length]`` and a line describing how they were taken from ``path``.

    Args:
        path: text file, or token ids as ``.npy``/``.pt`` (1-D stream or 2-D rows).
        seq_len: window length; None: 2-D rows as given, text and streams in windows of 256.
        num_samples: how many samples at most (rows or windows, picked by a seeded permutation).
        seed: seed of that permutation.
        context: the model's context length (windows and rows never exceed it).
        tokenizer, byte_level, vocab_size: how text is read and which ids are valid
            (see :func:`slmopt.data.windows.load_tokens`).

    Raises:
        ValueError: the file cannot be read or holds too little (the message names it).

    Example:
        >>> # calibration_tokens("calib.txt", seq_len=None, num_samples=8, byte_level=True)[0].shape
        >>> # torch.Size([8, 256])
    """
    name = Path(path).name
    rows = _rows_as_given(path, seq_len, vocab_size)
    if rows is not None and (not context or rows.shape[1] <= context):
        order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:num_samples]
        tokens = rows[order]
        note = f"{tokens.shape[0]} rows of {rows.shape[1]} tokens from {name}, used as given (2-D token ids, no --seq-len)"
        log.info("calibration: %s", note)
        return tokens, note
    length = _window(seq_len, context)
    spec = DataSpec(str(path), seq_len=length, num_samples=num_samples, seed=seed)
    tokens = load_tokens(spec, tokenizer=tokenizer, byte_level=byte_level, vocab_size=vocab_size)
    return tokens, f"{tokens.shape[0]} windows of {length} tokens from {name}" + _too_long(rows, context)


def evaluation_data(
    path: str | Path,
    *,
    seq_len: int | None,
    max_windows: int | None,
    context: int | None = None,
    tokenizer: Any = None,
    byte_level: bool = False,
    vocab_size: int | None = None,
) -> tuple[EvalData, str]:
    """Evaluation windows (or 2-D rows as given, in file order) and a line describing them.

    Example:
        >>> # evaluation_data("heldout.txt", seq_len=None, max_windows=64, byte_level=True)[1]
        >>> # '64 windows of 256 tokens from heldout.txt'
    """
    name = Path(path).name
    rows = _rows_as_given(path, seq_len, vocab_size)
    if rows is not None and (not context or rows.shape[1] <= context):
        tokens = rows[:max_windows]
        note = f"{tokens.shape[0]} rows of {rows.shape[1]} tokens from {name}, used as given (2-D token ids, no --seq-len)"
        return EvalData(tokens=tokens, bytes_per_token=None, total_tokens=int(rows.numel())), note
    length = _window(seq_len, context)
    data = eval_windows(
        path,
        seq_len=length,
        max_windows=max_windows,
        tokenizer=tokenizer,
        byte_level=byte_level,
        vocab_size=vocab_size,
    )
    return data, f"{data.tokens.shape[0]} windows of {length} tokens from {name}" + _too_long(rows, context)

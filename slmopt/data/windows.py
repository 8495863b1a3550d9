"""Calibration and evaluation data: token windows cut from text files or saved token-id arrays.

Two ways to cut a token stream into ``[n, seq_len]`` samples:

- :func:`load_tokens` picks ``num_samples`` non-overlapping windows with a seeded permutation. Passes
  use it for calibration (activation statistics, importance scores, distillation batches).
- :func:`eval_windows` takes contiguous non-overlapping windows from the start of the file, so an
  evaluation (bits per byte, perplexity) depends on nothing but the file and the window length.

Sources: a UTF-8 text file (tokenized with a Hugging Face tokenizer, or as raw bytes for byte-level
models), or token ids stored in ``.npy`` / ``.pt`` (1-D stream or 2-D ``[rows, length]``). ``.pt`` files
are read with ``torch.load(weights_only=True)`` only, so loading data never runs pickled code.
Every error is a ``ValueError`` that names the file.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DataSpec",
    "EvalData",
    "load_tokens",
    "eval_windows",
    "load_tensor_inputs",
    "token_array",
    "window_offsets",
]

logger = logging.getLogger(__name__)

ARRAY_SUFFIXES = (".npy", ".pt")


@dataclass(frozen=True)
class DataSpec:
    """Where calibration samples come from and how many to cut.

    Attributes:
        path: Text file (``.txt`` or any non-array suffix) or token-id array (``.npy`` / ``.pt``).
        seq_len: Tokens per sample.
        num_samples: Samples wanted; fewer are returned (with a warning) if the file is short.
        seed: Seed of the window permutation; the same seed always gives the same samples.

    Example:
        >>> DataSpec("calib.txt", seq_len=128, num_samples=16)
        DataSpec(path='calib.txt', seq_len=128, num_samples=16, seed=0)
    """

    path: str
    seq_len: int = 256
    num_samples: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {self.seq_len!r}")
        if (
            isinstance(self.num_samples, bool)
            or not isinstance(self.num_samples, int)
            or self.num_samples < 1
        ):
            raise ValueError(f"num_samples must be a positive integer, got {self.num_samples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


@dataclass(frozen=True)
class EvalData:
    """Evaluation windows plus what is needed to turn nats per token into bits per byte.

    Attributes:
        tokens: ``LongTensor [n, seq_len]`` of contiguous windows in file order.
        bytes_per_token: UTF-8 bytes of the evaluated text per token (1.0 for byte-level data);
            ``None`` when unknown (token-id arrays from a non-byte tokenizer).
        total_tokens: Tokens in the whole file (the windows may cover only a prefix).
    """

    tokens: torch.Tensor
    bytes_per_token: float | None
    total_tokens: int


def window_offsets(length: int, seq_len: int, shift: int = 0) -> list[int]:
    """Start offsets of all non-overlapping windows of ``seq_len`` in a row of ``length`` tokens.

    Args:
        length: Tokens in the row.
        seq_len: Window length.
        shift: Offset of the first window, ``0 <= shift <= length % seq_len`` keeps the count maximal.

    Returns:
        Offsets ``shift, shift + seq_len, ...`` of every window that fits entirely.

    Example:
        >>> window_offsets(10, 4, shift=1)
        [1, 5]
    """
    if seq_len < 1 or shift < 0:
        raise ValueError(f"need seq_len >= 1 and shift >= 0, got seq_len={seq_len}, shift={shift}")
    return list(range(shift, length - seq_len + 1, seq_len))


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ValueError(f"data file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"data file {path} is not a regular file")
    if path.stat().st_size == 0:
        raise ValueError(f"data file {path} is empty")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    # NUL never occurs in real text but is common in binaries that happen to be valid UTF-8.
    if b"\x00" in raw:
        raise ValueError(f"data file {path} looks binary (contains NUL bytes); expected UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"data file {path} is not valid UTF-8 text (byte {exc.start}: {exc.reason}); "
            "pass token ids as .npy/.pt instead"
        ) from exc
    if not text.strip():
        raise ValueError(f"data file {path} contains only whitespace")
    return text


def _load_array(path: Path) -> torch.Tensor:
    """Read a ``.npy`` (no pickles) or ``.pt`` (``weights_only=True``) file as a tensor."""
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if arr.dtype.kind not in "biuf":
                raise ValueError(f"unsupported array dtype {arr.dtype}")
            return torch.from_numpy(np.ascontiguousarray(arr))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a paragraph about weights_only; one line that says what happened is enough.
        raise ValueError(
            f"cannot read array file {path}: refusing to load it: it holds pickled objects other than "
            "tensors, which could run code (only weights_only pickles are read; use .npy)"
        ) from exc
    except ValueError as exc:
        raise ValueError(f"cannot read array file {path}: {exc}") from exc
    except Exception as exc:  # torch/numpy raise many types (UnpicklingError, EOFError, RuntimeError)
        raise ValueError(f"cannot read array file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"array file {path} must hold a single tensor, found {type(obj).__name__}")
    return obj


def _token_rows(path: Path, vocab_size: int | None) -> torch.Tensor:
    """Validated token ids from an array file as a 2-D ``LongTensor`` (a 1-D stream becomes one row)."""
    return token_array(path, vocab_size)[0]


def token_array(path: str | Path, vocab_size: int | None = None) -> tuple[torch.Tensor, int]:
    """Validated token ids of a ``.npy``/``.pt`` file as ``[rows, tokens]``, and the file's own rank (1 or 2).

    Example:
        >>> # token_array("ids.npy")  -> (tensor of shape [8, 64], 2) for 8 rows of 64 ids
    """
    path = Path(path)
    _check_file(path)
    ids = _load_array(path)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"token file {path} has dtype {ids.dtype}; expected integer token ids")
    if ids.dim() not in (1, 2):
        raise ValueError(
            f"token file {path} has shape {tuple(ids.shape)}; expected 1-D [tokens] or 2-D [rows, tokens]"
        )
    if ids.numel() == 0:
        raise ValueError(f"token file {path} is empty (shape {tuple(ids.shape)})")
    rank = ids.dim()
    ids = ids.to(torch.int64)
    return _check_ids(ids.reshape(1, -1) if rank == 1 else ids, path, vocab_size), rank


def _check_ids(ids: torch.Tensor, path: Path, vocab_size: int | None) -> torch.Tensor:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0:
        raise ValueError(f"token file {path} contains negative token id {lo}")
    if vocab_size is not None and hi >= vocab_size:
        raise ValueError(f"data file {path} contains token id {hi} >= vocab_size {vocab_size}")
    return ids


def _encode(
    text: str, tokenizer: Any, path: Path, offsets: bool = False
) -> tuple[list[int], list[Any] | None]:
    """Token ids of ``text`` (no BOS/EOS: the data is a stream) and, if asked, character offsets."""
    if tokenizer is None:
        raise ValueError(f"data file {path} is text: pass a tokenizer, or byte_level=True for byte models")
    kwargs: dict[str, Any] = {"add_special_tokens": False, "verbose": False}
    if offsets and getattr(tokenizer, "is_fast", False):
        kwargs["return_offsets_mapping"] = True
    enc = tokenizer(text, **kwargs)
    ids = list(enc["input_ids"])
    if not ids:
        raise ValueError(f"data file {path} produced no tokens")
    return ids, (list(enc["offset_mapping"]) if "return_offsets_mapping" in kwargs else None)


def _text_rows(path: Path, tokenizer: Any, byte_level: bool, vocab_size: int | None) -> torch.Tensor:
    text = _read_text(path)
    if byte_level:
        ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)
    else:
        ids = torch.tensor(_encode(text, tokenizer, path)[0], dtype=torch.int64)
    return _check_ids(ids.reshape(1, -1), path, vocab_size)


def _rows(path: str | Path, tokenizer: Any, byte_level: bool, vocab_size: int | None) -> torch.Tensor:
    path = Path(path)
    _check_file(path)
    if path.suffix in ARRAY_SUFFIXES:
        return _token_rows(path, vocab_size)
    return _text_rows(path, tokenizer, byte_level, vocab_size)


def _too_short(path: Path, rows: torch.Tensor, seq_len: int, role: str) -> ValueError:
    if rows.shape[0] == 1:
        return ValueError(f"{role} file {path} is too short: {rows.shape[1]} tokens, need at least {seq_len}")
    return ValueError(
        f"{role} file {path} has rows of {rows.shape[1]} tokens, shorter than seq_len {seq_len}"
    )


def load_tokens(
    spec: DataSpec,
    tokenizer: Any = None,
    byte_level: bool = False,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Cut ``spec.num_samples`` calibration windows of ``spec.seq_len`` tokens from a file.

    Windows never overlap and never cross a row of a 2-D array. Every row is split into aligned
    windows after a seeded shift inside the row's slack, then a seeded permutation of all windows
    picks the samples; so the first ``k`` samples for ``num_samples=k+1`` equal those for ``k``.

    Args:
        spec: File, window length, sample count and seed.
        tokenizer: Hugging Face tokenizer for text files (called without special tokens).
        byte_level: Read text files as raw UTF-8 bytes (id = byte value) instead of tokenizing.
        vocab_size: If given, reject token ids ``>= vocab_size``.

    Returns:
        ``LongTensor [min(num_samples, available_windows), seq_len]``.

    Raises:
        ValueError: Missing/empty/binary file, bad dtype or shape, out-of-range ids, or not a
            single full window; the message names the file.

    Example:
        >>> spec = DataSpec("heldout.txt", seq_len=256, num_samples=32, seed=0)
        >>> tokens = load_tokens(spec, byte_level=True, vocab_size=256)  # doctest: +SKIP
        >>> tokens.shape  # doctest: +SKIP
        torch.Size([32, 256])
    """
    path = Path(spec.path)
    rows = _rows(path, tokenizer, byte_level, vocab_size)
    seq_len = spec.seq_len
    gen = torch.Generator().manual_seed(spec.seed)
    candidates: list[tuple[int, int]] = []
    for r in range(rows.shape[0]):
        slack = rows.shape[1] % seq_len
        # The shift makes different seeds see different cut points, not just a different subset.
        shift = int(torch.randint(0, slack + 1, (1,), generator=gen))
        candidates.extend((r, o) for o in window_offsets(rows.shape[1], seq_len, shift))
    if not candidates:
        raise _too_short(path, rows, seq_len, "calibration")
    if len(candidates) < spec.num_samples:
        logger.warning(
            "calibration file %s holds only %d windows of %d tokens; using all of them (asked for %d)",
            path,
            len(candidates),
            seq_len,
            spec.num_samples,
        )
    order = torch.randperm(len(candidates), generator=gen)[: spec.num_samples].tolist()
    return torch.stack([rows[r, o : o + seq_len] for r, o in (candidates[i] for i in order)])


def eval_windows(
    path: str | Path,
    seq_len: int = 256,
    max_windows: int | None = None,
    tokenizer: Any = None,
    byte_level: bool = False,
    vocab_size: int | None = None,
) -> EvalData:
    """Contiguous non-overlapping windows from the start of a file, for deterministic evaluation.

    Args:
        path: Text or token-id file (see :func:`load_tokens`).
        seq_len: Tokens per window.
        max_windows: Cap on the number of windows (``None``: the whole file).
        tokenizer: Hugging Face tokenizer for text files.
        byte_level: Read text as raw UTF-8 bytes.
        vocab_size: If given, reject token ids ``>= vocab_size``.

    Returns:
        :class:`EvalData` with ``tokens [n, seq_len]`` in file order and ``bytes_per_token`` (the UTF-8
        bytes of the text covered by the windows divided by their token count; 1.0 for byte-level
        text; ``None`` for token-id arrays).

    Example:
        >>> data = eval_windows("heldout.txt", seq_len=256, byte_level=True)  # doctest: +SKIP
        >>> data.tokens.shape[1], data.bytes_per_token  # doctest: +SKIP
        (256, 1.0)
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows!r}")
    path = Path(path)
    _check_file(path)
    bytes_per_token: float | None = None
    if path.suffix in ARRAY_SUFFIXES:
        rows = _token_rows(path, vocab_size)
    elif byte_level:
        rows = _text_rows(path, None, True, vocab_size)
        bytes_per_token = 1.0
    else:
        text = _read_text(path)
        ids, offsets = _encode(text, tokenizer, path, offsets=True)
        rows = _check_ids(torch.tensor(ids, dtype=torch.int64).reshape(1, -1), path, vocab_size)
    windows = [
        rows[r, o : o + seq_len] for r in range(rows.shape[0]) for o in window_offsets(rows.shape[1], seq_len)
    ]
    if not windows:
        raise _too_short(path, rows, seq_len, "evaluation")
    windows = windows[:max_windows]
    tokens = torch.stack(windows)
    if bytes_per_token is None and path.suffix not in ARRAY_SUFFIXES:
        used = tokens.numel()
        # Offsets give the exact character span of the evaluated prefix; without them (slow
        # tokenizers) the whole-file ratio is the best available estimate.
        end = offsets[used - 1][1] if offsets is not None else len(text)
        n_tok = used if offsets is not None else len(ids)
        bytes_per_token = len(text[:end].encode("utf-8")) / n_tok
    return EvalData(tokens=tokens, bytes_per_token=bytes_per_token, total_tokens=int(rows.numel()))


def load_tensor_inputs(path: str | Path, num_samples: int | None = None) -> torch.Tensor:
    """Load model inputs that are not token ids (e.g. images, features) from ``.npy`` / ``.pt``.

    Args:
        path: Array file whose first dimension indexes samples.
        num_samples: Keep only the first ``num_samples`` samples (``None``: all).

    Returns:
        The tensor as stored (dtype unchanged), sliced along dim 0.

    Example:
        >>> x = load_tensor_inputs("calib_images.npy", num_samples=8)  # doctest: +SKIP
        >>> x.shape  # doctest: +SKIP
        torch.Size([8, 3, 32, 32])
    """
    path = Path(path)
    _check_file(path)
    if path.suffix not in ARRAY_SUFFIXES:
        raise ValueError(f"input file {path} must be .npy or .pt, got suffix {path.suffix!r}")
    x = _load_array(path)
    if x.dim() == 0:
        raise ValueError(f"input file {path} holds a scalar; expected [samples, ...]")
    if x.shape[0] == 0:
        raise ValueError(f"input file {path} holds no samples (shape {tuple(x.shape)})")
    if x.is_complex():
        raise ValueError(f"input file {path} has unsupported dtype {x.dtype}")
    if num_samples is not None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples} (file {path})")
        x = x[:num_samples]
    return x

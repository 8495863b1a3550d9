"""N:M sparsity math shared by the mask-2to4 pass and the artifact checkers: masks and validity.

Conventions used throughout:

* ``n`` is the number of weights *kept* in every group of ``m`` consecutive weights (2:4 keeps 2 of 4).
* Groups run along the **reduction** (input) dimension: ``[out, in]`` weights group along dim 1; callers
  holding a transposed ``[in, out]`` weight (GPT-2 Conv1D, ``addmm``, ONNX ``MatMul``) pass the other axis.
* Masks are applied with :func:`torch.where`, never by multiplication: ``-x * 0`` is ``-0.0``, which breaks
  bit-exact comparisons and some sparse-weight packers. Any ``-0.0`` is normalised to ``+0.0``.

The pruning methods (magnitude, Wanda, SparseGPT) live with their pass in
``slmopt.passes.sparsity.methods``.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.1, -2.0, 0.3, 4.0, 5.0, -0.5, 0.0, 1.0]])
    >>> pruned = apply_mask(w, nm_mask(w.abs(), 2, 4, dim=1))
    >>> pruned.tolist()
    [[0.0, -2.0, 0.0, 4.0, 5.0, 0.0, 0.0, 1.0]]
    >>> nm_valid_fraction(pruned, 2, 4, axis=1)
    1.0
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "NM_HINT",
    "apply_mask",
    "check_divisible",
    "count_negative_zeros",
    "nm_group_counts",
    "nm_mask",
    "nm_valid_fraction",
    "validate_nm",
]

# ``Program.lowering_hints`` key of an N:M promise, ``{"n": 2, "m": 4, "weights": [parameter targets]}``:
# set by the pass that masks, read by backends that check the pattern survived into their artifacts.
NM_HINT = "nm_sparsity"


def validate_nm(n: int, m: int) -> None:
    """Raises ValueError unless ``0 < n < m`` (keep ``n`` of every ``m``)."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"N:M sparsity needs integers 0 < n < m (e.g. n=2, m=4), got n={n}, m={m}")


def check_divisible(size: int, m: int, what: str) -> None:
    if size % m:
        raise ValueError(f"{what} has size {size}, which is not a multiple of m={m}")


# ------------------------------------------------------------------------------------------ masks
def nm_mask(scores: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """Keep-mask with the ``n`` highest scores in every group of ``m`` consecutive entries along ``dim``.

    Args:
        scores: importance per weight (higher = keep), any shape.
        n: entries kept per group.
        m: group size; ``scores.shape[dim]`` must be a multiple of it.
        dim: the grouped (reduction) dimension.

    Returns:
        A bool tensor shaped like ``scores``; exactly ``n`` True per group.

    Example:
        >>> nm_mask(torch.tensor([[1.0, 3.0, 2.0, 0.5]]), 2, 4).tolist()
        [[False, True, True, False]]
    """
    validate_nm(n, m)
    dim = dim % scores.dim()
    check_divisible(scores.shape[dim], m, f"dimension {dim}")
    moved = scores.movedim(dim, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    top = groups.topk(n, dim=-1).indices
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device).scatter_(-1, top, True)
    return keep.reshape(moved.shape).movedim(-1, dim)


def apply_mask(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zeroes ``weight`` where ``keep`` is False with ``torch.where`` (exact ``+0.0``, never ``-0.0``).

    Kept entries that are already ``±0.0`` come out as ``+0.0`` too, so the result has no negative zero.

    Example:
        >>> w = torch.tensor([-1.0, -0.0, 2.0, -3.0])
        >>> apply_mask(w, torch.tensor([False, True, True, False])).tolist()
        [0.0, 0.0, 2.0, 0.0]
    """
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    return torch.where(keep & (weight != 0), weight, zero)


def _as_float_array(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        # float32 is exact for zero/sign tests of every narrower float type (incl. bfloat16).
        return x.detach().cpu().to(torch.float32).numpy()
    arr = np.asarray(x)
    return arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float32)


def nm_group_counts(weight: torch.Tensor | np.ndarray, n: int, m: int, axis: int) -> tuple[int, int]:
    """``(valid, total)`` groups of ``m`` along ``axis``; a group is valid with at most ``n`` nonzeros."""
    validate_nm(n, m)
    arr = _as_float_array(weight)
    axis = axis % arr.ndim
    check_divisible(arr.shape[axis], m, f"axis {axis} of a {list(arr.shape)} weight")
    nonzero = np.moveaxis(arr != 0, axis, -1)
    counts = nonzero.reshape(*nonzero.shape[:-1], nonzero.shape[-1] // m, m).sum(axis=-1)
    return int((counts <= n).sum()), int(counts.size)


def nm_valid_fraction(weight: torch.Tensor | np.ndarray, n: int, m: int, axis: int) -> float:
    """Exact fraction of valid N:M groups along ``axis`` (1.0 only if *every* group is valid).

    A dense random weight scores ≈ 0.69 for 2:4 along any axis, and a 2:4 weight read along the wrong
    axis scores about the same — so callers must demand exactly 1.0 on the right axis.

    Example:
        >>> nm_valid_fraction(torch.tensor([[1.0, 0.0, 0.0, 2.0]]), 2, 4, axis=1)
        1.0
    """
    valid, total = nm_group_counts(weight, n, m, axis)
    return 1.0 if total == 0 else valid / total


def count_negative_zeros(x: torch.Tensor | np.ndarray) -> int:
    """Number of ``-0.0`` entries (sign bit set and equal to zero)."""
    arr = _as_float_array(x)
    return int(np.count_nonzero(np.signbit(arr) & (arr == 0)))

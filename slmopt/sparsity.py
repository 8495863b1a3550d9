"""N:M sparsity math shared by passes and checkers: masks, validity, and the three pruning methods.

Conventions used throughout:

* ``n`` is the number of weights *kept* in every group of ``m`` consecutive weights (2:4 keeps 2 of 4).
* Groups run along the **reduction** (input) dimension. The pruners take weights as ``[out, in]`` and group
  along dim 1; callers holding a transposed ``[in, out]`` weight (GPT-2 Conv1D, ``addmm``) transpose first.
* Masks are applied with :func:`torch.where`, never by multiplication: ``-x * 0`` is ``-0.0``, which breaks
  bit-exact comparisons and some sparse-weight packers. Any ``-0.0`` is normalised to ``+0.0``.
* Calibration statistics come as :class:`~slmopt.activation_stats.InputStats` (the Gram matrix ``XᵀX`` of a
  linear's inputs in float64, plus the row count), so no activations are ever held in memory.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.1, -2.0, 0.3, 4.0, 5.0, -0.5, 0.0, 1.0]])
    >>> pruned = magnitude_prune(w, None, 2, 4)
    >>> pruned.tolist()
    [[0.0, -2.0, 0.0, 4.0, 5.0, 0.0, 0.0, 1.0]]
    >>> nm_valid_fraction(pruned, 2, 4, axis=1)
    1.0
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from slmopt.activation_stats import InputStats, collect_input_stats

__all__ = [
    "PRUNE_METHODS",
    "InputStats",
    "PruneMethod",
    "Pruner",
    "apply_mask",
    "collect_input_stats",
    "count_negative_zeros",
    "magnitude_prune",
    "nm_group_counts",
    "nm_mask",
    "nm_valid_fraction",
    "relative_output_error",
    "relative_weight_error",
    "sparsegpt_prune",
    "validate_nm",
    "wanda_prune",
    "wanda_scores",
]

log = logging.getLogger(__name__)

# How many times SparseGPT multiplies the damping by 10 when the damped Hessian is still not positive
# definite (tiny calibration sets give rank-deficient Grams) before giving up.
_DAMP_RETRIES = 4


def validate_nm(n: int, m: int) -> None:
    """Raises ValueError unless ``0 < n < m`` (keep ``n`` of every ``m``)."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"N:M sparsity needs integers 0 < n < m (e.g. n=2, m=4), got n={n}, m={m}")


def _check_divisible(size: int, m: int, what: str) -> None:
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
    _check_divisible(scores.shape[dim], m, f"dimension {dim}")
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
    _check_divisible(arr.shape[axis], m, f"axis {axis} of a {list(arr.shape)} weight")
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


# ------------------------------------------------------------------------------------------ errors
def relative_weight_error(weight: torch.Tensor, pruned: torch.Tensor) -> float:
    """``‖W − W′‖² / ‖W‖²`` (weight space; used when no calibration inputs exist)."""
    w, p = weight.detach().double(), pruned.detach().double()
    denom = float((w * w).sum())
    return float(((w - p) ** 2).sum()) / denom if denom > 0 else 0.0


def relative_output_error(weight: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """``‖(W − W′)X‖² / ‖WX‖²`` computed from the Gram ``G = XᵀX`` as ``tr(ΔGΔᵀ) / tr(WGWᵀ)``.

    ``weight``/``pruned`` are ``[out, in]``; ``gram`` is ``[in, in]``.
    """
    w, p, g = weight.detach().double(), pruned.detach().double(), gram.double()
    delta = w - p
    denom = float(((w @ g) * w).sum())
    return float(((delta @ g) * delta).sum()) / denom if denom > 0 else 0.0


# ------------------------------------------------------------------------------------------ scorers
def wanda_scores(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """Wanda importance ``|W_ij| · ‖X_j‖₂`` for an ``[out, in]`` weight and per-input norms ``[in]``.

    Example:
        >>> wanda_scores(torch.tensor([[1.0, -2.0]]), torch.tensor([3.0, 0.5])).tolist()
        [[3.0, 1.0]]
    """
    return weight.abs().float() * act_norm.to(torch.float32).unsqueeze(0)


class Pruner(Protocol):
    """One-function protocol of a pruning method: ``[out, in]`` weight in, pruned float32 weight out."""

    def __call__(
        self, weight: torch.Tensor, stats: InputStats | None, n: int, m: int, *, blocksize: int, damp: float
    ) -> torch.Tensor: ...


def _need_stats(stats: InputStats | None, method: str) -> InputStats:
    if stats is None:
        raise ValueError(f"method {method!r} needs calibration statistics (pass --calib FILE)")
    return stats


def magnitude_prune(
    weight: torch.Tensor,
    stats: InputStats | None,
    n: int,
    m: int,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """Keeps the ``n`` largest ``|W|`` per group of ``m`` along dim 1 (data-free)."""
    w = weight.detach().to(torch.float32)
    return apply_mask(w, nm_mask(w.abs(), n, m, dim=1))


def wanda_prune(
    weight: torch.Tensor,
    stats: InputStats | None,
    n: int,
    m: int,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """Keeps the ``n`` highest Wanda scores ``|W_ij|·‖X_j‖₂`` per group of ``m`` along dim 1."""
    st = _need_stats(stats, "wanda")
    w = weight.detach().to(torch.float32)
    return apply_mask(w, nm_mask(wanda_scores(w, st.sq_norms().sqrt()), n, m, dim=1))


def _inverse_cholesky_upper(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = percdamp · mean(diag H)`` (float64)."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = float(torch.diagonal(hessian).mean())
    damp = percdamp * mean_diag
    for attempt in range(_DAMP_RETRIES + 1):
        chol, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0:
                return upper
        # Rank-deficient Gram (few calibration tokens): damp harder rather than fail the whole pass.
        damp = max(damp * 10.0, 1e-6 * mean_diag, 1e-12)
        log.warning(
            "sparsegpt: damped Hessian not positive definite; retry %d with damp %.3g", attempt + 1, damp
        )
    raise ValueError("sparsegpt: Hessian is not positive definite even with heavy damping")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    n: int,
    m: int,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """SparseGPT N:M (OBS with lazy block updates) of an ``[out, in]`` weight.

    Columns are visited left to right in blocks of ``blocksize``. At the first column of each group of
    ``m`` the mask is chosen from the *updated* weights by ``W² / diag(U)²`` (``U`` = upper Cholesky factor
    of ``H⁻¹``), keeping ``n``; every pruned column's error is then propagated to the columns to its
    right (the OBS update, inside the block at once and to later blocks lazily). Inputs that never fired
    (``diag H = 0``) are free to prune, so they score 0 and are pruned first; unlike the reference code
    their surplus weights are *kept*, because calibration rarely covers every input a model will see.

    Args:
        weight: ``[out, in]`` weight (any float dtype; the math runs in float32, the inverse in float64).
        hessian: ``[in, in]`` Hessian proxy ``2XᵀX/N`` (scale is irrelevant: damping is relative).
        n: weights kept per group.
        m: group size (must divide ``in`` and ``blocksize``).
        blocksize: columns per lazy-update block.
        percdamp: damping as a fraction of ``mean(diag H)``.

    Returns:
        The pruned and updated weight, float32, exact ``+0.0`` at pruned positions.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> x, w = torch.randn(64, 8, generator=gen), torch.randn(3, 8, generator=gen)
        >>> pruned = sparsegpt_prune(w, 2 * x.T @ x / 64, 2, 4)
        >>> nm_valid_fraction(pruned, 2, 4, axis=1)
        1.0
    """
    validate_nm(n, m)
    w = weight.detach().to(torch.float32).clone()
    rows, cols = w.shape
    _check_divisible(cols, m, "the weight's input dimension")
    _check_divisible(blocksize, m, "blocksize")
    h = hessian.detach().to(torch.float64).clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    if bool(dead.all()):
        log.warning("sparsegpt: every input is zero on the calibration data; falling back to magnitude")
        return magnitude_prune(w, None, n, m)
    if bool(dead.any()):
        # Keeps the damping relative to live inputs and the Cholesky well-posed.
        idx = dead.nonzero().squeeze(1)
        h[idx, idx] = diag[~dead].mean()
    u = _inverse_cholesky_upper(h, percdamp).to(torch.float32)
    keep = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        k1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % m == 0:
                score = w1[:, i : i + m] ** 2 / d1[i : i + m].unsqueeze(0) ** 2
                score[:, dead[i1 + i : i1 + i + m]] = 0.0
                k1[:, i : i + m] = nm_mask(score, n, m, dim=1)
            col = w1[:, i]
            q = torch.where(k1[:, i], col, torch.zeros((), dtype=col.dtype, device=col.device))
            q1[:, i] = q
            err = (col - q) / d1[i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = q1
        keep[:, i1:i2] = k1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return apply_mask(w, keep)


def _sparsegpt_method(
    weight: torch.Tensor,
    stats: InputStats | None,
    n: int,
    m: int,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    st = _need_stats(stats, "sparsegpt")
    return sparsegpt_prune(weight, st.hessian(), n, m, blocksize=blocksize, percdamp=damp)


@dataclass(frozen=True)
class PruneMethod:
    """A registered pruning strategy: the function and whether it needs calibration data."""

    prune: Pruner
    needs_calib: bool
    summary: str


# Strategy table: method name -> pruner. Configs refer to methods by these names.
PRUNE_METHODS: Mapping[str, PruneMethod] = {
    "magnitude": PruneMethod(magnitude_prune, False, "keep the n largest |W| per group (data-free)"),
    "wanda": PruneMethod(wanda_prune, True, "keep the n largest |W|·‖X_j‖ per group"),
    "sparsegpt": PruneMethod(_sparsegpt_method, True, "OBS mask + weight update on the calibration Hessian"),
}

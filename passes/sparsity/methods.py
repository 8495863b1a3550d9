"""The N:M pruning methods of the mask-2to4 pass: magnitude, Wanda and SparseGPT, as a strategy table.

The pruners take weights as ``[out, in]`` and group along dim 1 (see :mod:`slmopt.sparsity` for the
conventions). Calibration statistics come as :class:`~slmopt.passes.sparsity.stats.InputStats` (the Gram
matrix ``XᵀX`` of a linear's inputs in float64, plus the row count), so no activations are ever held in
memory.

Example:
    >>> import torch
    >>> from slmopt.sparsity import nm_valid_fraction
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

import torch

from slmopt.passes.sparsity.stats import InputStats
from slmopt.sparsity import apply_mask, check_divisible, nm_mask, validate_nm

__all__ = [
    "PRUNE_METHODS",
    "PruneMethod",
    "Pruner",
    "magnitude_prune",
    "relative_output_error",
    "relative_weight_error",
    "sparsegpt_prune",
    "wanda_prune",
    "wanda_scores",
]

log = logging.getLogger(__name__)

# How many times SparseGPT multiplies the damping by 10 when the damped Hessian is still not positive
# definite (tiny calibration sets give rank-deficient Grams) before giving up.
_DAMP_RETRIES = 4


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
        >>> from slmopt.sparsity import nm_valid_fraction
        >>> gen = torch.Generator().manual_seed(0)
        >>> x, w = torch.randn(64, 8, generator=gen), torch.randn(3, 8, generator=gen)
        >>> pruned = sparsegpt_prune(w, 2 * x.T @ x / 64, 2, 4)
        >>> nm_valid_fraction(pruned, 2, 4, axis=1)
        1.0
    """
    validate_nm(n, m)
    w = weight.detach().to(torch.float32).clone()
    rows, cols = w.shape
    check_divisible(cols, m, "the weight's input dimension")
    check_divisible(blocksize, m, "blocksize")
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

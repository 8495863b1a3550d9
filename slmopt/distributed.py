"""Collectives for calibration statistics: no-ops in one process, ``torch.distributed`` under ``torchrun``.

Every calibration-driven statistic (Hessians, activation norms, importance scores) is a *sum over
calibration rows* plus a count. Passes accumulate their rank's share of the rows (:func:`shard_rows`)
and call :func:`all_reduce_sum` on the sums before using them, so every rank ends with the same numbers
and therefore the same decisions. In a single process every function here is the identity.

Example:
    >>> import torch
    >>> total = torch.zeros(3)
    >>> for batch in shard_rows(torch.ones(8, 3)).split(2):
    ...     total += batch.sum(0)
    >>> all_reduce_sum(total)
    tensor([8., 8., 8.])
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "barrier", "is_distributed", "is_main", "rank", "shard_rows", "world_size"]


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes artifacts and shows progress."""
    return rank() == 0


def shard_rows(rows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous block of ``rows`` (the whole tensor in one process).

    Contiguous blocks (not strides) keep each rank's batches in the same order as the single-process run.
    """
    if not is_distributed():
        return rows
    bounds = torch.linspace(0, len(rows), world_size() + 1).round().long().tolist()
    return rows[bounds[rank()] : bounds[rank() + 1]]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over all ranks, in place; returns it (unchanged in one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()

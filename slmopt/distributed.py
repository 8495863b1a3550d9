"""Collectives for calibration and distillation: no-ops in one process, ``torch.distributed`` under torchrun.

Every calibration-driven statistic (Hessians, activation norms, importance scores) is a *sum over
calibration rows* plus a count. Passes accumulate their rank's share of the rows (:func:`shard_rows`)
and call :func:`all_reduce_sum` on the sums before using them, so every rank ends with the same numbers
and therefore the same decisions. Data that is fitted rather than summed (FFF router/leaf inputs) is
concatenated with :func:`all_gather_rows`; training averages gradients with :func:`sum_gradients` (DDP
semantics) and takes wall-clock decisions on rank 0 only (:func:`rank0_decides`). In a single process
every function here is the identity, so the same code path serves both.

A failing collective (a peer died, or stopped answering for ``timeout`` seconds) raises
:class:`DistributedError` with one clear line instead of a backend traceback.

Example:
    >>> import torch
    >>> total = torch.zeros(3)
    >>> for batch in shard_rows(torch.ones(8, 3)).split(2):
    ...     total += batch.sum(0)
    >>> all_reduce_sum(total)
    tensor([8., 8., 8.])
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import re
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from slmopt.errors import DistributedError, UserError

__all__ = [
    "DEFAULT_TIMEOUT",
    "ENV_KILL_RANK",
    "ENV_TIMEOUT",
    "DistributedError",
    "all_gather_rows",
    "all_reduce_floats",
    "all_reduce_sum",
    "barrier",
    "env_rank",
    "env_world_size",
    "fault_point",
    "init",
    "is_distributed",
    "is_main",
    "join",
    "rank",
    "rank0_decides",
    "shard_bounds",
    "shard_rows",
    "shutdown",
    "sum_gradients",
    "world_size",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT = 1800.0  # seconds a collective waits for the slowest rank (big models: minutes per layer)
ENV_TIMEOUT = "SLMOPT_DIST_TIMEOUT"  # overrides the collective timeout (seconds); tests set it short
ENV_KILL_RANK = "SLMOPT_DEBUG_KILL_RANK"  # fault injection: that rank exits abruptly at a fault point
_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------------------------- state
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


def env_rank() -> int:
    """The rank the launcher (torchrun) assigned this process, from ``RANK`` (0 when not launched so)."""
    return int(os.environ.get("RANK", "0") or 0)


def env_world_size() -> int:
    """``WORLD_SIZE`` set by the launcher (1 when absent): > 1 means "run distributed"."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


# ----------------------------------------------------------------------------------------------- lifecycle
def init(backend: str | None = None, timeout: float | None = None) -> bool:
    """Joins the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ...).

    Args:
        backend: ``gloo`` or ``nccl``; default NCCL when CUDA is available, else gloo.
        timeout: seconds a collective may wait for the others (default ``$SLMOPT_DIST_TIMEOUT`` or
            :data:`DEFAULT_TIMEOUT`).

    Returns:
        True if this call created the group (the caller should :func:`shutdown` it), False if one existed.

    Raises:
        UserError: the launcher's environment is missing (not started by torchrun) or inconsistent.
        DistributedError: the other ranks never showed up within the timeout.

    Example:
        >>> # torchrun --nproc_per_node 2 -m slmopt.cli compile ... --distributed
        >>> # created = init(); ...; shutdown() if created else None
    """
    if dist.is_available() and dist.is_initialized():
        return False
    if not dist.is_available():
        raise UserError("--distributed needs a PyTorch build with torch.distributed")
    missing = [name for name in _REQUIRED_ENV if name not in os.environ]
    if missing:
        raise UserError(
            f"--distributed needs the environment torchrun sets (missing {', '.join(missing)}); launch with "
            "`torchrun --nproc_per_node N -m slmopt.cli compile ...` (see docs/DISTRIBUTED.md)"
        )
    raw = timeout if timeout is not None else os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(
            f"the distributed timeout (${ENV_TIMEOUT}) must be a number of seconds > 0, got {raw!r}"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":  # one GPU per local rank, as torchrun numbers them
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as err:
        raise DistributedError(
            f"rank {env_rank()} of {env_world_size()} could not join the process group "
            f"({backend} at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}): {_short(err)}"
        ) from err
    log.info("distributed: rank %d of %d (%s, timeout %.0fs)", rank(), world_size(), backend, seconds)
    return True


def shutdown() -> None:
    """Leaves the process group (safe to call when none exists)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def join(requested: bool | None = None) -> bool:
    """Joins torchrun's process group once per process if ``requested`` (None: when ``WORLD_SIZE > 1``).

    The group stays up for later compiles in the same process and is left at exit. Returns whether this
    process now runs distributed.
    """
    wanted = requested if requested is not None else env_world_size() > 1
    if wanted and init():
        atexit.register(shutdown)
    return is_distributed()


# ----------------------------------------------------------------------------------------------- collectives
def _short(err: BaseException) -> str:
    """The backend's message without its source location, first sentence only (gloo adds advice after)."""
    lines = str(err).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else ""
    text = text.split(". ")[0].strip()
    return (text[:157] + "...") if len(text) > 160 else text or type(err).__name__


def _collective(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Runs one collective; a dead or silent peer becomes a one-line :class:`DistributedError`."""
    try:
        return fn(*args, **kwargs)
    except DistributedError:
        raise
    except (RuntimeError, dist.DistError) as err:
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {what} failed because another rank died or stopped "
            f"responding ({_short(err)}); no output was written"
        ) from err


def shard_bounds(length: int, align: int = 1) -> tuple[int, int]:
    """``(start, stop)`` of this rank's contiguous block of ``length`` rows (``(0, length)`` in one process).

    ``align`` (the calibration batch size) puts block boundaries on batch boundaries, so every rank runs
    exactly the batches the single process would; only the order of the final cross-rank sum differs.

    Raises:
        UserError: fewer ``align``-row batches than ranks (a rank would get no rows).
    """
    if not is_distributed():
        return 0, length
    batches = -(-length // max(align, 1))
    if batches < world_size():
        raise UserError(
            f"{length} calibration rows make {batches} batch(es) of {align}, fewer than the {world_size()} "
            "ranks: raise --num-samples or use fewer processes"
        )
    bounds = [min(length, round(batches * r / world_size()) * align) for r in range(world_size() + 1)]
    bounds[-1] = length
    return bounds[rank()], bounds[rank() + 1]


def shard_rows(rows: torch.Tensor, align: int = 1) -> torch.Tensor:
    """This rank's contiguous block of ``rows`` (the whole tensor in one process); see :func:`shard_bounds`.

    Contiguous blocks (not strides) keep each rank's batches in the same order as the single-process run.

    Example:
        >>> shard_rows(torch.arange(10), align=4)  # one process: everything
        tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    fault_point("calibration")
    start, stop = shard_bounds(len(rows), align)
    return rows[start:stop]


def _comm_device() -> torch.device:
    """Where collective buffers must live: the rank's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
    """Sums ``tensor`` over all ranks, in place; returns it (unchanged in one process)."""
    if is_distributed():
        device = _comm_device()
        buffer = tensor if tensor.device == device else tensor.to(device)
        _collective(what, dist.all_reduce, buffer, op=dist.ReduceOp.SUM)
        if buffer is not tensor:
            tensor.copy_(buffer)
    return tensor


def all_reduce_floats(values: Iterable[float]) -> list[float]:
    """Sums a list of Python floats over ranks (float64, one collective)."""
    tensor = torch.tensor(list(values), dtype=torch.float64)
    return all_reduce_sum(tensor).tolist()


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's ``rows [n_r, ...]`` in rank order (``n_r`` may differ between ranks).

    Example:
        >>> all_gather_rows(torch.ones(2, 3)).shape  # one process: unchanged
        torch.Size([2, 3])
    """
    if not is_distributed():
        return rows
    counts = torch.zeros(world_size(), dtype=torch.long)
    counts[rank()] = rows.shape[0]
    all_reduce_sum(counts)
    longest = int(counts.max())
    # all_gather needs equal shapes: pad to the longest shard, then cut each back to its true length.
    padded = rows.new_zeros((longest, *rows.shape[1:]), device=_comm_device())
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    _collective("all_gather", dist.all_gather, parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, counts, strict=True)]).to(rows.device)


def rank0_decides(value: T) -> T:
    """Rank 0's ``value`` on every rank (picklable objects): for wall-clock decisions such as "stop now".

    A time budget checked on each rank separately would stop ranks at different steps and desynchronise
    their collectives; broadcasting rank 0's decision keeps them in lockstep.
    """
    if not is_distributed():
        return value
    box = [value]
    _collective("broadcast", dist.broadcast_object_list, box, src=0)
    return box[0]


def sum_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sums ``.grad`` over ranks in one flat collective (DDP semantics when each rank's loss is already
    divided by the *global* batch size): every rank then takes the same optimiser step.
    """
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier(what: str = "barrier") -> None:
    """Waits for every rank; a rank that died or failed makes this raise :class:`DistributedError`."""
    if is_distributed():
        # A one-element all-reduce rather than dist.barrier(): it needs no device hint under NCCL.
        all_reduce_sum(torch.zeros(1), what)


def fault_point(where: str) -> None:
    """Test hook: if ``$SLMOPT_DEBUG_KILL_RANK`` names this rank, exit abruptly (simulates a crashed node)."""
    target = os.environ.get(ENV_KILL_RANK)
    if target and is_distributed() and int(target) == rank():
        log.error("%s=%s: rank %d exits during %s", ENV_KILL_RANK, target, rank(), where)
        os._exit(1)

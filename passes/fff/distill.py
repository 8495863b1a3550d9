"""Layer-local distillation of an FFF leaf tree against its dense FFN (soft -> hard routing).

The tree is trained as an :class:`slmopt.passes.fff.layer.FFF` module (its ``set_hardness`` carries the routing
temperature) plus the always-on shared neurons, with Adam on minibatches of the collected FFN inputs.
The default objective (:data:`OBJECTIVES`) is the *expected* error under the routers' path distribution,
``Σ_e p_e(x)·‖y − f_e(x)‖²`` (the competitive mixture-of-experts loss), not the error of the mixed output
(``mixture``, the module's own soft forward): it asks every leaf to fit ``y`` on its own, which is what
hard routing at inference needs, and pushes the routers towards the leaf that does. Path probabilities
are products of ``σ(±z/τ)`` along the path; ``τ`` anneals geometrically from 1 to :data:`_TAU_END` over
the soft phase. The last :data:`_HARD_SHARE` of the steps is a straight-through hard phase: the loss
*value* (and the leaves' gradient) is the routed leaf's error only, while the routers keep the soft
gradient. The checkpoint best on a selection split (hard routing) is returned, so distillation never
makes that split's error worse, and training stops early once that split's error has stopped improving
(less than :data:`_MIN_GAIN` over :data:`_PATIENCE` checks). With ``precision="bfloat16"`` the leaves'
matmuls run under bf16 autocast (fp32 master weights, Adam and loss; routing logits stay fp32, so the
hard routing decisions are those of inference). Under ``torch.distributed`` training is data-parallel (each rank's share
of every minibatch, gradients summed, stop decisions from rank 0), so the ranks' trees stay identical.
(On tinylm, depth 3, block 3: 150 steps gave 0.0554 expected vs 0.0566
mixture.)

Example:
    >>> # tree, steps = distill_tree(tree, x, y, steps=300, seconds=30.0, lr=1e-3)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from slmopt import distributed
from slmopt.ops import ACTIVATIONS
from slmopt.passes.fff.convert import DenseFFN, FFFTree, relative_mse
from slmopt.passes.fff.layer import FFF

__all__ = ["OBJECTIVES", "PRECISIONS", "distill_tree"]

log = logging.getLogger(__name__)

_BATCH = 1024  # tokens per step
_TAU_END = 0.05  # final soft temperature (relative to the routers' own logit scale)
_HARD_SHARE = 0.3  # last share of the steps trained with straight-through hard routing
_EVAL_EVERY = 25  # steps between held-out checks (the best checkpoint is kept)
# Early stop: the best selection-split error improved by less than _MIN_GAIN (relative) over the last
# _PATIENCE checks. On the reference tinylm every layer still gains >= 1.0 % per 75 steps at step 300
# (docs/BENCHMARKS.md), so it never stops there; layers the closed-form fit already nails stop at 75 steps.
_PATIENCE = 3
_MIN_GAIN = 0.005
PRECISIONS = ("float32", "bfloat16")

_LEAF_FIELDS = ("node_w", "node_b", "leaf_w1", "leaf_b1", "leaf_wg", "leaf_bg", "leaf_w2", "leaf_b2")
_SHARED_FIELDS = ("w1", "b1", "wg", "bg", "w2")


def _path_log_probs(z: Tensor, depth: int, tau: float) -> Tensor:
    """``log p(leaf)`` ``[B, E]`` from all node logits ``z [B, N]`` (leaf order = path bits, MSB first)."""
    logp = z.new_zeros(z.shape[0], 1)
    for level in range(depth):
        first = (1 << level) - 1
        zl = z[:, first : first + (1 << level)] / tau  # nodes of this level, in order
        left, right = F.logsigmoid(-zl), F.logsigmoid(zl)
        logp = torch.stack([logp + left, logp + right], dim=2).reshape(z.shape[0], -1)
    return logp


def _greedy_leaf(z: Tensor, depth: int) -> Tensor:
    """The leaf hard routing reaches (``z > 0`` goes right), from all node logits ``z [B, N]``."""
    n = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    for _ in range(depth):
        n = 2 * n + 1 + (z.gather(1, n[:, None]).squeeze(1) > 0).long()
    return n - z.shape[1]


def _all_leaf_outputs(p: dict[str, Tensor | None], x: Tensor, activation: str) -> Tensor:
    """Every leaf's output ``[B, E, h]`` for every token (training only: dense cost)."""
    act = ACTIVATIONS[activation]
    up = torch.einsum("bh,elh->bel", x, p["leaf_w1"])
    if p["leaf_b1"] is not None:
        up = up + p["leaf_b1"]
    if p["leaf_wg"] is not None:
        gate = torch.einsum("bh,elh->bel", x, p["leaf_wg"])
        hidden = act(gate + p["leaf_bg"] if p["leaf_bg"] is not None else gate) * up
    else:
        hidden = act(up)
    return torch.einsum("bel,elh->beh", hidden, p["leaf_w2"]) + p["leaf_b2"]


class _Shared(nn.Module):
    """The always-on dense neurons as trainable parameters (w2 neuron-major, no bias)."""

    def __init__(self, dense: DenseFFN) -> None:
        super().__init__()
        self.activation = dense.activation
        for name in _SHARED_FIELDS:
            t = getattr(dense, name)
            self.register_parameter(name, None if t is None else nn.Parameter(t.detach().clone()))

    def forward(self, x: Tensor) -> Tensor:
        return self.dense()(x)

    def dense(self) -> DenseFFN:
        return DenseFFN(activation=self.activation, **{k: getattr(self, k) for k in _SHARED_FIELDS})


def _expected_error(layer: FFF, x: Tensor, target: Tensor, hard: bool) -> Tensor:
    """``Σ_e p_e ‖target − leaf_e(x)‖²`` per token (straight-through hard routing when ``hard``)."""
    params = {k: getattr(layer, k) for k in _LEAF_FIELDS}
    out = _all_leaf_outputs(params, x, layer.activation).float()  # fp32 error even under bf16 autocast
    err = ((target[:, None, :] - out) ** 2).sum(-1)
    with torch.autocast("cpu", enabled=False):  # routing decisions exactly as at inference
        z = F.linear(x, layer.node_w, layer.node_b)
    probs = _path_log_probs(z, layer.levels, max(layer.temperature, 1e-6)).exp()
    if hard:
        # The value and the leaves' gradient come from the routed leaf only; routers keep the soft one.
        onehot = F.one_hot(_greedy_leaf(z.detach(), layer.levels), probs.shape[1]).to(probs.dtype)
        probs = onehot + probs - probs.detach()
        err = onehot * err + (1 - onehot) * err.detach()
    return (probs * err).sum(1)


def _mixture_error(layer: FFF, x: Tensor, target: Tensor, hard: bool) -> Tensor:
    """``‖target − Σ_e p_e leaf_e(x)‖²`` per token: the module's own soft forward."""
    del hard  # the module's temperature (0 in the hard phase) already makes it hard
    return ((target - layer.soft_forward(x)) ** 2).sum(-1)


# objective name -> per-token loss of (layer, x, target, hard phase).
OBJECTIVES: dict[str, Callable[[FFF, Tensor, Tensor, bool], Tensor]] = {
    "expected": _expected_error,
    "mixture": _mixture_error,
}


def _tree_from(tree: FFFTree, layer: FFF, shared: _Shared | None) -> FFFTree:
    leaves = {
        k: (None if getattr(layer, k) is None else getattr(layer, k).detach().clone()) for k in _LEAF_FIELDS
    }
    dense = shared.dense() if shared is not None else None
    if dense is not None:
        dense = replace(
            dense,
            **{
                k: (None if getattr(dense, k) is None else getattr(dense, k).detach().clone())
                for k in _SHARED_FIELDS
            },
        )
    return replace(tree, shared=dense, **leaves)


def _stalled(best: list[float]) -> bool:
    """True when the best error gained less than :data:`_MIN_GAIN` (relative) over :data:`_PATIENCE` checks."""
    if len(best) <= _PATIENCE or not math.isfinite(best[-1 - _PATIENCE]):
        return False
    return best[-1] >= (1.0 - _MIN_GAIN) * best[-1 - _PATIENCE]


def distill_tree(
    tree: FFFTree,
    x: Tensor,
    y: Tensor,
    steps: int,
    seconds: float,
    lr: float,
    x_val: Tensor | None = None,
    y_val: Tensor | None = None,
    seed: int = 0,
    progress: bool = False,
    desc: str = "fff distill",
    objective: str = "expected",
    precision: str = "float32",
) -> tuple[FFFTree, int]:
    """Trains ``tree`` (routers, leaves, shared neurons) as an :class:`~slmopt.passes.fff.layer.FFF` to reproduce ``y``.

    Args:
        tree: initial tree (partitioned, routers fitted).
        x: ``[T, h]`` FFN inputs; ``y``: ``[T, h]`` dense FFN outputs.
        steps: maximum Adam steps (0: return ``tree`` unchanged).
        seconds: wall-clock budget; training stops at whichever limit comes first.
        lr: peak Adam learning rate (cosine decay to 10 %).
        x_val, y_val: split to pick the best checkpoint on (hard routing); None: keep the last.
        seed: minibatch sampling seed.
        progress: show a tqdm bar.
        desc: bar label.
        objective: a key of :data:`OBJECTIVES`.
        precision: a :data:`PRECISIONS` name: the dtype of the leaves' matmuls (autocast).

    Returns:
        ``(tree, steps_run)``.
    """
    # Wall-clock decisions come from rank 0 only: ranks that stopped at different steps would deadlock.
    if steps <= 0 or distributed.rank0_decides(seconds <= 0):
        return tree, 0
    loss_fn = OBJECTIVES[objective]
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    gen = torch.Generator().manual_seed(seed)
    layer = FFF.from_tensors(
        tree.node_w,
        tree.node_b,
        None,
        *(getattr(tree, k) for k in _LEAF_FIELDS[2:]),
        activation=tree.activation,
    ).train()
    layer.max_temperature = 1.0
    shared = _Shared(tree.shared) if tree.shared is not None else None
    params = list(layer.parameters()) + (list(shared.parameters()) if shared is not None else [])
    opt = torch.optim.Adam(params, lr=lr)
    soft_steps = max(1, int(steps * (1 - _HARD_SHARE)))
    scale = (y**2).sum(1).mean().clamp_min(1e-12)  # loss in units of ‖y‖²: one lr for every layer
    best_tree, best_val = tree, relative_mse(tree(x_val), y_val) if x_val is not None else math.inf
    started, done, checks = time.perf_counter(), 0, [best_val]
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    with torch.enable_grad():
        for step in range(steps):
            if distributed.rank0_decides(time.perf_counter() - started > seconds):
                break
            for group in opt.param_groups:
                group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            hard = step >= soft_steps
            # Geometric soft->hard schedule of the routing temperature, then the hard phase.
            layer.set_hardness(
                1.0 if hard and objective == "mixture" else 1.0 - _TAU_END ** min(1.0, step / soft_steps)
            )
            idx = torch.randint(0, x.shape[0], (min(_BATCH, x.shape[0]),), generator=gen)
            # DDP semantics: every rank draws the same minibatch, takes its block of it, divides by the
            # *global* batch size and the gradients are summed, so all ranks take the same Adam step.
            mine = distributed.shard_rows(idx)
            xb, yb = x[mine], y[mine]
            if shared is not None:
                yb = yb - shared(xb)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                loss = loss_fn(layer, xb, yb, hard).sum() / (len(idx) * scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.sum_gradients(params)
            opt.step()
            done = step + 1
            bar.update(1)
            if x_val is not None and (done % _EVAL_EVERY == 0 or done == steps):
                with torch.no_grad():
                    cand = _tree_from(tree, layer, shared)
                    val = relative_mse(cand(x_val), y_val)
                if val < best_val:
                    best_tree, best_val = cand, val
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", val=f"{val:.4f}")
                log.debug("%s: step %d, selection-split error %.5f", desc, done, val)
                checks.append(best_val)
                if distributed.rank0_decides(_stalled(checks)):
                    break
    bar.close()
    if x_val is None:
        best_tree = _tree_from(tree, layer, shared)
    log.debug(
        "%s: %d steps in %.1fs, held-out rel. MSE %.4f", desc, done, time.perf_counter() - started, best_val
    )
    return best_tree, done

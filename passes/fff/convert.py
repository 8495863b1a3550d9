"""Conversion math of the ``fff`` pass: a trained dense FFN -> a fast-feedforward (FFF) leaf tree.

The pieces, each usable on its own:

- :class:`DenseFFN` holds one FFN in a canonical layout (``w1``/``wg`` ``[W, h]``, ``w2`` neuron-major
  ``[W, h]``), read out of a Program by :meth:`DenseFFN.from_program` (GPT-2 Conv1D ``[in, out]`` weights
  are transposed here, once).
- :func:`balanced_bisection` splits neurons into ``2^d`` balanced leaves by recursive halving along the
  top principal direction of per-neuron features; :data:`PARTITION_FEATURES` maps a partition name to the
  feature function (co-activation profiles or weight rows).
- :func:`leaf_neurons` turns the groups into equal-width leaves.
- :class:`FFFTree` holds a tree in the ``slmopt::fff`` op's layout and runs it with hard routing.

Routers, leaf refits and neuron re-selection are in :mod:`slmopt.passes.fff.fit`, distillation in
:mod:`slmopt.passes.fff.distill`.

Example:
    >>> import torch
    >>> dense = DenseFFN(w1=torch.randn(16, 8), w2=torch.randn(16, 8), activation="relu")
    >>> x = torch.randn(256, 8)
    >>> leaves = leaf_neurons(balanced_bisection(PARTITION_FEATURES["weights"](dense, x), 2), 4)
    >>> tree = FFFTree.from_dense(dense, leaves)  # routers still zero: every token goes left
    >>> tree(x).shape
    torch.Size([256, 8])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from slmopt.ops import ACTIVATIONS

if TYPE_CHECKING:
    from slmopt.analysis.structure import FFNInfo, LinearInfo
    from slmopt.program import Program

__all__ = [
    "PARTITION_FEATURES",
    "DenseFFN",
    "FFFTree",
    "balanced_bisection",
    "default_depth",
    "leaf_neurons",
    "neuron_importance",
    "relative_mse",
]

log = logging.getLogger(__name__)


@dataclass
class DenseFFN:
    """One FFN ``y = act(x wgᵀ + bg) ⊙ (x w1ᵀ + b1) · w2 + b2`` (gated) or ``act(x w1ᵀ + b1) · w2 + b2``.

    Attributes:
        w1: ``[W, h]`` up projection (rows are neurons).
        w2: ``[W, h]`` down projection, neuron-major (``down.weight.T`` for ``nn.Linear``).
        activation: ``gelu``, ``gelu_tanh``, ``silu`` or ``relu``.
        b1: ``[W]`` or None.
        wg: ``[W, h]`` gate projection (gated FFNs) or None.
        bg: ``[W]`` or None.
        b2: ``[h]`` or None.
    """

    w1: Tensor
    w2: Tensor
    activation: str
    b1: Tensor | None = None
    wg: Tensor | None = None
    bg: Tensor | None = None
    b2: Tensor | None = None

    @property
    def width(self) -> int:
        return int(self.w1.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.w1.shape[1])

    @property
    def gated(self) -> bool:
        return self.wg is not None

    def activations(self, x: Tensor) -> Tensor:
        """Per-neuron activations ``[T, W]`` (what multiplies ``w2``)."""
        act = ACTIVATIONS[self.activation]
        up = F.linear(x, self.w1, self.b1)
        return act(F.linear(x, self.wg, self.bg)) * up if self.wg is not None else act(up)

    def __call__(self, x: Tensor) -> Tensor:
        y = self.activations(x) @ self.w2
        return y + self.b2 if self.b2 is not None else y

    def select(self, idx: Tensor, keep_b2: bool = True) -> DenseFFN:
        """The FFN restricted to neurons ``idx`` (``b2`` kept once unless ``keep_b2=False``)."""

        def rows(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx].clone()

        return DenseFFN(
            w1=self.w1[idx].clone(),
            w2=self.w2[idx].clone(),
            activation=self.activation,
            b1=rows(self.b1),
            wg=rows(self.wg),
            bg=rows(self.bg),
            b2=self.b2.clone() if keep_b2 and self.b2 is not None else None,
        )

    @staticmethod
    def from_program(program: Program, info: FFNInfo) -> DenseFFN:
        """Reads an analysed FFN's weights out of ``program`` into the canonical layout.

        Example:
            >>> # dense = DenseFFN.from_program(program, analyze(program).blocks[0].ffn)
        """

        def matrix(lin: LinearInfo, out_major: bool) -> Tensor:
            w = program.param(lin.weight).detach().float()
            w = w if lin.transposed else w.T  # [in, out]
            if lin.rows is not None:  # gate or up half of a fused gate_up projection
                w = w[:, lin.rows[0] : lin.rows[1]]
            return w.T.contiguous() if out_major else w.contiguous()

        def bias(lin: LinearInfo | None) -> Tensor | None:
            if lin is None or lin.bias is None:
                return None
            b = program.param(lin.bias).detach().float()
            return (b if lin.rows is None else b[lin.rows[0] : lin.rows[1]]).clone()

        gate = info.gate
        return DenseFFN(
            w1=matrix(info.up, out_major=True),
            b1=bias(info.up),
            wg=matrix(gate, out_major=True) if gate is not None else None,
            bg=bias(gate),
            w2=matrix(info.down, out_major=False),  # [W, h] = [in, out] of the down projection
            b2=bias(info.down),
            activation=info.activation,
        )


@dataclass
class FFFTree:
    """An FFF leaf tree in the ``slmopt::fff`` op's layout, plus an optional always-on dense part.

    Attributes:
        node_w: ``[N, h]`` routing weights, ``N = 2^depth - 1`` (go right iff ``z > 0``).
        node_b: ``[N]`` routing biases.
        leaf_w1 / leaf_b1 / leaf_wg / leaf_bg: ``[E, l, h]`` / ``[E, l]`` leaf up/gate projections.
        leaf_w2: ``[E, l, h]`` leaf down projections, neuron-major.
        leaf_b2: ``[E, h]`` per-leaf output bias.
        activation: leaf activation.
        shared: always-on neurons (no ``b2``), added to every token's output, or None.
        neurons: ``[E, l]`` which dense neurons each leaf was built from (bookkeeping).
    """

    node_w: Tensor
    node_b: Tensor
    leaf_w1: Tensor
    leaf_w2: Tensor
    leaf_b2: Tensor
    activation: str
    leaf_b1: Tensor | None = None
    leaf_wg: Tensor | None = None
    leaf_bg: Tensor | None = None
    shared: DenseFFN | None = None
    neurons: Tensor | None = None

    @property
    def depth(self) -> int:
        return int(self.node_w.shape[0] + 1).bit_length() - 1

    @property
    def leaves(self) -> int:
        return int(self.leaf_w1.shape[0])

    @property
    def leaf_width(self) -> int:
        return int(self.leaf_w1.shape[1])

    @staticmethod
    def from_dense(dense: DenseFFN, neurons: Tensor, shared: Tensor | None = None) -> FFFTree:
        """Slices ``dense`` into leaves ``neurons [E, l]`` (routers zero; fit them next).

        ``b2`` is copied onto every leaf, so each leaf is the dense FFN restricted to its neurons.
        """
        e, h = neurons.shape[0], dense.hidden_size

        def stack(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[neurons].clone()

        b2 = dense.b2 if dense.b2 is not None else dense.w1.new_zeros(h)
        return FFFTree(
            node_w=dense.w1.new_zeros(e - 1, h),
            node_b=dense.w1.new_zeros(e - 1),
            leaf_w1=dense.w1[neurons].clone(),
            leaf_b1=stack(dense.b1),
            leaf_wg=stack(dense.wg),
            leaf_bg=stack(dense.bg),
            leaf_w2=dense.w2[neurons].clone(),
            leaf_b2=b2.expand(e, h).clone(),
            activation=dense.activation,
            shared=dense.select(shared, keep_b2=False) if shared is not None and shared.numel() else None,
            neurons=neurons.clone(),
        )

    def route(self, x: Tensor) -> Tensor:
        """Hard routing: the leaf index ``[T]`` every token reaches."""
        n = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for _ in range(self.depth):
            z = (x * self.node_w[n]).sum(-1) + self.node_b[n]
            n = 2 * n + 1 + (z > 0).long()
        return n - self.node_w.shape[0]

    def leaf_activations(self, x: Tensor, leaf: int) -> Tensor:
        """Activations ``[T, l]`` of leaf ``leaf``'s neurons for every token in ``x``."""
        act = ACTIVATIONS[self.activation]
        b1 = self.leaf_b1[leaf] if self.leaf_b1 is not None else None
        up = F.linear(x, self.leaf_w1[leaf], b1)
        if self.leaf_wg is None:
            return act(up)
        bg = self.leaf_bg[leaf] if self.leaf_bg is not None else None
        return act(F.linear(x, self.leaf_wg[leaf], bg)) * up

    def leaf_output(self, x: Tensor, leaf: int) -> Tensor:
        """Leaf ``leaf``'s output (without the shared part) for every token in ``x``."""
        return self.leaf_activations(x, leaf) @ self.leaf_w2[leaf] + self.leaf_b2[leaf]

    def shared_output(self, x: Tensor) -> Tensor:
        return self.shared(x) if self.shared is not None else x.new_zeros(x.shape)

    def __call__(self, x: Tensor, leaves: Tensor | None = None) -> Tensor:
        """Hard-routed output ``[T, h]`` (optionally with a given leaf choice per token)."""
        leaves = self.route(x) if leaves is None else leaves
        y = self.shared_output(x)
        for e in range(self.leaves):
            idx = (leaves == e).nonzero().squeeze(1)
            if idx.numel():
                y[idx] += self.leaf_output(x[idx], e)
        return y

    def num_params(self) -> int:
        tensors = [self.node_w, self.node_b, self.leaf_w1, self.leaf_w2, self.leaf_b2]
        tensors += [t for t in (self.leaf_b1, self.leaf_wg, self.leaf_bg) if t is not None]
        if self.shared is not None:
            s = self.shared
            tensors += [t for t in (s.w1, s.w2, s.b1, s.wg, s.bg) if t is not None]
        return sum(t.numel() for t in tensors)


# --------------------------------------------------------------------------------------------------
# Partition: which neurons go into which leaf.


def neuron_importance(dense: DenseFFN, a: Tensor) -> Tensor:
    """Mean output contribution ``E_t |a_tj| · ‖w2_j‖`` of every neuron ``[W]``."""
    return a.abs().mean(0) * dense.w2.norm(dim=1)


def _coactivation_features(dense: DenseFFN, a: Tensor) -> Tensor:
    # A neuron's |contribution| profile over tokens, normalised: neurons that fire on the same tokens
    # (and so are needed together) end up close, whatever their magnitude.
    prof = (a.abs() * dense.w2.norm(dim=1)).T
    return prof / prof.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _weight_features(dense: DenseFFN, a: Tensor) -> Tensor:
    parts = [dense.w1] + ([dense.wg] if dense.wg is not None else [])
    rows = torch.cat([p / p.norm(dim=1, keepdim=True).clamp_min(1e-12) for p in parts], dim=1)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


# partition name -> per-neuron features [W, F] from (dense FFN, activations [T, W]).
PARTITION_FEATURES: dict[str, Callable[[DenseFFN, Tensor], Tensor]] = {
    "coactivation": _coactivation_features,
    "weights": _weight_features,
}


def _top_direction_scores(f: Tensor) -> Tensor:
    """Projection of each (centred) row of ``f`` on the top principal direction (exact: Gram + eigh).

    A seeded subspace iteration was ~14x faster at 1536 x 8192, but moved tinylm's depth-3 conversion
    from +9.60 % to +10.12 % bits/byte (docs/BENCHMARKS.md, issue 14); exact until a faster one is as good.
    """
    f = f - f.mean(0, keepdim=True)
    gram = (f @ f.T).double()  # [k, k]: cheaper than an SVD of [k, F] when F = tokens
    _, vecs = torch.linalg.eigh(gram)
    return vecs[:, -1].float()


def _two_means_refine(f: Tensor, left: Tensor, iters: int = 8) -> Tensor:
    """Balanced 2-means from a PCA split: keeps halves equal, moves rows to their nearer centroid."""
    k, half = f.shape[0], int(left.sum())
    for _ in range(iters):
        c_left, c_right = f[left].mean(0), f[~left].mean(0)
        # Prefer-left score: how much closer a row is to the left centroid; the top `half` go left.
        score = ((f - c_right) ** 2).sum(1) - ((f - c_left) ** 2).sum(1)
        new = torch.zeros(k, dtype=torch.bool)
        new[torch.argsort(score, descending=True, stable=True)[:half]] = True
        if torch.equal(new, left):
            break
        left = new
    return left


def balanced_bisection(features: Tensor, depth: int, refine: bool = True) -> list[Tensor]:
    """Splits rows of ``features`` into ``2^depth`` balanced groups by recursive halving.

    Each split sorts the rows by their projection on the top principal direction and cuts at the median
    (then optionally polishes it with a few balanced 2-means steps). Group sizes differ by at most one.

    Args:
        features: ``[n, F]`` one row per neuron.
        depth: number of halvings.
        refine: polish every split with balanced 2-means.

    Returns:
        ``2^depth`` index tensors in leaf order (leaf ``e``'s binary digits are its left/right path).

    Example:
        >>> groups = balanced_bisection(torch.randn(10, 3), 2)
        >>> sorted(len(g) for g in groups), sorted(torch.cat(groups).tolist()) == list(range(10))
        ([2, 2, 3, 3], True)
    """
    groups = [torch.arange(features.shape[0])]
    for _ in range(depth):
        nxt: list[Tensor] = []
        for idx in groups:
            if idx.numel() < 2:
                nxt += [idx, idx[:0]]
                continue
            f = features[idx]
            order = torch.argsort(_top_direction_scores(f), stable=True)
            left = torch.zeros(idx.numel(), dtype=torch.bool)
            left[order[: idx.numel() // 2]] = True
            if refine:
                left = _two_means_refine(f, left)
            nxt += [idx[left], idx[~left]]
        groups = nxt
    return groups


def leaf_neurons(groups: list[Tensor], width: int, importance: Tensor | None = None) -> Tensor:
    """Turns balanced groups into equal-width leaves ``[E, width]``.

    A group larger than ``width`` keeps its ``width`` most important neurons; a smaller one is widened
    with its neighbours in leaf order (the groups concatenated), which the bisection placed nearby, so
    ``width = n`` gives every leaf all neurons.

    Example:
        >>> leaf_neurons([torch.tensor([0, 1]), torch.tensor([2, 3])], 2).tolist()
        [[0, 1], [2, 3]]
    """
    order = torch.cat(groups)
    n, out, start = order.numel(), [], 0
    if width > n:
        raise ValueError(f"leaf width {width} exceeds the {n} neurons available")
    for g in groups:
        k = g.numel()
        if k >= width:
            keep = g if importance is None else g[torch.argsort(importance[g], descending=True, stable=True)]
            out.append(keep[:width].sort().values)
        else:
            lo = min(max(start - (width - k) // 2, 0), n - width)
            out.append(order[lo : lo + width].sort().values)
        start += k
    return torch.stack(out)


def relative_mse(pred: Tensor, target: Tensor) -> float:
    """``‖pred − target‖² / ‖target‖²`` (0 is exact)."""
    return float(((pred - target) ** 2).sum() / (target**2).sum().clamp_min(1e-30))


def default_depth(width: int, shared: int, target_fraction: float = 1 / 8) -> int:
    """Smallest depth whose active neurons ``(⌈(W−s)/2^d⌉ + s) / W`` are at most ``target_fraction``."""
    for d in range(1, 13):
        if (math.ceil((width - shared) / 2**d) + shared) / width <= target_fraction:
            return d
    raise ValueError(
        f"no depth <= 12 keeps the active neurons at {target_fraction:.3g} of {width} with {shared} shared"
    )

"""``FFF``: a fast-feedforward layer (tree of routing neurons, optional leaf FFNs) backed by ``slmopt::fff``.

Both published designs are one module:

* FFF (2023), ``FFF(h, depth=d, leaf_width=l)``: ``2^d - 1`` routing neurons pick one of ``2^d`` leaf
  FFNs of width ``l`` (plain ``act(x W1ᵀ) W2`` or, with ``gated=True``, SwiGLU/GeGLU leaves);
* UltraFastBERT, ``FFF(h, depth=11, node_out=True)``: every node is a neuron with an output row and all
  ``depth + 1`` nodes on the path contribute ``act(z)·node_out[n]``.

``depth`` is the depth of the binary tree: with leaf FFNs the leaves are its bottom level (``depth``
routing levels); without them the bottom level is neurons too (``depth + 1`` levels,
``2^(depth+1) - 1`` neurons). Parameters use the op's layout (``leaf_w2`` is ``[E, l, h]``: each leaf's
down projection transposed).

Training uses soft routing: node ``n`` goes right with probability ``sigmoid(z_n / temperature)``, a leaf's
weight is the product of the branch probabilities on its path, and every leaf (and node) is computed
densely. ``set_hardness`` moves the temperature to 0, where the soft forward equals hard routing. In eval
mode (or with ``hard=True``) the forward calls the compiled ``slmopt::fff`` op.

Example:
    >>> import torch
    >>> layer = FFF(16, depth=2, leaf_width=4)
    >>> layer(torch.randn(3, 16)).shape
    torch.Size([3, 16])
    >>> layer.set_hardness(1.0)
    >>> layer.eval()(torch.randn(3, 16)).shape  # doctest: +SKIP  (builds the C++ kernel once)
    torch.Size([3, 16])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmopt import ops

__all__ = ["FFF", "OP_PARAMETERS"]

# Parameter names, in the op's argument order after x.
OP_PARAMETERS: tuple[str, ...] = ops.TENSOR_ARGS[1:]


class FFF(nn.Module):
    """Fast-feedforward layer; see the module docstring for the two designs and the routing.

    Args:
        hidden: Model width h (input and output size).
        depth: Tree depth (routing levels with leaves; neuron levels minus one without).
        leaf_width: Width l of each leaf FFN; 0 for the UltraFastBERT form (needs ``node_out``).
        gated: Gated leaves ``act(x Wgᵀ) ⊙ (x W1ᵀ)`` (SwiGLU with ``"silu"``, GeGLU with ``"gelu"``).
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"silu"`` or ``"relu"``.
        node_out: Nodes have output rows (UltraFastBERT); may be combined with leaves.
        leaf_bias: Biases on the leaf up/gate projections.
        out_bias: Bias on each leaf's down projection.

    Attributes:
        temperature: Soft-routing temperature used in training; 0 means hard routing.
        max_temperature: Temperature at hardness 0 (``set_hardness`` interpolates linearly to 0).
        hard: Use the hard op even in training mode (no gradients flow through it).

    Example:
        >>> ufb = FFF(32, depth=3, node_out=True)   # 15 GELU neurons, 4 used per token
        >>> ufb.node_w.shape, ufb.levels
        (torch.Size([15, 32]), 4)
    """

    def __init__(
        self,
        hidden: int,
        depth: int,
        leaf_width: int = 0,
        *,
        gated: bool = False,
        activation: str = "gelu",
        node_out: bool = False,
        leaf_bias: bool = True,
        out_bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ops.ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; valid choices: {', '.join(ops.ACTIVATIONS)}"
            )
        if hidden < 1 or leaf_width < 0:
            raise ValueError(f"hidden must be >= 1 and leaf_width >= 0, got {hidden} and {leaf_width}")
        if leaf_width == 0 and not node_out:
            raise ValueError("FFF needs leaves (leaf_width > 0) and/or node outputs (node_out=True)")
        if gated and leaf_width == 0:
            raise ValueError("gated=True needs leaves (leaf_width > 0)")
        levels = depth if leaf_width > 0 else depth + 1
        if levels < 1 or levels > 24:
            raise ValueError(f"depth {depth} gives {levels} levels; need 1..24")
        self.hidden, self.depth, self.leaf_width = hidden, depth, leaf_width
        self.gated, self.activation, self.levels = gated, activation, levels
        self.temperature = 1.0
        self.max_temperature = 1.0
        self.hard = False
        n_nodes, n_leaves = 2**levels - 1, 2**levels

        def param(*shape: int, fan_in: int, enabled: bool = True) -> nn.Parameter | None:
            # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            if not enabled:
                return None
            bound = 1 / math.sqrt(fan_in)
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))

        has_leaves = leaf_width > 0
        params = {
            "node_w": param(n_nodes, hidden, fan_in=hidden),
            "node_b": nn.Parameter(torch.zeros(n_nodes)),
            "node_out": param(n_nodes, hidden, fan_in=levels, enabled=node_out),
            "leaf_w1": param(n_leaves, leaf_width, hidden, fan_in=hidden, enabled=has_leaves),
            "leaf_b1": param(n_leaves, leaf_width, fan_in=hidden, enabled=has_leaves and leaf_bias),
            "leaf_wg": param(n_leaves, leaf_width, hidden, fan_in=hidden, enabled=gated),
            "leaf_bg": param(n_leaves, leaf_width, fan_in=hidden, enabled=gated and leaf_bias),
            "leaf_w2": param(n_leaves, leaf_width, hidden, fan_in=max(leaf_width, 1), enabled=has_leaves),
            "leaf_b2": param(n_leaves, hidden, fan_in=max(leaf_width, 1), enabled=has_leaves and out_bias),
        }
        # register_parameter(name, None) keeps absent tensors as None attributes that stay assignable.
        for name, value in params.items():
            self.register_parameter(name, value)

    @classmethod
    def from_tensors(
        cls,
        node_w: Tensor,
        node_b: Tensor,
        node_out: Tensor | None = None,
        leaf_w1: Tensor | None = None,
        leaf_b1: Tensor | None = None,
        leaf_wg: Tensor | None = None,
        leaf_bg: Tensor | None = None,
        leaf_w2: Tensor | None = None,
        leaf_b2: Tensor | None = None,
        activation: str = "gelu",
    ) -> FFF:
        """Builds an FFF holding copies of tensors in the op's layout (see :func:`slmopt.ops.fff`).

        For leaves converted from ``nn.Linear`` layers pass ``leaf_w2[e] = down.weight.T``.

        Example:
            >>> w, b = torch.randn(3, 8), torch.zeros(3)
            >>> FFF.from_tensors(w, b, leaf_w1=torch.randn(4, 2, 8), leaf_w2=torch.randn(4, 2, 8)).depth
            2
        """
        given = dict(
            zip(
                OP_PARAMETERS,
                (node_w, node_b, node_out, leaf_w1, leaf_b1, leaf_wg, leaf_bg, leaf_w2, leaf_b2),
                strict=True,
            )
        )
        probe = node_w.new_empty(0, node_w.shape[-1])
        levels = ops._check_args(probe, *given.values(), activation)
        width = 0 if leaf_w1 is None else leaf_w1.shape[1]
        module = cls(
            node_w.shape[1],
            levels if width else levels - 1,
            width,
            gated=leaf_wg is not None,
            activation=activation,
            node_out=node_out is not None,
        )
        for name, tensor in given.items():
            if tensor is None:
                module.register_parameter(name, None)
            else:
                setattr(module, name, nn.Parameter(tensor.detach().clone()))
        return module.to(node_w.device)

    @property
    def hardness(self) -> float:
        """0 = soft routing at ``max_temperature``, 1 = hard routing."""
        return 1.0 - self.temperature / self.max_temperature

    def set_hardness(self, hardness: float) -> None:
        """Sets the soft-routing temperature to ``max_temperature * (1 - hardness)``.

        Args:
            hardness: In [0, 1]; a hardening schedule raises it to 1 during training.

        Example:
            >>> layer = FFF(8, depth=1, leaf_width=2)
            >>> layer.set_hardness(0.75); layer.temperature
            0.25
        """
        if not 0.0 <= hardness <= 1.0:
            raise ValueError(f"hardness must be in [0, 1], got {hardness}")
        self.temperature = self.max_temperature * (1.0 - hardness)

    def op_args(self) -> tuple[Tensor | None, ...]:
        """The parameters in ``slmopt::fff`` argument order (after x, before activation)."""
        return tuple(getattr(self, name) for name in OP_PARAMETERS)

    def forward(self, x: Tensor) -> Tensor:
        """Soft (training) or hard (eval / ``hard=True``) forward of ``x [..., hidden]``."""
        if not self.training or self.hard:
            return torch.ops.slmopt.fff.default(x, *self.op_args(), self.activation)
        return self.soft_forward(x)

    def soft_forward(self, x: Tensor) -> Tensor:
        """Mixture over all leaves/nodes weighted by path probabilities (dense; differentiable)."""
        act = ops.ACTIVATIONS[self.activation]
        xt = x.reshape(-1, self.hidden)
        z = F.linear(xt, self.node_w, self.node_b)  # [T, N]
        if self.temperature > 0:
            right = torch.sigmoid(z / self.temperature)
        else:
            right = (z > 0).to(z.dtype)  # hard limit, still differentiable w.r.t. the leaf weights
        # Reach probability level by level; node i of a level has children 2i, 2i+1 of the next one.
        reach = [xt.new_ones(xt.shape[0], 1)]
        for k in range(self.levels):
            p = right[:, 2**k - 1 : 2 ** (k + 1) - 1]
            reach.append(torch.stack((reach[-1] * (1 - p), reach[-1] * p), dim=-1).flatten(1))
        y = xt.new_zeros(xt.shape)
        if self.node_out is not None:
            y = y + (torch.cat(reach[:-1], dim=1) * act(z)) @ self.node_out
        if self.leaf_w1 is not None:
            leaf_p = reach[-1]  # [T, E]
            up = torch.einsum("th,elh->tel", xt, self.leaf_w1)
            if self.leaf_b1 is not None:
                up = up + self.leaf_b1
            if self.leaf_wg is not None:
                gate = torch.einsum("th,elh->tel", xt, self.leaf_wg)
                hidden = act(gate + self.leaf_bg if self.leaf_bg is not None else gate) * up
            else:
                hidden = act(up)
            y = y + torch.einsum("tel,elh->th", hidden * leaf_p[..., None], self.leaf_w2)
            if self.leaf_b2 is not None:
                y = y + leaf_p @ self.leaf_b2
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        form = f"leaves={2**self.levels}x{self.leaf_width}" if self.leaf_width else "ultrafastbert"
        return (
            f"hidden={self.hidden}, depth={self.depth}, levels={self.levels}, {form}, gated={self.gated}, "
            f"node_out={self.node_out is not None}, activation={self.activation!r}, "
            f"temperature={self.temperature:g}"
        )

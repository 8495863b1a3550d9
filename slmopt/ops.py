"""Custom torch ops of slmopt: ``slmopt::fff`` (fast-feedforward trees, both FFF designs in one op).

``slmopt::fff(x, node_w, node_b, node_out?, leaf_w1?, leaf_b1?, leaf_wg?, leaf_bg?, leaf_w2?, leaf_b2?,
activation) -> Tensor`` walks a balanced binary tree of ``N = 2^L - 1`` routing neurons per token
(``z = node_w[n]·x + node_b[n]``, go right iff ``z > 0``), adds ``act(z)·node_out[n]`` for every node on
the path when ``node_out`` is given (UltraFastBERT), then runs the reached leaf's small FFN when leaf
weights are given (FFF "tree + leaves"). All leaf matrices are ``[E, l, h]`` (``leaf_w2`` is the down
projection transposed, so each neuron's output row is contiguous). See cuda/fff_common.h.

Kernels: a compiled C++ CPU kernel (cuda/fff_cpu.cpp) and a CUDA kernel (cuda/fff.cu), each built on
the op's first call on that device, cached on disk, and registered with the dispatcher (see
:func:`ensure_native`, :func:`load_cuda_kernel`). Everything else — a failed build (one warning), other
devices — runs :func:`fff_reference`, the pure-PyTorch reference. Importing this module
compiles nothing. The op has no autograd formula: train through :class:`slmopt.passes.fff.layer.FFF`'s soft path.

Example:
    >>> import torch
    >>> from slmopt.ops import fff
    >>> h, L = 8, 2
    >>> x = torch.randn(3, h)
    >>> node_w, node_b = torch.randn(2**L - 1, h), torch.zeros(2**L - 1)
    >>> node_out = torch.randn(2**L - 1, h)
    >>> fff(x, node_w, node_b, node_out=node_out).shape
    torch.Size([3, 8])
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "TENSOR_ARGS",
    "ensure_native",
    "fff",
    "fff_reference",
    "load_cuda_kernel",
    "native_available",
]

logger = logging.getLogger(__name__)

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}

# The op's tensor arguments in schema order: the one place their order is written down (the module,
# the ONNX lowerings and the TensorRT plugin all follow it).
TENSOR_ARGS: tuple[str, ...] = (
    "x", "node_w", "node_b", "node_out", "leaf_w1", "leaf_b1", "leaf_wg", "leaf_bg", "leaf_w2", "leaf_b2"
)  # fmt: skip
_REQUIRED = {"x", "node_w", "node_b"}
_SCHEMA = (
    "fff("
    + ", ".join(f"Tensor{'' if name in _REQUIRED else '?'} {name}" for name in TENSOR_ARGS)
    + ", str activation) -> Tensor"
)
_LIB = torch.library.Library("slmopt", "FRAGMENT")
_LIB.define(_SCHEMA)

_native_lock = threading.Lock()
_native_state: dict[str, object] = {"tried": False, "path": None}
_cuda_state: dict[str, object] = {"tried": False, "error": None}


def _check_args(
    x: Tensor,
    node_w: Tensor,
    node_b: Tensor,
    node_out: Tensor | None,
    leaf_w1: Tensor | None,
    leaf_b1: Tensor | None,
    leaf_wg: Tensor | None,
    leaf_bg: Tensor | None,
    leaf_w2: Tensor | None,
    leaf_b2: Tensor | None,
    activation: str,
) -> int:
    """Validates an fff call (same rules and messages as the C++ kernel); returns the level count L."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"fff: unknown activation {activation!r}; valid choices: {', '.join(ACTIVATIONS)}")
    if x.dim() < 1:
        raise ValueError("fff: x must have a hidden dimension, got a 0-d tensor")
    if node_w.dim() != 2:
        raise ValueError(f"fff: node_w must be [N, h], got shape {tuple(node_w.shape)}")
    h, n_nodes = x.shape[-1], node_w.shape[0]
    if node_w.shape[1] != h:
        raise ValueError(f"fff: node_w has hidden size {node_w.shape[1]} but x has {h}")
    if n_nodes < 1 or (n_nodes + 1) & n_nodes:
        raise ValueError(f"fff: N = {n_nodes} routing nodes is not 2^L - 1 (N + 1 must be a power of two)")
    levels = (n_nodes + 1).bit_length() - 1

    def shape(t: Tensor | None, expected: tuple[int, ...], name: str) -> None:
        if t is not None and tuple(t.shape) != expected:
            raise ValueError(f"fff: {name} must have shape {list(expected)}, got {list(t.shape)}")

    shape(node_b, (n_nodes,), "node_b")
    shape(node_out, (n_nodes, h), "node_out")
    if (leaf_w1 is None) != (leaf_w2 is None):
        raise ValueError("fff: leaf_w1 and leaf_w2 must be given together")
    if leaf_w1 is None and any(t is not None for t in (leaf_b1, leaf_wg, leaf_bg, leaf_b2)):
        raise ValueError("fff: leaf biases/gate given without leaf_w1/leaf_w2")
    if leaf_w1 is None and node_out is None:
        raise ValueError("fff: nothing to compute: give node_out and/or leaf_w1/leaf_w2")
    if leaf_bg is not None and leaf_wg is None:
        raise ValueError("fff: leaf_bg given without leaf_wg")
    for t in (node_w, node_b, node_out, leaf_w1, leaf_b1, leaf_wg, leaf_bg, leaf_w2, leaf_b2):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"fff: all tensors must have x's dtype {x.dtype}, got {t.dtype}")
    if leaf_w1 is None:
        return levels
    if leaf_w1.dim() != 3:
        raise ValueError(f"fff: leaf_w1 must be [E, l, h], got shape {list(leaf_w1.shape)}")
    n_leaves, width = leaf_w1.shape[0], leaf_w1.shape[1]
    if n_leaves != n_nodes + 1:
        raise ValueError(
            f"fff: leaf_w1 has E = {n_leaves} leaves but a tree with N = {n_nodes} nodes "
            f"(L = {levels} levels) has 2^L = {n_nodes + 1}"
        )
    if leaf_w1.shape[2] != h:
        raise ValueError(f"fff: leaf_w1 has hidden size {leaf_w1.shape[2]} but x has {h}")
    shape(leaf_w2, (n_leaves, width, h), "leaf_w2")
    shape(leaf_b1, (n_leaves, width), "leaf_b1")
    shape(leaf_wg, (n_leaves, width, h), "leaf_wg")
    shape(leaf_bg, (n_leaves, width), "leaf_bg")
    shape(leaf_b2, (n_leaves, h), "leaf_b2")
    return levels


def fff_reference(
    x: Tensor,
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
) -> Tensor:
    """Pure-PyTorch reference of ``slmopt::fff`` (any device; computed in fp32, returned in x's dtype).

    Routing is vectorised level by level over all tokens; leaves run one batched matmul per used leaf.

    Args:
        x: ``[..., h]`` input.
        node_w: ``[N, h]`` routing weights, ``N = 2^L - 1``.
        node_b: ``[N]`` routing biases.
        node_out: ``[N, h]`` node output rows (UltraFastBERT form) or None.
        leaf_w1: ``[E, l, h]`` leaf up projections (``E = 2^L``) or None.
        leaf_b1: ``[E, l]`` or None.
        leaf_wg: ``[E, l, h]`` leaf gate projections (gated leaves) or None.
        leaf_bg: ``[E, l]`` or None.
        leaf_w2: ``[E, l, h]`` leaf down projections, neuron-major (``down.weight.T`` per leaf) or None.
        leaf_b2: ``[E, h]`` or None.
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"silu"`` or ``"relu"``.

    Returns:
        Tensor shaped and typed like ``x``.

    Example:
        >>> x, w, b = torch.randn(4, 6), torch.randn(3, 6), torch.zeros(3)
        >>> fff_reference(x, w, b, node_out=torch.randn(3, 6)).shape
        torch.Size([4, 6])
    """
    levels = _check_args(
        x, node_w, node_b, node_out, leaf_w1, leaf_b1, leaf_wg, leaf_bg, leaf_w2, leaf_b2, activation
    )
    act = ACTIVATIONS[activation]

    def f32(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.float()

    h, n_nodes = x.shape[-1], node_w.shape[0]
    xt = x.reshape(-1, h).float()
    node_w, node_b, node_out = f32(node_w), f32(node_b), f32(node_out)
    y = xt.new_zeros(xt.shape)
    n = torch.zeros(xt.shape[0], dtype=torch.long, device=x.device)
    for _ in range(levels):
        z = torch.einsum("th,th->t", xt, node_w[n]) + node_b[n]
        if node_out is not None:
            y += act(z)[:, None] * node_out[n]
        n = 2 * n + 1 + (z > 0).long()
    if leaf_w1 is None or leaf_w2 is None:
        return y.reshape(x.shape).to(x.dtype)
    leaf = n - n_nodes
    order = torch.argsort(leaf, stable=True)
    counts = torch.bincount(leaf, minlength=n_nodes + 1).tolist()
    w1, b1, wg, bg, w2, b2 = (f32(t) for t in (leaf_w1, leaf_b1, leaf_wg, leaf_bg, leaf_w2, leaf_b2))
    for e, idx in enumerate(torch.split(order, counts)):
        if idx.numel() == 0:
            continue
        xe = xt[idx]
        up = xe @ w1[e].T + (b1[e] if b1 is not None else 0.0)
        if wg is not None:
            hidden = act(xe @ wg[e].T + (bg[e] if bg is not None else 0.0)) * up
        else:
            hidden = act(up)
        y.index_add_(0, idx, hidden @ w2[e] + (b2[e] if b2 is not None else 0.0))
    return y.reshape(x.shape).to(x.dtype)


@torch.library.register_fake("slmopt::fff", lib=_LIB)
def _fff_fake(
    x: Tensor,
    node_w: Tensor,
    node_b: Tensor,
    node_out: Tensor | None,
    leaf_w1: Tensor | None,
    leaf_b1: Tensor | None,
    leaf_wg: Tensor | None,
    leaf_bg: Tensor | None,
    leaf_w2: Tensor | None,
    leaf_b2: Tensor | None,
    activation: str,
) -> Tensor:
    _check_args(x, node_w, node_b, node_out, leaf_w1, leaf_b1, leaf_wg, leaf_bg, leaf_w2, leaf_b2, activation)
    return x.new_empty(x.shape)


def _fff_fallback(*args: object) -> Tensor:
    """Kernel for every backend without a compiled one (CompositeExplicitAutograd).

    The first call on a CPU or CUDA tensor builds and registers that device's compiled kernel; a kernel
    registered for CPU/CUDA takes precedence in the dispatcher, so from then on this function is no longer
    reached for those tensors. Where the build fails (logged once), the reference runs.
    """
    x = args[0]
    assert isinstance(x, Tensor)
    if _compiled_kernel_ready(x.device.type):
        return torch.ops.slmopt.fff.default(*args)
    return fff_reference(*args)  # type: ignore[arg-type]


def _compiled_kernel_ready(device_type: str) -> bool:
    """Whether a compiled kernel for ``device_type`` is registered (building it on first use)."""
    if device_type == "cpu":
        return ensure_native() and _has_kernel("CPU")
    if device_type == "cuda":
        return load_cuda_kernel() and _has_kernel("CUDA")
    return False


_LIB.impl("fff", _fff_fallback, "CompositeExplicitAutograd")


def _has_kernel(key: str) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key("slmopt::fff", key))


def native_available() -> bool:
    """Whether the compiled CPU kernel is loaded (does not build it; see :func:`ensure_native`).

    Example:
        >>> isinstance(native_available(), bool)
        True
    """
    return _native_state["path"] is not None


def ensure_native(verbose: bool = False) -> bool:
    """Builds (first time, cached on disk) and loads the C++ CPU kernel; returns whether it is loaded.

    A failed build logs one warning and leaves the op on :func:`fff_reference`; it is not retried in
    this process. Set ``SLMOPT_NO_NATIVE=1`` to skip the build entirely.

    Args:
        verbose: Show the compiler output.

    Example:
        >>> ensure_native()  # doctest: +SKIP
        True
    """
    if _native_state["tried"]:
        return native_available()
    with _native_lock:
        if _native_state["tried"]:
            return native_available()
        if os.environ.get("SLMOPT_NO_NATIVE", "") not in ("", "0"):
            logger.info("SLMOPT_NO_NATIVE set: slmopt::fff runs the PyTorch reference on CPU")
        else:
            try:
                from slmopt.native import build

                _native_state["path"] = build.load_cpu_extension(verbose=verbose)
            except Exception as exc:  # any build failure means: use the reference
                logger.warning("slmopt::fff: C++ kernel unavailable, using the PyTorch reference (%s)", exc)
        _native_state["tried"] = True
    return native_available()


def load_cuda_kernel(verbose: bool = False) -> bool:
    """Builds (cached on disk) and registers the CUDA kernel of ``slmopt::fff``; needs CUDA torch + nvcc.

    The op calls it on its first CUDA tensor (calling it earlier moves the ~30 s build out of the first
    forward). A failed build logs one warning, leaves CUDA tensors on :func:`fff_reference` and is not
    retried in this process; ``SLMOPT_NO_NATIVE=1`` skips the build. Returns whether a kernel is registered.

    Example:
        >>> load_cuda_kernel()  # doctest: +SKIP  (GPU machines)
        True
    """
    if _has_kernel("CUDA"):
        return True
    if _cuda_state["tried"]:
        return False
    with _native_lock:
        if not _cuda_state["tried"]:
            if os.environ.get("SLMOPT_NO_NATIVE", "") not in ("", "0"):
                _cuda_state["error"] = "SLMOPT_NO_NATIVE is set"
                logger.info("SLMOPT_NO_NATIVE set: slmopt::fff runs the PyTorch reference on CUDA")
            else:
                try:
                    from slmopt.native import build

                    build.load_cuda_extension(verbose=verbose)
                # A missing toolkit, CPU-only torch or a compile error: CUDA tensors use the reference.
                except Exception as exc:
                    _cuda_state["error"] = f"{type(exc).__name__}: {exc}"
                    logger.warning(
                        "slmopt::fff: CUDA kernel unavailable, CUDA tensors run the PyTorch reference (%s)",
                        _cuda_state["error"],
                    )
            _cuda_state["tried"] = True
    return _has_kernel("CUDA")


def _set_cpu_tuning(
    small_batch: int | None = None,
    leaf_tokens: int | None = None,
    gemm_rows: int | None = None,
    use_sgemm: int | None = None,
) -> dict[str, int]:
    """Sets the CPU kernel's path thresholds; returns the previous values of those given.

    The per-token path runs when ``T <= small_batch`` or ``T <= leaf_tokens * E``; in the batched path,
    leaf blocks of at least ``gemm_rows`` tokens use BLAS (``sgemm_``, or ``at::mm`` with
    ``use_sgemm=0``). Internal knobs for tests and tuning.
    """
    if not ensure_native():
        raise RuntimeError("the native fff kernel is not loaded")
    lib = ctypes.CDLL(str(_native_state["path"]))
    previous = {}
    knobs = {
        "small_batch": small_batch,
        "leaf_tokens": leaf_tokens,
        "gemm_rows": gemm_rows,
        "use_sgemm": use_sgemm,
    }
    for name, value in knobs.items():
        if value is None:
            continue
        setter = getattr(lib, f"slmopt_fff_cpu_set_{name}")
        setter.restype, setter.argtypes = ctypes.c_int64, [ctypes.c_int64]
        previous[name] = int(setter(value))
    return previous


def fff(
    x: Tensor,
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
) -> Tensor:
    """Calls ``torch.ops.slmopt.fff`` with keyword defaults (arguments as in :func:`fff_reference`).

    Example:
        >>> E, l, h = 4, 3, 8
        >>> y = fff(torch.randn(2, h), torch.randn(E - 1, h), torch.zeros(E - 1),
        ...         leaf_w1=torch.randn(E, l, h), leaf_w2=torch.randn(E, l, h), activation="relu")
        >>> y.shape
        torch.Size([2, 8])
    """
    return torch.ops.slmopt.fff.default(
        x, node_w, node_b, node_out, leaf_w1, leaf_b1, leaf_wg, leaf_bg, leaf_w2, leaf_b2, activation
    )

"""What the ``tensorrt`` backend needs, and one clear error line when it is missing.

The backend needs the TensorRT Python package *and* a CUDA GPU that PyTorch can see (engines exchange torch
CUDA tensors). :func:`check_available` runs before any work — the API calls it before loading the model and
:meth:`TensorRTBackend.lower` / ``load`` call it first thing — so a missing requirement costs nothing and
writes nothing.

Example:
    >>> problems = missing_requirements()   # [] on a machine with TensorRT and a GPU
    >>> isinstance(problems, list)
    True
"""

from __future__ import annotations

import importlib
import logging

from slmopt.errors import UserError

__all__ = [
    "INSTALL_HINT",
    "MIN_TENSORRT",
    "NoGPUError",
    "TensorRTMissingError",
    "check_available",
    "missing_requirements",
]

log = logging.getLogger(__name__)

# Quickly deployable plugins with an AOT implementation (tensorrt.plugin.aot_impl, KernelLaunchParams)
# became a stable feature in 10.9 (TensorRT samples/python/quickly_deployable_plugins/README.md).
MIN_TENSORRT = (10, 9)
INSTALL_HINT = (
    "install TensorRT with `pip install slmopt[tensorrt]` on a machine with an NVIDIA GPU, its driver "
    "and a CUDA build of PyTorch"
)


class TensorRTMissingError(ImportError):
    """The ``tensorrt`` Python package is not importable (an optional dependency: ``slmopt[tensorrt]``)."""


class NoGPUError(UserError):
    """TensorRT is installed but no CUDA GPU is visible to PyTorch."""


def _tensorrt_problem() -> str | None:
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as exc:  # a broken install raises more than ImportError (missing CUDA libraries)
        return f"the 'tensorrt' Python package is not importable ({type(exc).__name__}: {exc})"
    # PyPI also serves placeholder 'tensorrt' packages that import but contain no runtime.
    if not hasattr(trt, "Builder"):
        return "the installed 'tensorrt' package has no tensorrt.Builder (a placeholder, not the runtime)"
    version = str(getattr(trt, "__version__", "0"))
    if _version_tuple(version) < MIN_TENSORRT:
        want = ".".join(map(str, MIN_TENSORRT))
        return (
            f"TensorRT {version} is too old: the SlmoptFFF plugin's ahead-of-time kernel needs "
            f"tensorrt.plugin.aot_impl and KernelLaunchParams (TensorRT >= {want})"
        )
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    """(10, 9) for "10.9.0.34"; non-numeric parts end the tuple ("10.x" -> (10,))."""
    out = []
    for part in version.split(".")[:2]:
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def _gpu_problem() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    return "no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)"


def missing_requirements() -> list[str]:
    """What the tensorrt backend lacks on this machine (empty when it can run).

    Returns:
        One short phrase per missing requirement: the TensorRT package first, then the GPU.

    Example:
        >>> all(isinstance(p, str) for p in missing_requirements())
        True
    """
    return [p for p in (_tensorrt_problem(), _gpu_problem()) if p is not None]


def check_available() -> None:
    """Raises at once, with one line naming what is missing, unless the tensorrt backend can run here.

    Raises:
        TensorRTMissingError: (an ``ImportError``) the ``tensorrt`` package is missing or broken.
        NoGPUError: (a ``UserError``) TensorRT is there but no CUDA GPU is visible.

    Example:
        >>> try:
        ...     check_available()
        ... except (ImportError, ValueError) as err:
        ...     assert "pip install slmopt[tensorrt]" in str(err)
    """
    trt_problem, gpu_problem = _tensorrt_problem(), _gpu_problem()
    problems = [p for p in (trt_problem, gpu_problem) if p is not None]
    if not problems:
        return
    message = f"the tensorrt backend cannot run here: {'; '.join(problems)}; {INSTALL_HINT}"
    raise (TensorRTMissingError if trt_problem is not None else NoGPUError)(message)

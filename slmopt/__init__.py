"""slmopt: make trained language models small and fast to deploy.

Importing ``slmopt`` is light: it defines slmopt's custom torch ops (``torch.ops.slmopt.fff``, so a
compiled ``program.pt2`` loads with plain ``torch.export.load`` after ``import slmopt``) and nothing else;
ONNX, ONNX Runtime, transformers and the passes load on first use. Defining the op compiles nothing.

Example:
    >>> import slmopt, torch
    >>> hasattr(torch.ops.slmopt, "fff")
    True
    >>> # result = slmopt.compile("model_dir", passes="mask-2to4{method=sparsegpt}", calib="calib.txt",
    >>> #                         backend="onnxruntime", output_dir="out/")
    >>> # torch.export.load("out/program.pt2").module()(ids)
"""

from __future__ import annotations

from typing import Any

# A saved program's calls to slmopt::fff resolve only if the op is defined when it is loaded.
from slmopt import ops as _ops  # noqa: F401

__version__ = "0.1.0"
__all__ = ["CompileOptions", "CompileResult", "PassError", "UserError", "compile", "parse_pipeline"]

_LAZY = {
    "compile": "slmopt.api",
    "CompileOptions": "slmopt.api",
    "CompileResult": "slmopt.api",
    "parse_pipeline": "slmopt.pipeline",
    "PassError": "slmopt.errors",
    "UserError": "slmopt.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slmopt' has no attribute {name!r}")

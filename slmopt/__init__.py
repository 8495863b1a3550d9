"""slmopt: make trained language models small and fast to deploy.

Importing ``slmopt`` is light: torch.export, ONNX and the passes load on first use.

Example:
    >>> import slmopt
    >>> # result = slmopt.compile("model_dir", passes="mask-2to4{method=sparsegpt}", calib="calib.txt",
    >>> #                         backend="onnxruntime", output_dir="out/")
"""

from __future__ import annotations

from typing import Any

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

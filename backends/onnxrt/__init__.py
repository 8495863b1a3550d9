"""The ``onnxruntime`` backend: ONNX export, sessions, custom-op lowerings, the KV-cache decoder, checks.

Modules: ``backend`` (OnnxRuntimeBackend/Engine, export), ``fff`` (``slmopt::fff`` translations),
``generation`` (decoder.onnx and the genai config), ``check`` (N:M checker on saved files) and
``blocks`` (blockwise initializer reader).

Example:
    >>> from slmopt.backends.onnxrt import OnnxRuntimeBackend
    >>> OnnxRuntimeBackend.name
    'onnxruntime'
"""

from __future__ import annotations

from slmopt.backends.onnxrt.backend import (
    ONNX_FILE,
    OnnxRuntimeBackend,
    OnnxRuntimeEngine,
    export_onnx,
    make_session,
)

__all__ = ["ONNX_FILE", "OnnxRuntimeBackend", "OnnxRuntimeEngine", "export_onnx", "make_session"]

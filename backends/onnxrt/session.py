"""ONNX Runtime sessions with slmopt's settings, and the Engine that runs one on torch tensors.

Example:
    >>> # engine = OnnxRuntimeEngine(make_session("out/model.onnx", threads=1)); logits = engine(ids)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from slmopt.lowering import Engine
from slmopt.memory import release_freed_memory

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["OnnxRuntimeEngine", "make_session", "run_onnx"]

log = logging.getLogger(__name__)

_NUMPY_DTYPES = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(bool)": np.bool_,
}


def make_session(
    path: str | Path,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    allow_spinning: bool = True,
) -> ort.InferenceSession:
    """Opens an ONNX Runtime session with slmopt's settings.

    Args:
        path: the ``.onnx`` file (external data is found next to it).
        threads: ``intra_op_num_threads``; None lets ORT choose (all cores).
        providers: execution providers in preference order; CPU is always appended as the fallback.
            Unavailable providers are skipped with a warning.
        allow_spinning: let idle intra-op threads busy-wait. Turn off when other engines share the
            cores (interleaved benchmarks), so spinning workers do not steal time from them.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    available = set(ort.get_available_providers())
    chosen = []
    for provider in providers or ():
        if provider in available:
            chosen.append(provider)
        else:
            log.warning(
                "ONNX Runtime provider %s is not available here (have: %s)", provider, sorted(available)
            )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    session = ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
    # Opening a session folds constant subgraphs (an FFF leaf's gate/up interleave, a transposed tied
    # embedding) and pre-packs MatMul weights; the inputs and intermediates of that work are freed into
    # glibc's heap, which keeps them resident: 0.44 GB on a 135M-parameter FFF model, whose session
    # needs only 0.42 GB itself. Returning them now keeps them from sitting under the next session.
    release_freed_memory()
    return session


class OnnxRuntimeEngine(Engine):
    """Runs an ONNX Runtime session on torch tensors; returns the first output as a torch tensor.

    Inputs are matched to the session's inputs by position (named as in the model) and cast to the
    dtype each input declares (token ids to int64).
    """

    backend: ClassVar[str] = "onnxruntime"

    def __init__(self, session: ort.InferenceSession, path: str | Path = "") -> None:
        self.session = session
        self.path = str(path)
        self.inputs = [(i.name, _NUMPY_DTYPES.get(i.type)) for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def feeds(self, *inputs: torch.Tensor) -> dict[str, np.ndarray]:
        """The ``{name: array}`` dict ``session.run`` takes for these positional inputs."""
        if len(inputs) != len(self.inputs):
            names = [name for name, _ in self.inputs]
            raise TypeError(f"model takes {len(self.inputs)} inputs {names}, got {len(inputs)}")
        feeds = {}
        for (name, dtype), x in zip(self.inputs, inputs, strict=True):
            array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            feeds[name] = array.astype(dtype, copy=False) if dtype is not None else array
        return feeds

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.session.run(self.output_names[:1], self.feeds(*inputs))[0]
        return torch.from_numpy(np.asarray(out))

    def describe(self) -> str:
        providers = ",".join(p.removesuffix("ExecutionProvider") for p in self.session.get_providers())
        threads = self.session.get_session_options().intra_op_num_threads
        return f"onnxruntime ({providers}, {threads or 'auto'} threads)"


def run_onnx(
    path: str | Path, inputs: Sequence[torch.Tensor] | Mapping[str, Any], threads: int | None = 1
) -> torch.Tensor:
    """Runs an ONNX file once on the CPU and returns its first output.

    Args:
        path: the ``.onnx`` file.
        inputs: positional tensors, or a ``{input name: tensor/array}`` dict.
        threads: intra-op threads.

    Example:
        >>> # logits = run_onnx("out/model.onnx", (ids,))
    """
    engine = OnnxRuntimeEngine(make_session(path, threads=threads), path)
    if isinstance(inputs, Mapping):
        order = [name for name, _ in engine.inputs]
        missing = set(order) - set(inputs)
        if missing:
            raise ValueError(f"missing ONNX inputs {sorted(missing)}; the model takes {order}")
        inputs = [torch.as_tensor(np.asarray(inputs[name])) for name in order]
    return engine(*inputs)

"""TensorRT traps found by issue 15, each checked the way TensorRT itself behaves (no TensorRT needed):
optimization level 0, the TensorRT >= 10.9 gate, plugin int fields under NumPy >= 2.4, the pinned PTX ISA,
and the device guard around execution."""

from __future__ import annotations

import contextlib
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from slmopt.backends import fff_spec
from slmopt.backends.tensorrt import errors, kernel, plugins, runtime

SPEC = fff_spec.FFFSpec(
    activation="gelu_tanh", levels=3, leaf_width=24, gated=True, has_leaves=True, has_leaf_b2=True
)


def test_optimization_level_zero_reaches_the_builder_config() -> None:
    """0 is a level (the fastest build), not "unset": before the fix it was dropped as falsy."""
    flags: list[str] = []
    trt = SimpleNamespace(BuilderFlag=SimpleNamespace(SPARSE_WEIGHTS="sparse"))
    config = SimpleNamespace(set_flag=flags.append)
    settings = {"builder_optimization_level": 0, "sparse_weights": False, "version_compatible": None}
    runtime.apply_settings(trt, config, settings)
    assert config.builder_optimization_level == 0 and flags == []
    runtime.apply_settings(trt, config, {"builder_optimization_level": 5, "sparse_weights": True})
    assert config.builder_optimization_level == 5 and flags == ["sparse"]


@pytest.mark.parametrize(
    ("version", "ok"), [("10.8.0.43", False), ("10.9.0.34", True), ("11.2.0", True), ("9.3", False)]
)
def test_check_available_requires_tensorrt_10_9(
    monkeypatch: pytest.MonkeyPatch, version: str, ok: bool
) -> None:
    """The plugin needs tensorrt.plugin.aot_impl / KernelLaunchParams (10.9+); older versions must be named
    up front instead of failing at plugin registration after check_available said all is well."""
    fake = ModuleType("tensorrt")
    fake.Builder, fake.__version__ = object, version  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(errors, "_gpu_problem", lambda: None)
    problem = errors._tensorrt_problem()
    if ok:
        assert problem is None and errors.check_available() is None
        return
    assert problem is not None and f"TensorRT {version} is too old" in problem and ">= 10.9" in problem
    with pytest.raises(errors.TensorRTMissingError, match="10.9"):
        errors.check_available()


def _tensorrt_converts(annotation: Any, data: np.ndarray) -> Any:
    """What TensorRT's quick-plugin creator does with one field (tensorrt/plugin/_lib.py, create_plugin):
    NDArray-annotated fields become ``data.astype(dtype)``, str ones ``data.tobytes().decode()``, and any
    other builtin ``annotation(data)`` -- ``int(array([v]))``, which NumPy >= 2.4 refuses."""
    if typing.get_origin(annotation) is np.ndarray:
        return data.astype(typing.get_args(typing.get_args(annotation)[1])[0])
    if issubclass(annotation, str):
        return data.tobytes().decode("utf-8")
    return annotation(data)


def test_plugin_int_fields_survive_tensorrt_conversion() -> None:
    """Every SlmoptFFF attribute as the ONNX parser passes it (ints: 1-element int32 arrays; strings: bytes
    with the C terminator), converted as TensorRT does, rebuilds the node's spec."""
    attrs = SPEC.to_attributes()
    converted = []
    for name, annotation in plugins.PLUGIN_FIELDS.items():
        value = attrs[name]
        if isinstance(value, str):
            data = np.frombuffer(value.encode() + b"\0", dtype=np.int8)
        else:
            data = np.array([value], dtype=np.int32)
        converted.append(_tensorrt_converts(annotation, data))
    assert plugins._spec_of(converted) == SPEC
    assert np.lib.NumpyVersion(np.__version__) < "2.4.0" or _raises(
        lambda: int(np.array([3], dtype=np.int32))
    )


def _raises(fn: typing.Callable[[], object]) -> bool:
    try:
        fn()
    except TypeError:
        return True
    return False


@pytest.mark.cuda_build
def test_ptx_isa_is_pinned_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nvcc 13 stamps PTX ISA 9.0, which drivers older than r580 cannot JIT; the plugin's PTX declares
    kernel.PTX_ISA instead, and ptxas proves the code is valid at that ISA (an ISA below what the target
    needs -- sm_80 needs 7.0 -- is refused, so the check is real)."""
    ptx = plugins.compile_ptx("sm_80", cache_dir=tmp_path).read_text()
    assert plugins.ptx_header(ptx) == {"version": plugins.PTX_ISA, "target": "sm_80"}
    assert kernel.PTX_ISA == "7.8"  # CUDA 11.8: the oldest CUDA that any TensorRT >= 10.9 build runs on
    monkeypatch.setattr(kernel, "PTX_ISA", "6.5")
    with pytest.raises(RuntimeError, match="does not assemble as PTX ISA 6.5"):
        kernel.compile_ptx("sm_80", cache_dir=tmp_path / "low")


def test_engine_executes_under_its_own_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a multi-GPU host the caller's current device may differ from the engine's: execution must switch
    to the engine's device for its duration."""
    current: list[Any] = [torch.device("cuda", 0)]

    @contextlib.contextmanager
    def device(d: Any) -> Iterator[None]:
        current.append(torch.device(d))
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(torch.cuda, "device", device)
    engine = runtime.TensorRTEngine.__new__(runtime.TensorRTEngine)
    engine.device, engine.inputs = torch.device("cuda", 1), ["x"]
    seen: list[Any] = []
    monkeypatch.setattr(engine, "_execute", lambda inputs: seen.append(current[-1]) or "y", raising=False)
    assert engine(torch.zeros(1)) == "y"
    assert seen == [torch.device("cuda", 1)] and current == [torch.device("cuda", 0)]

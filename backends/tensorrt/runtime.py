"""TensorRT at run time: optimization profiles, building a plan from the ONNX file, running a plan.

This is the only module that calls the ``tensorrt`` API (imported lazily). One optimization profile per
plan: ``shapes`` (``min/opt/max``) where given, else defaults from the model's dynamic dims. Facts relied on (TensorRT
10.x/11.x Python API; samples/python/quickly_deployable_plugins/qdp_runner.py):

* ``trt.Runtime(logger).deserialize_cuda_engine(bytes)`` → ``ICudaEngine``; ``num_io_tensors``,
  ``get_tensor_name(i)``, ``get_tensor_mode(name)`` (``TensorIOMode.INPUT``), ``get_tensor_dtype``,
  ``get_tensor_profile_shape(name, profile)`` → (min, opt, max).
* ``IExecutionContext.set_input_shape`` / ``get_tensor_shape`` / ``set_tensor_address`` and
  ``execute_async_v3(stream_handle)``: I/O stays in caller-owned device memory (here torch tensors), the
  plan runs on torch's current stream. Profile 0 is the context's default.
* A custom ``trt.ILogger`` subclass receives every message (``log(severity, msg)``), which is how the
  build log's sparsity lines are captured.

Example:
    >>> check_profile("input_ids", (1, 64), ((1, 1), (1, 128), (8, 512)))  # within range: no error
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch

from slmopt.backends.tensorrt.errors import check_available
from slmopt.lowering import Engine

if TYPE_CHECKING:
    from slmopt.program import Program

__all__ = [
    "MANIFEST_FILE",
    "apply_settings",
    "PLAN_FILE",
    "InputInfo",
    "TensorRTEngine",
    "build_plan",
    "check_profile",
    "environment",
    "parse_shapes",
    "program_inputs",
    "resolve_profiles",
]

log = logging.getLogger(__name__)

Dims = tuple[int, ...]
Profile = tuple[Dims, Dims, Dims]  # (min, opt, max)
# Default (min, opt, max) of named dynamic dims; None = the model's max_seq_len (or 512), capped at 2048
# so a long-context model does not get a profile sized for its whole context by default.
_DIM_DEFAULTS: dict[str, tuple[int, int, int | None]] = {"batch": (1, 1, 8), "seq": (1, 128, None)}
_DEFAULT_MAX_SEQ = 2048
PLAN_FILE = "model.plan"
MANIFEST_FILE = "manifest.json"
_TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "BOOL": torch.bool,
}
# TensorRT severity name → Python logging level (build chatter goes to DEBUG).
_LEVELS = {"INTERNAL_ERROR": logging.ERROR, "ERROR": logging.ERROR, "WARNING": logging.WARNING}
# Build settings (see BuildOptions) → how each is applied to an IBuilderConfig; None/False = untouched.
_CONFIG_SETTERS: dict[str, Callable[[Any, Any, Any], None]] = {
    "sparse_weights": lambda trt, c, v: c.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS),
    "version_compatible": lambda trt, c, v: c.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE),
    "hardware_compatibility": lambda trt, c, v: setattr(
        c, "hardware_compatibility_level", getattr(trt.HardwareCompatibilityLevel, v)
    ),
    "builder_optimization_level": lambda trt, c, v: setattr(c, "builder_optimization_level", v),
    "workspace_mib": lambda trt, c, v: c.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, v << 20),
}


# ------------------------------------------------------------------------------ optimization profiles
class InputInfo(NamedTuple):
    """A model input: name, example shape, dynamic axes (axis → dim name) and known (min, max) per name."""

    name: str
    shape: Dims
    dynamic: Mapping[int, str]
    bounds: Mapping[str, tuple[int, int]] | None = None
    max_seq_len: int | None = None


def program_inputs(program: Program) -> list[InputInfo]:
    """The :class:`InputInfo` of every Program input (names as the ONNX export names them)."""
    info = program.info
    out = []
    for i, (name, x) in enumerate(zip(info.input_names, program.example_inputs, strict=True)):
        dims = info.dynamic_dims[i] if i < len(info.dynamic_dims) else {}
        dynamic = {int(axis): dim for axis, dim in dims.items()}
        out.append(InputInfo(name, tuple(x.shape), dynamic, dict(info.dim_bounds), info.max_seq_len))
    return out


def parse_shapes(text: str) -> dict[str | None, Profile]:
    """Parses ``min/opt/max`` (or ``name:min/opt/max;...``); one dims spec means min = opt = max.

    Example:
        >>> parse_shapes("1x1/1x128/8x512")
        {None: ((1, 1), (1, 128), (8, 512))}
    """
    out: dict[str | None, Profile] = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        name, _, spec = entry.rpartition(":")
        parts = spec.split("/")
        try:
            dims = [tuple(int(d) for d in part.lower().split("x")) for part in parts]
        except ValueError:
            raise ValueError(f"shapes {entry!r}: dims must look like 1x128, separated by '/'") from None
        if len(dims) == 1:
            dims *= 3
        if len(dims) != 3 or len({len(d) for d in dims}) != 1 or min(min(d) for d in dims) < 1:
            raise ValueError(f"shapes {entry!r}: expected min/opt/max of equal rank with dims >= 1")
        if not all(a <= b <= c for a, b, c in zip(*dims, strict=True)):
            raise ValueError(f"shapes {entry!r}: need min <= opt <= max in every dim")
        out[name or None] = (dims[0], dims[1], dims[2])
    if not out:
        raise ValueError("shapes is empty; expected e.g. 1x1/1x128/8x512")
    return out


def _default_profile(inp: InputInfo) -> Profile:
    dims = []  # (min, opt, max) per axis
    for axis, size in enumerate(inp.shape):
        name = inp.dynamic.get(axis)
        if name is None:
            dims.append((size, size, size))
            continue
        lo, opt, hi = _DIM_DEFAULTS.get(name, (1, size, None))
        hi = max(hi or min(inp.max_seq_len or 512, _DEFAULT_MAX_SEQ), 2 * size)  # room for parity inputs
        low, high = (inp.bounds or {}).get(name, (1, hi))
        lo, hi = max(lo, low), min(hi, high)
        dims.append((lo, min(max(opt, lo), hi), hi))
    lows, opts, highs = zip(*dims, strict=True) if dims else ((), (), ())
    return tuple(lows), tuple(opts), tuple(highs)


def resolve_profiles(shapes: str | None, inputs: Sequence[InputInfo]) -> dict[str, Profile]:
    """One optimization profile: the ``shapes`` option where given, defaults elsewhere, checked against
    the inputs' ranks and static dims.

    Raises:
        ValueError: an unknown input name, a rank mismatch, or a static dim given another size.
    """
    given = parse_shapes(shapes) if shapes else {}
    if None in given:
        if len(inputs) != 1:
            raise ValueError(
                f"the model has inputs {[i.name for i in inputs]}: name them in shapes (name:spec)"
            )
        given = {inputs[0].name: given[None]}
    unknown = set(given) - {i.name for i in inputs}
    if unknown:
        raise ValueError(f"shapes names unknown inputs {sorted(unknown)}; inputs: {[i.name for i in inputs]}")
    out = {}
    for inp in inputs:
        profile = given.get(inp.name) or _default_profile(inp)
        if len(profile[0]) != len(inp.shape):
            raise ValueError(
                f"shapes for {inp.name}: rank {len(profile[0])}, the input has rank {len(inp.shape)}"
            )
        for axis, size in enumerate(inp.shape):
            if axis not in inp.dynamic and any(dims[axis] != size for dims in profile):
                raise ValueError(f"shapes for {inp.name}: axis {axis} is static ({size}), got {profile}")
        out[inp.name] = profile
    return out


# ---------------------------------------------------------------------------------------- build, run
def _make_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` keeping every message (for the sparsity report) and forwarding to logging."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            self.lines.append(msg)
            log.log(_LEVELS.get(getattr(severity, "name", ""), logging.DEBUG), "TensorRT: %s", msg)

    return _Logger()


def environment() -> dict[str, Any]:
    """TensorRT/CUDA versions and the GPU the plan is built for (goes into the manifest)."""
    import tensorrt as trt

    major, minor = torch.cuda.get_device_capability()
    return {
        "tensorrt_version": trt.__version__,
        "cuda_version": torch.version.cuda,
        "gpu_name": torch.cuda.get_device_name(),
        "sm": f"sm_{major}{minor}",
        "compute_capability": [major, minor],
    }


def apply_settings(trt: Any, config: Any, settings: Mapping[str, Any]) -> None:
    """Applies the ``_CONFIG_SETTERS`` keys of ``settings`` to an ``IBuilderConfig``.

    None and False mean "leave TensorRT's default"; 0 is a value (``builder_optimization_level=0`` is the
    fastest build, and what the manifest and the trtexec line then say), so the test is identity, not
    truthiness.

    Example:
        >>> from types import SimpleNamespace
        >>> config = SimpleNamespace()
        >>> apply_settings(None, config, {"builder_optimization_level": 0, "sparse_weights": False})
        >>> config.builder_optimization_level
        0
    """
    for key, value in settings.items():
        if key in _CONFIG_SETTERS and value is not None and value is not False:
            _CONFIG_SETTERS[key](trt, config, value)


def build_plan(
    onnx_path: Path, profiles: Mapping[str, Sequence[Sequence[int]]], settings: Mapping[str, Any]
) -> tuple[bytes, list[str]]:
    """Parses the ONNX file into a strongly typed network and builds a serialized plan.

    Args:
        onnx_path: The ONNX file (its external weights next to it).
        profiles: Input name → (min, opt, max) dims of the one optimization profile.
        settings: Keys of ``_CONFIG_SETTERS`` plus ``timing_cache`` (a path or None).

    Returns:
        The plan bytes and every build log message.

    Raises:
        RuntimeError: the parser or the builder failed (the message holds TensorRT's errors).
    """
    import tensorrt as trt

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    # STRONGLY_TYPED: required on 10.x, accepted and ignored on 11.x (always strongly typed).
    # PREFER_AOT_PYTHON_PLUGINS: the ONNX parser then asks quickly deployable plugins for their AOT
    # implementation (onnx-tensorrt importerUtils.cpp createPlugin); ours only has that one anyway.
    names = ("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS")
    flags = [
        getattr(trt.NetworkDefinitionCreationFlag, n)
        for n in names
        if hasattr(trt.NetworkDefinitionCreationFlag, n)
    ]
    network = builder.create_network(sum(1 << int(f) for f in flags))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    apply_settings(trt, config, settings)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(profile)
    cache_path = Path(settings["timing_cache"]) if settings.get("timing_cache") else None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        errors = [line for line in logger.lines if "rror" in line][-5:]
        raise RuntimeError(
            f"TensorRT failed to build {onnx_path.name}: {' | '.join(errors) or 'no error logged'}"
        )
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan)), logger.lines


def check_profile(name: str, shape: Sequence[int], profile: Sequence[Sequence[int]]) -> None:
    """Raises ``ValueError`` when ``shape`` lies outside the (min, opt, max) ``profile`` of input ``name``.

    Example:
        >>> check_profile("x", (9, 4), ((1, 4), (1, 4), (8, 4)))
        Traceback (most recent call last):
        ...
        ValueError: input x has shape (9, 4), outside the engine's profile min (1, 4) .. max (8, 4); rebuild with --backend-option shapes=min/opt/max
    """
    lo, _, hi = (tuple(int(d) for d in dims) for dims in profile)
    shape = tuple(int(d) for d in shape)
    if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
        raise ValueError(
            f"input {name} has shape {shape}, outside the engine's profile min {lo} .. max {hi}; "
            "rebuild with --backend-option shapes=min/opt/max"
        )


class TensorRTEngine(Engine):
    """Runs a TensorRT plan on torch tensors with its (single) optimization profile.

    CUDA inputs are used in place (zero copy) and the output stays on the GPU; CPU inputs are copied to
    the GPU and the output is copied back, so ``slmopt eval``/``bench`` work unchanged.

    Example:
        >>> # engine = TensorRTEngine(Path("out/model.plan")); logits = engine(ids.cuda())
    """

    backend: ClassVar[str] = "tensorrt"

    def __init__(
        self, plan: Path | bytes, manifest: Mapping[str, Any] | None = None, device: Any = None
    ) -> None:
        check_available()
        import tensorrt as trt

        self.manifest = dict(manifest or {})
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        )
        data = plan if isinstance(plan, bytes) else Path(plan).read_bytes()
        self._logger = _make_logger(trt)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            if self.manifest.get("flags", {}).get("version_compatible"):
                self._runtime.engine_host_code_allowed = (
                    True  # a version-compatible plan embeds its lean runtime
                )
            self.engine = self._runtime.deserialize_cuda_engine(data)
            if self.engine is None:
                built = (
                    self.manifest.get("tensorrt_version", "?"),
                    self.manifest.get("gpu", {}).get("sm", "?"),
                )
                raise RuntimeError(
                    f"TensorRT {trt.__version__} could not load the plan (built with TensorRT {built[0]} for "
                    f"{built[1]}); rebuild it here or build with hardware/version compatibility"
                )
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}
        self.profiles = {n: self.engine.get_tensor_profile_shape(n, 0) for n in self.inputs}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.inputs):
            raise TypeError(f"the plan takes {len(self.inputs)} inputs {self.inputs}, got {len(inputs)}")
        # The execution context belongs to the GPU it was created on; on a multi-GPU host the caller's
        # current device may be another one, and TensorRT enqueues on the current device.
        with torch.cuda.device(self.device):
            return self._execute(inputs)

    def _execute(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        on_gpu = isinstance(inputs[0], torch.Tensor) and inputs[0].is_cuda
        keep = []  # device tensors must outlive the asynchronous execution
        for name, x in zip(self.inputs, inputs, strict=True):
            t = torch.as_tensor(x).to(self.device, self.dtypes[name]).contiguous()
            check_profile(name, t.shape, self.profiles[name])
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        results = {}
        for name in self.outputs:
            out = torch.empty(
                tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device
            )
            self.context.set_tensor_address(name, out.data_ptr())
            results[name] = out
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        y = results[self.outputs[0]]
        return y if on_gpu else y.cpu()  # .cpu() waits for the stream

    def describe(self) -> str:
        gpu = self.manifest.get("gpu", {}).get("name") or torch.cuda.get_device_name(self.device)
        return f"tensorrt {self.manifest.get('tensorrt_version', '')} ({gpu}, {self.manifest.get('precision', '?')})"

    @classmethod
    def from_folder(cls, folder: Path, device: Any = None) -> TensorRTEngine:
        """Loads ``model.plan`` with the folder's ``manifest.json``."""
        folder = Path(folder)
        if not (folder / PLAN_FILE).is_file():
            raise ValueError(f"{folder} has no {PLAN_FILE}; was it lowered with the tensorrt backend?")
        manifest_path = folder / MANIFEST_FILE
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        return cls(folder / PLAN_FILE, manifest, device=device)

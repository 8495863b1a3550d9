"""The ``tensorrt`` backend: Program → ONNX (plugin lowering, precision by casts) → TensorRT plan bundle.

``lower`` writes ``model.onnx`` (exactly what TensorRT parsed), ``model.plan`` and ``manifest.json``
(TensorRT/CUDA versions, GPU and SM, plugins, profiles, flags, pipeline, the equivalent ``trtexec`` line,
which layers got sparse kernels). Facts relied on (TensorRT 10/11 Python API and docs):

* TensorRT 11 removed the precision builder flags; networks are strongly typed, so precision comes from
  the ONNX types ("Migrating from TensorRT 10.x to 11.x"). ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
  is required on 10.x and accepted (ignored) on 11.x, so it is set whenever it exists.
* ``OnnxParser.parse_from_file`` (external weights next to the file), ``create_optimization_profile`` /
  ``set_shape(name, min, opt, max)`` / ``add_optimization_profile``, ``set_memory_pool_limit(WORKSPACE)``,
  ``BuilderFlag.SPARSE_WEIGHTS`` / ``VERSION_COMPATIBLE``, ``hardware_compatibility_level``,
  ``builder_optimization_level`` (0-5, default 3), ``create_timing_cache`` / ``set_timing_cache`` /
  ``get_timing_cache().serialize()``, ``build_serialized_network`` (IBuilderConfig reference, 10.x/11.4).
* SPARSE_WEIGHTS only lets TensorRT *try* sparse tactics; the build log says which layers it picked:
  ``(Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3`` (Developer
  Guide, "Structured Sparsity"), parsed by :func:`parse_sparsity_log`.
* trtexec spells the same build ``--stronglyTyped --minShapes/--optShapes/--maxShapes=name:AxB``,
  ``--sparsity=enable``, ``--builderOptimizationLevel=N``, ``--timingCacheFile=F``,
  ``--hardwareCompatibilityLevel=ampere+``, ``--versionCompatible``, ``--memPoolSize=workspace:N``
  (samples/common/sampleOptions.cpp). ``--staticPlugins`` loads C++ plugin libraries only: a plan using
  the Python AOT plugin must be *built* by slmopt, but *runs* in ``trtexec --loadEngine``.

Example:
    >>> opts = parse_options({"precision": "fp16", "shapes": "1x1/1x128/8x512", "sparse_weights": "true"})
    >>> profiles = resolve_profiles(opts.shapes, [InputInfo("input_ids", (2, 16), {0: "batch", 1: "seq"})])
    >>> " ".join(trtexec_command(opts, profiles)[4:7])
    '--minShapes=input_ids:1x1 --optShapes=input_ids:1x128 --maxShapes=input_ids:8x512'
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import onnx
import onnx.numpy_helper

from slmopt.backends.onnxrt.backend import (
    DEFAULT_OPSET,
    ONNX_DATA_FILE,
    ONNX_FILE,
    export_onnx,
    nm_artifact_checks,
    onnx_op_histogram,
)
from slmopt.backends.tensorrt import plugins, runtime
from slmopt.backends.tensorrt.errors import check_available
from slmopt.backends.tensorrt.precision import LOW_PRECISION_OPS, apply_precision
from slmopt.backends.tensorrt.runtime import (
    MANIFEST_FILE,
    PLAN_FILE,
    InputInfo,  # noqa: F401 - used by the module doctest
    Profile,
    TensorRTEngine,
    parse_shapes,
    program_inputs,
    resolve_profiles,
)
from slmopt.lowering import Backend, LoweringResult

if TYPE_CHECKING:
    from slmopt.program import Program

__all__ = [
    "LOW_PRECISION_OPS",
    "PRECISIONS",
    "BuildOptions",
    "TensorRTBackend",
    "apply_precision",
    "build_manifest",
    "check_available",
    "parse_options",
    "parse_sparsity_log",
    "prepare_onnx",
    "trtexec_command",
]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
# option → (HardwareCompatibilityLevel member to set, trtexec spelling); None = leave TensorRT's default
_HW_LEVELS = {"none": (None, None), "ampere_plus": ("AMPERE_PLUS", "ampere+")}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


# --------------------------------------------------------------------------------------------- options
def _bool(value: Any) -> bool:
    text = str(value).strip().lower()
    if text not in _TRUE | _FALSE:
        raise ValueError(f"expected a boolean (true/false), got {value!r}")
    return text in _TRUE


def _optional_int(value: Any) -> int | None:
    return None if value is None or str(value).lower() in ("", "none") else int(value)


@dataclass(frozen=True)
class BuildOptions:
    """Validated tensorrt backend options (``--backend-option key=value``).

    Attributes:
        precision: ``fp32`` | ``fp16`` | ``bf16``: GEMM-like ops (and their weights) in this type, casts
            around them, everything else fp32 (see :func:`apply_precision`).
        sparse_weights: Let TensorRT use 2:4 sparse kernels (SPARSE_WEIGHTS); the manifest lists the picks.
        shapes: Optimization profile ``min/opt/max`` as ``AxB`` dims, e.g. ``1x1/1x128/8x512``; several
            inputs as ``name:min/opt/max;name2:...``. Unset inputs get defaults from the model.
        timing_cache: Timing cache file, read if present and written after the build.
        builder_optimization_level: 0-5 (None: TensorRT's default, 3).
        hardware_compatibility: ``none`` | ``ampere_plus`` (plan runs on any Ampere-or-newer GPU).
        version_compatible: Build a version-compatible plan (VERSION_COMPATIBLE).
        workspace_mib: Workspace memory pool limit in MiB (None: TensorRT's default).
        opset: ONNX opset of the export (>= 18).
        plugin_arch: PTX architecture of the plugin kernels (``sm_80`` runs on every Ampere+ GPU).
        fff_lowering: ``plugin`` (the SlmoptFFF plugin) or ``ops`` (standard ONNX ops).
    """

    precision: str = "fp32"
    sparse_weights: bool = False
    shapes: str | None = None
    timing_cache: str | None = None
    builder_optimization_level: int | None = None
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    workspace_mib: int | None = None
    opset: int = DEFAULT_OPSET
    plugin_arch: str = plugins.DEFAULT_ARCH
    fff_lowering: str = "plugin"

    def __post_init__(self) -> None:
        checks = [  # (field, valid?, what is valid)
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            (
                "hardware_compatibility",
                self.hardware_compatibility in _HW_LEVELS,
                f"one of {', '.join(_HW_LEVELS)}",
            ),
            ("builder_optimization_level", self.builder_optimization_level in (None, *range(6)), "0-5"),
            ("workspace_mib", self.workspace_mib is None or self.workspace_mib > 0, "> 0"),
            ("opset", self.opset >= 18, ">= 18 (the exporter's native opset)"),
            ("fff_lowering", self.fff_lowering in ("plugin", "ops"), "plugin or ops"),
        ]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"tensorrt backend option {name}={getattr(self, name)!r}: must be {valid}")
        plugins.arch_digits(self.plugin_arch)
        if self.shapes is not None:
            parse_shapes(self.shapes)


# option name → (converter from the CLI string, short help)
_OPTIONS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "precision": (str, "fp32 | fp16 | bf16"),
    "sparse_weights": (_bool, "true | false: 2:4 sparse kernels (SPARSE_WEIGHTS)"),
    "shapes": (str, "min/opt/max, e.g. 1x1/1x128/8x512 (name:spec;... for several inputs)"),
    "timing_cache": (str, "timing cache file"),
    "builder_optimization_level": (_optional_int, "0-5"),
    "hardware_compatibility": (str, "none | ampere_plus"),
    "version_compatible": (_bool, "true | false"),
    "workspace_mib": (_optional_int, "workspace pool limit in MiB"),
    "opset": (int, "ONNX opset (>= 18)"),
    "plugin_arch": (str, "PTX arch of plugin kernels, e.g. sm_80"),
    "fff_lowering": (str, "plugin | ops"),
}


def parse_options(options: Mapping[str, Any]) -> BuildOptions:
    """Validates backend options (values may be the strings of ``--backend-option key=value``).

    Raises:
        ValueError: an unknown key (the message lists the valid ones) or a bad value.

    Example:
        >>> parse_options({"builder_optimization_level": "5"}).builder_optimization_level
        5
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        valid = "; ".join(f"{k} ({help_})" for k, (_, help_) in _OPTIONS.items())
        raise ValueError(f"unknown tensorrt backend option(s) {unknown}; valid options: {valid}")
    values = {}
    for key, raw in options.items():
        try:
            values[key] = _OPTIONS[key][0](raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"tensorrt backend option {key}={raw!r}: {err}") from None
    return BuildOptions(**values)


# ------------------------------------------------------------------------------------- trtexec, logs
def trtexec_command(
    opts: BuildOptions,
    profiles: Mapping[str, Profile],
    onnx_file: str = ONNX_FILE,
    plan_file: str = PLAN_FILE,
) -> list[str]:
    """The ``trtexec`` build command equivalent to this build (relative to the bundle folder)."""
    cmd = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={plan_file}"]
    cmd += ["--stronglyTyped"]
    for i, kind in enumerate(("min", "opt", "max")):
        spec = ",".join(f"{name}:{'x'.join(map(str, p[i]))}" for name, p in profiles.items())
        cmd.append(f"--{kind}Shapes={spec}")
    flags: list[tuple[bool, str]] = [
        (opts.sparse_weights, "--sparsity=enable"),
        (
            opts.builder_optimization_level is not None,
            f"--builderOptimizationLevel={opts.builder_optimization_level}",
        ),
        (opts.timing_cache is not None, f"--timingCacheFile={opts.timing_cache}"),
        (
            opts.hardware_compatibility != "none",
            f"--hardwareCompatibilityLevel={_HW_LEVELS[opts.hardware_compatibility][1]}",
        ),
        (opts.version_compatible, "--versionCompatible"),
        (opts.workspace_mib is not None, f"--memPoolSize=workspace:{opts.workspace_mib}"),
    ]
    return cmd + [flag for wanted, flag in flags if wanted]


_SPARSITY_LINES = {
    "eligible": re.compile(r"\(Sparsity\) Layers eligible for sparse math:\s*(.*)$"),
    "picked": re.compile(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:\s*(.*)$"),
}


def parse_sparsity_log(lines: Iterable[str]) -> dict[str, list[str]]:
    """Layers TensorRT found eligible for / picked sparse kernels for, from its build log.

    Example:
        >>> parse_sparsity_log(["[I] [TRT] (Sparsity) TRT inference plan picked sparse implementation "
        ...                     "for layers: fc1, fc2"])
        {'eligible': [], 'picked': ['fc1', 'fc2']}
    """
    out: dict[str, list[str]] = {key: [] for key in _SPARSITY_LINES}
    for line in lines:
        for key, pattern in _SPARSITY_LINES.items():
            match = pattern.search(line.strip())
            if match:
                names = [n.strip() for n in match.group(1).split(",") if n.strip()]
                out[key] += [n for n in names if n not in out[key]]
    return out


# ------------------------------------------------------------------------------------ bundle + backend
def build_manifest(
    opts: BuildOptions,
    profiles: Mapping[str, Profile],
    environment: Mapping[str, Any],
    plugin_info: Sequence[Mapping[str, Any]],
    sparse: Mapping[str, list[str]],
    pipeline: str = "",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The bundle's ``manifest.json``: what was built, for which GPU, and how to rebuild it."""
    cmd = trtexec_command(opts, profiles)
    opt_shapes = ",".join(f"{n}:{'x'.join(map(str, p[1]))}" for n, p in profiles.items())
    return {
        "format": "slmopt-tensorrt-bundle/1",
        "files": {"plan": PLAN_FILE, "onnx": ONNX_FILE},
        "tensorrt_version": environment.get("tensorrt_version"),
        "cuda_version": environment.get("cuda_version"),
        "gpu": {"name": environment.get("gpu_name"), "sm": environment.get("sm")},
        "precision": opts.precision,
        "plugins": [dict(p) for p in plugin_info],
        "profiles": [
            {n: {"min": list(p[0]), "opt": list(p[1]), "max": list(p[2])} for n, p in profiles.items()}
        ],
        "flags": {
            "strongly_typed": True,
            **{k: v for k, v in asdict(opts).items() if k not in ("shapes", "opset")},
        },
        "sparse_layers": dict(sparse),
        "pipeline": pipeline,
        "trtexec": shlex.join(cmd),
        "trtexec_run": shlex.join(["trtexec", f"--loadEngine={PLAN_FILE}", f"--shapes={opt_shapes}"]),
        "trtexec_note": (
            "the plan embeds the SlmoptFFF plugin's PTX (AOT) and runs in trtexec; building it needs Python "
            "(tensorrt.plugin), so rebuild with slmopt rather than the trtexec line"
            if plugin_info
            else ""
        ),
        **dict(extra or {}),
    }


def prepare_onnx(
    program: Program, out_dir: Path, opts: BuildOptions
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Writes ``out_dir/model.onnx`` exactly as TensorRT will parse it (no TensorRT needed).

    Exports with the ``fff_lowering`` hint, binds the plugin nodes' inputs (:func:`plugins.bind_plugin_inputs`),
    applies the precision casts (:func:`apply_precision`) and validates with ``onnx.checker``.

    Returns:
        Export metadata (plus ``plugin_nodes`` and ``casts``) and the manifest's plugin entries.
    """
    path = Path(out_dir) / ONNX_FILE
    meta = export_onnx(program, path, opset=opts.opset, hints={"fff_lowering": opts.fff_lowering})
    model = onnx.load(str(path))
    meta["plugin_nodes"] = plugins.bind_plugin_inputs(model)
    meta["casts"] = apply_precision(model, opts.precision)
    meta["op_histogram"] = onnx_op_histogram(model)
    (path.parent / ONNX_DATA_FILE).unlink(missing_ok=True)
    external = bool(meta["external_data"])
    onnx.save_model(model, str(path), save_as_external_data=external, location=ONNX_DATA_FILE)
    onnx.checker.check_model(str(path), full_check=True)
    return meta, plugins.plugin_report(model, opts.plugin_arch)


class TensorRTBackend(Backend):
    """Lowers a Program to a TensorRT bundle (``model.plan``, ``model.onnx``, ``manifest.json``) and loads it.

    Example:
        >>> backend = TensorRTBackend()
        >>> # backend.lower(program, Path("out"), {"precision": "fp16", "shapes": "1x1/1x128/8x512"})
        >>> # engine = backend.load(Path("out")); logits = engine(input_ids.cuda())
    """

    name: ClassVar[str] = "tensorrt"
    # Lets the API check requirements through the backend registry, before loading any model.
    check_available = staticmethod(check_available)

    def lower(self, program: Program, out_dir: Path, options: dict[str, Any]) -> LoweringResult:
        """Checks TensorRT and the GPU first, validates options, then exports, builds and writes the bundle.

        Raises:
            ImportError: TensorRT is not installed (nothing is written).
            ValueError: no GPU, or bad options (nothing is written).
        """
        check_available()
        opts = parse_options(options)
        profiles = resolve_profiles(opts.shapes, program_inputs(program))
        out_dir = Path(out_dir)
        meta, plugin_info = prepare_onnx(program, out_dir, opts)
        if plugin_info:
            plugins.register(arch=opts.plugin_arch)
        settings = asdict(opts) | {"hardware_compatibility": _HW_LEVELS[opts.hardware_compatibility][0]}
        plan, lines = runtime.build_plan(out_dir / ONNX_FILE, profiles, settings)
        (out_dir / PLAN_FILE).write_bytes(plan)
        sparse = parse_sparsity_log(lines)
        if opts.sparse_weights and not sparse["picked"]:
            log.warning(
                "sparse_weights: TensorRT picked no sparse kernels (eligible: %s)",
                sparse["eligible"] or "none",
            )
        pipeline = ",".join(h.get("options", h.get("name", "")) for h in program.history)
        manifest = build_manifest(
            opts, profiles, runtime.environment(), plugin_info, sparse, pipeline, {"casts": meta["casts"]}
        )
        (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        artifacts = {"plan": PLAN_FILE, "onnx": ONNX_FILE, "manifest": MANIFEST_FILE}
        if meta["external_data"]:
            artifacts["onnx_data"] = ONNX_DATA_FILE
        keys = (
            "tensorrt_version",
            "gpu",
            "precision",
            "plugins",
            "profiles",
            "sparse_layers",
            "trtexec",
            "trtexec_run",
        )
        metadata = {**meta, **{k: manifest[k] for k in keys}}
        return LoweringResult(backend=self.name, artifacts=artifacts, metadata=metadata)

    def check_artifacts(self, program: Program, out_dir: Path, artifacts: dict[str, str]) -> dict[str, Any]:
        """The N:M pattern a sparsity pass promised, read back from the bundle's ``model.onnx``."""
        return nm_artifact_checks(program, Path(out_dir), artifacts)

    def load(
        self, out_dir: Path, threads: int | None = None, device: Any = None, **options: Any
    ) -> TensorRTEngine:
        """Loads the bundle's plan (``threads`` does not apply to a GPU engine)."""
        check_available()
        if options:
            log.info("tensorrt backend load ignores options %s", sorted(options))
        return TensorRTEngine.from_folder(Path(out_dir), device=device)

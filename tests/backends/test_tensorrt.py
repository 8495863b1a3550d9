"""The tensorrt backend: what runs without TensorRT (ONNX for TensorRT, precision casts, options, trtexec
line, manifest, sparsity log, plugin declaration and launch maths, PTX, missing-TensorRT errors) and, marked
``tensorrt``/``gpu`` (auto-skipped here), engine builds checked against ONNX Runtime and the Program.

The plugin model is a tiny module calling ``torch.ops.slmopt.fff`` (gated SiLU leaves with ``leaf_b2`` only,
so interior optional inputs are absent), exported once per module with the ``plugin`` lowering.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import shlex
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import slmopt
import slmopt.ops  # noqa: F401 - defines torch.ops.slmopt.fff
from slmopt.backends import fff_spec
from slmopt.backends.onnxrt.backend import run_onnx
from slmopt.backends.tensorrt import builder, errors, plugins, runtime
from slmopt.cli import main
from slmopt.errors import UserError
from slmopt.native import build
from slmopt.program import ModelInfo, Program, capture
from tests.models import save_hf

H, LEVELS, WIDTH, OUT = 32, 2, 8, 8
SPEC = fff_spec.FFFSpec(
    activation="silu", levels=LEVELS, leaf_width=WIDTH, gated=True, has_leaves=True, has_leaf_b2=True
)


class PluginModel(torch.nn.Module):
    """x → Linear → ReLU → fff (gated SiLU, leaf_b2 only) → + residual → Linear."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        n, e = 2**LEVELS - 1, 2**LEVELS
        self.inp, self.out = torch.nn.Linear(H, H), torch.nn.Linear(H, OUT)
        self.node_w = torch.nn.Parameter(torch.randn(n, H, generator=g) * H**-0.5)
        self.node_b = torch.nn.Parameter(torch.randn(n, generator=g) * 0.1)
        self.w1, self.wg, self.w2 = (
            torch.nn.Parameter(torch.randn(e, WIDTH, H, generator=g) * 0.2) for _ in range(3)
        )
        self.b2 = torch.nn.Parameter(torch.randn(e, H, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        y = torch.ops.slmopt.fff(
            h, self.node_w, self.node_b, None, self.w1, None, self.wg, None, self.w2, self.b2, "silu"
        )
        return self.out(h + y)


def plugin_program() -> Program:
    info = ModelInfo(kind="module", source="t", input_names=["x"], dynamic_dims=[{0: "batch"}])
    return capture(PluginModel().eval(), (torch.randn(4, H),), info)


@pytest.fixture(scope="module")
def plugin_bundle(tmp_path_factory) -> SimpleNamespace:
    """The ONNX TensorRT would parse for the plugin model (fp32), written by builder.prepare_onnx."""
    out = tmp_path_factory.mktemp("plugin")
    program = plugin_program()
    meta, info = builder.prepare_onnx(program, out, builder.parse_options({}))
    return SimpleNamespace(path=out / "model.onnx", meta=meta, info=info, program=program)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_hf("llama", tmp_path_factory.mktemp("models") / "llama")


def attrs_of(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ------------------------------------------------------------------------------- plugin declaration
def test_plugin_declaration_comes_from_fff_spec() -> None:
    assert plugins.PLUGIN_ID == f"{fff_spec.PLUGIN_NAMESPACE}::{fff_spec.OP_TYPE}" == "slmopt::SlmoptFFF"
    assert plugins.PLUGIN_INPUTS == fff_spec.INPUT_NAMES
    # Field order is the order TensorRT hands attributes to aot_impl: the spec's dataclass order.
    assert list(plugins.PLUGIN_FIELDS) == [f.name for f in dataclasses.fields(fff_spec.FFFSpec)]
    assert set(plugins.PLUGIN_FIELDS) | set(plugins.LOOKUP_ATTRIBUTES) == set(fff_spec.ATTRIBUTE_TYPES)
    kinds = {str: onnx.AttributeProto.STRING, plugins.INT_FIELD: onnx.AttributeProto.INT}
    assert all(fff_spec.ATTRIBUTE_TYPES[n] == kinds[t] for n, t in plugins.PLUGIN_FIELDS.items())

    class Desc:  # stand-in for trtp.TensorDesc
        pass

    sig = plugins.describe_signature(Desc)
    params = list(sig.parameters.values())
    assert [p.name for p in params] == [*fff_spec.INPUT_NAMES, *plugins.PLUGIN_FIELDS]
    # tensorrt.plugin's register() rules (_validate.py): annotated, no defaults, tensors first, no reserved names
    assert all(p.default is p.empty and p.annotation is not p.empty for p in params)
    assert [p.annotation for p in params[: len(fff_spec.INPUT_NAMES)]] == [Desc] * len(fff_spec.INPUT_NAMES)
    assert not {p.name for p in params} & {"outputs", "stream", "tactic"}
    assert sig.return_annotation is Desc


def test_onnx_for_tensorrt_has_plugin_nodes_with_the_declared_attributes(plugin_bundle) -> None:
    model = onnx.load(plugin_bundle.path)
    onnx.checker.check_model(str(plugin_bundle.path), full_check=True)
    nodes = [n for n in model.graph.node if n.op_type == fff_spec.OP_TYPE]
    assert len(nodes) == plugin_bundle.meta["plugin_nodes"] == 1
    node, attrs = nodes[0], attrs_of(nodes[0])
    assert node.domain == fff_spec.PLUGIN_DOMAIN
    assert set(attrs) == set(plugins.PLUGIN_FIELDS) | set(plugins.LOOKUP_ATTRIBUTES)
    assert attrs["plugin_namespace"] == b"slmopt" and attrs["plugin_version"] == b"1"
    for name, py_type in plugins.PLUGIN_FIELDS.items():
        assert isinstance(attrs[name], bytes if py_type is str else int), name
    # Every plugin input is bound (QDPs have a fixed arity); absent optionals point at a 1-element placeholder.
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert len(node.input) == len(plugins.PLUGIN_INPUTS) and all(node.input)
    spec, roles = plugins.parse_bound_node(node)
    assert spec == SPEC and tuple(roles) == SPEC.present_inputs()
    for role, name in zip(plugins.PLUGIN_INPUTS, node.input, strict=True):
        if role not in roles:
            assert inits[name] == (1,), role
    for role, shape in SPEC.input_shapes(H).items():
        if role != "x":
            assert inits[roles[role]] == shape, role
    report = plugin_bundle.info[0]
    assert (report["id"], report["version"], report["nodes"]) == (plugins.PLUGIN_ID, "1", 1)


# ------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize(
    ("precision", "low"), [("fp16", TensorProto.FLOAT16), ("bf16", TensorProto.BFLOAT16)]
)
def test_precision_casts_on_the_plugin_model(plugin_bundle, precision, low) -> None:
    model = onnx.load(plugin_bundle.path)
    stats = builder.apply_precision(model, precision)
    # By hand: Gemm(inp), SlmoptFFF and Gemm(out) read weights → low. Activations cast down: x, relu, add
    # (3). Outputs cast back to fp32: linear (→ Relu), fff (→ Add), output (graph output) (3). All 10
    # weights + the placeholder (11 initializers) are converted offline.
    assert stats == {
        "low_precision_ops": 3,
        "casts_to_low": 3,
        "casts_to_fp32": 3,
        "initializers_converted": 11,
    }
    casts = Counter(attrs_of(n)["to"] for n in model.graph.node if n.op_type == "Cast")
    assert casts == {low: 3, TensorProto.FLOAT: 3}
    assert {t.data_type for t in model.graph.initializer} == {low}
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == [
        TensorProto.FLOAT
    ] * 2
    onnx.checker.check_model(model, full_check=True)
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    assert attrs_of(producers[relu.input[0]]) == {"to": TensorProto.FLOAT}  # Relu stays fp32
    fff = next(n for n in model.graph.node if n.op_type == fff_spec.OP_TYPE)
    for name in fff.input:  # every plugin input is low precision: a converted weight or a Cast down
        assert name in inits or attrs_of(producers[name]) == {"to": low}


def test_fp16_llama_runs_in_onnxruntime_within_tolerance_of_fp32(zoo, tmp_path) -> None:
    program = zoo["llama"]
    meta, plugin_info = builder.prepare_onnx(
        program, tmp_path, builder.parse_options({"fff_lowering": "ops"})
    )
    assert meta["casts"]["low_precision_ops"] == 0 and plugin_info == []
    model = onnx.load(tmp_path / "model.onnx")
    stats = builder.apply_precision(model, "fp16")
    # 2 blocks x (q/k/v share one input cast, o_proj, gate/up share one, down) + lm_head = 9 casts down;
    # 14 block linears + lm_head + the embedding Gather read weights (16 low ops, 16 casts back up).
    assert stats == {
        "low_precision_ops": 16,
        "casts_to_low": 9,
        "casts_to_fp32": 16,
        "initializers_converted": 16,
    }
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, tmp_path / "fp16.onnx")
    ids = program.example_inputs[0]
    fp32 = run_onnx(tmp_path / "model.onnx", (ids,)).float()
    fp16 = run_onnx(tmp_path / "fp16.onnx", (ids,)).float()
    assert (fp32 - program(ids)).abs().max() < 1e-5
    # fp16 weights and GEMM inputs: ~1e-3 relative per GEMM; measured 4e-4 of the logit range here.
    assert (fp16 - fp32).abs().max() <= 5e-3 * fp32.abs().max()


# -------------------------------------------------------------------------- options, profiles, trtexec
def test_trtexec_line_for_given_options() -> None:
    opts = builder.parse_options(
        {
            "precision": "fp16",
            "shapes": "1x1/1x128/8x512",
            "sparse_weights": "true",
            "builder_optimization_level": "5",
            "timing_cache": "cache/trt.cache",
            "hardware_compatibility": "ampere_plus",
            "version_compatible": "yes",
            "workspace_mib": "2048",
        }
    )
    profiles = runtime.resolve_profiles(
        opts.shapes, [runtime.InputInfo("input_ids", (2, 16), {0: "batch", 1: "seq"})]
    )
    assert builder.trtexec_command(opts, profiles) == [
        "trtexec",
        "--onnx=model.onnx",
        "--saveEngine=model.plan",
        "--stronglyTyped",
        "--minShapes=input_ids:1x1",
        "--optShapes=input_ids:1x128",
        "--maxShapes=input_ids:8x512",
        "--sparsity=enable",
        "--builderOptimizationLevel=5",
        "--timingCacheFile=cache/trt.cache",
        "--hardwareCompatibilityLevel=ampere+",
        "--versionCompatible",
        "--memPoolSize=workspace:2048",
    ]
    plain = builder.trtexec_command(
        builder.parse_options({}), {"a": ((1, 4), (2, 4), (3, 4)), "b": ((1,), (1,), (1,))}
    )
    assert plain[3:] == [
        "--stronglyTyped",
        "--minShapes=a:1x4,b:1",
        "--optShapes=a:2x4,b:1",
        "--maxShapes=a:3x4,b:1",
    ]


def test_default_profiles_and_shape_checks() -> None:
    ids = runtime.InputInfo("input_ids", (2, 16), {0: "batch", 1: "seq"}, max_seq_len=64)
    assert runtime.resolve_profiles(None, [ids]) == {"input_ids": ((1, 1), (1, 64), (8, 64))}
    x = runtime.InputInfo("x", (4, 32), {0: "batch"})  # a static hidden dim stays fixed
    assert runtime.resolve_profiles(None, [x]) == {"x": ((1, 32), (1, 32), (8, 32))}
    bounded = runtime.InputInfo("input_ids", (2, 16), {0: "batch", 1: "seq"}, {"seq": (1, 32)}, 2048)
    assert runtime.resolve_profiles(None, [bounded])["input_ids"][2] == (8, 32)
    assert runtime.resolve_profiles("input_ids:2x8", [ids]) == {"input_ids": ((2, 8),) * 3}
    bad = [
        ("1x1/1x128", [ids], "min/opt/max"),
        ("2x1/1x1/4x4", [ids], "min <= opt <= max"),
        ("1x1x1/1x1x1/1x1x1", [ids], "rank"),
        ("1x16/1x16/2x16", [x], "static"),
        ("other:1x1/1x1/1x1", [ids], "unknown inputs"),
        ("1x1/1x1/1x1", [ids, x], "name them"),
        ("axb", [ids], "dims must look like"),
    ]
    for text, inputs, needle in bad:
        with pytest.raises(ValueError, match=needle):
            runtime.resolve_profiles(text, inputs)
    runtime.check_profile("x", (8, 32), ((1, 32), (1, 32), (8, 32)))
    with pytest.raises(ValueError, match="outside the engine's profile"):
        runtime.check_profile("x", (9, 32), ((1, 32), (1, 32), (8, 32)))


def test_option_validation_errors_list_valid_choices() -> None:
    with pytest.raises(ValueError, match="unknown tensorrt backend option") as err:
        builder.parse_options({"fp16": "true"})
    assert all(key in str(err.value) for key in ("precision", "sparse_weights", "shapes", "timing_cache"))
    cases = {
        "precision": ("int8", "fp32, fp16, bf16"),
        "sparse_weights": ("maybe", "boolean"),
        "builder_optimization_level": ("7", "0-5"),
        "hardware_compatibility": ("hopper", "none, ampere_plus"),
        "workspace_mib": ("0", "> 0"),
        "opset": ("17", ">= 18"),
        "fff_lowering": ("moe", "plugin or ops"),
        "plugin_arch": ("ampere", "sm_80"),
        "shapes": ("1x1/1x1", "min/opt/max"),
    }
    for key, (value, needle) in cases.items():
        with pytest.raises(ValueError, match=re.escape(needle)):
            builder.parse_options({key: value})
    assert builder.parse_options({"version_compatible": "off", "workspace_mib": "none"}).workspace_mib is None


def test_sparsity_log_parsing() -> None:
    # Format from the TensorRT Developer Guide ("Structured Sparsity"): trtexec prints the logger's lines with a
    # timestamp/severity prefix; a Python ILogger receives the bare message (both forms occur).
    log_text = """\
[03/23/2021-00:14:05] [I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3
[03/23/2021-00:14:05] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3
[03/23/2021-00:14:06] [I] [TRT] Total Activation Memory: 1048576
(Sparsity) TRT inference plan picked sparse implementation for layers: /model/mlp/down_proj/MatMul, conv3
"""
    got = builder.parse_sparsity_log(log_text.splitlines())
    assert got == {
        "eligible": ["conv1", "conv2", "conv3"],
        "picked": ["conv2", "conv3", "/model/mlp/down_proj/MatMul"],
    }
    assert builder.parse_sparsity_log(["no sparsity here"]) == {"eligible": [], "picked": []}


def test_manifest_for_given_options(plugin_bundle) -> None:
    opts = builder.parse_options({"precision": "bf16", "sparse_weights": "1", "shapes": "1x32/2x32/16x32"})
    profiles = runtime.resolve_profiles(opts.shapes, runtime.program_inputs(plugin_bundle.program))
    env = {"tensorrt_version": "11.4.1", "cuda_version": "13.0", "gpu_name": "NVIDIA H100", "sm": "sm_90"}
    sparse = {"eligible": ["a", "b"], "picked": ["b"]}
    m = builder.build_manifest(opts, profiles, env, plugin_bundle.info, sparse, "mask-2to4{method=wanda}")
    assert (m["tensorrt_version"], m["cuda_version"], m["gpu"]) == (
        "11.4.1",
        "13.0",
        {"name": "NVIDIA H100", "sm": "sm_90"},
    )
    assert m["profiles"] == [{"x": {"min": [1, 32], "opt": [2, 32], "max": [16, 32]}}]
    assert m["flags"]["strongly_typed"] and m["flags"]["sparse_weights"] and m["precision"] == "bf16"
    assert m["plugins"][0]["id"] == plugins.PLUGIN_ID and m["plugins"][0]["ptx_arch"] == "compute_80"
    assert (m["plugins"][0]["ptx_isa"], m["plugins"][0]["ptx_target"]) == (plugins.PTX_ISA, "sm_80")
    assert m["sparse_layers"] == sparse and m["pipeline"] == "mask-2to4{method=wanda}"
    assert shlex.split(m["trtexec"]) == builder.trtexec_command(opts, profiles)
    assert (
        m["trtexec_run"] == "trtexec --loadEngine=model.plan --shapes=x:2x32"
        and "Python" in m["trtexec_note"]
    )
    assert m["files"] == {"plan": "model.plan", "onnx": "model.onnx"}


# ------------------------------------------------------------------------------ plugin kernel + launch
def test_launch_config_hand_computed() -> None:
    # one block of 256 threads per token; shared = (2 * hidden + leaf_width) floats
    cases = [
        ((6, 32, 8), (6, 256, 288)),
        ((1, 4096, 0), (1, 256, 32768)),
        ((128, 768, 192), (128, 256, 6912)),
    ]
    for (tokens, hidden, width), (grid_x, block_x, shared) in cases:
        cfg = plugins.launch_config(tokens, hidden, width)
        assert (cfg.grid, cfg.block, cfg.shared_mem) == ((grid_x, 1, 1), (block_x, 1, 1), shared)
    with pytest.raises(ValueError, match="shared memory"):
        plugins.launch_config(1, 6144, 8)  # (12288 + 8) * 4 = 49184 B > 48 KiB


def test_kernel_args_and_kernel_source_share_fff_cuda_definitions() -> None:
    # present bits follow INPUT_NAMES: x 0, node_w 1, node_b 2, leaf_w1 4, leaf_wg 6, leaf_w2 8, leaf_b2 9
    assert plugins.kernel_args(SPEC, H) == (H, 3, WIDTH, 2, 1 + 2 + 4 + 16 + 64 + 256 + 512)
    header = (build.SOURCE_DIR / "fff_common.h").read_text()
    # the entry points fill SlmoptFffParams positionally from the inputs in INPUT_NAMES order
    assert tuple(re.findall(r"const void\* (\w+);", header)) == plugins.PLUGIN_INPUTS
    enum = dict(re.findall(r"SLMOPT_FFF_(GELU|GELU_TANH|SILU|RELU) = (\d+)", header))
    assert {name.upper(): str(i) for name, i in plugins.ACTIVATION_IDS.items()} == enum
    # The token kernel's body exists once: the plugin's unit includes the header fff.cu's launch code uses,
    # and carries no copy of its own (before issue 15 it held a verbatim copy of warp_sum/warp_dot/body).
    source = plugins.kernel_source()
    assert '#include "fff_token_kernel.cuh"' in source
    assert "warp_dot(" not in source and "__syncthreads" not in source and "token_block<T>(" in source
    launch = (build.SOURCE_DIR / "fff_launch.cuh").read_text()
    assert '#include "fff_launch.cuh"' in (build.SOURCE_DIR / "fff.cu").read_text()
    assert "token_block<T>(p, levels, smem)" in launch
    assert '#include "fff_token_kernel.cuh"' in (build.SOURCE_DIR / "fff_batched_kernels.cuh").read_text()
    assert all(name in source for name in plugins.KERNEL_NAMES.values())


@pytest.mark.cuda_build
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_plugin_ptx_compiles(tmp_path, arch) -> None:
    path = plugins.compile_ptx(arch, cache_dir=tmp_path)
    ptx = path.read_text()
    assert plugins.ptx_header(ptx) == {"version": plugins.PTX_ISA, "target": arch}  # pinned, not nvcc's
    want = [".u64"] * len(plugins.PLUGIN_INPUTS) + [".u32"] * len(plugins.EXTRA_ARGS) + [".u64"]
    assert plugins.ptx_entry_params(ptx) == dict.fromkeys(plugins.KERNEL_NAMES.values(), want)
    mtime = path.stat().st_mtime_ns
    assert (
        plugins.compile_ptx(arch, cache_dir=tmp_path) == path and path.stat().st_mtime_ns == mtime
    )  # cached


class _FakePlugin:
    """Just enough of ``tensorrt.plugin`` to register the plugin and call its AOT implementation the way
    TensorRT does (_plugin_class.py: ``aot_impl(*inputs, *attrs, outputs, tactic)``), checking the
    signature rules of _validate.py on the way."""

    class TensorDesc:
        def __init__(self, shape: tuple[int, ...], dtype: str) -> None:
            self.shape_expr, self.dtype = shape, dtype  # int dims: a static shape

        @property
        def ndim(self) -> int:
            return len(self.shape_expr)

        def like(self) -> Any:
            return _FakePlugin.TensorDesc(tuple(self.shape_expr), self.dtype)

    class KernelLaunchParams:
        pass

    class SymExprs(tuple):
        @classmethod
        def from_tuple(cls, values: Any) -> Any:
            return cls(values)

    SymIntExprs = SymExprs
    SymInt32 = int

    def __init__(self) -> None:
        self.functions: dict[str, Any] = {}

    def _decorator(self, kind: str, plugin_id: str) -> Any:
        def wrap(fn: Any) -> Any:
            sig = inspect.signature(fn)
            assert plugin_id == plugins.PLUGIN_ID
            assert all(p.annotation is not p.empty and p.default is p.empty for p in sig.parameters.values())
            if kind == "aot_impl":
                assert (
                    list(sig.parameters)[-2:] == ["outputs", "tactic"]
                    and len(sig.return_annotation.__args__) == 4
                )
            self.functions[kind] = fn
            return fn

        return wrap

    def register(self, plugin_id: str) -> Any:
        return self._decorator("register", plugin_id)

    def aot_impl(self, plugin_id: str) -> Any:
        return self._decorator("aot_impl", plugin_id)


def test_aot_implementation_with_a_stand_in_tensorrt(monkeypatch) -> None:
    monkeypatch.setattr(plugins, "_ptx_bytes", lambda arch: b"// ptx for " + arch.encode())
    monkeypatch.setattr(plugins, "_REGISTERED", set())  # keep the module's registration state untouched
    monkeypatch.setattr(plugins, "_SETTINGS", {"arch": plugins.DEFAULT_ARCH})
    trtp, trt = _FakePlugin(), SimpleNamespace(float32="f32", float16="f16", bfloat16="bf16")
    assert plugins.register("sm_90", trtp=trtp, trt=trt) and not plugins.register("sm_90", trtp=trtp, trt=trt)
    shapes = SPEC.input_shapes(H) | {"x": (3, 5, H)}
    descs = [_FakePlugin.TensorDesc(shapes.get(name, (1,)), "f16") for name in plugins.PLUGIN_INPUTS]
    # What TensorRT hands over: strings with their C terminator, ints as the 1-element int32 arrays the
    # ONNX parser fills (field.data.astype(int32) for the NDArray-annotated fields).
    attrs = [
        v + "\0" if isinstance(v, str) else np.array([v], dtype=np.int32)
        for k, v in SPEC.to_attributes().items()
        if k in plugins.PLUGIN_FIELDS
    ]
    out = trtp.functions["register"](*descs, **dict(zip(plugins.PLUGIN_FIELDS, attrs, strict=True)))
    assert (tuple(out.shape_expr), out.dtype) == ((3, 5, H), "f16")
    name, ptx, params, extra = trtp.functions["aot_impl"](*descs, *attrs, (out,), 0)
    assert (name, ptx) == ("slmopt_fff_trt_f16", b"// ptx for sm_90")
    assert (params.grid_x, params.block_x, params.shared_mem) == (15, 256, (2 * H + WIDTH) * 4)
    assert tuple(extra) == plugins.kernel_args(SPEC, H)


# ------------------------------------------------------------------------------------- missing TensorRT
@pytest.fixture
def no_tensorrt(monkeypatch) -> None:
    """Makes TensorRT look absent even on a machine that has it (the real check runs, on its inputs)."""
    monkeypatch.setattr(
        errors, "_tensorrt_problem", lambda: "the 'tensorrt' Python package is not importable"
    )


def test_check_available_names_what_is_missing(monkeypatch) -> None:
    for trt_missing, gpu_missing, raises in [
        (True, True, errors.TensorRTMissingError),
        (False, True, errors.NoGPUError),
    ]:
        monkeypatch.setattr(
            errors, "_tensorrt_problem", lambda m=trt_missing: "no tensorrt package" if m else None
        )
        monkeypatch.setattr(errors, "_gpu_problem", lambda m=gpu_missing: "no CUDA GPU" if m else None)
        with pytest.raises(raises) as err:
            errors.check_available()
        text = str(err.value)
        assert "\n" not in text and "pip install slmopt[tensorrt]" in text and "no CUDA GPU" in text
        assert ("no tensorrt package" in text) == trt_missing
    assert issubclass(errors.TensorRTMissingError, ImportError) and issubclass(errors.NoGPUError, UserError)
    monkeypatch.setattr(errors, "_gpu_problem", lambda: None)
    monkeypatch.setattr(errors, "_tensorrt_problem", lambda: None)
    assert errors.check_available() is None and errors.missing_requirements() == []
    # exposed for the API, also through the backend registry
    assert builder.check_available is builder.TensorRTBackend.check_available is errors.check_available


def test_this_machine_reports_missing_tensorrt_or_gpu() -> None:
    problems = errors.missing_requirements()
    if not problems:
        pytest.skip("TensorRT and a GPU are available here")
    with pytest.raises((ImportError, UserError), match=re.escape("pip install slmopt[tensorrt]")):
        errors.check_available()


def test_lower_and_load_fail_before_any_work(no_tensorrt, plugin_bundle, tmp_path) -> None:
    backend = builder.TensorRTBackend()
    with pytest.raises(ImportError, match="tensorrt"):
        backend.lower(
            plugin_bundle.program, tmp_path, {"precision": "int8"}
        )  # the missing package comes first
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ImportError):
        backend.load(tmp_path)


def test_compile_without_tensorrt_leaves_no_output(no_tensorrt, llama_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    with pytest.raises(ImportError, match=re.escape("pip install slmopt[tensorrt]")):
        slmopt.compile(llama_dir, backend="tensorrt", output_dir=out, bench=False, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging sibling
    code = main(["compile", str(llama_dir), "--backend", "tensorrt", "-o", str(out), "--no-bench"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("slmopt: error:")]
    assert code == 2 and len(lines) == 1 and "pip install slmopt[tensorrt]" in lines[0]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- needs TensorRT and a GPU
@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_with_plugin_matches_program(tmp_path) -> None:
    from slmopt.backends.onnxrt.fff import routing_margin_mask

    program = plugin_program()
    result = builder.TensorRTBackend().lower(program, tmp_path, {})
    assert set(result.artifacts) >= {"plan", "onnx", "manifest"} and result.metadata["plugins"]
    engine = builder.TensorRTBackend().load(tmp_path)
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(1))
    expected = program(x)
    got_cpu, got_gpu = engine(x), engine(x.cuda())
    assert got_cpu.device.type == "cpu" and got_gpu.is_cuda
    h = torch.relu(x @ program.param("inp.weight").T + program.param("inp.bias"))  # the fff's input
    ok = routing_margin_mask(h, program.param("node_w"), program.param("node_b"))
    # fp32 plan: TF32 GEMMs (TensorRT's default) keep ~1e-3 relative error.
    assert torch.allclose(got_cpu[ok], expected[ok], atol=5e-3, rtol=5e-3)
    assert torch.equal(got_gpu.cpu(), got_cpu)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        engine(torch.randn(64, H))


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 5e-3), ("fp16", 2e-2)])
def test_engine_matches_onnxruntime(zoo, tmp_path, precision, tolerance) -> None:
    program = zoo["llama"]
    builder.TensorRTBackend().lower(program, tmp_path, {"precision": precision, "shapes": "1x1/1x16/4x64"})
    engine = builder.TensorRTBackend().load(tmp_path)
    for ids in (program.example_inputs[0], torch.randint(0, 100, (1, 37))):
        expected = run_onnx(tmp_path / "model.onnx", (ids,)).float()  # the same ONNX, on the CPU
        got = engine(ids.cuda()).float().cpu()
        assert (got - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_sparse_weights_on_a_2to4_masked_model(tmp_path) -> None:
    import json

    layers = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 1024))
    with torch.no_grad():
        for lin in (layers[0], layers[2]):
            w = lin.weight.view(lin.out_features, -1, 4)  # groups of 4 along the reduction (input) axis
            keep = w.abs().topk(2, dim=-1).indices
            lin.weight.copy_(torch.zeros_like(w).scatter(-1, keep, w.gather(-1, keep)).view_as(lin.weight))
    info = ModelInfo(kind="module", source="t", input_names=["x"], dynamic_dims=[{0: "batch"}])
    program = capture(layers.eval(), (torch.randn(4, 1024),), info)
    options = {"precision": "fp16", "sparse_weights": "true", "shapes": "256x1024/1024x1024/1024x1024"}
    result = builder.TensorRTBackend().lower(program, tmp_path, options)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["flags"]["sparse_weights"] and "--sparsity=enable" in manifest["trtexec"]
    sparse = result.metadata["sparse_layers"]
    assert sparse["eligible"], "TensorRT found no layer with 2:4-sparse weights"
    assert set(sparse["picked"]) <= set(sparse["eligible"])


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_compile_to_a_tensorrt_bundle(llama_dir, tmp_path) -> None:
    out = tmp_path / "out"
    result = slmopt.compile(llama_dir, backend="tensorrt", output_dir=out, bench=False, progress=False)
    assert {p.name for p in out.iterdir()} >= {"model.plan", "model.onnx", "manifest.json", "slmopt.json"}
    assert "trtexec" in result.report.lowering
    engine = slmopt.lowering.load_engine(out)
    assert engine(torch.randint(0, 100, (1, 8))).shape[:2] == (1, 8)

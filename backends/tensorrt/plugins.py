"""The ``SlmoptFFF`` TensorRT plugin: a Python "quickly deployable plugin" with an ahead-of-time kernel.

Everything the plugin agrees on with the ONNX lowering comes from :mod:`slmopt.fff_spec`: the plugin id
``slmopt::SlmoptFFF`` (op type + ``plugin_namespace``), the inputs (:data:`fff_spec.INPUT_NAMES`) and the
attributes (:data:`fff_spec.ATTRIBUTE_TYPES`). Facts this module relies on (TensorRT 10.x/11.x sources):

* ``@trtp.register("ns::name")`` takes a function whose annotated parameters are the input ``TensorDesc``\\s
  followed by the attributes (``int``/``str``/...; no defaults, no ``*args``) and returns the output
  descriptor; ``@trtp.aot_impl`` receives ``(inputs..., attributes..., outputs, tactic)`` and returns
  ``(kernel_name, ptx, KernelLaunchParams, SymIntExprs)`` — only PTX is accepted — so the kernel is baked
  into the plan and the engine runs without Python (tensorrt/plugin/_validate.py, _plugin_class.py;
  samples/python/quickly_deployable_plugins/README.md). Without an ``aot`` node attribute the ONNX parser
  asks for ``QuickPluginCreationRequest.kUNKNOWN`` (or PREFER_AOT with that network flag) and a plugin
  with only an AOT implementation is built AOT (onnx-tensorrt importerUtils.cpp ``createPlugin``;
  _lib.py: "If only one implementation is defined, use that"), so the node keeps exactly fff_spec's
  attributes.
* TensorRT launches the AOT kernel with ``(input pointers..., int32 extra args..., output pointers...)``
  (qdp_defs.py circ_pad: signature ``*fp32, i32 x 13, *fp32``).
* The ONNX parser finds the creator by op type, ``plugin_version`` (default "1") and ``plugin_namespace``
  and passes only the attributes the creator declares; an empty optional input reaches the plugin as a
  null tensor (onnx-tensorrt onnxOpImporters.cpp: FallbackPluginImporter, addPluginWithCreator,
  loadFields). String attributes arrive with their C terminator, hence the ``rstrip("\\0")``.

A QDP has a fixed number of inputs, while an ``SlmoptFFF`` node leaves absent optional inputs empty, so
:func:`bind_plugin_inputs` points every absent input at a one-element placeholder (ignored by the kernel:
the ``present`` bit mask says which inputs are real, derived from the node's ``has_*`` attributes).

The kernel, its source and its PTX cache live in :mod:`slmopt.backends.tensorrt.kernel`.

Example:
    >>> PLUGIN_ID
    'slmopt::SlmoptFFF'
    >>> launch_config(tokens=6, hidden=32, leaf_width=8)
    LaunchConfig(grid=(6, 1, 1), block=(256, 1, 1), shared_mem=288)
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnx.numpy_helper

from slmopt.backends import fff_spec
from slmopt.backends.tensorrt.kernel import (
    DEFAULT_ARCH,
    EXTRA_ARGS,
    KERNEL_NAMES,
    PLUGIN_ID,
    PLUGIN_INPUTS,
    PTX_ISA,
    THREADS,
    _full_source,
    _ptx_bytes,
    arch_digits,
    compile_ptx,
    kernel_source,
    ptx_entry_params,
    ptx_header,
)

__all__ = [
    "ACTIVATION_IDS",
    "DEFAULT_ARCH",
    "EXTRA_ARGS",
    "KERNEL_NAMES",
    "LOOKUP_ATTRIBUTES",
    "MAX_SHARED_MEM",
    "PLUGIN_FIELDS",
    "PLUGIN_ID",
    "PLUGIN_INPUTS",
    "PTX_ISA",
    "LaunchConfig",
    "arch_digits",
    "bind_plugin_inputs",
    "compile_ptx",
    "describe_signature",
    "kernel_args",
    "kernel_source",
    "launch_config",
    "parse_bound_node",
    "plugin_report",
    "ptx_entry_params",
    "ptx_header",
    "register",
]

log = logging.getLogger(__name__)

# Read by the ONNX parser to find the creator; every other attribute is a plugin field.
LOOKUP_ATTRIBUTES = ("plugin_namespace", "plugin_version")
# INT attributes are declared as 1-element int32 arrays, not `int`: TensorRT's quick-plugin creator
# converts a builtin-typed field with `int(field.data)`, and field.data is the 1-element array the ONNX
# parser fills, which NumPy >= 2.4 refuses to convert ("only 0-dimensional arrays can be converted");
# array-typed fields it hands over as `field.data.astype(dtype)` (tensorrt/plugin/_lib.py
# _TemplatePluginCreator.create_plugin). _spec_of reads the one element back.
INT_FIELD = npt.NDArray[np.int32]
_PY_TYPES: dict[int, Any] = {onnx.AttributeProto.STRING: str, onnx.AttributeProto.INT: INT_FIELD}
PLUGIN_FIELDS: dict[str, Any] = {
    name: _PY_TYPES[kind] for name, kind in fff_spec.ATTRIBUTE_TYPES.items() if name not in LOOKUP_ATTRIBUTES
}
# fff_spec.ACTIVATIONS is in the order of cuda/fff_common.h's SlmoptFffActivation enum (tests check it).
ACTIVATION_IDS = {name: i for i, name in enumerate(fff_spec.ACTIVATIONS)}
MAX_SHARED_MEM = 48 * 1024  # dynamic shared memory a kernel gets without an opt-in attribute
_PLACEHOLDER = "slmopt_fff_absent"


# ------------------------------------------------------------------------------------------ launch maths
@dataclass(frozen=True)
class LaunchConfig:
    """Grid/block/dynamic shared memory of one plugin launch (ints, or TensorRT shape expressions)."""

    grid: tuple[Any, Any, Any]
    block: tuple[int, int, int]
    shared_mem: Any


def launch_config(tokens: Any, hidden: int, leaf_width: int) -> LaunchConfig:
    """Launch geometry of the token kernel: one block per token; x, y (fp32, ``hidden`` each) and the leaf's
    hidden units (``leaf_width``) live in dynamic shared memory.

    Args:
        tokens: Tokens (product of x's leading dims): an int, or a symbolic ``trtp.ShapeExpr``.
        hidden: Hidden size h (static).
        leaf_width: Neurons per leaf (0 without leaves).

    Raises:
        ValueError: the shared memory would exceed :data:`MAX_SHARED_MEM` (h above ~6000).

    Example:
        >>> launch_config(tokens=1, hidden=4096, leaf_width=0).shared_mem
        32768
    """
    shared = (2 * hidden + leaf_width) * 4
    if shared > MAX_SHARED_MEM:
        raise ValueError(
            f"{PLUGIN_ID}: hidden={hidden}, leaf_width={leaf_width} need {shared} B of shared memory per block, "
            f"more than the {MAX_SHARED_MEM} B the plugin kernel may use; lower with fff_lowering=ops instead"
        )
    return LaunchConfig(grid=(tokens, 1, 1), block=(THREADS, 1, 1), shared_mem=shared)


def kernel_args(spec: fff_spec.FFFSpec, hidden: int) -> tuple[int, ...]:
    """The int32 extra kernel arguments (:data:`EXTRA_ARGS`) for one node.

    ``present`` has bit i set when input i of :data:`PLUGIN_INPUTS` is real (not a placeholder).

    Example:
        >>> kernel_args(fff_spec.FFFSpec(activation="relu", levels=1, has_node_out=True), 16)
        (16, 1, 0, 3, 15)
    """
    present = sum(1 << PLUGIN_INPUTS.index(name) for name in spec.present_inputs())
    return (hidden, spec.num_nodes, spec.leaf_width, ACTIVATION_IDS[spec.activation], present)


# ------------------------------------------------------------------------------------------ ONNX binding
def bind_plugin_inputs(model: onnx.ModelProto) -> int:
    """Gives every ``SlmoptFFF`` node all :data:`PLUGIN_INPUTS`, absent ones bound to a placeholder.

    The placeholder is a one-element initializer of the node's weight dtype (``node_w``'s), shared by all
    nodes. Attributes are left as they are: exactly ``fff_spec``'s.

    Returns:
        How many plugin nodes the model has.

    Raises:
        ValueError: a node that ``fff_spec.parse_node`` rejects.
    """
    inits = {t.name: t for t in model.graph.initializer}
    names = {t.name for t in model.graph.initializer} | {n for node in model.graph.node for n in node.output}
    placeholders: dict[int, str] = {}
    count = 0
    for node in model.graph.node:
        if (node.domain, node.op_type) != (fff_spec.PLUGIN_DOMAIN, fff_spec.OP_TYPE):
            continue
        spec, roles = fff_spec.parse_node(node)
        count += 1
        w = inits.get(roles["node_w"])
        dtype = w.data_type if w is not None else onnx.TensorProto.FLOAT
        if dtype not in placeholders:
            name = f"{_PLACEHOLDER}_{onnx.TensorProto.DataType.Name(dtype).lower()}"
            while name in names:
                name += "_"
            np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
            tensor = onnx.numpy_helper.from_array(np.zeros(1, np.float32).astype(np_dtype), name)
            model.graph.initializer.append(tensor)
            placeholders[dtype] = name
        bound = [roles.get(role, placeholders[dtype]) for role in PLUGIN_INPUTS]
        del node.input[:]
        node.input.extend(bound)
        log.debug("bound %s %s: real inputs %s", node.op_type, node.name, spec.present_inputs())
    return count


def parse_bound_node(node: onnx.NodeProto) -> tuple[fff_spec.FFFSpec, dict[str, str]]:
    """Reads a node :func:`bind_plugin_inputs` bound: its spec and role → value name of the real inputs.

    Example:
        >>> spec = fff_spec.FFFSpec(activation="gelu", levels=2, has_node_out=True)
        >>> node = onnx.helper.make_node("SlmoptFFF", list("xwbo") + ["p"] * 6, ["y"], **spec.to_attributes())
        >>> parse_bound_node(node)[1]
        {'x': 'x', 'node_w': 'w', 'node_b': 'b', 'node_out': 'o'}
    """
    if len(node.input) != len(PLUGIN_INPUTS):
        raise ValueError(
            f"{node.op_type}: a bound plugin node has {len(PLUGIN_INPUTS)} inputs, got {len(node.input)}"
        )
    spec = fff_spec.FFFSpec.from_attributes(node.attribute)
    roles = dict(zip(PLUGIN_INPUTS, node.input, strict=True))
    return spec, {role: roles[role] for role in spec.present_inputs()}


def plugin_report(model: onnx.ModelProto, arch: str) -> list[dict[str, Any]]:
    """The manifest's ``plugins`` entry for a bound model (empty when it has no plugin nodes)."""
    nodes = [
        n for n in model.graph.node if (n.domain, n.op_type) == (fff_spec.PLUGIN_DOMAIN, fff_spec.OP_TYPE)
    ]
    if not nodes:
        return []
    specs = [parse_bound_node(n)[0] for n in nodes]
    return [
        {
            "id": PLUGIN_ID,
            "name": fff_spec.OP_TYPE,
            "namespace": fff_spec.PLUGIN_NAMESPACE,
            "version": fff_spec.PLUGIN_VERSION,
            "kind": "tensorrt.plugin quickly deployable plugin, AOT (PTX embedded in the plan)",
            "nodes": len(nodes),
            "activations": sorted({s.activation for s in specs}),
            "kernels": sorted(KERNEL_NAMES.values()),
            "ptx_arch": f"compute_{arch_digits(arch)}",
            # The PTX ISA the embedded PTX declares: a driver JITs it only if its CUDA version knows it.
            "ptx_isa": PTX_ISA,
            "ptx_target": f"sm_{arch_digits(arch)}",
            "kernel_source_sha256": hashlib.sha256(_full_source().encode()).hexdigest(),
        }
    ]


# ------------------------------------------------------------------------------------------ registration
def describe_signature(tensor_desc: type) -> inspect.Signature:
    """The ``@trtp.register`` signature: every input as ``tensor_desc``, then the plugin fields.

    Built from ``fff_spec`` so the plugin cannot drift from the ONNX node; ``tensor_desc`` is
    ``trtp.TensorDesc`` in practice (tests pass a stand-in class).
    """
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(n, kind, annotation=tensor_desc) for n in PLUGIN_INPUTS]
    params += [inspect.Parameter(n, kind, annotation=t) for n, t in PLUGIN_FIELDS.items()]
    return inspect.Signature(params, return_annotation=tensor_desc)


def _aot_signature(trtp: Any) -> inspect.Signature:
    base = describe_signature(trtp.TensorDesc)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    extra = [
        inspect.Parameter("outputs", kind, annotation=tuple[trtp.TensorDesc]),
        inspect.Parameter("tactic", kind, annotation=int),
    ]
    ret = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]
    return inspect.Signature([*base.parameters.values(), *extra], return_annotation=ret)


def _with_signature(fn: Callable[..., Any], sig: inspect.Signature, name: str) -> Callable[..., Any]:
    fn.__signature__ = sig  # type: ignore[attr-defined]  # inspect.signature honours it (QDP validation)
    fn.__name__ = fn.__qualname__ = name
    return fn


def _field_value(value: Any) -> str | int:
    """A plugin field as TensorRT hands it over: a str (C terminator stripped) or a 1-element int array."""
    if isinstance(value, str):
        return value.rstrip("\0")
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise ValueError(f"{PLUGIN_ID}: an int attribute must have exactly one value, got {flat.size}")
    return int(flat[0])


def _spec_of(attrs: Sequence[Any]) -> fff_spec.FFFSpec:
    values = dict(zip(PLUGIN_FIELDS, attrs, strict=True))
    return fff_spec.FFFSpec.from_attributes({k: _field_value(v) for k, v in values.items()})


def _static(dim: Any) -> int | None:
    if isinstance(dim, int):
        return dim
    if not dim.is_fake and dim.is_constant:
        return int(dim.constant_value())
    return None


_REGISTERED: set[int] = set()  # ids of the tensorrt.plugin modules the plugin is registered with
_SETTINGS = {"arch": DEFAULT_ARCH}  # read at build time by aot_impl; the latest register() call wins


def register(arch: str = DEFAULT_ARCH, trtp: Any = None, trt: Any = None) -> bool:
    """Registers ``slmopt::SlmoptFFF`` with ``tensorrt.plugin`` (once per process; call before parsing).

    Args:
        arch: PTX architecture the AOT implementation compiles for (nvcc must exist where plans are
            built, not where they run).
        trtp: The ``tensorrt.plugin`` module (default: imported); tests pass a stand-in.
        trt: The ``tensorrt`` module (default: imported).

    Returns:
        True if this call registered the plugin, False if it already was.

    Example:
        >>> register()  # doctest: +SKIP
        True
    """
    if trtp is None or trt is None:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    arch_digits(arch)
    _SETTINGS["arch"] = arch
    if id(trtp) in _REGISTERED:
        return False
    dtypes: Mapping[Any, str] = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}
    n_in, n_attr = len(PLUGIN_INPUTS), len(PLUGIN_FIELDS)

    def describe(*args: Any, **attrs: Any) -> Any:
        return args[0].like()  # fff_spec.FFFSpec.output_shape: y is shaped and typed like x

    def aot_impl(*args: Any) -> tuple[str, bytes, Any, Any]:
        descs, attrs = args[:n_in], args[n_in : n_in + n_attr]
        spec, x = _spec_of(attrs), descs[0]
        if x.dtype not in dtypes:
            raise ValueError(
                f"{PLUGIN_ID}: dtype {x.dtype} unsupported; supported: {fff_spec.SUPPORTED_DTYPES}"
            )
        hidden = _static(x.shape_expr[-1]) or _static(descs[1].shape_expr[1])  # x's last dim, else node_w's
        if hidden is None:
            raise ValueError(f"{PLUGIN_ID}: the hidden size must be static")
        # ShapeExpr has * but no reflected ops, so fold from the first leading dim (1 for a 1-D x).
        tokens = functools.reduce(operator.mul, list(x.shape_expr)[:-1]) if x.ndim > 1 else 1
        cfg = launch_config(tokens, hidden, spec.leaf_width)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = cfg.grid
        params.block_x, params.block_y, params.block_z = cfg.block
        params.shared_mem = cfg.shared_mem
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in kernel_args(spec, hidden)])
        return KERNEL_NAMES[dtypes[x.dtype]], _ptx_bytes(_SETTINGS["arch"]), params, extra

    trtp.register(PLUGIN_ID)(
        _with_signature(describe, describe_signature(trtp.TensorDesc), "slmopt_fff_desc")
    )
    trtp.aot_impl(PLUGIN_ID)(_with_signature(aot_impl, _aot_signature(trtp), "slmopt_fff_aot_impl"))
    _REGISTERED.add(id(trtp))
    log.info("registered TensorRT plugin %s (AOT, PTX for compute_%s)", PLUGIN_ID, arch_digits(arch))
    return True

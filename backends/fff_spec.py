"""The ``SlmoptFFF`` plugin node: the one definition shared by the ONNX lowering and the TensorRT plugin.

``slmopt::fff`` lowers (``fff_lowering="plugin"``) to a single ONNX node ``slmopt::SlmoptFFF`` that
TensorRT's ONNX parser maps to a plugin by op type, ``plugin_version`` and ``plugin_namespace``. This
module fixes everything both sides must agree on:

* op type ``SlmoptFFF``, domain and ``plugin_namespace`` ``"slmopt"``, ``plugin_version`` ``"1"``;
* inputs, in this order (absent optionals are empty-string inputs; trailing absent ones may be dropped,
  as ONNX allows): ``x, node_w, node_b, node_out, leaf_w1, leaf_b1, leaf_wg, leaf_bg, leaf_w2, leaf_b2``;
* attributes (:data:`ATTRIBUTE_TYPES`): ``activation`` (string), ``levels``, ``leaf_width``, ``gated``,
  ``has_node_out``, ``has_leaves``, ``has_leaf_b1``, ``has_leaf_bg``, ``has_leaf_b2`` (ints). The
  ``has_*`` flags say which optional inputs exist, so a plugin that only sees the non-empty inputs can
  map them back (:meth:`FFFSpec.present_inputs`);
* one output shaped and typed like ``x`` (:meth:`FFFSpec.output_shape`), dtypes :data:`SUPPORTED_DTYPES`.

Example:
    >>> spec = FFFSpec(activation="silu", levels=3, leaf_width=8, gated=True, has_leaves=True)
    >>> attrs = spec.to_attributes()
    >>> attrs["plugin_namespace"], attrs["levels"]
    ('slmopt', 3)
    >>> FFFSpec.from_attributes(attrs) == spec
    True
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx
import onnx.defs
import onnx.helper

from slmopt.ops import TENSOR_ARGS

__all__ = [
    "ACTIVATIONS",
    "ATTRIBUTE_TYPES",
    "DOMAIN_VERSION",
    "INPUT_NAMES",
    "OP_TYPE",
    "PLUGIN_DOMAIN",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "REQUIRED_INPUTS",
    "SUPPORTED_DTYPES",
    "FFFSpec",
    "make_node",
    "onnx_schema",
    "parse_node",
]

OP_TYPE = "SlmoptFFF"
PLUGIN_DOMAIN = "slmopt"
PLUGIN_NAMESPACE = "slmopt"
PLUGIN_VERSION = "1"
# Opset version of the custom domain (what the model's opset_import must declare for PLUGIN_DOMAIN).
DOMAIN_VERSION = 1

# The plugin node takes the op's tensors in the op's own order (slmopt.ops.TENSOR_ARGS).
INPUT_NAMES: tuple[str, ...] = TENSOR_ARGS
REQUIRED_INPUTS: tuple[str, ...] = ("x", "node_w", "node_b")
ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_tanh", "silu", "relu")
# ONNX type strings the plugin accepts for every input and the output (all inputs share x's dtype).
SUPPORTED_DTYPES: tuple[str, ...] = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")

_STRING, _INT = onnx.AttributeProto.STRING, onnx.AttributeProto.INT
ATTRIBUTE_TYPES: dict[str, int] = {
    "plugin_namespace": _STRING,
    "plugin_version": _STRING,
    "activation": _STRING,
    "levels": _INT,
    "leaf_width": _INT,
    "gated": _INT,
    "has_node_out": _INT,
    "has_leaves": _INT,
    "has_leaf_b1": _INT,
    "has_leaf_bg": _INT,
    "has_leaf_b2": _INT,
}
# Which input each has_* flag announces (leaf_w1 and leaf_w2 come together under has_leaves).
_FLAG_INPUTS: dict[str, tuple[str, ...]] = {
    "has_node_out": ("node_out",),
    "has_leaves": ("leaf_w1", "leaf_w2"),
    "gated": ("leaf_wg",),
    "has_leaf_b1": ("leaf_b1",),
    "has_leaf_bg": ("leaf_bg",),
    "has_leaf_b2": ("leaf_b2",),
}


@dataclass(frozen=True)
class FFFSpec:
    """Static description of one ``SlmoptFFF`` node (everything but the tensors' values).

    Attributes:
        activation: One of :data:`ACTIVATIONS` (``gelu`` is the erf GELU).
        levels: Routing levels L (``2^L - 1`` nodes, ``2^L`` leaves).
        leaf_width: Neurons per leaf (0 without leaves).
        gated: Leaves are gated (``act(x·wg+bg) ⊙ (x·w1+b1)``).
        has_node_out: UltraFastBERT node outputs are present.
        has_leaves: Leaf weights (``leaf_w1``, ``leaf_w2``) are present.
        has_leaf_b1: ``leaf_b1`` is present.
        has_leaf_bg: ``leaf_bg`` is present.
        has_leaf_b2: ``leaf_b2`` is present.

    Example:
        >>> FFFSpec(activation="gelu", levels=11, has_node_out=True).present_inputs()
        ('x', 'node_w', 'node_b', 'node_out')
    """

    activation: str
    levels: int
    leaf_width: int = 0
    gated: bool = False
    has_node_out: bool = False
    has_leaves: bool = False
    has_leaf_b1: bool = False
    has_leaf_bg: bool = False
    has_leaf_b2: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; valid choices: {', '.join(ACTIVATIONS)}"
            )
        if self.levels < 1:
            raise ValueError(f"levels must be >= 1, got {self.levels}")
        if not (self.has_leaves or self.has_node_out):
            raise ValueError("an FFF needs node outputs and/or leaves")
        if self.has_leaves != (self.leaf_width > 0):
            raise ValueError(f"leaf_width must be > 0 exactly when leaves exist, got {self.leaf_width}")
        if not self.has_leaves and (self.gated or self.has_leaf_b1 or self.has_leaf_bg or self.has_leaf_b2):
            raise ValueError("leaf gate/biases given without leaves")
        if self.has_leaf_bg and not self.gated:
            raise ValueError("has_leaf_bg requires gated leaves")

    @property
    def num_nodes(self) -> int:
        """Routing nodes N = 2^L - 1."""
        return 2**self.levels - 1

    @property
    def num_leaves(self) -> int:
        """Leaves E = 2^L."""
        return 2**self.levels

    def to_attributes(self) -> dict[str, str | int]:
        """The node's attributes (name → value), including the TensorRT plugin lookup keys."""
        out: dict[str, str | int] = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = int(value) if isinstance(value, bool) else value
        return out

    @classmethod
    def from_attributes(cls, attrs: Mapping[str, Any] | Sequence[onnx.AttributeProto]) -> FFFSpec:
        """Parses attributes (a name → value mapping or a node's ``AttributeProto`` list).

        Raises:
            ValueError: unknown/missing attributes, wrong plugin namespace/version or wrong types.
        """
        if not isinstance(attrs, Mapping):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in attrs}
        values = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        unknown = sorted(set(values) - set(ATTRIBUTE_TYPES))
        if unknown:
            raise ValueError(f"unknown {OP_TYPE} attributes {unknown}; valid: {sorted(ATTRIBUTE_TYPES)}")
        expected = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}
        for key, want in expected.items():
            if values.get(key, want) != want:
                raise ValueError(f"{OP_TYPE}: {key} must be {want!r}, got {values[key]!r}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                if f.default is dataclasses.MISSING:
                    raise ValueError(f"{OP_TYPE}: missing attribute {f.name!r}")
                continue
            value, want_str = values[f.name], ATTRIBUTE_TYPES[f.name] == _STRING
            if want_str != isinstance(value, str) or isinstance(value, float):
                raise ValueError(f"{OP_TYPE}: attribute {f.name!r} has the wrong type: {value!r}")
            kwargs[f.name] = value if want_str or f.type != "bool" else bool(value)
        return cls(**kwargs)

    @classmethod
    def from_shapes(cls, activation: str, shapes: Mapping[str, Sequence[int] | None]) -> FFFSpec:
        """Derives the spec from the op's tensor shapes (absent inputs missing or None).

        Example:
            >>> FFFSpec.from_shapes("relu", {"node_w": (7, 16), "leaf_w1": (8, 4, 16), "leaf_w2": (8, 4, 16)})
            FFFSpec(activation='relu', levels=3, leaf_width=4, gated=False, has_node_out=False, has_leaves=True, has_leaf_b1=False, has_leaf_bg=False, has_leaf_b2=False)
        """
        present = {k for k, v in shapes.items() if v is not None}
        node_w = shapes["node_w"]
        assert node_w is not None
        leaf_w1 = shapes.get("leaf_w1")
        return cls(
            activation=activation,
            levels=(int(node_w[0]) + 1).bit_length() - 1,
            leaf_width=int(leaf_w1[1]) if leaf_w1 is not None else 0,
            gated="leaf_wg" in present,
            has_node_out="node_out" in present,
            has_leaves="leaf_w1" in present,
            has_leaf_b1="leaf_b1" in present,
            has_leaf_bg="leaf_bg" in present,
            has_leaf_b2="leaf_b2" in present,
        )

    def present_inputs(self) -> tuple[str, ...]:
        """Names of the inputs this node carries, in input order (what a plugin receives)."""
        given = set(REQUIRED_INPUTS)
        for flag, names in _FLAG_INPUTS.items():
            if getattr(self, flag):
                given.update(names)
        return tuple(n for n in INPUT_NAMES if n in given)

    def input_shapes(self, hidden: int) -> dict[str, tuple[int | str, ...]]:
        """Expected shape of every present input (``"..."`` stands for x's leading dims)."""
        n, e, w, h = self.num_nodes, self.num_leaves, self.leaf_width, hidden
        table: dict[str, tuple[int | str, ...]] = {
            "x": ("...", h),
            "node_w": (n, h),
            "node_b": (n,),
            "node_out": (n, h),
            "leaf_w1": (e, w, h),
            "leaf_b1": (e, w),
            "leaf_wg": (e, w, h),
            "leaf_bg": (e, w),
            "leaf_w2": (e, w, h),
            "leaf_b2": (e, h),
        }
        return {k: table[k] for k in self.present_inputs()}

    @staticmethod
    def output_shape(x_shape: Sequence[Any]) -> tuple[Any, ...]:
        """Shape inference: the output has x's shape (and dtype)."""
        return tuple(x_shape)


@functools.cache
def onnx_schema() -> onnx.defs.OpSchema:
    """An ``onnx.defs.OpSchema`` for ``SlmoptFFF`` (not registered globally; builders use it)."""
    param = onnx.defs.OpSchema.FormalParameter
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    inputs = [
        param(name, "T") if name in REQUIRED_INPUTS else param(name, "T", param_option=optional)
        for name in INPUT_NAMES
    ]
    attr_type = {_STRING: onnx.defs.OpSchema.AttrType.STRING, _INT: onnx.defs.OpSchema.AttrType.INT}
    attributes = [
        onnx.defs.OpSchema.Attribute(name, attr_type[kind], required=False)
        for name, kind in ATTRIBUTE_TYPES.items()
    ]
    return onnx.defs.OpSchema(
        OP_TYPE,
        PLUGIN_DOMAIN,
        DOMAIN_VERSION,
        "slmopt fast-feedforward tree (see slmopt.ops); output shaped like x.",
        inputs=inputs,
        outputs=[param("y", "T")],
        type_constraints=[("T", list(SUPPORTED_DTYPES), "x's dtype")],
        attributes=attributes,
    )


def make_node(inputs: Mapping[str, str], output: str, spec: FFFSpec, name: str = "") -> onnx.NodeProto:
    """Builds the ``SlmoptFFF`` node from value names (for hand-built graphs and tests).

    Args:
        inputs: Input role (:data:`INPUT_NAMES`) → value name; exactly the spec's present inputs.
        output: Output value name.
        spec: The node's spec.
        name: Node name.

    Example:
        >>> spec = FFFSpec(activation="gelu", levels=2, has_node_out=True)
        >>> node = make_node({"x": "x", "node_w": "w", "node_b": "b", "node_out": "o"}, "y", spec)
        >>> list(node.input)
        ['x', 'w', 'b', 'o']
    """
    if set(inputs) != set(spec.present_inputs()):
        raise ValueError(f"{OP_TYPE}: inputs {sorted(inputs)} do not match the spec {spec.present_inputs()}")
    names = [inputs.get(role, "") for role in INPUT_NAMES]
    while names and not names[-1]:  # trailing absent optionals may simply be left out
        names.pop()
    return onnx.helper.make_node(
        OP_TYPE, names, [output], name=name or None, domain=PLUGIN_DOMAIN, **spec.to_attributes()
    )


def parse_node(node: onnx.NodeProto) -> tuple[FFFSpec, dict[str, str]]:
    """Reads a ``SlmoptFFF`` node back: its spec and input role → value name (present inputs only).

    Raises:
        ValueError: not an ``SlmoptFFF`` node, or its inputs disagree with its ``has_*`` attributes.
    """
    if (node.domain, node.op_type) != (PLUGIN_DOMAIN, OP_TYPE):
        raise ValueError(f"not a {PLUGIN_DOMAIN}::{OP_TYPE} node: {node.domain}::{node.op_type}")
    spec = FFFSpec.from_attributes(node.attribute)
    roles = {role: name for role, name in zip(INPUT_NAMES, node.input, strict=False) if name}
    if tuple(roles) != spec.present_inputs():
        raise ValueError(f"{OP_TYPE}: inputs {tuple(roles)} disagree with attributes {spec.present_inputs()}")
    return spec, roles

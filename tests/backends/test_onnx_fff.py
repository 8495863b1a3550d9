"""ONNX lowerings of ``slmopt::fff`` (backends/onnxrt/fff.py) and the plugin spec (backends/fff_spec.py).

Every lowering is exported with the real exporter path (``torch.onnx.export(dynamo=True)`` with the
translation table), run in ONNX Runtime where possible, and compared with a per-token float64 loop written
here (not ``fff_reference``). Tokens whose routing logits come within 1e-4 of zero are masked out: two
correct implementations may send them to different leaves. Exports cost ~2 s each, so one module holding
several fff calls is exported once per lowering (module-scoped fixtures).
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slmopt.backends import fff_spec
from slmopt.backends.onnxrt import fff as onnx_fff
from slmopt.lowering import onnx_translations

H, LEVELS, WIDTH = 32, 3, 8
OPS_TOL = 1e-5
LOGGER = "slmopt.backends.onnxrt.fff"

ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda z: 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0))),
    "gelu_tanh": lambda z: 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3))),
    "silu": lambda z: z / (1.0 + torch.exp(-z)),
    "relu": lambda z: torch.clamp(z, min=0.0),
}
ROLES = fff_spec.INPUT_NAMES[1:]


@dataclass(frozen=True)
class Cfg:
    activation: str
    leaves: bool = True
    gated: bool = False
    node_out: bool = False
    biases: bool = True
    levels: int = LEVELS
    hidden: int = H
    width: int = WIDTH


CONFIGS = {
    "gelu": Cfg("gelu"),
    "swiglu": Cfg("silu", gated=True),
    "relu": Cfg("relu", biases=False),
    "ufb": Cfg("gelu", leaves=False, node_out=True),
}
MOE_EXTRA = {"gated_gelu": Cfg("gelu", gated=True)}  # MoE has no gated GELU: must fall back to ops


def make_params(cfg: Cfg, seed: int) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    n, e, w, h = 2**cfg.levels - 1, 2**cfg.levels, cfg.width, cfg.hidden

    def rnd(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    leaf, bias = cfg.leaves, cfg.leaves and cfg.biases
    p: dict[str, torch.Tensor | None] = {
        "node_w": rnd(n, h),
        "node_b": rnd(n, scale=0.1),
        "node_out": rnd(n, h) if cfg.node_out else None,
        "leaf_w1": rnd(e, w, h) if leaf else None,
        "leaf_b1": rnd(e, w) if bias else None,
        "leaf_wg": rnd(e, w, h) if cfg.gated else None,
        "leaf_bg": rnd(e, w) if cfg.gated and cfg.biases else None,
        "leaf_w2": rnd(e, w, h) if leaf else None,
        "leaf_b2": rnd(e, h) if bias else None,
    }
    return p


def loop_reference(x: torch.Tensor, p: dict[str, torch.Tensor | None], activation: str) -> torch.Tensor:
    """One token at a time, float64, straight from the op's definition."""
    act, h = ACT[activation], x.shape[-1]
    d = {k: None if v is None else v.double() for k, v in p.items()}
    n_nodes = d["node_w"].shape[0]
    out = []
    for tok in x.reshape(-1, h).double():
        y, n = torch.zeros(h, dtype=torch.float64), 0
        while n < n_nodes:
            z = torch.dot(d["node_w"][n], tok) + d["node_b"][n]
            if d["node_out"] is not None:
                y = y + act(z) * d["node_out"][n]
            n = 2 * n + 1 + int(z > 0)
        if d["leaf_w1"] is not None:
            e = n - n_nodes
            up = d["leaf_w1"][e] @ tok + (d["leaf_b1"][e] if d["leaf_b1"] is not None else 0.0)
            if d["leaf_wg"] is not None:
                gate = d["leaf_wg"][e] @ tok + (d["leaf_bg"][e] if d["leaf_bg"] is not None else 0.0)
                hidden = act(gate) * up
            else:
                hidden = act(up)
            y = y + hidden @ d["leaf_w2"][e] + (d["leaf_b2"][e] if d["leaf_b2"] is not None else 0.0)
        out.append(y)
    return torch.stack(out).reshape(x.shape).float()


class FFFStack(torch.nn.Module):
    """Several independent fff calls on the same input (one output each), or chained ones."""

    def __init__(self, cfgs: dict[str, Cfg], seed: int = 0, chain: bool = False) -> None:
        super().__init__()
        self.cfgs, self.chain = cfgs, chain
        self.params = {name: make_params(cfg, seed + i) for i, (name, cfg) in enumerate(cfgs.items())}
        self.holders = torch.nn.ModuleDict()
        for name, p in self.params.items():
            holder = torch.nn.Module()
            for role, t in p.items():
                setattr(holder, role, None if t is None else torch.nn.Parameter(t))
            self.holders[name] = holder

    @property
    def hidden(self) -> int:
        return next(iter(self.cfgs.values())).hidden

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for name, cfg in self.cfgs.items():
            holder = self.holders[name]
            args = [getattr(holder, role) for role in ROLES]
            y = torch.ops.slmopt.fff(x, *args, cfg.activation)
            x = y if self.chain else x
            outs.append(y)
        return tuple(outs)


def export(module: FFFStack, hints: dict, rank: int = 3) -> onnx.ModelProto:
    """The real exporter path; example sizes > 1 so the token dims stay dynamic."""
    onnx_fff.register()
    x = torch.randn(2, 3, module.hidden) if rank == 3 else torch.randn(3, module.hidden)
    dims = (
        {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
        if rank == 3
        else {0: torch.export.Dim("t")}
    )
    program = torch.onnx.export(
        module.eval(),
        (x,),
        dynamo=True,
        custom_translation_table=onnx_translations(hints),
        dynamic_shapes=(dims,),
        verbose=False,
    )
    return program.model_proto


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class Exported:
    module: FFFStack
    model: onnx.ModelProto
    warnings: list[str]


def _export_captured(cfgs: dict[str, Cfg], hints: dict) -> Exported:
    module, capture = FFFStack(cfgs), Capture()
    logging.getLogger(LOGGER).addHandler(capture)
    try:
        model = export(module, hints)
    finally:
        logging.getLogger(LOGGER).removeHandler(capture)
    return Exported(module, model, capture.messages)


@pytest.fixture(scope="module")
def exported() -> dict[str, Exported]:
    return {
        "ops": _export_captured(CONFIGS, {"fff_lowering": "ops"}),
        "moe": _export_captured(CONFIGS | MOE_EXTRA, {"fff_lowering": "moe"}),
    }


def gelu_tanh_gap() -> float:
    """max |erf GELU - tanh GELU| (≈ 4.7e-4 near |z| ≈ 2.7), measured on a fine grid."""
    z = torch.linspace(-12, 12, 480_001, dtype=torch.float64)
    return float((ACT["gelu"](z) - ACT["gelu_tanh"](z)).abs().max())


def tolerance(mode: str, cfg: Cfg, p: dict[str, torch.Tensor | None]) -> float:
    """1e-5 where both sides compute the same function; MoE's tanh GELU for erf-GELU leaves adds at most
    gap · max_{leaf, column} Σ_i |w2[leaf, i, column]| (each neuron's error times its down weights)."""
    if mode == "moe" and cfg.activation == "gelu" and cfg.leaves and not cfg.gated:
        assert p["leaf_w2"] is not None
        return OPS_TOL + gelu_tanh_gap() * float(p["leaf_w2"].abs().sum(1).max())
    return OPS_TOL


def check_parity(
    sess: ort.InferenceSession, module: FFFStack, x: torch.Tensor, tol: dict[str, float]
) -> None:
    outs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    for (name, cfg), got in zip(module.cfgs.items(), outs, strict=True):
        p = module.params[name]
        assert p["node_w"] is not None and p["node_b"] is not None
        mask = onnx_fff.routing_margin_mask(x, p["node_w"], p["node_b"])
        assert mask.float().mean() > 0.5, "too many near-tie tokens for a meaningful check"
        want = loop_reference(x, p, cfg.activation)
        assert got.shape == tuple(x.shape)
        diff = (torch.from_numpy(got) - want)[mask].abs().max().item() if mask.any() else 0.0
        assert diff <= tol[name], f"{name}: max |diff| {diff:.3g} > {tol[name]:.3g}"


@pytest.mark.parametrize("mode", ["ops", "moe"])
@pytest.mark.parametrize("shape", [(1, 1, H), (1, 37, H), (2, 5, H)], ids=["t1", "t37", "b2s5"])
def test_parity_with_per_token_loop(exported: dict[str, Exported], mode: str, shape: tuple[int, ...]) -> None:
    ex = exported[mode]
    tol = {name: tolerance(mode, cfg, ex.module.params[name]) for name, cfg in ex.module.cfgs.items()}
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    check_parity(session(ex.model), ex.module, x, tol)


def test_moe_graph_uses_one_moe_node_per_fff_with_leaves(exported: dict[str, Exported]) -> None:
    ex = exported["moe"]
    moe = [n for n in ex.model.graph.node if (n.domain, n.op_type) == ("com.microsoft", "MoE")]
    assert len(moe) == 3  # gelu, swiglu, relu; ufb (no leaves) and gated gelu lower with standard ops
    by_act = {
        onnx.helper.get_attribute_value(a) for n in moe for a in n.attribute if a.name == "activation_type"
    }
    assert by_act == {b"gelu", b"swiglu", b"relu"}
    assert {"com.microsoft": 1}.items() <= {o.domain: o.version for o in ex.model.opset_import}.items()
    assert any("no leaves" in m for m in ex.warnings)
    assert any("gated gelu" in m for m in ex.warnings)
    assert len(ex.warnings) == 2


def test_ops_graph_uses_only_standard_onnx(exported: dict[str, Exported]) -> None:
    model = exported["ops"].model
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    onnx.checker.check_model(model, full_check=True)
    assert not exported["ops"].warnings


@pytest.mark.parametrize("routing", ["dense", "gather"])
def test_moe_routing_op_count_per_level(routing: str) -> None:
    """Two chained fff ops (L = 2 and L = 4): nodes per op grow by exactly ROUTING_OPS_PER_LEVEL per level."""
    cfgs = {"l2": Cfg("relu", levels=2), "l4": Cfg("relu", levels=4)}
    model = export(FFFStack(cfgs, chain=True), {"fff_lowering": "moe", "fff_routing": routing})
    per_op = collections.Counter()
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        per_op[meta["pkg.torch.onnx.name_scopes"]] += 1
    (small, n2), (large, n4) = sorted(per_op.items(), key=lambda kv: kv[1])
    assert n4 - n2 == 2 * onnx_fff.ROUTING_OPS_PER_LEVEL[routing]
    # Besides the levels, at most 8 nodes: reshapes in/out, first level / logits, leaf router, MoE.
    assert n4 <= onnx_fff.ROUTING_OPS_PER_LEVEL[routing] * 4 + 8
    assert sum(n.op_type == "MoE" for n in model.graph.node) == 2


def _ops_per_fff(model: onnx.ModelProto) -> list[int]:
    per_op = collections.Counter()
    for node in model.graph.node:
        per_op[{p.key: p.value for p in node.metadata_props}["pkg.torch.onnx.name_scopes"]] += 1
    return sorted(per_op.values())


def test_moe_path_routing_is_constant_op_count() -> None:
    """The default MoE routing: Gemm, Greater, Where, MatMul whatever the depth (no per-level ops)."""
    cfgs = {"l2": Cfg("silu", gated=True, levels=2), "l4": Cfg("silu", gated=True, levels=4)}
    module = FFFStack(cfgs, chain=True)
    model = export(module, {"fff_lowering": "moe"})
    # Per fff: Reshape in, Gemm, Greater, Where, MatMul, MoE, Shape + Reshape out (the exporter folds
    # the swiglu interleave of the weights into constants).
    assert _ops_per_fff(model) == [8, 8]
    kinds = collections.Counter(n.op_type for n in model.graph.node)
    assert kinds["MoE"] == kinds["Gemm"] == kinds["MatMul"] == kinds["Greater"] == 2
    x = torch.randn(1, 9, H, generator=torch.Generator().manual_seed(5))
    outs = session(model).run(None, {"x": x.numpy()})
    p2, p4 = module.params["l2"], module.params["l4"]
    y2 = loop_reference(x, p2, "silu")
    mask = onnx_fff.routing_margin_mask(x, p2["node_w"], p2["node_b"])  # type: ignore[arg-type]
    mask &= onnx_fff.routing_margin_mask(y2, p4["node_w"], p4["node_b"])  # type: ignore[arg-type]
    assert mask.any()
    want = loop_reference(y2, p4, "silu")
    torch.testing.assert_close(torch.from_numpy(outs[1])[mask], want[mask], atol=OPS_TOL, rtol=OPS_TOL)


@pytest.mark.parametrize("levels", [1, 2, 3, 5, 8])
def test_path_matrix_puts_the_reached_leaf_two_ahead(levels: int) -> None:
    """sign(z) @ path_matrix: the heap walk's leaf scores ``levels``, every other leaf <= levels - 2."""
    matrix = onnx_fff.path_matrix(levels)
    nodes = 2**levels - 1
    signs = np.random.default_rng(levels).choice([-1.0, 1.0], size=(64, nodes)).astype(np.float32)
    scores = signs @ matrix
    for row, score in zip(signs, scores, strict=True):
        n = 0
        while n < nodes:
            n = 2 * n + 1 + int(row[n] > 0)
        leaf = n - nodes
        assert score[leaf] == levels
        assert np.delete(score, leaf).max() <= levels - 2


@pytest.mark.parametrize("cfg", [Cfg("silu", gated=True), Cfg("relu", biases=False)], ids=["swiglu", "relu"])
def test_moe_path_routing_sends_zero_logits_left(cfg: Cfg) -> None:
    """z == 0 exactly must go left, as in the reference (``z > 0`` goes right): no near-tie masking here."""
    module = FFFStack({"f": cfg})
    p = module.params["f"]
    assert p["node_w"] is not None and p["node_b"] is not None
    with torch.no_grad():
        # Root and its left child ignore x with zero bias (z == 0 → left, twice); the rest route on x.
        p["node_w"][:2] = 0.0
        p["node_b"][:2] = 0.0
        module.holders["f"].node_w.copy_(p["node_w"])
        module.holders["f"].node_b.copy_(p["node_b"])
    model = export(module, {"fff_lowering": "moe", "fff_routing": "path"})
    x = torch.randn(1, 40, H, generator=torch.Generator().manual_seed(11))
    got = torch.from_numpy(session(model).run(None, {"x": x.numpy()})[0])
    want = loop_reference(x, p, cfg.activation)
    margin = (x.reshape(-1, H) @ p["node_w"][3] + p["node_b"][3]).abs() > 1e-4  # node 3 decides the leaf
    torch.testing.assert_close(got.reshape(-1, H)[margin], want.reshape(-1, H)[margin], atol=OPS_TOL, rtol=0)
    assert margin.float().mean() > 0.9


def test_moe_exact_hint_keeps_erf_gelu_on_standard_ops(caplog: pytest.LogCaptureFixture) -> None:
    module = FFFStack({"gelu": CONFIGS["gelu"]})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = export(module, {"fff_lowering": "moe", "fff_moe_exact": True}, rank=2)
    assert not any(n.op_type == "MoE" for n in model.graph.node)
    assert "fff_moe_exact" in caplog.text
    x = torch.randn(37, H, generator=torch.Generator().manual_seed(3))  # also covers 2-D input
    check_parity(session(model), module, x, {"gelu": OPS_TOL})


# ------------------------------------------------------------------------------------------------ plugin
def expected_spec(cfg: Cfg) -> fff_spec.FFFSpec:
    return fff_spec.FFFSpec(
        activation=cfg.activation,
        levels=cfg.levels,
        leaf_width=cfg.width if cfg.leaves else 0,
        gated=cfg.gated,
        has_node_out=cfg.node_out,
        has_leaves=cfg.leaves,
        has_leaf_b1=cfg.leaves and cfg.biases,
        has_leaf_bg=cfg.gated and cfg.biases,
        has_leaf_b2=cfg.leaves and cfg.biases,
    )


def test_plugin_nodes_attributes_and_shapes() -> None:
    module = FFFStack(CONFIGS)
    model = export(module, {"fff_lowering": "plugin"})
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[fff_spec.PLUGIN_DOMAIN] == 1
    nodes = list(model.graph.node)
    assert [n.op_type for n in nodes] == [fff_spec.OP_TYPE] * len(CONFIGS)  # nothing but the plugin nodes
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    x_dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    for node, (_name, cfg), out in zip(nodes, module.cfgs.items(), model.graph.output, strict=True):
        spec, roles = fff_spec.parse_node(node)
        want = expected_spec(cfg)
        assert spec == want
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"slmopt" and attrs["plugin_version"] == b"1"
        assert attrs["activation"] == cfg.activation.encode()
        assert {k: v for k, v in attrs.items() if isinstance(v, int)} == {
            k: v for k, v in want.to_attributes().items() if isinstance(v, int)
        }
        # Inputs sit at their fixed positions; absent optionals are "" (or trailing and dropped).
        for role, value in zip(fff_spec.INPUT_NAMES, node.input, strict=False):
            assert bool(value) == (role in want.present_inputs()), role
        for role, shape in want.input_shapes(H).items():
            if role == "x":
                assert x_dims[-1] == H and len(x_dims) == 3
            else:
                assert inits[roles[role]] == shape, role
        out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
        assert out_dims == x_dims and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_plugin_hand_built_graph_passes_checker() -> None:
    spec = fff_spec.FFFSpec(activation="silu", levels=2, leaf_width=4, gated=True, has_leaves=True)
    shapes = spec.input_shapes(6)
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), name)
        for name, s in shapes.items()
        if name != "x"
    ]
    node = fff_spec.make_node({name: name for name in shapes}, "y", spec, name="fff0")
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["t", 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["t", 6])],
        inits,
    )
    opsets = [onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid(fff_spec.PLUGIN_DOMAIN, 1)]
    model = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    assert list(node.input) == ["x", "node_w", "node_b", "", "leaf_w1", "", "leaf_wg", "", "leaf_w2"]
    assert fff_spec.parse_node(node) == (spec, {n: n for n in spec.present_inputs()})
    assert fff_spec.onnx_schema().name == fff_spec.OP_TYPE


def test_spec_round_trip_and_errors() -> None:
    spec = fff_spec.FFFSpec(activation="gelu", levels=11, has_node_out=True)
    assert fff_spec.FFFSpec.from_attributes(spec.to_attributes()) == spec
    assert spec.present_inputs() == ("x", "node_w", "node_b", "node_out")
    assert spec.output_shape(("b", "s", 768)) == ("b", "s", 768)
    bad = [
        spec.to_attributes() | {"plugin_version": "2"},
        spec.to_attributes() | {"plugin_namespace": "other"},
        spec.to_attributes() | {"color": 1},
        spec.to_attributes() | {"levels": "11"},
        {k: v for k, v in spec.to_attributes().items() if k != "levels"},
    ]
    for attrs in bad:
        with pytest.raises(ValueError):
            fff_spec.FFFSpec.from_attributes(attrs)
    with pytest.raises(ValueError, match="valid choices"):
        fff_spec.FFFSpec(activation="tanh", levels=2, has_node_out=True)
    with pytest.raises(ValueError):
        fff_spec.FFFSpec(activation="gelu", levels=2)  # neither node outputs nor leaves
    with pytest.raises(ValueError):
        fff_spec.FFFSpec(activation="gelu", levels=2, leaf_width=4, has_leaves=True, has_leaf_bg=True)
    node = fff_spec.make_node({"x": "x", "node_w": "w", "node_b": "b", "node_out": "o"}, "y", spec)
    node.input.append("extra")  # an input the attributes do not announce
    with pytest.raises(ValueError, match="disagree"):
        fff_spec.parse_node(node)
    with pytest.raises(ValueError, match="valid choices"):
        onnx_fff.make({"fff_lowering": "triton"})
    with pytest.raises(ValueError, match="valid choices"):
        onnx_fff.make({"fff_routing": "random"})


def test_routing_margin_mask_flags_near_ties() -> None:
    node_w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # root on x0, children on x1
    node_b = torch.zeros(3)
    x = torch.tensor([[0.5, 0.5], [0.0, 0.5], [0.5, 5e-5], [-0.5, -1.0]])
    assert onnx_fff.routing_margin_mask(x, node_w, node_b).tolist() == [True, False, False, True]
    assert onnx_fff.routing_margin_mask(x[None], node_w, node_b).shape == (1, 4)


# ---------------------------------------------------------------------------------------------- property
@st.composite
def random_cfg(draw: st.DrawFn) -> tuple[Cfg, str, int, int]:
    leaves = draw(st.booleans())
    cfg = Cfg(
        activation=draw(st.sampled_from(sorted(ACT))),
        leaves=leaves,
        gated=leaves and draw(st.booleans()),
        node_out=not leaves or draw(st.booleans()),
        biases=draw(st.booleans()),
        levels=draw(st.integers(1, 4)),
        hidden=draw(st.integers(1, 12)),
        width=draw(st.integers(1, 6)),
    )
    return (
        cfg,
        draw(st.sampled_from(["dense", "gather"])),
        draw(st.sampled_from([2, 3])),
        draw(st.integers(1, 40)),
    )


@settings(max_examples=15, deadline=None)
@given(case=random_cfg(), seed=st.integers(0, 2**16))
def test_ops_lowering_matches_loop_on_random_shapes(case: tuple[Cfg, str, int, int], seed: int) -> None:
    cfg, routing, rank, tokens = case
    module = FFFStack({"f": cfg}, seed=seed)
    model = export(module, {"fff_lowering": "ops", "fff_routing": routing}, rank=rank)
    sess = session(model)
    g = torch.Generator().manual_seed(seed)
    for t in (1, tokens):
        shape = (t, cfg.hidden) if rank == 2 else (1, t, cfg.hidden)
        x = torch.randn(*shape, generator=g)
        p = module.params["f"]
        assert p["node_w"] is not None and p["node_b"] is not None
        mask = onnx_fff.routing_margin_mask(x, p["node_w"], p["node_b"])
        assert mask.float().mean() >= 0.5, "too many near-tie tokens for a meaningful check"
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        want = loop_reference(x, p, cfg.activation)
        assert got.shape == want.shape
        torch.testing.assert_close(got[mask], want[mask], atol=OPS_TOL, rtol=OPS_TOL)

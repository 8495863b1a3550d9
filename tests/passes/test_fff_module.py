"""The FFF module: parameter layout, soft routing → hard op as temperature → 0, eval == op."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from slmopt import ops
from slmopt.passes.fff.layer import FFF


@pytest.fixture(scope="session")
def native() -> None:
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the fff CPU kernel")
    assert ops.ensure_native(), "the fff C++ kernel failed to build (see the logged warning)"


def _randomise(module: FFF, seed: int = 0) -> FFF:
    """Non-zero biases everywhere so every term of the layer matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return module


def _hard_expected(m: FFF, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent hard-routing forward (gather per level, float64); returns (y, min |z| per token)."""
    d = {
        k: (v.detach().double() if v is not None else None)
        for k, v in zip(
            ("node_w", "node_b", "node_out", "w1", "b1", "wg", "bg", "w2", "b2"), m.op_args(), strict=True
        )
    }
    act = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}[m.activation]
    xt = x.reshape(-1, m.hidden).double()
    node = torch.zeros(len(xt), dtype=torch.long)
    y = torch.zeros_like(xt)
    margin = torch.full((len(xt),), math.inf, dtype=torch.float64)
    for _ in range(m.levels):
        z = (d["node_w"][node] * xt).sum(-1) + d["node_b"][node]
        margin = torch.minimum(margin, z.abs())
        if d["node_out"] is not None:
            y += act(z)[:, None] * d["node_out"][node]
        node = 2 * node + 1 + (z > 0).long()
    leaf = node - (2**m.levels - 1)
    if d["w1"] is not None:
        up = torch.einsum("th,tlh->tl", xt, d["w1"][leaf]) + (d["b1"][leaf] if d["b1"] is not None else 0)
        if d["wg"] is not None:
            gate = torch.einsum("th,tlh->tl", xt, d["wg"][leaf]) + (
                d["bg"][leaf] if d["bg"] is not None else 0
            )
            hidden = act(gate) * up
        else:
            hidden = act(up)
        y += torch.einsum("tl,tlh->th", hidden, d["w2"][leaf]) + (d["b2"][leaf] if d["b2"] is not None else 0)
    return y.reshape(x.shape), margin.reshape(x.shape[:-1])


FORMS = {
    "leaves": {"depth": 3, "leaf_width": 6},
    "gated": {"depth": 2, "leaf_width": 5, "gated": True, "activation": "silu"},
    "ufb": {"depth": 3, "node_out": True},
    "both": {"depth": 2, "leaf_width": 4, "node_out": True, "activation": "relu"},
    "no_bias": {"depth": 2, "leaf_width": 4, "leaf_bias": False, "out_bias": False},
}


def test_parameter_layout() -> None:
    m = FFF(16, depth=3, leaf_width=4, gated=True)
    assert m.levels == 3
    assert m.node_w.shape == (7, 16) and m.node_b.shape == (7,) and m.node_out is None
    for name in ("leaf_w1", "leaf_wg", "leaf_w2"):
        assert getattr(m, name).shape == (8, 4, 16)
    assert m.leaf_b1.shape == m.leaf_bg.shape == (8, 4) and m.leaf_b2.shape == (8, 16)
    ufb = FFF(768, depth=11, node_out=True)
    assert ufb.levels == 12 and ufb.node_w.shape == (4095, 768) and ufb.node_out.shape == (4095, 768)
    assert ufb.leaf_w1 is None and len(ufb.op_args()) == 9
    assert all(p.abs().sum() > 0 for n, p in m.named_parameters() if n != "node_b")  # initialised


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": 2}, "leaves"),
        ({"depth": 2, "node_out": True, "gated": True}, "gated"),
        ({"depth": 2, "leaf_width": 3, "activation": "tanh"}, "unknown activation"),
        ({"depth": 0, "leaf_width": 3}, "levels"),
    ],
)
def test_constructor_validates(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FFF(8, **kwargs)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_eval_forward_equals_op_and_reference(native: None, form: str) -> None:
    m = _randomise(FFF(24, **FORMS[form])).eval()
    x = torch.randn(3, 11, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = m(x)
        via_op = torch.ops.slmopt.fff(x, *m.op_args(), m.activation)
    assert torch.equal(y, via_op)
    want, margin = _hard_expected(m, x)
    keep = margin >= 1e-4
    torch.testing.assert_close(y[keep].double(), want[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_soft_routing_approaches_hard_op(native: None, form: str) -> None:
    m = _randomise(FFF(24, **FORMS[form]), seed=2)
    x = torch.randn(200, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hard = m.eval()(x)
        m.train()
        _, margin = _hard_expected(m, x)
        keep = margin >= 1e-2  # sigmoid(z / 1e-4) is exactly 0 or 1 in fp32 for these tokens
        errors, worst = [], 0.0
        for temperature in (1.0, 0.3, 0.1, 0.03, 0.01, 1e-4):
            m.temperature = temperature
            diff = (m(x) - hard)[keep].abs()
            errors.append(diff.mean().item())
            worst = diff.max().item()
    assert errors[0] > 1e-2  # soft routing really is different
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors  # mean error shrinks
    assert worst < 1e-5, worst  # and vanishes at the hard limit


def test_hardness_schedule() -> None:
    m = FFF(8, depth=2, leaf_width=3)
    m.max_temperature = 2.0
    m.set_hardness(0.0)
    assert m.temperature == 2.0 and m.hardness == 0.0
    m.set_hardness(0.75)
    assert m.temperature == pytest.approx(0.5) and m.hardness == pytest.approx(0.75)
    m.set_hardness(1.0)
    assert m.temperature == 0.0
    with pytest.raises(ValueError, match="hardness"):
        m.set_hardness(1.5)


@pytest.mark.parametrize("form", ["gated", "ufb", "both"])
def test_fully_hard_training_forward_equals_op(native: None, form: str) -> None:
    m = _randomise(FFF(16, **FORMS[form]), seed=4)
    m.set_hardness(1.0)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(5))
    y = m.train()(x)
    y.square().sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(y, m.eval()(x), atol=1e-5, rtol=1e-5)
    assert m.node_w.grad is not None or form != "ufb"  # UFB nodes get gradient through act(z)
    grads = [p.grad for n, p in m.named_parameters() if n.startswith(("leaf_w", "node_out"))]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_soft_forward_trains_every_parameter() -> None:
    m = _randomise(FFF(12, depth=2, leaf_width=3, gated=True, node_out=True, activation="gelu"), seed=6)
    m.temperature = 0.5
    m.train()(torch.randn(32, 12)).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_from_tensors_round_trip(native: None) -> None:
    src = _randomise(FFF(20, depth=2, leaf_width=3, gated=True, leaf_bias=False, activation="silu"), seed=7)
    copy = FFF.from_tensors(*src.op_args(), activation="silu")
    assert (copy.depth, copy.levels, copy.leaf_width, copy.gated) == (2, 2, 3, True)
    assert copy.leaf_b1 is None and copy.leaf_bg is None and copy.leaf_b2 is not None
    x = torch.randn(9, 20)
    with torch.no_grad():
        torch.testing.assert_close(copy.eval()(x), src.eval()(x))
        copy.train()
        src.train()
        torch.testing.assert_close(copy(x), src(x))
    assert copy.node_w.data_ptr() != src.node_w.data_ptr()  # copies, not views
    ufb = FFF.from_tensors(torch.randn(31, 8), torch.zeros(31), node_out=torch.randn(31, 8))
    assert (ufb.depth, ufb.levels, ufb.leaf_width) == (4, 5, 0)
    with pytest.raises(ValueError, match="power of two"):
        FFF.from_tensors(torch.randn(6, 8), torch.zeros(6), node_out=torch.randn(6, 8))


def test_eval_module_exports(native: None) -> None:
    m = _randomise(FFF(16, depth=2, leaf_width=4), seed=8).eval()
    x = torch.randn(4, 16)
    ep = torch.export.export(
        m, (x,), dynamic_shapes=({0: torch.export.Dim("tokens", min=1, max=512)},), strict=False
    )
    assert torch.ops.slmopt.fff.default in {n.target for n in ep.graph.nodes}
    x2 = torch.randn(37, 16)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x2), m(x2))

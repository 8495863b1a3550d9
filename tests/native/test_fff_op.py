"""slmopt::fff: the compiled CPU kernel and fff_reference against an independent per-token reference."""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slmopt import ops
from tests.helpers import activation

FFF_ARGS = ("node_out", "leaf_w1", "leaf_b1", "leaf_wg", "leaf_bg", "leaf_w2", "leaf_b2")


@pytest.fixture(scope="session")
def native() -> None:
    """Builds the C++ kernel once per session (cached on disk; ~15-60 s the very first time)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the fff CPU kernel")
    assert ops.ensure_native(), "the fff C++ kernel failed to build (see the logged warning)"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("slmopt::fff", "CPU")


@contextlib.contextmanager
def cpu_path(path: str) -> Iterator[None]:
    """Forces the CPU kernel's path: per_token, batched_rows (no BLAS), batched_gemm or batched_aten_mm."""
    knobs = {
        "per_token": {"small_batch": 10**9},
        "batched_rows": {"small_batch": 0, "leaf_tokens": 0, "gemm_rows": 10**9},
        "batched_gemm": {"small_batch": 0, "leaf_tokens": 0, "gemm_rows": 0},
        "batched_aten_mm": {"small_batch": 0, "leaf_tokens": 0, "gemm_rows": 0, "use_sgemm": 0},
    }[path]
    previous = ops._set_cpu_tuning(**knobs)
    try:
        yield
    finally:
        ops._set_cpu_tuning(**previous)


_act = activation  # the shared reference formulas (tests/helpers.py)


def expected_fff(
    x: torch.Tensor, p: dict[str, torch.Tensor | None], act: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straightforward per-token walk in float64; returns (y, smallest |routing logit| per token)."""
    d = {k: (v.double() if v is not None else None) for k, v in p.items()}
    h, n_nodes = x.shape[-1], d["node_w"].shape[0]
    levels = int(math.log2(n_nodes + 1))
    xs = x.reshape(-1, h).double()
    ys, margins = [], []
    for xt in xs:
        y, node, margin = torch.zeros(h, dtype=torch.float64), 0, math.inf
        for _ in range(levels):
            z = float(d["node_w"][node] @ xt + d["node_b"][node])
            margin = min(margin, abs(z))
            if d["node_out"] is not None:
                y += _act(act, torch.tensor(z, dtype=torch.float64)) * d["node_out"][node]
            node = 2 * node + 1 + (1 if z > 0 else 0)
        leaf = node - n_nodes
        if d["leaf_w1"] is not None:
            up = d["leaf_w1"][leaf] @ xt + (d["leaf_b1"][leaf] if d["leaf_b1"] is not None else 0)
            if d["leaf_wg"] is not None:
                gate = d["leaf_wg"][leaf] @ xt + (d["leaf_bg"][leaf] if d["leaf_bg"] is not None else 0)
                hidden = _act(act, gate) * up
            else:
                hidden = _act(act, up)
            y += hidden @ d["leaf_w2"][leaf] + (d["leaf_b2"][leaf] if d["leaf_b2"] is not None else 0)
        ys.append(y)
        margins.append(margin)
    return torch.stack(ys).reshape(x.shape), torch.tensor(margins).reshape(x.shape[:-1])


def make_params(
    h: int, levels: int, width: int, design: str, gated: bool, bias: bool, seed: int = 0
) -> dict[str, torch.Tensor | None]:
    """Random, properly scaled weights. design: 'leaves' (FFF), 'ufb' (UltraFastBERT) or 'both'."""
    g = torch.Generator().manual_seed(seed)
    n_nodes, n_leaves = 2**levels - 1, 2**levels

    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    p: dict[str, torch.Tensor | None] = dict.fromkeys(FFF_ARGS)
    p["node_w"] = rnd(n_nodes, h, scale=h**-0.5)
    p["node_b"] = rnd(n_nodes, scale=0.1)
    if design in ("ufb", "both"):
        p["node_out"] = rnd(n_nodes, h, scale=h**-0.5)
    if design in ("leaves", "both"):
        p["leaf_w1"] = rnd(n_leaves, width, h, scale=h**-0.5)
        p["leaf_w2"] = rnd(n_leaves, width, h, scale=width**-0.5)
        if gated:
            p["leaf_wg"] = rnd(n_leaves, width, h, scale=h**-0.5)
        if bias:
            p["leaf_b1"] = rnd(n_leaves, width, scale=0.1)
            p["leaf_b2"] = rnd(n_leaves, h, scale=0.1)
            if gated:
                p["leaf_bg"] = rnd(n_leaves, width, scale=0.1)
    return p


def call(fn, x: torch.Tensor, p: dict[str, torch.Tensor | None], act: str) -> torch.Tensor:  # noqa: ANN001
    return fn(x, p["node_w"], p["node_b"], *(p[k] for k in FFF_ARGS), act)


def assert_matches(y: torch.Tensor, x: torch.Tensor, p: dict, act: str, tol: float = 1e-5) -> None:
    """Compares with the float64 reference, skipping tokens whose routing is a near-tie (|z| < 1e-4)."""
    want, margin = expected_fff(x, p, act)
    keep = margin >= 1e-4
    assert keep.float().mean() > 0.9
    torch.testing.assert_close(y[keep].double(), want[keep], atol=tol, rtol=tol)


CASES = [
    ("leaves", False, False, "gelu"),
    ("leaves", False, True, "relu"),
    ("leaves", True, False, "silu"),
    ("leaves", True, True, "gelu"),
    ("ufb", False, False, "gelu"),
    ("ufb", False, True, "gelu_tanh"),
    ("both", False, True, "gelu_tanh"),
    ("both", True, True, "silu"),
]


@pytest.mark.parametrize("path", ["per_token", "batched_rows", "batched_gemm", "batched_aten_mm"])
@pytest.mark.parametrize("tokens", [1, 3, 300])
@pytest.mark.parametrize(("design", "gated", "bias", "act"), CASES)
def test_cpu_kernel_matches_reference(
    native: None, path: str, tokens: int, design: str, gated: bool, bias: bool, act: str
) -> None:
    p = make_params(h=72, levels=3, width=12, design=design, gated=gated, bias=bias, seed=tokens)
    x = torch.randn(tokens, 72, generator=torch.Generator().manual_seed(7))
    with cpu_path(path):
        y = call(torch.ops.slmopt.fff.default, x, p, act)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert_matches(y, x, p, act)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 2, 257])
def test_cpu_kernel_bert_size(native: None, tokens: int, threads: int) -> None:
    """h = 768, 16 leaves x 192 (the benchmark's shape). One token on two threads splits the leaf's
    neurons across threads; 257 tokens exercise full BLAS blocks."""
    p = make_params(h=768, levels=4, width=192, design="leaves", gated=False, bias=True, seed=3)
    x = torch.randn(tokens, 768, generator=torch.Generator().manual_seed(tokens))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = call(torch.ops.slmopt.fff.default, x, p, "gelu")
    finally:
        torch.set_num_threads(before)
    assert_matches(y, x, p, "gelu")


@pytest.mark.parametrize(("design", "gated", "bias", "act"), CASES)
def test_fff_reference_matches(design: str, gated: bool, bias: bool, act: str) -> None:
    p = make_params(h=40, levels=4, width=6, design=design, gated=gated, bias=bias, seed=1)
    x = torch.randn(2, 25, 40, generator=torch.Generator().manual_seed(2))
    assert_matches(call(ops.fff_reference, x, p, act), x, p, act)


def test_paths_route_identically_on_near_ties(native: None) -> None:
    """Per-token and batched paths share the routing code: tokens on a tie go the same way."""
    p = make_params(h=96, levels=3, width=8, design="leaves", gated=True, bias=True, seed=5)
    x = torch.randn(200, 96, generator=torch.Generator().manual_seed(9))
    # Put the first node's logit of a few tokens at ~0 (within rounding).
    x[:50] -= (
        (x[:50] @ p["node_w"][0] + p["node_b"][0])[:, None] * p["node_w"][0] / p["node_w"][0].square().sum()
    )
    outs = []
    for path in ("per_token", "batched_rows", "batched_gemm", "batched_aten_mm"):
        with cpu_path(path):
            outs.append(call(torch.ops.slmopt.fff.default, x, p, "gelu"))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)


def test_leading_dims_and_non_contiguous_input(native: None) -> None:
    p = make_params(h=32, levels=2, width=4, design="both", gated=False, bias=True)
    base = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    x = base[:, ::2]  # non-contiguous view
    flat = call(ops.fff, x.contiguous(), p, "relu")
    y = call(ops.fff, x.reshape(2, 3, 32), p, "relu")
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y.reshape(6, 32), flat)
    torch.testing.assert_close(call(ops.fff, x, p, "relu"), flat)


def test_bfloat16_runs_in_fp32_and_casts_back(native: None) -> None:
    p = make_params(h=48, levels=3, width=8, design="leaves", gated=False, bias=True)
    pb = {k: (v.bfloat16() if v is not None else None) for k, v in p.items()}
    x = torch.randn(20, 48, generator=torch.Generator().manual_seed(3)).bfloat16()
    y = call(torch.ops.slmopt.fff.default, x, pb, "gelu")
    assert y.dtype == torch.bfloat16
    want, margin = expected_fff(x, pb, "gelu")
    keep = margin >= 1e-4
    assert keep.float().mean() >= 0.9  # a mask that drops most tokens would compare nothing
    torch.testing.assert_close(y[keep].double(), want[keep], atol=2e-2, rtol=2e-2)


@settings(max_examples=25, deadline=None)
@given(
    levels=st.integers(1, 5),
    h=st.integers(1, 80),
    width=st.integers(1, 10),
    tokens=st.integers(1, 40),
    design=st.sampled_from(["leaves", "ufb", "both"]),
    gated=st.booleans(),
    bias=st.booleans(),
    act=st.sampled_from(sorted(ops.ACTIVATIONS)),
    path=st.sampled_from(["per_token", "batched_rows", "batched_gemm", "batched_aten_mm"]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(
    native: None,
    levels: int,
    h: int,
    width: int,
    tokens: int,
    design: str,
    gated: bool,
    bias: bool,
    act: str,
    path: str,
    seed: int,
) -> None:
    p = make_params(h, levels, width, design, gated, bias, seed)
    x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(seed + 1))
    with cpu_path(path):
        y = call(torch.ops.slmopt.fff.default, x, p, act)
    want, margin = expected_fff(x, p, act)
    keep = margin >= 1e-4
    assert keep.float().mean() >= 0.9, (
        f"only {int(keep.sum())} of {keep.numel()} tokens away from routing ties"
    )
    torch.testing.assert_close(y[keep].double(), want[keep], atol=1e-5, rtol=1e-5)


def _bad_inputs() -> list[tuple[str, dict, str]]:
    p = make_params(h=16, levels=2, width=4, design="leaves", gated=False, bias=False)
    cases = [
        ("nodes", {"node_w": torch.randn(6, 16), "node_b": torch.randn(6)}, "power of two"),
        ("hidden", {"node_w": torch.randn(3, 17)}, "hidden size"),
        ("leaves", {"leaf_w1": torch.randn(8, 4, 16), "leaf_w2": torch.randn(8, 4, 16)}, r"2\^L = 4"),
        ("w2 shape", {"leaf_w2": torch.randn(4, 5, 16)}, "leaf_w2 must have shape"),
        ("pair", {"leaf_w2": None}, "given together"),
        ("nothing", {"leaf_w1": None, "leaf_w2": None}, "nothing to compute"),
        ("dtype", {"node_b": torch.zeros(3, dtype=torch.float64)}, "dtype"),
        ("bias shape", {"node_b": torch.zeros(4)}, "node_b must have shape"),
    ]
    return [(name, {**p, **change}, msg) for name, change, msg in cases]


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize(("name", "params", "message"), _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_inputs_raise(native: None, impl: str, name: str, params: dict, message: str) -> None:
    fn = torch.ops.slmopt.fff.default if impl == "op" else ops.fff_reference
    with pytest.raises(ValueError, match=message):
        call(fn, torch.randn(3, 16), params, "gelu")


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_unknown_activation_raises(native: None, impl: str) -> None:
    fn = torch.ops.slmopt.fff.default if impl == "op" else ops.fff_reference
    p = make_params(h=16, levels=2, width=4, design="ufb", gated=False, bias=False)
    with pytest.raises(ValueError, match="unknown activation 'tanh'.*gelu, gelu_tanh, silu, relu"):
        call(fn, torch.randn(3, 16), p, "tanh")


class _Tiny(torch.nn.Module):
    def __init__(self, p: dict[str, torch.Tensor | None]) -> None:
        super().__init__()
        self.w = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in p.items() if v is not None})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        y = torch.ops.slmopt.fff(
            x * 2,
            w["node_w"],
            w["node_b"],
            None,
            w["leaf_w1"],
            w["leaf_b1"],
            None,
            None,
            w["leaf_w2"],
            w["leaf_b2"],
            "gelu",
        )
        return y + x


def test_survives_torch_export(native: None) -> None:
    p = make_params(h=24, levels=3, width=5, design="leaves", gated=False, bias=True)
    model = _Tiny(p).eval()
    x = torch.randn(2, 7, 24)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.slmopt.fff.default in targets
    x2 = torch.randn(5, 7, 24)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x2), model(x2))


def test_build_failure_falls_back_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from slmopt.native import build

    def broken(verbose: bool = False) -> str:
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(build, "load_cpu_extension", broken)
    monkeypatch.setattr(ops, "_native_state", {"tried": False, "path": None})
    with caplog.at_level(logging.WARNING, logger="slmopt.ops"):
        assert ops.ensure_native() is False
        assert ops.ensure_native() is False
    warnings = [r for r in caplog.records if "compiler exploded" in r.getMessage()]
    assert len(warnings) == 1
    assert not ops.native_available()
    p = make_params(h=16, levels=2, width=4, design="ufb", gated=False, bias=False)
    x = torch.randn(4, 16)
    torch.testing.assert_close(
        ops._fff_fallback(x, p["node_w"], p["node_b"], *(p[k] for k in FFF_ARGS), "gelu"),
        call(ops.fff_reference, x, p, "gelu"),
    )


def test_import_compiles_nothing() -> None:
    code = (
        "import sys, slmopt.ops as o; assert not o._native_state['tried']; "
        "assert 'slmopt.native.build' not in sys.modules and 'torch.utils.cpp_extension' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

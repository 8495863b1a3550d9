"""fff.cu compiles with nvcc (sm_80, sm_90, PTX); fff_common.h's host build and the CUDA kernel are correct."""

from __future__ import annotations

import ctypes
import fnmatch
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slmopt import ops
from slmopt.backends.tensorrt import kernel as trt_kernel
from slmopt.native import build

NVCC = build.find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
)
needs_cxx = pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler")

PARAM_NAMES = (
    "node_w",
    "node_b",
    "node_out",
    "leaf_w1",
    "leaf_b1",
    "leaf_wg",
    "leaf_bg",
    "leaf_w2",
    "leaf_b2",
)
ACT_IDS = {"gelu": 0, "gelu_tanh": 1, "silu": 2, "relu": 3}


class Params(ctypes.Structure):
    """ctypes mirror of SlmoptFffParams (cuda/fff_common.h)."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("x", *PARAM_NAMES, "y")] + [
        ("tokens", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("nodes", ctypes.c_int64),
        ("leaf_width", ctypes.c_int64),
        ("activation", ctypes.c_int32),
    ]


def make(h: int, levels: int, width: int, design: str, seed: int) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    n, e = 2**levels - 1, 2**levels
    p: dict[str, torch.Tensor | None] = dict.fromkeys(PARAM_NAMES)
    p["node_w"], p["node_b"] = torch.randn(n, h, generator=g) * h**-0.5, torch.randn(n, generator=g) * 0.1
    if design in ("ufb", "both"):
        p["node_out"] = torch.randn(n, h, generator=g) * h**-0.5
    if design in ("leaves", "gated", "both"):
        for name in ("leaf_w1", "leaf_w2") + (("leaf_wg",) if design == "gated" else ()):
            p[name] = torch.randn(e, width, h, generator=g) * h**-0.5
        p["leaf_b1"], p["leaf_b2"] = (
            torch.randn(e, width, generator=g) * 0.1,
            torch.randn(e, h, generator=g) * 0.1,
        )
    return p


def expected(x: torch.Tensor, p: dict, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent hard-routing forward (float64 gathers); returns (y, min |z| per token)."""
    d = {k: (v.double() if v is not None else None) for k, v in p.items()}
    fn = {
        "gelu": F.gelu,
        "silu": F.silu,
        "relu": F.relu,
        "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    }[act]
    xt = x.double()
    node = torch.zeros(len(xt), dtype=torch.long)
    y, margin = torch.zeros_like(xt), torch.full((len(xt),), float("inf"), dtype=torch.float64)
    for _ in range((d["node_w"].shape[0] + 1).bit_length() - 1):
        z = (d["node_w"][node] * xt).sum(-1) + d["node_b"][node]
        margin = torch.minimum(margin, z.abs())
        if d["node_out"] is not None:
            y += fn(z)[:, None] * d["node_out"][node]
        node = 2 * node + 1 + (z > 0).long()
    leaf = node - d["node_w"].shape[0]
    if d["leaf_w1"] is not None:
        up = torch.einsum("th,tlh->tl", xt, d["leaf_w1"][leaf]) + d["leaf_b1"][leaf]
        hidden = (
            fn(torch.einsum("th,tlh->tl", xt, d["leaf_wg"][leaf])) * up
            if d["leaf_wg"] is not None
            else fn(up)
        )
        y += torch.einsum("tl,tlh->th", hidden, d["leaf_w2"][leaf]) + d["leaf_b2"][leaf]
    return y, margin


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build.compile_host_library(tmp_path_factory.mktemp("fffhost"))))
    for entry in (lib.slmopt_fff_host_forward_f32, lib.slmopt_fff_host_forward_f16):
        entry.restype = ctypes.c_int
        entry.argtypes = [ctypes.POINTER(Params)]
    return lib


def host_forward(
    lib: ctypes.CDLL, x: torch.Tensor, p: dict, act: str, nodes: int | None = None
) -> tuple[int, torch.Tensor]:
    y = torch.empty(x.shape, dtype=torch.float32)  # the host entry points always write fp32
    ptr = {k: (v.data_ptr() if v is not None else None) for k, v in p.items()}
    width = p["leaf_w1"].shape[1] if p["leaf_w1"] is not None else 0
    nodes = p["node_w"].shape[0] if nodes is None else nodes
    params = Params(
        x.data_ptr(),
        *(ptr[k] for k in PARAM_NAMES),
        y.data_ptr(),
        x.shape[0],
        x.shape[1],
        nodes,
        width,
        ACT_IDS[act],
    )
    entry = lib.slmopt_fff_host_forward_f16 if x.dtype == torch.float16 else lib.slmopt_fff_host_forward_f32
    return entry(ctypes.byref(params)), y


@needs_cxx
@pytest.mark.parametrize(("design", "act"), [("leaves", "gelu"), ("gated", "silu"), ("ufb", "gelu_tanh")])
def test_host_build_fp16_inputs(host_lib: ctypes.CDLL, design: str, act: str) -> None:
    """fp16 storage, fp32 accumulation (as on the GPU): exact vs the reference on the fp16-rounded values,
    and within a stated 2e-2 of the fp32 model (the cost of storing weights and inputs in fp16)."""
    p32 = make(h=40, levels=3, width=7, design=design, seed=3)
    x32 = torch.randn(64, 40, generator=torch.Generator().manual_seed(4))
    p16 = {k: (v.half() if v is not None else None) for k, v in p32.items()}
    status, y = host_forward(host_lib, x32.half(), p16, act)
    assert status == 0
    rounded = {k: (v.float() if v is not None else None) for k, v in p16.items()}
    want, margin = expected(x32.half().float(), rounded, act)
    keep = margin >= 1e-3
    torch.testing.assert_close(y[keep].double(), want[keep], atol=1e-4, rtol=1e-4)
    want32, margin32 = expected(x32, p32, act)
    both = keep & (margin32 >= 1e-2)  # tokens that route the same way in fp16 and fp32
    torch.testing.assert_close(y[both].double(), want32[both], atol=2e-2, rtol=2e-2)


@needs_cxx
@pytest.mark.parametrize(
    ("design", "act"), [("leaves", "gelu"), ("gated", "silu"), ("ufb", "gelu_tanh"), ("both", "relu")]
)
def test_host_build_of_common_header_matches_reference(host_lib: ctypes.CDLL, design: str, act: str) -> None:
    p = make(h=40, levels=3, width=7, design=design, seed=1)
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(2))
    status, y = host_forward(host_lib, x, p, act)
    assert status == 0
    want, margin = expected(x, p, act)
    keep = margin >= 1e-4
    torch.testing.assert_close(y[keep].double(), want[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        y, ops.fff_reference(x, *(p[k] for k in PARAM_NAMES), act), atol=1e-5, rtol=1e-5
    )


@needs_cxx
def test_host_build_reports_bad_nodes(host_lib: ctypes.CDLL) -> None:
    p = make(h=8, levels=2, width=2, design="leaves", seed=0)
    status, _ = host_forward(host_lib, torch.randn(2, 8), p, "gelu", nodes=4)
    assert status == 1  # SLMOPT_FFF_BAD_NODES


@pytest.mark.cuda_build
@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_object(tmp_path: Path, arch: str) -> None:
    out = build.compile_cuda(arch, tmp_path)
    assert out.exists() and out.stat().st_size > 0
    symbols = subprocess.run(["nm", str(out)], capture_output=True, text=True, check=True).stdout
    for name in (
        "slmopt_fff_forward_f32",
        "slmopt_fff_forward_f16",
        "slmopt_fff_forward_bf16",
        "slmopt_fff_workspace_size",
    ):
        assert f" T {name}" in symbols
    cuobjdump = Path(NVCC).with_name("cuobjdump")
    if cuobjdump.exists():
        elf = subprocess.run([str(cuobjdump), "--list-elf", str(out)], capture_output=True, text=True).stdout
        assert arch in elf


@pytest.mark.cuda_build
@needs_nvcc
def test_nvcc_emits_ptx_without_torch(tmp_path: Path) -> None:
    cmd = build.nvcc_command("sm_90", tmp_path / "x.ptx", ptx=True)
    assert "-DSLMOPT_WITH_TORCH" not in cmd and not any("torch" in c for c in cmd)
    ptx = build.compile_cuda("90", tmp_path, ptx=True).read_text()
    assert ".target sm_90" in ptx
    for kernel in (
        "token_kernel",
        "route_kernel",
        "scan_kernel",
        "scatter_kernel",
        "leaf_up_kernel",
        "leaf_down_kernel",
    ):
        assert kernel in ptx and ".entry" in ptx


def test_nvcc_command_flags() -> None:
    cmd = build.nvcc_command("sm_80", Path("o/fff.o"))
    assert (
        "-std=c++17" in cmd
        and "-O3" in cmd
        and "--generate-code=arch=compute_80,code=[compute_80,sm_80]" in cmd
    )
    assert cmd[-2:] == ["-o", "o/fff.o"] and cmd[-3].endswith("fff.cu")
    with pytest.raises(ValueError, match="sm_80"):
        build.nvcc_command("ampere", Path("x.o"))


# The CUDA kernel's GPU checks (registered op, launcher API, plugin PTX) live in test_cuda_gpu.py.


def test_cuda_tensors_build_and_register_the_cuda_kernel(monkeypatch, caplog) -> None:
    """The op itself loads fff.cu on its first CUDA call (issue 15: nothing called load_cuda_kernel, so CUDA
    tensors always ran the reference); a failed build warns once and is not retried."""
    if ops._has_kernel("CUDA"):
        pytest.skip("a CUDA kernel is already registered in this process")
    monkeypatch.delenv("SLMOPT_NO_NATIVE", raising=False)
    calls: list[bool] = []

    def broken_build(verbose: bool = False) -> str:
        calls.append(verbose)
        raise RuntimeError("nvcc exploded")

    monkeypatch.setattr(build, "load_cuda_extension", broken_build)
    monkeypatch.setattr(ops, "_cuda_state", {"tried": False, "error": None})
    with caplog.at_level(logging.WARNING, logger="slmopt.ops"):
        assert not ops._compiled_kernel_ready("cuda") and not ops._compiled_kernel_ready("cuda")
    assert calls == [False]
    assert [r.getMessage() for r in caplog.records if "nvcc exploded" in r.getMessage()] != []
    assert len([r for r in caplog.records if "CUDA kernel unavailable" in r.getMessage()]) == 1

    lib = torch.library.Library("slmopt", "IMPL")  # stands in for the extension's TORCH_LIBRARY_IMPL

    def working_build(verbose: bool = False) -> str:
        lib.impl("fff", lambda *args: args[0], "CUDA")
        return "libfake.so"

    monkeypatch.setattr(build, "load_cuda_extension", working_build)
    monkeypatch.setattr(ops, "_cuda_state", {"tried": False, "error": None})
    try:
        assert ops._compiled_kernel_ready("cuda") and ops._has_kernel("CUDA")
    finally:
        lib._destroy()
    assert not ops._has_kernel("CUDA") and not ops._compiled_kernel_ready("meta")


def test_every_included_kernel_source_ships_in_the_wheel() -> None:
    """fff.cu, the plugin's generated unit and the emulator include headers by name; each must match the
    package-data globs of slmopt.native, or an installed slmopt cannot compile its kernels."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = build.SOURCE_DIR.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "slmopt.native"
    ]
    sources = [p.read_text() for p in build.SOURCE_DIR.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp")]
    included = {
        name
        for text in [*sources, trt_kernel.kernel_source()]
        for name in re.findall(r'#include "([^"]+)"', text)
    }
    included |= set(trt_kernel.KERNEL_HEADERS) | {"fff.cu", "fff_emu.cpp", "fff_emu.h"}
    assert {"fff_token_kernel.cuh", "fff_launch.cuh", "fff_batched_kernels.cuh", "fff_common.h"} <= included
    for name in included:
        assert (build.SOURCE_DIR / name).is_file(), name
        assert any(fnmatch.fnmatch(name, g) for g in globs), f"{name} is not shipped (package-data {globs})"

"""The CUDA kernels' own source, run on the host emulator (cuda/fff_emu.h) block by block.

What a GPU-less machine can check beyond the per-token math: fff.cu's launch logic (token vs batched design
at the T = 16/17 boundary, grid sizes, column-tile offsets, per-leaf buckets, the shared-memory opt-in and its
fallback) and the plugin's entry points launched with plugins.launch_config / kernel_args, with every
block's shared memory poisoned and threads scheduled so a missing __syncthreads reads the poison.
"""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import pytest
import torch

from slmopt import ops
from slmopt.backends import fff_spec
from slmopt.backends.tensorrt import plugins
from slmopt.native import build
from tests.native.test_cuda_build import PARAM_NAMES, Params, expected, make

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler")

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # output rounding of the dtype
ORDERS = (0, 1)  # lowest-numbered thread first / highest first


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build.compile_emulator(tmp_path_factory.mktemp("fffemu"))))
    lib.slmopt_fff_emu_forward.restype = ctypes.c_int
    lib.slmopt_fff_emu_forward.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(Params),
        ctypes.c_void_p,
        ctypes.c_size_t,
    ]
    lib.slmopt_fff_emu_workspace_size.restype = ctypes.c_size_t
    lib.slmopt_fff_emu_workspace_size.argtypes = [ctypes.POINTER(Params), ctypes.c_int]
    lib.slmopt_fff_emu_configure.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_int]
    lib.slmopt_fff_emu_log.restype = ctypes.c_char_p
    lib.slmopt_fff_emu_set_multiprocessors.argtypes = [ctypes.c_int]
    yield lib
    lib.slmopt_fff_emu_configure(0, 227 * 1024, 0)


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))  # every element the kernels fail to write stays NaN


def emulate(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    p: dict,
    act: str,
    order: int = 0,
    optin: int = 227 * 1024,
    refuse: int = 0,
    workspace: bool = True,
) -> tuple[torch.Tensor, str]:
    """fff.cu's forward on the emulator (an H200's 132 SMs unless set): (y in x's dtype, launch log)."""
    lib.slmopt_fff_emu_configure(order, optin, refuse)
    y = poisoned_like(x)
    ptr = {k: (v.data_ptr() if v is not None else None) for k, v in p.items()}
    width = p["leaf_w1"].shape[1] if p["leaf_w1"] is not None else 0
    params = Params(
        x.data_ptr(), *(ptr[k] for k in PARAM_NAMES), y.data_ptr(), x.shape[0], x.shape[1],
        p["node_w"].shape[0], width, ops_activation_id(act),
    )  # fmt: skip
    size = lib.slmopt_fff_emu_workspace_size(ctypes.byref(params), x.element_size()) if workspace else 0
    ws = torch.full((max(size, 1),), 0xFF, dtype=torch.uint8)  # poisoned: kernels must write before reading
    status = lib.slmopt_fff_emu_forward(DTYPES[x.dtype], ctypes.byref(params), ws.data_ptr(), size)
    log = lib.slmopt_fff_emu_log().decode()
    assert status == 0, f"status {status}:\n{log}"
    return y, log


def ops_activation_id(act: str) -> int:
    return plugins.ACTIVATION_IDS[act]


def check(y: torch.Tensor, x: torch.Tensor, p: dict, act: str, what: str) -> None:
    """y against the float64 reference on the dtype-rounded inputs; at least 90% of tokens compared."""
    assert not torch.isnan(y).any(), f"{what}: unwritten (NaN-poisoned) outputs"
    want, margin = expected(x.float(), {k: (v.float() if v is not None else None) for k, v in p.items()}, act)
    keep = margin >= 1e-3  # tokens near a routing tie may legitimately take the other branch in fp32
    assert keep.float().mean() >= 0.9, f"{what}: too few tokens away from routing ties to compare"
    tol = TOL[y.dtype]
    torch.testing.assert_close(y[keep].double(), want[keep], atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def inputs(h: int, levels: int, width: int, design: str, tokens: int, dtype: torch.dtype, seed: int):
    p = {k: (v.to(dtype) if v is not None else None) for k, v in make(h, levels, width, design, seed).items()}
    x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(seed + 100)).to(dtype)
    return x, p


@pytest.mark.parametrize(
    ("design", "act", "tokens"),
    [("gated", "silu", 1), ("both", "gelu", 16), ("gated", "silu", 17), ("leaves", "gelu_tanh", 17),
     ("both", "relu", 90), ("ufb", "gelu", 40)],
)  # fmt: skip
def test_emulated_kernels_match_reference(emu: ctypes.CDLL, design: str, act: str, tokens: int) -> None:
    """h = 96 and l = 72 span two column tiles of both GEMMs (col0 = 64 in the second)."""
    x, p = inputs(96, 3, 72, design, tokens, torch.float32, seed=tokens)
    for order in ORDERS:
        y, log = emulate(emu, x, p, act, order=order)
        first = log.split()[0]
        # The T = 16/17 boundary; at T <= 16 a leaf of 72 neurons splits into 9 slices of 8 per token.
        want = "route_kernel" if tokens > 16 else "token_kernel" if design == "ufb" else "token_split_kernel"
        assert first == want, log
        if want == "token_split_kernel":
            assert log.startswith(f"token_split_kernel grid={tokens}x9 ") and "reduce_kernel" in log, log
        if tokens > 16 and design != "ufb":
            assert "leaf_down_kernel grid=" in log and "x2 " in log.split("leaf_down_kernel grid=")[1], log
        check(y, x, p, act, f"{design} T={tokens} order={order}")


@pytest.mark.parametrize(("sms", "workspace", "want"), [(132, False, "token_kernel"), (1, True, "token_kernel"),
                                                        (4, True, "token_split_kernel grid=3x3 ")])  # fmt: skip
def test_token_design_without_room_to_split(emu: ctypes.CDLL, sms: int, workspace: bool, want: str) -> None:
    """No workspace (the launcher API allows none at T <= 16) or a one-SM device: one block per token;
    4 SMs and 3 tokens: ceil(8 / 3) = 3 slices (about two blocks per SM), not 9."""
    emu.slmopt_fff_emu_set_multiprocessors(sms)
    try:
        x, p = inputs(96, 3, 72, "gated", 3, torch.float32, seed=4)
        y, log = emulate(emu, x, p, "silu", workspace=workspace)
    finally:
        emu.slmopt_fff_emu_set_multiprocessors(132)
    assert log.startswith(want), log
    check(y, x, p, "silu", f"sms={sms} workspace={workspace}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [16, 17])
def test_emulated_low_precision_storage(emu: ctypes.CDLL, dtype: torch.dtype, tokens: int) -> None:
    x, p = inputs(80, 2, 20, "both", tokens, dtype, seed=7)
    y, _ = emulate(emu, x, p, "gelu")
    check(y, x, p, "gelu", f"{dtype} T={tokens}")


def test_token_kernel_shared_memory_opt_in_and_fallback(emu: ctypes.CDLL) -> None:
    """(2h + l) * 4 bytes above 48 KiB: opt in when the device allows it, else the batched path, same result."""
    h, width = 6200, 8
    x, p = inputs(h, 1, width, "leaves", 2, torch.float32, seed=5)
    smem = (2 * h + width) * 4
    y, log = emulate(emu, x, p, "relu", optin=smem)
    assert log.startswith(f"token_kernel grid=2x1 block=256 smem={smem}"), log
    check(y, x, p, "relu", "opt-in")
    for optin, refuse in (
        (smem - 4, 0),
        (227 * 1024, 1),
    ):  # device limit too small / cudaFuncSetAttribute fails
        y, log = emulate(emu, x, p, "relu", optin=optin, refuse=refuse)
        assert log.startswith("route_kernel") and "token_kernel" not in log, log
        check(y, x, p, "relu", f"fallback optin={optin} refuse={refuse}")


# --------------------------------------------------------------------------------------- TensorRT plugin
_CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def plugin_harness() -> str:
    """C entry that launches one plugin kernel on the emulator the way TensorRT's AOT launch does."""
    n_in, n_extra = len(plugins.PLUGIN_INPUTS), len(plugins.EXTRA_ARGS)
    cases = []
    for i, (dtype, name) in enumerate(plugins.KERNEL_NAMES.items()):
        t = _CTYPES[dtype]
        args = ", ".join(
            [f"static_cast<const {t}*>(in[{k}])" for k in range(n_in)]
            + [f"extra[{k}]" for k in range(n_extra)]
        )
        cases.append(f"  if (dtype == {i}) body = [&] {{ {name}({args}, static_cast<{t}*>(y)); }};")
    return (
        "\n#include <functional>\n#include <string>\n"
        'extern "C" const char* slmopt_trt_emu_run(int dtype, const void* const* in, const int* extra, void* y,\n'
        "    unsigned grid, unsigned block, unsigned long long smem, int order) {\n"
        "  static std::string error;\n  std::function<void()> body;\n" + "\n".join(cases) + "\n"
        "  slmopt_emu::machine().order = static_cast<slmopt_emu::Order>(order);\n"
        "  error = slmopt_emu::launch(dim3(grid), dim3(block), smem, slmopt_emu::kDefaultDynamicShared, body);\n"
        "  return error.c_str();\n}\n"
    )


@pytest.fixture(scope="module")
def plugin_emu(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    out = tmp_path_factory.mktemp("trtemu") / "libtrtemu.so"
    lib = ctypes.CDLL(str(build.compile_emulated(plugins.kernel_source() + plugin_harness(), out)))
    lib.slmopt_trt_emu_run.restype = ctypes.c_char_p
    lib.slmopt_trt_emu_run.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_uint, ctypes.c_uint, ctypes.c_ulonglong, ctypes.c_int]  # fmt: skip
    return lib


def run_plugin(
    lib: ctypes.CDLL, spec: fff_spec.FFFSpec, x: torch.Tensor, p: dict, order: int
) -> torch.Tensor:
    """One plugin call as TensorRT makes it: placeholders for absent inputs, launch_config's geometry."""
    placeholder = torch.full((1,), float("nan"), dtype=x.dtype)  # bind_plugin_inputs' one-element stand-in
    tensors = [x] + [p[name] if p[name] is not None else placeholder for name in plugins.PLUGIN_INPUTS[1:]]
    ptrs = (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))
    extra = (ctypes.c_int * len(plugins.EXTRA_ARGS))(*plugins.kernel_args(spec, x.shape[1]))
    cfg = plugins.launch_config(x.shape[0], x.shape[1], spec.leaf_width)
    y = poisoned_like(x)
    dtype = list(plugins.KERNEL_NAMES).index(next(k for k, v in _TORCH.items() if v == x.dtype))
    error = lib.slmopt_trt_emu_run(
        dtype, ptrs, extra, y.data_ptr(), cfg.grid[0], cfg.block[0], cfg.shared_mem, order
    )
    assert error == b"", error.decode()
    return y


def spec_for(design: str, act: str, levels: int, width: int) -> fff_spec.FFFSpec:
    leaves = design != "ufb"
    return fff_spec.FFFSpec(
        activation=act, levels=levels, leaf_width=width if leaves else 0, gated=design == "gated",
        has_node_out=design in ("ufb", "both"), has_leaves=leaves, has_leaf_b1=leaves, has_leaf_b2=leaves,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("design", "act"), [("gated", "silu"), ("both", "gelu"), ("ufb", "gelu_tanh")])
def test_emulated_plugin_kernel_matches_reference(
    plugin_emu: ctypes.CDLL, design: str, act: str, dtype: str
) -> None:
    h, levels, width = 300, 3, 40  # h > 256 threads: each thread loads and writes two columns
    x, p = inputs(h, levels, width, design, 9, _TORCH[dtype], seed=11)
    spec = spec_for(design, act, levels, width)
    for order in ORDERS:
        y = run_plugin(plugin_emu, spec, x, p, order)
        check(y, x, p, act, f"plugin {design} {dtype} order={order}")
    if dtype == "float32":  # the plugin and the op agree exactly on the same per-token math
        want = ops.fff_reference(x, *(p[k] for k in PARAM_NAMES), act)
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_emulator_exposes_a_missing_barrier(tmp_path: Path) -> None:
    """Self-test of the emulator: a kernel that reads another warp's shared-memory write without a barrier
    reads poison, and the same kernel with the barrier is right."""
    source = """
    __global__ void shift(const float* in, float* out, int barrier) {
      SLMOPT_DYNAMIC_SHARED(float, s);
      s[threadIdx.x] = in[threadIdx.x];
      if (barrier) __syncthreads();
      out[threadIdx.x] = s[(threadIdx.x + 32) % blockDim.x];
    }
    extern "C" const char* run(const float* in, float* out, int barrier, int order) {
      static std::string e;
      slmopt_emu::machine().order = static_cast<slmopt_emu::Order>(order);
      e = slmopt_emu::launch(dim3(1), dim3(128), 512, 512, [&] { shift(in, out, barrier); });
      return e.c_str();
    }
    """
    lib = ctypes.CDLL(str(build.compile_emulated("#include <string>\n" + source, tmp_path / "shift.so")))
    lib.run.restype = ctypes.c_char_p
    lib.run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    x = torch.arange(128, dtype=torch.float32)
    for order in ORDERS:
        out = torch.zeros(128)
        assert lib.run(x.data_ptr(), out.data_ptr(), 1, order) == b""
        assert torch.equal(out, x.roll(-32))
        out = torch.zeros(128)
        assert lib.run(x.data_ptr(), out.data_ptr(), 0, order) == b""
        assert torch.isnan(out).any()  # some thread read a neighbour's slot before it was written

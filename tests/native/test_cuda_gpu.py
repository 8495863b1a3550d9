"""On a CUDA GPU (marked ``gpu``; skipped elsewhere): the registered CUDA kernel of ``slmopt::fff``, its
extern "C" launcher API and the TensorRT plugin's PTX, each against an independent float64 reference.

Inputs are fresh random draws every run (the seed is printed on failure, ``SLMOPT_TEST_SEED`` replays one);
outputs written through the launcher API are NaN-poisoned first, so an unwritten element fails.
``scripts/gpu_check.sh`` runs this file on a GPU machine.
"""

from __future__ import annotations

import ctypes
import os
import secrets
from collections.abc import Callable

import pytest
import torch

from slmopt import ops
from slmopt.backends.tensorrt import plugins
from slmopt.native import build
from tests.native.test_cuda_build import PARAM_NAMES, Params, expected, make
from tests.native.test_kernel_emulation import spec_for

pytestmark = [pytest.mark.gpu, pytest.mark.cuda_build]

SEED = int(os.environ.get("SLMOPT_TEST_SEED", secrets.randbits(31)))
DESIGNS = {"leaves": "gelu", "gated": "silu", "ufb": "gelu_tanh", "both": "relu"}
# ||y - ref|| / ||ref|| bounds: fp32 arithmetic, then the output rounding of fp16 / bf16 storage.
REL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ELEM = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def draw(h: int, levels: int, width: int, design: str, tokens: int, dtype: torch.dtype, salt: int):
    """(x, params) on the GPU in dtype, and the same values as fp32 CPU tensors for the reference."""
    p = make(h, levels, width, design, SEED + salt)
    x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(SEED + salt + 1))
    dev = {k: (v.to("cuda", dtype) if v is not None else None) for k, v in p.items()}
    ref = {k: (v.float().cpu() if v is not None else None) for k, v in dev.items()}
    return x.to("cuda", dtype), dev, x.to(dtype).float(), ref


def check(y: torch.Tensor, x_ref: torch.Tensor, p_ref: dict, act: str, dtype: torch.dtype, what: str) -> None:
    """y against the float64 reference on the same (dtype-rounded) values: norm-wise and element-wise."""
    y = y.float().cpu()
    what = f"{what} (SLMOPT_TEST_SEED={SEED})"
    assert not torch.isnan(y).any(), f"{what}: NaN in the output (an element was not written)"
    want, margin = expected(x_ref, p_ref, act)
    keep = margin >= 1e-3  # near-tie tokens may route the other way under fp32 summation order
    assert keep.float().mean() >= 0.9, f"{what}: fewer than 90% of tokens away from routing ties"
    got, want = y[keep].double(), want[keep]
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= REL[dtype], f"{what}: relative error {rel:.2e} > {REL[dtype]:.0e}"
    torch.testing.assert_close(got, want, atol=ELEM[dtype], rtol=ELEM[dtype], msg=lambda m: f"{what}: {m}")


def test_op_on_cuda_runs_the_compiled_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """No explicit load: the op's first CUDA call builds and registers fff.cu, and the reference never runs."""

    def no_reference(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError(f"slmopt::fff ran the PyTorch reference on CUDA tensors: {ops._cuda_state}")

    monkeypatch.setattr(ops, "fff_reference", no_reference)
    x, p, x_ref, p_ref = draw(128, 3, 16, "gated", 5, torch.float32, salt=0)
    y = ops.fff(x, *(p[k] for k in PARAM_NAMES), activation="silu")
    assert ops._has_kernel("CUDA"), ops._cuda_state
    check(y, x_ref, p_ref, "silu", torch.float32, "op, first CUDA call")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_reference(dtype: torch.dtype) -> None:
    """T = 1 and 16 take the token design (leaf split over 9 blocks per token), 17 and 4096 the batched
    one; h = 320 > 256 threads and > 64 columns (several GEMM column tiles), l = 72 > one 64-wide tile."""
    for design, act in DESIGNS.items():
        for tokens in (1, 16, 17, 4096):
            x, p, x_ref, p_ref = draw(320, 4, 72, design, tokens, dtype, salt=tokens)
            y = torch.ops.slmopt.fff(x, *(p[k] for k in PARAM_NAMES), act)
            assert y.dtype == dtype and y.shape == x.shape
            check(y, x_ref, p_ref, act, dtype, f"{design} {dtype} T={tokens}")


@pytest.mark.parametrize(
    ("hidden", "what"), [(6200, "opt-in above 48 KiB"), (30000, "over the device limit")]
)
def test_large_hidden_token_path(hidden: int, what: str) -> None:
    """(2h + l) * 4 bytes of shared memory: 49.6 KB needs the opt-in; 240 KB exceeds an H100/H200's 227 KB,
    so the batched path must take over (before the fix: an unchecked opt-in and a failed launch)."""
    x, p, x_ref, p_ref = draw(hidden, 1, 8, "leaves", 3, torch.float32, salt=hidden)
    y = torch.ops.slmopt.fff(x, *(p[k] for k in PARAM_NAMES), "gelu")
    torch.cuda.synchronize()
    check(y, x_ref, p_ref, "gelu", torch.float32, what)


def _cudart() -> ctypes.CDLL:
    """The CUDA runtime this process already loaded (torch's; the extension binds to the same soname)."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcudart" in line}
    assert paths, "no libcudart loaded"
    return ctypes.CDLL(sorted(paths)[0])


@pytest.fixture(scope="module")
def launcher() -> ctypes.CDLL:
    lib = ctypes.CDLL(build.load_cuda_extension())
    for name in ("slmopt_fff_forward_f32", "slmopt_fff_forward_f16", "slmopt_fff_forward_bf16"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(Params), ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.slmopt_fff_workspace_size.restype = ctypes.c_size_t
    lib.slmopt_fff_workspace_size.argtypes = [ctypes.POINTER(Params), ctypes.c_int]
    lib.slmopt_fff_last_cuda_error.restype = ctypes.c_int
    return lib


def prepare(
    lib: ctypes.CDLL, x: torch.Tensor, p: dict, act: str, nodes: int | None = None, workspace: bool = True
) -> tuple[Callable[[], int], torch.Tensor]:
    """A no-argument call of the launcher API for x (returns its status) and the NaN-poisoned output."""
    y = torch.full_like(x, float("nan"))  # poison: every element must be written
    ptr = {k: (v.data_ptr() if v is not None else None) for k, v in p.items()}
    width = p["leaf_w1"].shape[1] if p["leaf_w1"] is not None else 0
    params = Params(
        x.data_ptr(), *(ptr[k] for k in PARAM_NAMES), y.data_ptr(), x.shape[0], x.shape[1],
        p["node_w"].shape[0] if nodes is None else nodes, width, plugins.ACTIVATION_IDS[act],
    )  # fmt: skip
    size = lib.slmopt_fff_workspace_size(ctypes.byref(params), x.element_size()) if workspace else 0
    ws = torch.full((max(size, 1),), 0xFF, dtype=torch.uint8, device=x.device)  # poisoned workspace too
    entry = {torch.float32: lib.slmopt_fff_forward_f32, torch.float16: lib.slmopt_fff_forward_f16,
             torch.bfloat16: lib.slmopt_fff_forward_bf16}[x.dtype]  # fmt: skip
    stream = torch.cuda.current_stream().cuda_stream
    keep = (params, ws)  # alive as long as the closure

    def call() -> int:
        return entry(ctypes.byref(keep[0]), keep[1].data_ptr(), size, stream)

    return call, y


def launch(
    lib: ctypes.CDLL, x: torch.Tensor, p: dict, act: str, nodes: int | None = None, workspace: bool = True
) -> tuple[int, torch.Tensor]:
    call, y = prepare(lib, x, p, act, nodes, workspace)
    status = call()
    torch.cuda.synchronize()
    return status, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_launcher_api_writes_every_output(launcher: ctypes.CDLL, dtype: torch.dtype) -> None:
    for design, act in DESIGNS.items():
        for tokens in (1, 16, 17, 1000):
            x, p, x_ref, p_ref = draw(200, 3, 24, design, tokens, dtype, salt=7 * tokens)
            # T <= 16 with the full workspace: each token's leaf split over blocks; with none: one block each
            for workspace in (True, False) if tokens <= 16 else (True,):
                status, y = launch(launcher, x, p, act, workspace=workspace)
                assert status == 0 and launcher.slmopt_fff_last_cuda_error() == 0
                check(
                    y, x_ref, p_ref, act, dtype, f"launcher {design} {dtype} T={tokens} workspace={workspace}"
                )


def test_launcher_leaves_unrelated_errors_alone(launcher: ctypes.CDLL) -> None:
    """An error pending from earlier, unrelated work is neither blamed on fff nor consumed by it (before the
    fix, forward ended with cudaGetLastError(), which did both)."""
    cudart = _cudart()
    x, p, x_ref, p_ref = draw(64, 2, 8, "leaves", 4, torch.float32, salt=3)
    call, y = prepare(launcher, x, p, "gelu")
    count = ctypes.c_int()
    torch.cuda.synchronize()
    assert cudart.cudaGetDeviceCount(ctypes.byref(count)) == 0 and cudart.cudaGetLastError() == 0
    # No torch call between here and the check below: torch's launch checks would consume the error.
    assert cudart.cudaSetDevice(count.value + 5) != 0  # invalid device: sets the runtime's last error
    status = call()
    pending = cudart.cudaGetLastError()
    assert status == 0, "fff reported an error it did not cause"
    assert pending != 0, "fff consumed an error it did not cause"
    torch.cuda.synchronize()
    check(y, x_ref, p_ref, "gelu", torch.float32, "after a pending error")
    bad, _ = launch(launcher, x, p, "gelu", nodes=4)
    assert bad == 1  # SLMOPT_FFF_BAD_NODES, before any launch


# -------------------------------------------------------------------------------- the plugin's PTX
class _Driver:
    """The CUDA driver API through ctypes: load PTX and launch an entry exactly as TensorRT's AOT path."""

    def __init__(self) -> None:
        self.cuda = ctypes.CDLL("libcuda.so.1")
        self.cuda.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            self.cuda.cuGetErrorString(rc, ctypes.byref(msg))
            raise AssertionError(f"{what}: CUDA driver error {rc} ({msg.value})")

    def load(self, ptx: bytes) -> ctypes.c_void_p:
        module = ctypes.c_void_p()
        self.check(
            self.cuda.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(ptx + b"\0")), "cuModuleLoadData"
        )
        return module

    def launch(self, module: ctypes.c_void_p, name: str, cfg: plugins.LaunchConfig, args: list) -> None:
        fn = ctypes.c_void_p()
        self.check(self.cuda.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()), name)
        values = (ctypes.c_void_p * len(args))(*(ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args))
        stream = torch.cuda.current_stream().cuda_stream
        rc = self.cuda.cuLaunchKernel(fn, *cfg.grid, *cfg.block, cfg.shared_mem, stream, values, None)
        self.check(rc, f"cuLaunchKernel {name}")


@pytest.mark.parametrize("arch", [plugins.DEFAULT_ARCH, "sm_90"])
def test_plugin_ptx_runs_on_this_gpu(arch: str) -> None:
    """The PTX TensorRT would embed (ISA pinned at kernel.PTX_ISA), JIT-loaded by this driver and launched
    with the plugin's own launch_config / kernel_args / placeholder binding."""
    torch.zeros(1, device="cuda")  # make torch's primary context current on this thread
    ptx = plugins.compile_ptx(arch).read_bytes()
    assert f".version {plugins.PTX_ISA}".encode() in ptx
    driver = _Driver()
    module = driver.load(ptx)
    for dtype_name, dtype in (
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
    ):
        for design, act in DESIGNS.items():
            x, p, x_ref, p_ref = draw(300, 3, 40, design, 37, dtype, salt=11)
            spec = spec_for(design, act, 3, 40)
            placeholder = torch.full((1,), float("nan"), dtype=dtype, device="cuda")
            tensors = [x] + [p[n] if p[n] is not None else placeholder for n in plugins.PLUGIN_INPUTS[1:]]
            y = torch.full_like(x, float("nan"))
            args = [ctypes.c_uint64(t.data_ptr()) for t in tensors]
            args += [ctypes.c_int32(v) for v in plugins.kernel_args(spec, x.shape[1])] + [
                ctypes.c_uint64(y.data_ptr())
            ]
            cfg = plugins.launch_config(x.shape[0], x.shape[1], spec.leaf_width)
            driver.launch(module, plugins.KERNEL_NAMES[dtype_name], cfg, args)
            torch.cuda.synchronize()
            check(y, x_ref, p_ref, act, dtype, f"plugin PTX {arch} {design} {dtype_name}")

// CUDA build of slmopt::fff (fp32 / fp16 / bf16 storage, fp32 accumulation); semantics in fff_common.h.
//
// The kernels live in headers shared with other builds: fff_token_kernel.cuh (T <= 16: one block per token;
// also compiled into the TensorRT plugin's PTX), fff_batched_kernels.cuh (route -> per-leaf buckets -> tiled
// GEMMs) and fff_launch.cuh (which design runs, grids, shared memory, workspace). This file adds the CUDA
// executor those run on and the extern "C" API; fff_emu.cpp runs the very same headers on the host.
//
// Plain `nvcc -c fff.cu` builds the kernels and the extern "C" launchers (for a TensorRT plugin); with
// -DSLMOPT_WITH_TORCH it also registers the op's CUDA kernel with the dispatcher.
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "fff_launch.cuh"

namespace slmopt {
namespace fff {
namespace {

thread_local cudaError_t last_error = cudaSuccess;  // the first failed CUDA call of the latest forward

// Launches on one stream. Every call reports its own status (cudaLaunchKernelEx returns the error of
// that launch), so an error left pending by unrelated earlier work is neither blamed on fff nor consumed;
// an error fff itself caused is cleared from the runtime's last-error slot after being recorded, so the
// caller's next cudaGetLastError does not report it a second time.
struct CudaExec {
  cudaStream_t stream;

  int record(cudaError_t err) {
    if (err == cudaSuccess) return 0;
    if (last_error == cudaSuccess) last_error = err;
    (void)cudaGetLastError();
    return 1;
  }

  template <typename... Params, typename... Args>
  int launch(const char* /*name*/, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
             Args... args) {
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    return record(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...));
  }

  template <typename... Params>
  bool opt_in_dynamic_smem(void (*kernel)(Params...), size_t bytes) {
    int device = 0, limit = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    if (bytes > static_cast<size_t>(limit)) return false;  // the batched path takes over
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) !=
        cudaSuccess) {
      (void)cudaGetLastError();  // refused: fall back rather than leave our error for the caller to find
      return false;
    }
    return true;
  }

  int memset(void* ptr, int value, size_t bytes) { return record(cudaMemsetAsync(ptr, value, bytes, stream)); }

  int multiprocessors() {
    int device = 0, count = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      (void)cudaGetLastError();
      return 1;  // unknown: one block per token, as before the split design
    }
    return count;
  }
};

template <typename T>
int forward_on_stream(const SlmoptFffParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  last_error = cudaSuccess;
  CudaExec exec{stream};
  return forward<T>(p, workspace, workspace_bytes, exec);
}

}  // namespace
}  // namespace fff
}  // namespace slmopt

// ---- extern "C" launcher API (raw pointers; what a TensorRT plugin calls) ----
extern "C" {

// Bytes of device workspace forward needs. For T <= 16 a smaller workspace (even none) still works: the
// token design then runs one block per token instead of splitting each token's leaf over several.
size_t slmopt_fff_workspace_size(const SlmoptFffParams* p, int element_bytes) {
  return slmopt::fff::workspace_layout(*p, element_bytes, nullptr, nullptr);
}

// The cudaError_t behind the latest SLMOPT_FFF_CUDA_ERROR on this host thread (cudaSuccess if none).
int slmopt_fff_last_cuda_error(void) { return static_cast<int>(slmopt::fff::last_error); }

int slmopt_fff_forward_f32(const SlmoptFffParams* p, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  return slmopt::fff::forward_on_stream<float>(*p, workspace, workspace_bytes, stream);
}

int slmopt_fff_forward_f16(const SlmoptFffParams* p, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  return slmopt::fff::forward_on_stream<__half>(*p, workspace, workspace_bytes, stream);
}

int slmopt_fff_forward_bf16(const SlmoptFffParams* p, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream) {
  return slmopt::fff::forward_on_stream<__nv_bfloat16>(*p, workspace, workspace_bytes, stream);
}

}  // extern "C"

#ifdef SLMOPT_WITH_TORCH
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

namespace {

using Opt = slmopt::fff::OptTensor;

at::Tensor fff_cuda(const at::Tensor& x_in, const at::Tensor& node_w, const at::Tensor& node_b,
                    const Opt& node_out, const Opt& w1, const Opt& b1, const Opt& wg, const Opt& bg,
                    const Opt& w2, const Opt& b2, c10::string_view activation) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int act = slmopt::fff::activation_id(activation);
  slmopt::fff::check_args(x_in, node_w, node_b, node_out, w1, b1, wg, bg, w2, b2);
  const int64_t h = x_in.size(-1), N = node_w.size(0), l = w1 ? w1->size(1) : 0;
  auto c = [](const Opt& t) -> Opt { return t ? Opt(t->contiguous()) : std::nullopt; };
  auto ptr = [](const Opt& t) -> const void* { return t ? t->data_ptr() : nullptr; };
  const at::Tensor x = x_in.contiguous();
  const Opt nw = c(node_w), nb = c(node_b), no = c(node_out), cw1 = c(w1), cb1 = c(b1), cwg = c(wg),
            cbg = c(bg), cw2 = c(w2), cb2 = c(b2);
  at::Tensor y = at::empty_like(x);
  SlmoptFffParams p{x.data_ptr(), ptr(nw), ptr(nb), ptr(no), ptr(cw1), ptr(cb1), ptr(cwg), ptr(cbg), ptr(cw2),
                    ptr(cb2), y.data_ptr(), h == 0 ? 0 : x.numel() / h, h, N, l, act};
  const int status = slmopt::fff::validate(p);
  TORCH_CHECK_VALUE(status == SLMOPT_FFF_OK, "fff: invalid arguments (status ", status, ")");
  const size_t bytes = slmopt_fff_workspace_size(&p, static_cast<int>(x.element_size()));
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int rc;
  switch (x.scalar_type()) {
    case at::kFloat: rc = slmopt_fff_forward_f32(&p, ws.data_ptr(), bytes, stream); break;
    case at::kHalf: rc = slmopt_fff_forward_f16(&p, ws.data_ptr(), bytes, stream); break;
    case at::kBFloat16: rc = slmopt_fff_forward_bf16(&p, ws.data_ptr(), bytes, stream); break;
    default:
      TORCH_CHECK_VALUE(false, "fff (CUDA): dtype must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  TORCH_CHECK(rc == SLMOPT_FFF_OK, "fff (CUDA): launch failed (status ", rc, ": ",
              cudaGetErrorString(static_cast<cudaError_t>(slmopt_fff_last_cuda_error())), ")");
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(slmopt, CUDA, m) { m.impl("fff", &fff_cuda); }
#endif  // SLMOPT_WITH_TORCH

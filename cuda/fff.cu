// CUDA kernels of slmopt::fff (fp32 / fp16 / bf16 storage, fp32 accumulation); semantics in fff_common.h.
//
// * Small batch (T <= kSmallBatch): one block per token. Every warp computes each routing logit itself
//   (coalesced lane-strided dot + shuffle reduction), so no block barrier is needed per level; warps then
//   split the leaf's neurons, and threads sweep the hidden dimension for the down projection.
// * Batched: route kernel (one warp per token, same warp_dot as above so both paths route alike) ->
//   per-leaf counts (atomics) -> one-block scan (row offsets + GEMM tile offsets) -> scatter tokens into
//   leaf order -> tiled GEMM up (+gate, bias, activation) into an fp32 hidden buffer -> tiled GEMM down
//   whose epilogue adds biases / node contributions and scatters rows back to token order.
//
// Plain `nvcc -c fff.cu` builds the kernels and the extern "C" launchers (for a TensorRT plugin); with
// -DSLMOPT_WITH_TORCH it also registers the op's CUDA kernel with the dispatcher.
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "fff_common.h"

namespace slmopt {
namespace fff {
namespace {

constexpr int kSmallBatch = 16;  // tokens at or below: token kernel
constexpr int kThreads = 256;
constexpr int kTM = 64, kTN = 64, kTK = 16;  // GEMM tile: 64 rows x 64 cols, k-step 16; 4x4 per thread
static_assert(kTM == kTN && kTM * kTK % kThreads == 0, "tile loaders assume square tiles");

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;  // every lane holds the same sum (same order on every lane)
}

// Lane-strided dot product reduced across the warp; the single routing-logit formula of both paths.
template <typename XT, typename T>
__device__ __forceinline__ float warp_dot(const XT* x, const T* w, int64_t n, int lane) {
  float acc = 0.f;
  for (int64_t i = lane; i < n; i += 32) acc += to_float(x[i]) * to_float(w[i]);
  return warp_sum(acc);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) token_kernel(SlmoptFffParams p, int levels) {
  extern __shared__ float smem[];
  const int64_t h = p.hidden, l = p.leaf_width, t = blockIdx.x;
  float* xs = smem;       // [h] token, fp32
  float* ys = xs + h;     // [h] output accumulator
  float* hid = ys + h;    // [l] leaf hidden units
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const T* x = static_cast<const T*>(p.x) + t * h;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
    xs[i] = to_float(x[i]);
    ys[i] = 0.f;
  }
  __syncthreads();
  const T* node_w = static_cast<const T*>(p.node_w);
  const T* node_out = static_cast<const T*>(p.node_out);
  int64_t n = 0;
  for (int k = 0; k < levels; ++k) {
    const float z = warp_dot(xs, node_w + n * h, h, lane) + load_or_zero<T>(p.node_b, n);
    if (node_out != nullptr) {
      const float a = activate(z, p.activation);
      for (int64_t i = threadIdx.x; i < h; i += blockDim.x) ys[i] += a * to_float(node_out[n * h + i]);
    }
    n = route_step(n, z);
  }
  if (p.leaf_w1 != nullptr) {
    const int64_t leaf = n - p.nodes;
    const T* w1 = static_cast<const T*>(p.leaf_w1);
    const T* wg = static_cast<const T*>(p.leaf_wg);
    for (int64_t j = warp; j < l; j += warps) {
      const int64_t row = leaf * l + j;
      const float u = warp_dot(xs, w1 + row * h, h, lane) + load_or_zero<T>(p.leaf_b1, row);
      float v;
      if (wg != nullptr) {
        const float g = warp_dot(xs, wg + row * h, h, lane) + load_or_zero<T>(p.leaf_bg, row);
        v = activate(g, p.activation) * u;
      } else {
        v = activate(u, p.activation);
      }
      if (lane == 0) hid[j] = v;
    }
    __syncthreads();
    const T* w2 = static_cast<const T*>(p.leaf_w2) + leaf * l * h;
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
      float acc = ys[i] + load_or_zero<T>(p.leaf_b2, leaf * h + i);
      for (int64_t j = 0; j < l; ++j) acc += hid[j] * to_float(w2[j * h + i]);  // coalesced over i
      ys[i] = acc;
    }
  }
  T* y = static_cast<T*>(p.y) + t * h;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) y[i] = from_float<T>(ys[i]);
}

// One warp per token: walk, node contributions into yacc (fp32 [T, h]), leaf id + per-leaf count.
template <typename T>
__global__ void __launch_bounds__(kThreads) route_kernel(SlmoptFffParams p, int levels, int* leaf_of,
                                                         int* counts, float* yacc) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= p.tokens) return;
  const int64_t h = p.hidden;
  const T* x = static_cast<const T*>(p.x) + t * h;
  const T* node_w = static_cast<const T*>(p.node_w);
  const T* node_out = static_cast<const T*>(p.node_out);
  float* yt = yacc == nullptr ? nullptr : yacc + t * h;
  int64_t n = 0;
  for (int k = 0; k < levels; ++k) {
    const float z = warp_dot(x, node_w + n * h, h, lane) + load_or_zero<T>(p.node_b, n);
    if (node_out != nullptr) {
      const float a = activate(z, p.activation);
      for (int64_t i = lane; i < h; i += 32) {
        yt[i] = (k == 0 ? 0.f : yt[i]) + a * to_float(node_out[n * h + i]);
      }
    }
    n = route_step(n, z);
  }
  if (leaf_of != nullptr && lane == 0) {
    const int leaf = static_cast<int>(n - p.nodes);
    leaf_of[t] = leaf;
    atomicAdd(&counts[leaf], 1);
  }
}

// Single block: exclusive scans of counts (row offsets) and of ceil(count / kTM) (GEMM tile offsets).
__global__ void __launch_bounds__(1024)
    scan_kernel(const int* counts, int leaves, int* offsets, int* tile_start, int* cursor) {
  __shared__ int part_rows[1024], part_tiles[1024];
  const int chunk = (leaves + blockDim.x - 1) / blockDim.x;
  const int begin = min(leaves, static_cast<int>(threadIdx.x) * chunk), end = min(leaves, begin + chunk);
  int rows = 0, tiles = 0;
  for (int e = begin; e < end; ++e) {
    rows += counts[e];
    tiles += (counts[e] + kTM - 1) / kTM;
  }
  part_rows[threadIdx.x] = rows;
  part_tiles[threadIdx.x] = tiles;
  __syncthreads();
  for (int stride = 1; stride < blockDim.x; stride <<= 1) {  // Hillis-Steele inclusive scan
    const int r = threadIdx.x >= stride ? part_rows[threadIdx.x - stride] : 0;
    const int s = threadIdx.x >= stride ? part_tiles[threadIdx.x - stride] : 0;
    __syncthreads();
    part_rows[threadIdx.x] += r;
    part_tiles[threadIdx.x] += s;
    __syncthreads();
  }
  rows = part_rows[threadIdx.x] - rows;  // exclusive prefix of this chunk
  tiles = part_tiles[threadIdx.x] - tiles;
  for (int e = begin; e < end; ++e) {
    offsets[e] = cursor[e] = rows;
    tile_start[e] = tiles;
    rows += counts[e];
    tiles += (counts[e] + kTM - 1) / kTM;
  }
  if (threadIdx.x == blockDim.x - 1) {
    offsets[leaves] = part_rows[threadIdx.x];
    tile_start[leaves] = part_tiles[threadIdx.x];
  }
}

__global__ void scatter_kernel(const int* leaf_of, int64_t tokens, int* cursor, int* perm) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < tokens) perm[atomicAdd(&cursor[leaf_of[t]], 1)] = static_cast<int>(t);
}

// Leaf e owning GEMM tile `tile` (largest e with tile_start[e] <= tile; empty leaves are skipped).
__device__ __forceinline__ int leaf_of_tile(const int* tile_start, int leaves, int tile) {
  int lo = 0, hi = leaves - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tile_start[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// hbuf[r, j] = act(x[perm[r]] . wg[e, j] + bg) * (x[perm[r]] . w1[e, j] + b1)   (or act(up) when plain)
template <typename T, bool kGated>
__global__ void __launch_bounds__(kThreads)
    leaf_up_kernel(SlmoptFffParams p, const int* perm, const int* offsets, const int* tile_start, int leaves,
                   float* hbuf) {
  __shared__ float as[kTK][kTM + 4], bs[kTK][kTN + 4], gs[kGated ? kTK : 1][kTN + 4];
  const int tile = blockIdx.x;
  if (tile >= tile_start[leaves]) return;
  const int e = leaf_of_tile(tile_start, leaves, tile);
  const int row0 = offsets[e] + (tile - tile_start[e]) * kTM, rows = min(kTM, offsets[e + 1] - row0);
  const int64_t h = p.hidden, l = p.leaf_width, col0 = static_cast<int64_t>(blockIdx.y) * kTN;
  const T* x = static_cast<const T*>(p.x);
  const T* w1 = static_cast<const T*>(p.leaf_w1) + e * l * h;
  const T* wg = kGated ? static_cast<const T*>(p.leaf_wg) + e * l * h : nullptr;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {}, accg[4][4] = {};
  for (int64_t k0 = 0; k0 < h; k0 += kTK) {
    for (int it = 0; it < kTM * kTK / kThreads; ++it) {
      const int idx = threadIdx.x + it * kThreads, r = idx / kTK, kk = idx % kTK;
      const bool k_ok = k0 + kk < h;
      as[kk][r] = (r < rows && k_ok) ? to_float(x[static_cast<int64_t>(perm[row0 + r]) * h + k0 + kk]) : 0.f;
      const bool c_ok = col0 + r < l && k_ok;  // r doubles as the tile column for the weight tiles
      bs[kk][r] = c_ok ? to_float(w1[(col0 + r) * h + k0 + kk]) : 0.f;
      if (kGated) gs[kk][r] = c_ok ? to_float(wg[(col0 + r) * h + k0 + kk]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTK; ++kk) {
      float a[4], b[4], g[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = as[kk][ty * 4 + i];
        b[i] = bs[kk][tx * 4 + i];
        if (kGated) g[i] = gs[kk][tx * 4 + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc[i][j] += a[i] * b[j];
          if (kGated) accg[i][j] += a[i] * g[j];
        }
      }
    }
    __syncthreads();
  }
  for (int i = 0; i < 4; ++i) {
    const int r = ty * 4 + i;
    for (int j = 0; j < 4; ++j) {
      const int64_t c = col0 + tx * 4 + j;
      if (r >= rows || c >= l) continue;
      const float u = acc[i][j] + load_or_zero<T>(p.leaf_b1, e * l + c);
      const float v = kGated ? activate(accg[i][j] + load_or_zero<T>(p.leaf_bg, e * l + c), p.activation) * u
                             : activate(u, p.activation);
      hbuf[static_cast<int64_t>(row0 + r) * l + c] = v;
    }
  }
}

// y[perm[r], i] = hbuf[r] . w2[e, :, i] + b2[e, i] (+ yacc[perm[r], i] when nodes have outputs)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    leaf_down_kernel(SlmoptFffParams p, const int* perm, const int* offsets, const int* tile_start, int leaves,
                     const float* hbuf, const float* yacc) {
  __shared__ float as[kTK][kTM + 4], bs[kTK][kTN + 4];
  const int tile = blockIdx.x;
  if (tile >= tile_start[leaves]) return;
  const int e = leaf_of_tile(tile_start, leaves, tile);
  const int row0 = offsets[e] + (tile - tile_start[e]) * kTM, rows = min(kTM, offsets[e + 1] - row0);
  const int64_t h = p.hidden, l = p.leaf_width, col0 = static_cast<int64_t>(blockIdx.y) * kTN;
  const T* w2 = static_cast<const T*>(p.leaf_w2) + e * l * h;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < l; k0 += kTK) {
    for (int it = 0; it < kTM * kTK / kThreads; ++it) {
      const int idx = threadIdx.x + it * kThreads;
      const int r = idx / kTK, kk = idx % kTK;
      as[kk][r] = (r < rows && k0 + kk < l) ? hbuf[static_cast<int64_t>(row0 + r) * l + k0 + kk] : 0.f;
      const int bk = idx / kTN, bc = idx % kTN;  // w2 rows are contiguous over the output column
      bs[bk][bc] = (k0 + bk < l && col0 + bc < h) ? to_float(w2[(k0 + bk) * h + col0 + bc]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTK; ++kk) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float a = as[kk][ty * 4 + i];
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a * bs[kk][tx * 4 + j];
      }
    }
    __syncthreads();
  }
  T* y = static_cast<T*>(p.y);
  for (int i = 0; i < 4; ++i) {
    const int r = ty * 4 + i;
    if (r >= rows) continue;
    const int64_t t = perm[row0 + r];
    for (int j = 0; j < 4; ++j) {
      const int64_t c = col0 + tx * 4 + j;
      if (c >= h) continue;
      float v = acc[i][j] + load_or_zero<T>(p.leaf_b2, e * h + c);
      if (yacc != nullptr) v += yacc[t * h + c];
      y[t * h + c] = from_float<T>(v);
    }
  }
}

template <typename T>
__global__ void store_kernel(const float* src, int64_t n, T* dst) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dst[i] = from_float<T>(src[i]);
}

// Buffers of the batched path, carved from one caller-provided workspace.
struct Workspace {
  int *leaf_of = nullptr, *counts = nullptr, *offsets = nullptr, *tile_start = nullptr, *cursor = nullptr,
      *perm = nullptr;
  float *hbuf = nullptr, *yacc = nullptr;
};

// Lays the workspace out from `base` (nullptr: only sizes it); returns the bytes needed.
size_t workspace_layout(const SlmoptFffParams& p, int element_bytes, char* base, Workspace* ws) {
  const size_t T = static_cast<size_t>(p.tokens), E = static_cast<size_t>(p.nodes) + 1;
  const size_t leaves = p.leaf_w1 != nullptr ? 1 : 0;
  // fp16/bf16 outputs need an fp32 accumulator for node contributions; fp32 ones accumulate in place.
  const size_t yacc = p.node_out != nullptr && element_bytes != 4 ? 1 : 0;
  size_t used = 0;
  auto carve = [&](size_t bytes) -> char* {
    char* ptr = base != nullptr && bytes != 0 ? base + used : nullptr;
    used += (bytes + 255) & ~static_cast<size_t>(255);
    return ptr;
  };
  Workspace w;
  w.leaf_of = reinterpret_cast<int*>(carve(leaves * T * 4));
  w.counts = reinterpret_cast<int*>(carve(leaves * E * 4));
  w.offsets = reinterpret_cast<int*>(carve(leaves * (E + 1) * 4));
  w.tile_start = reinterpret_cast<int*>(carve(leaves * (E + 1) * 4));
  w.cursor = reinterpret_cast<int*>(carve(leaves * E * 4));
  w.perm = reinterpret_cast<int*>(carve(leaves * T * 4));
  w.hbuf = reinterpret_cast<float*>(carve(leaves * T * static_cast<size_t>(p.leaf_width) * 4));
  w.yacc = reinterpret_cast<float*>(carve(yacc * T * static_cast<size_t>(p.hidden) * 4));
  if (ws != nullptr) *ws = w;
  return used;
}

template <typename T>
int forward(const SlmoptFffParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const int status = validate(p);
  if (status != SLMOPT_FFF_OK) return status;
  if (p.tokens == 0) return SLMOPT_FFF_OK;
  const int levels = levels_for_nodes(p.nodes);
  if (p.tokens <= kSmallBatch) {
    const size_t smem = (2 * p.hidden + p.leaf_width) * sizeof(float);
    if (smem > 48 * 1024) {
      cudaFuncSetAttribute(token_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem));
    }
    token_kernel<T><<<static_cast<unsigned>(p.tokens), kThreads, smem, stream>>>(p, levels);
    return cudaGetLastError() == cudaSuccess ? SLMOPT_FFF_OK : SLMOPT_FFF_CUDA_ERROR;
  }
  Workspace ws;
  if (workspace_layout(p, sizeof(T), static_cast<char*>(workspace), &ws) > workspace_bytes) {
    return SLMOPT_FFF_CUDA_ERROR;
  }
  const bool leaves = p.leaf_w1 != nullptr;
  // An fp32 output doubles as the node accumulator (leaf_down then adds to it in place).
  float* yacc = ws.yacc != nullptr ? ws.yacc : (p.node_out != nullptr ? static_cast<float*>(p.y) : nullptr);
  const int E = static_cast<int>(p.nodes + 1);
  if (leaves) cudaMemsetAsync(ws.counts, 0, E * sizeof(int), stream);
  const unsigned warps_per_block = kThreads / 32;
  const unsigned route_blocks = static_cast<unsigned>((p.tokens + warps_per_block - 1) / warps_per_block);
  route_kernel<T><<<route_blocks, kThreads, 0, stream>>>(p, levels, ws.leaf_of, ws.counts, yacc);
  if (!leaves) {
    if (ws.yacc != nullptr) {
      const int64_t n = p.tokens * p.hidden;
      const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
      store_kernel<T><<<blocks, 256, 0, stream>>>(ws.yacc, n, static_cast<T*>(p.y));
    }
    return cudaGetLastError() == cudaSuccess ? SLMOPT_FFF_OK : SLMOPT_FFF_CUDA_ERROR;
  }
  scan_kernel<<<1, 1024, 0, stream>>>(ws.counts, E, ws.offsets, ws.tile_start, ws.cursor);
  const unsigned token_blocks = static_cast<unsigned>((p.tokens + 255) / 256);
  scatter_kernel<<<token_blocks, 256, 0, stream>>>(ws.leaf_of, p.tokens, ws.cursor, ws.perm);
  // Upper bound on tiles: sum_e ceil(c_e / TM) <= T / TM + E; blocks past the real count exit at once.
  const unsigned tiles = static_cast<unsigned>((p.tokens + kTM - 1) / kTM + E);
  const dim3 up_grid(tiles, static_cast<unsigned>((p.leaf_width + kTN - 1) / kTN));
  if (p.leaf_wg != nullptr) {
    leaf_up_kernel<T, true><<<up_grid, kThreads, 0, stream>>>(p, ws.perm, ws.offsets, ws.tile_start, E,
                                                              ws.hbuf);
  } else {
    leaf_up_kernel<T, false><<<up_grid, kThreads, 0, stream>>>(p, ws.perm, ws.offsets, ws.tile_start, E,
                                                               ws.hbuf);
  }
  const dim3 down_grid(tiles, static_cast<unsigned>((p.hidden + kTN - 1) / kTN));
  leaf_down_kernel<T><<<down_grid, kThreads, 0, stream>>>(p, ws.perm, ws.offsets, ws.tile_start, E, ws.hbuf,
                                                          p.node_out != nullptr ? yacc : nullptr);
  return cudaGetLastError() == cudaSuccess ? SLMOPT_FFF_OK : SLMOPT_FFF_CUDA_ERROR;
}

}  // namespace
}  // namespace fff
}  // namespace slmopt

// ---- extern "C" launcher API (raw pointers; what a TensorRT plugin calls) ----
extern "C" {

// Bytes of device workspace the batched path needs (0 is fine to pass when tokens <= 16).
size_t slmopt_fff_workspace_size(const SlmoptFffParams* p, int element_bytes) {
  return slmopt::fff::workspace_layout(*p, element_bytes, nullptr, nullptr);
}

int slmopt_fff_forward_f32(const SlmoptFffParams* p, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  return slmopt::fff::forward<float>(*p, workspace, workspace_bytes, stream);
}

int slmopt_fff_forward_f16(const SlmoptFffParams* p, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  return slmopt::fff::forward<__half>(*p, workspace, workspace_bytes, stream);
}

int slmopt_fff_forward_bf16(const SlmoptFffParams* p, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream) {
  return slmopt::fff::forward<__nv_bfloat16>(*p, workspace, workspace_bytes, stream);
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
  TORCH_CHECK(rc == SLMOPT_FFF_OK, "fff (CUDA): kernel launch failed (status ", rc, ")");
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(slmopt, CUDA, m) { m.impl("fff", &fff_cuda); }
#endif  // SLMOPT_WITH_TORCH

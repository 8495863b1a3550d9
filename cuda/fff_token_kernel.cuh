// The small-batch design of slmopt::fff: one block per token (fp32 accumulation in shared memory).
//
// This header is the single source of the token kernel's body. fff.cu launches it for T <= 16 tokens and
// the TensorRT plugin (backends/tensorrt/kernel.py) compiles it into its PTX entry points; on the host,
// fff_emu.h supplies threadIdx/blockIdx/__syncthreads/__shfl_xor_sync so the same text runs block by
// block on the CPU (tests/native/test_kernel_emulation.py), which is how a dropped barrier shows up without a GPU.
//
// Every warp computes each routing logit itself (lane-strided dot + shuffle reduction), so no block barrier
// is needed per level; warps then split the leaf's neurons, and threads sweep the hidden dimension for the
// down projection. fff.cu may split one token's leaf neurons over several blocks (grid.y) that write fp32
// partial rows, summed by a second kernel: at batch 1 one block per token would leave all but one SM idle. Shared memory: x (h floats), y accumulator (h), leaf hidden units (l):
// token_smem_bytes() is the one formula for it.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "fff_common.h"

#ifdef __CUDACC__
// Shared-memory declarations go through these so the host emulator can hand out poisoned per-block buffers.
#define SLMOPT_SHARED(type, name) __shared__ type name
#define SLMOPT_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace slmopt {
namespace fff {

constexpr int kThreads = 256;  // threads per block of every fff kernel (the plugin launches the same)

// Dynamic shared memory of one token block (bytes).
SLMOPT_HD size_t token_smem_bytes(int64_t hidden, int64_t leaf_width) {
  return static_cast<size_t>(2 * hidden + leaf_width) * sizeof(float);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;  // every lane holds the same sum (same order on every lane)
}

// Lane-strided dot product reduced across the warp; the single routing-logit formula of all kernels.
template <typename XT, typename T>
__device__ __forceinline__ float warp_dot(const XT* x, const T* w, int64_t n, int lane) {
  float acc = 0.f;
  for (int64_t i = lane; i < n; i += 32) acc += to_float(x[i]) * to_float(w[i]);
  return warp_sum(acc);
}

// Token blockIdx.x of p, leaf neurons [j0, j1): writes one row of h values to `out` (T for the final output,
// fp32 for a partial sum). `first` adds what must be counted once per token: the node outputs and leaf_b2
// (the full range [0, l) with first = true is the whole op). smem holds token_smem_bytes(p.hidden,
// p.leaf_width) bytes.
template <typename T, typename Out>
__device__ __forceinline__ void token_block(const SlmoptFffParams& p, int levels, float* smem, int64_t j0,
                                            int64_t j1, bool first, Out* out) {
  const int64_t h = p.hidden, l = p.leaf_width, t = blockIdx.x;
  float *xs = smem, *ys = xs + h, *hid = ys + h;  // token, output accumulator, leaf hidden units
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const T* x = static_cast<const T*>(p.x) + t * h;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
    xs[i] = to_float(x[i]);
    ys[i] = 0.f;
  }
  __syncthreads();  // every warp reads all of xs below
  const T *node_w = static_cast<const T*>(p.node_w), *node_out = static_cast<const T*>(p.node_out);
  int64_t n = 0;
  for (int k = 0; k < levels; ++k) {
    const float z = warp_dot(xs, node_w + n * h, h, lane) + load_or_zero<T>(p.node_b, n);
    if (node_out != nullptr && first) {
      // Thread i owns ys[i] (same stride as the load loop), so no barrier is needed between levels.
      const float a = activate(z, p.activation);
      for (int64_t i = threadIdx.x; i < h; i += blockDim.x) ys[i] += a * to_float(node_out[n * h + i]);
    }
    n = route_step(n, z);
  }
  if (p.leaf_w1 != nullptr) {
    const int64_t leaf = n - p.nodes;
    const T *w1 = static_cast<const T*>(p.leaf_w1), *wg = static_cast<const T*>(p.leaf_wg);
    for (int64_t j = j0 + warp; j < j1; j += warps) {
      const int64_t row = leaf * l + j;
      const float u = warp_dot(xs, w1 + row * h, h, lane) + load_or_zero<T>(p.leaf_b1, row);
      const float v = wg == nullptr ? activate(u, p.activation)
                                    : activate(warp_dot(xs, wg + row * h, h, lane) +
                                                   load_or_zero<T>(p.leaf_bg, row), p.activation) * u;
      if (lane == 0) hid[j - j0] = v;
    }
    __syncthreads();  // every thread reads all of hid below
    const T* w2 = static_cast<const T*>(p.leaf_w2) + leaf * l * h;
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
      float acc = ys[i] + (first ? load_or_zero<T>(p.leaf_b2, leaf * h + i) : 0.f);
      for (int64_t j = j0; j < j1; ++j) acc += hid[j - j0] * to_float(w2[j * h + i]);  // coalesced over i
      ys[i] = acc;
    }
  }
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) out[i] = from_float<Out>(ys[i]);
}

// The whole op for token blockIdx.x (what the TensorRT plugin's entry points run).
template <typename T>
__device__ __forceinline__ void token_block(const SlmoptFffParams& p, int levels, float* smem) {
  token_block<T, T>(p, levels, smem, 0, p.leaf_width, true, static_cast<T*>(p.y) + blockIdx.x * p.hidden);
}

}  // namespace fff
}  // namespace slmopt

// The batched design of slmopt::fff (T > 16 tokens, or when a token block's shared memory does not fit):
// route kernel (one warp per token, token_kernel.cuh's warp_dot so both designs route alike) -> per-leaf
// counts (atomics) -> one-block scan (row offsets + GEMM tile offsets) -> scatter tokens into leaf order ->
// tiled GEMM up (+gate, bias, activation) into an fp32 hidden buffer -> tiled GEMM down whose epilogue adds
// biases / node contributions and scatters rows back to token order.
//
// Kernel bodies only; fff_launch.cuh sizes the grids. Written in plain CUDA so fff_emu.h can run them on
// the host block by block (shared memory goes through SLMOPT_SHARED so the emulator can poison it).
#pragma once

#include "fff_token_kernel.cuh"

namespace slmopt {
namespace fff {

constexpr int kTM = 64, kTN = 64, kTK = 16;  // GEMM tile: 64 rows x 64 cols, k-step 16; 4x4 per thread
static_assert(kTM == kTN && kTM * kTK % kThreads == 0, "tile loaders assume square tiles");
constexpr int kScanThreads = 1024;

// One warp per token: walk, node contributions into yacc (fp32 [T, h]), leaf id + per-leaf count.
template <typename T>
__global__ void __launch_bounds__(kThreads) route_kernel(SlmoptFffParams p, int levels, int* leaf_of,
                                                         int* counts, float* yacc) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= p.tokens) return;  // whole warps leave together (t is per warp), so warp_dot's shuffles stay full
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

struct ScanShared {
  int rows[kScanThreads], tiles[kScanThreads];
};

// Single block: exclusive scans of counts (row offsets) and of ceil(count / kTM) (GEMM tile offsets).
__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(const int* counts, int leaves, int* offsets, int* tile_start, int* cursor) {
  SLMOPT_SHARED(ScanShared, s);
  const int tid = static_cast<int>(threadIdx.x), threads = static_cast<int>(blockDim.x);
  const int chunk = (leaves + threads - 1) / threads;
  const int begin = min(leaves, tid * chunk), end = min(leaves, begin + chunk);
  int rows = 0, tiles = 0;
  for (int e = begin; e < end; ++e) {
    rows += counts[e];
    tiles += (counts[e] + kTM - 1) / kTM;
  }
  s.rows[tid] = rows;
  s.tiles[tid] = tiles;
  __syncthreads();
  for (int stride = 1; stride < threads; stride <<= 1) {  // Hillis-Steele inclusive scan
    const int r = tid >= stride ? s.rows[tid - stride] : 0;
    const int q = tid >= stride ? s.tiles[tid - stride] : 0;
    __syncthreads();
    s.rows[tid] += r;
    s.tiles[tid] += q;
    __syncthreads();
  }
  rows = s.rows[tid] - rows;  // exclusive prefix of this chunk
  tiles = s.tiles[tid] - tiles;
  for (int e = begin; e < end; ++e) {
    offsets[e] = cursor[e] = rows;
    tile_start[e] = tiles;
    rows += counts[e];
    tiles += (counts[e] + kTM - 1) / kTM;
  }
  if (tid == threads - 1) {
    offsets[leaves] = s.rows[tid];
    tile_start[leaves] = s.tiles[tid];
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

template <bool kGated>
struct UpShared {
  float as[kTK][kTM + 4], bs[kTK][kTN + 4], gs[kGated ? kTK : 1][kTN + 4];
};

// hbuf[r, j] = act(x[perm[r]] . wg[e, j] + bg) * (x[perm[r]] . w1[e, j] + b1)   (or act(up) when plain)
// Grid: (tile upper bound, ceil(l / kTN)); column tile blockIdx.y covers leaf neurons col0 .. col0 + kTN.
template <typename T, bool kGated>
__global__ void __launch_bounds__(kThreads)
    leaf_up_kernel(SlmoptFffParams p, const int* perm, const int* offsets, const int* tile_start, int leaves,
                   float* hbuf) {
  SLMOPT_SHARED(UpShared<kGated>, s);
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
      s.as[kk][r] = (r < rows && k_ok) ? to_float(x[static_cast<int64_t>(perm[row0 + r]) * h + k0 + kk]) : 0.f;
      const bool c_ok = col0 + r < l && k_ok;  // r doubles as the tile column for the weight tiles
      s.bs[kk][r] = c_ok ? to_float(w1[(col0 + r) * h + k0 + kk]) : 0.f;
      if (kGated) s.gs[kk][r] = c_ok ? to_float(wg[(col0 + r) * h + k0 + kk]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTK; ++kk) {
      float a[4], b[4], g[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = s.as[kk][ty * 4 + i];
        b[i] = s.bs[kk][tx * 4 + i];
        if (kGated) g[i] = s.gs[kk][tx * 4 + i];
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

struct DownShared {
  float as[kTK][kTM + 4], bs[kTK][kTN + 4];
};

// y[perm[r], i] = hbuf[r] . w2[e, :, i] + b2[e, i] (+ yacc[perm[r], i] when nodes have outputs)
// Grid: (tile upper bound, ceil(h / kTN)); column tile blockIdx.y covers outputs col0 .. col0 + kTN.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    leaf_down_kernel(SlmoptFffParams p, const int* perm, const int* offsets, const int* tile_start, int leaves,
                     const float* hbuf, const float* yacc) {
  SLMOPT_SHARED(DownShared, s);
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
      s.as[kk][r] = (r < rows && k0 + kk < l) ? hbuf[static_cast<int64_t>(row0 + r) * l + k0 + kk] : 0.f;
      const int bk = idx / kTN, bc = idx % kTN;  // w2 rows are contiguous over the output column
      s.bs[bk][bc] = (k0 + bk < l && col0 + bc < h) ? to_float(w2[(k0 + bk) * h + col0 + bc]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTK; ++kk) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float a = s.as[kk][ty * 4 + i];
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a * s.bs[kk][tx * 4 + j];
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

}  // namespace fff
}  // namespace slmopt

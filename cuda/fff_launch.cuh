// Launch logic of slmopt::fff: which design runs, grid sizes, shared memory, workspace layout.
//
// forward<T>(params, workspace, bytes, exec) is written once against an executor: fff.cu's CudaExec
// launches on a stream, fff_emu.cpp's EmuExec runs the same kernels on the host (fff_emu.h). An executor
// provides
//   int launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, args...)
//       -> 0, or nonzero when that launch failed;
//   bool opt_in_dynamic_smem(void (*kernel)(P...), size_t bytes)
//       -> whether `kernel` may now use `bytes` of dynamic shared memory (false: not on this device);
//   int memset(void* ptr, int value, size_t bytes) -> 0, or nonzero on failure;
//   int multiprocessors() -> SMs of the device (sizes the split token design).
#pragma once

#include "fff_batched_kernels.cuh"

namespace slmopt {
namespace fff {

constexpr int kSmallBatch = 16;                  // tokens at or below: token kernel
constexpr size_t kDefaultDynamicSmem = 48 * 1024;  // dynamic shared memory a kernel gets without opt-in

constexpr int kMinSplitNeurons = kThreads / 32;  // a leaf slice keeps every warp of its block busy

template <typename T>
__global__ void __launch_bounds__(kThreads) token_kernel(SlmoptFffParams p, int levels) {
  SLMOPT_DYNAMIC_SHARED(float, smem);
  token_block<T>(p, levels, smem);
}

// Block (t, s) computes leaf neurons [s * chunk, (s + 1) * chunk) of token t into partial[t, s, :] (fp32);
// slice 0 also adds the node outputs and leaf_b2.
template <typename T>
__global__ void __launch_bounds__(kThreads) token_split_kernel(SlmoptFffParams p, int levels, int64_t chunk,
                                                               float* partial) {
  SLMOPT_DYNAMIC_SHARED(float, smem);
  const int64_t s = blockIdx.y, l = p.leaf_width;
  const int64_t j0 = s * chunk < l ? s * chunk : l, j1 = j0 + chunk < l ? j0 + chunk : l;
  float* row = partial + (static_cast<int64_t>(blockIdx.x) * gridDim.y + s) * p.hidden;
  token_block<T, float>(p, levels, smem, j0, j1, s == 0, row);
}

// y[t, i] = sum over s of partial[t, s, i], in slice order (deterministic), stored in T.
template <typename T>
__global__ void reduce_kernel(const float* partial, int64_t tokens, int64_t slices, int64_t hidden, T* y) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= tokens * hidden) return;
  const int64_t t = i / hidden, c = i % hidden;
  float acc = 0.f;
  for (int64_t s = 0; s < slices; ++s) acc += partial[(t * slices + s) * hidden + c];
  y[i] = from_float<T>(acc);
}

// Slices per token for the token design: enough blocks for about two per SM, at least kMinSplitNeurons
// leaf neurons per slice, 1 without leaves (node-only trees have nothing to split).
inline int64_t token_slices(const SlmoptFffParams& p, int multiprocessors) {
  if (p.leaf_w1 == nullptr || p.tokens <= 0) return 1;
  const int64_t by_width = (p.leaf_width + kMinSplitNeurons - 1) / kMinSplitNeurons;
  const int64_t by_device = (2 * static_cast<int64_t>(multiprocessors) + p.tokens - 1) / p.tokens;
  return by_width < by_device ? by_width : by_device;
}

// Buffers of the batched path, carved from one caller-provided workspace.
struct Workspace {
  int *leaf_of = nullptr, *counts = nullptr, *offsets = nullptr, *tile_start = nullptr, *cursor = nullptr,
      *perm = nullptr;
  float *hbuf = nullptr, *yacc = nullptr, *partial = nullptr;
};

// Lays the workspace out from `base` (nullptr: only sizes it); returns the bytes needed. Sized for the
// batched path at any T (a token block whose shared memory does not fit falls back to it) plus, for
// T <= kSmallBatch, the split token design's partial rows.
inline size_t workspace_layout(const SlmoptFffParams& p, int element_bytes, char* base, Workspace* ws) {
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
  // Partial rows of the split token design, sized for the most slices any device could pick.
  const size_t max_slices = static_cast<size_t>((p.leaf_width + kMinSplitNeurons - 1) / kMinSplitNeurons);
  const size_t split = leaves != 0 && p.tokens <= kSmallBatch ? 1 : 0;
  w.partial = reinterpret_cast<float*>(carve(split * T * max_slices * static_cast<size_t>(p.hidden) * 4));
  if (ws != nullptr) *ws = w;
  return used;
}

template <typename T, typename Exec>
int forward(const SlmoptFffParams& p, void* workspace, size_t workspace_bytes, Exec& ex) {
  const int status = validate(p);
  if (status != SLMOPT_FFF_OK) return status;
  if (p.tokens == 0) return SLMOPT_FFF_OK;
  const int levels = levels_for_nodes(p.nodes);
  if (p.tokens <= kSmallBatch) {
    // Above 48 KiB the kernel must opt in, up to the device's limit (h above ~6000 floats on Ampere);
    // where that is refused, the batched path below computes the same without per-token shared memory.
    const size_t smem = token_smem_bytes(p.hidden, p.leaf_width);
    Workspace ws;
    const bool room =
        workspace_layout(p, static_cast<int>(sizeof(T)), static_cast<char*>(workspace), &ws) <= workspace_bytes;
    // Split the leaf over several blocks per token where the workspace allows (a caller passing none,
    // as the launcher API allows for T <= 16, gets one block per token).
    const int64_t slices = room ? token_slices(p, ex.multiprocessors()) : 1;
    if (slices > 1 && (smem <= kDefaultDynamicSmem || ex.opt_in_dynamic_smem(token_split_kernel<T>, smem))) {
      const int64_t chunk = (p.leaf_width + slices - 1) / slices;
      const dim3 grid(static_cast<unsigned>(p.tokens), static_cast<unsigned>(slices));
      int failed = ex.launch("token_split_kernel", token_split_kernel<T>, grid, dim3(kThreads), smem, p, levels,
                             chunk, ws.partial);
      const int64_t n = p.tokens * p.hidden;
      failed |= ex.launch("reduce_kernel", reduce_kernel<T>, dim3(static_cast<unsigned>((n + 255) / 256)),
                          dim3(256), 0, static_cast<const float*>(ws.partial), p.tokens, slices, p.hidden,
                          static_cast<T*>(p.y));
      return failed == 0 ? SLMOPT_FFF_OK : SLMOPT_FFF_CUDA_ERROR;
    }
    if (slices == 1 && (smem <= kDefaultDynamicSmem || ex.opt_in_dynamic_smem(token_kernel<T>, smem))) {
      const dim3 grid(static_cast<unsigned>(p.tokens));
      return ex.launch("token_kernel", token_kernel<T>, grid, dim3(kThreads), smem, p, levels) == 0
                 ? SLMOPT_FFF_OK
                 : SLMOPT_FFF_CUDA_ERROR;
    }
  }
  Workspace ws;
  if (workspace_layout(p, static_cast<int>(sizeof(T)), static_cast<char*>(workspace), &ws) > workspace_bytes) {
    return SLMOPT_FFF_SMALL_WORKSPACE;
  }
  const bool leaves = p.leaf_w1 != nullptr;
  // An fp32 output doubles as the node accumulator (leaf_down then adds to it in place).
  float* yacc = ws.yacc != nullptr ? ws.yacc : (p.node_out != nullptr ? static_cast<float*>(p.y) : nullptr);
  const int E = static_cast<int>(p.nodes + 1);
  int failed = 0;
  if (leaves) failed |= ex.memset(ws.counts, 0, E * sizeof(int));
  const unsigned warps_per_block = kThreads / 32;
  const unsigned route_blocks = static_cast<unsigned>((p.tokens + warps_per_block - 1) / warps_per_block);
  failed |= ex.launch("route_kernel", route_kernel<T>, dim3(route_blocks), dim3(kThreads), 0, p, levels,
                      ws.leaf_of, ws.counts, yacc);
  if (!leaves) {
    if (ws.yacc != nullptr) {
      const int64_t n = p.tokens * p.hidden;
      const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
      failed |= ex.launch("store_kernel", store_kernel<T>, dim3(blocks), dim3(256), 0,
                          static_cast<const float*>(ws.yacc), n, static_cast<T*>(p.y));
    }
    return failed == 0 ? SLMOPT_FFF_OK : SLMOPT_FFF_CUDA_ERROR;
  }
  failed |= ex.launch("scan_kernel", scan_kernel, dim3(1), dim3(kScanThreads), 0,
                      static_cast<const int*>(ws.counts), E, ws.offsets, ws.tile_start, ws.cursor);
  const unsigned token_blocks = static_cast<unsigned>((p.tokens + 255) / 256);
  failed |= ex.launch("scatter_kernel", scatter_kernel, dim3(token_blocks), dim3(256), 0,
                      static_cast<const int*>(ws.leaf_of), p.tokens, ws.cursor, ws.perm);
  // Upper bound on tiles: sum_e ceil(c_e / TM) <= T / TM + E; blocks past the real count exit at once.
  const unsigned tiles = static_cast<unsigned>((p.tokens + kTM - 1) / kTM + E);
  const dim3 up_grid(tiles, static_cast<unsigned>((p.leaf_width + kTN - 1) / kTN));
  const int *perm = ws.perm, *offsets = ws.offsets, *tile_start = ws.tile_start;
  if (p.leaf_wg != nullptr) {
    failed |= ex.launch("leaf_up_kernel<gated>", leaf_up_kernel<T, true>, up_grid, dim3(kThreads), 0, p, perm,
                        offsets, tile_start, E, ws.hbuf);
  } else {
    failed |= ex.launch("leaf_up_kernel", leaf_up_kernel<T, false>, up_grid, dim3(kThreads), 0, p, perm,
                        offsets, tile_start, E, ws.hbuf);
  }
  const dim3 down_grid(tiles, static_cast<unsigned>((p.hidden + kTN - 1) / kTN));
  failed |= ex.launch("leaf_down_kernel", leaf_down_kernel<T>, down_grid, dim3(kThreads), 0, p, perm, offsets,
                      tile_start, E, static_cast<const float*>(ws.hbuf),
                      static_cast<const float*>(p.node_out != nullptr ? yacc : nullptr));
  return failed == 0 ? SLMOPT_FFF_OK : SLMOPT_FFF_CUDA_ERROR;
}

}  // namespace fff
}  // namespace slmopt

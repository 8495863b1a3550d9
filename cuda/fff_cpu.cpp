// CPU kernel of slmopt::fff (schema defined from Python in slmopt/ops.py; see fff_common.h for semantics).
//
// Two paths, chosen by the number of tokens T:
//   * small T: each token walks its path and reads only the rows on it (routing rows, then its leaf's
//     rows). At batch 1 the op is memory-bound, so bytes read is the whole story.
//   * batched: route every token, counting-sort tokens by leaf, then per (leaf, row block) gather the
//     tokens into a contiguous matrix and run two GEMMs. Reading each leaf once per block instead of
//     once per token is what makes large batches fast (a per-token gather stays memory-bound).
// Both paths compute routing logits with the same `walk` (same dot, same summation order), so a token
// takes the same leaf whichever path runs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <string_view>
#include <vector>

#ifndef SLMOPT_WITH_TORCH
#define SLMOPT_WITH_TORCH 1  // always a torch extension: enables fff_common.h's argument checks
#endif
#include "fff_common.h"

// Fortran BLAS sgemm exported by libtorch_cpu when it links MKL/OpenBLAS. Weak, so a torch build
// without it still loads; we then fall back to at::mm_out (slower per call, same result).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace {

using Opt = slmopt::fff::OptTensor;
using slmopt::fff::activate;
using slmopt::fff::activation_id;
using slmopt::fff::check_args;
using slmopt::fff::route_step;

// Path thresholds, tuned with benchmarks/bench_fff.py (h = 768, 16 leaves x 192, Zen 5 + MKL): the
// per-token path wins while tokens per leaf stay below ~6, because BLAS packs the whole leaf per call.
std::atomic<int64_t> g_small_batch{4};  // T at or below this always takes the per-token path
std::atomic<int64_t> g_leaf_tokens{6};  // ... and so does T <= leaf_tokens * E
std::atomic<int64_t> g_gemm_rows{8};    // leaf blocks with at least this many tokens use BLAS
std::atomic<int64_t> g_use_sgemm{1};    // 0: use at::mm_out even where sgemm_ exists (tests the fallback)
constexpr int64_t kRowBlock = 256;  // rows per GEMM block: a gathered block (768 KiB at h = 768) fits L2

// fp32 dot with 64 independent lanes so g++ -O3 vectorises without -ffast-math (no reassociation of
// a single accumulator is needed) and hides FMA latency; fixed reduction order keeps it deterministic.
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  constexpr int64_t kLanes = 64;
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += a[i + k] * b[i + k];
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t k = 0; k < w; ++k) acc[k] += acc[k + w];
  }
  return acc[0] + tail;
}

inline void axpy(float* __restrict y, float a, const float* __restrict w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * w[i];
}

inline const float* fp(const void* p) { return static_cast<const float*>(p); }

inline void prefetch_rows(const float* row, int64_t floats) {
  for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(row + i, 0, 3);  // one 64-byte line each
}

// Routes one token, adding node contributions (UltraFastBERT form) to y; returns its leaf index.
int64_t walk(const SlmoptFffParams& p, int levels, const float* x, float* y) {
  const int64_t h = p.hidden;
  int64_t n = 0;
  for (int k = 0; k < levels; ++k) {
    // The next row depends on this logit, so a deep tree is latency-bound: request this node's output
    // row and both children's routing rows (adjacent in memory) before the dot product needs them.
    if (p.node_out) prefetch_rows(fp(p.node_out) + n * h, h);
    if (k + 1 < levels) prefetch_rows(fp(p.node_w) + (2 * n + 1) * h, 2 * h);
    const float z = dot(x, fp(p.node_w) + n * h, h) + (p.node_b ? fp(p.node_b)[n] : 0.f);
    if (p.node_out) axpy(y, activate(z, p.activation), fp(p.node_out) + n * h, h);
    n = route_step(n, z);
  }
  return n - p.nodes;
}

// Adds leaf neurons [j0, j1) of `leaf` for one token to y, reading only those rows.
void leaf_neurons(const SlmoptFffParams& p, int64_t leaf, const float* x, int64_t j0, int64_t j1, float* y) {
  const int64_t h = p.hidden;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t row = leaf * p.leaf_width + j;
    const float u = dot(x, fp(p.leaf_w1) + row * h, h) + (p.leaf_b1 ? fp(p.leaf_b1)[row] : 0.f);
    float hidden;
    if (p.leaf_wg) {
      const float g = dot(x, fp(p.leaf_wg) + row * h, h) + (p.leaf_bg ? fp(p.leaf_bg)[row] : 0.f);
      hidden = activate(g, p.activation) * u;
    } else {
      hidden = activate(u, p.activation);
    }
    axpy(y, hidden, fp(p.leaf_w2) + row * h, h);
  }
}

void add_leaf_bias(const SlmoptFffParams& p, int64_t leaf, float* y) {
  if (p.leaf_b2) axpy(y, 1.f, fp(p.leaf_b2) + leaf * p.hidden, p.hidden);
}

void small_batch(const SlmoptFffParams& p, int levels, float* y) {
  const int64_t h = p.hidden, l = p.leaf_width;
  const int threads = at::get_num_threads();
  const int64_t gates = p.leaf_wg ? 3 : 2;
  if (p.tokens >= threads || threads == 1 || p.leaf_w1 == nullptr || gates * l * h < (1 << 16)) {
    at::parallel_for(0, p.tokens, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const float* x = fp(p.x) + t * h;
        float* yt = y + t * h;
        std::fill(yt, yt + h, 0.f);
        const int64_t leaf = walk(p, levels, x, yt);
        if (p.leaf_w1 == nullptr) continue;
        leaf_neurons(p, leaf, x, 0, l, yt);
        add_leaf_bias(p, leaf, yt);
      }
    });
    return;
  }
  // Fewer tokens than threads and a large leaf: split each leaf's neurons into one chunk per thread,
  // each accumulating into its own partial row, summed in chunk order (deterministic).
  const int64_t grain = (l + threads - 1) / threads;
  const int64_t chunks = (l + grain - 1) / grain;
  std::vector<float> partial(static_cast<size_t>(chunks * h));
  for (int64_t t = 0; t < p.tokens; ++t) {
    const float* x = fp(p.x) + t * h;
    float* yt = y + t * h;
    std::fill(yt, yt + h, 0.f);
    std::fill(partial.begin(), partial.end(), 0.f);
    const int64_t leaf = walk(p, levels, x, yt);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        leaf_neurons(p, leaf, x, c * grain, std::min(l, (c + 1) * grain), partial.data() + c * h);
      }
    });
    for (int64_t c = 0; c < chunks; ++c) axpy(yt, 1.f, partial.data() + c * h, h);
    add_leaf_bias(p, leaf, yt);
  }
}

// Row-major C[m, n] = A[m, k] @ B^T (B is [n, k] row-major) when b_transposed, else A @ B ([k, n]).
void gemm(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k, bool b_transposed) {
  if (sgemm_ != nullptr && g_use_sgemm.load(std::memory_order_relaxed) != 0) {
    // Column-major view: C^T = op(B) @ A^T.
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int lda = static_cast<int>(b_transposed ? k : n), ldb = ki, ldc = mi;
    const float one = 1.f, zero = 0.f;
    sgemm_(b_transposed ? "T" : "N", "N", &mi, &ni, &ki, &one, b, &lda, a, &ldb, &zero, c, &ldc);
    return;
  }
  auto opt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor at_a = at::from_blob(const_cast<float*>(a), {m, k}, opt);
  at::Tensor at_b = b_transposed ? at::from_blob(const_cast<float*>(b), {n, k}, opt).t()
                                 : at::from_blob(const_cast<float*>(b), {k, n}, opt);
  at::Tensor at_c = at::from_blob(c, {m, n}, opt);
  at::mm_out(at_c, at_a, at_b);
}

void activate_inplace(at::Tensor t, int act) {
  switch (act) {
    case SLMOPT_FFF_GELU: at::gelu_(t, "none"); break;
    case SLMOPT_FFF_GELU_TANH: at::gelu_(t, "tanh"); break;
    case SLMOPT_FFF_SILU: at::silu_(t); break;
    default: at::relu_(t); break;
  }
}

struct Block {
  int64_t leaf, begin, rows;
};

// One leaf for a few tokens without BLAS: stream each weight row from memory once and reuse it (from
// L1) for every token of the block. Beats sgemm for small blocks, where BLAS packing of the whole leaf
// costs as much as the arithmetic.
void leaf_rows(const SlmoptFffParams& p, int64_t leaf, const int64_t* tokens, int64_t m, float* y,
               float* hidden) {
  const int64_t h = p.hidden;
  for (int64_t j = 0; j < p.leaf_width; ++j) {
    const int64_t row = leaf * p.leaf_width + j;
    const float* w1 = fp(p.leaf_w1) + row * h;
    const float b1 = p.leaf_b1 ? fp(p.leaf_b1)[row] : 0.f;
    for (int64_t r = 0; r < m; ++r) {
      const float* x = fp(p.x) + tokens[r] * h;
      const float u = dot(x, w1, h) + b1;
      if (p.leaf_wg) {
        const float g = dot(x, fp(p.leaf_wg) + row * h, h) + (p.leaf_bg ? fp(p.leaf_bg)[row] : 0.f);
        hidden[r] = activate(g, p.activation) * u;
      } else {
        hidden[r] = activate(u, p.activation);
      }
    }
    const float* w2 = fp(p.leaf_w2) + row * h;
    for (int64_t r = 0; r < m; ++r) axpy(y + tokens[r] * h, hidden[r], w2, h);
  }
  for (int64_t r = 0; r < m; ++r) add_leaf_bias(p, leaf, y + tokens[r] * h);
}

// Scratch of one worker for gemm_rows.
struct Scratch {
  at::Tensor x, u, g;
};

// One leaf for a block of tokens with BLAS: gather rows, U = X W1^T (+ gate), act, Y = H W2, scatter.
void gemm_rows(const SlmoptFffParams& p, int64_t leaf, const int64_t* tokens, int64_t m, float* y,
               Scratch& s) {
  const int64_t h = p.hidden, l = p.leaf_width, row0 = leaf * l;
  float* xs = s.x.data_ptr<float>();
  float* u = s.u.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r) {
    const float* src = fp(p.x) + tokens[r] * h;
    std::copy(src, src + h, xs + r * h);
  }
  gemm(xs, fp(p.leaf_w1) + row0 * h, u, m, l, h, /*b_transposed=*/true);
  if (p.leaf_b1) {
    for (int64_t r = 0; r < m; ++r) axpy(u + r * l, 1.f, fp(p.leaf_b1) + row0, l);
  }
  at::Tensor ut = s.u.narrow(0, 0, m);
  if (p.leaf_wg) {
    float* g = s.g.data_ptr<float>();
    gemm(xs, fp(p.leaf_wg) + row0 * h, g, m, l, h, true);
    if (p.leaf_bg) {
      for (int64_t r = 0; r < m; ++r) axpy(g + r * l, 1.f, fp(p.leaf_bg) + row0, l);
    }
    at::Tensor gt = s.g.narrow(0, 0, m);
    activate_inplace(gt, p.activation);
    ut.mul_(gt);
  } else {
    activate_inplace(ut, p.activation);  // ATen's vectorised GELU/SiLU: the scalar erf would dominate
  }
  gemm(u, fp(p.leaf_w2) + row0 * h, xs, m, h, l, /*b_transposed=*/false);  // reuse xs for the output
  for (int64_t r = 0; r < m; ++r) {
    float* dst = y + tokens[r] * h;
    axpy(dst, 1.f, xs + r * h, h);
    add_leaf_bias(p, leaf, dst);
  }
}

void batched(const SlmoptFffParams& p, int levels, float* y) {
  const int64_t T = p.tokens, h = p.hidden, l = p.leaf_width;
  std::vector<int64_t> leaf_of(static_cast<size_t>(T));
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(y + t * h, y + (t + 1) * h, 0.f);
      leaf_of[t] = walk(p, levels, fp(p.x) + t * h, y + t * h);
    }
  });
  if (p.leaf_w1 == nullptr) return;

  // Counting sort of tokens by leaf, then cut each leaf's run into row blocks (the parallel work items).
  const int64_t E = p.nodes + 1;
  std::vector<int64_t> start(static_cast<size_t>(E + 1), 0), perm(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) ++start[leaf_of[t] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < T; ++t) perm[cursor[leaf_of[t]]++] = t;
  std::vector<Block> blocks;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t b = start[e]; b < start[e + 1]; b += kRowBlock) {
      blocks.push_back({e, b, std::min(kRowBlock, start[e + 1] - b)});
    }
  }
  const int64_t gemm_rows_min = g_gemm_rows.load(std::memory_order_relaxed);
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    Scratch s;
    std::vector<float> hidden(static_cast<size_t>(kRowBlock));
    for (int64_t bi = b0; bi < b1; ++bi) {
      const Block& blk = blocks[bi];
      const int64_t* tokens = perm.data() + blk.begin;
      if (blk.rows < gemm_rows_min) {
        leaf_rows(p, blk.leaf, tokens, blk.rows, y, hidden.data());
        continue;
      }
      if (!s.x.defined()) {
        auto opt = at::TensorOptions().dtype(at::kFloat);
        s.x = at::empty({kRowBlock, h}, opt);
        s.u = at::empty({kRowBlock, l}, opt);
        if (p.leaf_wg) s.g = at::empty({kRowBlock, l}, opt);
      }
      gemm_rows(p, blk.leaf, tokens, blk.rows, y, s);
    }
  });
}

const void* ptr(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

at::Tensor fff_cpu(const at::Tensor& x_in, const at::Tensor& node_w, const at::Tensor& node_b,
                   const Opt& node_out, const Opt& leaf_w1, const Opt& leaf_b1, const Opt& leaf_wg,
                   const Opt& leaf_bg, const Opt& leaf_w2, const Opt& leaf_b2, c10::string_view activation) {
  const int act = activation_id(activation);
  const int levels =
      check_args(x_in, node_w, node_b, node_out, leaf_w1, leaf_b1, leaf_wg, leaf_bg, leaf_w2, leaf_b2);
  // The kernel is fp32; other dtypes are computed in fp32 and cast back (more accurate than the dtype).
  // Plain checks first: at batch 1 each dispatcher round trip (.to, .contiguous) costs ~0.3 us.
  auto f32 = [](const at::Tensor& t) {
    if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t;
    return t.to(at::kFloat).contiguous();
  };
  auto f32o = [&](const Opt& t) -> Opt { return t ? Opt(f32(*t)) : std::nullopt; };
  const at::Tensor x = f32(x_in), nw = f32(node_w), nb = f32(node_b);
  const Opt no = f32o(node_out), w1 = f32o(leaf_w1), b1 = f32o(leaf_b1), wg = f32o(leaf_wg),
            bg = f32o(leaf_bg), w2 = f32o(leaf_w2), b2 = f32o(leaf_b2);
  at::Tensor y = at::empty(x.sizes(), x.options());
  SlmoptFffParams p{};
  p.x = x.data_ptr();
  p.node_w = nw.data_ptr();
  p.node_b = nb.data_ptr();
  p.node_out = ptr(no);
  p.leaf_w1 = ptr(w1);
  p.leaf_b1 = ptr(b1);
  p.leaf_wg = ptr(wg);
  p.leaf_bg = ptr(bg);
  p.leaf_w2 = ptr(w2);
  p.leaf_b2 = ptr(b2);
  p.y = y.data_ptr();
  p.hidden = x.size(-1);
  p.tokens = p.hidden == 0 ? 0 : x.numel() / p.hidden;
  p.nodes = node_w.size(0);
  p.leaf_width = w1 ? w1->size(1) : 0;
  p.activation = act;
  if (p.tokens > 0 && p.hidden > 0) {
    const int64_t per_leaf = g_leaf_tokens.load(std::memory_order_relaxed) * (p.nodes + 1);
    if (p.tokens <= g_small_batch.load(std::memory_order_relaxed) || p.tokens <= per_leaf) {
      small_batch(p, levels, y.data_ptr<float>());
    } else {
      batched(p, levels, y.data_ptr<float>());
    }
  } else {
    y.zero_();
  }
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

}  // namespace

// Tuning knobs (see the g_* thresholds); each returns the previous value. Called through ctypes by
// slmopt.ops._set_cpu_tuning, which the tests use to force each path.
extern "C" int64_t slmopt_fff_cpu_set_small_batch(int64_t v) { return g_small_batch.exchange(v); }
extern "C" int64_t slmopt_fff_cpu_set_leaf_tokens(int64_t v) { return g_leaf_tokens.exchange(v); }
extern "C" int64_t slmopt_fff_cpu_set_gemm_rows(int64_t v) { return g_gemm_rows.exchange(v); }
extern "C" int64_t slmopt_fff_cpu_set_use_sgemm(int64_t v) { return g_use_sgemm.exchange(v); }

TORCH_LIBRARY_IMPL(slmopt, CPU, m) { m.impl("fff", &fff_cpu); }

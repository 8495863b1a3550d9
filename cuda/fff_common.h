// Per-token math of the slmopt::fff op, shared by the CUDA kernels (fff.cu) and host code.
//
// Everything here is header-only and compiles with nvcc (as __host__ __device__ functions) and with a
// plain C++ compiler (as inline host functions), so the routing step, the activations and the naive
// per-token walk are literally the same source on both sides. Compiling this header as a translation
// unit with -DSLMOPT_FFF_HOST_API (see build.py: compile_host_library) also emits an extern "C" host
// entry points, slmopt_fff_host_forward_f32/_f16, that the tests call through ctypes.
//
// Op semantics (x [T, h], N = 2^L - 1 routing nodes, E = 2^L leaves of width l):
//   n = 0; for k < L: z = node_w[n].x + node_b[n]; y += act(z) * node_out[n] (if given);
//                     n = 2n + 1 + (z > 0)
//   leaf = n - N; hidden_j = act(wg[leaf,j].x + bg) * (w1[leaf,j].x + b1)   (gated)
//                        or act(w1[leaf,j].x + b1)                          (plain)
//   y += sum_j hidden_j * w2[leaf,j] + b2[leaf]
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define SLMOPT_HD __host__ __device__ __forceinline__
#else
#define SLMOPT_HD inline
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Raw-pointer view of one fff call. Optional tensors are NULL. All tensors are contiguous, row-major,
// with the element type given by the entry point (float, half or bfloat16); y has the type of x.
typedef struct SlmoptFffParams {
  const void* x;         // [tokens, hidden]
  const void* node_w;    // [nodes, hidden]
  const void* node_b;    // [nodes]
  const void* node_out;  // [nodes, hidden] or NULL (UltraFastBERT output rows)
  const void* leaf_w1;   // [leaves, leaf_width, hidden] or NULL
  const void* leaf_b1;   // [leaves, leaf_width] or NULL
  const void* leaf_wg;   // [leaves, leaf_width, hidden] or NULL (gate of SwiGLU/GeGLU leaves)
  const void* leaf_bg;   // [leaves, leaf_width] or NULL
  const void* leaf_w2;   // [leaves, leaf_width, hidden] (down projection, neuron-major) or NULL
  const void* leaf_b2;   // [leaves, hidden] or NULL
  void* y;               // [tokens, hidden] output
  int64_t tokens;
  int64_t hidden;
  int64_t nodes;         // 2^levels - 1
  int64_t leaf_width;    // 0 when there are no leaves
  int32_t activation;    // SlmoptFffActivation
} SlmoptFffParams;

enum SlmoptFffActivation {
  SLMOPT_FFF_GELU = 0,
  SLMOPT_FFF_GELU_TANH = 1,
  SLMOPT_FFF_SILU = 2,
  SLMOPT_FFF_RELU = 3,
};

// Status codes returned by the extern "C" entry points.
enum SlmoptFffStatus {
  SLMOPT_FFF_OK = 0,
  SLMOPT_FFF_BAD_NODES = 1,       // nodes + 1 is not a power of two
  SLMOPT_FFF_BAD_ACTIVATION = 2,
  SLMOPT_FFF_BAD_LEAVES = 3,      // exactly one of leaf_w1 / leaf_w2 given, or bias without weight
  SLMOPT_FFF_NOTHING_TO_DO = 4,   // neither node_out nor leaves
  SLMOPT_FFF_CUDA_ERROR = 5,     // a CUDA call of this launch failed (slmopt_fff_last_cuda_error says which)
  SLMOPT_FFF_SMALL_WORKSPACE = 6, // workspace_bytes below slmopt_fff_workspace_size()
};

#ifdef __cplusplus
}  // extern "C"
#endif

namespace slmopt {
namespace fff {

// Number of levels L for nodes = 2^L - 1, or -1 when nodes + 1 is not a power of two.
SLMOPT_HD int levels_for_nodes(int64_t nodes) {
  const int64_t n1 = nodes + 1;
  if (nodes < 1 || (n1 & (n1 - 1)) != 0) return -1;
  int levels = 0;
  while ((int64_t{1} << levels) < n1) ++levels;
  return levels;
}

// One routing decision: right child when the logit is strictly positive (hard routing).
SLMOPT_HD int64_t route_step(int64_t node, float logit) { return 2 * node + 1 + (logit > 0.f ? 1 : 0); }

// Activation used by node outputs and leaf hidden units; matches torch's GELU (erf / tanh), SiLU, ReLU.
SLMOPT_HD float activate(float z, int act) {
  switch (act) {
    case SLMOPT_FFF_GELU:
      return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case SLMOPT_FFF_GELU_TANH: {
      const float inner = 0.7978845608028654f * (z + 0.044715f * z * z * z);
      return 0.5f * z * (1.f + tanhf(inner));
    }
    case SLMOPT_FFF_SILU:
      return z / (1.f + expf(-z));
    default:
      return z > 0.f ? z : 0.f;
  }
}

SLMOPT_HD float to_float(float v) { return v; }
#if defined(__CUDACC__) || defined(SLMOPT_FFF_EMULATION)
// (fff_emu.h gives the host emulation the same type and intrinsic names.)
SLMOPT_HD float to_float(__half v) { return __half2float(v); }
SLMOPT_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
#elif defined(SLMOPT_FFF_HOST_API)
// Host twin of __half for the host build: GCC's _Float16 has the same IEEE binary16 storage as
// torch.float16, so the tests can hand it fp16 tensors directly.
SLMOPT_HD float to_float(_Float16 v) { return static_cast<float>(v); }
#endif

template <typename T>
SLMOPT_HD T from_float(float v) {
  return static_cast<T>(v);
}
#if defined(__CUDACC__) || defined(SLMOPT_FFF_EMULATION)
template <>
SLMOPT_HD __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
SLMOPT_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
#endif

// Serial fp32-accumulated dot product (the reference order; vectorised kernels use their own).
template <typename T>
SLMOPT_HD float dot_serial(const T* a, const T* b, int64_t n) {
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) acc += to_float(a[i]) * to_float(b[i]);
  return acc;
}

template <typename T>
SLMOPT_HD float load_or_zero(const void* base, int64_t index) {
  return base == nullptr ? 0.f : to_float(static_cast<const T*>(base)[index]);
}

// Checks the parameter block; returns an SlmoptFffStatus.
SLMOPT_HD int validate(const SlmoptFffParams& p) {
  if (levels_for_nodes(p.nodes) < 0) return SLMOPT_FFF_BAD_NODES;
  if (p.activation < SLMOPT_FFF_GELU || p.activation > SLMOPT_FFF_RELU) return SLMOPT_FFF_BAD_ACTIVATION;
  const bool has_leaves = p.leaf_w1 != nullptr;
  if (has_leaves != (p.leaf_w2 != nullptr)) return SLMOPT_FFF_BAD_LEAVES;
  if (!has_leaves && (p.leaf_b1 || p.leaf_wg || p.leaf_bg || p.leaf_b2)) return SLMOPT_FFF_BAD_LEAVES;
  if (p.leaf_bg != nullptr && p.leaf_wg == nullptr) return SLMOPT_FFF_BAD_LEAVES;
  if (has_leaves && p.leaf_width < 1) return SLMOPT_FFF_BAD_LEAVES;
  if (!has_leaves && p.node_out == nullptr) return SLMOPT_FFF_NOTHING_TO_DO;
  return SLMOPT_FFF_OK;
}

// Walks the tree for token t; adds node contributions to y (fp32, hidden values) and returns the leaf.
template <typename T>
SLMOPT_HD int64_t walk_token(const SlmoptFffParams& p, int64_t t, float* y) {
  const T* x = static_cast<const T*>(p.x) + t * p.hidden;
  const T* node_w = static_cast<const T*>(p.node_w);
  const T* node_out = static_cast<const T*>(p.node_out);
  const int levels = levels_for_nodes(p.nodes);
  int64_t n = 0;
  for (int k = 0; k < levels; ++k) {
    const float z = dot_serial(x, node_w + n * p.hidden, p.hidden) + load_or_zero<T>(p.node_b, n);
    if (node_out != nullptr) {
      const float a = activate(z, p.activation);
      const T* row = node_out + n * p.hidden;
      for (int64_t i = 0; i < p.hidden; ++i) y[i] += a * to_float(row[i]);
    }
    n = route_step(n, z);
  }
  return n - p.nodes;
}

// Hidden unit j of leaf `leaf` for token t (before the down projection).
template <typename T>
SLMOPT_HD float leaf_hidden(const SlmoptFffParams& p, int64_t t, int64_t leaf, int64_t j) {
  const T* x = static_cast<const T*>(p.x) + t * p.hidden;
  const int64_t row = leaf * p.leaf_width + j;
  const float u = dot_serial(x, static_cast<const T*>(p.leaf_w1) + row * p.hidden, p.hidden) +
                  load_or_zero<T>(p.leaf_b1, row);
  if (p.leaf_wg == nullptr) return activate(u, p.activation);
  const float g = dot_serial(x, static_cast<const T*>(p.leaf_wg) + row * p.hidden, p.hidden) +
                  load_or_zero<T>(p.leaf_bg, row);
  return activate(g, p.activation) * u;
}

// Full per-token forward in fp32: y[0:hidden] = fff(x[t]). Serial; the reference for all kernels.
template <typename T>
SLMOPT_HD void token_forward(const SlmoptFffParams& p, int64_t t, float* y) {
  for (int64_t i = 0; i < p.hidden; ++i) y[i] = 0.f;
  const int64_t leaf = walk_token<T>(p, t, y);
  if (p.leaf_w1 == nullptr) return;
  const T* w2 = static_cast<const T*>(p.leaf_w2);
  for (int64_t j = 0; j < p.leaf_width; ++j) {
    const float hj = leaf_hidden<T>(p, t, leaf, j);
    const T* row = w2 + (leaf * p.leaf_width + j) * p.hidden;
    for (int64_t i = 0; i < p.hidden; ++i) y[i] += hj * to_float(row[i]);
  }
  for (int64_t i = 0; i < p.hidden; ++i) y[i] += load_or_zero<T>(p.leaf_b2, leaf * p.hidden + i);
}

}  // namespace fff
}  // namespace slmopt

#ifdef SLMOPT_WITH_TORCH
// Argument checks of the torch-registered kernels (CPU and CUDA share them; host code only).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

namespace slmopt {
namespace fff {

using OptTensor = std::optional<at::Tensor>;

inline int activation_id(c10::string_view name) {
  if (name == "gelu") return SLMOPT_FFF_GELU;
  if (name == "gelu_tanh") return SLMOPT_FFF_GELU_TANH;
  if (name == "silu") return SLMOPT_FFF_SILU;
  if (name == "relu") return SLMOPT_FFF_RELU;
  TORCH_CHECK_VALUE(false, "fff: unknown activation '", std::string(name),
                    "'; valid choices: gelu, gelu_tanh, silu, relu");
  return -1;
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "fff: ", name, " must have shape ", expected, ", got ", t.sizes());
}

// Validates an fff call (mirrors slmopt/ops.py:_check_args); returns the number of levels L.
inline int check_args(const at::Tensor& x, const at::Tensor& node_w, const at::Tensor& node_b, const OptTensor& node_out,
               const OptTensor& w1, const OptTensor& b1, const OptTensor& wg, const OptTensor& bg, const OptTensor& w2, const OptTensor& b2) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "fff: x must have a hidden dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(node_w.dim() == 2, "fff: node_w must be [N, h], got shape ", node_w.sizes());
  const int64_t h = x.size(-1), N = node_w.size(0);
  TORCH_CHECK_VALUE(node_w.size(1) == h, "fff: node_w has hidden size ", node_w.size(1), " but x has ", h);
  const int levels = levels_for_nodes(N);
  TORCH_CHECK_VALUE(levels > 0, "fff: N = ", N,
                    " routing nodes is not 2^L - 1 (N + 1 must be a power of two)");
  check_shape(node_b, {N}, "node_b");
  if (node_out) check_shape(*node_out, {N, h}, "node_out");
  TORCH_CHECK_VALUE(w1.has_value() == w2.has_value(), "fff: leaf_w1 and leaf_w2 must be given together");
  TORCH_CHECK_VALUE(w1 || (!b1 && !wg && !bg && !b2), "fff: leaf biases/gate given without leaf_w1/leaf_w2");
  TORCH_CHECK_VALUE(w1 || node_out, "fff: nothing to compute: give node_out and/or leaf_w1/leaf_w2");
  TORCH_CHECK_VALUE(!bg || wg, "fff: leaf_bg given without leaf_wg");
  for (const at::Tensor* t : {&node_w, &node_b}) {
    TORCH_CHECK_VALUE(t->scalar_type() == x.scalar_type(), "fff: all tensors must have x's dtype ",
                      x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), "fff: all tensors must be on x's device ", x.device(),
                      ", got ", t->device());
  }
  for (const OptTensor* t : {&node_out, &w1, &b1, &wg, &bg, &w2, &b2}) {
    TORCH_CHECK_VALUE(!*t || (*t)->scalar_type() == x.scalar_type(), "fff: all tensors must have x's dtype ",
                      x.scalar_type(), ", got ", (*t)->scalar_type());
    TORCH_CHECK_VALUE(!*t || (*t)->device() == x.device(), "fff: all tensors must be on x's device ",
                      x.device(), ", got ", (*t)->device());
  }
  if (!w1) return levels;
  TORCH_CHECK_VALUE(w1->dim() == 3, "fff: leaf_w1 must be [E, l, h], got shape ", w1->sizes());
  const int64_t E = w1->size(0), l = w1->size(1);
  TORCH_CHECK_VALUE(E == N + 1, "fff: leaf_w1 has E = ", E, " leaves but a tree with N = ", N,
                    " nodes (L = ", levels, " levels) has 2^L = ", N + 1);
  TORCH_CHECK_VALUE(w1->size(2) == h, "fff: leaf_w1 has hidden size ", w1->size(2), " but x has ", h);
  check_shape(*w2, {E, l, h}, "leaf_w2");
  if (b1) check_shape(*b1, {E, l}, "leaf_b1");
  if (wg) check_shape(*wg, {E, l, h}, "leaf_wg");
  if (bg) check_shape(*bg, {E, l}, "leaf_bg");
  if (b2) check_shape(*b2, {E, h}, "leaf_b2");
  return levels;
}

}  // namespace fff
}  // namespace slmopt
#endif  // SLMOPT_WITH_TORCH

#ifdef SLMOPT_FFF_HOST_API
// Host build of the per-token functions above; returns an SlmoptFffStatus. Inputs are fp32 or fp16
// (_Float16); the output is always fp32, accumulated in fp32 exactly as the CUDA kernels do.
template <typename T>
static int slmopt_fff_host_forward(const SlmoptFffParams* p) {
  const int status = slmopt::fff::validate(*p);
  if (status != SLMOPT_FFF_OK) return status;
  float* y = static_cast<float*>(p->y);
  for (int64_t t = 0; t < p->tokens; ++t) slmopt::fff::token_forward<T>(*p, t, y + t * p->hidden);
  return SLMOPT_FFF_OK;
}
extern "C" int slmopt_fff_host_forward_f32(const SlmoptFffParams* p) {
  return slmopt_fff_host_forward<float>(p);
}
extern "C" int slmopt_fff_host_forward_f16(const SlmoptFffParams* p) {
  return slmopt_fff_host_forward<_Float16>(p);
}
#endif

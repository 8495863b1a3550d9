// Host emulation of the slice of CUDA's execution model the fff kernels use, so their real source runs on
// a CPU block by block: threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __shfl_xor_sync, atomicAdd,
// shared memory, __half/__nv_bfloat16 storage. Include it before any kernel header (g++ -include).
//
// Each thread of a block is a cooperative fiber (ucontext). The scheduler always resumes the lowest-numbered
// runnable thread (or the highest, Order::kHighestFirst) and lets it run until it blocks on a barrier or a
// shuffle, so a warp races as far ahead of the others as a missing __syncthreads allows: a read of shared
// memory that no barrier orders after its write sees the poison (0xFF bytes: NaN floats, -1 ints) every
// block's shared memory starts with. Dynamic shared memory is followed by a guard area checked after each
// block (a kernel that writes past what the launch provided fails), and launches are checked against the
// limits a GPU enforces (1024 threads per block, 48 KiB dynamic shared memory unless the kernel opted in).
// Errors inside a fiber cannot unwind (C++ exceptions must not cross makecontext), so they are recorded and
// the launch returns them. Single-threaded: one emulated launch at a time per process.
#pragma once

#ifdef __CUDACC__
#error "fff_emu.h emulates CUDA on the host; nvcc builds use the real execution model"
#endif

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#define SLMOPT_FFF_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define SLMOPT_SHARED(type, name) type& name = *::slmopt_emu::static_shared<type>()
#define SLMOPT_DYNAMIC_SHARED(type, name) type* name = ::slmopt_emu::dynamic_shared<type>()

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using std::max;
using std::min;

// Storage types: IEEE binary16 is GCC's _Float16; bfloat16 is the top half of an fp32 (round to nearest even).
typedef _Float16 __half;
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half v) { return static_cast<float>(v); }
inline __half __float2half_rn(float v) { return static_cast<__half>(v); }
inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

namespace slmopt_emu {

enum Order { kLowestFirst = 0, kHighestFirst = 1 };
constexpr size_t kDefaultDynamicShared = 48 * 1024;  // what a kernel gets without cudaFuncSetAttribute
constexpr size_t kStaticSharedLimit = 48 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr size_t kStackBytes = 64 * 1024;

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  int linear = 0;
  enum State { kReady, kBarrier, kWarp, kDone } state = kReady;
};

struct Warp {
  int arrived = 0;
  unsigned gen = 0;
  float slot[2][32];  // by generation parity: a lane can be at most one shuffle ahead of its slowest peer
};

struct Machine {
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<Warp> warps;
  ucontext_t scheduler;
  int barrier_arrived = 0, done = 0;
  std::vector<unsigned char> shared;
  size_t dynamic_bytes = 0;
  bool used_static = false, used_dynamic = false;
  const std::function<void()>* body = nullptr;
  Order order = kLowestFirst;
  std::string error;  // first error of the current launch
  long long switches = 0;
};

inline Machine& machine() {
  static Machine m;
  return m;
}
inline Fiber* g_cur = nullptr;
inline dim3 g_block_idx, g_block_dim, g_grid_dim;

inline void fail(const std::string& what) {
  Machine& m = machine();
  if (m.error.empty()) m.error = what;
}

inline void yield() {
  ++machine().switches;
  swapcontext(&g_cur->ctx, &machine().scheduler);
}

template <typename T>
T* static_shared() {
  static_assert(sizeof(T) <= kStaticSharedLimit, "static shared memory above 48 KiB does not compile on a GPU");
  Machine& m = machine();
  m.used_static = true;
  if (m.used_dynamic) fail("a kernel mixed static and dynamic shared memory (the emulator lays out only one)");
  return reinterpret_cast<T*>(m.shared.data());
}

template <typename T>
T* dynamic_shared() {
  Machine& m = machine();
  m.used_dynamic = true;
  if (m.used_static) fail("a kernel mixed static and dynamic shared memory (the emulator lays out only one)");
  return reinterpret_cast<T*>(m.shared.data());
}

// Releases every thread waiting at the block barrier once all threads still running have arrived
// (threads that returned no longer take part, as on Volta and newer).
inline void maybe_release_barrier() {
  Machine& m = machine();
  const int live = static_cast<int>(m.fibers.size()) - m.done;
  if (m.barrier_arrived == 0 || m.barrier_arrived < live) return;
  m.barrier_arrived = 0;
  for (Fiber& f : m.fibers) {
    if (f.state == Fiber::kBarrier) f.state = Fiber::kReady;
  }
}

inline void fiber_entry() {
  Machine& m = machine();
  (*m.body)();
  g_cur->state = Fiber::kDone;
  ++m.done;
  maybe_release_barrier();
  // returning resumes uc_link (the scheduler)
}

inline int pick(const Machine& m) {
  const int n = static_cast<int>(m.fibers.size());
  for (int k = 0; k < n; ++k) {
    const int i = m.order == kLowestFirst ? k : n - 1 - k;
    if (m.fibers[i].state == Fiber::kReady) return i;
  }
  return -1;
}

inline void run_block(const std::function<void()>& body) {
  Machine& m = machine();
  const int n = static_cast<int>(m.block.x * m.block.y * m.block.z);
  m.fibers.assign(n, Fiber{});
  while (m.stacks.size() < static_cast<size_t>(n)) m.stacks.emplace_back(new char[kStackBytes]);
  m.warps.assign((n + 31) / 32, Warp{});
  m.barrier_arrived = m.done = 0;
  m.used_static = m.used_dynamic = false;
  std::fill(m.shared.begin(), m.shared.end(), static_cast<unsigned char>(0xFF));
  m.body = &body;
  for (int i = 0; i < n; ++i) {
    Fiber& f = m.fibers[i];
    f.linear = i;
    f.tid = dim3(i % m.block.x, (i / m.block.x) % m.block.y, i / (m.block.x * m.block.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = m.stacks[i].get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &m.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (int next = pick(m); next >= 0; next = pick(m)) {
    g_cur = &m.fibers[next];
    ++m.switches;
    swapcontext(&m.scheduler, &g_cur->ctx);
  }
  g_cur = nullptr;
  if (m.done != n) {
    fail("deadlock: " + std::to_string(n - m.done) +
         " threads wait at a barrier or shuffle that the others never reach");
  }
  if (m.used_dynamic) {
    for (size_t i = m.dynamic_bytes; i < m.shared.size(); ++i) {
      if (m.shared[i] != 0xFF) {
        fail("shared-memory overrun: a thread wrote byte " + std::to_string(i) + " past the " +
             std::to_string(m.dynamic_bytes) + " bytes of dynamic shared memory the launch provided");
        break;
      }
    }
  }
}

// Runs `body` (one thread's view of the kernel) for every thread of every block. Returns "" or the error.
inline std::string launch(dim3 grid, dim3 block, size_t dynamic_bytes, size_t max_dynamic_bytes,
                          const std::function<void()>& body) {
  Machine& m = machine();
  m.error.clear();
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024) return "invalid launch: " + std::to_string(threads) + " threads per block";
  if (static_cast<size_t>(grid.x) * grid.y * grid.z == 0) return "invalid launch: empty grid";
  if (dynamic_bytes > max_dynamic_bytes) {
    return "invalid launch: " + std::to_string(dynamic_bytes) + " bytes of dynamic shared memory, limit " +
           std::to_string(max_dynamic_bytes) + " (cudaFuncAttributeMaxDynamicSharedMemorySize not raised)";
  }
  m.grid = grid;
  m.block = block;
  m.dynamic_bytes = dynamic_bytes;
  m.shared.assign(std::max(dynamic_bytes + kGuardBytes, kStaticSharedLimit), 0xFF);
  g_grid_dim = grid;
  g_block_dim = block;
  const size_t blocks = static_cast<size_t>(grid.x) * grid.y * grid.z;
  for (size_t k = 0; k < blocks && m.error.empty(); ++k) {
    const size_t b = m.order == kLowestFirst ? k : blocks - 1 - k;
    g_block_idx = m.block_idx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (static_cast<size_t>(grid.x) * grid.y));
    run_block(body);
  }
  return m.error;
}

inline void syncthreads() {
  Machine& m = machine();
  g_cur->state = Fiber::kBarrier;
  ++m.barrier_arrived;
  maybe_release_barrier();
  if (g_cur->state == Fiber::kBarrier) yield();
}

inline float shfl_xor(unsigned mask, float v, int offset) {
  Machine& m = machine();
  const int n = static_cast<int>(m.fibers.size()), w = g_cur->linear / 32, lane = g_cur->linear % 32;
  if (mask != 0xffffffffu || (w + 1) * 32 > n || offset < 0 || offset > 31) {
    fail("__shfl_xor_sync: only full-warp masks on full warps are emulated");
    return v;
  }
  Warp& warp = m.warps[w];
  const unsigned gen = warp.gen;
  warp.slot[gen & 1][lane] = v;
  if (++warp.arrived == 32) {
    warp.arrived = 0;
    ++warp.gen;
    for (int i = w * 32; i < w * 32 + 32; ++i) {
      if (m.fibers[i].state == Fiber::kWarp) m.fibers[i].state = Fiber::kReady;
    }
  } else {
    g_cur->state = Fiber::kWarp;
    yield();
  }
  return warp.slot[gen & 1][lane ^ offset];
}

}  // namespace slmopt_emu

#define threadIdx (::slmopt_emu::g_cur->tid)
#define blockIdx (::slmopt_emu::g_block_idx)
#define blockDim (::slmopt_emu::g_block_dim)
#define gridDim (::slmopt_emu::g_grid_dim)

inline void __syncthreads() { ::slmopt_emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned mask, float v, int offset) { return ::slmopt_emu::shfl_xor(mask, v, offset); }
// Fibers never preempt each other, so a plain read-modify-write is atomic here.
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = value + old;
  return old;
}

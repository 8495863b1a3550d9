// Host build of fff.cu's launch logic and kernels on the CUDA emulator (fff_emu.h), for tests on machines
// without a GPU: the same fff_launch.cuh / kernel headers nvcc compiles, executed block by block.
//
// extern "C" API (ctypes): slmopt_fff_emu_forward(dtype 0 f32 / 1 f16 / 2 bf16, params, workspace, bytes),
// slmopt_fff_emu_configure(order, opt-in limit, refuse opt-in), slmopt_fff_emu_set_multiprocessors(n),
// slmopt_fff_emu_log() (one line per launch, or the emulator's error). Built by slmopt.native.build.compile_emulator.
#include "fff_emu.h"
#include "fff_launch.cuh"

#include <map>

namespace {

struct Settings {
  slmopt_emu::Order order = slmopt_emu::kLowestFirst;
  size_t optin_limit = 227 * 1024;  // sm_90's cudaDevAttrMaxSharedMemoryPerBlockOptin
  bool refuse_optin = false;        // cudaFuncSetAttribute fails (another reason a device may say no)
  int multiprocessors = 132;        // an H100/H200
} settings;

std::string log_text;

// The emulated device: launches are checked against the limits a GPU enforces, then run on the host.
struct EmuExec {
  std::map<const void*, size_t> max_dynamic;  // per kernel, as cudaFuncSetAttribute would record it

  template <typename... Params, typename... Args>
  int launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args... args) {
    const auto it = max_dynamic.find(reinterpret_cast<const void*>(kernel));
    const size_t limit = it == max_dynamic.end() ? slmopt_emu::kDefaultDynamicShared : it->second;
    log_text += std::string(name) + " grid=" + std::to_string(grid.x) + "x" + std::to_string(grid.y) +
                " block=" + std::to_string(block.x) + " smem=" + std::to_string(smem) + "\n";
    const std::function<void()> body = [&] { kernel(static_cast<Params>(args)...); };
    const std::string error = slmopt_emu::launch(grid, block, smem, limit, body);
    if (error.empty()) return 0;
    log_text += "error: " + error + "\n";
    return 1;
  }

  template <typename... Params>
  bool opt_in_dynamic_smem(void (*kernel)(Params...), size_t bytes) {
    if (settings.refuse_optin || bytes > settings.optin_limit) return false;
    max_dynamic[reinterpret_cast<const void*>(kernel)] = bytes;
    return true;
  }

  int memset(void* ptr, int value, size_t bytes) {
    std::memset(ptr, value, bytes);
    return 0;
  }

  int multiprocessors() const { return settings.multiprocessors; }
};

}  // namespace

extern "C" {

void slmopt_fff_emu_set_multiprocessors(int count) { settings.multiprocessors = count; }

void slmopt_fff_emu_configure(int order, long long optin_limit, int refuse_optin) {
  slmopt_emu::machine().order = static_cast<slmopt_emu::Order>(order);
  settings.optin_limit = static_cast<size_t>(optin_limit);
  settings.refuse_optin = refuse_optin != 0;
}

size_t slmopt_fff_emu_workspace_size(const SlmoptFffParams* p, int element_bytes) {
  return slmopt::fff::workspace_layout(*p, element_bytes, nullptr, nullptr);
}

// dtype: 0 float32, 1 float16, 2 bfloat16 (x, weights and y all of that type).
int slmopt_fff_emu_forward(int dtype, const SlmoptFffParams* p, void* workspace, size_t workspace_bytes) {
  log_text.clear();
  EmuExec exec;
  switch (dtype) {
    case 0: return slmopt::fff::forward<float>(*p, workspace, workspace_bytes, exec);
    case 1: return slmopt::fff::forward<__half>(*p, workspace, workspace_bytes, exec);
    case 2: return slmopt::fff::forward<__nv_bfloat16>(*p, workspace, workspace_bytes, exec);
    default: return -1;
  }
}

const char* slmopt_fff_emu_log(void) { return log_text.c_str(); }

}  // extern "C"

// The switch between our kernels and torchvision's (see override.h), and the small control
// ops the Python side calls: nothing here is on a hot path.
#include "override.h"

#include "debug_thresholds.h"
#include "memory.h"

#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>

#include <iterator>
#include <memory>
#include <mutex>
#include <string>

namespace tvce {
namespace {

struct Entry {
  std::vector<const char*> ops;
  RegisterFn fn;
};

std::vector<Entry>& registry() {
  static std::vector<Entry> r;
  return r;
}

std::mutex g_mutex;
std::unique_ptr<torch::Library> g_lib;

// Every kernel registered through the override carries this file string in the dispatcher's
// debug info; info() and the tests read it to prove which kernel is dispatched.
constexpr const char* kMarker = "torchvision_cpu_ext/csrc/cpu/override.cpp";

bool set_cpu_override(bool enabled) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const bool was = g_lib != nullptr;
  if (enabled && !g_lib) {
    auto lib = std::make_unique<torch::Library>(
        torch::Library::IMPL, "torchvision", c10::DispatchKey::CPU, kMarker, __LINE__);
    for (const auto& e : registry()) {
      e.fn(*lib);
    }
    g_lib = std::move(lib);
  } else if (!enabled) {
    g_lib.reset();
  }
  return was;
}

std::vector<std::string> cpu_override_ops() {
  std::vector<std::string> out;
  for (const auto& e : registry()) {
    out.insert(out.end(), e.ops.begin(), e.ops.end());
  }
  return out;
}

std::string capability() {
  return C10_STRINGIZE(CPU_CAPABILITY);
}

std::vector<int64_t> output_pool_stats() {
  OutputPool& pool = OutputPool::get();
  return {static_cast<int64_t>(pool.cached_bytes()), static_cast<int64_t>(pool.cap())};
}

void empty_output_pool() {
  OutputPool::get().empty_cache();
}

// NOTE [ debug thresholds ] (debug_thresholds.h): sets one knob (value < 0 restores the
// kernel's own threshold) and returns its previous override (-1 if it had none).
int64_t set_debug_threshold(const std::string& name, int64_t value) {
  for (int t = 0; t < debug::kThresholdCount; ++t) {
    if (name == debug::kNames[t]) {
      const int64_t stored = value < 0 ? 0 : value + 1;
      return debug::knobs()[t].exchange(stored, std::memory_order_relaxed) - 1;
    }
  }
  std::string known;
  for (const char* n : debug::kNames) {
    known += known.empty() ? n : std::string(", ") + n;
  }
  TORCH_CHECK(false, "torchvision_cpu_ext: no debug threshold named '", name, "'; known: ", known);
}

std::vector<std::string> debug_threshold_names() {
  return {std::begin(debug::kNames), std::end(debug::kNames)};
}

} // namespace

CpuOverride::CpuOverride(std::vector<const char*> ops, RegisterFn fn) {
  registry().push_back({std::move(ops), fn});
}

} // namespace tvce

// NOTE [ thread count on first use ]
// at::parallel_for is inline code: each call runs at::internal::lazy_init_num_threads(), whose
// thread_local "done" flag is this library's own copy (libtorch keeps its copy to itself). So a
// thread's first parallel call of our kernels ran at::init_num_threads(), which sets the calling
// thread's intra-op thread count to the process-wide one (the last torch.set_num_threads of any
// thread), though libtorch had initialised that thread already: a thread that had set its own
// count with torch.set_num_threads lost it, the kernel ran at another count (deform_conv2d's
// gradients depend on it) and so did the thread's later ATen ops. With the link flag
// -Wl,--wrap=<at::init_num_threads> (_build.py LDFLAGS) this library's calls come here instead:
// libtorch's own once-per-thread initialisation (at::get_num_threads() runs it), which gives a
// fresh thread the process-wide count, as any ATen op would, and leaves alone a thread that has
// its own. tests/test_concurrency.py checks both.
extern "C" void __wrap__ZN2at16init_num_threadsEv() {
  (void)at::get_num_threads();
}

TORCH_LIBRARY(torchvision_cpu_ext, m) {
  m.def("_set_cpu_override(bool enabled) -> bool", &tvce::set_cpu_override);
  m.def("_cpu_override_ops() -> str[]", &tvce::cpu_override_ops);
  m.def("_capability() -> str", &tvce::capability);
  m.def("_output_pool_stats() -> int[]", &tvce::output_pool_stats);
  m.def("_empty_output_pool() -> ()", &tvce::empty_output_pool);
  m.def("_set_debug_threshold(str name, int value) -> int", &tvce::set_debug_threshold);
  m.def("_debug_threshold_names() -> str[]", &tvce::debug_threshold_names);
}

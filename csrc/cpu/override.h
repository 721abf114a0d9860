#pragma once
// Kernels register themselves here instead of in a static TORCH_LIBRARY_IMPL block: a static
// registration cannot be undone, and disable() must hand torchvision's own kernels back.
// override.cpp owns one torch::Library on the torchvision namespace's CPU key; dropping it
// unregisters every kernel at once and the dispatcher falls back to torchvision's.
#include <torch/library.h>

#include <vector>

namespace tvce {

using RegisterFn = void (*)(torch::Library&);

struct CpuOverride {
  // `ops` are the torchvision op names that `fn` registers, for info() and the fallback mode.
  CpuOverride(std::vector<const char*> ops, RegisterFn fn);
};

} // namespace tvce

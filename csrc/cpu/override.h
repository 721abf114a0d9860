#pragma once
// Kernels register themselves here instead of in a static TORCH_LIBRARY_IMPL block: a static
// registration cannot be undone, and disable() must hand torchvision's own kernels back.
// override.cpp owns one torch::Library on the torchvision namespace's CPU key; dropping it
// unregisters every kernel at once and the dispatcher falls back to torchvision's.
// The same registrations serve the fallback configuration, where they are the only kernels.
// Every op goes through this switch, including those added to complete the fallback
// (box_iou_rotated, qnms, qroi_align): each gives torchvision's results (box_iou_rotated the
// same values, computed in parallel; qnms the same indices; qroi_align the same integers or
// one quantization step away, see its NOTE), disable() still gives torchvision's back, and
// one rule for every op keeps info(), the fallback's op list and the tests uniform.
#include <torch/library.h>

#include <vector>

namespace tvce {

using RegisterFn = void (*)(torch::Library&);

struct CpuOverride {
  // `ops` are the torchvision op names that `fn` registers, for info() and the fallback mode.
  CpuOverride(std::vector<const char*> ops, RegisterFn fn);
};

} // namespace tvce

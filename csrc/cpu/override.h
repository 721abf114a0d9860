#pragma once
// NOTE [ registration routes ]
// A kernel reaches users by one of three routes. Which one follows from two questions: whose op
// is it (torchvision's or this package's), and must disable() be able to take it back?
//
// (a) The switchable CPU override of torchvision's ops (this header). Kernels for ops that
//     torchvision defines (torchvision::roi_align, _roi_align_backward, roi_pool, ps_roi_*,
//     nms, and box_iou_rotated / qnms / qroi_align, which complete the fallback configuration)
//     register through a CpuOverride registrar instead of a static TORCH_LIBRARY_IMPL block:
//         const CpuOverride registrar({"roi_align", "_roi_align_backward"}, &register_kernels);
//     override.cpp owns ONE torch::Library on the torchvision namespace's CPU key and calls
//     every registrar's function on it when enabled; disable() drops that Library, which
//     unregisters every kernel at once, and the dispatcher falls back to torchvision's own.
//     Why: a static registration cannot be undone, and disable()/disabled() must hand
//     torchvision's kernels back (comparisons, benchmarks, users who want them). The CPU key,
//     never only Autograd: torchvision's Autograd kernel redispatches to _*_backward, so a CPU
//     override of the backward is picked up by autograd and works under inference_mode. The
//     same registrations serve the fallback configuration, where torchvision has no compiled
//     kernels and ours are the only ones. Every torchvision op goes through this one switch,
//     including those added only to complete the fallback (each gives torchvision's results;
//     qroi_align within one quantization step, see its NOTE), so that info(), the fallback's op
//     list and the tests follow one rule for every op.
//
// (b) A static TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL(torchvision_cpu_ext, CPU) block at
//     the bottom of the kernel file, for the package's own ops: torchvision_cpu_ext::
//     _batched_nms (nms_kernel.cpp), frozen_batch_norm (frozen_batch_norm_kernel.cpp),
//     _roi_align_mixed (roi_align_kernel.cpp, the autocast entry), and override.cpp's control
//     ops (_set_cpu_override, _output_pool_stats, _set_debug_threshold, ...). Nothing of
//     torchvision's is replaced by defining them, so there is nothing to switch off: whether
//     they are used is decided by the Python side (route (c) or the ops' autocast / autograd
//     registrations in torchvision_cpu_ext/ops/*.py), which the switch of route (a) also
//     turns on and off. Their schemas live here with the kernels; fake kernels and autograd in
//     Python.
//
// (c) Python patches of torchvision (and detectron2) functions, in torchvision_cpu_ext/ops/*.py,
//     where the hot code is not a torchvision op at all but Python: FrozenBatchNorm2d.forward
//     (two elementwise passes) -> torchvision_cpu_ext::frozen_batch_norm;
//     torchvision.ops.boxes._batched_nms_vanilla (a loop of nms calls per class) ->
//     torchvision_cpu_ext::_batched_nms; detectron2.layers.FrozenBatchNorm2d.forward
//     (F.batch_norm) -> frozen_batch_norm(as_batch_norm=True), patched through an import hook
//     so detectron2 is never imported here. enable() installs them and disable() restores the
//     originals, together with route (a), so one switch covers every route. A patch keeps the
//     original's results bit for bit and falls back to the original for inputs the fused op
//     does not cover.
#include <torch/library.h>

#include <vector>

namespace tvce {

using RegisterFn = void (*)(torch::Library&);

// Route (a) of NOTE [ registration routes ]: a kernel file's registrar, constructed during
// static initialisation; `ops` are the torchvision op names that `fn` registers, for info() and
// the fallback mode.
struct CpuOverride {
  CpuOverride(std::vector<const char*> ops, RegisterFn fn);
};

} // namespace tvce

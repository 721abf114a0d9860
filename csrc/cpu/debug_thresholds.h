#pragma once
// NOTE [ debug thresholds ]
// The kernels choose between paths by size: streamed or cached stores, band heights, the
// transposed or direct NCHW loop, the output pool, nms' radix sort and parallel suppression,
// deform_conv2d's tiles, GEMM and threads, depthwise_conv's threads and bands.
// Left alone, a test reaches the large-size paths only with maps of tens of MB. Each size
// decision reads its threshold through threshold() below, which returns the kernel's own value
// unless a test has overridden it: torchvision_cpu_ext._debug.thresholds(**overrides), through
// the private ops _set_debug_threshold / _debug_threshold_names (override.cpp), sets a knob for
// the duration of a block. A kernel reads each knob once per call (one relaxed atomic load), so
// the hot loops never see them. The names are the Python keyword arguments; kNames and the
// enum below list them in the same order.
#include <atomic>
#include <cstdint>

namespace tvce {
namespace debug {

enum Threshold : int {
  // Opmath bytes of grad_input per thread from which a backward writes it with non-temporal
  // stores (stream_grad_input in roi_schedule.h).
  kStreamGradBytes,
  // Opmath bytes of a band of rows of a channels_last backward (by_bands in roi_schedule.h);
  // replaces each caller's fraction of L2.
  kGradBandBytes,
  // roi_pool channels_last forward: bytes of the channel block's lines per band of rows.
  kRoiPoolBandBytes,
  // roi_pool channels_last forward: output + argmax bytes from which results are streamed.
  kRoiPoolStreamBytes,
  // ps_roi_pool channels_last forward: bytes of running sums per group of an image's ROIs.
  kPsRoiPoolGroupBytes,
  // The NCHW forward path of roi_align and roi_pool (use_transposed_nchw in roi_schedule.h):
  // 0 runs the direct per-plane loops, 1 the transposed blocks, unset the size rule.
  kNchwTranspose,
  // Smallest output in bytes taken from the output pool (memory.h).
  kOutputPoolMinBytes,
  // nms: fewest boxes sorted by the radix sort (fewer use the comparison sort).
  kNmsRadixMin,
  // nms: vector operations of a block's suppression from which it runs on several threads.
  kNmsParallelWork,
  // deform_conv2d: output pixels per tile (tile_pixels).
  kDeformTilePixels,
  // deform_conv2d: float32 tile GEMMs through oneDNN's brgemm (1) or ATen's matmul (0).
  kDeformBrgemm,
  // deform_conv2d: multiply-adds of a call below which it runs on one thread.
  kDeformSerialWork,
  // depthwise_conv: multiply-adds of a call below which it runs on the calling thread.
  kDepthwiseSerialWork,
  // depthwise_conv NCHW: bytes of a band's scratch (its input rows and output rows).
  kDepthwiseBandBytes,
  // depthwise_conv NCHW 2-D: widest output rows that run as channel blocks (wider: planes).
  kDepthwiseBlockWidth,
  kThresholdCount
};

inline constexpr const char* kNames[kThresholdCount] = {
    "stream_grad_bytes",   "grad_band_bytes",  "roi_pool_band_bytes",
    "roi_pool_stream_bytes", "ps_roi_pool_group_bytes", "nchw_transpose",
    "output_pool_min_bytes", "nms_radix_min",  "nms_parallel_work", "deform_tile_pixels",
    "deform_brgemm",         "deform_serial_work", "depthwise_serial_work", "depthwise_band_bytes",
    "depthwise_block_width"};

// Each knob holds its override + 1; 0 (static zero initialisation) means "not overridden".
inline std::atomic<int64_t>* knobs() {
  static std::atomic<int64_t> values[kThresholdCount];
  return values;
}

// The threshold to use now: the override if a test set one, else `fallback`, the kernel's own.
inline int64_t threshold(Threshold t, int64_t fallback) {
  const int64_t v = knobs()[t].load(std::memory_order_relaxed);
  return v == 0 ? fallback : v - 1;
}

} // namespace debug
} // namespace tvce

// roi_pool forward and backward for CPU: NCHW and channels_last, float/double/bfloat16/half.
//
// NOTE [ roi_pool ]
// Semantics: bins are torchvision's integer bins (roi_geometry.h, PoolBins). Each output is the
// maximum of its bin with torchvision's rules kept exactly: the scan goes row by row, a value
// replaces the running maximum only when strictly greater (so ties keep the first position, NaN
// is never taken, and a bin of values <= -FLT_MAX reports -FLT_MAX with argmax -1), an empty bin
// gives 0 and argmax -1. Max is exact in every dtype, so outputs equal torchvision's bit for
// bit, whatever the path; argmax is the int32 index h * W + w within the plane.
// The parts, bottom up:
// - Leaf loops over pixel-major data, vectorized over channels: take_greater / scan_max keep
//   the running maxima and their positions in registers (the position as the integer's bits in
//   an opmath lane, so one masked move takes both; AVX-512: a compare into a mask register and
//   two masked moves), four vectors per scan; bin_max / store_bin run and write one bin.
// - channels_last forward (forward_channels_last): the work is bound by the caches (each
//   pixel of a large map is read many times by overlapping boxes), so items are (image, block
//   of four vectors of channels, chunk of its boxes) and an item sweeps the image in bands of
//   rows (~256 KiB of the block's lines, kept in L2), scanning in each band the part of every
//   bin that lies in it. plan_bands lists, per band, the rows of bins (BandRow) that meet it; a
//   bin spanning bands keeps its running state in a small per-thread scratch slot between them
//   (slots are reused once their bins end; the state is exactly the sequential scan's, so ties
//   and NaN behave as in one pass), and its result is written once, in its last band
//   (band_row), with non-temporal stores when the results are large.
// - NCHW forward, two paths chosen by the work (use_transposed_nchw, NOTE [ transposed NCHW ]
//   in roi_schedule.h, the rule roi_align shares): forward_nchw_blocked transposes blocks of V
//   channels of an image to pixel-major (pixel_transpose.h) and runs the same bin loop;
//   forward_nchw_direct, for bins reading less than half the map, runs scalar per-plane loops.
// - Backward adds each output gradient at its argmax, ROIs in order, so every element gets its
//   adds in torchvision's order (deterministic, no races, no atomics):
//   channels_last (backward_channels_last_bands): threads own bands of rows (3/4 of L2;
//   detail::by_bands) and each band visits the bins whose rows meet it, adding the channels
//   whose argmax falls in it with a masked gather/add/scatter (scatter_band). An argmax outside
//   its bin's rows (not one roi_pool made) sends channels_last to the general path: threads
//   own blocks of V channels of a zeroed float map. NCHW: threads own (image, channel) planes
//   (detail::OwnedGradAccumulator), zeroed right before their ROIs scatter into them so the
//   plane stays in cache, large gradients written with non-temporal stores.
// - Glue: roi_pool_forward / roi_pool_backward check arguments (checks.h), allocate outputs
//   (argmax too) from the output pool in the input's layout, and register on the switchable
//   override (override.h).
// Band sizes, streaming thresholds and the measurements behind them: benchmarks/HISTORY.md.
#include "checks.h"
#include "debug_thresholds.h"
#include "memory.h"
#include "override.h"
#include "pixel_transpose.h"
#include "roi_geometry.h"
#include "roi_schedule.h"
#include "vec_io.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cfloat>
#include <cstdint>

namespace tvce {
namespace {

using detail::PoolBins;

constexpr const char* kOp = "roi_pool";

template <typename acc_t>
using IdxInt = at::vec::int_same_size_t<acc_t>;

// cur = max(cur, x) where x > cur (strictly: ties keep the first position, NaN never
// replaces), arg = here in the same lanes.
template <typename Vec>
inline void take_greater(Vec& cur, Vec& arg, const Vec& x, const Vec& here) {
  const Vec gt = x > cur;
  cur = Vec::blendv(cur, x, gt);
  arg = Vec::blendv(arg, here, gt);
}

#if defined(CPU_CAPABILITY_AVX512)
// The same with a mask register: at::vec's compare-and-blend round-trips the mask through a
// vector (three more instructions per blend), and this is the whole inner loop.
inline void take_greater(
    at::vec::Vectorized<float>& cur,
    at::vec::Vectorized<float>& arg,
    const at::vec::Vectorized<float>& x,
    const at::vec::Vectorized<float>& here) {
  const __mmask16 gt = _mm512_cmp_ps_mask(x, cur, _CMP_GT_OQ);
  cur = _mm512_mask_mov_ps(cur, gt, x);
  arg = _mm512_mask_mov_ps(arg, gt, here);
}
#endif

// Running max and argmax of NV vectors of channels (the first at px0, the last `lanes` wide;
// pixels `pstride` apart) over rows [h0, h1) x columns [w0, w1), in torchvision's scan order,
// continuing from cur/pos. Positions are the int index h * W + w as bits in an opmath lane, so
// one masked move takes both.
template <typename scalar_t, int NV>
inline void scan_max(
    const scalar_t* px0,
    int64_t W,
    int64_t pstride,
    int64_t lanes,
    int64_t h0,
    int64_t h1,
    int64_t w0,
    int64_t w1,
    OpVec<scalar_t>* cur,
    OpVec<scalar_t>* pos) {
  using acc_t = opmath_t<scalar_t>;
  using IVec = at::vec::Vectorized<IdxInt<acc_t>>;
  constexpr int64_t V = OpVec<scalar_t>::size();
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = w0; w < w1; ++w) {
      const scalar_t* px = px0 + (h * W + w) * pstride;
      const auto here = at::vec::cast<acc_t>(IVec(static_cast<IdxInt<acc_t>>(h * W + w)));
      for (int g = 0; g < NV; ++g) {
        take_greater(cur[g], pos[g], load_opmath(px + g * V, g == NV - 1 ? lanes : V), here);
      }
    }
  }
}

// The state a bin's scan starts from: maximum 0 if the bin is empty, else -FLT_MAX (as
// torchvision); argmax -1.
template <typename scalar_t>
inline void start_max(bool empty, OpVec<scalar_t>& cur, OpVec<scalar_t>& pos) {
  using acc_t = opmath_t<scalar_t>;
  cur = OpVec<scalar_t>(empty ? acc_t(0) : acc_t(-FLT_MAX));
  pos = at::vec::cast<acc_t>(at::vec::Vectorized<IdxInt<acc_t>>(IdxInt<acc_t>(-1)));
}

// Max and argmax of bin (ph, pw) over n <= V channels of a pixel-major image (pixels `pstride`
// apart), kept in registers while the bin's pixels are scanned, then stored to m[0, V) and
// arg[0, V) (argmax bits in opmath lanes).
template <typename scalar_t>
inline void bin_max(
    const scalar_t* px0,
    int64_t W,
    int64_t pstride,
    int64_t n,
    const PoolBins& b,
    int64_t ph,
    int64_t pw,
    opmath_t<scalar_t>* m,
    opmath_t<scalar_t>* arg) {
  OpVec<scalar_t> cur, pos;
  start_max<scalar_t>(b.empty(ph, pw), cur, pos);
  scan_max<scalar_t, 1>(px0, W, pstride, n, b.h0[ph], b.h1[ph], b.w0[pw], b.w1[pw], &cur, &pos);
  cur.store(m);
  pos.store(arg);
}

// Stores lanes [0, n) of m/arg as outputs `stride` elements apart.
template <typename scalar_t>
inline void store_bin(
    const opmath_t<scalar_t>* m,
    const opmath_t<scalar_t>* arg,
    int64_t n,
    int64_t stride,
    scalar_t* out,
    int32_t* argmax) {
  using acc_t = opmath_t<scalar_t>;
  for (int64_t c = 0; c < n; ++c) {
    IdxInt<acc_t> a;
    std::memcpy(&a, arg + c, sizeof(a));
    out[c * stride] = static_cast<scalar_t>(m[c]);
    argmax[c * stride] = static_cast<int32_t>(a);
  }
}

// A row of bins (box k, bin row ph) as one band of rows meets it. Bins that continue into
// later bands keep their running state in `slot` of the item's scratch meanwhile; `first` and
// `last` say whether the band holds the bins' first / last row.
struct BandRow {
  int32_t k, ph, slot;
  bool first, last;
};

// The rows [band * rows, ...) each image is taken in and, per (image, band), the bin rows that
// meet it, boxes in spatial order. Slots are given out per image in band order and reused once
// their bins end, so the scratch holds only the bins open across one band boundary.
struct BandPlan {
  int64_t rows = 1, bands = 1, slots = 0;
  std::vector<std::vector<BandRow>> meets;  // [image * bands + band]
  std::vector<int64_t> rank, count;  // a box's place in its image's order; boxes per image
};

inline BandPlan plan_bands(
    const std::vector<PoolBins>& B, const std::vector<int64_t>& order, int64_t N, int64_t H, int64_t PH, int64_t rows) {
  BandPlan plan;
  plan.rows = std::clamp<int64_t>(rows, 1, std::max<int64_t>(H, 1));
  plan.bands = std::max<int64_t>(1, (H + plan.rows - 1) / plan.rows);
  const auto band_of = [&](int64_t h) { return std::min(h / plan.rows, plan.bands - 1); };
  plan.meets.resize(N * plan.bands);
  plan.rank.resize(B.size());
  plan.count.assign(N, 0);
  std::vector<std::vector<std::pair<int64_t, int64_t>>> starts(N * plan.bands);  // (k, ph) by first band
  for (const int64_t k : order) {
    const PoolBins& b = B[k];
    plan.rank[k] = plan.count[b.batch]++;
    for (int64_t ph = 0; ph < PH; ++ph) {
      starts[b.batch * plan.bands + band_of(b.h0[ph])].emplace_back(k, ph);
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    std::vector<int32_t> free_slots;
    int32_t used = 0;
    std::vector<std::pair<BandRow, int64_t>> open;  // with the band of its last row
    for (int64_t band = 0; band < plan.bands; ++band) {
      for (const auto& [k, ph] : starts[n * plan.bands + band]) {
        const PoolBins& b = B[k];
        const int64_t last = b.h1[ph] > b.h0[ph] ? band_of(b.h1[ph] - 1) : band;
        int32_t slot = -1;
        if (last > band) {
          if (free_slots.empty()) {
            slot = used++;
          } else {
            slot = free_slots.back();
            free_slots.pop_back();
          }
        }
        open.push_back({{static_cast<int32_t>(k), static_cast<int32_t>(ph), slot, true, false}, last});
      }
      auto& meets = plan.meets[n * plan.bands + band];
      size_t kept = 0;
      for (auto& [row, last] : open) {
        row.last = last == band;
        meets.push_back(row);
        row.first = false;
        if (row.last) {
          if (row.slot >= 0) {
            free_slots.push_back(row.slot);
          }
        } else {
          open[kept++] = {row, last};
        }
      }
      open.resize(kept);
    }
    plan.slots = std::max<int64_t>(plan.slots, used);
  }
  return plan;
}

// The rows [r0, r1) of one row of bins (`row`, box b) for NV vectors of channels (the last
// `lanes` wide): each bin starts in its first band, else resumes from its slot state (per pw:
// CB values, then CB positions); in its last band the result is written (non-temporal stores
// if `stream_results`, fenced by the caller), else the state is kept. `out`/`am` are bin (ph, 0)'s first
// channel; bins are C apart.
template <typename scalar_t, int NV>
C10_ALWAYS_INLINE void band_row(
    const scalar_t* px0,
    int64_t W,
    int64_t C,
    int64_t lanes,
    const PoolBins& b,
    const BandRow& row,
    int64_t PW,
    int64_t r0,
    int64_t r1,
    opmath_t<scalar_t>* state,
    int64_t CB,
    scalar_t* out,
    int32_t* am,
    bool stream_results) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  constexpr int64_t V = Vec::size();
  const int64_t ph = row.ph, hs = std::max(b.h0[ph], r0), he = std::min(b.h1[ph], r1);
  const int64_t n = (NV - 1) * V + lanes;
  for (int64_t pw = 0; pw < PW; ++pw, state += 2 * CB) {
    const int64_t ws = b.w0[pw], we = b.w1[pw];
    const bool empty = b.empty(ph, pw);
    Vec cur[NV], pos[NV];
    for (int g = 0; g < NV; ++g) {
      if (row.first) {
        start_max<scalar_t>(empty, cur[g], pos[g]);
      } else {
        cur[g] = Vec::loadu(state + g * V);
        pos[g] = Vec::loadu(state + CB + g * V);
      }
    }
    if (!empty) {
      scan_max<scalar_t, NV>(px0, W, C, lanes, hs, he, ws, we, cur, pos);
    }
    if (!row.last) {
      for (int g = 0; g < NV; ++g) {
        cur[g].store(state + g * V);
        pos[g].store(state + CB + g * V);
      }
      continue;
    }
    acc_t m[NV * V];
    IdxInt<acc_t> arg[NV * V];
    for (int g = 0; g < NV; ++g) {
      cur[g].store(m + g * V);
      pos[g].store(arg + g * V);
    }
    write_opmath(out + pw * C, m, n, stream_results, /*fence=*/false);
    if constexpr (std::is_same_v<IdxInt<acc_t>, int32_t>) {
      write_opmath(am + pw * C, arg, n, stream_results, /*fence=*/false);
    } else {
      int32_t arg32[NV * V];
      std::copy(arg, arg + n, arg32);
      write_opmath(am + pw * C, arg32, n, stream_results, /*fence=*/false);
    }
  }
}

// channels_last forward (NOTE [ roi_pool ]): items are (image, block of CB channels, chunk of
// its boxes); an item takes the image's rows in bands that stay in L2 and scans, band by band,
// the part of every bin that lies in it.
template <typename scalar_t>
void forward_channels_last(
    const at::Tensor& input,
    const std::vector<PoolBins>& B,
    const std::vector<int64_t>& order,
    at::Tensor& output,
    at::Tensor& argmax,
    int64_t PH,
    int64_t PW) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int64_t V = OpVec<scalar_t>::size(), CB = 4 * V;
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  // Bands of ~256 KiB of the block's lines: a few rows, which leave L2 room for the results;
  // taller bands of fp32 use only a quarter of the cache sets (the block's lines are 4 of each
  // pixel's 16). Results of 16 MiB and more are streamed: nothing reads them soon.
  const int64_t band_bytes = debug::threshold(debug::kRoiPoolBandBytes, int64_t{256} << 10);
  const int64_t stream_bytes = debug::threshold(debug::kRoiPoolStreamBytes, int64_t{16} << 20);
  const BandPlan plan = plan_bands(B, order, N, H, PH, band_bytes / std::max<int64_t>(1, W * CB * static_cast<int64_t>(sizeof(scalar_t))));
  const bool stream_results = static_cast<int64_t>(output.nbytes() + argmax.nbytes()) >= stream_bytes;
  const int64_t blocks = (C + CB - 1) / CB;
  const int64_t most = std::max<int64_t>(1, *std::max_element(plan.count.begin(), plan.count.end()));
  const int64_t chunks = std::clamp<int64_t>((2 * at::get_num_threads() + N * blocks - 1) / (N * blocks), 1, most);
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* out = output.data_ptr<scalar_t>();
  int32_t* am = argmax.data_ptr<int32_t>();
  at::parallel_for(0, N * blocks * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> scratch(std::max<int64_t>(plan.slots, 1) * PW * 2 * CB);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / (blocks * chunks), c0 = (t / chunks % blocks) * CB, s = t % chunks;
      const int64_t nc = std::min(CB, C - c0);
      const int64_t lo = s * plan.count[n] / chunks, hi = (s + 1) * plan.count[n] / chunks;
      const scalar_t* img = in + n * H * W * C + c0;
      for (int64_t band = 0; band < plan.bands; ++band) {
        const int64_t r0 = band * plan.rows, r1 = std::min(H, r0 + plan.rows);
        for (const BandRow& row : plan.meets[n * plan.bands + band]) {
          if (plan.rank[row.k] < lo || plan.rank[row.k] >= hi) {
            continue;
          }
          const PoolBins& b = B[row.k];
          const int64_t o = (row.k * PH + row.ph) * PW * C + c0;
          acc_t* st = scratch.data() + std::max(row.slot, 0) * PW * 2 * CB;
          if (nc == CB) {
            band_row<scalar_t, 4>(img, W, C, V, b, row, PW, r0, r1, st, CB, out + o, am + o, stream_results);
            continue;
          }
          for (int64_t c = 0; c < nc; c += V) {
            band_row<scalar_t, 1>(img + c, W, C, std::min(V, nc - c), b, row, PW, r0, r1, st + c, CB, out + o + c, am + o + c, stream_results);
          }
        }
      }
    }
    if (stream_results) {
      stream_fence();
    }
  });
}

template <typename scalar_t>
void forward_nchw_blocked(
    const at::Tensor& input,
    const std::vector<PoolBins>& B,
    at::Tensor& output,
    at::Tensor& argmax,
    int64_t PH,
    int64_t PW) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int64_t V = OpVec<scalar_t>::size();
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* out = output.data_ptr<scalar_t>();
  int32_t* am = argmax.data_ptr<int32_t>();
  const auto per_image = detail::rois_per_image(B, N);
  const int64_t blocks = (C + V - 1) / V;
  const int64_t work = (H * W + static_cast<int64_t>(B.size()) / std::max<int64_t>(N, 1) * PH * PW) * V;
  at::parallel_for(0, N * blocks, detail::grain_for(work), [&](int64_t t0, int64_t t1) {
    std::vector<scalar_t> pixels(H * W * V, scalar_t(0));
    acc_t m[V], arg[V];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / blocks, c0 = (t % blocks) * V, nc = std::min(V, C - c0);
      if (per_image[b].empty()) {
        continue;
      }
      detail::planes_to_pixels(in + (b * C + c0) * H * W, H * W, nc, V, pixels.data());
      for (const int64_t k : per_image[b]) {
        for (int64_t ph = 0; ph < PH; ++ph) {
          for (int64_t pw = 0; pw < PW; ++pw) {
            bin_max<scalar_t>(pixels.data(), W, V, nc, B[k], ph, pw, m, arg);
            const int64_t o = ((k * C + c0) * PH + ph) * PW + pw;
            store_bin<scalar_t>(m, arg, nc, PH * PW, out + o, am + o);
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void forward_nchw_direct(
    const at::Tensor& input,
    const std::vector<PoolBins>& B,
    at::Tensor& output,
    at::Tensor& argmax,
    int64_t PH,
    int64_t PW) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t K = static_cast<int64_t>(B.size());
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* out = output.data_ptr<scalar_t>();
  int32_t* am = argmax.data_ptr<int32_t>();
  // Channel-major over (channel, ROI), so a plane stays in cache for all its ROIs.
  at::parallel_for(0, C * K, detail::grain_for(PH * PW), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c = i / K, k = i % K;
      const auto& b = B[k];
      const scalar_t* plane = in + (b.batch * C + c) * H * W;
      for (int64_t ph = 0; ph < PH; ++ph) {
        for (int64_t pw = 0; pw < PW; ++pw) {
          acc_t m = b.empty(ph, pw) ? acc_t(0) : acc_t(-FLT_MAX);
          int64_t a = -1;
          for (int64_t h = b.h0[ph]; h < b.h1[ph]; ++h) {
            for (int64_t w = b.w0[pw]; w < b.w1[pw]; ++w) {
              const acc_t x = static_cast<acc_t>(plane[h * W + w]);
              if (x > m) {
                m = x;
                a = h * W + w;
              }
            }
          }
          const int64_t o = ((k * C + c) * PH + ph) * PW + pw;
          out[o] = static_cast<scalar_t>(m);
          am[o] = static_cast<int32_t>(a);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  detail::check_roi_inputs(kOp, input, rois);
  detail::check_pooled_size(kOp, pooled_height, pooled_width);
  const auto fmt = detail::layout_of(kOp, input);
  const int64_t K = rois.size(0), N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor output = empty_output({K, C, pooled_height, pooled_width}, input.options(), fmt);
  at::Tensor argmax = empty_output(output.sizes(), output.options().dtype(at::kInt), fmt);  // pooled too
  if (output.numel() == 0) {
    return {output, argmax};
  }
  const at::Tensor in = input.contiguous(fmt);
  const at::Tensor r = detail::rois_as(rois, at::toOpMathType(input.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "roi_pool_forward", [&] {
    using acc_t = opmath_t<scalar_t>;
    const auto B = detail::build_all_pool_bins<acc_t>(r, N, spatial_scale, pooled_height, pooled_width, 1, H, W);
    if (fmt == at::MemoryFormat::ChannelsLast) {
      forward_channels_last<scalar_t>(in, B, detail::spatial_order<acc_t>(r), output, argmax, pooled_height, pooled_width);
      return;
    }
    int64_t reads = 0;  // pixels all bins read, per channel
    for (const auto& b : B) {
      for (int64_t ph = 0; ph < pooled_height; ++ph) {
        for (int64_t pw = 0; pw < pooled_width; ++pw) {
          reads += std::max<int64_t>(b.h1[ph] - b.h0[ph], 0) * std::max<int64_t>(b.w1[pw] - b.w0[pw], 0);
        }
      }
    }
    if (detail::use_transposed_nchw(reads, N, H, W)) {
      forward_nchw_blocked<scalar_t>(in, B, output, argmax, pooled_height, pooled_width);
    } else {
      forward_nchw_direct<scalar_t>(in, B, output, argmax, pooled_height, pooled_width);
    }
  });
  return {output, argmax};
}

// Adds the output gradients of one bin (C channels: argmax a, gradients g) whose argmax lies
// in rows [lo / W, hi / W) to `band`, those rows of one image in channels_last (element
// (idx - lo) * C + c). With `check`, also tells whether every argmax is -1 (or negative) or
// lies in the bin's rows [vlo / W, vhi / W): one outside (not an argmax roi_pool made) would
// be missed by the bands that scan only the bins meeting them.
template <typename scalar_t>
inline bool scatter_band(
    const int32_t* a,
    const scalar_t* g,
    int64_t C,
    int64_t lo,
    int64_t hi,
    bool check,
    int64_t vlo,
    int64_t vhi,
    bool vec,
    opmath_t<scalar_t>* band) {
  using acc_t = opmath_t<scalar_t>;
  bool ok = true;
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    // Lanes are distinct channels, so distinct addresses: a masked gather, add and scatter.
    if (vec) {
      const __m512i lo_v = _mm512_set1_epi32(static_cast<int32_t>(lo)), hi_v = _mm512_set1_epi32(static_cast<int32_t>(hi));
      const __m512i vlo_v = _mm512_set1_epi32(static_cast<int32_t>(vlo)), vhi_v = _mm512_set1_epi32(static_cast<int32_t>(vhi));
      const __m512i stride = _mm512_set1_epi32(static_cast<int32_t>(C));
      const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      for (; c < C; c += 16) {
        const int64_t n = std::min<int64_t>(16, C - c);
        const auto lanes = static_cast<__mmask16>((1u << n) - 1);
        const __m512i idx = _mm512_maskz_loadu_epi32(lanes, a + c);
        if (check) {
          const __mmask16 in_bin = _mm512_cmpge_epi32_mask(idx, vlo_v) & _mm512_cmplt_epi32_mask(idx, vhi_v);
          ok &= (lanes & _mm512_cmpge_epi32_mask(idx, _mm512_setzero_si512()) & ~in_bin) == 0;
        }
        const __mmask16 in = lanes & _mm512_cmpge_epi32_mask(idx, lo_v) & _mm512_cmplt_epi32_mask(idx, hi_v);
        if (in == 0) {
          continue;
        }
        const __m512i off = _mm512_add_epi32(
            _mm512_mullo_epi32(_mm512_sub_epi32(idx, lo_v), stride), _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(c))));
        const __m512 sum = _mm512_add_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, off, band, sizeof(float)), load_opmath(g + c, n));
        _mm512_mask_i32scatter_ps(band, in, off, sum, sizeof(float));
      }
      return ok;
    }
  }
#endif
  for (; c < C; ++c) {
    const int64_t idx = a[c];
    ok &= !check || idx < 0 || (idx >= vlo && idx < vhi);
    if (idx >= lo && idx < hi) {
      band[(idx - lo) * C + c] += static_cast<acc_t>(g[c]);
    }
  }
  return ok;
}

// channels_last backward by bands of rows (detail::by_bands: a thread owns 3/4 of L2 of rows of
// an image, zeroes it in L2, adds into it and writes it once), visiting in each band the bins
// whose rows meet it, boxes in order: every element gets its adds in torchvision's order.
// Returns false if an argmax lies outside its bin's rows; grad_in is then to be recomputed by
// the general path.
template <typename scalar_t>
bool backward_channels_last_bands(
    const at::Tensor& g,
    const at::Tensor& a,
    const at::Tensor& r,
    double scale,
    int64_t PH,
    int64_t PW,
    at::Tensor& grad_in) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t N = grad_in.size(0), C = grad_in.size(1), H = grad_in.size(2), W = grad_in.size(3), P = PH * PW;
  const auto B = detail::build_all_pool_bins<acc_t>(r, N, scale, PH, PW, 1, H, W);
  const auto per_image = detail::rois_per_image(B, N);
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const int32_t* ap = a.const_data_ptr<int32_t>();
  std::atomic<bool> all_in_bins{true};
  // Bands of 3/4 of L2: large boxes' bin rows span several bands, and taller bands repeat less
  // of that work while they still fit (the ps ops' small boxes keep half).
  detail::by_bands(
      grad_in.data_ptr<scalar_t>(), N, C, H, W, detail::stream_grad_input(grad_in), detail::l2_bytes() * 3 / 4,
      [&](int64_t m, int64_t r0, int64_t r1, acc_t* band) {
        const int64_t lo = r0 * W, hi = r1 * W;
        // int32 offsets into the band for the gather/scatter.
        const bool vec = H * W <= INT32_MAX && (r1 - r0) * W * C <= INT32_MAX;
        bool ok = true;
        for (const int64_t k : per_image[m]) {
          const PoolBins& b = B[k];
          for (int64_t ph = 0; ph < PH; ++ph) {
            const int64_t h0 = b.h0[ph], h1 = b.h1[ph], home = std::min(h0, H - 1);
            // Each bin row's argmax is checked once, in the band holding its first row (or
            // the last row of the map for rows starting past it).
            const bool check = r0 <= home && home < r1;
            if (!check && (h1 <= r0 || h0 >= r1)) {
              continue;
            }
            for (int64_t pw = 0; pw < PW; ++pw) {
              const int64_t o = (k * P + ph * PW + pw) * C;
              ok &= scatter_band<scalar_t>(ap + o, gp + o, C, lo, hi, check, h0 * W, h1 * W, vec, band);
            }
          }
        }
        if (!ok) {
          all_in_bins = false;
        }
      });
  return all_in_bins;
}

at::Tensor roi_pool_backward(
    const at::Tensor& grad,
    const at::Tensor& rois,
    const at::Tensor& argmax,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t batch_size,
    int64_t channels,
    int64_t height,
    int64_t width) {
  constexpr const char* op = "_roi_pool_backward";
  detail::check_roi_inputs(op, grad, rois);
  detail::check_pooled_size(op, pooled_height, pooled_width);
  detail::check_input_shape(op, batch_size, channels, height, width);
  detail::check_grad_shape(op, grad, rois.size(0), channels, pooled_height, pooled_width);
  TORCH_CHECK(
      argmax.scalar_type() == at::kInt && argmax.sizes() == grad.sizes() && argmax.device().is_cpu(), op,
      ": argmax must be the int32 CPU tensor roi_pool returned, of grad's shape ", grad.sizes(), ", got ",
      argmax.scalar_type(), " ", argmax.sizes());
  const auto fmt = detail::layout_of(op, grad);
  const auto acc_type = at::toOpMathType(grad.scalar_type());
  if (grad.numel() == 0 || batch_size * channels * height * width == 0) {
    return detail::zeroed_grad_input(grad, batch_size, channels, height, width, fmt).to(grad.scalar_type());
  }
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor g = grad.contiguous(fmt);
  const at::Tensor a = argmax.contiguous(fmt);
  const at::Tensor r = detail::rois_as(rois, acc_type);
  if (cl) {
    at::Tensor owned = detail::owned_grad_input(grad, batch_size, channels, height, width, fmt);
    bool done = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "roi_pool_backward", [&] {
      done = backward_channels_last_bands<scalar_t>(g, a, r, spatial_scale, pooled_height, pooled_width, owned);
    });
    if (done) {
      return owned;
    }
  }
  // NCHW planes are written by the thread that owns them (detail::OwnedGradAccumulator); channels_last
  // with an argmax outside its bin scatters into zeros.
  at::Tensor grad_in = cl ? detail::zeroed_grad_input(grad, batch_size, channels, height, width, fmt)
                          : detail::owned_grad_input(grad, batch_size, channels, height, width, fmt);
  const bool stream = detail::stream_grad_input(grad_in);
  const int64_t N = batch_size, K = rois.size(0), C = channels, HW = height * width, P = pooled_height * pooled_width;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "roi_pool_backward", [&] {
    using acc_t = opmath_t<scalar_t>;
    constexpr int64_t V = OpVec<scalar_t>::size();
    const acc_t* rr = r.const_data_ptr<acc_t>();
    std::vector<int64_t> batch(K);
    std::vector<std::vector<int64_t>> per_image(N);
    for (int64_t k = 0; k < K; ++k) {
      batch[k] = detail::batch_index(rr + 5 * k, batch_size);
      per_image[batch[k]].push_back(k);
    }
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const int32_t* ap = a.const_data_ptr<int32_t>();
    // channels_last accumulates in an opmath map, NCHW writes grad_input's planes.
    acc_t* gacc = cl ? grad_in.data_ptr<acc_t>() : nullptr;
    scalar_t* gout = cl ? nullptr : grad_in.data_ptr<scalar_t>();
    // Adds grad[o] at argmax[o]: dst[argmax * step].
    const auto add = [&](int64_t o, acc_t* dst, int64_t step) {
      const int64_t idx = ap[o];
      if (idx >= 0) {
        TORCH_CHECK(idx < HW, op, ": argmax holds ", idx, ", outside the ", height, "x", width, " map");
        dst[idx * step] += static_cast<acc_t>(gp[o]);
      }
    };
    // Both: no races, and every element receives its adds in ROI order (deterministic, the
    // order of torchvision's loop).
    if (cl) {
      // The general path (an argmax outside its bin): threads own blocks of V channels
      // (whole cache lines of every pixel) and prefetch the next bin's destinations.
      at::parallel_for(0, (C + V - 1) / V, detail::grain_for(K * P * V), [&](int64_t u0, int64_t u1) {
        const int64_t c0 = u0 * V, c1 = std::min(C, u1 * V);
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t p = 0; p < P; ++p) {
            // The next bin's destinations, one line each in a map far beyond the caches, are
            // known from its argmax: ask for them now (write intent).
            const int64_t ahead = k * P + p + 1, kn = ahead / P, next = ahead * C;
            if (kn < K) {
              acc_t* img = gacc + batch[kn] * HW * C;
              for (int64_t c = c0; c < c1; ++c) {
                const int64_t idx = ap[next + c];
                if (idx >= 0 && idx < HW) {
                  __builtin_prefetch(img + idx * C + c, 1);
                }
              }
            }
            for (int64_t c = c0; c < c1; ++c) {
              add((k * P + p) * C + c, gacc + batch[k] * HW * C + c, C);
            }
          }
        }
      });
      return;
    }
    // NCHW: threads own (image, channel) planes, zeroed right before their ROIs scatter into
    // them, so the plane stays in cache; owning a channel of every image and scattering into a
    // zero-filled map missed the cache on nearly every add.
    at::parallel_for(0, N * C, detail::grain_for(HW + K / std::max<int64_t>(N, 1) * P), [&](int64_t t0, int64_t t1) {
      detail::OwnedGradAccumulator<scalar_t> planes(stream);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t / C, c = t % C;
        int64_t unused = 0;
        acc_t* plane = planes.start(gout + t * HW, 1, HW, HW, &unused);
        const auto& ks = per_image[n];
        for (size_t i = 0; i < ks.size(); ++i) {
          if (i + 1 < ks.size()) {
            // The next ROI's argmax and grad runs are C * P elements away: no hardware
            // prefetcher follows that stride.
            const int64_t next = (ks[i + 1] * C + c) * P;
            for (int64_t p = 0; p < P; p += 64 / static_cast<int64_t>(sizeof(int32_t))) {
              __builtin_prefetch(ap + next + p);
              __builtin_prefetch(gp + next + p);
            }
          }
          for (int64_t p = 0; p < P; ++p) {
            add((ks[i] * C + c) * P + p, plane, 1);
          }
        }
        planes.finish();
      }
    });
  });
  return grad_in.to(grad.scalar_type());
}

void register_kernels(torch::Library& m) {
  m.impl("roi_pool", TORCH_FN(roi_pool_forward));
  m.impl("_roi_pool_backward", TORCH_FN(roi_pool_backward));
}

const CpuOverride registrar({"roi_pool", "_roi_pool_backward"}, &register_kernels);

} // namespace
} // namespace tvce

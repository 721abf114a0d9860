// depthwise_conv: torchvision_cpu_ext::depthwise_conv1d / depthwise_conv2d, forward and backward.
//
// NOTE [ depthwise_conv design ]
// A depthwise convolution (groups == input channels C, output channel oc = c * M + m reading
// input channel c, M the channel multiplier) does ~2 * KH * KW flops per element it moves: it is
// bound by memory, and for small inputs by the cost of a call. ATen hands it to general
// convolution code (oneDNN, with reorders around NCHW inputs, or a loop of _slow_conv2d), so a
// small call costs tens of microseconds and large NCHW calls run far below the memory bandwidth.
// Here every case is one of three passes over planes, rows or channel blocks, on the calling
// thread when small.
//
// 1. Geometry. conv1d is conv2d with H = KH = 1: both ops run the code below, on raw pointers to
//    a dense NCHW ([N, C, L] for conv1d) or channels_last ([N, L, C]) tensor. Inputs of other
//    strides are made dense in their suggested layout first (layout_of).
//
// 2. Three passes (path_of): NCHW rows wider than kBlockWidth (and every NCHW conv1d) run on
//    planes, channels_last rows wider than it on rows, narrower maps of either layout in blocks.
//    The input gradient is the same pass on the output gradient, padded by d * (k - 1) - p, with
//    the kernel flipped, and summed over the M output channels of each input channel. At stride s
//    it is split by phase: input position r + s * i (r < s) receives only the taps k with
//    (r + p - k * d) % s == 0, a stride-1 convolution of the output gradient with that phase's
//    sub-kernel (phase_of). channels_last runs every phase on rows (cl_input_grad), NCHW planes
//    the row phases (plane_input_grad) with the gradient spread out by the stride in columns
//    (zeros in between); narrow NCHW maps spread it out in both directions, in blocks.
//
//    Planes (plane_pass, after XNNPACK's CHW kernels): a band of B output rows of one output plane
//    at a time (the band's scratch fits L2: band_rows). Its input rows are first copied into a
//    per-thread scratch, in the accumulation type:
//    - zero rows and columns stand for the padding, so the inner loop has no bounds checks;
//    - columns (and rows) are split by phase modulo the stride: a stride-s convolution reads
//      padded column ow * s + kw * d, which is column ow + (kw * d) / s of phase (kw * d) % s, so
//      every tap of a strided convolution is a contiguous, unit-stride run again (stride 2 is
//      deinterleaved with vector shuffles, see fill_row);
//    - each phase plane is stored with the output's row pitch (Wq = OW + the taps' reach), so
//      output position i = b * Wq + ow reads position i + offset(tap) of its tap's phase plane
//      for every tap: the whole band is ONE 1-D convolution over i, vectorized over i with four
//      accumulator vectors per step, each tap's weight broadcast once per step. The Wq - OW
//      columns past each row's end are computed and dropped when the band is stored, which is
//      why narrow maps go to blocks instead.
//
// 3. Rows and blocks: vector lanes over channels (after oneDNN's jit_uni_dw_conv). Runs of 8
//    output pixels of a row (6 at stride 2) are the accumulators; for the common kernels (3, 5
//    and 7 columns, stride 1 or 2, dilation 1) each input vector of a kernel row is loaded once
//    and used for every (pixel, column) pair that reads it, and the row's weight vectors stay in
//    registers; other kernels run a generic tap loop. The weights are a [K][C] table padded to
//    whole vectors.
//    - Rows (cl_pass): read the channels_last tensor in place. Pixels whose window lies inside
//      the map run unchecked; the borders run bounds-checked runs of 4.
//    - Blocks (block_pass): one block of V channels of one image and band of rows is first
//      copied into a zero-padded scratch of V-lane pixels (NCHW planes transposed into it; a
//      spread-out gradient written with its zeros), so every run is unchecked and a 7x7 map
//      fills its vectors; the results are written back per row (NCHW: transposed). A strided
//      NCHW input gradient on a narrow map is filled in with the spread-out gradient's zeros.
//    A channel multiplier M > 1 in channels_last repeats each input channel M times first
//    (repeat_interleave) and runs with M = 1: correct and simple, at the cost of a copy; NCHW
//    planes and blocks map each output channel to its input plane directly.
//
// 4. Weight and bias gradients: sums over images and pixels of grad * input. NCHW: one output
//    channel per work item, its images and bands in order (dot products of each output row with
//    each tap's input run from the same phase planes, up to kMaxTapsAtOnce taps per pass with
//    their sums in registers over the band: wgrad_taps). channels_last: a fixed number of chunks of
//    rows (kWeightChunks, not the thread count), each summing into its own [K + 1, C] partial,
//    added in chunk order; inside a row, the columns where every tap of a kernel row is inside
//    the map sum all of them in one pass (one independent FMA chain per tap, wgrad_columns). Both give the same bits at every thread count, as every other
//    gradient here (the input gradient's elements are each written by one item).
//
// 5. Threads and small calls. Calls of fewer than kSerialWork multiply-adds run on the calling
//    thread with no parallel region; the scratch buffers are thread-local and kept, and the
//    weights' tables live in the calling thread's scratch, so a small call allocates nothing but
//    its output. Larger calls split planes by (image, channel, band), rows by output row and
//    blocks by (image, channel block, band).
//    `describe` reports the path a call takes; info's depthwise_path() prints it. A geometry
//    whose band scratch would be enormous (a stride or dilation far beyond the map:
//    beyond_scratch) goes to ATen's convolution, forward and backward.
//
// 6. Dtypes. float32 and float64 accumulate in their own type; bfloat16 and float16 are widened
//    to float32 when the NCHW scratch is filled or when channels_last loads them, and rounded
//    once when stored. input, weight and bias must share a dtype, as for F.conv2d.
//
// Registration (NOTE [ registration routes ], route (b)): the package's own ops, their backward
// ops and a C++ autograd kernel (a Python one would cost microseconds per call in grad mode);
// fake kernels and the AutocastCPU rules are in torchvision_cpu_ext/ops/_rules.py, the Python
// front end in torchvision_cpu_ext/ops/depthwise_conv.py.
#include "checks.h"
#include "debug_thresholds.h"
#include "memory.h"
#include "parallel_grain.h"
#include "pixel_transpose.h"
#include "vec_io.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

#define TVCE_STRINGIFY_(x) #x
#define TVCE_STRINGIFY(x) TVCE_STRINGIFY_(x)

namespace tvce {
namespace {

// Multiply-adds of a call below which it runs on the calling thread (NOTE, part 5): a parallel
// region costs microseconds, as much as a few hundred thousand multiply-adds of work.
constexpr int64_t kSerialWork = int64_t{1} << 18;
// Bytes of an NCHW band's scratch (its input rows and output rows): within L2 with room to spare.
constexpr int64_t kBandBytes = 96 * 1024;
// channels_last weight gradient: row chunks, fixed so the sums do not depend on the thread count.
constexpr int64_t kWeightChunks = 16;
// Widest output rows that run as blocks (NOTE, parts 2 and 3: path_of).
constexpr int64_t kBlockWidth = 28;
// Weight gradients: taps summed at once in one pass (their sums in registers).
constexpr int64_t kMaxTapsAtOnce = 7;
// Output pixels per channels_last run at the borders (accumulator vectors).
constexpr int kRun = 4;

struct Geometry {
  int64_t N, C, M;       // images, input channels, channel multiplier
  int64_t H, W, OH, OW;  // input and output sizes
  int64_t KH, KW, sh, sw, ph, pw, dh, dw;
  int64_t taps() const { return KH * KW; }
  int64_t channels_out() const { return C * M; }
  int64_t work() const { return N * C * M * OH * OW * KH * KW; }
};

bool run_serial(const Geometry& g) {
  return at::get_num_threads() == 1 || at::in_parallel_region() ||
      g.work() < debug::threshold(debug::kDepthwiseSerialWork, kSerialWork);
}

// Whether a geometry's scratch would be enormous: a stride or dilation far beyond the map (a
// padded extent of 2^30 read by a few taps). The scratch of a band holds the strided, dilated
// window of one output row (planes: one per stride phase); ATen's convolution sizes its work by
// the output instead, so these calls go to it (forward and backward): the same results, no
// allocation of gigabytes. In double: the products may overflow int64.
bool beyond_scratch(const Geometry& g) {
  constexpr double kMaxElements = double(int64_t(1) << 26);
  const double rows = double(g.KH - 1) * double(g.dh) + 1.0;
  const double cols = double(g.OW - 1) * double(g.sw) + double(g.KW - 1) * double(g.dw) + 1.0;
  const double phases = double(g.sh) * double(g.sw);
  return rows * cols * 16.0 > kMaxElements || phases * (rows / double(g.sh) + 1.0) > kMaxElements ||
      phases > kMaxElements / 64.0;
}

template <typename F>
void for_items(bool serial, int64_t n, int64_t work_per_item, const F& fn) {
  if (serial) {
    fn(0, n);
  } else {
    at::parallel_for(0, n, detail::grain_for(work_per_item), fn);
  }
}

// Per-thread scratch, kept between calls (NOTE, part 5): slot 0 holds the calling thread's
// weight tables, the others a pass's band buffers.
template <typename T>
T* scratch(int slot, int64_t n) {
  thread_local std::vector<char> buffers[3];
  auto& b = buffers[slot];
  const size_t bytes = static_cast<size_t>(n) * sizeof(T) + 64;
  if (b.size() < bytes) {
    b.resize(bytes);
  }
  const auto p = reinterpret_cast<uintptr_t>(b.data());
  return reinterpret_cast<T*>((p + 63) & ~uintptr_t{63});
}

inline int64_t div_floor(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

inline int64_t div_ceil(int64_t a, int64_t b) {
  return -div_floor(-a, b);
}

// ---- NCHW (NOTE, part 2) ------------------------------------------------------------------

// A convolution of source planes into output planes. Output plane p sums, over j < J, source
// plane src_of(p, j) convolved with weight row row_of(p, j): forward J = 1, source p / M, row p;
// input gradient J = M, source (and row) p * M + j. A source element (a, b) sits at (a * uh,
// b * uw) of a virtual plane (zeros between: the gradient spread out by the stride), padded by
// (ph, pw), which may be negative.
template <typename scalar_t>
struct PlanePass {
  using acc_t = opmath_t<scalar_t>;
  const scalar_t* src;
  int64_t src_planes, Hs, Ws, uh, uw;
  scalar_t* out;
  int64_t out_planes, OH, OW;
  int64_t KH, KW, sh, sw, ph, pw, dh, dw;
  int64_t J;
  bool gather;         // source and row p * J + j (else p / (out_planes / src_planes) and p)
  const acc_t* table;  // [rows][KH * KW], flipped already where the pass needs it
  const acc_t* bias;   // [out_planes] or null
  // The output's row and plane strides in elements; 0: dense planes of OH x OW. A row phase of a
  // strided convolution's input gradient writes every sh-th row (plane_input_grad).
  int64_t out_row = 0, out_plane = 0;

  int64_t orow() const { return out_row ? out_row : OW; }
  int64_t oplane() const { return out_plane ? out_plane : OH * OW; }

  int64_t Wq() const { return OW + (KW - 1) * dw / sw; }
  int64_t Rq(int64_t B) const { return B + (KH - 1) * dh / sh; }
};

// Output rows per band: the band's phase planes and output rows within kBandBytes, and enough
// items for the threads when a call has few planes.
int64_t band_rows(int64_t planes, int64_t OH, int64_t Wq, int64_t sh, int64_t sw, int64_t elem, bool serial) {
  const int64_t row_bytes = (sh * sw + 1) * Wq * elem;
  int64_t B = std::clamp<int64_t>(debug::threshold(debug::kDepthwiseBandBytes, kBandBytes) / row_bytes, 1, OH);
  if (!serial) {
    const int64_t want_bands = div_ceil(2 * at::get_num_threads(), std::max<int64_t>(planes, 1));
    B = std::min(B, std::max<int64_t>(1, div_ceil(OH, want_bands)));
  }
  return B;
}

// dst[t] = the virtual row's value at column start + t * step (t < n): src[(start + t * step) / u]
// where that is a whole source column in [0, Ws), else 0. `src` null: a row of zeros.
template <typename scalar_t, typename acc_t>
void fill_row(acc_t* dst, int64_t n, const scalar_t* src, int64_t Ws, int64_t start, int64_t step, int64_t u) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  if (src == nullptr) {
    std::fill_n(dst, n, acc_t(0));
    return;
  }
  if (u == 1 && step <= 2) {
    // Source columns start + t * step in [0, Ws): t in [lo, hi).
    const int64_t lo = std::clamp<int64_t>(div_ceil(-start, step), 0, n);
    const int64_t hi = std::clamp<int64_t>(div_ceil(Ws - start, step), lo, n);
    std::fill_n(dst, lo, acc_t(0));
    int64_t t = lo;
    if (step == 1) {
      for (; t + V <= hi; t += V) {
        load_opmath(src + start + t, V).store(dst + t);
      }
    } else {
      for (; t + V <= hi && start + 2 * (t + V) <= Ws; t += V) {
        const auto p = src + start + 2 * t;
        at::vec::deinterleave2(load_opmath(p, V), load_opmath(p + V, V)).first.store(dst + t);
      }
    }
    for (; t < hi; ++t) {
      dst[t] = static_cast<acc_t>(src[start + t * step]);
    }
    std::fill_n(dst + hi, n - hi, acc_t(0));
    return;
  }
  if (step == 1) {  // a spread-out gradient: zeros, then each source column at its position
    std::fill_n(dst, n, acc_t(0));
    int64_t b = std::max<int64_t>(0, div_ceil(start, u));
    if (u == 2) {  // V source columns at a time, interleaved with zeros
      for (; b + V <= Ws && 2 * (b + V) - start <= n; b += V) {
        const auto [lo, hi] = at::vec::interleave2(load_opmath(src + b, V), Vec(0));
        lo.store(dst + 2 * b - start), hi.store(dst + 2 * b - start + V);
      }
    }
    for (; b < Ws && b * u - start < n; ++b) {
      dst[b * u - start] = static_cast<acc_t>(src[b]);
    }
    return;
  }
  for (int64_t t = 0; t < n; ++t) {
    const int64_t v = start + t * step;
    dst[t] = (v >= 0 && v % u == 0 && v / u < Ws) ? static_cast<acc_t>(src[v / u]) : acc_t(0);
  }
}

// Copies band [oh0, oh0 + B)'s input rows of source plane `plane` into the phase planes (stride
// PS each, sh * sw of them).
template <typename scalar_t, typename acc_t = opmath_t<scalar_t>>
void fill_band(const PlanePass<scalar_t>& p, const scalar_t* plane, int64_t oh0, int64_t B, acc_t* planes, int64_t PS) {
  const int64_t Rq = p.Rq(B), Wq = p.Wq();
  for (int64_t a = 0; a < p.sh; ++a) {
    for (int64_t q = 0; q < Rq; ++q) {
      const int64_t v = oh0 * p.sh + a + q * p.sh - p.ph;  // the virtual source row
      const bool have = v >= 0 && v % p.uh == 0 && v / p.uh < p.Hs;
      const scalar_t* row = have ? plane + (v / p.uh) * p.Ws : nullptr;
      for (int64_t j = 0; j < p.sw; ++j) {
        fill_row(planes + (a * p.sw + j) * PS + q * Wq, Wq, row, p.Ws, j - p.pw, p.sw, p.uw);
      }
    }
  }
  constexpr int64_t V = at::vec::Vectorized<acc_t>::size();
  for (int64_t k = 0; k < p.sh * p.sw; ++k) {  // the slack the last vectors read (NOTE, part 2)
    std::fill_n(planes + k * PS + Rq * Wq, 4 * V, acc_t(0));
  }
}

// acc[i] (+)= sum over taps of w[t] * planes[tap_at[t] + i], i < n (rounded up to vectors).
template <typename acc_t>
void band_conv(
    acc_t* acc, int64_t n, const acc_t* planes, const int64_t* tap_at, const acc_t* w, int64_t K, bool accumulate,
    acc_t init) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    Vec a0(init), a1(init), a2(init), a3(init);
    if (accumulate) {
      a0 = Vec::loadu(acc + i), a1 = Vec::loadu(acc + i + V);
      a2 = Vec::loadu(acc + i + 2 * V), a3 = Vec::loadu(acc + i + 3 * V);
    }
    for (int64_t t = 0; t < K; ++t) {
      const Vec wt(w[t]);
      const acc_t* s = planes + tap_at[t] + i;
      a0 = at::vec::fmadd(Vec::loadu(s), wt, a0);
      a1 = at::vec::fmadd(Vec::loadu(s + V), wt, a1);
      a2 = at::vec::fmadd(Vec::loadu(s + 2 * V), wt, a2);
      a3 = at::vec::fmadd(Vec::loadu(s + 3 * V), wt, a3);
    }
    a0.store(acc + i), a1.store(acc + i + V), a2.store(acc + i + 2 * V), a3.store(acc + i + 3 * V);
  }
  for (; i < n; i += V) {
    Vec a0 = accumulate ? Vec::loadu(acc + i) : Vec(init);
    for (int64_t t = 0; t < K; ++t) {
      a0 = at::vec::fmadd(Vec::loadu(planes + tap_at[t] + i), Vec(w[t]), a0);
    }
    a0.store(acc + i);
  }
}

// Where tap t of a pass with row pitch Wq reads, in phase planes of stride PS.
c10::SmallVector<int64_t, 64> tap_offsets(
    int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t Wq, int64_t PS) {
  c10::SmallVector<int64_t, 64> at(KH * KW);
  for (int64_t kh = 0; kh < KH; ++kh) {
    for (int64_t kw = 0; kw < KW; ++kw) {
      const int64_t phase = ((kh * dh) % sh) * sw + (kw * dw) % sw;
      at[kh * KW + kw] = phase * PS + (kh * dh / sh) * Wq + kw * dw / sw;
    }
  }
  return at;
}

template <typename scalar_t>
void plane_pass(const PlanePass<scalar_t>& p, int64_t N, bool serial) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int64_t V = at::vec::Vectorized<acc_t>::size();
  const int64_t K = p.KH * p.KW, Wq = p.Wq(), M = p.out_planes / p.src_planes;
  const int64_t B = band_rows(N * p.out_planes, p.OH, Wq, p.sh, p.sw, sizeof(acc_t), serial);
  const int64_t bands = div_ceil(p.OH, B);
  const int64_t PS = p.Rq(B) * Wq + 4 * V;  // phase plane stride, with the slack of the last vectors
  const auto tap_at = tap_offsets(p.KH, p.KW, p.sh, p.sw, p.dh, p.dw, Wq, PS);
  for_items(serial, N * p.out_planes * bands, B * p.OW * K * p.J, [&](int64_t begin, int64_t end) {
    acc_t* planes = scratch<acc_t>(1, p.sh * p.sw * PS);
    acc_t* acc = scratch<acc_t>(2, B * Wq + 4 * V);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t band = item % bands, plane = item / bands;  // plane = n * out_planes + oc
      const int64_t n = plane / p.out_planes, oc = plane % p.out_planes;
      const int64_t oh0 = band * B, rows = std::min(B, p.OH - oh0);
      const acc_t init = p.bias ? p.bias[oc] : acc_t(0);
      for (int64_t j = 0; j < p.J; ++j) {
        const int64_t s = p.gather ? oc * p.J + j : oc / M, row = p.gather ? oc * p.J + j : oc;
        fill_band(p, p.src + (n * p.src_planes + s) * p.Hs * p.Ws, oh0, rows, planes, PS);
        band_conv(acc, (rows - 1) * Wq + p.OW, planes, tap_at.data(), p.table + row * K, K, j > 0, init);
      }
      const int64_t orow = p.orow();
      scalar_t* dst = p.out + plane * p.oplane() + oh0 * orow;
      for (int64_t b = 0; b < rows; ++b) {
        const acc_t* a = acc + b * Wq;
        scalar_t* d = dst + b * orow;
        int64_t i = 0;
        for (; i + V <= p.OW; i += V) {
          store_opmath(d + i, at::vec::Vectorized<acc_t>::loadu(a + i), V);
        }
        if (i < p.OW) {
          store_opmath(d + i, at::vec::Vectorized<acc_t>::loadu(a + i, p.OW - i), p.OW - i);
        }
      }
    }
  });
}

// Unit-stride single rows (NCHW conv1d, and 2-D maps of one row) straight from the input: no
// scratch, vectors over output positions whose taps all lie inside the row, the few border
// positions tap by tap. A small conv1d is mostly this loop (NOTE, part 5).
template <typename scalar_t>
void row_pass(const PlanePass<scalar_t>& p, int64_t N, bool serial) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t K = p.KW, L = p.Ws, OL = p.OW, dw = p.dw, M = p.out_planes / p.src_planes;
  // Output positions whose taps all lie inside the row: [lo, hi).
  const int64_t lo = std::clamp<int64_t>(p.pw, 0, OL), hi = std::clamp<int64_t>(L + p.pw - (K - 1) * dw, lo, OL);
  const int64_t pw = p.pw, planes = p.out_planes, src_planes = p.src_planes;
  const scalar_t* const source = p.src;
  scalar_t* const out = p.out;
  const acc_t* const table = p.table;
  const acc_t* const bias = p.bias;
  for_items(serial, N * planes, OL * K, [=](int64_t begin, int64_t end) {
    int64_t oc = begin % planes;
    const scalar_t* src = source + (begin / planes * src_planes + oc / M) * L - pw;
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* x = src;  // x[ow + k * dw]: tap k of output ow
      scalar_t* y = out + row * OL;
      const acc_t* w = table + oc * K;
      const acc_t init = bias ? bias[oc] : acc_t(0);
      int64_t ow = lo;
      for (; ow + 4 * V <= hi; ow += 4 * V) {  // four independent sums hide the FMA latency
        Vec a0(init), a1(init), a2(init), a3(init);
        for (int64_t k = 0; k < K; ++k) {
          const Vec wk(w[k]);
          const scalar_t* xk = x + ow + k * dw;
          a0 = at::vec::fmadd(load_opmath(xk, V), wk, a0);
          a1 = at::vec::fmadd(load_opmath(xk + V, V), wk, a1);
          a2 = at::vec::fmadd(load_opmath(xk + 2 * V, V), wk, a2);
          a3 = at::vec::fmadd(load_opmath(xk + 3 * V, V), wk, a3);
        }
        store_opmath(y + ow, a0, V), store_opmath(y + ow + V, a1, V);
        store_opmath(y + ow + 2 * V, a2, V), store_opmath(y + ow + 3 * V, a3, V);
      }
      for (; ow < hi; ow += V) {
        const int64_t m = std::min(V, hi - ow);
        Vec a(init);
        for (int64_t k = 0; k < K; ++k) {
          a = at::vec::fmadd(load_opmath(x + ow + k * dw, m), Vec(w[k]), a);
        }
        store_opmath(y + ow, a, m);
      }
      const auto border = [&](int64_t from, int64_t to) {  // tap by tap
        for (int64_t ow = from; ow < to; ++ow) {
          acc_t a = init;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t i = ow - pw + k * dw;
            if (i >= 0 && i < L) {
              a += w[k] * static_cast<acc_t>(x[ow + k * dw]);
            }
          }
          y[ow] = static_cast<scalar_t>(a);
        }
      };
      border(0, lo);
      border(hi, OL);
      // The next row: the next output channel, and its source plane.
      if (++oc == planes) {
        oc = 0;
        src += L;  // the next image's first plane follows this image's last
      } else if (oc % M == 0) {
        src += L;
      }
    }
  });
}

// sums[u] += sum over the band's rows b and columns ow < OW of grad[b * OW + ow] *
// planes[at[u] + b * Wq + ow], u < T: the taps' sums in registers, the gradient loaded once per
// group of taps.
template <int T, typename scalar_t, typename Vec>
void wgrad_taps_fixed(const scalar_t* gband, int64_t OW, int64_t rows, const typename Vec::value_type* planes,
                      int64_t Wq, const int64_t* at, Vec* sums) {
  constexpr int64_t V = Vec::size();
  Vec s[T];
#pragma GCC unroll 8
  for (int u = 0; u < T; ++u) {
    s[u] = sums[u];
  }
  for (int64_t b = 0; b < rows; ++b) {
    const scalar_t* grow = gband + b * OW;
    const typename Vec::value_type* prow = planes + b * Wq;
    int64_t i = 0;
    for (; i + V <= OW; i += V) {
      const Vec gv = load_opmath(grow + i, V);
#pragma GCC unroll 8
      for (int u = 0; u < T; ++u) {
        s[u] = at::vec::fmadd(gv, Vec::loadu(prow + at[u] + i), s[u]);
      }
    }
    if (i < OW) {
      const int64_t m = OW - i;
      const Vec gv = load_opmath(grow + i, m);  // lanes past m are zero
#pragma GCC unroll 8
      for (int u = 0; u < T; ++u) {
        s[u] = at::vec::fmadd(gv, Vec::loadu(prow + at[u] + i, m), s[u]);
      }
    }
  }
#pragma GCC unroll 8
  for (int u = 0; u < T; ++u) {
    sums[u] = s[u];
  }
}

// wgrad_taps_fixed for T taps, 1 <= T <= kMaxTapsAtOnce.
template <typename scalar_t, typename Vec>
void wgrad_taps(int64_t T, const scalar_t* gband, int64_t OW, int64_t rows, const typename Vec::value_type* planes,
                int64_t Wq, const int64_t* at, Vec* sums) {
  switch (T) {
    case 1: return wgrad_taps_fixed<1>(gband, OW, rows, planes, Wq, at, sums);
    case 2: return wgrad_taps_fixed<2>(gband, OW, rows, planes, Wq, at, sums);
    case 3: return wgrad_taps_fixed<3>(gband, OW, rows, planes, Wq, at, sums);
    case 4: return wgrad_taps_fixed<4>(gband, OW, rows, planes, Wq, at, sums);
    case 5: return wgrad_taps_fixed<5>(gband, OW, rows, planes, Wq, at, sums);
    case 6: return wgrad_taps_fixed<6>(gband, OW, rows, planes, Wq, at, sums);
    default: return wgrad_taps_fixed<kMaxTapsAtOnce>(gband, OW, rows, planes, Wq, at, sums);
  }
}

// grad_weight [C * M, K] and grad_bias [C * M] of NCHW (NOTE, part 4).
template <typename scalar_t>
void plane_weight_grad(
    const Geometry& g, const scalar_t* x, const scalar_t* gy, opmath_t<scalar_t>* gw, opmath_t<scalar_t>* gb,
    bool serial) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  PlanePass<scalar_t> p{x, g.C, g.H, g.W, 1, 1, nullptr, g.channels_out(), g.OH, g.OW, g.KH, g.KW,
                        g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, 1, false, nullptr, nullptr};
  const int64_t K = g.taps(), Wq = p.Wq(), Cout = g.channels_out();
  const int64_t B = band_rows(Cout, g.OH, Wq, g.sh, g.sw, sizeof(acc_t), true);
  const int64_t PS = p.Rq(B) * Wq + 4 * V;
  const auto tap_at = tap_offsets(g.KH, g.KW, g.sh, g.sw, g.dh, g.dw, Wq, PS);
  // Taps in groups of at most kMaxTapsAtOnce, as even as can be: each group's sums stay in
  // registers over the band.
  const int64_t per = div_ceil(K, div_ceil(K, kMaxTapsAtOnce));
  for_items(serial, Cout, g.N * g.OH * g.OW * K, [&](int64_t begin, int64_t end) {
    acc_t* planes = scratch<acc_t>(1, g.sh * g.sw * PS);
    std::vector<Vec> sums(K + 1);
    for (int64_t oc = begin; oc < end; ++oc) {
      std::fill(sums.begin(), sums.end(), Vec(0));
      for (int64_t n = 0; n < g.N; ++n) {
        const scalar_t* gplane = gy + (n * Cout + oc) * g.OH * g.OW;
        for (int64_t oh0 = 0; oh0 < g.OH; oh0 += B) {
          const int64_t rows = std::min(B, g.OH - oh0);
          fill_band(p, x + (n * g.C + oc / g.M) * g.H * g.W, oh0, rows, planes, PS);
          const scalar_t* gband = gplane + oh0 * g.OW;
          Vec bsum = sums[K];
          for (int64_t i = 0; i < rows * g.OW; i += V) {
            bsum = bsum + load_opmath(gband + i, std::min(V, rows * g.OW - i));
          }
          sums[K] = bsum;
          for (int64_t t0 = 0, t1; t0 < K; t0 = t1) {
            t1 = std::min(K, t0 + per);
            wgrad_taps(t1 - t0, gband, g.OW, rows, planes, Wq, tap_at.data() + t0, sums.data() + t0);
          }
        }
      }
      for (int64_t t = 0; t <= K; ++t) {
        const acc_t s = at::vec::vec_reduce_all<acc_t>([](Vec x, Vec y) { return x + y; }, sums[t]);
        if (t < K) {
          gw[oc * K + t] = s;
        } else if (gb) {
          gb[oc] = s;
        }
      }
    }
  });
}

// ---- channels_last (NOTE, part 3) -----------------------------------------------------------

// ---- the blocked pass (NOTE, part 3) ----------------------------------------------------------

// out[n, c, oh, ow] (c in one block of V channels) = bias[c] + sum over j < J and taps of
// table[j][t][c] * source[n, src_of(c, j)] at the tap, the source spread by (uh, uw) and
// padded by (ph, pw). Source and output are both dense NCHW or both channels_last (cl).
template <typename scalar_t>
struct BlockPass {
  using acc_t = opmath_t<scalar_t>;
  bool cl;
  const scalar_t* src;
  int64_t src_channels, Hs, Ws, uh, uw;
  scalar_t* out;
  int64_t channels, OH, OW;  // of the output
  int64_t KH, KW, sh, sw, ph, pw, dh, dw;
  int64_t J, M;  // J == 1: source channel c / M; else source channel c * J + j
  const acc_t* table;  // [J][K][Cpad]
  int64_t Cpad;
  const acc_t* bias;  // [Cpad] or null

  int64_t Wp() const { return (OW - 1) * sw + (KW - 1) * dw + 1; }
  int64_t rows_in(int64_t B) const { return (B - 1) * sh + (KH - 1) * dh + 1; }
  int64_t source_of(int64_t c, int64_t j) const { return J == 1 ? c / M : c * J + j; }
};

// The taps of kernel rows [kh0, kh1) for a run of R output pixels (NOTE, part 3), into acc: x is
// the run's first input pixel in kernel row kh0, pixels `pix` elements apart and kernel rows `row`
// elements apart, nc lanes. For the common kernels (KW columns, stride S, dilation 1) each input
// vector of a kernel row is loaded once for every (pixel, column) pair that reads it, and the
// row's KW weight vectors stay in registers. Shared by blocks (the scratch) and rows (in place).
template <int KW, int S, int R, typename in_t, typename acc_t = opmath_t<in_t>>
inline void run_taps(
    at::vec::Vectorized<acc_t>* acc, const in_t* x, int64_t pix, int64_t row, int64_t kh0, int64_t kh1,
    const acc_t* table, int64_t Cpad, int64_t nc) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int kSpan = (R - 1) * S + KW;
  for (int64_t kh = kh0; kh < kh1; ++kh) {
    const in_t* xr = x + (kh - kh0) * row;
    Vec w[KW];
#pragma GCC unroll 8
    for (int kw = 0; kw < KW; ++kw) {
      w[kw] = Vec::loadu(table + (kh * KW + kw) * Cpad);
    }
#pragma GCC unroll 32
    for (int j = 0; j < kSpan; ++j) {
      const Vec xv = load_opmath(xr + j * pix, nc);
#pragma GCC unroll 8
      for (int kw = 0; kw < KW; ++kw) {
        const int d = j - kw;
        if (d >= 0 && d % S == 0 && d / S < R) {
          acc[d / S] = at::vec::fmadd(xv, w[kw], acc[d / S]);
        }
      }
    }
  }
}

// A run of R output pixels of one row from the block scratch (rows of Wp pixels of V lanes):
// acc[r] (+)= sum over taps, through run_taps for the common kernels; the generic one (any
// width, stride and dilation) loads per tap.
template <int KW, int S, int R, typename acc_t>
inline void block_run(
    const acc_t* in, int64_t Wp, const acc_t* table, int64_t Cpad, int64_t KH, int64_t dh, acc_t* acc_out, int64_t nr,
    bool accumulate, const acc_t* bias) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {  // pixels past nr are computed (from the scratch's slack) and dropped
    acc[r] = accumulate && r < nr ? Vec::loadu(acc_out + r * V) : (bias ? Vec::loadu(bias) : Vec(0));
  }
  run_taps<KW, S, R>(acc, in, V, dh * Wp * V, 0, KH, table, Cpad, V);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if (r < nr) {
      acc[r].store(acc_out + r * V);
    }
  }
}

template <typename acc_t>
inline void block_run_generic(
    const acc_t* in, int64_t Wp, const acc_t* table, int64_t Cpad, int64_t KH, int64_t KW, int64_t sw, int64_t dh,
    int64_t dw, acc_t* acc_out, int64_t nr, bool accumulate, const acc_t* bias) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  for (int64_t r = 0; r < nr; ++r) {
    Vec a = accumulate ? Vec::loadu(acc_out + r * V) : (bias ? Vec::loadu(bias) : Vec(0));
    for (int64_t kh = 0; kh < KH; ++kh) {
      const acc_t* x = in + (kh * dh * Wp + r * sw) * V;
      for (int64_t kw = 0; kw < KW; ++kw) {
        a = at::vec::fmadd(Vec::loadu(x + kw * dw * V), Vec::loadu(table + (kh * KW + kw) * Cpad), a);
      }
    }
    a.store(acc_out + r * V);
  }
}

template <typename acc_t>
using FastRun =
    void (*)(const acc_t*, int64_t, const acc_t*, int64_t, int64_t, int64_t, acc_t*, int64_t, bool, const acc_t*);

// The run kernel for a pass's kernel width and stride and its run length; null: generic.
template <typename acc_t>
std::pair<FastRun<acc_t>, int64_t> fast_run(int64_t KW, int64_t sw, int64_t dw) {
  if (dw != 1) {
    return {nullptr, 8};
  }
  switch (KW * 10 + sw) {
    case 11: return {&block_run<1, 1, 8, acc_t>, 8};
    case 31: return {&block_run<3, 1, 8, acc_t>, 8};
    case 32: return {&block_run<3, 2, 6, acc_t>, 6};
    case 51: return {&block_run<5, 1, 8, acc_t>, 8};
    case 52: return {&block_run<5, 2, 6, acc_t>, 6};
    case 71: return {&block_run<7, 1, 8, acc_t>, 8};
    case 72: return {&block_run<7, 2, 6, acc_t>, 6};
    default: return {nullptr, 8};
  }
}

// fill_block for NCHW planes read in place (no spread): the band's source rows of the nc planes,
// contiguous in each plane, transposed to pixels at once (whole 16 x 16 tiles, not one short row
// at a time), then copied row by row into the padded scratch.
template <typename scalar_t, typename acc_t = opmath_t<scalar_t>>
void fill_block_planes(
    const BlockPass<scalar_t>& p, int64_t n, int64_t c0, int64_t nc, int64_t j, int64_t oh0, int64_t rows_in, acc_t* in,
    acc_t* stage, int64_t lo, int64_t hi) {
  constexpr int64_t V = at::vec::Vectorized<acc_t>::size();
  const int64_t Wp = p.Wp(), plane = p.Hs * p.Ws;
  const int64_t v0 = oh0 * p.sh - p.ph;  // the source row of scratch row 0
  const int64_t va = std::clamp<int64_t>(v0, 0, p.Hs), vb = std::clamp<int64_t>(v0 + rows_in, va, p.Hs);
  const int64_t count = (vb - va) * p.Ws;
  acc_t* pixels = stage;  // [count][V]
  if (count > 0) {
    // float planes a fixed stride apart transpose in place; others are staged in acc_t first.
    const int64_t stride = p.J > 1 ? p.J * plane : (p.M == 1 ? plane : 0);
    const acc_t* planes = nullptr;
    int64_t ld = 0;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (stride != 0) {
        planes = p.src + (n * p.src_channels + p.source_of(c0, j)) * plane + va * p.Ws;
        ld = stride;
      }
    }
    if (planes == nullptr) {
      acc_t* lanes = stage + count * V;  // [nc][count]
      for (int64_t l = 0; l < nc; ++l) {
        const scalar_t* s = p.src + (n * p.src_channels + p.source_of(c0 + l, j)) * plane + va * p.Ws;
        int64_t i = 0;
        for (; i + V <= count; i += V) {
          load_opmath(s + i, V).store(lanes + l * count + i);
        }
        if (i < count) {
          load_opmath(s + i, count - i).store(lanes + l * count + i, count - i);
        }
      }
      planes = lanes;
      ld = count;
    }
    if (nc < V) {
      std::fill_n(pixels, count * V, acc_t(0));
    }
    if constexpr (std::is_same_v<acc_t, float>) {
      at::vec::transpose_mxn<float>(planes, ld, pixels, V, static_cast<int>(nc), static_cast<int>(count));
    } else {
      for (int64_t l = 0; l < nc; ++l) {
        for (int64_t i = 0; i < count; ++i) {
          pixels[i * V + l] = planes[l * ld + i];
        }
      }
    }
  }
  for (int64_t q = 0; q < rows_in; ++q) {
    acc_t* dst = in + q * Wp * V;
    const int64_t v = v0 + q;
    if (v < 0 || v >= p.Hs) {
      std::fill_n(dst, Wp * V, acc_t(0));
      continue;
    }
    std::fill_n(dst, lo * V, acc_t(0));
    std::copy_n(pixels + ((v - va) * p.Ws + lo - p.pw) * V, (hi - lo) * V, dst + lo * V);
    std::fill_n(dst + hi * V, (Wp - hi) * V, acc_t(0));
  }
}

// Fills the block scratch: rows_in rows of Wp pixels x V lanes of block [c0, c0 + nc) at step j,
// for output rows from oh0; lanes past nc and the padding are zero.
template <typename scalar_t, typename acc_t = opmath_t<scalar_t>>
void fill_block(
    const BlockPass<scalar_t>& p, int64_t n, int64_t c0, int64_t nc, int64_t j, int64_t oh0, int64_t rows_in, acc_t* in,
    acc_t* stage) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t Wp = p.Wp();
  // Source columns of scratch pixels t = u * col + pw (u == 1: a contiguous run [lo, hi)).
  const int64_t lo = std::clamp<int64_t>(p.pw, 0, Wp), hi = std::clamp<int64_t>(p.pw + p.Ws, lo, Wp);
  if (!p.cl && p.uw == 1 && p.uh == 1) {
    fill_block_planes(p, n, c0, nc, j, oh0, rows_in, in, stage, lo, hi);
    return;
  }
  for (int64_t q = 0; q < rows_in; ++q) {
    acc_t* dst = in + q * Wp * V;
    const int64_t v = oh0 * p.sh + q - p.ph;  // the virtual source row
    if (v < 0 || v % p.uh != 0 || v / p.uh >= p.Hs) {
      std::fill_n(dst, Wp * V, acc_t(0));
      continue;
    }
    const int64_t row = v / p.uh;
    if (p.cl) {  // pixels of src_channels lanes; the block's are contiguous
      const scalar_t* s = p.src + ((n * p.Hs + row) * p.Ws) * p.src_channels + p.source_of(c0, j);
      std::fill_n(dst, lo * V, acc_t(0));
      for (int64_t t = lo; t < hi; ++t) {
        load_opmath(s + (t - p.pw) * p.src_channels, nc).store(dst + t * V);
      }
      std::fill_n(dst + hi * V, (Wp - hi) * V, acc_t(0));
      continue;
    }
    // NCHW: nc planes' rows -> pixels of lanes (lanes past nc zero).
    const int64_t plane = p.Hs * p.Ws;
    if (p.uw == 1) {
      std::fill_n(dst, lo * V, acc_t(0));
      std::fill_n(dst + hi * V, (Wp - hi) * V, acc_t(0));
      const int64_t len = hi - lo;
      if (nc < V) {
        std::fill_n(dst + lo * V, len * V, acc_t(0));
      }
      // float planes a fixed stride apart transpose directly; others are staged in acc_t first.
      const int64_t stride = p.J > 1 ? p.J * plane : (p.M == 1 ? plane : 0);
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (stride != 0) {
          const float* s = p.src + (n * p.src_channels + p.source_of(c0, j)) * plane + row * p.Ws + (lo - p.pw);
          at::vec::transpose_mxn<float>(s, stride, dst + lo * V, V, static_cast<int>(nc), static_cast<int>(len));
          continue;
        }
      }
      for (int64_t l = 0; l < nc; ++l) {
        const scalar_t* s = p.src + (n * p.src_channels + p.source_of(c0 + l, j)) * plane + row * p.Ws + (lo - p.pw);
        acc_t* st = stage + l * len;
        int64_t i = 0;
        for (; i + V <= len; i += V) {
          load_opmath(s + i, V).store(st + i);
        }
        if (i < len) {
          load_opmath(s + i, len - i).store(st + i, len - i);
        }
      }
      detail::planes_to_pixels(stage, len, nc, V, dst + lo * V);
      continue;
    }
    std::fill_n(dst, Wp * V, acc_t(0));
    for (int64_t l = 0; l < nc; ++l) {
      const scalar_t* s = p.src + (n * p.src_channels + p.source_of(c0 + l, j)) * plane + row * p.Ws;
      for (int64_t b = std::max<int64_t>(0, div_ceil(-p.pw, p.uw)); b < p.Ws && b * p.uw + p.pw < Wp; ++b) {
        dst[(b * p.uw + p.pw) * V + l] = static_cast<acc_t>(s[b]);
      }
    }
  }
}

// Output rows per band: the band's scratch within kBandBytes, and enough items for the threads.
int64_t block_band_rows(int64_t blocks, int64_t OH, int64_t Wp, int64_t OW, int64_t sh, int64_t KH, int64_t dh, int64_t V,
                        int64_t elem, bool serial) {
  const int64_t budget = debug::threshold(debug::kDepthwiseBandBytes, kBandBytes) / (V * elem);
  // rows_in(B) * Wp + B * OW <= budget
  int64_t B = std::clamp<int64_t>((budget - ((KH - 1) * dh + 1 - sh) * Wp) / (sh * Wp + OW), 1, OH);
  if (!serial) {
    const int64_t want_bands = div_ceil(2 * at::get_num_threads(), std::max<int64_t>(blocks, 1));
    B = std::min(B, std::max<int64_t>(1, div_ceil(OH, want_bands)));
  }
  return B;
}

template <typename scalar_t>
void block_pass(const BlockPass<scalar_t>& p, int64_t N, bool serial) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t Wp = p.Wp(), K = p.KH * p.KW, blocks = div_ceil(p.channels, V);
  const int64_t B = block_band_rows(N * blocks, p.OH, Wp, p.OW, p.sh, p.KH, p.dh, V, sizeof(acc_t), serial);
  const int64_t bands = div_ceil(p.OH, B);
  const auto [fast, run] = fast_run<acc_t>(p.KW, p.sw, p.dw);
  for_items(serial, N * blocks * bands, B * p.OW * V * K * p.J, [&](int64_t begin, int64_t end) {
    // The scratch's rows, then the slack the last run of a row reads past its end.
    const int64_t slack = (run * p.sw + p.KW) * V;
    acc_t* in = scratch<acc_t>(1, p.rows_in(B) * Wp * V + slack);
    // The output rows, then the stage (fill_block_planes' pixels and lanes, or rounded output).
    acc_t* acc = scratch<acc_t>(2, B * p.OW * V + V * (2 * p.rows_in(B) * p.Ws + B * p.OW + Wp + p.OW));
    acc_t* stage = acc + B * p.OW * V;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t band = item % bands, cb = (item / bands) % blocks, n = item / bands / blocks;
      const int64_t c0 = cb * V, nc = std::min(V, p.channels - c0);
      const int64_t oh0 = band * B, rows = std::min(B, p.OH - oh0);
      const acc_t* bias = p.bias ? p.bias + c0 : nullptr;
      for (int64_t j = 0; j < p.J; ++j) {
        fill_block(p, n, c0, nc, j, oh0, p.rows_in(rows), in, stage);
        std::fill_n(in + p.rows_in(rows) * Wp * V, slack, acc_t(0));
        const acc_t* table = p.table + j * K * p.Cpad + c0;
        for (int64_t b = 0; b < rows; ++b) {
          const acc_t* x = in + b * p.sh * Wp * V;
          acc_t* a = acc + b * p.OW * V;
          int64_t ow = 0;
          if (fast) {
            for (; ow < p.OW; ow += run) {
              fast(x + ow * p.sw * V, Wp, table, p.Cpad, p.KH, p.dh, a + ow * V, std::min(run, p.OW - ow), j > 0, bias);
            }
          }
          block_run_generic(x + ow * p.sw * V, Wp, table, p.Cpad, p.KH, p.KW, p.sw, p.dh, p.dw, a + ow * V, p.OW - ow,
                            j > 0, bias);
        }
      }
      if (p.cl) {
        for (int64_t b = 0; b < rows; ++b) {
          scalar_t* dst = p.out + ((n * p.OH + oh0 + b) * p.OW) * p.channels + c0;
          for (int64_t ow = 0; ow < p.OW; ++ow) {
            store_opmath(dst + ow * p.channels, Vec::loadu(acc + (b * p.OW + ow) * V), nc);
          }
        }
      } else {
        // The band's rows are contiguous in each plane: one transpose of rows * OW pixels.
        const int64_t HW = p.OH * p.OW, count = rows * p.OW;
        scalar_t* dst = p.out + (n * p.channels + c0) * HW + oh0 * p.OW;
        if constexpr (!std::is_same_v<acc_t, float>) {
          for (int64_t l = 0; l < nc; ++l) {
            for (int64_t i = 0; i < count; ++i) {
              dst[l * HW + i] = static_cast<scalar_t>(acc[i * V + l]);
            }
          }
        } else if constexpr (std::is_same_v<scalar_t, float>) {
          at::vec::transpose_mxn<float>(acc, V, dst, HW, static_cast<int>(count), static_cast<int>(nc));
        } else {
          at::vec::transpose_mxn<float>(acc, V, stage, count, static_cast<int>(count), static_cast<int>(nc));
          for (int64_t l = 0; l < nc; ++l) {
            int64_t i = 0;
            for (; i + V <= count; i += V) {
              store_opmath(dst + l * HW + i, Vec::loadu(stage + l * count + i), V);
            }
            if (i < count) {
              store_opmath(dst + l * HW + i, Vec::loadu(stage + l * count + i, count - i), count - i);
            }
          }
        }
      }
    }
  });
}

// ---- channels_last rows (NOTE, part 3) --------------------------------------------------------

// out[n, oh, ow, c] = bias[c] + sum over taps of table[t][c] * src[n, ih, iw, c]: C channels
// (M = 1), src [N, Hs, Ws, C], table [K][Cpad], bias [Cpad] or null.
template <typename scalar_t>
struct RowPass {
  using acc_t = opmath_t<scalar_t>;
  const scalar_t* src;
  int64_t N, C, Hs, Ws;
  scalar_t* out;
  int64_t OH, OW;
  int64_t KH, KW, sh, sw, ph, pw, dh, dw;
  const acc_t* table;
  int64_t Cpad;
  const acc_t* bias;
  // The output's pixel, row and image strides in elements; 0: dense [N, OH, OW, C]. A phase of a
  // strided convolution's input gradient writes every s-th pixel and row (cl_input_grad).
  int64_t out_pixel = 0, out_row = 0, out_image = 0;

  int64_t opix() const { return out_pixel ? out_pixel : C; }
  int64_t orow() const { return out_row ? out_row : OW * C; }
  int64_t oimg() const { return out_image ? out_image : OH * OW * C; }
};

// Up to kRun pixels from ow0, every tap checked against the input's bounds (kChecked) or not.
template <bool kChecked, typename scalar_t>
inline void cl_run(const RowPass<scalar_t>& p, const scalar_t* img, scalar_t* orow, int64_t oh, int64_t ow0, int64_t nr) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t opix = p.opix();  // a local: a field read would be redone after every store
  for (int64_t c0 = 0; c0 < p.C; c0 += V) {
    const int64_t nc = std::min(V, p.C - c0);
    const Vec init = p.bias ? Vec::loadu(p.bias + c0) : Vec(0);
    Vec acc[kRun] = {init, init, init, init};
    for (int64_t kh = 0; kh < p.KH; ++kh) {
      const int64_t ih = oh * p.sh - p.ph + kh * p.dh;
      if (ih < 0 || ih >= p.Hs) {
        continue;
      }
      const scalar_t* xrow = img + ih * p.Ws * p.C + c0;
      for (int64_t kw = 0; kw < p.KW; ++kw) {
        const Vec w = Vec::loadu(p.table + (kh * p.KW + kw) * p.Cpad + c0);
        const int64_t iw0 = ow0 * p.sw - p.pw + kw * p.dw;
        for (int r = 0; r < kRun; ++r) {
          const int64_t iw = iw0 + r * p.sw;
          if (r >= nr || (kChecked && (iw < 0 || iw >= p.Ws))) {
            continue;
          }
          acc[r] = at::vec::fmadd(load_opmath(xrow + iw * p.C, nc), w, acc[r]);
        }
      }
    }
    for (int r = 0; r < nr; ++r) {
      store_opmath(orow + (ow0 + r) * opix + c0, acc[r], nc);
    }
  }
}

// R pixels inside the row for the common kernels (KW columns, stride S, dilation 1): run_taps on
// the channels_last tensor in place.
template <int KW, int S, int R, typename scalar_t>
void cl_run_interior(const RowPass<scalar_t>& p, const scalar_t* img, scalar_t* orow, int64_t oh, int64_t ow0) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t C = p.C, opix = p.opix();  // locals: field reads would be redone after every store
  // Kernel rows inside the map: ih = oh * sh - ph + kh * dh in [0, Hs).
  const int64_t top = oh * p.sh - p.ph;
  const int64_t kh0 = std::clamp<int64_t>(div_ceil(-top, p.dh), 0, p.KH);
  const int64_t kh1 = std::clamp<int64_t>(div_floor(p.Hs - 1 - top, p.dh) + 1, kh0, p.KH);
  const scalar_t* x = img + ((top + kh0 * p.dh) * p.Ws + ow0 * S - p.pw) * C;
  for (int64_t c0 = 0; c0 < C; c0 += V) {
    const int64_t nc = std::min(V, C - c0);
    const Vec init = p.bias ? Vec::loadu(p.bias + c0) : Vec(0);
    Vec acc[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      acc[r] = init;
    }
    run_taps<KW, S, R>(acc, x + c0, C, p.dh * p.Ws * C, kh0, kh1, p.table + c0, p.Cpad, nc);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      store_opmath(orow + (ow0 + r) * opix + c0, acc[r], nc);
    }
  }
}

template <typename scalar_t>
using InteriorRun = void (*)(const RowPass<scalar_t>&, const scalar_t*, scalar_t*, int64_t, int64_t);

// The interior kernel for p's kernel width and stride, and its run length; null: cl_run.
template <typename scalar_t>
std::pair<InteriorRun<scalar_t>, int64_t> interior_run(int64_t KW, int64_t sw, int64_t dw) {
  if (dw != 1) {
    return {nullptr, kRun};
  }
  switch (KW * 10 + sw) {
    case 11: return {&cl_run_interior<1, 1, 8, scalar_t>, 8};  // 1, 2 and 4: phases of a strided
    case 21: return {&cl_run_interior<2, 1, 8, scalar_t>, 8};  // input gradient (cl_input_grad)
    case 41: return {&cl_run_interior<4, 1, 8, scalar_t>, 8};
    case 31: return {&cl_run_interior<3, 1, 8, scalar_t>, 8};
    case 32: return {&cl_run_interior<3, 2, 6, scalar_t>, 6};
    case 51: return {&cl_run_interior<5, 1, 8, scalar_t>, 8};
    case 52: return {&cl_run_interior<5, 2, 6, scalar_t>, 6};
    case 71: return {&cl_run_interior<7, 1, 8, scalar_t>, 8};
    case 72: return {&cl_run_interior<7, 2, 6, scalar_t>, 6};
    default: return {nullptr, kRun};
  }
}

template <typename scalar_t>
void cl_pass(const RowPass<scalar_t>& p, bool serial) {
  // Output columns whose every tap lies inside the row: [lo, hi).
  const int64_t lo = std::clamp<int64_t>(div_ceil(p.pw, p.sw), 0, p.OW);
  const int64_t hi = std::clamp<int64_t>(div_floor(p.Ws - 1 + p.pw - (p.KW - 1) * p.dw, p.sw) + 1, lo, p.OW);
  const auto [fast, run] = interior_run<scalar_t>(p.KW, p.sw, p.dw);
  for_items(serial, p.N * p.OH, p.OW * p.C * p.KH * p.KW, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / p.OH, oh = row % p.OH;
      const scalar_t* img = p.src + n * p.Hs * p.Ws * p.C;
      scalar_t* orow = p.out + n * p.oimg() + oh * p.orow();
      int64_t ow = 0;
      for (; ow < lo; ow = std::min<int64_t>(ow + kRun, lo)) {
        cl_run<true>(p, img, orow, oh, ow, std::min<int64_t>(kRun, lo - ow));
      }
      if (fast) {
        for (; ow + run <= hi; ow += run) {
          fast(p, img, orow, oh, ow);
        }
      }
      for (; ow + kRun <= hi; ow += kRun) {
        cl_run<false>(p, img, orow, oh, ow, kRun);
      }
      for (; ow < p.OW; ow += kRun) {
        cl_run<true>(p, img, orow, oh, ow, std::min<int64_t>(kRun, p.OW - ow));
      }
    }
  });
}

// sums[kw] = sum over columns ow in [A, B) of grad[ow] * x[ow * sw + kw * dw - pw], kw < KW
// (every tap inside the row there): one pass, the gradient vector loaded once per column.
template <int KW, typename scalar_t, typename Vec>
inline void wgrad_columns_fixed(
    const scalar_t* grow, const scalar_t* xrow, int64_t C, int64_t nc, int64_t sw, int64_t dw, int64_t pw, int64_t A,
    int64_t B, Vec* sums) {
  Vec s[KW];
#pragma GCC unroll 8
  for (int kw = 0; kw < KW; ++kw) {
    s[kw] = Vec(0);
  }
  for (int64_t ow = A; ow < B; ++ow) {
    const Vec gv = load_opmath(grow + ow * C, nc);
    const scalar_t* xp = xrow + (ow * sw - pw) * C;
#pragma GCC unroll 8
    for (int kw = 0; kw < KW; ++kw) {
      s[kw] = at::vec::fmadd(gv, load_opmath(xp + kw * dw * C, nc), s[kw]);
    }
  }
#pragma GCC unroll 8
  for (int kw = 0; kw < KW; ++kw) {
    sums[kw] = s[kw];
  }
}

template <typename scalar_t, typename Vec>
inline void wgrad_columns(
    const scalar_t* grow, const scalar_t* xrow, int64_t C, int64_t nc, int64_t sw, int64_t dw, int64_t pw, int64_t KW,
    int64_t A, int64_t B, Vec* sums) {
  switch (KW) {
    case 1: return wgrad_columns_fixed<1>(grow, xrow, C, nc, sw, dw, pw, A, B, sums);
    case 2: return wgrad_columns_fixed<2>(grow, xrow, C, nc, sw, dw, pw, A, B, sums);
    case 3: return wgrad_columns_fixed<3>(grow, xrow, C, nc, sw, dw, pw, A, B, sums);
    case 4: return wgrad_columns_fixed<4>(grow, xrow, C, nc, sw, dw, pw, A, B, sums);
    case 5: return wgrad_columns_fixed<5>(grow, xrow, C, nc, sw, dw, pw, A, B, sums);
    case 6: return wgrad_columns_fixed<6>(grow, xrow, C, nc, sw, dw, pw, A, B, sums);
    default: return wgrad_columns_fixed<7>(grow, xrow, C, nc, sw, dw, pw, A, B, sums);  // KW == 7
  }
}

// grad_weight [C, K] and grad_bias [C] of channels_last, M = 1 (NOTE, part 4).
template <typename scalar_t>
void cl_weight_grad(
    const Geometry& g, const scalar_t* x, const scalar_t* gy, opmath_t<scalar_t>* gw, opmath_t<scalar_t>* gb,
    bool serial) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t C = g.C, K = g.taps(), rows = g.N * g.OH;
  const int64_t Cpad = div_ceil(C, V) * V;
  const int64_t chunks = std::min(rows, kWeightChunks), per = div_ceil(rows, chunks);
  std::vector<acc_t> partial(chunks * (K + 1) * Cpad, acc_t(0));
  for_items(serial, chunks, per * g.OW * C * K, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      acc_t* part = partial.data() + chunk * (K + 1) * Cpad;
      for (int64_t row = chunk * per; row < std::min(rows, (chunk + 1) * per); ++row) {
        const int64_t n = row / g.OH, oh = row % g.OH;
        const scalar_t* grow = gy + row * g.OW * C;
        for (int64_t c0 = 0; c0 < C; c0 += V) {
          const int64_t nc = std::min(V, C - c0);
          Vec bsum(0);
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            bsum = bsum + load_opmath(grow + ow * C + c0, nc);
          }
          (Vec::loadu(part + K * Cpad + c0) + bsum).store(part + K * Cpad + c0);
          for (int64_t kh = 0; kh < g.KH; ++kh) {
            const int64_t ih = oh * g.sh - g.ph + kh * g.dh;
            if (ih < 0 || ih >= g.H) {
              continue;
            }
            const scalar_t* xrow = x + (n * g.H + ih) * g.W * C + c0;
            // Columns where every tap lies inside the row, [A, B): all the row's taps at once,
            // one sum each (independent FMA chains, the output gradient loaded once).
            const int64_t A = std::clamp<int64_t>(div_ceil(g.pw, g.sw), 0, g.OW);
            const int64_t B = std::clamp<int64_t>(div_floor(g.W - 1 + g.pw - (g.KW - 1) * g.dw, g.sw) + 1, A, g.OW);
            Vec sums[kMaxTapsAtOnce];
            const bool at_once = g.KW <= kMaxTapsAtOnce;
            if (at_once) {
              wgrad_columns(grow + c0, xrow, C, nc, g.sw, g.dw, g.pw, g.KW, A, B, sums);
            }
            for (int64_t kw = 0; kw < g.KW; ++kw) {
              // The rest of the columns whose tap kw lies inside the row.
              const int64_t off = kw * g.dw - g.pw;
              const int64_t a = std::clamp<int64_t>(div_ceil(-off, g.sw), 0, g.OW);
              const int64_t b = std::clamp<int64_t>(div_floor(g.W - 1 - off, g.sw) + 1, a, g.OW);
              Vec s = at_once ? sums[kw] : Vec(0);
              for (int64_t ow = a; ow < b; ++ow) {
                if (at_once && ow == A && B > A) {
                  ow = B - 1;  // [A, B) done above
                  continue;
                }
                s = at::vec::fmadd(load_opmath(grow + ow * C + c0, nc), load_opmath(xrow + (ow * g.sw + off) * C, nc), s);
              }
              acc_t* dst = part + (kh * g.KW + kw) * Cpad + c0;
              (Vec::loadu(dst) + s).store(dst);
            }
          }
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t <= K; ++t) {
      acc_t s = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        s += partial[(chunk * (K + 1) + t) * Cpad + c];
      }
      if (t < K) {
        gw[c * K + t] = s;
      } else if (gb) {
        gb[c] = s;
      }
    }
  }
}

// ---- the ops ---------------------------------------------------------------------------------

struct Args {
  const char* op;
  bool is1d;
};

// The geometry of a call, checked; `x` is input, `w` weight (3-D or 4-D as the op).
Geometry geometry(const Args& a, at::IntArrayRef in, at::IntArrayRef wt, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation) {
  const int64_t dims = a.is1d ? 1 : 2;
  const char* shape = a.is1d ? "[N, C, L]" : "[N, C, H, W]";
  TORCH_CHECK(static_cast<int64_t>(in.size()) == dims + 2, a.op, ": input must be a ", dims + 2, "-D tensor ", shape,
              ", got ", in.size(), "-D with shape ", in);
  TORCH_CHECK(static_cast<int64_t>(wt.size()) == dims + 2 && wt[1] == 1, a.op, ": weight must have shape [C * M, 1, ",
              a.is1d ? "k" : "kh, kw", "] (one input channel per group), got ", wt);
  for (const auto& [name, v] : {std::pair{"stride", stride}, std::pair{"padding", padding}, std::pair{"dilation", dilation}}) {
    TORCH_CHECK(static_cast<int64_t>(v.size()) == dims, a.op, ": ", name, " must have ", dims, " element(s), got ", v);
  }
  const int64_t C = in[1];
  TORCH_CHECK(C > 0, a.op, ": input must have at least one channel, got shape ", in);
  TORCH_CHECK(wt[0] > 0 && wt[0] % C == 0, a.op, ": weight's output channels (", wt[0],
              ") must be a positive multiple of input channels (", C, ")");
  for (int64_t i = 0; i < dims; ++i) {
    TORCH_CHECK(stride[i] > 0, a.op, ": stride must be positive, got ", stride);
    TORCH_CHECK(dilation[i] > 0, a.op, ": dilation must be positive, got ", dilation);
    TORCH_CHECK(padding[i] >= 0, a.op, ": padding must be non-negative, got ", padding);
    TORCH_CHECK(wt[2 + i] > 0, a.op, ": weight's kernel size must be positive, got ", wt);
  }
  Geometry g{};
  g.N = in[0], g.C = C, g.M = wt[0] / C;
  const auto pick = [&](at::IntArrayRef v, int64_t i1, int64_t dflt) { return a.is1d ? (i1 == 0 ? dflt : v[0]) : v[i1]; };
  g.H = a.is1d ? 1 : in[2], g.W = in[dims + 1];
  g.KH = a.is1d ? 1 : wt[2], g.KW = wt[dims + 1];
  g.sh = pick(stride, 0, 1), g.sw = pick(stride, 1, 1);
  g.ph = pick(padding, 0, 0), g.pw = pick(padding, 1, 0);
  g.dh = pick(dilation, 0, 1), g.dw = pick(dilation, 1, 1);
  g.OH = (g.H + 2 * g.ph - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  const bool fits = g.H + 2 * g.ph >= g.dh * (g.KH - 1) + 1 && g.W + 2 * g.pw >= g.dw * (g.KW - 1) + 1;
  TORCH_CHECK(fits, a.op, ": input's padded size (", a.is1d ? "" : std::to_string(g.H + 2 * g.ph) + " x ", g.W + 2 * g.pw,
              ") is smaller than the dilated kernel (", a.is1d ? "" : std::to_string(g.dh * (g.KH - 1) + 1) + " x ",
              g.dw * (g.KW - 1) + 1, ")");
  return g;
}

void check_tensors(const Args& a, const at::Tensor& input, const at::Tensor& weight, const at::Tensor* bias) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu() && (!bias || bias->device().is_cpu()), a.op,
              ": input, weight and bias must be CPU tensors, got input on ", input.device(), " and weight on ",
              weight.device());
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, a.op,
              ": input must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt, a.op, ": weight must have the dtype of input, got input ", dt, " and weight ",
              weight.scalar_type());
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == dt, a.op, ": bias must have the dtype of input, got input ", dt, " and bias ",
                bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), a.op, ": bias must have shape [", weight.size(0),
                "] (output channels), got ", bias->sizes());
  }
}

// Whether a call runs channels_last, and its input dense in that layout.
bool channels_last(const Args& a, const at::Tensor& t) {
  if (a.is1d) {  // channels innermost ([N, L, C]-strided): the conv1d form of channels_last
    return t.size(1) > 1 && t.size(2) > 1 && t.stride(1) < t.stride(2);
  }
  return detail::layout_of(a.op, t) == at::MemoryFormat::ChannelsLast;
}

at::Tensor dense(const at::Tensor& t, bool cl, bool is1d) {
  if (!cl) {
    return t.contiguous();
  }
  return is1d ? t.transpose(1, 2).contiguous().transpose(1, 2) : t.contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor new_output(const Geometry& g, int64_t channels, int64_t H, int64_t W, const at::TensorOptions& opts, bool cl, bool is1d) {
  if (is1d) {
    return cl ? empty_output({g.N, W, channels}, opts, at::MemoryFormat::Contiguous).transpose(1, 2)
              : empty_output({g.N, channels, W}, opts, at::MemoryFormat::Contiguous);
  }
  return empty_output({g.N, channels, H, W}, opts, cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// Whether an NCHW pass runs on planes (part 2) rather than on blocks (part 3).
// The pass a call runs: narrow output rows (<= kBlockWidth) in blocks, in either layout; wider
// ones on NCHW planes (conv1d always: its rows are long) or channels_last rows.
enum class Path { kPlanes, kRows, kBlocks };

Path path_of(bool cl, int64_t OH, int64_t OW) {
  if (OW <= debug::threshold(debug::kDepthwiseBlockWidth, kBlockWidth) && !(OH == 1 && !cl)) {
    return Path::kBlocks;
  }
  return cl ? Path::kRows : Path::kPlanes;
}

// The weight as tables in acc_t, taps flipped for the input gradient; in the calling thread's
// scratch (slot 0), followed by the bias. Planes: [rows][K]. Blocks: [J][K][Cpad], entry
// [j][k][c] the weight of row c * J + j (J > 1: the input gradient's sum over the multiplier).
template <typename scalar_t>
std::pair<const opmath_t<scalar_t>*, const opmath_t<scalar_t>*> tables(
    const at::Tensor& weight, const at::Tensor* bias, int64_t K, bool blocked, bool flip, int64_t J) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int64_t V = at::vec::Vectorized<acc_t>::size();
  const int64_t rows = weight.size(0), Cpad = div_ceil(rows / J, V) * V;
  const at::Tensor w = weight.contiguous();
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  const int64_t size = std::max(rows * K, J * K * Cpad);
  acc_t* t = scratch<acc_t>(0, size + Cpad);
  acc_t* b = t + size;
  std::fill_n(t, size + Cpad, acc_t(0));
  for (int64_t j = 0; j < (blocked ? J : 1); ++j) {
    for (int64_t c = 0; c < (blocked ? rows / J : rows); ++c) {
      const scalar_t* src = wp + (blocked ? c * J + j : c) * K;  // weight row c * J + j (or c)
      acc_t* dst = blocked ? t + j * K * Cpad + c : t + c * K;
      const int64_t step = blocked ? Cpad : 1;
      for (int64_t k = 0; k < K; ++k) {
        dst[k * step] = static_cast<acc_t>(src[flip ? K - 1 - k : k]);
      }
    }
  }
  if (!bias) {
    return {t, nullptr};
  }
  const at::Tensor bc = bias->contiguous();
  const scalar_t* bp = bc.const_data_ptr<scalar_t>();
  for (int64_t r = 0; r < rows; ++r) {
    b[r] = static_cast<acc_t>(bp[r]);
  }
  return {t, b};
}

// out = the convolution of src (dense, layout cl; src_channels channels of Hs x Ws, spread by
// (uh, uw)) with the weight (flipped for the input gradient), padded by (ph, pw), at stride
// (sh, sw), the geometry's dilation; J > 1 sums each output channel over the multiplier (the
// input gradient). channels_last sources are M = 1, J = 1 (NOTE, part 3).
template <typename scalar_t>
void run_pass(
    const at::Tensor& weight, const at::Tensor* bias, bool flip, const scalar_t* src, int64_t src_channels, int64_t Hs,
    int64_t Ws, int64_t uh, int64_t uw, scalar_t* out, int64_t channels, int64_t OH, int64_t OW, const Geometry& g,
    int64_t ph, int64_t pw, int64_t sh, int64_t sw, int64_t J, bool cl, bool serial) {
  constexpr int64_t V = at::vec::Vectorized<opmath_t<scalar_t>>::size();
  const int64_t M = J > 1 ? 1 : channels / src_channels;
  TORCH_INTERNAL_ASSERT(!cl || (M == 1 && J == 1), "depthwise_conv: channels_last passes take M == 1");
  // channels_last sources are never spread out: a strided input gradient runs by phase.
  TORCH_INTERNAL_ASSERT(!cl || (uh == 1 && uw == 1), "depthwise_conv: a spread-out channels_last source");
  const Path path = path_of(cl, OH, OW);
  const auto [table, b] = tables<scalar_t>(weight, bias, g.taps(), path != Path::kPlanes, flip, J);
  if (path == Path::kRows) {
    RowPass<scalar_t> p{src, g.N, channels, Hs, Ws, out, OH, OW, g.KH, g.KW, sh, sw, ph, pw, g.dh, g.dw,
                        table, div_ceil(channels, V) * V, b};
    cl_pass(p, serial);
  } else if (path == Path::kPlanes) {
    PlanePass<scalar_t> p{src, src_channels, Hs, Ws, uh, uw, out, channels, OH, OW, g.KH, g.KW,
                          sh, sw, ph, pw, g.dh, g.dw, J, J > 1, table, b};
    if (OH == 1 && Hs == 1 && g.KH == 1 && ph == 0 && sw == 1 && uw == 1 && J == 1) {  // output row 0 reads row 0
      row_pass(p, g.N, serial);
    } else {
      plane_pass(p, g.N, serial);
    }
  } else {
    BlockPass<scalar_t> p{cl, src, src_channels, Hs, Ws, uh, uw, out, channels, OH, OW, g.KH, g.KW, sh, sw, ph, pw,
                          g.dh, g.dw, J, M, table, div_ceil(channels, V) * V, b};
    block_pass(p, g.N, serial);
  }
}

// One dimension's phase r of a strided convolution's input gradient (NOTE, part 3): input
// positions r + s * i, i < count, receive the output gradient through the taps k with
// (r + p - k * d) % s == 0, position r + s * i reading output i + (r + p - k * d) / s. Over i that
// is a stride-1 convolution of the output gradient with those taps flipped, at dilation `dil` and
// padding `pad` (negative when the first tap reads ahead).
struct Phase {
  std::vector<int64_t> taps;
  int64_t count = 0, pad = 0, dil = 1;
};

Phase phase_of(int64_t r, int64_t n, int64_t k, int64_t s, int64_t p, int64_t d) {
  Phase ph;
  ph.count = r < n ? div_ceil(n - r, s) : 0;
  for (int64_t t = 0; t < k; ++t) {
    if ((r + p - t * d) % s == 0) {
      ph.taps.push_back(t);
    }
  }
  if (!ph.taps.empty()) {
    const int64_t J = static_cast<int64_t>(ph.taps.size());
    ph.dil = J > 1 ? (ph.taps[1] - ph.taps[0]) * d / s : 1;
    ph.pad = (J - 1) * ph.dil - (r + p - ph.taps[0] * d) / s;
  }
  return ph;
}

// The channels_last input gradient of a strided convolution (M == 1), phase by phase: rows read
// the output gradient in place, each phase's sub-kernel over it at stride 1, and write every
// sh-th row and sw-th pixel of gi; phases no tap reaches are zero. Every multiply-add is one the
// gradient needs (spreading the gradient out would make (sh * sw - 1) / (sh * sw) of them zeros).
template <typename scalar_t>
void cl_input_grad(const at::Tensor& weight, const scalar_t* gy, at::Tensor& gi, const Geometry& g, bool serial) {
  constexpr int64_t V = at::vec::Vectorized<opmath_t<scalar_t>>::size();
  const at::Tensor w4 = weight.reshape({weight.size(0), 1, g.KH, g.KW});
  scalar_t* out = gi.mutable_data_ptr<scalar_t>();
  for (int64_t rh = 0; rh < std::min(g.sh, g.H); ++rh) {  // phases r >= H have no positions
    const Phase py = phase_of(rh, g.H, g.KH, g.sh, g.ph, g.dh);
    for (int64_t rw = 0; rw < std::min(g.sw, g.W); ++rw) {
      const Phase px = phase_of(rw, g.W, g.KW, g.sw, g.pw, g.dw);
      if (py.count == 0 || px.count == 0) {
        continue;
      }
      if (py.taps.empty() || px.taps.empty()) {
        (gi.dim() == 4 ? gi.slice(2, rh, g.H, g.sh).slice(3, rw, g.W, g.sw) : gi.slice(2, rw, g.W, g.sw)).zero_();
        continue;
      }
      const int64_t JH = static_cast<int64_t>(py.taps.size()), JW = static_cast<int64_t>(px.taps.size());
      const at::Tensor sub =
          w4.index_select(2, at::tensor(py.taps, at::kLong)).index_select(3, at::tensor(px.taps, at::kLong));
      const auto table = tables<scalar_t>(sub, nullptr, JH * JW, true, true, 1).first;
      RowPass<scalar_t> p{gy, g.N, g.C, g.OH, g.OW, out + (rh * g.W + rw) * g.C, py.count, px.count, JH, JW, 1, 1,
                          py.pad, px.pad, py.dil, px.dil, table, div_ceil(g.C, V) * V, nullptr,
                          g.sw * g.C, g.sh * g.W * g.C, g.H * g.W * g.C};
      cl_pass(p, serial);
    }
  }
}

// The NCHW input gradient of a convolution strided in rows, on planes (NOTE, part 3): per row
// phase, a stride-1 pass in rows over the output gradient with that phase's kernel rows (spread
// out by the stride in columns only), writing every sh-th row of gi; row phases no tap reaches
// are zero.
template <typename scalar_t>
void plane_input_grad(const at::Tensor& weight, const scalar_t* gy, at::Tensor& gi, const Geometry& g, bool serial) {
  const at::Tensor w4 = weight.reshape({weight.size(0), 1, g.KH, g.KW});
  scalar_t* out = gi.mutable_data_ptr<scalar_t>();
  for (int64_t rh = 0; rh < std::min(g.sh, g.H); ++rh) {  // phases r >= H have no positions
    const Phase py = phase_of(rh, g.H, g.KH, g.sh, g.ph, g.dh);
    if (py.count == 0) {
      continue;
    }
    if (py.taps.empty()) {
      gi.slice(2, rh, g.H, g.sh).zero_();
      continue;
    }
    const int64_t JH = static_cast<int64_t>(py.taps.size());
    const at::Tensor sub = w4.index_select(2, at::tensor(py.taps, at::kLong));
    const auto table = tables<scalar_t>(sub, nullptr, JH * g.KW, false, true, g.M).first;
    PlanePass<scalar_t> p{gy, g.channels_out(), g.OH, g.OW, 1, g.sw, out + rh * g.W, g.C, py.count, g.W, JH, g.KW,
                          1, 1, py.pad, g.dw * (g.KW - 1) - g.pw, py.dil, g.dw, g.M, g.M > 1, table, nullptr,
                          g.sh * g.W, g.H * g.W};
    plane_pass(p, g.N, serial);
  }
}

at::Tensor forward(
    const Args& a, const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const at::Tensor* bias = bias_opt.has_value() && bias_opt->defined() ? &*bias_opt : nullptr;
  check_tensors(a, input, weight, bias);
  const Geometry g = geometry(a, input.sizes(), weight.sizes(), stride, padding, dilation);
  if (beyond_scratch(g)) {
    return at::convolution(input, weight, bias_opt, stride, padding, dilation, false,
                           std::vector<int64_t>(stride.size(), 0), g.C);
  }
  const bool cl = channels_last(a, input);
  at::Tensor x = dense(input, cl, a.is1d);
  at::Tensor y = new_output(g, g.channels_out(), g.OH, g.OW, input.options(), cl, a.is1d);
  if (y.numel() == 0) {
    return y;
  }
  const bool serial = run_serial(g);
  if (cl && g.M > 1) {  // NOTE, part 3: each channel repeated M times, then M = 1
    x = dense(x.repeat_interleave(g.M, 1), true, a.is1d);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "depthwise_conv", [&] {
    run_pass<scalar_t>(weight, bias, false, x.const_data_ptr<scalar_t>(), g.C * (cl ? g.M : 1), g.H, g.W, 1, 1,
                       y.mutable_data_ptr<scalar_t>(), g.channels_out(), g.OH, g.OW, g, g.ph, g.pw, g.sh, g.sw, 1, cl,
                       serial);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const Args& a, const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> mask) {
  check_tensors(a, input, weight, nullptr);
  const Geometry g = geometry(a, input.sizes(), weight.sizes(), stride, padding, dilation);
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == input.scalar_type(), a.op,
              ": grad must be a CPU tensor of input's dtype, got ", grad.scalar_type(), " on ", grad.device());
  const std::vector<int64_t> out_shape =
      a.is1d ? std::vector<int64_t>{g.N, g.channels_out(), g.OW} : std::vector<int64_t>{g.N, g.channels_out(), g.OH, g.OW};
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(out_shape), a.op, ": grad must have the output's shape ",
              at::IntArrayRef(out_shape), ", got ", grad.sizes());
  if (beyond_scratch(g)) {
    const std::vector<int64_t> bias_sizes{g.channels_out()};
    return at::convolution_backward(grad, input, weight, at::IntArrayRef(bias_sizes), stride, padding, dilation,
                                    false, std::vector<int64_t>(stride.size(), 0), g.C, mask);
  }
  const bool cl = channels_last(a, input);
  const bool serial = run_serial(g);
  const at::Tensor gy = dense(grad, cl, a.is1d);
  at::Tensor x = dense(input, cl, a.is1d);
  const int64_t K = g.taps(), Cout = g.channels_out();
  at::Tensor gi, gw, gb;
  if (mask[0]) {
    gi = new_output(g, g.C, g.H, g.W, input.options(), cl, a.is1d);
  }
  const auto acc_type = at::toOpMathType(input.scalar_type());
  at::Tensor gw_acc = at::empty({Cout, K}, input.options().dtype(acc_type));
  at::Tensor gb_acc = at::empty({Cout}, input.options().dtype(acc_type));
  if (g.N == 0 || g.OH * g.OW == 0) {
    if (gi.defined()) {
      gi.zero_();
    }
    gw_acc.zero_();
    gb_acc.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "depthwise_conv_backward", [&] {
      using acc_t = opmath_t<scalar_t>;
      Geometry ge = g;  // channels_last with M > 1: the repeated input, M = 1 (NOTE, part 3)
      at::Tensor gi_e = gi;
      if (cl && g.M > 1) {
        x = dense(x.repeat_interleave(g.M, 1), true, a.is1d);
        ge.C = Cout, ge.M = 1;
        if (mask[0]) {
          gi_e = new_output(g, Cout, g.H, g.W, input.options(), cl, a.is1d);
        }
      }
      if (mask[0]) {
        // The output gradient spread out by the stride, padded by d * (k - 1) - p, flipped kernel.
        const int64_t qh = g.dh * (g.KH - 1) - g.ph, qw = g.dw * (g.KW - 1) - g.pw;
        if (cl) {
          if (g.sh > 1 || g.sw > 1) {
            cl_input_grad<scalar_t>(weight, gy.const_data_ptr<scalar_t>(), gi_e, ge, serial);
          } else {
            run_pass<scalar_t>(weight, nullptr, true, gy.const_data_ptr<scalar_t>(), Cout, g.OH, g.OW, 1, 1,
                               gi_e.mutable_data_ptr<scalar_t>(), Cout, g.H, g.W, ge, qh, qw, 1, 1, 1, true, serial);
          }
          if (g.M > 1) {
            const auto v = a.is1d ? gi_e.view({g.N, g.C, g.M, g.W}) : gi_e.view({g.N, g.C, g.M, g.H, g.W});
            gi.copy_(v.sum(2));
          }
        } else {
          if (g.sh > 1 && path_of(false, g.H, g.W) == Path::kPlanes) {
            plane_input_grad<scalar_t>(weight, gy.const_data_ptr<scalar_t>(), gi, g, serial);
          } else {
            run_pass<scalar_t>(weight, nullptr, true, gy.const_data_ptr<scalar_t>(), Cout, g.OH, g.OW, g.sh, g.sw,
                               gi.mutable_data_ptr<scalar_t>(), g.C, g.H, g.W, g, qh, qw, 1, 1, g.M, false, serial);
          }
        }
      }
      if (mask[1] || mask[2]) {
        acc_t* w_out = gw_acc.mutable_data_ptr<acc_t>();
        acc_t* b_out = gb_acc.mutable_data_ptr<acc_t>();
        if (cl) {
          cl_weight_grad<scalar_t>(ge, x.const_data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(), w_out, b_out, serial);
        } else {
          plane_weight_grad<scalar_t>(g, x.const_data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(), w_out, b_out,
                                      serial);
        }
      }
    });
  }
  if (mask[1]) {
    gw = gw_acc.to(weight.scalar_type()).view(weight.sizes());
  }
  if (mask[2]) {
    gb = gb_acc.to(weight.scalar_type());
  }
  return {gi, gw, gb};
}

constexpr Args k1d{"depthwise_conv1d", true}, k2d{"depthwise_conv2d", false};
constexpr Args k1dBwd{"_depthwise_conv1d_backward", true}, k2dBwd{"_depthwise_conv2d_backward", false};

at::Tensor conv1d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  return forward(k1d, input, weight, bias, stride, padding, dilation);
}

at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  return forward(k2d, input, weight, bias, stride, padding, dilation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv1d_backward(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> mask) {
  return backward(k1dBwd, grad, input, weight, stride, padding, dilation, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> mask) {
  return backward(k2dBwd, grad, input, weight, stride, padding, dilation, mask);
}

// The path a call takes (NOTE, part 5), for info's depthwise_path().
std::string describe(
    at::IntArrayRef input, at::IntArrayRef weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, at::ScalarType dtype, bool cl) {
  const Args a{"depthwise_path", input.size() == 3};
  const Geometry g = geometry(a, input, weight, stride, padding, dilation);
  const bool serial = run_serial(g);
  const int64_t acc_bytes = dtype == at::kDouble ? 8 : 4;
  const int64_t V = dtype == at::kDouble ? at::vec::Vectorized<double>::size() : at::vec::Vectorized<float>::size();
  std::ostringstream s;
  if (beyond_scratch(g)) {
    return "ATen's convolution: a stride or dilation far beyond the map (the scratch would be enormous)";
  }
  s << (serial ? "small call: on the calling thread, no parallel region" : "parallel") << "; " << g.work()
    << " multiply-adds; ";
  const Path path = path_of(cl, g.OH, g.OW);
  if (path == Path::kPlanes) {
    const int64_t Wq = g.OW + (g.KW - 1) * g.dw / g.sw;
    s << "NCHW planes: bands of " << band_rows(g.N * g.channels_out(), g.OH, Wq, g.sh, g.sw, acc_bytes, serial)
      << " output rows, " << g.sh * g.sw << " phase plane(s), " << V << " lanes over output pixels";
  } else if (path == Path::kRows) {
    const bool fast = interior_run<float>(g.KW, g.sw, g.dw).first != nullptr;
    s << "channels_last rows: " << V << " channel lanes, "
      << (fast ? "runs of 8 (stride 1) or 6 (stride 2) pixels inside the map" : "runs of 4 pixels")
      << ", bounds-checked runs of 4 at the borders";
  } else {
    const int64_t Wp = (g.OW - 1) * g.sw + (g.KW - 1) * g.dw + 1, blocks = div_ceil(g.channels_out(), V);
    const auto run = fast_run<float>(g.KW, g.sw, g.dw);
    s << (cl ? "channels_last" : "NCHW transposed") << " blocks of " << V << " channel lanes, bands of "
      << block_band_rows(g.N * blocks, g.OH, Wp, g.OW, g.sh, g.KH, g.dh, V, acc_bytes, serial) << " output rows, "
      << (run.first ? "runs of " + std::to_string(run.second) + " pixels (" + std::to_string(g.KW) + "-wide stride-" +
                          std::to_string(g.sw) + " kernel)"
                    : std::string("one pixel at a time (generic taps)"));
    }
  if (cl && g.M > 1) {
    s << "; input channels repeated x" << g.M << " first";
  }
  s << "; accumulates in " << (dtype == at::kDouble ? "float64" : "float32") << "; ISA variant "
    << TVCE_STRINGIFY(CPU_CAPABILITY);
  return s.str();
}

std::string depthwise_path(
    at::IntArrayRef input, at::IntArrayRef weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, at::ScalarType dtype, bool channels_last) {
  return describe(input, weight, stride, padding, dilation, dtype, channels_last);
}

// ---- autograd (NOTE: registration) -----------------------------------------------------------

template <bool kIs1d>
const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(
              kIs1d ? "torchvision_cpu_ext::_depthwise_conv1d_backward" : "torchvision_cpu_ext::_depthwise_conv2d_backward",
              "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
              at::IntArrayRef, std::array<bool, 3>)>();
  return op;
}

template <bool kIs1d>
class DepthwiseFunction : public torch::autograd::Function<DepthwiseFunction<kIs1d>> {
 public:
  static at::Tensor forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(kIs1d ? "torchvision_cpu_ext::depthwise_conv1d" : "torchvision_cpu_ext::depthwise_conv2d", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                 at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
    ctx->save_for_backward({input, weight});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return op.call(input, weight, bias, stride, padding, dilation);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    const auto& op = backward_op<kIs1d>();
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["bias"].toBool();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(2)};
    const auto [gi, gw, gb] = op.call(grads[0], saved[0], saved[1], ctx->saved_data["stride"].toIntVector(),
                                      ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(),
                                      mask);
    return {gi, gw, gb, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The backward ops' autograd kernel: their outputs are the forward's gradients; a gradient of
// them (double backward, create_graph=True) is not implemented, and says so when one would be
// recorded rather than giving zeros later.
template <bool kIs1d>
std::tuple<at::Tensor, at::Tensor, at::Tensor> autograd_backward(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> mask) {
  const bool recording = at::GradMode::is_enabled() && (grad.requires_grad() || input.requires_grad() || weight.requires_grad());
  TORCH_CHECK(!recording, kIs1d ? "_depthwise_conv1d_backward" : "_depthwise_conv2d_backward",
              ": double backward (differentiating the gradient, e.g. create_graph=True) is not implemented");
  at::AutoDispatchBelowADInplaceOrView guard;  // on to the backend kernel (or a fake one when traced)
  return backward_op<kIs1d>().call(grad, input, weight, stride, padding, dilation, mask);
}

template <bool kIs1d>
at::Tensor autograd_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  return DepthwiseFunction<kIs1d>::apply(input, weight, bias, stride, padding, dilation);
}

} // namespace
} // namespace tvce

TORCH_LIBRARY_FRAGMENT(torchvision_cpu_ext, m) {
  m.def("depthwise_conv1d(Tensor input, Tensor weight, Tensor? bias, int[1] stride, int[1] padding, int[1] dilation) -> Tensor");
  m.def("depthwise_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "_depthwise_conv1d_backward(Tensor grad, Tensor input, Tensor weight, int[1] stride, int[1] padding, "
      "int[1] dilation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_depthwise_conv2d_backward(Tensor grad, Tensor input, Tensor weight, int[2] stride, int[2] padding, "
      "int[2] dilation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_depthwise_path(int[] input, int[] weight, int[] stride, int[] padding, int[] dilation, ScalarType dtype, "
      "bool channels_last) -> str",
      TORCH_FN(tvce::depthwise_path));
}

TORCH_LIBRARY_IMPL(torchvision_cpu_ext, CPU, m) {
  m.impl("depthwise_conv1d", TORCH_FN(tvce::conv1d));
  m.impl("depthwise_conv2d", TORCH_FN(tvce::conv2d));
  m.impl("_depthwise_conv1d_backward", TORCH_FN(tvce::conv1d_backward));
  m.impl("_depthwise_conv2d_backward", TORCH_FN(tvce::conv2d_backward));
}

TORCH_LIBRARY_IMPL(torchvision_cpu_ext, Autograd, m) {
  m.impl("depthwise_conv1d", TORCH_FN(tvce::autograd_forward<true>));
  m.impl("depthwise_conv2d", TORCH_FN(tvce::autograd_forward<false>));
  m.impl("_depthwise_conv1d_backward", TORCH_FN(tvce::autograd_backward<true>));
  m.impl("_depthwise_conv2d_backward", TORCH_FN(tvce::autograd_backward<false>));
}

// deform_conv2d forward and backward for CPU: NCHW and channels_last, float/double/bfloat16/half
// (reduced types accumulate in float). Semantics are torchvision's CPU kernel's; see NOTE
// [ deform_conv2d gradients ] for where its backward is not the gradient of its forward.
//
// NOTE [ deform_conv2d design ]
// A deformable convolution is an im2col convolution whose columns are bilinear samples. The
// kernel is built from four parts, each used by the forward and the backward:
// - Sampling plan (Plan, build_plan): for one image and a tile of P consecutive output pixels,
//   per (offset group, tap, pixel) one sample: the four neighbours' pixel indices (-1 outside
//   the image) and their bilinear weights with the mask folded in, as a structure of arrays
//   built a vector of pixels at a time. Everything that depends on the offsets is computed
//   here once and reused by every input channel of the offset group (torchvision recomputes it
//   per channel).
// - Panel (gather_panel, gather_run): the tile's columns, [P, groups, taps, C_in / groups]
//   row-major, i.e. one row per output pixel and, per conv group, a contiguous block of
//   K * C_in/groups columns: a GEMM operand as it is. It is filled tap by tap (consecutive
//   pixels' samples of a tap are neighbours, so input rows come from cache) from a pixel-major
//   (channels_last) input with vector loads across channels: each sample is four weighted
//   C-vectors over a channel run (Run: the channels of an offset group within one conv group).
//   Its size is bounded (tile_pixels: about a quarter of the weight's, at least 1 MiB, per
//   thread), so the full columns tensor (C * K * OH * OW per image, growing with the batch in
//   torchvision) never exists.
// - GEMM on the panel. float32 (tile_gemm_f32): oneDNN's batch-reduce GEMM ukernel through
//   ATen's cpublas::brgemm, on weight blocks that stay in L2, writing a channels_last output
//   tile in place ([P, C_out] = panel x weight^T, bias first) and an NCHW tile through a
//   per-thread [P, C_out] scratch and a transpose. ATen falls back to MKL's sgemm where the
//   ukernel is missing; on AVX-512 without AMX the ukernel beats MKL's sgemm on these shapes
//   (benchmarks/RESULTS.md). Other dtypes: ATen's matmul (at::addmm_out: oneDNN for
//   bfloat16/half, MKL for float64) writing straight into the output tile, [P, C_out] in
//   channels_last and [C_out, P] with a plane's row stride in NCHW. The weight is reordered
//   once per call to match the panel's columns.
// - Layout: the gathers want pixel-major input, so an NCHW input is converted to channels_last
//   once per call (one pass over the input, small next to the GEMM); outputs and input
//   gradients come back in the input's memory format.
// - Dtypes: the plan is in opmath (float for bfloat16/half; offset and mask converted once).
//   The forward's panel and GEMM are in the input's dtype (ATen's reduced GEMM accumulates in
//   float), so a sample is rounded once, and the output once. The backward's panels, GEMMs and
//   buffers are opmath, each gradient rounded once at the end and returned in its tensor's
//   dtype and memory format (grad_bias contiguous).
// Work is parallel over (image, pixel tile); each task owns its plan and panel, allocated once
// per thread. A call of less than about 2^20 multiply-adds (useful_threads) stays on the calling
// thread. Tile size, GEMM and that threshold are debug thresholds (debug_thresholds.h). Under a parallel region ATen's GEMM runs on the calling thread, with the
// caller's dispatch state (inference mode, below autograd) carried over explicitly.
//
// Backward (recomputes the plan; no columns tensor either):
// - dCol = grad_out tile x weight (GEMM), a panel like the forward's.
// - One pass over (pixel, offset group, tap) reads the four neighbour C-vectors once and
//   (1) rebuilds the sample panel (for grad_weight), (2) takes the four channel dot products
//   a_i = <dCol, v_i>, from which the offset gradients (d sample / dy, dx are fixed
//   combinations of the v_i) and the mask gradient (the unmasked sample) follow, and
//   (3) scatters dCol * weight_i into the input gradient.
// - grad_weight += grad_out tile^T x sample panel (GEMM) into a per-chunk partial.
// - grad_bias is a sum of grad_out.
// Determinism without atomics: tasks are (image, segment of its tiles); each task scatters
// into its own float buffer of the image, and the segments of an image (more than one only
// when there are fewer images than threads) are summed in a fixed order at the end. Tasks are
// split into one fixed chunk per thread, each with its own grad_weight partial, summed in
// chunk order. The result is the same on every run for a given thread count.
//
// NOTE [ deform_conv2d under autocast ]
// torchvision has no CPU autocast rule for deform_conv2d (its CUDA rule casts everything to
// float32). Ours (torchvision_cpu_ext/ops/_rules.py) keeps the input, weight and bias in the
// autocast dtype and the offset and mask in float32 (a bfloat16 offset cannot hold a sub-pixel
// position at 100 px), and calls torchvision_cpu_ext::_deform_conv2d_mixed: this same forward,
// accepting that one mixed combination, which builds its plan from float32 offsets as it does
// for a float32 input. A separate op keeps the mixed combination an autocast-only case
// (torchvision::deform_conv2d still raises on it, as torchvision's does) while torch.compile
// can trace it. Its autograd (ops/deform_conv2d.py) calls _deform_conv2d_backward with the
// mixed tensors, so the backward takes them too; the offset and mask gradients come back in
// float32.
//
// NOTE [ deform_conv2d gradients ]
// The gradients are those of the forward as written (a sample outside (-1, H) x (-1, W) is the
// constant 0). torchvision's backward agrees except at a sample exactly on y == -1 (or x == -1)
// with the other coordinate inside: the forward reads 0 there, so its gradient is 0, while
// torchvision's offset gradient takes the one-sided derivative from inside the image (the
// value of row 0, resp. column 0). Ours is 0 there.
#include "debug_thresholds.h"
#include "memory.h"
#include "override.h"
#include "vec_io.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace tvce {
namespace {

constexpr const char* kForward = "deform_conv2d";
constexpr const char* kBackward = "_deform_conv2d_backward";

// Shapes and arguments of one call, after the checks.
struct Geometry {
  int64_t N, C, H, W;        // input
  int64_t C_out, kh, kw, K;  // weight; K = kh * kw taps
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t G, OG;                 // conv groups, offset groups
  int64_t C_in_g, C_out_g, C_og;  // input / output channels per conv group, input channels per offset group
  int64_t OH, OW, OHW;
  bool use_mask;
  // Columns per panel row: every conv group's K * C_in_g block.
  int64_t cols() const {
    return K * C;
  }
};

at::MemoryFormat layout_of(const char* op, const char* name, const at::Tensor& t) {
  const auto fmt = t.suggest_memory_format();
  TORCH_CHECK(
      fmt == at::MemoryFormat::Contiguous || fmt == at::MemoryFormat::ChannelsLast, op, ": ", name,
      " has an unsupported memory format ", fmt, "; expected Contiguous or ChannelsLast");
  return fmt;
}

// torchvision's argument checks, each naming the argument. `mixed_ok`: float32 offset and mask
// with a bfloat16/half input (the autocast path).
Geometry check_args(
    const char* op,
    bool mixed_ok,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offset,
    const at::Tensor& mask,
    const at::Tensor& bias,
    int64_t sh,
    int64_t sw,
    int64_t ph,
    int64_t pw,
    int64_t dh,
    int64_t dw,
    int64_t groups,
    int64_t offset_groups,
    bool use_mask) {
  TORCH_CHECK(input.device().is_cpu(), op, ": input must be a CPU tensor, got ", input.device());
  TORCH_CHECK(input.dim() == 4, op, ": input must be a 4-D tensor [N, C, H, W], got ", input.dim(), "-D");
  TORCH_CHECK(
      weight.dim() == 4, op, ": weight must be a 4-D tensor [C_out, C_in / groups, kernel_h, kernel_w], got ",
      weight.dim(), "-D");
  TORCH_CHECK(
      offset.dim() == 4, op, ": offset must be a 4-D tensor [N, 2 * offset_groups * kernel_h * kernel_w, out_h, out_w], got ",
      offset.dim(), "-D");
  TORCH_CHECK(
      !use_mask || mask.dim() == 4, op, ": mask must be a 4-D tensor [N, offset_groups * kernel_h * kernel_w, out_h, out_w], got ",
      mask.dim(), "-D");
  const auto dtype = input.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
      ": input must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(
      weight.scalar_type() == dtype, op, ": weight must have the dtype of input, got input ", dtype, " and weight ",
      weight.scalar_type());
  TORCH_CHECK(
      bias.scalar_type() == dtype, op, ": bias must have the dtype of input, got input ", dtype, " and bias ",
      bias.scalar_type());
  const bool reduced = dtype == at::kBFloat16 || dtype == at::kHalf;
  const auto sampling_ok = [&](const at::Tensor& t) {
    return t.scalar_type() == dtype || (mixed_ok && reduced && t.scalar_type() == at::kFloat);
  };
  const char* also = mixed_ok && reduced ? " or float32" : "";
  TORCH_CHECK(
      sampling_ok(offset), op, ": offset must have the dtype of input", also, ", got input ", dtype, " and offset ",
      offset.scalar_type());
  TORCH_CHECK(
      !use_mask || sampling_ok(mask), op, ": mask must have the dtype of input", also, ", got input ", dtype,
      " and mask ", mask.scalar_type());

  Geometry g{};
  g.N = input.size(0);
  g.C = input.size(1);
  g.H = input.size(2);
  g.W = input.size(3);
  g.C_out = weight.size(0);
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.K = g.kh * g.kw;
  g.sh = sh, g.sw = sw, g.ph = ph, g.pw = pw, g.dh = dh, g.dw = dw;
  g.G = groups;
  g.OG = offset_groups;
  g.use_mask = use_mask;
  TORCH_CHECK(g.kh > 0 && g.kw > 0, op, ": weight's kernel size must be positive, got ", g.kh, " x ", g.kw);
  TORCH_CHECK(sh > 0 && sw > 0, op, ": stride must be positive, got stride_h ", sh, " and stride_w ", sw);
  TORCH_CHECK(ph >= 0 && pw >= 0, op, ": padding must be non-negative, got pad_h ", ph, " and pad_w ", pw);
  TORCH_CHECK(dh > 0 && dw > 0, op, ": dilation must be positive, got dilation_h ", dh, " and dilation_w ", dw);
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  TORCH_CHECK(offset_groups > 0, op, ": offset_groups must be positive, got ", offset_groups);
  TORCH_CHECK(
      weight.size(1) * groups == g.C, op, ": weight.size(1) * groups must equal the input's channels, got ",
      weight.size(1), " * ", groups, " and ", g.C);
  TORCH_CHECK(
      g.C_out % groups == 0, op, ": weight.size(0) (output channels, ", g.C_out, ") must be a multiple of groups (",
      groups, ")");
  TORCH_CHECK(
      g.C % offset_groups == 0, op, ": the input's channels (", g.C, ") must be a multiple of offset_groups (",
      offset_groups, ")");
  TORCH_CHECK(
      offset.size(1) == offset_groups * 2 * g.K, op, ": offset.size(1) must be 2 * offset_groups * kernel_h * kernel_w = ",
      offset_groups * 2 * g.K, ", got ", offset.size(1));
  TORCH_CHECK(
      !use_mask || mask.size(1) == offset_groups * g.K, op, ": mask.size(1) must be offset_groups * kernel_h * kernel_w = ",
      offset_groups * g.K, ", got ", mask.size(1));
  TORCH_CHECK(offset.size(0) == g.N, op, ": offset.size(0) must be the batch size ", g.N, ", got ", offset.size(0));
  TORCH_CHECK(
      mask.dim() >= 1 && mask.size(0) == g.N, op, ": mask.size(0) must be the batch size ", g.N, ", got ",
      mask.dim() >= 1 ? mask.size(0) : -1);
  // C++ division, as torchvision: truncates toward zero.
  g.OH = (g.H + 2 * ph - (dh * (g.kh - 1) + 1)) / sh + 1;
  g.OW = (g.W + 2 * pw - (dw * (g.kw - 1) + 1)) / sw + 1;
  g.OHW = g.OH * g.OW;
  TORCH_CHECK(
      offset.size(2) == g.OH && offset.size(3) == g.OW, op, ": offset's spatial size must be the output's (", g.OH, ", ",
      g.OW, "), got (", offset.size(2), ", ", offset.size(3), ")");
  TORCH_CHECK(
      !use_mask || (mask.size(2) == g.OH && mask.size(3) == g.OW), op, ": mask's spatial size must be the output's (",
      g.OH, ", ", g.OW, "), got (", mask.size(2), ", ", mask.size(3), ")");
  TORCH_CHECK(g.OH > 0 && g.OW > 0, op, ": the output would be empty: out_h ", g.OH, ", out_w ", g.OW);
  TORCH_CHECK(
      bias.numel() == g.C_out, op, ": bias must have one element per output channel (", g.C_out, "), got ",
      bias.numel());
  // The plan keeps pixel indices and unshifted positions in int32.
  constexpr int64_t kInt32 = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(g.H * g.W < kInt32, op, ": the input's height * width (", g.H, " * ", g.W, ") must fit in int32");
  TORCH_CHECK(
      g.OH * sh + ph + g.kh * dh < kInt32 && g.OW * sw + pw + g.kw * dw < kInt32, op,
      ": the sampling positions (out_h * stride_h + pad_h + kernel_h * dilation_h = ", g.OH * sh + ph + g.kh * dh,
      ", out_w * stride_w + pad_w + kernel_w * dilation_w = ", g.OW * sw + pw + g.kw * dw,
      ") must fit in int32: reduce stride, padding or dilation");
  g.C_in_g = g.C / groups;
  g.C_out_g = g.C_out / groups;
  g.C_og = g.C / offset_groups;
  return g;
}

// The sampling plan of one tile (NOTE [ deform_conv2d design ]), as a structure of arrays: row
// r = offset group * K + tap holds the tile's P pixels. Per sample: the four neighbours' pixel
// indices (y * W + x; -1 outside the image), their bilinear weights with the mask folded in (0
// outside), and for the backward the fractions of y and x, the mask and whether the sample is
// inside (-1, H) x (-1, W). Pixel indices are int32: the forward checks H * W against it.
template <typename acc_t>
class Plan {
 public:
  Plan(int64_t rows, int64_t P) : P_(P), idx_(4 * rows * P), val_(8 * rows * P), inside_(rows * P) {}
  int64_t P() const {
    return P_;
  }
  int32_t* idx(int t, int64_t r) {
    return idx_.data() + (r * 4 + t) * P_;
  }
  const int32_t* idx(int t, int64_t r) const {
    return idx_.data() + (r * 4 + t) * P_;
  }
  // Fields: 0-3 the weights, 4 the y fraction, 5 the x fraction, 6 the mask.
  acc_t* val(int field, int64_t r) {
    return val_.data() + (r * 8 + field) * P_;
  }
  const acc_t* val(int field, int64_t r) const {
    return val_.data() + (r * 8 + field) * P_;
  }
  uint8_t* inside(int64_t r) {
    return inside_.data() + r * P_;
  }
  const uint8_t* inside(int64_t r) const {
    return inside_.data() + r * P_;
  }

 private:
  int64_t P_;
  std::vector<int32_t> idx_;
  std::vector<acc_t> val_;
  std::vector<uint8_t> inside_;
};

// One sample, scalar: the reference form of the vector code in build_plan (float64's path).
template <typename acc_t>
inline void plan_sample(const Geometry& g, acc_t y, acc_t x, acc_t m, Plan<acc_t>& plan, int64_t r, int64_t p) {
  plan.val(6, r)[p] = m;
  // (Written so that a NaN coordinate is outside.)
  const bool inside = y > acc_t(-1) && y < static_cast<acc_t>(g.H) && x > acc_t(-1) && x < static_cast<acc_t>(g.W);
  plan.inside(r)[p] = inside;
  if (!inside) {
    for (int t = 0; t < 4; ++t) {
      plan.idx(t, r)[p] = -1;
      plan.val(t, r)[p] = acc_t(0);
    }
    plan.val(4, r)[p] = plan.val(5, r)[p] = acc_t(0);
    return;
  }
  const int64_t yl = static_cast<int64_t>(std::floor(y)), xl = static_cast<int64_t>(std::floor(x));
  const acc_t ly = y - static_cast<acc_t>(yl), lx = x - static_cast<acc_t>(xl);
  const acc_t hy = acc_t(1) - ly, hx = acc_t(1) - lx;
  plan.val(4, r)[p] = ly;
  plan.val(5, r)[p] = lx;
  const bool ok_yl = yl >= 0, ok_yh = yl + 1 <= g.H - 1, ok_xl = xl >= 0, ok_xh = xl + 1 <= g.W - 1;
  const bool ok[4] = {ok_yl && ok_xl, ok_yl && ok_xh, ok_yh && ok_xl, ok_yh && ok_xh};
  const int64_t pos = yl * g.W + xl;
  const int64_t at[4] = {pos, pos + 1, pos + g.W, pos + g.W + 1};
  const acc_t w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  for (int t = 0; t < 4; ++t) {
    plan.idx(t, r)[p] = ok[t] ? static_cast<int32_t>(at[t]) : -1;
    plan.val(t, r)[p] = ok[t] ? m * w[t] : acc_t(0);
  }
}

// The plan of image n's output pixels [p0, p0 + np). `base` (2 * P int32) is scratch for the
// pixels' unshifted positions (oy * stride - pad, ox * stride - pad).
template <typename acc_t>
void build_plan(
    const Geometry& g,
    const acc_t* offset,
    const acc_t* mask,
    int64_t n,
    int64_t p0,
    int64_t np,
    int32_t* base,
    Plan<acc_t>& plan) {
  const int64_t P = plan.P();
  int32_t* by = base;
  int32_t* bx = base + P;
  for (int64_t p = 0, oy = p0 / g.OW, ox = p0 % g.OW; p < np; ++p) {
    by[p] = static_cast<int32_t>(oy * g.sh - g.ph);
    bx[p] = static_cast<int32_t>(ox * g.sw - g.pw);
    if (++ox == g.OW) {
      ox = 0, ++oy;
    }
  }
  for (int64_t o = 0; o < g.OG; ++o) {
    for (int64_t k = 0; k < g.K; ++k) {
      const int64_t r = o * g.K + k;
      const int32_t dy = static_cast<int32_t>((k / g.kw) * g.dh), dx = static_cast<int32_t>((k % g.kw) * g.dw);
      const acc_t* off_y = offset + ((n * g.OG + o) * 2 * g.K + 2 * k) * g.OHW + p0;
      const acc_t* off_x = off_y + g.OHW;
      const acc_t* mk = g.use_mask ? mask + ((n * g.OG + o) * g.K + k) * g.OHW + p0 : nullptr;
      int64_t p = 0;
      if constexpr (std::is_same_v<acc_t, float>) {
        // As plan_sample, 16 (8) pixels at a time; lanes past np compute on zeros and are not
        // stored. Every pixel takes this path, so a sample does not depend on the tiling.
        using fVec = at::vec::Vectorized<float>;
        using iVec = at::vec::Vectorized<int32_t>;
        constexpr int64_t V = fVec::size();
        const fVec zero(0.f), one(1.f), lo(-1.f), Hf(static_cast<float>(g.H)), Wf(static_cast<float>(g.W));
        const fVec y_max(static_cast<float>(g.H - 2)), x_max(static_cast<float>(g.W - 2));
        const iVec Wi(static_cast<int32_t>(g.W)), none(-1), one_i(1);
        for (; p < np; p += V) {
          const int64_t m_ = std::min(V, np - p);
          const fVec y = at::vec::convert_to_fp_of_same_size<float>(iVec::loadu(by + p, m_) + iVec(dy)) +
              fVec::loadu(off_y + p, m_);
          const fVec x = at::vec::convert_to_fp_of_same_size<float>(iVec::loadu(bx + p, m_) + iVec(dx)) +
              fVec::loadu(off_x + p, m_);
          const fVec m = mk != nullptr ? fVec::loadu(mk + p, m_) : one;
          const fVec inside = (y > lo) & (y < Hf) & (x > lo) & (x < Wf);
          // Outside lanes continue on 0 so the conversions below stay defined.
          const fVec yf = fVec::blendv(zero, y.floor(), inside), xf = fVec::blendv(zero, x.floor(), inside);
          const fVec ly = fVec::blendv(zero, y - yf, inside), lx = fVec::blendv(zero, x - xf, inside);
          const fVec hy = one - ly, hx = one - lx;
          const fVec ok_yl = inside & (yf >= zero), ok_yh = inside & (yf <= y_max);
          const fVec ok_xl = xf >= zero, ok_xh = xf <= x_max;
          const fVec ok[4] = {ok_yl & ok_xl, ok_yl & ok_xh, ok_yh & ok_xl, ok_yh & ok_xh};
          const iVec pos = at::vec::convert_to_int_of_same_size(yf) * Wi + at::vec::convert_to_int_of_same_size(xf);
          const iVec at_[4] = {pos, pos + one_i, pos + Wi, pos + Wi + one_i};
          const fVec w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
          for (int t = 0; t < 4; ++t) {
            iVec::blendv(none, at_[t], at::vec::cast<int32_t>(ok[t])).store(plan.idx(t, r) + p, m_);
            fVec::blendv(zero, m * w[t], ok[t]).store(plan.val(t, r) + p, m_);
          }
          ly.store(plan.val(4, r) + p, m_);
          lx.store(plan.val(5, r) + p, m_);
          m.store(plan.val(6, r) + p, m_);
          int32_t in[V];
          at::vec::cast<int32_t>(inside).store(in);
          for (int64_t l = 0; l < m_; ++l) {
            plan.inside(r)[p + l] = in[l] != 0;
          }
        }
      }
      for (; p < np; ++p) {
        const acc_t y = static_cast<acc_t>(by[p] + dy) + off_y[p];
        const acc_t x = static_cast<acc_t>(bx[p] + dx) + off_x[p];
        plan_sample(g, y, x, mk != nullptr ? mk[p] : acc_t(1), plan, r, p);
      }
    }
  }
}

// A run of channels [c, c + len) of one offset group that lies in one conv group: the channels
// a sample's vector loads cover in one piece. `col` is its first channel's panel column at tap
// 0; tap k's is col + k * C_in_g. Offset groups and conv groups split the channels
// independently, so an offset group has one run or more.
struct Run {
  int64_t c, len, col;
};

std::vector<std::vector<Run>> channel_runs(const Geometry& g) {
  std::vector<std::vector<Run>> runs(g.OG);
  for (int64_t o = 0; o < g.OG; ++o) {
    for (int64_t c = o * g.C_og, end = c + g.C_og; c < end;) {
      const int64_t gr = c / g.C_in_g;
      const int64_t e = std::min(end, (gr + 1) * g.C_in_g);
      runs[o].push_back({c, e - c, gr * g.K * g.C_in_g + (c - gr * g.C_in_g)});
      c = e;
    }
  }
  return runs;
}

// The four neighbour rows of sample p of plan row r, at channel c; `zeros` (>= C elements) for
// those outside.
template <typename scalar_t, typename acc_t>
inline void neighbours(
    const scalar_t* img,
    int64_t C,
    const Plan<acc_t>& plan,
    int64_t r,
    int64_t p,
    int64_t c,
    const scalar_t* zeros,
    const scalar_t* (&src)[4]) {
  for (int t = 0; t < 4; ++t) {
    const int32_t i = plan.idx(t, r)[p];
    src[t] = i >= 0 ? img + static_cast<int64_t>(i) * C + c : zeros;
  }
}

// dst[0, len) = sample p of plan row r at channels [c, c + len): four weighted C-vectors.
// Reduced types go two vectors at a time, so a store converts a whole reduced vector.
template <typename scalar_t>
inline void gather_run(
    const scalar_t* img,
    int64_t C,
    const Plan<opmath_t<scalar_t>>& plan,
    int64_t r,
    int64_t p,
    int64_t c,
    int64_t len,
    const scalar_t* zeros,
    scalar_t* dst) {
  using Vec = OpVec<scalar_t>;
  constexpr int64_t V = Vec::size();
  if (!plan.inside(r)[p]) {
    std::fill_n(dst, len, scalar_t(0));
    return;
  }
  const scalar_t* src[4];
  neighbours(img, C, plan, r, p, c, zeros, src);
  const Vec w[4] = {Vec(plan.val(0, r)[p]), Vec(plan.val(1, r)[p]), Vec(plan.val(2, r)[p]), Vec(plan.val(3, r)[p])};
  int64_t j = 0;
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    for (; j + 2 * V <= len; j += 2 * V) {
      Vec a, b, x, y;
      at::vec::load_to_float(src[0] + j, a, b);
      a = a * w[0];
      b = b * w[0];
      for (int t = 1; t < 4; ++t) {
        at::vec::load_to_float(src[t] + j, x, y);
        a = at::vec::fmadd(x, w[t], a);
        b = at::vec::fmadd(y, w[t], b);
      }
      at::vec::convert_from_float<scalar_t>(a, b).store(dst + j);
    }
  }
  for (; j < len; j += V) {
    const int64_t m = std::min(V, len - j);
    Vec v = load_opmath(src[0] + j, m) * w[0];
    for (int t = 1; t < 4; ++t) {
      v = at::vec::fmadd(load_opmath(src[t] + j, m), w[t], v);
    }
    store_opmath(dst + j, v, m);
  }
}

// Fills panel rows [0, np) (row stride g.cols()) from the plan, tap by tap: consecutive pixels'
// samples of one tap are neighbours, so their input rows are reused from cache.
template <typename scalar_t>
void gather_panel(
    const Geometry& g,
    const std::vector<std::vector<Run>>& runs,
    const scalar_t* img,
    const Plan<opmath_t<scalar_t>>& plan,
    int64_t np,
    const scalar_t* zeros,
    scalar_t* panel) {
  for (int64_t o = 0; o < g.OG; ++o) {
    for (int64_t k = 0; k < g.K; ++k) {
      const int64_t r = o * g.K + k;
      for (const Run& run : runs[o]) {
        scalar_t* dst = panel + run.col + k * g.C_in_g;
        for (int64_t p = 0; p < np; ++p) {
          gather_run(img, g.C, plan, r, p, run.c, run.len, zeros, dst + p * g.cols());
        }
      }
    }
  }
}

// Threads worth using: one for a call of less than about 2^20 multiply-adds (the GEMM's and
// the gathers'), where a parallel region would cost more than it saves.
inline int64_t useful_threads(const Geometry& g) {
  const int64_t per_pixel = g.K * g.C_in_g * g.C_out + 4 * g.K * g.C;
  const int64_t serial = debug::threshold(debug::kDeformSerialWork, int64_t(1) << 20);
  return g.N * g.OHW * per_pixel < serial ? 1 : at::get_num_threads();
}

// Output pixels per tile. A tile's GEMM streams the whole (reordered) weight, so tiles grow
// with the weight: panel rows of max(1 MiB, weight / 4) (a panel of a quarter of the weight's
// size keeps that traffic below the panel's own), at least 64 rows (MKL's small-M products are
// slow) and at most 512, or 128 for brgemm's blocked products (which keep their weight block in
// L2 whatever the tile, and gain from a panel that stays in cache: HISTORY.md); but no larger
// than gives about four tiles per thread, so that the tile count does not leave threads idle.
// The debug threshold deform_tile_pixels overrides it, for tests (tiles of a few pixels on
// small inputs) and for measuring.
int64_t tile_pixels(const Geometry& g, int64_t row_bytes, int64_t weight_bytes, bool brgemm) {
  if (const int64_t v = debug::threshold(debug::kDeformTilePixels, 0); v > 0) {
    return std::min(v, g.OHW);
  }
  constexpr int64_t kMinPanelBytes = int64_t(1) << 20;
  constexpr int64_t kMinPixels = 64;
  const int64_t max_pixels = brgemm ? 128 : 512;
  const int64_t budget = std::max(kMinPanelBytes, weight_bytes / 4);
  int64_t P = std::clamp(budget / std::max<int64_t>(row_bytes, 1), kMinPixels, max_pixels);
  const int64_t threads = useful_threads(g);
  const int64_t tiles_per_image = (4 * threads + g.N - 1) / g.N;
  P = std::min(P, std::max<int64_t>(8, (g.OHW + tiles_per_image - 1) / tiles_per_image));
  return std::max<int64_t>(1, std::min(P, g.OHW));
}

// Output (or grad_output) pixels [p0, p0 + np) of image n as a matrix: [np, C_out] for
// channels_last, [C_out, np] for NCHW; narrowed to conv group gr's channels.
at::Tensor pixel_block(const at::Tensor& t, bool cl, int64_t n, int64_t p0, int64_t np, int64_t c0, int64_t nc) {
  const int64_t C = t.size(1), HW = t.size(2) * t.size(3);
  if (cl) {
    return t.select(0, n).permute({1, 2, 0}).view({HW, C}).narrow(0, p0, np).narrow(1, c0, nc);
  }
  return t.select(0, n).view({C, HW}).narrow(0, c0, nc).narrow(1, p0, np);
}

// float32 tile GEMMs: oneDNN's batch-reduce GEMM ukernel through ATen (cpublas::brgemm), on
// blocks of 64 output channels x 576 panel columns (the weight block, 144 KiB, stays in L2).
// MKL's sgemm (at::addmm) is the fallback ATen takes by itself where the ukernel is not
// available. c[np, n] (row stride ldc) += a[np, kc] (row stride lda) x b[kc, n] (row stride n).
constexpr int64_t kGemmBlockN = 64, kGemmBlockK = 576;

// The debug threshold deform_brgemm = 0 keeps ATen's matmul, for comparison.
inline bool use_brgemm() {
  return debug::threshold(debug::kDeformBrgemm, 1) != 0;
}

// `add`: c += a x b; else c = a x b.
void tile_gemm_f32(
    int64_t np,
    int64_t n,
    int64_t kc,
    const float* a,
    int64_t lda,
    const float* b,
    float* c,
    int64_t ldc,
    bool add) {
  for (int64_t n0 = 0; n0 < n; n0 += kGemmBlockN) {
    for (int64_t k0 = 0; k0 < kc; k0 += kGemmBlockK) {
      at::native::cpublas::brgemm(
          np, std::min(kGemmBlockN, n - n0), std::min(kGemmBlockK, kc - k0), lda, n, ldc, add || k0 > 0, a + k0,
          b + k0 * n + n0, c + n0, false);
    }
  }
}

// dst[c * ld_dst + p] = src[p * cols + c], in 16 x 16 blocks that stay in L1.
inline void transpose_block(int64_t rows, int64_t cols, const float* src, float* dst, int64_t ld_dst) {
  constexpr int64_t B = 16;
  for (int64_t c0 = 0; c0 < cols; c0 += B) {
    for (int64_t p0 = 0; p0 < rows; p0 += B) {
      const int64_t c1 = std::min(cols, c0 + B), p1 = std::min(rows, p0 + B);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t p = p0; p < p1; ++p) {
          dst[c * ld_dst + p] = src[p * cols + c];
        }
      }
    }
  }
}

template <typename scalar_t>
void forward_kernel(
    const Geometry& g,
    const at::Tensor& in,      // channels_last
    const at::Tensor& offset,  // opmath, contiguous
    const at::Tensor& mask,    // opmath, contiguous (undefined without use_mask)
    const at::Tensor& wk,      // [G, C_out_g, K * C_in_g]; for brgemm transposed: [G, K * C_in_g, C_out_g]
    const at::Tensor& bias,    // [C_out]
    at::Tensor& out,
    bool cl,
    bool brgemm) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t P = tile_pixels(g, g.cols() * static_cast<int64_t>(sizeof(scalar_t)), wk.nbytes(), brgemm);
  const int64_t tiles = (g.OHW + P - 1) / P;
  const scalar_t* in_p = in.const_data_ptr<scalar_t>();
  const acc_t* off_p = offset.const_data_ptr<acc_t>();
  const acc_t* mask_p = g.use_mask ? mask.const_data_ptr<acc_t>() : nullptr;
  const std::vector<scalar_t> zeros(g.C, scalar_t(0));
  const auto runs = channel_runs(g);
  const int64_t kc = g.K * g.C_in_g;
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  // at::parallel_for does not carry the caller's dispatch state (inference mode, the guard below
  // autograd) to its threads; the ATen calls inside need it.
  const at::ThreadLocalState caller;
  at::parallel_for(0, g.N * tiles, useful_threads(g) > 1 ? 1 : g.N * tiles, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard same_state(caller);
    Plan<acc_t> plan(g.OG * g.K, P);
    std::vector<int32_t> base(2 * P);
    at::Tensor panel = at::empty({P, g.cols()}, in.options().memory_format(at::MemoryFormat::Contiguous));
    // NCHW output of the brgemm path: the tile's [np, C_out_g] before its transpose.
    std::vector<float> scratch(brgemm && !cl ? P * g.C_out_g : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tiles, p0 = (t % tiles) * P, np = std::min(P, g.OHW - p0);
      build_plan(g, off_p, mask_p, n, p0, np, base.data(), plan);
      gather_panel(g, runs, in_p + n * g.H * g.W * g.C, plan, np, zeros.data(), panel.mutable_data_ptr<scalar_t>());
      for (int64_t gr = 0; gr < g.G; ++gr) {
        if constexpr (kFloat) {
          if (brgemm) {
            const float* b = bias.const_data_ptr<float>() + gr * g.C_out_g;
            float* c = cl ? out.mutable_data_ptr<float>() + (n * g.OHW + p0) * g.C_out + gr * g.C_out_g : scratch.data();
            const int64_t ldc = cl ? g.C_out : g.C_out_g;
            for (int64_t p = 0; p < np; ++p) {
              std::copy_n(b, g.C_out_g, c + p * ldc);
            }
            tile_gemm_f32(
                np, g.C_out_g, kc, panel.const_data_ptr<float>() + gr * kc, g.cols(),
                wk.const_data_ptr<float>() + gr * kc * g.C_out_g, c, ldc, true);
            if (!cl) {
              transpose_block(
                  np, g.C_out_g, scratch.data(), out.mutable_data_ptr<float>() + (n * g.C_out + gr * g.C_out_g) * g.OHW + p0,
                  g.OHW);
            }
            continue;
          }
        }
        const at::Tensor cols = panel.narrow(0, 0, np).narrow(1, gr * kc, kc);
        const at::Tensor b = bias.narrow(0, gr * g.C_out_g, g.C_out_g);
        at::Tensor o = pixel_block(out, cl, n, p0, np, gr * g.C_out_g, g.C_out_g);
        if (cl) {
          at::addmm_out(o, b, cols, wk[gr].t());
        } else {
          at::addmm_out(o, b.unsqueeze(1), wk[gr], cols.t());
        }
      }
    }
  });
}

// The weight as [G, C_out_g, K * C_in_g] (tap-major columns, as the panel's), in `dtype`;
// `transposed`: as [G, K * C_in_g, C_out_g] (tile_gemm_f32's B).
at::Tensor weight_as_panel_cols(const Geometry& g, const at::Tensor& weight, at::ScalarType dtype, bool transposed) {
  const at::Tensor w = weight.to(dtype).reshape({g.G, g.C_out_g, g.C_in_g, g.K});
  if (transposed) {
    return w.permute({0, 3, 2, 1}).contiguous().view({g.G, g.K * g.C_in_g, g.C_out_g});
  }
  return w.permute({0, 1, 3, 2}).contiguous().view({g.G, g.C_out_g, g.K * g.C_in_g});
}

at::Tensor forward(
    const char* op,
    bool mixed_ok,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offset,
    const at::Tensor& mask,
    const at::Tensor& bias,
    int64_t sh,
    int64_t sw,
    int64_t ph,
    int64_t pw,
    int64_t dh,
    int64_t dw,
    int64_t groups,
    int64_t offset_groups,
    bool use_mask) {
  // Called below autograd (torchvision's autograd redispatches without excluding it): the
  // ATen ops inside must not record a graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Geometry g =
      check_args(op, mixed_ok, input, weight, offset, mask, bias, sh, sw, ph, pw, dh, dw, groups, offset_groups, use_mask);
  const auto fmt = layout_of(op, "input", input);
  at::Tensor out = empty_output({g.N, g.C_out, g.OH, g.OW}, input.options(), fmt);
  if (out.numel() == 0) {
    return out;
  }
  const auto acc = at::toOpMathType(input.scalar_type());
  const at::Tensor in = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor off = offset.to(acc).contiguous();
  const at::Tensor msk = use_mask ? mask.to(acc).contiguous() : at::Tensor();
  const bool brgemm = input.scalar_type() == at::kFloat && use_brgemm();
  const at::Tensor wk = weight_as_panel_cols(g, weight, input.scalar_type(), brgemm);
  const at::Tensor b = bias.reshape({g.C_out}).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "deform_conv2d_forward", [&] {
    forward_kernel<scalar_t>(g, in, off, msk, wk, b, out, fmt == at::MemoryFormat::ChannelsLast, brgemm);
  });
  return out;
}

// The backward's pass over sample p of plan row r at channels [c, c + len) (NOTE [ deform_conv2d
// design ]): writes the sample to `cols`, adds <dcol, v_t> to dots[t], scatters dcol * w_t into
// `gimg`.
template <typename scalar_t>
inline void backward_run(
    const scalar_t* img,
    opmath_t<scalar_t>* gimg,
    int64_t C,
    const Plan<opmath_t<scalar_t>>& plan,
    int64_t r,
    int64_t p,
    int64_t c,
    int64_t len,
    const scalar_t* zeros,
    const opmath_t<scalar_t>* dcol,
    opmath_t<scalar_t>* cols,
    OpVec<scalar_t> (&dots)[4]) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  constexpr int64_t V = Vec::size();
  if (!plan.inside(r)[p]) {
    std::fill_n(cols, len, acc_t(0));
    return;
  }
  const scalar_t* src[4];
  neighbours(img, C, plan, r, p, c, zeros, src);
  acc_t* dst[4];
  for (int t = 0; t < 4; ++t) {
    const int32_t i = plan.idx(t, r)[p];
    dst[t] = i >= 0 ? gimg + static_cast<int64_t>(i) * C + c : nullptr;
  }
  const Vec w[4] = {Vec(plan.val(0, r)[p]), Vec(plan.val(1, r)[p]), Vec(plan.val(2, r)[p]), Vec(plan.val(3, r)[p])};
  for (int64_t j = 0; j < len; j += V) {
    const int64_t m = std::min(V, len - j);
    const Vec d = Vec::loadu(dcol + j, m);
    Vec v = Vec(acc_t(0));
    for (int t = 0; t < 4; ++t) {
      const Vec x = load_opmath(src[t] + j, m);
      v = at::vec::fmadd(x, w[t], v);
      dots[t] = at::vec::fmadd(d, x, dots[t]);
      if (dst[t] != nullptr) {
        at::vec::fmadd(d, w[t], Vec::loadu(dst[t] + j, m)).store(dst[t] + j, m);
      }
    }
    v.store(cols + j, m);
  }
}

template <typename scalar_t>
void backward_kernel(
    const Geometry& g,
    const at::Tensor& in,      // channels_last
    const at::Tensor& go,      // opmath, contiguous in `go_cl`'s layout
    bool go_cl,
    const at::Tensor& offset,  // opmath, contiguous
    const at::Tensor& mask,    // opmath, contiguous (undefined without use_mask)
    const at::Tensor& wk,      // opmath [G, C_out_g, K * C_in_g]
    at::Tensor& gin,           // opmath [N * S, H, W, C], zeroed
    int64_t S,
    at::Tensor& goff,          // opmath [N, OG * 2 * K, OH, OW]
    at::Tensor& gmask,         // opmath [N, OG * K, OH, OW] (undefined without use_mask)
    at::Tensor& gw_parts) {    // opmath [chunks, G, C_out_g, K * C_in_g], zeroed
  using acc_t = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  constexpr int64_t V = Vec::size();
  // dCol through tile_gemm_f32 (float opmath: float, bfloat16, half).
  const bool brgemm = std::is_same_v<acc_t, float> && go_cl && use_brgemm();
  // Two opmath panels (dCol and the samples).
  const int64_t P = tile_pixels(g, 2 * g.cols() * static_cast<int64_t>(sizeof(acc_t)), wk.nbytes(), brgemm);
  const int64_t tiles = (g.OHW + P - 1) / P;
  const int64_t tasks = g.N * S, chunks = gw_parts.size(0);
  const scalar_t* in_p = in.const_data_ptr<scalar_t>();
  const acc_t* off_p = offset.const_data_ptr<acc_t>();
  const acc_t* mask_p = g.use_mask ? mask.const_data_ptr<acc_t>() : nullptr;
  acc_t* gin_p = gin.mutable_data_ptr<acc_t>();
  acc_t* goff_p = goff.mutable_data_ptr<acc_t>();
  acc_t* gmask_p = g.use_mask ? gmask.mutable_data_ptr<acc_t>() : nullptr;
  const std::vector<scalar_t> zeros(g.C, scalar_t(0));
  const auto runs = channel_runs(g);
  const auto opts = go.options().memory_format(at::MemoryFormat::Contiguous);
  const at::ThreadLocalState caller;  // as in forward_kernel
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    at::ThreadLocalStateGuard same_state(caller);
    Plan<acc_t> plan(g.OG * g.K, P);
    std::vector<int32_t> base(2 * P);
    at::Tensor dcol = at::empty({P, g.cols()}, opts);
    at::Tensor cols = at::empty({P, g.cols()}, opts);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      at::Tensor gw = gw_parts[chunk];
      for (int64_t task = chunk * tasks / chunks; task < (chunk + 1) * tasks / chunks; ++task) {
        const int64_t n = task / S, seg = task % S;
        const scalar_t* img = in_p + n * g.H * g.W * g.C;
        acc_t* gimg = gin_p + task * g.H * g.W * g.C;
        for (int64_t tile = seg * tiles / S; tile < (seg + 1) * tiles / S; ++tile) {
          const int64_t p0 = tile * P, np = std::min(P, g.OHW - p0);
          build_plan(g, off_p, mask_p, n, p0, np, base.data(), plan);
          for (int64_t gr = 0; gr < g.G; ++gr) {
            const int64_t kc = g.K * g.C_in_g;
            if constexpr (std::is_same_v<acc_t, float>) {
              if (brgemm) {
                // grad_output is channels_last here (see backward).
                tile_gemm_f32(
                    np, kc, g.C_out_g, go.const_data_ptr<float>() + (n * g.OHW + p0) * g.C_out + gr * g.C_out_g,
                    g.C_out, wk.const_data_ptr<float>() + gr * g.C_out_g * kc, dcol.mutable_data_ptr<float>() + gr * kc,
                    g.cols(), false);
                continue;
              }
            }
            at::Tensor d = dcol.narrow(0, 0, np).narrow(1, gr * kc, kc);
            const at::Tensor gb = pixel_block(go, go_cl, n, p0, np, gr * g.C_out_g, g.C_out_g);
            at::mm_out(d, go_cl ? gb : gb.t(), wk[gr]);
          }
          const acc_t* dcol_p = dcol.const_data_ptr<acc_t>();
          acc_t* cols_p = cols.mutable_data_ptr<acc_t>();
          for (int64_t o = 0; o < g.OG; ++o) {
            for (int64_t k = 0; k < g.K; ++k) {
              const int64_t r = o * g.K + k;
              acc_t* go_y = goff_p + ((n * g.OG + o) * 2 * g.K + 2 * k) * g.OHW + p0;
              acc_t* go_x = go_y + g.OHW;
              acc_t* gm_p = g.use_mask ? gmask_p + ((n * g.OG + o) * g.K + k) * g.OHW + p0 : nullptr;
              for (int64_t p = 0; p < np; ++p) {
                Vec dots[4] = {Vec(acc_t(0)), Vec(acc_t(0)), Vec(acc_t(0)), Vec(acc_t(0))};
                for (const Run& run : runs[o]) {
                  const int64_t col = p * g.cols() + run.col + k * g.C_in_g;
                  backward_run(img, gimg, g.C, plan, r, p, run.c, run.len, zeros.data(), dcol_p + col, cols_p + col, dots);
                }
                acc_t a[4];
                for (int t = 0; t < 4; ++t) {
                  acc_t buf[V];
                  dots[t].store(buf);
                  a[t] = acc_t(0);
                  for (int64_t l = 0; l < V; ++l) {
                    a[t] += buf[l];
                  }
                }
                acc_t gy = 0, gx = 0, gm = 0;
                if (plan.inside(r)[p]) {
                  // d/dy and d/dx of the bilinear sample, from the neighbours' dot products.
                  const acc_t ly = plan.val(4, r)[p], lx = plan.val(5, r)[p], m = plan.val(6, r)[p];
                  const acc_t hy = acc_t(1) - ly, hx = acc_t(1) - lx;
                  gy = m * (hx * (a[2] - a[0]) + lx * (a[3] - a[1]));
                  gx = m * (hy * (a[1] - a[0]) + ly * (a[3] - a[2]));
                  gm = hy * hx * a[0] + hy * lx * a[1] + ly * hx * a[2] + ly * lx * a[3];
                }
                go_y[p] = gy;
                go_x[p] = gx;
                if (gm_p != nullptr) {
                  gm_p[p] = gm;
                }
              }
            }
          }
          for (int64_t gr = 0; gr < g.G; ++gr) {
            const at::Tensor c = cols.narrow(0, 0, np).narrow(1, gr * g.K * g.C_in_g, g.K * g.C_in_g);
            const at::Tensor gb = pixel_block(go, go_cl, n, p0, np, gr * g.C_out_g, g.C_out_g);
            gw[gr].addmm_(go_cl ? gb.t() : gb, c);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offset,
    const at::Tensor& mask,
    const at::Tensor& bias,
    int64_t sh,
    int64_t sw,
    int64_t ph,
    int64_t pw,
    int64_t dh,
    int64_t dw,
    int64_t groups,
    int64_t offset_groups,
    bool use_mask) {
  constexpr const char* op = kBackward;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  // The autograd of the autocast path's mixed op comes back here with its float32 offset and
  // mask (NOTE [ deform_conv2d under autocast ]).
  const Geometry g =
      check_args(op, true, input, weight, offset, mask, bias, sh, sw, ph, pw, dh, dw, groups, offset_groups, use_mask);
  TORCH_CHECK(grad.scalar_type() == input.scalar_type(), op, ": grad must have the dtype of input, got grad ",
              grad.scalar_type(), " and input ", input.scalar_type());
  TORCH_CHECK(
      grad.dim() == 4 && grad.size(0) == g.N && grad.size(1) == g.C_out && grad.size(2) == g.OH && grad.size(3) == g.OW,
      op, ": grad must have the output's shape [", g.N, ", ", g.C_out, ", ", g.OH, ", ", g.OW, "], got ", grad.sizes());
  const auto fmt = layout_of(op, "input", input);
  const auto grad_fmt = layout_of(op, "grad", grad);
  const auto acc = at::toOpMathType(input.scalar_type());
  const auto formatted = [](const at::Tensor& t, const at::Tensor& like) {
    return t.to(like.scalar_type()).contiguous(like.suggest_memory_format());
  };
  at::Tensor grad_bias = grad.sum({0, 2, 3}, false, acc).to(bias.scalar_type()).reshape(bias.sizes());
  at::Tensor grad_mask_zeros = use_mask ? at::Tensor() : at::zeros_like(mask);
  if (grad.numel() == 0 || g.C == 0) {
    return {at::zeros_like(input, fmt), at::zeros_like(weight), at::zeros_like(offset), at::zeros_like(mask), grad_bias};
  }
  const at::Tensor in = input.contiguous(at::MemoryFormat::ChannelsLast);
  // The float brgemm path reads grad_output's tiles as rows: channels_last.
  const bool brgemm = acc == at::kFloat && use_brgemm();
  const auto go_fmt = brgemm ? at::MemoryFormat::ChannelsLast : grad_fmt;
  const at::Tensor go = grad.to(acc).contiguous(go_fmt);
  const at::Tensor off = offset.to(acc).contiguous();
  const at::Tensor msk = use_mask ? mask.to(acc).contiguous() : at::Tensor();
  const at::Tensor wk = weight_as_panel_cols(g, weight, acc, false);
  // Segments per image: enough tasks for the threads when there are fewer images.
  const int64_t threads = useful_threads(g);
  const int64_t S = std::min<int64_t>(std::max<int64_t>(1, (threads + g.N - 1) / g.N), (g.OHW + 7) / 8);
  const int64_t chunks = std::min(threads, g.N * S);
  const auto opts = input.options().dtype(acc);
  at::Tensor gin = at::zeros({g.N * S, g.H, g.W, g.C}, opts);
  at::Tensor goff = at::empty({g.N, g.OG * 2 * g.K, g.OH, g.OW}, opts);
  at::Tensor gmask = use_mask ? at::empty({g.N, g.OG * g.K, g.OH, g.OW}, opts) : at::Tensor();
  at::Tensor gw_parts = at::zeros({chunks, g.G, g.C_out_g, g.K * g.C_in_g}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "deform_conv2d_backward", [&] {
    backward_kernel<scalar_t>(
        g, in, go, go_fmt == at::MemoryFormat::ChannelsLast, off, msk, wk, gin, S, goff, gmask, gw_parts);
  });
  // [N, H, W, C] -> [N, C, H, W] as a channels_last-strided view, then the input's dtype and layout.
  at::Tensor gin_sum = S == 1 ? gin : gin.view({g.N, S, g.H, g.W, g.C}).sum(1);
  at::Tensor grad_input = gin_sum.permute({0, 3, 1, 2}).to(input.scalar_type()).contiguous(fmt);
  at::Tensor grad_weight = gw_parts.sum(0)
                               .view({g.C_out, g.K, g.C_in_g})
                               .permute({0, 2, 1})
                               .reshape({g.C_out, g.C_in_g, g.kh, g.kw});
  return {
      grad_input,
      formatted(grad_weight, weight),
      formatted(goff, offset),
      use_mask ? formatted(gmask, mask) : grad_mask_zeros,
      grad_bias};
}

at::Tensor deform_conv2d_forward(
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offset,
    const at::Tensor& mask,
    const at::Tensor& bias,
    int64_t sh,
    int64_t sw,
    int64_t ph,
    int64_t pw,
    int64_t dh,
    int64_t dw,
    int64_t groups,
    int64_t offset_groups,
    bool use_mask) {
  return forward(
      kForward, false, input, weight, offset, mask, bias, sh, sw, ph, pw, dh, dw, groups, offset_groups, use_mask);
}

// See NOTE [ deform_conv2d under autocast ].
at::Tensor deform_conv2d_mixed_forward(
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offset,
    const at::Tensor& mask,
    const at::Tensor& bias,
    int64_t sh,
    int64_t sw,
    int64_t ph,
    int64_t pw,
    int64_t dh,
    int64_t dw,
    int64_t groups,
    int64_t offset_groups,
    bool use_mask) {
  return forward(
      "_deform_conv2d_mixed", true, input, weight, offset, mask, bias, sh, sw, ph, pw, dh, dw, groups, offset_groups,
      use_mask);
}

void register_kernels(torch::Library& m) {
  m.impl("deform_conv2d", TORCH_FN(deform_conv2d_forward));
  m.impl("_deform_conv2d_backward", TORCH_FN(backward));
}

const CpuOverride registrar({"deform_conv2d", "_deform_conv2d_backward"}, &register_kernels);

} // namespace
} // namespace tvce

TORCH_LIBRARY_FRAGMENT(torchvision_cpu_ext, m) {
  m.def(
      "_deform_conv2d_mixed(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
      "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
      "SymInt offset_groups, bool use_mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchvision_cpu_ext, CPU, m) {
  m.impl("_deform_conv2d_mixed", TORCH_FN(tvce::deform_conv2d_mixed_forward));
}

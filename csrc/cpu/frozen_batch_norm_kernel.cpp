// frozen_batch_norm: torchvision.ops.FrozenBatchNorm2d's inference forward in one pass.
//
// NOTE [ frozen_batch_norm ]
// torchvision's module computes scale = weight * (running_var + eps).rsqrt() and
// shift = bias - running_mean * scale on C values, then x * scale + shift as two broadcast
// elementwise ops: two passes over the activation, a temporary as large as it, and (for a
// bfloat16 input) a float32 result, since the buffers are float32. In a ResNet-50 backbone that
// is every batch-norm layer (its share of a detector's time: benchmarks/RESULTS.md). Here scale and shift are computed with
// the same ATen ops, and the activation is read once and written once: y = x * scale + shift
// as a multiply and a separate add (no FMA; -ffp-contract=off), the operations the two
// elementwise passes perform, so float32/float64 results equal torchvision's bit for bit, and
// a bfloat16/half input is widened exactly, as type promotion does.
// - The output dtype is the promoted one, as torchvision's (float32 for a bfloat16 input with
//   float32 buffers), unless `dtype` asks for the input's dtype: the AutocastCPU rule does,
//   so a bfloat16 network stays in bfloat16 (rounding once, from the float32 result).
// - NCHW: parallel over (n, c) planes, each a contiguous run with one scale and shift.
//   channels_last: parallel over pixels, each a contiguous row of C channels multiplied by the
//   vectors of scales and shifts. Other strides are made contiguous in their suggested format.
// - `as_batch_norm` (detectron2's FrozenBatchNorm2d, whose inference forward is F.batch_norm
//   with training=False): ATen's batch_norm_cpu kernel rounds differently, and the op follows it
//   instead, so its values equal F.batch_norm's bit for bit. ATen computes per channel, in the
//   opmath type, invstd = 1 / std::sqrt(var + eps), scale = invstd * weight,
//   shift = bias - mean * scale, then y = x * scale + shift, in a translation unit built with the
//   capability's -m flags and the compiler's default contraction: with FMA (AVX2, AVX512) both
//   `a - b * c` and `x * s + t` become one fused multiply-add each (kAtenContracts); without it
//   (DEFAULT) they are a multiply and an add, as here. A reduced-precision input is widened, the
//   same float32 formula applied and the result rounded once, as ATen's mixed-type path does. Only
//   inputs dense in NCHW or channels_last take this path (ATen's other strides run a different
//   expression); the caller checks (ops/frozen_batch_norm.py, d2_use_fused).
// - Registration: frozen_batch_norm is the package's own op (override.h, route (b)); the Python
//   patches of FrozenBatchNorm2d.forward (route (c)) decide when it runs. Only the layout check
//   (checks.h) and the grain (parallel_grain.h) are shared with the RoI kernels.
#include "checks.h"
#include "memory.h"
#include "parallel_grain.h"
#include "vec_io.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

namespace tvce {
namespace {

// Whether ATen's capability build contracts a * b + c into an FMA (NOTE [ frozen_batch_norm ]).
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr bool kAtenContracts = true;
#else
constexpr bool kAtenContracts = false;
#endif

// x * s + b: torchvision's two rounded operations, or (Fused) ATen's batch_norm rounding.
template <bool Fused, typename Vec>
inline Vec scale_shift(const Vec& x, const Vec& s, const Vec& b) {
  if constexpr (Fused && kAtenContracts) {
    return at::vec::fmadd(x, s, b);
  } else {
    return x * s + b;
  }
}

template <bool Fused, typename in_t, typename out_t>
inline void scale_shift_run(
    const in_t* x, out_t* y, int64_t n, const OpVec<in_t>& s, const OpVec<in_t>& b) {
  constexpr int64_t V = OpVec<in_t>::size();
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    store_opmath<out_t>(y + i, scale_shift<Fused>(load_opmath<in_t>(x + i, V), s, b), V);
  }
  if (i < n) {
    store_opmath<out_t>(y + i, scale_shift<Fused>(load_opmath<in_t>(x + i, n - i), s, b), n - i);
  }
}

// ATen's batch_norm_cpu inference terms, in acc_t (the buffers' dtype here): see the NOTE.
template <typename acc_t>
void batch_norm_terms(
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var, double eps,
    at::Tensor& scale, at::Tensor& shift) {
  const auto w = weight.contiguous(), b = bias.contiguous(), m = mean.contiguous(), v = var.contiguous();
  const acc_t *wp = w.const_data_ptr<acc_t>(), *bp = b.const_data_ptr<acc_t>();
  const acc_t *mp = m.const_data_ptr<acc_t>(), *vp = v.const_data_ptr<acc_t>();
  acc_t* sp = scale.mutable_data_ptr<acc_t>();
  acc_t* hp = shift.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < scale.numel(); ++c) {
    const acc_t invstd = acc_t(1) / std::sqrt(vp[c] + static_cast<acc_t>(eps));
    sp[c] = invstd * wp[c];
    hp[c] = kAtenContracts ? std::fma(-mp[c], sp[c], bp[c]) : bp[c] - mp[c] * sp[c];
  }
}

template <bool Fused, typename in_t, typename out_t>
void frozen_bn_kernel(const at::Tensor& x, at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, bool cl) {
  using acc_t = opmath_t<in_t>;
  using Vec = OpVec<in_t>;
  constexpr int64_t V = Vec::size();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const in_t* xp = x.const_data_ptr<in_t>();
  out_t* yp = y.mutable_data_ptr<out_t>();
  const acc_t* sp = scale.const_data_ptr<acc_t>();
  const acc_t* bp = shift.const_data_ptr<acc_t>();
  if (!cl) {
    at::parallel_for(0, N * C, detail::grain_for(HW), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C;
        scale_shift_run<Fused, in_t, out_t>(xp + p * HW, yp + p * HW, HW, Vec(sp[c]), Vec(bp[c]));
      }
    });
    return;
  }
  at::parallel_for(0, N * HW, detail::grain_for(C), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const in_t* xr = xp + p * C;
      out_t* yr = yp + p * C;
      int64_t c = 0;
      for (; c + V <= C; c += V) {
        const Vec v = scale_shift<Fused>(load_opmath<in_t>(xr + c, V), Vec::loadu(sp + c), Vec::loadu(bp + c));
        store_opmath<out_t>(yr + c, v, V);
      }
      if (c < C) {
        const int64_t n = C - c;
        const Vec v = scale_shift<Fused>(load_opmath<in_t>(xr + c, n), Vec::loadu(sp + c, n), Vec::loadu(bp + c, n));
        store_opmath<out_t>(yr + c, v, n);
      }
    }
  });
}

at::Tensor frozen_batch_norm(
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps,
    std::optional<at::ScalarType> dtype,
    bool as_batch_norm) {
  constexpr const char* op = "frozen_batch_norm";
  TORCH_CHECK(input.device().is_cpu(), op, ": input must be a CPU tensor, got ", input.device());
  TORCH_CHECK(input.dim() == 4, op, ": input must be a 4-D tensor [N, C, H, W], got ", input.dim(), "-D");
  const auto in_type = input.scalar_type();
  TORCH_CHECK(
      in_type == at::kFloat || in_type == at::kDouble || in_type == at::kBFloat16 || in_type == at::kHalf, op,
      ": input must be float32, float64, bfloat16 or float16, got ", in_type);
  const int64_t C = input.size(1);
  const std::pair<const char*, const at::Tensor*> params[] = {
      {"weight", &weight}, {"bias", &bias}, {"running_mean", &running_mean}, {"running_var", &running_var}};
  for (const auto& [name, t] : params) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(
        t->dim() == 1 && t->size(0) == C, op, ": ", name, " must have shape [C] = [", C, "] (input channels), got ",
        t->sizes());
    TORCH_CHECK(
        t->scalar_type() == weight.scalar_type(), op, ": ", name, " must have weight's dtype ", weight.scalar_type(),
        ", got ", t->scalar_type());
  }
  const auto param_type = weight.scalar_type();
  // The computation type is the promoted one, and it must be the input's opmath type (float for
  // float32/bfloat16/half, double for float64) for the single-pass kernel to equal torchvision.
  const auto acc_type = in_type == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(
      param_type == at::kFloat || (param_type == at::kDouble && in_type == at::kDouble), op,
      ": weight and buffers must be float32 (or float64 with a float64 input), got ", param_type, " with input ",
      in_type);
  const auto promoted = at::promote_types(in_type, param_type);
  const auto out_type = dtype.value_or(promoted);
  TORCH_CHECK(
      out_type == promoted || out_type == in_type, op, ": dtype must be the input's (", in_type,
      ") or the promoted one (", promoted, "), got ", out_type);

  TORCH_CHECK(
      !as_batch_norm || param_type == acc_type, op,
      ": as_batch_norm takes float32 buffers with a float32/bfloat16/float16 input, or float64 with float64, got ",
      param_type, " with input ", in_type);

  at::Tensor scale, shift;
  if (as_batch_norm) {
    scale = at::empty({C}, weight.options().dtype(acc_type));
    shift = at::empty({C}, weight.options().dtype(acc_type));
    AT_DISPATCH_FLOATING_TYPES(acc_type, "frozen_batch_norm_terms", [&] {
      batch_norm_terms<scalar_t>(weight, bias, running_mean, running_var, eps, scale, shift);
    });
  } else {  // torchvision's own expressions (misc.FrozenBatchNorm2d.forward), on C values.
    scale = (weight * (running_var + eps).rsqrt()).to(acc_type).contiguous();
    shift = (bias - running_mean * scale.to(param_type)).to(acc_type).contiguous();
  }

  const auto fmt = detail::layout_of(op, input);
  const at::Tensor x = input.contiguous(fmt);
  at::Tensor y = empty_output(x.sizes(), x.options().dtype(out_type), fmt);
  if (y.numel() == 0) {
    return y;
  }
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in_type, "frozen_batch_norm", [&] {
    auto run = [&](auto fused) {
      constexpr bool F = decltype(fused)::value;
      if (out_type == in_type) {
        frozen_bn_kernel<F, scalar_t, scalar_t>(x, y, scale, shift, cl);
      } else if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
        frozen_bn_kernel<F, scalar_t, float>(x, y, scale, shift, cl);
      } else {
        TORCH_INTERNAL_ASSERT(false, "unreachable: promoted dtype differs from a full-precision input's");
      }
    };
    if (as_batch_norm) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  return y;
}

} // namespace
} // namespace tvce

TORCH_LIBRARY_FRAGMENT(torchvision_cpu_ext, m) {
  m.def(
      "frozen_batch_norm(Tensor input, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var, "
      "float eps, ScalarType? dtype=None, bool as_batch_norm=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchvision_cpu_ext, CPU, m) {
  m.impl("frozen_batch_norm", TORCH_FN(tvce::frozen_batch_norm));
}

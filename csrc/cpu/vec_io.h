#pragma once
// Load/store leaf helpers: every kernel is one template accumulating in
// at::opmath_type<scalar_t>; only these helpers know that BFloat16/Half are stored
// narrower than they are computed.
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstring>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>

namespace tvce {

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

template <typename scalar_t>
using OpVec = at::vec::Vectorized<opmath_t<scalar_t>>;

// Loads n (<= OpVec::size()) elements as one opmath vector; lanes past n are zero.
template <typename scalar_t>
inline OpVec<scalar_t> load_opmath(const scalar_t* p, int64_t n) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    constexpr int64_t V = OpVec<scalar_t>::size();
    at::vec::Vectorized<float> out;
    if (n == V) {
      at::vec::load_to_float(p, out);
    } else {
      scalar_t buf[V] = {};
      std::memcpy(buf, p, n * sizeof(scalar_t));
      at::vec::load_to_float(buf, out);
    }
    return out;
  } else {
    return OpVec<scalar_t>::loadu(p, n);
  }
}

// Stores the first n (<= OpVec::size()) lanes of v, rounding to scalar_t.
template <typename scalar_t>
inline void store_opmath(scalar_t* p, const OpVec<scalar_t>& v, int64_t n) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, static_cast<int>(n));
  } else {
    v.store(p, static_cast<int>(n));
  }
}

// Loads p[0], p[stride], ..., p[(n - 1) * stride] (n <= OpVec::size()) as one opmath vector,
// lanes past n zero: for a few loads per item (StridedLoad is the one for inner loops).
template <typename scalar_t>
inline OpVec<scalar_t> load_strided(const scalar_t* p, int64_t stride, int64_t n) {
  if (stride == 1) {
    return load_opmath(p, n);
  }
  opmath_t<scalar_t> buf[OpVec<scalar_t>::size()];
  for (int64_t j = 0; j < n; ++j) {
    buf[j] = static_cast<opmath_t<scalar_t>>(p[j * stride]);
  }
  return OpVec<scalar_t>::loadu(buf, n);
}

// Loads p[0], p[stride], ..., p[(n - 1) * stride] (n <= OpVec::size()) as one opmath vector:
// the position-sensitive ops read one element of each of n channel planes at the same pixel.
// Lanes past n are unspecified (callers keep only n lanes). float and double use the ISA's
// gather when the offsets fit its index type (on AVX-512 masked to the n lanes, cheaper than a
// full gather). bfloat16/half on AVX-512 gather the aligned 32-bit word holding each element
// (never past the element's own 4 bytes, so never into another page) and take its half, which
// beats loading lane by lane. Elsewhere reduced floats load lane by lane (for float, scalar
// loads through a buffer were slower than a gather). Measurements: benchmarks/HISTORY.md.
template <typename scalar_t>
class StridedLoad {
 public:
  using acc_t = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  using Int = at::vec::int_same_size_t<acc_t>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<scalar_t>;
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr bool kGather = true;
#else
  static constexpr bool kGather = !kReduced;
#endif

  StridedLoad(int64_t stride, int64_t n) : stride_(stride), n_(n) {
    // Offsets in elements (float/double, scaled by the gather) or in bytes (reduced floats).
    const int64_t unit = kReduced ? static_cast<int64_t>(sizeof(scalar_t)) : 1;
    gather_ = kGather && (n - 1) * stride * unit + 3 <= std::numeric_limits<Int>::max();
    Int idx[Vec::size()] = {};  // lanes past n gather p[0], which is valid
    for (int64_t j = 0; gather_ && j < n; ++j) {
      idx[j] = static_cast<Int>(j * stride * unit);
    }
    index_ = at::vec::Vectorized<Int>::loadu(idx);
  }

  Vec operator()(const scalar_t* p) const {
    if constexpr (kGather) {
      if (gather_) {
#if defined(CPU_CAPABILITY_AVX512)
        const auto mask = static_cast<uint16_t>((1u << n_) - 1);
        if constexpr (kReduced) {
          // Byte offsets from the 4-byte aligned address below p; bit 1 says which half.
          const auto addr = reinterpret_cast<uintptr_t>(p);
          const __m512i off = _mm512_add_epi32(index_, _mm512_set1_epi32(static_cast<int32_t>(addr & 3)));
          const __m512i words = _mm512_mask_i32gather_epi32(
              _mm512_setzero_si512(), mask, _mm512_andnot_si512(_mm512_set1_epi32(3), off),
              reinterpret_cast<const void*>(addr & ~uintptr_t{3}), 1);
          const __m512i high = _mm512_slli_epi32(_mm512_and_si512(off, _mm512_set1_epi32(2)), 3);  // 16 or 0
          const __m512i bits = _mm512_srlv_epi32(words, high);  // the element in the low half
          if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
            return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
          } else {
            return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(bits));
          }
        } else if constexpr (std::is_same_v<acc_t, float>) {
          return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, index_, p, sizeof(float));
        } else {
          return _mm512_mask_i64gather_pd(_mm512_setzero_pd(), static_cast<uint8_t>(mask), index_, p, sizeof(double));
        }
#else
        return at::vec::gather<sizeof(acc_t)>(p, index_);
#endif
      }
    }
    return load_strided(p, stride_, n_);
  }

  // Asks for the lines of the n elements at p ahead of use: the position-sensitive ops touch
  // each line of a map about once per call, in an order no hardware prefetcher follows.
  void prefetch(const scalar_t* p) const {
    for (int64_t j = 0; j < n_; ++j) {
      __builtin_prefetch(p + j * stride_);
    }
  }

 private:
  int64_t stride_, n_;
  bool gather_;
  at::vec::Vectorized<Int> index_;
};

// Stores the first n (<= OpVec::size()) lanes of v to p[0], p[stride], ..., rounding to scalar_t.
template <typename scalar_t>
inline void store_strided(scalar_t* p, int64_t stride, const OpVec<scalar_t>& v, int64_t n) {
  if (stride == 1) {
    store_opmath(p, v, n);
    return;
  }
  opmath_t<scalar_t> buf[OpVec<scalar_t>::size()];
  v.store(buf);
  for (int64_t j = 0; j < n; ++j) {
    p[j * stride] = static_cast<scalar_t>(buf[j]);
  }
}

namespace io_detail {
// Whether the n values at p are all +0 (every bit clear; -0 rounds to a different bfloat16).
template <typename T>
inline bool all_bits_zero(const T* p, int64_t n) {
  uint64_t any = 0;
  for (int64_t i = 0; i < n * static_cast<int64_t>(sizeof(T)) / 8; ++i) {
    uint64_t w;
    std::memcpy(&w, reinterpret_cast<const char*>(p) + 8 * i, 8);
    any |= w;
  }
  return any == 0;
}

// write_opmath, and with kDrain drain_opmath (which also leaves src zero).
template <bool kDrain, typename scalar_t, typename Src>
inline void write_opmath(scalar_t* dst, Src* src, int64_t n, bool nontemporal, bool fence) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  constexpr int64_t V = Vec::size();
  int64_t i = 0;
  const auto clear = [&](int64_t at, int64_t count) {
    if constexpr (kDrain) {
      std::fill_n(src + at, count, acc_t(0));
    }
  };
#if defined(CPU_CAPABILITY_AVX512)
  if (nontemporal) {
    constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(scalar_t));  // one 64-byte store
    for (; i < n && reinterpret_cast<uintptr_t>(dst + i) % 64 != 0; ++i) {
      dst[i] = static_cast<scalar_t>(src[i]);
      clear(i, 1);
    }
    for (; i + kLine <= n; i += kLine) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
      } else if constexpr (std::is_same_v<scalar_t, double>) {
        _mm512_stream_pd(dst + i, _mm512_loadu_pd(src + i));
      } else if constexpr (std::is_same_v<scalar_t, int32_t>) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(src + i));
      } else {
        const __m512i v = at::vec::convert_from_float<scalar_t>(Vec::loadu(src + i), Vec::loadu(src + i + V));
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), v);
      }
      clear(i, kLine);  // without testing it first: the line was just loaded
    }
    if (fence) {
      _mm_sfence();  // ordered before the parallel region's end makes them visible to other threads
    }
  }
#endif
  if constexpr (kDrain) {
    // Zero blocks (most of a sparse gradient's) are written as zeros, without rounding, and
    // need no clearing.
    for (; i + 2 * V <= n; i += 2 * V) {
      if (all_bits_zero(src + i, 2 * V)) {
        std::fill_n(dst + i, 2 * V, scalar_t(0));
        continue;
      }
      if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
        at::vec::convert_from_float<scalar_t>(Vec::loadu(src + i), Vec::loadu(src + i + V)).store(dst + i);
      } else {
        std::copy_n(src + i, 2 * V, dst + i);
      }
      clear(i, 2 * V);
    }
  }
  for (; i < n; i += V) {
    const int64_t m = std::min(V, n - i);
    store_opmath(dst + i, Vec::loadu(src + i, m), m);
    clear(i, m);
  }
}
} // namespace io_detail

// Writes n opmath values to dst, rounding to scalar_t. With `nontemporal`, through
// non-temporal stores where the ISA has them (AVX-512): a gradient written once and not read
// again by the kernel need not have its lines read first (an ordinary store reads each line
// it writes) nor kept in cache.
// `fence` = false leaves the ordering fence to the caller (stream_fence, once after many
// small writes). int32_t (opmath int32_t) writes as is.
template <typename scalar_t>
inline void write_opmath(scalar_t* dst, const opmath_t<scalar_t>* src, int64_t n, bool nontemporal, bool fence = true) {
  io_detail::write_opmath<false>(dst, src, n, nontemporal, fence);
}

// write_opmath that also leaves src all zero, for a buffer written out and then accumulated
// into again (OwnedGradAccumulator): zeroed once, afterwards only its nonzero blocks are
// cleared, instead of a memset of all of it per use; the ps gradients are mostly zeros, whose
// blocks are then neither rounded nor cleared.
template <typename scalar_t>
inline void drain_opmath(scalar_t* dst, opmath_t<scalar_t>* src, int64_t n, bool nontemporal) {
  io_detail::write_opmath<true>(dst, src, n, nontemporal, /*fence=*/true);
}

// Orders the non-temporal stores of write_opmath(..., fence = false) calls before what follows.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

} // namespace tvce

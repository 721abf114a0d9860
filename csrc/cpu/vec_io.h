#pragma once
// Load/store leaf helpers: every kernel is one template accumulating in
// at::opmath_type<scalar_t>; only these helpers know that BFloat16/Half are stored
// narrower than they are computed.
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstring>

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

} // namespace tvce

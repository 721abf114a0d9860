#pragma once
// The grain of every at::parallel_for of the kernels (frozen_batch_norm's included).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace tvce {
namespace detail {

// at::parallel_for grain for items of about `work` elementary operations each: small problems
// stay on one thread, where a parallel region would cost more than it saves.
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work));
}

} // namespace detail
} // namespace tvce

#pragma once
// NCHW planes <-> pixel-major blocks of V lanes, for the NCHW paths of roi_align and roi_pool
// that run the channels_last loops on a transposed block (NOTE [ transposed NCHW ] in
// roi_schedule.h).
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace tvce {
namespace detail {

// nc planes of HW values -> HW pixels of V lanes (lanes past nc untouched). float uses
// ATen's 16x16 register transposes; other types a loop tiled so that the pixel-major side
// stays in L1.
template <typename T>
inline void planes_to_pixels(const T* planes, int64_t HW, int64_t nc, int64_t V, T* pixels) {
  if constexpr (std::is_same_v<T, float>) {
    at::vec::transpose_mxn<float>(planes, HW, pixels, V, static_cast<int>(nc), static_cast<int>(HW));
    return;
  }
  constexpr int64_t kTile = 64;
  for (int64_t p0 = 0; p0 < HW; p0 += kTile) {
    const int64_t p1 = std::min(HW, p0 + kTile);
    for (int64_t c = 0; c < nc; ++c) {
      const T* src = planes + c * HW;
      for (int64_t p = p0; p < p1; ++p) {
        pixels[p * V + c] = src[p];
      }
    }
  }
}

// The inverse of planes_to_pixels, rounding to the planes' type.
template <typename T, typename U>
inline void pixels_to_planes(const T* pixels, int64_t HW, int64_t nc, int64_t V, U* planes) {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<U, float>) {
    at::vec::transpose_mxn<float>(pixels, V, planes, HW, static_cast<int>(HW), static_cast<int>(nc));
    return;
  }
  constexpr int64_t kTile = 64;
  for (int64_t p0 = 0; p0 < HW; p0 += kTile) {
    const int64_t p1 = std::min(HW, p0 + kTile);
    for (int64_t c = 0; c < nc; ++c) {
      U* dst = planes + c * HW;
      for (int64_t p = p0; p < p1; ++p) {
        dst[p] = static_cast<U>(pixels[p * V + c]);
      }
    }
  }
}

} // namespace detail
} // namespace tvce

// box_iou_rotated for CPU: the pairwise IoU of rotated boxes (cx, cy, w, h, angle in degrees,
// counter-clockwise), torchvision's semantics and float32 output for float32 and float64 boxes.
//
// NOTE [ rotated IoU ]
// The result must be torchvision's within float rounding, and the polygon intersection is full
// of thresholds (an epsilon on the edge parameters, on the projections, on the hull's cross
// products), so this follows the same algorithm step for step, in the boxes' own type:
// - both boxes are moved by the midpoint of their centres (computed in double, as torchvision
//   does) so that the corners of far-away boxes keep their precision;
// - corners from the centre, half-extents and cos/sin of the angle (the angle is converted to
//   radians in double with torchvision's constant, cos/sin rounded to the box type);
// - candidate points: every edge-edge crossing with both parameters in [-eps, 1 + eps], every
//   corner of one box inside the other (projections onto two edges, same eps), at most 24;
// - the convex hull of the candidates (Graham scan: lowest-then-leftmost start, an angular
//   sort by cross product with a 1e-6 tie band broken by distance, pops on a non-left turn);
// - the hull's area by a triangle fan; IoU = inter / (area1 + area2 - inter), 0 if either area
//   is below 1e-14 or the union is, clamped to [0, 1].
// What differs is only what does not change a value: cos/sin of each box's angle are computed
// once per box instead of once per pair (the same expression, so the same bits), and the pairs
// run in parallel (each writes only its own output element).
#include "override.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace tvce {
namespace {

template <typename T>
struct Pt {
  T x, y;
};

template <typename T>
inline Pt<T> operator-(Pt<T> a, Pt<T> b) {
  return {a.x - b.x, a.y - b.y};
}

template <typename T>
inline T dot(Pt<T> a, Pt<T> b) {
  return a.x * b.x + a.y * b.y;
}

template <typename T>
inline T cross(Pt<T> a, Pt<T> b) {
  return a.x * b.y - b.x * a.y;
}

// The degrees-to-radians constant torchvision uses (not M_PI / 180 to full precision: the
// last digits change cos/sin in double, hence float64 results).
constexpr double kDegToRad = 0.01745329251;
constexpr double kEps = 1e-5;  // on edge parameters and projections (see NOTE [ rotated IoU ])
constexpr int kMaxPts = 24;    // 4 x 4 edge crossings + 4 + 4 corners

// Half of cos and sin of one box's angle, rounded to T as torchvision rounds them.
template <typename T>
struct HalfTrig {
  T c, s;
};

template <typename T>
inline HalfTrig<T> half_trig(T angle_deg) {
  const double theta = angle_deg * kDegToRad;
  return {static_cast<T>(std::cos(theta)) * 0.5f, static_cast<T>(std::sin(theta)) * 0.5f};
}

// Corners in order around the box (y down, x right), the last two mirrored through the centre.
template <typename T>
inline void corners(T cx, T cy, T w, T h, HalfTrig<T> t, Pt<T> (&p)[4]) {
  p[0] = {cx + t.s * h + t.c * w, cy + t.c * h - t.s * w};
  p[1] = {cx - t.s * h + t.c * w, cy - t.c * h - t.s * w};
  p[2] = {2 * cx - p[0].x, 2 * cy - p[0].y};
  p[3] = {2 * cx - p[1].x, 2 * cy - p[1].y};
}

// Adds the corners of `a` that lie inside `b` (projections onto b's first and last edges).
template <typename T>
inline void corners_inside(const Pt<T> (&a)[4], const Pt<T> (&b)[4], const Pt<T> (&eb)[4], Pt<T>* out, int& n) {
  const Pt<T> ab = eb[0], da = eb[3];
  const T ab_ab = dot(ab, ab), ad_ad = dot(da, da);
  for (int i = 0; i < 4; ++i) {
    const Pt<T> ap = a[i] - b[0];
    const T along_ab = dot(ap, ab);
    const T along_ad = -dot(ap, da);
    if (along_ab > -kEps && along_ad > -kEps && along_ab < ab_ab + kEps && along_ad < ad_ad + kEps) {
      out[n++] = a[i];
    }
  }
}

// Every candidate vertex of the intersection polygon, duplicates included: a missed vertex
// changes the area a lot, an extra (near-)duplicate does not, hence the eps on every test.
template <typename T>
inline int candidate_points(const Pt<T> (&p1)[4], const Pt<T> (&p2)[4], Pt<T> (&out)[kMaxPts]) {
  Pt<T> e1[4], e2[4];
  for (int i = 0; i < 4; ++i) {
    e1[i] = p1[(i + 1) % 4] - p1[i];
    e2[i] = p2[(i + 1) % 4] - p2[i];
  }
  int n = 0;
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) {
      const T det = cross(e2[j], e1[i]);
      if (std::fabs(det) <= 1e-14) {
        continue;  // parallel edges
      }
      const Pt<T> d = p2[j] - p1[i];
      const T t1 = cross(e2[j], d) / det;
      const T t2 = cross(e1[i], d) / det;
      if (t1 > -kEps && t1 < 1.0f + kEps && t2 > -kEps && t2 < 1.0f + kEps) {
        out[n++] = {p1[i].x + e1[i].x * t1, p1[i].y + e1[i].y * t1};
      }
    }
  }
  corners_inside(p1, p2, e2, out, n);
  corners_inside(p2, p1, e1, out, n);
  return n;
}

// Area of the convex hull of p[0..n) (n >= 3), Graham scan as in NOTE [ rotated IoU ]. The
// hull is kept relative to its start point: only its area is needed.
template <typename T>
inline T hull_area(const Pt<T> (&p)[kMaxPts], int n) {
  int start = 0;
  for (int i = 1; i < n; ++i) {
    if (p[i].y < p[start].y || (p[i].y == p[start].y && p[i].x < p[start].x)) {
      start = i;
    }
  }
  Pt<T> q[kMaxPts];
  T dist[kMaxPts];
  for (int i = 0; i < n; ++i) {
    q[i] = p[i] - p[start];
  }
  std::swap(q[0], q[start]);
  for (int i = 0; i < n; ++i) {
    dist[i] = dot(q[i], q[i]);
  }
  // The selection-style exchange sort torchvision uses: with the tie band, the comparison is
  // not a strict weak order, so a different sort could order near-collinear points otherwise.
  for (int i = 1; i < n - 1; ++i) {
    for (int j = i + 1; j < n; ++j) {
      const T c = cross(q[i], q[j]);
      if (c < -1e-6 || (std::fabs(c) < 1e-6 && dist[i] > dist[j])) {
        std::swap(q[i], q[j]);
        std::swap(dist[i], dist[j]);
      }
    }
  }
  int k = 1;
  while (k < n && dot(q[k], q[k]) <= 1e-8) {
    ++k;
  }
  if (k == n) {
    return 0;  // every candidate is (nearly) the start point
  }
  q[1] = q[k];
  int m = 2;
  for (int i = k + 1; i < n; ++i) {
    while (m > 1) {
      const Pt<T> a = q[i] - q[m - 2], b = q[m - 1] - q[m - 2];
      // The two products compared, not their difference: equal points must compare equal
      // even where a compiler would fuse the difference into an FMA.
      if (a.x * b.y >= b.x * a.y) {
        --m;
      } else {
        break;
      }
    }
    q[m++] = q[i];
  }
  if (m <= 2) {
    return 0;
  }
  T area = 0;
  for (int i = 1; i < m - 1; ++i) {
    area += std::fabs(cross(q[i] - q[0], q[i + 1] - q[0]));
  }
  return area / 2.0;
}

template <typename T>
inline T pair_iou(const T* b1, HalfTrig<T> t1, const T* b2, HalfTrig<T> t2) {
  const T area1 = b1[2] * b1[3];
  const T area2 = b2[2] * b2[3];
  if (area1 < 1e-14 || area2 < 1e-14) {
    return 0;
  }
  const double shift_x = (b1[0] + b2[0]) / 2.0;
  const double shift_y = (b1[1] + b2[1]) / 2.0;
  Pt<T> p1[4], p2[4];
  corners<T>(b1[0] - shift_x, b1[1] - shift_y, b1[2], b1[3], t1, p1);
  corners<T>(b2[0] - shift_x, b2[1] - shift_y, b2[2], b2[3], t2, p2);
  Pt<T> pts[kMaxPts];
  const int n = candidate_points(p1, p2, pts);
  const T inter = n <= 2 ? T(0) : hull_area(pts, n);
  const T uni = area1 + area2 - inter;
  const T iou = uni > 1e-14 ? inter / uni : T(0);
  return std::min<T>(std::max<T>(iou, 0), 1);
}

void check_boxes(const char* name, const at::Tensor& b) {
  TORCH_CHECK(b.device().is_cpu(), "box_iou_rotated: ", name, " must be a CPU tensor, got ", b.device());
  TORCH_CHECK(
      b.dim() == 2 && b.size(1) == 5, "box_iou_rotated: ", name, " must have shape [N, 5] (cx, cy, w, h, angle), got ",
      b.sizes());
  TORCH_CHECK(
      b.scalar_type() == at::kFloat || b.scalar_type() == at::kDouble, "box_iou_rotated: ", name,
      " must be float32 or float64, got ", b.scalar_type());
}

at::Tensor box_iou_rotated(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  check_boxes("boxes1", boxes1);
  check_boxes("boxes2", boxes2);
  TORCH_CHECK(
      boxes1.scalar_type() == boxes2.scalar_type(), "box_iou_rotated: boxes1 and boxes2 must have the same dtype, got ",
      boxes1.scalar_type(), " and ", boxes2.scalar_type());
  const int64_t n1 = boxes1.size(0), n2 = boxes2.size(0);
  // float32 for either input dtype, as torchvision returns.
  at::Tensor out = at::empty({n1, n2}, boxes1.options().dtype(at::kFloat));
  if (n1 == 0 || n2 == 0) {
    return out;
  }
  const at::Tensor a = boxes1.contiguous(), b = boxes2.contiguous();
  float* op = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "box_iou_rotated", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    std::vector<HalfTrig<scalar_t>> ta(n1), tb(n2);
    for (int64_t i = 0; i < n1; ++i) {
      ta[i] = half_trig<scalar_t>(ap[5 * i + 4]);
    }
    for (int64_t j = 0; j < n2; ++j) {
      tb[j] = half_trig<scalar_t>(bp[5 * j + 4]);
    }
    // A pair is a few hundred flops (16 edge crossings, a hull of up to 24 points), so it
    // counts as ~64 of the elementwise operations GRAIN_SIZE is measured in.
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / 64);
    at::parallel_for(0, n1 * n2, grain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t i = k / n2, j = k % n2;
        op[k] = static_cast<float>(pair_iou<scalar_t>(ap + 5 * i, ta[i], bp + 5 * j, tb[j]));
      }
    });
  });
  return out;
}

void register_kernels(torch::Library& m) {
  m.impl("box_iou_rotated", TORCH_FN(box_iou_rotated));
}

const CpuOverride registrar({"box_iou_rotated"}, &register_kernels);

} // namespace
} // namespace tvce

// nms for CPU: exact (the same kept indices as torchvision), vectorized and parallel.
//
// NOTE [ exact nms ]
// torchvision sorts the scores (stably, descending, NaN first) and then, for each kept box in
// that order, suppresses every later box whose IoU with it is > iou_threshold, computing
//     xx1 = std::max(ix1, x1[j]) ... w = std::max(0, xx2 - xx1) ...
//     ovr = inter / (iarea + areas[j] - inter)
// in the boxes' type and comparing the float result with the double threshold. Keeping the
// same indices for every input, ties and NaN included, takes the same order and the same
// arithmetic, operation for operation:
// - the order is a stable radix sort of the scores' bits for float (-0 and +0 tie, every NaN
//   ties and comes first), the same comparison as a std::sort for double;
// - std::max(a, b) is (a < b) ? b : a and std::min(a, b) is (b < a) ? b : a, which is not what
//   at::vec's maximum/minimum do with NaN; the generic code blends on exactly those
//   comparisons, and the AVX-512 code uses vmaxps/vminps with the operands in the order whose
//   definition ("the second operand unless the first is greater/less") is the same thing;
// - no contraction into FMA (the build passes -ffp-contract=off; at::vec's operators are
//   separate multiplies and adds), the same association of the sums, IEEE division;
// - for float boxes, ovr > threshold (in double) equals ovr > t, with t the largest float not
//   above the threshold, so the comparison stays in float lanes without changing any result.
//
// NOTE [ nms speed ]
// The parts, in the order they were added (each one's gain: benchmarks/HISTORY.md):
// - the IoU pairs are almost all of the work, and their cost was not the division but at::vec's
//   AVX-512 comparisons (mask -> vector -> mask on every blend): the AVX-512 pair loop uses
//   vmaxps/vminps and mask registers (Lanes<float>), the generic one blends on std::max's own
//   comparisons;
// - blocks: boxes are taken greedily in blocks in score order (each kept box against the rest
//   of its block), then the block's kept boxes, held in L1, suppress all later boxes, 16 at a
//   time, threads splitting the later boxes (suppression is an OR: the result does not depend
//   on the split). A block holds ~kBlock kept boxes (longer when few are kept: crowded boxes),
//   the later boxes are read once per block instead of once per kept box;
// - pruning: a pair whose boxes do not overlap has inter == 0, and 0 / union > t is false for
//   every t >= 0 (union 0 or NaN gives NaN, a negative union -0). So when t >= 0 and every
//   coordinate is finite, the later boxes are kept in a spatial order (grid cells of ~16 boxes,
//   rows snaking) and each 16-box vector skips the kept boxes that miss its bounding
//   rectangle: "box k misses the rectangle" (k.x2 <= min x1 or k.x1 >= max x2, same for y)
//   gives min(x2) <= max(x1) for every pair inside, hence w == 0, in float too. Dead boxes are
//   compacted away and the rectangles recomputed once a quarter of the boxes died. Otherwise
//   (negative or NaN threshold, NaN/inf coordinates) the same loops run over score order with
//   no skipping;
// - scores are ordered by a radix sort of their bits (score_order; the crowded case's largest
//   fixed cost), a comparison sort below 512 scores.
// Threads: a block's suppression is split only when its estimated work pays for waking the
// other thread (kParallelWork; the IoUs per vector are measured on the previous block, so
// crowded inputs, whose vectors meet one or two kept boxes, stay on one thread). bfloat16/half
// boxes are computed in float (torchvision has no such kernel).
#include "debug_thresholds.h"
#include "override.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

namespace tvce {
namespace {

constexpr int64_t kBlock = 64, kMaxBlock = 512;
constexpr int64_t kBoxesPerCell = 16;
// Work (in vector operations, ~15 per IoU) below which a block's suppression of the later
// boxes stays on one thread: a few times the cost of waking the other threads.
constexpr int64_t kParallelWork = 16384;

// The float threshold equivalent to comparing with the double one (NOTE [ exact nms ]).
template <typename T>
T threshold_as(double t) {
  if constexpr (std::is_same_v<T, double>) {
    return t;
  } else {
    T f = static_cast<T>(t);
    if (static_cast<double>(f) > t) {
      f = std::nextafter(f, -std::numeric_limits<T>::infinity());
    }
    return f;
  }
}

// Boxes as structure of arrays.
template <typename T>
struct Soa {
  std::vector<T> x1, y1, x2, y2, area;
  void resize(int64_t n) {
    for (auto* v : {&x1, &y1, &x2, &y2, &area}) {
      v->resize(n);
    }
  }
  void set(int64_t i, T a, T b, T c, T d, T ar) {
    x1[i] = a;
    y1[i] = b;
    x2[i] = c;
    y2[i] = d;
    area[i] = ar;
  }
  void copy(int64_t to, const Soa& from, int64_t i) {
    set(to, from.x1[i], from.y1[i], from.x2[i], from.y2[i], from.area[i]);
  }
};

// L consecutive boxes in registers, and the IoU test of one box (k) against all of them with
// torchvision's arithmetic. The generic version is at::vec; AVX-512 float is specialised below.
template <typename T>
struct Lanes {
  using Vec = at::vec::Vectorized<T>;
  static constexpr int64_t L = Vec::size();
  Vec x1, y1, x2, y2, area;
  Lanes(const Soa<T>& b, int64_t j)
      : x1(Vec::loadu(&b.x1[j])),
        y1(Vec::loadu(&b.y1[j])),
        x2(Vec::loadu(&b.x2[j])),
        y2(Vec::loadu(&b.y2[j])),
        area(Vec::loadu(&b.area[j])) {}
  // Bit l is set where IoU(k, lane l) > thr.
  uint64_t over(T kx1, T ky1, T kx2, T ky2, T karea, T thr) const {
    const Vec ix1(kx1), iy1(ky1), ix2(kx2), iy2(ky2), zero(T(0));
    const Vec xx1 = Vec::blendv(ix1, x1, ix1 < x1);  // std::max(ix1, x1)
    const Vec yy1 = Vec::blendv(iy1, y1, iy1 < y1);
    const Vec xx2 = Vec::blendv(ix2, x2, x2 < ix2);  // std::min(ix2, x2)
    const Vec yy2 = Vec::blendv(iy2, y2, y2 < iy2);
    const Vec dw = xx2 - xx1, dh = yy2 - yy1;
    const Vec w = Vec::blendv(zero, dw, zero < dw);  // std::max(0, dw)
    const Vec h = Vec::blendv(zero, dh, zero < dh);
    const Vec inter = w * h;
    const Vec ovr = inter / ((Vec(karea) + area) - inter);
    // Bit l of zero_mask() is set where lane l is 0, i.e. where ovr > thr is false.
    return ~static_cast<uint64_t>((ovr > Vec(thr)).zero_mask()) & ((uint64_t(1) << L) - 1);
  }
};

// Bit g set where kept box g (of L at k) may overlap the rectangle [rx1, rx2] x [ry1, ry2]
// (NOTE [ nms speed ]: a box that misses it overlaps none of the boxes inside).
template <typename T>
uint64_t may_overlap(const Soa<T>& k, int64_t g, T rx1, T ry1, T rx2, T ry2) {
  using Vec = at::vec::Vectorized<T>;
  const Vec hit = (Vec::loadu(&k.x2[g]) > Vec(rx1)) & (Vec::loadu(&k.x1[g]) < Vec(rx2)) &
      (Vec::loadu(&k.y2[g]) > Vec(ry1)) & (Vec::loadu(&k.y1[g]) < Vec(ry2));
  return ~static_cast<uint64_t>(hit.zero_mask()) & ((uint64_t(1) << Vec::size()) - 1);
}

#if defined(CPU_CAPABILITY_AVX512)
template <>
struct Lanes<float> {
  static constexpr int64_t L = 16;
  __m512 x1, y1, x2, y2, area;
  Lanes(const Soa<float>& b, int64_t j)
      : x1(_mm512_loadu_ps(&b.x1[j])),
        y1(_mm512_loadu_ps(&b.y1[j])),
        x2(_mm512_loadu_ps(&b.x2[j])),
        y2(_mm512_loadu_ps(&b.y2[j])),
        area(_mm512_loadu_ps(&b.area[j])) {}
  uint64_t over(float kx1, float ky1, float kx2, float ky2, float karea, float thr) const {
    // vmaxps(a, b) is (a > b) ? a : b and vminps(a, b) is (a < b) ? a : b, NaN and signed
    // zeros included: vmaxps(x1, ix1) is std::max(ix1, x1), vminps(x2, ix2) std::min(ix2, x2).
    const __m512 zero = _mm512_setzero_ps();
    const __m512 xx1 = _mm512_max_ps(x1, _mm512_set1_ps(kx1));
    const __m512 yy1 = _mm512_max_ps(y1, _mm512_set1_ps(ky1));
    const __m512 xx2 = _mm512_min_ps(x2, _mm512_set1_ps(kx2));
    const __m512 yy2 = _mm512_min_ps(y2, _mm512_set1_ps(ky2));
    const __m512 w = _mm512_max_ps(_mm512_sub_ps(xx2, xx1), zero);  // std::max(0, dw)
    const __m512 h = _mm512_max_ps(_mm512_sub_ps(yy2, yy1), zero);
    const __m512 inter = _mm512_mul_ps(w, h);
    const __m512 uni = _mm512_sub_ps(_mm512_add_ps(_mm512_set1_ps(karea), area), inter);
    return _mm512_cmp_ps_mask(_mm512_div_ps(inter, uni), _mm512_set1_ps(thr), _CMP_GT_OQ);
  }
};

template <>
uint64_t may_overlap<float>(const Soa<float>& k, int64_t g, float rx1, float ry1, float rx2, float ry2) {
  __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(&k.x2[g]), _mm512_set1_ps(rx1), _CMP_GT_OQ);
  m = _mm512_mask_cmp_ps_mask(m, _mm512_loadu_ps(&k.x1[g]), _mm512_set1_ps(rx2), _CMP_LT_OQ);
  m = _mm512_mask_cmp_ps_mask(m, _mm512_loadu_ps(&k.y2[g]), _mm512_set1_ps(ry1), _CMP_GT_OQ);
  return _mm512_mask_cmp_ps_mask(m, _mm512_loadu_ps(&k.y1[g]), _mm512_set1_ps(ry2), _CMP_LT_OQ);
}
#endif

// Bit l set where dead[l] == 0, l < L. Reads only the L bytes of the vector: the bytes after
// it may belong to another thread's vectors.
inline uint64_t live_lanes(const uint8_t* dead, int64_t L) {
#if defined(__SSE2__)
  if (L == 16) {
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(dead));
    return static_cast<uint64_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(d, _mm_setzero_si128())));
  }
#endif
  uint64_t live = 0;
  for (int64_t l = 0; l < L; ++l) {
    live |= uint64_t(dead[l] == 0) << l;
  }
  return live;
}

// The low min(n, L) bits (L <= 16).
inline uint64_t low_bits(int64_t n, int64_t L) {
  return (uint64_t(1) << std::min(n, L)) - 1;
}

// Ranks of the boxes in torchvision's order (stable descending sort of the scores, NaN first)
// by comparison, the index breaking ties.
template <typename T>
std::vector<int32_t> score_order_by_comparison(const T* sp, int64_t n) {
  std::vector<int32_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [sp](int32_t a, int32_t b) {
    const bool an = std::isnan(sp[a]), bn = std::isnan(sp[b]);
    if (an != bn) {
      return an;
    }
    if (!an && sp[a] != sp[b]) {
      return sp[a] > sp[b];
    }
    return a < b;  // equal scores (and -0 == +0, NaN == NaN) keep index order
  });
  return idx;
}

// The radix key of a float score: unsigned order is descending score order, -0 == +0, every
// NaN equal and first.
inline uint32_t descending_key(float score) {
  uint32_t u = 0xffffffffu;
  if (!std::isnan(score)) {
    const float s = score == 0.0f ? 0.0f : score;
    std::memcpy(&u, &s, sizeof(u));
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // unsigned order == float order
  }
  return ~u;  // ascending ~u is descending u
}

// The same order for float: an LSD radix sort, three 11-bit digits, (key, index) records moving
// as one 64-bit word; faster than the comparison sort for thousands of scores, slower below a
// few hundred (its 3 x 2048 counters).
std::vector<int32_t> score_order(const float* sp, int64_t n) {
  if (n < debug::threshold(debug::kNmsRadixMin, 512)) {
    return score_order_by_comparison(sp, n);
  }
  constexpr int kBits = 11, kDigits = 1 << kBits;
  std::vector<uint64_t> rec(n), tmp(n);
  std::vector<uint32_t> count(3 * kDigits, 0);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = descending_key(sp[i]);
    rec[i] = (uint64_t(key) << 32) | uint64_t(i);
    for (int d = 0; d < 3; ++d) {
      ++count[d * kDigits + ((key >> (d * kBits)) & (kDigits - 1))];
    }
  }
  for (int d = 0; d < 3; ++d) {
    uint32_t* c = count.data() + d * kDigits;
    const int shift = 32 + d * kBits;
    if (c[(rec[0] >> shift) & (kDigits - 1)] == static_cast<uint32_t>(n)) {
      continue;  // every key has this digit: the pass would not move anything
    }
    uint32_t sum = 0;
    for (int v = 0; v < kDigits; ++v) {
      const uint32_t k = c[v];
      c[v] = sum;
      sum += k;
    }
    for (int64_t i = 0; i < n; ++i) {
      tmp[c[(rec[i] >> shift) & (kDigits - 1)]++] = rec[i];
    }
    rec.swap(tmp);
  }
  std::vector<int32_t> idx(n);
  for (int64_t i = 0; i < n; ++i) {
    idx[i] = static_cast<int32_t>(rec[i]);
  }
  return idx;
}

std::vector<int32_t> score_order(const double* sp, int64_t n) {
  return score_order_by_comparison(sp, n);
}

// The buffers of greedy_nms, kept across calls (batched_nms runs one class after another).
template <typename T>
struct Workspace {
  Soa<T> s, p, k;
  std::vector<int32_t> prank, slot_of, cell, start;
  std::vector<uint8_t> dead, supp;
  std::vector<T> rx1, ry1, rx2, ry2;
};

// Greedy nms of n boxes ([n, 4] rows at dp) with scores sp; appends the kept indices to keep
// in score order. NOTE [ exact nms ], NOTE [ nms speed ].
template <typename T>
void greedy_nms(
    const T* dp,
    const T* sp,
    int64_t n,
    double iou_threshold,
    Workspace<T>& ws,
    std::vector<int64_t>& keep) {
  constexpr int64_t L = Lanes<T>::L;
  const std::vector<int32_t> order = score_order(sp, n);
  const T thr = threshold_as<T>(iou_threshold);
  const int64_t parallel_work = debug::threshold(debug::kNmsParallelWork, kParallelWork);
  // Score order (s), padded so that a vector load from any box stays inside.
  const int64_t padded = (n + L - 1) / L * L + L;
  Soa<T>& s = ws.s;
  s.resize(padded);
  bool finite = true;
  T lx = std::numeric_limits<T>::infinity(), ly = lx, hx = -lx, hy = -lx;  // extent of the corners
  for (int64_t r = 0; r < n; ++r) {
    const T* b = dp + 4 * order[r];
    s.set(r, b[0], b[1], b[2], b[3], (b[2] - b[0]) * (b[3] - b[1]));  // area as torchvision
    finite = finite && std::isfinite(b[0]) && std::isfinite(b[1]) && std::isfinite(b[2]) && std::isfinite(b[3]);
    lx = std::min(lx, b[0]);
    hx = std::max(hx, b[0]);
    ly = std::min(ly, b[1]);
    hy = std::max(hy, b[1]);
  }
  const bool prune = finite && thr >= T(0);

  // Later boxes in spatial order (p): slot q holds rank prank[q]; slot_of maps back (-1 once
  // compacted away). Padding slots are dead.
  Soa<T>& p = ws.p;
  p.resize(padded);
  std::vector<int32_t>& prank = ws.prank;
  std::vector<int32_t>& slot_of = ws.slot_of;
  std::vector<uint8_t>& dead = ws.dead;
  prank.assign(padded, -1);
  slot_of.resize(n);
  dead.assign(padded, 1);
  const auto place = [&](int64_t r, int64_t q) {
    p.copy(q, s, r);
    prank[q] = static_cast<int32_t>(r);
    slot_of[r] = static_cast<int32_t>(q);
    dead[q] = 0;
  };
  if (prune && n > kBlock) {
    // Grid cells of ~kBoxesPerCell top-left corners, rows snaking so that consecutive cells
    // are neighbours; a counting sort keeps score order within a cell. (double: the extent of
    // finite floats may overflow float.)
    const int64_t g = std::max<int64_t>(1, static_cast<int64_t>(std::sqrt(double(n) / kBoxesPerCell)));
    const double cx = hx > lx ? g / (double(hx) - lx) : 0.0, cy = hy > ly ? g / (double(hy) - ly) : 0.0;
    std::vector<int32_t>& cell = ws.cell;
    std::vector<int32_t>& start = ws.start;
    cell.resize(n);
    start.assign(g * g + 1, 0);
    // In [0, g); a double extent can overflow to inf (then NaN or inf here): clamped.
    const auto index = [g](double t) { return t >= 0 && t < g ? static_cast<int64_t>(t) : (t >= g ? g - 1 : 0); };
    for (int64_t r = 0; r < n; ++r) {
      const int64_t iy = index((double(s.y1[r]) - ly) * cy);
      int64_t ix = index((double(s.x1[r]) - lx) * cx);
      ix = (iy & 1) ? g - 1 - ix : ix;
      cell[r] = static_cast<int32_t>(iy * g + ix);
      ++start[cell[r] + 1];
    }
    std::partial_sum(start.begin(), start.end(), start.begin());
    for (int64_t r = 0; r < n; ++r) {
      place(r, start[cell[r]]++);
    }
  } else {
    for (int64_t r = 0; r < n; ++r) {
      place(r, r);
    }
  }
  int64_t slots = n;
  // Bounding rectangle of each vector's live boxes (when pruning).
  std::vector<T>& rx1 = ws.rx1;
  std::vector<T>& ry1 = ws.ry1;
  std::vector<T>& rx2 = ws.rx2;
  std::vector<T>& ry2 = ws.ry2;
  for (auto* v : {&rx1, &ry1, &rx2, &ry2}) {
    v->resize(padded / L);
  }
  const auto rectangles = [&] {
    for (int64_t v = 0; v * L < slots; ++v) {
      const int64_t q1 = std::min(slots, v * L + L);
      rx1[v] = *std::min_element(&p.x1[v * L], &p.x1[q1]);
      ry1[v] = *std::min_element(&p.y1[v * L], &p.y1[q1]);
      rx2[v] = *std::max_element(&p.x2[v * L], &p.x2[q1]);
      ry2[v] = *std::max_element(&p.y2[v * L], &p.y2[q1]);
    }
  };
  const auto compact = [&] {  // live slots keep their order
    int64_t w = 0;
    for (int64_t q = 0; q < slots; ++q) {
      if (!dead[q]) {
        p.copy(w, p, q);
        prank[w] = prank[q];
        slot_of[prank[w]] = static_cast<int32_t>(w);
        dead[w] = 0;
        ++w;
      } else if (prank[q] >= 0) {
        slot_of[prank[q]] = -1;  // q itself is not yet overwritten: w <= q
      }
    }
    std::fill(dead.begin() + w, dead.begin() + slots, uint8_t(1));
    slots = w;
    if (prune) {
      rectangles();
    }
  };
  if (prune) {
    rectangles();
  }

  std::vector<uint8_t>& supp = ws.supp;  // by rank
  supp.assign(padded, 0);
  Soa<T>& k = ws.k;  // the block's kept boxes
  k.resize(kMaxBlock + L);
  std::atomic<int64_t> died{0};
  int64_t block = kBlock;
  double ious_per_vector = 0.0;  // per kept box, for the grain only: the first block measures it
  for (int64_t b0 = 0, b1 = 0; b0 < n; b0 = b1) {
    b1 = std::min(n, b0 + block);
    int64_t kept = 0;
    for (int64_t r = b0; r < b1; ++r) {
      if (supp[r]) {
        continue;
      }
      keep.push_back(order[r]);
      k.copy(kept++, s, r);
      for (int64_t j = r + 1; j < b1; j += L) {
        uint64_t kill = Lanes<T>(s, j).over(s.x1[r], s.y1[r], s.x2[r], s.y2[r], s.area[r], thr) & low_bits(b1 - j, L);
        for (; kill != 0; kill &= kill - 1) {
          supp[j + __builtin_ctzll(kill)] = 1;
        }
      }
    }
    for (int64_t r = b0; r < b1; ++r) {
      if (slot_of[r] >= 0) {
        dead[slot_of[r]] = 1;
      }
    }
    died += b1 - b0;
    // The next block holds ~kBlock kept boxes if it keeps as many as this one (crowded boxes:
    // few kept, so longer blocks and fewer passes over the later boxes).
    block = std::clamp<int64_t>(kBlock * (b1 - b0) / std::max<int64_t>(kept, 1), kBlock, kMaxBlock);
    if (b1 == n || kept == 0) {
      continue;
    }
    // Per vector: the IoUs (~15 operations each) with the kept boxes, or when pruning one
    // rectangle test per L kept boxes plus the IoUs of those that pass: as many per vector and
    // kept box as in the previous block (the first block stays on one thread to measure it).
    const int64_t vectors = (slots + L - 1) / L;
    const int64_t ious = prune ? static_cast<int64_t>(std::ceil(ious_per_vector * kept)) : kept;
    const int64_t work = 15 * ious + (prune ? 4 * ((kept + L - 1) / L) : 0) + 10;
    const int64_t grain = std::max<int64_t>(1, parallel_work / work);
    std::atomic<int64_t> computed{0};
    at::parallel_for(0, vectors, grain, [&](int64_t v0, int64_t v1) {
      int64_t killed = 0, done = 0;
      for (int64_t v = v0; v < v1; ++v) {
        const int64_t q0 = v * L;
        const uint64_t live = live_lanes(&dead[q0], L);
        if (live == 0) {
          continue;
        }
        const Lanes<T> lanes(p, q0);
        uint64_t kill = 0;
        for (int64_t g = 0; g < kept; g += L) {
          // Lanes past `kept` hold earlier blocks' boxes (or zeros): masked off.
          uint64_t cand = prune ? may_overlap(k, g, rx1[v], ry1[v], rx2[v], ry2[v]) : ~uint64_t(0);
          for (cand &= low_bits(kept - g, L); cand != 0; cand &= cand - 1) {
            const int64_t i = g + __builtin_ctzll(cand);
            kill |= lanes.over(k.x1[i], k.y1[i], k.x2[i], k.y2[i], k.area[i], thr);
            ++done;
          }
        }
        for (kill &= live; kill != 0; kill &= kill - 1) {
          const int64_t q = q0 + __builtin_ctzll(kill);
          supp[prank[q]] = 1;
          dead[q] = 1;
          ++killed;
        }
      }
      died += killed;
      computed += done;
    });
    ious_per_vector = double(computed) / double(vectors) / double(kept);
    if (died * 4 > slots) {
      compact();
      died = 0;
    }
  }
}

void check_boxes_and_scores(const at::Tensor& dets, const at::Tensor& scores) {
  TORCH_CHECK(
      dets.device().is_cpu() && scores.device().is_cpu(), "nms: boxes and scores must be CPU tensors, got ",
      dets.device(), " and ", scores.device());
  TORCH_CHECK(dets.dim() == 2 && dets.size(1) == 4, "nms: boxes must have shape [N, 4], got ", dets.sizes());
  TORCH_CHECK(scores.dim() == 1, "nms: scores must have shape [N], got ", scores.sizes());
  TORCH_CHECK(
      dets.size(0) == scores.size(0), "nms: boxes and scores must have the same length, got ", dets.size(0), " and ",
      scores.size(0));
  TORCH_CHECK(
      dets.scalar_type() == scores.scalar_type(), "nms: boxes and scores must have the same dtype, got ",
      dets.scalar_type(), " and ", scores.scalar_type());
  const auto dt = dets.scalar_type();
  TORCH_CHECK(
      dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
      "nms: boxes must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(
      dets.size(0) < std::numeric_limits<int32_t>::max(), "nms: at most 2^31 - 2 boxes, got ", dets.size(0));
}

// float64 stays double; float32, bfloat16 and half are computed in float.
at::Tensor as_computed(const at::Tensor& t) {
  return (t.scalar_type() == at::kDouble ? t : t.to(at::kFloat)).contiguous();
}

at::Tensor nms(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold) {
  check_boxes_and_scores(dets, scores);
  std::vector<int64_t> keep;
  if (dets.size(0) > 0) {
    const at::Tensor d = as_computed(dets), s = as_computed(scores);
    AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "nms", [&] {
      Workspace<scalar_t> ws;
      greedy_nms<scalar_t>(
          d.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), d.size(0), iou_threshold, ws, keep);
    });
  }
  at::Tensor out = at::empty({static_cast<int64_t>(keep.size())}, dets.options().dtype(at::kLong));
  std::copy(keep.begin(), keep.end(), out.data_ptr<int64_t>());
  return out;
}

// torchvision's _batched_nms_vanilla in one call. It runs nms on each class on its own, sets a
// keep mask, and returns the kept indices ordered by scores[kept].sort(descending=True), an
// unstable sort. Here the classes' members are listed in index order (as torch.where gives
// them), the classes run in parallel (each writes only its own boxes' entries), and the kept
// indices are ordered by the radix key when no two kept scores tie (then every correct sort
// gives that order); with ties the same at::sort call orders them as torchvision's does.
at::Tensor batched_nms(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs, double iou_threshold) {
  constexpr const char* op = "batched_nms";
  check_boxes_and_scores(boxes, scores);
  TORCH_CHECK(
      idxs.dim() == 1 && idxs.size(0) == scores.size(0) && !at::isFloatingType(idxs.scalar_type()), op,
      ": idxs must be an integer tensor of shape [N] = [", scores.size(0), "], got ", idxs.scalar_type(), " ",
      idxs.sizes());
  const int64_t n = scores.size(0);
  const auto index_options = scores.options().dtype(at::kLong);
  if (n == 0) {
    return at::empty({0}, index_options);
  }
  const at::Tensor idx = idxs.to(at::kLong).contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  // Members grouped by class, in index order within a class: a stable sort by class, counting
  // when the classes span a small range (class ids), by comparison otherwise.
  std::vector<int32_t> members(n);
  const auto [lo, hi] = std::minmax_element(ip, ip + n);
  if (static_cast<uint64_t>(*hi) - static_cast<uint64_t>(*lo) < static_cast<uint64_t>(4 * n + 1024)) {
    std::vector<int32_t> start(*hi - *lo + 2, 0);
    for (int64_t i = 0; i < n; ++i) {
      ++start[ip[i] - *lo + 1];
    }
    std::partial_sum(start.begin(), start.end(), start.begin());
    for (int64_t i = 0; i < n; ++i) {
      members[start[ip[i] - *lo]++] = static_cast<int32_t>(i);
    }
  } else {
    std::iota(members.begin(), members.end(), 0);
    std::stable_sort(members.begin(), members.end(), [ip](int32_t a, int32_t b) { return ip[a] < ip[b]; });
  }
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < n; ++i) {
    if (i == 0 || ip[members[i]] != ip[members[i - 1]]) {
      starts.push_back(i);
    }
  }
  starts.push_back(n);
  const at::Tensor d = as_computed(boxes), s = as_computed(scores);
  std::vector<uint8_t> mask(n, 0);
  const int64_t groups = static_cast<int64_t>(starts.size()) - 1;
  // Per class ~size^2 / 16 IoU vectors plus its sort.
  const int64_t size = n / groups;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (size * size / 16 + 8 * size));
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "batched_nms", [&] {
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
      std::vector<scalar_t> cb, cs;
      std::vector<int64_t> keep;
      Workspace<scalar_t> ws;
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t m = starts[g + 1] - starts[g];
        const int32_t* mem = members.data() + starts[g];
        cb.resize(4 * m);
        cs.resize(m);
        for (int64_t i = 0; i < m; ++i) {
          std::copy(dp + 4 * mem[i], dp + 4 * mem[i] + 4, cb.data() + 4 * i);
          cs[i] = sp[mem[i]];
        }
        keep.clear();
        greedy_nms<scalar_t>(cb.data(), cs.data(), m, iou_threshold, ws, keep);
        for (const int64_t i : keep) {
          mask[mem[i]] = 1;
        }
      }
    });
  });
  // keep_indices = torch.where(keep_mask)[0]
  std::vector<int64_t> kept;
  for (int64_t i = 0; i < n; ++i) {
    if (mask[i]) {
      kept.push_back(i);
    }
  }
  const int64_t nk = static_cast<int64_t>(kept.size());
  // keep_indices[scores[keep_indices].sort(descending=True)[1]], in the scores' own dtype.
  const at::Tensor kept_scores = scores.index_select(0, at::from_blob(kept.data(), {nk}, at::kLong));
  const at::Tensor ks = kept_scores.to(at::kFloat);
  const float* kp = ks.const_data_ptr<float>();
  bool ties = scores.scalar_type() == at::kDouble;  // float keys could tie distinct doubles
  std::vector<int32_t> order;
  if (!ties) {
    order = score_order(kp, nk);
    for (int64_t i = 1; i < nk && !ties; ++i) {
      ties = descending_key(kp[order[i]]) == descending_key(kp[order[i - 1]]);
    }
  }
  at::Tensor out = at::empty({nk}, index_options);
  int64_t* out_p = out.data_ptr<int64_t>();
  if (ties) {
    const at::Tensor by_score = std::get<1>(kept_scores.sort(0, /*descending=*/true));
    const int64_t* bp = by_score.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < nk; ++i) {
      out_p[i] = kept[bp[i]];
    }
  } else {
    for (int64_t i = 0; i < nk; ++i) {
      out_p[i] = kept[order[i]];
    }
  }
  return out;
}

void register_kernels(torch::Library& m) {
  m.impl("nms", TORCH_FN(nms));
}

const CpuOverride registrar({"nms"}, &register_kernels);

} // namespace
} // namespace tvce

TORCH_LIBRARY_FRAGMENT(torchvision_cpu_ext, m) {
  m.def("_batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchvision_cpu_ext, CPU, m) {
  m.impl("_batched_nms", TORCH_FN(tvce::batched_nms));
}

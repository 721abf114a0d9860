"""Float64 pure-Python references of the ops, written from torchvision's CPU kernels.

Deliberately naive (one sample at a time) so that they are easy to check by eye.
"""

from __future__ import annotations

import math

import torch


def _bilinear(plane: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """torchvision's bilinear_interpolate on a [C, H, W] float64 tensor; zeros outside."""
    C, H, W = plane.shape
    if y < -1.0 or y > H or x < -1.0 or x > W or H == 0 or W == 0:
        return plane.new_zeros(C)
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= H - 1:
        y_high = y_low = H - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= W - 1:
        x_high = x_low = W - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * plane[:, y_low, x_low]
        + hy * lx * plane[:, y_low, x_high]
        + ly * hx * plane[:, y_high, x_low]
        + ly * lx * plane[:, y_high, x_high]
    )


def roi_align(
    input: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    x = input.double()
    r = rois.double()
    K, C = r.shape[0], x.shape[1]
    out = x.new_zeros(K, C, pooled_height, pooled_width)
    offset = 0.5 if aligned else 0.0
    for k in range(K):
        b = int(r[k, 0])
        x1, y1, x2, y2 = (float(v) * spatial_scale - offset for v in r[k, 1:])
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            continue  # a non-finite box samples nothing (torchvision: zeros, or a crash)
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / pooled_height, roi_w / pooled_width
        gh = sampling_ratio if sampling_ratio > 0 else max(math.ceil(roi_h / pooled_height), 0)
        gw = sampling_ratio if sampling_ratio > 0 else max(math.ceil(roi_w / pooled_width), 0)
        count = max(gh * gw, 1)
        for ph in range(pooled_height):
            for pw in range(pooled_width):
                acc = x.new_zeros(C)
                for iy in range(gh):
                    yy = y1 + ph * bin_h + (iy + 0.5) * bin_h / gh
                    for ix in range(gw):
                        xx = x1 + pw * bin_w + (ix + 0.5) * bin_w / gw
                        acc += _bilinear(x[b], yy, xx)
                out[k, :, ph, pw] = acc / count
    return out


def _acc(dtype: torch.dtype):
    """The scalar type torchvision's (and our) geometry is computed in for an input dtype."""
    import numpy as np

    return np.float64 if dtype == torch.float64 else np.float32


def _round_half_away(v) -> int:
    """std::round (half away from zero) of a float32/float64 value, exactly."""
    v = float(v)
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def _pool_axis(lo, hi, extent_plus: int, bins: int, clip: int, T) -> list[tuple[int, int]]:
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        return [(0, 0)] * bins
    start, end = _round_half_away(lo), _round_half_away(hi)
    extent = max(end - start + extent_plus, 1)
    size = T(extent) / T(bins)
    out = []
    for p in range(bins):
        a = int(math.floor(T(p) * size))
        b = int(math.ceil(T(p + 1) * size))
        out.append((min(max(a + start, 0), clip), min(max(b + start, 0), clip)))
    return out


def _pool_bins(roi, scale: float, ph: int, pw: int, extent_plus: int, clip_h: int, clip_w: int, T):
    r = [T(float(v)) for v in roi]
    s = T(scale)
    rows = _pool_axis(r[2] * s, r[4] * s, extent_plus, ph, clip_h, T)
    cols = _pool_axis(r[1] * s, r[3] * s, extent_plus, pw, clip_w, T)
    return int(float(r[0])), rows, cols


def roi_pool(input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, ph: int, pw: int):
    """torchvision's roi_pool: (max, int32 argmax) with its scan order and empty-bin rules."""
    T = _acc(input.dtype)
    x = input.double()
    N, C, H, W = x.shape
    K = rois.shape[0]
    out = x.new_zeros(K, C, ph, pw)
    arg = torch.full((K, C, ph, pw), -1, dtype=torch.int32)
    flt_max = float(torch.finfo(torch.float32).max)
    for k in range(K):
        b, rows, cols = _pool_bins(rois[k].tolist(), spatial_scale, ph, pw, 1, H, W, T)
        for i, (h0, h1) in enumerate(rows):
            for j, (w0, w1) in enumerate(cols):
                if h1 <= h0 or w1 <= w0:
                    continue  # empty bin: 0 and -1
                # torchvision scans rows, then columns, and keeps a value only if it is greater
                # than the running maximum (which starts at -FLT_MAX): so NaN and values <=
                # -FLT_MAX are never taken, and of equal maxima the first in scan order wins.
                v = x[b, :, h0:h1, w0:w1].reshape(C, -1)
                pos = (torch.arange(h0, h1)[:, None] * W + torch.arange(w0, w1)[None, :]).reshape(-1)
                taken = v > -flt_max
                m = torch.where(taken, v, -math.inf).amax(1)
                first = torch.where(taken & (v == m[:, None]), torch.arange(v.shape[1]), v.shape[1]).amin(1)
                found = first < v.shape[1]
                out[k, :, i, j] = torch.where(found, m, -flt_max)
                arg[k, :, i, j] = torch.where(found, pos[first.clamp(max=v.shape[1] - 1)], -1).int()
    return out, arg


def ps_roi_pool(input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, ph: int, pw: int) -> torch.Tensor:
    """torchvision's ps_roi_pool forward (bins clipped to H - 1, W - 1: the last row and column
    are never pooled)."""
    T = _acc(input.dtype)
    x = input.double()
    N, C, H, W = x.shape
    c_out = C // (ph * pw)
    out = x.new_zeros(rois.shape[0], c_out, ph, pw)
    for k in range(rois.shape[0]):
        b, rows, cols = _pool_bins(rois[k].tolist(), spatial_scale, ph, pw, 0, H - 1, W - 1, T)
        for co in range(c_out):
            for i, (h0, h1) in enumerate(rows):
                for j, (w0, w1) in enumerate(cols):
                    if h1 <= h0 or w1 <= w0:
                        continue
                    c_in = (co * ph + i) * pw + j
                    out[k, co, i, j] = x[b, c_in, h0:h1, w0:w1].sum() / ((h1 - h0) * (w1 - w0))
    return out


def ps_roi_align(
    input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, ph: int, pw: int, sampling_ratio: int
) -> torch.Tensor:
    """torchvision's ps_roi_align: always half-pixel aligned, no minimum size, an empty adaptive
    grid divides by zero."""
    x = input.double()
    r = rois.double()
    C = x.shape[1]
    c_out = C // (ph * pw)
    out = x.new_zeros(r.shape[0], c_out, ph, pw)
    for k in range(r.shape[0]):
        b = int(r[k, 0])
        x1, y1, x2, y2 = (float(v) * spatial_scale - 0.5 for v in r[k, 1:])
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            continue
        roi_w, roi_h = x2 - x1, y2 - y1
        bin_h, bin_w = roi_h / ph, roi_w / pw
        # Inverted boxes give negative grid sizes: no samples, but torchvision's count is still
        # their product (so 0 / negative = -0, and a zero count gives NaN).
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / ph)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pw)
        for i in range(ph):
            for j in range(pw):
                acc = x.new_zeros(C)
                for iy in range(gh):
                    yy = y1 + i * bin_h + (iy + 0.5) * bin_h / gh
                    for ix in range(gw):
                        xx = x1 + j * bin_w + (ix + 0.5) * bin_w / gw
                        acc += _bilinear(x[b], yy, xx)
                for co in range(c_out):
                    c_in = (co * ph + i) * pw + j
                    out[k, co, i, j] = acc[c_in] / (gh * gw) if gh * gw else float("nan")
    return out


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision's nms, one pair at a time, in the boxes' own float type (numpy scalars round
    every operation to float32 as the C++ does); bf16/fp16 boxes are computed in float32."""
    import numpy as np

    T = np.float64 if boxes.dtype == torch.float64 else np.float32
    tdt = torch.float64 if T is np.float64 else torch.float32
    b = boxes.to(tdt).numpy()
    s = scores.to(tdt)
    order = torch.sort(s, descending=True, stable=True).indices.tolist()
    x1, y1, x2, y2 = (b[:, k] for k in range(4))
    areas = (x2 - x1) * (y2 - y1)

    def mx(a, c):  # std::max(a, c)
        return c if a < c else a

    def mn(a, c):  # std::min(a, c)
        return c if c < a else a

    suppressed = [False] * len(order)
    keep = []
    with np.errstate(all="ignore"):
        for pos, i in enumerate(order):
            if suppressed[i]:
                continue
            keep.append(i)
            for j in order[pos + 1 :]:
                if suppressed[j]:
                    continue
                w = mx(T(0), mn(x2[i], x2[j]) - mx(x1[i], x1[j]))
                h = mx(T(0), mn(y2[i], y2[j]) - mx(y1[i], y1[j]))
                inter = w * h
                ovr = inter / (areas[i] + areas[j] - inter)
                if float(ovr) > iou_threshold:
                    suppressed[j] = True
    return torch.tensor(keep, dtype=torch.int64)


def nms_rows(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """The same as nms above, one kept box against all later boxes at a time: numpy rounds each
    elementwise operation to the boxes' type and np.where(a < c, c, a) is std::max(a, c), NaN
    included, so it is exact and fast enough for thousands of boxes."""
    import numpy as np

    T = np.float64 if boxes.dtype == torch.float64 else np.float32
    tdt = torch.float64 if T is np.float64 else torch.float32
    order = torch.sort(scores.to(tdt), descending=True, stable=True).indices
    b = boxes.to(tdt)[order].numpy()
    x1, y1, x2, y2 = (b[:, k] for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    alive = np.ones(len(order), dtype=bool)
    keep = []
    with np.errstate(all="ignore"):
        for i in range(len(order)):
            if not alive[i]:
                continue
            keep.append(int(order[i]))
            xx1 = np.where(x1[i] < x1[i + 1 :], x1[i + 1 :], x1[i])
            yy1 = np.where(y1[i] < y1[i + 1 :], y1[i + 1 :], y1[i])
            xx2 = np.where(x2[i + 1 :] < x2[i], x2[i + 1 :], x2[i])
            yy2 = np.where(y2[i + 1 :] < y2[i], y2[i + 1 :], y2[i])
            dw, dh = xx2 - xx1, yy2 - yy1
            w = np.where(T(0) < dw, dw, T(0))
            h = np.where(T(0) < dh, dh, T(0))
            inter = w * h
            ovr = inter / (areas[i] + areas[i + 1 :] - inter)
            alive[i + 1 :] &= ~(ovr.astype(np.float64) > iou_threshold)
    return torch.tensor(keep, dtype=torch.int64)


def _rotated_corners(box) -> list[tuple[float, float]]:
    """Corners of a (cx, cy, w, h, degrees) box. The angle turns the box counter-clockwise
    on an image (y down), i.e. clockwise in x-right/y-up axes: the w axis is (cos, -sin). The
    corners are listed counter-clockwise in x-right/y-up axes (a rotation keeps that order)."""
    cx, cy, w, h, a = (float(v) for v in box)
    c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
    return [
        (cx + c * u + s * v, cy - s * u + c * v)
        for u, v in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))
    ]


def _clip(poly: list[tuple[float, float]], a: tuple[float, float], b: tuple[float, float]) -> list[tuple[float, float]]:
    """Sutherland-Hodgman: the part of `poly` left of the directed line a -> b."""

    def side(p):
        return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])

    out = []
    for i, p in enumerate(poly):
        q = poly[(i + 1) % len(poly)]
        sp, sq = side(p), side(q)
        if sp >= 0:
            out.append(p)
        if (sp >= 0) != (sq >= 0):
            t = sp / (sp - sq)
            out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return out


def _area(poly: list[tuple[float, float]]) -> float:
    n = len(poly)
    return abs(sum(poly[i][0] * poly[(i + 1) % n][1] - poly[(i + 1) % n][0] * poly[i][1] for i in range(n))) / 2


def box_iou_rotated(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of rotated boxes by another algorithm than torchvision's (clipping one box
    by the other's edges instead of a hull of candidate points), in float64; 0 when either
    box has (nearly) no area, as torchvision returns."""
    out = torch.zeros(boxes1.shape[0], boxes2.shape[0], dtype=torch.float64)
    for i, b1 in enumerate(boxes1.double()):
        for j, b2 in enumerate(boxes2.double()):
            a1, a2 = float(b1[2] * b1[3]), float(b2[2] * b2[3])
            if a1 < 1e-14 or a2 < 1e-14:
                continue
            poly = _rotated_corners(b1)
            c2 = _rotated_corners(b2)
            for k in range(4):
                if not poly:
                    break
                poly = _clip(poly, c2[k], c2[(k + 1) % 4])
            inter = _area(poly) if len(poly) >= 3 else 0.0
            out[i, j] = inter / (a1 + a2 - inter)
    return out


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """torchvision.ops.deform_conv2d in float64 with whole-tensor torch ops (differentiable: its
    autograd gradients are those of the forward, NOTE [ deform_conv2d gradients ]).

    A sample at (y, x) outside (-1, H) x (-1, W) reads 0; inside, its bilinear neighbours
    outside the image read 0."""
    x, off, w = input.double(), offset.double(), weight.double()
    N, C, H, W = x.shape
    C_out, C_in_g, kh, kw = w.shape
    G, K = C // C_in_g, kh * kw
    OG = off.shape[1] // (2 * K)
    OH, OW = off.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    off = off.view(N, OG, K, 2, OH, OW)
    tap_y = (torch.arange(kh) * dh).repeat_interleave(kw).view(K, 1, 1)
    tap_x = (torch.arange(kw) * dw).repeat(kh).view(K, 1, 1)
    y = (torch.arange(OH).view(OH, 1) * sh - ph + tap_y).double() + off[:, :, :, 0]  # [N, OG, K, OH, OW]
    xx = (torch.arange(OW).view(1, OW) * sw - pw + tap_x).double() + off[:, :, :, 1]
    inside = (y > -1) & (y < H) & (xx > -1) & (xx < W)
    y0, x0 = torch.floor(y).detach(), torch.floor(xx).detach()
    ly, lx = y - y0, xx - x0
    planes = x.reshape(N, OG, C // OG, H * W)

    def neighbour(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        valid = inside & (yi >= 0) & (yi <= H - 1) & (xi >= 0) & (xi <= W - 1)
        idx = (yi.clamp(0, max(H - 1, 0)) * W + xi.clamp(0, max(W - 1, 0))).long().view(N, OG, 1, -1)
        vals = torch.gather(planes, 3, idx.expand(N, OG, C // OG, idx.shape[-1]))
        return vals.view(N, OG, C // OG, K, OH, OW) * valid.unsqueeze(2)

    def b(t: torch.Tensor) -> torch.Tensor:  # [N, OG, K, OH, OW] -> broadcast over channels
        return t.unsqueeze(2)

    val = (
        b((1 - ly) * (1 - lx)) * neighbour(y0, x0)
        + b((1 - ly) * lx) * neighbour(y0, x0 + 1)
        + b(ly * (1 - lx)) * neighbour(y0 + 1, x0)
        + b(ly * lx) * neighbour(y0 + 1, x0 + 1)
    )
    if mask is not None:
        val = val * mask.double().view(N, OG, 1, K, OH, OW)
    cols = val.reshape(N, G, C_in_g * K, OH * OW)
    out = torch.einsum("gok,ngkp->ngop", w.reshape(G, C_out // G, C_in_g * K), cols).reshape(N, C_out, OH, OW)
    if bias is not None:
        out = out + bias.double().view(1, C_out, 1, 1)
    return out

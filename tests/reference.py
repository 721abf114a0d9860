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

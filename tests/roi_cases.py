"""Inputs shared by the RoI op tests: a small feature map and boxes that cover the awkward cases."""

from __future__ import annotations

import torch

N, C, H, W = 2, 5, 11, 13
SCALE = 0.5  # boxes are given in image coordinates, twice the feature map
POOLED = (3, 4)

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def make_rois(K: int = 14, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random boxes, many partly or fully outside the image, plus the awkward ones."""
    g = torch.Generator().manual_seed(seed)
    img_w, img_h = W / SCALE, H / SCALE
    b = torch.randint(0, N, (K, 1), generator=g).double()
    xy = torch.rand(K, 2, generator=g, dtype=torch.float64) * torch.tensor([img_w, img_h]) * 1.4 - 4
    wh = torch.rand(K, 2, generator=g, dtype=torch.float64) * torch.tensor([img_w, img_h]) * 0.8
    boxes = torch.cat([b, xy, xy + wh], 1)
    special = torch.tensor(
        [
            [0, 3.0, 3.0, 3.0, 3.0],  # degenerate: a point
            [1, 10.0, 4.0, 10.0, 20.0],  # degenerate: a vertical segment
            [1, 20.0, 15.0, 6.0, 2.0],  # inverted
            [0, -60.0, -50.0, -20.0, -10.0],  # fully outside, above-left
            [1, img_w + 5, img_h + 5, img_w + 40, img_h + 40],  # fully outside, below-right
            [0, -10.0, -10.0, img_w + 10, img_h + 10],  # covers the whole map and more
            [1, img_w - 1.0, img_h - 1.0, img_w + 1.0, img_h + 1.0],  # on the far corner
            [0, 0.0, 0.0, img_w, img_h],  # exactly the image
        ],
        dtype=torch.float64,
    )
    return torch.cat([boxes, special]).to(dtype)


def make_input(
    dtype: torch.dtype, layout: str, contiguous: bool, seed: int = 1, channels: int | None = None
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = C if channels is None else channels
    x = torch.randn(N, c, H, W, generator=g, dtype=torch.float64).to(dtype)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    if contiguous:
        return x.contiguous(memory_format=fmt)
    # The same values as a strided view (in either layout) of a wider tensor.
    wide = torch.full((N, c, H, W + 3), float("nan"), dtype=dtype).contiguous(memory_format=fmt)
    wide[..., 1 : W + 1] = x
    view = wide[..., 1 : W + 1]
    assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
    return view


LAYOUTS = ["nchw", "channels_last"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def expected_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def large_map_case(
    channels: int, K: int = 60, seed: int = 3, n: int = 2, h: int = 100, w: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """An [n, channels, h, w] map (by default several of the row bands (1-1.5 MiB here) that
    channels_last backwards fill in turn) and boxes over all of it, many crossing band borders."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, h, w, generator=g)
    img = torch.tensor([w / SCALE, h / SCALE])
    xy = torch.rand(K, 2, generator=g) * img * 1.1 - 8
    wh = torch.rand(K, 2, generator=g) * img * 0.7
    b = torch.randint(0, n, (K, 1), generator=g).float()
    return x, torch.cat([b, xy, xy + wh], 1)


def inf_border_case(channels: int, dtype: torch.dtype, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A map whose first row and first column are inf, and boxes that never sample them: no
    output may be non-finite (a kernel that reads pixels outside a bin, even with zero weight,
    gets 0 * inf = NaN there)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, channels, H, W, generator=g).to(dtype)
    x[:, :, 0, :] = float("inf")
    x[:, :, :, 0] = float("inf")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    # In image coordinates (SCALE 0.5): every sample point and tap lies in rows and columns >= 2.
    rois = torch.tensor(
        [[0, 5.3, 6.1, 20.2, 17.7], [1, 8.0, 8.0, 12.5, 19.0], [0, 7.0, 5.5, 7.5, 6.0], [1, 14.0, 9.0, 24.0, 21.0]],
        dtype=dtype,
    )
    return x.contiguous(memory_format=fmt), rois


def ps_layout_case(c_out: int, n_images: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A [n_images, c_out * 3 * 4, 37, 29] map (for POOLED) with boxes over all of it plus the
    degenerate, inverted and outside ones of make_rois; with 3 images the last gets no box."""
    x, rois = large_map_case(c_out * POOLED[0] * POOLED[1], K=25, n=n_images, h=37, w=29)
    rois[:, 0] = rois[:, 0].clamp(max=max(n_images - 2, 0))
    rois = torch.cat([rois, make_rois(K=6)[-8:]])
    rois[:, 0] = rois[:, 0].clamp(max=n_images - 1)
    return x.to(dtype), rois.to(dtype)

"""Box geometry: expand a box, crop it to a fixed square, rasterise the box inside the crop, paste back.

Coordinate convention (the one pycocotools and the COCO ground truth use): image pixel (row i, col j)
covers [j, j+1) x [i, i+1) in continuous coordinates, so its centre is (j + 0.5, i + 0.5), and a pixel
belongs to a box or polygon iff its centre lies inside. Boxes here are (x0, y0, x1, y1) floats in those
continuous coordinates; COCO's [x, y, w, h] converts with `xywh_to_xyxy`.

A crop of a box region (x0', y0', x1', y1') at size S maps crop pixel u to image coordinate
x0' + (u + 0.5) (x1' - x0') / S. The crop is resized without keeping aspect ratio, as MAL does.
Pixels of the crop that fall outside the image are filled by *reflecting* the image at its border:
like MAL's wrap-around, the colour-affinity CRF then sees real image colours rather than a flat pad,
and unlike wrap-around the colours next to the border stay continuous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Paper defaults: training margins ~ U(0, 1.2) x gate; labelling margins fixed at 0.3 (a 1.3x crop).
TRAIN_MARGIN_MAX = 1.2
LABEL_MARGIN = 0.3


def xywh_to_xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in box)
    return (x, y, x + w, y + h)


def box_area(box_xywh: Sequence[float]) -> float:
    """w * h of a COCO box, never negative: the area the decoder routes by (and crop plans size by)."""
    return max(float(box_xywh[2]) * float(box_xywh[3]), 0.0)


@dataclass(frozen=True)
class Margins:
    """Per-side expansion, each a fraction of that side's half-extent (0.3 on both sides = 1.3x)."""

    left: float
    top: float
    right: float
    bottom: float

    @classmethod
    def uniform(cls, margin: float = LABEL_MARGIN) -> "Margins":
        return cls(margin, margin, margin, margin)


def random_margins(rng: np.random.Generator, theta: float = TRAIN_MARGIN_MAX) -> Margins:
    """MAL's random expansion: u1..u4 ~ U(0, theta), gates gx, gy ~ U(0, 1).

    The gate splits the extra width between the two sides, so the crop is 1.0-1.6x the box per axis
    (theta = 1.2) and the object is not always centred.
    """
    u1, u2, u3, u4 = rng.uniform(0.0, theta, size=4)
    gx, gy = rng.uniform(0.0, 1.0, size=2)
    return Margins(left=u1 * gx, top=u2 * gy, right=u3 * (1 - gx), bottom=u4 * (1 - gy))


def expand_box(box_xyxy: Sequence[float], margins: Margins) -> tuple[float, float, float, float]:
    """Expand each side away from the centre by its margin times the half-extent."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (
        cx - (cx - x0) * (1 + margins.left),
        cy - (cy - y0) * (1 + margins.top),
        cx + (x1 - cx) * (1 + margins.right),
        cy + (y1 - cy) * (1 + margins.bottom),
    )


def crop_region(box_xyxy: Sequence[float], margins: Margins, min_size: float = 1.0) -> tuple[float, float, float, float]:
    """The image region a crop covers: the expanded box, made at least `min_size` pixels per axis.

    Degenerate boxes (zero width or height) still get a crop a pixel wide, so every box can be labelled.
    """
    x0, y0, x1, y1 = expand_box(box_xyxy, margins)
    if x1 - x0 < min_size:
        cx = (x0 + x1) / 2
        x0, x1 = cx - min_size / 2, cx + min_size / 2
    if y1 - y0 < min_size:
        cy = (y0 + y1) / 2
        y0, y1 = cy - min_size / 2, cy + min_size / 2
    return (x0, y0, x1, y1)


def _axis_sample_points(start: float, end: float, size: int) -> torch.Tensor:
    """Image coordinates of the centres of `size` crop pixels spanning [start, end)."""
    step = (end - start) / size
    return start + (torch.arange(size, dtype=torch.float64) + 0.5) * step


def _reflect(coord: torch.Tensor, length: int) -> torch.Tensor:
    """Reflect continuous coordinates into [0, length) (mirror at the image border, period 2*length)."""
    period = 2.0 * length
    c = torch.remainder(coord, period)
    return torch.where(c >= length, period - c, c)


def crop_grid(region_xyxy: Sequence[float], image_hw: tuple[int, int], size: int) -> torch.Tensor:
    """`grid_sample` grid (1, S, S, 2) that samples `region_xyxy` of an image of `image_hw` at S x S.

    Coordinates outside the image are reflected back in (see module docstring).
    """
    height, width = image_hw
    x0, y0, x1, y1 = region_xyxy
    xs = _reflect(_axis_sample_points(x0, x1, size), width)
    ys = _reflect(_axis_sample_points(y0, y1, size), height)
    # grid_sample with align_corners=False maps -1 / +1 to the outer edges of the border pixels.
    gx = (xs / width * 2 - 1).float()
    gy = (ys / height * 2 - 1).float()
    return torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1).unsqueeze(0)


def crop_image(image: torch.Tensor, region_xyxy: Sequence[float], size: int) -> torch.Tensor:
    """Bilinear crop of `region_xyxy` from `image` (C, H, W), any dtype, to (C, size, size) float32."""
    grid = crop_grid(region_xyxy, (image.shape[-2], image.shape[-1]), size)
    crop = F.grid_sample(image.unsqueeze(0).float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return crop[0]


def crop_images(image: torch.Tensor, regions_xyxy: Sequence[Sequence[float]], size: int) -> torch.Tensor:
    """Crop many regions of one image (C, H, W), any dtype -> (N, C, size, size) float32.

    Each crop first gathers the (at most 2 x size) rows and columns of pixels its bilinear samples read, and
    converts only those to float: the cost does not grow with the image (a float copy of a 12-megapixel
    photo is 144 MB). Same samples and weights as `crop_image`, up to float32 rounding of the coordinates.
    """
    height, width = image.shape[-2], image.shape[-1]
    crops = []
    for x0, y0, x1, y1 in regions_xyxy:
        cols, gx = _gathered_axis(_reflect(_axis_sample_points(x0, x1, size), width), width)
        rows, gy = _gathered_axis(_reflect(_axis_sample_points(y0, y1, size), height), height)
        source = image[..., rows[:, None], cols].unsqueeze(0).float()
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1).unsqueeze(0)
        crops.append(F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False))
    return torch.cat(crops) if crops else torch.zeros((0, image.shape[-3], size, size))


def _gathered_axis(coords: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel indices bilinear sampling at image coordinates `coords` reads along one axis (sorted, unique),
    and the `grid_sample` coordinates of the same samples in the image made of those pixels alone."""
    pixel = (coords - 0.5).clamp(0, length - 1)  # pixel-index units; "border" padding clamps the same way
    low = pixel.floor().long()
    index = torch.unique(torch.cat([low, (low + 1).clamp(max=length - 1)]))
    local = torch.searchsorted(index, low) + (pixel - low)  # low's neighbour low + 1 is the next gathered pixel
    return index, ((local + 0.5) / len(index) * 2 - 1).float()


def box_mask(box_xyxy: Sequence[float], region_xyxy: Sequence[float], size: int) -> torch.Tensor:
    """(size, size) float mask of the crop: 1 where the crop pixel's centre is inside the box, else 0.

    A box thinner than one crop pixel still marks the nearest row/column, so MIL always has a
    positive bag.
    """
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    rx0, ry0, rx1, ry1 = region_xyxy
    xs = _axis_sample_points(rx0, rx1, size)
    ys = _axis_sample_points(ry0, ry1, size)
    cols = (xs > x0) & (xs <= x1)
    rows = (ys > y0) & (ys <= y1)
    if not cols.any():
        cols[int(torch.argmin((xs - (x0 + x1) / 2).abs()))] = True
    if not rows.any():
        rows[int(torch.argmin((ys - (y0 + y1) / 2).abs()))] = True
    return (rows[:, None] & cols[None, :]).float()


def box_pixel_bounds(box_xyxy: Sequence[float], image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel rows/cols whose centre lies in the box, clipped to the image: (row0, row1, col0, col1), ends exclusive.

    Matches pycocotools' rasterisation of the box polygon: column j is in iff x0 < j + 0.5 <= x1.
    """
    height, width = image_hw
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    col0 = min(max(math.floor(x0 - 0.5) + 1, 0), width)  # a box past the image gives an empty window at its edge
    col1 = min(math.floor(x1 - 0.5) + 1, width)
    row0 = min(max(math.floor(y0 - 0.5) + 1, 0), height)
    row1 = min(math.floor(y1 - 0.5) + 1, height)
    return row0, max(row1, row0), col0, max(col1, col0)


def boxes_pixel_bounds(boxes_xyxy: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """`box_pixel_bounds` for many boxes at once: (N, 4) xyxy and per-box image sizes -> (N, 4) float
    (row0, row1, col0, col1), the same integers as the scalar rule (kept as floats: no int overflow)."""
    x0, y0, x1, y1 = np.asarray(boxes_xyxy, dtype=np.float64).T
    col0 = np.minimum(np.maximum(np.floor(x0 - 0.5) + 1, 0), widths)
    col1 = np.minimum(np.floor(x1 - 0.5) + 1, widths)
    row0 = np.minimum(np.maximum(np.floor(y0 - 0.5) + 1, 0), heights)
    row1 = np.minimum(np.floor(y1 - 0.5) + 1, heights)
    return np.stack([row0, np.maximum(row1, row0), col0, np.maximum(col1, col0)], axis=1)


def paste_window(
    crop_map: torch.Tensor,
    region_xyxy: Sequence[float],
    window: tuple[int, int, int, int],
) -> torch.Tensor:
    """Resample a crop-resolution map (S, S) at the image pixels of `window` = (row0, row1, col0, col1).

    Exact inverse of the crop's sampling: image pixel j (centre j + 0.5) reads crop coordinate
    (j + 0.5 - x0') S / (x1' - x0'), bilinearly. Returns (row1 - row0, col1 - col0) float32.
    Only the window is computed, never a full-image canvas.
    """
    row0, row1, col0, col1 = window
    if row1 <= row0 or col1 <= col0:
        return torch.zeros((max(row1 - row0, 0), max(col1 - col0, 0)), dtype=torch.float32)
    size_y, size_x = crop_map.shape[-2:]
    rx0, ry0, rx1, ry1 = region_xyxy
    # Normalised crop coordinates (align_corners=False): -1/+1 are the crop's outer edges.
    gx = ((torch.arange(col0, col1, dtype=torch.float64) + 0.5 - rx0) / (rx1 - rx0) * 2 - 1).float()
    gy = ((torch.arange(row0, row1, dtype=torch.float64) + 0.5 - ry0) / (ry1 - ry0) * 2 - 1).float()
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1).unsqueeze(0)
    source = crop_map.reshape(1, 1, size_y, size_x).float()
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]


def _paste_axis(start: int, end: int, region_start: float, region_end: float, size: int):
    """Source indices and weights of `paste_window`'s bilinear sampling along one axis (border padding)."""
    coord = (np.arange(start, end, dtype=np.float64) + 0.5 - region_start) / (region_end - region_start) * size - 0.5
    coord = np.clip(coord, 0.0, size - 1).astype(np.float32)
    floor = np.floor(coord)
    low = floor.astype(np.intp)
    high = np.minimum(low + 1, size - 1)
    return low, high, coord - floor


def paste_window_np(
    crop_map: np.ndarray,
    region_xyxy: Sequence[float],
    window: tuple[int, int, int, int],
) -> np.ndarray:
    """`paste_window` in numpy, as two separable 1-D interpolations (rows, then columns).

    Samples the same bilinear points (align_corners=False, border padding) without building a grid:
    O(h*M + h*w) instead of a grid_sample per pixel; equal to `paste_window` up to float32 rounding.
    """
    row0, row1, col0, col1 = window
    if row1 <= row0 or col1 <= col0:
        return np.zeros((max(row1 - row0, 0), max(col1 - col0, 0)), dtype=np.float32)
    crop = np.asarray(crop_map, dtype=np.float32)
    size_y, size_x = crop.shape[-2:]
    rx0, ry0, rx1, ry1 = region_xyxy
    y_lo, y_hi, wy = _paste_axis(row0, row1, ry0, ry1, size_y)
    x_lo, x_hi, wx = _paste_axis(col0, col1, rx0, rx1, size_x)
    rows = crop[y_lo] * (1 - wy)[:, None] + crop[y_hi] * wy[:, None]  # (h, size_x)
    return rows[:, x_lo] * (1 - wx) + rows[:, x_hi] * wx


def paste_box_prob(
    crop_prob: np.ndarray | torch.Tensor,
    box_xyxy: Sequence[float],
    region_xyxy: Sequence[float],
    image_hw: tuple[int, int],
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A crop probability map resampled on the image pixels of the box (clipped to the image).

    Returns the probability window (float32) and its bounds (row0, row1, col0, col1); everything outside
    the window is background by construction, which is what "keep inside the box" means. This is the
    paste `mal label` uses (numpy, so it also runs in post-processing worker processes).
    """
    window = box_pixel_bounds(box_xyxy, image_hw)
    return paste_window_np(np.asarray(crop_prob, dtype=np.float32), region_xyxy, window), window


def paste_box_mask(
    crop_prob: np.ndarray | torch.Tensor,
    box_xyxy: Sequence[float],
    region_xyxy: Sequence[float],
    image_hw: tuple[int, int],
    threshold: float = 0.5,
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """`paste_box_prob` thresholded: the binary (uint8) window and its bounds."""
    prob, window = paste_box_prob(crop_prob, box_xyxy, region_xyxy, image_hw)
    return (prob >= threshold).view(np.uint8), window

"""Boxes on the pixel grid, numpy only: validity, the pycocotools pixel rule, crop regions, and the paste of a
crop-resolution map back onto a box's pixels. `mal label`'s post-processing processes import this without torch.

Coordinate convention (the one pycocotools and the COCO ground truth use): image pixel (row i, col j)
covers [j, j+1) x [i, i+1) in continuous coordinates, so its centre is (j + 0.5, i + 0.5), and a pixel
belongs to a box iff its centre lies inside. Boxes here are (x0, y0, x1, y1) floats in those continuous
coordinates; COCO's [x, y, w, h] converts with `xywh_to_xyxy` (or `box_xyxy`, which also checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

# Paper defaults: training margins ~ U(0, 1.2) x gate; labelling margins fixed at 0.3 (a 1.3x crop).
TRAIN_MARGIN_MAX = 1.2
LABEL_MARGIN = 0.3

Window = tuple[int, int, int, int]  # row0, row1, col0, col1 (ends exclusive)


def xywh_to_xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in box)
    return (x, y, x + w, y + h)


def box_xyxy(bbox: Sequence) -> Optional[tuple[float, float, float, float]]:
    """A COCO box as xyxy, or None when it is not a real box (non-numeric, non-finite, w or h <= 0)."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h, x + w, y + h)) or w <= 0 or h <= 0:  # x + w can overflow
        return None
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


def crop_region(
    box_xyxy: Sequence[float], margins: Margins, min_size: float = 1.0
) -> tuple[float, float, float, float]:
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


def box_pixel_bounds(box_xyxy: Sequence[float], image_hw: tuple[int, int]) -> Window:
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


def window_is_empty(window: Window) -> bool:
    row0, row1, col0, col1 = window
    return row1 <= row0 or col1 <= col0


def _paste_axis(start: int, end: int, region_start: float, region_end: float, size: int):
    """Source indices and weights of the paste's bilinear sampling along one axis (border padding)."""
    coord = (np.arange(start, end, dtype=np.float64) + 0.5 - region_start) / (region_end - region_start) * size - 0.5
    coord = np.clip(coord, 0.0, size - 1).astype(np.float32)
    floor = np.floor(coord)
    low = floor.astype(np.intp)
    high = np.minimum(low + 1, size - 1)
    return low, high, coord - floor


def paste_window_np(crop_map: np.ndarray, region_xyxy: Sequence[float], window: Window) -> np.ndarray:
    """Resample a crop-resolution map (S, S) at the image pixels of `window` = (row0, row1, col0, col1).

    The inverse of the crop's sampling: image pixel j (centre j + 0.5) reads crop coordinate
    (j + 0.5 - x0') S / (x1' - x0'), bilinearly (align_corners=False, border padding), as two separable
    1-D interpolations (rows, then columns): O(h*M + h*w), never a full-image canvas. Returns float32.
    """
    row0, row1, col0, col1 = window
    if window_is_empty(window):
        return np.zeros((max(row1 - row0, 0), max(col1 - col0, 0)), dtype=np.float32)
    crop = np.asarray(crop_map, dtype=np.float32)
    size_y, size_x = crop.shape[-2:]
    rx0, ry0, rx1, ry1 = region_xyxy
    y_lo, y_hi, wy = _paste_axis(row0, row1, ry0, ry1, size_y)
    x_lo, x_hi, wx = _paste_axis(col0, col1, rx0, rx1, size_x)
    rows = crop[y_lo] * (1 - wy)[:, None] + crop[y_hi] * wy[:, None]  # (h, size_x)
    return rows[:, x_lo] * (1 - wx) + rows[:, x_hi] * wx


def paste_box_prob(
    crop_prob: np.ndarray, box_xyxy: Sequence[float], region_xyxy: Sequence[float], image_hw: tuple[int, int]
) -> tuple[np.ndarray, Window]:
    """A crop probability map resampled on the image pixels of the box (clipped to the image).

    Returns the probability window (float32) and its bounds (row0, row1, col0, col1); everything outside
    the window is background by construction, which is what "keep inside the box" means.
    """
    window = box_pixel_bounds(box_xyxy, image_hw)
    return paste_window_np(crop_prob, region_xyxy, window), window

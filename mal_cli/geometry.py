"""Box geometry in torch: crop a box region to a fixed square and rasterise the box inside the crop.

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

from typing import Sequence

import torch
import torch.nn.functional as F

# The numpy half (box validity, pixel rule, crop regions, paste) lives in `pixels`; re-exported for callers.
from mal_cli.pixels import (  # noqa: F401
    LABEL_MARGIN,
    TRAIN_MARGIN_MAX,
    Margins,
    box_area,
    box_pixel_bounds,
    boxes_pixel_bounds,
    crop_region,
    expand_box,
    paste_box_prob,
    paste_window_np,
    random_margins,
    xywh_to_xyxy,
)


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

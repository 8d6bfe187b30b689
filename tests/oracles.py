"""Test oracles: slow, obviously-right references the library's fast paths are checked against (not library code)."""

from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Sequence

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mal_cli.pixels import paste_box_prob


def encode(binary_mask: np.ndarray) -> dict:
    """Compressed RLE of an [H, W] mask (nonzero = inside), `counts` as str."""
    mask = np.asarray(binary_mask)
    if mask.ndim != 2:
        raise ValueError(f"encode expects an [H, W] mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def box_to_pixel_bounds(bbox_xywh: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel rows/columns whose centres lie inside a COCO box: (row0, row1_exclusive, col0, col1_exclusive).

    Clipped to the image; an empty range (row1 <= row0 or col1 <= col0) means no pixel is covered.
    """
    x, y, w, h = (float(v) for v in bbox_xywh)
    col0 = math.floor(x - 0.5) + 1
    col1 = math.floor(x + w - 0.5) + 1
    row0 = math.floor(y - 0.5) + 1
    row1 = math.floor(y + h - 0.5) + 1
    clip = lambda v, hi: min(max(v, 0), hi)  # noqa: E731
    return clip(row0, height), clip(row1, height), clip(col0, width), clip(col1, width)


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


def cocoeval_segm(gt_doc: dict, results: list[dict]) -> COCOeval:
    """One plain pycocotools COCOeval (segm) over everything, evaluated, accumulated and summarised, quietly.

    Works on copies: loadRes adds fields to the results it is given.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt_doc)
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def cocoeval_segm_stats(gt_doc: dict, results: list[dict]) -> list[float]:
    """AP, AP50, AP75, APs, APm, APl of `cocoeval_segm` (stats[:6])."""
    return [float(v) for v in cocoeval_segm(gt_doc, results).stats[:6]]

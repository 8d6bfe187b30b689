"""One image's results from the model's crop probabilities, numpy only (pool processes import it without torch):
box -> pixel window -> paste -> threshold -> score -> RLE (or polygons) -> the image's progress line.

Every box gets a result: the model's mask, the filled box (`--method box`), or a flagged fallback
(`mal_fallback`: "image_error" when the image could not be read, "degenerate_box" when the box covers no
pixel centre) holding the filled box clipped to the image, possibly empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from mal_cli import masks
from mal_cli.labeling.progress import image_line
from mal_cli.pixels import Window, box_area, box_pixel_bounds, box_xyxy, paste_box_prob
from mal_cli.score import BOX_METHOD_SCORE, FALLBACK_SCORE, mask_quality


@dataclass
class BoxPrediction:
    """One box's result: a binary window of the image and where it sits, plus the probability window."""

    window_mask: np.ndarray  # (row1 - row0, col1 - col0) uint8
    window: Window  # row0, row1, col0, col1 (ends exclusive)
    window_prob: np.ndarray  # same shape, float32 probabilities


def paste_prob(
    prob, box: Sequence[float], region_xyxy: Sequence[float], image_hw: tuple[int, int], threshold: float
) -> BoxPrediction:
    """A box's crop probabilities (M, M) pasted on its pixels and thresholded."""
    window_prob, window = paste_box_prob(prob, box, region_xyxy, image_hw)
    window_mask = (window_prob >= threshold).view(np.uint8)
    return BoxPrediction(window_mask, window, window_prob)


def window_to_full(prediction: BoxPrediction, image_hw: tuple[int, int]) -> np.ndarray:
    """Full-image uint8 mask of a prediction (for evaluation; labelling avoids this)."""
    full = np.zeros(image_hw, dtype=np.uint8)
    row0, row1, col0, col1 = prediction.window
    full[row0:row1, col0:col1] = prediction.window_mask
    return full


def box_result(
    window_mask: np.ndarray, window: Window, hw: tuple[int, int], score: float, fmt: str, fallback: Optional[str] = None
) -> dict:
    """The fields `mal label` sets on an annotation: segmentation, area, mal_score (+ mal_fallback)."""
    height, width = hw
    row0, _, col0, _ = window
    if fmt == "polygon":
        polygons = [
            [v + (col0 if i % 2 == 0 else row0) for i, v in enumerate(poly)] for poly in masks.to_polygons(window_mask)
        ]
        # Polygons cannot hold holes: the area is the area of what they cover.
        segmentation: Any = polygons
        area = masks.area(polygons, height, width) if polygons else 0
    else:
        segmentation = masks.encode_window(window_mask, row0, col0, height, width)
        area = int(np.count_nonzero(window_mask))
    return _result(segmentation, area, score, fallback)


def _result(segmentation: Any, area, score: float, fallback: Optional[str]) -> dict:
    result = {"segmentation": segmentation, "area": area, "mal_score": score}
    if fallback:
        result["mal_fallback"] = fallback
    return result


def filled_box_result(
    bbox: Sequence, hw: Optional[tuple[int, int]], fmt: str, fallback: Optional[str], score: float
) -> dict:
    """The filled box clipped to the image (pycocotools pixel rule); empty for a degenerate box."""
    xyxy = box_xyxy(bbox)
    if hw is None:
        # No size known at all (unreadable image without width/height): the box polygon is all we have.
        polygon = masks.box_polygon(bbox) if xyxy is not None else []
        return _result(polygon, box_area(bbox) if xyxy is not None else 0, score, fallback)
    window = (0, 0, 0, 0) if xyxy is None else box_pixel_bounds(xyxy, hw)
    row0, row1, col0, col1 = window
    return box_result(np.ones((row1 - row0, col1 - col0), dtype=np.uint8), window, hw, score, fmt, fallback)


@dataclass
class ImageTask:
    """One image's boxes to turn into results (pickled to a post-processing process)."""

    position: int  # the image's position in the input
    record_positions: list[int]  # its records' positions in the input, in order
    boxes_xywh: list  # their COCO boxes
    hw: Optional[tuple[int, int]]  # image size (None: unknown, only with an error)
    error: Optional[str]  # why the image could not be read
    model_index: list[int]  # per box: its row in `probs`, or -1 when the box covers no pixel (degenerate)
    regions: list  # per model box: the crop region its probabilities cover
    probs: Optional[np.ndarray]  # (model boxes, M, M) crop probabilities; None for --method box
    threshold: float
    fmt: str  # "rle" or "polygon"

    @classmethod
    def of(cls, job, loaded, probs: Optional[np.ndarray], threshold: float, fmt: str) -> "ImageTask":
        """The task of a planned image (`plan.ImageJob`) as the loader read it (`loader.LoadedImage`)."""
        return cls(
            job.position,
            job.record_positions.tolist(),
            job.boxes_xywh.tolist(),
            loaded.hw,
            loaded.error,
            loaded.model_index,
            loaded.regions,
            probs,
            threshold,
            fmt,
        )


def box_result_of(task: ImageTask, i: int) -> dict:
    """Box i's result (see the module docstring)."""
    bbox = task.boxes_xywh[i]
    if task.error:
        return filled_box_result(bbox, task.hw, task.fmt, "image_error", FALLBACK_SCORE)
    k = task.model_index[i]
    if k < 0:
        return filled_box_result(bbox, task.hw, task.fmt, "degenerate_box", FALLBACK_SCORE)
    if task.probs is None:
        return filled_box_result(bbox, task.hw, task.fmt, None, BOX_METHOD_SCORE)
    pred = paste_prob(task.probs[k], box_xyxy(bbox), task.regions[k], task.hw, task.threshold)
    score = mask_quality(pred.window_prob, task.threshold)
    return box_result(pred.window_mask, pred.window, task.hw, score, task.fmt)


def image_results(task: ImageTask) -> tuple[bytes, dict]:
    """One image's progress line (every box's result) and its fallback counts."""
    results = []
    fallbacks: dict[str, int] = {}
    for i, record_position in enumerate(task.record_positions):
        result = box_result_of(task, i)
        if "mal_fallback" in result:
            fallbacks[result["mal_fallback"]] = fallbacks.get(result["mal_fallback"], 0) + 1
        results.append((record_position, result))
    return image_line(task.position, results), fallbacks


def results_of_tasks(tasks: list[ImageTask]) -> list[tuple[bytes, dict]]:
    """`image_results` of several images (one pool task: a few images, less pickling and pipe work)."""
    return [image_results(task) for task in tasks]

"""One validation of COCO segmentations before any pycocotools call (eval, viz and export share it).

pycocotools trusts its input: compressed RLE counts whose runs sum past the image make `decode`/`iou`
write or loop far beyond the mask (minutes at full CPU, or a crash), polygon coordinates like 1e9
overflow its fixed-point rasteriser (SIGSEGV) and size its edge buffers from the coordinates (NaN
hangs it), and negative uncompressed counts overflow its uint32 runs. `checked_rle` refuses all of
these with a `ValueError` naming the problem, so every command agrees on what is invalid:

- the image size: positive integers within the pixel budget (`images.check_pixel_budget`);
- polygons: flat lists of finite numbers (not booleans), an even count, every coordinate within one
  image size outside the image, and a total outline length the rasteriser can afford;
- uncompressed RLE: non-negative integer counts summing to exactly height x width;
- compressed RLE: ASCII in pycocotools' alphabet, every run non-negative and at most 2^32, the runs
  summing to exactly height x width (decoded here with numpy, as pycocotools' `rleFrString` does).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mal_cli import masks
from mal_cli.errors import InputError
from mal_cli.images import check_pixel_budget

__all__ = ["checked_decode", "checked_rle", "rle_string_counts", "validate_segmentation"]

_MAX_RUN_CHARS = 7  # 7 x 5 bits: enough for any run of a 2^32-pixel image
# pycocotools' polygon rasteriser allocates ~40 bytes per pixel of outline: cap the total outline
# (a real mask's outline is far shorter than either bound).
_MAX_OUTLINE = 20_000_000


def validate_segmentation(segmentation: Any, height: int, width: int) -> None:
    """Raise ValueError (one line, what is wrong) unless pycocotools can take `segmentation` safely."""
    try:
        height, width = check_pixel_budget(height, width, "image")
    except InputError as err:
        raise ValueError(str(err).removeprefix("image: ")) from None
    if isinstance(segmentation, list):
        _check_polygons(segmentation, height, width)
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = segmentation["size"]
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            raise ValueError(f"RLE size must be [height, width] integers, got {_short(size)}")
        if [int(size[0]), int(size[1])] != [height, width]:
            raise ValueError(f"RLE size {[int(v) for v in size]} differs from the image size [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            _check_runs(_int_array(counts), height * width, "uncompressed RLE counts")
        elif isinstance(counts, (str, bytes)):
            _check_runs(rle_string_counts(counts), height * width, "RLE counts")
        else:
            raise ValueError("RLE counts must be a string, bytes or a list of ints")
    else:
        raise ValueError("a segmentation must be a list of polygons or an RLE dict with 'counts' and 'size'")


def checked_rle(segmentation: Any, height: int, width: int) -> dict:
    """`masks.to_rle` after `validate_segmentation`: a compressed RLE pycocotools can use safely."""
    validate_segmentation(segmentation, height, width)
    return masks.to_rle(segmentation, int(height), int(width))


def checked_decode(segmentation: Any, height: int, width: int) -> np.ndarray:
    """`masks.decode` after `validate_segmentation`: a uint8 [height, width] mask of 0/1."""
    validate_segmentation(segmentation, height, width)
    return masks.decode(segmentation, int(height), int(width))


def rle_string_counts(counts: str | bytes) -> np.ndarray:
    """The runs of a compressed RLE string as int64 (pycocotools' rleFrString, vectorised); ValueError if malformed."""
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("RLE counts string is not ASCII") from None
    chars = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return np.zeros(0, np.int64)
    if chars.min() < 0 or chars.max() > 63:
        raise ValueError("RLE counts string has characters outside pycocotools' alphabet ('0'..'o')")
    last = (chars & 0x20) == 0  # a run's last character has no continuation bit
    if not last[-1]:
        raise ValueError("RLE counts string ends in the middle of a run")
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_RUN_CHARS:
        raise ValueError("RLE counts string has a run too long for any image")
    position = np.arange(chars.size) - np.repeat(starts, lengths)
    values = np.add.reduceat((chars & 0x1F) << (5 * position), starts)
    negative = (chars[ends] & 0x10) != 0
    values = np.where(negative, values - (np.int64(1) << (5 * lengths)), values)
    # Runs from the fourth on are stored as the difference to the run two before.
    for parity in (0, 1):
        first = 2 if parity == 0 else 1
        values[first::2] = np.cumsum(values[first::2])
    return values


def _check_runs(runs: np.ndarray, total: int, what: str) -> None:
    if runs.size and runs.min() < 0:
        raise ValueError(f"{what} has a negative run")
    if runs.size and runs.max() > 1 << 32:
        raise ValueError(f"{what} has a run longer than any image")
    covered = int(runs.sum())
    if covered != total:
        raise ValueError(f"{what} cover {covered} pixels, not height x width = {total}")


def _int_array(values: list) -> np.ndarray:
    if not all(_is_int(v) for v in values):
        raise ValueError("uncompressed RLE counts must be integers")
    try:
        return np.asarray([int(v) for v in values], dtype=np.int64)
    except OverflowError:
        raise ValueError("uncompressed RLE counts has a run longer than any image") from None


def _check_polygons(polygons: list, height: int, width: int) -> None:
    margin = max(height, width)
    lo_x, hi_x, lo_y, hi_y = -margin, width + margin, -margin, height + margin
    outline = 0.0
    for poly in polygons:
        if not isinstance(poly, list) or len(poly) % 2:
            raise ValueError("a polygon must be a flat list of x, y pairs")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly):
            raise ValueError("polygon coordinates must be numbers")
        if len(poly) < 6:
            continue  # fewer than 3 points: covers nothing, never reaches pycocotools
        try:
            xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        except OverflowError:
            raise ValueError("polygon coordinate out of range") from None
        if not np.isfinite(xy).all():
            raise ValueError("polygon coordinates must be finite (no NaN or infinity)")
        if xy[:, 0].min() < lo_x or xy[:, 0].max() > hi_x or xy[:, 1].min() < lo_y or xy[:, 1].max() > hi_y:
            raise ValueError(f"polygon coordinates lie more than an image size outside the {width} x {height} image")
        step = np.abs(np.diff(np.concatenate([xy, xy[:1]]), axis=0)).max(axis=1)
        outline += float(step.sum())
    if outline > min(4.0 * (height + 2) * (width + 2), _MAX_OUTLINE):
        raise ValueError("polygon outlines are longer than any mask of this image could need")


def _is_int(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

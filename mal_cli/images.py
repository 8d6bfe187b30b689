"""Image decoding: one rule for orientation and colour, used by training and labelling alike.

Orientation rule: the EXIF orientation is applied (as detectron2, mmdetection and most viewers do),
unless the dataset's recorded width/height match the stored (un-rotated) pixels and not the rotated
ones; then the boxes were drawn on the stored pixels and those are used. Colour: every mode
(grayscale, RGBA/LA/P, CMYK, 16-bit) becomes 8-bit RGB; alpha is dropped.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mal_cli.errors import InputError

# Refuse decompression bombs outright: 50k x 50k would be 7.5 GB of RGB.
MAX_IMAGE_PIXELS = 400_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ORIENTATION_TAG = 0x0112  # EXIF Orientation, as ImageOps.exif_transpose reads it


class ImageLoadError(InputError):
    """An image that cannot be used: missing, corrupt, truncated or too large."""


def swaps_sides(raw: Image.Image) -> bool:
    """Whether an opened image's EXIF orientation (5-8) shows it with width and height swapped."""
    return raw.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: scale the full range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        scaled = np.zeros_like(array) if hi <= lo else (array - lo) / (hi - lo) * 255.0
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))  # drop alpha onto white
        image = Image.alpha_composite(background, image)
    return image if image.mode == "RGB" else image.convert("RGB")  # convert copies even an RGB image


def load_rgb(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 array, oriented and in RGB (see module docstring).

    Raises ImageLoadError (one clear line) for missing, corrupt, truncated or oversized images.
    """
    return load_rgb_reduced(path, expected_hw)[0]


def load_rgb_reduced(
    path: str | Path, expected_hw: tuple[int, int] | None = None, reduce: int = 1
) -> tuple[np.ndarray, tuple[int, int], float]:
    """`load_rgb` decoded at up to 1/`reduce` of the full size where the format allows it (JPEG and MPO: DCT scaling,
    `reduce` 2, 4 or 8; other formats decode in full). Returns the (h, w, 3) array, the full image's oriented
    (H, W) (what boxes and masks refer to) and the scale the pixels were decoded at (1 / the reduction):
    full-image coordinate x is x * scale in the array.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as raw:
                full_wh = raw.size
                scale = 1.0
                if reduce > 1 and raw.format in ("JPEG", "MPO"):  # MPO: phone photos, a JPEG with extra frames
                    raw.draft(raw.mode, (max(full_wh[0] // reduce, 1), max(full_wh[1] // reduce, 1)))  # >= these
                    scale = raw.size[0] / full_wh[0]  # the DCT scale libjpeg picked: 1, 1/2, 1/4 or 1/8
                    scale = 1.0 / round(1.0 / scale)
                raw.load()
                # Orientation is decided on the full sizes (the recorded size refers to them), then applied.
                raw_hw = (full_wh[1], full_wh[0])
                oriented_hw = raw_hw[::-1] if swaps_sides(raw) else raw_hw
                if expected_hw is not None and oriented_hw != tuple(expected_hw) and raw_hw == tuple(expected_hw):
                    full_hw = raw_hw  # the boxes were drawn on the stored pixels: not transposed
                else:
                    # In place: an image that needs no transpose (most) is not copied.
                    ImageOps.exif_transpose(raw, in_place=True)
                    full_hw = oriented_hw
                return np.asarray(_to_rgb(raw)), full_hw, scale
    except FileNotFoundError:
        raise ImageLoadError(f"image not found: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageLoadError(
            f"image refused as a decompression bomb (over {MAX_IMAGE_PIXELS:,} pixels): {path}"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"cannot decode image {path}: {err}") from None


def check_pixel_budget(height: int, width: int, where: str) -> tuple[int, int]:
    """The one pixel budget for memory sized from a *declared* image size (canvases, masks, tensors).

    `height`/`width` as a dataset or an RLE declares them: they must be positive integers whose product
    is at most MAX_IMAGE_PIXELS, the same limit decoding applies to the pixels themselves. Returns them as
    ints; raises InputError naming `where` otherwise, before anything is allocated.
    """
    if (
        isinstance(height, bool)
        or isinstance(width, bool)
        or not all(
            isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer()) for v in (height, width)
        )
    ):
        raise InputError(f"{where}: height/width must be positive integers, got {height!r} x {width!r}")
    h, w = int(height), int(width)
    if h <= 0 or w <= 0:
        raise InputError(f"{where}: height/width must be positive integers, got {h} x {w}")
    if h * w > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{where}: declared size {w} x {h} is over the {MAX_IMAGE_PIXELS:,}-pixel limit (a decompression bomb "
            "or a wrong size); fix the image's width/height"
        )
    return h, w


def require_trainable_images(images: "list[tuple[str, tuple[int, int]]]", images_dir: str | Path) -> None:
    """Before training: every declared size within the pixel budget, and at least one image decodes.

    `images`: (path, (height, width)) per training box. Training on images that all fail to decode would
    fit the labeler to blank crops and still write it, so that is an error, not a warning per sample.
    """
    seen: dict[str, tuple[int, int]] = {}
    for path, hw in images:
        if path not in seen:
            seen[path] = check_pixel_budget(hw[0], hw[1], path)
    last_error = None
    for path, hw in seen.items():
        try:
            load_rgb(path, expected_hw=hw)
            return
        except ImageLoadError as err:
            last_error = err
    if last_error is not None:
        raise ImageLoadError(
            f"none of the {len(seen)} training images under {images_dir} can be decoded (e.g. {last_error}); "
            "nothing to train on"
        )


def draft_reduction(regions_xyxy: Sequence[Sequence[float]], crop_sizes: Sequence[int]) -> int:
    """The largest JPEG decode reduction (1, 2, 4 or 8) at which every crop region still spans at least its
    crop size in pixels along both axes: the crops then resample a smaller, DCT-filtered image instead of
    the full one, with as many source pixels as they have samples (docs/performance.md: masks' IoU with the
    full decode). 1 when any region is smaller."""
    smallest = min(
        (min(x1 - x0, y1 - y0) / size for (x0, y0, x1, y1), size in zip(regions_xyxy, crop_sizes)), default=0.0
    )
    for reduce in (8, 4, 2):
        if smallest >= reduce:
            return reduce
    return 1


def scale_regions(regions_xyxy: Sequence[Sequence[float]], scale: float) -> list[tuple[float, float, float, float]]:
    """Full-image regions in the coordinates of an image decoded at `scale` (see `load_rgb_reduced`)."""
    if scale == 1.0:
        return [tuple(r) for r in regions_xyxy]
    return [(x0 * scale, y0 * scale, x1 * scale, y1 * scale) for x0, y0, x1, y1 in regions_xyxy]

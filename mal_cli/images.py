"""Image decoding: one rule for orientation and colour, used by training and labelling alike.

Orientation rule: the EXIF orientation is applied (as detectron2, mmdetection and most viewers do),
unless the dataset's recorded width/height match the stored (un-rotated) pixels and not the rotated
ones; then the boxes were drawn on the stored pixels and those are used. Colour: every mode
(grayscale, RGBA/LA/P, CMYK, 16-bit) becomes 8-bit RGB; alpha is dropped.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mal_cli.errors import InputError

# Refuse decompression bombs outright: 50k x 50k would be 7.5 GB of RGB.
MAX_IMAGE_PIXELS = 400_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class ImageLoadError(InputError):
    """An image that cannot be used: missing, corrupt, truncated or too large."""


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
    return image.convert("RGB")


def load_rgb(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 array, oriented and in RGB (see module docstring).

    Raises ImageLoadError (one clear line) for missing, corrupt, truncated or oversized images.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as raw:
                raw.load()
                oriented = ImageOps.exif_transpose(raw)
                image = oriented
                if expected_hw is not None and (oriented.height, oriented.width) != tuple(expected_hw):
                    if (raw.height, raw.width) == tuple(expected_hw):
                        image = raw
                return np.asarray(_to_rgb(image))
    except FileNotFoundError:
        raise ImageLoadError(f"image not found: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageLoadError(f"image refused as a decompression bomb (over {MAX_IMAGE_PIXELS:,} pixels): {path}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"cannot decode image {path}: {err}") from None


def check_pixel_budget(height: int, width: int, where: str) -> tuple[int, int]:
    """The one pixel budget for memory sized from a *declared* image size (canvases, masks, tensors).

    `height`/`width` as a dataset or an RLE declares them: they must be positive integers whose product
    is at most MAX_IMAGE_PIXELS, the same limit decoding applies to the pixels themselves. Returns them as
    ints; raises InputError naming `where` otherwise, before anything is allocated.
    """
    if isinstance(height, bool) or isinstance(width, bool) or not all(
        isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer()) for v in (height, width)
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

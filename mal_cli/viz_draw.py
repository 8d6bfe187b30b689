"""Drawing for `mal viz`: one instance's crop picture and the whole-image picture.

A mask is filled and outlined in its category's colour, the box drawn as a rectangle, the ground-truth
outline (when given) dashed white. Pillow (ImageDraw) and numpy only; mal_cli.viz re-exports the public names.
"""

from __future__ import annotations

import colorsys
import math
from typing import Any, Optional

import numpy as np

__all__ = ["category_color", "full_picture_size", "render_crop", "render_full", "resized_mask"]

CONTEXT = 0.25  # crop = box grown by this fraction of its size on every side
CROP_MIN_SIDE = 192  # crops are scaled so their long side is in [CROP_MIN_SIDE, CROP_MAX_SIDE]
CROP_MAX_SIDE = 384
CROP_MIN_SHORT = 96  # thin boxes: grow the short side up to this while the long side stays <= CROP_MAX_LONG
CROP_MAX_LONG = 576
CAPTION_MIN_WIDTH = 250
MAX_UPSCALE = 8.0
FULL_MAX_SIDE = 1024
FILL_ALPHA = 0.45


def category_color(category_id: Any) -> tuple[int, int, int]:
    """A saturated colour per category, stable across runs (golden-ratio hue steps)."""
    try:
        key = int(category_id)
    except (TypeError, ValueError):
        key = sum(str(category_id).encode())
    hue = (key * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (the outline, 1 px)."""
    m = mask.astype(bool)
    padded = np.pad(m, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & m
    return m & ~interior


def _thicken(edge: np.ndarray) -> np.ndarray:
    padded = np.pad(edge, 1)
    return edge | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def _paint(rgb: np.ndarray, mask: np.ndarray, color, gt_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Fill + outline `mask` (and a dashed white outline of `gt_mask`) on an (H, W, 3) uint8 image."""
    out = rgb.astype(np.float32)
    m = mask.astype(bool)
    col = np.asarray(color, dtype=np.float32)
    out[m] = out[m] * (1 - FILL_ALPHA) + col * FILL_ALPHA
    out[_thicken(_boundary(m))] = col
    if gt_mask is not None:
        edge = _boundary(gt_mask.astype(bool))
        rows, cols = np.nonzero(edge)
        dash = ((rows + cols) // 3) % 2 == 0
        out[rows[dash], cols[dash]] = (255, 255, 255)
        out[rows[~dash], cols[~dash]] = (0, 0, 0)
    return out.clip(0, 255).astype(np.uint8)


def _caption_strip(width: int, lines: list[str], color) -> "Any":
    from PIL import Image, ImageDraw

    font = _font(13)
    line_h = 16
    strip = Image.new("RGB", (width, 6 + line_h * len(lines)), (24, 24, 24))
    draw = ImageDraw.Draw(strip)
    draw.rectangle([0, 0, 5, strip.height], fill=tuple(color))
    for k, text in enumerate(lines):
        draw.text((10, 3 + k * line_h), text, fill=(240, 240, 240), font=font)
    return strip


def render_crop(
    image: np.ndarray,
    mask: np.ndarray,
    bbox,
    color,
    caption: list[str],
    gt_mask: Optional[np.ndarray] = None,
    context: float = CONTEXT,
) -> "Any":
    """One instance's review picture: its box with `context`, mask fill/outline, box, caption below."""
    from PIL import Image, ImageDraw

    height, width = mask.shape
    x, y, w, h = (float(v) for v in bbox)
    w, h = max(w, 1.0), max(h, 1.0)
    pad_x, pad_y = context * w + 4, context * h + 4
    left, top = max(int(math.floor(x - pad_x)), 0), max(int(math.floor(y - pad_y)), 0)
    right, bottom = min(int(math.ceil(x + w + pad_x)), width), min(int(math.ceil(y + h + pad_y)), height)
    if right <= left or bottom <= top:  # a box outside the image: show the nearest corner region
        left, top = min(max(int(x), 0), max(width - 1, 0)), min(max(int(y), 0), max(height - 1, 0))
        right, bottom = min(left + 32, width), min(top + 32, height)
    long_side, short_side = max(right - left, bottom - top), min(right - left, bottom - top)
    scale = CROP_MIN_SIDE / long_side if long_side < CROP_MIN_SIDE else min(CROP_MAX_SIDE / long_side, 1.0)
    scale = min(max(scale, min(CROP_MIN_SHORT / short_side, CROP_MAX_LONG / long_side)), MAX_UPSCALE)
    size = (max(int(round((right - left) * scale)), 1), max(int(round((bottom - top) * scale)), 1))
    crop = Image.fromarray(image[top:bottom, left:right]).resize(size, Image.BICUBIC)

    def scaled(m: np.ndarray) -> np.ndarray:
        return (
            np.asarray(Image.fromarray(m[top:bottom, left:right].astype(np.uint8) * 255).resize(size, Image.NEAREST))
            > 127
        )

    painted = _paint(np.asarray(crop), scaled(mask), color, scaled(gt_mask) if gt_mask is not None else None)
    picture = Image.fromarray(painted)
    draw = ImageDraw.Draw(picture)
    box = [(x - left) * scale, (y - top) * scale, (x + w - left) * scale, (y + h - top) * scale]
    draw.rectangle(box, outline=tuple(color), width=2)
    sheet_width = max(picture.width, CAPTION_MIN_WIDTH)
    strip = _caption_strip(sheet_width, caption, color)
    sheet = Image.new("RGB", (sheet_width, picture.height + strip.height), (24, 24, 24))
    sheet.paste(picture, ((sheet_width - picture.width) // 2, 0))
    sheet.paste(strip, (0, picture.height))
    return sheet


def render_full(image: np.ndarray, instances: list[tuple[np.ndarray, list, tuple, str]]) -> "Any":
    """Every (mask, bbox, colour, label) drawn on the whole image, scaled to at most FULL_MAX_SIDE.

    The masks may be full-size or already at the picture's size (`full_picture_size`)."""
    from PIL import Image, ImageDraw

    height, width = image.shape[:2]
    scale = min(FULL_MAX_SIDE / max(height, width), 1.0)
    size = full_picture_size(height, width)
    canvas = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
    for mask, _, color, _ in instances:  # full-size masks, or already at the picture's size
        canvas = _paint(canvas, resized_mask(mask, size), color)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    font = _font(12)
    boxes = [[float(v) * scale for v in bbox] for _, bbox, _, _ in instances]
    extents = [draw.textbbox((0, 0), label, font=font) for _, _, _, label in instances]
    corners = place_labels(
        [(e[2] - e[0] + 4, e[3] - e[1] + 4) for e in extents],
        [(x + 2, max(y - 15, 0)) for x, y, _, _ in boxes],
        size[1],
    )
    for (_, _, color, _), (x, y, w, h) in zip(instances, boxes):
        draw.rectangle([x, y, x + w, y + h], outline=tuple(color), width=2)
    for (_, _, color, label), (tx, ty) in zip(instances, corners):  # labels last: no outline crosses them
        text_box = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle([text_box[0] - 2, text_box[1] - 1, text_box[2] + 2, text_box[3] + 1], fill=tuple(color))
        luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        draw.text((tx, ty), label, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
    return picture


def place_labels(sizes: list[tuple[float, float]], anchors: list[tuple[float, float]], height: int) -> list:
    """Top-left corners for labels of these (width, height) sizes, each at its anchor (x, y) unless that overlaps
    a label placed before it: then a line lower at a time, while it stays in the picture (else at its anchor)."""
    placed: list[tuple[float, float, float, float]] = []
    corners = []
    for (w, h), (x, y) in zip(sizes, anchors):
        corner = (x, y)
        for ty in [y + k * h for k in range(int(max(height - y, 0) // max(h, 1)) + 1)]:
            if ty + h > height and ty > y:
                break
            if not any(x < px + pw and px < x + w and ty < py + ph and py < ty + h for px, py, pw, ph in placed):
                corner = (x, ty)
                break
        placed.append((corner[0], corner[1], w, h))
        corners.append(corner)
    return corners


def full_picture_size(height: int, width: int) -> tuple[int, int]:
    """(width, height) of a --full picture: the image scaled to at most FULL_MAX_SIDE."""
    scale = min(FULL_MAX_SIDE / max(height, width), 1.0)
    return max(int(round(width * scale)), 1), max(int(round(height * scale)), 1)


def resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if (mask.shape[1], mask.shape[0]) == size:
        return mask.astype(bool)
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127

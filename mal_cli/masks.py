"""Instance masks in COCO form: RLE encode/decode, areas, polygons, box rasterisation.

In the spirit of pycocotools' `mask.py`: a few small functions over plain numpy arrays and COCO
`segmentation` values. Compressed RLEs leave this module with `counts` as `str`, so they serialise
to JSON as they are.

Pixel convention (the one pycocotools and the COCO ground truth use): image pixel (row i, col j)
covers [j, j+1) x [i, i+1), its centre is (j + 0.5, i + 0.5), and a pixel belongs to a polygon or a
box iff its centre lies inside. For a box spanning x0..x1 that is columns floor(x0 - 0.5) + 1 ..
floor(x1 - 0.5) inclusive, exactly what pycocotools' polygon rasteriser gives for the box polygon.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pycocotools.mask as mask_utils

__all__ = [
    "encode_window",
    "decode",
    "area",
    "to_rle",
    "to_polygons",
    "box_polygon",
]

Segmentation = Any  # list[list[float]] | {"counts": str | bytes | list[int], "size": [h, w]}


def encode_window(window_mask: np.ndarray, top: int, left: int, height: int, width: int) -> dict:
    """Compressed RLE of a full `height` x `width` image that is zero except for `window_mask` at (top, left).

    Equals pycocotools' encode of `full` where `full[top:top+h, left:left+w] = window_mask`, but never allocates the
    full image: the column-major runs are computed from the window alone. Parts of the window that
    fall outside the image are clipped.
    """
    window = np.asarray(window_mask) != 0
    if window.ndim != 2:
        raise ValueError(f"encode_window expects an [h, w] window, got shape {window.shape}")
    # Clip the window to the image.
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + window.shape[0], height), min(left + window.shape[1], width)
    if r1 <= r0 or c1 <= c0:
        return _rle_from_boundaries(np.zeros(0, np.int64), height, width)
    window = window[r0 - top : r1 - top, c0 - left : c1 - left]
    h = r1 - r0
    # Column-major order: walk the window column by column. Pad each column with a zero above and
    # below so every run has a start and an end inside that column.
    cols = np.zeros((window.shape[1], h + 2), dtype=bool)
    cols[:, 1:-1] = window.T
    # A change between padded rows k and k+1 is a run start (or an exclusive end) at window row k.
    changes = np.flatnonzero(cols[:, 1:] != cols[:, :-1])  # 1-D nonzero: faster than 2-D
    col_idx, row_idx = np.divmod(changes, h + 1)
    # Flat column-major index into the full image; ascending, alternating start, end, start, ...
    boundaries = (col_idx.astype(np.int64) + c0) * height + r0 + row_idx
    return _rle_from_boundaries(boundaries, height, width)


def _rle_from_boundaries(boundaries: np.ndarray, height: int, width: int) -> dict:
    """Compressed RLE from sorted alternating run start/end flat indices (column-major)."""
    if len(boundaries):
        # A run that ends at the bottom of one column and restarts at the top of the next is one run
        # in column-major order: drop the end/start pairs at the same index.
        ends, starts = boundaries[1:-1:2], boundaries[2::2]
        touching = ends == starts
        if touching.any():
            keep = np.ones(len(boundaries), dtype=bool)
            keep[1:-1:2][touching] = False
            keep[2::2][touching] = False
            boundaries = boundaries[keep]
    counts = np.diff(np.concatenate(([0], boundaries, [height * width])))
    if len(counts) > 1 and counts[-1] == 0:  # pycocotools drops a final empty run of zeros
        counts = counts[:-1]
    rle = mask_utils.frPyObjects({"counts": counts.tolist(), "size": [height, width]}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def to_rle(segmentation: Segmentation, height: int, width: int) -> dict:
    """Any COCO segmentation as a pycocotools compressed RLE (`counts` as bytes, for pycocotools calls).

    Accepts polygons (list of flat [x1, y1, x2, y2, ...] lists), compressed RLE (str or bytes counts)
    and uncompressed RLE (list counts). Polygons with fewer than 3 points cover nothing and are skipped.
    Raises ValueError when the segmentation is malformed or its size is not `height` x `width`.
    """
    if isinstance(segmentation, list):
        polygons = []
        for poly in segmentation:
            if not isinstance(poly, (list, tuple)) or len(poly) % 2:
                raise ValueError("a polygon must be a flat list of x, y pairs")
            # pycocotools needs >= 3 points, and would read a 4-number first polygon as a box.
            if len(poly) >= 6:
                polygons.append([float(v) for v in poly])
        if not polygons:
            return _empty_rle(height, width)
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"RLE size {size} differs from the image size [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if sum(counts) != height * width:
                raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, not {height} x {width}")
            return mask_utils.frPyObjects({"counts": counts, "size": size}, height, width)
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        if not isinstance(counts, bytes):
            raise ValueError("RLE counts must be a string, bytes or a list of ints")
        return {"size": size, "counts": counts}
    raise ValueError("a segmentation must be a list of polygons or an RLE dict with 'counts' and 'size'")


def _empty_rle(height: int, width: int) -> dict:
    return mask_utils.frPyObjects({"counts": [height * width], "size": [height, width]}, height, width)


def decode(segmentation: Segmentation, height: int, width: int) -> np.ndarray:
    """Any COCO segmentation (see `to_rle`) as a uint8 [height, width] mask of 0/1."""
    return np.ascontiguousarray(mask_utils.decode(to_rle(segmentation, height, width)))


def area(segmentation: Segmentation, height: int, width: int) -> int:
    """Number of pixels inside a COCO segmentation."""
    return int(mask_utils.area(to_rle(segmentation, height, width)))


def box_polygon(bbox_xywh: Sequence[float]) -> list[list[float]]:
    """A COCO box as a one-part, 4-point COCO polygon (clockwise on screen)."""
    x, y, w, h = (float(v) for v in bbox_xywh)
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


# --- polygons -----------------------------------------------------------------------------------
# Directions of boundary edges ("cracks" between pixels), in image coordinates (x right, y down).
_STEP = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.int64)  # +x, +y, -x, -y


def to_polygons(binary_mask: np.ndarray) -> list[list[float]]:
    """COCO polygons (flat [x1, y1, x2, y2, ...] lists) tracing the outline of every part of a mask.

    The polygons follow pixel *edges*, not pixel centres, so rasterising them with pycocotools gives
    back the mask exactly (a 1-pixel part becomes its 4-corner square), except that holes are
    filled: a COCO polygon list is a union and cannot express holes. Every polygon has >= 4 points.
    Parts touching only at a corner become separate polygons. Pure numpy: no OpenCV needed.
    """
    mask = np.asarray(binary_mask) != 0
    if mask.ndim != 2:
        raise ValueError(f"to_polygons expects an [H, W] mask, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(mask.any(axis=0))
    top, left = int(rows[0]), int(cols[0])
    # Trace inside the tight bounding box, padded by one background pixel on every side.
    crop = np.zeros((rows[-1] - top + 3, cols[-1] - left + 3), dtype=bool)
    crop[1:-1, 1:-1] = mask[top : rows[-1] + 1, left : cols[-1] + 1]

    # Boundary edges, oriented clockwise on screen around each foreground pixel (foreground on the
    # right of travel), as start corner (x, y) in padded-crop corner coordinates plus a direction.
    inner = crop[1:-1, 1:-1]
    starts, dirs = [], []
    for d, (dy, dx), corner in (
        (0, (-1, 0), (0, 0)),  # top edge, pixel above is background: (j, i) -> (j+1, i)
        (1, (0, 1), (1, 0)),  # right edge: (j+1, i) -> (j+1, i+1)
        (2, (1, 0), (1, 1)),  # bottom edge: (j+1, i+1) -> (j, i+1)
        (3, (0, -1), (0, 1)),  # left edge: (j, i+1) -> (j, i)
    ):
        neighbour = crop[1 + dy : crop.shape[0] - 1 + dy, 1 + dx : crop.shape[1] - 1 + dx]
        i, j = np.nonzero(inner & ~neighbour)
        starts.append(np.stack([j + 1 + corner[0], i + 1 + corner[1]], axis=1))
        dirs.append(np.full(len(i), d, dtype=np.int64))
    start = np.concatenate(starts)
    direction = np.concatenate(dirs)
    end = start + _STEP[direction]

    # Successor of each edge: the edge leaving its end corner. At a saddle corner (two diagonal
    # foreground pixels) two edges leave; take the right turn, which keeps each loop tight around
    # one 4-connected part so no polygon touches itself.
    stride = crop.shape[1] + 1
    start_key = start[:, 1] * stride + start[:, 0]
    end_key = end[:, 1] * stride + end[:, 0]
    order = np.lexsort((direction, start_key))
    sorted_keys = start_key[order]
    first = np.searchsorted(sorted_keys, end_key, side="left")
    count = np.searchsorted(sorted_keys, end_key, side="right") - first
    successor = order[first]
    saddle = np.flatnonzero(count == 2)
    if saddle.size:
        a, b = order[first[saddle]], order[first[saddle] + 1]
        right_turn = (direction[saddle] + 1) % 4
        successor[saddle] = np.where(direction[a] == right_turn, a, b)

    # Keep only corners where the direction changes, then walk each loop.
    predecessor = np.empty_like(successor)
    predecessor[successor] = np.arange(len(successor))
    is_corner = direction != direction[predecessor]
    succ = successor.tolist()
    corner_flags = is_corner.tolist()
    visited = bytearray(len(succ))
    polygons: list[list[float]] = []
    offset = np.array([left - 1, top - 1], dtype=np.int64)
    for seed in range(len(succ)):
        if visited[seed]:
            continue
        loop = []
        e = seed
        while not visited[e]:
            visited[e] = 1
            if corner_flags[e]:
                loop.append(e)
            e = succ[e]
        points = start[loop] + offset
        x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
        signed_area2 = float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
        if signed_area2 > 0:  # clockwise on screen = outer boundary; holes run the other way
            polygons.append(points.reshape(-1).astype(np.float64).tolist())
    return polygons

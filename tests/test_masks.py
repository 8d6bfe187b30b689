"""mal_cli.masks: RLE and polygon round trips, areas, and the box pixel convention vs pycocotools."""

from __future__ import annotations

import numpy as np
import oracles  # slow references (tests/oracles.py)
import pycocotools.mask as mask_utils
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mal_cli import masks

small_masks = st.integers(1, 12).flatmap(
    lambda h: st.integers(1, 12).flatmap(lambda w: arrays(np.uint8, (h, w), elements=st.integers(0, 1)))
)


def _filled(mask: np.ndarray) -> np.ndarray:
    """`mask` with its holes filled: background not 8-connected to the outside becomes foreground."""
    bg = np.pad(mask == 0, 1, constant_values=True)
    outside = np.zeros_like(bg)
    outside[0, :] = outside[-1, :] = outside[:, 0] = outside[:, -1] = True
    while True:
        grown = outside.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown[1:-1, 1:-1] |= outside[1 + dy : bg.shape[0] - 1 + dy, 1 + dx : bg.shape[1] - 1 + dx]
        grown &= bg
        if (grown == outside).all():
            break
        outside = grown
    return (~outside[1:-1, 1:-1]).astype(np.uint8)


# --- RLE --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((5, 7), np.uint8),  # empty
        np.ones((5, 7), np.uint8),  # full, touches every border
        np.pad(np.ones((1, 1), np.uint8), ((2, 2), (3, 3))),  # a single pixel
        np.eye(6, dtype=np.uint8),  # diagonal, corner to corner
        np.ones((1, 1), np.uint8),  # 1x1 image
    ],
)
def test_encode_decode_round_trip_edge_cases(mask):
    rle = oracles.encode(mask)
    assert isinstance(rle["counts"], str)
    assert rle["size"] == list(mask.shape)
    out = masks.decode(rle, *mask.shape)
    assert out.dtype == np.uint8 and out.shape == mask.shape
    np.testing.assert_array_equal(out, mask)
    assert masks.area(rle, *mask.shape) == int(mask.sum())


@given(small_masks)
@settings(max_examples=100, deadline=None)
def test_encode_matches_pycocotools_and_round_trips(mask):
    rle = oracles.encode(mask)
    assert rle["counts"].encode() == mask_utils.encode(np.asfortranarray(mask))["counts"]
    np.testing.assert_array_equal(masks.decode(rle, *mask.shape), mask)


def test_decode_accepts_every_segmentation_form():
    mask = np.zeros((6, 8), np.uint8)
    mask[1:4, 2:7] = 1
    compressed = oracles.encode(mask)
    as_bytes = {"size": compressed["size"], "counts": compressed["counts"].encode()}
    # Uncompressed RLE: column-major run lengths, starting with a (possibly empty) run of zeros.
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.r_[0, flat, 0]))
    counts = np.diff(np.r_[0, changes[:-1] if changes[-1] == flat.size else changes, flat.size]).tolist()
    uncompressed = {"size": [6, 8], "counts": counts}
    polygon = [[2.0, 1.0, 7.0, 1.0, 7.0, 4.0, 2.0, 4.0]]  # pixel edges of the same rectangle
    for segmentation in (compressed, as_bytes, uncompressed, polygon):
        np.testing.assert_array_equal(masks.decode(segmentation, 6, 8), mask)
        assert masks.area(segmentation, 6, 8) == 15


def test_decode_skips_degenerate_polygons_and_never_reads_them_as_boxes():
    # pycocotools would read a first polygon of 4 numbers as a box [x, y, w, h].
    seg = [[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 0.0, 2.0, 2.0, 0.0, 2.0]]
    out = masks.decode(seg, 4, 4)
    assert out.sum() == 4 and out[:2, :2].all()
    assert masks.decode([[1.0, 1.0, 3.0, 3.0]], 4, 4).sum() == 0
    assert masks.decode([], 4, 4).sum() == 0


def test_decode_rejects_malformed_input():
    with pytest.raises(ValueError, match="size"):
        masks.decode({"size": [5, 5], "counts": "0"}, 4, 4)
    with pytest.raises(ValueError, match="sum"):
        masks.decode({"size": [4, 4], "counts": [3, 2]}, 4, 4)
    with pytest.raises(ValueError):
        masks.decode([[1.0, 2.0, 3.0]], 4, 4)
    with pytest.raises(ValueError):
        masks.decode("nonsense", 4, 4)


@given(
    window=st.integers(1, 9).flatmap(
        lambda h: st.integers(1, 9).flatmap(lambda w: arrays(np.bool_, (h, w), elements=st.booleans()))
    ),
    top=st.integers(-4, 12),
    left=st.integers(-4, 12),
    height=st.integers(1, 12),
    width=st.integers(1, 12),
)
@settings(max_examples=300, deadline=None)
def test_encode_window_equals_encode_of_the_full_mask(window, top, left, height, width):
    pad = 32  # room for any window position around the image
    full = np.zeros((height + 2 * pad, width + 2 * pad), np.uint8)
    full[top + pad : top + pad + window.shape[0], left + pad : left + pad + window.shape[1]] = window
    expected = oracles.encode(full[pad : pad + height, pad : pad + width])
    assert masks.encode_window(window, top, left, height, width) == expected


def test_encode_window_merges_runs_across_full_height_columns():
    window = np.ones((5, 3), np.uint8)
    assert masks.encode_window(window, 0, 2, 5, 6) == oracles.encode(np.pad(window, ((0, 0), (2, 1))))


# --- polygons ---------------------------------------------------------------------------------------


def test_single_pixel_becomes_its_square():
    mask = np.zeros((4, 5), np.uint8)
    mask[2, 3] = 1
    assert masks.to_polygons(mask) == [[3.0, 2.0, 4.0, 2.0, 4.0, 3.0, 3.0, 3.0]]


def test_empty_mask_has_no_polygons():
    assert masks.to_polygons(np.zeros((3, 3), np.uint8)) == []


def test_multi_part_mask_keeps_every_part_and_corner_touching_parts_split():
    mask = np.zeros((6, 6), np.uint8)
    mask[0:2, 0:2] = 1  # touches the top-left border
    mask[2, 2] = 1  # touches the first part at a corner only
    mask[4:6, 3:6] = 1  # touches the bottom-right border
    polygons = masks.to_polygons(mask)
    assert len(polygons) == 3
    np.testing.assert_array_equal(masks.decode(polygons, 6, 6), mask)


@given(small_masks)
@settings(max_examples=150, deadline=None)
def test_polygons_rasterise_back_to_the_mask_with_holes_filled(mask):
    polygons = masks.to_polygons(mask)
    assert all(len(p) >= 8 and len(p) % 2 == 0 for p in polygons)  # pycocotools needs >= 3 points
    np.testing.assert_array_equal(masks.decode(polygons, *mask.shape), _filled(mask))


def test_polygon_of_a_ring_fills_the_hole():
    mask = np.ones((5, 5), np.uint8)
    mask[2, 2] = 0
    assert masks.decode(masks.to_polygons(mask), 5, 5).all()


# --- boxes ------------------------------------------------------------------------------------------


def _pycocotools_box_mask(bbox, height, width):
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(masks.box_polygon(bbox), height, width)))


@given(
    x=st.integers(-8, 40).map(lambda v: v / 4),  # quarter pixels: lands exactly on centres and edges
    y=st.integers(-8, 40).map(lambda v: v / 4),
    w=st.integers(0, 40).map(lambda v: v / 4),
    h=st.integers(0, 40).map(lambda v: v / 4),
)
@settings(max_examples=400, deadline=None)
def test_box_pixel_bounds_match_the_pycocotools_rasteriser(x, y, w, h):
    height, width = 9, 8
    row0, row1, col0, col1 = oracles.box_to_pixel_bounds([x, y, w, h], height, width)
    expected = np.zeros((height, width), np.uint8)
    expected[row0:row1, col0:col1] = 1
    np.testing.assert_array_equal(_pycocotools_box_mask([x, y, w, h], height, width), expected)


@pytest.mark.parametrize(
    "bbox, bounds",
    [
        ([2.0, 3.0, 4.0, 2.0], (3, 5, 2, 6)),  # integer edges: exactly the pixels inside
        ([2.5, 0.5, 1.0, 1.0], (1, 2, 3, 4)),  # edges on pixel centres: (x0, x1] -> column 3, row 1 only
        ([2.4, 0.0, 0.2, 1.0], (0, 1, 2, 3)),  # thin box covering pixel 2's centre
        ([2.6, 0.0, 0.3, 1.0], (0, 1, 3, 3)),  # thin box between centres: covers nothing
        ([-5.0, -5.0, 100.0, 100.0], (0, 6, 0, 7)),  # clipped to the 6 x 7 image
    ],
)
def test_box_pixel_bounds_known_cases(bbox, bounds):
    assert oracles.box_to_pixel_bounds(bbox, 6, 7) == bounds


def test_box_polygon_is_the_four_corners():
    assert masks.box_polygon([1, 2, 3, 4]) == [[1.0, 2.0, 4.0, 2.0, 4.0, 6.0, 1.0, 6.0]]

"""mal_cli.geometry: margins, expansion, crop sampling (and its reflection), box masks, paste-back."""

from __future__ import annotations

import numpy as np
import oracles  # slow references (tests/oracles.py)
import pycocotools.mask as mask_utils
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mal_cli import geometry
from mal_cli.geometry import Margins


def _linear_image(height: int, width: int, a: float = 3.0, b: float = 7.0, c: float = 5.0) -> torch.Tensor:
    """(1, H, W) image whose pixel (i, j) holds f(x, y) = a x + b y + c at its centre (j + 0.5, i + 0.5)."""
    ys = torch.arange(height, dtype=torch.float64) + 0.5
    xs = torch.arange(width, dtype=torch.float64) + 0.5
    return (a * xs[None, :] + b * ys[:, None] + c).unsqueeze(0)


def _centres(start: float, end: float, size: int) -> np.ndarray:
    return start + (np.arange(size) + 0.5) * (end - start) / size


def _pycocotools_box(box, height, width) -> np.ndarray:
    x0, y0, x1, y1 = box
    rle = mask_utils.frPyObjects([[x0, y0, x1, y0, x1, y1, x0, y1]], height, width)
    return mask_utils.decode(rle)[:, :, 0]


# --- margins and expansion ------------------------------------------------------------------------------


def test_random_margins_ranges_and_gate_split():
    rng = np.random.default_rng(0)
    box = (10.0, 20.0, 50.0, 40.0)  # 40 x 20
    widths, heights, lefts = [], [], []
    for _ in range(5000):
        m = geometry.random_margins(rng, 1.2)
        for v in (m.left, m.top, m.right, m.bottom):
            assert 0.0 <= v <= 1.2
        # The gate splits one U(0, theta) draw per side: left + right can never reach 2 theta.
        x0, y0, x1, y1 = geometry.expand_box(box, m)
        widths.append((x1 - x0) / 40.0)
        heights.append((y1 - y0) / 20.0)
        lefts.append(m.left)
        assert x0 <= 10.0 and y0 <= 20.0 and x1 >= 50.0 and y1 >= 40.0
    widths, heights = np.array(widths), np.array(heights)
    # Crop is 1.0-1.6x the box per axis for theta = 1.2 (half-extent margins: (l + r) / 2 <= 0.6).
    assert widths.min() >= 1.0 and widths.max() <= 1.6 + 1e-9
    assert heights.min() >= 1.0 and heights.max() <= 1.6 + 1e-9
    # ... and the range is actually used (not e.g. always centred / always 1.0).
    assert widths.max() > 1.5 and widths.min() < 1.05
    assert np.std(lefts) > 0.1


def test_random_margins_gate_splits_between_sides():
    """With a fixed gate gx, left = u1 gx and right = u3 (1 - gx): check against the same draws."""
    seed = 123
    m = geometry.random_margins(np.random.default_rng(seed), 1.2)
    u1, u2, u3, u4 = np.random.default_rng(seed).uniform(0.0, 1.2, size=4)
    rng = np.random.default_rng(seed)
    rng.uniform(0.0, 1.2, size=4)
    gx, gy = rng.uniform(0.0, 1.0, size=2)
    assert m == Margins(u1 * gx, u2 * gy, u3 * (1 - gx), u4 * (1 - gy))


def test_expand_box_formula():
    box = (10.0, 20.0, 30.0, 60.0)  # centre (20, 40), half-extents 10, 20
    m = Margins(left=0.5, top=0.25, right=1.0, bottom=0.0)
    assert geometry.expand_box(box, m) == pytest.approx((20 - 10 * 1.5, 40 - 20 * 1.25, 20 + 10 * 2.0, 40 + 20 * 1.0))


def test_label_crop_is_1_3x():
    box = (7.0, 11.0, 107.0, 61.0)
    x0, y0, x1, y1 = geometry.crop_region(box, Margins.uniform())
    assert geometry.LABEL_MARGIN == 0.3
    assert (x1 - x0) == pytest.approx(1.3 * 100) and (y1 - y0) == pytest.approx(1.3 * 50)
    assert ((x0 + x1) / 2, (y0 + y1) / 2) == pytest.approx((57.0, 36.0))  # centred


# --- box masks and pixel bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "box, region, size",
    [
        ((10.0, 20.0, 30.0, 60.0), (4.0, 14.0, 36.0, 66.0), 16),
        ((10.3, 20.7, 30.9, 41.1), (2.0, 3.0, 50.0, 47.0), 24),
        ((0.0, 0.0, 8.0, 8.0), (0.0, 0.0, 8.0, 8.0), 8),  # box edges exactly on crop-pixel edges
        ((1.0, 1.0, 5.0, 3.0), (0.0, 0.0, 8.0, 8.0), 16),  # box edges exactly on crop-pixel centres
    ],
)
def test_box_mask_is_one_exactly_where_crop_centres_are_inside(box, region, size):
    mask = geometry.box_mask(box, region, size).numpy()
    xs = _centres(region[0], region[2], size)
    ys = _centres(region[1], region[3], size)
    inside = ((ys[:, None] > box[1]) & (ys[:, None] <= box[3])) & ((xs[None, :] > box[0]) & (xs[None, :] <= box[2]))
    np.testing.assert_array_equal(mask, inside.astype(np.float32))
    assert mask.sum() > 0


def test_box_mask_thin_box_marks_nearest_line():
    # A box thinner than a crop pixel, between two centres: still one column (the nearest) is positive.
    mask = geometry.box_mask((4.1, 1.0, 4.2, 7.0), (0.0, 0.0, 8.0, 8.0), 8)
    assert mask.sum(0).nonzero().flatten().tolist() == [4]  # centre 4.5 is nearest the box's 4.15 (3.5 is not)
    assert mask[:, 4].sum() == 6


def test_box_pixel_bounds_matches_pycocotools_on_random_boxes():
    rng = np.random.default_rng(1)
    for t in range(1500):
        height, width = (int(v) for v in rng.integers(3, 50, 2))
        x0, x1 = np.sort(rng.uniform(-8, width + 8, 2))
        y0, y1 = np.sort(rng.uniform(-8, height + 8, 2))
        if t % 3 == 0:  # exact half-integers and integers: the rounding edge cases
            x0, x1, y0, y1 = (round(v * 2) / 2 for v in (x0, x1, y0, y1))
        box = (float(x0), float(y0), float(x1), float(y1))
        r0, r1, c0, c1 = geometry.box_pixel_bounds(box, (height, width))
        ours = np.zeros((height, width), np.uint8)
        ours[r0:r1, c0:c1] = 1
        np.testing.assert_array_equal(
            ours, _pycocotools_box(box, height, width), err_msg=f"box {box} in {height}x{width}"
        )


@pytest.mark.parametrize(
    "box, bounds",
    [
        ((0.5, 0.5, 2.5, 1.5), (1, 2, 1, 3)),  # centre exactly on the low edge is out, on the high edge in
        ((0.0, 0.0, 4.0, 3.0), (0, 3, 0, 4)),
        ((-5.0, -5.0, 100.0, 100.0), (0, 6, 0, 7)),  # clipped
        ((2.6, 1.0, 2.9, 2.0), (1, 2, 3, 3)),  # between centres: empty, not negative
        ((8.0, 1.0, 9.0, 12.0), (1, 6, 7, 7)),  # right of / below the image: empty, and still inside it
        ((-9.0, -9.0, -8.0, -8.0), (0, 0, 0, 0)),
    ],
)
def test_box_pixel_bounds_known_cases(box, bounds):
    assert geometry.box_pixel_bounds(box, (6, 7)) == bounds


# --- crop sampling --------------------------------------------------------------------------------------


def test_crop_samples_the_function_at_the_computed_centres():
    height, width = 40, 50
    image = _linear_image(height, width)
    region = (6.3, 4.1, 41.7, 30.9)  # inside [0.5, W - 0.5] x [0.5, H - 0.5]: bilinear is exact for f
    size = 13
    crop = geometry.crop_image(image, region, size)[0].double().numpy()
    xs = _centres(region[0], region[2], size)
    ys = _centres(region[1], region[3], size)
    expected = 3.0 * xs[None, :] + 7.0 * ys[:, None] + 5.0
    np.testing.assert_allclose(crop, expected, atol=2e-3)
    # crop_images (the batched path) agrees with crop_image
    batched = geometry.crop_images(image, [region, (1.0, 1.0, 9.0, 9.0)], size)
    assert batched.shape == (2, 1, size, size)
    torch.testing.assert_close(batched[0], geometry.crop_image(image, region, size))


def test_crop_outside_the_image_reflects_at_the_border():
    height, width = 10, 12
    rng = np.random.default_rng(2)
    pixels = torch.from_numpy(rng.integers(0, 256, (1, height, width)).astype(np.uint8))
    # One image pixel per crop pixel (19 x 19), hanging 4 px over the left/top edges, 3 / 5 over the right/bottom.
    region = (-4.0, -4.0, width + 3.0, height + 5.0)
    size = 19
    crop = geometry.crop_image(pixels, region, size)[0].numpy()
    cols = np.arange(-4, width + 3)
    rows = np.arange(-4, height + 5)

    def mirror(k, n):  # symmetric reflection: -1 -> 0, -2 -> 1, n -> n - 1, n + 1 -> n - 2
        k = np.where(k < 0, -k - 1, k)
        return np.where(k >= n, 2 * n - k - 1, k)

    expected = pixels[0].numpy()[mirror(rows, height)[:, None], mirror(cols, width)[None, :]]
    np.testing.assert_allclose(crop, expected.astype(np.float32), atol=1e-3)


def test_reflection_far_outside_is_periodic_and_in_range():
    coords = torch.tensor([-0.5, -10.5, 10.5, 25.5, -25.5, 3.5], dtype=torch.float64)
    out = geometry._reflect(coords, 10)
    assert out.tolist() == [0.5, 9.5, 9.5, 5.5, 5.5, 3.5]


# --- paste-back -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "box, hw",
    [
        ((10.2, 5.7, 40.9, 33.3), (50, 60)),
        ((-6.0, -3.5, 20.0, 15.5), (30, 25)),  # hangs over the top-left
        ((50.0, 20.0, 70.5, 41.0), (40, 60)),  # hangs over the bottom-right
    ],
)
def test_paste_of_all_ones_reproduces_the_box_window(box, hw):
    region = geometry.crop_region(box, Margins.uniform())
    window_mask, window = oracles.paste_box_mask(torch.ones(16, 16), box, region, hw)
    full = np.zeros(hw, np.uint8)
    r0, r1, c0, c1 = window
    full[r0:r1, c0:c1] = window_mask
    np.testing.assert_array_equal(full, _pycocotools_box(box, *hw))
    assert window_mask.all() and window_mask.size > 0


def test_paste_of_box_mask_crop_is_inside_and_fills_box_interior():
    box, hw = (10.0, 10.0, 42.0, 30.0), (50, 60)
    region = geometry.crop_region(box, Margins(0.5, 0.2, 0.1, 0.7))
    crop_mask = geometry.box_mask(box, region, 64)
    window_mask, (r0, r1, c0, c1) = oracles.paste_box_mask(crop_mask, box, region, hw)
    assert (r0, r1, c0, c1) == (10, 30, 10, 42)
    assert window_mask[1:-1, 1:-1].all()  # the crop's box mask pastes back as the box (edges: bilinear)


def test_crop_then_paste_of_a_smooth_map_inverts_the_crop():
    height, width = 60, 80
    image = _linear_image(height, width, a=0.5, b=-0.25, c=40.0)
    box = (20.3, 15.6, 55.2, 44.9)
    region = geometry.crop_region(box, Margins(0.3, 0.1, 0.2, 0.4))
    size = 48
    crop = geometry.crop_image(image, region, size)[0]
    window = geometry.box_pixel_bounds(box, (height, width))
    pasted = oracles.paste_window(crop, region, window).double().numpy()
    r0, r1, c0, c1 = window
    np.testing.assert_allclose(pasted, image[0, r0:r1, c0:c1].numpy(), atol=5e-3)


def test_degenerate_boxes_do_not_crash():
    hw = (20, 30)
    image = torch.zeros(3, *hw, dtype=torch.uint8)
    for box in [
        (5.0, 5.0, 5.0, 5.0),
        (5.0, 5.0, 5.0, 12.0),
        (3.0, 7.5, 14.0, 7.5),
        (-3.0, -3.0, -3.0, -3.0),
        (40.0, 5.0, 40.0, 9.0),
    ]:
        region = geometry.crop_region(box, Margins.uniform())
        assert region[2] - region[0] >= 1.0 - 1e-9 and region[3] - region[1] >= 1.0 - 1e-9
        crop = geometry.crop_image(image, region, 16)
        assert crop.shape == (3, 16, 16) and torch.isfinite(crop).all()
        mask = geometry.box_mask(box, region, 16)
        assert mask.sum() >= 1  # MIL still has a positive bag
        window_mask, (r0, r1, c0, c1) = oracles.paste_box_mask(torch.ones(16, 16), box, region, hw)
        assert window_mask.shape == (r1 - r0, c1 - c0)
        assert (r1 - r0) * (c1 - c0) == 0  # a zero-area box covers no pixel centre


@settings(max_examples=150, deadline=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    x0=st.floats(-60, 100, allow_nan=False),
    y0=st.floats(-60, 100, allow_nan=False),
    w=st.floats(0, 80, allow_nan=False),
    h=st.floats(0, 80, allow_nan=False),
    margin=st.floats(0, 1.2),
    size=st.sampled_from([1, 4, 8, 13]),
    fill=st.floats(0, 1),
)
def test_crop_paste_property(height, width, x0, y0, w, h, margin, size, fill):
    box = (x0, y0, x0 + w, y0 + h)
    region = geometry.crop_region(box, Margins.uniform(margin))
    image = torch.arange(3 * height * width, dtype=torch.float32).reshape(3, height, width) % 251
    crop = geometry.crop_image(image, region, size)
    assert crop.shape == (3, size, size) and torch.isfinite(crop).all()
    assert crop.min() >= image.min() - 1e-3 and crop.max() <= image.max() + 1e-3  # reflection stays in the image
    window_mask, (r0, r1, c0, c1) = oracles.paste_box_mask(torch.full((size, size), fill), box, region, (height, width))
    assert 0 <= r0 <= r1 <= height and 0 <= c0 <= c1 <= width
    assert window_mask.shape == (r1 - r0, c1 - c0)
    # The window lies inside the clipped box: every window pixel's centre is inside the box.
    if r1 > r0 and c1 > c0:
        assert box[0] < c0 + 0.5 and c1 - 0.5 <= box[2]
        assert box[1] < r0 + 0.5 and r1 - 0.5 <= box[3]
    assert window_mask.sum() == (window_mask.size if fill >= 0.5 else 0)


def test_boxes_pixel_bounds_is_the_scalar_rule():
    """The array form (the input check runs it on millions of boxes) gives box_pixel_bounds' integers, box by box,
    including boxes past, outside and on pixel-centre edges of the image."""
    rng = np.random.default_rng(3)
    n = 2000
    on_centre = rng.random((2, n)) < 0.5  # half the corners exactly on a pixel centre (j + 0.5)
    x0 = np.where(on_centre[0], np.round(rng.uniform(-20, 60, n)) + 0.5, rng.uniform(-20, 60, n).round(2))
    y0 = np.where(on_centre[1], np.round(rng.uniform(-20, 60, n)) + 0.5, rng.uniform(-20, 60, n).round(2))
    x1 = x0 + rng.uniform(0, 40, n).round(1)
    y1 = y0 + rng.uniform(0, 40, n).round(1)
    heights, widths = rng.integers(1, 50, n), rng.integers(1, 50, n)
    got = geometry.boxes_pixel_bounds(np.stack([x0, y0, x1, y1], axis=1), heights, widths)
    want = [
        geometry.box_pixel_bounds((a, b, c, d), (int(h), int(w)))
        for a, b, c, d, h, w in zip(x0, y0, x1, y1, heights, widths)
    ]
    assert got.tolist() == [list(map(float, bounds)) for bounds in want]

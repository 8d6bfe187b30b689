"""Big photos: crops read only the pixels they sample, JPEGs of large boxes decode at a reduced size, and the
masks stay close to the full decode's."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from mal_cli import geometry, images
from mal_cli.labeling import LabelOptions, label


def _smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An (H, W, 3) uint8 photo-like image: smooth colour gradients and a few discs (JPEG keeps it well)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    rgb = np.stack([128 + 100 * np.sin(6 * xs + c) * np.cos(4 * ys - c) for c in rng.uniform(0, 3, 3)], -1)
    for _ in range(6):
        cy, cx, r = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width, rng.uniform(0.05, 0.2) * height
        disc = (np.mgrid[0:height, 0:width][0] - cy) ** 2 + (np.mgrid[0:height, 0:width][1] - cx) ** 2 < r * r
        rgb[disc] = rng.uniform(0, 255, 3)
    return rgb.clip(0, 255).astype(np.uint8)


def test_crop_images_samples_what_crop_image_samples():
    """Gathered rows/columns give the crops of a whole-image grid_sample: inside, across and outside the border."""
    rng = np.random.default_rng(1)
    for height, width in ((37, 53), (480, 640), (1, 9)):
        image = torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8))
        regions = [
            (-0.4 * width, -0.2 * height, 0.6 * width, 0.9 * height),
            (0.3 * width, 0.25 * height, 0.31 * width, 0.3 * height),
            (0.9 * width, 0.8 * height, 2.1 * width, 1.7 * height),
            (0.0, 0.0, float(width), float(height)),
        ]
        for size in (7, 32):
            crops = geometry.crop_images(image, regions, size)
            assert crops.shape == (len(regions), 3, size, size) and crops.dtype == torch.float32
            for crop, region in zip(crops, regions):
                torch.testing.assert_close(crop, geometry.crop_image(image, region, size), atol=0.05, rtol=0)
    assert geometry.crop_images(image, [], 8).shape == (0, 3, 8, 8)


def test_draft_reduction_is_the_largest_that_keeps_every_region_at_its_crop_size():
    assert images.draft_reduction([(0, 0, 1000, 900)], [224]) == 4  # 900 / 224 = 4.02
    assert images.draft_reduction([(0, 0, 1000, 900), (5, 5, 500, 400)], [224, 224]) == 1  # 400 < 2 x 224
    assert images.draft_reduction([(0, 0, 1000, 900), (5, 5, 500, 400)], [224, 168]) == 2
    assert images.draft_reduction([(0, 0, 5000, 4000)], [224]) == 8
    assert images.draft_reduction([], []) == 1


def test_reduced_decode_is_jpeg_only_and_keeps_the_full_size_and_orientation(tmp_path):
    pixels = _smooth_image(600, 800)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    array, full_hw, scale = images.load_rgb_reduced(tmp_path / "a.jpg", reduce=2)
    assert array.shape == (300, 400, 3) and full_hw == (600, 800) and scale == 0.5
    array, full_hw, scale = images.load_rgb_reduced(tmp_path / "a.png", reduce=2)
    assert array.shape == (600, 800, 3) and full_hw == (600, 800) and scale == 1.0
    assert np.array_equal(images.load_rgb(tmp_path / "a.png"), pixels)
    # EXIF orientation 6 (stored 800 x 600, shown 600 wide x 800 high): applied unless the recorded size is the
    # stored one.
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = 6
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    array, full_hw, _ = images.load_rgb_reduced(tmp_path / "r.jpg", reduce=4)
    assert array.shape == (200, 150, 3) and full_hw == (800, 600)
    array, full_hw, _ = images.load_rgb_reduced(tmp_path / "r.jpg", expected_hw=(600, 800), reduce=4)
    assert array.shape == (150, 200, 3) and full_hw == (600, 800)
    full = images.load_rgb(tmp_path / "r.jpg")
    assert full.shape == (800, 600, 3)


def test_crops_of_a_reduced_decode_are_close_to_the_full_decode(tmp_path):
    Image.fromarray(_smooth_image(1200, 1600)).save(tmp_path / "a.jpg", quality=92)
    full = torch.from_numpy(images.load_rgb(tmp_path / "a.jpg").copy()).permute(2, 0, 1)
    regions = [(100.0, 80.0, 1100.0, 1000.0), (700.0, 300.0, 1550.0, 1150.0)]
    reduce = images.draft_reduction(regions, [224, 224])
    assert reduce == 2
    small, _, scale = images.load_rgb_reduced(tmp_path / "a.jpg", reduce=reduce)
    reduced = geometry.crop_images(
        torch.from_numpy(small.copy()).permute(2, 0, 1), images.scale_regions(regions, scale), 224
    )
    exact = geometry.crop_images(full, regions, 224)
    assert (reduced - exact).abs().mean() < 2.0  # grey levels: the DCT-scaled image is a filtered copy
    assert not torch.equal(reduced, exact)


def test_mal_label_decodes_big_jpegs_reduced_and_the_masks_stay_close(tmp_path, monkeypatch):
    """End to end: a JPEG with only large boxes is decoded reduced (fewer pixels), its masks' IoU with the full
    decode stays high, and the file's recorded size and boxes are what the output refers to."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(_smooth_image(1200, 1600)).save(folder / "big.jpg", quality=92)
    boxes = [[150.0, 100.0, 800.0, 700.0], [700.0, 350.0, 800.0, 750.0]]
    doc = {
        "images": [{"id": 1, "file_name": "big.jpg", "height": 1200, "width": 1600}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, b in enumerate(boxes)
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "boxes.json").write_bytes(orjson.dumps(doc))
    options = LabelOptions(workers=0, device="cpu", precision="fp32")  # the shipped labeler: masks worth comparing
    reductions = []
    real = images.draft_reduction
    monkeypatch.setattr(images, "draft_reduction", lambda *a: reductions.append(real(*a)) or reductions[-1])
    label(str(tmp_path / "boxes.json"), str(folder), str(tmp_path / "reduced.json"), options, progress_bar=False)
    assert reductions == [4]  # regions of 1040 x 910 and 1040 x 975 px: 4 x 224 fits, 8 x 224 does not
    monkeypatch.setattr(images, "draft_reduction", lambda *a: 1)
    label(str(tmp_path / "boxes.json"), str(folder), str(tmp_path / "full.json"), options, progress_bar=False)
    reduced = orjson.loads((tmp_path / "reduced.json").read_bytes())["annotations"]
    full = orjson.loads((tmp_path / "full.json").read_bytes())["annotations"]
    ious = []
    for r, f in zip(reduced, full, strict=True):
        assert r["segmentation"]["size"] == [1200, 1600]
        assert r["area"] > 0.05 * r["bbox"][2] * r["bbox"][3]  # a real mask, not two empty ones compared
        ious.append(mask_utils.iou([r["segmentation"]], [f["segmentation"]], [0])[0][0])
    # Close, not equal: the DCT-scaled image is low-pass filtered, the full one is sampled without a filter.
    # Unscaled regions (a wrong scale) would give IoUs near 0.
    assert min(ious) > 0.8 and np.mean(ious) > 0.85


@pytest.mark.parametrize("reduce", [2, 8])
def test_every_reduction_decodes_a_non_multiple_size(tmp_path, reduce):
    Image.fromarray(_smooth_image(301, 459)).save(tmp_path / "odd.jpg")
    array, full_hw, scale = images.load_rgb_reduced(tmp_path / "odd.jpg", reduce=reduce)
    assert full_hw == (301, 459) and scale == 1 / reduce
    assert array.shape[:2] == (-(-301 // reduce), -(-459 // reduce))


def test_scale_regions():
    assert images.scale_regions([(2.0, 4.0, 10.0, 20.0)], 0.5) == [(1.0, 2.0, 5.0, 10.0)]
    assert images.scale_regions([(2.0, 4.0, 10.0, 20.0)], 1.0) == [(2.0, 4.0, 10.0, 20.0)]

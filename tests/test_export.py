"""Output formats: COCO polygons from `mal label --format polygon` and `mal export yolo` (YOLO-seg)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import oracles  # slow references (tests/oracles.py)
import pycocotools.mask as mask_utils
import pytest

from mal_cli import masks
from mal_cli.dataset import Dataset
from mal_cli.errors import InputError
from mal_cli.export import export_yolo, instance_polygons, merge_parts, read_yolo_label
from mal_cli.labeling.postprocess import box_result

DATA_DIR = Path(__file__).parent / "data"
MINI16_JSON = DATA_DIR / "annotations_mini16.json"
MINI16_IMAGES = DATA_DIR / "images"


def _filled(mask: np.ndarray) -> np.ndarray:
    """What any polygon form of a mask can hold: the mask with its holes filled."""
    h, w = mask.shape
    return masks.decode(masks.to_polygons(mask), h, w)


def _tricky_mask() -> np.ndarray:
    m = np.zeros((24, 30), np.uint8)
    m[2:10, 2:12] = 1  # a block ...
    m[4:8, 4:10] = 0  # ... with a hole ...
    m[5:7, 6:8] = 1  # ... and an island inside the hole
    m[15, 20] = 1  # single pixels
    m[16, 21] = 1  # touching the previous one only at a corner
    m[0, 29] = 1  # in the image corner
    m[20:23, 3] = 1  # a 1-pixel-wide line at...
    m[23, 0:8] = 1  # ... the bottom border
    return m


# --- COCO polygons (mal label --format polygon) --------------------------------------------------------


def _check_valid_polygons(polygons: list, height: int, width: int) -> None:
    for poly in polygons:
        assert len(poly) >= 8 and len(poly) % 2 == 0  # >= 4 points: never read as a box or dropped by pycocotools
        assert all(np.isfinite(poly))
    mask_utils.frPyObjects(polygons, height, width)  # pycocotools accepts them


def test_polygon_format_keeps_every_part_and_tiny_parts_are_valid():
    mask = _tricky_mask()
    h, w = mask.shape
    window = (2, 24, 0, 30)  # the mask lives in rows 2.. of a 26 x 30 image
    image_hw = (26, 30)
    result = box_result(mask[:22], window, image_hw, 0.5, "polygon")
    polygons = result["segmentation"]
    _check_valid_polygons(polygons, *image_hw)
    expected = np.zeros(image_hw, np.uint8)
    expected[2:24] = _filled(mask[:22])
    assert np.array_equal(masks.decode(polygons, *image_hw), expected)  # every part kept, pixel-exact
    assert result["area"] == int(expected.sum())
    assert len(polygons) >= 5  # block, two corner-touching pixels, corner pixel, line: separate parts


def test_random_masks_give_valid_exact_polygons():
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        mask = (rng.random((h, w)) < rng.uniform(0.02, 0.7)).astype(np.uint8)
        polygons = masks.to_polygons(mask)
        if not mask.any():
            assert polygons == []
            continue
        _check_valid_polygons(polygons, h, w)
        assert np.array_equal(masks.decode(polygons, h, w), _filled(mask))


# --- YOLO-seg -------------------------------------------------------------------------------------------


def test_merged_polygon_covers_exactly_the_parts():
    rng = np.random.default_rng(1)
    masks_to_try = [_tricky_mask()] + [
        (rng.random((int(h), int(w))) < rng.uniform(0.05, 0.6)).astype(np.uint8)
        for h, w in rng.integers(3, 50, (80, 2))
    ]
    for mask in masks_to_try:
        if not mask.any():
            continue
        h, w = mask.shape
        merged = instance_polygons(oracles.encode(mask), h, w, "merge")
        assert len(merged) == 1
        assert np.array_equal(masks.decode(merged, h, w), _filled(mask))
        lines = instance_polygons(oracles.encode(mask), h, w, "lines")
        assert len(lines) == len(masks.to_polygons(mask))
        largest = instance_polygons(oracles.encode(mask), h, w, "largest")
        assert len(largest) == 1 and masks.area(largest, h, w) == max(masks.area([p], h, w) for p in lines)


def test_merge_parts_bridges_two_squares():
    a = [0, 0, 2, 0, 2, 2, 0, 2]
    b = [5, 0, 7, 0, 7, 2, 5, 2]
    merged = merge_parts([b, a])
    assert len(merged) == 2 * (4 + 4 + 2)  # both loops, each closed once more, joined out and back
    assert masks.area([merged], 3, 8) == 8
    assert merge_parts([]) == [] and merge_parts([[1, 1, 2, 2]]) == []  # no polygon with >= 3 points


def _roundtrip_check(doc: dict, out: Path) -> int:
    """Every YOLO line, re-rasterised, equals its annotation's hole-filled mask. Returns the lines checked."""
    checked = 0
    names = (out / "classes.txt").read_text().splitlines()
    categories = sorted(doc["categories"], key=lambda c: c["id"])
    assert names == [c["name"] for c in categories]
    class_of = {c["id"]: k for k, c in enumerate(categories)}
    by_image: dict = {}
    for ann in doc["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image in doc["images"]:
        h, w = image["height"], image["width"]
        name = image.get("file_name") or image["coco_url"].rsplit("/", 1)[-1]
        label_file = out / "labels" / Path(name).with_suffix(".txt")
        assert label_file.is_file()
        rows = read_yolo_label(label_file, h, w)
        anns = [
            a for a in by_image.get(image["id"], []) if not a.get("iscrowd") and masks.area(a["segmentation"], h, w)
        ]
        assert len(rows) == len(anns)
        for (class_id, polygon), ann in zip(rows, anns):
            assert class_id == class_of[ann["category_id"]]
            assert min(polygon) >= 0 and max(polygon[0::2]) <= w and max(polygon[1::2]) <= h
            back = masks.decode([polygon], h, w)
            truth = _filled(masks.decode(ann["segmentation"], h, w))
            iou = (back & truth).sum() / max((back | truth).sum(), 1)
            assert iou > 0.995, (ann["id"], iou)  # 6 decimals of normalised coordinates: sub-pixel error
            checked += 1
    return checked


def test_export_yolo_fixture_roundtrip(tmp_path, mini16_raw):
    out = tmp_path / "yolo"
    stats = export_yolo(Dataset.from_dict(mini16_raw, "mini16.json"), out)
    assert stats["images"] == 16 and stats["lines"] == 141 and stats["classes"] == 80
    assert len(list((out / "labels").glob("*.txt"))) == 16
    yaml = (out / "data.yaml").read_text()
    assert "nc: 80" in yaml and '  0: "person"' in yaml and "train: images" in yaml
    assert _roundtrip_check(mini16_raw, out) == 141


def test_export_yolo_skips_crowd_and_empty_and_writes_background_files(tmp_path, mini16_raw):
    doc = mini16_raw
    doc["annotations"][0]["iscrowd"] = 1
    image = next(im for im in doc["images"] if im["id"] == doc["annotations"][1]["image_id"])
    doc["annotations"][1]["segmentation"] = {
        "size": [image["height"], image["width"]],
        "counts": [image["height"] * image["width"]],
    }
    emptied = doc["images"][-1]["id"]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != emptied]
    out = tmp_path / "yolo"
    stats = export_yolo(Dataset.from_dict(doc), out, parts="lines")
    assert stats["skipped_crowd"] == 1 and stats["skipped_empty"] == 1
    assert (out / "labels" / Path(doc["images"][-1]["file_name"]).with_suffix(".txt")).read_text() == ""
    with pytest.raises(InputError, match="--parts"):
        export_yolo(Dataset.from_dict(doc), out, parts="biggest")


def test_cli_label_pipe_into_export(tmp_path):
    out = tmp_path / "yolo"
    images_link = tmp_path / "yolo_linked"
    pipe = subprocess.run(
        f'"{sys.executable}" -m mal_cli label - --images "{MINI16_IMAGES}" --method box --out - --no-progress '
        f'< "{MINI16_JSON}" | "{sys.executable}" -m mal_cli export yolo - --out "{out}"',
        shell=True,
        capture_output=True,
        text=True,
    )
    assert pipe.returncode == 0, pipe.stderr
    assert pipe.stdout == ""  # the summary lines go to stderr
    assert "141 lines" in pipe.stderr
    rows = read_yolo_label(out / "labels" / "000000000328.txt", 491, 640)
    assert rows and all(len(p) == 8 for _, p in rows)  # --method box: each mask is its box, 4 corners
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mal_cli",
            "export",
            "yolo",
            str(MINI16_JSON),
            "--out",
            str(images_link),
            "--link-images",
            str(MINI16_IMAGES),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    linked = images_link / "images" / "000000000328.jpg"
    assert linked.is_symlink() and linked.resolve() == (MINI16_IMAGES / "000000000328.jpg").resolve()
    bad = subprocess.run(
        [sys.executable, "-m", "mal_cli", "export", "yolo", str(MINI16_JSON), "--out", str(out), "--parts", "nope"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("mal: error:") and len(bad.stderr.strip().splitlines()) == 1

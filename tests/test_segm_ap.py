"""mal_cli.segm_ap: chunked COCO segm AP against plain pycocotools COCOeval, number for number."""

from __future__ import annotations

import numpy as np
import oracles  # slow references (tests/oracles.py)
import pytest

from mal_cli import masks, segm_ap
from mal_cli.segm_ap import ChunkedSegmAP, precision_curve


def plain_cocoeval(images: list[dict], categories: list[dict], gt_anns: list[dict], dets: list[dict]) -> list[float]:
    """stats[:6] of one plain COCOeval run over everything (the reference)."""
    return oracles.cocoeval_segm_stats({"images": images, "categories": categories, "annotations": gt_anns}, dets)


def chunked(
    images: list[dict], categories: list[dict], gt_anns: list[dict], dets: list[dict], per_chunk: int
) -> list[float]:
    acc = ChunkedSegmAP(c["id"] for c in categories)
    ordered = sorted(images, key=lambda image: image["id"])
    for start in range(0, len(ordered), per_chunk):
        chunk = ordered[start : start + per_chunk]
        ids = {image["id"] for image in chunk}
        acc.add_chunk(
            chunk,
            [dict(a) for a in gt_anns if a["image_id"] in ids],
            [dict(d) for d in dets if d["image_id"] in ids],
        )
    return list(acc.summary().values())


def _rle(segmentation, image: dict) -> dict:
    return masks.to_rle(segmentation, image["height"], image["width"])


def _fixture_case(raw: dict, score_mode: str) -> tuple[list, list, list, list]:
    """The 16-image fixture plus two empty images; crowd GT, duplicates, misses, wrong classes, score ties."""
    rng = np.random.default_rng(7)
    images = [dict(image) for image in raw["images"]]
    images += [{"id": 900001, "height": 100, "width": 120}, {"id": 900002, "height": 50, "width": 60}]  # no GT
    by_id = {image["id"]: image for image in images}
    categories = raw["categories"]
    gt_anns = []
    for i, ann in enumerate(raw["annotations"]):
        gt = dict(ann, segmentation=_rle(ann["segmentation"], by_id[ann["image_id"]]))
        gt["iscrowd"] = int(i % 9 == 4)  # some crowd GT (no fixture GT is crowd)
        gt_anns.append(gt)
    skip = {raw["images"][1]["id"], raw["images"][6]["id"]}  # images with GT but no detection
    dets = []
    for ann in raw["annotations"]:
        image = by_id[ann["image_id"]]
        if image["id"] in skip:
            continue
        for _ in range(int(rng.integers(0, 3))):  # 0 = missed, 2 = a duplicate
            segmentation = ann["segmentation"] if rng.random() < 0.4 else masks.box_polygon(ann["bbox"])
            category = ann["category_id"] if rng.random() < 0.85 else int(rng.choice([c["id"] for c in categories]))
            dets.append(
                {
                    "image_id": image["id"],
                    "category_id": category,
                    "segmentation": _rle(segmentation, image),
                    "score": 1.0 if score_mode == "equal" else float(np.round(rng.random(), 1)),
                }
            )
    # False positives on an image without GT (the other empty image gets nothing).
    empty = by_id[900001]
    for j in range(3):
        dets.append(
            {
                "image_id": 900001,
                "category_id": categories[j]["id"],
                "score": 0.5 if score_mode != "equal" else 1.0,
                "segmentation": _rle(masks.box_polygon([10.0 * j, 5.0, 30.0, 40.0 + 10 * j]), empty),
            }
        )
    order = rng.permutation(len(dets))  # results order is not image order
    return images, categories, gt_anns, [dets[i] for i in order]


@pytest.mark.parametrize("score_mode", ["rounded", "equal"])
def test_chunked_equals_plain_cocoeval_on_fixture(mini16_raw, score_mode, monkeypatch):
    images, categories, gt_anns, dets = _fixture_case(mini16_raw, score_mode)
    expected = plain_cocoeval(images, categories, gt_anns, dets)
    assert 0.1 < expected[0] < 0.9  # a non-trivial case
    for per_chunk in (1, 3, 5, 100):
        assert chunked(images, categories, gt_anns, dets, per_chunk) == expected, per_chunk
    monkeypatch.setattr(segm_ap, "_MERGE_EVERY", 2)  # chunk arrays merged into blocks along the way
    for per_chunk in (1, 3):
        assert chunked(images, categories, gt_anns, dets, per_chunk) == expected, per_chunk


def _square(image: dict, top: int, left: int, size: int = 8) -> dict:
    mask = np.zeros((image["height"], image["width"]), np.uint8)
    mask[top : top + size, left : left + size] = 1
    rle = oracles.encode(mask)
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


def test_per_image_max_dets_truncation_is_kept():
    """COCOeval keeps each image's 100 best detections per category before pooling the images.

    Image 1: 100 false positives at 0.9 and its one true positive at 0.5, 101st, which COCOeval drops.
    Image 2: one true positive at 0.95. Pooled without the per-image cut, image 1's hit would come back
    at the end of the ranking and add recall above 0.5.
    """
    images = [{"id": 1, "height": 64, "width": 64}, {"id": 2, "height": 64, "width": 64}]
    categories = [{"id": 1, "name": "a"}]
    gt_anns = [
        {
            "id": 11,
            "image_id": 1,
            "category_id": 1,
            "segmentation": _square(images[0], 0, 0),
            "area": 64.0,
            "iscrowd": 0,
        },
        {
            "id": 12,
            "image_id": 2,
            "category_id": 1,
            "segmentation": _square(images[1], 0, 0),
            "area": 64.0,
            "iscrowd": 0,
        },
    ]
    far = _square(images[0], 40, 40)
    dets = [{"image_id": 1, "category_id": 1, "segmentation": far, "score": 0.9} for _ in range(100)]
    dets.append({"image_id": 1, "category_id": 1, "segmentation": _square(images[0], 0, 0), "score": 0.5})
    dets.append({"image_id": 2, "category_id": 1, "segmentation": _square(images[1], 0, 0), "score": 0.95})
    expected = plain_cocoeval(images, categories, gt_anns, dets)
    assert expected[0] == pytest.approx(51 / 101)  # recall 0.5 at precision 1, nothing above
    for per_chunk in (1, 2):
        assert chunked(images, categories, gt_anns, dets, per_chunk) == expected

    # The same pool without the per-image cut scores differently, so the check above has teeth.
    rec_thrs = np.linspace(0, 1, 101)
    scores = np.array([0.9] * 100 + [0.5] + [0.95])
    hits = np.array([False] * 100 + [True, True])
    matched = np.tile(hits, (10, 1))
    uncut = precision_curve(scores, matched, np.zeros_like(matched), 2, rec_thrs)
    assert uncut.mean() == pytest.approx((51 + 50 * 2 / 102) / 101)
    assert uncut.mean() != pytest.approx(expected[0])


def test_chunks_must_come_in_image_order():
    acc = ChunkedSegmAP([1])
    image = {"id": 5, "height": 16, "width": 16}
    gt = {"id": 1, "image_id": 5, "category_id": 1, "segmentation": _square(image, 0, 0), "area": 64.0, "iscrowd": 0}
    acc.add_chunk([image], [gt], [])
    with pytest.raises(ValueError, match="ascending image-id order"):
        acc.add_chunk([{"id": 3, "height": 16, "width": 16}], [], [])
    # No detections anywhere: every category with GT has precision 0, as in COCOeval.
    assert acc.summary()["AP"] == 0.0

"""mal_cli.evaluate and `mal eval`: metrics on hand-made cases, AP on the fixture, LVIS, the CLI."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import numpy as np
import oracles  # slow references (tests/oracles.py)
import orjson
import pytest

from mal_cli import masks
from mal_cli.dataset import Dataset
from mal_cli.errors import InputError
from mal_cli.evaluate import evaluate, pair_predictions, spearman

H = W = 40


def _square(top: int, left: int, size: int = 10) -> dict:
    mask = np.zeros((H, W), np.uint8)
    mask[top : top + size, left : left + size] = 1
    return oracles.encode(mask)


def _gt(annotations: list[dict]) -> Dataset:
    """A one-image COCO dataset; annotations give id, category_id, segmentation (+ optional keys)."""
    anns = []
    for ann in annotations:
        seg = ann["segmentation"]
        bbox = [float(v) for v in masks_to_bbox(seg)]
        full = {"image_id": 1, "bbox": bbox, "iscrowd": 0, "area": float(masks.area(seg, H, W))}
        full.update(ann)
        anns.append(full)
    return Dataset.from_dict(
        {
            "images": [{"id": 1, "file_name": "a.jpg", "height": H, "width": W}],
            "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        },
        "gt.json",
    )


def masks_to_bbox(seg) -> list[float]:
    m = masks.decode(seg, H, W)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return [cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]]


def _pred(gt: Dataset, segmentation_by_id: dict) -> Dataset:
    raw = copy.deepcopy(gt.raw)
    raw["annotations"] = [
        dict(a, segmentation=segmentation_by_id[a["id"]]) for a in raw["annotations"] if a["id"] in segmentation_by_id
    ]
    return Dataset.from_dict(raw, "pred.json")


def test_half_overlapping_squares_have_iou_one_third():
    gt = _gt([{"id": 1, "category_id": 1, "segmentation": _square(0, 0)}])
    report = evaluate(_pred(gt, {1: _square(0, 5)}), gt, compute_ap=False)
    assert report.ious == {1: pytest.approx(50 / 150)}
    assert report.instance_miou == pytest.approx(1 / 3)


def test_instance_class_size_crowd_and_missing():
    gt = _gt(
        [
            {"id": 1, "category_id": 1, "segmentation": _square(0, 0)},  # IoU 1
            {"id": 2, "category_id": 1, "segmentation": _square(20, 0)},  # IoU 1/3
            {"id": 3, "category_id": 2, "segmentation": _square(0, 20)},  # IoU 0
            {"id": 4, "category_id": 2, "segmentation": _square(20, 20), "area": 5000.0},  # missing; "medium"
            {"id": 5, "category_id": 1, "segmentation": _square(30, 30), "iscrowd": 1},  # crowd, IoU 1
        ]
    )
    pred = _pred(gt, {1: _square(0, 0), 2: _square(20, 5), 3: _square(10, 30), 5: _square(30, 30)})
    report = evaluate(pred, gt, compute_ap=False)
    assert report.num_gt == 4 and report.num_matched == 3
    assert report.instance_miou == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert report.class_miou == pytest.approx(((1 + 1 / 3) / 2 + 0) / 2)
    assert report.num_classes == 2
    assert report.miou_missing_as_zero == pytest.approx((1 + 1 / 3) / 4)
    assert report.missing_ids == [4]
    assert report.by_size["small"].count == 3 and report.by_size["medium"].count == 0
    assert report.by_size["large"].miou is None
    assert (report.num_crowd, report.num_crowd_matched, report.crowd_miou) == (1, 1, 1.0)
    assert report.ious[5] == 1.0
    data = orjson.loads(orjson.dumps(report.to_dict()))
    assert data["missing_ids"] == [4] and [5, 1.0] in data["ious"]


def test_results_list_pairs_by_image_and_identical_bbox():
    gt = _gt(
        [
            {"id": 1, "category_id": 1, "segmentation": _square(0, 0)},
            {"id": 2, "category_id": 1, "segmentation": _square(20, 20)},
        ]
    )
    box1 = gt.annotations[0]["bbox"]
    results = [
        {"image_id": 1, "category_id": 1, "bbox": list(box1), "score": 0.5, "segmentation": _square(0, 5)},
        {"image_id": 1, "category_id": 1, "bbox": [1.0, 1.0, 2.0, 2.0], "segmentation": _square(1, 1, 2)},
    ]
    pairs, unmatched = pair_predictions(results, gt)
    assert [g["id"] for g, _ in pairs] == [1] and len(unmatched) == 1
    report = evaluate(results, gt)
    assert report.ious == {1: pytest.approx(1 / 3)}
    assert report.num_unmatched_predictions == 1 and report.missing_ids == [2]


def test_detection_size_range_comes_from_the_mask_not_the_bbox(mini16_raw):
    gt = Dataset.from_dict(mini16_raw)
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.5,
            "segmentation": a["segmentation"],
        }
        for a in gt.annotations
    ]
    # One confident false positive: a 2 x 2 mask (small) that carries an image-sized bbox (large).
    # COCO's loadRes would take its area from the bbox when a `bbox` key is present, and charge it
    # to APl instead of APs.
    ann = gt.annotations[0]
    image = gt.image_by_id[ann["image_id"]]
    tiny = np.zeros((image["height"], image["width"]), np.uint8)
    tiny[:2, :2] = 1
    results.append(
        {
            "image_id": ann["image_id"],
            "category_id": ann["category_id"],
            "score": 1.0,
            "bbox": [0.0, 0.0, float(image["width"]), float(image["height"])],
            "segmentation": oracles.encode(tiny),
        }
    )
    report = evaluate(results, gt)
    assert report.num_matched == len(gt.annotations) and report.num_unmatched_predictions == 1
    assert report.ap["APl"] == pytest.approx(1.0)
    assert report.ap["APs"] < 1.0


def test_input_errors():
    gt = _gt([{"id": 1, "category_id": 1, "segmentation": _square(0, 0)}])
    other = copy.deepcopy(gt.raw)
    other["annotations"][0]["id"] = 99
    with pytest.raises(InputError, match="no prediction shares its annotation ids"):
        evaluate(Dataset.from_dict(other, "pred.json"), gt)
    moved = copy.deepcopy(gt.raw)
    moved["images"].append({"id": 2, "file_name": "b.jpg", "height": H, "width": W})
    moved["annotations"][0]["image_id"] = 2
    with pytest.raises(InputError, match="image id 2 is not in the GT"):
        evaluate(Dataset.from_dict(moved, "pred.json"), gt)
    resized = copy.deepcopy(gt.raw)
    resized["images"][0]["height"] = 41
    with pytest.raises(InputError, match="has height 41 but 40"):
        evaluate(Dataset.from_dict(resized, "pred.json"), gt)
    unlabelled = copy.deepcopy(gt.raw)
    del unlabelled["annotations"][0]["segmentation"]
    with pytest.raises(InputError, match="annotation id 1 has no 'segmentation'"):
        evaluate(Dataset.from_dict(unlabelled, "pred.json"), gt)


def test_gt_against_itself_scores_100(mini16_raw):
    gt = Dataset.from_dict(mini16_raw)
    report = evaluate(Dataset.from_dict(copy.deepcopy(mini16_raw)), gt, reference_ap=0.5)
    assert report.instance_miou == 1.0 and report.class_miou == 1.0
    assert report.ap_kind == "coco-segm"
    assert all(v == pytest.approx(1.0) for k, v in report.ap.items() if k != "APs" or report.by_size["small"].count)
    assert report.retention == pytest.approx(2.0)
    assert gt.raw == mini16_raw  # evaluation never mutates the GT document


def _box_filled(gt: Dataset) -> Dataset:
    raw = copy.deepcopy(gt.raw)
    for ann in raw["annotations"]:
        ann["segmentation"] = masks.box_polygon(ann["bbox"])
    return Dataset.from_dict(raw, "boxes.json")


def _as_lvis(raw: dict) -> dict:
    """The COCO fixture in LVIS v1 form: coco_url only, category frequencies, no iscrowd."""
    lvis = copy.deepcopy(raw)
    for image in lvis["images"]:
        image.pop("file_name")
        image["neg_category_ids"], image["not_exhaustive_category_ids"] = [], []
    for i, category in enumerate(lvis["categories"]):
        category["frequency"] = "rcf"[i % 3]
    for ann in lvis["annotations"]:
        ann.pop("iscrowd")
    return lvis


def test_lvis_gt_uses_lvis_eval(mini16_raw):
    gt = Dataset.from_dict(_as_lvis(mini16_raw), "lvis.json")
    assert gt.is_lvis
    perfect = evaluate(Dataset.from_dict(_as_lvis(mini16_raw)), gt)
    assert perfect.ap_kind == "lvis-segm"
    assert perfect.ap["AP"] == pytest.approx(1.0)
    assert {"APr", "APc", "APf"} <= set(perfect.ap)
    boxes = evaluate(_box_filled(gt), gt)
    assert 0.0 < boxes.ap["AP"] < 0.9 and 0.3 < boxes.instance_miou < 0.9


def test_box_filled_masks_score_like_boxes(mini16_raw):
    gt = Dataset.from_dict(mini16_raw)
    report = evaluate(_box_filled(gt), gt)
    # Per instance, the box polygon covers the GT mask (up to rasterisation), so IoU = area / box area.
    for ann in gt.annotations:
        x, y, w, h = ann["bbox"]
        rows = math.floor(y + h - 0.5) - math.floor(y - 0.5)
        cols = math.floor(x + w - 0.5) - math.floor(x - 0.5)
        gt_area = masks.area(
            ann["segmentation"], gt.image_by_id[ann["image_id"]]["height"], gt.image_by_id[ann["image_id"]]["width"]
        )
        assert report.ious[ann["id"]] <= gt_area / (rows * cols) + 1e-9
    assert 0.4 < report.instance_miou < 0.8 and 0.05 < report.ap["AP"] < 0.5


def test_spearman_known_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(1.0)  # ranks, not values
    # Ties get average ranks: [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> 4.5 / sqrt(4.5 * 5).
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


# --- CLI ----------------------------------------------------------------------------------------


def _mal(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mal_cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_eval_json_to_stdout_and_table_to_stderr(mini16_path):
    result = _mal("eval", str(mini16_path), "--gt", str(mini16_path), "--json", "-", "--reference-ap", "50")
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert report["instance_miou"] == 1.0 and report["ap"]["AP"] == pytest.approx(1.0)
    assert report["retention"] == pytest.approx(2.0)
    assert "mIoU" in result.stderr and "retention" in result.stderr


def test_cli_eval_bad_input_is_one_line(tmp_path, mini16_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    result = _mal("eval", str(bad), "--gt", str(mini16_path))
    assert result.returncode == 2
    assert result.stderr.startswith("mal: error: ") and "truncated JSON" in result.stderr
    assert result.stderr.count("\n") == 1


# --- COCO AP in chunks -----------------------------------------------------------------------------


def _plain_cocoeval_ap(gt: Dataset, detections: list[dict]) -> list[float]:
    """stats[:6] of one plain pycocotools COCOeval over the whole GT (what `mal eval` computed before chunking)."""
    annotations = []
    for ann in gt.annotations:
        image = gt.image_by_id[ann["image_id"]]
        annotations.append(dict(ann, segmentation=masks.to_rle(ann["segmentation"], image["height"], image["width"])))
    return oracles.cocoeval_segm_stats(
        {"images": gt.images, "categories": gt.categories, "annotations": annotations}, detections
    )


def test_chunked_coco_ap_equals_plain_cocoeval(mini16_raw, monkeypatch):
    from mal_cli import evaluate as evaluate_module
    from mal_cli import segm_ap

    raw = copy.deepcopy(mini16_raw)
    raw["images"] += [
        {"id": 900001, "file_name": "x.jpg", "height": 100, "width": 120},
        {"id": 900002, "file_name": "y.jpg", "height": 50, "width": 60},
    ]  # no GT
    for i, ann in enumerate(raw["annotations"]):
        ann["iscrowd"] = int(i % 9 == 4)  # crowd GT: its pairs are left out of AP
    gt = Dataset.from_dict(raw, "gt.json")
    rng = np.random.default_rng(3)
    no_predictions = {raw["images"][2]["id"], raw["images"][9]["id"]}
    results = []
    for ann in gt.annotations:
        if ann["image_id"] in no_predictions:
            continue
        seg = ann["segmentation"] if rng.random() < 0.5 else masks.box_polygon(ann["bbox"])
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": ann["bbox"],
                "score": float(np.round(rng.random(), 1)),
                "segmentation": seg,
            }
        )  # ties: 11 scores
        if rng.random() < 0.2:  # a duplicate: unmatched, a false positive
            results.append(dict(results[-1], score=float(np.round(rng.random(), 1))))
    image = gt.image_by_id[900001]
    for j in range(3):  # false positives on an image without GT
        results.append(
            {
                "image_id": 900001,
                "category_id": raw["categories"][j]["id"],
                "bbox": [1.0, 1.0, 2.0, 2.0],
                "score": 0.5,
                "segmentation": masks.box_polygon([10.0 * j, 5.0, 30.0, 40.0]),
            }
        )
    results = [results[i] for i in rng.permutation(len(results))]

    # The detections the protocol scores: non-crowd pairs, then every unmatched prediction.
    pairs, unmatched = pair_predictions(results, gt)
    detections = []
    for gt_ann, det in [(g, d) for g, d in pairs if not g["iscrowd"]] + [(None, d) for d in unmatched]:
        image = gt.image_by_id[det["image_id"]]
        detections.append(
            {
                "image_id": det["image_id"],
                "category_id": det["category_id"],
                "score": det["score"],
                "segmentation": masks.to_rle(det["segmentation"], image["height"], image["width"]),
            }
        )
    expected = _plain_cocoeval_ap(gt, detections)
    assert 0.2 < expected[0] < 0.9

    calls = []
    original_add_chunk = segm_ap.ChunkedSegmAP.add_chunk

    def counting_add_chunk(self, images, gt_annotations, dets):
        calls.append([image["id"] for image in images])
        return original_add_chunk(self, images, gt_annotations, dets)

    monkeypatch.setattr(segm_ap.ChunkedSegmAP, "add_chunk", counting_add_chunk)
    for chunk_images, chunk_cells in ((3, 4096), (1, 4096), (1000, 40), (1000, 4096)):
        monkeypatch.setattr(evaluate_module, "AP_CHUNK_IMAGES", chunk_images)
        monkeypatch.setattr(evaluate_module, "AP_CHUNK_CELLS", chunk_cells)
        calls.clear()
        report = evaluate(results, gt)
        assert [report.ap[key] for key in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == expected
        flat = [i for chunk in calls for i in chunk]
        assert flat == sorted(flat) and len(flat) == 17  # every image with GT or a detection, once, in id order
        if chunk_images == 3:
            assert len(calls) == 6
    assert gt.raw["annotations"][0]["segmentation"] == mini16_raw["annotations"][0]["segmentation"]


def test_table_shows_no_gt_for_cocoeval_minus_one():
    """COCOeval's -1 (no GT in an area range) is not a percentage: the table says so instead of printing -100.0."""
    import io

    from rich.console import Console

    from mal_cli.evaluate import EvalReport, SizeBucket, report_table

    report = EvalReport(
        num_gt=1,
        num_matched=1,
        instance_miou=0.5,
        class_miou=0.5,
        num_classes=1,
        miou_missing_as_zero=0.5,
        by_size={"small": SizeBucket(0.5, 1)},
        num_crowd=0,
        num_crowd_matched=0,
        crowd_miou=None,
        missing_ids=[],
        num_unmatched_predictions=0,
        ap_kind="coco-segm",
        ap={"AP": 0.25, "APm": -1.0},
        reference_ap=None,
        retention=None,
        ious=[],
    )
    console = Console(file=io.StringIO(), width=120)
    console.print(report_table(report))
    text = console.file.getvalue()
    assert "25.0" in text and "— (no GT)" in text and "-100" not in text

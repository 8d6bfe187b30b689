"""`mal eval` on detector output (boxes that are not the GT's): standard COCO/LVIS segm AP, number for number."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import oracles  # slow references (tests/oracles.py)
import pytest
from test_evaluate import _as_lvis  # the fixture in LVIS v1 form (coco_url only, frequency, no iscrowd)

from mal_cli import masks
from mal_cli.dataset import Dataset
from mal_cli.errors import InputError
from mal_cli.evaluate import evaluate, report_table


def detector_results(raw: dict, seed: int = 3) -> list[dict]:
    """Detector-like results: shifted masks and boxes, random scores, misses, duplicates, wrong classes."""
    rng = np.random.default_rng(seed)
    images = {image["id"]: image for image in raw["images"]}
    cat_ids = [c["id"] for c in raw["categories"]]
    results = []
    for ann in raw["annotations"]:
        if rng.random() < 0.1:
            continue  # a miss
        image = images[ann["image_id"]]
        mask = masks.decode(ann["segmentation"], image["height"], image["width"])
        dy, dx = rng.integers(-6, 7, size=2)
        shifted = np.roll(mask, (int(dy), int(dx)), axis=(0, 1))
        x, y, w, h = ann["bbox"]
        det = {
            "image_id": ann["image_id"],
            "category_id": ann["category_id"],
            "segmentation": oracles.encode(shifted),
            "bbox": [x + float(dx) + 0.37, y + float(dy) - 0.21, w * 1.03, h * 0.98],
            "score": round(float(rng.random()), 3),
        }
        results.append(det)
        if rng.random() < 0.15:  # a duplicate, or the same mask with a wrong class
            results.append(dict(det, score=float(rng.random()), category_id=int(rng.choice(cat_ids))))
    return results


def test_detector_results_get_cocoevals_ap(mini16_raw):
    gt = Dataset.from_dict(copy.deepcopy(mini16_raw), "gt.json")
    results = detector_results(mini16_raw)
    report = evaluate(copy.deepcopy(results), gt)
    assert report.protocol == "detections" and report.ap_kind == "coco-segm"
    assert report.num_unmatched_predictions == len(results)
    assert report.instance_miou is None and report.miou_missing_as_zero is None and report.missing_ids == []
    # Without bbox, loadRes takes every area from the mask: all six figures are COCOeval's, bit for bit.
    no_bbox = [{k: v for k, v in det.items() if k != "bbox"} for det in results]
    assert list(report.ap.values()) == oracles.cocoeval_segm_stats(mini16_raw, no_bbox)
    # With bbox, COCOeval sizes detections by their boxes: AP, AP50, AP75 (all areas) still agree.
    assert list(report.ap.values())[:3] == oracles.cocoeval_segm_stats(mini16_raw, results)[:3]
    assert 0.1 < report.ap["AP"] < 0.9  # neither trivially perfect nor empty


def test_scores_rank_the_detections(mini16_raw):
    gt = Dataset.from_dict(copy.deepcopy(mini16_raw), "gt.json")
    results = detector_results(mini16_raw)
    # Give every wrong-class duplicate the top score: precision at low recall drops, AP must fall.
    best = max(r["score"] for r in results) + 1
    first = {}
    for det in results:
        first.setdefault((det["image_id"], tuple(det["bbox"])), det)
    reranked = [dict(d, score=best) if first[(d["image_id"], tuple(d["bbox"]))] is not d else d for d in results]
    assert evaluate(reranked, gt).ap["AP"] < evaluate(results, gt).ap["AP"]


def test_labelled_dataset_of_detector_boxes_is_scored_as_detections(mini16_raw):
    gt = Dataset.from_dict(copy.deepcopy(mini16_raw), "gt.json")
    results = detector_results(mini16_raw)
    labels = {
        "images": copy.deepcopy(mini16_raw["images"]),
        "categories": mini16_raw["categories"],
        "annotations": [dict(det, id=k + 1, iscrowd=0) for k, det in enumerate(results)],
    }
    report = evaluate(Dataset.from_dict(labels, "labels.json"), gt)
    assert report.protocol == "detections"
    assert report.ap == evaluate(results, gt).ap


def test_gt_boxes_keep_the_given_box_protocol(mini16_raw):
    gt = Dataset.from_dict(copy.deepcopy(mini16_raw), "gt.json")
    report = evaluate(Dataset.from_dict(copy.deepcopy(mini16_raw), "labels.json"), gt)
    assert report.protocol == "given-box" and report.instance_miou == pytest.approx(1.0)


def test_detector_output_needs_ap_and_the_gts_images(mini16_raw):
    gt = Dataset.from_dict(copy.deepcopy(mini16_raw), "gt.json")
    results = detector_results(mini16_raw)
    with pytest.raises(InputError, match="only AP applies; drop --no-ap"):
        evaluate(results, gt, compute_ap=False)
    with pytest.raises(InputError, match="image id 424242 is not in the GT"):
        evaluate(results + [dict(results[0], image_id=424242)], gt)


def test_detections_table_shows_no_given_box_rows(mini16_raw):
    from rich.console import Console

    gt = Dataset.from_dict(copy.deepcopy(mini16_raw), "gt.json")
    console = Console(file=io.StringIO(), width=120)
    console.print(report_table(evaluate(detector_results(mini16_raw), gt)))
    text = console.file.getvalue()
    assert "COCO segm AP" in text and "detections" in text and "mIoU" not in text


def test_lvis_gt_gets_lvisevals_ap(mini16_raw, tmp_path):
    from mal_cli import lvis_compat

    lvis_compat.apply()
    from lvis import LVIS, LVISEval, LVISResults

    raw = _as_lvis(mini16_raw)
    results = detector_results(raw)
    report = evaluate(copy.deepcopy(results), Dataset.from_dict(copy.deepcopy(raw), "lvis.json"))
    assert report.protocol == "detections" and report.ap_kind == "lvis-segm"
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(raw))
    with contextlib.redirect_stdout(io.StringIO()):
        lvis_gt = LVIS(str(path))
        no_bbox = [{k: v for k, v in det.items() if k != "bbox"} for det in results]
        evaluator = LVISEval(lvis_gt, LVISResults(lvis_gt, no_bbox, max_dets=300), iou_type="segm")
        evaluator.run()
    expected = evaluator.get_results()
    assert report.ap == pytest.approx({k: float(expected[k]) for k in report.ap}, abs=1e-12)
    assert 0.05 < report.ap["AP"] < 0.95

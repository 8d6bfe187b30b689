"""`mal export results` (labels -> a results list COCO.loadRes takes) and the detector-score rule of exports."""

from __future__ import annotations

import copy

import numpy as np
import oracles  # slow references (tests/oracles.py)
import orjson
import pytest

from mal_cli.dataset import Dataset
from mal_cli.errors import InputError
from mal_cli.evaluate import evaluate
from mal_cli.export import export_yolo
from mal_cli.results import TRAINING_MIN_SCORE, to_results


def _labels(raw: dict, with_detector_scores: bool = True) -> Dataset:
    """The fixture as `mal label` output of detector boxes: GT masks, a mal_score, some detector scores."""
    rng = np.random.default_rng(0)
    raw = copy.deepcopy(raw)
    for k, ann in enumerate(raw["annotations"]):
        ann["mal_score"] = round(float(rng.random()), 4)
        if with_detector_scores and k % 4:
            ann["score"] = [0.01, 0.3, 0.7, 0.95][k % 4]  # every 4th box has none: a human box
    raw["annotations"][0]["iscrowd"] = 1
    return Dataset.from_dict(raw, "labels.json")


def test_results_load_in_pycocotools_with_mal_score(mini16_raw):
    labels = _labels(mini16_raw)
    results, skipped = to_results(labels)
    noncrowd = [a for a in labels.annotations if not a.get("iscrowd")]
    assert skipped == {"crowd": 1, "low_score": 0} and len(results) == len(noncrowd)
    assert [r["score"] for r in results] == [a["mal_score"] for a in noncrowd]
    evaluator = oracles.cocoeval_segm(mini16_raw, results)  # its loadRes is what fails on a labels *file*
    assert len(evaluator.cocoDt.getAnnIds()) == len(results)
    assert evaluator.stats[1] > 0.9  # the masks are the GT's: AP50 near 1 (one crowd GT unanswered)


def test_score_kinds_and_min_score(mini16_raw):
    labels = _labels(mini16_raw)
    detector, _ = to_results(labels, score="detector")
    noncrowd = [a for a in labels.annotations if not a.get("iscrowd")]
    assert [r["score"] for r in detector] == [a.get("score", 1.0) for a in noncrowd]
    results, skipped = to_results(labels, score="product", min_score=0.5)
    kept = [a for a in labels.annotations if not a.get("iscrowd") and not a.get("score", 1.0) < 0.5]
    assert len(results) == len(kept) and skipped["low_score"] > 0
    assert [r["score"] for r in results] == pytest.approx([a.get("score", 1.0) * a["mal_score"] for a in kept])
    unlabelled = copy.deepcopy(labels.raw)
    del unlabelled["annotations"][3]["mal_score"]
    with pytest.raises(InputError, match="no 'mal_score'; label it first"):
        to_results(Dataset.from_dict(unlabelled, "boxes.json"))
    with pytest.raises(InputError, match="--score must be one of"):
        to_results(labels, score="best")


def test_exported_results_keep_the_given_box_protocol(tmp_path, mini16_raw, mal):
    labels_path = tmp_path / "labels.json"
    labels_path.write_bytes(orjson.dumps(_labels(mini16_raw, with_detector_scores=False).raw))
    out = tmp_path / "results.json"
    exported = mal("export", "results", labels_path, "--out", out)
    assert exported.code == 0 and exported.out == "" and "1 crowd" in exported.err
    results = orjson.loads(out.read_bytes())
    report = evaluate(
        results,
        Dataset.from_dict(copy.deepcopy(mini16_raw), "gt.json"),
        compute_ap=False,
    )
    assert report.protocol == "given-box" and report.instance_miou == pytest.approx(1.0)
    again = mal("export", "results", out, "--out", tmp_path / "again.json")
    assert again.code == 2 and "already a results list" in again.err


def test_exporting_results_over_the_labels_file_is_refused(tmp_path, mini16_raw, mal):
    labels_path = tmp_path / "labels.json"
    labels_path.write_bytes(orjson.dumps(_labels(mini16_raw).raw))
    before = labels_path.read_bytes()
    result = mal("export", "results", labels_path, "--out", tmp_path / "." / "labels.json")
    assert result.code == 3 and "would destroy the input" in result.err
    assert labels_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.json"]


def test_yolo_export_leaves_low_score_detections_out_by_default(tmp_path, mini16_raw):
    labels = _labels(mini16_raw)
    stats = export_yolo(labels, tmp_path / "a")
    low = sum(1 for a in labels.annotations if a.get("score", 1.0) < TRAINING_MIN_SCORE)
    assert low > 0 and stats["skipped_low_score"] == low
    everything = export_yolo(labels, tmp_path / "b", min_score=0.0)
    assert everything["skipped_low_score"] == 0 and everything["instances"] == stats["instances"] + low
    lines = sum(len(p.read_text().splitlines()) for p in (tmp_path / "a" / "labels").glob("*.txt"))
    assert lines == stats["lines"]

"""Ecosystem compatibility: `mal label` output in pycocotools (COCO, loadRes, COCOeval), in lvis (LVIS,
LVISResults, LVISEval) for an LVIS input, through the YOLO exporter, and through shell pipes."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import oracles  # slow references (tests/oracles.py)
import orjson
import pytest
from pycocotools.coco import COCO
from test_evaluate import _as_lvis  # the fixture in LVIS v1 form (coco_url only, frequency, no iscrowd)
from test_export import _roundtrip_check
from test_label import tiny_options  # the tiny_checkpoint fixture lives in conftest.py

from mal_cli import lvis_compat
from mal_cli.labeling import LabelOptions, label

DATA_DIR = Path(__file__).parent / "data"
MINI16_JSON = DATA_DIR / "annotations_mini16.json"
MINI16_IMAGES = DATA_DIR / "images"


def _label(boxes: Path, out: Path, options: LabelOptions) -> dict:
    label(str(boxes), str(MINI16_IMAGES), str(out), options, progress_bar=False)
    return orjson.loads(out.read_bytes())


@pytest.fixture(scope="module")
def lvis_files(tmp_path_factory, tiny_checkpoint):
    """The fixture as LVIS, and its labels by --method box and by the tiny model (RLE)."""
    folder = tmp_path_factory.mktemp("lvis")
    raw = orjson.loads(MINI16_JSON.read_bytes())
    lvis_gt = folder / "lvis_gt.json"
    lvis_gt.write_bytes(orjson.dumps(_as_lvis(raw)))
    boxes_doc = _as_lvis(raw)
    for ann in boxes_doc["annotations"]:
        ann.pop("segmentation")
        ann.pop("area")
    boxes = folder / "lvis_boxes.json"
    boxes.write_bytes(orjson.dumps(boxes_doc))
    box_out, model_out = folder / "box.json", folder / "model.json"
    _label(boxes, box_out, LabelOptions(method="box", workers=0))
    _label(boxes, model_out, tiny_options(tiny_checkpoint, batch_size=64))
    return {"gt": lvis_gt, "box": box_out, "model": model_out}


def _results(doc: dict) -> list[dict]:
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "segmentation": a["segmentation"],
            "score": a["mal_score"],
        }
        for a in doc["annotations"]
    ]


@pytest.mark.parametrize("fmt", ["rle", "polygon"])
def test_box_labels_in_pycocotools(tmp_path, mini16_raw, fmt):
    doc = _label(MINI16_JSON, tmp_path / "labels.json", LabelOptions(method="box", workers=0, format=fmt))
    labelled = COCO()
    labelled.dataset = doc  # the labelled file is itself a COCO dataset ...
    with contextlib.redirect_stdout(io.StringIO()):
        labelled.createIndex()
    for ann in doc["annotations"][:20]:
        assert labelled.annToMask(ann).sum() == ann["area"]
    stats = oracles.cocoeval_segm(mini16_raw, _results(doc)).stats  # ... and its annotations are COCO results
    assert 0.0 < stats[0] < 0.9  # filled boxes: some AP, far from perfect


def test_model_labels_in_pycocotools(lvis_files, mini16_raw):
    doc = orjson.loads(lvis_files["model"].read_bytes())
    assert all(
        isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], str) for a in doc["annotations"]
    )
    stats = oracles.cocoeval_segm(mini16_raw, _results(doc)).stats  # same ids and boxes as the COCO original
    assert np.isfinite(stats).all() and 0.0 <= stats[0] <= 1.0


@pytest.mark.parametrize("which", ["box", "model"])
def test_lvis_labels_in_lvis(lvis_files, which):
    lvis_compat.apply()
    from lvis import LVIS, LVISEval, LVISResults

    doc = orjson.loads(lvis_files[which].read_bytes())
    assert "file_name" not in doc["images"][0] and "frequency" in doc["categories"][0]
    assert not any("iscrowd" in a for a in doc["annotations"])  # nothing added that LVIS lacks
    with contextlib.redirect_stdout(io.StringIO()):
        as_dataset = LVIS(str(lvis_files[which]))  # the labelled file is an LVIS dataset
        assert len(as_dataset.get_ann_ids()) == 141
        mask = as_dataset.ann_to_mask(doc["annotations"][0])
        assert int(mask.sum()) == doc["annotations"][0]["area"]
        gt = LVIS(str(lvis_files["gt"]))
        results = LVISResults(gt, _results(doc))
        evaluator = LVISEval(gt, results, iou_type="segm")
        evaluator.run()
    ap = evaluator.get_results()["AP"]
    assert 0.0 <= ap <= 1.0
    if which == "box":
        assert ap > 0.0


def test_lvis_model_labels_roundtrip_through_yolo(tmp_path, lvis_files):
    from mal_cli.export import export_yolo

    doc = orjson.loads(lvis_files["model"].read_bytes())
    stats = export_yolo(str(lvis_files["model"]), tmp_path / "yolo")
    assert stats["images"] == 16
    assert _roundtrip_check(doc, tmp_path / "yolo") == stats["lines"] > 0


def test_pipe_label_stdin_to_eval_stdout(tmp_path):
    """`mal label - --out - | mal eval - --gt g.json --json -`: stdout carries only JSON; logs on stderr."""
    mal = f'"{sys.executable}" -m mal_cli'
    done = subprocess.run(
        f'{mal} label - --images "{MINI16_IMAGES}" --method box --out - < "{MINI16_JSON}" '
        f'| {mal} eval - --gt "{MINI16_JSON}" --no-ap --json -',
        shell=True,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["num_gt"] == 141 and report["num_matched"] == 141
    assert 0.3 < report["instance_miou"] < 0.9
    assert "boxes/s" in done.stderr and "mIoU" in done.stderr  # the summary line and the table
    # A failing stage fails the pipe's last command with one clear line (exit 2), stdout empty.
    failed = subprocess.run(
        f'echo "not json" | {mal} eval - --gt "{MINI16_JSON}" --json -', shell=True, capture_output=True, text=True
    )
    assert failed.returncode == 2 and failed.stdout == "" and failed.stderr.startswith("mal: error: <stdin>")

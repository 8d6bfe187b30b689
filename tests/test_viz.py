"""`mal viz`: overlay crops, worst-first ordering, the self-contained HTML contact sheet."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image

from mal_cli.dataset import load_dataset
from mal_cli.errors import InputError
from mal_cli.labeling import LabelOptions, label
from mal_cli.viz import category_color, collect_items, render_crop, write_review

DATA_DIR = Path(__file__).parent / "data"
MINI16_JSON = DATA_DIR / "annotations_mini16.json"
MINI16_IMAGES = DATA_DIR / "images"


@pytest.fixture(scope="module")
def box_labels(tmp_path_factory) -> Path:
    """The fixture labelled with --method box (fast), with varied mal_scores to sort by."""
    out = tmp_path_factory.mktemp("viz") / "labels.json"
    label(str(MINI16_JSON), str(MINI16_IMAGES), str(out), LabelOptions(method="box", workers=0), progress_bar=False)
    doc = orjson.loads(out.read_bytes())
    rng = np.random.default_rng(0)
    for ann in doc["annotations"]:
        ann["mal_score"] = round(float(rng.random()), 4)
    doc["annotations"][5].pop("mal_score")  # no score: reviewed last
    out.write_bytes(orjson.dumps(doc))
    return out


def _ranks(out: Path) -> list[dict]:
    return orjson.loads((out / "review.json").read_bytes())["items"]


def test_sorted_by_mal_score_worst_first(tmp_path, box_labels):
    out = tmp_path / "review"
    summary = write_review(str(box_labels), MINI16_IMAGES, out, worst=6)
    assert summary["instances"] == 6 and summary["total"] == 141 and summary["sorted_by"] == "mal_score"
    items = _ranks(out)
    doc = orjson.loads(box_labels.read_bytes())
    scores = sorted(a["mal_score"] for a in doc["annotations"] if "mal_score" in a)
    assert [it["mal_score"] for it in items] == scores[:6]
    assert [it["rank"] for it in items] == [1, 2, 3, 4, 5, 6]
    for it in items:
        assert (out / it["crop"]).is_file() and it["crop"].startswith("crops/")


def test_missing_score_comes_last(box_labels):
    items, *_ = collect_items(load_dataset(box_labels))
    assert len(items) == 141 and items[-1].mal_score is None and items[0].rank == 1


def test_gt_sorts_by_iou_and_html_is_self_contained(tmp_path, box_labels):
    out = tmp_path / "review"
    write_review(str(box_labels), MINI16_IMAGES, out, worst=5, gt=str(MINI16_JSON), full=True)
    items = _ranks(out)
    ious = [it["iou"] for it in items]
    assert ious == sorted(ious) and all(0.0 <= v < 1.0 for v in ious)
    page = (out / "index.html").read_text()
    assert page.count("<figure>") == 5 and "worst first by IoU" in page
    thumbs = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(thumbs) == 5
    Image.open(io.BytesIO(base64.b64decode(thumbs[0]))).verify()
    # Moved elsewhere, every link still resolves: links are relative, nothing points outside the folder.
    moved = tmp_path / "moved"
    shutil.move(str(out), moved)
    assert str(tmp_path) not in (moved / "index.html").read_text()
    for link in re.findall(r'href="([^"]+)"', (moved / "index.html").read_text()):
        assert (moved / link).is_file(), link
    assert len(list((moved / "full").glob("*.png"))) >= 1


def test_render_crop_draws_mask_box_and_caption():
    image = np.full((100, 120, 3), 50, np.uint8)
    mask = np.zeros((100, 120), np.uint8)
    mask[40:60, 50:80] = 1
    color = (255, 0, 0)
    picture = render_crop(image, mask, [50, 40, 30, 20], color, ["#1 thing", "mal_score 0.1"])
    arr = np.asarray(picture)
    assert picture.width >= 192  # small boxes are scaled up for review
    centre = arr[arr.shape[0] // 3, arr.shape[1] // 2]  # inside the mask: tinted towards red
    assert centre[0] > 100 and centre[1] < 60
    assert (arr == color).all(axis=-1).sum() > 100  # outline and box in the category colour
    # Boxes at or beyond the border never crash.
    for bbox in ([0, 0, 5, 5], [110, 90, 30, 30], [-40, -40, 10, 10], [10, 10, 0, 0]):
        render_crop(image, mask, bbox, color, ["x"])
    assert category_color(1) != category_color(2) and category_color(3) == category_color(3)


def _viz(labels, out: Path, *extra: str, stdin=None, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "mal_cli", "viz", str(labels), "--images", str(MINI16_IMAGES), "--out", str(out)]
    return subprocess.run([*args, *extra], stdin=stdin, stderr=stderr, stdout=subprocess.PIPE, text=True)


def test_cli_viz_from_stdin_and_errors(tmp_path, box_labels):
    out = tmp_path / "review"
    with open(box_labels, "rb") as stdin:
        done = _viz("-", out, "--worst", "3", "--no-progress", stdin=stdin)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and "3 of 141" in done.stderr
    assert len(list((out / "crops").glob("*.png"))) == 3
    bad = _viz(box_labels, out, "--worst", "0")
    assert bad.returncode == 2 and "--worst" in bad.stderr
    with pytest.raises(InputError, match="results list"):
        results = tmp_path / "results.json"
        results.write_bytes(orjson.dumps([{"image_id": 328, "category_id": 1, "bbox": [1, 1, 5, 5]}]))
        write_review(str(results), MINI16_IMAGES, out)


def test_cli_viz_no_bar_when_stderr_is_a_file(tmp_path, box_labels):
    log = tmp_path / "stderr.txt"
    with open(log, "w") as handle:
        done = _viz(box_labels, tmp_path / "review", "--worst", "3", stderr=handle)
    assert done.returncode == 0
    text = log.read_text()
    assert "3 of 141" in text and "\r" not in text and "img/s" not in text


def test_rerun_removes_stale_crops_only(tmp_path, box_labels):
    out = tmp_path / "review"
    write_review(str(box_labels), MINI16_IMAGES, out, worst=5, full=True)
    assert len(list((out / "crops").glob("*.png"))) == 5
    foreign = [out / "crops" / "notes.txt", out / "crops" / "mine.png", out / "full" / "keep.txt"]
    for path in foreign:
        path.write_text("mine")
    write_review(str(box_labels), MINI16_IMAGES, out, worst=2, full=True)
    items = _ranks(out)
    crops = sorted(p.name for p in (out / "crops").glob("*_ann*.png"))
    assert crops == sorted(Path(it["crop"]).name for it in items) and len(crops) == 2
    assert sorted(p.name for p in (out / "full").glob("*.png")) == sorted({Path(it["full"]).name for it in items})
    assert all(path.read_text() == "mine" for path in foreign)


def test_crowd_boxes_are_marked(tmp_path, box_labels):
    doc = orjson.loads(box_labels.read_bytes())
    crowd = doc["annotations"][0]
    crowd["iscrowd"], crowd["mal_score"] = 1, 0.0  # reviewed first
    labels = tmp_path / "crowd.json"
    labels.write_bytes(orjson.dumps(doc))
    out = tmp_path / "review"
    write_review(str(labels), MINI16_IMAGES, out, worst=3)
    items = _ranks(out)
    assert items[0]["ann_id"] == crowd["id"] and items[0]["crowd"] is True
    assert not any(it["crowd"] for it in items[1:])
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", (out / "index.html").read_text())
    assert "crowd" in captions[0] and not any("crowd" in c for c in captions[1:])


def test_full_picture_labels_of_overlapping_boxes_do_not_overlap():
    """Two instances with the same box: their labels are stacked, not drawn over each other."""
    from mal_cli.viz_draw import place_labels, render_full

    corners = place_labels([(60, 14), (60, 14), (40, 14)], [(10, 5), (10, 5), (30, 8)], 200)
    rects = [(x, y, w, 14) for (x, y), w in zip(corners, (60, 60, 40))]
    for i, (ax, ay, aw, ah) in enumerate(rects):
        for bx, by, bw, bh in rects[i + 1 :]:
            assert not (ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah), corners
    assert corners[0] == (10, 5)  # the first label stays at its anchor
    image = np.zeros((80, 120, 3), np.uint8)
    mask = np.zeros((80, 120), np.uint8)
    mask[20:40, 20:60] = 1
    picture = render_full(
        image, [(mask, [20, 20, 40, 20], (255, 0, 0), "cat 0.9"), (mask, [20, 20, 40, 20], (0, 0, 255), "dog 0.8")]
    )
    assert picture.size == (120, 80)

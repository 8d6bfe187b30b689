"""COCO results lists for other tools (`mal export results`), and the detector-score rule of exports.

`COCO.loadRes` and lvis' `LVISResults` take a results list, not a dataset: [{image_id, category_id,
bbox, segmentation, score}, ...]. `to_results` makes one from labels, `score` being:

- `mal`: the labeler's `mal_score` (its estimate of the mask's quality), the default;
- `detector`: the annotation's own `score`, a detector's confidence that `mal label` carried through
  (1.0 without one: a human box, as `mal eval` counts it);
- `product`: both multiplied (the box is right and the mask is good).

Detector scores and exports (`min_score`): an annotation with a `score` below `min_score` is left out;
annotations without `score` (human boxes) always stay. Exports meant for training (`mal export yolo`)
default to TRAINING_MIN_SCORE so that a 0.01-score detection does not become a training label unless
asked; a results list for AP keeps everything by default, since AP counts low-score detections too.

pycocotools' `loadRes` takes a detection's area from its `bbox` when it has one (this list keeps the
box, which `mal eval` uses to pair results with GT boxes); `mal eval` drops it for segm AP.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mal_cli.dataset import Dataset, load_any, write_json_atomic
from mal_cli.errors import InputError
from mal_cli.safe_paths import refuse_overwrite

__all__ = [
    "SCORE_KINDS",
    "TRAINING_MIN_SCORE",
    "below_min_score",
    "export_results",
    "to_results",
]

# A detection below this confidence is not a training label by default: half the detector's scale, the
# common display/pseudo-label cut-off (detectron2's demo, many pseudo-labelling set-ups use 0.5 or more).
TRAINING_MIN_SCORE = 0.5
SCORE_KINDS = ("mal", "detector", "product")


def below_min_score(ann: dict, min_score: float) -> bool:
    """True for an annotation whose detector `score` is below `min_score` (no `score`: never)."""
    score = ann.get("score")
    return score is not None and float(score) < min_score


def _score(ann: dict, kind: str, source: str) -> float:
    detector = float(ann.get("score", 1.0))  # no score: a human box, as `mal eval` counts it
    if kind == "detector":
        return detector
    if "mal_score" not in ann:
        raise InputError(f"{source}: annotation id {ann.get('id')} has no 'mal_score'; label it first (mal label)")
    return float(ann["mal_score"]) * (detector if kind == "product" else 1.0)


def to_results(labels: Dataset, score: str = "mal", min_score: float = 0.0) -> tuple[list[dict], dict]:
    """The labelled annotations as a COCO results list, and counts of what was left out.

    Crowd annotations are not detections and are left out, as are those below `min_score`.
    """
    if score not in SCORE_KINDS:
        raise InputError(f"--score must be one of {', '.join(SCORE_KINDS)}, got '{score}'")
    results: list[dict] = []
    skipped = {"crowd": 0, "low_score": 0}
    for ann in labels.annotations:
        if ann.get("iscrowd"):
            skipped["crowd"] += 1
            continue
        if below_min_score(ann, min_score):
            skipped["low_score"] += 1
            continue
        if "segmentation" not in ann:
            raise InputError(
                f"{labels.source}: annotation id {ann.get('id')} has no 'segmentation'; label it first (mal label)"
            )
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": ann["bbox"],
                "segmentation": ann["segmentation"],
                "score": _score(ann, score, labels.source),
            }
        )
    return results, skipped


def export_results(labels: str | Path, out: str, score: str = "mal", min_score: float = 0.0) -> dict:
    """`mal export results`: read labels, write the results list to OUT ("-" = stdout); a summary dict."""
    refuse_overwrite(out, [labels], "--out")
    loaded = load_any(labels)
    if not isinstance(loaded, Dataset):
        raise InputError(f"{labels}: already a results list; COCO.loadRes takes it as it is")
    results, skipped = to_results(loaded, score, min_score)
    write_json_atomic(out, results)
    summary = {
        "results": len(results),
        "skipped_crowd": skipped["crowd"],
        "skipped_low_score": skipped["low_score"],
    }
    print(
        f"mal export results: {len(results)} results (score = {score}; {skipped['crowd']} crowd and "
        f"{skipped['low_score']} below --min-score {min_score:g} left out) -> {out}",
        file=sys.stderr,
    )
    return summary

"""Score predicted instance masks against ground-truth masks, given the GT boxes as prompts.

Given-box protocol: every prediction answers one GT box. A prediction in a dataset file is paired with
the GT annotation of the same `id`; a prediction in a COCO results list with the GT annotation of the
same image and the identical `bbox`. On those pairs:

- mask IoU per instance, averaged over instances and over classes (non-crowd GT), broken down by GT
  `area` (small < 32², medium < 96², large); crowd GT is reported on its own;
- GT instances nobody answered are counted, listed, and scored 0 in "mIoU counting missing as 0";
- COCO segm AP (pycocotools) with the predictions as detections (`score`, else 1.0), or LVIS AP
  (lvis LVISEval) when the GT is LVIS. Predictions paired with crowd GT are left out of AP: the
  protocol never asks for a crowd box's instance, so they are neither hits nor false positives.
  COCO AP runs pycocotools' COCOeval one small chunk of images at a time and accumulates the
  chunks itself (mal_cli.segm_ap): COCOeval's numbers in memory that does not grow with the
  number of (image, category) pairs.

Detector output (no prediction sits on a GT box: `segm_ap.answers_gt_boxes`) has no given-box pairs:
only the standard COCO/LVIS segm AP applies, every prediction a detection (`protocol` "detections").

All figures are fractions in [0, 1]; the CLI prints them as percentages.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import defaultdict
from typing import Any, Optional, Sequence, Union

import numpy as np
import pycocotools.mask as mask_utils

from mal_cli import segm_ap
from mal_cli.dataset import Dataset
from mal_cli.errors import InputError
from mal_cli.evaluate_report import EvalReport, SizeBucket, report_table
from mal_cli.segmentation_check import checked_rle

__all__ = ["EvalReport", "SizeBucket", "evaluate", "pair_predictions", "report_table", "spearman", "SIZE_BUCKETS"]

# COCO's area ranges, on the GT annotation's `area`.
SIZE_BUCKETS = (("small", 0.0, 32.0**2), ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, float("inf")))
AP_KEYS = segm_ap.AP_KEYS
LVIS_AP_KEYS = AP_KEYS + ("APr", "APc", "APf")


Prediction = Union[Dataset, list]


def pair_predictions(pred: Prediction, gt: Dataset) -> tuple[list[tuple[dict, dict]], list[dict]]:
    """Pair predictions with the GT annotations they answer: ([(gt_ann, pred_ann), ...], unmatched preds).

    Dataset predictions pair by annotation `id`; results lists by (image_id, identical bbox), each GT
    annotation answered at most once, in input order. Raises `InputError` when image ids disagree or
    when nothing pairs at all.
    """
    pairs: list[tuple[dict, dict]] = []
    unmatched: list[dict] = []
    gt_by_id = {ann["id"]: ann for ann in gt.annotations}
    if isinstance(pred, Dataset):
        for image in pred.images:
            gt_image = gt.image_by_id.get(image["id"])
            if gt_image is None:
                raise InputError(
                    f"{pred.source}: image id {image['id']} is not in the GT {gt.source}; "
                    "evaluate against the GT the boxes came from"
                )
            for key in ("height", "width"):
                if key in image and key in gt_image and image[key] != gt_image[key]:
                    raise InputError(
                        f"{pred.source}: image id {image['id']} has {key} {image[key]} but {gt_image[key]} in "
                        f"the GT {gt.source}; the two files describe different images"
                    )
        for ann in pred.annotations:
            gt_ann = gt_by_id.get(ann["id"])
            if gt_ann is None:
                unmatched.append(ann)
                continue
            if gt_ann["image_id"] != ann["image_id"]:
                raise InputError(
                    f"{pred.source}: annotation id {ann['id']} is on image id {ann['image_id']} but on image id "
                    f"{gt_ann['image_id']} in the GT {gt.source}; annotation ids must match the GT's"
                )
            pairs.append((gt_ann, ann))
        what = "annotation ids"
    else:
        # Results lists carry no annotation ids: the box itself identifies the instance.
        open_gt: dict[tuple, list[dict]] = defaultdict(list)
        for ann in gt.annotations:
            open_gt[(ann["image_id"], *ann["bbox"])].append(ann)
        for det in pred:
            if det["image_id"] not in gt.image_by_id:
                raise InputError(
                    f"results: image id {det['image_id']} is not in the GT {gt.source}; "
                    "evaluate against the GT the boxes came from"
                )
            candidates = open_gt.get((det["image_id"], *det["bbox"]))
            if candidates:
                pairs.append((candidates.pop(0), det))
            else:
                unmatched.append(det)
        what = "(image id, bbox) pairs"
    if not pairs:
        raise InputError(
            f"no prediction shares its {what} with a GT annotation of {gt.source}; "
            "PRED must be labelled from the GT's own boxes"
        )
    return pairs, unmatched


def _gt_rle(ann: dict, gt: Dataset) -> dict:
    image = gt.image_by_id[ann["image_id"]]
    if "segmentation" not in ann:
        raise InputError(f"{gt.source}: GT annotation id {ann['id']} has no 'segmentation'; the GT needs masks")
    try:
        return checked_rle(ann["segmentation"], image["height"], image["width"])
    except KeyError as err:
        raise InputError(f"{gt.source}: image id {image['id']} has no '{err.args[0]}'") from None
    except (ValueError, TypeError) as err:
        raise InputError(f"{gt.source}: GT annotation id {ann['id']}: bad segmentation: {err}") from None


def _pred_rle(det: dict, gt: Dataset, source: str) -> dict:
    image = gt.image_by_id[det["image_id"]]
    where = f"annotation id {det['id']}" if "id" in det else f"result on image id {det['image_id']} bbox {det['bbox']}"
    if "segmentation" not in det:
        raise InputError(f"{source}: {where} has no 'segmentation'; label the boxes first (mal label)")
    try:
        return checked_rle(det["segmentation"], image["height"], image["width"])
    except KeyError as err:
        raise InputError(f"{gt.source}: image id {image['id']} has no '{err.args[0]}'") from None
    except (ValueError, TypeError) as err:
        raise InputError(f"{source}: {where}: bad segmentation: {err}") from None


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def evaluate(
    pred: Prediction,
    gt: Dataset,
    *,
    reference_ap: Optional[float] = None,
    compute_ap: bool = True,
) -> EvalReport:
    """Score `pred` (a labelled `Dataset` or a results list) against the masks of `gt`.

    `reference_ap` (a fraction, e.g. 0.386) gives `retention = AP / reference_ap`.
    """
    pred_source = pred.source if isinstance(pred, Dataset) else "results"
    given_boxes = segm_ap.answers_gt_boxes(pred, gt)
    if given_boxes:
        pairs, unmatched = pair_predictions(pred, gt)
    elif not compute_ap:
        raise InputError(
            f"{pred_source}: no prediction sits on a GT box (detector output): only AP applies; drop --no-ap"
        )
    else:  # detector output: every prediction is a detection, matched by COCOeval/LVISEval (segm_ap)
        pairs, unmatched = [], segm_ap.detections_of(pred, gt, pred_source)

    if compute_ap:
        _require_categories(gt)
    masks = _PairMasks(pairs, gt, pred_source)
    ap: dict[str, float] = {}
    num_detections = sum(1 for gt_ann, _ in pairs if not _is_crowd(gt_ann)) + len(unmatched)
    if compute_ap and not gt.is_lvis and num_detections:
        ap = _chunked_coco_segm_ap(masks, unmatched)
    elif compute_ap and gt.is_lvis:
        ap = _lvis_ap_of_pairs(masks, unmatched)
    else:
        for indices in masks.by_image.values():
            masks.image_rles(indices)
        if compute_ap:
            # Nothing detected: AP 0, unless there is no non-crowd GT either (undefined, COCOeval's -1).
            has_gt = any(not _is_crowd(ann) for ann in gt.annotations)
            ap = {key: 0.0 if has_gt else -1.0 for key in AP_KEYS}

    report = _given_box_report(masks, len(unmatched))
    if not given_boxes:  # no pairs: the given-box figures do not apply
        report.protocol, report.miou_missing_as_zero, report.missing_ids = "detections", None, []
    if compute_ap:
        report.ap_kind, report.ap = ("lvis-segm" if gt.is_lvis else "coco-segm"), ap
        if reference_ap:
            report.reference_ap = float(reference_ap)
            if report.ap["AP"] >= 0:  # -1: AP undefined, so is the retention
                report.retention = report.ap["AP"] / float(reference_ap)
    return report


def _is_crowd(ann: dict) -> bool:
    return bool(ann.get("iscrowd", 0))


class _PairMasks:
    """The (GT, prediction) pairs, grouped by image, and the mask IoU of each pair once measured.

    LVIS AP runs on everything at once and needs every paired RLE; COCO AP runs chunk by chunk and
    the no-AP path needs none, so there the RLEs live only as long as their image's IoUs.
    """

    def __init__(self, pairs: list[tuple[dict, dict]], gt: Dataset, pred_source: str):
        self.pairs, self.gt, self.pred_source = pairs, gt, pred_source
        self.by_image: dict[Any, list[int]] = defaultdict(list)
        for index, (gt_ann, _) in enumerate(pairs):
            self.by_image[gt_ann["image_id"]].append(index)
        self.iou = np.zeros(len(pairs))
        self.gt_areas: dict[Any, float] = {}  # mask areas of paired GT without an `area` field, for the size buckets

    def image_rles(self, indices: list[int]) -> tuple[list[dict], list[dict]]:
        """The paired GT and predicted RLEs of one image's pairs; records their IoUs. One pycocotools
        call per image on the paired RLEs, keeping the diagonal: images hold few instances, so the
        small n x n matrix costs less than a Python call per pair."""
        if not indices:
            return [], []
        pairs, gt = self.pairs, self.gt
        g = [_gt_rle(pairs[i][0], gt) for i in indices]
        d = [_pred_rle(pairs[i][1], gt, self.pred_source) for i in indices]
        iou = mask_utils.iou(d, g, [0] * len(g))
        self.iou[indices] = np.diagonal(np.asarray(iou).reshape(len(d), len(g)))
        for i, rle in zip(indices, g):
            if "area" not in pairs[i][0]:
                self.gt_areas[pairs[i][0]["id"]] = float(mask_utils.area(rle))
        return g, d


def _chunked_coco_segm_ap(masks: _PairMasks, unmatched: list[dict]) -> dict[str, float]:
    """COCO segm AP, COCOeval's numbers in bounded memory: one chunk of images at a time (segm_ap).

    Detections: every non-crowd pair plus every unmatched prediction (a false positive or a
    duplicate), with masks as compressed RLE and no bbox (see _detection); per image in
    results order, pairs first, as the whole list would give them to COCOeval.
    """
    gt, pairs = masks.gt, masks.pairs
    unmatched_by_image: dict[Any, list[dict]] = defaultdict(list)
    for det in unmatched:
        unmatched_by_image[det["image_id"]].append(det)
    accumulator = segm_ap.ChunkedSegmAP(c.get("id") for c in gt.categories)
    for chunk in _ap_chunks(gt, pairs, masks.by_image, unmatched_by_image, set(accumulator.cat_ids)):
        chunk_gt: list[dict] = []
        chunk_dets: list[dict] = []
        for image_id in chunk:
            indices = masks.by_image.get(image_id, [])
            g, d = masks.image_rles(indices)
            rle_by_gt_id = {pairs[i][0]["id"]: rle for i, rle in zip(indices, g)}
            for ann in gt.annotations_by_image.get(image_id, []):
                chunk_gt.append(_gt_copy(ann, rle_by_gt_id.get(ann["id"]), gt))
            for i, rle in zip(indices, d):
                if not _is_crowd(pairs[i][0]):
                    chunk_dets.append(_detection(pairs[i][1], rle))
            for det in unmatched_by_image.get(image_id, []):
                chunk_dets.append(_detection(det, _pred_rle(det, gt, masks.pred_source)))
        accumulator.add_chunk([gt.image_by_id[image_id] for image_id in chunk], chunk_gt, chunk_dets)
    return accumulator.summary()


def _lvis_ap_of_pairs(masks: _PairMasks, unmatched: list[dict]) -> dict[str, float]:
    """LVIS segm AP over all pairs at once; measures the pairs' IoUs on the way."""
    pairs = masks.pairs
    gt_rles: dict[Any, dict] = {}
    pred_rles: list[Optional[dict]] = [None] * len(pairs)
    for indices in masks.by_image.values():
        g, d = masks.image_rles(indices)
        for i, gr, dr in zip(indices, g, d):
            gt_rles[pairs[i][0]["id"]], pred_rles[i] = gr, dr
    detections = [_detection(det, pred_rles[i]) for i, (gt_ann, det) in enumerate(pairs) if not _is_crowd(gt_ann)]
    detections += [_detection(det, _pred_rle(det, masks.gt, masks.pred_source)) for det in unmatched]
    del pred_rles
    return _lvis_segm_ap(masks.gt, detections, gt_rles)


def _given_box_report(masks: _PairMasks, num_unmatched: int) -> EvalReport:
    """The given-box figures from the measured pair IoUs (AP fields left for the caller)."""
    gt, pairs = masks.gt, masks.pairs
    ious = {pairs[i][0]["id"]: float(masks.iou[i]) for i in range(len(pairs))}
    answered = ious  # membership by GT annotation id

    noncrowd_gt = [a for a in gt.annotations if not _is_crowd(a)]
    matched_iou = [ious[a["id"]] for a in noncrowd_gt if a["id"] in answered]

    per_class: dict[Any, list[float]] = defaultdict(list)
    sizes: dict[str, list[float]] = {name: [] for name, _, _ in SIZE_BUCKETS}
    for ann in noncrowd_gt:
        if ann["id"] not in answered:
            continue
        value = ious[ann["id"]]
        per_class[ann.get("category_id")].append(value)
        area = _gt_area(ann, gt, masks.gt_areas)
        for name, lo, hi in SIZE_BUCKETS:
            if lo <= area < hi:
                sizes[name].append(value)
    class_means = [float(np.mean(v)) for v in per_class.values()]
    by_size = {name: SizeBucket(miou=_mean(values), count=len(values)) for name, values in sizes.items()}

    crowd_iou = [ious[a["id"]] for a in gt.annotations if _is_crowd(a) and a["id"] in answered]
    return EvalReport(
        num_gt=len(noncrowd_gt),
        num_matched=len(matched_iou),
        instance_miou=_mean(matched_iou),
        class_miou=_mean(class_means),
        num_classes=len(class_means),
        miou_missing_as_zero=(float(np.sum(matched_iou)) / len(noncrowd_gt)) if noncrowd_gt else None,
        by_size=by_size,
        num_crowd=len(gt.annotations) - len(noncrowd_gt),
        num_crowd_matched=len(crowd_iou),
        crowd_miou=_mean(crowd_iou),
        missing_ids=[a["id"] for a in gt.annotations if a["id"] not in answered],
        num_unmatched_predictions=num_unmatched,
        ap_kind=None,
        ious=ious,
    )


# COCO AP chunks: at most this many (image x category) cells, the size of a chunk's COCOeval tables
# over the categories it uses, and at most this many images. COCOeval spends ~15 us on each empty
# cell and a chunk costs ~1 ms on its own: on 10k images x 13 boxes in 1,203 categories, 128 cells
# (~3 images a chunk) took 23 s, 1 image a chunk 24 s, 512 cells 28 s, 4,096 cells 45 s.
AP_CHUNK_CELLS = 128
AP_CHUNK_IMAGES = 1000


def _ap_chunks(gt: Dataset, pairs: list, pairs_by_image: dict, unmatched_by_image: dict, cat_ids: set) -> list[list]:
    """Image ids with a GT annotation or a detection, in COCOeval's (sorted) order, cut into chunks.

    COCOeval visits every (image, category) of a chunk, so a chunk is closed before images x
    categories used would pass AP_CHUNK_CELLS (a single image always fits).
    """
    ids = set(gt.annotations_by_image) | set(unmatched_by_image)
    if not ids:
        return []
    chunks: list[list] = []
    chunk: list = []
    chunk_cats: set = set()
    for image_id in np.unique(np.asarray(list(ids))).tolist():
        cats = {ann.get("category_id") for ann in gt.annotations_by_image.get(image_id, [])}
        cats.update(pairs[i][1].get("category_id") for i in pairs_by_image.get(image_id, []))
        cats.update(det.get("category_id") for det in unmatched_by_image.get(image_id, []))
        merged = chunk_cats | (cats & cat_ids)
        if chunk and ((len(chunk) + 1) * len(merged) > AP_CHUNK_CELLS or len(chunk) >= AP_CHUNK_IMAGES):
            chunks.append(chunk)
            chunk, merged = [], cats & cat_ids
        chunk.append(image_id)
        chunk_cats = merged
    chunks.append(chunk)
    return chunks


def _gt_area(ann: dict, gt: Dataset, known: dict) -> float:
    # COCO buckets sizes by the GT's own `area` field; compute it only when it is absent.
    if "area" in ann:
        return _number(ann["area"], f"{gt.source}: GT annotation id {ann['id']}: 'area'")
    if ann["id"] in known:
        return known[ann["id"]]
    return float(mask_utils.area(_gt_rle(ann, gt)))


def _detection(det: dict, rle: dict) -> dict:
    # No `bbox` key: with one, pycocotools' loadRes takes the detection's area from its box instead of
    # its mask, which puts detections in the wrong small/medium/large range.
    return {
        "image_id": det["image_id"],
        "category_id": det["category_id"],
        "segmentation": rle,
        "score": _number(det.get("score", 1.0), f"image id {det['image_id']}: prediction 'score'"),
    }


def _number(value: Any, what: str) -> float:
    """A finite JSON number, else InputError naming `what` (pycocotools would fail on it, or sort it anywhere)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
        return float(value)
    raise InputError(f"{what} must be a finite number, got {str(value)[:40]!r}")


def _gt_copy(ann: dict, rle: Optional[dict], gt: Dataset) -> dict:
    """A shallow copy of a GT annotation for the AP tools, which overwrite `segmentation` in place."""
    copy = dict(ann)
    copy["segmentation"] = rle if rle is not None else _gt_rle(ann, gt)
    copy.setdefault("iscrowd", 0)
    if "area" in copy:
        copy["area"] = _number(copy["area"], f"{gt.source}: GT annotation id {ann['id']}: 'area'")
    else:
        copy["area"] = float(mask_utils.area(copy["segmentation"]))
    return copy


def _gt_copies(gt: Dataset, gt_rle_by_id: dict) -> list[dict]:
    """Shallow copies of all GT annotations for LVISEval (see _gt_copy)."""
    return [_gt_copy(ann, gt_rle_by_id.get(ann["id"]), gt) for ann in gt.annotations]


def _require_categories(gt: Dataset) -> None:
    if not gt.categories:
        raise InputError(f"{gt.source}: no 'categories'; AP needs the GT's category list")


def _lvis_segm_ap(gt: Dataset, detections: list[dict], gt_rle_by_id: dict) -> dict[str, float]:
    from mal_cli import lvis_compat

    lvis_compat.apply()
    from lvis import LVIS, LVISEval, LVISResults

    _require_categories(gt)
    missing = [c.get("id") for c in gt.categories if "frequency" not in c]
    if missing:
        raise InputError(f"{gt.source}: LVIS category id {missing[0]} has no 'frequency' (r/c/f); LVIS AP needs it")
    if not detections:
        return {key: 0.0 for key in LVIS_AP_KEYS}
    images = []
    for image in gt.images:
        # Federated-evaluation fields; a GT without them is treated as exhaustively labelled.
        copy = dict(image)
        copy.setdefault("neg_category_ids", [])
        copy.setdefault("not_exhaustive_category_ids", [])
        images.append(copy)

    def in_memory_lvis(annotations: list[dict]) -> LVIS:
        lvis = LVIS.__new__(LVIS)  # LVIS() only reads a path; fill it from memory instead
        lvis.logger = logging.getLogger("lvis.lvis")
        lvis.dataset = {"images": images, "categories": gt.categories, "annotations": annotations}
        lvis._create_index()
        return lvis

    lvis_gt = in_memory_lvis(_gt_copies(gt, gt_rle_by_id))
    # lvis logs progress, and warns on in-memory results, through its module loggers; mute them.
    loggers = [logging.getLogger(name) for name in ("lvis.lvis", "lvis.results", "lvis.eval")]
    previous = [logger.disabled for logger in loggers]
    try:
        for logger in loggers:
            logger.disabled = True
        with contextlib.redirect_stdout(io.StringIO()):
            # LVISResults deep-copies the GT it is given only to swap in the detections: give it one
            # without annotations, which would cost a copy of every GT mask.
            lvis_dt = LVISResults(in_memory_lvis([]), detections, max_dets=300)
            evaluator = LVISEval(lvis_gt, lvis_dt, iou_type="segm")
            evaluator.run()
    finally:
        for logger, was_disabled in zip(loggers, previous):
            logger.disabled = was_disabled
    results = evaluator.get_results()
    return {key: float(results[key]) for key in LVIS_AP_KEYS}


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equal-length sequences; ties get average ranks.

    NaN when there are fewer than 2 values or either side is constant.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-D sequences of equal length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return float("nan")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = np.sqrt(np.dot(rx, rx) * np.dot(ry, ry))
    return float(np.dot(rx, ry) / denom) if denom > 0 else float("nan")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    new_group = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], len(x)]
    group_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = group_rank[np.cumsum(new_group) - 1]
    return ranks

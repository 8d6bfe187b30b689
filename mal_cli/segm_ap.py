"""COCO segm AP with pycocotools' own numbers, evaluated one chunk of images at a time.

pycocotools' `COCOeval.evaluate()` keeps an `evalImgs` entry for every (category, area range, image)
and an IoU entry for every (image, category) until `accumulate()` reads them: at LVIS scale (1,203
categories x 4 area ranges x 100k images = 481 M entries) that is tens of GiB. `ChunkedSegmAP` runs
COCOeval's `evaluate()` on one chunk of images at a time and keeps from each chunk only what
`accumulate()` reads at maxDets=100, as numpy arrays per area range:

- per detection (the first maxDets of each image and category, in COCOeval's order): its category,
  its score, and at each IoU threshold whether it matched a GT (`dtMatches != 0`) and whether it is
  ignored (`dtIgnore`);
- per (category, area range): the number of non-ignored GT.

`precision()` then redoes `COCOeval.accumulate()` on those arrays (detections concatenated in image
order, stable sort on -score, tp/fp cumsums, precision made monotone, read at the 101 recall
thresholds) and `summary()` the AP half of `COCOeval.summarize()`. The arrays hold the same values in
the same order and go through the same float operations, so the figures equal COCOeval's bit for bit.

Chunks must come in ascending image-id order (COCOeval's `np.unique(imgIds)` order) and each image in
one chunk only: the stable sort breaks score ties by image order. Within a chunk COCOeval only looks
at the categories the chunk's GT or detections use; the other (image, category) entries of a full
run are all None, which `accumulate()` skips, so they are left out.

Detector output (`answers_gt_boxes` false: no prediction sits on a GT box) is scored the standard way:
every prediction is a detection, COCOeval matches them to GT by mask IoU in `score` order (1.0 when
absent). As everywhere in `mal eval`, detections go in without `bbox`, so that their small/medium/large
range comes from the mask's area, not the box's (pycocotools' `loadRes` takes the box's when one is
given; detectron2 drops it likewise). AP, AP50 and AP75 do not depend on this.
"""

from __future__ import annotations

import contextlib
import io
from typing import Iterable, Sequence

import numpy as np

__all__ = ["AP_KEYS", "ChunkedSegmAP", "answers_gt_boxes", "detections_of", "precision_curve", "summarize_ap"]

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


_MERGE_EVERY = 256  # chunks


class ChunkedSegmAP:
    """Accumulates COCOeval segm results chunk by chunk; `summary()` gives AP, AP50, AP75, APs, APm, APl.

    `category_ids`: the GT's category ids (COCOeval's `catIds`); detections and GT of other
    categories are left out, as COCOeval does.
    """

    def __init__(self, category_ids: Iterable) -> None:
        from pycocotools.cocoeval import Params

        self.params = Params(iouType="segm")
        self.max_det = self.params.maxDets[-1]
        self.cat_ids: list = np.unique(np.asarray(list(category_ids))).tolist()  # COCOeval sorts them
        self._cat_index = {cat: k for k, cat in enumerate(self.cat_ids)}
        num_areas = len(self.params.areaRng)
        self.num_gt = np.zeros((len(self.cat_ids), num_areas), np.int64)  # non-ignored GT per (category, area)
        # Per area range, blocks of (category index [N], score [N], matched [T, N], ignored [T, N]) in
        # chunk order: one per chunk in _pending, merged into one per _MERGE_EVERY chunks in _parts.
        self._parts: list[list[tuple]] = [[] for _ in range(num_areas)]
        self._pending: list[list[tuple]] = [[] for _ in range(num_areas)]
        self._last_image = None
        self.num_chunks = 0

    def add_chunk(self, images: Sequence[dict], gt_annotations: list[dict], detections: list[dict]) -> None:
        """Evaluate one chunk of images with COCOeval and keep its compact per-detection arrays.

        `images`: image dicts (`id`, `height`, `width`), ids above those of every earlier chunk.
        `gt_annotations`: the GT annotations on those images, `segmentation` as compressed RLE, with
        `id`, `area` and `iscrowd`. `detections`: results on those images ({image_id, category_id,
        segmentation (compressed RLE), score}, no `bbox`), in results-list order. pycocotools adds
        fields to both lists' dicts: pass dicts made for this call.
        """
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        image_ids = np.unique(np.asarray([image["id"] for image in images])).tolist()
        if not image_ids:
            return
        if self._last_image is not None and not image_ids[0] > self._last_image:
            raise ValueError(
                f"chunks must come in ascending image-id order: image id {image_ids[0]} after {self._last_image}"
            )
        self._last_image = image_ids[-1]
        used = {ann["category_id"] for ann in gt_annotations} | {det["category_id"] for det in detections}
        present = [cat for cat in self.cat_ids if cat in used]
        if not present:
            return  # nothing COCOeval would look at
        categories = [{"id": cat} for cat in present]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress; keep stdout clean
            coco_gt = COCO()
            coco_gt.dataset = {"images": list(images), "categories": categories, "annotations": gt_annotations}
            coco_gt.createIndex()
            if detections:
                coco_dt = coco_gt.loadRes(detections)
            else:  # loadRes cannot take an empty list
                coco_dt = COCO()
                coco_dt.dataset = {"images": list(images), "categories": categories, "annotations": []}
                coco_dt.createIndex()
            evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
            evaluator.params.imgIds = image_ids
            evaluator.params.catIds = present
            evaluator.evaluate()
        self._reduce(evaluator)
        self.num_chunks += 1

    def _reduce(self, evaluator) -> None:
        p = evaluator.params
        num_images, num_areas = len(p.imgIds), len(p.areaRng)
        max_det = self.max_det
        for a in range(num_areas):
            cats: list[int] = []
            counts: list[int] = []
            scores: list[float] = []
            matched: list[np.ndarray] = []
            ignored: list[np.ndarray] = []
            for k, cat in enumerate(p.catIds):
                kg = self._cat_index[cat]
                start = (k * num_areas + a) * num_images
                num_gt = 0
                num_dt = 0
                for entry in evaluator.evalImgs[start : start + num_images]:
                    if entry is None:
                        continue
                    num_gt += int(np.count_nonzero(entry["gtIgnore"] == 0))
                    dt_scores = entry["dtScores"][:max_det]
                    if dt_scores:
                        num_dt += len(dt_scores)
                        scores.extend(dt_scores)
                        matched.append(entry["dtMatches"][:, :max_det] != 0)
                        ignored.append(np.asarray(entry["dtIgnore"][:, :max_det], dtype=bool))
                self.num_gt[kg, a] += num_gt
                if num_dt:
                    cats.append(kg)
                    counts.append(num_dt)
            if scores:
                self._pending[a].append(
                    (
                        np.repeat(np.asarray(cats, np.int32), counts),
                        np.asarray(scores, dtype=np.float64),
                        np.concatenate(matched, axis=1),
                        np.concatenate(ignored, axis=1),
                    )
                )
                if len(self._pending[a]) >= _MERGE_EVERY:
                    self._merge(a)

    def _merge(self, a: int) -> None:
        """One block for the pending chunks of area range `a` (thousands of small arrays cost more than their data)."""
        pending = self._pending[a]
        if pending:
            self._parts[a].append(
                (
                    np.concatenate([part[0] for part in pending]),
                    np.concatenate([part[1] for part in pending]),
                    np.concatenate([part[2] for part in pending], axis=1),
                    np.concatenate([part[3] for part in pending], axis=1),
                )
            )
            self._pending[a] = []

    def precision(self) -> np.ndarray:
        """COCOeval.accumulate()'s `precision[:, :, :, :, maxDets=100]`: [T, R, K, A], -1 where no GT."""
        p = self.params
        num_thrs, num_rec = len(p.iouThrs), len(p.recThrs)
        num_cats, num_areas = self.num_gt.shape
        precision = -np.ones((num_thrs, num_rec, num_cats, num_areas))
        for a in range(num_areas):
            self._merge(a)
            parts = self._parts[a]
            if parts:
                cat = np.concatenate([part[0] for part in parts])
                # Group by category; the stable sort keeps each category's detections in image order.
                order = np.argsort(cat, kind="stable")
                scores = np.concatenate([part[1] for part in parts])[order]
                matched = np.concatenate([part[2] for part in parts], axis=1)[:, order]
                ignored = np.concatenate([part[3] for part in parts], axis=1)[:, order]
                bounds = np.concatenate(([0], np.cumsum(np.bincount(cat, minlength=num_cats))))
                del cat, order
            else:
                scores, matched, ignored = np.zeros(0), np.zeros((num_thrs, 0), bool), np.zeros((num_thrs, 0), bool)
                bounds = np.zeros(num_cats + 1, np.int64)
            for k in range(num_cats):
                num_gt = int(self.num_gt[k, a])
                if num_gt == 0:
                    continue  # COCOeval leaves -1: nothing to recall
                s, e = bounds[k], bounds[k + 1]
                precision[:, :, k, a] = precision_curve(
                    scores[s:e], matched[:, s:e], ignored[:, s:e], num_gt, p.recThrs
                )
        return precision

    def summary(self) -> dict[str, float]:
        """AP, AP50, AP75, APs, APm, APl at maxDets=100, as COCOeval.summarize()'s stats[:6]."""
        return dict(zip(AP_KEYS, summarize_ap(self.precision(), self.params)))


def precision_curve(
    scores: np.ndarray, matched: np.ndarray, ignored: np.ndarray, num_gt: int, rec_thrs: np.ndarray
) -> np.ndarray:
    """COCOeval.accumulate() for one (category, area range): precision [T, R] at the recall thresholds.

    `scores` [D]: the detections' scores, concatenated over images in image order; `matched` and
    `ignored` [T, D]: dtMatches != 0 and dtIgnore at each IoU threshold; `num_gt` > 0: non-ignored GT.
    """
    order = np.argsort(-scores, kind="mergesort")  # as COCOeval: stable, ties keep image order
    matched, ignored = matched[:, order], ignored[:, order]
    tps = np.logical_and(matched, np.logical_not(ignored))
    fps = np.logical_and(np.logical_not(matched), np.logical_not(ignored))
    tp_sum = np.cumsum(tps, axis=1).astype(dtype=float)
    fp_sum = np.cumsum(fps, axis=1).astype(dtype=float)
    num_thrs, num_dt = tp_sum.shape
    q = np.zeros((num_thrs, len(rec_thrs)))
    if num_dt == 0:
        return q  # COCOeval: every lookup fails, precision stays 0
    rc = tp_sum / num_gt
    pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    # Precision made monotone: each point takes the best precision at any higher recall.
    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
    for t in range(num_thrs):
        inds = np.searchsorted(rc[t], rec_thrs, side="left")
        # COCOeval stops at the first recall threshold beyond the last detection's recall; the rest stay 0.
        reached = inds < num_dt
        q[t, reached] = pr[t, inds[reached]]
    return q


def summarize_ap(precision: np.ndarray, params) -> list[float]:
    """COCOeval.summarize()'s AP lines from precision [T, R, K, A] at maxDets=100: stats[:6]."""

    def mean_ap(iou_thr=None, area="all") -> float:
        s = precision
        if iou_thr is not None:
            s = s[np.where(iou_thr == params.iouThrs)[0]]
        s = s[:, :, :, [i for i, label in enumerate(params.areaRngLbl) if label == area]]
        valid = s[s > -1]
        return -1.0 if len(valid) == 0 else float(np.mean(valid))

    return [
        mean_ap(),
        mean_ap(iou_thr=0.5),
        mean_ap(iou_thr=0.75),
        mean_ap(area="small"),
        mean_ap(area="medium"),
        mean_ap(area="large"),
    ]


def _records(pred) -> list[dict]:
    return pred if isinstance(pred, list) else pred.annotations


def answers_gt_boxes(pred, gt) -> bool:
    """True when PRED was labelled from the GT's own boxes: a prediction has a GT annotation's image id and
    identical `bbox`. Then `mal eval` uses the given-box protocol; else PRED is detector output."""
    gt_boxes = {(ann["image_id"], *ann.get("bbox", ())) for ann in gt.annotations}
    return any((rec["image_id"], *rec.get("bbox", ())) in gt_boxes for rec in _records(pred))


def detections_of(pred, gt, source: str) -> list[dict]:
    """Every prediction of a results list or labelled dataset, as detections on the GT's images.

    Raises `InputError` for a prediction on an image the GT does not have.
    """
    from mal_cli.errors import InputError

    records = _records(pred)
    image_ids = [image["id"] for image in getattr(pred, "images", [])] + [rec["image_id"] for rec in records]
    for image_id in image_ids:
        if image_id not in gt.image_by_id:
            raise InputError(
                f"{source}: image id {image_id} is not in the GT {gt.source}; "
                "evaluate against the GT of the same images"
            )
    return records

"""Measure test-time levers from a probability cache (benchmarks/cache_probs.py): mask variants and mal_score cues.

For every box: the window probabilities as `mal label` pastes them, their flip-averaged (logit mean) version,
and colour-refined versions (mal_cli.refine). Each mask variant becomes a labels file scored with
`mal_cli.evaluate` (mIoU all/S/M/L, segm AP); every score cue is ranked against the base mask's true IoU
(Spearman, mean IoU of the 5 % lowest-scored vs the rest). Per-box cues go to --cues (an .npz) for combining.

    python benchmarks/levers.py /work/notes/val/probs_val.npz --gt /work/notes/val/val.json --images DIR \
        --out-dir /work/notes/val/runs/levers --variants base,flip,mf,guided
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import orjson
from rank_report import low5_and_rest  # benchmarks/ is sys.path[0] when this file runs

from mal_cli import geometry, masks
from mal_cli.dataset import load_dataset
from mal_cli.evaluate import evaluate, spearman
from mal_cli.images import load_rgb
from mal_cli.refine import (
    GuidedConfig,
    MeanFieldConfig,
    guided_refine,
    meanfield_refine,
)
from mal_cli.score import fill_consistency, mask_agreement, mask_quality

THRESHOLD = 0.5


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def variants_of(
    prob: np.ndarray,
    prob_flip: np.ndarray,
    image_win: np.ndarray,
    names: list[str],
    mf: MeanFieldConfig,
    gd: GuidedConfig,
    seconds: dict[str, float],
) -> dict[str, np.ndarray]:
    """Each mask variant's probability window; adds each variant's own compute time to `seconds` (process time)."""
    makers = {
        "flip": lambda out: 1 / (1 + np.exp(-(_logit(prob) + _logit(prob_flip)) / 2)),
        "mf": lambda out: meanfield_refine(prob, image_win, mf),
        "guided": lambda out: guided_refine(prob, image_win, gd),
        "flip_mf": lambda out: meanfield_refine(out["flip"], image_win, mf),
    }
    out = {"base": prob}
    wanted = [
        n
        for n in ("flip", "mf", "guided", "flip_mf")
        if n in names or (n == "flip" and "flip_mf" in names) or (n == "mf" and "mf_ml" in names)
    ]
    for n in wanted:
        t0 = time.process_time()
        out[n] = makers[n](out).astype(np.float32)
        seconds[n] = seconds.get(n, 0.0) + time.process_time() - t0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("--gt", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--variants", default="base,flip,mf,guided")
    parser.add_argument("--mf", default="{}", help="MeanFieldConfig fields as JSON")
    parser.add_argument("--guided", default="{}", help="GuidedConfig fields as JSON")
    parser.add_argument("--no-ap", action="store_true")
    args = parser.parse_args()
    names = args.variants.split(",")
    mf, gd = (
        MeanFieldConfig(**json.loads(args.mf)),
        GuidedConfig(**json.loads(args.guided)),
    )
    with np.load(args.cache) as cache:  # each cache[key] reads (and unzips) the whole array again: read each once
        ann_ids, regions, cached_probs = cache["ann_ids"].tolist(), cache["regions"], cache["probs"]
        cached_flips = cache["probs_flip"] if "probs_flip" in cache.files else None  # none from --no-flip
    gt = load_dataset(args.gt)
    ann_by_id = {a["id"]: a for a in gt.annotations}
    image_by_id = gt.image_by_id
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {n: [] for n in names}
    cues = {
        k: []
        for k in (
            "ann_id",
            "shipped",
            "confidence",
            "stability",
            "flip_iou",
            "fill",
            "mf_iou",
            "guided_iou",
        )
    }
    seconds = {n: 0.0 for n in names}
    current_image, image = None, None
    for k, ann_id in enumerate(ann_ids):
        ann = ann_by_id[ann_id]
        info = image_by_id[ann["image_id"]]
        if ann["image_id"] != current_image:
            image = load_rgb(Path(args.images) / info["file_name"])
            current_image = ann["image_id"]
        hw = image.shape[:2]
        box = geometry.xywh_to_xyxy(ann["bbox"])
        region = regions[k]
        prob, window = geometry.paste_box_prob(cached_probs[k].astype(np.float32), box, region, hw)
        prob_flip = None
        if cached_flips is not None:
            prob_flip, _ = geometry.paste_box_prob(cached_flips[k].astype(np.float32), box, region, hw)
        r0, r1, c0, c1 = window
        image_win = image[r0:r1, c0:c1]
        var = variants_of(prob, prob_flip, image_win, names, mf, gd, seconds)
        if "mf_ml" in names:  # refinement for medium and large boxes only (box area >= 32^2, the decoder's route)
            var["mf_ml"] = var["mf"] if ann["bbox"][2] * ann["bbox"][3] >= 32**2 else prob
        base_mask = prob >= THRESHOLD
        for n in names:
            m = var[n] >= THRESHOLD
            seg = masks.encode_window(m.view(np.uint8), r0, c0, hw[0], hw[1])
            results[n].append(
                {
                    **ann,
                    "segmentation": seg,
                    "area": int(m.sum()),
                    "mal_score": mask_quality(var[n]),
                }
            )
        p = prob.astype(np.float64)
        cues["ann_id"].append(ann_id)
        cues["shipped"].append(mask_quality(prob))
        cues["confidence"].append(float(np.abs(2 * p - 1).mean()) if p.size else 0.0)
        low, high = np.count_nonzero(p >= 0.4), np.count_nonzero(p >= 0.6)
        cues["stability"].append(high / low if low else 0.0)
        cues["flip_iou"].append(np.nan if prob_flip is None else mask_agreement(base_mask, prob_flip >= THRESHOLD))
        cues["fill"].append(fill_consistency(base_mask))
        cues["mf_iou"].append(mask_agreement(base_mask, var["mf"] >= THRESHOLD) if "mf" in var else np.nan)
        cues["guided_iou"].append(mask_agreement(base_mask, var["guided"] >= THRESHOLD) if "guided" in var else np.nan)
        if k % 50 == 0:
            print(f"\r{k}/{len(ann_ids)}", end="", file=sys.stderr)
    print(file=sys.stderr)
    rows = {}
    gt_rest = {k: v for k, v in orjson.loads(Path(args.gt).read_bytes()).items() if k != "annotations"}
    for n in names:
        labelled = {**gt_rest, "annotations": results[n]}
        path = out_dir / f"{n}.json"
        path.write_bytes(orjson.dumps(labelled))
        report = evaluate(load_dataset(path), gt, compute_ap=not args.no_ap)
        rows[n] = {
            "miou": report.instance_miou,
            **{s: b.miou for s, b in report.by_size.items()},
            "AP": report.ap.get("AP"),
            "seconds_per_box": seconds.get(n, 0.0) / len(results[n]),
            "ious": report.ious,
        }
    ious = rows["base"]["ious"]
    ids = cues["ann_id"]
    iou_arr = np.array([ious.get(i, np.nan) for i in ids])
    keep = ~np.isnan(iou_arr)
    np.savez(out_dir / "cues.npz", iou=iou_arr, **{k: np.array(v) for k, v in cues.items()})
    for n, row in rows.items():
        print(
            n,
            {
                k: (round(100 * v, 2) if isinstance(v, float) and k != "seconds_per_box" else v)
                for k, v in row.items()
                if k not in ("ious",)
            },
            f"{row['seconds_per_box'] * 1e3:.1f} ms/box (CPU time, flip: model cost not included)",
        )
    for c in cues:
        if c == "ann_id":
            continue
        s = np.array(cues[c], dtype=np.float64)[keep]
        if np.isnan(s).any():
            continue
        low, rest = low5_and_rest(s, iou_arr[keep])
        print(f"cue {c}: spearman {spearman(s, iou_arr[keep]):.3f}, low5/rest {100 * low:.1f} / {100 * rest:.1f}")


if __name__ == "__main__":
    main()

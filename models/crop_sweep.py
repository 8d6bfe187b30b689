"""Per-route crop-size sweep: how much mask quality each route loses when its boxes are encoded at a smaller crop.

    python models/crop_sweep.py small 224,168,140,112      # also: medium, large
    python models/crop_sweep.py large 224 --route-scales 0.5,1,2      # the trained decoder scales

For the boxes of one area route (box w*h: small < 32², medium < 96², large), labels the dataset's boxes at
each crop size (the decoder rescales the features to its usual conv grid, as `mal label --crop-sizes` does)
and prints the mean IoU with the ground-truth masks and the model's ms per box. The decoder runs at
`mal label`'s scales (`predictor.default_decoder_scales`) unless `--route-scales` says otherwise. Needs a
dataset with masks (default: ../shared/data/coco_dev_train2017); the masks are only compared with, never
learnt from. This is how `predictor.DEFAULT_CROP_FRACTIONS` and `DEFAULT_DECODER_FRACTIONS` were chosen
(README "Performance").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO

from mal_cli import geometry
from mal_cli.images import load_rgb
from mal_cli.labeling import default_checkpoint
from mal_cli.modeling.labeler import load_labeler
from mal_cli.predictor import BoxPredictor, paste_prob, window_to_full

ROUTES = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, float("inf"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("route", choices=ROUTES)
    parser.add_argument("sizes", help="comma-separated crop sizes, e.g. 224,168")
    parser.add_argument(
        "--dataset", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/coco_dev_train2017")
    )
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument(
        "--route-scales", default=None, help="the decoder's scale per route, e.g. 0.5,1,2 (default: mal label's)"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    coco = COCO(f"{args.dataset}/annotations.json")
    predictor = BoxPredictor(load_labeler(args.checkpoint or default_checkpoint()), device="cpu")
    if args.route_scales:
        scales = tuple(float(v) for v in args.route_scales.split(","))
        predictor.crop_plan = dataclasses.replace(predictor.crop_plan, decoder_scales=scales)
    lo, hi = ROUTES[args.route]
    ious: dict[int, list[float]] = {s: [] for s in sizes}
    seconds = dict.fromkeys(sizes, 0.0)
    for image_id in sorted(coco.getImgIds()):
        anns = [
            a
            for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            if not a["iscrowd"] and lo <= a["bbox"][2] * a["bbox"][3] < hi
        ]
        if not anns:
            continue
        info = coco.loadImgs(image_id)[0]
        image = load_rgb(f"{args.dataset}/images/{info['file_name']}")
        hw = image.shape[:2]
        chw = torch.from_numpy(image.copy()).permute(2, 0, 1)
        boxes = [geometry.xywh_to_xyxy(a["bbox"]) for a in anns]
        regions = predictor.regions(boxes)
        areas = torch.tensor([a["bbox"][2] * a["bbox"][3] for a in anns], dtype=torch.float32)
        truths = [coco.annToMask(a) for a in anns]
        for size in sizes:
            crops = geometry.crop_images(chw, regions, size).round_().clamp_(0, 255).to(torch.uint8)
            start = time.perf_counter()
            probs = predictor.predict_probs(crops, areas)
            seconds[size] += time.perf_counter() - start
            for prob, box, region, truth in zip(probs, boxes, regions, truths):
                mask = window_to_full(paste_prob(prob, box, region, hw, predictor.threshold), hw)
                union = np.logical_or(mask, truth).sum()
                ious[size].append(float(np.logical_and(mask, truth).sum() / union) if union else 1.0)
    result = {
        size: {
            "boxes": len(ious[size]),
            "miou": round(100 * float(np.mean(ious[size])), 2),
            "model_ms_per_box": round(1000 * seconds[size] / max(len(ious[size]), 1), 1),
        }
        for size in sizes
    }
    scales = predictor.crop_plan.decoder_scales or predictor.model.decoder.route_scales
    print(json.dumps({"route": args.route, "route_scales": list(scales), "by_crop_size": result}))


if __name__ == "__main__":
    main()

"""Run a labeler once over a dataset and keep every box's crop probabilities (plain and flipped) in an .npz.

The levers of docs/labeler_v2.md (test-time refinement, mal_score cues) are then measured from this cache
without running the model again (benchmarks/levers.py). Same crops, routes and precision as `mal label`
(the predictor's default crop plan, or --crop-sizes full).

    python benchmarks/cache_probs.py /work/notes/val/val.json --images DIR --out /work/notes/val/probs_val.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import torch

from mal_cli import geometry
from mal_cli.images import load_rgb
from mal_cli.labeling.options import default_checkpoint
from mal_cli.modeling.labeler import load_labeler
from mal_cli.predictor import BoxCrops, BoxPredictor


def image_probs(
    predictor: BoxPredictor, image_hwc: np.ndarray, boxes_xywh: list, flip: bool = True
) -> tuple[np.ndarray, np.ndarray, list]:
    """(N, M, M) probabilities, the same of the mirrored crops (mirrored back; None without `flip`), and the
    crop regions."""
    image = torch.from_numpy(np.ascontiguousarray(image_hwc)).permute(2, 0, 1)
    boxes = [geometry.xywh_to_xyxy(b) for b in boxes_xywh]
    regions = predictor.regions(boxes)
    areas = torch.tensor([geometry.box_area(b) for b in boxes_xywh])
    crops = predictor.crop_plan.crops(image, regions, areas.tolist())
    probs = predictor.predict_crops(crops, areas, batch_size=len(boxes))
    if not flip:
        return probs.numpy(), None, regions
    mirrored = BoxCrops(crops.sizes, {s: c.flip(-1) for s, c in crops.by_size.items()})
    probs_flip = predictor.predict_crops(mirrored, areas, batch_size=len(boxes)).flip(-1)
    return probs.numpy(), probs_flip.numpy(), regions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("boxes")
    parser.add_argument("--images", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument(
        "--no-flip",
        action="store_true",
        help="plain crops only (half the cost; no flip cue)",
    )
    parser.add_argument(
        "--crop-sizes",
        default=None,
        help="'full' for the exact model (default: mal label's plan)",
    )
    args = parser.parse_args()
    data = orjson.loads(Path(args.boxes).read_bytes())
    predictor = BoxPredictor(
        load_labeler(args.checkpoint or default_checkpoint()),
        crop_sizes=args.crop_sizes,
    )
    by_image: dict = {}
    for ann in data["annotations"]:
        _, _, w, h = ann["bbox"]
        if w > 0 and h > 0:
            by_image.setdefault(ann["image_id"], []).append(ann)
    ids, probs, probs_flip, regions = [], [], [], []
    t0, n = time.perf_counter(), 0
    for k, img in enumerate(i for i in data["images"] if i["id"] in by_image):
        anns = by_image[img["id"]]
        image = load_rgb(Path(args.images) / img["file_name"])
        p, pf, r = image_probs(predictor, image, [a["bbox"] for a in anns], flip=not args.no_flip)
        ids += [a["id"] for a in anns]
        probs.append(p.astype(np.float16))
        if pf is not None:
            probs_flip.append(pf.astype(np.float16))
        regions += r
        n += len(anns)
        print(
            f"\r{k + 1} images, {n / (time.perf_counter() - t0):.2f} boxes/s",
            end="",
            file=sys.stderr,
        )
    print(file=sys.stderr)
    np.savez(
        args.out,
        ann_ids=np.array(ids),
        probs=np.concatenate(probs),
        **({"probs_flip": np.concatenate(probs_flip)} if probs_flip else {}),
        regions=np.array(regions, dtype=np.float64),
    )


if __name__ == "__main__":
    main()

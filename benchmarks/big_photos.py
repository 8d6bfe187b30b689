"""Make a set of 12-megapixel JPEG "phone photos" from COCO images: each upscaled to 4000 x 3000 with its boxes.

    python benchmarks/big_photos.py DATASET.json --images DIR --out big/ [--count 12] [--min-box-side PX]

Writes big/images/*.jpg (quality 90, Lanczos upscale of the 640 x 480 images, in id order) and big/boxes.json
(the same annotations with boxes scaled, segmentations dropped: box-only input, as a user's would be).
--min-box-side keeps only images whose every box is at least PX pixels wide and high before the upscale
(photos of a few large objects, where `mal label` can decode the JPEG at a reduced size). --gt also writes
big/gt.json: the polygon masks scaled alike (crowd RLEs left out), for `mal eval --gt` (measurement only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson
from PIL import Image

SIZE = (4000, 3000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset")
    parser.add_argument("--images", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--min-box-side", type=float, default=0.0)
    parser.add_argument("--gt", action="store_true")
    args = parser.parse_args()
    doc = orjson.loads(Path(args.dataset).read_bytes())
    smallest: dict = {}
    for ann in doc["annotations"]:
        smallest[ann["image_id"]] = min(smallest.get(ann["image_id"], float("inf")), *ann["bbox"][2:])
    chosen = sorted(
        (
            im
            for im in doc["images"]
            if (im["width"], im["height"]) == (640, 480) and smallest.get(im["id"], 0.0) >= args.min_box_side
        ),
        key=lambda im: im["id"],
    )
    chosen = chosen[: args.count]
    ids = {im["id"] for im in chosen}
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scale = SIZE[0] / 640
    images = []
    for im in chosen:
        Image.open(Path(args.images) / im["file_name"]).convert("RGB").resize(SIZE, Image.LANCZOS).save(
            out / "images" / im["file_name"], quality=90
        )
        images.append(dict(im, width=SIZE[0], height=SIZE[1]))
    annotations = []
    for ann in doc["annotations"]:
        if ann["image_id"] in ids:
            bbox = [v * scale for v in ann["bbox"]]
            annotations.append(
                {k: v for k, v in ann.items() if k != "segmentation"} | {"bbox": bbox, "area": bbox[2] * bbox[3]}
            )
    if args.gt:
        gt = [
            dict(
                a,
                bbox=[v * scale for v in a["bbox"]],
                area=a["area"] * scale * scale,
                segmentation=[[v * scale for v in poly] for poly in a["segmentation"]],
            )
            for a in doc["annotations"]
            if a["image_id"] in ids and isinstance(a["segmentation"], list)
        ]
        (out / "gt.json").write_bytes(
            orjson.dumps({"images": images, "annotations": gt, "categories": doc["categories"]})
        )
    (out / "boxes.json").write_bytes(
        orjson.dumps({"images": images, "annotations": annotations, "categories": doc["categories"]})
    )
    print(f"{len(images)} images, {len(annotations)} boxes -> {out}")


if __name__ == "__main__":
    main()

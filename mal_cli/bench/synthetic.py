"""A synthetic LVIS-scale dataset for memory and throughput tests (`python -m mal_cli.bench synthetic`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson


def synthetic_dataset(
    out: str | Path,
    images: int,
    boxes: int,
    image_dir: str | Path,
    files: int = 8,
    size: int = 32,
    categories: int = 1203,
    seed: int = 0,
    masks: bool = False,
) -> dict:
    """An LVIS-scale stand-in: `images` records over `boxes` boxes, all pointing at `files` tiny PNGs.

    The image files are `size` x `size` noise PNGs written to `image_dir` (shared by many records, so a
    million-box dataset costs kilobytes of images). `masks=True` adds a polygon per box (a diamond inside
    it), so the file can be a `mal eval` ground truth. Streams the JSON out (never builds it whole).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(image_dir / f"syn{f}.png")
    per_image = np.full(images, boxes // images)
    per_image[: boxes % images] += 1
    with open(out, "wb") as handle:
        handle.write(b'{"info":{"description":"mal bench synthetic"},"images":[')
        for i in range(images):
            handle.write(
                (b"," if i else b"")
                + orjson.dumps({"id": i + 1, "file_name": f"syn{i % files}.png", "width": size, "height": size})
            )
        handle.write(b'],"categories":' + orjson.dumps([{"id": c + 1, "name": f"c{c + 1}"} for c in range(categories)]))
        handle.write(b',"annotations":[')
        ann_id = 0
        chunk = 100_000
        image_of = np.repeat(np.arange(1, images + 1), per_image)
        for start in range(0, boxes, chunk):
            n = min(chunk, boxes - start)
            xy = rng.uniform(0, size * 0.6, (n, 2)).round(2)
            wh = rng.uniform(2, size * 0.4, (n, 2)).round(2)
            cats = rng.integers(1, categories + 1, n)
            parts = []
            for j in range(n):
                x, y, w, h = float(xy[j, 0]), float(xy[j, 1]), float(wh[j, 0]), float(wh[j, 1])
                ann_id += 1
                ann = {
                    "id": ann_id,
                    "image_id": int(image_of[start + j]),
                    "category_id": int(cats[j]),
                    "bbox": [x, y, w, h],
                    "area": round(w * h, 2),
                    "iscrowd": 0,
                }
                if masks:
                    ann["segmentation"] = [[x + w / 2, y, x + w, y + h / 2, x + w / 2, y + h, x, y + h / 2]]
                    ann["area"] = round(w * h / 2, 2)
                parts.append(orjson.dumps(ann))
            handle.write((b"," if start else b"") + b",".join(parts))
        handle.write(b"]}")
    return {"images": images, "boxes": boxes, "files": files, "out": str(out)}

"""`mal export yolo`: labelled COCO/LVIS JSON -> YOLO segmentation text labels (Ultralytics layout).

Written under OUT:

- `labels/<image file stem>.txt` for EVERY image (an image without instances gets an empty file, which
  YOLO reads as background). One line per instance: `class_id x1 y1 x2 y2 ...`, the outline polygon
  in pixel-edge coordinates divided by the image width/height (so in [0, 1]), 6 decimals. Sub-folders
  of `file_name` are kept (`train/a.jpg` -> `labels/train/a.txt`).
- `classes.txt`: the category names, one a line; line k is class id k. Class ids are the categories
  sorted by their COCO id (COCO's 1..90 with gaps become 0..79).
- `data.yaml`: `train`/`val` (both `images`, relative to the yaml), `nc` and `names` (id -> name). Put or
  link the images in OUT/images (`--link-images DIR` makes symlinks) and `yolo train data=OUT/data.yaml`.

Masks become polygons with `masks.to_polygons` (the exact pixel outline; holes are filled, as COCO
polygons also cannot hold them). A YOLO line holds one polygon, so a mask in several parts is written
per `parts`:

- `merge` (default, what Ultralytics' own COCO converter does): the parts, largest first, are joined into
  one polygon by zero-width "bridges" (out from the nearest vertex and back along the same segment).
  Rasterised again the bridges cover nothing: the line is the whole mask, one instance, one line.
- `largest`: only the largest part (drops small fragments).
- `lines`: one line per part. Simple, but YOLO then counts each part as an instance of its own.

Crowd annotations (`iscrowd: 1`), annotations with an empty mask and detections whose `score` is below
`min_score` (default: results.TRAINING_MIN_SCORE) are left out (counted in the summary).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Sequence, Union

import numpy as np

from mal_cli import masks
from mal_cli.dataset import Dataset, image_file_name, load_any, load_dataset
from mal_cli.errors import InputError, OutputError
from mal_cli.results import TRAINING_MIN_SCORE, below_min_score

__all__ = ["PARTS_MODES", "merge_parts", "instance_polygons", "yolo_lines", "export_yolo", "read_yolo_label"]

PARTS_MODES = ("merge", "largest", "lines")


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def _nearest_pair(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> tuple[int, int]:
    """Indices (i, j) minimising |a[i] - b[j]|, in chunks so big outlines stay within memory."""
    best = (np.inf, 0, 0)
    for start in range(0, len(b), chunk):
        part = b[start : start + chunk]
        d = ((a[:, None, :] - part[None, :, :]) ** 2).sum(-1)
        flat = int(np.argmin(d))
        i, j = divmod(flat, d.shape[1])
        if d[i, j] < best[0]:
            best = (float(d[i, j]), i, start + j)
    return best[1], best[2]


def merge_parts(polygons: Sequence[Sequence[float]]) -> list[float]:
    """Join COCO polygons (flat [x1, y1, ...] lists) into one flat polygon with zero-width bridges.

    Parts are taken largest first; each next part hangs off the nearest vertex of what is built so far:
    P[..i], Q[j], Q[j+1], ..., Q[j], P[i], P[i+1..]. The bridge P[i] -> Q[j] is walked out and back, so it
    encloses no area: rasterised, the merged polygon covers the union of the parts.
    """
    parts = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons if len(p) >= 6]
    if not parts:
        return []
    parts.sort(key=_polygon_area, reverse=True)
    merged = parts[0]
    for part in parts[1:]:
        i, j = _nearest_pair(merged, part)
        loop = np.concatenate([part[j:], part[: j + 1]])  # around the part, back to where it started
        merged = np.concatenate([merged[: i + 1], loop, merged[i:]])
    return merged.reshape(-1).tolist()


def _drop_nested(polygons: list[list[float]], height: int, width: int) -> list[list[float]]:
    """Drop parts lying inside another part's outline (an island in a hole: holes are filled anyway).

    Outlines of different parts never cross, so the only overlap is nesting; left in, a nested part
    would cancel itself out of the merged polygon (even-odd filling).
    """
    if len(polygons) < 2:
        return polygons
    import pycocotools.mask as mask_utils

    polygons = sorted(polygons, key=lambda p: _polygon_area(np.asarray(p).reshape(-1, 2)), reverse=True)
    kept, union = [polygons[0]], mask_utils.frPyObjects([polygons[0]], height, width)[0]
    for poly in polygons[1:]:
        rle = mask_utils.frPyObjects([poly], height, width)[0]
        inside = mask_utils.merge([rle, union], intersect=True)
        if mask_utils.area(inside) == mask_utils.area(rle):
            continue
        kept.append(poly)
        union = mask_utils.merge([union, rle])
    return kept


def instance_polygons(segmentation: Any, height: int, width: int, parts: str = "merge") -> list[list[float]]:
    """The polygons (pixel coordinates, flat lists) of one instance as YOLO lines will hold them.

    Any segmentation (RLE or polygons) is rasterised and its pixel outline traced, so the lines cover
    exactly the mask's pixels (holes filled) whatever the input's polygons did (overlaps, self-touching).
    """
    if parts not in PARTS_MODES:
        raise InputError(f"--parts must be one of {', '.join(PARTS_MODES)}, got '{parts}'")
    polygons = masks.to_polygons(masks.decode(segmentation, height, width))
    if not polygons:
        return []
    if parts == "lines" or len(polygons) == 1:
        return polygons
    if parts == "largest":
        return [max(polygons, key=lambda p: _polygon_area(np.asarray(p).reshape(-1, 2)))]
    return [merge_parts(_drop_nested(polygons, height, width))]


def _format_line(class_id: int, polygon: Sequence[float], height: int, width: int) -> str:
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2) / np.array([width, height], dtype=np.float64)
    xy = np.clip(xy, 0.0, 1.0)
    return f"{class_id} " + " ".join(f"{v:.6f}" for v in xy.reshape(-1))


def yolo_lines(annotations: Sequence[dict], image: dict, class_of: dict, parts: str = "merge",
               source: str = "<labels>") -> tuple[list[str], dict]:
    """The YOLO-seg lines of one image's annotations, and counts of what was left out."""
    height, width = int(image["height"]), int(image["width"])
    lines: list[str] = []
    skipped = {"crowd": 0, "empty": 0}
    for ann in annotations:
        if ann.get("iscrowd"):
            skipped["crowd"] += 1
            continue
        if ann.get("category_id") not in class_of:
            raise InputError(f"{source}: annotation id {ann.get('id')} has category id {ann.get('category_id')}, "
                             "not in 'categories'")
        seg = ann.get("segmentation")
        try:
            polygons = instance_polygons(seg, height, width, parts) if seg else []
        except ValueError as err:
            raise InputError(f"{source}: annotation id {ann.get('id')}: bad segmentation: {err}") from None
        if not polygons:
            skipped["empty"] += 1
            continue
        lines.extend(_format_line(class_of[ann["category_id"]], p, height, width) for p in polygons)
    return lines, skipped


def _label_relpath(image: dict, source: str) -> PurePosixPath:
    name = PurePosixPath(image_file_name(image, source).replace("\\", "/"))
    if name.is_absolute() or ".." in name.parts:
        name = PurePosixPath(name.name)
    return name.with_suffix(".txt")


def _yaml_str(text: str) -> str:
    return json.dumps(str(text), ensure_ascii=False)  # a JSON string is a valid YAML scalar


def export_yolo(labels: Union[str, Path, Dataset], out_dir: Union[str, Path], parts: str = "merge",
                image_info: Optional[str] = None, link_images: Optional[Union[str, Path]] = None,
                min_score: float = TRAINING_MIN_SCORE) -> dict:
    """Write OUT/labels/*.txt, OUT/classes.txt and OUT/data.yaml (see module docstring). Returns a summary dict.

    Annotations whose detector `score` is below `min_score` are left out (mal_cli.results.below_min_score).
    """
    if parts not in PARTS_MODES:
        raise InputError(f"--parts must be one of {', '.join(PARTS_MODES)}, got '{parts}'")
    if isinstance(labels, Dataset):
        dataset, records, source = labels, labels.annotations, labels.source
    else:
        loaded = load_any(labels)
        source = "<stdin>" if str(labels) == "-" else str(labels)
        if isinstance(loaded, Dataset):
            dataset, records = loaded, loaded.annotations
        else:
            if image_info is None:
                raise InputError(f"{source} is a results list: pass --image-info DATASET.json for images and categories")
            dataset, records = load_dataset(image_info), loaded
    categories = sorted(dataset.categories, key=lambda c: c["id"])
    if not categories:
        raise InputError(f"{dataset.source}: no 'categories'; YOLO needs the class names")
    class_of = {c["id"]: k for k, c in enumerate(categories)}
    by_image: dict[Any, list[dict]] = defaultdict(list)
    low_score = 0
    for rec in records:
        if below_min_score(rec, min_score):
            low_score += 1
            continue
        by_image[rec["image_id"]].append(rec)

    out = Path(out_dir)
    try:
        (out / "labels").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{out}: cannot create the output folder: {err.strerror or err}") from None
    stats = {"images": 0, "instances": 0, "lines": 0, "skipped_crowd": 0, "skipped_empty": 0,
             "classes": len(categories), "parts": parts, "out": str(out), "skipped_low_score": low_score}
    seen: set = set()
    for image in dataset.images:
        for key in ("height", "width"):
            if key not in image:
                raise InputError(f"{dataset.source}: image id {image['id']} has no '{key}'; YOLO coordinates need it")
        rel = _label_relpath(image, dataset.source)
        if rel in seen:
            raise InputError(f"{dataset.source}: two images map to the label file {rel}; file names must be unique")
        seen.add(rel)
        anns = by_image.get(image["id"], [])
        lines, skipped = yolo_lines(anns, image, class_of, parts, source)
        target = out / "labels" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(line + "\n" for line in lines))
        stats["images"] += 1
        stats["lines"] += len(lines)
        stats["instances"] += len(anns) - skipped["crowd"] - skipped["empty"]
        stats["skipped_crowd"] += skipped["crowd"]
        stats["skipped_empty"] += skipped["empty"]
        if link_images is not None:
            src = Path(link_images).resolve() / image_file_name(image, dataset.source)
            dst = out / "images" / rel.with_suffix(PurePosixPath(image_file_name(image)).suffix)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            os.symlink(src, dst)

    names = [str(c.get("name", c["id"])) for c in categories]
    (out / "classes.txt").write_text("".join(n + "\n" for n in names))
    yaml = ["# written by `mal export yolo`; class k = line k of classes.txt = k-th category by COCO id",
            "# put (or link: --link-images DIR) the images in images/ beside this file",
            "train: images", "val: images", f"nc: {len(names)}", "names:"]
    yaml += [f"  {k}: {_yaml_str(n)}" for k, n in enumerate(names)]
    (out / "data.yaml").write_text("\n".join(yaml) + "\n")
    return stats


def read_yolo_label(path: Union[str, Path], height: int, width: int) -> list[tuple[int, list[float]]]:
    """Read a YOLO-seg label file back: [(class_id, flat polygon in pixel coordinates), ...]."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        values = line.split()
        xy = np.asarray([float(v) for v in values[1:]], dtype=np.float64).reshape(-1, 2) * np.array([width, height])
        rows.append((int(values[0]), xy.reshape(-1).tolist()))
    return rows

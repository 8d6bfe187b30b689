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
import shutil
import sys
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Sequence, Union

import numpy as np

from mal_cli import masks
from mal_cli.dataset import Dataset, image_file_name, load_any, load_dataset
from mal_cli.errors import InputError, OutputError
from mal_cli.fileio import TEMP_TAG, remove_stale_temps, write_bytes_atomic
from mal_cli.images import check_pixel_budget
from mal_cli.results import TRAINING_MIN_SCORE, below_min_score
from mal_cli.safe_paths import check_file_name, image_path, is_inside, open_exclusive, refuse_inputs_under, write_error
from mal_cli.segmentation_check import checked_decode

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
    polygons = masks.to_polygons(checked_decode(segmentation, height, width))
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


def yolo_lines(
    annotations: Sequence[dict], image: dict, class_of: dict, parts: str = "merge", source: str = "<labels>"
) -> tuple[list[str], dict]:
    """The YOLO-seg lines of one image's annotations, and counts of what was left out."""
    height, width = check_pixel_budget(image.get("height"), image.get("width"), f"{source}: image id {image.get('id')}")
    lines: list[str] = []
    skipped = {"crowd": 0, "empty": 0}
    for ann in annotations:
        if ann.get("iscrowd"):
            skipped["crowd"] += 1
            continue
        if ann.get("category_id") not in class_of:
            raise InputError(
                f"{source}: annotation id {ann.get('id')} has category id {ann.get('category_id')}, not in 'categories'"
            )
        if "segmentation" not in ann:
            raise InputError(
                f"{source}: annotation id {ann.get('id')} has no 'segmentation' (a box without a mask); "
                "label the boxes first (mal label) instead of exporting them as background"
            )
        seg = ann["segmentation"]
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
    where = f"{source}: image id {image.get('id')}"
    name = PurePosixPath(check_file_name(image_file_name(image, source), where, allow_outside=True).replace("\\", "/"))
    if name.is_absolute() or ".." in name.parts:
        name = PurePosixPath(name.name)
    if name.name in ("", ".", ".."):
        raise InputError(f"{where}: file_name {str(name)!r} names no file; fix the file name")
    return name.with_suffix(".txt")


def _yaml_str(text: str) -> str:
    return json.dumps(str(text), ensure_ascii=False)  # a JSON string is a valid YAML scalar


def _class_names(categories: list[dict], source: str) -> list[str]:
    """Category names for classes.txt, where line k must be class k: a line break in a name is refused."""
    names = []
    for c in categories:
        name = str(c.get("name", c["id"]))
        if any(ch in name for ch in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"):
            raise InputError(
                f"{source}: category id {c['id']}'s name holds a line break; classes.txt needs one "
                "name a line: fix the name"
            )
        names.append(name)
    return names


def export_yolo(
    labels: Union[str, Path, Dataset],
    out_dir: Union[str, Path],
    parts: str = "merge",
    image_info: Optional[str] = None,
    link_images: Optional[Union[str, Path]] = None,
    min_score: float = TRAINING_MIN_SCORE,
) -> dict:
    """Write OUT/labels/*.txt, OUT/classes.txt and OUT/data.yaml (see module docstring). Returns a summary dict.

    Annotations whose detector `score` is below `min_score` are left out (mal_cli.results.below_min_score).

    Nothing is written until the input has been read whole; the label files are written to a fresh folder
    beside OUT/labels and swapped in at the end, so a failed or killed export leaves the previous one (a
    killed one also leaves OUT/.mal-export-unfinished, and its temp folder, removed by the next run).
    """
    if parts not in PARTS_MODES:
        raise InputError(f"--parts must be one of {', '.join(PARTS_MODES)}, got '{parts}'")
    inputs = [None if isinstance(labels, Dataset) else labels, image_info]
    dataset, records, source = _read_labels(labels, image_info)
    categories = sorted(dataset.categories, key=lambda c: c["id"])
    if not categories:
        raise InputError(f"{dataset.source}: no 'categories'; YOLO needs the class names")
    names = _class_names(categories, dataset.source)
    class_of = {c["id"]: k for k, c in enumerate(categories)}
    by_image: dict[Any, list[dict]] = defaultdict(list)
    low_score = 0
    for rec in records:
        if below_min_score(rec, min_score):
            low_score += 1
            continue
        by_image[rec["image_id"]].append(rec)
    _require_some_masks(records, source)

    out = Path(out_dir)
    link_dir = _check_link_dir(link_images, out)
    if link_dir is not None:  # every image to link is checked against the path rule before anything is written
        for image in dataset.images:
            check_file_name(image_file_name(image, dataset.source), f"{dataset.source}: image id {image.get('id')}")
    outputs = [out / "labels", out / "classes.txt", out / "data.yaml"] + ([out / "images"] if link_dir else [])
    refuse_inputs_under(outputs, inputs, "--out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{out}: cannot create the output folder: {err.strerror or err}") from None
    remove_stale_temps(out)
    marker = out / UNFINISHED_MARKER
    staging = out / f".labels.{TEMP_TAG}{os.getpid()}.partial"
    try:
        stats = _write_labels(dataset, by_image, class_of, parts, source, staging)
        # From here until the marker goes, OUT mixes this export with the previous one.
        write_bytes_atomic(marker, b"a mal export yolo run is writing this folder, or was killed: rerun it\n")
        _swap_in(staging, out / "labels")
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    stats.update(classes=len(categories), parts=parts, out=str(out), skipped_low_score=low_score)
    _write_class_files(out, names)
    if link_dir is not None:
        stats["missing_images"] = _link_images(dataset, link_dir, out)
        if stats["missing_images"]:
            print(
                f"mal export yolo: warning: {stats['missing_images']} image(s) not found in {link_dir}; not linked",
                file=sys.stderr,
            )
    os.unlink(marker)
    return stats


def _read_labels(labels: Union[str, Path, Dataset], image_info: Optional[str]) -> tuple[Dataset, list, str]:
    """The dataset (images, categories), the records to export and the name of their source."""
    if isinstance(labels, Dataset):
        return labels, labels.annotations, labels.source
    loaded = load_any(labels)
    source = "<stdin>" if str(labels) == "-" else str(labels)
    if isinstance(loaded, Dataset):
        return loaded, loaded.annotations, source
    if image_info is None:
        raise InputError(f"{source} is a results list: pass --image-info DATASET.json for images and categories")
    return load_dataset(image_info), loaded, source


def _write_class_files(out: Path, names: list[str]) -> None:
    """OUT/classes.txt (line k = class k) and OUT/data.yaml (Ultralytics' dataset file)."""
    write_bytes_atomic(out / "classes.txt", "".join(n + "\n" for n in names).encode())
    yaml = [
        "# written by `mal export yolo`; class k = line k of classes.txt = k-th category by COCO id",
        "# put (or link: --link-images DIR) the images in images/ beside this file",
        "train: images",
        "val: images",
        f"nc: {len(names)}",
        "names:",
    ]
    yaml += [f"  {k}: {_yaml_str(n)}" for k, n in enumerate(names)]
    write_bytes_atomic(out / "data.yaml", ("\n".join(yaml) + "\n").encode())


UNFINISHED_MARKER = ".mal-export-unfinished"


def _require_some_masks(records: Sequence[dict], source: str) -> None:
    """A boxes-only file would export every object as background: refuse it up front, by name."""
    objects = [r for r in records if not r.get("iscrowd")]
    if objects and not any("segmentation" in r for r in objects):
        raise InputError(
            f"{source}: no annotation has a 'segmentation' (boxes only); label the boxes first "
            "(mal label), then export the labelled file"
        )


def _check_link_dir(link_images: Optional[Union[str, Path]], out: Path) -> Optional[Path]:
    if link_images is None:
        return None
    link_dir = Path(link_images)
    if not link_dir.is_dir():
        raise InputError(f"--link-images {link_images}: no such folder; give the folder with the images")
    link_dir = link_dir.resolve()
    if is_inside(link_dir, out / "images"):
        raise InputError(
            f"--link-images {link_images} is the export's own images/ folder: the links would point "
            "at themselves; give the folder with the original images"
        )
    return link_dir


def _write_labels(dataset: Dataset, by_image: dict, class_of: dict, parts: str, source: str, staging: Path) -> dict:
    """Every image's label file under `staging` (a new folder). Returns the counts."""
    stats = {"images": 0, "instances": 0, "lines": 0, "skipped_crowd": 0, "skipped_empty": 0}
    seen: set = set()
    try:
        staging.mkdir()
    except OSError as err:
        raise write_error(err, staging) from None
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
        target = staging / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = open_exclusive(target)
            with os.fdopen(fd, "wb") as handle:
                handle.write("".join(line + "\n" for line in lines).encode())
        except FileExistsError:
            raise InputError(
                f"{dataset.source}: two images map to the label file {rel}; file names must be unique"
            ) from None
        except OSError as err:
            raise write_error(err, _final_name(staging, target)) from None
        stats["images"] += 1
        stats["lines"] += len(lines)
        stats["instances"] += len(anns) - skipped["crowd"] - skipped["empty"]
        stats["skipped_crowd"] += skipped["crowd"]
        stats["skipped_empty"] += skipped["empty"]
    return stats


def _final_name(staging: Path, target: Path) -> Path:
    """The name a staged label file will have once swapped in (for messages)."""
    return staging.parent / "labels" / target.relative_to(staging)


def _swap_in(staging: Path, labels_dir: Path) -> None:
    """Replace `labels_dir` by `staging`: two renames, the old folder removed after."""
    old = labels_dir.parent / f".labels.{TEMP_TAG}{os.getpid()}.old"
    try:
        if labels_dir.is_symlink() or labels_dir.exists():
            os.replace(labels_dir, old)
        os.replace(staging, labels_dir)
    except OSError as err:
        raise write_error(err, labels_dir) from None
    if old.is_symlink():
        old.unlink()
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _link_images(dataset: Dataset, link_dir: Path, out: Path) -> int:
    """Symlink each image of `link_dir` into OUT/images (a real file already there is kept).
    Returns how many are missing."""
    images_root = out / "images"
    missing = 0
    for image in dataset.images:
        name = image_file_name(image, dataset.source)
        src = image_path(link_dir, name, f"{dataset.source}: image id {image.get('id')}")
        rel = _label_relpath(image, dataset.source)
        dst = images_root / rel.with_suffix(PurePosixPath(name).suffix)
        if not src.is_file():
            missing += 1
            continue
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not is_inside(dst.parent, images_root):
                raise OutputError(f"{dst.parent}: a link out of {images_root}; refusing to write through it")
            if dst.exists() and not dst.is_symlink():
                continue  # the user's own copy of the image
            tmp = dst.parent / f".{dst.name}.{TEMP_TAG}{os.getpid()}.link.tmp"
            os.symlink(src, tmp)
            os.replace(tmp, dst)
        except OSError as err:
            raise write_error(err, dst) from None
    return missing


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

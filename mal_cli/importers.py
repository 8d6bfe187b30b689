"""`mal import yolo|voc`: the box formats most detection datasets use -> a COCO box JSON for `mal label`/`train`.

YOLO (Ultralytics layout): DIR/images/**/<name>.<ext> and DIR/labels/**/<name>.txt, the same sub-folders
under both; class names from DIR/classes.txt (line k = class k) or DIR/data.yaml (`names`). A label line is
`class cx cy w h` (a box) or `class x1 y1 x2 y2 ...` (a YOLO-seg polygon: its extent becomes the box),
coordinates normalised by the image size. Image sizes are read from the files' headers, EXIF orientation
applied, as Ultralytics does. An image without a label file has no boxes (YOLO's background image).

Pascal VOC: DIR/Annotations/*.xml, images in DIR/JPEGImages. VOC boxes are 1-based inclusive pixel
indices: [xmin, ymin, xmax, ymax] becomes COCO [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
(detectron2's conversion). Categories are the object names sorted, or DIR/classes.txt's order when present.
XML with a DOCTYPE or entity declarations is refused (entity expansion: "billion laughs").

Written: {"images": [{id, file_name, width, height}], "annotations": [{id, image_id, category_id, bbox,
area, iscrowd: 0}], "categories": [{id: k + 1, name}]}; `file_name` is relative to the images folder
(DIR/images or DIR/JPEGImages), which is what `--images` takes. Bad input stops with one line naming the
file (and line) and what is wrong.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

from mal_cli.errors import InputError
from mal_cli.images import swaps_sides

__all__ = [
    "IMAGE_SUFFIXES",
    "image_size",
    "import_voc",
    "import_yolo",
    "read_class_names",
]

IMAGE_SUFFIXES = (
    ".bmp",
    ".jpeg",
    ".jpg",
    ".mpo",
    ".png",
    ".tif",
    ".tiff",
    ".webp",
)  # Ultralytics' common ones
_MAX_XML_BYTES = 16 * 1024 * 1024  # a VOC file is a few kB; refuse anything absurd before parsing it


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as displayed (EXIF orientation applied), from its header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            swapped = swaps_sides(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"cannot read the image size of {path}: {err}") from None
    return (height, width) if swapped else (width, height)


def _dataset(images: list[dict], annotations: list[dict], names: list[str]) -> dict:
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _box_annotation(
    ann_id: int,
    image_id: int,
    category_id: int,
    x0: float,
    y0: float,
    x1: float,
    y1: float,
) -> dict:
    bbox = [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": round(bbox[2] * bbox[3], 2),
        "iscrowd": 0,
    }


# --- class names ------------------------------------------------------------------------------------


def _yaml_scalar(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return str(json.loads(text))
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'")
    return text


def _yaml_names(path: Path) -> list[str]:
    """The `names` of an Ultralytics data.yaml: a flow list, a block list, or a block map `k: name`.

    Only this key is read (a tiny subset of YAML: no YAML library is a dependency).
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^names\s*:\s*(.*?)\s*$", line)
        if not match:
            continue
        inline = match.group(1)
        if inline.startswith("["):
            body = inline.strip("[]")
            return [
                _yaml_scalar(item)
                for item in re.findall(r"""'(?:[^']|'')*'|"(?:[^"\\]|\\.)*"|[^,]+""", body)
                if item.strip()
            ]
        names: dict[int, str] = {}
        for row in lines[i + 1 :]:
            if row.strip() == "" or row.lstrip().startswith("#"):
                continue
            if not row.startswith((" ", "\t", "-")):
                break
            item = re.match(r"^\s*-\s*(.+)$", row)
            keyed = re.match(r"^\s*(\d+)\s*:\s*(.+)$", row)
            if item:
                names[len(names)] = _yaml_scalar(item.group(1))
            elif keyed:
                names[int(keyed.group(1))] = _yaml_scalar(keyed.group(2))
            else:
                raise InputError(f"{path}: cannot read the 'names' entry {row.strip()!r}")
        if sorted(names) != list(range(len(names))):
            raise InputError(f"{path}: 'names' ids must be 0..{len(names) - 1} without gaps")
        return [names[k] for k in range(len(names))]
    raise InputError(f"{path}: no 'names' key; YOLO class names are needed")


def read_class_names(root: Path) -> list[str]:
    """Class names of a YOLO dataset: ROOT/classes.txt, else ROOT/data.yaml (or dataset.yaml) `names`."""
    classes = root / "classes.txt"
    if classes.is_file():
        names = [line.strip() for line in classes.read_text(encoding="utf-8").splitlines()]
        while names and not names[-1]:
            names.pop()
        if not names or any(not n for n in names):
            raise InputError(f"{classes}: needs one class name a line, no empty lines")
        return names
    for name in ("data.yaml", "dataset.yaml"):
        if (root / name).is_file():
            names = _yaml_names(root / name)
            if not names:
                raise InputError(f"{root / name}: 'names' is empty")
            return names
    raise InputError(f"{root}: no classes.txt or data.yaml with the class names; add one (line k = name of class k)")


# --- YOLO -------------------------------------------------------------------------------------------


def _yolo_boxes(path: Path, num_classes: int) -> list[tuple[int, float, float, float, float]]:
    """(class, x0, y0, x1, y1) normalised, one per line of a YOLO label file. Raises InputError per bad line."""
    boxes = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read: {err}") from None
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path} line {number}"
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            raise InputError(
                f"{where}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...', got {len(fields)} values"
            )
        if not re.fullmatch(r"\d+", fields[0]):
            raise InputError(f"{where}: class id {fields[0]!r} is not a non-negative integer")
        cls = int(fields[0])
        if cls >= num_classes:
            raise InputError(f"{where}: class id {cls} but only {num_classes} class names (0..{num_classes - 1})")
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            raise InputError(f"{where}: a coordinate is not a number") from None
        bad = [v for v in values if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
        if bad:
            raise InputError(
                f"{where}: coordinate {bad[0]} outside [0, 1]; YOLO coordinates are divided by the image size"
            )
        if len(values) == 4:
            cx, cy, w, h = values
            x0, y0, x1, y1 = (
                max(0.0, cx - w / 2),
                max(0.0, cy - h / 2),
                min(1.0, cx + w / 2),
                min(1.0, cy + h / 2),
            )
        else:
            xs, ys = values[0::2], values[1::2]
            x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        if x1 <= x0 or y1 <= y0:
            raise InputError(f"{where}: the box has no area")
        boxes.append((cls, x0, y0, x1, y1))
    return boxes


def import_yolo(root: str | Path) -> tuple[dict, dict]:
    """A YOLO dataset folder (see module docstring) -> (COCO box dataset dict, summary counts)."""
    root = Path(root)
    images_dir, labels_dir = root / "images", root / "labels"
    for folder in (root, images_dir, labels_dir):
        if not folder.is_dir():
            raise InputError(f"{folder}: no such folder; a YOLO dataset has DIR/images/ and DIR/labels/ (mirrored)")
    names = read_class_names(root)
    image_files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not image_files:
        raise InputError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    images, annotations = [], []
    used_labels: set[Path] = set()
    for image_id, path in enumerate(image_files, 1):
        rel = path.relative_to(images_dir)
        width, height = image_size(path)
        images.append(
            {
                "id": image_id,
                "file_name": rel.as_posix(),
                "width": width,
                "height": height,
            }
        )
        label = labels_dir / rel.with_suffix(".txt")
        if not label.is_file():
            continue  # no label file: a background image
        used_labels.add(label)
        for cls, x0, y0, x1, y1 in _yolo_boxes(label, len(names)):
            annotations.append(
                _box_annotation(
                    len(annotations) + 1,
                    image_id,
                    cls + 1,
                    x0 * width,
                    y0 * height,
                    x1 * width,
                    y1 * height,
                )
            )
    orphans = sum(1 for p in labels_dir.rglob("*.txt") if p not in used_labels)
    summary = {
        "images": len(images),
        "boxes": len(annotations),
        "classes": len(names),
        "images_without_labels": len(images) - len(used_labels),
        "labels_without_image": orphans,
    }
    return _dataset(images, annotations, names), summary


# --- Pascal VOC -------------------------------------------------------------------------------------


def _parse_voc_xml(path: Path) -> ET.Element:
    try:
        if path.stat().st_size > _MAX_XML_BYTES:
            raise InputError(f"{path}: over {_MAX_XML_BYTES >> 20} MiB; not a VOC annotation")
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from None
    if re.search(rb"<!\s*(DOCTYPE|ENTITY)", data, re.IGNORECASE):
        raise InputError(f"{path}: XML with a DOCTYPE or entity declarations is refused (entity expansion attacks)")
    try:
        return ET.fromstring(data)
    except ET.ParseError as err:
        raise InputError(f"{path}: malformed XML: {err}") from None


def _voc_number(node: ET.Element, tag: str, path: Path, what: str) -> float:
    text = node.findtext(tag)
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{path}: {what} has no numeric <{tag}> (got {text!r})") from None
    if not math.isfinite(value):
        raise InputError(f"{path}: {what} <{tag}> is {text}")
    return value


def _voc_record(path: Path, images_dir: Path) -> tuple[dict, list[tuple[str, list[float]]]]:
    """One VOC XML: (image dict without id, [(object name, [xmin, ymin, xmax, ymax]), ...])."""
    root = _parse_voc_xml(path)
    if root.tag != "annotation":
        raise InputError(f"{path}: root element <{root.tag}>, expected <annotation> (Pascal VOC)")
    file_name = (root.findtext("filename") or "").strip() or path.stem + ".jpg"
    size = root.find("size")
    width = int(_voc_number(size, "width", path, "<size>")) if size is not None and size.findtext("width") else 0
    height = int(_voc_number(size, "height", path, "<size>")) if size is not None and size.findtext("height") else 0
    if width <= 0 or height <= 0:  # some tools write 0: take the image's own size
        width, height = image_size(images_dir / file_name)
    objects = []
    for index, obj in enumerate(root.iter("object"), 1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise InputError(f"{path}: object {index} has no <name>")
        box = obj.find("bndbox")
        if box is None:
            raise InputError(f"{path}: object {index} ({name}) has no <bndbox>")
        coords = [_voc_number(box, tag, path, f"object {index} ({name})") for tag in ("xmin", "ymin", "xmax", "ymax")]
        xmin, ymin, xmax, ymax = coords
        if xmax < xmin or ymax < ymin:
            raise InputError(f"{path}: object {index} ({name}) has xmax < xmin or ymax < ymin: {coords}")
        if xmin < 0 or ymin < 0 or xmax > width + 1 or ymax > height + 1:
            raise InputError(f"{path}: object {index} ({name}) box {coords} lies outside the {width}x{height} image")
        objects.append((name, coords))
    return {"file_name": file_name, "width": width, "height": height}, objects


def import_voc(root: str | Path, class_names: list[str] | None = None) -> tuple[dict, dict]:
    """A Pascal VOC folder (see module docstring) -> (COCO box dataset dict, summary counts)."""
    root = Path(root)
    ann_dir, images_dir = root / "Annotations", root / "JPEGImages"
    for folder in (root, ann_dir):
        if not folder.is_dir():
            raise InputError(
                f"{folder}: no such folder; a Pascal VOC dataset has DIR/Annotations/*.xml and DIR/JPEGImages/"
            )
    xml_files = sorted(ann_dir.rglob("*.xml"))
    if not xml_files:
        raise InputError(f"{ann_dir}: no .xml files")
    records = [(path, *_voc_record(path, images_dir)) for path in xml_files]
    if class_names is None and (root / "classes.txt").is_file():
        class_names = read_class_names(root)
    if class_names is None:
        class_names = sorted({name for _, _, objects in records for name, _ in objects})
    category_of = {name: k + 1 for k, name in enumerate(class_names)}
    images, annotations = [], []
    for image_id, (path, image, objects) in enumerate(records, 1):
        images.append({"id": image_id, **image})
        for name, (xmin, ymin, xmax, ymax) in objects:
            if name not in category_of:
                raise InputError(f"{path}: object name {name!r} is not in {root / 'classes.txt'}")
            # 1-based inclusive pixel indices -> 0-based edges, clipped to the image.
            x0, y0 = max(0.0, xmin - 1), max(0.0, ymin - 1)
            x1, y1 = min(float(image["width"]), xmax), min(float(image["height"]), ymax)
            annotations.append(_box_annotation(len(annotations) + 1, image_id, category_of[name], x0, y0, x1, y1))
    missing = sum(1 for image in images if images_dir.is_dir() and not (images_dir / image["file_name"]).is_file())
    summary = {
        "images": len(images),
        "boxes": len(annotations),
        "classes": len(class_names),
        "images_missing": missing,
    }
    return _dataset(images, annotations, class_names), summary


def run_import(kind: str, root: str | Path, out: str) -> dict:
    """`mal import KIND ROOT --out OUT`: convert, write OUT atomically, one summary line on stderr."""
    import sys

    from mal_cli.dataset import write_json_atomic

    dataset, summary = import_yolo(root) if kind == "yolo" else import_voc(root)
    write_json_atomic(out, dataset)
    extra = ", ".join(
        f"{v} {k.replace('_', ' ')}" for k, v in summary.items() if k not in ("images", "boxes", "classes") and v
    )
    print(
        f"mal import {kind}: {summary['images']} images, {summary['boxes']} boxes, {summary['classes']} classes"
        f"{' (' + extra + ')' if extra else ''} -> {out}",
        file=sys.stderr,
    )
    return summary

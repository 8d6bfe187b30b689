"""`mal check`: validate a dataset (and its image files) up front, reporting every problem at once.

Problems are grouped by kind, each with a count and the first few examples (file, image id,
annotation id). Two severities:

- error: the input cannot be used as it is (`mal label` / `mal train` refuse it, listing all errors):
  unreadable JSON, wrong top-level layout, records that are not objects, missing keys, duplicate or
  unusable ids, annotations pointing at unknown images, a `bbox` that is not [x, y, w, h], images with
  no resolvable file name.
- warning: the run goes on and the affected boxes get a flagged fallback (`mal_fallback`): non-numeric,
  NaN/inf, zero-size or negative boxes, boxes outside the image, image files missing on disk or that
  cannot be decoded (`--decode`), annotations of unknown categories, missing image sizes.

The checks on the JSON are pure Python over the parsed document (about a second for LVIS' 1.3 M
annotations); `--images` adds one `stat` per image, `--decode` a full decode per image.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from mal_cli.errors import InputError, OutputError
from mal_cli.geometry import box_pixel_bounds

EXAMPLES = 5

# code -> (severity, title, what to do)
KINDS: dict[str, tuple[str, str, str]] = {
    "unreadable": ("error", "file cannot be read or parsed", "fix the path, or regenerate / repair the JSON"),
    "layout": ("error", "not a COCO/LVIS dataset or results list", "give an instances JSON with 'images' and 'annotations'"),
    "image_not_object": ("error", "image record is not a JSON object", "every entry of 'images' must be an object"),
    "image_bad_id": ("error", "image without a usable 'id'", "give every image a unique integer 'id'"),
    "duplicate_image_id": ("error", "duplicate image id", "image ids must be unique"),
    "image_no_file": ("error", "image without 'file_name' or 'coco_url'", "add 'file_name' to the image record"),
    "ann_not_object": ("error", "annotation is not a JSON object", "every entry of 'annotations' must be an object"),
    "ann_missing_key": ("error", "annotation without a required key", "annotations need 'id', 'image_id' and 'bbox'"),
    "ann_bad_id": ("error", "annotation with an unusable 'id'", "give every annotation a unique integer 'id'"),
    "duplicate_annotation_id": ("error", "duplicate annotation id", "annotation ids must be unique"),
    "unknown_image": ("error", "annotation refers to an image id not in 'images'", "add the image or drop the annotation"),
    "bbox_not_list": ("error", "'bbox' is not a list [x, y, width, height]", "write boxes as COCO [x, y, width, height]"),
    "bbox_not_number": ("warning", "bbox value is not a number", "the box gets the empty fallback (degenerate_box)"),
    "bbox_not_finite": ("warning", "bbox has NaN or infinity", "the box gets the empty fallback (degenerate_box)"),
    "bbox_empty": ("warning", "bbox has zero or negative width/height", "the box gets the empty fallback (degenerate_box)"),
    "bbox_outside": ("warning", "bbox lies outside its image", "the box gets the empty fallback (degenerate_box)"),
    "bbox_exceeds_image": ("warning", "bbox extends past the image border (> 1 px)", "the mask is clipped to the image"),
    "image_bad_size": ("warning", "image without a positive integer 'height'/'width'", "the size is read from the file (mal train needs it)"),
    "unknown_category": ("warning", "annotation of a category not in 'categories'", "add the category (AP evaluation needs it)"),
    "image_missing": ("warning", "image file missing on disk", "its boxes get the filled-box fallback (image_error); check --images"),
    "image_unreadable": ("warning", "image file cannot be decoded", "its boxes get the filled-box fallback (image_error); replace the file"),
    "image_size_mismatch": ("warning", "image file size differs from the recorded height/width", "its boxes get the filled-box fallback (image_error)"),
}


@dataclass
class Group:
    code: str
    count: int = 0
    examples: list = field(default_factory=list)

    @property
    def severity(self) -> str:
        return KINDS[self.code][0]


@dataclass
class CheckReport:
    """All problems of one input, grouped by kind (insertion order = order of first occurrence)."""

    source: str
    groups: dict = field(default_factory=dict)
    images: int = 0
    annotations: int = 0
    kind: str = "dataset"  # dataset | results
    images_checked_on_disk: int = 0

    def add(self, code: str, where: str) -> None:
        if where.startswith(self.source + ": "):  # the report names its file once
            where = where[len(self.source) + 2 :]
        group = self.groups.get(code)
        if group is None:
            group = self.groups[code] = Group(code)
        group.count += 1
        if len(group.examples) < EXAMPLES:
            group.examples.append(where)

    def count(self, severity: str) -> int:
        return sum(g.count for g in self.groups.values() if g.severity == severity)

    @property
    def errors(self) -> int:
        return self.count("error")

    @property
    def warnings(self) -> int:
        return self.count("warning")

    @property
    def clean(self) -> bool:
        return not self.groups

    def codes(self, severity: Optional[str] = None) -> list[str]:
        return [c for c, g in self.groups.items() if severity is None or g.severity == severity]

    def summary(self, severity: Optional[str] = None) -> str:
        """One line: every group of `severity` with its count and first examples."""
        parts = []
        for code, group in self.groups.items():
            if severity is not None and group.severity != severity:
                continue
            more = ", ..." if group.count > len(group.examples) else ""
            parts.append(f"{KINDS[code][1]} x{group.count} ({'; '.join(group.examples[:3])}{more})")
        return "; ".join(parts)

    def raise_errors(self) -> None:
        """Stop with one line listing every error group, when there is any."""
        if self.errors:
            raise InputError(
                f"{self.source}: {self.errors} problem(s) make the input unusable: {self.summary('error')}. "
                f"Fix them (`mal check {self.source}` lists them all) and rerun"
            )

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "kind": self.kind,
            "images": self.images,
            "annotations": self.annotations,
            "images_checked_on_disk": self.images_checked_on_disk,
            "errors": self.errors,
            "warnings": self.warnings,
            "clean": self.clean,
            "problems": [
                {"code": c, "severity": g.severity, "title": KINDS[c][1], "hint": KINDS[c][2], "count": g.count,
                 "examples": g.examples}
                for c, g in self.groups.items()
            ],
        }

    def text(self) -> str:
        what = "records" if self.kind == "results" else "annotations"
        head = (f"mal check: {self.source}: {self.errors} error(s), {self.warnings} warning(s) "
                f"({self.images} images, {self.annotations} {what}")
        head += f", {self.images_checked_on_disk} image files checked)" if self.images_checked_on_disk else ")"
        lines = [head]
        for severity in ("error", "warning"):
            for code, group in self.groups.items():
                if group.severity != severity:
                    continue
                _, title, hint = KINDS[code]
                lines.append(f"  {severity:7s} {title}: {group.count}  [{code}] -> {hint}")
                for example in group.examples:
                    lines.append(f"            {example}")
                if group.count > len(group.examples):
                    lines.append(f"            ... and {group.count - len(group.examples)} more")
        if self.clean:
            lines.append("  no problems found")
        return "\n".join(lines)


# --- the checks -----------------------------------------------------------------------------------------


def _hashable(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _positive_int(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 1 and value == int(value)


def _check_images(report: CheckReport, images: list, source: str) -> dict:
    """Image records -> {id: record} of the usable ones."""
    by_id: dict = {}
    for index, image in enumerate(images):
        if not isinstance(image, dict):
            report.add("image_not_object", f"{source}: images[{index}] is a JSON {_json_type(image)}")
            continue
        image_id = image.get("id")
        if not _hashable(image_id):
            what = "has no 'id'" if "id" not in image else f"has 'id' {image_id!r} (a JSON {_json_type(image_id)})"
            report.add("image_bad_id", f"{source}: images[{index}] {what}")
            continue
        if image_id in by_id:
            report.add("duplicate_image_id", f"{source}: image id {image_id} (images[{index}])")
            continue
        by_id[image_id] = image
        if not (_positive_int(image.get("height")) and _positive_int(image.get("width"))):
            report.add("image_bad_size", f"{source}: image id {image_id}: height {image.get('height')!r}, width {image.get('width')!r}")
    return by_id


def _check_box(report: CheckReport, bbox: Any, where: str, image: Optional[dict]) -> None:
    if not isinstance(bbox, list) or len(bbox) != 4:
        report.add("bbox_not_list", f"{where}: bbox {str(bbox)[:60]}")
        return
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        report.add("bbox_not_number", f"{where}: bbox {bbox}")
        return
    if not all(math.isfinite(v) for v in (*bbox, bbox[0] + bbox[2], bbox[1] + bbox[3])):
        report.add("bbox_not_finite", f"{where}: bbox {bbox}")
        return
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        report.add("bbox_empty", f"{where}: bbox {bbox}")
        return
    if image is None or not (_positive_int(image.get("height")) and _positive_int(image.get("width"))):
        return
    height, width = image["height"], image["width"]
    # No pixel centre inside the box (the pycocotools rule, as `mal label` rasterises): nothing to label.
    row0, row1, col0, col1 = box_pixel_bounds((x, y, x + w, y + h), (int(height), int(width)))
    if row1 <= row0 or col1 <= col0:
        report.add("bbox_outside", f"{where}: bbox {bbox} on a {width}x{height} image")
    elif x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
        report.add("bbox_exceeds_image", f"{where}: bbox {bbox} on a {width}x{height} image")


def _check_annotations(report: CheckReport, annotations: list, source: str, images_by_id: dict, categories: Optional[set],
                       results: bool) -> set:
    """Returns the ids of images that have at least one annotation."""
    seen: set = set()
    used_images: set = set()
    name = "result" if results else "annotation"
    keys = ("image_id", "category_id", "bbox") if results else ("id", "image_id", "bbox")
    for index, ann in enumerate(annotations):
        at = f"{source}: {'results' if results else 'annotations'}[{index}]"
        if not isinstance(ann, dict):
            report.add("ann_not_object", f"{at} is a JSON {_json_type(ann)}")
            continue
        ann_id = ann.get("id")
        where = f"{source}: annotation id {ann_id}" if _hashable(ann_id) and not results else at
        missing = [k for k in keys if k not in ann]
        if missing:
            report.add("ann_missing_key", f"{where} has no {', '.join(repr(k) for k in missing)}")
        if not results and "id" in ann:
            if not _hashable(ann_id):
                report.add("ann_bad_id", f"{at} has 'id' {ann_id!r}")
            elif ann_id in seen:
                report.add("duplicate_annotation_id", f"{where} ({at.split(': ', 1)[1]})")
            else:
                seen.add(ann_id)
        image = None
        if "image_id" in ann:
            image_id = ann["image_id"]
            if not _hashable(image_id) or image_id not in images_by_id:
                report.add("unknown_image", f"{where} -> image id {image_id!r}")
            else:
                image = images_by_id[image_id]
                used_images.add(image_id)
        if "bbox" in ann:
            _check_box(report, ann["bbox"], where, image)
        if categories is not None and "category_id" in ann:
            cat = ann["category_id"]
            if not _hashable(cat) or cat not in categories:
                report.add("unknown_category", f"{where}: category id {cat!r}")
    return used_images


def check_document(obj: Any, source: str, image_info: Any = None, image_info_source: str = "--image-info") -> CheckReport:
    """Check a parsed dataset (or results list + `image_info` dataset) document; never raises on bad content."""
    report = CheckReport(source)
    if isinstance(obj, list):
        report.kind = "results"
        report.annotations = len(obj)
        if image_info is None:
            report.add("layout", f"{source} is a results list: pass --image-info DATASET.json for the images")
            return report
        info_report = check_document(image_info, image_info_source)
        for code, group in info_report.groups.items():
            if code in ("image_not_object", "image_bad_id", "duplicate_image_id", "image_bad_size", "layout", "unreadable"):
                for example in group.examples:
                    report.add(code, example)
                report.groups[code].count += group.count - len(group.examples)
        images = image_info.get("images") if isinstance(image_info, dict) and isinstance(image_info.get("images"), list) else []
        images_by_id = {im["id"]: im for im in images if isinstance(im, dict) and _hashable(im.get("id"))}
        report.images = len(images)
        used = _check_annotations(report, obj, source, images_by_id, None, results=True)
        _check_file_names(report, images_by_id, used, image_info_source)
        report.images_by_id = images_by_id  # type: ignore[attr-defined]
        return report
    if not isinstance(obj, dict):
        report.add("layout", f"{source}: a JSON {_json_type(obj)}, expected an object with 'images' and 'annotations'")
        return report
    layout_ok = True
    for key in ("images", "annotations"):
        if key not in obj:
            report.add("layout", f"{source}: no top-level key '{key}'")
            layout_ok = False
        elif not isinstance(obj[key], list):
            report.add("layout", f"{source}: '{key}' is a JSON {_json_type(obj[key])}, expected a list")
            layout_ok = False
    categories = None
    if "categories" in obj:
        if not isinstance(obj["categories"], list):
            report.add("layout", f"{source}: 'categories' is a JSON {_json_type(obj['categories'])}, expected a list")
        else:
            categories = {c.get("id") for c in obj["categories"] if isinstance(c, dict) and _hashable(c.get("id"))}
    images = obj["images"] if isinstance(obj.get("images"), list) else []
    report.images = len(images)
    images_by_id = _check_images(report, images, source)
    if layout_ok:
        report.annotations = len(obj["annotations"])
        used = _check_annotations(report, obj["annotations"], source, images_by_id, categories, results=False)
        _check_file_names(report, images_by_id, used, source)
    report.images_by_id = images_by_id  # type: ignore[attr-defined]
    return report


def _check_file_names(report: CheckReport, images_by_id: dict, used: set, source: str) -> None:
    for image_id, image in images_by_id.items():
        if image_id in used and not image.get("file_name") and not image.get("coco_url"):
            report.add("image_no_file", f"{source}: image id {image_id}")


def check_image_files(report: CheckReport, images_dir: Union[str, Path], decode: bool = False) -> None:
    """Stat (or with `decode`, decode) every image file of the checked document under `images_dir`."""
    from mal_cli.dataset import image_file_name

    images_by_id = getattr(report, "images_by_id", {})
    for image_id, image in images_by_id.items():
        try:
            path = Path(images_dir) / image_file_name(image, report.source)
        except InputError:
            continue  # reported as image_no_file when it matters
        report.images_checked_on_disk += 1
        try:
            st = os.stat(path)
        except OSError as err:
            report.add("image_missing", f"image id {image_id}: {path} ({err.strerror})")
            continue
        if not os.path.isfile(path) or st.st_size == 0:
            report.add("image_unreadable", f"image id {image_id}: {path} ({'empty file' if os.path.isfile(path) else 'not a file'})")
            continue
        if not decode:
            continue
        from mal_cli.images import load_rgb

        recorded = (int(image["height"]), int(image["width"])) if _positive_int(image.get("height")) and _positive_int(image.get("width")) else None
        try:
            array = load_rgb(path, expected_hw=recorded)
        except InputError as err:
            report.add("image_unreadable", f"image id {image_id}: {err}")
            continue
        if recorded is not None and tuple(array.shape[:2]) != recorded:
            report.add("image_size_mismatch", f"image id {image_id}: {path} is {array.shape[0]}x{array.shape[1]} (HxW), "
                                              f"recorded {recorded[0]}x{recorded[1]}")


def read_document(path: Union[str, Path], report: Optional[CheckReport] = None) -> tuple[Any, Optional[CheckReport]]:
    """Parse a JSON file; an unreadable one becomes an 'unreadable' problem of a report instead of an exception."""
    from mal_cli.dataset import read_json

    try:
        return read_json(path), None
    except InputError as err:
        report = report or CheckReport("<stdin>" if str(path) == "-" else str(path))
        report.add("unreadable", str(err))
        return None, report


def check_paths(dataset: str, images: Optional[str] = None, image_info: Optional[str] = None, decode: bool = False) -> CheckReport:
    """`mal check`: every problem of DATASET (and its images under `images`)."""
    obj, failed = read_document(dataset)
    if failed is not None:
        return failed
    info = None
    if image_info is not None:
        info, failed = read_document(image_info)
        if failed is not None:
            failed.source = "<stdin>" if dataset == "-" else str(dataset)
            return failed
    report = check_document(obj, "<stdin>" if dataset == "-" else str(dataset), info, str(image_info))
    if images is not None:
        if not Path(images).is_dir():
            raise InputError(f"--images {images}: no such folder")
        check_image_files(report, images, decode)
    return report


# --- the output location --------------------------------------------------------------------------------


def ensure_writable(path: Union[str, Path], what: str = "--out") -> None:
    """Fail now, before any work, when OUT's folder is missing, not a folder or not writable ('-' = stdout)."""
    if str(path) == "-":
        return
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise OutputError(f"{what} {target}: is a folder; give a file path")
    if not folder.is_dir():
        raise OutputError(f"{what} {target}: the folder {folder} does not exist; create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".write-test", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{what} {target}: cannot write to {folder} ({err.strerror or err}); choose a writable location") from None

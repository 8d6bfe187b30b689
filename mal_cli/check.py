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
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from mal_cli.errors import InputError
from mal_cli.pixels import boxes_pixel_bounds

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
    # (image id, file name, recorded (h, w) or None) of every image with a usable id: what `check_image_files` checks
    image_files: list = field(default_factory=list)

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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class IdColumn:
    """A column of JSON ids, 8 bytes each: int64 where the id is an int, a side dict for anything else."""

    OTHER = -(1 << 63)  # marks a row whose value is in `other`

    def __init__(self):
        self.values = array("q")
        self.other: dict[int, Any] = {}

    def append(self, value: Any) -> None:
        if type(value) is int and self.OTHER < value < (1 << 63):
            self.values.append(value)
        else:
            self.other[len(self.values)] = value
            self.values.append(self.OTHER)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> Any:
        value = self.values[index]
        return self.other[index] if value == self.OTHER else value

    def numpy(self) -> np.ndarray:
        return np.frombuffer(self.values, dtype=np.int64) if len(self.values) else np.zeros(0, np.int64)


_MISSING = object()  # a key the record does not have
BLOCK = 1 << 16  # records per vectorised step of the checks that need every record

# Order of the per-annotation checks, to list problem groups by first occurrence as one pass over the records would.
_ANN_CODES = ("ann_not_object", "ann_missing_key", "ann_bad_id", "duplicate_annotation_id", "unknown_image", "bbox_not_list",
              "bbox_not_number", "bbox_not_finite", "bbox_empty", "bbox_outside", "bbox_exceeds_image", "unknown_category")


class DocumentCheck:
    """The checks of one dataset or results document, fed piecewise, in compact memory (~60 bytes a record).

    `mal label` streams LVIS-scale input through it (`jsonstream.iter_document`) instead of parsing the whole
    document; `check_document` feeds a parsed one. Feed `value(key, v)` for top-level entries, `images(chunk)`
    and `records(chunk)` for the items of 'images' and 'annotations' (or of a results list) in order, in any
    order relative to each other (LVIS files put 'annotations' first), then `finish()`.

    After `finish()` the columns describe every record: `record_image` (image position, -1 = none),
    `record_bbox` (float64 N x 4; NaN where a value is not a number), `record_has_segmentation`; and every
    image: `image_ids`, `image_names` (file name or None) and `image_plan_hw` (the size `mal label` trusts, or None).
    """

    def __init__(self, source: str, results: bool = False):
        self.source = source
        self.image_source = source  # the file the images come from (a results list: its --image-info)
        self.results = results
        self.report = CheckReport(source)
        self.report.kind = "results" if results else "dataset"
        self._layout = CheckReport(source)
        self._images = CheckReport(source)
        self._records = CheckReport(source)
        self._first: dict[str, int] = {}  # annotation-stage code -> index of its first record
        self.keys_seen: set = set()
        self.keys_not_lists: set = set()  # 'images' / 'annotations' given as something else than a list
        self.categories: Optional[set] = None
        # images
        self.image_ids: list = []
        self.image_position: dict = {}  # usable id -> position
        self.image_hw = array("q")  # per image position: recorded height, width (0, 0 when not positive ints)
        self.image_plan_hw: list = []  # per position: (h, w) as `mal label` uses it, or None
        self.image_names: list = []  # per position: file name or None
        # records
        self.record_ids = IdColumn()
        self.record_image_ids = IdColumn()
        self.record_categories = IdColumn()
        self.record_bbox_values = array("d")
        self.record_flags = bytearray()  # bit 0: bbox numbers to check against the image; bit 1: has segmentation
        self.record_image: Optional[np.ndarray] = None
        self.record_bbox: Optional[np.ndarray] = None
        self.record_has_segmentation: Optional[np.ndarray] = None

    # --- feeding ---------------------------------------------------------------------------------------

    def value(self, key: Optional[str], value: Any) -> None:
        """A top-level entry that is not streamed (key None: the whole document is this value)."""
        if key is None:
            if not self.results:
                self._layout.add("layout", f"{self.source}: a JSON {_json_type(value)}, expected an object with 'images' and 'annotations'")
            return
        self.keys_seen.add(key)
        if key in ("images", "annotations"):
            if not isinstance(value, list):
                self._layout.add("layout", f"{self.source}: '{key}' is a JSON {_json_type(value)}, expected a list")
                self.keys_not_lists.add(key)
                return
            (self.images if key == "images" else self.records)(value)
        elif key == "categories":
            if not isinstance(value, list):
                self._layout.add("layout", f"{self.source}: 'categories' is a JSON {_json_type(value)}, expected a list")
            else:
                self.categories = {c.get("id") for c in value if isinstance(c, dict) and _hashable(c.get("id"))}

    def start(self, key: Optional[str]) -> None:
        """A streamed array begins (its items follow through `images` / `records`)."""
        if key is not None:
            self.keys_seen.add(key)

    def images(self, chunk: list) -> None:
        source, report = self.source, self._images
        for image in chunk:
            index = len(self.image_ids)
            if not isinstance(image, dict):
                report.add("image_not_object", f"{source}: images[{index}] is a JSON {_json_type(image)}")
                self._add_image(None, None, None)
                continue
            image_id = image.get("id")
            h, w = image.get("height"), image.get("width")
            plan_hw = _plan_hw(h, w)
            name = image.get("file_name") or image.get("coco_url") or None
            if not _hashable(image_id):
                what = "has no 'id'" if "id" not in image else f"has 'id' {image_id!r} (a JSON {_json_type(image_id)})"
                report.add("image_bad_id", f"{source}: images[{index}] {what}")
                self._add_image(None, None, plan_hw)
                continue
            if image_id in self.image_position:
                report.add("duplicate_image_id", f"{source}: image id {image_id} (images[{index}])")
                self._add_image(None, None, plan_hw)
                continue
            self.image_position[image_id] = index
            sized = _positive_int(h) and _positive_int(w)
            if not sized:
                report.add("image_bad_size", f"{source}: image id {image_id}: height {h!r}, width {w!r}")
            self._add_image(image_id, _file_name(image, source) if name else None, plan_hw, (int(h), int(w)) if sized else None)

    def _add_image(self, image_id, name, plan_hw, hw=None) -> None:
        self.image_ids.append(image_id)
        self.image_names.append(name)
        self.image_plan_hw.append(plan_hw)
        self.image_hw.extend(hw or (0, 0))

    def records(self, chunk: list) -> None:
        """Annotations (or detections of a results list), in input order: local checks now, the rest at `finish`."""
        source, report, results = self.source, self._records, self.results
        name = "results" if results else "annotations"
        keys = ("image_id", "category_id", "bbox") if results else ("id", "image_id", "bbox")
        nan4 = (math.nan,) * 4
        for ann in chunk:
            index = len(self.record_ids)
            at = f"{source}: {name}[{index}]"
            if not isinstance(ann, dict):
                self._add(report, "ann_not_object", index, f"{at} is a JSON {_json_type(ann)}")
                self._add_record(_MISSING, _MISSING, _MISSING, nan4, 0)
                continue
            ann_id = ann.get("id", _MISSING)
            where = f"{source}: annotation id {ann_id}" if _hashable(ann_id) and not results else at
            missing = [k for k in keys if k not in ann]
            if missing:
                self._add(report, "ann_missing_key", index, f"{where} has no {', '.join(repr(k) for k in missing)}")
            if not results and ann_id is not _MISSING and not _hashable(ann_id):
                self._add(report, "ann_bad_id", index, f"{at} has 'id' {ann_id!r}")
                ann_id = _MISSING
            bbox = ann.get("bbox", _MISSING)
            flags = 2 if _has_segmentation(ann) else 0
            values = nan4
            if bbox is not _MISSING:
                if not isinstance(bbox, list) or len(bbox) != 4:
                    self._add(report, "bbox_not_list", index, f"{where}: bbox {str(bbox)[:60]}")
                elif not all(_is_number(v) for v in bbox):
                    self._add(report, "bbox_not_number", index, f"{where}: bbox {bbox}")
                else:
                    values = bbox
                    if not all(math.isfinite(v) for v in (*bbox, bbox[0] + bbox[2], bbox[1] + bbox[3])):
                        self._add(report, "bbox_not_finite", index, f"{where}: bbox {bbox}")
                    elif bbox[2] <= 0 or bbox[3] <= 0:
                        self._add(report, "bbox_empty", index, f"{where}: bbox {bbox}")
                    else:
                        flags |= 1
            self._add_record(ann_id if not results else _MISSING, ann.get("image_id", _MISSING),
                             ann.get("category_id", _MISSING), values, flags)

    def _add_record(self, ann_id, image_id, category, bbox_values, flags) -> None:
        self.record_ids.append(ann_id)
        self.record_image_ids.append(image_id)
        self.record_categories.append(category)
        try:
            self.record_bbox_values.extend(bbox_values)
        except OverflowError:  # an int too big for a double: not a usable box
            self.record_bbox_values.extend((math.nan,) * 4)
        self.record_flags.append(flags)

    def _add(self, report: CheckReport, code: str, index: int, where: str) -> None:
        self._first.setdefault(code, index)
        report.add(code, where)

    # --- the checks that need everything ------------------------------------------------------------

    def finish(self, check_categories: bool = True) -> CheckReport:
        source, report = self.source, self.report
        results = self.results
        n = len(self.record_ids)
        layout_ok = True
        if not results:
            for key in ("images", "annotations"):
                if key not in self.keys_seen:
                    self._layout.add("layout", f"{source}: no top-level key '{key}'")
                    layout_ok = False
                elif key in self.keys_not_lists:
                    layout_ok = False
        report.images = len(self.image_ids)
        report.annotations = n
        bbox = np.frombuffer(self.record_bbox_values, dtype=np.float64).reshape(n, 4) if n else np.zeros((0, 4))
        image_of = self._resolve_images(n)
        deferred = CheckReport(source)
        if layout_ok or results:
            self._duplicate_ids(deferred)
            self._unknown_images(deferred, image_of)
            self._bbox_against_images(deferred, bbox, image_of)
            if check_categories and self.categories is not None and not results:
                self._unknown_categories(deferred)
        # Groups in the order one pass would meet them: layout, images, records by first occurrence, file names.
        for part in (self._layout, self._images):
            report.groups.update(part.groups)
        record_groups = {**self._records.groups, **deferred.groups} if (layout_ok or results) else {}
        for code in sorted(record_groups, key=lambda c: (self._first[c], _ANN_CODES.index(c))):
            report.groups[code] = record_groups[code]
        used = np.zeros(len(self.image_ids), dtype=bool)
        used[image_of[image_of >= 0]] = True
        if layout_ok or results:
            for position in np.flatnonzero(used):
                if self.image_names[position] is None:
                    report.add("image_no_file", f"{self.image_source}: image id {self.image_ids[position]}")
        self.record_image = image_of
        self.record_bbox = bbox
        self.record_has_segmentation = np.frombuffer(bytes(self.record_flags), dtype=np.uint8) & 2 > 0 if n else np.zeros(0, bool)
        report.image_files = [
            (image_id, self.image_names[p], self._recorded_hw(p))
            for p, image_id in enumerate(self.image_ids) if image_id is not None
        ]
        return report

    def _recorded_hw(self, position: int) -> Optional[tuple[int, int]]:
        h, w = self.image_hw[2 * position], self.image_hw[2 * position + 1]
        return (h, w) if h > 0 and w > 0 else None

    def _resolve_images(self, n: int) -> np.ndarray:
        """Each record's image position (-1: no such image, or no image_id)."""
        image_of = np.full(n, -1, dtype=np.int32)
        if not n:
            return image_of
        keys = self.record_image_ids.numpy()
        int_ids = [(i, p) for i, p in self.image_position.items() if type(i) is int]
        if int_ids:
            ids = np.array([i for i, _ in int_ids], dtype=np.int64)
            positions = np.array([p for _, p in int_ids], dtype=np.int32)
            order = np.argsort(ids)
            ids, positions = ids[order], positions[order]
            for first in range(0, n, BLOCK):
                block = keys[first : first + BLOCK]
                at = np.clip(np.searchsorted(ids, block), 0, len(ids) - 1)
                hit = (ids[at] == block) & (block != IdColumn.OTHER)
                image_of[first : first + BLOCK][hit] = positions[at[hit]]
        for index, value in self.record_image_ids.other.items():
            if value is not _MISSING and _hashable(value) and value in self.image_position:
                image_of[index] = self.image_position[value]
        return image_of

    def _where(self, index: int) -> str:
        ann_id = self.record_ids[index]
        if not self.results and ann_id is not _MISSING:
            return f"{self.source}: annotation id {ann_id}"
        return f"{self.source}: {'results' if self.results else 'annotations'}[{index}]"

    def _add_deferred(self, report: CheckReport, code: str, indices, message) -> None:
        for count, index in enumerate(indices):
            index = int(index)
            if count == 0:
                self._first.setdefault(code, index)
            if count < EXAMPLES:
                report.add(code, message(index))
            else:  # only the count grows past the examples
                report.groups[code].count += len(indices) - count
                break

    def _duplicate_ids(self, report: CheckReport) -> None:
        if self.results:
            return
        ids = self.record_ids.numpy()
        dup = np.zeros(len(ids), dtype=bool)
        is_int = ids != IdColumn.OTHER
        # Most inputs have none: one sorted copy says so; only then the stable argsort that finds them.
        sorted_ids = ids[is_int]
        sorted_ids.sort()
        any_dup = bool(np.any(sorted_ids[1:] == sorted_ids[:-1]))
        del sorted_ids
        if any_dup:
            ints = np.flatnonzero(is_int)
            order = ints[np.argsort(ids[ints], kind="stable")]  # equal ids stay in input order
            later = ids[order[1:]] == ids[order[:-1]]
            dup[order[1:][later]] = True
        seen: set = set()
        for index, value in sorted(self.record_ids.other.items()):
            if value is _MISSING:
                continue
            if value in seen:
                dup[index] = True
            seen.add(value)
        name = "annotations"
        self._add_deferred(report, "duplicate_annotation_id", np.flatnonzero(dup),
                           lambda i: f"{self._where(i)} ({name}[{i}])")

    def _unknown_images(self, report: CheckReport, image_of: np.ndarray) -> None:
        has_key = np.ones(len(image_of), dtype=bool)
        for index, value in self.record_image_ids.other.items():
            if value is _MISSING:
                has_key[index] = False
        self._add_deferred(report, "unknown_image", np.flatnonzero(has_key & (image_of < 0)),
                           lambda i: f"{self._where(i)} -> image id {self.record_image_ids[i]!r}")

    def _bbox_against_images(self, report: CheckReport, bbox: np.ndarray, image_of: np.ndarray) -> None:
        """Boxes with no pixel centre inside their image (the pycocotools rule, as `mal label` rasterises), or
        reaching more than a pixel past its border."""
        flags = np.frombuffer(bytes(self.record_flags), dtype=np.uint8) if len(self.record_flags) else np.zeros(0, np.uint8)
        hw = np.frombuffer(self.image_hw, dtype=np.int64).reshape(-1, 2) if len(self.image_hw) else np.zeros((0, 2), np.int64)
        outside, exceeds = [], []
        for first in range(0, len(image_of), BLOCK):  # in blocks: a dozen temporaries of N doubles would be LVIS' peak
            block = slice(first, first + BLOCK)
            rows = first + np.flatnonzero((flags[block] & 1 > 0) & (image_of[block] >= 0))
            height, width = hw[image_of[rows], 0], hw[image_of[rows], 1]
            sized = height > 0
            rows, height, width = rows[sized], height[sized].astype(np.float64), width[sized].astype(np.float64)
            x, y, w, h = bbox[rows].T
            x1, y1 = x + w, y + h
            row0, row1, col0, col1 = boxes_pixel_bounds(np.stack([x, y, x1, y1], axis=1), height, width).T
            out = (row1 <= row0) | (col1 <= col0)
            outside.append(rows[out])
            exceeds.append(rows[~out & ((x < -1) | (y < -1) | (x1 > width + 1) | (y1 > height + 1))])
        outside_rows = np.concatenate(outside) if outside else np.zeros(0, np.int64)
        exceeds_rows = np.concatenate(exceeds) if exceeds else np.zeros(0, np.int64)

        def message(i: int) -> str:
            box = self._bbox_text(bbox[i])
            p = image_of[i]
            return f"{self._where(i)}: bbox {box} on a {hw[p, 1]}x{hw[p, 0]} image"

        self._add_deferred(report, "bbox_outside", outside_rows, message)
        self._add_deferred(report, "bbox_exceeds_image", exceeds_rows, message)

    @staticmethod
    def _bbox_text(values: np.ndarray) -> str:
        return "[" + ", ".join(repr(int(v)) if v == int(v) and abs(v) < 1e15 else repr(float(v)) for v in values) + "]"

    def _unknown_categories(self, report: CheckReport) -> None:
        categories = self.categories or set()
        values = self.record_categories.numpy()
        int_cats = np.array(sorted(c for c in categories if type(c) is int), dtype=np.int64)
        known = np.zeros(len(values), dtype=bool)
        for first in range(0, len(values), BLOCK):
            block = values[first : first + BLOCK]
            known[first : first + BLOCK] = np.isin(block, int_cats) & (block != IdColumn.OTHER)
        for index, value in self.record_categories.other.items():
            if value is _MISSING or (_hashable(value) and value in categories):
                known[index] = True
        self._add_deferred(report, "unknown_category", np.flatnonzero(~known),
                           lambda i: f"{self._where(i)}: category id {self.record_categories[i]!r}")


def _plan_hw(h: Any, w: Any) -> Optional[tuple[int, int]]:
    """The recorded size as `mal label` trusts it (any finite numbers; a wrong one fails at decode), else None."""
    if _is_number(h) and _is_number(w) and math.isfinite(h) and math.isfinite(w):
        return int(h), int(w)
    return None


def _has_segmentation(record: dict) -> bool:
    seg = record.get("segmentation")
    return bool(seg) if isinstance(seg, (list, dict)) else False


def _file_name(image: dict, source: str) -> Optional[str]:
    from mal_cli.dataset import image_file_name

    try:
        return image_file_name(image, source)
    except InputError:
        return None


def check_document(obj: Any, source: str, image_info: Any = None, image_info_source: str = "--image-info") -> CheckReport:
    """Check a parsed dataset (or results list + `image_info` dataset) document; never raises on bad content."""
    if isinstance(obj, list):
        check = DocumentCheck(source, results=True)
        if image_info is None:
            check.report.add("layout", f"{source} is a results list: pass --image-info DATASET.json for the images")
            check.report.annotations = len(obj)
            return check.report
        info = DocumentCheck(image_info_source)
        if isinstance(image_info, dict):
            for key, value in image_info.items():
                info.value(key, value if key != "annotations" else [])
        else:
            info.value(None, image_info)
        return finish_results(check, info, obj)
    check = DocumentCheck(source)
    if isinstance(obj, dict):
        for key, value in obj.items():
            check.value(key, value)
    else:
        check.value(None, obj)
    return check.finish()


def finish_results(check: DocumentCheck, info: DocumentCheck, records: Optional[list] = None) -> CheckReport:
    """A results list checked against the images of its --image-info dataset (`info`, fed but not finished)."""
    info_report = info.finish()
    for code, group in info_report.groups.items():
        if code in ("image_not_object", "image_bad_id", "duplicate_image_id", "image_bad_size", "layout", "unreadable"):
            for example in group.examples:
                check._layout.add(code, example)
            check._layout.groups[code].count += group.count - len(group.examples)
    # The results' records refer to the info's images.
    check.image_ids, check.image_position, check.image_names = info.image_ids, info.image_position, info.image_names
    check.image_hw, check.image_plan_hw = info.image_hw, info.image_plan_hw
    check.image_source = info.source
    if records is not None:
        check.records(records)
    report = check.finish()
    report.images = len(info.image_ids)
    return report


def check_image_files(report: CheckReport, images_dir: Union[str, Path], decode: bool = False) -> None:
    """Stat (or with `decode`, decode) every image file of the checked document under `images_dir`."""
    for image_id, file_name, recorded in report.image_files:
        if file_name is None:
            continue  # reported as image_no_file when it matters
        path = Path(images_dir) / file_name
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

"""`mal check`'s rules over one dataset or results document, fed piecewise (streamed or parsed): what is wrong
with its layout, images and records. What the document holds goes into compact columns (`columns.BoxColumns`)."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from mal_cli.check_report import EXAMPLES, CheckReport
from mal_cli.columns import BLOCK, MISSING, BoxColumns, IdColumn, hashable
from mal_cli.errors import InputError
from mal_cli.pixels import boxes_pixel_bounds

# --- the checks -----------------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _positive_int(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 1
        and value == int(value)
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Order of the per-annotation checks, to list problem groups by first occurrence as one pass over the records would.
_ANN_CODES = (
    "ann_not_object",
    "ann_missing_key",
    "ann_bad_id",
    "duplicate_annotation_id",
    "unknown_image",
    "bbox_not_list",
    "bbox_not_number",
    "bbox_not_finite",
    "bbox_empty",
    "bbox_outside",
    "bbox_exceeds_image",
    "unknown_category",
)


class DocumentCheck:
    """The checks of one dataset or results document, fed piecewise, in compact memory (~60 bytes a record).

    `mal label` streams LVIS-scale input through it (`jsonstream.iter_document`) instead of parsing the whole
    document; `check_document` feeds a parsed one. Feed `value(key, v)` for top-level entries, `images(chunk)`
    and `records(chunk)` for the items of 'images' and 'annotations' (or of a results list) in order, in any
    order relative to each other (LVIS files put 'annotations' first), then `finish()`.

    What it reads goes into `columns` (`columns.BoxColumns`, sealed by `finish()`): the compact index `mal label`
    runs on. This class holds the rules and the report only.
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
        self.columns = BoxColumns()  # what the document holds, compactly (`mal label` runs on it)

    # --- feeding ---------------------------------------------------------------------------------------

    def value(self, key: Optional[str], value: Any) -> None:
        """A top-level entry that is not streamed (key None: the whole document is this value)."""
        if key is None:
            if not self.results:
                self._layout.add(
                    "layout",
                    f"{self.source}: a JSON {_json_type(value)}, expected an object with 'images' and 'annotations'",
                )
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
                self._layout.add(
                    "layout", f"{self.source}: 'categories' is a JSON {_json_type(value)}, expected a list"
                )
            else:
                self.categories = {c.get("id") for c in value if isinstance(c, dict) and hashable(c.get("id"))}

    def start(self, key: Optional[str]) -> None:
        """A streamed array begins (its items follow through `images` / `records`)."""
        if key is not None:
            self.keys_seen.add(key)

    def images(self, chunk: list) -> None:
        source, report = self.source, self._images
        for image in chunk:
            index = len(self.columns.image_ids)
            if not isinstance(image, dict):
                report.add("image_not_object", f"{source}: images[{index}] is a JSON {_json_type(image)}")
                self.columns.add_image(None, None, None)
                continue
            image_id = image.get("id")
            h, w = image.get("height"), image.get("width")
            plan_hw = _plan_hw(h, w)
            name = image.get("file_name") or image.get("coco_url") or None
            if not hashable(image_id):
                what = "has no 'id'" if "id" not in image else f"has 'id' {image_id!r} (a JSON {_json_type(image_id)})"
                report.add("image_bad_id", f"{source}: images[{index}] {what}")
                self.columns.add_image(None, None, plan_hw)
                continue
            if image_id in self.columns.image_position:
                report.add("duplicate_image_id", f"{source}: image id {image_id} (images[{index}])")
                self.columns.add_image(None, None, plan_hw)
                continue
            self.columns.image_position[image_id] = index
            sized = _positive_int(h) and _positive_int(w)
            if not sized:
                report.add("image_bad_size", f"{source}: image id {image_id}: height {h!r}, width {w!r}")
            self.columns.add_image(
                image_id, _file_name(image, source) if name else None, plan_hw, (int(h), int(w)) if sized else None
            )

    def records(self, chunk: list) -> None:
        """Annotations (or detections of a results list), in input order: local checks now, the rest at `finish`."""
        source, report, results = self.source, self._records, self.results
        name = "results" if results else "annotations"
        keys = ("image_id", "category_id", "bbox") if results else ("id", "image_id", "bbox")
        nan4 = (math.nan,) * 4
        for ann in chunk:
            index = len(self.columns.record_ids)
            at = f"{source}: {name}[{index}]"
            if not isinstance(ann, dict):
                self._add(report, "ann_not_object", index, f"{at} is a JSON {_json_type(ann)}")
                self.columns.add_record(MISSING, MISSING, MISSING, nan4, 0)
                continue
            ann_id = ann.get("id", MISSING)
            where = f"{source}: annotation id {ann_id}" if hashable(ann_id) and not results else at
            missing = [k for k in keys if k not in ann]
            if missing:
                self._add(report, "ann_missing_key", index, f"{where} has no {', '.join(repr(k) for k in missing)}")
            if not results and ann_id is not MISSING and not hashable(ann_id):
                self._add(report, "ann_bad_id", index, f"{at} has 'id' {ann_id!r}")
                ann_id = MISSING
            bbox = ann.get("bbox", MISSING)
            flags = 2 if _has_segmentation(ann) else 0
            values = nan4
            if bbox is not MISSING:
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
            self.columns.add_record(
                ann_id if not results else MISSING,
                ann.get("image_id", MISSING),
                ann.get("category_id", MISSING),
                values,
                flags,
                _numeric_score(ann.get("score")),
            )

    def _add(self, report: CheckReport, code: str, index: int, where: str) -> None:
        self._first.setdefault(code, index)
        report.add(code, where)

    # --- the checks that need everything ------------------------------------------------------------

    def finish(self, check_categories: bool = True) -> CheckReport:
        source, report = self.source, self.report
        results = self.results
        n = len(self.columns.record_ids)
        layout_ok = True
        if not results:
            for key in ("images", "annotations"):
                if key not in self.keys_seen:
                    self._layout.add("layout", f"{source}: no top-level key '{key}'")
                    layout_ok = False
                elif key in self.keys_not_lists:
                    layout_ok = False
        report.images = len(self.columns.image_ids)
        report.annotations = n
        bbox = self.columns.bbox_array()
        image_of = self.columns.resolve_images()
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
        used = np.zeros(len(self.columns.image_ids), dtype=bool)
        used[image_of[image_of >= 0]] = True
        if layout_ok or results:
            for position in np.flatnonzero(used):
                if self.columns.image_names[position] is None:
                    report.add("image_no_file", f"{self.image_source}: image id {self.columns.image_ids[position]}")
        self.columns.seal(image_of, bbox)
        report.image_files = self.columns.image_files()
        return report

    def _where(self, index: int) -> str:
        ann_id = self.columns.record_ids[index]
        if not self.results and ann_id is not MISSING:
            return f"{self.source}: annotation id {ann_id}"
        return f"{self.source}: {'results' if self.results else 'annotations'}[{index}]"

    def _add_deferred(self, report: CheckReport, code: str, indices, message) -> None:
        if len(indices):
            self._first.setdefault(code, int(indices[0]))
        report.add_counted(code, [message(int(index)) for index in indices[:EXAMPLES]], len(indices))

    def _duplicate_ids(self, report: CheckReport) -> None:
        if self.results:
            return
        ids = self.columns.record_ids.numpy()
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
        for index, value in sorted(self.columns.record_ids.other.items()):
            if value is MISSING:
                continue
            if value in seen:
                dup[index] = True
            seen.add(value)
        name = "annotations"
        self._add_deferred(
            report, "duplicate_annotation_id", np.flatnonzero(dup), lambda i: f"{self._where(i)} ({name}[{i}])"
        )

    def _unknown_images(self, report: CheckReport, image_of: np.ndarray) -> None:
        has_key = np.ones(len(image_of), dtype=bool)
        for index, value in self.columns.record_image_ids.other.items():
            if value is MISSING:
                has_key[index] = False
        self._add_deferred(
            report,
            "unknown_image",
            np.flatnonzero(has_key & (image_of < 0)),
            lambda i: f"{self._where(i)} -> image id {self.columns.record_image_ids[i]!r}",
        )

    def _bbox_against_images(self, report: CheckReport, bbox: np.ndarray, image_of: np.ndarray) -> None:
        """Boxes with no pixel centre inside their image (the pycocotools rule, as `mal label` rasterises), or
        reaching more than a pixel past its border."""
        flags = (
            np.frombuffer(bytes(self.columns.record_flags), dtype=np.uint8)
            if len(self.columns.record_flags)
            else np.zeros(0, np.uint8)
        )
        hw = (
            np.frombuffer(self.columns.image_hw, dtype=np.int64).reshape(-1, 2)
            if len(self.columns.image_hw)
            else np.zeros((0, 2), np.int64)
        )
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
        values = self.columns.record_categories.numpy()
        int_cats = np.array(sorted(c for c in categories if type(c) is int), dtype=np.int64)
        known = np.zeros(len(values), dtype=bool)
        for first in range(0, len(values), BLOCK):
            block = values[first : first + BLOCK]
            known[first : first + BLOCK] = np.isin(block, int_cats) & (block != IdColumn.OTHER)
        for index, value in self.columns.record_categories.other.items():
            if value is MISSING or (hashable(value) and value in categories):
                known[index] = True
        self._add_deferred(
            report,
            "unknown_category",
            np.flatnonzero(~known),
            lambda i: f"{self._where(i)}: category id {self.columns.record_categories[i]!r}",
        )


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


def _numeric_score(score) -> float:
    """A record's `score` for the columns: the number, or NaN when it has none (or not a number)."""
    if not _is_number(score):
        return math.nan
    try:
        value = float(score)
    except OverflowError:  # an int too big for a double
        return math.nan
    return value if math.isfinite(value) else math.nan

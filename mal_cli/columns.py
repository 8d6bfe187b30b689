"""A dataset's images and records as compact columns (~60 bytes a record): what `mal check`'s validator fills as
the document streams by, and what `mal label` runs on (`labeling.index`) without keeping the document."""

from __future__ import annotations

import math
from array import array
from typing import Any, Optional

import numpy as np

MISSING = object()  # a key the record does not have
BLOCK = 1 << 16  # records per vectorised step over every record


def hashable(value: Any) -> bool:
    """A value usable as a JSON id (an int or a string)."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


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

    def tolist(self) -> list:
        """Every value, as `column[i]` gives it, without a Python call per row."""
        values = self.values.tolist()
        for index, value in self.other.items():
            values[index] = value
        return values


class BoxColumns:
    """Images (in document order) and records (annotations, or a results list's detections) in columns.

    After `seal`: `record_image` (image position, -1 = none), `record_bbox` (float64 N x 4; NaN where a value is
    not a number), `record_has_segmentation`; per image: `image_ids`, `image_names` (file name or None) and
    `image_plan_hw` (the size `mal label` trusts, or None).
    """

    def __init__(self):
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
        self.record_score_values = array("d")  # a detection's numeric `score`, NaN without one (label --min-score)
        self.record_image: Optional[np.ndarray] = None
        self.record_bbox: Optional[np.ndarray] = None
        self.record_has_segmentation: Optional[np.ndarray] = None

    @property
    def num_records(self) -> int:
        return len(self.record_ids)

    def add_image(self, image_id, name, plan_hw, hw=None) -> None:
        self.image_ids.append(image_id)
        self.image_names.append(name)
        self.image_plan_hw.append(plan_hw)
        self.image_hw.extend(hw or (0, 0))

    def add_record(self, ann_id, image_id, category, bbox_values, flags, score=math.nan) -> None:
        self.record_ids.append(ann_id)
        self.record_image_ids.append(image_id)
        self.record_categories.append(category)
        try:
            self.record_bbox_values.extend(bbox_values)
        except OverflowError:  # an int too big for a double: not a usable box
            self.record_bbox_values.extend((math.nan,) * 4)
        self.record_flags.append(flags)
        self.record_score_values.append(score)

    def use_images_of(self, other: "BoxColumns") -> None:
        """A results list's records refer to the images of its --image-info dataset."""
        self.image_ids, self.image_position, self.image_names = other.image_ids, other.image_position, other.image_names
        self.image_hw, self.image_plan_hw = other.image_hw, other.image_plan_hw

    def recorded_hw(self, position: int) -> Optional[tuple[int, int]]:
        h, w = self.image_hw[2 * position], self.image_hw[2 * position + 1]
        return (h, w) if h > 0 and w > 0 else None

    def bbox_array(self) -> np.ndarray:
        n = self.num_records
        return np.frombuffer(self.record_bbox_values, dtype=np.float64).reshape(n, 4) if n else np.zeros((0, 4))

    def resolve_images(self) -> np.ndarray:
        """Each record's image position (-1: no such image, or no image_id)."""
        n = self.num_records
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
            if value is not MISSING and hashable(value) and value in self.image_position:
                image_of[index] = self.image_position[value]
        return image_of

    def seal(self, image_of: np.ndarray, bbox: np.ndarray) -> None:
        """The record columns as arrays, once every record is in."""
        self.record_image = image_of
        self.record_bbox = bbox
        flags = np.frombuffer(bytes(self.record_flags), dtype=np.uint8)
        self.record_has_segmentation = flags & 2 > 0 if self.num_records else np.zeros(0, bool)

    def image_files(self) -> list:
        """(image id, file name, recorded (h, w) or None) of every image with a usable id."""
        return [(i, self.image_names[p], self.recorded_hw(p)) for p, i in enumerate(self.image_ids) if i is not None]

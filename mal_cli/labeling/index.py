"""The boxes to label as compact columns (~60 bytes a box): BOXES is read once as a stream, checked as `mal check`
does, and not kept; the output is written by streaming the file again (`labeling.output`)."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import orjson

from mal_cli.errors import InputError
from mal_cli.labeling.progress import records_digest

log = logging.getLogger(__name__)


@dataclass
class BoxIndex:
    """BOXES' records in columns: a dataset (records = its annotations) or a results list (records = its
    detections, images from --image-info)."""

    path: Path  # BOXES (stdin is first copied to a temp file)
    source: str
    is_results: bool
    record_image: np.ndarray  # (N,) int32: each record's image position
    record_bbox: np.ndarray  # (N, 4) float64 COCO boxes; NaN where a value is not a number
    record_has_segmentation: np.ndarray  # (N,) bool
    image_names: list  # per image position: its file name
    image_hw: list  # per image position: recorded (height, width) or None
    digest: str  # of the records' ids, images and boxes and the images' ids and sizes (the resume fingerprint)
    temp_copy: bool = False  # `path` is a copy of stdin, removed by `close`
    stat: tuple = ()  # (size, mtime) of `path` when read: it is read again for the output
    image_ids: list = field(default_factory=list)  # per image position: its id (for messages)
    records_digest: str = ""  # `merge.records_digest` of the records (the progress header: `mal merge --into`)
    record_score: Optional[np.ndarray] = None  # (N,) float64 detector scores, NaN without one

    def below_min_score(self, min_score: float) -> np.ndarray:
        """(N,) bool: records `--min-score` leaves out: `results.below_min_score` (a score below it; no score: never)
        on the score column, whose NaN (no numeric score) compares False."""
        if self.record_score is None:
            return np.zeros(self.num_records, dtype=bool)
        return self.record_score < min_score

    def ensure_unchanged(self) -> None:
        """The output streams BOXES again: it must still be the file that was labelled."""
        stat = self.path.stat()
        if (stat.st_size, stat.st_mtime_ns) != self.stat:
            raise InputError(
                f"{self.source} changed during the run; restore it, or rerun with --resume to label the new one"
            )

    @property
    def num_records(self) -> int:
        return len(self.record_image)

    def close(self) -> None:
        if self.temp_copy:
            self.path.unlink(missing_ok=True)


def _stdin_copy() -> Path:
    fd, name = tempfile.mkstemp(prefix="mal-label-stdin-", suffix=".json")
    with os.fdopen(fd, "wb") as handle:
        while chunk := sys.stdin.buffer.read(1 << 22):
            handle.write(chunk)
    return Path(name)


def _info_images(path, source: str):
    """The --image-info dataset's entries, without its annotations (a results list needs only its images)."""
    from mal_cli.jsonstream import iter_document

    for kind, key, value in iter_document(path, ("images", "annotations"), source):
        if kind == "items" and key == "annotations":
            continue
        yield kind, key, value


def _feed(check, kind: str, key, value) -> None:
    if kind == "start":
        check.start(key)
    elif kind == "items":
        (check.images if key == "images" else check.records)(value)
    else:
        check.value(key, value)


def _check_boxes(path: Path, source: str, image_info: Optional[str]):
    """The finished `DocumentCheck` of BOXES (with its --image-info for a results list) and its report: the
    check's `columns` are the index."""
    from mal_cli.check import DocumentCheck, finish_results
    from mal_cli.jsonstream import iter_document

    check = None
    for kind, key, value in iter_document(path, ("images", "annotations"), source):
        if check is None:
            is_results = kind == "start" and key is None
            if is_results and image_info is None:
                raise InputError(
                    f"{source} is a detector results list: pass --image-info DATASET.json for the images' file "
                    f"names and sizes"
                )
            check = DocumentCheck(source, results=is_results)
        _feed(check, kind, key, value)
    if not check.results:
        return check, check.finish()
    info = DocumentCheck(str(image_info))
    info_path = _stdin_copy() if image_info == "-" else image_info
    try:
        info_events = list(_info_images(info_path, str(image_info)))
    finally:
        if image_info == "-":
            Path(info_path).unlink(missing_ok=True)
    for kind, key, value in info_events:  # its annotations are left out: an empty list of them is an empty list
        _feed(info, kind, key, [] if kind == "value" and key == "annotations" and isinstance(value, list) else value)
    return check, finish_results(check, info)


def _digest(columns) -> str:
    digest = hashlib.sha256()
    for column in (columns.record_ids, columns.record_image_ids):
        digest.update(column.numpy().tobytes())
        other = [[i, v if isinstance(v, (int, str)) else None] for i, v in sorted(column.other.items())]
        digest.update(orjson.dumps(other))
    digest.update(columns.record_bbox.tobytes())
    digest.update(columns.record_has_segmentation.tobytes())
    digest.update(orjson.dumps([columns.image_ids, columns.image_plan_hw]))
    return digest.hexdigest()


def _records_digest(columns) -> str:
    """`progress.records_digest` of the records, from the columns as `mal merge` computes it from the JSON."""
    from mal_cli.columns import MISSING

    def values(column) -> list:
        return [None if v is MISSING else v for v in column.tolist()]

    return records_digest(values(columns.record_ids), values(columns.record_image_ids), columns.record_bbox)


def read_boxes(boxes: str, image_info: Optional[str] = None) -> BoxIndex:
    """Read BOXES (dataset or results list, '-' = stdin) in one streaming pass, checking it as `mal check` does
    (every error at once; per-box problems become flagged fallbacks). A results list needs `image_info`."""
    source = "<stdin>" if boxes == "-" else str(boxes)
    path = _stdin_copy() if boxes == "-" else Path(boxes)
    try:
        check, report = _check_boxes(path, source, image_info)
        report.raise_errors()
        if report.warnings:
            log.warning(
                "%s: box/image problems, their boxes get flagged fallbacks (counted at the end): %s",
                source,
                report.summary("warning"),
            )
        stat = path.stat()
        c = check.columns
        return BoxIndex(
            path,
            source,
            check.results,
            c.record_image,
            c.record_bbox,
            c.record_has_segmentation,
            c.image_names,
            c.image_plan_hw,
            _digest(c),
            temp_copy=boxes == "-",
            stat=(stat.st_size, stat.st_mtime_ns),
            image_ids=c.image_ids,
            records_digest=_records_digest(c),
            record_score=np.frombuffer(c.record_score_values, dtype=np.float64).copy(),
        )
    except BaseException:
        if boxes == "-":
            path.unlink(missing_ok=True)
        raise

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

import os
import stat
from pathlib import Path
from typing import Any, Optional, Union

from mal_cli.check_report import KINDS, CheckReport, Group  # noqa: F401  (the report's names, importable from here)
from mal_cli.check_rules import DocumentCheck
from mal_cli.errors import InputError


def check_document(
    obj: Any, source: str, image_info: Any = None, image_info_source: str = "--image-info"
) -> CheckReport:
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
            check._layout.add_counted(code, group.examples, group.count)
    # The results' records refer to the info's images.
    check.columns.use_images_of(info.columns)
    check.image_source = info.source
    if records is not None:
        check.records(records)
    report = check.finish()
    report.images = len(info.columns.image_ids)
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
        is_file = stat.S_ISREG(st.st_mode)  # the stat above: no second one per image
        if not is_file or st.st_size == 0:
            report.add(
                "image_unreadable",
                f"image id {image_id}: {path} ({'empty file' if is_file else 'not a file'})",
            )
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
            report.add(
                "image_size_mismatch",
                f"image id {image_id}: {path} is {array.shape[0]}x{array.shape[1]} (HxW), "
                f"recorded {recorded[0]}x{recorded[1]}",
            )


def read_document(path: Union[str, Path], report: Optional[CheckReport] = None) -> tuple[Any, Optional[CheckReport]]:
    """Parse a JSON file; an unreadable one becomes an 'unreadable' problem of a report instead of an exception."""
    from mal_cli.dataset import read_json

    try:
        return read_json(path), None
    except InputError as err:
        report = report or CheckReport("<stdin>" if str(path) == "-" else str(path))
        report.add("unreadable", str(err))
        return None, report


def check_paths(
    dataset: str, images: Optional[str] = None, image_info: Optional[str] = None, decode: bool = False
) -> CheckReport:
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

"""COCO / LVIS detection datasets and COCO results lists: load, index, resolve image files, write.

A `Dataset` keeps the parsed JSON document as it is (`raw`): info, licenses, categories and any keys
this tool does not know pass through untouched, and boxes stay the exact floats that were read, so
writing the document back changes only what the caller changed.

Formats:
- COCO instances: {"images": [...], "annotations": [...], "categories": [...], ...}; images carry
  `file_name`, annotations `iscrowd`.
- LVIS v1: the same layout, but images carry `coco_url` (no `file_name`), categories carry
  `frequency`, annotations have no `iscrowd`.
- COCO results: a list [{"image_id", "category_id", "bbox", "score"?, "segmentation"?}, ...].
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import orjson

from mal_cli.errors import InputError, OutputError
from mal_cli.fileio import write_bytes_atomic

__all__ = [
    "Dataset",
    "load_dataset",
    "load_results",
    "load_any",
    "read_json",
    "write_json_atomic",
    "image_file_name",
]


@dataclass
class Dataset:
    """A COCO or LVIS dataset document with the indices every command needs.

    `images` and the annotation dicts are the very objects inside `raw`: edit them in place (e.g. add
    `segmentation`) and write `raw` back with `write_json_atomic`.
    """

    raw: dict
    source: str = "<memory>"
    is_lvis: bool = False
    images: list[dict] = field(default_factory=list)
    image_by_id: dict[Any, dict] = field(default_factory=dict)
    annotations_by_image: dict[Any, list[dict]] = field(default_factory=dict)

    @property
    def annotations(self) -> list[dict]:
        return self.raw["annotations"]

    @property
    def categories(self) -> list[dict]:
        return self.raw.get("categories", [])

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<memory>") -> "Dataset":
        """Validate and index a parsed dataset document. Raises `InputError` naming `source`."""
        if not isinstance(raw, dict):
            raise InputError(
                f"{source}: expected a COCO/LVIS dataset (a JSON object with 'images' and 'annotations'), "
                f"got a JSON {_json_type(raw)}"
            )
        for key in ("images", "annotations"):
            if key not in raw:
                raise InputError(f"{source}: missing the top-level key '{key}'; is this a COCO/LVIS instances file?")
            if not isinstance(raw[key], list):
                raise InputError(f"{source}: '{key}' must be a list, got a JSON {_json_type(raw[key])}")
        if "categories" in raw and not isinstance(raw["categories"], list):
            raise InputError(f"{source}: 'categories' must be a list, got a JSON {_json_type(raw['categories'])}")

        images = raw["images"]
        image_by_id: dict[Any, dict] = {}
        for index, image in enumerate(images):
            if not isinstance(image, dict) or "id" not in image:
                raise InputError(f"{source}: images[{index}] has no 'id'")
            if image["id"] in image_by_id:
                raise InputError(f"{source}: image id {image['id']} appears twice; image ids must be unique")
            image_by_id[image["id"]] = image

        annotations_by_image: dict[Any, list[dict]] = defaultdict(list)
        seen_ids: set = set()
        for index, ann in enumerate(raw["annotations"]):
            if not isinstance(ann, dict):
                raise InputError(f"{source}: annotations[{index}] is a JSON {_json_type(ann)}, not an object")
            for key in ("id", "image_id", "bbox"):
                if key not in ann:
                    where = f"annotation id {ann['id']}" if "id" in ann else f"annotations[{index}]"
                    raise InputError(f"{source}: {where} has no '{key}'")
            ann_id = ann["id"]
            if ann_id in seen_ids:
                raise InputError(f"{source}: annotation id {ann_id} appears twice; annotation ids must be unique")
            seen_ids.add(ann_id)
            if ann["image_id"] not in image_by_id:
                raise InputError(
                    f"{source}: annotation id {ann_id} refers to image id {ann['image_id']}, which is not in 'images'"
                )
            bbox = ann["bbox"]
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise InputError(f"{source}: annotation id {ann_id}: 'bbox' must be [x, y, width, height]")
            annotations_by_image[ann["image_id"]].append(ann)

        return cls(
            raw=raw,
            source=source,
            is_lvis=_looks_like_lvis(raw),
            images=images,
            image_by_id=image_by_id,
            annotations_by_image=dict(annotations_by_image),
        )

    def image_path(self, image: dict, images_dir: Union[str, Path]) -> Path:
        """Where `image`'s file is under `images_dir` (see `image_file_name`); not checked to exist."""
        return Path(images_dir) / image_file_name(image, self.source)


def image_file_name(image: dict, source: str = "<memory>") -> str:
    """The file name of an image record: `file_name`, else the last path part of `coco_url` (LVIS).

    LVIS `coco_url`s look like http://images.cocodataset.org/train2017/000000391895.jpg, and LVIS images
    live in the COCO train2017/val2017 folders, so the last part is the file to look for.
    """
    name = image.get("file_name")
    if name:
        return str(name)
    url = image.get("coco_url")
    if url:
        return str(url).rstrip("/").rsplit("/", 1)[-1]
    raise InputError(f"{source}: image id {image.get('id')} has neither 'file_name' nor 'coco_url'; add one of them")


def _looks_like_lvis(raw: dict) -> bool:
    # LVIS categories carry a frequency group (r/c/f); LVIS images have coco_url but no file_name.
    categories = raw.get("categories") or []
    if categories and isinstance(categories[0], dict) and "frequency" in categories[0]:
        return True
    images = raw["images"]
    return bool(images) and "file_name" not in images[0] and "coco_url" in images[0]


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def read_json(path: Union[str, Path]) -> Any:
    """Parse a JSON file ("-" = stdin) with orjson. Raises `InputError` with the byte offset of bad JSON."""
    from mal_cli.jsonstream import loads, unreadable

    source = str(path)
    try:
        if source == "-":
            data = sys.stdin.buffer.read()
            source = "<stdin>"
        else:
            data = Path(path).read_bytes()
    except OSError as err:
        raise unreadable(err, source) from None
    try:
        return loads(data)
    except orjson.JSONDecodeError as err:
        what = "truncated" if err.pos >= len(data.rstrip()) else "invalid"
        raise InputError(
            f"{source}: {what} JSON at byte {err.pos} of {len(data)} ({err.msg}); regenerate or fix the file"
        ) from None


def load_dataset(path: Union[str, Path]) -> Dataset:
    """Load a COCO instances or LVIS v1 JSON file ("-" = stdin) as a `Dataset`."""
    return Dataset.from_dict(read_json(path), _source(path))


def load_results(path: Union[str, Path]) -> list[dict]:
    """Load a COCO results list ([{"image_id", "category_id", "bbox", "score"?, ...}, ...])."""
    return _validate_results(read_json(path), _source(path))


def load_any(path: Union[str, Path]) -> Union[Dataset, list[dict]]:
    """Load either kind: a `Dataset` for a JSON object, a results list for a JSON array.

    Tell them apart with `isinstance(result, Dataset)`.
    """
    obj = read_json(path)
    if isinstance(obj, list):
        return _validate_results(obj, _source(path))
    return Dataset.from_dict(obj, _source(path))


def _source(path: Union[str, Path]) -> str:
    return "<stdin>" if str(path) == "-" else str(path)


def _validate_results(obj: Any, source: str) -> list[dict]:
    if not isinstance(obj, list):
        raise InputError(
            f"{source}: expected a COCO results list (a JSON array of detections), got a JSON {_json_type(obj)}"
        )
    for index, det in enumerate(obj):
        if not isinstance(det, dict):
            raise InputError(f"{source}: result [{index}] is a JSON {_json_type(det)}, not an object")
        for key in ("image_id", "category_id", "bbox"):
            if key not in det:
                raise InputError(f"{source}: result [{index}] (image id {det.get('image_id')}) has no '{key}'")
        bbox = det["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise InputError(f"{source}: result [{index}] (image id {det['image_id']}): 'bbox' must be [x, y, w, h]")
    return obj


def write_json_atomic(path: Union[str, Path], obj: Any) -> None:
    """Write `obj` as JSON with orjson: to a temp file beside `path`, then `os.replace` ("-" = stdout).

    A reader never sees a half-written file, and an interrupted write leaves any old file intact.
    """
    try:
        data = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as err:
        raise OutputError(f"{path}: cannot serialise to JSON: {err}") from None
    if str(path) == "-":
        sys.stdout.buffer.write(data + b"\n")
        sys.stdout.buffer.flush()
        return
    write_bytes_atomic(path, data)

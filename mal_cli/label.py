"""`mal label`: turn every box of a dataset (or detector results) into a mask. Streaming, batched, resumable, sharded.

Pipeline: images are decoded once each (`images.load_rgb`) and their boxes cropped in DataLoader workers,
in parallel with the model; crops of several images are batched together; each box's probability map
is pasted back on its box window only and RLE-encoded from that window (`masks.encode_window`).

Determinism: boxes are batched in a fixed order that depends only on the input and `--batch-size`:
images (in input order, those with boxes to label) are packed into *groups* of at most `batch_size`
boxes (an image with more boxes is a group of its own, run in chunks of `batch_size`). A group is the
unit of work, of resuming and of sharding, so a box always meets the same batch-mates: a resumed, a
sharded or a torchrun run gives the same bytes as one uninterrupted run.

Crash safety: each finished image's results are appended as one JSON line to `OUT.progress.jsonl`
(first line: a header with a fingerprint of the input and options). `--resume` reads it back, drops a
torn last line, and labels only the groups with unfinished images. OUT is written at the end, atomically,
streaming the annotations (input order) with their results read back from the progress file, so the run
never holds all masks in memory. The progress file is removed after a successful write unless
`--keep-progress` (`mal merge` accepts progress files too).

Memory: nor does it hold the input. BOXES is read once as a stream (`jsonstream`), checked and kept as
compact columns (`check.DocumentCheck`: image position, box, has-mask; ~60 bytes a box), and streamed
again to write OUT. Peak RSS at LVIS scale (1.3 M boxes) is the torch import plus ~150 MiB.

Sharding: `--shard K/N` labels groups g with g % N == K (whole images, about 1/N of the boxes). A shard's
output keeps every image, category and other key of the input (so shards are self-describing and
`mal merge` can check they belong together) but only its own images' annotations, plus a top-level
`mal_shard` entry with their positions in the input; `mal merge` uses it to restore the input order
exactly. Under torchrun (WORLD_SIZE > 1) each rank labels shard RANK/WORLD_SIZE and rank 0 merges.

Fallbacks (flagged `mal_fallback` on the annotation, `mal_score` = 0): a box with a non-finite, zero or
negative size, or covering no pixel centre of the image, is "degenerate_box"; a box of an image that
cannot be decoded (missing, corrupt, or its size differs from the recorded one) is "image_error".
Both get the filled box clipped to the image (pycocotools pixel rule, `geometry.box_pixel_bounds`),
possibly empty.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import tempfile
import time
from collections import Counter, OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import orjson
import torch

from mal_cli import geometry, masks
from mal_cli.fileio import atomic_write
from mal_cli.errors import InputError, OutputError
from mal_cli.score import BOX_METHOD_SCORE, FALLBACK_SCORE, mask_quality

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_NAME = "mal_vits14_coco343.pth"
PROGRESS_SUFFIX = ".progress.jsonl"
PROGRESS_VERSION = 1
FSYNC_INTERVAL_S = 5.0


# --- options and inputs -----------------------------------------------------------------------------


@dataclass
class LabelOptions:
    """What changes the labels (all of it goes into the resume fingerprint) plus how fast they are made."""

    method: str = "mal"  # "mal" (the labeler) or "box" (filled box, the floor baseline)
    checkpoint: Optional[str] = None  # None: `default_checkpoint()`
    teacher: bool = False
    threshold: Optional[float] = None  # None: the checkpoint's
    flip: bool = False
    format: str = "rle"  # "rle" or "polygon"
    only_missing: bool = False
    batch_size: int = 64
    crop_sizes: Any = None  # per box route (small, medium, large) or "full"; None: `predictor.default_crop_sizes`
    # Not in the fingerprint: they change speed, not results.
    device: str = "auto"
    workers: Optional[int] = None  # None: `auto_workers`
    strict: bool = False  # an unreadable image stops the run instead of becoming a flagged fallback
    compile: bool = False  # torch.compile the encoder's blocks (`modeling.labeler.compile_encoder_blocks`)
    precision: str = "auto"  # `mal_cli.precision`; the resolved one goes into the fingerprint (it changes the bytes)

    def validate(self) -> None:
        if self.method not in ("mal", "box"):
            raise InputError(f"--method must be 'mal' or 'box', got '{self.method}'")
        if self.format not in ("rle", "polygon"):
            raise InputError(f"--format must be 'rle' or 'polygon', got '{self.format}'")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise InputError(f"--workers must be 0 or more, got {self.workers}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):  # `mal_cli.precision.CHOICES`
            raise InputError(f"--precision must be auto, fp32, bf16 or fp16, got '{self.precision}'")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise InputError(f"--threshold must be between 0 and 1, got {self.threshold}")


def default_checkpoint() -> Path:
    """The shipped labeler: $MAL_CHECKPOINT, else `mal_vits14_coco343.pth` in <repo>/models or <prefix>/share/mal/models."""
    candidates = []
    env = os.environ.get("MAL_CHECKPOINT")
    if env:
        candidates.append(Path(env))
    candidates.append(Path(__file__).resolve().parent.parent / "models" / DEFAULT_CHECKPOINT_NAME)
    candidates.append(Path(sys.prefix) / "share" / "mal" / "models" / DEFAULT_CHECKPOINT_NAME)
    import site  # `pip install --user .` puts data files under the user base

    candidates.append(Path(site.getuserbase()) / "share" / "mal" / "models" / DEFAULT_CHECKPOINT_NAME)
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise InputError(
        f"no labeler checkpoint given and the default one was not found (looked in: {looked}); "
        f"pass --checkpoint PATH, set MAL_CHECKPOINT, or use --method box"
    )


def parse_crop_sizes(text: str) -> tuple[int, ...] | str:
    """'S,M,L' -> (S, M, L) crop sizes, or 'full' (checked against the model in `predictor.make_crop_plan`)."""
    if text.strip().lower() == "full":
        return "full"
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--crop-sizes must be 'full' or comma-separated integers like 168,196,224, got '{text}'") from None
    if any(s < 1 for s in sizes):
        raise InputError(f"--crop-sizes must be positive, got '{text}'")
    return sizes


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 <= K < N."""
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise InputError(f"--shard must look like K/N (e.g. 0/4), got '{text}'") from None
    if n < 1 or not 0 <= k < n:
        raise InputError(f"--shard {text}: need 0 <= K < N")
    return k, n


@dataclass
class LabelInput:
    """The boxes to label, in compact columns (~60 bytes a box): the document itself is not kept.

    BOXES is a dataset (records = its annotations) or a results list (records = its detections, images from
    --image-info). The output is written by streaming the file at `path` again (`write_output`).
    """

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

    def ensure_unchanged(self) -> None:
        """The output streams BOXES again: it must still be the file that was labelled."""
        stat = self.path.stat()
        if (stat.st_size, stat.st_mtime_ns) != self.stat:
            raise InputError(f"{self.source} changed during the run; restore it, or rerun with --resume to label the new one")

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


def load_label_input(boxes: str, image_info: Optional[str] = None) -> LabelInput:
    """Read BOXES (dataset or results list, '-' = stdin) in one streaming pass, checking it as `mal check` does
    (every error at once; per-box problems become flagged fallbacks). A results list needs `image_info`."""
    from mal_cli.check import DocumentCheck, finish_results
    from mal_cli.jsonstream import iter_document

    source = "<stdin>" if boxes == "-" else str(boxes)
    path = _stdin_copy() if boxes == "-" else Path(boxes)
    try:
        check = None
        for kind, key, value in iter_document(path, ("images", "annotations"), source):
            if check is None:
                is_results = kind == "start" and key is None
                if is_results and image_info is None:
                    raise InputError(
                        f"{source} is a detector results list: pass --image-info DATASET.json for the images' file names and sizes"
                    )
                check = DocumentCheck(source, results=is_results)
            if kind == "start":
                check.start(key)
            elif kind == "items":
                (check.images if key == "images" else check.records)(value)
            else:
                check.value(key, value)
        if check.results:
            info = DocumentCheck(str(image_info))
            info_path = _stdin_copy() if image_info == "-" else image_info
            try:
                info_events = list(_info_images(info_path, str(image_info)))
            finally:
                if image_info == "-":
                    Path(info_path).unlink(missing_ok=True)
            for kind, key, value in info_events:
                if kind == "start":
                    info.start(key)
                elif kind == "items" and key == "images":
                    info.images(value)
                elif kind == "value":
                    info.value(key, value if key != "annotations" or not isinstance(value, list) else [])
            report = finish_results(check, info)
        else:
            report = check.finish()
        report.raise_errors()
        if report.warnings:
            log.warning("%s: %d box/image problem(s), labelled with flagged fallbacks: %s", source, report.warnings,
                        report.summary("warning"))
        digest = hashlib.sha256()
        for column in (check.record_ids, check.record_image_ids):
            digest.update(column.numpy().tobytes())
            digest.update(orjson.dumps([[i, v if isinstance(v, (int, str)) else None] for i, v in sorted(column.other.items())]))
        digest.update(check.record_bbox.tobytes())
        digest.update(check.record_has_segmentation.tobytes())
        digest.update(orjson.dumps([check.image_ids, check.image_plan_hw]))
        stat = path.stat()
        return LabelInput(path, source, check.results, check.record_image, check.record_bbox, check.record_has_segmentation,
                          check.image_names, check.image_plan_hw, digest.hexdigest(), temp_copy=boxes == "-",
                          stat=(stat.st_size, stat.st_mtime_ns))
    except BaseException:
        if boxes == "-":
            path.unlink(missing_ok=True)
        raise


# --- the plan: images, groups, shards ---------------------------------------------------------------


@dataclass(slots=True)  # one per image: LVIS has 100k+
class ImageJob:
    """One image and the boxes of it to label."""

    position: int  # the image's position in the input's image list
    path: str
    recorded_hw: Optional[tuple[int, int]]
    record_positions: np.ndarray  # positions of its records in the input, in input order
    record_bbox: np.ndarray  # every record's box (shared by all jobs)

    @property
    def boxes_xywh(self) -> np.ndarray:
        """(k, 4) the boxes of its records."""
        return self.record_bbox[self.record_positions]

    @property
    def num_boxes(self) -> int:
        return len(self.record_positions)


def plan_jobs(inp: LabelInput, images_dir: str | Path, only_missing: bool) -> list[ImageJob]:
    """Every image with at least one box to label, in input image order."""
    records = np.flatnonzero(~inp.record_has_segmentation) if only_missing else np.arange(inp.num_records)
    images = inp.record_image[records]
    order = np.argsort(images, kind="stable")  # by image; input order within an image
    records, images = records[order], images[order]
    starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]]) if len(images) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(images)]
    folder = Path(images_dir)
    jobs = []
    for start, end in zip(starts.tolist(), ends.tolist()):
        position = int(images[start])
        positions = records[start:end]
        jobs.append(ImageJob(position, str(folder / inp.image_names[position]), inp.image_hw[position], positions,
                             inp.record_bbox))
    return jobs


def group_jobs(jobs: Sequence[ImageJob], batch_size: int) -> list[list[ImageJob]]:
    """Pack consecutive images into groups of at most `batch_size` boxes (a bigger image is a group alone)."""
    groups: list[list[ImageJob]] = []
    current: list[ImageJob] = []
    count = 0
    for job in jobs:
        n = job.num_boxes
        if current and count + n > batch_size:
            groups.append(current)
            current, count = [], 0
        current.append(job)
        count += n
    if current:
        groups.append(current)
    return groups


# --- image loading and cropping (DataLoader workers) ------------------------------------------------


def _box_xyxy(bbox: Sequence) -> Optional[tuple[float, float, float, float]]:
    """A COCO box as xyxy, or None when it is not a real box (non-numeric, non-finite, w or h <= 0)."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h, x + w, y + h)) or w <= 0 or h <= 0:  # x + w can overflow
        return None
    return (x, y, x + w, y + h)


@dataclass
class LoadedImage:
    job_index: int  # position of the image within its group
    hw: Optional[tuple[int, int]]
    error: Optional[str]
    model_boxes: list[int]  # indices into the job's boxes that go to the model
    regions: list[tuple[float, float, float, float]]
    box_areas: list[float]  # areas of the model boxes (they pick the decoder's route)


@dataclass
class LoadedGroup:
    """A group's images, and the crops of all their model boxes joined per crop size (image by image)."""

    images: list[LoadedImage]
    crops: Any  # predictor.BoxCrops, or None when no box goes to the model
    box_areas: torch.Tensor  # (len(crops),)

    def pin_memory(self) -> "LoadedGroup":  # called by the DataLoader's pin thread (GPU runs)
        return LoadedGroup(self.images, self.crops.pin_memory() if self.crops is not None else None, self.box_areas)


def load_image_crops(job: ImageJob, index: int, need_pixels: bool, crop_plan,
                     margins: geometry.Margins) -> tuple[LoadedImage, Any]:
    """Decodes one image and crops its labellable boxes: the image's record and the uint8 crops of its model
    boxes (predictor.BoxCrops, or None). Errors become a value, never an exception. A JPEG whose boxes are all
    large enough is decoded at a reduced size (`images.draft_reduction`)."""
    from mal_cli.images import draft_reduction, load_rgb_reduced, scale_regions  # PIL stays out of `mal --help`

    hw, error, image, scale = job.recorded_hw, None, None, 1.0
    model_boxes, regions, areas = _model_boxes(job, hw, margins) if need_pixels and hw else ([], [], [])
    reduce = draft_reduction(regions, [crop_plan.size_for(a) for a in areas]) if regions else 1
    if need_pixels or hw is None:
        try:
            image, decoded_hw, scale = load_rgb_reduced(job.path, expected_hw=job.recorded_hw, reduce=reduce)
            if hw is not None and decoded_hw != hw:
                error = f"{job.path}: decoded size {decoded_hw[0]}x{decoded_hw[1]} differs from the recorded {hw[0]}x{hw[1]}"
                image = None
            if hw is None and need_pixels:
                model_boxes, regions, areas = _model_boxes(job, decoded_hw, margins)
            hw = hw or decoded_hw
        except Exception as err:  # noqa: BLE001 - any unreadable image is a fallback, not a crash
            error = str(err)
    if image is None:
        model_boxes, regions, areas = [], [], []
    crops = None
    if model_boxes:
        chw = torch.from_numpy(np.array(image, copy=not image.flags.writeable)).permute(2, 0, 1)
        crops = crop_plan.crops(chw, scale_regions(regions, scale), areas)
    return LoadedImage(index, hw, error, model_boxes, regions, areas), crops


def _model_boxes(job: ImageJob, hw: tuple[int, int], margins: geometry.Margins) -> tuple[list, list, list]:
    """The boxes of `job` that go to the model (not degenerate, not empty on the image): indices, crop regions, areas."""
    model_boxes, regions, areas = [], [], []
    for i, bbox in enumerate(job.boxes_xywh.tolist()):
        xyxy = _box_xyxy(bbox)
        if xyxy is None:
            continue
        row0, row1, col0, col1 = geometry.box_pixel_bounds(xyxy, hw)
        if row1 <= row0 or col1 <= col0:
            continue
        model_boxes.append(i)
        regions.append(geometry.crop_region(xyxy, margins))
        areas.append(geometry.box_area(bbox))
    return model_boxes, regions, areas


class _GroupCropDataset(torch.utils.data.Dataset):
    """One group of images an item: decoded, cropped and joined in a DataLoader worker.

    Joining there keeps per-image work out of the main process, which feeds the GPU: it receives one tensor
    per crop size a group instead of ~2 an image (each shared tensor costs a socket round trip to its worker).
    """

    def __init__(self, groups: Sequence[Sequence[ImageJob]], need_pixels: bool, crop_plan, margins: geometry.Margins):
        self.groups = groups
        self.need_pixels = need_pixels
        self.crop_plan = crop_plan  # predictor.CropPlan (None for --method box)
        self.margins = margins

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> LoadedGroup:
        loaded = [load_image_crops(job, i, self.need_pixels, self.crop_plan, self.margins)
                  for i, job in enumerate(self.groups[index])]
        images = [item for item, _ in loaded]
        parts = [crops for _, crops in loaded if crops is not None]
        crops = None
        if parts:
            from mal_cli.predictor import BoxCrops

            crops = parts[0] if len(parts) == 1 else BoxCrops.cat(parts)
        areas = torch.tensor([a for item in images for a in item.box_areas])
        return LoadedGroup(images, crops, areas)


def _identity(item):  # DataLoader collate for batch_size=None (a module-level function pickles)
    return item


# --- one box's result ---------------------------------------------------------------------------------


def box_result(
    window_mask: np.ndarray,
    window: tuple[int, int, int, int],
    hw: tuple[int, int],
    score: float,
    fmt: str,
    fallback: Optional[str] = None,
) -> dict:
    """The fields `mal label` sets on an annotation: segmentation, area, mal_score (+ mal_fallback)."""
    height, width = hw
    row0, _, col0, _ = window
    if fmt == "polygon":
        polygons = [
            [v + (col0 if i % 2 == 0 else row0) for i, v in enumerate(poly)] for poly in masks.to_polygons(window_mask)
        ]
        # Polygons cannot hold holes: the area is the area of what they cover.
        segmentation: Any = polygons
        area = masks.area(polygons, height, width) if polygons else 0
    else:
        segmentation = masks.encode_window(window_mask, row0, col0, height, width)
        area = int(np.count_nonzero(window_mask))
    result = {"segmentation": segmentation, "area": area, "mal_score": score}
    if fallback:
        result["mal_fallback"] = fallback
    return result


def filled_box_result(bbox: Sequence, hw: Optional[tuple[int, int]], fmt: str, fallback: Optional[str], score: float) -> dict:
    """The filled box clipped to the image (pycocotools pixel rule); empty for a degenerate box."""
    xyxy = _box_xyxy(bbox)
    if hw is None:
        # No size known at all (unreadable image without width/height): the box polygon is all we have.
        polygon = masks.box_polygon(bbox) if xyxy is not None else []
        area = float(bbox[2]) * float(bbox[3]) if xyxy is not None else 0
        result = {"segmentation": polygon, "area": area, "mal_score": score}
        if fallback:
            result["mal_fallback"] = fallback
        return result
    if xyxy is None:
        window = (0, 0, 0, 0)
    else:
        window = geometry.box_pixel_bounds(xyxy, hw)
    row0, row1, col0, col1 = window
    return box_result(np.ones((row1 - row0, col1 - col0), dtype=np.uint8), window, hw, score, fmt, fallback)


# --- the progress file ----------------------------------------------------------------------------


def progress_path_for(out: str | Path) -> Path:
    return Path(str(out) + PROGRESS_SUFFIX)


def read_progress(path: Path, fingerprint: str, truncate_torn: bool = True) -> tuple[dict, dict[int, int]]:
    """Header and {image position: byte offset of its line}. A torn last line is dropped (and cut off)."""
    offsets: dict[int, int] = {}
    header: dict = {}
    good_end = 0
    with open(path, "rb") as handle:
        offset = 0
        for line_number, line in enumerate(handle):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("torn")
                entry = orjson.loads(line)
            except (ValueError, orjson.JSONDecodeError):
                # Only the last line can be torn (the file is append-only); anything else is damage.
                rest = handle.read()
                if rest:
                    raise InputError(f"{path}: line {line_number + 1} is not valid JSON; delete the file to start over") from None
                break
            if line_number == 0:
                header = entry
                if header.get("mal_progress") != PROGRESS_VERSION:
                    raise InputError(f"{path} is not a mal label progress file")
                if header.get("fingerprint") != fingerprint:
                    raise InputError(
                        f"{path} was made from other input or options than this run; delete it to start over, "
                        f"or rerun with the same input and options"
                    )
            else:
                offsets[int(entry["image"])] = offset
            offset += len(line)
            good_end = offset
    if truncate_torn and good_end != path.stat().st_size:
        log.warning("%s: dropped a torn last line (the run was killed mid-write)", path)
        with open(path, "r+b") as handle:
            handle.truncate(good_end)
    return header, offsets


class ProgressWriter:
    """Appends one line per finished image; flushed per group, fsync'd every few seconds and at close."""

    def __init__(self, path: Path, header: Optional[dict]):
        self.path = path
        self.handle = open(path, "ab" if header is None else "wb")
        if header is not None:
            self.handle.write(orjson.dumps(header) + b"\n")
        self.last_sync = time.monotonic()

    def write(self, image_position: int, results: list[tuple[int, dict]]) -> None:
        self.write_line(orjson.dumps({"image": image_position, "results": results}))

    def write_line(self, line: bytes) -> None:
        """An already serialised `{"image": ..., "results": ...}` entry."""
        self.handle.write(line + b"\n")

    def flush(self) -> None:
        self.handle.flush()
        if time.monotonic() - self.last_sync > FSYNC_INTERVAL_S:
            os.fsync(self.handle.fileno())
            self.last_sync = time.monotonic()

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


class ProgressIndex:
    """Random access to the results in a progress file, with a small cache of parsed lines."""

    def __init__(self, path: Path, offsets: dict[int, int], cache_lines: int = 256):
        self.handle = open(path, "rb")
        self.offsets = offsets
        self.cache: OrderedDict[int, dict[int, dict]] = OrderedDict()
        self.cache_lines = cache_lines

    def results_of(self, image_position: int) -> dict[int, dict]:
        cached = self.cache.get(image_position)
        if cached is not None:
            self.cache.move_to_end(image_position)
            return cached
        self.handle.seek(self.offsets[image_position])
        entry = orjson.loads(self.handle.readline())
        results = {int(pos): result for pos, result in entry["results"]}
        self.cache[image_position] = results
        if len(self.cache) > self.cache_lines:
            self.cache.popitem(last=False)
        return results

    def close(self) -> None:
        self.handle.close()


# --- output -----------------------------------------------------------------------------------------


def _labelled_records(records: Iterator[list], keep: Optional[np.ndarray], record_image: np.ndarray, labelled: np.ndarray,
                      index: ProgressIndex) -> Iterator[bytes]:
    """The records (streamed again from the input, in order) that `keep` selects, with their results."""
    position = 0
    for chunk in records:
        for record in chunk:
            if keep is None or keep[position]:
                if labelled[position]:
                    result = index.results_of(int(record_image[position])).get(position)
                    if result is not None:
                        record = {k: v for k, v in record.items() if k != "mal_fallback"}
                        record.update(result)
                yield orjson.dumps(record)
            position += 1


def _write_json_array(handle, items: Iterator[bytes]) -> None:
    handle.write(b"[")
    for i, item in enumerate(items):
        if i:
            handle.write(b",")
        handle.write(item)
    handle.write(b"]")


def write_output(out: str, inp: LabelInput, labelled_records, shard_info: Optional[dict]) -> None:
    """Stream the labelled document to OUT (temp file + rename; '-' = stdout), keys in input order.

    The input is streamed again (`jsonstream.iter_document`): every entry is written as read, the records'
    array through `labelled_records(chunks) -> Iterator[bytes]`. The bytes equal what
    `write_json_atomic(out, document)` of the labelled document would write.
    """
    from mal_cli.jsonstream import iter_entries

    def emit(handle) -> None:
        entries = iter_entries(inp.path, ("images", "annotations"), inp.source)
        if inp.is_results:
            _, _, chunks = next(entries)
            if shard_info is not None:
                handle.write(b'{"mal_shard":' + orjson.dumps(shard_info) + b',"results":')
            _write_json_array(handle, labelled_records(chunks))
            if shard_info is not None:
                handle.write(b"}")
            return
        handle.write(b"{")
        for i, (kind, key, value) in enumerate(entries):
            handle.write((b"," if i else b"") + orjson.dumps(key) + b":")
            if kind == "value":
                handle.write(orjson.dumps(value))
            elif key == "annotations":
                _write_json_array(handle, labelled_records(value))
            else:
                _write_json_array(handle, (orjson.dumps(item) for chunk in value for item in chunk))
        if shard_info is not None:
            handle.write(b',"mal_shard":' + orjson.dumps(shard_info))
        handle.write(b"}")

    if out == "-":
        emit(sys.stdout.buffer)
        sys.stdout.buffer.write(b"\n")  # as `write_json_atomic` does: files without, stdout with a newline
        sys.stdout.buffer.flush()
        return
    target = Path(out)
    try:
        with atomic_write(target, buffering=1 << 20) as handle:
            emit(handle)
    except OSError as err:
        raise OutputError(f"{target}: cannot write: {err.strerror or err}") from None


# --- the run ------------------------------------------------------------------------------------------


def _fingerprint(inp: LabelInput, options: LabelOptions, shard: tuple[int, int], checkpoint: Optional[Path],
                 crop_plan=None, precision: Optional[str] = None) -> str:
    digest = hashlib.sha256()
    digest.update(inp.digest.encode())
    labels = {k: v for k, v in asdict(options).items()
              if k not in ("device", "workers", "checkpoint", "strict", "compile", "precision")}
    if precision is not None:  # the resolved one: `auto` may be bf16 on one machine and fp32 on another
        labels["precision"] = precision
    if checkpoint is not None:
        stat = checkpoint.stat()
        labels["checkpoint"] = [checkpoint.name, stat.st_size]
    if crop_plan is not None:  # the resolved plan, not only --crop-sizes: a default that changes between versions
        labels["plan"] = [crop_plan.sizes, crop_plan.decoder_scales]
    digest.update(orjson.dumps([labels, list(shard)], option=orjson.OPT_SORT_KEYS))
    return digest.hexdigest()


@dataclass
class LabelSummary:
    images: int = 0
    boxes: int = 0
    resumed_images: int = 0
    failed_images: int = 0  # unreadable images whose boxes got the image_error fallback
    fallbacks: dict = field(default_factory=dict)
    image_errors: list = field(default_factory=list)  # first few messages
    seconds: float = 0.0
    boxes_per_s: float = 0.0
    method: str = "mal"
    device: str = "cpu"
    precision: str = ""  # the one that ran ("" for --method box: no model)
    shard: str = "0/1"
    out: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        fallbacks = ", ".join(f"{k}: {v}" for k, v in sorted(self.fallbacks.items())) or "none"
        failed = f", {self.failed_images} unreadable images skipped" if self.failed_images else ""
        return (
            f"mal label: {self.images} images, {self.boxes} boxes ({self.resumed_images} images resumed{failed}), "
            f"fallbacks: {fallbacks}; {self.seconds:.1f} s, {self.boxes_per_s:.0f} boxes/s "
            f"[{self.method} on {self.device}{', ' + self.precision if self.precision else ''}, shard {self.shard}] -> {self.out}"
        )


def label(
    boxes: str,
    images_dir: str,
    out: str,
    options: LabelOptions,
    image_info: Optional[str] = None,
    shard: Optional[tuple[int, int]] = None,
    resume: bool = False,
    keep_progress: bool = False,
    progress_bar: bool = True,
) -> LabelSummary:
    """Label BOXES and write OUT (see the module docstring). Under torchrun, shards over the ranks and merges on rank 0."""
    options.validate()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shard is None and world > 1:
        return _label_distributed(boxes, images_dir, out, options, image_info, resume, keep_progress, progress_bar)
    return label_shard(boxes, images_dir, out, options, image_info, shard or (0, 1), resume, keep_progress, progress_bar)


def _load_predictor(options: LabelOptions, checkpoint: Path):
    from mal_cli.modeling.labeler import load_labeler
    from mal_cli.predictor import BoxPredictor

    model = load_labeler(checkpoint, use_teacher=options.teacher)
    predictor = BoxPredictor(model, device=options.device, threshold=options.threshold, flip=options.flip,
                             crop_sizes=options.crop_sizes, compile=options.compile, precision=options.precision)
    if predictor.device.type == "cuda" and predictor.device.index is not None:
        # cuda:N (a torchrun rank, or --device cuda:1) becomes this process's current device: page-locked
        # buffers and the loader's pin thread then use it, instead of opening a context on cuda:0.
        torch.cuda.set_device(predictor.device)
    return predictor


def label_shard(
    boxes: str,
    images_dir: str,
    out: str,
    options: LabelOptions,
    image_info: Optional[str] = None,
    shard: tuple[int, int] = (0, 1),
    resume: bool = False,
    keep_progress: bool = False,
    progress_bar: bool = True,
) -> LabelSummary:
    """One process's run: label shard K/N (0/1 = everything) of BOXES into OUT."""
    start = time.perf_counter()
    options.validate()
    from mal_cli.check import ensure_writable

    ensure_writable(out)  # a missing or read-only output folder fails now, before the model loads
    if boxes == "-" and image_info == "-":
        raise InputError("BOXES and --image-info cannot both be read from stdin")
    if resume and out == "-":
        raise InputError("--resume needs --out FILE (a run writing to stdout keeps no progress file to resume)")
    if not Path(images_dir).is_dir():
        raise InputError(f"--images {images_dir}: no such folder")
    inp = load_label_input(boxes, image_info)  # before the model: input errors come fast
    try:
        return _label_input(inp, images_dir, out, options, shard, resume, keep_progress, progress_bar, start)
    finally:
        inp.close()


def _label_input(inp: LabelInput, images_dir: str, out: str, options: LabelOptions, shard: tuple[int, int], resume: bool,
                 keep_progress: bool, progress_bar: bool, start: float) -> LabelSummary:
    checkpoint = None
    predictor = None
    if options.method == "mal":
        checkpoint = Path(options.checkpoint) if options.checkpoint else default_checkpoint()
        predictor = _load_predictor(options, checkpoint)

    jobs = plan_jobs(inp, images_dir, options.only_missing)
    groups = group_jobs(jobs, options.batch_size)
    k, n = shard
    my_groups = [g for gi, g in enumerate(groups) if gi % n == k]
    crop_plan = predictor.crop_plan if predictor else None
    run_precision = predictor.precision if predictor else None
    fingerprint = _fingerprint(inp, options, shard, checkpoint, crop_plan, run_precision)

    # Progress file: beside OUT, or a temp file when writing to stdout.
    if out == "-":
        fd, tmp = tempfile.mkstemp(prefix="mal-label-", suffix=PROGRESS_SUFFIX)
        os.close(fd)
        progress_path = Path(tmp)
    else:
        progress_path = progress_path_for(out)
    done: dict[int, int] = {}
    if progress_path.exists() and out != "-":
        if not resume:
            raise InputError(
                f"{progress_path} exists from an earlier, unfinished run: rerun with --resume to continue it, "
                f"or delete it to start over"
            )
        _, done = read_progress(progress_path, fingerprint)
    header = {"mal_progress": PROGRESS_VERSION, "fingerprint": fingerprint, "records": inp.num_records, "shard": [k, n],
              "source": inp.source}
    writer = ProgressWriter(progress_path, None if done else header)

    summary = LabelSummary(method=options.method, shard=f"{k}/{n}", out=out,
                           device=str(predictor.device) if predictor else "cpu", precision=run_precision or "")
    todo_jobs = [job for g in my_groups if not all(j.position in done for j in g) for job in g]
    todo_groups = [g for g in my_groups if not all(j.position in done for j in g)]
    summary.resumed_images = sum(len(g) for g in my_groups) - len(todo_jobs)
    fallbacks: Counter = Counter()
    try:
        try:
            _run_groups(todo_groups, todo_jobs, done, predictor, options, writer, summary, fallbacks, progress_bar)
        finally:
            writer.close()
    except OSError as err:  # disk full, quota, file too large: keep what is on disk, say how to go on
        raise OutputError(
            f"{progress_path}: cannot write progress ({err.strerror or err}); free space and rerun with --resume"
        ) from None

    # Write OUT from the progress file: this shard's images' records, in input order.
    _, offsets = read_progress(progress_path, fingerprint)
    my_positions_set = {j.position for g in my_groups for j in g}
    labelled = np.zeros(inp.num_records, dtype=bool)  # records this run has a result for
    for g in my_groups:
        for j in g:
            labelled[j.record_positions] = True
    if n == 1:
        keep = None
        shard_info = None
    else:
        # Shards keep only their images' records; records of images with nothing to label go to shard 0.
        image_shard = np.zeros(len(inp.image_names), dtype=np.int64)
        for gi, g in enumerate(groups):
            for j in g:
                image_shard[j.position] = gi % n
        keep = image_shard[inp.record_image] == k
        shard_info = {"index": k, "count": n, "fingerprint": _fingerprint(inp, options, (0, 1), checkpoint, crop_plan, run_precision),
                      "records": inp.num_records, "positions": np.flatnonzero(keep).tolist()}
    if not my_positions_set <= set(offsets):  # cannot happen unless the progress file was edited meanwhile
        raise OutputError(f"{progress_path}: images missing after the run; rerun with --resume")
    inp.ensure_unchanged()
    index = ProgressIndex(progress_path, offsets)
    try:
        write_output(out, inp, lambda chunks: _labelled_records(chunks, keep, inp.record_image, labelled, index), shard_info)
    finally:
        index.close()
    if out == "-" or not keep_progress:
        progress_path.unlink(missing_ok=True)

    summary.images = len(my_positions_set)
    summary.fallbacks = dict(fallbacks)
    summary.seconds = round(time.perf_counter() - start, 3)
    labelled = summary.boxes
    summary.boxes_per_s = round(labelled / summary.seconds, 1) if summary.seconds > 0 else 0.0
    return summary


def auto_workers(predictor) -> int:
    """Default --workers: 0 when the model runs on a CPU of at most 4 cores; on a GPU, about half the cores
    (at most 8); else 2.

    On a small CPU the model already keeps every core busy; worker processes only take turns with it
    (measured on 2 cores: 139 s with 0 workers vs 145 s with 2, same output). On a GPU the workers feed it:
    decode + crop cost ~1 ms of CPU per box, so 2,000 boxes/s needs several (the other half of the cores
    is left to the post-processing pool and the main process).
    """
    cores = len(os.sched_getaffinity(0))
    if predictor is not None and predictor.device.type == "cpu" and cores <= 4:
        return 0
    if predictor is not None and predictor.device.type == "cuda":
        return max(2, min(8, (cores - 2) // 2))
    return 2


def _run_groups(groups, jobs, done, predictor, options, writer, summary, fallbacks, progress_bar) -> None:
    """Label `groups` (their images in order `jobs`), writing one progress line per unfinished image."""
    from tqdm import tqdm

    need_pixels = predictor is not None
    margins = predictor.margins if predictor else geometry.Margins.uniform()
    dataset = _GroupCropDataset(groups, need_pixels, predictor.crop_plan if predictor else None, margins)
    # Box method with recorded sizes decodes nothing: no worker processes worth starting.
    n_workers = auto_workers(predictor) if options.workers is None else options.workers
    workers = n_workers if (need_pixels or any(j.recorded_hw is None for j in jobs)) else 0
    workers = min(workers, len(groups))
    # A group is ~batch_size boxes: two in flight a worker keep the model fed and bound the shared memory.
    # For a GPU the loader's pin thread page-locks the crops, so their copy to the device is asynchronous.
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
        prefetch_factor=2 if workers else None, persistent_workers=False,
        pin_memory=predictor is not None and predictor.device.type == "cuda",
    )
    total_boxes = sum(j.num_boxes for j in jobs)
    bar = tqdm(total=total_boxes, unit="box", file=sys.stderr, disable=not progress_bar or None, dynamic_ncols=True,
               desc="mal label")
    # Post-processing pool (paste, threshold, score, RLE, JSON): only with the model; forked before the loader.
    pool = None
    if predictor is not None and n_workers > 0 and len(jobs) > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(min(n_workers, len(jobs)))
    results = _ResultDispatch(predictor, options, done, pool, writer, summary, fallbacks, bar)
    # One group in flight on the device: group i is submitted before group i - 1's results are dispatched,
    # so on a GPU the model runs while this process hands out the previous batch's paste/RLE.
    in_flight = None
    items = iter(loader)
    for group in groups:
        batch: LoadedGroup = next(items)
        probs = None
        if predictor is not None and batch.crops is not None:
            probs = predictor.submit_crops(batch.crops, batch.box_areas, options.batch_size)
        if in_flight is not None:
            results.dispatch(*in_flight)
        in_flight = (group, batch, probs)
    if in_flight is not None:
        results.dispatch(*in_flight)
    results.drain()
    if pool is not None:
        pool.close()
        pool.join()
    bar.close()


class _ResultDispatch:
    """Turns a group's model output into per-image tasks (paste, threshold, score, RLE, JSON) and writes
    their progress lines strictly in input order, so the progress file is the same with or without a pool."""

    def __init__(self, predictor, options, done, pool, writer, summary, fallbacks, bar):
        self.use_model = predictor is not None
        self.threshold = predictor.threshold if predictor else 0.5
        self.options, self.done, self.pool = options, done, pool
        self.writer, self.summary, self.fallbacks, self.bar = writer, summary, fallbacks, bar
        self.pending: deque = deque()
        self.pending_boxes = 0
        self.max_pending_boxes = 4 * options.batch_size
        self.task_boxes = max(1, options.batch_size // 4)  # ~16 tasks in flight: work for every pool process
        self.images_done = 0

    def dispatch(self, group: Sequence[ImageJob], batch: LoadedGroup, probs) -> None:
        """`probs`: the group's `PendingProbs` (None without model boxes); waited for here."""
        probs_by_image: dict[int, np.ndarray] = {}
        if probs is not None:
            # Fixed-order batching: the group's model boxes, image by image.
            probs_np = probs.result().numpy()
            start = 0
            for item in batch.images:
                probs_by_image[item.job_index] = probs_np[start : start + len(item.model_boxes)]
                start += len(item.model_boxes)
        tasks, task_boxes = [], 0
        for job, item in zip(group, batch.images):
            n_boxes = job.num_boxes
            if job.position in self.done:  # finished before a crash; its batch-mates needed it recomputed
                self.bar.update(n_boxes)
                continue
            if item.error and self.options.strict:  # every image before it is written first, to resume from
                if tasks:
                    self._submit(tasks, task_boxes)
                self.drain()
                raise InputError(
                    f"{item.error} (--strict: stopped; the images before it are kept in {self.writer.path}: fix the "
                    f"image and rerun with --resume, or drop --strict to label its boxes with flagged fallbacks)"
                )
            if item.error:
                self._count_image_error(item.error)
            tasks.append((job.position, job.record_positions.tolist(), job.boxes_xywh.tolist(), item.hw, item.error,
                          item.model_boxes, item.regions, probs_by_image.get(item.job_index), self.use_model,
                          self.threshold, self.options.format))
            task_boxes += n_boxes
            # Paste + RLE run in the post-processing pool (if any), in parallel with the model, a few images
            # a task: a task per image cost this process ~0.4 ms more of pickling and pipe work (0.19 -> 0.14 ms a box).
            if task_boxes >= self.task_boxes:
                self._submit(tasks, task_boxes)
                tasks, task_boxes = [], 0
        if tasks:
            self._submit(tasks, task_boxes)
        self.writer.flush()
        self.bar.set_postfix(images=self.images_done, refresh=False)

    def _submit(self, tasks: list, n_boxes: int) -> None:
        result = self.pool.apply_async(_images_results, (tasks,)) if self.pool else _Done(_images_results(tasks))
        self.pending.append((n_boxes, result))
        self.pending_boxes += n_boxes
        while self.pending and (self.pending_boxes > self.max_pending_boxes or self.pending[0][1].ready()):
            self._write_next()

    def drain(self) -> None:
        while self.pending:
            self._write_next()
        self.writer.flush()

    def _count_image_error(self, error: str) -> None:
        self.summary.failed_images += 1
        if len(self.summary.image_errors) < 10:
            self.summary.image_errors.append(error)
        log.warning("image error, boxes get the filled-box fallback: %s", error)

    def _write_next(self) -> None:
        n_boxes, result = self.pending.popleft()
        for line, image_fallbacks in result.get():
            self.writer.write_line(line)
            self.fallbacks.update(image_fallbacks)
            self.images_done += 1
        self.summary.boxes += n_boxes
        self.bar.update(n_boxes)
        self.pending_boxes -= n_boxes


class _Done:
    """A finished result with the `AsyncResult` interface (post-processing inline, no pool)."""

    def __init__(self, value):
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self):
        return self.value


def _images_results(tasks: list) -> list[tuple[bytes, dict]]:
    return [_image_results(*task) for task in tasks]


def _image_results(position, record_positions, boxes_xywh, hw, error, model_boxes, regions, probs, use_model, threshold,
                   fmt) -> tuple[bytes, dict]:
    """One image's progress line (every box's result: model mask, filled box, or a flagged fallback) and its fallbacks."""
    if use_model:
        from mal_cli.predictor import paste_prob  # imports timm: not for --method box

    model_of_box = dict(zip(model_boxes, range(len(model_boxes))))
    results = []
    fallbacks: dict[str, int] = {}
    for i, (rec_pos, bbox) in enumerate(zip(record_positions, boxes_xywh)):
        if error:
            result = filled_box_result(bbox, hw, fmt, "image_error", FALLBACK_SCORE)
        elif _box_xyxy(bbox) is None or (use_model and i not in model_of_box):
            result = filled_box_result(bbox, hw, fmt, "degenerate_box", FALLBACK_SCORE)
        elif not use_model:
            xyxy = _box_xyxy(bbox)
            window = geometry.box_pixel_bounds(xyxy, hw)
            if window[1] <= window[0] or window[3] <= window[2]:
                result = filled_box_result(bbox, hw, fmt, "degenerate_box", FALLBACK_SCORE)
            else:
                result = filled_box_result(bbox, hw, fmt, None, BOX_METHOD_SCORE)
        else:
            k = model_of_box[i]
            pred = paste_prob(probs[k], _box_xyxy(bbox), regions[k], hw, threshold)
            score = mask_quality(pred.window_prob, threshold)
            result = box_result(pred.window_mask, pred.window, hw, score, fmt)
        if "mal_fallback" in result:
            fallbacks[result["mal_fallback"]] = fallbacks.get(result["mal_fallback"], 0) + 1
        results.append((rec_pos, result))
    return orjson.dumps({"image": position, "results": results}), fallbacks


def _label_distributed(boxes, images_dir, out, options, image_info, resume, keep_progress, progress_bar) -> LabelSummary:
    """torchrun: rank R labels shard R/W into OUT.shard-R-of-W.json; rank 0 merges them into OUT."""
    import datetime

    import torch.distributed as dist

    from mal_cli.merge import merge_files

    if out == "-":
        raise InputError("under torchrun --out must be a file (the ranks write shard files beside it)")
    if boxes == "-":
        raise InputError("under torchrun BOXES must be a file (every rank reads it)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if options.device in ("auto", "cuda") and torch.cuda.is_available():
        options.device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        # Only barriers and small objects travel: gloo everywhere, with a timeout long enough for a big shard.
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    part = f"{out}.shard-{rank}-of-{world}.json"
    summary = label_shard(boxes, images_dir, part, options, image_info, (rank, world), resume, keep_progress,
                          progress_bar and rank == 0)
    summaries: list = [None] * world
    dist.all_gather_object(summaries, summary.to_dict())
    if rank == 0:
        parts = [f"{out}.shard-{r}-of-{world}.json" for r in range(world)]
        merge_files(parts, out)
        for p in parts:
            Path(p).unlink(missing_ok=True)
        total = LabelSummary(**summaries[0])
        for other in summaries[1:]:
            total.images += other["images"]
            total.boxes += other["boxes"]
            total.resumed_images += other["resumed_images"]
            total.failed_images += other.get("failed_images", 0)
            for key, v in other["fallbacks"].items():
                total.fallbacks[key] = total.fallbacks.get(key, 0) + v
            total.image_errors += other["image_errors"]
            total.seconds = max(total.seconds, other["seconds"])
        total.boxes_per_s = round(total.boxes / total.seconds, 1) if total.seconds > 0 else 0.0
        total.shard = f"torchrun x{world}"
        total.out = out
        summary = total
    dist.barrier()
    dist.destroy_process_group()
    return summary

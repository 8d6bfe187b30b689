"""One `mal label` run: read and check BOXES, plan the groups, label the unfinished ones into the progress file,
then write OUT from it. `label()` is the public entry point (it shards over torchrun ranks when there are any)."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import orjson

from mal_cli.errors import InputError, Interrupted, OutputError
from mal_cli.labeling.dispatch import run_groups
from mal_cli.labeling.index import BoxIndex, read_boxes
from mal_cli.labeling.options import SPEED_OPTIONS, LabelOptions, default_checkpoint
from mal_cli.labeling.output import labelled_records, write_output
from mal_cli.labeling.plan import group_jobs, plan_jobs, require_some_images, shard_groups, shard_records
from mal_cli.labeling.progress import (
    PROGRESS_SUFFIX,
    ProgressIndex,
    ProgressWriter,
    progress_header,
    progress_path_for,
    read_progress,
)
from mal_cli.safe_paths import held_by_live_run, lock_for_run, open_append, open_exclusive, write_error


def fingerprint(
    index: BoxIndex,
    options: LabelOptions,
    shard: tuple[int, int],
    checkpoint: Optional[Path],
    crop_plan=None,
    precision: Optional[str] = None,
) -> str:
    """What the results depend on: the input, the options that change labels, the checkpoint, the plan, the shard."""
    digest = hashlib.sha256()
    digest.update(index.digest.encode())
    labels = {k: v for k, v in asdict(options).items() if k not in SPEED_OPTIONS}
    if checkpoint is not None:
        stat = checkpoint.stat()
        labels["checkpoint"] = [checkpoint.name, stat.st_size]
    if precision is not None:  # the resolved one: bf16 and fp32 give different bytes
        labels["precision"] = precision
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
    replaced: int = 0  # records that had a segmentation and got a new one (not --only-missing)
    below_min_score: int = 0  # detections left out by --min-score

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.fallbacks.items()))
        fallbacks = f"{sum(self.fallbacks.values())} boxes got fallbacks ({kinds})" if kinds else "no fallbacks"
        failed = f", {self.failed_images} unreadable images skipped" if self.failed_images else ""
        below = f", {self.below_min_score} below --min-score left out" if self.below_min_score else ""
        shard = f", shard {self.shard}" if self.shard != "0/1" else ""
        precision = f", {self.precision}" if self.precision else ""
        return (
            f"mal label: {self.images} images, {self.boxes} boxes ({self.resumed_images} images resumed{failed}"
            f"{below}), {fallbacks}; {self.seconds:.1f} s, {self.boxes_per_s:.1f} boxes/s "
            f"[{self.method} on {self.device}{precision}{shard}] -> {self.out}"
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
    """Label BOXES and write OUT. Under torchrun, shards over the ranks and merges on rank 0."""
    options.validate()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shard is None and world > 1:
        from mal_cli.labeling.distributed import label_distributed

        return label_distributed(boxes, images_dir, out, options, image_info, resume, keep_progress, progress_bar)
    return label_shard(
        boxes, images_dir, out, options, image_info, shard or (0, 1), resume, keep_progress, progress_bar
    )


def load_predictor(options: LabelOptions, checkpoint: Path):
    import torch

    from mal_cli.modeling.labeler import load_labeler
    from mal_cli.predictor import BoxPredictor

    model = load_labeler(checkpoint, use_teacher=options.teacher)
    predictor = BoxPredictor(
        model,
        device=options.device,
        threshold=options.threshold,
        flip=options.flip,
        crop_sizes=options.crop_sizes,
        compile=options.compile,
        precision=options.precision,
    )
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
    from mal_cli.probes import ensure_writable

    ensure_writable(out)  # a missing or read-only output folder fails now, before the model loads
    if boxes == "-" and image_info == "-":
        raise InputError("BOXES and --image-info cannot both be read from stdin")
    if resume and out == "-":
        raise InputError("--resume needs --out FILE (a run writing to stdout keeps no progress file to resume)")
    if not Path(images_dir).is_dir():
        raise InputError(f"--images {images_dir}: no such folder")
    index = read_boxes(boxes, image_info)  # before the model: input errors come fast
    try:
        return _label_index(index, images_dir, out, options, shard, resume, keep_progress, progress_bar, start)
    finally:
        index.close()


def _open_progress(out: str, resume: bool, fingerprint_: str, header: dict) -> tuple[ProgressWriter, dict[int, int]]:
    """The progress file (beside OUT, or a temp file when writing to stdout) and the images it already holds.

    Opened without following a planted link (O_EXCL when new, O_NOFOLLOW when resumed) and locked for the run,
    so a second run writing the same OUT is told so instead of interleaving lines."""
    if out == "-":
        fd, tmp = tempfile.mkstemp(prefix="mal-label-", suffix=PROGRESS_SUFFIX)
        return ProgressWriter(Path(tmp), header, os.fdopen(fd, "wb")), {}
    progress_path = progress_path_for(out)
    if os.path.islink(progress_path):
        raise write_error(OSError(errno.ELOOP, "symbolic link"), progress_path)
    done: dict[int, int] = {}
    try:
        if os.path.lexists(progress_path):  # lexists: a dangling planted link counts too
            if held_by_live_run(progress_path):
                raise InputError(f"another mal label run is writing {out} now; wait for it or choose another --out")
            if not resume:
                raise InputError(
                    f"{progress_path} exists from an earlier, unfinished run: rerun with --resume to continue it, "
                    f"or delete it to start over"
                )
            fd = open_append(progress_path)
            try:
                _, done = read_progress(progress_path, fingerprint_)
            except BaseException:
                os.close(fd)
                raise
        else:
            fd = open_exclusive(progress_path)
    except FileExistsError:  # created between the check and the open: another run started just now
        raise InputError(f"another mal label run is writing {out} now; wait for it or choose another --out") from None
    except OSError as err:
        raise write_error(err, progress_path) from None
    try:
        lock_for_run(fd)
    except (BlockingIOError, PermissionError):  # lockf says EAGAIN or EACCES when another process holds it
        os.close(fd)
        raise InputError(f"another mal label run is writing {out} now; wait for it or choose another --out") from None
    if done:
        return ProgressWriter(progress_path, None, os.fdopen(fd, "ab")), done
    if os.fstat(fd).st_size:  # resumed a file without finished images: start it over from its header
        os.ftruncate(fd, 0)
    return ProgressWriter(progress_path, header, os.fdopen(fd, "ab")), done


def _label_index(
    index: BoxIndex,
    images_dir: str,
    out: str,
    options: LabelOptions,
    shard: tuple[int, int],
    resume: bool,
    keep_progress: bool,
    progress_bar: bool,
    start: float,
) -> LabelSummary:
    # The plan first: its file_name and image-size errors come before the model loads.
    left_out = index.below_min_score(options.min_score)
    jobs = plan_jobs(index, images_dir, options.only_missing, options.allow_outside_images, left_out)
    require_some_images(jobs, images_dir, index.source)
    groups = group_jobs(jobs, options.batch_size)
    checkpoint = predictor = None
    if options.method == "mal":
        checkpoint = Path(options.checkpoint) if options.checkpoint else default_checkpoint()
        predictor = load_predictor(options, checkpoint)
    my_groups = shard_groups(groups, shard)
    crop_plan = predictor.crop_plan if predictor else None
    run_precision = predictor.precision if predictor else None
    this_fingerprint = fingerprint(index, options, shard, checkpoint, crop_plan, run_precision)
    header = progress_header(this_fingerprint, index.num_records, shard, index.source, index.records_digest)
    writer, done = _open_progress(out, resume, this_fingerprint, header)

    summary = LabelSummary(
        method=options.method,
        shard=f"{shard[0]}/{shard[1]}",
        out=out,
        device=str(predictor.device) if predictor else "cpu",
        precision=run_precision or "",
    )
    my_jobs = [job for g in my_groups for job in g]
    todo_groups = [g for g in my_groups if not all(j.position in done for j in g)]
    summary.resumed_images = len(my_jobs) - sum(len(g) for g in todo_groups)
    fallbacks: Counter = Counter()
    try:
        try:
            run_groups(todo_groups, done, predictor, options, writer, summary, fallbacks, progress_bar)
        finally:
            writer.close()
    except OSError as err:  # disk full, quota, file too large: keep what is on disk, say how to go on
        raise OutputError(
            f"{writer.path}: cannot write progress ({err.strerror or err}); free space and rerun with --resume"
        ) from None
    except KeyboardInterrupt:  # Ctrl-C: the finished images are on disk (the writer is closed), say so
        raise _interrupted(out, writer, done, len(my_jobs)) from None
    shard_info = None
    if shard[1] > 1:
        shard_info = {
            "index": shard[0],
            "count": shard[1],
            "fingerprint": fingerprint(index, options, (0, 1), checkpoint, crop_plan, run_precision),
        }
    has_result = np.zeros(index.num_records, dtype=bool)  # records this run has a result for
    for job in my_jobs:
        has_result[job.record_positions] = True
    mine = shard_records(index, groups, shard) if shard[1] > 1 else None  # records this shard writes (None: all)
    _write_from_progress(out, index, writer.path, this_fingerprint, my_jobs, has_result, mine, shard_info, left_out)
    if out == "-" or not keep_progress:
        writer.path.unlink(missing_ok=True)

    summary.images = len(my_jobs)
    summary.replaced = int((index.record_has_segmentation & has_result).sum())
    summary.below_min_score = int((left_out if mine is None else left_out & mine).sum())
    summary.fallbacks = dict(fallbacks)
    summary.seconds = round(time.perf_counter() - start, 3)
    summary.boxes_per_s = round(summary.boxes / summary.seconds, 1) if summary.seconds > 0 else 0.0
    return summary


def _interrupted(out: str, writer: ProgressWriter, done: dict, total: int) -> Interrupted:
    finished = f"interrupted; {len(done) + writer.lines} of {total} images done"
    if out == "-":  # its progress file is a temp file: nothing to resume
        writer.path.unlink(missing_ok=True)
        return Interrupted(f"{finished} (a run writing to stdout cannot be resumed: rerun it)")
    return Interrupted(f"{finished} — rerun the same command with --resume")


def _write_from_progress(
    out: str,
    index: BoxIndex,
    progress_path: Path,
    fingerprint_: str,
    my_jobs: list,
    has_result: np.ndarray,
    mine: Optional[np.ndarray],
    shard_info: Optional[dict],
    left_out: np.ndarray,
) -> None:
    """Write OUT from the progress file: the records `mine` selects (a shard's; None: all), in input order, less
    `left_out` (a shard's positions count the records written, so the shards of a --min-score run still merge into
    one). `has_result`: the records of `my_jobs`, the images this run labelled."""
    _, offsets = read_progress(progress_path, fingerprint_)
    keep = ~left_out if left_out.any() else None
    if mine is not None:
        written = ~left_out
        position_written = np.cumsum(written) - 1  # a record's position among the written ones
        keep = mine & written
        shard_info.update(records=int(written.sum()), positions=position_written[keep].tolist())
    if not {j.position for j in my_jobs} <= set(offsets):  # only if the file was edited meanwhile
        raise OutputError(f"{progress_path}: images missing after the run; rerun with --resume")
    index.ensure_unchanged()
    results = ProgressIndex(progress_path, offsets)
    try:
        write_output(
            out,
            index,
            lambda chunks: labelled_records(chunks, keep, index.record_image, has_result, results),
            shard_info,
        )
    finally:
        results.close()

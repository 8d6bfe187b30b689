"""The labelling loop: groups of images go through the loader, the model (one group in flight on the device) and
the post-processing (a process pool when there are workers), and each finished image's results are written to
the progress file strictly in input order, so the file is the same with or without a pool."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections import Counter, deque
from typing import Sequence

from mal_cli.errors import InputError
from mal_cli.labeling.loader import GroupCropDataset, LoadedGroup, iter_groups
from mal_cli.labeling.plan import ImageJob
from mal_cli.labeling.postprocess import ImageTask, results_of_tasks

log = logging.getLogger("mal_cli.labeling")
MAX_IMAGE_WARNINGS = 5  # per-image warnings printed; the rest are counted in one line


def auto_workers(predictor) -> int:
    """Default --workers: 0 when the model runs on a CPU of at most 4 cores (the model already keeps every core
    busy); on a GPU, about half the cores (at most 8: they feed it); else 2."""
    cores = len(os.sched_getaffinity(0))
    if predictor is not None and predictor.device.type == "cpu" and cores <= 4:
        return 0
    if predictor is not None and predictor.device.type == "cuda":
        return max(2, min(8, (cores - 2) // 2))
    return 2


def run_groups(groups, done, predictor, options, writer, summary, fallbacks: Counter, progress_bar) -> None:
    """Label `groups` of images, writing one progress line per unfinished image."""
    from tqdm import tqdm

    jobs = [job for group in groups for job in group]
    need_pixels = predictor is not None
    margins = predictor.margins if predictor else None  # no model: no crop regions
    dataset = GroupCropDataset(groups, need_pixels, predictor.crop_plan if predictor else None, margins)
    # Box method with recorded sizes decodes nothing: no worker processes worth starting.
    n_workers = auto_workers(predictor) if options.workers is None else options.workers
    workers = n_workers if (need_pixels or any(j.recorded_hw is None for j in jobs)) else 0
    workers = min(workers, len(groups))
    items = iter_groups(dataset, workers, pin_memory=predictor is not None and predictor.device.type == "cuda")
    bar = tqdm(
        total=sum(j.num_boxes for j in jobs),
        unit="box",
        file=sys.stderr,
        disable=not progress_bar or None,
        dynamic_ncols=True,
        desc="mal label",
    )
    # Post-processing pool (paste, threshold, score, RLE, JSON): only with the model; forked before the loader.
    pool = None
    if predictor is not None and n_workers > 0 and len(jobs) > 1:
        import multiprocessing

        # Ctrl-C reaches the whole process group: the pool leaves it to this process (no traceback per worker).
        pool = multiprocessing.get_context("fork").Pool(
            min(n_workers, len(jobs)), initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)
        )
    results = ResultDispatch(predictor, options, done, pool, writer, summary, fallbacks, bar)
    # One group in flight on the device: group i is submitted before group i - 1's results are dispatched,
    # so on a GPU the model runs while this process hands out the previous batch's paste/RLE.
    in_flight = None
    try:
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
        results.finish()
    except BaseException:  # Ctrl-C, --strict, a full disk: keep what is written, let the workers finish
        # Not pool.terminate(): a worker killed while it holds the result queue's lock deadlocks the pool's
        # threads (seen as a hang after Ctrl-C). The workers ignore SIGINT and hold a few images' work at most.
        if pool is not None:
            pool.close()
            pool.join()
        raise
    finally:
        items.close()
        bar.close()
    if pool is not None:
        pool.close()
        pool.join()


class ResultDispatch:
    """Turns a group's model output into per-image tasks and writes their progress lines in input order."""

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

    def _probs_by_image(self, batch: LoadedGroup, probs) -> dict:
        """The group's model probabilities split image by image (fixed-order batching)."""
        by_image = {}
        if probs is not None:
            probs_np = probs.result().numpy()
            start = 0
            for item in batch.images:
                by_image[item.job_index] = probs_np[start : start + item.num_model_boxes]
                start += item.num_model_boxes
        return by_image

    def dispatch(self, group: Sequence[ImageJob], batch: LoadedGroup, probs) -> None:
        """`probs`: the group's `PendingProbs` (None without model boxes); waited for here."""
        probs_by_image = self._probs_by_image(batch, probs)
        tasks, task_boxes = [], 0
        for job, item in zip(group, batch.images):
            if job.position in self.done:  # finished before a crash; its batch-mates needed it recomputed
                self.bar.update(job.num_boxes)
                continue
            if item.error and self.options.strict:  # every image before it is written first, to resume from
                if tasks:
                    self._submit(tasks)
                self.drain()
                raise InputError(
                    f"{item.error} (--strict: stopped; the images before it are kept in {self.writer.path}: fix the "
                    f"image and rerun with --resume, or drop --strict to label its boxes with flagged fallbacks)"
                )
            if item.error:
                self._count_image_error(item.error)
            tasks.append(
                ImageTask.of(job, item, probs_by_image.get(item.job_index), self.threshold, self.options.format)
            )
            task_boxes += job.num_boxes
            # A few images a task: a task per image costs this process more pickling and pipe work.
            if task_boxes >= self.task_boxes:
                self._submit(tasks)
                tasks, task_boxes = [], 0
        if tasks:
            self._submit(tasks)
        self.writer.flush()
        self.bar.set_postfix(images=self.images_done, refresh=False)

    def _submit(self, tasks: list) -> None:
        result = self.pool.apply_async(results_of_tasks, (tasks,)) if self.pool else _Done(results_of_tasks(tasks))
        image_boxes = [len(t.record_positions) for t in tasks]
        self.pending.append((image_boxes, result))
        self.pending_boxes += sum(image_boxes)
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
        if self.summary.failed_images <= MAX_IMAGE_WARNINGS:  # a wrong folder must not flood the terminal
            log.warning("image error, boxes get the filled-box fallback: %s", error)

    def finish(self) -> None:
        more = self.summary.failed_images - MAX_IMAGE_WARNINGS
        if more > 0:
            log.warning("...and %d more images could not be read", more)

    def _write_next(self) -> None:
        image_boxes, result = self.pending.popleft()
        for (line, image_fallbacks), boxes in zip(result.get(), image_boxes):
            self.writer.write_line(line)
            self.fallbacks.update(image_fallbacks)
            self.images_done += 1
            self.bar.update(boxes)  # per image: the bar's rate follows the work, not the task chunks
        n_boxes = sum(image_boxes)
        self.summary.boxes += n_boxes
        self.pending_boxes -= n_boxes


class _Done:
    """A finished result with the `AsyncResult` interface (post-processing inline, no pool)."""

    def __init__(self, value):
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self):
        return self.value

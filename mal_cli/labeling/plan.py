"""The plan: which images are labelled, packed into groups (the unit of work, of resuming and of sharding).

Images (in input order, those with boxes to label) are packed into groups of at most `batch_size` boxes (an
image with more boxes is a group of its own, run in chunks of `batch_size`). Boxes are batched in a fixed
order that depends only on the input and `--batch-size`, so a box always meets the same batch-mates: a
resumed, a sharded or a torchrun run gives the same bytes as one uninterrupted run. `--shard K/N` labels
the groups g with g % N == K.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mal_cli.errors import InputError
from mal_cli.labeling.index import BoxIndex


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


def plan_jobs(
    index: BoxIndex,
    images_dir: str | Path,
    only_missing: bool,
    allow_outside: bool = False,
    left_out: Optional[np.ndarray] = None,
) -> list[ImageJob]:
    """Every image with at least one box to label, in input image order. Its file_name must stay under
    `images_dir` (unless `allow_outside`) and its declared size within the pixel budget: both are refused
    here, before anything is decoded or allocated from them. `left_out`: records not to label (`--min-score`)."""
    from mal_cli.images import check_pixel_budget
    from mal_cli.safe_paths import image_path

    wanted = ~index.record_has_segmentation if only_missing else np.ones(index.num_records, dtype=bool)
    records = np.flatnonzero(wanted if left_out is None else wanted & ~left_out)
    images = index.record_image[records]
    order = np.argsort(images, kind="stable")  # by image; input order within an image
    records, images = records[order], images[order]
    starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]]) if len(images) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(images)]
    jobs = []
    for start, end in zip(starts.tolist(), ends.tolist()):
        position = int(images[start])
        where = f"{index.source}: image id {_image_id(index, position)}"
        hw = index.image_hw[position]
        if hw is not None:
            hw = check_pixel_budget(hw[0], hw[1], where)
        jobs.append(
            ImageJob(
                position,
                str(image_path(images_dir, index.image_names[position], where, allow_outside)),
                hw,
                records[start:end],
                index.record_bbox,
            )
        )
    return jobs


def require_some_images(jobs: Sequence[ImageJob], images_dir: str | Path, source: str) -> None:
    """None of the images to label there is a wrong --images folder: InputError before any work. Stats images
    until one exists; a missing one is found again by the loader (an image_error fallback, or a --strict stop)."""
    if jobs and not any(os.path.exists(job.path) for job in jobs):
        raise InputError(
            f"--images {images_dir}: none of the {len(jobs)} images of {source} are there "
            f"(e.g. {jobs[0].path}); is it the right folder?"
        )


def _image_id(index: BoxIndex, position: int):
    return index.image_ids[position] if position < len(index.image_ids) else position


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


def shard_groups(groups: list[list[ImageJob]], shard: tuple[int, int]) -> list[list[ImageJob]]:
    k, n = shard
    return [g for gi, g in enumerate(groups) if gi % n == k]


def shard_records(index: BoxIndex, groups: list[list[ImageJob]], shard: tuple[int, int]) -> np.ndarray:
    """Which records shard K/N writes: its images' records (records of images with nothing to label: shard 0)."""
    k, n = shard
    image_shard = np.zeros(len(index.image_names), dtype=np.int64)
    for gi, g in enumerate(groups):
        for j in g:
            image_shard[j.position] = gi % n
    return image_shard[index.record_image] == k

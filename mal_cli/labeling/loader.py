"""Image loading and cropping, in DataLoader workers (in parallel with the model): each group's images are
decoded once, which boxes are labellable and each one's crop region decided once (carried to the
post-processing), and the crops of the model boxes joined per crop size.

torch is imported only where crops are made: `--method box` runs this module without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from mal_cli.labeling.plan import ImageJob
from mal_cli.pixels import Margins, box_area, box_pixel_bounds, box_xyxy, crop_region, window_is_empty


@dataclass
class LoadedImage:
    job_index: int  # position of the image within its group
    hw: Optional[tuple[int, int]]
    error: Optional[str]
    model_index: list[int]  # per box: its row among the image's labellable boxes, -1 when it covers no pixel
    regions: list[tuple[float, float, float, float]]  # per labellable box: its crop region (model runs only)
    box_areas: list[float]  # per labellable box: its area (picks its route; model runs only)

    @property
    def num_model_boxes(self) -> int:
        return len(self.regions)


@dataclass
class LoadedGroup:
    """A group's images, and the crops of all their model boxes joined per crop size (image by image)."""

    images: list[LoadedImage]
    crops: Any  # predictor.BoxCrops, or None when no box goes to the model
    box_areas: Any  # torch (len(crops),) float32, or None without crops

    def pin_memory(self) -> "LoadedGroup":  # called by the DataLoader's pin thread (GPU runs)
        return LoadedGroup(self.images, self.crops.pin_memory() if self.crops is not None else None, self.box_areas)


def _decode(
    job: ImageJob, reduce: int = 1
) -> tuple[Optional[tuple[int, int]], Optional[str], Optional[np.ndarray], float]:
    """The image, its size, an error message (errors become a value, never an exception) and the scale its pixels
    were decoded at (`images.load_rgb_reduced`: a JPEG may decode at 1/`reduce` of its size)."""
    from mal_cli.images import load_rgb_reduced  # PIL import stays out of `mal --help`

    hw = job.recorded_hw
    try:
        image, decoded_hw, scale = load_rgb_reduced(job.path, expected_hw=job.recorded_hw, reduce=reduce)
    except Exception as err:  # noqa: BLE001 - any unreadable image is a fallback, not a crash
        return hw, str(err), None, 1.0
    if hw is not None and decoded_hw != hw:
        error = f"{job.path}: decoded size {decoded_hw[0]}x{decoded_hw[1]} differs from the recorded {hw[0]}x{hw[1]}"
        return hw, error, None, 1.0
    return decoded_hw, None, image, scale


def _labellable(job: ImageJob, hw: tuple[int, int], margins: Optional[Margins]) -> tuple[list[int], list, list[float]]:
    """Per box its row among the labellable boxes (-1: covers no pixel centre, pycocotools' rule); per labellable
    box its crop region and area. `margins` None (no model): only which boxes are labellable (row 0 each)."""
    model_index, regions, areas = [], [], []
    for bbox in job.boxes_xywh.tolist():
        xyxy = box_xyxy(bbox)
        if xyxy is None or window_is_empty(box_pixel_bounds(xyxy, hw)):
            model_index.append(-1)
        elif margins is None:
            model_index.append(0)
        else:
            model_index.append(len(regions))
            regions.append(crop_region(xyxy, margins))
            areas.append(box_area(bbox))
    return model_index, regions, areas


def load_image(
    job: ImageJob, index: int, need_pixels: bool, margins: Optional[Margins], reduce: int = 1, labellable=None
) -> tuple[LoadedImage, Any, float]:
    """Decodes one image (when its pixels or its size are needed) and decides which of its boxes are labellable
    (`labellable`: that decision already made on the recorded size). Returns the image's record, its pixels (or
    None) and the scale they were decoded at."""
    hw, error, image, scale = job.recorded_hw, None, None, 1.0
    if need_pixels or hw is None:
        hw, error, image, scale = _decode(job, reduce)
    elif not os.path.exists(job.path):  # the box method needs no pixels, but a missing image is still an error
        error = f"{job.path}: no such image file"
    if error:
        return LoadedImage(index, hw, error, [-1] * job.num_boxes, [], []), None, 1.0
    # hw is the recorded size if any; without pixels no model runs: no regions to decide
    model_index, regions, areas = labellable or _labellable(job, hw, margins if need_pixels else None)
    return LoadedImage(index, hw, error, model_index, regions, areas), image, scale


def load_image_crops(
    job: ImageJob, index: int, need_pixels: bool, crop_plan, margins: Margins
) -> tuple[LoadedImage, Any]:
    """`load_image` plus the uint8 crops of its model boxes (predictor.BoxCrops, or None). A JPEG whose every box
    region spans its crop size at a reduced scale is decoded at that scale (`images.draft_reduction`)."""
    from mal_cli.images import draft_reduction, scale_regions

    reduce, labellable = 1, None
    if need_pixels and job.recorded_hw is not None:
        labellable = _labellable(job, job.recorded_hw, margins)
        _, regions, areas = labellable
        if regions:
            reduce = draft_reduction(regions, [crop_plan.size_for(a) for a in areas])
    loaded, image, scale = load_image(job, index, need_pixels, margins, reduce, labellable)
    if not loaded.regions:
        return loaded, None
    import torch

    chw = torch.from_numpy(np.array(image, copy=not image.flags.writeable)).permute(2, 0, 1)
    return loaded, crop_plan.crops(chw, scale_regions(loaded.regions, scale), loaded.box_areas)


class GroupCropDataset:
    """One group of images an item: decoded, cropped and joined in a DataLoader worker (a map-style dataset).

    Joining there keeps per-image work out of the main process, which feeds the GPU: it receives one tensor
    per crop size a group instead of ~2 an image (each shared tensor costs a socket round trip to its worker).
    """

    def __init__(self, groups: Sequence[Sequence[ImageJob]], need_pixels: bool, crop_plan, margins: Optional[Margins]):
        self.groups = groups
        self.need_pixels = need_pixels
        self.crop_plan = crop_plan  # predictor.CropPlan (None for --method box)
        self.margins = margins  # None for --method box

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> LoadedGroup:
        if not self.need_pixels:
            return LoadedGroup(
                [load_image(job, i, False, self.margins)[0] for i, job in enumerate(self.groups[index])], None, None
            )
        loaded = [
            load_image_crops(job, i, True, self.crop_plan, self.margins) for i, job in enumerate(self.groups[index])
        ]
        images = [item for item, _ in loaded]
        parts = [crops for _, crops in loaded if crops is not None]
        crops = None
        if parts:
            from mal_cli.predictor import BoxCrops

            crops = parts[0] if len(parts) == 1 else BoxCrops.cat(parts)
        import torch

        areas = torch.tensor([a for item in images for a in item.box_areas])
        return LoadedGroup(images, crops, areas)


def quiet_worker_threads(_worker_id: int) -> None:
    """DataLoader worker init: a Ctrl-C'd main process may leave while this worker hands it a tensor's file
    descriptor; the connection error of the worker's fd-serving thread (multiprocessing.resource_sharer, which
    reports through sys.excepthook) is not the user's business: it printed a traceback after "interrupted"."""
    import sys

    default = sys.excepthook

    def hook(exc_type, exc, tb):
        if not issubclass(exc_type, (OSError, EOFError)):
            default(exc_type, exc, tb)

    sys.excepthook = hook


def identity(item):  # DataLoader collate for batch_size=None (a module-level function pickles)
    return item


def iter_groups(dataset: GroupCropDataset, workers: int, pin_memory: bool):
    """The dataset's groups, in order, loaded by `workers` processes: a torch DataLoader with the model, a plain
    process pool without (`--method box` never imports torch)."""
    if dataset.need_pixels:
        import torch

        # A group is ~batch_size boxes: two in flight a worker keep the model fed and bound the shared memory.
        # For a GPU the loader's pin thread page-locks the crops, so their copy to the device is asynchronous.
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            collate_fn=identity,
            worker_init_fn=quiet_worker_threads,
            prefetch_factor=2 if workers else None,
            persistent_workers=False,
            pin_memory=pin_memory,
        )
        yield from loader
        return
    if workers == 0:
        yield from (dataset[i] for i in range(len(dataset)))
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(dataset.__getitem__, range(len(dataset)))

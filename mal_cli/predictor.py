"""Box -> mask prediction with a trained labeler: crop at 1.3x, predict, keep inside the box, paste back.

`BoxPredictor` is the one labelling path, used by `mal label`, by validation during training and by
the benchmark, so what is measured is what users get. The paste back (numpy) is `labeling.postprocess`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from mal_cli import geometry
from mal_cli import precision as precisions
from mal_cli.device import resolve_device
from mal_cli.errors import InputError
from mal_cli.labeling.postprocess import BoxPrediction, paste_prob, window_to_full
from mal_cli.modeling.labeler import MaskLabeler, compile_encoder_blocks
from mal_cli.routes import area_route

__all__ = [
    "BoxCrops",
    "BoxPrediction",
    "BoxPredictor",
    "CropPlan",
    "PendingProbs",
    "default_crop_sizes",
    "default_decoder_scales",
    "make_crop_plan",
    "paste_prob",
    "resolve_device",
    "window_to_full",
]


@dataclass(frozen=True)
class CropPlan:
    """How each box is run, by its area route (small / medium / large, as the decoder routes): the crop size
    it is encoded at and the scale of the token grid its decoder convs run at.

    The decoder runs a small box's convs at half the token grid anyway (route x0.5): encoding it at a
    smaller crop costs a fraction of the encoder FLOPs (tokens scale with the square of the crop) and the
    decoder rescales the coarser feature map to the same conv resolution and output size. Sizes must be
    multiples of the backbone's patch size. `decoder_scales` None keeps the trained route scales. All sizes
    equal to the model's crop size, with the trained scales, is the exact model.
    """

    area_bins: tuple[float, ...]
    sizes: tuple[int, ...]
    decoder_scales: tuple[float, ...] | None = None

    def size_for(self, area: float) -> int:
        return self.sizes[area_route(area, self.area_bins)]

    def crops(
        self, image_chw: torch.Tensor, regions_xyxy: Sequence[Sequence[float]], box_areas: Sequence[float]
    ) -> "BoxCrops":
        """uint8 crops of one image's boxes, one tensor per crop size (boxes in order within each)."""
        sizes = [self.size_for(float(a)) for a in box_areas]
        by_size = {}
        for size in sorted(set(sizes)):
            regions = [r for r, s in zip(regions_xyxy, sizes) if s == size]
            # Rounded to uint8: a quarter of float32's bytes between processes and to the device
            # (an image's own precision).
            by_size[size] = geometry.crop_images(image_chw, regions, size).round_().clamp_(0, 255).to(torch.uint8)
        return BoxCrops(sizes, by_size)


@dataclass
class BoxCrops:
    """Crops of a list of boxes, grouped by crop size: `by_size[s]` holds, in order, the boxes with `sizes[i] == s`."""

    sizes: list[int] = field(default_factory=list)
    by_size: dict[int, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sizes)

    @staticmethod
    def cat(parts: Sequence["BoxCrops"]) -> "BoxCrops":
        sizes = [s for p in parts for s in p.sizes]
        by_size = {
            size: torch.cat([p.by_size[size] for p in parts if size in p.by_size]) for size in sorted(set(sizes))
        }
        return BoxCrops(sizes, by_size)

    def pin_memory(self) -> "BoxCrops":
        """Page-locked copies (the DataLoader's pin thread calls this): the copy to the GPU is then asynchronous."""
        return BoxCrops(self.sizes, {size: crops.pin_memory() for size, crops in self.by_size.items()})


class PendingProbs:
    """Probabilities (N, M, M) the device is still computing: `result()` waits for them, on the CPU.

    On a GPU, `BoxPredictor.submit_crops` only queues the work, so the caller can post-process the previous
    batch while the device runs this one.
    """

    def __init__(self, probs: torch.Tensor, ready: "torch.cuda.Event | None" = None):
        self._probs = probs
        self._ready = ready

    def result(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return self._probs


class BoxPredictor:
    """Runs a `MaskLabeler` on box crops. Options mirror `mal label`'s."""

    def __init__(
        self,
        model: MaskLabeler,
        device: str | torch.device = "cpu",
        margin: float | None = None,
        threshold: float | None = None,
        flip: bool = False,
        amp: bool = True,
        crop_sizes: Sequence[int] | str | None = None,
        compile: bool = False,
        precision: str = "auto",
    ):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.precision = precisions.resolve(precision if amp else "fp32", self.device)  # amp=False: fp32 as before
        self.model = model.to(self.device).eval()
        # NHWC for the decoder's 3x3 convs: faster with oneDNN (CPU) and cuDNN (GPU), same math.
        self.model.decoder.to(memory_format=torch.channels_last)
        if compile:
            compile_encoder_blocks(self.model)
        self.crop_plan = make_crop_plan(model, crop_sizes)
        self.margins = geometry.Margins.uniform(model.config.label_margin if margin is None else margin)
        self.threshold = model.config.threshold if threshold is None else threshold
        self.flip = flip

    def regions(self, boxes_xyxy: Sequence[Sequence[float]]) -> list[tuple[float, float, float, float]]:
        return [geometry.crop_region(b, self.margins) for b in boxes_xyxy]

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and not tensor.is_pinned():
            # page-locked: the copy is asynchronous (uint8 crops: a quarter of float's bytes)
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def device_probs(self, crops: torch.Tensor, box_areas: torch.Tensor) -> torch.Tensor:
        """Crops (N, 3, S, S) in [0, 255] (uint8 or float) -> probabilities (N, M, M) float32 on the device.

        `box_areas` stay on the CPU: the decoder routes boxes there, so nothing waits for the device.
        """
        crops = self.to_device(crops).float()
        areas = box_areas.float()
        scales = self.crop_plan.decoder_scales
        with precisions.autocast(self.device, self.precision):
            logits = self.model(crops, areas, scales).float()
            if self.flip:
                flipped = self.model(crops.flip(-1), areas, scales).float().flip(-1)
                logits = (logits + flipped) / 2
        return torch.sigmoid(logits[:, 0])

    def predict_probs(self, crops: torch.Tensor, box_areas: torch.Tensor) -> torch.Tensor:
        """Crops (N, 3, S, S) in [0, 255] (uint8 or float) -> probabilities (N, M, M) float32 on the CPU."""
        return self.device_probs(crops, box_areas).cpu()

    @torch.inference_mode()
    def submit_crops(self, crops: BoxCrops, box_areas: torch.Tensor, batch_size: int = 64) -> PendingProbs:
        """Queues the probabilities of N boxes' crops (any mix of sizes), in box order, and returns at once on
        a GPU (at the end on a CPU, whose work is not queued).

        Boxes are batched per crop size, in order, `batch_size` at a time: the batches depend only on
        the input, so results are reproducible however the work is split.
        """
        sizes = torch.tensor(crops.sizes, dtype=torch.long)
        m = self.model.mask_size
        out = torch.empty((len(sizes), m, m), device=self.device)
        for size, size_crops in crops.by_size.items():
            idx = torch.nonzero(sizes == size).flatten()
            for s in range(0, len(idx), batch_size):
                part = idx[s : s + batch_size]
                probs = self.device_probs(size_crops[s : s + batch_size], box_areas[part])
                out.index_copy_(0, self.to_device(part), probs)
        if self.device.type != "cuda":
            return PendingProbs(out)
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)  # page-locked destination: queued behind the model, not waited for
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))  # this device's stream (cuda:1 is not the current device)
        return PendingProbs(host, ready)

    def predict_crops(self, crops: BoxCrops, box_areas: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Probabilities (N, M, M) of N boxes' crops (any mix of sizes), in box order, on the CPU."""
        return self.submit_crops(crops, box_areas, batch_size).result()

    def predict_image(self, image_hwc: np.ndarray, boxes_xywh: Sequence[Sequence[float]]) -> list[BoxPrediction]:
        """All boxes of one image (H, W, 3) uint8 -> one `BoxPrediction` per box, in order."""
        if len(boxes_xywh) == 0:
            return []
        image = torch.from_numpy(np.array(image_hwc, copy=not image_hwc.flags.writeable)).permute(2, 0, 1)
        boxes = [geometry.xywh_to_xyxy(b) for b in boxes_xywh]
        regions = self.regions(boxes)
        areas = torch.tensor([geometry.box_area(b) for b in boxes_xywh])
        probs = self.predict_crops(self.crop_plan.crops(image, regions, areas.tolist()), areas, batch_size=len(boxes))
        hw = (image_hwc.shape[0], image_hwc.shape[1])
        return [paste_prob(p, b, r, hw, self.threshold) for p, b, r in zip(probs, boxes, regions)]


# Default crop size per route, as a fraction of the model's crop: small boxes at 3/4, medium at 7/8, large
# at the full crop (fewer encoder FLOPs for a small accuracy cost: README "Performance"). `--crop-sizes full`
# is the exact model.
DEFAULT_CROP_FRACTIONS = (0.75, 0.875, 1.0)
# Default decoder scale per route, as a fraction of the trained one: large boxes' convs at 3/4 of their
# trained resolution (README "Performance"); the mask keeps its size.
DEFAULT_DECODER_FRACTIONS = (1.0, 1.0, 0.75)


def default_crop_sizes(model: MaskLabeler) -> tuple[int, ...]:
    """`DEFAULT_CROP_FRACTIONS` of the model's crop size, rounded to multiples of its patch size."""
    patch, crop = model.encoder.patch_size, model.config.crop_size
    n_routes = len(model.decoder.area_bins) + 1
    fractions = DEFAULT_CROP_FRACTIONS if n_routes == len(DEFAULT_CROP_FRACTIONS) else (1.0,) * n_routes
    return tuple(max(patch, round(crop * f / patch) * patch) for f in fractions)


def default_decoder_scales(model: MaskLabeler) -> tuple[float, ...] | None:
    """`DEFAULT_DECODER_FRACTIONS` of the model's trained route scales (None: a model with other routes keeps
    its own)."""
    scales = model.decoder.route_scales
    if len(scales) != len(DEFAULT_DECODER_FRACTIONS):
        return None
    return tuple(s * f for s, f in zip(scales, DEFAULT_DECODER_FRACTIONS))


def make_crop_plan(model: MaskLabeler, crop_sizes: Sequence[int] | str | None = None) -> CropPlan:
    """The model's routes with `crop_sizes`: one size per route, "full" (the model's crop size for every
    route and its trained decoder scales: the exact model) or None (`default_crop_sizes`). Any plan but
    "full" runs the decoder at `default_decoder_scales`."""

    bins = model.decoder.area_bins
    decoder_scales = default_decoder_scales(model)
    if crop_sizes is None:
        crop_sizes = default_crop_sizes(model)
    elif crop_sizes == "full":
        crop_sizes = [model.config.crop_size] * (len(bins) + 1)
        decoder_scales = None
    crop_sizes = tuple(int(s) for s in crop_sizes)
    patch = model.encoder.patch_size
    if len(crop_sizes) != len(bins) + 1:
        raise InputError(
            f"--crop-sizes needs {len(bins) + 1} sizes (small, medium, large boxes), got {len(crop_sizes)}"
        )
    bad = [s for s in crop_sizes if s < patch or s % patch]
    if bad:
        raise InputError(f"--crop-sizes must be multiples of the backbone's patch size {patch}, got {bad[0]}")
    return CropPlan(tuple(bins), crop_sizes, decoder_scales)

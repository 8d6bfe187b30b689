"""Box -> mask prediction with a trained labeler: crop at 1.3x, predict, keep inside the box, paste back.

`BoxPredictor` is the one labelling path, used by `mal label`, by validation during training and by
the benchmark, so what is measured is what users get.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mal_cli import geometry
from mal_cli.modeling.labeler import MaskLabeler


@dataclass
class BoxPrediction:
    """One box's result: a binary window of the image and where it sits, plus the probability window."""

    window_mask: np.ndarray  # (row1 - row0, col1 - col0) uint8
    window: tuple[int, int, int, int]  # row0, row1, col0, col1 (ends exclusive)
    window_prob: np.ndarray  # same shape, float32 probabilities


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    ):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        # NHWC for the decoder's 3x3 convs: faster with oneDNN (CPU) and cuDNN (GPU), same math.
        self.model.decoder.to(memory_format=torch.channels_last)
        self.crop_size = model.config.crop_size
        self.margins = geometry.Margins.uniform(model.config.label_margin if margin is None else margin)
        self.threshold = model.config.threshold if threshold is None else threshold
        self.flip = flip
        self.amp = amp

    def regions(self, boxes_xyxy: Sequence[Sequence[float]]) -> list[tuple[float, float, float, float]]:
        return [geometry.crop_region(b, self.margins) for b in boxes_xyxy]

    def crops(self, image_chw: torch.Tensor, boxes_xyxy: Sequence[Sequence[float]]) -> torch.Tensor:
        """(N, 3, S, S) float crops of one image's boxes, at the labelling margin."""
        return geometry.crop_images(image_chw, self.regions(boxes_xyxy), self.crop_size)

    @torch.inference_mode()
    def predict_probs(self, crops: torch.Tensor, box_areas: torch.Tensor) -> torch.Tensor:
        """Crops (N, 3, S, S) in [0, 255] (uint8 or float) -> probabilities (N, M, M) float32 on the CPU."""
        if self.device.type == "cuda" and not crops.is_pinned():
            crops = crops.pin_memory()  # uint8 crops: a quarter of the float bytes, copied asynchronously
        crops = crops.to(self.device, non_blocking=True).float()
        areas = box_areas.to(self.device).float()
        dtype = torch.bfloat16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.amp):
            logits = self.model(crops, areas).float()
            if self.flip:
                flipped = self.model(crops.flip(-1), areas).float().flip(-1)
                logits = (logits + flipped) / 2
        return torch.sigmoid(logits[:, 0]).cpu()

    def paste(
        self,
        prob: torch.Tensor,
        box_xyxy: Sequence[float],
        region_xyxy: Sequence[float],
        image_hw: tuple[int, int],
    ) -> BoxPrediction:
        return paste_prob(prob, box_xyxy, region_xyxy, image_hw, self.threshold)

    def predict_image(self, image_hwc: np.ndarray, boxes_xywh: Sequence[Sequence[float]]) -> list[BoxPrediction]:
        """All boxes of one image (H, W, 3) uint8 -> one `BoxPrediction` per box, in order."""
        if len(boxes_xywh) == 0:
            return []
        image = torch.from_numpy(np.array(image_hwc, copy=not image_hwc.flags.writeable)).permute(2, 0, 1)
        boxes = [geometry.xywh_to_xyxy(b) for b in boxes_xywh]
        regions = self.regions(boxes)
        crops = geometry.crop_images(image, regions, self.crop_size)
        areas = torch.tensor([max(float(b[2]) * float(b[3]), 0.0) for b in boxes_xywh])
        probs = self.predict_probs(crops, areas)
        hw = (image_hwc.shape[0], image_hwc.shape[1])
        return [self.paste(p, b, r, hw) for p, b, r in zip(probs, boxes, regions)]


def paste_prob(prob, box_xyxy: Sequence[float], region_xyxy: Sequence[float], image_hw: tuple[int, int],
               threshold: float) -> BoxPrediction:
    """`BoxPredictor.paste` without the model (numpy only: runs in `mal label`'s post-processing processes)."""
    window_prob, window = geometry.paste_box_prob(prob, box_xyxy, region_xyxy, image_hw)
    window_mask = (window_prob >= threshold).view(np.uint8)
    return BoxPrediction(window_mask, window, window_prob)


def window_to_full(prediction: BoxPrediction, image_hw: tuple[int, int]) -> np.ndarray:
    """Full-image uint8 mask of a prediction (for evaluation and tests; labelling avoids this)."""
    full = np.zeros(image_hw, dtype=np.uint8)
    row0, row1, col0, col1 = prediction.window
    full[row0:row1, col0:col1] = prediction.window_mask
    return full

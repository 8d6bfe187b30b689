"""The MAL labeler: ViT encoder + attention decoder, its config, and its self-describing checkpoint file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mal_cli.errors import InputError
from mal_cli.fileio import atomic_write
from mal_cli.modeling.image_encoder import PIXEL_MEAN, PIXEL_STD, ImageEncoder
from mal_cli.modeling.mask_decoder import DEFAULT_AREA_BINS, DEFAULT_ROUTE_SCALES, MaskDecoder

CHECKPOINT_FORMAT = "mal-labeler"
CHECKPOINT_VERSION = 1


@dataclass
class LabelerConfig:
    """Everything needed to rebuild a labeler's architecture (stored in every checkpoint)."""

    backbone: str = "vit_small_patch14_dinov2"
    crop_size: int = 224
    decoder_dim: int = 256
    decoder_convs: int = 4
    area_bins: tuple[float, ...] = DEFAULT_AREA_BINS
    route_scales: tuple[float, ...] = DEFAULT_ROUTE_SCALES
    output_stride: int = 4
    # Labelling defaults the model was tuned with; `mal label` options override them.
    label_margin: float = 0.3
    threshold: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["area_bins"] = list(self.area_bins)
        d["route_scales"] = list(self.route_scales)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabelerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        for key in ("area_bins", "route_scales"):
            if key in kwargs:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        return cls(**kwargs)


class MaskLabeler(nn.Module):
    """Box crop in, mask logits out. Input: (B, 3, S, S) RGB in [0, 255] (any float dtype), box areas (B,)."""

    def __init__(self, config: LabelerConfig, pretrained: bool = False):
        super().__init__()
        self.config = config
        self.encoder = ImageEncoder(config.backbone, config.crop_size, pretrained=pretrained)
        self.decoder = MaskDecoder(
            self.encoder.embed_dim,
            dim=config.decoder_dim,
            num_convs=config.decoder_convs,
            area_bins=config.area_bins,
            route_scales=config.route_scales,
            output_stride=config.output_stride,
        )
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1) * 255, persistent=False)

    @property
    def mask_size(self) -> int:
        return self.encoder.grid_size * self.config.output_stride

    def forward(
        self, crops: torch.Tensor, box_areas: torch.Tensor, route_scales: Sequence[float] | None = None
    ) -> torch.Tensor:
        """Returns mask logits (B, 1, M, M), M = output_stride x the token grid of `config.crop_size`.

        Crops may be smaller than `config.crop_size` (a multiple of the patch size): the decoder then
        routes the coarser feature map to the same conv resolution and output size (see `MaskDecoder`).
        `route_scales` overrides the decoder's trained per-route scales (labelling's plan, `predictor.CropPlan`).
        """
        images = (crops - self.pixel_mean) / self.pixel_std
        return self.decoder(
            self.encoder(images), box_areas, grid_size=self.encoder.grid_size, route_scales=route_scales
        )


def compile_encoder_blocks(model: MaskLabeler) -> None:
    """torch.compile the ViT's transformer blocks in place (their weights and state-dict keys unchanged).

    The blocks hold most of a box's FLOPs (~70 % over the dev set's routes; the rest is mostly the decoder's
    convs) and take any (batch, tokens) shape as one graph, so the crop sizes and the uneven batches of a
    run share it (dynamic shapes, compiled on the first call; in training, forward and backward). What it
    buys is the fusion of the blocks' elementwise work (LayerNorm, GELU, residual adds, scales) around the
    matmuls; README "Performance" has what it measured.
    """
    model.encoder.vit.blocks.compile(dynamic=True)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(obj, f)


def export_labeler(
    model: MaskLabeler, path: str | Path, dtype: torch.dtype = torch.float16, meta: dict | None = None
) -> None:
    """Write an inference-only checkpoint (config + weights in `dtype`), e.g. the one shipped in models/."""
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": model.config.to_dict(),
            "model": state,
            "meta": meta or {},
        },
        path,
    )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a mal checkpoint dict (training or inference), with clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise InputError(f"cannot read checkpoint {path}: {err} (truncated or not a torch file?)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a mal labeler checkpoint (no format='{CHECKPOINT_FORMAT}' entry)")
    return ckpt


def load_labeler(path: str | Path, use_teacher: bool = False) -> MaskLabeler:
    """Rebuild a labeler from a checkpoint file, in float32 on the CPU, in eval mode.

    Training checkpoints hold a student and a teacher; `use_teacher` picks the EMA teacher.
    """
    ckpt = read_checkpoint(path)
    config = LabelerConfig.from_dict(ckpt["config"])
    model = MaskLabeler(config)
    if "model" in ckpt:
        state = ckpt["model"]
    else:
        state = ckpt["teacher" if use_teacher else "student"]
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()

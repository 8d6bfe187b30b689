"""ViT image encoder: any timm ViT, run at the crop size, its patch tokens reshaped to a feature map."""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from mal_cli.errors import InputError

log = logging.getLogger(__name__)

# ImageNet statistics: what MAE and DINOv2 were trained with.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


class ImageEncoder(nn.Module):
    """Wraps a timm Vision Transformer; `forward` maps normalised images (B, 3, S, S) to (B, D, S/p, S/p)."""

    def __init__(self, backbone: str, img_size: int, pretrained: bool = False):
        super().__init__()
        try:
            self.vit = timm.create_model(backbone, pretrained=pretrained, img_size=img_size, num_classes=0)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise InputError(
                    f"unknown backbone '{backbone}': use a timm ViT name, e.g. vit_small_patch14_dinov2"
                ) from None
            raise
        if not hasattr(self.vit, "patch_embed") or not hasattr(self.vit, "num_prefix_tokens"):
            raise InputError(f"backbone '{backbone}' is not a timm VisionTransformer (it has no patch_embed)")
        self.patch_size = int(self.vit.patch_embed.patch_size[0])
        if img_size % self.patch_size:
            lower = img_size // self.patch_size * self.patch_size
            raise InputError(
                f"crop size {img_size} is not a multiple of the backbone's patch size {self.patch_size}: "
                f"use e.g. {lower} or {lower + self.patch_size}"
            )
        self.img_size = img_size
        self.embed_dim = int(self.vit.embed_dim)
        self.grid_size = img_size // self.patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S', S') -> (B, D, S'/p, S'/p). S' may differ from the crop size the model was built for
        (any multiple of the patch size): the position embeddings are then resampled to that grid."""
        size = images.shape[-1]
        if images.shape[-2] != size or size % self.patch_size:
            raise ValueError(
                f"crops must be square multiples of {self.patch_size} pixels, got {tuple(images.shape[-2:])}"
            )
        if size == self.img_size:
            tokens = self.vit.forward_features(images)
        else:
            tokens = self._forward_features_at(images)
        patches = tokens[:, self.vit.num_prefix_tokens :]
        b, n, d = patches.shape
        grid = size // self.patch_size
        return patches.transpose(1, 2).reshape(b, d, grid, grid)

    def _forward_features_at(self, images: torch.Tensor) -> torch.Tensor:
        """timm's forward_features with the position embeddings resampled (bicubic, as timm does) to the grid."""
        vit = self.vit
        grid = images.shape[-1] // self.patch_size
        x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (B, grid^2, D), as PatchEmbed with flatten
        x = vit.patch_embed.norm(x)
        prefix_len = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        # Resampled per call: a bicubic on a (grid x grid x D) map, negligible next to the blocks.
        pos_embed = resample_abs_pos_embed(vit.pos_embed, new_size=(grid, grid), num_prefix_tokens=prefix_len).to(
            x.dtype
        )
        prefix = [t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if getattr(vit, "no_embed_class", False):
            x = torch.cat(prefix + [x + pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos_embed
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))
        return vit.norm(vit.blocks(x))


def _unwrap_state_dict(obj: object) -> dict:
    """Find the tensor dict inside common checkpoint layouts (MAE's {'model': ...}, {'state_dict': ...})."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module", "backbone"):
            if key in obj and isinstance(obj[key], dict):
                return _unwrap_state_dict(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise InputError("backbone weights file holds no state dict (expected tensors, or a 'model'/'state_dict' entry)")


def load_backbone_weights(encoder: ImageEncoder, path: str | Path) -> dict[str, list[str]]:
    """Load ViT weights (timm layout; MAE/DINOv2 checkpoints converted to timm) into `encoder`.

    Position embeddings are resampled to the crop's token grid. Returns and logs the keys that were
    loaded, missing and unexpected, so a user sees exactly what a foreign checkpoint gave.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"backbone weights not found: {path}; for DINOv2 ViT-S/14 run `mal weights dinov2-s14` and pass the "
            "path it prints (--backbone-weights $(mal weights dinov2-s14))"
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise InputError(f"cannot read backbone weights {path}: {err}") from None
    state = {k.removeprefix("module.").removeprefix("vit."): v.float() for k, v in _unwrap_state_dict(raw).items()}
    vit = encoder.vit
    if "pos_embed" in state and state["pos_embed"].shape != vit.pos_embed.shape:
        prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=(encoder.grid_size, encoder.grid_size), num_prefix_tokens=prefix
        )
    own = vit.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in mismatched:
        state.pop(k)
    result = vit.load_state_dict(state, strict=False)
    report = {
        "loaded": sorted(k for k in state if k in own),
        "missing": sorted(result.missing_keys),
        "unexpected": sorted(result.unexpected_keys),
        "mismatched": sorted(mismatched),
    }
    log.info(
        "backbone weights %s: %d tensors loaded, %d missing, %d unexpected, %d shape-mismatched",
        path,
        len(report["loaded"]),
        len(report["missing"]),
        len(report["unexpected"]),
        len(report["mismatched"]),
    )
    for kind in ("missing", "unexpected", "mismatched"):
        if report[kind]:
            log.warning(
                "backbone %s keys: %s", kind, ", ".join(report[kind][:20]) + (" ..." if len(report[kind]) > 20 else "")
            )
    if not report["loaded"]:
        raise InputError(f"no tensor of {path} matches backbone '{type(vit).__name__}': is it the right architecture?")
    return report

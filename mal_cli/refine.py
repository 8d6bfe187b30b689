"""Test-time refinement of a box's probability window with the image's colours.

The labeler predicts 64x64 logits per crop; pasted back on a large box each logit covers many image pixels, so
the outline is a smooth interpolation that ignores the image's edges. Two colour-guided passes sharpen it,
both confined to the box window (a box's object cannot leave it) and both pure functions of the window's
probabilities and pixels, so they could run in `mal label`'s post-processing processes (not wired in:
measured by `benchmarks/`, their gain is below what a default change needs, docs/labeler_v2.md):

- `meanfield_refine`: a binary mean-field CRF whose unary is the labeler's own logit and whose pairwise term
  is MAL's colour affinity on rings of neighbours 1, 2, 4 and 8 pixels away, run at a working resolution (the
  window's longest side at most `max_side` pixels). A 3x3 neighbourhood alone cannot move an outline that
  lies in a flat-coloured region (its votes are symmetric there); the wider rings let the pixels next to a
  colour edge be outvoted by the region they belong to;
- `guided_refine`: He et al.'s guided filter (colour guide) of the probabilities, radius proportional to the
  window: an edge-aware upsampling of the logits' smooth map.

Neither sees a ground-truth mask; their few settings were chosen on the validation split (docs/labeler_v2.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PROB_EPS = 1e-4


@dataclass(frozen=True)
class MeanFieldConfig:
    iterations: int = 10
    # Pairwise strength: the most logits the colour-weighted vote can add (8: chosen on the val split).
    weight: float = 8.0
    # Colour bandwidth, image in [0, 1] (MAL's CRF loss uses 0.1).
    zeta: float = 0.1
    # Working resolution: the window's longest side at most this many pixels.
    max_side: int = 128
    # Neighbour rings: a vote reaches past one logit's footprint.
    dilations: tuple[int, ...] = (1, 2, 4, 8)


@dataclass(frozen=True)
class GuidedConfig:
    # Radius = this x the working window's longest side.
    radius_fraction: float = 1 / 64
    # Regularisation: larger keeps the labeler's map, smaller follows the colours.
    eps: float = 1e-3
    # The linear model is fitted at this working resolution (fast guided filter).
    max_side: int = 128


def _window_tensors(window_prob: np.ndarray, image_window: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    prob = torch.from_numpy(np.asarray(window_prob, dtype=np.float32))[None, None]
    image = torch.from_numpy(np.ascontiguousarray(image_window, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return prob, image


def _working_size(h: int, w: int, max_side: int) -> tuple[int, int]:
    """The window's size scaled down so that its longest side is at most `max_side` (never up)."""
    scale = min(1.0, max_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _shifted_stack(x: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """(K, ..., H, W): x moved by each offset, so that pixel (y, x) holds the value at (y + dy, x + dx); zeros
    past the border. One pad for all offsets (views of it), not one per offset."""
    h, w = x.shape[-2:]
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(x, (pad, pad, pad, pad))
    return torch.stack([padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w] for dy, dx in offsets])


def _offsets(dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(d * dy, d * dx) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _affinities(image: torch.Tensor, offsets: list[tuple[int, int]], zeta: float) -> torch.Tensor:
    """(K, H, W) colour affinity exp(-|I_i - I_j|^2 / (2 zeta^2)) to the neighbour at each offset (0 past the
    border): MAL's CRF kernel (`losses.colour_affinity`) on a multi-scale ring of neighbours. image (3, H, W)."""
    inside = _shifted_stack(torch.ones_like(image[:1]), offsets)[:, 0]
    dist2 = (_shifted_stack(image, offsets) - image).pow(2).sum(1)
    return torch.exp(dist2 / (-2 * zeta * zeta)) * inside


@torch.no_grad()
def meanfield_refine(
    window_prob: np.ndarray,
    image_window: np.ndarray,
    config: MeanFieldConfig = MeanFieldConfig(),
) -> np.ndarray:
    """Refined probabilities of one box window: (h, w) float32 in, (h, w) float32 out.

    image_window: the image pixels of the same window, (h, w, 3) uint8. Mean field of a binary CRF whose unary is
    the labeler's logit z0: z = z0 + weight * mean_j k_ij (2 Q_j - 1), j over the neighbour rings.
    """
    h, w = window_prob.shape
    if h == 0 or w == 0:
        return np.asarray(window_prob, dtype=np.float32)
    prob, image = _window_tensors(window_prob, image_window)
    size = _working_size(h, w, config.max_side)
    if size != (h, w):
        prob = F.interpolate(prob, size=size, mode="bilinear", align_corners=False)
        image = F.interpolate(image, size=size, mode="area")
    z0 = torch.logit(prob[0, 0].clamp(PROB_EPS, 1 - PROB_EPS))
    offsets = _offsets(config.dilations)
    affinity = _affinities(image[0], offsets, config.zeta) * (config.weight / len(offsets))
    q = prob[0, 0]
    for _ in range(config.iterations):
        vote = (affinity * _shifted_stack(2 * q - 1, offsets)).sum(0)
        q = torch.sigmoid(z0 + vote)
    if size != (h, w):
        q = F.interpolate(q[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return q.numpy()


def _box_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over a (2r+1)^2 window, the window clipped at the borders (x: (1, C, H, W))."""
    return F.avg_pool2d(x, 2 * r + 1, stride=1, padding=r, count_include_pad=False)


@torch.no_grad()
def guided_refine(
    window_prob: np.ndarray,
    image_window: np.ndarray,
    config: GuidedConfig = GuidedConfig(),
) -> np.ndarray:
    """The probabilities guided-filtered by the window's colours (He et al., colour guide), clipped to [0, 1].

    The fast guided filter (He & Sun 2015): the per-pixel linear model (a, b) is fitted at a working
    resolution (longest side at most `max_side`), upsampled, and applied to the full-resolution colours,
    so the output follows the image's edges at every pixel.
    """
    h, w = window_prob.shape
    if h == 0 or w == 0:
        return np.asarray(window_prob, dtype=np.float32)
    p_full, image_full = _window_tensors(window_prob, image_window)
    size = _working_size(h, w, config.max_side)
    p = F.interpolate(p_full, size=size, mode="area") if size != (h, w) else p_full
    image = F.interpolate(image_full, size=size, mode="area") if size != (h, w) else image_full
    r = max(1, round(config.radius_fraction * max(size)))
    mean_i = _box_mean(image, r)  # (1, 3, h', w')
    mean_p = _box_mean(p, r)
    cov_ip = _box_mean(image * p, r) - mean_i * mean_p
    outer = (image[:, :, None] * image[:, None]).flatten(1, 2)  # (1, 9, h', w'): I_a I_b
    var_i = _box_mean(outer, r) - (mean_i[:, :, None] * mean_i[:, None]).flatten(1, 2)
    sigma = var_i.reshape(1, 3, 3, *size).permute(0, 3, 4, 1, 2) + config.eps * torch.eye(3)
    a = torch.linalg.solve(sigma, cov_ip.permute(0, 2, 3, 1)[..., None])[..., 0].permute(0, 3, 1, 2)
    b = mean_p - (a * mean_i).sum(1, keepdim=True)
    mean_a, mean_b = _box_mean(a, r), _box_mean(b, r)
    if size != (h, w):
        mean_a = F.interpolate(mean_a, size=(h, w), mode="bilinear", align_corners=False)
        mean_b = F.interpolate(mean_b, size=(h, w), mode="bilinear", align_corners=False)
    q = (mean_a * image_full).sum(1, keepdim=True) + mean_b
    return q[0, 0].clamp(0.0, 1.0).numpy()

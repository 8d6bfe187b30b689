"""MAL's box-supervised losses: multiple-instance learning on row/column bags, and a colour-affinity CRF.

All maps are (B, H, W): P the student's sigmoid map, T the teacher's, B the box mask of the crop
(1 inside the box, 0 in the margin). Nothing here ever sees a ground-truth mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DICE_EPS = 1e-6


def dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = DICE_EPS) -> torch.Tensor:
    """Per-sample Dice loss 1 - 2 sum(uv) / (sum(u^2) + sum(v^2) + eps) over all but the first dim -> (B,)."""
    pred = pred.flatten(1).float()
    target = target.flatten(1).float()
    inter = (pred * target).sum(1)
    denom = (pred * pred).sum(1) + (target * target).sum(1) + eps
    return 1 - 2 * inter / denom


def mil_loss(prob: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
    """Each row and each column of the crop is a bag: its max must be 1 inside the box span, 0 outside.

    Returns the per-sample Dice(rows) + Dice(cols), shape (B,). A prediction equal to the box mask
    scores ~0; anything spilling into the margin, or missing a row or column of the box, is penalised.
    """
    rows = dice_loss(prob.amax(dim=2), box_mask.amax(dim=2))
    cols = dice_loss(prob.amax(dim=1), box_mask.amax(dim=1))
    return rows + cols


@dataclass(frozen=True)
class CRFConfig:
    """Mean-field refinement settings (MAL's defaults)."""

    iterations: int = 100
    zeta: float = 0.1  # colour bandwidth of the affinity, image in [0, 1]
    q_min: float = 0.1  # clip keeps the log finite and the target from saturating
    q_max: float = 0.9
    kernel: int = 3  # neighbourhood size (centre pixel excluded)


def colour_affinity(image: torch.Tensor, zeta: float = 0.1, kernel: int = 3) -> torch.Tensor:
    """Affinity k_ij = exp(-|I_i - I_j|^2 / (2 zeta^2)) to each neighbour j of a kernel x kernel window.

    image: (B, C, H, W) in [0, 1]. Returns (B, K, H, W) with K = kernel^2 - 1 (the centre is left out);
    neighbours outside the image get affinity 0.
    """
    b, c, h, w = image.shape
    pad = kernel // 2
    patches = F.unfold(image.float(), kernel, padding=pad).view(b, c, kernel * kernel, h, w)
    valid = F.unfold(torch.ones(1, 1, h, w, device=image.device), kernel, padding=pad).view(1, kernel * kernel, h, w)
    centre = (kernel * kernel) // 2
    keep = [k for k in range(kernel * kernel) if k != centre]
    dist2 = (patches[:, :, keep] - image.float().unsqueeze(2)).pow(2).sum(1)
    return torch.exp(-dist2 / (2 * zeta * zeta)) * valid[:, keep]


def _neighbour_sum(values: torch.Tensor, affinity: torch.Tensor, kernel: int) -> torch.Tensor:
    """sum_j k_ij * values_j over each pixel's neighbourhood; values (B, H, W) -> (B, H, W)."""
    b, h, w = values.shape
    pad = kernel // 2
    patches = F.unfold(values.unsqueeze(1), kernel, padding=pad).view(b, kernel * kernel, h, w)
    centre = (kernel * kernel) // 2
    keep = [k for k in range(kernel * kernel) if k != centre]
    return (patches[:, keep] * affinity).sum(1)


@torch.no_grad()
def crf_pseudo_mask(
    prob: torch.Tensor,
    teacher_prob: torch.Tensor,
    box_mask: torch.Tensor,
    image: torch.Tensor,
    config: CRFConfig = CRFConfig(),
) -> torch.Tensor:
    """MAL's CRF target: mean-field on the averaged student/teacher map, confined to the box.

    Q = clip(B * (P + T) / 2); then repeatedly A_fg = prod_j Q_j^k_ij, A_bg = prod_j (1 - Q_j)^k_ij,
    A_fg *= B, Q = clip(A_fg / (A_fg + A_bg)). Products become sums in log space, so the 100
    iterations are stable and batched. Returns the binary pseudo-mask [Q > 0.5], (B, H, W), no grad.
    image: (B, C, H, W) in [0, 1] at the maps' resolution.
    """
    box = box_mask.float()
    q = ((prob.float() + teacher_prob.float()) / 2 * box).clamp(config.q_min, config.q_max)
    affinity = colour_affinity(image, config.zeta, config.kernel)
    outside = box < 0.5
    for _ in range(config.iterations):
        log_fg = _neighbour_sum(torch.log(q), affinity, config.kernel)
        log_bg = _neighbour_sum(torch.log1p(-q), affinity, config.kernel)
        # A_fg *= B: outside the box the foreground evidence is zero (log = -inf -> Q at its floor).
        logit = (log_fg - log_bg).masked_fill(outside, float("-inf"))
        q = torch.sigmoid(logit).clamp(config.q_min, config.q_max)
    return (q > 0.5).float()


def crf_loss(prob: torch.Tensor, pseudo_mask: torch.Tensor) -> torch.Tensor:
    """Pull the student towards the CRF pseudo-mask: per-sample Dice, (B,)."""
    return dice_loss(prob, pseudo_mask)


def ramp(step: int, ramp_steps: int) -> float:
    """Linear ramp-in factor from 0 to 1 over `ramp_steps` steps (1 at once if ramp_steps <= 0)."""
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / ramp_steps)

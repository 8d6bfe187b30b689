"""`mal_score`: a per-mask quality estimate in [0, 1], computed from the labeler's own probabilities.

Low scores should come first when a person reviews labels. Two signals, both from the probability map
inside the box window (the only place a mask can be):

- confidence: mean of |2p - 1|, how far the probabilities are from the undecided 0.5;
- stability: IoU of the mask at threshold + delta and at threshold - delta. The higher-threshold mask is
  inside the lower one, so the IoU is the ratio of their areas; a mask whose outline moves a lot when
  the threshold moves is a guess.

An empty mask scores 0, however confident: a box always holds an object.

mal_score = (confidence + stability) / 2, rounded to 4 decimals (so the JSON bytes are stable). The mean,
not the product: an under-confident model has stability 0 everywhere (nothing reaches threshold + delta),
and the product would then tie every mask at 0 while the confidence still ranks them. Measured on the
coco dev set (317 boxes, a 6-step smoke labeler, probabilities in 0.49..0.55): Spearman with the true IoU
0.50 for confidence and for the mean, undefined for stability and the product (constant 0). Re-measure
with `spearman_with_iou` once a trained labeler exists.
Fixed values: `BOX_METHOD_SCORE` for `--method box` (no prediction, no information), `FALLBACK_SCORE` for a
box that could not be labelled (degenerate box, unreadable image), so fallbacks rank first.
"""

from __future__ import annotations

import numpy as np

from mal_cli.metrics import spearman_with_iou  # noqa: F401  (it lives with the metrics it uses)

STABILITY_DELTA = 0.1
BOX_METHOD_SCORE = 0.5
FALLBACK_SCORE = 0.0


def mask_quality(window_prob: np.ndarray, threshold: float = 0.5, delta: float = STABILITY_DELTA) -> float:
    """mal_score of one probability window (see module docstring)."""
    prob = np.asarray(window_prob, dtype=np.float32)
    if prob.size == 0:
        return FALLBACK_SCORE
    if not np.any(prob >= threshold):
        return FALLBACK_SCORE  # an empty mask is a failed label, however confident: a box holds an object
    confidence = float(np.abs(2.0 * prob - 1.0).mean(dtype=np.float64))
    low = int(np.count_nonzero(prob >= max(threshold - delta, 0.0)))
    high = int(np.count_nonzero(prob >= min(threshold + delta, 1.0)))
    stability = high / low if low else 0.0
    return round(min(max((confidence + stability) / 2, 0.0), 1.0), 4)


def fill_consistency(window_mask: np.ndarray) -> float:
    """MIL's bag rule as a cue: the fraction of the box window's rows that hold a mask pixel, times that of its
    columns. A tight box touches its object in every row and column, so a mask that leaves some empty has
    missed part of the object (or the box frames something else). 0 for an empty window."""
    mask = np.asarray(window_mask, dtype=bool)
    if mask.size == 0:
        return 0.0
    return float(mask.any(axis=1).mean() * mask.any(axis=0).mean())


def mask_agreement(window_mask: np.ndarray, other_mask: np.ndarray) -> float:
    """IoU of two masks of the same window (e.g. the labeler's and its colour-refined one); 1 when both are empty."""
    a, b = np.asarray(window_mask, dtype=bool), np.asarray(other_mask, dtype=bool)
    union = int(np.count_nonzero(a | b))
    return int(np.count_nonzero(a & b)) / union if union else 1.0

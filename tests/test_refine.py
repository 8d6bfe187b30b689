"""mal_cli.refine: colour-guided passes must move a blurred outline onto the image's edge, and stay in range."""

import numpy as np
import pytest

from mal_cli.refine import (
    GuidedConfig,
    MeanFieldConfig,
    guided_refine,
    meanfield_refine,
)


def _edge_case(h=60, w=80, edge=47, blur_centre=43.0, blur_width=3.0):
    """An image whose colour changes at column `edge`, and a smooth probability ramp centred a few pixels off it
    (what a coarse logit map upsampled to a large box looks like: about right, but blind to the edge)."""
    rng = np.random.default_rng(0)
    image = np.zeros((h, w, 3), dtype=np.float64)
    image[:, :edge] = (200, 60, 40)
    image[:, edge:] = (40, 90, 200)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    cols = np.arange(w) + 0.5
    prob = 1 / (1 + np.exp((cols - blur_centre) / blur_width))
    prob = np.broadcast_to(prob, (h, w)).astype(np.float32)
    truth = np.zeros((h, w), bool)
    truth[:, :edge] = True
    return prob, image, truth


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize(
    "refine",
    [
        lambda p, i: meanfield_refine(p, i, MeanFieldConfig()),
        lambda p, i: guided_refine(p, i, GuidedConfig(radius_fraction=1 / 16, eps=1e-3)),
    ],
)
def test_refinement_moves_the_outline_to_the_colour_edge(refine):
    prob, image, truth = _edge_case()
    before = _iou(prob >= 0.5, truth)
    refined = refine(prob, image)
    assert refined.shape == prob.shape and refined.dtype == np.float32
    assert refined.min() >= 0.0 and refined.max() <= 1.0
    after = _iou(refined >= 0.5, truth)
    assert after > before + 0.02, (before, after)


def test_meanfield_keeps_a_flat_image_decision():
    """No colour edge: the pairwise term only smooths; a confident map keeps its thresholded mask."""
    prob = np.full((30, 40), 0.1, np.float32)
    prob[5:25, 8:30] = 0.9
    image = np.full((30, 40, 3), 128, np.uint8)
    refined = meanfield_refine(prob, image, MeanFieldConfig())
    assert _iou(refined >= 0.5, prob >= 0.5) > 0.95


def test_meanfield_working_resolution_gives_the_window_size_back():
    prob, image, truth = _edge_case(h=300, w=410, edge=250, blur_centre=238, blur_width=12)
    refined = meanfield_refine(prob, image, MeanFieldConfig(max_side=64, iterations=10))
    assert refined.shape == (300, 410)
    assert _iou(refined >= 0.5, truth) > _iou(prob >= 0.5, truth)


@pytest.mark.parametrize("refine", [meanfield_refine, guided_refine])
def test_empty_window(refine):
    out = refine(np.zeros((0, 5), np.float32), np.zeros((0, 5, 3), np.uint8))
    assert out.shape == (0, 5)

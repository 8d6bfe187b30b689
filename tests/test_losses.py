"""mal_cli.losses: Dice, MIL bags, the colour affinity, the mean-field CRF target, the loss ramp."""

from __future__ import annotations

import math

import pytest
import torch

from mal_cli import losses


def _box(size: int, r0: int, r1: int, c0: int, c1: int, batch: int = 1) -> torch.Tensor:
    b = torch.zeros(batch, size, size)
    b[:, r0:r1, c0:c1] = 1
    return b


# --- Dice and MIL ------------------------------------------------------------------------------------


def test_dice_known_values():
    pred = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    # 1 - 2*1/(2+2); 1 - 2*2/(1+4); identical -> 0; no overlap -> 1
    expected = torch.tensor([0.5, 1 - 4 / 5, 0.0, 1.0])
    torch.testing.assert_close(losses.dice_loss(pred, target), expected, atol=1e-5, rtol=0)
    # Per sample over all non-batch dims: a (B, H, W) input gives (B,)
    assert losses.dice_loss(pred.view(4, 2, 2), target.view(4, 2, 2)).shape == (4,)


def test_mil_is_zero_for_the_box_mask_itself():
    box = _box(16, 3, 11, 5, 14, batch=2)
    box[1] = _box(16, 0, 16, 0, 16)[0]  # a box filling the crop
    mil = losses.mil_loss(box.clone(), box)
    assert mil.shape == (2,)
    assert mil.abs().max() < 1e-5


def test_mil_penalises_spilling_into_the_margin():
    box = _box(16, 4, 12, 4, 12)  # the box is the middle half per axis (a 2x crop)
    all_ones = losses.mil_loss(torch.ones(1, 16, 16), box)
    # Rows and columns: 1 - 2*8/(16+8) = 1/3 each
    assert all_ones.item() > 0.5
    assert all_ones.item() == pytest.approx(2 / 3, abs=1e-4)


def test_mil_penalises_a_missed_row_but_not_the_inside_shape():
    box = _box(16, 4, 12, 4, 12)
    diagonal = torch.zeros(1, 16, 16)
    for k in range(4, 12):  # one pixel per row and column of the box: every bag hit, nothing outside
        diagonal[0, k, k] = 1
    assert losses.mil_loss(diagonal, box).item() < 1e-5
    missing = diagonal.clone()
    missing[0, 7, 7] = 0  # row 7 and column 7 now have no positive
    assert losses.mil_loss(missing, box).item() > 0.05


def test_mil_gradient_is_finite_and_pushes_margin_down():
    box = _box(8, 2, 6, 2, 6)
    prob = torch.full((1, 8, 8), 0.5, requires_grad=True)
    losses.mil_loss(prob, box).sum().backward()
    assert torch.isfinite(prob.grad).all()
    # increasing a margin-row maximum increases the loss
    assert prob.grad[0, 0].max() > 0


# --- colour affinity ------------------------------------------------------------------------------------


def test_colour_affinity_identical_neighbours_and_border():
    image = torch.full((1, 3, 5, 6), 0.3)
    aff = losses.colour_affinity(image, zeta=0.1, kernel=3)
    assert aff.shape == (1, 8, 5, 6)
    torch.testing.assert_close(aff[0, :, 1:-1, 1:-1], torch.ones(8, 3, 4))  # interior: all 8 neighbours identical
    # corners have 3 neighbours in the image, edges 5; neighbours outside the image get 0
    assert aff[0, :, 0, 0].sum().item() == pytest.approx(3.0)
    assert aff[0, :, 0, 3].sum().item() == pytest.approx(5.0)
    assert aff[0, :, 4, 5].sum().item() == pytest.approx(3.0)
    # top-left corner: the neighbours up/left (kernel offsets with dy=-1 or dx=-1) are the zeros
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    for k, (dy, dx) in enumerate(offsets):
        assert aff[0, k, 0, 0].item() == (0.0 if dy < 0 or dx < 0 else pytest.approx(1.0))


def test_colour_affinity_values_and_neighbour_order():
    image = torch.zeros(1, 3, 3, 3)
    image[0, 0, 1, 2] = 0.1  # the right neighbour of the centre differs by 0.1 in one channel
    image[0, :, 2, 1] = 1.0  # the neighbour below is far in colour
    aff = losses.colour_affinity(image, zeta=0.1, kernel=3)
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    centre = {off: aff[0, k, 1, 1].item() for k, off in enumerate(offsets)}
    assert centre[(0, 1)] == pytest.approx(math.exp(-0.01 / (2 * 0.01)))  # exp(-d^2 / (2 zeta^2)) = e^-0.5
    assert centre[(1, 0)] < 1e-30  # |d|^2 = 3: ~0
    for off in [(-1, -1), (-1, 0), (-1, 1), (0, -1), (1, -1), (1, 1)]:
        assert centre[off] == pytest.approx(1.0)
    # symmetric: the right neighbour sees the centre with the same affinity (offset (0, -1))
    assert aff[0, offsets.index((0, -1)), 1, 2].item() == pytest.approx(centre[(0, 1)])


# --- CRF pseudo-mask ---------------------------------------------------------------------------------------


def _two_colour(size: int) -> torch.Tensor:
    image = torch.zeros(1, 3, size, size)
    image[:, :, :, : size // 2] = torch.tensor([0.9, 0.2, 0.1]).view(1, 3, 1, 1)
    image[:, :, :, size // 2 :] = torch.tensor([0.1, 0.3, 0.8]).view(1, 3, 1, 1)
    return image


def test_crf_pseudo_mask_is_zero_outside_the_box():
    torch.manual_seed(0)
    size = 16
    box = _box(size, 3, 12, 2, 9, batch=2)
    prob = torch.rand(2, size, size) * 0.5 + 0.5  # confident foreground everywhere, margin included
    image = torch.rand(2, 3, size, size)
    for iterations in (1, 10):
        pseudo = losses.crf_pseudo_mask(prob, prob, box, image, losses.CRFConfig(iterations=iterations))
        assert pseudo.shape == (2, size, size)
        assert set(pseudo.unique().tolist()) <= {0.0, 1.0}
        assert pseudo[box == 0].sum() == 0
        assert pseudo[box == 1].sum() > 0  # not trivially empty
    # A uniform image, a box-shaped confident prediction: the box stays foreground, bar its corners
    # (no unary term: 100 iterations round the corners off, the outside counting as background)
    flat = torch.full((1, 3, 32, 32), 0.5)
    big = _box(32, 4, 28, 4, 28)
    pseudo = losses.crf_pseudo_mask(big * 0.9, big * 0.9, big, flat, losses.CRFConfig(iterations=100))
    assert pseudo[0, 8:24, 8:24].all()
    assert pseudo.sum() > 0.85 * big.sum()


def test_crf_separates_two_colours_inside_the_box():
    size = 32
    image = _two_colour(size)
    box = _box(size, 2, 30, 2, 30)  # covers both colours
    left = _box(size, 2, 30, 2, size // 2)
    prob = torch.full((1, size, size), 0.5)
    prob[:, :, : size // 2] = 0.6  # the left half is slightly more likely foreground
    pseudo = losses.crf_pseudo_mask(prob, prob, box, image, losses.CRFConfig(iterations=20, zeta=0.1))
    assert pseudo[:, :, size // 2 :].sum() == 0  # nothing of the right colour
    iou = (pseudo * left).sum() / ((pseudo + left) > 0).sum()
    assert iou > 0.75
    assert pseudo[0, 5:27, 5 : size // 2].all()  # the left region's interior is all foreground
    # Colour is what separates them: with a colour-blind affinity (huge zeta) the mask spills right.
    blind = losses.crf_pseudo_mask(prob, prob, box, image, losses.CRFConfig(iterations=20, zeta=10.0))
    assert blind[:, :, size // 2 :].sum() > 20


def _crf_product_form(prob, teacher_prob, box, image, config):
    """MAL's update written literally, in float64: A_fg = prod_j Q_j^k_ij, A_bg = prod_j (1 - Q_j)^k_ij,
    A_fg *= B, Q = clip(A_fg / (A_fg + A_bg)). The reference the logit-space implementation must match."""
    b, h, w = prob.shape
    aff = losses.colour_affinity(image, config.zeta, config.kernel).double()
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    q = ((prob.double() + teacher_prob.double()) / 2 * box).clamp(config.q_min, config.q_max)
    for _ in range(config.iterations):
        a_fg = torch.ones(b, h, w, dtype=torch.float64)
        a_bg = torch.ones(b, h, w, dtype=torch.float64)
        padded = torch.nn.functional.pad(q, (1, 1, 1, 1), value=0.5)  # any value: its affinity is 0
        for k, (dy, dx) in enumerate(offsets):
            q_j = padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            a_fg = a_fg * q_j ** aff[:, k]
            a_bg = a_bg * (1 - q_j) ** aff[:, k]
        a_fg = a_fg * box
        q = (a_fg / (a_fg + a_bg)).clamp(config.q_min, config.q_max)
    return (q > 0.5).float()


@pytest.mark.parametrize("iterations", [0, 1, 5, 100])
def test_crf_equals_the_product_form(iterations):
    gen = torch.Generator().manual_seed(iterations)
    size, batch = 40, 3
    smooth = lambda c: torch.nn.functional.interpolate(  # noqa: E731 - blobs, so regions form and survive
        torch.rand(batch, c, size // 8, size // 8, generator=gen), size=(size, size), mode="bilinear"
    )
    prob = smooth(1)[:, 0]
    teacher = (prob + 0.2 * torch.rand(batch, size, size, generator=gen)).clamp(0, 1)
    box = torch.stack([_box(size, 3 + i, 35, 5, 30 - i)[0] for i in range(batch)])
    image = smooth(3)
    config = losses.CRFConfig(iterations=iterations, zeta=0.15)
    pseudo = losses.crf_pseudo_mask(prob, teacher, box, image, config)
    reference = _crf_product_form(prob, teacher, box, image, config)
    assert 0 < reference.sum() < box.sum()  # a non-trivial target: neither empty nor the whole box
    # float32 in logit space vs float64 products: a pixel sitting exactly at Q = 0.5 could round either way
    assert (pseudo != reference).float().mean() < 1e-3
    assert (pseudo != reference).sum() <= 2


def test_crf_loss_is_dice_to_the_pseudo_mask():
    prob = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    pseudo = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert losses.crf_loss(prob, pseudo).item() == pytest.approx(0.5)


# --- ramp ------------------------------------------------------------------------------------------------


def test_ramp():
    assert losses.ramp(0, 10) == pytest.approx(0.1)
    assert losses.ramp(4, 10) == pytest.approx(0.5)
    assert losses.ramp(9, 10) == 1.0
    assert losses.ramp(1000, 10) == 1.0
    assert losses.ramp(0, 0) == 1.0 and losses.ramp(5, -1) == 1.0
    values = [losses.ramp(s, 50) for s in range(60)]
    assert all(a < b for a, b in zip(values[:49], values[1:50])) and values[-1] == 1.0

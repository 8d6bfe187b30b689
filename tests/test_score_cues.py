"""mal_cli.score's mask-free cues: fill consistency (MIL's row/column rule) and mask agreement."""

import numpy as np

from mal_cli.score import fill_consistency, mask_agreement


def test_fill_consistency_is_one_for_a_mask_touching_every_row_and_column():
    mask = np.zeros((20, 30), bool)
    mask[np.arange(20), (np.arange(20) * 3) // 2] = True  # a thin diagonal still touches every row...
    mask[10, :] = True  # ...and a bar every column
    assert fill_consistency(mask) == 1.0


def test_fill_consistency_counts_the_missed_rows_and_columns():
    mask = np.zeros((20, 40), bool)
    mask[5:15, 0:30] = True  # half the rows, three quarters of the columns
    assert np.isclose(fill_consistency(mask), 0.5 * 0.75)
    assert fill_consistency(np.zeros((5, 5), bool)) == 0.0
    assert fill_consistency(np.zeros((0, 5), bool)) == 0.0


def test_mask_agreement_is_the_iou():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :6] = True
    b[:, 4:] = True
    assert np.isclose(mask_agreement(a, b), 20 / 100)
    assert mask_agreement(a, a) == 1.0
    assert mask_agreement(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0

"""Rank mal_score candidates from the per-box cues benchmarks/levers.py saved (cues.npz): Spearman with the true
IoU and the mean IoU of the 5 % lowest-scored masks vs the rest.

The candidates are fixed here, before looking at any figure (docs/labeler_v2.md): few, so that choosing the
best on the val split is not fitting the val masks.

    python benchmarks/score_combos.py /work/notes/val/runs/levers/cues.npz
"""

from __future__ import annotations

import argparse

import numpy as np
from rank_report import low5_and_rest  # benchmarks/ is sys.path[0] when this file runs

from mal_cli.evaluate import spearman


def candidates(c: dict) -> dict[str, np.ndarray]:
    shipped, fill, mf, flip = c["shipped"], c["fill"], c["mf_iou"], c["flip_iou"]
    return {
        "shipped (confidence+stability)/2": shipped,
        "shipped x fill": shipped * fill,
        "mean(shipped, fill, mf_iou)": (shipped + fill + mf) / 3,
        "shipped x fill x mf_iou": shipped * fill * mf,
        "geomean(shipped, fill, mf_iou, flip_iou) [needs a 2nd model pass]": (shipped * fill * mf * flip) ** 0.25,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cues")
    args = parser.parse_args()
    data = np.load(args.cues)
    keep = ~np.isnan(data["iou"])
    c = {k: data[k][keep].astype(np.float64) for k in data.files if k not in ("ann_id",)}
    iou = c["iou"]
    print(f"{keep.sum()} instances")
    for name, score in {
        **{f"cue {k}": v for k, v in c.items() if k != "iou"},
        **candidates(c),
    }.items():
        lo, rest = low5_and_rest(score, iou)
        print(f"{name:70s} spearman {spearman(score, iou):.3f}   low5 / rest {100 * lo:.1f} / {100 * rest:.1f}")


if __name__ == "__main__":
    main()

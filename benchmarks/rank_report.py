"""mal_score of a labels file against the true IoU: Spearman and mean IoU of the 5 % lowest-scored vs the rest.

python benchmarks/rank_report.py LABELS.json --gt /work/notes/val/val.json
"""

from __future__ import annotations

import argparse

import numpy as np

from mal_cli.dataset import load_dataset
from mal_cli.evaluate import evaluate, spearman


def low5_and_rest(score: np.ndarray, iou: np.ndarray) -> tuple[float, float]:
    """Mean IoU of the 5 % lowest-scored masks and of the rest (stable order, ties by position)."""
    order = np.argsort(score, kind="mergesort")
    n = max(1, round(0.05 * len(score)))
    return float(iou[order[:n]].mean()), float(iou[order[n:]].mean())


def rank_figures(labels, gt) -> dict:
    report = evaluate(labels, gt, compute_ap=False)
    score = {a["id"]: a["mal_score"] for a in labels.annotations if "mal_score" in a}
    ids = [i for i in report.ious if i in score]
    s = np.array([score[i] for i in ids], dtype=np.float64)
    iou = np.array([report.ious[i] for i in ids])
    low5_iou, rest_iou = low5_and_rest(s, iou)
    return {"n": len(ids), "spearman": spearman(s, iou), "low5_iou": low5_iou, "rest_iou": rest_iou}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels")
    parser.add_argument("--gt", required=True)
    args = parser.parse_args()
    f = rank_figures(load_dataset(args.labels), load_dataset(args.gt))
    print(
        f"{f['n']} instances: spearman {f['spearman']:.3f}, "
        f"low5 / rest {100 * f['low5_iou']:.1f} / {100 * f['rest_iou']:.1f}"
    )


if __name__ == "__main__":
    main()

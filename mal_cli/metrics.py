"""Metrics over `mal eval`'s pairing that are not part of its report: how well `mal_score` ranks masks."""

from __future__ import annotations


def spearman_with_iou(labelled, ground_truth) -> tuple[float, int]:
    """Spearman correlation of `mal_score` with the true mask IoU, over the instances `mal eval` pairs.

    `labelled`: what `mal label` wrote (a Dataset or results list with mal_score); `ground_truth`: the
    same boxes' dataset with real masks. Returns (rho, number of instances).
    """
    from mal_cli.evaluate import evaluate, spearman

    report = evaluate(labelled, ground_truth, compute_ap=False)
    records = labelled.annotations if hasattr(labelled, "annotations") else labelled
    score = {r["id"]: r["mal_score"] for r in records if "id" in r and "mal_score" in r}
    ids = [i for i in report.ious if i in score]
    return spearman([score[i] for i in ids], [report.ious[i] for i in ids]), len(ids)

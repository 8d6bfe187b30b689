"""Which boxes `mal train` leaves out and why: the one rule (`collect_training_boxes` keeps the others), and
the count per reason for its first log line.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional


def left_out_reason(ann: dict, min_box_area: float, min_box_side: float) -> Optional[str]:
    """Why training leaves `ann` out, or None when it trains on it."""
    if ann.get("iscrowd", 0):
        return "crowd"
    x, y, w, h = (float(v) for v in ann["bbox"])
    if not all(math.isfinite(v) for v in (x, y, w, h, x + w, y + h, w * h)):
        return "with a non-finite bbox"
    if w <= min_box_side or h <= min_box_side:
        return f"with a side of {min_box_side:g} px or less"
    if w * h <= min_box_area:
        return f"below --min-box-area {min_box_area:g}"
    return None


def describe_training_boxes(dataset, kept: int, min_box_area: float, min_box_side: float) -> str:
    """'77 of 141 boxes (64 left out: 60 below --min-box-area 2048, 4 crowd)', or '141 boxes' when none is."""
    reasons: Counter = Counter()
    for image in dataset.images:
        for ann in dataset.annotations_by_image.get(image["id"], []):
            reasons[left_out_reason(ann, min_box_area, min_box_side)] += 1
    reasons.pop(None, None)
    if not reasons:
        return f"{kept} boxes"
    left_out = sum(reasons.values())
    parts = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
    return f"{kept} of {kept + left_out} boxes ({left_out} left out: {parts})"

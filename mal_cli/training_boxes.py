"""Which boxes `mal train` leaves out and why: the one rule (`collect_training_boxes` keeps the others and
counts these per reason), and that count as its first log line says it.
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


def describe_training_boxes(kept: int, left_out: Counter) -> str:
    """'77 of 141 boxes (64 left out: 60 below --min-box-area 2048, 4 crowd)', or '141 boxes' when none is.
    `left_out`: the count per `left_out_reason` (`collect_training_boxes` fills it)."""
    if not left_out:
        return f"{kept} boxes"
    total_left_out = sum(left_out.values())
    parts = ", ".join(f"{count} {reason}" for reason, count in left_out.most_common())
    return f"{kept} of {kept + total_left_out} boxes ({total_left_out} left out: {parts})"

"""The report `mal eval` produces (`EvalReport`) and its terminal table.

Kept apart from the measuring (mal_cli.evaluate), which re-exports these names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

__all__ = ["EvalReport", "SizeBucket", "report_table"]


@dataclass
class SizeBucket:
    """Instance-averaged mIoU of the matched non-crowd GT instances in one area range."""

    miou: Optional[float]
    count: int


@dataclass
class EvalReport:
    """Everything `evaluate` measured. IoUs and APs are fractions in [0, 1]; None = nothing to average."""

    num_gt: int  # non-crowd GT instances
    num_matched: int  # of those, answered by a prediction
    instance_miou: Optional[float]
    class_miou: Optional[float]
    num_classes: int  # classes averaged in class_miou
    miou_missing_as_zero: Optional[float]  # over all num_gt, unanswered ones scoring 0
    by_size: dict[str, SizeBucket]
    num_crowd: int
    num_crowd_matched: int
    crowd_miou: Optional[float]
    missing_ids: list  # GT annotation ids (crowd included) without a prediction
    num_unmatched_predictions: int  # predictions that answer no GT annotation
    ap_kind: Optional[str]  # "coco-segm", "lvis-segm", or None when AP was not computed
    ap: dict[str, float] = field(default_factory=dict)
    reference_ap: Optional[float] = None
    retention: Optional[float] = None  # ap["AP"] / reference_ap
    ious: dict = field(default_factory=dict)  # GT annotation id -> IoU of its prediction (crowd included)
    protocol: str = "given-box"  # or "detections": PRED's boxes are not the GT's; only AP applies

    def to_dict(self) -> dict:
        """JSON-ready dict; `ious` becomes a list of [gt annotation id, iou] pairs (ids may not be strings)."""
        # Not asdict(self): it would deep-copy `ious` and `missing_ids` (a million entries at LVIS scale)
        # only for the copies to be thrown away. The dict shares `ap` and `missing_ids` with the report.
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["by_size"] = {name: asdict(bucket) for name, bucket in self.by_size.items()}
        out["ious"] = [[ann_id, iou] for ann_id, iou in self.ious.items()]
        return out


def report_table(report: EvalReport, title: str = "mal eval") -> "Any":
    """The report as a rich Table (percentages), for printing to a terminal."""
    from rich.table import Table

    def pct(value: Optional[float]) -> str:
        return "—" if value is None else f"{100 * value:.1f}"

    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("instances", justify="right")
    if report.protocol == "detections":
        table.add_row(
            "detections (PRED's boxes are not the GT's: standard AP)", "", str(report.num_unmatched_predictions)
        )
        table.add_row("non-crowd GT instances", "", str(report.num_gt))
    else:
        _add_given_box_rows(table, report, pct)
    if report.ap_kind:
        label = "LVIS segm" if report.ap_kind == "lvis-segm" else "COCO segm"
        for key, value in report.ap.items():
            # COCOeval's -1: no GT in that area range (or frequency group) to average over.
            table.add_row(f"{label} {key}", pct(value) if value is None or value >= 0 else "— (no GT)", "")
    if report.retention is not None:
        table.add_row(f"retention (AP / {pct(report.reference_ap)})", pct(report.retention), "")
    return table


def _add_given_box_rows(table, report: EvalReport, pct) -> None:
    table.add_row("mIoU (instance-averaged, non-crowd)", pct(report.instance_miou), str(report.num_matched))
    table.add_row("mIoU (class-averaged)", pct(report.class_miou), f"{report.num_classes} classes")
    for name, bucket in report.by_size.items():
        table.add_row(f"  mIoU {name}", pct(bucket.miou), str(bucket.count))
    table.add_row("mIoU counting missing as 0", pct(report.miou_missing_as_zero), str(report.num_gt))
    table.add_row("non-crowd GT without a prediction", "", str(report.num_gt - report.num_matched))
    table.add_row("predictions answering no GT", "", str(report.num_unmatched_predictions))
    table.add_row("crowd mIoU (separate)", pct(report.crowd_miou), f"{report.num_crowd_matched}/{report.num_crowd}")

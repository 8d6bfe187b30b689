"""Reference figures of `mal eval` on the shared dev set (not a pytest module: run it by hand).

    python tests/dev_reference.py [/path/to/coco_dev_train2017/annotations.json]

Default path: ../shared/data/coco_dev_train2017/annotations.json beside the repository. It evaluates,
over the non-crowd instances:
  - the GT against itself                                      -> mIoU 100.0, AP 100.0
  - (a) each box filled as pixel rows floor(y)..ceil(y+h)-1, columns floor(x)..ceil(x+w)-1
                                                               -> mIoU 54.7, segm AP 17.2
  - (b) each box as a 4-point polygon rasterised by pycocotools -> mIoU 58.5, segm AP 21.8
and exits non-zero if a figure is more than 0.1 off.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import oracles  # noqa: E402  (slow references: tests/oracles.py)

from mal_cli import masks  # noqa: E402
from mal_cli.dataset import Dataset, load_dataset  # noqa: E402
from mal_cli.evaluate import evaluate  # noqa: E402

DEFAULT = REPO.parent / "shared" / "data" / "coco_dev_train2017" / "annotations.json"
EXPECTED = {"gt": (100.0, 100.0), "box pixels (a)": (54.7, 17.2), "box polygon (b)": (58.5, 21.8)}


def box_filled(gt: Dataset, kind: str) -> Dataset:
    """Every non-crowd box as its own mask: 'pixels' (outward-rounded rectangle) or 'polygon'."""
    raw = copy.deepcopy(gt.raw)
    raw["annotations"] = [a for a in raw["annotations"] if not a.get("iscrowd", 0)]
    for ann in raw["annotations"]:
        if kind == "polygon":
            ann["segmentation"] = masks.box_polygon(ann["bbox"])
            continue
        image = gt.image_by_id[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        mask = np.zeros((image["height"], image["width"]), np.uint8)
        mask[math.floor(y) : math.ceil(y + h), math.floor(x) : math.ceil(x + w)] = 1
        ann["segmentation"] = oracles.encode(mask)
    return Dataset.from_dict(raw, f"box-{kind}")


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    if not path.exists():
        print(f"skipped: {path} not found")
        return 0
    gt = load_dataset(path)
    preds = {
        "gt": load_dataset(path),
        "box pixels (a)": box_filled(gt, "pixels"),
        "box polygon (b)": box_filled(gt, "polygon"),
    }
    failed = False
    for name, pred in preds.items():
        report = evaluate(pred, gt)
        miou, ap = 100 * report.instance_miou, 100 * report.ap["AP"]
        want_miou, want_ap = EXPECTED[name]
        ok = abs(miou - want_miou) <= 0.1 and abs(ap - want_ap) <= 0.1
        failed |= not ok
        print(
            f"{name:16s} instances {report.num_matched}/{report.num_gt}  mIoU {miou:.2f} (want {want_miou})  "
            f"class mIoU {100 * report.class_miou:.2f}  segm AP {ap:.2f} (want {want_ap})  "
            f"AP50 {100 * report.ap['AP50']:.2f}  AP75 {100 * report.ap['AP75']:.2f}  {'ok' if ok else 'OFF'}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

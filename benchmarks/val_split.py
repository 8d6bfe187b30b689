"""The honest validation split of the dev set: one image in five, by COCO image id (`id % 5 == 0`).

The one place the split is defined. Writes the val and train halves of a COCO json (val keeps its masks, for
measurement; the train half is stripped of masks, so nothing trained from it can see one).

    python benchmarks/val_split.py ../shared/data/coco_dev_train2017/annotations.json --out-dir /work/notes/val
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VAL_MODULUS = 5


def is_val_image(image_id: int) -> bool:
    """True for the images whose boxes no setting may be trained on."""
    return int(image_id) % VAL_MODULUS == 0


def split_dataset(data: dict) -> tuple[dict, dict]:
    """(val, train) copies of a COCO dataset dict; train annotations lose `segmentation`."""
    val_ids = {img["id"] for img in data["images"] if is_val_image(img["id"])}

    def subset(keep_val: bool) -> dict:
        out = {k: v for k, v in data.items() if k not in ("images", "annotations")}
        out["images"] = [i for i in data["images"] if (i["id"] in val_ids) == keep_val]
        anns = [a for a in data["annotations"] if (a["image_id"] in val_ids) == keep_val]
        if not keep_val:
            anns = [{k: v for k, v in a.items() if k != "segmentation"} for a in anns]
        out["annotations"] = anns
        return out

    return subset(True), subset(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("annotations")
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args()
    data = json.loads(Path(args.annotations).read_text())
    val, train = split_dataset(data)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "val.json").write_text(json.dumps(val))
    (out / "train_boxes.json").write_text(json.dumps(train))
    print(
        f"val: {len(val['images'])} images, {len(val['annotations'])} boxes; "
        f"train: {len(train['images'])} images, {len(train['annotations'])} boxes -> {out}"
    )


if __name__ == "__main__":
    main()

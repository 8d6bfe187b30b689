"""`mal viz`: review labels worst-first — overlay PNGs and one self-contained HTML contact sheet.

For every labelled instance (or the `worst` N): a crop of its box with some context, the mask filled and
outlined in its category's colour, the box, and a caption strip (rank, category, annotation id,
`mal_score`, IoU with the ground truth when `gt` is given; the GT outline is drawn dashed white).
Order: lowest IoU first with `gt`, else lowest `mal_score` first (fallbacks score 0, so they lead);
instances without a score or an IoU come last.

Written under OUT:
- `crops/0001_ann<id>.png`, ... one overlay per instance, numbered by review rank;
- `full/<image stem>.png` (with `full=True`): every reviewed instance drawn on the whole image;
- `index.html`: the contact sheet, thumbnails embedded as base64 JPEG (the page works on its own, and
  when the folder is moved its links to crops/ and full/ still resolve: they are relative);
- `review.json`: the same list, machine-readable.
A rerun into the same OUT removes the crops/ and full/ pictures it did not write (only names viz writes).

Pillow (ImageDraw) and numpy only.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import shutil
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import orjson

from mal_cli.dataset import Dataset, image_file_name, load_any, load_dataset
from mal_cli.errors import InputError, OutputError
from mal_cli.fileio import write_bytes_atomic
from mal_cli.images import check_pixel_budget
from mal_cli.safe_paths import image_path, is_inside, refuse_inputs_under, write_error
from mal_cli.segmentation_check import checked_decode, checked_rle, validate_segmentation
from mal_cli.viz_draw import CONTEXT, category_color, full_picture_size, render_crop, render_full, resized_mask

__all__ = ["ReviewItem", "category_color", "collect_items", "render_crop", "render_full", "write_review"]

THUMB_SIDE = 224
CROWD_COLOR = (160, 160, 160)  # crowd regions in grey: a region of many objects, not one instance
_CROP_NAME = re.compile(r"\d{4,}_ann.*\.png")  # the names viz writes under crops/ (rank, annotation id)


@dataclass
class ReviewItem:
    rank: int
    ann_id: Any
    image_id: Any
    file_name: str
    category_id: Any
    category: str
    mal_score: Optional[float]
    iou: Optional[float]
    fallback: Optional[str]
    bbox: list
    crowd: bool = False
    crop: str = ""
    full: str = ""


# --- what to review, in which order -----------------------------------------------------------------


def collect_items(
    labels: Union[Dataset, list], gt: Optional[Dataset] = None, image_info: Optional[Dataset] = None
) -> tuple[list[ReviewItem], dict, dict, dict]:
    """Review items sorted worst-first, plus {ann key: record}, {image id: image} and {key: GT ann}.

    A results list (no annotation ids) is keyed by its position; its images come from `image_info` or `gt`.
    """
    from mal_cli.evaluate import pair_predictions

    if isinstance(labels, Dataset):
        records = labels.annotations
        meta = labels
    else:
        records = labels
        meta = image_info or gt
        if meta is None:
            raise InputError("LABELS is a results list: pass --image-info DATASET.json (or --gt) for the images")
    images = {im["id"]: im for im in meta.images}
    names = {c["id"]: _label(c.get("name", c["id"])) for c in meta.categories}
    if gt is not None:
        names.update({c["id"]: _label(c.get("name", c["id"])) for c in gt.categories if c["id"] not in names})
    keyed = {(r["id"] if isinstance(labels, Dataset) else k): r for k, r in enumerate(records)}
    key_of = {id(r): k for k, r in keyed.items()}

    ious: dict = {}
    gt_of: dict = {}
    if gt is not None:
        import pycocotools.mask as mask_utils

        pairs, _ = pair_predictions(labels, gt)
        for gt_ann, pred in pairs:
            if not pred.get("segmentation") or "segmentation" not in gt_ann:
                continue
            image = gt.image_by_id[gt_ann["image_id"]]
            h, w = image["height"], image["width"]
            a = _checked(pred["segmentation"], h, w, f"annotation {gt_ann['id']}", checked_rle)
            b = _checked(gt_ann["segmentation"], h, w, f"{gt.source}: GT annotation {gt_ann['id']}", checked_rle)
            key = key_of[id(pred)]
            ious[key] = float(mask_utils.iou([a], [b], [0])[0][0])
            gt_of[key] = gt_ann

    items = []
    for key, rec in keyed.items():
        if not rec.get("segmentation"):
            continue
        image = images.get(rec["image_id"])
        if image is None:
            raise InputError(f"annotation {key} refers to image id {rec['image_id']}, which has no image record")
        score = rec.get("mal_score")
        _check_box(rec.get("bbox"), f"annotation {key}")
        items.append(
            ReviewItem(
                rank=0,
                ann_id=key,
                image_id=rec["image_id"],
                file_name=image_file_name(image),
                category_id=rec.get("category_id"),
                category=names.get(rec.get("category_id"), str(rec.get("category_id"))),
                mal_score=float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None,
                iou=ious.get(key),
                fallback=_label(rec["mal_fallback"]) if rec.get("mal_fallback") else None,
                bbox=list(rec["bbox"]),
                crowd=bool(rec.get("iscrowd")),
            )
        )
    position = {item.ann_id: k for k, item in enumerate(items)}

    def order(item: ReviewItem):
        value = item.iou if gt is not None else item.mal_score
        return (value is None, value if value is not None else 0.0, position[item.ann_id])

    items.sort(key=order)
    for rank, item in enumerate(items, 1):
        item.rank = rank
    return items, keyed, images, gt_of


def _label(value: Any, limit: int = 120) -> str:
    """A name as drawn and listed: one line, at most `limit` characters (a 2 MB name would stall the drawing)."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_box(bbox: Any, where: str) -> None:
    if not (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    ):
        raise InputError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {str(bbox)[:60]}")


def _checked(segmentation: Any, height: int, width: int, where: str, convert=None):
    """`segmentation` through `segmentation_check` (the rule eval and export apply too), or InputError."""
    try:
        return (convert or checked_decode)(segmentation, height, width)
    except (ValueError, TypeError) as err:
        raise InputError(f"{where}: bad segmentation: {err}") from None


# --- the review folder --------------------------------------------------------------------------------


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3f}"


def _thumbnail_b64(picture) -> str:
    thumb = picture.copy()
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE + 60))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=82)
    return base64.b64encode(buf.getvalue()).decode("ascii")


_LEGEND = (
    "Mask: filled and outlined in the\ncategory colour; box: rectangle; ground-truth outline (with --gt): dashed white;"
    " crowd regions (iscrowd): grey, captioned 'crowd'. Click a picture for the full-size crop."
)


def _html(items: list[ReviewItem], thumbs: dict, title: str, sort_key: str, total: int) -> str:
    cards = []
    for item in items:
        bits = [
            f"<b>#{item.rank}</b> {html.escape(item.category)}",
            f"mal_score {_fmt(item.mal_score)}" + (f" · IoU {_fmt(item.iou)}" if sort_key == "IoU" else ""),
            f"ann {html.escape(str(item.ann_id))} · {html.escape(item.file_name)}",
        ]
        if item.crowd:
            bits.append("<span class=fb>crowd</span>")
        if item.fallback:
            bits.append(f"<span class=fb>fallback: {html.escape(item.fallback)}</span>")
        links = f'<a href="{html.escape(item.crop)}">crop</a>'
        if item.full:
            links += f' · <a href="{html.escape(item.full)}">image</a>'
        cards.append(
            f'<figure><a href="{html.escape(item.crop)}"><img loading=lazy alt="#{item.rank}" '
            f'src="data:image/jpeg;base64,{thumbs[item.ann_id]}"></a>'
            f"<figcaption>{'<br>'.join(bits)}<br>{links}</figcaption></figure>"
        )
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>
<style>
body{{font:14px system-ui,sans-serif;margin:16px;background:#111;color:#ddd}}
h1{{font-size:18px;margin:0 0 4px}} p{{margin:0 0 12px;color:#aaa}} a{{color:#8cf}}
main{{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:10px}}
figure{{margin:0;background:#1c1c1c;padding:6px;border-radius:4px}}
img{{max-width:100%;display:block;margin:auto}} figcaption{{font-size:12px;margin-top:4px;line-height:1.4}}
.fb{{color:#f88}}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(items)} of {total} labelled instances, worst first by {sort_key}. {_LEGEND}</p>
<main>
{chr(10).join(cards)}
</main></body></html>
"""


def write_review(
    labels: str,
    images_dir: Union[str, Path],
    out_dir: Union[str, Path],
    worst: Optional[int] = None,
    gt: Optional[str] = None,
    image_info: Optional[str] = None,
    full: bool = False,
    context: float = CONTEXT,
    progress_bar: bool = False,
    allow_outside_images: bool = False,
) -> dict:
    """Write OUT/crops, OUT/full (optional), OUT/index.html and OUT/review.json. Returns a summary dict.

    Image files are `file_name` under `images_dir`; absolute and `..` names are refused unless
    `allow_outside_images` (see `safe_paths`). Every file is written to a temp name and renamed.
    """
    if worst is not None and worst < 1:
        raise InputError(f"--worst must be at least 1, got {worst}")
    if not context >= 0 or not math.isfinite(context):
        raise InputError(f"--context must be a finite number, 0 or more, got {context}")
    out = Path(out_dir)
    written = [out / "crops", out / "full", out / "index.html", out / "review.json"]
    refuse_inputs_under(written, [labels, gt, image_info, images_dir], "--out")
    loaded = load_any(labels)
    gt_ds = load_dataset(gt) if gt else None
    info_ds = load_dataset(image_info) if image_info else None
    items, records, images, gt_of = collect_items(loaded, gt_ds, info_ds)
    total = len(items)
    if worst is not None:
        items = items[:worst]
    by_image: dict = defaultdict(list)
    for item in items:
        by_image[item.image_id].append(item)
    paths = {
        image_id: image_path(
            images_dir, image_file_name(images[image_id]), f"image id {image_id}", allow_outside_images
        )
        for image_id in by_image
    }
    full_names = _full_names(by_image, images) if full else {}
    _check_before_writing(items, records, images, gt_of)
    created = not out.exists()
    try:
        (out / "crops").mkdir(parents=True, exist_ok=True)
        if full:
            (out / "full").mkdir(exist_ok=True)
    except OSError as err:
        raise OutputError(f"{out}: cannot create the output folder: {err.strerror or err}") from None
    for sub in ("crops", "full") if full else ("crops",):
        if not is_inside(out / sub, out):
            raise OutputError(f"{out / sub}: a link out of {out}; refusing to write through it (remove it and rerun)")
    try:
        return _write_folder(
            out,
            items,
            total,
            by_image,
            records,
            images,
            gt_of,
            paths,
            full_names,
            context,
            progress_bar,
            labels,
            gt,
        )
    except BaseException:
        if created:  # a folder this run made holds nothing worth keeping
            shutil.rmtree(out, ignore_errors=True)
        raise


def _check_before_writing(items: list, records: dict, images: dict, gt_of: dict) -> None:
    """Every declared size and every segmentation to draw, checked before OUT is touched."""
    for item in items:
        image = images[item.image_id]
        if "height" not in image or "width" not in image:
            continue  # sized from its pixels or boxes later
        h, w = check_pixel_budget(image["height"], image["width"], f"image id {image['id']}")
        _checked(records[item.ann_id]["segmentation"], h, w, f"annotation {item.ann_id}", validate_segmentation)
        gt_ann = gt_of.get(item.ann_id)
        if gt_ann is not None:
            _checked(gt_ann["segmentation"], h, w, f"GT annotation {gt_ann['id']}", validate_segmentation)


def _write_folder(
    out: Path,
    items: list,
    total: int,
    by_image: dict,
    records: dict,
    images: dict,
    gt_of: dict,
    paths: dict,
    full_names: dict,
    context: float,
    progress_bar: bool,
    labels: str,
    gt: Optional[str],
) -> dict:
    full = bool(full_names)
    with_gt = bool(gt)  # GT read (write_review loads it exactly when `gt` is given)
    thumbs: dict = {}
    missing_images: list[str] = []
    iterator = by_image.items()
    if progress_bar:
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (no '\r' lines in a redirected log).
        iterator = tqdm(iterator, total=len(by_image), desc="mal viz", unit="img", file=sys.stderr, disable=None)
    for image_id, group in iterator:
        rgb = _image_or_grey(paths[image_id], images[image_id], group, missing_images)
        height, width = rgb.shape[:2]
        full_size = full_picture_size(height, width)
        instances = []
        for item in group:
            # One full-size mask at a time: the crop and the downscaled copy for --full are all that is kept.
            mask = _checked(records[item.ann_id]["segmentation"], height, width, f"annotation {item.ann_id}")
            gt_ann = gt_of.get(item.ann_id)
            gt_mask = (
                _checked(gt_ann["segmentation"], height, width, f"GT annotation {gt_ann['id']}") if gt_ann else None
            )
            color = CROWD_COLOR if item.crowd else category_color(item.category_id)
            caption = [
                f"#{item.rank}  {item.category}  (ann {item.ann_id})" + ("  crowd" if item.crowd else ""),
                f"mal_score {_fmt(item.mal_score)}"
                + (f"   IoU {_fmt(item.iou)}" if with_gt else "")
                + (f"   {item.fallback}" if item.fallback else ""),
            ]
            picture = render_crop(rgb, mask, item.bbox, color, caption, gt_mask, context)
            item.crop = f"crops/{item.rank:04d}_ann{_safe(item.ann_id)}.png"
            _save_png(picture, out / item.crop)
            thumbs[item.ann_id] = _thumbnail_b64(picture)
            if full:
                instances.append(
                    (
                        resized_mask(mask, full_size),
                        item.bbox,
                        color,
                        f"#{item.rank} {item.category}{' crowd' if item.crowd else ''} {_fmt(item.mal_score)}",
                    )
                )
            del mask, gt_mask
        if full:
            name = full_names[image_id]
            _save_png(render_full(rgb, instances), out / name)
            for item in group:
                item.full = name

    _remove_stale(out, {out / item.crop for item in items} | {out / name for name in full_names.values()})
    sort_key = "IoU" if with_gt else "mal_score"
    title = f"mal viz: {Path(labels).name if labels != '-' else '<stdin>'}" + (f" vs {Path(gt).name}" if gt else "")
    write_bytes_atomic(out / "index.html", _html(items, thumbs, title, sort_key, total).encode("utf-8"))
    write_bytes_atomic(
        out / "review.json",
        orjson.dumps({"sorted_by": sort_key, "total": total, "items": [asdict(item) for item in items]}),
    )
    return {
        "instances": len(items),
        "total": total,
        "images": len(by_image),
        "sorted_by": sort_key,
        "missing_images": missing_images,
        "out": str(out),
    }


def _remove_stale(out: Path, written: set) -> None:
    """Crops and full pictures of an earlier run into the same OUT, gone; only names viz writes, nothing else."""
    stale = [p for p in (out / "crops").glob("*.png") if _CROP_NAME.fullmatch(p.name)]
    stale += list((out / "full").glob("*.png"))
    for path in stale:
        if path not in written and (path.is_file() or path.is_symlink()):
            try:
                path.unlink()
            except OSError as err:
                raise write_error(err, path) from None


def _image_or_grey(path: Path, image: dict, group: list, missing_images: list) -> np.ndarray:
    """The image's pixels; grey of the declared size (within the pixel budget) when they cannot be used."""
    from mal_cli.images import ImageLoadError, load_rgb

    where = f"image id {image['id']}"
    hw = check_pixel_budget(image["height"], image["width"], where) if "height" in image and "width" in image else None
    try:
        rgb = load_rgb(path, expected_hw=hw)
    except ImageLoadError:
        missing_images.append(str(path))
        rgb = None
    if rgb is None or (hw is not None and rgb.shape[:2] != tuple(hw)):
        # No usable pixels: draw on grey so the mask is still reviewable.
        if hw is None:
            boxes = [item.bbox for item in group]
            hw = (int(max(b[1] + b[3] for b in boxes)) + 1, int(max(b[0] + b[2] for b in boxes)) + 1)
            hw = check_pixel_budget(max(hw[0], 1), max(hw[1], 1), f"{where} (size from its boxes)")
        rgb = np.full((hw[0], hw[1], 3), 96, dtype=np.uint8)
    return rgb


def _full_names(by_image: dict, images: dict) -> dict:
    """OUT/full/ names, one per image: the file stem, plus the image id where two images share a stem
    (train/x.jpg and val/x.jpg)."""
    stems = {image_id: _safe(Path(image_file_name(images[image_id])).stem) for image_id in by_image}
    counts: dict = defaultdict(int)
    for stem in stems.values():
        counts[stem] += 1
    return {
        image_id: f"full/{stem}.png" if counts[stem] == 1 else f"full/{stem}_img{_safe(image_id)}.png"
        for image_id, stem in stems.items()
    }


def _save_png(picture, path: Path) -> None:
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    write_bytes_atomic(path, buf.getvalue())


def _safe(value: Any) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(value))

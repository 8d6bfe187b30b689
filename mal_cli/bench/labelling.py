"""Labelling benchmarks: `mal label` end to end, the pipeline with a zero-cost model, and its stages apart."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import orjson

from mal_cli.bench.common import child_usage, run_child, sync
from mal_cli.errors import InputError


def subset_dataset(dataset: str, limit: Optional[int], folder: Path, repeat: int = 1) -> tuple[str, int, int]:
    """DATASET, or a copy holding its first whole images with at least `limit` boxes in total, `repeat` times
    over: each copy gets new image and annotation ids (offset by a multiple of the largest), the same files."""
    raw = orjson.loads(Path(dataset).read_bytes())
    anns = raw["annotations"]
    if (limit is None or limit >= len(anns)) and repeat == 1:
        return dataset, len(raw["images"]), len(anns)
    images, kept = raw["images"], anns
    if limit is not None and limit < len(anns):
        by_image: dict[Any, list] = {}
        for ann in anns:
            by_image.setdefault(ann["image_id"], []).append(ann)
        images, kept = [], []
        for image in raw["images"]:
            if len(kept) >= limit:
                break
            boxes = by_image.get(image["id"], [])
            if boxes:
                images.append(image)
                kept.extend(boxes)
    if repeat > 1:
        ids = [im["id"] for im in images] + [a["id"] for a in kept]
        if not all(isinstance(i, int) for i in ids):
            raise InputError(f"--repeat needs integer image and annotation ids ({dataset} has others)")
        step = max(ids, default=0) + 1
        images = [dict(im, id=im["id"] + r * step) for r in range(repeat) for im in images]
        kept = [dict(a, id=a["id"] + r * step, image_id=a["image_id"] + r * step) for r in range(repeat) for a in kept]
    sub = dict(raw)
    sub["images"], sub["annotations"] = images, kept
    path = folder / "bench_subset.json"
    path.write_bytes(orjson.dumps(sub))
    return str(path), len(images), len(kept)


def end_to_end(
    dataset: str,
    images: str,
    method: str,
    checkpoint: Optional[str],
    device: str,
    batch_size: int,
    workers: Optional[int],
    folder: Path,
    crop_sizes: Optional[str] = None,
    compile: bool = False,
    precision: str = "auto",
) -> dict:
    """One `mal label` run in a subprocess: in-run and wall boxes/s, peak RSS of the process (MiB). The model's
    options (checkpoint, crop sizes, compile, precision) go to `--method mal` only: `box` runs no model."""
    out = folder / f"bench_{method}.json"
    summary_path = folder / f"bench_{method}_summary.json"
    cmd = [
        sys.executable,
        "-m",
        "mal_cli",
        "label",
        dataset,
        "--images",
        images,
        "--out",
        str(out),
        "--method",
        method,
        "--device",
        device,
        "--batch-size",
        str(batch_size),
        "--no-progress",
        "--summary-json",
        str(summary_path),
    ]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    if method == "mal":
        cmd += ["--precision", precision] + (["--compile"] if compile else [])
        cmd += ["--crop-sizes", crop_sizes] if crop_sizes else []
        cmd += ["--checkpoint", checkpoint] if checkpoint else []
    usage, wall = run_child(cmd, f"mal label ({method})")
    cpu_seconds = usage.ru_utime + usage.ru_stime
    summary = orjson.loads(summary_path.read_bytes())
    out.unlink(missing_ok=True)
    boxes = int(summary["boxes"])
    return {
        "method": method,
        "boxes": boxes,
        "images": int(summary["images"]),
        "seconds_in_run": float(summary["seconds"]),
        "boxes_per_s": round(boxes / summary["seconds"], 1) if summary["seconds"] else None,
        "seconds_wall": round(wall, 3),
        "boxes_per_s_wall": round(boxes / wall, 1) if wall else None,
        # CPU seconds of the run and its reaped workers: on a shared machine, boxes per CPU-second is steadier.
        **child_usage(usage),
        "boxes_per_cpu_s": round(boxes / cpu_seconds, 2) if cpu_seconds else None,
        "device": summary.get("device"),
        "precision": summary.get("precision"),
        "batch_size": batch_size,
        "workers": workers,
    }


def _pipeline_child(args_json: str, result_json: str) -> None:
    """The subprocess of `pipeline_ceiling`: `mal label --method mal` with the model swapped for a stand-in."""
    import torch

    from mal_cli.labeling import run as label_run
    from mal_cli.labeling.options import LabelOptions, parse_crop_sizes
    from mal_cli.predictor import BoxPredictor

    args = orjson.loads(Path(args_json).read_bytes())
    discs: dict = {}

    def stand_in_probs(self, crops: torch.Tensor, box_areas: torch.Tensor) -> torch.Tensor:
        # `BoxPredictor.device_probs` without the model: the crops still go to the device (and the
        # probabilities back, in `submit_crops`); a soft disc for every box, so paste, threshold, score and
        # RLE do the work a real mask gives them.
        crops = self.to_device(crops)
        m = self.model.mask_size
        if m not in discs:
            axis = torch.linspace(-1, 1, m)
            radius = (axis[:, None] ** 2 + axis[None, :] ** 2).sqrt()
            discs[m] = torch.sigmoid(8 * (0.8 - radius)).to(self.device)
        return discs[m].expand(len(crops), m, m)

    BoxPredictor.device_probs = stand_in_probs
    loop = {"cpu": 0.0, "seconds": 0.0}
    run_groups = label_run.run_groups

    def timed_run_groups(*args, **kwargs):  # the labelling loop alone: no model load, input parse or output write
        cpu, start = time.process_time(), time.perf_counter()
        try:
            return run_groups(*args, **kwargs)
        finally:
            loop["cpu"] += time.process_time() - cpu
            loop["seconds"] += time.perf_counter() - start

    label_run.run_groups = timed_run_groups
    options = LabelOptions(
        method="mal",
        checkpoint=args["checkpoint"],
        device=args["device"],
        batch_size=args["batch_size"],
        workers=args["workers"],
        crop_sizes=parse_crop_sizes(args["crop_sizes"]) if args["crop_sizes"] else None,
    )
    summary = label_run.label_shard(args["dataset"], args["images"], args["out"], options, progress_bar=False)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the reaped DataLoader workers and paste/RLE pool
    Path(result_json).write_bytes(
        orjson.dumps(
            {
                "summary": summary.to_dict(),
                "loop_seconds": loop["seconds"],
                "loop_main_cpu_seconds": loop["cpu"],
                "workers_cpu_seconds": children.ru_utime + children.ru_stime,
            }
        )
    )


def pipeline_ceiling(
    dataset: str,
    images: str,
    checkpoint: Optional[str],
    device: str,
    batch_size: int,
    workers: Optional[int],
    folder: Path,
    crop_sizes: Optional[str] = None,
) -> dict:
    """`mal label --method mal`'s whole path (decode, crop, transfers, paste, score, RLE, write) with the model
    replaced by a stand-in that costs nothing: how fast the pipeline alone can feed and drain a model.

    Reported: boxes/s in run (as `mal label` prints it: start-up included) and in the labelling loop alone,
    and the CPU milliseconds a box costs in the main process during the loop and in the worker processes
    (DataLoader and paste/RLE pool). The main process is serial, so 1000 / its ms a box bounds boxes/s
    however fast the device; the workers' share divides over the cores.
    """
    out = folder / "bench_pipeline.json"
    args_path, result_path = folder / "pipeline_args.json", folder / "pipeline_result.json"
    args_path.write_bytes(
        orjson.dumps(
            {
                "dataset": dataset,
                "images": images,
                "out": str(out),
                "checkpoint": checkpoint,
                "device": device,
                "batch_size": batch_size,
                "workers": workers,
                "crop_sizes": crop_sizes,
            }
        )
    )
    cmd = [sys.executable, "-m", "mal_cli.bench", "pipeline-child", str(args_path), str(result_path)]
    run_child(cmd, "mal label (pipeline stand-in)")
    info = orjson.loads(result_path.read_bytes())
    out.unlink(missing_ok=True)
    summary = info["summary"]
    boxes = int(summary["boxes"])
    main_ms = 1000 * info["loop_main_cpu_seconds"] / boxes if boxes else None
    return {
        "boxes": boxes,
        "seconds_in_run": float(summary["seconds"]),
        "boxes_per_s": round(boxes / summary["seconds"], 1) if summary["seconds"] else None,
        "seconds_in_loop": round(info["loop_seconds"], 3),
        "boxes_per_s_in_loop": round(boxes / info["loop_seconds"], 1) if info["loop_seconds"] else None,
        "main_cpu_ms_per_box": round(main_ms, 4) if main_ms else None,
        "workers_cpu_ms_per_box": round(1000 * info["workers_cpu_seconds"] / boxes, 4) if boxes else None,
        "main_process_ceiling_boxes_per_s": round(1000 / main_ms, 1) if main_ms else None,
        "device": summary.get("device"),
        "precision": summary.get("precision"),
        "batch_size": batch_size,
        "workers": workers,
    }


def _post_stages(task, t: dict) -> list:
    """One image's results through `mal label`'s own post-processing functions, timing paste (+ threshold +
    score) and RLE apart."""
    from mal_cli.labeling.postprocess import box_result, box_result_of, paste_prob
    from mal_cli.pixels import box_xyxy
    from mal_cli.score import mask_quality

    results = []
    for i, position in enumerate(task.record_positions):
        k = task.model_index[i]
        if task.probs is None or k < 0 or task.error:
            s = time.perf_counter()
            result = box_result_of(task, i)  # the filled box (or a fallback)
            t["rle"] += time.perf_counter() - s
        else:
            s = time.perf_counter()
            pred = paste_prob(task.probs[k], box_xyxy(task.boxes_xywh[i]), task.regions[k], task.hw, task.threshold)
            score = mask_quality(pred.window_prob, task.threshold)
            s2 = time.perf_counter()
            t["paste"] += s2 - s
            result = box_result(pred.window_mask, pred.window, task.hw, score, task.fmt)
            t["rle"] += time.perf_counter() - s2
        results.append((position, result))
    return results


def _load_group(group, predictor, t: dict) -> tuple[list, Any, Any]:
    """A group through `mal label`'s loader functions, timing decode and crop apart."""
    import torch

    from mal_cli.labeling.loader import load_image
    from mal_cli.pixels import Margins
    from mal_cli.predictor import BoxCrops

    loaded, parts = [], []
    margins = predictor.margins if predictor else Margins.uniform()
    for i, job in enumerate(group):
        s = time.perf_counter()
        item, image, _ = load_image(job, i, predictor is not None, margins)
        t["decode"] += time.perf_counter() - s
        loaded.append(item)
        if item.regions:
            s = time.perf_counter()
            chw = torch.from_numpy(np.array(image, copy=not image.flags.writeable)).permute(2, 0, 1)
            parts.append(predictor.crop_plan.crops(chw, item.regions, item.box_areas))
            t["crop"] += time.perf_counter() - s
    crops = BoxCrops.cat(parts) if parts else None
    return loaded, crops, torch.tensor([a for item in loaded for a in item.box_areas])


def stage_benchmark(
    dataset: str,
    images: str,
    checkpoint: Optional[str],
    device: str,
    batch_size: int,
    method: str = "mal",
    max_boxes: Optional[int] = None,
    crop_sizes: Optional[str] = None,
    precision: str = "auto",
) -> dict:
    """A serial pass over `mal label`'s own plan, loader and post-processing functions, timing decode / crop /
    model / paste / RLE / write apart (seconds and ms per box)."""
    from mal_cli.labeling.index import read_boxes
    from mal_cli.labeling.options import LabelOptions, default_checkpoint, parse_crop_sizes
    from mal_cli.labeling.plan import group_jobs, plan_jobs
    from mal_cli.labeling.postprocess import ImageTask
    from mal_cli.labeling.progress import image_line

    predictor = None
    if method == "mal":
        from mal_cli.labeling.run import load_predictor

        options = LabelOptions(
            device=device, crop_sizes=parse_crop_sizes(crop_sizes) if crop_sizes else None, precision=precision
        )
        predictor = load_predictor(options, Path(checkpoint) if checkpoint else default_checkpoint())
    t = dict.fromkeys(("decode", "crop", "model", "paste", "rle", "write"), 0.0)
    boxes_done = 0
    index = read_boxes(dataset)
    for group in group_jobs(plan_jobs(index, images, only_missing=False), batch_size):
        if max_boxes is not None and boxes_done >= max_boxes:
            break
        loaded, crops, areas = _load_group(group, predictor, t)
        probs = None
        if crops is not None:
            s = time.perf_counter()
            probs = predictor.predict_crops(crops, areas, batch_size).numpy()
            sync(predictor.device)
            t["model"] += time.perf_counter() - s
        start = 0
        for job, item in zip(group, loaded):
            image_probs = None if probs is None else probs[start : start + item.num_model_boxes]
            start += item.num_model_boxes
            task = ImageTask.of(job, item, image_probs, predictor.threshold if predictor else 0.5, "rle")
            results = _post_stages(task, t)
            s = time.perf_counter()
            image_line(job.position, results)
            t["write"] += time.perf_counter() - s
            boxes_done += job.num_boxes
    total = sum(t.values())
    return {
        "method": method,
        "boxes": boxes_done,
        "seconds": {k: round(v, 4) for k, v in t.items()},
        "ms_per_box": {k: round(1000 * v / max(boxes_done, 1), 4) for k, v in t.items()},
        "share": {k: round(v / total, 4) if total else None for k, v in t.items()},
        "serial_boxes_per_s": round(boxes_done / total, 1) if total else None,
    }

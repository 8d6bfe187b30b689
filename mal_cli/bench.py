"""`mal bench`: how fast `mal label` (and `mal train`) is, where its time goes, how far the model is from the hardware.

Six measurements, all on the same code paths `mal label` (6: `mal train`) uses:

1. end to end: `mal label` runs in a fresh subprocess per method (`mal` = the labeler, `box` = filled boxes,
   the pipeline alone) on DATASET, or on its first whole images holding `--limit` boxes, `--repeat` times over
   (new ids each copy: a run long enough for a fast GPU on a small set). Reported: boxes/s
   in-run (the run's own clock, as `mal label` prints it) and with process start-up (the wall clock of the
   command), and the peak resident memory of the labelling process (its DataLoader workers are separate
   processes, each far smaller).
2. pipeline (with `mal`; `--no-pipeline` skips it): `mal label --method mal` in a fresh subprocess with the
   model swapped for a zero-cost stand-in (a soft disc per box, after the same host-to-device and back
   transfers): the pipeline's own boxes/s, and its CPU ms a box in the main process during the labelling loop
   and in the worker processes. The main process is serial: 1000 / its ms a box bounds boxes/s on any device.
3. stages: one serial pass in this process (no workers) over the same boxes, timing each stage of the
   pipeline apart: decode -> crop -> model -> paste (+ threshold + score) -> RLE -> write (JSON line).
   With workers, decode and crop overlap the model (and paste/RLE run in a pool), so the stage sum is an
   upper bound of the end-to-end time.
4. model: encoder + decoder alone, one batch of `--batch-size` random crops routed and sized like the
   dataset's boxes (`--crop-sizes`, as `mal label`; bf16 autocast, as `BoxPredictor`), boxes/s and achieved
   FLOP/s, FLOPs counted with `torch.utils.flop_counter.FlopCounterMode` (per box and route: encoder /
   decoder, with `mal label`'s plan and as the exact model: full crop, trained decoder scale).
5. peak: a bf16 matmul on the device, the ceiling the model's FLOP/s is compared with.
6. train (`--train`, off by default): the training loop of `mal train` (`mal_cli.train.train`, no validation,
   no progress bar) in a fresh subprocess for `--train-steps` steps at `--train-crop-size` and
   `--train-batch-size`, on the whole DATASET. From its metrics.jsonl (a line every 5 steps: step, seconds
   since the loop began): steady samples/s = samples between the first logged step >= `--train-warmup` and
   the last one / the time between them (process start-up, DataLoader workers and kernel/allocator warm-up
   left out), the overall rate, the wall time and the peak RSS of the process (GPU: peak allocated memory).
   FLOPs per training sample (FlopCounterMode: student forward + backward + EMA-teacher forward; matmul, conv
   and attention only, the CRF and the augmentation are elementwise and not counted) at that crop, weighted
   by the routes of the dataset's training boxes, give the achieved TFLOP/s and, with `peak`, the fraction
   of the bf16 peak. Without `--backbone-weights` the run uses random backbone weights (the same cost;
   nothing is downloaded). Then, in the same subprocess, the step split (`--train-split-steps`,
   `train_step_split`): each stage of a step timed apart, and the DataLoader alone.

`--json FILE` writes everything as JSON; the table goes to stderr. No figure here is asserted anywhere:
timings on a shared machine are noisy, repeat them.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import orjson

from mal_cli.errors import InputError

__all__ = [
    "run_bench", "measure_peak_flops", "model_benchmark", "stage_benchmark", "end_to_end", "pipeline_ceiling",
    "train_benchmark",
    "training_flops_per_sample",
]


def _subset(dataset: str, limit: Optional[int], folder: Path, repeat: int = 1) -> tuple[str, int, int]:
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


def _run_child(cmd: Sequence[str], what: str, env: Optional[dict] = None):
    """Run a benchmark subprocess (stdout dropped); returns its own rusage and wall seconds, or raises with
    the tail of its stderr.

    wait4: this child's own rusage (peak RSS of that process; its reaped workers are included as a maximum,
    never a sum), not the running maximum over all children that RUSAGE_CHILDREN gives.
    """
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err_file.seek(0)
            raise RuntimeError(f"{what} failed: {err_file.read().decode(errors='replace').strip()[-2000:]}")
    return usage, wall


def end_to_end(
    dataset: str,
    images: str,
    method: str,
    checkpoint: Optional[str],
    device: str,
    batch_size: int,
    workers: Optional[int],
    folder: Path,
    extra: Sequence[str] = (),
    crop_sizes: Optional[str] = None,
) -> dict:
    """One `mal label` run in a subprocess: in-run and wall boxes/s, peak RSS of the process (MiB)."""
    out = folder / f"bench_{method}.json"
    summary_path = folder / f"bench_{method}_summary.json"
    cmd = [sys.executable, "-m", "mal_cli", "label", dataset, "--images", images, "--out", str(out), "--method", method,
           "--device", device, "--batch-size", str(batch_size), "--no-progress", "--summary-json", str(summary_path), *extra]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    if crop_sizes and method == "mal":
        cmd += ["--crop-sizes", crop_sizes]
    if checkpoint and method == "mal":
        cmd += ["--checkpoint", checkpoint]
    usage, wall = _run_child(cmd, f"mal label ({method})")
    peak_kib = usage.ru_maxrss
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
        "peak_rss_mib": round(peak_kib / 1024, 1) if peak_kib else None,
        # CPU seconds of the run and its reaped workers: on a shared machine, boxes per CPU-second is steadier than boxes/s.
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
        "boxes_per_cpu_s": round(boxes / (usage.ru_utime + usage.ru_stime), 2) if usage.ru_utime + usage.ru_stime else None,
        "device": summary.get("device"),
        "precision": summary.get("precision"),
        "batch_size": batch_size,
        "workers": workers,
    }


def _pipeline_child(args_json: str, result_json: str) -> None:
    """The subprocess of `pipeline_ceiling`: `mal label --method mal` with the model swapped for a stand-in."""
    import torch

    from mal_cli import label as label_module
    from mal_cli.label import LabelOptions, parse_crop_sizes
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
    run_groups = label_module._run_groups

    def timed_run_groups(*args, **kwargs):  # the labelling loop alone: no model load, input parse or output write
        cpu, start = time.process_time(), time.perf_counter()
        try:
            return run_groups(*args, **kwargs)
        finally:
            loop["cpu"] += time.process_time() - cpu
            loop["seconds"] += time.perf_counter() - start

    label_module._run_groups = timed_run_groups
    options = LabelOptions(method="mal", checkpoint=args["checkpoint"], device=args["device"],
                           batch_size=args["batch_size"], workers=args["workers"],
                           crop_sizes=parse_crop_sizes(args["crop_sizes"]) if args["crop_sizes"] else None)
    summary = label_module.label_shard(args["dataset"], args["images"], args["out"], options, progress_bar=False)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the reaped DataLoader workers and paste/RLE pool
    Path(result_json).write_bytes(orjson.dumps({"summary": summary.to_dict(), "loop_seconds": loop["seconds"],
                                                "loop_main_cpu_seconds": loop["cpu"],
                                                "workers_cpu_seconds": children.ru_utime + children.ru_stime}))


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
    args_path.write_bytes(orjson.dumps({"dataset": dataset, "images": images, "out": str(out), "checkpoint": checkpoint,
                                        "device": device, "batch_size": batch_size, "workers": workers,
                                        "crop_sizes": crop_sizes}))
    cmd = [sys.executable, "-m", "mal_cli.bench", "pipeline-child", str(args_path), str(result_path)]
    _run_child(cmd, "mal label (pipeline stand-in)")
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


def _timer():
    import torch

    def sync(device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return sync


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
    """Serial pass timing decode / crop / model / paste / RLE / write apart (seconds and ms per box)."""
    import torch

    from mal_cli import geometry
    from mal_cli.dataset import image_file_name
    from mal_cli.images import load_rgb
    from mal_cli.label import _box_xyxy, box_result, default_checkpoint, filled_box_result
    from mal_cli.score import BOX_METHOD_SCORE, mask_quality

    raw = orjson.loads(Path(dataset).read_bytes())
    by_image: dict[Any, list] = {}
    for ann in raw["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    predictor = None
    if method == "mal":
        from mal_cli.modeling.labeler import load_labeler
        from mal_cli.label import parse_crop_sizes
        from mal_cli.predictor import BoxCrops, BoxPredictor, paste_prob

        predictor = BoxPredictor(load_labeler(checkpoint or default_checkpoint()), device=device,
                                 crop_sizes=parse_crop_sizes(crop_sizes) if crop_sizes else None, precision=precision)
    sync = _timer()
    dev = predictor.device if predictor else torch.device("cpu")
    t = dict.fromkeys(("decode", "crop", "model", "paste", "rle", "write"), 0.0)
    boxes_done = 0
    batch: list = []  # (image record, anns, hw, regions, crops, areas)

    def flush(batch) -> None:
        nonlocal boxes_done
        if not batch:
            return
        if predictor is not None:
            crops = BoxCrops.cat([b[4] for b in batch])
            areas = torch.tensor([area for b in batch for area in b[5]])
            s = time.perf_counter()
            probs = predictor.predict_crops(crops, areas, batch_size).numpy()
            sync(dev)
            t["model"] += time.perf_counter() - s
        k = 0
        for image, anns, hw, regions, _, _ in batch:
            results = []
            for j, ann in enumerate(anns):
                xyxy = _box_xyxy(ann["bbox"])
                if predictor is None:
                    s = time.perf_counter()
                    result = filled_box_result(ann["bbox"], hw, "rle", None, BOX_METHOD_SCORE)
                    t["rle"] += time.perf_counter() - s
                else:
                    s = time.perf_counter()
                    pred = paste_prob(probs[k + j], xyxy, regions[j], hw, predictor.threshold)
                    score = mask_quality(pred.window_prob, predictor.threshold)
                    s2 = time.perf_counter()
                    t["paste"] += s2 - s
                    result = box_result(pred.window_mask, pred.window, hw, score, "rle")
                    t["rle"] += time.perf_counter() - s2
                results.append((ann.get("id"), result))
            k += len(anns)
            s = time.perf_counter()
            orjson.dumps({"image": image["id"], "results": results})
            t["write"] += time.perf_counter() - s
            boxes_done += len(anns)

    pending = 0
    for image in raw["images"]:
        anns = [a for a in by_image.get(image["id"], []) if _box_xyxy(a["bbox"]) is not None]
        if not anns:
            continue
        if max_boxes is not None and boxes_done + pending >= max_boxes:
            break
        hw = (int(image["height"]), int(image["width"]))
        regions, crops, areas = [], None, [geometry.box_area(a["bbox"]) for a in anns]
        if predictor is not None:
            s = time.perf_counter()
            pixels = load_rgb(Path(images) / image_file_name(image, dataset), expected_hw=hw)
            t["decode"] += time.perf_counter() - s
            s = time.perf_counter()
            regions = [geometry.crop_region(_box_xyxy(a["bbox"]), predictor.margins) for a in anns]
            chw = torch.from_numpy(np.array(pixels, copy=not pixels.flags.writeable)).permute(2, 0, 1)
            crops = predictor.crop_plan.crops(chw, regions, areas)
            t["crop"] += time.perf_counter() - s
        batch.append((image, anns, hw, regions, crops, areas))
        pending += len(anns)
        if pending >= batch_size:
            flush(batch)
            batch, pending = [], 0
    flush(batch)
    total = sum(t.values())
    return {
        "method": method,
        "boxes": boxes_done,
        "seconds": {k: round(v, 4) for k, v in t.items()},
        "ms_per_box": {k: round(1000 * v / max(boxes_done, 1), 4) for k, v in t.items()},
        "share": {k: round(v / total, 4) if total else None for k, v in t.items()},
        "serial_boxes_per_s": round(boxes_done / total, 1) if total else None,
    }


def _route_areas(dataset: str, n: int) -> np.ndarray:
    """`n` box areas cycling through the dataset's own boxes (so the batch routes like the data)."""
    from mal_cli import geometry

    raw = orjson.loads(Path(dataset).read_bytes())
    areas = np.array([geometry.box_area(a["bbox"]) for a in raw["annotations"]] or [1.0])
    return np.resize(areas, n)


def model_benchmark(checkpoint: Optional[str], device: str, batch_size: int, areas: np.ndarray, iterations: int = 3,
                    crop_sizes: Optional[str] = None, compile: bool = False, precision: str = "auto") -> dict:
    """Encoder + decoder alone on one batch of random uint8 crops sized and routed like `areas`: boxes/s and
    FLOP/s (FlopCounterMode). With `compile`, FLOPs are counted on the eager model, then its blocks are
    compiled (in the warm-up call, timed apart) and timed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mal_cli.label import default_checkpoint, parse_crop_sizes
    from mal_cli.modeling.labeler import compile_encoder_blocks, load_labeler
    from mal_cli.predictor import BoxCrops, BoxPredictor

    predictor = BoxPredictor(load_labeler(checkpoint or default_checkpoint()), device=device,
                             crop_sizes=parse_crop_sizes(crop_sizes) if crop_sizes else None, precision=precision)
    model, dev, plan = predictor.model, predictor.device, predictor.crop_plan
    gen = torch.Generator().manual_seed(0)
    area_list = [float(a) for a in areas[:batch_size]]
    sizes = [plan.size_for(a) for a in area_list]
    crops = BoxCrops(sizes, {
        size: torch.randint(0, 256, (sizes.count(size), 3, size, size), generator=gen, dtype=torch.uint8)
        for size in sorted(set(sizes))
    })
    area_t = torch.tensor(area_list, dtype=torch.float32)

    def count(fn) -> float:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_total_flops()

    # FLOPs per box and route (counted at batch 2, fp32 shapes are what count): with the plan (its crop size
    # and decoder scale) and as the exact model (full crop, trained scale), so the plan's saving is visible.
    # Routes are named by their trained decoder scale.
    per_route = {}
    bins = model.decoder.area_bins
    route_areas = _route_probe_areas(bins)
    label_scales = plan.decoder_scales or model.decoder.route_scales
    with torch.inference_mode():
        for scale, label_scale, area, size in zip(model.decoder.route_scales, label_scales, route_areas, plan.sizes):
            entry = {"crop_size": size, "decoder_scale": label_scale}
            for key, crop, scales in (("", size, plan.decoder_scales), ("full_crop_", model.config.crop_size, None)):
                probe = torch.rand(2, 3, crop, crop, device=dev) * 255
                out: dict = {}
                enc = count(lambda: out.setdefault("features", model.encoder((probe - model.pixel_mean) / model.pixel_std))) / 2
                feats = out["features"]
                dec = count(lambda: model.decoder(feats, torch.full((2,), float(area), device=dev),
                                                  grid_size=model.encoder.grid_size, route_scales=scales)) / 2
                entry[f"{key}encoder_gflop"] = round(enc / 1e9, 3)
                entry[f"{key}decoder_gflop"] = round(dec / 1e9, 3)
            per_route[f"x{scale:g}"] = entry
        batch_flops = 0.0
        for size, size_crops in crops.by_size.items():
            idx = [i for i, s in enumerate(sizes) if s == size]
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                batch_flops += count(lambda: model(size_crops.to(dev).float(), area_t[idx].to(dev), plan.decoder_scales))
    routes = model.decoder.route(area_t).tolist()
    route_counts = {f"x{s:g}": routes.count(r) for r, s in enumerate(model.decoder.route_scales)}
    full_flops = sum(
        per_route[f"x{s:g}"]["full_crop_encoder_gflop"] + per_route[f"x{s:g}"]["full_crop_decoder_gflop"]
        for s in (model.decoder.route_scales[r] for r in routes)
    )

    if compile:
        compile_encoder_blocks(model)
    sync = _timer()
    warmup = time.perf_counter()
    predictor.predict_crops(crops, area_t, batch_size)  # warm-up (and, with `compile`, the compile)
    sync(dev)
    warmup = time.perf_counter() - warmup
    times = []
    for _ in range(iterations):
        s = time.perf_counter()
        predictor.predict_crops(crops, area_t, batch_size)
        sync(dev)
        times.append(time.perf_counter() - s)
    best = min(times)
    return {
        "device": str(dev),
        "crop_size": model.config.crop_size,
        "crop_sizes": list(plan.sizes),
        "batch_size": batch_size,
        "route_counts": route_counts,
        "gflop_per_box": round(batch_flops / batch_size / 1e9, 3),
        "gflop_per_box_full_crop": round(full_flops / batch_size, 3),
        "gflop_per_box_by_route": per_route,
        "compile": compile,
        "seconds_warmup": round(warmup, 3),
        "seconds_per_batch": [round(x, 4) for x in times],
        "boxes_per_s": round(batch_size / best, 1),
        "tflop_per_s": round(batch_flops / best / 1e12, 4),
        "precision": predictor.precision,
    }


def measure_peak_flops(device: str, size: Optional[int] = None, iterations: int = 5, dtype=None) -> dict:
    """A bf16 (or `dtype`) matmul on the device: the practical ceiling the model's FLOP/s is compared with."""
    import torch

    from mal_cli.predictor import resolve_device

    dev = resolve_device(device)
    n = size or (8192 if dev.type == "cuda" else 2048)
    a = torch.randn(n, n, device=dev, dtype=dtype or torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=dtype or torch.bfloat16)
    sync = _timer()
    a @ b
    sync(dev)
    times = []
    for _ in range(iterations):
        s = time.perf_counter()
        a @ b
        sync(dev)
        times.append(time.perf_counter() - s)
    return {"device": str(dev), "matmul_n": n, "tflop_per_s": round(2 * n**3 / min(times) / 1e12, 4)}


def _route_probe_areas(bins: Sequence[float]) -> list[float]:
    """One box area inside each route: below the first limit, then just above each limit."""
    return [max(bins[0] / 2, 1.0)] + [b * 1.01 for b in bins]


def training_flops_per_sample(
    crop_size: int,
    backbone: Optional[str] = None,
    device: str = "cpu",
    areas: Optional[Sequence[float]] = None,
) -> dict:
    """FLOPs of one training sample at `crop_size`: student forward + backward + EMA-teacher forward.

    The labeler is built as `mal train` builds it (`LabelerConfig(backbone, crop_size)`, random weights: the
    count depends on shapes only). Per route (the decoder's cost depends on the box's route), a batch of 2
    random crops is counted with `FlopCounterMode` (matmul, conv and attention; elementwise ops, the CRF and
    the augmentation are not counted) under the bf16 autocast training uses on a GPU, and divided by 2.
    `gflop_per_sample` is the mean over `areas`' routes (the training boxes' areas), or over the routes
    equally when `areas` is None.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mal_cli.modeling.labeler import LabelerConfig, MaskLabeler
    from mal_cli.predictor import resolve_device
    from mal_cli.train import TrainConfig

    dev = resolve_device(device)
    backbone = backbone or TrainConfig.backbone
    model = MaskLabeler(LabelerConfig(backbone=backbone, crop_size=crop_size)).to(dev).train()
    decoder = model.decoder
    probe_areas = _route_probe_areas(decoder.area_bins)
    n_routes = len(decoder.route_scales)
    if areas is not None and len(areas):
        routes = decoder.route(torch.as_tensor(np.asarray(areas, dtype=np.float32))).tolist()
        share = [routes.count(r) / len(routes) for r in range(n_routes)]
    else:
        share = [1 / n_routes] * n_routes

    def count(fn) -> float:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return float(counter.get_total_flops())

    gen = torch.Generator().manual_seed(0)
    by_route: dict[str, dict] = {}
    per_sample = 0.0
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    for r, scale in enumerate(decoder.route_scales):
        entry: dict[str, Any] = {"share": round(share[r], 4)}
        if share[r] > 0:
            crops = (torch.rand(2, 3, crop_size, crop_size, generator=gen) * 255).to(dev)
            box_areas = torch.full((2,), float(probe_areas[r]), device=dev)
            holder: dict[str, torch.Tensor] = {}

            def student_forward() -> None:
                with autocast:
                    holder["logits"] = model(crops, box_areas)[:, 0].float()

            def teacher_forward() -> None:
                with torch.no_grad(), autocast:
                    model(crops, box_areas)

            fwd = count(student_forward)
            bwd = count(lambda: holder.pop("logits").sum().backward())
            model.zero_grad(set_to_none=True)
            teacher = count(teacher_forward)
            total = (fwd + bwd + teacher) / 2
            entry.update({
                "student_forward_gflop": round(fwd / 2e9, 4),
                "student_backward_gflop": round(bwd / 2e9, 4),
                "teacher_forward_gflop": round(teacher / 2e9, 4),
                "gflop": round(total / 1e9, 4),
            })
            per_sample += share[r] * total
        by_route[f"x{scale:g}"] = entry
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "crop_size": crop_size,
        "backbone": backbone,
        "gflop_per_sample": round(per_sample / 1e9, 4),
        "flop_per_sample": per_sample,
        "by_route": by_route,
    }


def train_step_split(config, steps: int = 10, warmup: int = 3) -> dict:
    """Where a training step's time goes: each stage of `mal train`'s step timed apart, and the loader alone.

    Built as `mal_cli.train.train` builds them (the same dataset checks, labeler, optimizer, dataset and
    DataLoader). The loader alone: `warmup + steps` batches pulled with no compute, samples/s over the last
    `steps`. The compute: the first batch kept on the device and run `warmup + steps` times through the
    step's stages, with a device sync after each; the medians of the last `steps`. Serial, so the sum is the
    step without any overlap of loading and compute; a real step overlaps them.
    """
    import torch

    from mal_cli import train as training
    from mal_cli.modeling.labeler import compile_encoder_blocks
    from mal_cli.predictor import resolve_device

    device = resolve_device(config.device)
    sync = _timer()

    def mark() -> float:
        sync(device)
        return time.perf_counter()

    document = training._load_training_dataset(config.annotations)
    records = training.collect_training_boxes(document, config.images, config.min_box_area, config.min_box_side)
    torch.manual_seed(config.seed)
    student = training.build_labeler(config).to(device).train()
    teacher = training.ema_teacher(student)
    if config.compile:
        for labeler in (student, teacher):
            compile_encoder_blocks(labeler)
    optimizer = training.build_optimizer(student, config)
    data = training.BoxCropDataset(records, config.crop_size, student.mask_size, config.margin_max, config.seed)
    workers = training.loader_workers(config, device)
    sampler = training.StepSampler(len(data), config.batch_size, config.seed)
    sampler.total_steps = warmup + steps
    arrivals, first = [], None
    for batch in training.make_loader(data, sampler, config.batch_size, workers, device):
        arrivals.append(time.perf_counter())
        if first is None:
            first = batch
    loader_rate = steps * config.batch_size / (arrivals[-1] - arrivals[warmup - 1]) if warmup >= 1 else None
    from mal_cli.precision import training_dtype

    _, amp_dtype = training_dtype(config.precision, config.amp, device)
    batch = {k: v.to(device) for k, v in first.items()}
    crops = batch["crop"]
    stages = ("augment", "forward", "losses", "backward", "optimizer")
    times: dict[str, list[float]] = {k: [] for k in stages}
    for i in range(warmup + steps):
        generator = torch.Generator().manual_seed(i)
        marks = [mark()]
        student_crops = training.augment_student(crops, config, generator)
        marks.append(mark())
        prob, teacher_prob = training.predict_maps(student, teacher, batch, student_crops, amp_dtype)
        marks.append(mark())
        loss = training.box_losses(prob, teacher_prob, batch, student_crops, i, config)["loss"]
        marks.append(mark())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(mark())
        training.apply_gradients(student, teacher, optimizer, config)
        marks.append(mark())
        if i >= warmup:
            for k, (a, b) in zip(stages, zip(marks, marks[1:])):
                times[k].append(b - a)
    ms = {k: round(1e3 * float(np.median(v)), 3) for k, v in times.items()}
    step_ms = sum(ms.values())
    return {
        "steps": steps,
        "warmup": warmup,
        "workers": workers,
        "ms_per_step": ms,
        "compute_samples_per_s": round(config.batch_size / step_ms * 1e3, 3) if step_ms > 0 else None,
        "loader_samples_per_s": round(loader_rate, 3) if loader_rate else None,
    }


def _steady_rate(log: Sequence[dict], batch_size: int, warmup_steps: int, world_size: int = 1) -> dict:
    """Samples/s between the first logged step >= warmup_steps and the last logged step (None if they coincide)."""
    timed = sorted((row for row in log if "time" in row), key=lambda row: row["step"])
    if not timed:
        return {"samples_per_s_steady": None, "steady_from_step": None, "steady_to_step": None, "steady_seconds": None}
    last = timed[-1]
    first = next((row for row in timed if row["step"] >= warmup_steps), last)
    steps = last["step"] - first["step"]
    seconds = last["time"] - first["time"]
    rate = steps * batch_size * world_size / seconds if steps > 0 and seconds > 0 else None
    return {
        "samples_per_s_steady": round(rate, 3) if rate is not None else None,
        "steady_from_step": first["step"],
        "steady_to_step": last["step"],
        "steady_seconds": round(seconds, 4) if steps > 0 else None,
    }


def _train_child(config_json: str, result_json: str, split_steps: int = 0) -> None:
    """The training subprocess of `train_benchmark`: `mal_cli.train.train` on a stored TrainConfig, then
    (`split_steps` > 0) `train_step_split`."""
    import logging

    import torch

    from mal_cli.errors import MalError
    from mal_cli.predictor import resolve_device
    from mal_cli.train import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config = TrainConfig(**orjson.loads(Path(config_json).read_bytes()))
    try:
        final = train(config, progress=False)
    except MalError as err:
        print(f"mal train: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    info: dict[str, Any] = {"final": final, "torch": torch.__version__}
    dev = resolve_device(config.device)
    if dev.type == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(dev)
        info["gpu_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        info["gpu_peak_reserved_mib"] = round(torch.cuda.max_memory_reserved(dev) / 2**20, 1)
    if split_steps > 0:
        info["split"] = train_step_split(config, split_steps)
    Path(result_json).write_bytes(orjson.dumps(info, option=orjson.OPT_SERIALIZE_NUMPY))


def train_benchmark(
    dataset: str,
    images: str,
    device: str,
    crop_size: int = 504,
    batch_size: int = 64,
    steps: int = 60,
    warmup_steps: int = 20,
    workers: Optional[int] = None,
    backbone_weights: Optional[str] = None,
    backbone: Optional[str] = None,
    log_every: int = 5,
    folder: Optional[Path] = None,
    count_flops: bool = True,
    split_steps: int = 10,
    compile: bool = False,
    precision: str = "auto",
) -> dict:
    """Training throughput: `steps` steps of the `mal train` loop in a subprocess (see the module docstring, 6).

    Returns steady and overall samples/s, the logged (step, time) points they come from, wall time, peak
    RSS (and GPU memory), and GFLOP per sample / achieved TFLOP/s (`count_flops`, counted in this process
    on `device` after the run). `workers`/`backbone` None: `mal train`'s defaults. World size 1.
    """
    from mal_cli.dataset import load_dataset
    from mal_cli.predictor import resolve_device
    from mal_cli.train import TrainConfig, collect_training_boxes

    if steps <= warmup_steps:
        raise ValueError(f"train steps ({steps}) must exceed the warm-up steps ({warmup_steps})")
    defaults = TrainConfig()
    config = TrainConfig(
        annotations=str(dataset), images=str(images), backbone=backbone or defaults.backbone,
        backbone_weights=str(backbone_weights) if backbone_weights else None, crop_size=crop_size,
        batch_size=batch_size, max_steps=steps, device=device,
        workers=defaults.workers if workers is None else workers, log_every=log_every,
        checkpoint_every=steps,  # one checkpoint, after the last logged step (outside the timed window)
        val=None, compile=compile, precision=precision,
    )
    with tempfile.TemporaryDirectory(prefix="mal-bench-train-", dir=folder) as tmp:
        run_dir = Path(tmp) / "run"
        config.out = str(run_dir)
        config_path, info_path = Path(tmp) / "train_config.json", Path(tmp) / "train_result.json"
        config_path.write_bytes(orjson.dumps(config.to_dict()))
        cmd = [sys.executable, "-m", "mal_cli.bench", "train-child", str(config_path), str(info_path), str(split_steps)]
        env = dict(os.environ)
        if not backbone_weights:
            env["HF_HUB_OFFLINE"] = "1"  # random backbone weights: the same cost, and no download in a benchmark
        usage, wall = _run_child(cmd, "mal train (bench)", env)
        metrics_path = run_dir / "metrics.jsonl"
        rows = [orjson.loads(line) for line in metrics_path.read_bytes().splitlines() if line.strip()]
        info = orjson.loads(info_path.read_bytes()) if info_path.is_file() else {}
    log = [{"step": int(r["step"]), "time": float(r["time"]), "samples_per_s": float(r["samples_per_s"])}
           for r in rows if "time" in r]
    if not log:
        raise RuntimeError(f"mal train (bench) logged no timed steps in {metrics_path}")
    last = log[-1]
    steady = _steady_rate(log, batch_size, warmup_steps)
    final = info.get("final", {})
    result: dict[str, Any] = {
        "device": str(resolve_device(device)),
        "backbone": config.backbone,
        "backbone_weights": config.backbone_weights or "random",
        "crop_size": crop_size,
        "batch_size": batch_size,
        "world_size": 1,
        "steps": last["step"],
        "warmup_steps": warmup_steps,
        "workers": final.get("workers", config.workers),
        "amp": config.amp,
        "crf_iterations": config.crf_iterations,
        **steady,
        "samples_per_s_overall": round(last["step"] * batch_size / last["time"], 3) if last["time"] > 0 else None,
        "seconds_in_loop": round(last["time"], 4),
        "seconds_wall": round(wall, 3),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1) if usage.ru_maxrss else None,
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
        "skipped_nonfinite": final.get("skipped_nonfinite"),
        "log": log,
    }
    for key in ("gpu_name", "gpu_peak_allocated_mib", "gpu_peak_reserved_mib", "torch", "split"):
        if key in info:
            result[key] = info[key]
    if count_flops:
        records = collect_training_boxes(load_dataset(dataset), images, config.min_box_area, config.min_box_side)
        flops = training_flops_per_sample(crop_size, config.backbone, device, [r.area for r in records])
        result["gflop_per_sample"] = flops["gflop_per_sample"]
        result["gflop_per_sample_by_route"] = flops["by_route"]
        rate = result["samples_per_s_steady"]
        result["tflop_per_s"] = round(rate * flops["flop_per_sample"] / 1e12, 5) if rate else None
    return result


def synthetic_dataset(out: str | Path, images: int, boxes: int, image_dir: str | Path, files: int = 8,
                      size: int = 32, categories: int = 1203, seed: int = 0, masks: bool = False) -> dict:
    """An LVIS-scale stand-in: `images` records over `boxes` boxes, all pointing at `files` tiny PNGs.

    The image files are `size` x `size` noise PNGs written to `image_dir` (shared by many records, so a
    million-box dataset costs kilobytes of images). `masks=True` adds a polygon per box (a diamond inside
    it), so the file can be a `mal eval` ground truth. Streams the JSON out (never builds it whole).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(image_dir / f"syn{f}.png")
    per_image = np.full(images, boxes // images)
    per_image[: boxes % images] += 1
    with open(out, "wb") as handle:
        handle.write(b'{"info":{"description":"mal bench synthetic"},"images":[')
        for i in range(images):
            handle.write((b"," if i else b"") + orjson.dumps(
                {"id": i + 1, "file_name": f"syn{i % files}.png", "width": size, "height": size}))
        handle.write(b'],"categories":' + orjson.dumps([{"id": c + 1, "name": f"c{c + 1}"} for c in range(categories)]))
        handle.write(b',"annotations":[')
        ann_id = 0
        chunk = 100_000
        image_of = np.repeat(np.arange(1, images + 1), per_image)
        for start in range(0, boxes, chunk):
            n = min(chunk, boxes - start)
            xy = rng.uniform(0, size * 0.6, (n, 2)).round(2)
            wh = rng.uniform(2, size * 0.4, (n, 2)).round(2)
            cats = rng.integers(1, categories + 1, n)
            parts = []
            for j in range(n):
                x, y, w, h = float(xy[j, 0]), float(xy[j, 1]), float(wh[j, 0]), float(wh[j, 1])
                ann_id += 1
                ann = {"id": ann_id, "image_id": int(image_of[start + j]), "category_id": int(cats[j]),
                       "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": 0}
                if masks:
                    ann["segmentation"] = [[x + w / 2, y, x + w, y + h / 2, x + w / 2, y + h, x, y + h / 2]]
                    ann["area"] = round(w * h / 2, 2)
                parts.append(orjson.dumps(ann))
            handle.write((b"," if start else b"") + b",".join(parts))
        handle.write(b"]}")
    return {"images": images, "boxes": boxes, "files": files, "out": str(out)}


def _rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_bench(
    dataset: str,
    images: str,
    checkpoint: Optional[str] = None,
    device: str = "auto",
    batch_size: int = 64,
    workers: Optional[int] = None,
    limit: Optional[int] = None,
    methods: Sequence[str] = ("mal", "box"),
    stages: bool = True,
    model: bool = True,
    peak: bool = True,
    stage_limit: Optional[int] = 512,
    crop_sizes: Optional[str] = None,
    train: bool = False,
    train_crop_size: int = 504,
    train_batch_size: int = 64,
    train_steps: int = 60,
    train_warmup: int = 20,
    train_workers: Optional[int] = None,
    backbone_weights: Optional[str] = None,
    backbone: Optional[str] = None,
    train_split_steps: int = 10,
    pipeline: bool = True,
    repeat: int = 1,
    compile: bool = False,
    precision: str = "auto",
) -> dict:
    """All measurements (see the module docstring) as one JSON-able dict. `methods` may be empty (e.g. only `train`)."""
    import torch

    from mal_cli.precision import cpu_has_fast_bf16, cpu_model_name
    from mal_cli.predictor import resolve_device

    result: dict[str, Any] = {
        "dataset": dataset,
        "images_dir": images,
        "device": str(resolve_device(device)),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model_name(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),  # what `--precision auto` goes by on a CPU
        "batch_size": batch_size,
        "workers": workers,
        "crop_sizes": crop_sizes,
        "limit": limit,
        "repeat": repeat,
        "compile": compile,
        "precision": precision,  # as given; the rows that run a model say which one ran
    }
    with tempfile.TemporaryDirectory(prefix="mal-bench-") as tmp:
        folder = Path(tmp)
        subset, n_images, n_boxes = _subset(dataset, limit, folder, repeat)
        result["images"], result["boxes"] = n_images, n_boxes
        result["end_to_end"] = {}
        for method in methods:
            result["end_to_end"][method] = end_to_end(subset, images, method, checkpoint, device, batch_size, workers, folder,
                                                      extra=(["--compile"] if compile else []) + ["--precision", precision]
                                                      if method == "mal" else [],
                                                      crop_sizes=crop_sizes)
        if pipeline and "mal" in methods:
            result["pipeline"] = pipeline_ceiling(subset, images, checkpoint, device, batch_size, workers, folder, crop_sizes)
        if train:
            # Before anything below allocates device memory in this process: the training run gets the whole device.
            # On the whole DATASET (--limit applies to labelling only).
            result["train"] = train_benchmark(dataset, images, device, train_crop_size, train_batch_size, train_steps,
                                              train_warmup, train_workers, backbone_weights, backbone, folder=folder,
                                              split_steps=train_split_steps, compile=compile, precision=precision)
        if stages:
            result["stages"] = {m: stage_benchmark(subset, images, checkpoint, device, batch_size, m,
                                                   stage_limit if m == "mal" else None, crop_sizes, precision) for m in methods}
    if model and "mal" in methods:
        result["model"] = model_benchmark(checkpoint, device, batch_size, _route_areas(dataset, batch_size),
                                          crop_sizes=crop_sizes, compile=compile, precision=precision)
    if peak:
        result["peak"] = measure_peak_flops(device)
        # fp32 too: on a CPU without AMX it is the faster of the two (`--precision auto` picks it there)
        result["peak"]["fp32_tflop_per_s"] = measure_peak_flops(device, dtype=torch.float32)["tflop_per_s"]
        if "model" in result and result["peak"]["tflop_per_s"]:
            result["model"]["fraction_of_peak"] = round(result["model"]["tflop_per_s"] / result["peak"]["tflop_per_s"], 4)
        if result.get("train", {}).get("tflop_per_s") and result["peak"]["tflop_per_s"]:
            result["train"]["fraction_of_peak"] = round(result["train"]["tflop_per_s"] / result["peak"]["tflop_per_s"], 4)
    result["bench_peak_rss_mib"] = _rss_mib()
    return result


def bench_table(result: dict):
    from rich.table import Table

    cpu = f" ({result.get('cpu_model')}, {result.get('cpu_count')} cores)" if result.get("cpu_model") else ""
    table = Table(title=f"mal bench: {result['boxes']} boxes, {result['images']} images, device {result['device']}{cpu}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for method, e2e in result.get("end_to_end", {}).items():
        ran = f", {e2e['precision']}" if e2e.get("precision") else ""
        table.add_row(f"end to end --method {method}{ran}: boxes/s (in run / with start-up)",
                      f"{e2e['boxes_per_s']} / {e2e['boxes_per_s_wall']}")
        table.add_row(f"end to end --method {method}: peak RSS", f"{e2e['peak_rss_mib']} MiB")
    if "pipeline" in result:
        p = result["pipeline"]
        table.add_row("pipeline alone (--method mal, zero-cost model stand-in): boxes/s (in run / in loop)",
                      f"{p['boxes_per_s']} / {p['boxes_per_s_in_loop']}")
        table.add_row("pipeline CPU ms/box: main process in loop (serial) / workers (divide over the cores)",
                      f"{p['main_cpu_ms_per_box']} / {p['workers_cpu_ms_per_box']}")
        table.add_row("  main-process ceiling: boxes/s on any device", str(p["main_process_ceiling_boxes_per_s"]))
    for method, st in result.get("stages", {}).items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in st["ms_per_box"].items() if v)
        table.add_row(f"stages --method {method} (ms/box, serial, {st['boxes']} boxes)", parts)
    if "model" in result:
        m = result["model"]
        sizes = ",".join(str(v) for v in m["crop_sizes"])
        compiled = f", compiled in {m['seconds_warmup']:.1f} s" if m.get("compile") else ""
        table.add_row(f"model alone (crops {sizes}, batch {m['batch_size']}, {m.get('precision')}{compiled}): boxes/s",
                      str(m["boxes_per_s"]))
        table.add_row("model GFLOP/box (batch mix; the exact model: full crop, trained decoder)",
                      f"{m['gflop_per_box']} ({m['gflop_per_box_full_crop']})")
        for route, f in m["gflop_per_box_by_route"].items():
            table.add_row(f"  route {route}, crop {f['crop_size']}, decoder x{f['decoder_scale']:g}: encoder + decoder GFLOP/box",
                          f"{f['encoder_gflop']} + {f['decoder_gflop']}")
        table.add_row("model achieved TFLOP/s", str(m["tflop_per_s"]))
    if "train" in result:
        t = result["train"]
        weights = "random" if t["backbone_weights"] == "random" else "file"
        table.add_row(f"train ({t['backbone']}, {weights} weights, crop {t['crop_size']}, batch {t['batch_size']}, "
                      f"{t['workers']} workers): samples/s steady (steps {t['steady_from_step']}-{t['steady_to_step']})",
                      str(t["samples_per_s_steady"]))
        table.add_row(f"train: samples/s overall ({t['steps']} steps in {t['seconds_in_loop']:.2f} s; wall {t['seconds_wall']:.1f} s)",
                      str(t["samples_per_s_overall"]))
        memory = f"{t['peak_rss_mib']} MiB"
        if "gpu_peak_allocated_mib" in t:
            memory += f"; GPU {t['gpu_peak_allocated_mib']} MiB allocated"
        table.add_row("train: peak RSS", memory)
        if "gflop_per_sample" in t:
            table.add_row("train GFLOP/sample (student fwd + bwd + teacher fwd)", str(t["gflop_per_sample"]))
            table.add_row("train achieved TFLOP/s (steady)", str(t["tflop_per_s"]))
        if "split" in t:
            sp = t["split"]
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sp["ms_per_step"].items())
            table.add_row(f"train step split (ms/step, serial, median of {sp['steps']})", parts)
            table.add_row(f"train: compute alone / loader alone ({sp['workers']} workers): samples/s",
                          f"{sp['compute_samples_per_s']} / {sp['loader_samples_per_s']}")
        if t.get("skipped_nonfinite"):
            table.add_row("train: steps skipped (non-finite loss)", str(t["skipped_nonfinite"]))
    if "peak" in result:
        table.add_row(f"bf16 / fp32 matmul peak TFLOP/s (n={result['peak']['matmul_n']})",
                      f"{result['peak']['tflop_per_s']} / {result['peak'].get('fp32_tflop_per_s')}")
        if "model" in result and "fraction_of_peak" in result["model"]:
            table.add_row("model / peak", f"{100 * result['model']['fraction_of_peak']:.1f} %")
        if "fraction_of_peak" in result.get("train", {}):
            table.add_row("train / peak", f"{100 * result['train']['fraction_of_peak']:.1f} %")
    return table


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-child"]:  # internal: the subprocess of train_benchmark
        _train_child(argv[1], argv[2], int(argv[3]) if len(argv) > 3 else 0)
        return
    if argv[:1] == ["pipeline-child"]:  # internal: the subprocess of pipeline_ceiling
        _pipeline_child(argv[1], argv[2])
        return
    if argv[:1] == ["synthetic"]:
        parser = argparse.ArgumentParser(prog="python -m mal_cli.bench synthetic", description=synthetic_dataset.__doc__.split("\n")[0])
        parser.add_argument("out")
        parser.add_argument("--image-dir", required=True)
        parser.add_argument("--images", type=int, default=100_000)
        parser.add_argument("--boxes", type=int, default=1_300_000)
        parser.add_argument("--masks", action="store_true")
        a = parser.parse_args(argv[1:])
        print(synthetic_dataset(a.out, a.images, a.boxes, a.image_dir, masks=a.masks))
        return

    parser = argparse.ArgumentParser(prog="python -m mal_cli.bench", description=__doc__.split("\n")[0])
    parser.add_argument("dataset")
    parser.add_argument("--images", "-i", required=True)
    parser.add_argument("--checkpoint", "-c", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="default: as mal label")
    parser.add_argument("--crop-sizes", default=None, help="as mal label (default: its default)")
    parser.add_argument("--limit", type=int, default=None, help="First whole images holding at least N boxes.")
    parser.add_argument("--repeat", type=int, default=1, help="Label the (limited) dataset N times over, new ids each time.")
    parser.add_argument("--compile", action="store_true", help="As mal label / mal train --compile.")
    parser.add_argument("--method", choices=("both", "mal", "box", "none"), default="both",
                        help="none: no labelling benchmark (e.g. with --train)")
    parser.add_argument("--no-stages", action="store_true")
    parser.add_argument("--no-model", action="store_true")
    parser.add_argument("--no-peak", action="store_true")
    parser.add_argument("--no-pipeline", action="store_true", help="Skip the pipeline-alone run (model stand-in).")
    parser.add_argument("--train", action="store_true", help="Also measure training throughput (mal train's loop).")
    parser.add_argument("--train-crop-size", type=int, default=504, help="Training crop side (a multiple of the patch size).")
    parser.add_argument("--train-batch-size", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--train-warmup", type=int, default=20, help="Steps left out of the steady rate.")
    parser.add_argument("--train-workers", type=int, default=None, help="default: as mal train")
    parser.add_argument("--train-split-steps", type=int, default=10,
                        help="Steps of the per-stage training split after the run (0: none).")
    parser.add_argument("--backbone-weights", default=None, help="ViT weights file (default: random weights)")
    parser.add_argument("--backbone", default=None, help="timm ViT name (default: as mal train)")
    parser.add_argument("--json", default=None, help="Write the results here.")
    args = parser.parse_args(argv)
    methods = {"both": ("mal", "box"), "none": ()}.get(args.method, (args.method,))
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.train and args.train_steps <= args.train_warmup:
        parser.error("--train-steps must exceed --train-warmup")
    result = run_bench(args.dataset, args.images, args.checkpoint, args.device, args.batch_size, args.workers,
                       args.limit, methods, stages=not args.no_stages, model=not args.no_model, peak=not args.no_peak,
                       crop_sizes=args.crop_sizes, train=args.train, train_crop_size=args.train_crop_size,
                       train_batch_size=args.train_batch_size, train_steps=args.train_steps,
                       train_warmup=args.train_warmup, train_workers=args.train_workers,
                       backbone_weights=args.backbone_weights, backbone=args.backbone,
                       train_split_steps=args.train_split_steps, pipeline=not args.no_pipeline,
                       repeat=args.repeat, compile=args.compile)
    from rich.console import Console

    Console(stderr=True).print(bench_table(result))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()

"""The model alone (boxes/s, FLOPs per box and route) and the device's bf16 matmul peak."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import orjson

from mal_cli.bench.common import sync, total_flops


def route_areas(dataset: str, n: int) -> np.ndarray:
    """`n` box areas cycling through the dataset's own boxes (so the batch routes like the data)."""
    from mal_cli import geometry

    raw = orjson.loads(Path(dataset).read_bytes())
    areas = np.array([geometry.box_area(a["bbox"]) for a in raw["annotations"]] or [1.0])
    return np.resize(areas, n)


def _route_flops(model, plan, dev) -> dict:
    """FLOPs per box and route (counted at batch 2, fp32 shapes are what count): with the plan (its crop size
    and decoder scale) and as the exact model (full crop, trained scale), so the plan's saving is visible.
    Routes are named by their trained decoder scale."""
    import torch

    per_route = {}
    label_scales = plan.decoder_scales or model.decoder.route_scales
    route_areas_ = route_probe_areas(model.decoder.area_bins)
    with torch.inference_mode():
        for scale, label_scale, area, size in zip(model.decoder.route_scales, label_scales, route_areas_, plan.sizes):
            entry = {"crop_size": size, "decoder_scale": label_scale}
            for key, crop, scales in (("", size, plan.decoder_scales), ("full_crop_", model.config.crop_size, None)):
                probe = torch.rand(2, 3, crop, crop, device=dev) * 255
                out: dict = {}

                def encode(probe=probe, out=out):
                    out["features"] = model.encoder((probe - model.pixel_mean) / model.pixel_std)

                enc = total_flops(encode) / 2
                areas = torch.full((2,), float(area), device=dev)
                dec = (
                    total_flops(
                        lambda out=out, areas=areas, scales=scales: model.decoder(
                            out["features"], areas, grid_size=model.encoder.grid_size, route_scales=scales
                        )
                    )
                    / 2
                )
                entry[f"{key}encoder_gflop"] = round(enc / 1e9, 3)
                entry[f"{key}decoder_gflop"] = round(dec / 1e9, 3)
            per_route[f"x{scale:g}"] = entry
    return per_route


def _time_calls(fn, device, iterations: int) -> tuple[float, list[float]]:
    """Seconds of a first call of `fn` (the warm-up: kernel selection; with `compile`, the compile) and of each of
    `iterations` more, every call waited for on the device."""
    times = []
    for _ in range(1 + iterations):
        s = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - s)
    return times[0], times[1:]


def model_benchmark(
    checkpoint: Optional[str],
    device: str,
    batch_size: int,
    areas: np.ndarray,
    iterations: int = 3,
    crop_sizes: Optional[str] = None,
    compile: bool = False,
    precision: str = "auto",
) -> dict:
    """Encoder + decoder alone on one batch of random uint8 crops sized and routed like `areas`: boxes/s and
    FLOP/s (FlopCounterMode). With `compile`, FLOPs are counted on the eager model, then its blocks are
    compiled (in the warm-up call, timed apart) and timed."""
    import torch

    from mal_cli import precision as precisions
    from mal_cli.labeling.options import default_checkpoint, parse_crop_sizes
    from mal_cli.modeling.labeler import compile_encoder_blocks, load_labeler
    from mal_cli.predictor import BoxCrops, BoxPredictor

    predictor = BoxPredictor(
        load_labeler(checkpoint or default_checkpoint()),
        device=device,
        crop_sizes=parse_crop_sizes(crop_sizes) if crop_sizes else None,
        precision=precision,
    )
    model, dev, plan = predictor.model, predictor.device, predictor.crop_plan
    gen = torch.Generator().manual_seed(0)
    area_list = [float(a) for a in areas[:batch_size]]
    sizes = [plan.size_for(a) for a in area_list]
    crops = BoxCrops(
        sizes,
        {
            size: torch.randint(0, 256, (sizes.count(size), 3, size, size), generator=gen, dtype=torch.uint8)
            for size in sorted(set(sizes))
        },
    )
    area_t = torch.tensor(area_list, dtype=torch.float32)
    per_route = _route_flops(model, plan, dev)
    batch_flops = 0.0
    with torch.inference_mode():
        for size, size_crops in crops.by_size.items():
            idx = [i for i, s in enumerate(sizes) if s == size]
            with precisions.autocast(dev, predictor.precision):
                batch_flops += total_flops(
                    lambda c=size_crops, i=idx: model(c.to(dev).float(), area_t[i].to(dev), plan.decoder_scales)
                )
    routes = model.decoder.route(area_t).tolist()
    route_counts = {f"x{s:g}": routes.count(r) for r, s in enumerate(model.decoder.route_scales)}
    full_flops = sum(
        per_route[f"x{s:g}"]["full_crop_encoder_gflop"] + per_route[f"x{s:g}"]["full_crop_decoder_gflop"]
        for s in (model.decoder.route_scales[r] for r in routes)
    )
    if compile:
        compile_encoder_blocks(model)
    warmup, times = _time_calls(lambda: predictor.predict_crops(crops, area_t, batch_size), dev, iterations)
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

    from mal_cli.device import resolve_device

    dev = resolve_device(device)
    n = size or (8192 if dev.type == "cuda" else 2048)
    a = torch.randn(n, n, device=dev, dtype=dtype or torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=dtype or torch.bfloat16)
    _, times = _time_calls(lambda: a @ b, dev, iterations)
    return {"device": str(dev), "matmul_n": n, "tflop_per_s": round(2 * n**3 / min(times) / 1e12, 4)}


def route_probe_areas(bins: Sequence[float]) -> list[float]:
    """One box area inside each route: below the first limit, then just above each limit."""
    return [max(bins[0] / 2, 1.0)] + [b * 1.01 for b in bins]

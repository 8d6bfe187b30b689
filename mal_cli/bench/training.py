"""Training benchmarks: `mal train`'s loop in a subprocess, FLOPs per sample, and a step split apart."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import orjson

from mal_cli.bench.common import child_usage, run_child, sync, total_flops
from mal_cli.bench.model import route_probe_areas


def _sample_flops(model, crops, box_areas) -> dict:
    """FLOPs of a batch of 2 training samples, per sample: student forward + backward + teacher forward."""
    import torch

    autocast = torch.autocast(crops.device.type, dtype=torch.bfloat16, enabled=crops.device.type == "cuda")
    holder: dict[str, torch.Tensor] = {}

    def student_forward() -> None:
        with autocast:
            holder["logits"] = model(crops, box_areas)[:, 0].float()

    def teacher_forward() -> None:
        with torch.no_grad(), autocast:
            model(crops, box_areas)

    fwd = total_flops(student_forward)
    bwd = total_flops(lambda: holder.pop("logits").sum().backward())
    model.zero_grad(set_to_none=True)
    teacher = total_flops(teacher_forward)
    total = (fwd + bwd + teacher) / 2
    return {
        "student_forward_gflop": round(fwd / 2e9, 4),
        "student_backward_gflop": round(bwd / 2e9, 4),
        "teacher_forward_gflop": round(teacher / 2e9, 4),
        "gflop": round(total / 1e9, 4),
        "flop": total,
    }


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

    from mal_cli.device import resolve_device
    from mal_cli.modeling.labeler import LabelerConfig, MaskLabeler
    from mal_cli.train import TrainConfig

    dev = resolve_device(device)
    backbone = backbone or TrainConfig.backbone
    model = MaskLabeler(LabelerConfig(backbone=backbone, crop_size=crop_size)).to(dev).train()
    decoder = model.decoder
    probe_areas = route_probe_areas(decoder.area_bins)
    n_routes = len(decoder.route_scales)
    if areas is not None and len(areas):
        routes = decoder.route(torch.as_tensor(np.asarray(areas, dtype=np.float32))).tolist()
        share = [routes.count(r) / len(routes) for r in range(n_routes)]
    else:
        share = [1 / n_routes] * n_routes

    gen = torch.Generator().manual_seed(0)
    by_route: dict[str, dict] = {}
    per_sample = 0.0
    for r, scale in enumerate(decoder.route_scales):
        entry: dict[str, Any] = {"share": round(share[r], 4)}
        if share[r] > 0:
            crops = (torch.rand(2, 3, crop_size, crop_size, generator=gen) * 255).to(dev)
            entry.update(_sample_flops(model, crops, torch.full((2,), float(probe_areas[r]), device=dev)))
            per_sample += share[r] * entry.pop("flop")
        by_route[f"x{scale:g}"] = entry
    model = None  # free it before the caller's next measurement
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
    from mal_cli.device import resolve_device
    from mal_cli.modeling.labeler import compile_encoder_blocks

    device = resolve_device(config.device)

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

    from mal_cli.device import resolve_device
    from mal_cli.errors import MalError
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


def _run_train_child(config, folder: Optional[Path], split_steps: int):
    """`mal train`'s loop in a subprocess: its rusage, wall seconds, metrics.jsonl rows and result file."""
    with tempfile.TemporaryDirectory(prefix="mal-bench-train-", dir=folder) as tmp:
        run_dir = Path(tmp) / "run"
        config.out = str(run_dir)
        config_path, info_path = Path(tmp) / "train_config.json", Path(tmp) / "train_result.json"
        config_path.write_bytes(orjson.dumps(config.to_dict()))
        cmd = [sys.executable, "-m", "mal_cli.bench", "train-child", str(config_path), str(info_path), str(split_steps)]
        env = dict(os.environ)
        if not config.backbone_weights:
            env["HF_HUB_OFFLINE"] = "1"  # random backbone weights: the same cost, and no download in a benchmark
        usage, wall = run_child(cmd, "mal train (bench)", env)
        metrics_path = run_dir / "metrics.jsonl"
        rows = [orjson.loads(line) for line in metrics_path.read_bytes().splitlines() if line.strip()]
        info = orjson.loads(info_path.read_bytes()) if info_path.is_file() else {}
    return usage, wall, rows, info


def _flop_rates(config, rate: Optional[float]) -> dict:
    """GFLOP per training sample, weighted by the routes of the dataset's training boxes, and achieved TFLOP/s."""
    from mal_cli.dataset import load_dataset
    from mal_cli.train import collect_training_boxes

    records = collect_training_boxes(
        load_dataset(config.annotations), config.images, config.min_box_area, config.min_box_side
    )
    flops = training_flops_per_sample(config.crop_size, config.backbone, config.device, [r.area for r in records])
    return {
        "gflop_per_sample": flops["gflop_per_sample"],
        "gflop_per_sample_by_route": flops["by_route"],
        "tflop_per_s": round(rate * flops["flop_per_sample"] / 1e12, 5) if rate else None,
    }


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
    from mal_cli.device import resolve_device
    from mal_cli.train_config import TrainConfig

    if steps <= warmup_steps:
        raise ValueError(f"train steps ({steps}) must exceed the warm-up steps ({warmup_steps})")
    # `mal train`'s defaults, no validation, one checkpoint after the last logged step (outside the timed window)
    config = TrainConfig(
        annotations=str(dataset),
        images=str(images),
        backbone=backbone or TrainConfig.backbone,
        backbone_weights=str(backbone_weights) if backbone_weights else None,
        crop_size=crop_size,
        batch_size=batch_size,
        max_steps=steps,
        device=device,
        workers=workers,
        log_every=log_every,
        checkpoint_every=steps,
        compile=compile,
        precision=precision,
    )
    usage, wall, rows, info = _run_train_child(config, folder, split_steps)
    log = [
        {"step": int(r["step"]), "time": float(r["time"]), "samples_per_s": float(r["samples_per_s"])}
        for r in rows
        if "time" in r
    ]
    if not log:
        raise RuntimeError("mal train (bench) logged no timed steps in its metrics.jsonl")
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
        **child_usage(usage),
        "skipped_nonfinite": final.get("skipped_nonfinite"),
        "log": log,
    }
    for key in ("gpu_name", "gpu_peak_allocated_mib", "gpu_peak_reserved_mib", "torch", "split"):
        if key in info:
            result[key] = info[key]
    if count_flops:
        result.update(_flop_rates(config, result["samples_per_s_steady"]))
    return result

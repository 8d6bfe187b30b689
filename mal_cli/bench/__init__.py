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
   dataset's boxes (`--crop-sizes`, as `mal label`; at `--precision`, as `BoxPredictor`), boxes/s and achieved
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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mal_cli.errors import InputError
from mal_cli.precision import check as check_precision

__all__ = ["BenchConfig", "run_bench"]

BENCH_METHODS = ("both", "mal", "box", "none")


@dataclass
class BenchConfig:
    """What `mal bench` measures and how; the defaults are the command line's."""

    dataset: str
    images: str
    checkpoint: Optional[str] = None  # None: the shipped labeler
    device: str = "auto"
    batch_size: int = 64
    workers: Optional[int] = None  # None: `mal label`'s default
    crop_sizes: Optional[str] = None  # as `mal label --crop-sizes`
    compile: bool = False
    precision: str = "auto"  # as `mal label --precision`, for every row that runs the model
    limit: Optional[int] = None  # the first whole images holding at least this many boxes
    repeat: int = 1  # label the (limited) dataset this many times over, new ids each time
    method: str = "both"  # both, mal, box or none (no labelling benchmark)
    stages: bool = True
    stage_limit: Optional[int] = 512  # boxes of the serial stage pass (--method mal)
    model: bool = True
    peak: bool = True
    pipeline: bool = True
    train: bool = False
    train_crop_size: int = 504
    train_batch_size: int = 64
    train_steps: int = 60
    train_warmup: int = 20
    train_workers: Optional[int] = None  # None: `mal train`'s default
    train_split_steps: int = 10
    backbone_weights: Optional[str] = None  # None: random weights (the same cost)
    backbone: Optional[str] = None  # None: `mal train`'s

    @property
    def methods(self) -> tuple[str, ...]:
        return {"both": ("mal", "box"), "none": ()}.get(self.method, (self.method,))

    def validate(self) -> None:
        if self.method not in BENCH_METHODS:
            raise InputError(f"--method must be one of {', '.join(BENCH_METHODS)}, got '{self.method}'")
        check_precision(self.precision)
        if self.repeat < 1:
            raise InputError(f"--repeat must be at least 1, got {self.repeat}")
        if self.train_split_steps < 0:
            raise InputError(f"--train-split-steps must be 0 or more, got {self.train_split_steps}")
        if self.train and self.train_steps <= self.train_warmup:
            raise InputError("--train-steps must exceed --train-warmup")


def _labelling(config: BenchConfig, result: dict, folder: Path) -> None:
    from mal_cli.bench.labelling import end_to_end, pipeline_ceiling, subset_dataset

    c = config
    subset, n_images, n_boxes = subset_dataset(c.dataset, c.limit, folder, c.repeat)
    result["images"], result["boxes"] = n_images, n_boxes
    result["end_to_end"] = {}
    for method in c.methods:
        result["end_to_end"][method] = end_to_end(
            subset,
            c.images,
            method,
            c.checkpoint,
            c.device,
            c.batch_size,
            c.workers,
            folder,
            crop_sizes=c.crop_sizes,
            compile=c.compile,
            precision=c.precision,
        )
    if c.pipeline and "mal" in c.methods:
        result["pipeline"] = pipeline_ceiling(
            subset, c.images, c.checkpoint, c.device, c.batch_size, c.workers, folder, c.crop_sizes
        )
    if c.train:
        from mal_cli.bench.training import train_benchmark

        # Before anything below allocates device memory in this process: the training run gets the whole device.
        # On the whole DATASET (--limit applies to labelling only).
        result["train"] = train_benchmark(
            c.dataset,
            c.images,
            c.device,
            c.train_crop_size,
            c.train_batch_size,
            c.train_steps,
            c.train_warmup,
            c.train_workers,
            c.backbone_weights,
            c.backbone,
            folder=folder,
            split_steps=c.train_split_steps,
            compile=c.compile,
            precision=c.precision,
        )
    if c.stages:
        from mal_cli.bench.labelling import stage_benchmark

        result["stages"] = {
            m: stage_benchmark(
                subset,
                c.images,
                c.checkpoint,
                c.device,
                c.batch_size,
                m,
                c.stage_limit if m == "mal" else None,
                c.crop_sizes,
                c.precision,
            )
            for m in c.methods
        }


def _peak(config: BenchConfig, result: dict) -> None:
    from mal_cli.bench.model import measure_peak_flops

    result["peak"] = measure_peak_flops(config.device)
    # fp32 too: on a CPU without AMX it is the faster of the two (`--precision auto` picks it there)
    import torch

    result["peak"]["fp32_tflop_per_s"] = measure_peak_flops(config.device, dtype=torch.float32)["tflop_per_s"]
    peak = result["peak"]["tflop_per_s"]
    if "model" in result and peak:
        result["model"]["fraction_of_peak"] = round(result["model"]["tflop_per_s"] / peak, 4)
    if result.get("train", {}).get("tflop_per_s") and peak:
        result["train"]["fraction_of_peak"] = round(result["train"]["tflop_per_s"] / peak, 4)


def run_bench(config: BenchConfig) -> dict:
    """All measurements (see the module docstring) as one JSON-able dict."""
    import torch

    from mal_cli.bench.common import rss_mib
    from mal_cli.device import resolve_device
    from mal_cli.precision import cpu_has_fast_bf16, cpu_model_name

    config.validate()
    c = config
    result: dict[str, Any] = {
        "dataset": c.dataset,
        "images_dir": c.images,
        "device": str(resolve_device(c.device)),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model_name(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),  # what `--precision auto` goes by on a CPU
        "batch_size": c.batch_size,
        "workers": c.workers,
        "crop_sizes": c.crop_sizes,
        "limit": c.limit,
        "repeat": c.repeat,
        "compile": c.compile,
        "precision": c.precision,  # as given; the rows that run a model say which one ran
    }
    with tempfile.TemporaryDirectory(prefix="mal-bench-") as tmp:
        _labelling(config, result, Path(tmp))
    if c.model and "mal" in c.methods:
        from mal_cli.bench.model import model_benchmark, route_areas

        result["model"] = model_benchmark(
            c.checkpoint,
            c.device,
            c.batch_size,
            route_areas(c.dataset, c.batch_size),
            crop_sizes=c.crop_sizes,
            compile=c.compile,
            precision=c.precision,
        )
    if c.peak:
        _peak(config, result)
    result["bench_peak_rss_mib"] = rss_mib()
    return result

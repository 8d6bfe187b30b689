"""The `mal` command line: a thin Typer layer over functions a user can import.

Each command imports its module lazily so that `mal --help` stays fast (torch is heavy).
Errors the user can act on are `MalError`s: printed as one line on stderr, exit code != 0.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from mal_cli import __version__
from mal_cli.errors import MalError

app = typer.Typer(
    name="mal",
    help=(
        "mal — Mask Auto-Labeler. Train a ViT labeler from the boxes of a COCO/LVIS detection dataset, "
        "then turn every box into an instance mask.\n\n"
        "Typical use:\n\n"
        "  mal label boxes.json --images imgs/ --out labels.json\n\n"
        "  mal eval labels.json --gt gt_with_masks.json"
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mal {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full Python tracebacks on errors."),
) -> None:
    _state["debug"] = debug


# --- commands -----------------------------------------------------------------------------------
# Each command lives in its own section below; keep them thin: parse options, call the library.


# --- train ----------------------------------------------------------------------------------------


@app.command(
    "train",
    epilog=(
        "Examples:\n\n"
        "  mal train boxes.json --images imgs/ --out runs/a --backbone-weights models/dinov2_vits14_timm.pth\n\n"
        "  mal train boxes.json --images imgs/ --out runs/a --resume\n\n"
        "  torchrun --nproc-per-node 8 -m mal_cli train boxes.json --images imgs/ --out runs/a"
    ),
)
def train_command(
    boxes: Path = typer.Argument(..., help="COCO or LVIS dataset JSON; only its boxes are used (masks are ignored)."),
    images: Path = typer.Option(..., "--images", "-i", help="Folder with the dataset's images."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoint.pth, labeler.pth, metrics.jsonl."),
    backbone: str = typer.Option("vit_small_patch14_dinov2", help="timm ViT name, e.g. vit_base_patch16_224.mae."),
    backbone_weights: Optional[Path] = typer.Option(None, help="ViT weights file in timm layout (else timm pretrained if online, else random)."),
    init: Optional[Path] = typer.Option(None, help="Start from an existing labeler checkpoint (fine-tune, e.g. the shipped one)."),
    crop_size: int = typer.Option(224, help="Crop side in pixels (a multiple of the patch size; the paper uses 512)."),
    epochs: int = typer.Option(10, help="Passes over the boxes."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many steps (overrides --epochs)."),
    batch_size: int = typer.Option(32, help="Boxes per step and process."),
    lr: float = typer.Option(1e-4, help="Peak learning rate of the decoder (AdamW, warm-up then cosine)."),
    backbone_lr_mult: float = typer.Option(0.1, help="Backbone learning rate = lr x this."),
    weight_decay: float = typer.Option(5e-4, help="AdamW weight decay."),
    warmup_steps: int = typer.Option(200, help="Linear learning-rate warm-up steps."),
    min_box_area: float = typer.Option(2048.0, help="Train on boxes with area above this (px^2)."),
    margin_max: float = typer.Option(1.2, help="Random crop expansion: per-side margins ~ U(0, this) x gate (1.0-1.6x crops)."),
    color_jitter: float = typer.Option(0.4, help="Student view: brightness/contrast/saturation jitter strength."),
    grayscale_prob: float = typer.Option(0.2, help="Student view: probability of grayscale."),
    blur_prob: float = typer.Option(0.3, help="Student view: probability of a Gaussian blur."),
    grad_clip: float = typer.Option(1.0, help="Clip the gradient norm to this."),
    mil_weight: float = typer.Option(4.0, help="MIL loss weight."),
    mil_ramp_steps: int = typer.Option(1000, help="Steps over which the MIL weight ramps in."),
    crf_weight: float = typer.Option(0.5, help="CRF loss weight."),
    crf_ramp_steps: int = typer.Option(4000, help="Steps over which the CRF weight ramps in."),
    crf_iterations: int = typer.Option(100, help="Mean-field iterations of the CRF."),
    crf_zeta: float = typer.Option(0.1, help="Colour bandwidth of the CRF affinity (image in [0, 1])."),
    ema_momentum: float = typer.Option(0.996, help="EMA teacher momentum."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    workers: Optional[int] = typer.Option(
        None, min=0, help="Data-loading worker processes (default: 2 on a CPU; on a GPU, the process's share of the cores less 2, 2 to 8)."),
    seed: int = typer.Option(0, help="Seed of every random draw (same seed, same run)."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="Autocast at --precision; --no-amp: fp32."),
    precision: str = typer.Option(
        "auto", help="auto, fp32 or bf16 (fp16 is for labelling). auto: bf16 on a CUDA GPU and on CPUs with fast bf16 "
        "matmul (AMX), else fp32 (docs/performance.md). The log's first line says which runs."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the encoder's transformer blocks (student and teacher; "
                                 "a one-off compile of forward and backward). Meant for GPUs, not yet measured there "
                                 "(`mal bench --train --compile`); on a 2-core CPU, steady steps within noise of eager."),
    checkpoint_every: int = typer.Option(500, help="Write RUN_DIR/checkpoint.pth every N steps."),
    val: Optional[Path] = typer.Option(None, help="A dataset JSON with masks: log mIoU of the teacher every --val-every steps."),
    val_images: Optional[Path] = typer.Option(None, help="Images of --val (default: --images)."),
    val_every: int = typer.Option(500, help="Validation interval in steps."),
    val_limit: int = typer.Option(500, help="Validate on at most this many instances."),
    resume: bool = typer.Option(False, "--resume", help="Continue from RUN_DIR/checkpoint.pth."),
) -> None:
    """Train a MAL labeler from boxes alone (MIL + CRF losses, EMA teacher)."""
    import logging

    from mal_cli.train import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config = TrainConfig(
        annotations=str(boxes), images=str(images), out=str(out), backbone=backbone,
        backbone_weights=str(backbone_weights) if backbone_weights else None, init=str(init) if init else None,
        crop_size=crop_size, epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
        backbone_lr_mult=backbone_lr_mult, weight_decay=weight_decay, warmup_steps=warmup_steps,
        min_box_area=min_box_area, margin_max=margin_max, color_jitter=color_jitter, grayscale_prob=grayscale_prob,
        blur_prob=blur_prob, grad_clip=grad_clip, mil_weight=mil_weight, mil_ramp_steps=mil_ramp_steps, crf_weight=crf_weight,
        crf_ramp_steps=crf_ramp_steps, crf_iterations=crf_iterations, crf_zeta=crf_zeta, ema_momentum=ema_momentum,
        device=device, workers=workers, seed=seed, amp=amp, precision=precision, compile=compile,
        checkpoint_every=checkpoint_every, val=str(val) if val else None, val_images=str(val_images) if val_images else None, val_every=val_every,
        val_limit=val_limit, resume=resume,
    )
    result = train(config)
    if result.get("interrupted"):
        raise typer.Exit(130)


# --- eval -----------------------------------------------------------------------------------------


@app.command(
    "eval",
    epilog=(
        "Examples:\n\n"
        "  mal eval labels.json --gt instances_val2017.json\n\n"
        "  mal eval labels.json --gt lvis_v1_val.json --reference-ap 38.6 --json report.json\n\n"
        "  mal eval results.json --gt instances_val2017.json --json - > report.json"
    ),
)
def eval_command(
    pred: str = typer.Argument(..., help="Labelled dataset JSON (what `mal label` writes) or a COCO results list; - = stdin."),
    gt: str = typer.Option(..., "--gt", help="Ground-truth COCO or LVIS dataset JSON with masks (the boxes' source)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write every figure as JSON to this file (- = stdout)."),
    reference_ap: Optional[float] = typer.Option(
        None, "--reference-ap", help="AP in percent of a reference (e.g. a fully supervised model): print retention = AP / this."
    ),
    ap: bool = typer.Option(True, "--ap/--no-ap", help="Compute COCO/LVIS segm AP (--no-ap: mIoU only, faster)."),
) -> None:
    """Score predicted masks against GT masks, with the GT boxes as prompts: mIoU and segm AP."""
    from rich.console import Console

    from mal_cli.dataset import load_any, load_dataset, write_json_atomic
    from mal_cli.errors import InputError
    from mal_cli.evaluate import evaluate, report_table

    if pred == "-" and gt == "-":
        raise InputError("PRED and --gt cannot both be read from stdin; give at least one a file path")
    if reference_ap is not None and not reference_ap > 0:
        raise InputError(f"--reference-ap must be a positive percentage such as 38.6, got {reference_ap}")
    if json_out:
        from mal_cli.check import ensure_writable

        ensure_writable(json_out, "--json")  # before the (long) evaluation
    ground_truth = load_dataset(gt)
    report = evaluate(
        load_any(pred), ground_truth, reference_ap=reference_ap / 100 if reference_ap else None, compute_ap=ap
    )
    # The table goes to stderr when stdout carries the JSON report.
    Console(stderr=json_out == "-").print(report_table(report, title=f"mal eval: {Path(pred).name} vs {Path(gt).name}"))
    if json_out:
        write_json_atomic(json_out, report.to_dict())


# --- label ----------------------------------------------------------------------------------------


@app.command(
    "label",
    epilog=(
        "Output: the input with `segmentation`, `area` (mask pixels) and `mal_score` (0..1, low = check first) "
        "on every annotation; ids, order and other fields kept. Boxes that cannot be labelled get the filled box "
        "and `mal_fallback`: degenerate_box | image_error.\n\n"
        "Progress is appended to OUT.progress.jsonl as it goes; after a crash rerun with --resume "
        "(same output bytes as an uninterrupted run).\n\n"
        "Examples:\n\n"
        "  mal label instances_val2017.json --images val2017/ --out labels.json\n\n"
        "  mal label detections.json --image-info instances_val2017.json --images val2017/ --out labels.json\n\n"
        "  mal label boxes.json --images imgs/ --out labels.json --resume\n\n"
        "  mal label boxes.json --images imgs/ --out part0.json --shard 0/2   (then: mal merge part*.json --out labels.json)\n\n"
        "  torchrun --nproc-per-node 8 -m mal_cli label boxes.json --images imgs/ --out labels.json\n\n"
        "  mal label boxes.json --images imgs/ --method box --out - | mal eval - --gt gt.json"
    ),
)
def label_command(
    boxes: str = typer.Argument(..., help="COCO/LVIS dataset JSON, or a detector results list [{image_id, bbox, category_id, score}]; - = stdin."),
    images: Path = typer.Option(..., "--images", "-i", help="Folder with the images."),
    out: str = typer.Option(..., "--out", "-o", help="Labelled JSON to write (atomically); - = stdout (logs go to stderr)."),
    image_info: Optional[str] = typer.Option(None, "--image-info", help="Dataset JSON with the images' file names and sizes (needed for a results list)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Labeler checkpoint (default: $MAL_CHECKPOINT or the shipped models/mal_vits14_coco343.pth)."),
    method: str = typer.Option("mal", help="mal: the labeler; box: the filled box (baseline, needs no model)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(64, help="Boxes per model batch (across images). Part of the result: keep it when resuming."),
    workers: Optional[int] = typer.Option(
        None, help="Image decoding + cropping processes, and as many for pasting + RLE (0 = all in the main process). "
        "Default: 0 when the model runs on a CPU of at most 4 cores (it uses them all), about half the cores "
        "(at most 8) with a GPU, else 2.",
    ),
    crop_sizes: Optional[str] = typer.Option(
        None, "--crop-sizes", metavar="S,M,L",
        help="Crop size for small, medium and large boxes (box area limits 32², 96²; multiples of the patch size), "
        "or 'full' (the model's crop size for all and its trained decoder resolution: the exact model, slower). "
        "Default: 3/4, 7/8 and all of the model's crop (168,196,224 for the shipped model: 1.4x faster on a CPU for "
        "0.3 mIoU less). Any choice but 'full' also runs large boxes' decoder at 3/4 of its trained resolution "
        "(1.07x faster on a CPU, 0.1 AP less). See README 'Performance'.",
    ),
    threshold: Optional[float] = typer.Option(None, help="Mask probability threshold (default: the checkpoint's, 0.5)."),
    flip: bool = typer.Option(False, "--flip", help="Average with the horizontally flipped crop (2x compute)."),
    teacher: bool = typer.Option(False, "--teacher", help="Use the EMA teacher weights of a training checkpoint."),
    fmt: str = typer.Option("rle", "--format", help="rle (compressed, counts as str) or polygon (holes are filled)."),
    only_missing: bool = typer.Option(False, "--only-missing", help="Keep existing segmentations; label only annotations without one."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: label the K-th of N disjoint parts (whole images); join with `mal merge`."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT.progress.jsonl (starts fresh if there is none)."),
    keep_progress: bool = typer.Option(False, "--keep-progress", help="Keep OUT.progress.jsonl after OUT is written."),
    summary_json: Optional[str] = typer.Option(None, "--summary-json", help="Write the run summary (images, boxes, fallbacks, boxes/s) as JSON here."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first missing/corrupt image instead of labelling its boxes with a flagged fallback."),
    compile: bool = typer.Option(
        False, "--compile", help="torch.compile the encoder's transformer blocks (a one-off compile: ~30 s on a CPU; masks "
        "within bf16 rounding of eager). Meant for GPUs, where it is not yet measured: compare with `mal bench --compile`. "
        "On a 2-core CPU it did not pay (README 'Performance')."),
    precision: str = typer.Option(
        "auto", help="Model precision: auto, fp32, bf16 or fp16. auto: bf16 on a CUDA GPU and on CPUs with fast bf16 "
        "matmul (AMX), else fp32 (docs/performance.md). The one that ran is in the summary and the resume fingerprint."),
) -> None:
    """Turn every box into an instance mask (batched, streaming, resumable, shardable)."""
    import logging

    from mal_cli.check import ensure_writable
    from mal_cli.dataset import write_json_atomic
    from mal_cli.label import LabelOptions, label, parse_crop_sizes, parse_shard

    if summary_json:
        ensure_writable(summary_json, "--summary-json")
    logging.basicConfig(level=logging.INFO, format="mal: %(levelname)s %(message)s", stream=sys.stderr)
    options = LabelOptions(
        method=method, checkpoint=str(checkpoint) if checkpoint else None, teacher=teacher, threshold=threshold,
        flip=flip, format=fmt, only_missing=only_missing, batch_size=batch_size, device=device, workers=workers,
        strict=strict, crop_sizes=parse_crop_sizes(crop_sizes) if crop_sizes else None, compile=compile,
        precision=precision,
    )
    summary = label(
        boxes, str(images), out, options, image_info=image_info, shard=parse_shard(shard) if shard else None,
        resume=resume, keep_progress=keep_progress, progress_bar=progress,
    )
    if summary.out == out:  # torchrun ranks other than 0 return their shard's summary: print only the merged one
        typer.echo(summary.line(), err=True)
        if summary_json:
            write_json_atomic(summary_json, summary.to_dict())


# --- merge ----------------------------------------------------------------------------------------


@app.command(
    "merge",
    epilog=(
        "Parts: `mal label --shard K/N` outputs (all N, put back in input order: the same bytes as one run), "
        "labelled datasets (union, de-duplicated by annotation id) or OUT.progress.jsonl files (need --into, the "
        "labelled input).\n\n"
        "Examples:\n\n"
        "  mal merge labels.shard0.json labels.shard1.json --out labels.json\n\n"
        "  mal merge part_a.json part_b.json --out labels.json --prefer last\n\n"
        "  mal merge new_labels.json --into dataset_with_some_masks.json --out complete.json\n\n"
        "  mal merge labels.json.progress.jsonl --into boxes.json --out partial_labels.json"
    ),
)
def merge_command(
    parts: List[str] = typer.Argument(..., help="Shard outputs, labelled datasets or progress files."),
    out: str = typer.Option(..., "--out", "-o", help="Merged JSON to write (atomically); - = stdout."),
    into: Optional[str] = typer.Option(None, "--into", help="Dataset to fill: its existing masks are kept, the parts label the rest."),
    prefer: Optional[str] = typer.Option(None, "--prefer", help="first or last: which copy wins when one annotation id differs between parts (default: error)."),
) -> None:
    """Merge `mal label` shards or label files into one dataset (same images and categories required)."""
    from mal_cli.check import ensure_writable
    from mal_cli.merge import merge_files

    ensure_writable(out)
    stats = merge_files(parts, out, into=into, prefer=prefer)
    typer.echo(f"mal merge: {stats['parts']} parts -> {stats['annotations']} annotations -> {out}", err=True)


# --- check ----------------------------------------------------------------------------------------


@app.command(
    "check",
    epilog=(
        "Errors: the input cannot be used as it is (mal label / mal train refuse it). Warnings: the run goes on "
        "and the affected boxes get a flagged fallback (mal_fallback). Exit code: 0 no problems, 1 problems found, "
        "2 unusable arguments.\n\n"
        "Examples:\n\n"
        "  mal check instances_val2017.json --images val2017/\n\n"
        "  mal check boxes.json --images imgs/ --decode --json report.json\n\n"
        "  mal check detections.json --image-info instances_val2017.json"
    ),
)
def check_command(
    dataset: str = typer.Argument(..., help="COCO/LVIS dataset JSON or a results list (with --image-info); - = stdin."),
    images: Optional[str] = typer.Option(None, "--images", "-i", help="Also check that every image file exists here (stat only)."),
    image_info: Optional[str] = typer.Option(None, "--image-info", help="Dataset JSON with the images of a results list."),
    decode: bool = typer.Option(False, "--decode", help="With --images: decode every image too (slow; finds corrupt/truncated files)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the report as JSON to this file (- = stdout)."),
) -> None:
    """Validate a dataset and its images up front; report every problem at once (grouped, counted, with examples)."""
    import orjson

    from mal_cli.check import check_paths, ensure_writable
    from mal_cli.dataset import write_json_atomic

    if decode and images is None:
        from mal_cli.errors import InputError

        raise InputError("--decode needs --images DIR (the folder with the image files)")
    if json_out:
        ensure_writable(json_out, "--json")
    report = check_paths(dataset, images, image_info, decode)
    if json_out:
        write_json_atomic(json_out, report.to_dict())
    typer.echo(report.text(), err=json_out == "-")
    if not report.clean:
        raise typer.Exit(1)


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Click's usage-error and abort classes: Typer >= 0.20 raises those of its vendored copy (typer._click)."""
    import click

    errors: list[type] = [click.exceptions.ClickException]
    aborts: list[type] = [click.exceptions.Abort, typer.Abort]
    try:
        from typer._click import exceptions as vendored

        errors.append(vendored.ClickException)
    except ImportError:
        pass
    return tuple(errors), tuple(aborts)


# --- viz ------------------------------------------------------------------------------------------


@app.command(
    "viz",
    epilog=(
        "Writes OUT/index.html (contact sheet, thumbnails embedded: open it anywhere), OUT/crops/*.png (one overlay "
        "per instance, numbered by review rank), OUT/review.json, and with --full OUT/full/*.png.\n\n"
        "Examples:\n\n"
        "  mal viz labels.json --images imgs/ --out review/ --worst 100\n\n"
        "  mal viz labels.json --images imgs/ --out review/ --gt gt_with_masks.json --full"
    ),
)
def viz_command(
    labels: str = typer.Argument(..., help="Labelled JSON (what `mal label` writes) or a results list; - = stdin."),
    images: Path = typer.Option(..., "--images", "-i", help="Folder with the images."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the review into (created)."),
    worst: Optional[int] = typer.Option(None, "--worst", "-n", help="Only the N worst instances (default: all)."),
    gt: Optional[str] = typer.Option(None, "--gt", help="Ground truth with masks: sort by IoU, show it and the GT outline."),
    image_info: Optional[str] = typer.Option(None, "--image-info", help="Dataset JSON with the images (for a results list)."),
    full: bool = typer.Option(False, "--full", help="Also write whole-image overlays to OUT/full/."),
    context: float = typer.Option(0.25, help="Context around the box in a crop, as a fraction of the box size."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
) -> None:
    """Review labels worst-first: overlay PNGs and a self-contained HTML contact sheet."""
    from mal_cli.viz import write_review

    summary = write_review(labels, images, out, worst=worst, gt=gt, image_info=image_info, full=full,
                           context=context, progress_bar=progress)
    for path in summary["missing_images"][:5]:
        typer.echo(f"mal viz: warning: cannot read {path}; drawn on grey", err=True)
    typer.echo(f"mal viz: {summary['instances']} of {summary['total']} instances, worst first by "
               f"{summary['sorted_by']} -> {Path(summary['out']) / 'index.html'}", err=True)


# --- export ---------------------------------------------------------------------------------------

export_app = typer.Typer(help="Convert labels to other formats.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command(
    "yolo",
    epilog=(
        "Writes OUT/labels/<image>.txt (one per image; lines: class_id x1 y1 x2 y2 ... normalised to 0..1), "
        "OUT/classes.txt and OUT/data.yaml (class k = k-th category by COCO id). Crowd and empty masks are "
        "skipped.\n\n"
        "Multi-part masks (--parts): merge = one polygon joined by zero-width bridges (default, as Ultralytics' "
        "converter), largest = the largest part only, lines = one line per part.\n\n"
        "Examples:\n\n"
        "  mal export yolo labels.json --out yolo/ --link-images imgs/\n\n"
        "  mal label boxes.json --images imgs/ --out - | mal export yolo - --out yolo/"
    ),
)
def export_yolo_command(
    labels: str = typer.Argument(..., help="Labelled JSON (what `mal label` writes); - = stdin."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write labels/, classes.txt and data.yaml into."),
    parts: str = typer.Option("merge", "--parts", help="merge, largest or lines: how a mask in several parts is written."),
    image_info: Optional[str] = typer.Option(None, "--image-info", help="Dataset JSON with images and categories (for a results list)."),
    link_images: Optional[Path] = typer.Option(None, "--link-images", help="Symlink the images of this folder into OUT/images/."),
) -> None:
    """Export labels as YOLO segmentation text files (Ultralytics layout)."""
    from mal_cli.export import export_yolo

    stats = export_yolo(labels, out, parts=parts, image_info=image_info, link_images=link_images)
    typer.echo(f"mal export yolo: {stats['images']} images, {stats['lines']} lines ({stats['instances']} instances, "
               f"{stats['skipped_crowd']} crowd and {stats['skipped_empty']} empty skipped), "
               f"{stats['classes']} classes -> {out}", err=True)


# --- bench ----------------------------------------------------------------------------------------


@app.command(
    "bench",
    epilog=(
        "Examples:\n\n"
        "  mal bench coco/annotations.json --images coco/images --limit 500 --json bench.json\n\n"
        "  mal bench boxes.json --images imgs/ --device cuda --batch-size 256 --workers 8 --repeat 15\n\n"
        "  mal bench boxes.json --images imgs/ --device cuda --method none --train --train-crop-size 504 "
        "--train-batch-size 64 --backbone-weights models/dinov2_vits14_timm.pth"
    ),
)
def bench_command(
    dataset: str = typer.Argument(..., help="COCO/LVIS dataset JSON whose boxes are labelled."),
    images: Path = typer.Option(..., "--images", "-i", help="Folder with the images."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Labeler checkpoint (default: the shipped one)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(64, help="Boxes per model batch."),
    workers: Optional[int] = typer.Option(None, help="Worker processes of `mal label` (default: its default)."),
    crop_sizes: Optional[str] = typer.Option(None, "--crop-sizes", metavar="S,M,L", help="As `mal label --crop-sizes` (default: its default)."),
    compile: bool = typer.Option(False, "--compile", help="As `mal label --compile` / `mal train --compile`: for the end-to-end, model and training rows (the compile time is in the end-to-end time and the training warm-up)."),
    limit: Optional[int] = typer.Option(None, help="Use the first whole images holding at least N boxes."),
    repeat: int = typer.Option(
        1, min=1, help="Label the dataset (after --limit) N times over, with new ids each time: a run long enough "
                       "to time a fast GPU on a small set (labelling only; --train uses DATASET)."),
    method: str = typer.Option(
        "both", help="both, mal, box or none (box: the pipeline alone, no model; none: no labelling benchmark, e.g. with --train)."
    ),
    stages: bool = typer.Option(True, "--stages/--no-stages", help="Time the pipeline's stages apart (serial pass)."),
    model: bool = typer.Option(True, "--model/--no-model", help="Time the model alone and count its FLOPs."),
    peak: bool = typer.Option(True, "--peak/--no-peak", help="Measure a bf16 matmul peak to compare the model with."),
    pipeline: bool = typer.Option(
        True, "--pipeline/--no-pipeline",
        help="Also run `mal label --method mal` with the model swapped for a zero-cost stand-in: the pipeline's own "
             "ceiling, and its CPU ms/box in the main process (serial: a limit however fast the device) and in the workers.",
    ),
    train: bool = typer.Option(
        False, "--train/--no-train",
        help="Also measure training throughput: `mal train`'s loop in a subprocess on DATASET (no validation), "
             "steady samples/s after --train-warmup steps, GFLOP/sample and TFLOP/s.",
    ),
    train_crop_size: int = typer.Option(504, help="Training crop side (a multiple of the patch size; 504 = 36 x 14 for ViT-S/14, about 512)."),
    train_batch_size: int = typer.Option(64, help="Training boxes per step."),
    train_steps: int = typer.Option(60, help="Training steps to run."),
    train_warmup: int = typer.Option(20, help="Training steps left out of the steady rate (start-up, warm-up)."),
    train_workers: Optional[int] = typer.Option(None, help="Data-loading workers of the training run (default: mal train's)."),
    train_split_steps: int = typer.Option(
        10, min=0, help="After the run, time each stage of a training step apart and the loader alone over N steps (0: skip)."),
    backbone_weights: Optional[Path] = typer.Option(
        None, help="ViT weights file for the training run (as `mal train --backbone-weights`; default: random weights, the same cost)."
    ),
    backbone: Optional[str] = typer.Option(None, help="timm ViT name for the training run (default: mal train's, vit_small_patch14_dinov2)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write all figures as JSON here."),
    precision: str = typer.Option("auto", help="As `mal label --precision` / `mal train --precision`, for every row that runs the model."),
) -> None:
    """Benchmark `mal label` and, with --train, `mal train`: throughput, memory, FLOP/s vs the device peak.

    Labelling: boxes/s end to end, time per stage, peak memory, the model alone. Training (--train): steady and
    overall samples/s of `mal train`'s loop, GFLOP per sample and achieved TFLOP/s.
    """
    from rich.console import Console

    from mal_cli.bench import bench_table, run_bench

    if method not in ("both", "mal", "box", "none"):
        raise typer.BadParameter("--method must be both, mal, box or none")
    if precision not in ("auto", "fp32", "bf16", "fp16"):  # `mal_cli.precision.CHOICES`
        raise typer.BadParameter("--precision must be auto, fp32, bf16 or fp16")
    if train and train_steps <= train_warmup:
        raise typer.BadParameter("--train-steps must exceed --train-warmup")
    methods = {"both": ("mal", "box"), "none": ()}.get(method, (method,))
    result = run_bench(dataset, str(images), str(checkpoint) if checkpoint else None, device, batch_size, workers,
                       limit, methods, stages=stages, model=model, peak=peak, crop_sizes=crop_sizes, train=train,
                       train_crop_size=train_crop_size, train_batch_size=train_batch_size, train_steps=train_steps,
                       train_warmup=train_warmup, train_workers=train_workers,
                       backbone_weights=str(backbone_weights) if backbone_weights else None, backbone=backbone,
                       train_split_steps=train_split_steps, pipeline=pipeline, repeat=repeat, compile=compile,
                       precision=precision)
    Console(stderr=True).print(bench_table(result))
    if json_out:
        import orjson

        Path(json_out).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))


def main() -> None:
    """Entry point of the `mal` console script."""
    debug = "--debug" in sys.argv[1:]
    try:
        code = app(standalone_mode=False)  # typer.Exit(n) inside a command comes back as a return value here
        if isinstance(code, int) and code:
            sys.exit(code)
    except MalError as err:
        if debug:
            raise
        typer.echo(f"mal: error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("mal: interrupted", err=True)
        sys.exit(130)
    except typer.Exit as err:  # --help, --version
        sys.exit(err.exit_code)
    except SystemExit:
        raise
    except Exception as err:  # click usage errors and the like
        click_errors, aborts = _click_exception_types()
        if isinstance(err, click_errors):  # usage errors: Click's own message and usage line, exit 2
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, aborts):
            typer.echo("mal: aborted", err=True)
            sys.exit(130)
        if debug:
            raise
        typer.echo(f"mal: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)

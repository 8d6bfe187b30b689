"""`mal label`: turn every box into an instance mask (options: `labeling.options.LabelOptions`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mal_cli.commands import command
from mal_cli.commands._options import Device, Images
from mal_cli.labeling.options import FORMATS, METHODS, LabelOptions
from mal_cli.precision import CHOICES as PRECISIONS

_LABEL = LabelOptions


_Boxes = Annotated[
    str, typer.Argument(metavar="BOXES", help="COCO/LVIS dataset JSON or detector results list; - = stdin.")
]
_Out = Annotated[str, typer.Option("--out", "-o", help="Labelled JSON to write (atomically); - = stdout.")]
_ImageInfo = Annotated[
    Optional[str],
    typer.Option("--image-info", help="Dataset JSON with the images' names and sizes (for a results list)."),
]
_Checkpoint = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", "-c", help="Labeler checkpoint [default: $MAL_CHECKPOINT, else the shipped one]."),
]
_Method = Annotated[
    str, typer.Option(metavar="|".join(METHODS), help="mal: the labeler; box: the filled box (no model).")
]
_BatchSize = Annotated[int, typer.Option(help="Boxes per model batch; part of the result (keep it when resuming).")]
_Workers = Annotated[
    Optional[int], typer.Option(help="Loading and post-processing processes [default: by device and cores].")
]
_CropSizes = Annotated[
    Optional[str],
    typer.Option(
        "--crop-sizes",
        metavar="S,M,L|full",
        help="Crop size for small, medium, large boxes, or 'full' (the exact model) [default: 3/4, 7/8, 1 of the "
        "model's].",
    ),
]
_Threshold = Annotated[Optional[float], typer.Option(help="Mask probability threshold [default: the checkpoint's].")]
_Flip = Annotated[bool, typer.Option("--flip", help="Average with the horizontally flipped crop (2x compute).")]
_Teacher = Annotated[bool, typer.Option("--teacher", help="Use the EMA teacher weights of a training checkpoint.")]
_Fmt = Annotated[
    str, typer.Option("--format", metavar="|".join(FORMATS), help="Compressed RLE, or polygons (holes filled).")
]
_OnlyMissing = Annotated[bool, typer.Option("--only-missing", help="Keep existing segmentations; label the others.")]
_Shard = Annotated[
    Optional[str],
    typer.Option("--shard", metavar="K/N", help="Label the K-th of N parts (whole images); join with `mal merge`."),
]
_Resume = Annotated[bool, typer.Option("--resume", help="Continue from OUT.progress.jsonl (starts fresh without one).")]
_KeepProgress = Annotated[bool, typer.Option("--keep-progress", help="Keep OUT.progress.jsonl after OUT is written.")]
_SummaryJson = Annotated[Optional[str], typer.Option("--summary-json", help="Write the run summary as JSON here.")]
_Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr.")]
_Strict = Annotated[
    bool, typer.Option("--strict", help="Stop at the first unreadable image instead of a flagged fallback.")
]
_AllowOutside = Annotated[
    bool,
    typer.Option("--allow-outside-images", help="Read file_names that are absolute or climb out of --images (..)."),
]
_MinScore = Annotated[
    float, typer.Option("--min-score", help="Leave out detections scored below this (boxes without a score stay).")
]
_Compile = Annotated[
    bool, typer.Option("--compile", help="torch.compile the encoder's blocks (a one-off compile; meant for GPUs).")
]
_Precision = Annotated[
    str,
    typer.Option(
        metavar="|".join(PRECISIONS),
        help="Model precision. auto: bf16 on a GPU or a CPU with fast bf16 (AMX), else fp32.",
    ),
]


@command(
    "label",
    epilog=(
        "Output: the input with `segmentation`, `area` and `mal_score` (0..1, low = check first) on every "
        "annotation. Boxes that cannot be labelled get the filled box and `mal_fallback` (degenerate_box | "
        "image_error). After a crash, rerun with --resume: same bytes as an uninterrupted run.\n\n"
        "Examples:\n\n\b\n"
        "  mal label instances_val2017.json --images val2017/ --out labels.json\n"
        "  mal label detections.json --image-info instances_val2017.json --images val2017/ --out labels.json\n"
        "  mal label boxes.json --images imgs/ --out part0.json --shard 0/2   (then: mal merge part*.json)\n"
        "  torchrun --nproc-per-node 8 -m mal_cli label boxes.json --images imgs/ --out labels.json"
    ),
)
def label_command(
    boxes: _Boxes,
    images: Images,
    out: _Out,
    image_info: _ImageInfo = None,
    checkpoint: _Checkpoint = None,
    method: _Method = _LABEL.method,
    device: Device = _LABEL.device,
    batch_size: _BatchSize = _LABEL.batch_size,
    workers: _Workers = _LABEL.workers,
    crop_sizes: _CropSizes = None,
    threshold: _Threshold = _LABEL.threshold,
    flip: _Flip = _LABEL.flip,
    teacher: _Teacher = _LABEL.teacher,
    fmt: _Fmt = _LABEL.format,
    only_missing: _OnlyMissing = _LABEL.only_missing,
    shard: _Shard = None,
    resume: _Resume = False,
    keep_progress: _KeepProgress = False,
    summary_json: _SummaryJson = None,
    progress: _Progress = True,
    strict: _Strict = _LABEL.strict,
    compile: _Compile = _LABEL.compile,
    precision: _Precision = _LABEL.precision,
    allow_outside_images: _AllowOutside = _LABEL.allow_outside_images,
    min_score: _MinScore = _LABEL.min_score,
) -> None:
    """Turn every box into an instance mask (batched, streaming, resumable, shardable)."""
    import logging

    from mal_cli.dataset import write_json_atomic
    from mal_cli.labeling import label, parse_crop_sizes, parse_shard
    from mal_cli.probes import ensure_writable
    from mal_cli.safe_paths import refuse_overwrite

    refuse_overwrite(summary_json, [boxes, image_info, out], "--summary-json")
    refuse_overwrite(out, [boxes, image_info], "--out")
    if summary_json:
        ensure_writable(summary_json, "--summary-json")
    logging.basicConfig(level=logging.INFO, format="mal: %(levelname)s %(message)s", stream=sys.stderr)
    options = LabelOptions(
        method=method,
        checkpoint=str(checkpoint) if checkpoint else None,
        teacher=teacher,
        threshold=threshold,
        flip=flip,
        format=fmt,
        only_missing=only_missing,
        batch_size=batch_size,
        device=device,
        workers=workers,
        strict=strict,
        crop_sizes=parse_crop_sizes(crop_sizes) if crop_sizes else None,
        compile=compile,
        precision=precision,
        allow_outside_images=allow_outside_images,
        min_score=min_score,
    )
    summary = label(
        boxes,
        str(images),
        out,
        options,
        image_info=image_info,
        shard=parse_shard(shard) if shard else None,
        resume=resume,
        keep_progress=keep_progress,
        progress_bar=progress,
    )
    if summary.out == out:  # torchrun ranks other than 0 return their shard's summary: print only the merged one
        typer.echo(summary.line(), err=True)
        if summary.replaced:
            replaced = f"mal label: replaced {summary.replaced} existing segmentations (keep them with --only-missing)"
            typer.echo(replaced, err=True)
        if summary_json:
            write_json_atomic(summary_json, summary.to_dict())

"""`mal export`: convert labels to other formats."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mal_cli.results import TRAINING_MIN_SCORE

export_app = typer.Typer(help="Convert labels to other formats.", no_args_is_help=True)


@export_app.command(
    "yolo",
    epilog=(
        "Writes OUT/labels/<image>.txt (one per image; lines: class_id x1 y1 x2 y2 ... normalised to 0..1), "
        "OUT/classes.txt and OUT/data.yaml (class k = k-th category by COCO id). Crowd and empty masks are "
        "skipped.\n\n"
        "Multi-part masks (--parts): merge = one polygon joined by zero-width bridges (default, as Ultralytics' "
        "converter), largest = the largest part only, lines = one line per part.\n\n"
        "Examples:\n\n\b\n"
        "  mal export yolo labels.json --out yolo/ --link-images imgs/\n"
        "  mal label boxes.json --images imgs/ --out - | mal export yolo - --out yolo/"
    ),
)
def export_yolo_command(
    labels: str = typer.Argument(..., help="Labelled JSON (what `mal label` writes); - = stdin."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write labels/, classes.txt and data.yaml into."),
    parts: str = typer.Option(
        "merge", "--parts", help="merge, largest or lines: how a mask in several parts is written."
    ),
    image_info: Optional[str] = typer.Option(
        None, "--image-info", help="Dataset JSON with images and categories (for a results list)."
    ),
    link_images: Optional[Path] = typer.Option(
        None, "--link-images", help="Symlink the images of this folder into OUT/images/."
    ),
    min_score: float = typer.Option(
        TRAINING_MIN_SCORE, "--min-score", help="Leave out detections scored below this (boxes without a score stay)."
    ),
) -> None:
    """Export labels as YOLO segmentation text files (Ultralytics layout)."""
    from mal_cli.export import export_yolo

    stats = export_yolo(labels, out, parts=parts, image_info=image_info, link_images=link_images, min_score=min_score)
    typer.echo(
        f"mal export yolo: {stats['images']} images, {stats['lines']} lines ({stats['instances']} instances, "
        f"{stats['skipped_crowd']} crowd, {stats['skipped_empty']} empty and {stats['skipped_low_score']} "
        f"below --min-score skipped), {stats['classes']} classes -> {out}",
        err=True,
    )


@export_app.command(
    "results",
    epilog=(
        "A results list is what pycocotools' COCO.loadRes and lvis' LVISResults take.\n\n"
        "Example:\n\n  mal export results labels.json --out results.json --score product --min-score 0.3"
    ),
)
def export_results_command(
    labels: str = typer.Argument(..., help="Labelled JSON (what `mal label` writes); - = stdin."),
    out: str = typer.Option(..., "--out", "-o", help="Results list JSON to write; - = stdout."),
    score: str = typer.Option("mal", "--score", help="mal (mal_score), detector (the box's own score) or product."),
    min_score: float = typer.Option(
        0.0, "--min-score", help="Leave out annotations whose detector score is below this."
    ),
) -> None:
    """Export labels as a COCO results list ({image_id, category_id, bbox, segmentation, score})."""
    from mal_cli.results import export_results

    export_results(labels, out, score=score, min_score=min_score)

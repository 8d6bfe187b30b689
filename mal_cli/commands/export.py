"""`mal export`: convert labels to other formats."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

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
) -> None:
    """Export labels as YOLO segmentation text files (Ultralytics layout)."""
    from mal_cli.export import export_yolo

    stats = export_yolo(labels, out, parts=parts, image_info=image_info, link_images=link_images)
    typer.echo(
        f"mal export yolo: {stats['images']} images, {stats['lines']} lines ({stats['instances']} instances, "
        f"{stats['skipped_crowd']} crowd and {stats['skipped_empty']} empty skipped), "
        f"{stats['classes']} classes -> {out}",
        err=True,
    )

"""`mal viz`: review labels worst-first."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mal_cli.commands import command


@command(
    "viz",
    epilog=(
        "Writes OUT/index.html (contact sheet, thumbnails embedded: open it anywhere), OUT/crops/*.png (one overlay "
        "per instance, numbered by review rank), OUT/review.json, and with --full OUT/full/*.png.\n\n"
        "Examples:\n\n\b\n"
        "  mal viz labels.json --images imgs/ --out review/ --worst 100\n"
        "  mal viz labels.json --images imgs/ --out review/ --gt gt_with_masks.json --full"
    ),
)
def viz_command(
    labels: str = typer.Argument(..., help="Labelled JSON (what `mal label` writes) or a results list; - = stdin."),
    images: Path = typer.Option(..., "--images", "-i", help="Folder with the images."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the review into (created)."),
    worst: Optional[int] = typer.Option(None, "--worst", "-n", help="Only the N worst instances (default: all)."),
    gt: Optional[str] = typer.Option(
        None, "--gt", help="Ground truth with masks: sort by IoU, show it and the GT outline."
    ),
    image_info: Optional[str] = typer.Option(
        None, "--image-info", help="Dataset JSON with the images (for a results list)."
    ),
    full: bool = typer.Option(False, "--full", help="Also write whole-image overlays to OUT/full/."),
    context: float = typer.Option(0.25, help="Context around the box in a crop, as a fraction of the box size."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    allow_outside_images: bool = typer.Option(
        False, "--allow-outside-images", help="Read images whose file_name is absolute or climbs out with '..'."
    ),
) -> None:
    """Review labels worst-first: overlay PNGs and a self-contained HTML contact sheet."""
    from mal_cli.viz import write_review

    summary = write_review(
        labels,
        images,
        out,
        worst=worst,
        gt=gt,
        image_info=image_info,
        full=full,
        context=context,
        progress_bar=progress,
        allow_outside_images=allow_outside_images,
    )
    for path in summary["missing_images"][:5]:
        typer.echo(f"mal viz: warning: cannot read {path}; drawn on grey", err=True)
    typer.echo(
        f"mal viz: {summary['instances']} of {summary['total']} instances, worst first by "
        f"{summary['sorted_by']} -> {Path(summary['out']) / 'index.html'}",
        err=True,
    )

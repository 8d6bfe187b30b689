"""`mal import`: boxes in the formats detection datasets come in (YOLO txt, Pascal VOC XML) -> a COCO box JSON."""

from __future__ import annotations

from pathlib import Path

import typer

import_app = typer.Typer(help="Convert YOLO or Pascal VOC boxes into a COCO box JSON.", no_args_is_help=True)


@import_app.command(
    "yolo",
    epilog=(
        "Example:\n\n"
        "  mal import yolo data/ --out boxes.json && mal label boxes.json --images data/images --out labels.json"
    ),
)
def import_yolo_command(
    root: Path = typer.Argument(
        ..., help="YOLO dataset folder: images/, labels/ (mirrored), classes.txt or data.yaml."
    ),
    out: str = typer.Option(..., "--out", "-o", help="COCO box JSON to write; - = stdout."),
) -> None:
    """YOLO txt boxes (or YOLO-seg polygons' extents) -> COCO box JSON; file names relative to DIR/images."""
    from mal_cli.importers import run_import

    run_import("yolo", root, out)


@import_app.command(
    "voc",
    epilog=(
        "Example:\n\n\b\n"
        "  mal import voc VOC2012/ --out boxes.json\n"
        "  mal label boxes.json --images VOC2012/JPEGImages --out labels.json"
    ),
)
def import_voc_command(
    root: Path = typer.Argument(..., help="Pascal VOC folder: Annotations/*.xml and JPEGImages/."),
    out: str = typer.Option(..., "--out", "-o", help="COCO box JSON to write; - = stdout."),
) -> None:
    """Pascal VOC XML boxes -> COCO box JSON; file names relative to DIR/JPEGImages."""
    from mal_cli.importers import run_import

    run_import("voc", root, out)

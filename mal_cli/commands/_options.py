"""Options that several commands declare alike (same flags, same help): declared once here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Images = Annotated[Path, typer.Option("--images", "-i", help="Folder with the images.")]
Device = Annotated[str, typer.Option(metavar="auto|cpu|cuda|cuda:N", help="Where the model runs.")]

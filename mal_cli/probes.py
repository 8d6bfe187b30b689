"""Write probes: fail before any long work when an output cannot be written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

from mal_cli.errors import OutputError


def ensure_writable(path: Union[str, Path], what: str = "--out") -> None:
    """Fail now, before any work, when OUT's folder is missing, not a folder or not writable ('-' = stdout)."""
    if str(path) == "-":
        return
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise OutputError(f"{what} {target}: is a folder; give a file path")
    if not folder.is_dir():
        raise OutputError(f"{what} {target}: the folder {folder} does not exist; create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".write-test", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(
            f"{what} {target}: cannot write to {folder} ({err.strerror or err}); choose a writable location"
        ) from None

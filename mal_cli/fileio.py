"""Atomic file writes: a reader never sees half a file, and a crash leaves any old file intact."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from mal_cli.safe_paths import write_error

TEMP_TAG = "mal"  # temp names: .NAME.mal<pid>.XXXX.tmp (files), .NAME.mal<pid>.partial / .old (folders)
_TEMP_NAME = re.compile(r"^\..+\." + TEMP_TAG + r"(\d+)\.(?:[A-Za-z0-9_]+\.tmp|partial|old)$")


@contextlib.contextmanager
def atomic_write(path: str | Path, buffering: int = -1) -> Iterator[BinaryIO]:
    """Open a temp file beside `path` for binary writing; on success fsync it and rename it over `path`.

    On any error the temp file is removed and the error propagates (callers turn OSErrors into
    user-facing messages).
    """
    target = Path(path)
    # The writer's pid in the name: `remove_stale_temps` can tell a killed run's leftover from a live one.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{TEMP_TAG}{os.getpid()}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb", buffering=buffering) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)  # mkstemp makes the file 0600; give it the mode a plain open() would
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, target)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """`data` to `path` through `atomic_write` (a link planted at `path` is replaced, never written through);
    an OSError becomes the user-facing `safe_paths.write_error`."""
    try:
        with atomic_write(path) as handle:
            handle.write(data)
    except OSError as err:
        raise write_error(err, Path(path)) from None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | Path) -> int:
    """Remove the temp files and folders a killed writer left in `folder` (their pid is gone). Returns how many."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError:
            pass
    return removed

"""Where a command may read and write: image paths from `file_name`, outputs that would destroy inputs, planted links.

Rules (README "When things go wrong"):

- An image's `file_name` is a relative path under `--images`. A `file_name` that is empty, `.`, `/`,
  holds a NUL byte, or (after normalising) is absolute or climbs out with `..` is refused; with
  `allow_outside=True` (`--allow-outside-images`) absolute and `..` paths are read as they are.
- No output may be one of the command's inputs (`--json` naming the GT, `--out` naming a part, ...):
  the input would be gone before anyone noticed.
- Files that must not already exist are opened with O_EXCL | O_NOFOLLOW (`open_exclusive`), files
  appended to with O_NOFOLLOW (`open_append`), so a symlink planted at that name cannot redirect the
  write; everything else is written to a temp file and renamed over the name, which replaces a link
  instead of following it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterable, Optional, Union

from mal_cli.errors import InputError, OutputError

__all__ = [
    "image_path",
    "check_file_name",
    "refuse_overwrite",
    "refuse_inputs_under",
    "open_exclusive",
    "open_append",
    "write_error",
    "is_inside",
    "lock_for_run",
    "held_by_live_run",
]

PathLike = Union[str, Path]


def check_file_name(name: str, where: str, allow_outside: bool = False) -> str:
    """`name` (an image's file_name) if it is usable as a path under the images folder, else InputError."""
    if not isinstance(name, str) or "\x00" in name:
        raise InputError(f"{where}: file_name {_show(name)} holds a NUL byte or is not a string; fix the file name")
    normal = os.path.normpath(name.replace("\\", "/")) if name else ""
    if normal in ("", ".", "/") or name.endswith("/"):
        raise InputError(f"{where}: file_name {_show(name)} names a folder, not an image file; fix the file name")
    outside = os.path.isabs(normal) or normal == ".." or normal.startswith("../")
    if outside and not allow_outside:
        raise InputError(
            f"{where}: file_name {_show(name)} points outside the images folder (absolute or '..'); "
            "pass --allow-outside-images to read it anyway"
        )
    return name


def image_path(images_dir: PathLike, name: str, where: str, allow_outside: bool = False) -> Path:
    """The image file of `name` under `images_dir`, after `check_file_name`."""
    return Path(images_dir) / check_file_name(name, where, allow_outside)


def _resolved(path: PathLike) -> Path:
    return Path(os.path.abspath(path)).resolve()


def _same(a: PathLike, b: PathLike) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return _resolved(a) == _resolved(b)


def refuse_overwrite(output: Optional[PathLike], inputs: Iterable[Optional[PathLike]], what: str = "--out") -> None:
    """OutputError when the output file `output` is one of `inputs` ("-" and None are skipped)."""
    if output is None or str(output) == "-":
        return
    for inp in inputs:
        if inp is None or str(inp) == "-":
            continue
        if _same(output, inp):
            raise OutputError(
                f"{what} {output} is the input {inp}: writing it would destroy the input; choose another path"
            )


def refuse_inputs_under(outputs: Iterable[PathLike], inputs: Iterable[Optional[PathLike]], what: str = "--out") -> None:
    """OutputError when an input is one of the files or lies in one of the folders a command writes."""
    resolved_outputs = [_resolved(p) for p in outputs]
    for inp in inputs:
        if inp is None or str(inp) == "-":
            continue
        path = _resolved(inp)
        for out in resolved_outputs:
            if path == out or out in path.parents:
                raise OutputError(
                    f"{what}: the input {inp} lies where this command writes ({out}); "
                    "writing would destroy it: choose another output folder"
                )


def is_inside(path: PathLike, root: PathLike) -> bool:
    """Whether `path`, with every link resolved, is `root` or lies under it."""
    target, base = _resolved(path), _resolved(root)
    return target == base or base in target.parents


def open_exclusive(path: PathLike, mode: int = 0o666) -> int:
    """A new file, created here and now: FileExistsError if anything (a file or a link) has that name."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def open_append(path: PathLike) -> int:
    """An existing regular file for appending; OSError (ELOOP) if the name is a symlink."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)


def lock_for_run(fd: int) -> None:
    """Hold an advisory lock on a run's own file (e.g. OUT.progress.jsonl) for as long as this process has it open.

    A POSIX record lock (lockf), not flock: it belongs to this process alone, so the loader and pool processes
    forked later do not keep it alive after this process is killed (a SIGKILL'd run is then "unfinished", not
    "live"). `fd` must be open for writing.
    """
    import fcntl

    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def held_by_live_run(path: PathLike) -> bool:
    """Whether another running process holds `lock_for_run` on `path` (False: its writer is gone, or no lock).

    Only for a file this process has not locked itself: closing the probe's descriptor drops this process's own
    record locks on the file."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EAGAIN):
            return True
        return False
    finally:
        os.close(fd)  # closing drops a lock this call took
    return False


def write_error(err: OSError, path: PathLike) -> OutputError:
    """The user-facing error for a failed write, naming a full disk plainly."""
    if err.errno == errno.ENOSPC:
        return OutputError(f"{path}: cannot write: the disk is full; free space and rerun")
    if err.errno == errno.ELOOP:
        return OutputError(f"{path}: is a symbolic link; refusing to write through it (remove it and rerun)")
    return OutputError(f"{path}: cannot write: {err.strerror or err}")


def _show(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 60 else text[:57] + "..."

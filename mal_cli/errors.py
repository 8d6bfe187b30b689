"""User-facing errors: one clear line on stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations


class MalError(Exception):
    """An error the user can act on. `str(err)` is the whole message: what, where, what to do."""

    exit_code = 2
    prefix = "error: "  # `mal: error: ...` on stderr

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(MalError):
    """Unusable input: unreadable or malformed JSON, missing files, inconsistent ids."""

    exit_code = 2


class OutputError(MalError):
    """The output location cannot be written."""

    exit_code = 3


class Interrupted(MalError):
    """Ctrl-C in a long run: what was kept and how to go on (`mal: interrupted; ...`, exit 130)."""

    exit_code = 130
    prefix = ""

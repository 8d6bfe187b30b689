"""`mal ARGS...` run in-process as the console script runs it: exit code, stdout, stderr (the `mal` fixture).

And the arguments of the quickest whole `mal label` run: the box method in the main process, no progress bar.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from mal_cli.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str


def in_process_runner(capsys, monkeypatch) -> Callable[..., Result]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run(*args) -> Result:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["mal", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def label_box_args(boxes, images, out, *extra) -> list:
    return [
        "label",
        boxes,
        "--images",
        images,
        "--out",
        out,
        "--method",
        "box",
        "--workers",
        "0",
        "--no-progress",
        *extra,
    ]

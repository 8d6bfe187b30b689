"""The `mal` command line: a thin Typer layer over functions a user can import.

Each command imports its module lazily so that `mal --help` stays fast (torch is heavy).
Errors the user can act on are `MalError`s: printed as one line on stderr, exit code != 0.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from mal_cli import __version__
from mal_cli.errors import MalError

app = typer.Typer(
    name="mal",
    help=(
        "mal — Mask Auto-Labeler. Train a ViT labeler from the boxes of a COCO/LVIS detection dataset, "
        "then turn every box into an instance mask.\n\n"
        "Typical use:\n\n"
        "  mal label boxes.json --images imgs/ --out labels.json\n\n"
        "  mal eval labels.json --gt gt_with_masks.json"
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mal {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full Python tracebacks on errors."),
) -> None:
    _state["debug"] = debug


# --- commands -----------------------------------------------------------------------------------
# Each command lives in its own section below; keep them thin: parse options, call the library.


def main() -> None:
    """Entry point of the `mal` console script."""
    debug = "--debug" in sys.argv[1:]
    try:
        app(standalone_mode=False)
    except MalError as err:
        if debug:
            raise
        typer.echo(f"mal: error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("mal: interrupted", err=True)
        sys.exit(130)
    except typer.Exit as err:  # --help, --version
        sys.exit(err.exit_code)
    except SystemExit:
        raise
    except Exception as err:  # click usage errors and the like
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            typer.echo("mal: aborted", err=True)
            sys.exit(130)
        if debug:
            raise
        typer.echo(f"mal: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)

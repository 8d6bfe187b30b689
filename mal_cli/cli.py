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


# --- eval -----------------------------------------------------------------------------------------


@app.command(
    "eval",
    epilog=(
        "Examples:\n\n"
        "  mal eval labels.json --gt instances_val2017.json\n\n"
        "  mal eval labels.json --gt lvis_v1_val.json --reference-ap 38.6 --json report.json\n\n"
        "  mal eval results.json --gt instances_val2017.json --json - > report.json"
    ),
)
def eval_command(
    pred: str = typer.Argument(..., help="Labelled dataset JSON (what `mal label` writes) or a COCO results list; - = stdin."),
    gt: str = typer.Option(..., "--gt", help="Ground-truth COCO or LVIS dataset JSON with masks (the boxes' source)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write every figure as JSON to this file (- = stdout)."),
    reference_ap: Optional[float] = typer.Option(
        None, "--reference-ap", help="AP in percent of a reference (e.g. a fully supervised model): print retention = AP / this."
    ),
    ap: bool = typer.Option(True, "--ap/--no-ap", help="Compute COCO/LVIS segm AP (--no-ap: mIoU only, faster)."),
) -> None:
    """Score predicted masks against GT masks, with the GT boxes as prompts: mIoU and segm AP."""
    from rich.console import Console

    from mal_cli.dataset import load_any, load_dataset, write_json_atomic
    from mal_cli.errors import InputError
    from mal_cli.evaluate import evaluate, report_table

    if pred == "-" and gt == "-":
        raise InputError("PRED and --gt cannot both be read from stdin; give at least one a file path")
    if reference_ap is not None and not reference_ap > 0:
        raise InputError(f"--reference-ap must be a positive percentage such as 38.6, got {reference_ap}")
    ground_truth = load_dataset(gt)
    report = evaluate(
        load_any(pred), ground_truth, reference_ap=reference_ap / 100 if reference_ap else None, compute_ap=ap
    )
    # The table goes to stderr when stdout carries the JSON report.
    Console(stderr=json_out == "-").print(report_table(report, title=f"mal eval: {Path(pred).name} vs {Path(gt).name}"))
    if json_out:
        write_json_atomic(json_out, report.to_dict())


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

"""The `mal` command line: a thin Typer layer over functions a user can import.

Each command imports its module lazily so that `mal --help` stays fast (torch is heavy).
Errors the user can act on are `MalError`s: printed as one line on stderr, exit code != 0.
"""

from __future__ import annotations

import re
import sys

import typer
import typer.core

from mal_cli import __version__
from mal_cli.commands import (  # noqa: F401  (importing a command module registers its command)
    COMMANDS,
    bench,
    check,
    evaluate,
    export,
    importers,
    label,
    merge,
    train,
    viz,
    weights,
)
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
    rich_markup_mode=None,  # plain help: flags without a type, choices as choices, one line per short option
    context_settings={"max_content_width": 120},
)


class MalCommand(typer.core.TyperCommand):
    """A command whose usage line names its arguments plainly (`BOXES`, not Typer's `{BOXES}`)."""

    def collect_usage_pieces(self, ctx):
        return [re.sub(r"^\{(.*)\}((?:\.\.\.)?)$", r"\1\2", piece) for piece in super().collect_usage_pieces(ctx)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mal {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full Python tracebacks on errors."),
) -> None:
    # --version acts in its callback; --debug is read from the command line by `main`, which handles the errors.
    del version, debug


# --- commands: one module each in mal_cli/commands/, thin (parse options, call the library) ---------------

_GROUPS = {"export": export.export_app, "import": importers.import_app}
for _name in (
    "train",
    "eval",
    "label",
    "merge",
    "check",
    "viz",
    "export",
    "import",
    "weights",
    "bench",
):  # --help order
    if _name in _GROUPS:
        app.add_typer(_GROUPS[_name], name=_name)
    else:
        _settings, _function = COMMANDS[_name]
        app.command(_name, cls=MalCommand, **_settings)(_function)


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Click's usage-error and abort classes: Typer >= 0.20 raises those of its vendored copy (typer._click)."""
    import click

    errors: list[type] = [click.exceptions.ClickException]
    aborts: list[type] = [click.exceptions.Abort, typer.Abort]
    try:
        from typer._click import exceptions as vendored

        errors.append(vendored.ClickException)
    except ImportError:
        pass
    return tuple(errors), tuple(aborts)


def main(args: list[str] | None = None) -> None:
    """Entry point of the `mal` console script (`args`: the command line after `mal`, default sys.argv)."""
    debug = "--debug" in (sys.argv[1:] if args is None else args)
    try:
        # typer.Exit(n) inside a command comes back as a return value here
        code = app(args=args, prog_name="mal" if args is not None else None, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except MalError as err:
        if debug:
            raise
        typer.echo(f"mal: {err.prefix}{err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("mal: interrupted", err=True)
        sys.exit(130)
    except typer.Exit as err:  # --help, --version
        sys.exit(err.exit_code)
    except SystemExit:
        raise
    except Exception as err:  # click usage errors and the like
        click_errors, aborts = _click_exception_types()
        if isinstance(err, click_errors):  # usage errors: Click's own message and usage line, exit 2
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, aborts):
            typer.echo("mal: aborted", err=True)
            sys.exit(130)
        if debug:
            raise
        typer.echo(f"mal: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)

"""`mal check`: validate a dataset and its images up front."""

from __future__ import annotations

from typing import Optional

import typer

from mal_cli.commands import command


@command(
    "check",
    epilog=(
        "Errors: the input cannot be used as it is (mal label / mal train refuse it). Warnings: the run goes on "
        "and the affected boxes get a flagged fallback (mal_fallback). Exit code: 0 no problems, 1 problems found, "
        "2 unusable arguments.\n\n"
        "Examples:\n\n\b\n"
        "  mal check instances_val2017.json --images val2017/\n"
        "  mal check boxes.json --images imgs/ --decode --json report.json\n"
        "  mal check detections.json --image-info instances_val2017.json"
    ),
)
def check_command(
    dataset: str = typer.Argument(..., help="COCO/LVIS dataset JSON or a results list (with --image-info); - = stdin."),
    images: Optional[str] = typer.Option(
        None, "--images", "-i", help="Also check that every image file exists here (stat only)."
    ),
    image_info: Optional[str] = typer.Option(
        None, "--image-info", help="Dataset JSON with the images of a results list."
    ),
    decode: bool = typer.Option(
        False, "--decode", help="With --images: decode every image too (slow; finds corrupt/truncated files)."
    ),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the report as JSON to this file (- = stdout)."),
) -> None:
    """Validate a dataset and its images up front; report every problem at once (grouped, counted, with examples)."""

    from mal_cli.check import check_paths
    from mal_cli.dataset import write_json_atomic
    from mal_cli.probes import ensure_writable

    if decode and images is None:
        from mal_cli.errors import InputError

        raise InputError("--decode needs --images DIR (the folder with the image files)")
    if json_out:
        from mal_cli.safe_paths import refuse_overwrite

        ensure_writable(json_out, "--json")
        refuse_overwrite(json_out, [dataset, image_info], "--json")
    report = check_paths(dataset, images, image_info, decode)
    if json_out:
        write_json_atomic(json_out, report.to_dict())
    typer.echo(report.text(), err=json_out == "-")
    if not report.clean:
        raise typer.Exit(1)

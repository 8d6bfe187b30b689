"""`mal eval`: score predicted masks against ground-truth masks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mal_cli.commands import command


@command(
    "eval",
    epilog=(
        "Examples:\n\n\b\n"
        "  mal eval labels.json --gt instances_val2017.json\n"
        "  mal eval labels.json --gt lvis_v1_val.json --reference-ap 38.6 --json report.json\n"
        "  mal eval results.json --gt instances_val2017.json --json - > report.json"
    ),
)
def eval_command(
    pred: str = typer.Argument(
        ..., help="Labelled dataset JSON (what `mal label` writes) or a COCO results list; - = stdin."
    ),
    gt: str = typer.Option(..., "--gt", help="Ground-truth COCO or LVIS dataset JSON with masks (the boxes' source)."),
    json_out: Optional[str] = typer.Option(
        None, "--json", help="Also write every figure as JSON to this file (- = stdout)."
    ),
    reference_ap: Optional[float] = typer.Option(
        None,
        "--reference-ap",
        help="AP in percent of a reference (e.g. a fully supervised model): print retention = AP / this.",
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
    if json_out:
        from mal_cli.probes import ensure_writable
        from mal_cli.safe_paths import refuse_overwrite

        ensure_writable(json_out, "--json")  # before the (long) evaluation
        refuse_overwrite(json_out, [pred, gt], "--json")
    ground_truth = load_dataset(gt)
    report = evaluate(
        load_any(pred), ground_truth, reference_ap=reference_ap / 100 if reference_ap else None, compute_ap=ap
    )
    # The table goes to stderr when stdout carries the JSON report.
    Console(stderr=json_out == "-").print(report_table(report, title=f"mal eval: {Path(pred).name} vs {Path(gt).name}"))
    if json_out:
        write_json_atomic(json_out, report.to_dict())

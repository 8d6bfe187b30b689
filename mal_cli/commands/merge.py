"""`mal merge`: join shards, label files or progress files."""

from __future__ import annotations

from typing import List, Optional

import typer

from mal_cli.commands import command


@command(
    "merge",
    epilog=(
        "Parts: `mal label --shard K/N` outputs (all N, put back in input order: the same bytes as one run), "
        "labelled datasets (union, de-duplicated by annotation id) or OUT.progress.jsonl files (need --into, the "
        "labelled input).\n\n"
        "Examples:\n\n\b\n"
        "  mal merge labels.shard0.json labels.shard1.json --out labels.json\n"
        "  mal merge part_a.json part_b.json --out labels.json --prefer last\n"
        "  mal merge new_labels.json --into dataset_with_some_masks.json --out complete.json\n"
        "  mal merge labels.json.progress.jsonl --into boxes.json --out partial_labels.json"
    ),
)
def merge_command(
    parts: List[str] = typer.Argument(..., help="Shard outputs, labelled datasets or progress files."),
    out: str = typer.Option(..., "--out", "-o", help="Merged JSON to write (atomically); - = stdout."),
    into: Optional[str] = typer.Option(
        None, "--into", help="Dataset to fill: its existing masks are kept, the parts label the rest."
    ),
    prefer: Optional[str] = typer.Option(
        None,
        "--prefer",
        help="first or last: which copy wins when one annotation id differs between parts (default: error).",
    ),
) -> None:
    """Merge `mal label` shards or label files into one dataset (same images and categories required)."""
    from mal_cli.merge import merge_files
    from mal_cli.probes import ensure_writable

    ensure_writable(out)
    stats = merge_files(parts, out, into=into, prefer=prefer)
    typer.echo(f"mal merge: {stats['parts']} parts -> {stats['annotations']} annotations -> {out}", err=True)

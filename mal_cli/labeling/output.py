"""OUT: the input streamed again, each labelled record with its result read back from the progress file, written
atomically (temp file + rename; '-' = stdout), keys and records in input order. The run never holds all masks.

A shard's output keeps every image, category and other key of the input (shards are self-describing and
`mal merge` can check they belong together) but only its own images' annotations, plus a top-level
`mal_shard` entry with their positions in the input; `mal merge` uses it to restore the input order exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import orjson

from mal_cli.fileio import atomic_write, remove_stale_temps
from mal_cli.labeling.index import BoxIndex
from mal_cli.labeling.progress import ProgressIndex
from mal_cli.safe_paths import write_error


def labelled_records(
    records: Iterator[list],
    keep: Optional[np.ndarray],
    record_image: np.ndarray,
    has_result: np.ndarray,
    results: ProgressIndex,
) -> Iterator[bytes]:
    """The records (streamed again from the input, in order) that `keep` selects, with their results."""
    position = 0
    for chunk in records:
        for record in chunk:
            if keep is None or keep[position]:
                if has_result[position]:
                    result = results.results_of(int(record_image[position])).get(position)
                    if result is not None:
                        record = {k: v for k, v in record.items() if k != "mal_fallback"}
                        record.update(result)
                yield orjson.dumps(record)
            position += 1


def _write_json_array(handle, items: Iterator[bytes]) -> None:
    handle.write(b"[")
    for i, item in enumerate(items):
        if i:
            handle.write(b",")
        handle.write(item)
    handle.write(b"]")


def _emit(handle, index: BoxIndex, records_of: Callable, shard_info: Optional[dict]) -> None:
    from mal_cli.jsonstream import iter_entries

    entries = iter_entries(index.path, ("images", "annotations"), index.source)
    if index.is_results:
        _, _, chunks = next(entries)
        if shard_info is not None:
            handle.write(b'{"mal_shard":' + orjson.dumps(shard_info) + b',"results":')
        _write_json_array(handle, records_of(chunks))
        if shard_info is not None:
            handle.write(b"}")
        return
    handle.write(b"{")
    for i, (kind, key, value) in enumerate(entries):
        handle.write((b"," if i else b"") + orjson.dumps(key) + b":")
        if kind == "value":
            handle.write(orjson.dumps(value))
        elif key == "annotations":
            _write_json_array(handle, records_of(value))
        else:
            _write_json_array(handle, (orjson.dumps(item) for chunk in value for item in chunk))
    if shard_info is not None:
        handle.write(b',"mal_shard":' + orjson.dumps(shard_info))
    handle.write(b"}")


def write_output(out: str, index: BoxIndex, records_of: Callable, shard_info: Optional[dict]) -> None:
    """Stream the labelled document to OUT, the records' array through `records_of(chunks) -> Iterator[bytes]`.

    The bytes equal what `write_json_atomic(out, document)` of the labelled document would write.
    """
    if out == "-":
        _emit(sys.stdout.buffer, index, records_of, shard_info)
        sys.stdout.buffer.write(b"\n")  # as `write_json_atomic` does: files without, stdout with a newline
        sys.stdout.buffer.flush()
        return
    target = Path(out)
    remove_stale_temps(target.parent)  # temp files a killed run left beside OUT
    try:
        with atomic_write(target, buffering=1 << 20) as handle:
            _emit(handle, index, records_of, shard_info)
    except OSError as err:
        raise write_error(err, target) from None

"""The progress file `OUT.progress.jsonl`: the one place its format lives (`mal label` writes and resumes it,
`mal merge` reads it).

Line 1 is a header `{"mal_progress": PROGRESS_VERSION, "fingerprint": ..., "records": N, "shard": [K, N],
"source": ..., "records_digest": ...}`; every further line is one finished image, `{"image": position,
"results": [[record position, result], ...]}`. The file is append-only, so only its last line can be torn (a killed
run).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import orjson

from mal_cli.errors import InputError
from mal_cli.jsonstream import unreadable

log = logging.getLogger(__name__)

PROGRESS_SUFFIX = ".progress.jsonl"
PROGRESS_VERSION = 1
FSYNC_INTERVAL_S = 5.0


def progress_path_for(out: str | Path) -> Path:
    return Path(str(out) + PROGRESS_SUFFIX)


def is_progress_file(path: str | Path) -> bool:
    return str(path).endswith(".jsonl")


def records_digest(ids: Sequence, image_ids: Sequence, bboxes: Sequence) -> str:
    """A fingerprint of which boxes a dataset holds, in order: annotation ids, image ids, boxes (as float64).

    `mal label` writes it into its progress header, so `merge --into` can tell the dataset that was
    labelled from another one with as many annotations.
    """
    digest = hashlib.sha256()
    digest.update(orjson.dumps([list(ids), list(image_ids)]))
    boxes = bboxes if isinstance(bboxes, np.ndarray) else [_float_box(b) for b in bboxes]  # array: `mal label`'s
    digest.update(np.asarray(boxes, dtype=np.float64).reshape(-1, 4).tobytes())
    return digest.hexdigest()


def dataset_records_digest(doc: dict) -> str:
    """`records_digest` of a parsed dataset document."""
    anns = doc["annotations"]
    return records_digest([a.get("id") for a in anns], [a.get("image_id") for a in anns], [a.get("bbox") for a in anns])


def _float_box(bbox: Any) -> list[float]:
    values = bbox if isinstance(bbox, list) and len(bbox) == 4 else [None] * 4
    return [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan") for v in values]


def progress_header(
    fingerprint: str, records: int, shard: tuple[int, int], source: str, records_digest: str = ""
) -> dict:
    """`records_digest` (`records_digest` below): lets `mal merge --into` refuse another dataset of as many records."""
    header = {
        "mal_progress": PROGRESS_VERSION,
        "fingerprint": fingerprint,
        "records": records,
        "shard": list(shard),
        "source": source,
    }
    if records_digest:
        header["records_digest"] = records_digest
    return header


def read_progress(path: Path, fingerprint: str) -> tuple[dict, dict[int, int]]:
    """Header and {image position: byte offset of its line}. A torn last line is dropped (and cut off)."""
    offsets: dict[int, int] = {}
    header: dict = {}
    good_end = 0
    with open(path, "rb") as handle:
        offset = 0
        for line_number, line in enumerate(handle):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("torn")
                entry = orjson.loads(line)
            except (ValueError, orjson.JSONDecodeError):
                # Only the last line can be torn (the file is append-only); anything else is damage.
                if handle.read():
                    raise InputError(
                        f"{path}: line {line_number + 1} is not valid JSON; delete the file to start over"
                    ) from None
                break
            if line_number == 0:
                header = entry
                _check_header(path, header, fingerprint)
            else:
                offsets[int(entry["image"])] = offset
            offset += len(line)
            good_end = offset
    if good_end != path.stat().st_size:
        log.warning("%s: dropped a torn last line (the run was killed mid-write)", path)
        with open(path, "r+b") as handle:
            handle.truncate(good_end)
    return header, offsets


def _check_header(path: Path, header: dict, fingerprint: str) -> None:
    if header.get("mal_progress") != PROGRESS_VERSION:
        raise InputError(f"{path} is not a mal label progress file")
    if header.get("fingerprint") != fingerprint:
        raise InputError(
            f"{path} was made from other input or options than this run; delete it to start over, "
            f"or rerun with the same input and options"
        )


def read_progress_results(path: str | Path) -> tuple[dict, dict[int, dict]]:
    """A progress file's header and {record position: result}; a torn last line is ignored (`mal merge`)."""
    header: dict = {}
    results: dict[int, dict] = {}
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except OSError as err:
        raise unreadable(err, str(path)) from None
    for number, line in enumerate(lines):
        if not line:
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            if number == len(lines) - 1:  # torn last line of a killed run
                break
            raise InputError(f"{path}: line {number + 1} is not valid JSON") from None
        if number == 0:
            if not isinstance(entry, dict) or entry.get("mal_progress") is None:
                raise InputError(f"{path} is not a mal label progress file")
            header = entry
            continue
        pairs = entry.get("results") if isinstance(entry, dict) else None
        if not isinstance(pairs, list):
            raise InputError(f"{path}: line {number + 1} is not a progress entry (no 'results' list)")
        for pair in pairs:
            if not _is_result_pair(pair):
                raise InputError(f"{path}: line {number + 1}: a result is not [position, {{...}}]")
            results[pair[0]] = pair[1]
    return header, results


def _is_result_pair(pair) -> bool:
    return (
        isinstance(pair, list)
        and len(pair) == 2
        and isinstance(pair[0], int)
        and pair[0] >= 0
        and isinstance(pair[1], dict)
    )


def image_line(image_position: int, results: list) -> bytes:
    """One finished image's line, without its newline: `results` is [(record position, result), ...]."""
    return orjson.dumps({"image": image_position, "results": results})


class ProgressWriter:
    """Appends one line per finished image; flushed per group, fsync'd every few seconds and at close.

    `handle`: the file already opened for appending (`labeling.run` opens it without following links and locks
    it for the run); `header` is written first unless None (a resumed file has one)."""

    def __init__(self, path: Path, header: Optional[dict], handle):
        self.path = path
        self.handle = handle
        self.lines = 0  # image lines written by this writer
        if header is not None:
            self.handle.write(orjson.dumps(header) + b"\n")
        self.last_sync = time.monotonic()

    def write_line(self, line: bytes) -> None:
        """An already serialised `image_line`."""
        self.handle.write(line + b"\n")
        self.lines += 1

    def flush(self) -> None:
        self.handle.flush()
        if time.monotonic() - self.last_sync > FSYNC_INTERVAL_S:
            os.fsync(self.handle.fileno())
            self.last_sync = time.monotonic()

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


class ProgressIndex:
    """Random access to the results in a progress file, with a small cache of parsed lines."""

    def __init__(self, path: Path, offsets: dict[int, int], cache_lines: int = 256):
        self.handle = open(path, "rb")
        self.offsets = offsets
        self.cache: OrderedDict[int, dict[int, dict]] = OrderedDict()
        self.cache_lines = cache_lines

    def results_of(self, image_position: int) -> dict[int, dict]:
        cached = self.cache.get(image_position)
        if cached is not None:
            self.cache.move_to_end(image_position)
            return cached
        self.handle.seek(self.offsets[image_position])
        entry = orjson.loads(self.handle.readline())
        results = {int(pos): result for pos, result in entry["results"]}
        self.cache[image_position] = results
        if len(self.cache) > self.cache_lines:
            self.cache.popitem(last=False)
        return results

    def close(self) -> None:
        self.handle.close()

"""`mal merge`: reassemble `mal label` shards (or progress files) into one dataset, or fill a dataset's missing masks.

Parts can be:
- shard outputs of `mal label --shard K/N` (they carry a `mal_shard` entry with their records' input
  positions): all N shards of one run are put back in input order, byte-identical to a single run;
- labelled datasets without shard info: annotations are unioned in order of first appearance;
- progress files (`OUT.progress.jsonl`, also of a killed run): their results replace the annotations at
  their input positions in `--into`, which must then be the very input that was labelled.

Every dataset part must describe the same images (same ids, same order) and the same categories.
Annotations are de-duplicated by id: identical copies collapse; differing ones are an error unless
`prefer` is "first" or "last". With `--into DATASET`, annotations that already have a segmentation in
DATASET keep it; the parts fill the others (and add annotations DATASET lacks, at the end).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from mal_cli.dataset import read_json, write_json_atomic
from mal_cli.errors import InputError
from mal_cli.fileio import remove_stale_temps
from mal_cli.labeling.progress import dataset_records_digest, read_progress_results
from mal_cli.labeling.progress import is_progress_file as _is_progress_file
from mal_cli.safe_paths import refuse_overwrite


def _check_progress_matches(name: str, header: dict, results: dict, base_doc: dict) -> None:
    """Refuse a progress file made from another dataset: its fingerprint, else its masks' image sizes."""
    records = base_doc["annotations"]
    if header.get("records") != len(records):
        raise InputError(
            f"{name} was made from a dataset with {header.get('records')} annotations, --into has {len(records)}"
        )
    digest = header.get("records_digest")
    if digest is not None and digest != dataset_records_digest(base_doc):
        raise InputError(
            f"{name} was made from another dataset than --into (its boxes differ); "
            "give --into the very file that was labelled"
        )
    sizes = {
        im.get("id"): [im.get("height"), im.get("width")] for im in base_doc.get("images", []) if isinstance(im, dict)
    }
    for pos, result in results.items():
        if pos >= len(records):
            raise InputError(f"{name}: result for annotation position {pos}, but --into has {len(records)} annotations")
        seg = result.get("segmentation")
        size = seg.get("size") if isinstance(seg, dict) else None
        expected = sizes.get(records[pos].get("image_id")) if isinstance(records[pos], dict) else None
        if size is not None and expected is not None and size != expected:
            raise InputError(
                f"{name} was made from another dataset than --into: the mask at position {pos} is "
                f"{size[0]} x {size[1]}, its image in --into {expected[0]} x {expected[1]}"
            )


def _check_part(doc: Any, name: str) -> Any:
    """A dataset part as merge reads it: a results list, or an object with an 'annotations' (or 'results') list
    of objects, and a well-formed 'mal_shard' if it has one."""
    records = doc if isinstance(doc, list) else doc.get(_records_key(doc)) if isinstance(doc, dict) else None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise InputError(f"{name}: not a dataset or results list (needs an 'annotations' list of objects)")
    if (
        isinstance(doc, dict)
        and "images" in doc
        and not (isinstance(doc["images"], list) and all(isinstance(im, dict) for im in doc["images"]))
    ):
        raise InputError(f"{name}: 'images' must be a list of objects")
    shard = doc.get("mal_shard") if isinstance(doc, dict) else None
    if shard is not None:
        ints = ("index", "count", "records")
        if not (
            isinstance(shard, dict)
            and all(isinstance(shard.get(k), int) and shard[k] >= 0 for k in ints)
            and shard["index"] < shard["count"]
            and "fingerprint" in shard
            and isinstance(shard.get("positions"), list)
            and all(isinstance(p, int) and 0 <= p < shard["records"] for p in shard["positions"])
        ):
            raise InputError(f"{name}: its 'mal_shard' entry is damaged (file edited?); relabel that shard")
    return doc


def _records_key(doc: Any) -> str:
    return "results" if "results" in doc and "annotations" not in doc else "annotations"


def _check_same(base: dict, other: dict, where: str) -> None:
    ids = [im.get("id") for im in base.get("images", [])]
    if [im.get("id") for im in other.get("images", [])] != ids:
        raise InputError(
            f"{where}: its images differ from the first part's (different datasets or different image order)"
        )
    if other.get("categories", []) != base.get("categories", []):
        raise InputError(f"{where}: its categories differ from the first part's")


def _dedupe(records: list[tuple[Any, dict]], prefer: Optional[str], what: str) -> list[dict]:
    """(id, record) pairs in order -> records, one per id (None ids are all kept)."""
    chosen: dict[Any, int] = {}
    out: list[Optional[dict]] = []
    for ann_id, record in records:
        if ann_id is None:
            out.append(record)
            continue
        if ann_id not in chosen:
            chosen[ann_id] = len(out)
            out.append(record)
            continue
        kept = out[chosen[ann_id]]
        if kept == record or prefer == "first":
            continue
        if prefer == "last":
            out[chosen[ann_id]] = record
            continue
        raise InputError(
            f"annotation id {ann_id} appears in several {what} with different content; "
            f"pass --prefer first or --prefer last to pick one"
        )
    return [r for r in out if r is not None]


def merge_documents(
    parts: Sequence[tuple[str, Any]], into: Optional[tuple[str, dict]] = None, prefer: Optional[str] = None
) -> Any:
    """Merge parsed parts [(name, document)] (see module docstring); returns the merged document."""
    if prefer not in (None, "first", "last"):
        raise InputError(f"--prefer must be 'first' or 'last', got '{prefer}'")
    if not parts:
        raise InputError("nothing to merge: give at least one part")
    progress = [(name, doc) for name, doc in parts if isinstance(doc, tuple)]
    documents = [(name, doc) for name, doc in parts if not isinstance(doc, tuple)]
    if progress and into is None:
        raise InputError(f"{progress[0][0]} is a progress file: pass --into with the dataset that was labelled")

    base_doc = into[1] if into is not None else None

    # Shards of one run: put the records back at their input positions.
    shards = [(name, doc) for name, doc in documents if isinstance(doc, dict) and "mal_shard" in doc]
    if shards and len(shards) == len(documents) and into is None:
        return _merge_shards(shards)

    # General case: union in order of first appearance (the --into dataset first).
    if base_doc is not None:
        if not isinstance(base_doc, dict) or "annotations" not in base_doc:
            raise InputError(f"--into {into[0]}: expected a COCO/LVIS dataset")
        reference = base_doc
    else:
        reference = documents[0][1] if documents else None
    if isinstance(reference, dict):
        for name, doc in documents:
            if not isinstance(doc, dict):
                raise InputError(f"{name}: a results list cannot be merged with datasets")
            _check_same(reference, doc, name)
    parts_records: list[tuple[Any, dict]] = []
    for name, doc in documents:
        records = doc if isinstance(doc, list) else doc[_records_key(doc)]
        parts_records.extend((r.get("id"), r) for r in records)
    if progress:
        base_doc = _apply_progress(progress, base_doc, prefer)
        if not documents:
            return base_doc
    labelled = _dedupe(parts_records, prefer, "parts")
    if base_doc is None:
        if isinstance(reference, list):
            return labelled
        merged = {k: v for k, v in reference.items() if k != "mal_shard"}
        merged["annotations"] = labelled
        return merged
    return _fill_into(base_doc, labelled)


def _merge_shards(shards: list[tuple[str, dict]]) -> Any:
    """The shard outputs of one run, all of them, their records put back at their input positions."""
    info0 = shards[0][1]["mal_shard"]
    seen = {}
    for name, doc in shards:
        info = doc["mal_shard"]
        if info["fingerprint"] != info0["fingerprint"] or info["count"] != info0["count"]:
            raise InputError(
                f"{name}: a shard of another run (other input, options or shard count) than {shards[0][0]}"
            )
        if info["index"] in seen:
            raise InputError(f"{name} and {seen[info['index']]} are the same shard {info['index']}/{info['count']}")
        seen[info["index"]] = name
        if "images" in doc:
            _check_same(shards[0][1], doc, name)
    missing = sorted(set(range(info0["count"])) - set(seen))
    if missing:
        count = info0["count"]
        names = ", ".join(f"{m}/{count}" for m in missing)
        raise InputError(f"shard(s) {names} missing: merge needs all of them")
    slots: list[Optional[dict]] = [None] * info0["records"]
    for name, doc in shards:
        records = doc[_records_key(doc)]
        positions = doc["mal_shard"]["positions"]
        if len(positions) != len(records):
            raise InputError(f"{name}: mal_shard.positions does not match its annotations (file edited?)")
        for pos, record in zip(positions, records):
            if slots[pos] is not None and slots[pos] != record:
                raise InputError(f"{name}: input position {pos} is labelled differently by two shards")
            slots[pos] = record
    if any(s is None for s in slots):
        raise InputError("the shards do not cover every annotation of the input")
    first = shards[0][1]
    if "results" in first and "annotations" not in first:
        return slots
    merged = {k: v for k, v in first.items() if k != "mal_shard"}
    merged["annotations"] = slots
    return merged


def _apply_progress(progress: list[tuple[str, tuple]], base_doc: dict, prefer: Optional[str]) -> dict:
    """A copy of the --into dataset with the progress files' results at their input positions.

    Progress files hold results by input position: they replace what --into has there (the run chose
    what to label, e.g. with --only-missing), before any dataset part fills the rest.
    """
    base_records = list(base_doc["annotations"])
    applied: dict[int, dict] = {}
    for name, (header, results) in progress:
        _check_progress_matches(name, header, results, base_doc)
        for pos, result in results.items():
            record = {k: v for k, v in base_records[pos].items() if k != "mal_fallback"}
            record.update(result)
            if pos in applied and applied[pos] != record and prefer != "last":
                if prefer is None:
                    raise InputError(
                        f"{name}: annotation at position {pos} is labelled differently by two progress files; "
                        "pass --prefer"
                    )
                continue
            applied[pos] = record
    for pos, record in applied.items():
        base_records[pos] = record
    base_doc = dict(base_doc)
    base_doc["annotations"] = base_records
    return base_doc


def _fill_into(base_doc: dict, labelled: list[dict]) -> dict:
    """--into: existing masks stay, the parts fill the rest, new annotations go at the end."""
    by_id = {r.get("id"): r for r in labelled}
    out_records = []
    for record in base_doc["annotations"]:
        new = by_id.pop(record.get("id"), None)
        seg = record.get("segmentation")
        out_records.append(record if (new is None or (isinstance(seg, (list, dict)) and seg)) else new)
    out_records.extend(r for r in labelled if r.get("id") in by_id)
    merged = dict(base_doc)
    merged["annotations"] = out_records
    return merged


def merge_files(paths: Sequence[str], out: str, into: Optional[str] = None, prefer: Optional[str] = None) -> dict:
    """Read the parts (datasets, shard outputs or progress files), merge, write OUT atomically ('-' = stdout)."""
    refuse_overwrite(out, [*paths, into], "--out")
    parts = []
    for path in paths:
        if _is_progress_file(path):
            parts.append((str(path), read_progress_results(path)))
        else:
            parts.append((str(path), _check_part(read_json(path), str(path))))
    into_doc = (str(into), _check_part(read_json(into), f"--into {into}")) if into else None
    merged = merge_documents(parts, into_doc, prefer)
    if str(out) != "-":
        remove_stale_temps(Path(out).parent)  # a killed merge's temp files
    write_json_atomic(out, merged)
    records = merged if isinstance(merged, list) else merged["annotations"]
    return {"parts": len(parts), "annotations": len(records)}

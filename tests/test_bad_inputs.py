"""Bad inputs, faults and odd images: one clear line and the right exit code, or a handled output with nothing lost.

The corpus is generated here (small JSON edits of the 16-image fixture, a few tiny images); the CLI runs
in-process through `mal_cli.cli.main` (the console script's entry point), so exit codes and stderr are
exactly what a user sees.
"""

from __future__ import annotations

import copy
import io
import json
import math
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import oracles  # slow references (tests/oracles.py)
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mal_runner import Result, label_box_args
from PIL import Image, ImageOps

from mal_cli import masks
from mal_cli.check import check_paths
from mal_cli.images import MAX_IMAGE_PIXELS, load_rgb
from mal_cli.labeling import LabelOptions, label, progress_path_for

DATA = Path(__file__).parent / "data"
MINI16 = DATA / "annotations_mini16.json"
IMAGES = DATA / "images"
RAW = orjson.loads(MINI16.read_bytes())
TINY_THRESHOLD = 0.499


# --- helpers ----------------------------------------------------------------------------------------------


def dataset() -> dict:
    return copy.deepcopy(RAW)


def write(folder: Path, name: str, content) -> Path:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else orjson.dumps(content))
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (for decompression-bomb checks; no real pixel data)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def label_args(boxes, out, *extra) -> list:
    return label_box_args(boxes, IMAGES, out, *extra)


def one_line_error(result: Result) -> None:
    """A MalError: exactly one line, 'mal: error: ...', no traceback."""
    assert result.err.startswith("mal: error: "), result.err
    assert result.err.count("\n") == 1, result.err


# --- the corpus: (name, build(tmp) -> argv, exit code, stderr substring) ----------------------------------


def _edit(mutate: Callable[[dict], None]) -> Callable[[Path], list]:
    def build(tmp: Path) -> list:
        doc = dataset()
        mutate(doc)
        return label_args(write(tmp, "boxes.json", doc), tmp / "out.json")

    return build


def _raw(content: bytes) -> Callable[[Path], list]:
    return lambda tmp: label_args(write(tmp, "boxes.json", content), tmp / "out.json")


def _set(path: str, value) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        *head, last = path.split(".")
        target = doc
        for part in head:
            target = target[int(part)] if part.isdigit() else target[part]
        target[int(last) if last.isdigit() else last] = value

    return mutate


def _dup_ann_ids(doc: dict) -> None:
    for i in (1, 2, 3):
        doc["annotations"][i]["id"] = doc["annotations"][0]["id"]


def _many_errors(doc: dict) -> None:
    doc["annotations"][0]["image_id"] = 999
    del doc["annotations"][1]["bbox"]
    doc["images"][1]["id"] = doc["images"][0]["id"]


def _no_file_name(doc: dict) -> None:
    image = doc["images"][0]
    image.pop("file_name", None)
    image.pop("coco_url", None)


def _results_list(with_unknown: bool) -> Callable[[Path], list]:
    def build(tmp: Path) -> list:
        dets = [
            {"image_id": a["image_id"], "bbox": a["bbox"], "category_id": a["category_id"], "score": 0.9}
            for a in RAW["annotations"][:5]
        ]
        if with_unknown:
            dets[2]["image_id"] = 12345
            return label_args(write(tmp, "dets.json", dets), tmp / "out.json", "--image-info", MINI16)
        return label_args(write(tmp, "dets.json", dets), tmp / "out.json")

    return build


USAGE = "usage"  # marker: Click's usage error (Usage: line + 'Error: ...'), exit 2

CASES = [
    # Click usage errors: Click's own message, exit 2, never "internal error"
    ("unknown-option", lambda t: ["train", "x", "--log-every", "3"], 2, "No such option: --log-every"),
    ("missing-argument", lambda t: ["label"], 2, "Missing argument"),
    ("missing-required-option", lambda t: ["label", MINI16, "--images", IMAGES], 2, "Missing option '--out'"),
    (
        "bad-int-value",
        lambda t: label_args(MINI16, t / "o.json", "--batch-size", "abc"),
        2,
        "Invalid value for '--batch-size'",
    ),
    (
        "bad-float-value",
        lambda t: label_args(MINI16, t / "o.json", "--threshold", "half"),
        2,
        "Invalid value for '--threshold'",
    ),
    ("unknown-command", lambda t: ["frobnicate"], 2, "No such command"),
    # option values the library checks
    (
        "bad-method",
        lambda t: label_args(MINI16, t / "o.json", "--method", "magic"),
        2,
        "--method must be 'mal' or 'box'",
    ),
    ("bad-shard", lambda t: label_args(MINI16, t / "o.json", "--shard", "3/2"), 2, "need 0 <= K < N"),
    (
        "bad-threshold",
        lambda t: label_args(MINI16, t / "o.json", "--threshold", "1.5"),
        2,
        "--threshold must be between 0 and 1",
    ),
    (
        "bad-format",
        lambda t: label_args(MINI16, t / "o.json", "--format", "mask"),
        2,
        "--format must be 'rle' or 'polygon'",
    ),
    (
        "bad-crop-sizes",
        lambda t: label_args(MINI16, t / "o.json", "--crop-sizes", "168,x,224"),
        2,
        "--crop-sizes must be 'full' or comma-separated integers",
    ),
    (
        "crop-size-not-patch-multiple",
        lambda t: ["label", MINI16, "--images", IMAGES, "--out", t / "o.json", "--crop-sizes", "100,196,224"],
        2,
        "--crop-sizes must be multiples of the backbone's patch size 14, got 100",
    ),
    ("decode-without-images", lambda t: ["check", MINI16, "--decode"], 2, "--decode needs --images"),
    # unreadable input files
    ("nonexistent-input", lambda t: label_args(t / "nope.json", t / "o.json"), 2, "nope.json: no such file"),
    ("input-is-a-folder", lambda t: label_args(t, t / "o.json"), 2, "is a directory"),
    (
        "truncated-json",
        lambda t: label_args(write(t, "b.json", MINI16.read_bytes()[:5000]), t / "o.json"),
        2,
        "truncated JSON at byte",
    ),
    ("invalid-json", _raw(b'{"images": [] "annotations": []}'), 2, "invalid JSON at byte 14"),
    ("empty-file", _raw(b""), 2, "truncated JSON at byte 0 of 0"),
    ("binary-garbage", _raw(png_header_only(4, 4)), 2, "invalid JSON at byte 0"),
    (
        "nonexistent-images-folder",
        lambda t: ["label", MINI16, "--images", t / "nope", "--out", t / "o.json", "--method", "box"],
        2,
        "no such folder",
    ),
    (
        "nonexistent-checkpoint",
        lambda t: ["label", MINI16, "--images", IMAGES, "--out", t / "o.json", "--checkpoint", t / "no.pth"],
        2,
        "checkpoint not found",
    ),
    (
        "garbage-checkpoint",
        lambda t: ["label", MINI16, "--images", IMAGES, "--out", t / "o.json", "--checkpoint", MINI16],
        2,
        "cannot read checkpoint",
    ),
    # wrong layout and types
    ("top-level-number", _raw(b"42"), 2, "a JSON number, expected an object"),
    ("no-images-key", _raw(b'{"annotations": []}'), 2, "no top-level key 'images'"),
    (
        "annotations-not-a-list",
        _raw(b'{"images": [], "annotations": {}}'),
        2,
        "'annotations' is a JSON object, expected a list",
    ),
    ("categories-not-a-list", _edit(_set("categories", "cats")), 2, "'categories' is a JSON string"),
    ("image-not-an-object", _edit(_set("images.3", "img.jpg")), 2, "images[3] is a JSON string"),
    ("image-id-unusable", _edit(_set("images.2.id", [1, 2])), 2, "image without a usable 'id'"),
    ("annotation-not-an-object", _edit(_set("annotations.4", [1, 2, 3, 4])), 2, "annotations[4] is a JSON array"),
    ("annotation-id-unusable", _edit(_set("annotations.0.id", {"a": 1})), 2, "annotation with an unusable 'id'"),
    # ids and references
    ("duplicate-image-id", _edit(_set("images.1.id", RAW["images"][0]["id"])), 2, "duplicate image id x1"),
    ("duplicate-annotation-ids", _edit(_dup_ann_ids), 2, "duplicate annotation id x3"),
    ("unknown-image-id", _edit(_set("annotations.5.image_id", 999)), 2, "-> image id 999"),
    ("missing-bbox", _edit(lambda d: d["annotations"][6].pop("bbox")), 2, "has no 'bbox'"),
    ("missing-image-id", _edit(lambda d: d["annotations"][6].pop("image_id")), 2, "has no 'image_id'"),
    (
        "bbox-wrong-length",
        _edit(_set("annotations.7.bbox", [1, 2, 3])),
        2,
        "'bbox' is not a list [x, y, width, height]",
    ),
    ("bbox-is-a-string", _edit(_set("annotations.7.bbox", "1,2,3,4")), 2, "'bbox' is not a list"),
    ("all-errors-at-once", _edit(_many_errors), 2, "9 problem(s) make the input unusable: duplicate image id x1"),
    ("image-without-file-name", _edit(_no_file_name), 2, "without 'file_name' or 'coco_url'"),
    ("results-without-image-info", _results_list(False), 2, "--image-info"),
    ("results-unknown-image", _results_list(True), 2, "image id 12345"),
    # the output location: checked before any work (exit 3)
    ("out-folder-missing", lambda t: label_args(MINI16, t / "no" / "o.json"), 3, "does not exist"),
    ("out-is-a-folder", lambda t: label_args(MINI16, t), 3, "is a folder"),
    ("out-read-only", lambda t: label_args(MINI16, "/proc/mal-out.json"), 3, "cannot write to /proc"),
    (
        "summary-json-unwritable",
        lambda t: label_args(MINI16, t / "o.json", "--summary-json", t / "no" / "s.json"),
        3,
        "--summary-json",
    ),
    ("eval-json-unwritable", lambda t: ["eval", MINI16, "--gt", MINI16, "--json", t / "no" / "r.json"], 3, "--json"),
    ("merge-out-unwritable", lambda t: ["merge", MINI16, "--out", "/proc/merged.json"], 3, "cannot write"),
    (
        "train-out-unwritable",
        lambda t: ["train", MINI16, "--images", IMAGES, "--out", "/proc/run"],
        3,
        "cannot write to the run folder",
    ),
    # training input
    (
        "train-images-missing",
        lambda t: ["train", MINI16, "--images", t / "nope", "--out", t / "run", "--backbone-weights", MINI16],
        2,
        "no such folder",
    ),
    (
        "train-image-without-size",
        lambda t: ["train", write(t, "b.json", _without_size()), "--images", IMAGES, "--out", t / "run"],
        2,
        "needs the size of every image",
    ),
    # devices
    (
        "label-device-unknown",
        lambda t: label_args(MINI16, t / "o.json", "--method", "mal", "--device", "gpu"),
        2,
        "--device 'gpu' is not a device",
    ),
    (
        "train-device-unknown",
        lambda t: ["train", MINI16, "--images", IMAGES, "--out", t / "run", "--device", "tpu"],
        2,
        "--device 'tpu' is not a device",
    ),
]


def _without_size() -> dict:
    doc = dataset()
    del doc["images"][0]["height"]
    return doc


@pytest.mark.parametrize("name, build, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_clearly(name, build, code, message, tmp_path, mal, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    args = build(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = mal(*args)
    assert result.code == code, result.err
    assert message in result.err, result.err
    assert "Traceback" not in result.err and "internal error" not in result.err
    if result.err.startswith("Usage:") or "\nError: " in result.err:
        assert "--help' for help." in result.err  # Click's usage error
    else:
        one_line_error(result)
    # Nothing written: no output, no temp or progress file.
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_no_traceback_unless_debug(tmp_path, mal):
    bad = write(tmp_path, "b.json", b"{")
    quiet = mal(*label_args(bad, tmp_path / "o.json"))
    assert quiet.code == 2 and "Traceback" not in quiet.err
    with pytest.raises(Exception, match="truncated JSON"):  # --debug re-raises: the traceback is shown
        mal("--debug", *label_args(bad, tmp_path / "o.json"))


# --- handled inputs: the run goes on, every annotation comes out, problems are flagged --------------------


def _run_box(tmp: Path, doc_bytes: bytes, mal) -> tuple[Result, list]:
    boxes = write(tmp, "boxes.json", doc_bytes)
    result = mal(*label_args(boxes, tmp / "out.json"))
    assert result.code == 0, result.err
    return result, orjson.loads((tmp / "out.json").read_bytes())["annotations"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_python_json_nan_boxes_become_fallbacks(tmp_path, mal, literal):
    doc = dataset()
    doc["annotations"][0]["bbox"][2] = float(literal.replace("Infinity", "inf"))
    result, out = _run_box(tmp_path, json.dumps(doc).encode(), mal)  # Python's json writes NaN/Infinity
    assert [a["id"] for a in out] == [a["id"] for a in RAW["annotations"]]
    assert out[0]["mal_fallback"] == "degenerate_box" and out[0]["area"] == 0 and out[0]["mal_score"] == 0.0
    assert "degenerate_box: 1" in result.err


def test_non_numeric_boxes_become_fallbacks(tmp_path, mal):
    doc = dataset()
    doc["annotations"][0]["bbox"] = ["a", 1, 2, 3]
    doc["annotations"][1]["bbox"] = [None, 1, 2, 3]
    doc["annotations"][2]["bbox"] = [1e308, 1e308, 1e308, 1e308]  # finite, far outside
    _, out = _run_box(tmp_path, orjson.dumps(doc), mal)
    assert [a["id"] for a in out] == [a["id"] for a in RAW["annotations"]]
    assert [out[i]["mal_fallback"] for i in range(3)] == ["degenerate_box"] * 3
    assert all(out[i]["area"] == 0 for i in range(3)) and "mal_fallback" not in out[3]


# --- per-image problems: skipped with a warning, boxes kept and flagged, counted; --strict stops ---------


def _image_corpus(tmp: Path) -> tuple[Path, Path, dict]:
    """5 images: a good one, missing, corrupt, truncated, empty, a decompression bomb and a wrong size."""
    folder = tmp / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    good = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    good.save(folder / "good.jpg", quality=90)
    buffer = io.BytesIO()
    good.save(buffer, format="JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "corrupt.jpg").write_bytes(rng.integers(0, 255, 3000, dtype=np.uint8).tobytes())
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "bomb.png").write_bytes(png_header_only(21000, 21000))  # 441 M pixels > MAX_IMAGE_PIXELS
    (folder / "giant.png").write_bytes(png_header_only(30000, 30000))  # > 2x: PIL's own DecompressionBombError
    good.save(folder / "small.png")  # 64x48 on disk, recorded as 100x100 below
    files = [
        ("good.jpg", 48, 64),
        ("missing.jpg", 48, 64),
        ("corrupt.jpg", 48, 64),
        ("truncated.jpg", 48, 64),
        ("empty.jpg", 48, 64),
        ("bomb.png", 48, 64),
        ("giant.png", 48, 64),
        ("small.png", 100, 100),
    ]
    # The bombs declare a plain size: a declared size over the pixel budget stops the run before any work (#20,
    # tests/test_hostile.py), while a file whose own header is a bomb is one image's fallback (decoding refuses it).
    doc = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i, (name, h, w) in enumerate(files):
        doc["images"].append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for j in range(2):
            doc["annotations"].append(
                {
                    "id": 100 * (i + 1) + j,
                    "image_id": i + 1,
                    "category_id": 1,
                    "bbox": [4.0 + 10 * j, 6.0, 30.0, 25.0],
                    "area": 750.0,
                    "iscrowd": 0,
                }
            )
    return write(tmp, "boxes.json", doc), folder, doc


IMAGE_ERRORS = {
    2: "image not found",
    3: "cannot decode image",
    4: "cannot decode image",  # truncated: PIL's "image file is truncated"
    5: "cannot decode image",
    6: "decompression bomb",
    7: "decompression bomb",
    8: "differs from the recorded 100x100",
}


def test_unreadable_images_are_skipped_flagged_and_counted(tmp_path, tiny_checkpoint, mal, caplog):
    boxes, folder, doc = _image_corpus(tmp_path)
    out = tmp_path / "out.json"
    summary_json = tmp_path / "summary.json"
    args = [
        "label",
        boxes,
        "--images",
        folder,
        "--out",
        out,
        "--checkpoint",
        tiny_checkpoint,
        "--threshold",
        str(TINY_THRESHOLD),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
        "--summary-json",
        summary_json,
    ]
    result = mal(*args)
    assert result.code == 0, result.err
    assert "7 unreadable images skipped" in result.err and "image_error: 14" in result.err
    labelled = orjson.loads(out.read_bytes())
    assert [a["id"] for a in labelled["annotations"]] == [a["id"] for a in doc["annotations"]]  # nothing lost
    by_image: dict = {}
    for ann in labelled["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert all("mal_fallback" not in a for a in by_image[1])
    for image_id in IMAGE_ERRORS:
        assert all(
            a["mal_fallback"] == "image_error" and a["mal_score"] == 0.0 and a["area"] > 0 for a in by_image[image_id]
        )
    summary = orjson.loads(summary_json.read_bytes())
    assert summary["failed_images"] == 7 and summary["fallbacks"] == {"image_error": 14}
    messages = " | ".join(summary["image_errors"])
    for image_id, message in IMAGE_ERRORS.items():
        assert message in messages, (image_id, messages)
    assert f"{MAX_IMAGE_PIXELS:,}" in messages
    # --strict: the first unreadable image stops the run with one line; the finished images are kept to resume.
    strict_out = tmp_path / "strict.json"
    strict = mal(*[strict_out if a == out else a for a in args], "--strict")
    assert strict.code == 2 and "--strict" in strict.err and "missing.jpg" in strict.err
    one_line_error(strict)
    assert not strict_out.exists() and progress_path_for(strict_out).exists()
    for workers in ("0", "2"):  # inline and through the post-processing pool: the image before it is kept
        progress_path_for(strict_out).unlink()
        strict = mal(*[strict_out if a == out else workers if a == "0" else a for a in args], "--strict")
        assert strict.code == 2
        lines = progress_path_for(strict_out).read_bytes().splitlines()
        assert [orjson.loads(line)["image"] for line in lines[1:]] == [0], workers  # good.jpg, then the stop


def test_check_reports_every_problem_grouped(tmp_path, mal):
    boxes, folder, doc = _image_corpus(tmp_path)
    doc["annotations"][0]["bbox"] = [1, 1, 0, 5]
    doc["annotations"][1]["bbox"] = [500, 500, 10, 10]  # outside its 64x48 image
    doc["annotations"][2]["bbox"] = [-20, 0, 50, 10]  # past the border
    doc["annotations"][3]["category_id"] = 77
    for i in (4, 5, 6):
        doc["annotations"][i]["id"] = 7
    boxes = write(tmp_path, "boxes.json", doc)
    result = mal("check", boxes, "--images", folder, "--json", "-")
    assert result.code == 1
    report = orjson.loads(result.out)
    counts = {p["code"]: (p["severity"], p["count"]) for p in report["problems"]}
    assert counts == {
        "duplicate_annotation_id": ("error", 2),
        "bbox_empty": ("warning", 1),
        "bbox_outside": ("warning", 1),
        "bbox_exceeds_image": ("warning", 1),
        "unknown_category": ("warning", 1),
        "image_missing": ("warning", 1),
        "image_unreadable": ("warning", 1),  # stat only: the empty file
    }
    assert report["errors"] == 2 and report["warnings"] == 6 and report["images_checked_on_disk"] == 8
    assert result.err.startswith("mal check:")  # the text report goes to stderr when stdout carries the JSON
    # --decode finds the corrupt, truncated, bomb and wrong-size files too
    decoded = check_paths(str(boxes), str(folder), decode=True)
    assert decoded.groups["image_unreadable"].count == 5  # corrupt, truncated, empty, bomb, giant
    assert decoded.groups["image_size_mismatch"].count == 1
    assert any("decompression bomb" in e for e in decoded.groups["image_unreadable"].examples)


def test_streamed_check_equals_whole_check(tmp_path):
    """`mal label` checks the input as it streams by (any key order, in chunks); `mal check` the parsed document.
    Both must report the same problems, counts and examples."""
    from mal_cli.check import DocumentCheck, check_document

    _, _, doc = _image_corpus(tmp_path)
    anns = doc["annotations"]
    anns[0]["bbox"] = [1, 1, 0, 5]
    anns[1]["bbox"] = [500, 500, 10, 10]
    anns[2]["bbox"] = [-20, 0, 50, 10]
    anns[3]["category_id"] = 77
    anns[4]["image_id"] = 999
    anns[5]["bbox"] = ["a", 1, 2, 3]
    anns[6]["bbox"] = [1, 2, 3]
    anns[7] = [1, 2]
    anns[8]["id"] = anns[9]["id"] = anns[10]["id"] = "same"
    anns[11]["id"] = anns[12]["id"] = 5
    anns[13].pop("image_id")
    doc["images"][2]["height"] = 0
    doc["images"][3]["id"] = doc["images"][4]["id"]
    lvis_order = {k: doc[k] for k in ("annotations", "images", "categories")}

    def groups(report):
        return [(code, g.count, g.examples) for code, g in report.groups.items()]

    whole = check_document(doc, "x.json")
    assert len(whole.groups) >= 10
    assert groups(check_document(lvis_order, "x.json")) == groups(whole)
    streamed = DocumentCheck("x.json")
    for key in lvis_order:
        streamed.start(key) if key != "categories" else streamed.value(key, doc[key])
        if key != "categories":
            items = lvis_order[key]
            for i in range(0, len(items), 3):
                (streamed.images if key == "images" else streamed.records)(items[i : i + 3])
    assert groups(streamed.finish()) == groups(whole)
    columns = streamed.columns  # the compact index `mal label` runs on
    assert columns.record_image.tolist()[4] == -1 and columns.record_has_segmentation.sum() == 0
    assert np.isnan(columns.record_bbox[5]).all() and columns.record_bbox[0].tolist() == [1, 1, 0, 5]


def test_check_clean_and_unreadable(tmp_path, mal):
    clean = mal("check", MINI16, "--images", IMAGES)
    assert clean.code == 0 and "no problems found" in clean.out and "0 error(s), 0 warning(s)" in clean.out
    many = dataset()
    for ann in many["annotations"][:12]:
        ann["bbox"] = [0, 0, -1, 1]
    listed = mal("check", write(tmp_path, "m.json", many))
    assert (
        listed.code == 1
        and "bbox has zero or negative width/height: 12" in listed.out
        and "... and 7 more" in listed.out
    )
    broken = mal("check", write(tmp_path, "b.json", b'{"images": ['))
    assert broken.code == 1 and "truncated JSON" in broken.out


# --- odd images: every mode, orientation and size labels correctly ----------------------------------------


def _exif_rotated(path: Path, stored_wh: tuple[int, int]) -> Image.Image:
    """A stored image with EXIF orientation 6 (displayed rotated 90 degrees clockwise)."""
    array = np.zeros((stored_wh[1], stored_wh[0], 3), np.uint8)
    array[:, : stored_wh[0] // 4] = (255, 0, 0)  # a red band on the stored left
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes(), quality=95)
    return image


def test_exif_orientation_rule(tmp_path):
    path = tmp_path / "rot.jpg"
    _exif_rotated(path, (40, 64))  # stored 40 wide x 64 high; displayed 64 wide x 40 high
    with Image.open(path) as raw:
        expected = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
        stored = np.asarray(raw.convert("RGB"))
    assert expected.shape == (40, 64, 3) and stored.shape == (64, 40, 3)
    np.testing.assert_array_equal(load_rgb(path), expected)  # no recorded size: oriented
    np.testing.assert_array_equal(load_rgb(path, expected_hw=(40, 64)), expected)  # recorded = oriented
    np.testing.assert_array_equal(load_rgb(path, expected_hw=(64, 40)), stored)  # recorded = stored pixels
    assert expected[:10, :, 0].mean() > 200 and expected[-10:, :, 0].mean() < 50  # the band is now on top


def _odd_images(folder: Path) -> list[tuple[str, int, int]]:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("LA").save(folder / "la.png")
    Image.fromarray(rgb).convert("P").save(folder / "p.png")
    Image.fromarray(rgb).convert("P").save(folder / "p_transparent.png", transparency=0)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (40, 56))).astype(np.uint16)).save(folder / "sixteen.png")
    Image.fromarray(rgb).convert("1").save(folder / "bilevel.png")
    Image.fromarray(rgb[:1, :1]).save(folder / "one.png")
    Image.new("RGB", (3000, 2000), (90, 120, 30)).save(folder / "large.jpg", quality=50)
    _exif_rotated(folder / "exif.jpg", (40, 56))
    return [
        ("gray.png", 40, 56),
        ("rgba.png", 40, 56),
        ("la.png", 40, 56),
        ("p.png", 40, 56),
        ("p_transparent.png", 40, 56),
        ("cmyk.jpg", 40, 56),
        ("sixteen.png", 40, 56),
        ("bilevel.png", 40, 56),
        ("one.png", 1, 1),
        ("large.jpg", 2000, 3000),
        ("exif.jpg", 40, 56),
    ]


def test_every_image_mode_labels_without_fallbacks(tmp_path, tiny_checkpoint):
    folder = tmp_path / "imgs"
    folder.mkdir()
    files = _odd_images(folder)
    doc = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    for i, (name, h, w) in enumerate(files):
        doc["images"].append({"id": i, "file_name": name, "height": h, "width": w})
        boxes = (
            [[0.0, 0.0, 1.0, 1.0]] if (h, w) == (1, 1) else [[3.0, 2.5, w / 2, h / 2], [w / 3, h / 4, w / 2, h * 0.7]]
        )
        for j, box in enumerate(boxes):
            doc["annotations"].append({"id": 10 * i + j, "image_id": i, "category_id": 1, "bbox": box, "iscrowd": 0})
    boxes_path = write(tmp_path, "boxes.json", doc)
    out = tmp_path / "out.json"
    options = LabelOptions(
        method="mal", checkpoint=str(tiny_checkpoint), threshold=TINY_THRESHOLD, workers=0, device="cpu"
    )
    summary = label(str(boxes_path), str(folder), str(out), options, progress_bar=False)
    assert summary.fallbacks == {} and summary.failed_images == 0, summary.image_errors
    labelled = orjson.loads(out.read_bytes())
    images = {im["id"]: im for im in labelled["images"]}
    for ann in labelled["annotations"]:
        h, w = images[ann["image_id"]]["height"], images[ann["image_id"]]["width"]
        mask = masks.decode(ann["segmentation"], h, w)
        r0, r1, c0, c1 = oracles.box_to_pixel_bounds(ann["bbox"], h, w)
        assert mask.sum() == ann["area"] and mask[r0:r1, c0:c1].sum() == mask.sum()
    # The same dataset, images recorded with the stored (un-rotated) size of the EXIF image: also fine.
    exif = next(im for im in doc["images"] if im["file_name"] == "exif.jpg")
    assert load_rgb(folder / "exif.jpg").shape[:2] == (40, 56)
    exif["height"], exif["width"] = 56, 40
    doc["images"] = [exif]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] == exif["id"]]
    summary = label(
        str(write(tmp_path, "b2.json", doc)), str(folder), str(tmp_path / "o2.json"), options, progress_bar=False
    )
    assert summary.fallbacks == {} and summary.boxes == 2


# --- determinism -------------------------------------------------------------------------------------------


def test_same_input_same_bytes_with_fallbacks_and_workers(tmp_path, tiny_checkpoint):
    """Two runs (in-process and with 2 decoding workers) over input with every kind of fallback: same bytes."""
    boxes, folder, doc = _image_corpus(tmp_path)
    doc["annotations"][0]["bbox"] = [1, 1, 0, 5]
    boxes = write(tmp_path, "boxes.json", doc)
    outs = []
    for workers in (0, 2):
        out = tmp_path / f"out{workers}.json"
        options = LabelOptions(
            method="mal",
            checkpoint=str(tiny_checkpoint),
            threshold=TINY_THRESHOLD,
            workers=workers,
            device="cpu",
            batch_size=3,
        )
        label(str(boxes), str(folder), str(out), options, progress_bar=False)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert b"degenerate_box" in outs[0] and b"image_error" in outs[0]


# --- property: random boxes on random image sizes never break the pipeline --------------------------------

finite = st.floats(-80, 120, allow_nan=False, allow_infinity=False)
box_value = st.one_of(finite, finite, finite, st.sampled_from([0.0, -0.0, 1e-9, float("nan"), float("inf"), 1e6]))


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    boxes=st.lists(st.tuples(finite, finite, box_value, box_value), min_size=1, max_size=6),
    polygon=st.booleans(),
)
def test_label_pipeline_property(tiny_checkpoint, height, width, boxes, polygon):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(height * 100 + width)
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(tmp / "im.png")
        doc = {
            "images": [{"id": 1, "file_name": "im.png", "height": height, "width": width}],
            "annotations": [
                {"id": 1000 - i, "image_id": 1, "category_id": 1, "bbox": list(b)} for i, b in enumerate(boxes)
            ],
            "categories": [{"id": 1, "name": "x"}],
        }
        (tmp / "boxes.json").write_text(json.dumps(doc))  # NaN/inf as Python writes them
        for method in ("box", "mal"):
            options = LabelOptions(
                method=method,
                checkpoint=str(tiny_checkpoint),
                threshold=TINY_THRESHOLD,
                workers=0,
                device="cpu",
                batch_size=4,
                format="polygon" if polygon else "rle",
            )
            out = tmp / f"{method}.json"
            label(str(tmp / "boxes.json"), str(tmp), str(out), options, progress_bar=False)
            result = orjson.loads(out.read_bytes())["annotations"]
            assert [a["id"] for a in result] == [a["id"] for a in doc["annotations"]]
            for ann, (x, y, w, h) in zip(result, boxes):
                mask = masks.decode(ann["segmentation"], height, width)
                real = all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0
                if not real:
                    assert ann["mal_fallback"] == "degenerate_box" and mask.sum() == 0
                    continue
                r0, r1, c0, c1 = oracles.box_to_pixel_bounds([x, y, w, h], height, width)
                assert mask[r0:r1, c0:c1].sum() == mask.sum(), "mask leaves its clipped box"
                if not polygon:
                    assert ann["area"] == int(mask.sum())
                if r1 <= r0 or c1 <= c0:
                    assert ann["mal_fallback"] == "degenerate_box"
                else:
                    assert "mal_fallback" not in ann

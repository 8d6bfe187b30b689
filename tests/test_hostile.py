"""Hostile inputs over eval, viz, export, merge, train and check: no crash, no hang, no file touched outside OUT.

Every case writes down its expectation: the exact exit code, a substring of the one-line message that names
the problem, no traceback, nothing written when it fails, and every file outside the output (the inputs, a
planted link's target in `outside/`) byte-identical afterwards. Most cases run the CLI in-process (as
`tests/test_bad_inputs.py`); the ones that used to crash (SIGSEGV), spin or blow up memory run in a child
process under `ulimit -v` 4 GiB and a 60 s timeout.

The data is made here: two 32 x 24 PNGs with box-shaped masks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import oracles  # tests/oracles.py: the reference RLE encoder
import orjson
import pytest
from mal_runner import Result, label_box_args
from PIL import Image

from mal_cli.merge import dataset_records_digest

H, W = 24, 32
MEMORY_LIMIT_KB = 4 * 1024 * 1024
TIMEOUT_S = 60
DEAD_PID = 4_194_303  # above every pid this test machine hands out (Linux pid_max default 4194304)


# --- the data ---------------------------------------------------------------------------------------------


def _box_rle(x0: int, y0: int, x1: int, y1: int) -> dict:
    mask = np.zeros((H, W), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return oracles.encode(mask)


def _gt() -> dict:
    images = [
        {"id": 1, "file_name": "a.png", "height": H, "width": W},
        {"id": 2, "file_name": "b.png", "height": H, "width": W},
    ]
    anns = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "bbox": [4, 4, 10, 8],
            "area": 80,
            "iscrowd": 0,
            "segmentation": _box_rle(4, 4, 14, 12),
        },
        {
            "id": 2,
            "image_id": 2,
            "category_id": 2,
            "bbox": [10, 6, 12, 10],
            "area": 120,
            "iscrowd": 0,
            "segmentation": _box_rle(10, 6, 22, 16),
        },
        {
            "id": 3,
            "image_id": 1,
            "category_id": 2,
            "bbox": [16, 2, 8, 8],
            "area": 64,
            "iscrowd": 0,
            "segmentation": _box_rle(16, 2, 24, 10),
        },
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}


def _labels() -> dict:
    doc = _gt()
    for k, ann in enumerate(doc["annotations"]):
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = _box_rle(x + 1, y, x + w, y + h)  # close to, not equal to, the GT
        ann["mal_score"] = 0.5 + 0.1 * k
    return doc


def _write_png(path: Path, h: int = H, w: int = W, value: int = 120) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


@dataclass
class Case:
    tmp: Path
    images: Path
    outside: Path  # a folder no command may touch; planted links point here

    def write(self, name: str, doc, raw: bool = False) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(doc, bytes):
            path.write_bytes(doc)
        elif raw:
            path.write_text(json.dumps(doc))  # the json module: NaN / Infinity literals
        else:
            path.write_bytes(orjson.dumps(doc))
        return path


@pytest.fixture
def case(tmp_path) -> Case:
    images = tmp_path / "images"
    _write_png(images / "a.png")
    _write_png(images / "b.png", value=60)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("do not touch\n")
    return Case(tmp_path, images, outside)


def _snapshot(root: Path, skip: tuple[Path, ...]) -> dict:
    """Every file and link under root (links not followed) with its content hash or target, minus `skip`."""
    found = {}
    skip_resolved = [s.absolute() for s in skip]
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = Path(folder) / name
            if any(path.absolute() == s or s in path.absolute().parents for s in skip_resolved):
                continue
            if path.is_symlink():
                found[str(path)] = ("link", os.readlink(path))
            else:
                found[str(path)] = ("file", hashlib.sha1(path.read_bytes()).hexdigest())
    return found


def run_limited(args: list, cwd: Path) -> Result:
    """`mal ARGS` in a child process under a 4 GiB address-space limit and a 60 s timeout."""
    quoted = shlex.join([sys.executable, "-m", "mal_cli", *map(str, args)])
    try:
        done = subprocess.run(
            ["bash", "-c", f"ulimit -v {MEMORY_LIMIT_KB}; exec {quoted}"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"hang: mal {' '.join(map(str, args))} ran past {TIMEOUT_S} s")
    assert done.returncode >= 0, f"killed by signal {-done.returncode}: {done.stderr[-2000:]}"
    return Result(done.returncode, done.stdout, done.stderr)


def expect_error(result: Result, code: int, message: str) -> None:
    assert result.code == code, result.err
    assert "Traceback" not in result.err and "internal error" not in result.err, result.err
    assert result.err.startswith("mal: error: "), result.err
    assert result.err.count("\n") == 1, result.err  # one line
    assert message in result.err, result.err


def expect_clean(result: Result) -> None:
    assert result.code == 0, result.err
    assert "Traceback" not in result.err and "internal error" not in result.err, result.err


# --- one segmentation check for eval, viz and export ------------------------------------------------------


def rle_string(counts: list[int]) -> str:
    """pycocotools' compressed RLE string for any counts (no checks: that is the point)."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _zigzag() -> list:
    points = []
    for k in range(2000):
        points += [1.0 if k % 2 else float(W - 1), float(k % H)]
    return [points]


BAD_SEGMENTATIONS = [
    # (name, segmentation, problem named in the message)
    ("rle-runs-exceed-image", {"size": [H, W], "counts": rle_string([10**9])}, "cover 1000000000 pixels"),
    ("rle-runs-short", {"size": [H, W], "counts": rle_string([5])}, "cover 5 pixels"),
    ("rle-negative-run", {"size": [H, W], "counts": rle_string([-5, H * W + 5])}, "negative run"),
    ("rle-garbage-chars", {"size": [H, W], "counts": "~~{|\x7f"}, "alphabet"),
    ("rle-space-in-counts", {"size": [H, W], "counts": "0 0"}, "alphabet"),
    ("rle-non-ascii", {"size": [H, W], "counts": "é"}, "not ASCII"),
    ("rle-unterminated-run", {"size": [H, W], "counts": "P"}, "ends in the middle of a run"),
    ("rle-endless-run", {"size": [H, W], "counts": "PPPPPPPPP0"}, "run too long"),
    ("rle-size-mismatch", {"size": [H + 1, W], "counts": rle_string([(H + 1) * W])}, "differs from the image size"),
    ("rle-size-garbage", {"size": "big", "counts": "0"}, "RLE size must be"),
    ("rle-counts-number", {"size": [H, W], "counts": 7}, "must be a string, bytes or a list"),
    ("rle-list-negative", {"size": [H, W], "counts": [-5, H * W + 5]}, "negative run"),
    ("rle-list-float", {"size": [H, W], "counts": [0.5, H * W - 0.5]}, "must be integers"),
    ("rle-list-bool", {"size": [H, W], "counts": [True, H * W - 1]}, "must be integers"),
    ("rle-list-huge", {"size": [H, W], "counts": [10**30]}, "longer than any image"),
    ("rle-list-wrong-sum", {"size": [H, W], "counts": [3, 4]}, "cover 7 pixels"),
    ("poly-1e9", [[0, 0, 1e9, 0, 1e9, 1e9]], "more than an image size outside"),
    ("poly-negative-1e12", [[-1e12, 0, 5, 5, 0, 5]], "more than an image size outside"),
    ("poly-nan", [[0, 0, float("nan"), 3, 5, 5]], "finite"),
    ("poly-infinity", [[0, 0, float("inf"), 3, 5, 5]], "finite"),
    ("poly-strings", [["a", "b", "c", "d", "e", "f"]], "must be numbers"),
    ("poly-booleans", [[True, False, True, True, False, True]], "must be numbers"),
    ("poly-odd-length", [[1, 2, 3, 4, 5, 6, 7]], "flat list of x, y pairs"),
    ("poly-nested-lists", [[[1, 2], [3, 4], [5, 6]]], "flat list of x, y pairs"),
    ("poly-endless-outline", _zigzag(), "outlines are longer"),
    ("seg-a-string", "abc", "a segmentation must be"),
]


def _with_bad_prediction(case: Case, segmentation) -> tuple[Path, Path]:
    labels = _labels()
    labels["annotations"][0]["segmentation"] = segmentation
    return case.write("labels.json", labels, raw=True), case.write("gt.json", _gt())


def _command(kind: str, case: Case, labels: Path, gt: Path) -> tuple[list, Path]:
    out = case.tmp / "out"
    if kind == "eval":
        return ["eval", labels, "--gt", gt, "--json", out], out
    if kind == "viz":
        return ["viz", labels, "--images", case.images, "--out", out, "--no-progress"], out
    return ["export", "yolo", labels, "--out", out], out


@pytest.mark.parametrize("kind", ["eval", "viz", "export"])
@pytest.mark.parametrize("name, segmentation, problem", BAD_SEGMENTATIONS, ids=[b[0] for b in BAD_SEGMENTATIONS])
def test_bad_segmentation_is_one_clear_error(kind, name, segmentation, problem, case, mal):
    labels, gt = _with_bad_prediction(case, segmentation)
    args, out = _command(kind, case, labels, gt)
    before = _snapshot(case.tmp, ())
    result = mal(*args)
    expect_error(result, 2, problem)
    assert "bad segmentation" in result.err and "annotation" in result.err
    assert not out.exists()  # nothing written
    assert _snapshot(case.tmp, ()) == before


@pytest.mark.parametrize(
    "name, segmentation, problem", BAD_SEGMENTATIONS[:6], ids=[b[0] for b in BAD_SEGMENTATIONS[:6]]
)
def test_eval_viz_export_name_the_same_problem(name, segmentation, problem, case, mal):
    """One rule: the three commands refuse the same segmentation for the same reason, word for word."""
    labels, gt = _with_bad_prediction(case, segmentation)
    reasons = set()
    for kind in ("eval", "viz", "export"):
        result = mal(*_command(kind, case, labels, gt)[0])
        reasons.add(result.err.split("bad segmentation: ", 1)[1])
    assert len(reasons) == 1, reasons


def test_bad_gt_segmentation_named_as_gt(case, mal):
    gt = _gt()
    gt["annotations"][1]["segmentation"] = {"size": [H, W], "counts": rle_string([10**9])}
    result = mal("eval", case.write("labels.json", _labels()), "--gt", case.write("gt.json", gt))
    expect_error(result, 2, "GT annotation id 2: bad segmentation")


@pytest.mark.parametrize("kind", ["eval", "viz", "export"])
@pytest.mark.parametrize("name", ["rle-runs-exceed-image", "poly-1e9", "poly-nan"])
def test_former_crashes_and_hangs_under_limits(kind, name, case):
    """The inputs that made pycocotools spin, hang or SIGSEGV: a clear error in a child process, in time."""
    segmentation, problem = next((s, p) for n, s, p in BAD_SEGMENTATIONS if n == name)
    labels, gt = _with_bad_prediction(case, segmentation)
    args, out = _command(kind, case, labels, gt)
    expect_error(run_limited(args, case.tmp), 2, problem)
    assert not out.exists()


# --- one pixel budget -------------------------------------------------------------------------------------


def _huge(case: Case, h: int, w: int) -> Path:
    doc = _labels()
    doc["images"][0].update(height=h, width=w)
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] == 1]
    for ann in doc["annotations"]:
        ann["segmentation"] = [[4, 4, 24, 4, 24, 24, 4, 24]]  # a 20 x 20 polygon: no huge RLE in the file
    return case.write("huge.json", doc)


@pytest.mark.parametrize("command", ["viz", "export", "eval"])
def test_declared_30000_square_is_refused_before_allocating(command, case):
    path = _huge(case, 30000, 30000)
    out = case.tmp / "out"
    args = {
        "viz": ["viz", path, "--images", case.images, "--out", out, "--no-progress"],
        "export": ["export", "yolo", path, "--out", out],
        "eval": ["eval", path, "--gt", path, "--json", out],
    }[command]
    if command == "eval":
        args[args.index("--gt") + 1] = path  # the same file as GT: the sizes agree
    result = run_limited(args, case.tmp)
    expect_error(result, 2, "over the 400,000,000-pixel limit")
    assert not out.exists()


def test_viz_size_from_boxes_is_budgeted(case, mal):
    doc = _labels()
    for image in doc["images"]:
        del image["height"], image["width"]
        image["file_name"] = "missing.png"
    doc["annotations"][0]["bbox"] = [0, 0, 1e9, 1e9]
    doc["images"] = doc["images"][:1]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] == 1]
    for ann in doc["annotations"]:
        ann["segmentation"] = [[1, 1, 5, 1, 5, 5]]
    result = mal("viz", case.write("l.json", doc), "--images", case.images, "--out", case.tmp / "out", "--no-progress")
    expect_error(result, 2, "size from its boxes")


@pytest.mark.parametrize(
    "height, width, problem",
    [
        ("24", W, "must be positive integers"),
        (-24, W, "must be positive integers"),
        (0, W, "must be positive integers"),
        (24.5, W, "must be positive integers"),
        (100000, 100000, "pixel limit"),
    ],
    ids=["string", "negative", "zero", "fraction", "100000-square"],
)
@pytest.mark.parametrize("command", ["viz", "export"])
def test_declared_sizes_are_checked(command, height, width, problem, case, mal):
    doc = _labels()
    doc["images"][0].update(height=height, width=width)
    path = case.write("l.json", doc)
    out = case.tmp / "out"
    args = (
        ["viz", path, "--images", case.images, "--out", out, "--no-progress"]
        if command == "viz"
        else ["export", "yolo", path, "--out", out]
    )
    expect_error(mal(*args), 2, problem)
    assert not out.exists()


def test_train_refuses_declared_bomb_and_all_unreadable(case, mal):
    doc = _gt()
    doc["images"][0].update(height=60000, width=60000)
    out = case.tmp / "run"
    common = [
        "--out",
        out,
        "--backbone",
        "vit_tiny_patch16_224",
        "--crop-size",
        "32",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--min-box-area",
        "10",
    ]
    result = mal("train", case.write("bomb.json", doc), "--images", case.images, *common)
    expect_error(result, 2, "pixel limit")
    (case.images / "a.png").write_bytes(b"not a png")
    (case.images / "b.png").write_bytes(b"")
    result = mal("train", case.write("gt.json", _gt()), "--images", case.images, *common)
    expect_error(result, 2, "none of the 2 training images")
    assert not (out / "labeler.pth").exists()


# --- the JSON reader: long strings, deep nesting ------------------------------------------------------------


def test_jsonstream_memory_is_bounded_by_the_longest_token(case):
    doc = {"info": {"note": "x" * 20_000_000}, "images": [], "annotations": [{"id": 1, "note": 'a\\"' * 3_000_000}]}
    path = case.write("long.json", doc)
    # VmHWM: this process image's peak (ru_maxrss would include the forking pytest's).
    code = (
        "from mal_cli.jsonstream import iter_document\n"
        f"n = sum(1 for _ in iter_document({str(path)!r}, ['annotations']))\n"
        "line = next(t for t in open('/proc/self/status') if t.startswith('VmHWM'))\n"
        "print(int(line.split()[1]) // 1024)"
    )
    done = subprocess.run(
        ["bash", "-c", f"ulimit -v {MEMORY_LIMIT_KB}; exec {shlex.quote(sys.executable)} -c {shlex.quote(code)}"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    peak_mb = int(done.stdout.split()[-1])
    file_mb = path.stat().st_size / 2**20
    assert peak_mb < 100 + 4 * file_mb, (peak_mb, file_mb)  # was ~120 bytes per input byte


def _deep(depth: int) -> bytes:
    gt = orjson.dumps(_gt())
    return gt[:-1] + b',"extra":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("depth", [300, 1_000_000], ids=["300", "1e6"])
@pytest.mark.parametrize("command", ["eval", "merge", "viz", "export", "check"])
def test_deep_nesting_is_a_clear_error(command, depth, case, mal):
    path = case.write("deep.json", _deep(depth))
    out = case.tmp / "out.json"
    args = {
        "eval": ["eval", path, "--gt", path],
        "merge": ["merge", path, "--out", out],
        "viz": ["viz", path, "--images", case.images, "--out", case.tmp / "o", "--no-progress"],
        "export": ["export", "yolo", path, "--out", case.tmp / "o"],
        "check": ["check", path],
    }[command]
    result = mal(*args) if depth <= 300 else run_limited(args, case.tmp)
    if command == "check":  # check reports problems in its report, exit 1
        assert result.code == 1 and "nested deeper than 255 levels" in result.out and "Traceback" not in result.err
    else:
        expect_error(result, 2, "nested deeper than 255 levels")
    assert not out.exists() and not (case.tmp / "o").exists()


# --- outputs never destroy inputs -------------------------------------------------------------------------


def test_eval_json_naming_the_gt_or_pred_is_refused(case, mal):
    labels, gt = case.write("labels.json", _labels()), case.write("gt.json", _gt())
    before = _snapshot(case.tmp, ())
    expect_error(mal("eval", labels, "--gt", gt, "--json", gt), 3, "would destroy the input")
    expect_error(mal("eval", labels, "--gt", gt, "--json", labels), 3, "would destroy the input")
    link = case.tmp / "alias.json"
    link.symlink_to(gt)
    before = _snapshot(case.tmp, ())
    expect_error(mal("eval", labels, "--gt", gt, "--json", link), 3, "would destroy the input")
    assert _snapshot(case.tmp, ()) == before


def test_check_json_naming_the_input_is_refused(case, mal):
    gt = case.write("gt.json", _gt())
    before = _snapshot(case.tmp, ())
    expect_error(mal("check", gt, "--json", gt), 3, "would destroy the input")
    assert _snapshot(case.tmp, ()) == before


@pytest.mark.parametrize("which", ["first-part", "second-part", "into"])
def test_merge_out_naming_an_input_is_refused(which, case, mal):
    a, b = case.write("a.json", _labels()), case.write("b.json", _labels())
    into = case.write("into.json", _gt())
    target = {"first-part": a, "second-part": b, "into": into}[which]
    args = ["merge", a, b, "--out", target] + (["--into", into] if which == "into" else [])
    before = _snapshot(case.tmp, ())
    expect_error(mal(*args), 3, "would destroy the input")
    assert _snapshot(case.tmp, ()) == before


@pytest.mark.parametrize("where", ["review.json", "index.html", "crops/labels.json"])
def test_viz_out_holding_an_input_is_refused(where, case, mal):
    out = case.tmp / "review"
    labels = case.write(f"review/{where}", _labels())
    before = _snapshot(case.tmp, ())
    expect_error(
        mal("viz", labels, "--images", case.images, "--out", out, "--no-progress"), 3, "lies where this command writes"
    )
    assert _snapshot(case.tmp, ()) == before


def test_viz_images_inside_out_crops_is_refused(case, mal):
    out = case.tmp / "review"
    (out / "crops").mkdir(parents=True)
    labels = case.write("labels.json", _labels())
    expect_error(mal("viz", labels, "--images", out / "crops", "--out", out, "--no-progress"), 3, "lies where")


@pytest.mark.parametrize("where", ["classes.txt", "data.yaml", "labels/l.json"])
def test_export_out_holding_an_input_is_refused(where, case, mal):
    labels = case.write(f"yolo/{where}", _labels())
    before = _snapshot(case.tmp, ())
    expect_error(mal("export", "yolo", labels, "--out", case.tmp / "yolo"), 3, "lies where this command writes")
    assert _snapshot(case.tmp, ()) == before


def test_export_link_images_to_its_own_images_is_refused(case, mal):
    out = case.tmp / "yolo"
    own = out / "images"
    _write_png(own / "a.png")
    labels = case.write("labels.json", _labels())
    before = _snapshot(case.tmp, ())
    expect_error(mal("export", "yolo", labels, "--out", out, "--link-images", own), 2, "own images/ folder")
    assert _snapshot(case.tmp, ()) == before
    assert not (own / "a.png").is_symlink()


def test_export_link_images_missing_folder_is_an_error(case, mal):
    out = case.tmp / "yolo"
    result = mal(
        "export", "yolo", case.write("labels.json", _labels()), "--out", out, "--link-images", case.tmp / "nope"
    )
    expect_error(result, 2, "no such folder")
    assert not out.exists()


def test_export_link_images_skips_missing_files_and_keeps_real_ones(case, mal):
    out = case.tmp / "yolo"
    _write_png(out / "images" / "a.png", value=7)  # the user's own copy
    mine = (out / "images" / "a.png").read_bytes()
    (case.images / "b.png").unlink()
    result = mal("export", "yolo", case.write("labels.json", _labels()), "--out", out, "--link-images", case.images)
    expect_clean(result)
    assert "1 image(s) not found" in result.err
    assert (out / "images" / "a.png").read_bytes() == mine and not (out / "images" / "a.png").is_symlink()
    assert not os.path.lexists(out / "images" / "b.png")  # no dangling link


# --- planted links are replaced, never written through ----------------------------------------------------


@pytest.mark.parametrize("name", ["index.html", "review.json", "crops/0001_ann1.png"])
def test_viz_planted_link_is_not_followed(name, case, mal):
    out = case.tmp / "review"
    link = out / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(case.outside / "secret.txt")
    before = _snapshot(case.outside, ())
    expect_clean(
        mal("viz", case.write("labels.json", _labels()), "--images", case.images, "--out", out, "--no-progress")
    )
    assert _snapshot(case.outside, ()) == before
    assert not link.is_symlink() and link.stat().st_size > 0


@pytest.mark.parametrize("name", ["classes.txt", "data.yaml", "labels", "labels/a.txt"])
def test_export_planted_link_is_not_followed(name, case, mal):
    out = case.tmp / "yolo"
    link = out / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(case.outside if name == "labels" else case.outside / "secret.txt")
    before = _snapshot(case.outside, ())
    expect_clean(mal("export", "yolo", case.write("labels.json", _labels()), "--out", out))
    assert _snapshot(case.outside, ()) == before
    assert (out / "labels" / "a.txt").is_file() and not (out / "labels").is_symlink()


# --- file names ----------------------------------------------------------------------------------------------


FILE_NAMES = [
    ("nul-byte", "a\x00.png", "NUL byte"),
    ("slash", "/", "names a folder"),
    ("dot", ".", "names a folder"),
    ("trailing-slash", "sub/", "names a folder"),
]


@pytest.mark.parametrize("command", ["viz", "export"])
@pytest.mark.parametrize("name, file_name, problem", FILE_NAMES, ids=[f[0] for f in FILE_NAMES])
def test_unusable_file_names(command, name, file_name, problem, case, mal):
    doc = _labels()
    doc["images"][0]["file_name"] = file_name
    path = case.write("l.json", doc)
    out = case.tmp / "out"
    args = (
        ["viz", path, "--images", case.images, "--out", out, "--no-progress"]
        if command == "viz"
        else ["export", "yolo", path, "--out", out]
    )
    expect_error(mal(*args), 2, problem)
    assert not out.exists()


@pytest.mark.parametrize("file_name", ["../outside/x.png", "ABSOLUTE"], ids=["dotdot", "absolute"])
def test_viz_outside_images_refused_unless_allowed(file_name, case, mal):
    _write_png(case.outside / "x.png", value=200)
    doc = _labels()
    doc["images"][0]["file_name"] = str(case.outside / "x.png") if file_name == "ABSOLUTE" else file_name
    path = case.write("l.json", doc)
    out = case.tmp / "out"
    base = ["viz", path, "--images", case.images, "--out", out, "--no-progress"]
    expect_error(mal(*base), 2, "points outside the images folder")
    assert not out.exists()
    result = mal(*base, "--allow-outside-images")
    expect_clean(result)
    assert "cannot read" not in result.err  # the image outside was read, not drawn on grey


def test_viz_full_names_do_not_collide(case, mal):
    _write_png(case.images / "train" / "x.png", value=10)
    _write_png(case.images / "val" / "x.png", value=250)
    doc = _labels()
    doc["images"][0]["file_name"], doc["images"][1]["file_name"] = "train/x.png", "val/x.png"
    out = case.tmp / "out"
    expect_clean(
        mal("viz", case.write("l.json", doc), "--images", case.images, "--out", out, "--full", "--no-progress")
    )
    review = orjson.loads((out / "review.json").read_bytes())
    fulls = {item["image_id"]: item["full"] for item in review["items"]}
    assert len(set(fulls.values())) == 2 and len(list((out / "full").iterdir())) == 2


def test_viz_two_megabyte_category_name(case):
    doc = _labels()
    doc["categories"][0]["name"] = "n" * 2_000_000
    out = case.tmp / "out"
    result = run_limited(
        ["viz", case.write("l.json", doc), "--images", case.images, "--out", out, "--no-progress"], case.tmp
    )
    expect_clean(result)
    review = orjson.loads((out / "review.json").read_bytes())
    assert max(len(item["category"]) for item in review["items"]) <= 120
    assert (out / "index.html").stat().st_size < 200_000


@pytest.mark.parametrize("bbox", [[0, 0, "inf", 5], [0, 0, 5], [0, 0, 5, True]], ids=["string", "three", "bool"])
def test_viz_bad_boxes(bbox, case, mal):
    doc = _labels()
    doc["annotations"][0]["bbox"] = bbox
    result = mal("viz", case.write("l.json", doc), "--images", case.images, "--out", case.tmp / "out", "--no-progress")
    expect_error(result, 2, "bbox")


def test_viz_infinite_box_and_nan_score(case, mal):
    doc = _labels()
    doc["annotations"][0]["bbox"] = [0, 0, float("inf"), 5]
    result = mal(
        "viz", case.write("l.json", doc, raw=True), "--images", case.images, "--out", case.tmp / "o", "--no-progress"
    )
    expect_error(result, 2, "4 finite numbers")
    doc = _labels()
    doc["annotations"][0]["mal_score"] = float("nan")
    expect_clean(
        mal(
            "viz",
            case.write("l2.json", doc, raw=True),
            "--images",
            case.images,
            "--out",
            case.tmp / "o2",
            "--no-progress",
        )
    )


@pytest.mark.parametrize("context", ["nan", "-1", "inf"])
def test_viz_bad_context(context, case, mal):
    result = mal(
        "viz",
        case.write("l.json", _labels()),
        "--images",
        case.images,
        "--out",
        case.tmp / "o",
        "--context",
        context,
        "--no-progress",
    )
    expect_error(result, 2, "--context")
    assert not (case.tmp / "o").exists()


# --- export: wrong results become errors ------------------------------------------------------------------


def test_export_boxes_only_is_refused(case, mal):
    doc = _gt()
    for ann in doc["annotations"]:
        del ann["segmentation"]
    out = case.tmp / "yolo"
    expect_error(mal("export", "yolo", case.write("boxes.json", doc), "--out", out), 2, "boxes only")
    assert not out.exists()


def test_export_some_boxes_without_masks_are_refused(case, mal):
    doc = _labels()
    del doc["annotations"][1]["segmentation"]
    out = case.tmp / "yolo"
    expect_error(
        mal("export", "yolo", case.write("l.json", doc), "--out", out), 2, "annotation id 2 has no 'segmentation'"
    )
    assert not out.exists()


@pytest.mark.parametrize("bad", ["cat\nmouse", "cat\rmouse", "cat\u2028mouse"], ids=["lf", "cr", "u2028"])
def test_export_category_name_with_a_line_break(bad, case, mal):
    doc = _labels()
    doc["categories"][1]["name"] = bad
    out = case.tmp / "yolo"
    expect_error(mal("export", "yolo", case.write("l.json", doc), "--out", out), 2, "line break")
    assert not out.exists()


def test_export_failure_keeps_the_previous_export(case, mal, monkeypatch):
    """A full disk half-way (writes to /dev/full): exit 3, the earlier export intact, no temp left."""
    out = case.tmp / "yolo"
    labels = case.write("l.json", _labels())
    expect_clean(mal("export", "yolo", labels, "--out", out))
    before = _snapshot(out, ())
    import mal_cli.export as export_module

    calls = []

    def full_disk(path, mode=0o666):
        calls.append(path)
        if len(calls) == 2:
            return os.open("/dev/full", os.O_WRONLY)
        return export_module.__dict__["_real_open_exclusive"](path, mode)

    monkeypatch.setitem(export_module.__dict__, "_real_open_exclusive", export_module.open_exclusive)
    monkeypatch.setattr(export_module, "open_exclusive", full_disk)
    result = mal("export", "yolo", labels, "--out", out)
    expect_error(result, 3, "the disk is full")
    assert _snapshot(out, ()) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_export_removes_a_killed_runs_leftovers(case, mal):
    out = case.tmp / "yolo"
    stale = out / f".labels.mal{DEAD_PID}.partial"
    (stale / "sub").mkdir(parents=True)
    (out / f".classes.txt.mal{DEAD_PID}.abc123.tmp").write_text("half")
    live = out / f".classes.txt.mal{os.getpid()}.zzz.tmp"  # a live writer's temp: left alone
    live.write_text("busy")
    (out / ".mal-export-unfinished").write_text("killed")
    expect_clean(mal("export", "yolo", case.write("l.json", _labels()), "--out", out))
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["classes.txt", "data.yaml", "labels", live.name])


@pytest.mark.parametrize("file_name, problem", [("", "neither 'file_name' nor 'coco_url'")], ids=["empty"])
def test_export_empty_file_name(file_name, problem, case, mal):
    doc = _labels()
    doc["images"][0]["file_name"] = file_name
    expect_error(mal("export", "yolo", case.write("l.json", doc), "--out", case.tmp / "y"), 2, problem)


def test_export_unknown_category_and_missing_size(case, mal):
    doc = _labels()
    doc["annotations"][0]["category_id"] = 99
    expect_error(mal("export", "yolo", case.write("l.json", doc), "--out", case.tmp / "y"), 2, "not in 'categories'")
    doc = _labels()
    del doc["images"][1]["width"]
    expect_error(mal("export", "yolo", case.write("l2.json", doc), "--out", case.tmp / "y"), 2, "has no 'width'")
    assert not (case.tmp / "y").exists()


# --- eval: wrong results --------------------------------------------------------------------------------------


def test_eval_crowd_only_gt_reports_ap_undefined(case, mal):
    gt = _gt()
    for ann in gt["annotations"]:
        ann["iscrowd"] = 1
    labels = _labels()
    report = case.tmp / "report.json"
    result = mal(
        "eval",
        case.write("l.json", labels),
        "--gt",
        case.write("gt.json", gt),
        "--json",
        report,
        "--reference-ap",
        "40",
    )
    expect_clean(result)
    figures = orjson.loads(report.read_bytes())
    assert figures["ap"]["AP"] == -1.0 and figures["retention"] is None
    assert "— (no GT)" in result.out


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("score", "high", "'score' must be a finite number"),
        ("score", None, "'score' must be a finite number"),
    ],
    ids=["string-score", "null-score"],
)
def test_eval_bad_scores(field, value, problem, case, mal):
    gt = _gt()
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "segmentation": a["segmentation"],
            field: value,
        }
        for a in _labels()["annotations"]
    ]
    result = mal("eval", case.write("r.json", results), "--gt", case.write("gt.json", gt))
    expect_error(result, 2, problem)


def test_eval_gt_area_not_a_number(case, mal):
    gt = _gt()
    gt["annotations"][0]["area"] = "big"
    expect_error(
        mal("eval", case.write("l.json", _labels()), "--gt", case.write("gt.json", gt)),
        2,
        "'area' must be a finite number",
    )


# --- merge: wrong results --------------------------------------------------------------------------------------


def _progress(case: Case, name: str, header: dict, lines: list) -> Path:
    body = orjson.dumps({"mal_progress": 1, "records": 3, **header}) + b"\n"
    body += b"".join(orjson.dumps(line) + b"\n" if not isinstance(line, bytes) else line + b"\n" for line in lines)
    return case.write(name, body)


def _result_line(pos: int, h: int = H, w: int = W) -> dict:
    return {
        "image": 0,
        "results": [
            [pos, {"segmentation": {"size": [h, w], "counts": rle_string([h * w])}, "area": 0, "mal_score": 0.5}]
        ],
    }


def test_merge_into_refuses_another_datasets_progress(case, mal):
    other = _gt()
    other["annotations"][0]["bbox"] = [1, 1, 2, 2]  # same count, other boxes
    progress = _progress(case, "p.progress.jsonl", {"records_digest": dataset_records_digest(other)}, [_result_line(0)])
    out = case.tmp / "m.json"
    expect_error(mal("merge", progress, "--into", case.write("gt.json", _gt()), "--out", out), 2, "another dataset")
    assert not out.exists()
    # The same file against its own dataset merges.
    expect_clean(mal("merge", progress, "--into", case.write("other.json", other), "--out", out))


def test_merge_into_without_digest_checks_mask_sizes(case, mal):
    progress = _progress(case, "p.progress.jsonl", {}, [_result_line(1, 48, 64)])
    out = case.tmp / "m.json"
    expect_error(mal("merge", progress, "--into", case.write("gt.json", _gt()), "--out", out), 2, "another dataset")
    assert not out.exists()


@pytest.mark.parametrize(
    "name, lines, problem",
    [
        ("position-too-large", [_result_line(7)], "position 7"),
        ("position-negative", [{"image": 0, "results": [[-1, {}]]}], "not [position"),
        ("result-not-object", [{"image": 0, "results": [[0, 5]]}], "not [position"),
        ("results-missing", [{"image": 0}], "no 'results' list"),
        ("garbage-line", [b"{oops", _result_line(0)], "line 2 is not valid JSON"),
        ("line-is-a-list", [[1, 2]], "no 'results' list"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_merge_damaged_progress_files(name, lines, problem, case, mal):
    progress = _progress(case, "p.progress.jsonl", {}, lines)
    out = case.tmp / "m.json"
    expect_error(mal("merge", progress, "--into", case.write("gt.json", _gt()), "--out", out), 2, problem)
    assert not out.exists()


@pytest.mark.parametrize(
    "header, problem",
    [
        (b"[1, 2]", "is not a mal label progress file"),
        (b'{"hello": 1}', "is not a mal label progress file"),
        (b'{"mal_progress": 1, "records": 5}', "with 5 annotations"),
    ],
    ids=["list", "no-marker", "count"],
)
def test_merge_bad_progress_headers(header, problem, case, mal):
    progress = case.write("p.progress.jsonl", header + b"\n")
    expect_error(
        mal("merge", progress, "--into", case.write("gt.json", _gt()), "--out", case.tmp / "m.json"), 2, problem
    )


def test_merge_missing_progress_file(case, mal):
    result = mal(
        "merge", case.tmp / "nope.progress.jsonl", "--into", case.write("gt.json", _gt()), "--out", case.tmp / "m.json"
    )
    expect_error(result, 2, "no such file")


@pytest.mark.parametrize(
    "doc, problem",
    [
        ("just a string", "not a dataset or results list"),
        ({"annotations": [1, 2]}, "not a dataset or results list"),
        ({"annotations": [], "images": "x"}, "'images' must be a list"),
        (
            {
                "annotations": [],
                "mal_shard": {"index": 3, "count": 2, "records": 1, "positions": [], "fingerprint": "f"},
            },
            "damaged",
        ),
        (
            {
                "annotations": [{}],
                "mal_shard": {"index": 0, "count": 1, "records": 1, "positions": [9], "fingerprint": "f"},
            },
            "damaged",
        ),
        ({"annotations": [], "mal_shard": {"index": 0, "count": 1, "records": 0, "positions": []}}, "damaged"),
    ],
    ids=["string", "ann-not-objects", "images-string", "shard-index", "shard-position", "shard-no-fingerprint"],
)
def test_merge_malformed_parts(doc, problem, case, mal):
    out = case.tmp / "m.json"
    expect_error(mal("merge", case.write("part.json", doc), "--out", out), 2, problem)
    assert not out.exists()


def test_merge_removes_a_killed_runs_temp_files(case, mal):
    out = case.tmp / "m.json"
    stale = case.tmp / f".m.json.mal{DEAD_PID}.k1ll3d.tmp"
    stale.write_text("half a file")
    live = case.tmp / f".m.json.mal{os.getpid()}.busy.tmp"
    live.write_text("another run")
    unrelated = case.tmp / ".m.json.notes.tmp"
    unrelated.write_text("mine")
    expect_clean(mal("merge", case.write("a.json", _labels()), "--out", out))
    assert not stale.exists() and live.exists() and unrelated.exists()
    assert orjson.loads(out.read_bytes())["annotations"] == _labels()["annotations"]


# --- check ------------------------------------------------------------------------------------------------------


def test_check_long_string_under_limits(case):
    doc = _gt()
    doc["info"] = {"note": "x" * 20_000_000}
    result = run_limited(["check", case.write("long.json", doc)], case.tmp)
    assert result.code in (0, 1) and "Traceback" not in result.err


# --- label: progress file, declared sizes, file names, outputs that would destroy inputs --------------------------


def _label_box(case, mal, gt: Path, out: Path, *extra) -> Result:
    return mal(*label_box_args(gt, case.images, out, *extra))


def test_label_progress_symlink_is_not_followed(case, mal):
    out = case.tmp / "out.json"
    (case.tmp / "out.json.progress.jsonl").symlink_to(case.outside / "secret.txt")
    before = _snapshot(case.outside, ())
    result = _label_box(case, mal, case.write("gt.json", _gt()), out)
    assert _snapshot(case.outside, ()) == before
    expect_error(result, 3, "symbolic link")


def test_label_box_declared_100000_square(case, mal):
    doc = _gt()
    doc["images"][0].update(height=100000, width=100000)
    result = _label_box(case, mal, case.write("gt.json", doc), case.tmp / "o.json")
    expect_error(result, 2, "pixel limit")


def test_label_file_name_outside_images_is_refused(case, mal):
    _write_png(case.outside / "x.png")
    doc = _gt()
    doc["images"][0]["file_name"] = "../outside/x.png"
    result = _label_box(case, mal, case.write("gt.json", doc), case.tmp / "o.json")
    expect_error(result, 2, "points outside the images folder")


def test_label_summary_json_naming_the_input_is_refused(case, mal):
    gt = case.write("gt.json", _gt())
    before = _snapshot(case.tmp, ())
    result = _label_box(case, mal, gt, case.tmp / "o.json", "--summary-json", gt)
    expect_error(result, 3, "would destroy the input")
    assert _snapshot(case.tmp, ()) == before


def test_run_lock_tells_a_live_run_from_a_killed_one(case):
    """The helper label uses for its progress file: O_EXCL|O_NOFOLLOW create, then a lock a second run can see."""
    from mal_cli.safe_paths import held_by_live_run, lock_for_run, open_append, open_exclusive

    path = case.tmp / "out.json.progress.jsonl"
    fd = open_exclusive(path)
    lock_for_run(fd)
    with pytest.raises(FileExistsError):
        open_exclusive(path)
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from mal_cli.safe_paths import held_by_live_run; "
            f"sys.exit(0 if held_by_live_run({str(path)!r}) else 1)",
        ]
    )
    assert child.returncode == 0  # another process sees the live run
    os.close(fd)
    assert not held_by_live_run(path)  # the writer is gone: an earlier, unfinished run
    link = case.tmp / "planted.progress.jsonl"
    link.symlink_to(case.outside / "secret.txt")
    with pytest.raises(FileExistsError):
        open_exclusive(link)
    with pytest.raises(OSError):
        open_append(link)
    assert (case.outside / "secret.txt").read_text() == "do not touch\n"


# --- label: what already goes through the shared reader ------------------------------------------------------


def _nest(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("where", ["top-level", "in-an-annotation"])
def test_label_deep_nesting_is_refused_before_any_output(where, case, mal):
    doc = _gt()
    if where == "top-level":
        doc["extra"] = _nest(300)
    else:
        doc["annotations"][1]["extra"] = _nest(300)
    out = case.tmp / "o.json"
    result = _label_box(case, mal, case.write("deep.json", doc, raw=True), out)
    expect_error(result, 2, "nested deeper than 255 levels")
    assert not out.exists() and not (case.tmp / "o.json.progress.jsonl").exists()


def test_label_long_strings_under_limits(case):
    doc = _gt()
    doc["info"] = {"note": "x" * 20_000_000}
    doc["annotations"][0]["note"] = "y" * 5_000_000
    out = case.tmp / "o.json"
    result = run_limited(label_box_args(case.write("long.json", doc), case.images, out), case.tmp)
    expect_clean(result)
    assert orjson.loads(out.read_bytes())["info"]["note"] == "x" * 20_000_000


@pytest.mark.parametrize("folder", ["crops", "full"])
def test_viz_planted_folder_link_is_refused(folder, case, mal):
    out = case.tmp / "review"
    out.mkdir()
    (out / folder).symlink_to(case.outside, target_is_directory=True)
    before = _snapshot(case.outside, ())
    result = mal(
        "viz", case.write("labels.json", _labels()), "--images", case.images, "--out", out, "--full", "--no-progress"
    )
    expect_error(result, 3, "a link out of")
    assert _snapshot(case.outside, ()) == before


def test_export_link_images_applies_the_path_rule_first(case, mal):
    doc = _labels()
    doc["images"][1]["file_name"] = "../outside/secret.txt"
    out = case.tmp / "yolo"
    result = mal("export", "yolo", case.write("l.json", doc), "--out", out, "--link-images", case.images)
    expect_error(result, 2, "points outside the images folder")
    assert not out.exists()


def test_label_loses_to_a_live_run_and_names_a_dead_ones_file(case, mal):
    gt, out = case.write("gt.json", _gt()), case.tmp / "o.json"
    progress = case.tmp / "o.json.progress.jsonl"
    progress.write_bytes(b"")
    # A live run in another process holds the lock (a record lock: this process's own would not conflict).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys; from mal_cli.safe_paths import lock_for_run; "
            f"fd = os.open({str(progress)!r}, os.O_RDWR); lock_for_run(fd); print('locked', flush=True); "
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        for extra in ((), ("--resume",)):
            expect_error(_label_box(case, mal, gt, out, *extra), 2, "another mal label run is writing")
    finally:
        holder.communicate(timeout=30)
    assert progress.read_bytes() == b"" and not out.exists()
    expect_error(_label_box(case, mal, gt, out), 2, "exists from an earlier, unfinished run")


def test_label_progress_header_has_the_digest_merge_checks(case, mal):
    doc = _gt()
    doc["annotations"][1]["bbox"] = [10, 6.5, 12, 10]
    gt, out = case.write("gt.json", doc), case.tmp / "o.json"
    expect_clean(_label_box(case, mal, gt, out, "--keep-progress"))
    header = orjson.loads((case.tmp / "o.json.progress.jsonl").read_bytes().split(b"\n")[0])
    assert header["records_digest"] == dataset_records_digest(doc)
    other = _gt()
    other["annotations"][0]["id"] = 7
    assert header["records_digest"] != dataset_records_digest(other)


def test_label_out_naming_the_input_is_refused(case, mal):
    gt = case.write("gt.json", _gt())
    before = _snapshot(case.tmp, ())
    expect_error(_label_box(case, mal, gt, gt), 3, "would destroy the input")
    assert _snapshot(case.tmp, ()) == before


def test_label_removes_temps_a_killed_run_left_beside_out(case, mal):
    stale = case.tmp / f".o.json.mal{DEAD_PID}.k1ll3d.tmp"
    stale.write_text("half a file")
    expect_clean(_label_box(case, mal, case.write("gt.json", _gt()), case.tmp / "o.json"))
    assert not stale.exists() and (case.tmp / "o.json").exists()


def test_label_allow_outside_images_reads_the_file(case, mal):
    _write_png(case.outside / "x.png")
    doc = _gt()
    doc["images"][0]["file_name"] = "../outside/x.png"
    gt = case.write("gt.json", doc)
    expect_clean(_label_box(case, mal, gt, case.tmp / "o.json", "--allow-outside-images"))
    assert len(orjson.loads((case.tmp / "o.json").read_bytes())["annotations"]) == 3

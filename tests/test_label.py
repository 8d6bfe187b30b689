"""`mal label`: valid COCO output, fallbacks, determinism, kill -9 + --resume, shards, torchrun, mal_score."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import oracles  # slow references (tests/oracles.py)
import orjson
import pytest
import torch
from pycocotools.coco import COCO

from mal_cli import masks
from mal_cli.dataset import Dataset, load_dataset
from mal_cli.errors import InputError
from mal_cli.evaluate import evaluate
from mal_cli.labeling import LabelOptions, default_checkpoint, label, progress_path_for
from mal_cli.score import mask_quality

DATA_DIR = Path(__file__).parent / "data"
MINI16_JSON = DATA_DIR / "annotations_mini16.json"
MINI16_IMAGES = DATA_DIR / "images"

# The random tiny labeler's probabilities sit around 0.5: this threshold gives non-trivial masks.
TINY_THRESHOLD = 0.499
REPO = Path(__file__).resolve().parent.parent


def tiny_options(checkpoint: Path, **kw) -> LabelOptions:
    base = dict(
        method="mal", checkpoint=str(checkpoint), threshold=TINY_THRESHOLD, batch_size=16, workers=0, device="cpu"
    )
    base.update(kw)
    return LabelOptions(**base)


def run_label(boxes, out, options, **kw):
    return label(str(boxes), str(MINI16_IMAGES), str(out), options, progress_bar=False, **kw)


@pytest.fixture(scope="session")
def tiny_single_run(tiny_checkpoint, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("single") / "labels.json"
    run_label(MINI16_JSON, out, tiny_options(tiny_checkpoint))
    return out.read_bytes()


def check_labelled(path: Path, input_doc: dict, expect_nonempty: bool) -> dict:
    """The acceptance checks: pycocotools loads it, ids once each, masks inside boxes, area = mask area."""
    doc = orjson.loads(path.read_bytes())
    coco = COCO()
    coco.dataset = doc
    coco.createIndex()
    coco.loadRes([dict(a, score=1.0) for a in doc["annotations"]])
    assert [a["id"] for a in doc["annotations"]] == [a["id"] for a in input_doc["annotations"]]
    images = {im["id"]: im for im in doc["images"]}
    total = 0
    for ann, original in zip(doc["annotations"], input_doc["annotations"]):
        assert {k: v for k, v in ann.items() if k not in ("segmentation", "area", "mal_score", "mal_fallback")} == {
            k: v for k, v in original.items() if k not in ("segmentation", "area")
        }
        h, w = images[ann["image_id"]]["height"], images[ann["image_id"]]["width"]
        mask = masks.decode(ann["segmentation"], h, w)
        assert ann["area"] == int(mask.sum())
        row0, row1, col0, col1 = oracles.box_to_pixel_bounds(ann["bbox"], h, w)
        inside = np.zeros_like(mask)
        inside[row0:row1, col0:col1] = 1
        assert not (mask & (1 - inside)).any(), f"annotation {ann['id']} leaves its box"
        assert 0.0 <= ann["mal_score"] <= 1.0
        total += int(mask.sum())
    if expect_nonempty:
        assert total > 0
    return doc


def test_box_method_output_is_valid_coco(tmp_path, mini16_raw):
    out = tmp_path / "box.json"
    summary = run_label(MINI16_JSON, out, LabelOptions(method="box", workers=0))
    doc = check_labelled(out, mini16_raw, expect_nonempty=True)
    assert summary.boxes == len(mini16_raw["annotations"]) and summary.images == 16
    for ann in doc["annotations"]:
        h, w = next((im["height"], im["width"]) for im in doc["images"] if im["id"] == ann["image_id"])
        row0, row1, col0, col1 = oracles.box_to_pixel_bounds(ann["bbox"], h, w)
        assert ann["area"] == (row1 - row0) * (col1 - col0)  # the filled box, pycocotools pixel rule
        assert ann["mal_score"] == 0.5
    assert not progress_path_for(out).exists()
    # Every key besides the annotations passes through.
    assert {k: v for k, v in doc.items() if k != "annotations"} == {
        k: v for k, v in mini16_raw.items() if k != "annotations"
    }


def test_model_output_is_valid_and_deterministic(tmp_path, tiny_checkpoint, mini16_raw, tiny_single_run):
    out = tmp_path / "labels.json"
    run_label(MINI16_JSON, out, tiny_options(tiny_checkpoint))
    check_labelled(out, mini16_raw, expect_nonempty=True)
    assert out.read_bytes() == tiny_single_run


def test_polygon_format(tmp_path, mini16_raw):
    out = tmp_path / "poly.json"
    run_label(MINI16_JSON, out, LabelOptions(method="box", workers=0, format="polygon"))
    doc = orjson.loads(out.read_bytes())
    images = {im["id"]: im for im in doc["images"]}
    for ann in doc["annotations"]:
        im = images[ann["image_id"]]
        assert isinstance(ann["segmentation"], list)
        assert ann["area"] == masks.area(ann["segmentation"], im["height"], im["width"])


def test_fallbacks_keep_every_annotation(tmp_path, mini16_raw, tiny_checkpoint):
    doc = mini16_raw
    anns = doc["annotations"]
    anns[0]["bbox"] = [10.0, 10.0, 0.0, 5.0]  # zero width
    anns[1]["bbox"] = [-50.0, -50.0, 10.0, 10.0]  # outside the image
    anns[2]["bbox"] = [10.0, 10.0, -4.0, 5.0]  # negative
    missing_image = anns[-1]["image_id"]
    assert missing_image not in {a["image_id"] for a in anns[:3]}
    next(im for im in doc["images"] if im["id"] == missing_image)["file_name"] = "does_not_exist.jpg"
    boxes = tmp_path / "boxes.json"
    boxes.write_bytes(orjson.dumps(doc))
    for options in (LabelOptions(method="box", workers=0), LabelOptions(method="box", workers=0, format="polygon")):
        out = tmp_path / "out.json"
        run_label(boxes, out, options)
        result = orjson.loads(out.read_bytes())["annotations"]
        assert [a["id"] for a in result] == [a["id"] for a in anns]
        for i in range(3):
            assert (
                result[i]["mal_fallback"] == "degenerate_box"
                and result[i]["area"] == 0
                and result[i]["mal_score"] == 0.0
            )
    # With a model, the image is decoded: its boxes fall back to the filled box, flagged.
    out = tmp_path / "model.json"
    summary = run_label(boxes, out, tiny_options(tiny_checkpoint))
    result = orjson.loads(out.read_bytes())["annotations"]
    flagged = [a for a in result if a["image_id"] == missing_image]
    assert flagged and all(a["mal_fallback"] == "image_error" and a["area"] > 0 for a in flagged)
    assert summary.fallbacks["image_error"] == len(flagged) and summary.image_errors
    assert [a["id"] for a in result] == [a["id"] for a in anns]


def test_results_list_input(tmp_path, mini16_raw):
    detections = [
        {"image_id": a["image_id"], "bbox": a["bbox"], "category_id": a["category_id"], "score": 0.9}
        for a in mini16_raw["annotations"]
    ]
    boxes = tmp_path / "dets.json"
    boxes.write_bytes(orjson.dumps(detections))
    out = tmp_path / "out.json"
    with pytest.raises(InputError, match="--image-info"):
        run_label(boxes, out, LabelOptions(method="box", workers=0))
    run_label(boxes, out, LabelOptions(method="box", workers=0), image_info=str(MINI16_JSON))
    result = orjson.loads(out.read_bytes())
    assert isinstance(result, list) and len(result) == len(detections)
    coco = COCO()
    coco.dataset = mini16_raw
    coco.createIndex()
    coco.loadRes(result)


def test_lvis_key_order_and_stdin(tmp_path, mini16_raw):
    """LVIS files list 'annotations' before 'images' and 'categories' last; the input is streamed, not held, so
    order must not matter: same labels, keys written back in the input's order. BOXES and --image-info from stdin."""
    coco_out = tmp_path / "coco.json"
    run_label(MINI16_JSON, coco_out, LabelOptions(method="box", workers=0))
    lvis_order = {k: mini16_raw[k] for k in ("info", "annotations", "licenses", "images", "categories")}
    lvis_path = tmp_path / "lvis_order.json"
    lvis_path.write_bytes(orjson.dumps(lvis_order, option=orjson.OPT_INDENT_2))
    lvis_out = tmp_path / "lvis.json"
    run_label(lvis_path, lvis_out, LabelOptions(method="box", workers=0))
    coco_doc, lvis_doc = orjson.loads(coco_out.read_bytes()), orjson.loads(lvis_out.read_bytes())
    assert list(lvis_doc) == list(lvis_order)
    assert lvis_doc == coco_doc  # same content, other key order

    stdin_out = tmp_path / "stdin.json"
    with open(lvis_path, "rb") as stdin:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mal_cli",
                "label",
                "-",
                "--images",
                str(MINI16_IMAGES),
                "--out",
                str(stdin_out),
                "--method",
                "box",
                "--no-progress",
            ],
            stdin=stdin,
            check=True,
            cwd=tmp_path,
        )
    assert stdin_out.read_bytes() == lvis_out.read_bytes()

    detections = tmp_path / "dets.json"
    detections.write_bytes(
        orjson.dumps(
            [
                {"image_id": a["image_id"], "bbox": a["bbox"], "category_id": 1, "score": 0.5}
                for a in mini16_raw["annotations"]
            ]
        )
    )
    results_out = tmp_path / "results.json"
    with open(MINI16_JSON, "rb") as stdin:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mal_cli",
                "label",
                str(detections),
                "--image-info",
                "-",
                "--images",
                str(MINI16_IMAGES),
                "--out",
                str(results_out),
                "--method",
                "box",
                "--no-progress",
            ],
            stdin=stdin,
            check=True,
            cwd=tmp_path,
        )
    results = orjson.loads(results_out.read_bytes())
    assert [r["segmentation"] for r in results] == [a["segmentation"] for a in coco_doc["annotations"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # no temp copies of stdin left behind
        ["coco.json", "lvis_order.json", "lvis.json", "stdin.json", "dets.json", "results.json"]
    )


def test_only_missing_keeps_existing_masks(tmp_path, mini16_raw):
    doc = mini16_raw
    for ann in doc["annotations"][::2]:
        ann.pop("segmentation")
    boxes = tmp_path / "boxes.json"
    boxes.write_bytes(orjson.dumps(doc))
    out = tmp_path / "out.json"
    summary = run_label(boxes, out, LabelOptions(method="box", workers=0, only_missing=True))
    result = orjson.loads(out.read_bytes())["annotations"]
    assert summary.boxes == len(doc["annotations"][::2])
    for i, (ann, original) in enumerate(zip(result, doc["annotations"])):
        if i % 2:
            assert ann == original
        else:
            assert ann["mal_score"] == 0.5


def _tiny_label_args(boxes, out, checkpoint, *extra) -> list[str]:
    """`mal label` with the tiny labeler on the CPU, 16 boxes a batch, no progress bar."""
    return [
        "label",
        str(boxes),
        "--images",
        str(MINI16_IMAGES),
        "--out",
        str(out),
        "--checkpoint",
        str(checkpoint),
        "--threshold",
        str(TINY_THRESHOLD),
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def _label_cmd(boxes, out, checkpoint, *extra) -> list[str]:
    return [sys.executable, "-m", "mal_cli", *_tiny_label_args(boxes, out, checkpoint, *extra)]


def _start_until_images_are_done(out: Path, checkpoint, *extra) -> subprocess.Popen:
    """Start a label run; return once the header and at least one image line are on disk, or it ended, or 60 s."""
    progress = progress_path_for(out)
    proc = subprocess.Popen(
        _label_cmd(MINI16_JSON, out, checkpoint, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and progress.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    return proc


@pytest.mark.slow
def test_sigkill_then_resume_is_byte_identical(tmp_path, tiny_checkpoint, tiny_single_run):
    out = tmp_path / "labels.json"
    progress = progress_path_for(out)
    # Kill once the header and at least one image line are on disk (but not all 16).
    proc = _start_until_images_are_done(out, tiny_checkpoint, "--workers", "1", "--batch-size", "16")
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    lines = progress.read_bytes().count(b"\n")
    assert 3 <= lines < 17
    with open(progress, "ab") as handle:  # a torn last line, as a kill mid-write leaves
        handle.write(b'{"image": 99, "resu')
    # Without --resume: refused, nothing lost.
    refused = subprocess.run(_label_cmd(MINI16_JSON, out, tiny_checkpoint), capture_output=True)
    assert refused.returncode == 2 and b"--resume" in refused.stderr
    done = subprocess.run(
        _label_cmd(MINI16_JSON, out, tiny_checkpoint, "--resume", "--workers", "0"), capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()
    assert b"images resumed" in done.stderr
    assert out.read_bytes() == tiny_single_run
    assert not progress.exists()


def test_shards_merge_to_the_single_run(tmp_path, tiny_checkpoint, tiny_single_run):
    from mal_cli.merge import merge_files

    parts = []
    for k in range(3):
        part = tmp_path / f"part{k}.json"
        run_label(MINI16_JSON, part, tiny_options(tiny_checkpoint, batch_size=16), shard=(k, 3))
        parts.append(str(part))
        shard_doc = orjson.loads(part.read_bytes())
        assert len(shard_doc["images"]) == 16 and shard_doc["mal_shard"]["index"] == k
    out = tmp_path / "merged.json"
    merge_files(parts[::-1], str(out))
    assert out.read_bytes() == tiny_single_run


@pytest.mark.slow
def test_torchrun_two_processes_match_single(tmp_path, tiny_checkpoint, tiny_single_run):
    out = tmp_path / "labels.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "mal_cli",
        *_tiny_label_args(MINI16_JSON, out, tiny_checkpoint, "--workers", "0"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert out.read_bytes() == tiny_single_run
    assert not list(tmp_path.glob("*.shard-*"))


def test_stdout_output_and_summary_json(tmp_path):
    summary_path = tmp_path / "summary.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mal_cli",
            "label",
            str(MINI16_JSON),
            "--images",
            str(MINI16_IMAGES),
            "--method",
            "box",
            "--out",
            "-",
            "--summary-json",
            str(summary_path),
        ],
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr.decode()
    doc = orjson.loads(done.stdout)
    assert len(doc["annotations"]) == 141
    assert b"boxes/s" in done.stderr
    summary = orjson.loads(summary_path.read_bytes())
    assert summary["boxes"] == 141 and summary["images"] == 16 and summary["boxes_per_s"] > 0


def test_default_checkpoint_lookup(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("MAL_CHECKPOINT", str(tiny_checkpoint))
    assert default_checkpoint() == tiny_checkpoint
    monkeypatch.setenv("MAL_CHECKPOINT", str(tmp_path / "nope.pth"))
    if not (REPO / "models" / "mal_vits14_coco343.pth").exists():
        with pytest.raises(InputError, match="looked in") as err:
            default_checkpoint()
        assert "nope.pth" in str(err.value) and "models" in str(err.value)


def test_mal_score_ranks_uncertain_masks_low():
    confident = np.where(np.arange(100).reshape(10, 10) < 50, 0.99, 0.01).astype(np.float32)
    assert mask_quality(confident) == pytest.approx(0.99)
    undecided = np.full((10, 10), 0.5, dtype=np.float32)
    assert mask_quality(undecided) < 0.05
    blurry = np.linspace(0.0, 1.0, 100, dtype=np.float32).reshape(10, 10)
    assert mask_quality(blurry) < mask_quality(confident)
    assert mask_quality(np.zeros((5, 5), np.float32)) == 0.0  # empty mask
    assert mask_quality(np.zeros((0, 3), np.float32)) == 0.0
    # Under-confident but decided: still ranked by confidence (stability is 0 for all of them).
    assert mask_quality(np.full((4, 4), 0.56, np.float32)) > mask_quality(np.full((4, 4), 0.52, np.float32)) > 0


def test_spearman_with_iou_is_computable(tmp_path, tiny_checkpoint, mini16_raw):
    from mal_cli.dataset import Dataset, load_dataset
    from mal_cli.score import spearman_with_iou

    out = tmp_path / "labels.json"
    run_label(MINI16_JSON, out, tiny_options(tiny_checkpoint))
    rho, n = spearman_with_iou(load_dataset(out), Dataset.from_dict(mini16_raw))
    assert n == len(mini16_raw["annotations"]) and (np.isnan(rho) or -1.0 <= rho <= 1.0)


def test_help_has_examples():
    for command in ("label", "merge"):
        done = subprocess.run([sys.executable, "-m", "mal_cli", command, "--help"], capture_output=True, text=True)
        assert done.returncode == 0
        assert "Examples" in done.stdout and "--out" in done.stdout


def test_crop_plan_changes_small_and_large_boxes_only_and_is_part_of_resume(
    tmp_path, tiny_checkpoint, mini16_raw, tiny_single_run, monkeypatch
):
    """The default plan (crops 48,64,64 for the 64 px tiny model, large boxes' decoder at x1.5) vs the exact
    model: small and large boxes differ, medium ones do not; a progress file made with another plan (other
    crop sizes, or another version's default decoder scales) is refused instead of mixed into the output."""
    from mal_cli import predictor as predictor_module

    # fp32: bf16 matmuls (AMX CPUs) round a box differently with other batch-mates, which would hide the plan's effect
    out = tmp_path / "full.json"
    run_label(MINI16_JSON, out, tiny_options(tiny_checkpoint, crop_sizes="full", precision="fp32"), keep_progress=True)
    full = orjson.loads(out.read_bytes())["annotations"]
    default_fp32 = tmp_path / "default_fp32.json"
    run_label(MINI16_JSON, default_fp32, tiny_options(tiny_checkpoint, precision="fp32"))
    default = orjson.loads(default_fp32.read_bytes())["annotations"]
    areas = [a["bbox"][2] * a["bbox"][3] for a in mini16_raw["annotations"]]
    route = ["small" if a < 32**2 else "medium" if a < 96**2 else "large" for a in areas]
    assert {"small", "medium", "large"} <= set(route)
    changed = {
        r: [f["segmentation"] != d["segmentation"] for f, d, rr in zip(full, default, route) if rr == r]
        for r in set(route)
    }
    assert any(changed["small"]), "the default plan should re-crop small boxes"
    assert any(changed["large"]), "the default plan should run large boxes' decoder coarser"
    assert not any(changed["medium"]), "medium boxes must be untouched"
    with pytest.raises(InputError, match="other input or options"):
        run_label(MINI16_JSON, out, tiny_options(tiny_checkpoint, crop_sizes=(32, 64, 64)), resume=True)
    default_out = tmp_path / "default.json"
    run_label(MINI16_JSON, default_out, tiny_options(tiny_checkpoint), keep_progress=True)
    monkeypatch.setattr(
        predictor_module, "DEFAULT_DECODER_FRACTIONS", (1.0, 1.0, 1.0)
    )  # a version with another default
    with pytest.raises(InputError, match="other input or options"):
        run_label(MINI16_JSON, default_out, tiny_options(tiny_checkpoint), resume=True)


def test_compile_reaches_the_model_and_is_not_part_of_resume(tmp_path, tiny_checkpoint, tiny_single_run, monkeypatch):
    """--compile changes speed, not the labels' options: it compiles the labeler's blocks, and a progress file
    from a run without it is resumed, not refused (as with --device)."""
    from mal_cli import predictor as predictor_module

    compiled = []
    monkeypatch.setattr(
        predictor_module, "compile_encoder_blocks", compiled.append
    )  # what is compiled, not the compile
    out = tmp_path / "labels.json"
    run_label(MINI16_JSON, out, tiny_options(tiny_checkpoint, compile=True))
    assert len(compiled) == 1 and compiled[0].encoder.patch_size == 16
    assert out.read_bytes() == tiny_single_run  # the stand-in compiled nothing: the same bytes
    run_label(MINI16_JSON, out, tiny_options(tiny_checkpoint), keep_progress=True)
    run_label(MINI16_JSON, out, tiny_options(tiny_checkpoint, compile=True), resume=True)
    assert out.read_bytes() == tiny_single_run


def test_auto_workers(monkeypatch, tiny_checkpoint):
    from mal_cli.labeling.dispatch import auto_workers
    from mal_cli.modeling.labeler import load_labeler
    from mal_cli.predictor import BoxPredictor

    cpu = BoxPredictor(load_labeler(tiny_checkpoint), device="cpu")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    assert auto_workers(cpu) == 0  # the model keeps both cores busy: no processes to take turns with it
    assert auto_workers(None) == 2  # --method box decodes in parallel
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert auto_workers(cpu) == 2
    cpu.device = torch.device("cuda")  # only the device type is read: a GPU feeds from half the cores
    assert auto_workers(cpu) == 7


def test_boxes_changed_during_the_run_is_an_error(tmp_path, mini16_raw):
    """The output streams BOXES a second time: a file edited meanwhile must stop the run, not mix two inputs."""
    from mal_cli.labeling.index import read_boxes

    boxes = tmp_path / "boxes.json"
    boxes.write_bytes(orjson.dumps(mini16_raw))
    inp = read_boxes(str(boxes))
    inp.ensure_unchanged()  # untouched: fine
    mini16_raw["annotations"].pop()
    boxes.write_bytes(orjson.dumps(mini16_raw))
    with pytest.raises(InputError, match="changed during the run"):
        inp.ensure_unchanged()


def test_next_group_goes_to_the_model_before_the_last_results_are_used(
    tmp_path, monkeypatch, tiny_checkpoint, tiny_single_run
):
    # On a GPU `submit_crops` only queues the work: the loop must queue group i before it waits for group
    # i - 1's probabilities and hands out their paste/RLE, or the device idles while this process works.
    from mal_cli.predictor import BoxPredictor

    events: list[tuple[str, int]] = []
    submit = BoxPredictor.submit_crops

    def logged_submit(self, crops, box_areas, batch_size=64):
        group = sum(1 for kind, _ in events if kind == "submit")
        events.append(("submit", group))
        pending = submit(self, crops, box_areas, batch_size)
        result = pending.result

        def logged_result():
            events.append(("result", group))
            return result()

        pending.result = logged_result
        return pending

    monkeypatch.setattr(BoxPredictor, "submit_crops", logged_submit)
    out = tmp_path / "labels.json"
    run_label(MINI16_JSON, out, tiny_options(tiny_checkpoint))
    assert out.read_bytes() == tiny_single_run
    groups = sum(1 for kind, _ in events if kind == "submit")
    assert groups > 3 and sorted(events) == sorted([(k, g) for g in range(groups) for k in ("submit", "result")])
    for g in range(1, groups):
        assert events.index(("submit", g)) < events.index(("result", g - 1)), events


@pytest.mark.parametrize("device, current", [("cuda:1", [torch.device("cuda:1")]), ("cuda", []), ("cpu", [])])
def test_a_numbered_gpu_becomes_the_current_device(monkeypatch, tiny_checkpoint, device, current):
    # A torchrun rank on cuda:1 (or --device cuda:1) must not pin memory or record events against cuda:0.
    from mal_cli.labeling import run as label_run

    class FakePredictor:
        def __init__(self, model, device, **_):
            self.device = torch.device(device)

    calls = []
    monkeypatch.setattr("mal_cli.predictor.BoxPredictor", FakePredictor)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    predictor = label_run.load_predictor(tiny_options(tiny_checkpoint, device=device), tiny_checkpoint)
    assert predictor.device == torch.device(device) and calls == current


@pytest.fixture(scope="module")
def shipped_cpu_labels(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("shipped_cpu") / "labels.json"
    run_label(MINI16_JSON, out, LabelOptions(method="mal", workers=0, device="cpu"))
    return orjson.loads(out.read_bytes())


@pytest.mark.cuda
@pytest.mark.parametrize("compile", [False, True])
def test_a_gpu_labels_like_the_cpu(tmp_path, mini16_raw, shipped_cpu_labels, compile):
    """The shipped model on a GPU, through the loader's pin thread, several groups in flight: valid output whose
    masks are the CPU's up to bf16 rounding at their edges."""
    out = tmp_path / "labels.json"
    summary = run_label(
        MINI16_JSON, out, LabelOptions(method="mal", workers=2, batch_size=16, device="cuda", compile=compile)
    )
    assert summary.device.startswith("cuda")
    check_labelled(out, mini16_raw, expect_nonempty=True)
    report = evaluate(load_dataset(out), Dataset.from_dict(shipped_cpu_labels), compute_ap=False)  # the CPU's as truth
    ious = np.array(list(report.ious.values()))
    assert len(ious) == len(mini16_raw["annotations"])
    assert ious.mean() > 0.97 and np.quantile(ious, 0.05) > 0.85, (ious.mean(), np.sort(ious)[:10])


def _label_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "mal_cli", "label", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def test_a_wrong_images_folder_is_one_line_and_writes_nothing(tmp_path):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for method in ("box", "mal"):
        done = _label_cli(
            MINI16_JSON, "--images", wrong, "--out", tmp_path / "o.json", "--method", method, "--no-progress"
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "none of the 16 images" in done.stderr, done.stderr
        assert "is it the right folder?" in done.stderr and str(wrong / "") in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong"]


def test_missing_images_warn_five_times_then_count(tmp_path, mini16_raw):
    some = tmp_path / "some"
    some.mkdir()
    names = [im["file_name"] for im in mini16_raw["images"]]
    for name in names[:9]:  # 7 of the 16 are missing
        (some / name).symlink_to(MINI16_IMAGES / name)
    done = _label_cli(MINI16_JSON, "--images", some, "--out", tmp_path / "o.json", "--method", "box", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("image error") == 5, done.stderr
    assert "...and 2 more images could not be read" in done.stderr
    doc = orjson.loads((tmp_path / "o.json").read_bytes())
    missing_ids = {im["id"] for im in mini16_raw["images"][9:]}
    flagged = {a["image_id"] for a in doc["annotations"] if a.get("mal_fallback") == "image_error"}
    assert flagged == missing_ids and len(doc["annotations"]) == 141
    strict = _label_cli(
        MINI16_JSON, "--images", some, "--out", tmp_path / "s.json", "--method", "box", "--no-progress", "--strict"
    )
    assert strict.returncode == 2 and "--strict" in strict.stderr and not (tmp_path / "s.json").exists()


def test_replaced_segmentations_are_counted_and_said(tmp_path, mini16_raw):
    doc = mini16_raw
    for ann in doc["annotations"][::3]:
        ann.pop("segmentation")
    had = sum("segmentation" in a for a in doc["annotations"])
    boxes = tmp_path / "boxes.json"
    boxes.write_bytes(orjson.dumps(doc))
    summary_path = tmp_path / "summary.json"
    done = _label_cli(
        boxes,
        "--images",
        MINI16_IMAGES,
        "--out",
        tmp_path / "o.json",
        "--method",
        "box",
        "--no-progress",
        "--summary-json",
        summary_path,
    )
    assert done.returncode == 0, done.stderr
    assert f"mal label: replaced {had} existing segmentations (keep them with --only-missing)" in done.stderr
    assert orjson.loads(summary_path.read_bytes())["replaced"] == had
    kept = run_label(boxes, tmp_path / "k.json", LabelOptions(method="box", workers=0, only_missing=True))
    assert kept.replaced == 0


def test_min_score_leaves_low_detections_out_and_shards_still_merge(tmp_path, mini16_raw):
    from mal_cli.merge import merge_files

    anns = mini16_raw["annotations"]
    detections = [
        {"image_id": a["image_id"], "bbox": a["bbox"], "category_id": a["category_id"], "score": (i % 10) / 10}
        for i, a in enumerate(anns)
    ]
    detections[1].pop("score")  # no score: a box that always stays
    boxes = tmp_path / "dets.json"
    boxes.write_bytes(orjson.dumps(detections))
    options = dict(method="box", workers=0, batch_size=8)
    summary = run_label(boxes, tmp_path / "o.json", LabelOptions(min_score=0.5, **options), image_info=str(MINI16_JSON))
    out = orjson.loads((tmp_path / "o.json").read_bytes())
    kept = [d for d in detections if d.get("score", 1.0) >= 0.5]
    assert [(d["bbox"], d.get("score")) for d in out] == [(d["bbox"], d.get("score")) for d in kept]
    assert all("segmentation" in d for d in out)
    assert summary.below_min_score == len(detections) - len(kept) and summary.boxes == len(kept)
    assert "below --min-score left out" in summary.line()
    parts = []
    for k in range(3):
        parts.append(tmp_path / f"p{k}.json")
        part = run_label(
            boxes, parts[-1], LabelOptions(min_score=0.5, **options), image_info=str(MINI16_JSON), shard=(k, 3)
        )
        assert "shard " in part.line()
    merge_files([str(p) for p in parts], str(tmp_path / "m.json"))
    assert (tmp_path / "m.json").read_bytes() == (tmp_path / "o.json").read_bytes()
    with pytest.raises(InputError, match="--min-score"):
        LabelOptions(min_score=float("nan")).validate()


def test_summary_line_counts_fallback_boxes_and_hides_the_single_shard(tmp_path, mini16_raw):
    mini16_raw["annotations"][0]["bbox"] = [1, 1, 0, 3]
    mini16_raw["annotations"][1]["bbox"] = [1, 1, 0.2, 0.2]
    boxes = tmp_path / "boxes.json"
    boxes.write_bytes(orjson.dumps(mini16_raw))
    done = _label_cli(
        boxes, "--images", MINI16_IMAGES, "--out", tmp_path / "o.json", "--method", "box", "--no-progress"
    )
    assert done.returncode == 0, done.stderr
    line = next(s for s in done.stderr.splitlines() if s.startswith("mal label: 16 images"))
    assert "2 boxes got fallbacks (degenerate_box: 2)" in line and "shard" not in line
    assert re.search(r" \d+\.\d boxes/s \[box on cpu\] ->", line), line
    assert "problem(s)" not in done.stderr


def test_ctrl_c_keeps_the_finished_images_and_says_how_to_resume(tmp_path, tiny_checkpoint, tiny_single_run):
    out = tmp_path / "labels.json"
    progress = progress_path_for(out)
    proc = _start_until_images_are_done(out, tiny_checkpoint, "--workers", "1", "--progress")
    assert proc.poll() is None, "the run finished before Ctrl-C: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "%|" not in err, err  # no traceback; no bar when stderr is not a terminal
    lines = progress.read_bytes().split(b"\n")
    assert lines[-1] == b""  # flushed whole lines only
    finished = len(lines) - 2  # less the header and the final empty piece
    assert err.strip().splitlines()[-1] == (
        f"mal: interrupted; {finished} of 16 images done — rerun the same command with --resume"
    )
    assert not out.exists()
    done = subprocess.run(
        _label_cmd(MINI16_JSON, out, tiny_checkpoint, "--resume", "--workers", "0"), capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()
    assert out.read_bytes() == tiny_single_run

"""`mal bench` runs end to end on the 16-image fixture and reports every field (no timing assertions)."""

from __future__ import annotations

import json

import numpy as np
import oracles  # slow references (tests/oracles.py)
import pytest
import torch
from typer.testing import CliRunner

from mal_cli import geometry
from mal_cli.cli import app

MINI16 = "tests/data/annotations_mini16.json"
IMAGES = "tests/data/images"


def test_bench_box_method_json_fields(tmp_path, tiny_checkpoint):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            MINI16,
            "--images",
            IMAGES,
            "--method",
            "box",
            "--checkpoint",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--workers",
            "0",
            "--batch-size",
            "8",
            "--json",
            str(out),
            "--no-peak",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    for key in ("device", "images", "boxes", "end_to_end", "stages", "bench_peak_rss_mib"):
        assert key in report
    e2e = report["end_to_end"]["box"]
    for key in ("boxes", "boxes_per_s", "boxes_per_s_wall", "seconds_in_run", "seconds_wall", "peak_rss_mib"):
        assert key in e2e
    assert e2e["boxes"] == report["boxes"] > 0
    stages = report["stages"]["box"]
    assert set(stages["ms_per_box"]) == {"decode", "crop", "model", "paste", "rle", "write"}
    assert stages["boxes"] > 0


def test_pipeline_ceiling_labels_every_box_with_the_stand_in_in_a_child(tmp_path, tiny_checkpoint):
    from mal_cli.bench.labelling import pipeline_ceiling
    from mal_cli.predictor import BoxPredictor

    real_predict = BoxPredictor.device_probs
    n_boxes = len(json.loads(open(MINI16).read())["annotations"])
    for workers in (0, 2):
        p = pipeline_ceiling(MINI16, IMAGES, str(tiny_checkpoint), "cpu", 16, workers, tmp_path)
        assert p["boxes"] == n_boxes and p["workers"] == workers
        assert 0 < p["seconds_in_loop"] <= p["seconds_in_run"]
        assert p["main_cpu_ms_per_box"] > 0
        assert p["main_process_ceiling_boxes_per_s"] == pytest.approx(1000 / p["main_cpu_ms_per_box"], rel=1e-3)
        if workers:  # decoding and cropping moved out of the main process
            assert p["workers_cpu_ms_per_box"] > 0
        else:
            assert p["workers_cpu_ms_per_box"] < 0.2 * p["main_cpu_ms_per_box"]
    assert BoxPredictor.device_probs is real_predict  # the stand-in lives in the subprocess only
    assert not (tmp_path / "bench_pipeline.json").exists()


def test_bench_model_and_peak_fields(tiny_checkpoint):
    from mal_cli.bench.model import measure_peak_flops, model_benchmark

    model = model_benchmark(str(tiny_checkpoint), "cpu", 4, np.array([100.0, 5000.0, 20000.0, 50.0]), iterations=1)
    for key in ("boxes_per_s", "tflop_per_s", "gflop_per_box", "gflop_per_box_by_route", "route_counts"):
        assert key in model
    assert model["gflop_per_box"] > 0
    assert sum(model["route_counts"].values()) == 4
    routes = model["gflop_per_box_by_route"]  # named by the trained scales; run as `mal label`'s plan
    assert [routes[r]["decoder_scale"] for r in ("x0.5", "x1", "x2")] == [0.5, 1.0, 1.5]
    assert routes["x2"]["decoder_gflop"] < 0.7 * routes["x2"]["full_crop_decoder_gflop"]  # (3/4)² of the convs' pixels
    assert routes["x1"]["decoder_gflop"] == routes["x1"]["full_crop_decoder_gflop"]
    peak = measure_peak_flops("cpu", size=128, iterations=1)
    assert peak["tflop_per_s"] > 0


def test_compile_reaches_the_mal_run_and_the_model_row_counts_eager_flops(tiny_checkpoint, monkeypatch):
    from mal_cli import bench
    from mal_cli.bench import labelling, model
    from mal_cli.modeling import labeler

    commands = []

    def capture(cmd, what, env=None):
        commands.append(cmd)
        raise RuntimeError("captured")

    monkeypatch.setattr(labelling, "run_child", capture)
    for method in ("box", "mal"):
        with pytest.raises(RuntimeError, match="captured"):
            bench.run_bench(bench.BenchConfig(MINI16, IMAGES, str(tiny_checkpoint), "cpu", method=method, compile=True))
    assert "--compile" not in commands[0] and "--compile" in commands[1]  # --method box has no model to compile

    compiled = []
    monkeypatch.setattr(labeler, "compile_encoder_blocks", compiled.append)
    areas = np.array([100.0, 5000.0, 20000.0, 50.0])
    eager = model.model_benchmark(str(tiny_checkpoint), "cpu", 4, areas, iterations=1)
    timed = model.model_benchmark(str(tiny_checkpoint), "cpu", 4, areas, iterations=1, compile=True)
    assert len(compiled) == 1 and timed["compile"] and not eager["compile"]
    assert timed["gflop_per_box"] == eager["gflop_per_box"]  # counted on the eager model, before the compile


def test_fast_paste_matches_grid_sample():
    """The numpy separable paste that `mal label` uses equals the grid_sample oracle up to float rounding."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(5, 300, 2))
        x0, y0 = rng.uniform(-20, width), rng.uniform(-20, height)
        w, h = rng.uniform(0.3, 200, 2)
        box = (x0, y0, x0 + w, y0 + h)
        region = geometry.crop_region(box, geometry.Margins.uniform())
        window = geometry.box_pixel_bounds(box, (height, width))
        crop = torch.rand(16, 16, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
        slow = oracles.paste_window(crop, region, window).numpy()
        fast = geometry.paste_window_np(crop.numpy(), region, window)
        assert fast.shape == slow.shape and fast.dtype == np.float32
        if slow.size:
            np.testing.assert_allclose(fast, slow, atol=1e-4)


@pytest.mark.slow
def test_bench_train_only_json_fields(tmp_path):
    """`--method none --train`: only the training benchmark, a tiny ViT on CPU; figures consistent with the log."""
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            MINI16,
            "--images",
            IMAGES,
            "--method",
            "none",
            "--train",
            "--device",
            "cpu",
            "--no-peak",
            "--train-crop-size",
            "48",
            "--train-batch-size",
            "4",
            "--train-steps",
            "10",
            "--train-warmup",
            "5",
            "--train-workers",
            "0",
            "--backbone",
            "vit_tiny_patch16_224",
            "--train-split-steps",
            "3",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["end_to_end"] == {} and "model" not in report and "peak" not in report
    train = report["train"]
    assert (train["crop_size"], train["batch_size"], train["steps"], train["workers"]) == (48, 4, 10, 0)
    assert train["backbone"] == "vit_tiny_patch16_224" and train["backbone_weights"] == "random"
    log = {row["step"]: row for row in train["log"]}
    assert sorted(log) == [5, 10]  # logged every 5 steps
    assert (train["steady_from_step"], train["steady_to_step"]) == (5, 10)
    # steady = samples between the two logged steps / the time between them; the logged running rate agrees
    a, b = log[5], log[10]
    assert train["samples_per_s_steady"] == pytest.approx((10 - 5) * 4 / (b["time"] - a["time"]), rel=1e-3)
    samples = b["samples_per_s"] * b["time"] - a["samples_per_s"] * a["time"]
    assert samples == pytest.approx(5 * 4, rel=1e-6)
    assert train["samples_per_s_overall"] == pytest.approx(
        b["samples_per_s"], rel=1e-3, abs=5e-4
    )  # rounded to 3 decimals
    assert train["samples_per_s_steady"] > 0 and train["samples_per_s_overall"] > 0
    assert train["seconds_wall"] >= train["seconds_in_loop"] > 0
    assert train["peak_rss_mib"] > 0
    assert train["gflop_per_sample"] > 0
    assert train["tflop_per_s"] == pytest.approx(
        train["samples_per_s_steady"] * train["gflop_per_sample"] / 1000, rel=1e-2
    )
    # mini16's training boxes (area > 2048) route to x1 and x2 only
    routes = train["gflop_per_sample_by_route"]
    assert routes["x0.5"]["share"] == 0 and routes["x1"]["share"] + routes["x2"]["share"] == pytest.approx(1)
    # the step split: every stage of the step timed, compute rate = batch / their sum, the loader apart
    split = train["split"]
    assert list(split["ms_per_step"]) == ["augment", "forward", "losses", "backward", "optimizer"]
    assert all(v > 0 for v in split["ms_per_step"].values())
    assert (split["steps"], split["workers"]) == (3, 0)
    assert split["compute_samples_per_s"] == pytest.approx(4e3 / sum(split["ms_per_step"].values()), rel=1e-2)
    assert split["loader_samples_per_s"] > 0


def test_training_flops_grow_with_crop_size():
    from mal_cli.bench.training import training_flops_per_sample

    small = training_flops_per_sample(32, "vit_tiny_patch16_224", "cpu")
    large = training_flops_per_sample(64, "vit_tiny_patch16_224", "cpu")
    # 4x the patches (plus one class token) and 4x the decoder's pixels: about 4x the FLOPs
    assert 3.5 < large["gflop_per_sample"] / small["gflop_per_sample"] < 4.5
    for route in small["by_route"].values():
        # backward about twice the forward; the teacher's forward equals the student's
        assert route["student_backward_gflop"] > route["student_forward_gflop"] == route["teacher_forward_gflop"] > 0
    # route weights follow the areas given: only the x2 route here
    only_large = training_flops_per_sample(32, "vit_tiny_patch16_224", "cpu", areas=[20000.0, 30000.0])
    assert only_large["gflop_per_sample"] == pytest.approx(small["by_route"]["x2"]["gflop"], rel=1e-3)


def test_steady_rate_window():
    from mal_cli.bench.training import _steady_rate

    log = [{"step": s, "time": 1.0 + 0.5 * s} for s in (5, 10, 15, 20)]
    steady = _steady_rate(log, batch_size=8, warmup_steps=7)
    assert (steady["steady_from_step"], steady["steady_to_step"]) == (10, 20)
    assert steady["samples_per_s_steady"] == pytest.approx(10 * 8 / 5.0)
    # no logged step after the warm-up but the last one: no steady rate
    assert _steady_rate(log, batch_size=8, warmup_steps=20)["samples_per_s_steady"] is None


def test_train_benchmark_failure_reports_stderr(tmp_path):
    from mal_cli.bench.training import train_benchmark

    with pytest.raises(RuntimeError, match="mal train.*failed.*vit_no_such_model"):
        train_benchmark(
            MINI16,
            IMAGES,
            "cpu",
            crop_size=32,
            batch_size=2,
            steps=2,
            warmup_steps=1,
            workers=0,
            backbone="vit_no_such_model",
            folder=tmp_path,
        )


def test_repeat_copies_the_limited_set_with_new_ids(tmp_path):
    from mal_cli.bench.labelling import subset_dataset as _subset

    raw = json.loads(open(MINI16).read())
    (tmp_path / "once").mkdir()
    (tmp_path / "thrice").mkdir()
    first = _subset(MINI16, 20, tmp_path / "once")
    one = json.loads(open(first[0]).read())
    path, n_images, n_boxes = _subset(MINI16, 20, tmp_path / "thrice", repeat=3)
    sub = json.loads(open(path).read())
    assert (n_images, n_boxes) == (3 * first[1], 3 * first[2]) and first[2] >= 20 and first[2] < len(raw["annotations"])
    assert len({im["id"] for im in sub["images"]}) == n_images and len({a["id"] for a in sub["annotations"]}) == n_boxes
    images = {im["id"]: im for im in sub["images"]}
    file_of = {im["id"]: im["file_name"] for im in one["images"]}
    original = [(file_of[a["image_id"]], a["bbox"]) for a in one["annotations"]]
    # every copy: the same boxes on the same files, in the same order
    assert [(images[a["image_id"]]["file_name"], a["bbox"]) for a in sub["annotations"]] == original * 3
    assert _subset(MINI16, None, tmp_path, repeat=1)[0] == MINI16  # nothing to copy
    result = CliRunner().invoke(app, ["bench", MINI16, "--images", IMAGES, "--repeat", "0"])
    assert result.exit_code == 2 and "repeat" in result.output


@pytest.mark.cuda
def test_bench_on_a_gpu_reports_every_row_and_the_gpu(tmp_path, tiny_checkpoint):
    """The GPU rows' command, small: labelling end to end (both methods), the pipeline, stages, the model
    against the device's matmul peak, and training with the GPU's memory."""
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            MINI16,
            "--images",
            IMAGES,
            "--checkpoint",
            str(tiny_checkpoint),
            "--device",
            "cuda",
            "--batch-size",
            "32",
            "--workers",
            "2",
            "--repeat",
            "2",
            "--json",
            str(out),
            "--train",
            "--train-crop-size",
            "48",
            "--train-batch-size",
            "8",
            "--train-steps",
            "10",
            "--train-warmup",
            "5",
            "--backbone",
            "vit_tiny_patch16_224",
            "--train-split-steps",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    n_boxes = 2 * len(json.loads(open(MINI16).read())["annotations"])
    assert report["device"].startswith("cuda") and report["boxes"] == n_boxes
    for method in ("mal", "box"):
        assert report["end_to_end"][method]["boxes"] == n_boxes and report["end_to_end"][method]["boxes_per_s"] > 0
    assert report["end_to_end"]["mal"]["device"].startswith("cuda")
    assert report["pipeline"]["boxes"] == n_boxes
    assert report["peak"]["tflop_per_s"] > 1  # any CUDA GPU's bf16 matmul does more than a TFLOP/s
    assert 0 < report["model"]["fraction_of_peak"] < 1
    train = report["train"]
    assert train["device"].startswith("cuda") and train["gpu_name"] and train["gpu_peak_allocated_mib"] > 0
    assert train["samples_per_s_steady"] > 0 and 0 < train["fraction_of_peak"] < 1
    assert train["split"]["compute_samples_per_s"] > 0

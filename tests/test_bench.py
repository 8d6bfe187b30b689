"""`mal bench` runs end to end on the 16-image fixture and reports every field (no timing assertions)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mal_cli import geometry
from mal_cli.cli import app

MINI16 = "tests/data/annotations_mini16.json"
IMAGES = "tests/data/images"


def test_bench_box_method_json_fields(tmp_path, tiny_checkpoint):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench", MINI16, "--images", IMAGES, "--method", "box", "--checkpoint", str(tiny_checkpoint),
        "--device", "cpu", "--workers", "0", "--batch-size", "8", "--json", str(out), "--no-peak",
    ])
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


def test_bench_model_and_peak_fields(tiny_checkpoint):
    from mal_cli.bench import measure_peak_flops, model_benchmark

    model = model_benchmark(str(tiny_checkpoint), "cpu", 4, np.array([100.0, 5000.0, 20000.0, 50.0]), iterations=1)
    for key in ("boxes_per_s", "tflop_per_s", "gflop_per_box", "gflop_per_box_by_route", "route_counts"):
        assert key in model
    assert model["gflop_per_box"] > 0
    assert sum(model["route_counts"].values()) == 4
    peak = measure_peak_flops("cpu", size=128, iterations=1)
    assert peak["tflop_per_s"] > 0


def test_fast_paste_matches_grid_sample():
    """The numpy separable paste that `mal label` uses equals `geometry.paste_window` up to float rounding."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(5, 300, 2))
        x0, y0 = rng.uniform(-20, width), rng.uniform(-20, height)
        w, h = rng.uniform(0.3, 200, 2)
        box = (x0, y0, x0 + w, y0 + h)
        region = geometry.crop_region(box, geometry.Margins.uniform())
        window = geometry.box_pixel_bounds(box, (height, width))
        crop = torch.rand(16, 16, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
        slow = geometry.paste_window(crop, region, window).numpy()
        fast = geometry.paste_window_np(crop.numpy(), region, window)
        assert fast.shape == slow.shape and fast.dtype == np.float32
        if slow.size:
            np.testing.assert_allclose(fast, slow, atol=1e-4)

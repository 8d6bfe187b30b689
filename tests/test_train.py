"""mal_cli.train: EMA, the resumable sampler, checkpoint resume, non-finite steps, torchrun DDP, the CLI."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mal_cli import train as train_mod
from mal_cli.cli import app
from mal_cli.modeling import LabelerConfig, MaskLabeler
from mal_cli.modeling.labeler import read_checkpoint
from mal_cli.train import StepSampler, TrainConfig, ema_update, train

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
BACKBONE = "vit_tiny_patch16_224"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # build_labeler skips the hub check: random tiny ViT


def _config(out: Path, **overrides) -> TrainConfig:
    kwargs = dict(
        annotations=str(DATA / "annotations_mini16.json"),
        images=str(DATA / "images"),
        out=str(out),
        backbone=BACKBONE,
        crop_size=32,
        batch_size=2,
        workers=0,
        max_steps=4,
        checkpoint_every=2,
        crf_iterations=5,
        log_every=1,
        device="cpu",
    )
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


# --- EMA ----------------------------------------------------------------------------------------------


def test_ema_update_is_the_exact_convex_combination():
    torch.manual_seed(0)
    config = LabelerConfig(backbone=BACKBONE, crop_size=32, decoder_dim=16)
    teacher, student = MaskLabeler(config), MaskLabeler(config)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = 0.9
    ema_update(teacher, student, m)
    s_state = student.state_dict()
    for key, value in teacher.state_dict().items():
        if not value.is_floating_point():
            continue
        expected = (before[key].double() * m + s_state[key].double() * (1 - m)).float()
        torch.testing.assert_close(value, expected, atol=1e-7, rtol=1e-6, msg=key)
        assert not torch.equal(value, before[key]) or torch.equal(before[key], s_state[key])
    # the student is untouched; m = 1 keeps the teacher, m = 0 copies the student
    torch.testing.assert_close(
        student.state_dict()["decoder.instance_mlp.0.weight"], s_state["decoder.instance_mlp.0.weight"]
    )
    kept = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 1.0)
    assert all(torch.equal(teacher.state_dict()[k], kept[k]) for k in kept)
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(teacher.state_dict()[k], s_state[k]) for k in kept)


# --- sampler -------------------------------------------------------------------------------------------


def _drain(sampler: StepSampler, start: int, total: int) -> list[tuple[int, int]]:
    sampler.start_step, sampler.total_steps = start, total
    items = list(sampler)
    assert len(items) == len(sampler)
    return items


def test_step_sampler_resumes_mid_epoch_with_exactly_the_remaining_items():
    sampler = StepSampler(size=10, batch_size=3, seed=5)
    assert sampler.batches_per_epoch == 3
    full = _drain(sampler, 0, 8)
    assert len(full) == 8 * 3
    for start in range(8):  # 4 is mid-epoch (epoch 1, batch 1)
        assert _drain(StepSampler(10, 3, 5), start, 8) == full[start * 3 :]
    # each epoch is a permutation without repeats, and epochs differ
    for epoch in range(2):
        idx = [i for e, i in full if e == epoch]
        assert len(set(idx)) == len(idx) == 9
    assert [i for e, i in full if e == 0] != [i for e, i in full if e == 1]
    assert {e for e, _ in full} == {0, 1, 2}
    # a different seed gives a different order
    assert _drain(StepSampler(10, 3, 6), 0, 8) != full


def test_step_sampler_splits_ranks_disjointly():
    per_rank = [_drain(StepSampler(size=13, batch_size=2, seed=1, rank=r, world_size=2), 0, 6) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 12  # 3 batches of 2 per epoch and rank
    for epoch in range(2):
        a = [i for e, i in per_rank[0] if e == epoch]
        b = [i for e, i in per_rank[1] if e == epoch]
        assert not set(a) & set(b) and len(set(a)) == len(a)
    resumed = _drain(StepSampler(size=13, batch_size=2, seed=1, rank=1, world_size=2), 4, 6)
    assert resumed == per_rank[1][8:]


def test_auto_train_workers(monkeypatch):
    """2 on a CPU; on a GPU, the process's share of the cores less 2, between 2 and 8."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert train_mod.auto_train_workers(cpu) == 2
    assert train_mod.auto_train_workers(gpu) == 8
    assert train_mod.auto_train_workers(gpu, local_world_size=2) == 6  # 8 cores each
    assert train_mod.auto_train_workers(gpu, local_world_size=8) == 2  # 2 cores each: never below 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert train_mod.auto_train_workers(gpu) == 8


# --- the training loop ----------------------------------------------------------------------------------


def _weights(path: Path, key: str) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[key]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    result = train(_config(straight), progress=False)
    assert result["step"] == 4 and not result["interrupted"]
    assert result["workers"] == _config(straight).workers
    assert sorted(p.name for p in straight.iterdir()) == [
        "checkpoint.pth",
        "config.json",
        "labeler.pth",
        "metrics.jsonl",
    ]
    assert [m["step"] for m in _metrics(straight)] == [1, 2, 3, 4]

    split = tmp_path / "split"
    train(_config(split, max_steps=2), progress=False)
    assert read_checkpoint(split / "checkpoint.pth")["step"] == 2
    train(_config(split, resume=True), progress=False)
    assert read_checkpoint(split / "checkpoint.pth")["step"] == 4

    a, b = _metrics(straight), _metrics(split)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a, b):
        for key in ("loss", "mil", "crf", "grad_norm", "lr", "epoch"):
            assert ma[key] == mb[key], (ma["step"], key, ma[key], mb[key])
    assert all(np.isfinite(m["loss"]) for m in a)
    assert len({m["loss"] for m in a}) > 1  # the steps really differ
    for key in ("student", "teacher"):
        sa, sb = _weights(straight / "checkpoint.pth", key), _weights(split / "checkpoint.pth", key)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (key, k)
    la, lb = read_checkpoint(straight / "labeler.pth")["model"], read_checkpoint(split / "labeler.pth")["model"]
    assert all(torch.equal(la[k], lb[k]) for k in la)
    # the optimizer state came back too: the same Adam moments after the resumed steps
    oa = read_checkpoint(straight / "checkpoint.pth")["optimizer"]["state"]
    ob = read_checkpoint(split / "checkpoint.pth")["optimizer"]["state"]
    assert oa.keys() == ob.keys() and all(torch.equal(oa[i]["exp_avg"], ob[i]["exp_avg"]) for i in oa)


@pytest.mark.slow
def test_compiled_training_follows_the_eager_run_and_keeps_checkpoint_keys(tmp_path):
    from mal_cli.modeling.labeler import load_labeler

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train(_config(eager, max_steps=2), progress=False)
    torch._dynamo.reset()
    train(_config(compiled, max_steps=2, compile=True), progress=False)
    for ma, mb in zip(_metrics(eager), _metrics(compiled), strict=True):
        for key in ("loss", "mil", "crf"):  # the same steps, up to bf16 rounding of fused kernels
            assert mb[key] == pytest.approx(ma[key], rel=2e-2, abs=1e-3), (ma["step"], key)
    for key in ("student", "teacher"):  # compiled in place: no `_orig_mod.` prefixes in what resume and export read
        assert _weights(compiled / "checkpoint.pth", key).keys() == _weights(eager / "checkpoint.pth", key).keys()
    load_labeler(compiled / "labeler.pth")


@pytest.mark.cuda
@pytest.mark.parametrize("compile", [False, True])
def test_a_gpu_trains_like_the_cpu_and_writes_cpu_loadable_checkpoints(tmp_path, compile):
    """The same seeded steps on a GPU (pinned loader, 2 workers): the first step's losses are the CPU's up to bf16
    rounding, and what it writes loads on a machine without a GPU and resumes there."""
    from mal_cli.modeling.labeler import load_labeler

    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    train(_config(cpu, max_steps=2), progress=False)
    result = train(_config(gpu, max_steps=2, device="cuda", workers=2, compile=compile), progress=False)
    assert result["step"] == 2 and result["workers"] == 2
    first_cpu, first_gpu = _metrics(cpu)[0], _metrics(gpu)[0]
    for key in ("loss", "mil", "crf"):
        assert first_gpu[key] == pytest.approx(first_cpu[key], rel=5e-2, abs=1e-3), key
    assert all(np.isfinite(m["loss"]) for m in _metrics(gpu))
    for key in ("student", "teacher"):
        weights = _weights(gpu / "checkpoint.pth", key)
        assert weights.keys() == _weights(cpu / "checkpoint.pth", key).keys()
    load_labeler(gpu / "labeler.pth")
    train(_config(gpu, max_steps=4, resume=True), progress=False)  # the GPU's checkpoint resumes on the CPU
    assert read_checkpoint(gpu / "checkpoint.pth")["step"] == 4


def test_non_finite_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    real = train_mod.compute_losses
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    monkeypatch.setattr(train_mod, "compute_losses", flaky)
    out = tmp_path / "run"
    result = train(_config(out, max_steps=1, checkpoint_every=1), progress=False)
    assert result["skipped_nonfinite"] == 1
    ckpt = read_checkpoint(out / "checkpoint.pth")
    assert ckpt["counters"]["skipped_nonfinite"] == 1
    # the skipped step changed nothing: no optimizer step, no EMA step (the teacher starts as the student)
    assert all(torch.equal(ckpt["student"][k], ckpt["teacher"][k]) for k in ckpt["student"])
    assert ckpt["optimizer"]["state"] == {}
    [line] = _metrics(out)
    assert np.isnan(line["loss"]) and line["skipped_nonfinite"] == 1

    # resume for one more (finite) step: the counter carries over, the step trains, weights stay finite
    result = train(_config(out, max_steps=2, checkpoint_every=1, resume=True), progress=False)
    assert result["skipped_nonfinite"] == 1 and calls["n"] == 2
    ckpt = read_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == 2 and ckpt["counters"]["skipped_nonfinite"] == 1
    assert any(not torch.equal(ckpt["student"][k], ckpt["teacher"][k]) for k in ckpt["student"])
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values())
    assert np.isfinite(_metrics(out)[-1]["loss"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_process_gloo_run_writes_one_checkpoint(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "mal_cli",
        "train",
        str(DATA / "annotations_mini16.json"),
        "--images",
        str(DATA / "images"),
        "--out",
        str(out),
        "--backbone",
        BACKBONE,
        "--crop-size",
        "32",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--crf-iterations",
        "5",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # rank 0 alone wrote: one checkpoint, no stray temp files, one metrics line (not one per rank)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pth", "config.json", "labeler.pth", "metrics.jsonl"]
    assert [m["step"] for m in _metrics(out)] == [2]
    ckpt = read_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values())
    assert (
        re.search(r"training on 77 of \d+ boxes \(\d+ left out: [^)]*\), 2 steps", proc.stderr)
        and "2 process(es)" in proc.stderr
    )


@pytest.mark.slow
def test_short_cpu_training_lowers_the_losses(tmp_path):
    """30 steps on random tiny-ViT weights: the MIL and total losses fall well below their first step."""
    out = tmp_path / "fall"
    train(
        _config(
            out,
            batch_size=8,
            max_steps=30,
            checkpoint_every=1000,
            warmup_steps=1,
            mil_ramp_steps=0,
            crf_ramp_steps=0,
            lr=1e-3,
            backbone_lr_mult=1.0,
        ),
        progress=False,
    )
    m = _metrics(out)
    assert len(m) == 30
    first, last = m[0], m[-10:]
    assert np.mean([x["mil"] for x in last]) < 0.75 * first["mil"]
    assert np.mean([x["loss"] for x in last]) < 0.9 * first["loss"]


def test_train_help():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    for flag in (
        "--images",
        "--out",
        "--backbone-weights",
        "--crop-size",
        "--max-steps",
        "--resume",
        "--crf-iterations",
    ):
        assert flag in result.output
    assert "torchrun" in result.output  # the multi-GPU example


def test_first_log_line_counts_the_boxes_left_out_per_reason(tmp_path, caplog):
    from mal_cli.dataset import load_dataset
    from mal_cli.train import collect_training_boxes

    doc = json.loads((DATA / "annotations_mini16.json").read_text())
    anns = doc["annotations"]
    large = [a for a in anns if a["bbox"][2] * a["bbox"][3] > 2048 and min(a["bbox"][2:]) > 2]
    for ann in large[:3]:
        ann["iscrowd"] = 1
    large[3]["bbox"] = [10.0, 10.0, 1.5, 3000.0]  # area above 2048, one side 2 px or less
    small = sum(a["bbox"][2] * a["bbox"][3] <= 2048 and min(a["bbox"][2:]) > 2 for a in anns)
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(doc))
    kept = len(anns) - small - 4
    assert len(collect_training_boxes(load_dataset(path), DATA / "images", 2048.0, 2.0)) == kept
    with caplog.at_level("INFO", logger="mal_cli.train"):
        train(_config(tmp_path / "run", annotations=str(path), max_steps=1, checkpoint_every=1), progress=False)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training on")]
    assert line.startswith(
        f"training on {kept} of {len(anns)} boxes ({small + 4} left out: {small} below --min-box-area 2048, "
        "3 crowd, 1 with a side of 2 px or less), 1 steps"
    ), line

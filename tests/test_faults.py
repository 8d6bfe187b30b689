"""Faults with real processes: SIGKILL / Ctrl-C during training, a full disk while labelling, NaN on one DDP rank.

(SIGKILL during labelling + --resume is in test_label.py.)
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import _free_port, _metrics  # a port for torchrun; a run folder's metrics.jsonl rows

from mal_cli.modeling.labeler import read_checkpoint

DATA = Path(__file__).parent / "data"
MINI16 = DATA / "annotations_mini16.json"
IMAGES = DATA / "images"
REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TRAIN = [
    "train",
    str(MINI16),
    "--images",
    str(IMAGES),
    "--backbone",
    "vit_tiny_patch16_224",
    "--crop-size",
    "32",
    "--batch-size",
    "2",
    "--workers",
    "0",
    "--crf-iterations",
    "5",
    "--device",
    "cpu",
    "--warmup-steps",
    "2",
]


def _mal(*args) -> list[str]:
    return [sys.executable, "-m", "mal_cli", *map(str, args)]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.005)
    out = proc.stderr.read().decode() if proc.poll() is not None else ""
    raise AssertionError(f"condition not met (exit code {proc.poll()}): {out[-2000:]}")


@pytest.mark.slow
def test_sigkill_during_training_then_resume_matches_uninterrupted(tmp_path):
    steps = ["--max-steps", "14", "--checkpoint-every", "2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # The uninterrupted run, in parallel with the one that gets killed.
    reference = subprocess.Popen(
        _mal(*TRAIN, "--out", straight, *steps), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    proc = subprocess.Popen(
        _mal(*TRAIN, "--out", killed, *steps), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _wait_for(lambda: (killed / "checkpoint.pth").exists(), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "labeler.pth").exists(), "the run finished before it could be killed"
    step_at_kill = read_checkpoint(killed / "checkpoint.pth")["step"]  # whole: the write is atomic
    assert 2 <= step_at_kill < 14
    resumed = subprocess.run(
        _mal(*TRAIN, "--out", killed, *steps, "--resume"),
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {killed / 'checkpoint.pth'} at step {step_at_kill}" in resumed.stderr
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-3000:]

    a, b = read_checkpoint(straight / "checkpoint.pth"), read_checkpoint(killed / "checkpoint.pth")
    assert a["step"] == b["step"] == 14
    for key in ("student", "teacher"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    la, lb = read_checkpoint(straight / "labeler.pth")["model"], read_checkpoint(killed / "labeler.pth")["model"]
    assert all(torch.equal(la[k], lb[k]) for k in la)
    # metrics: the same lines (lines past the checkpoint that the killed run had logged were dropped on resume)
    ma, mb = _metrics(straight), _metrics(killed)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [10, 14]
    for x, y in zip(ma, mb):
        assert {k: x[k] for k in ("loss", "mil", "crf", "grad_norm", "lr")} == {
            k: y[k] for k in ("loss", "mil", "crf", "grad_norm", "lr")
        }


@pytest.mark.slow
def test_ctrl_c_during_training_writes_a_checkpoint_and_exits_130(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _mal(*TRAIN, "--out", run, "--max-steps", "5000", "--checkpoint-every", "5000"),
        env=ENV,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _wait_for(lambda: (run / "metrics.jsonl").exists(), proc)  # first metrics line: step 10
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "continue with --resume" in err
    ckpt = read_checkpoint(run / "checkpoint.pth")
    assert 10 <= ckpt["step"] < 5000
    assert not (run / "labeler.pth").exists()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pth", "config.json", "metrics.jsonl"]


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("limit", [6_000, 45_000])  # full while writing progress / while writing OUT
def test_full_disk_while_labelling_keeps_the_old_output(tmp_path, limit):
    out = tmp_path / "labels.json"
    out.write_bytes(b"previous labels")
    done = subprocess.run(
        _mal("label", MINI16, "--images", IMAGES, "--out", out, "--method", "box", "--no-progress"),
        capture_output=True,
        text=True,
        env=ENV,
        preexec_fn=_limit_file_size(limit),
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("mal: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "File too large" in done.stderr
    assert out.read_bytes() == b"previous labels"  # never half-written
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


NAN_ON_RANK0 = """
import os, sys
import mal_cli.train as t
real = t.compute_losses
calls = {"n": 0}
def flaky(*args, **kwargs):
    out = real(*args, **kwargs)
    calls["n"] += 1
    if calls["n"] == 1 and os.environ["RANK"] == "0":
        out = {**out, "loss": out["loss"] * float("nan")}
    return out
t.compute_losses = flaky
from mal_cli.cli import main
sys.argv = ["mal", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_nan_on_one_ddp_rank_skips_the_step_on_all_ranks(tmp_path):
    script = tmp_path / "nan_rank0.py"
    script.write_text(NAN_ON_RANK0)
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        str(script),
        *TRAIN,
        "--out",
        str(out),
        "--max-steps",
        "3",
        "--checkpoint-every",
        "3",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)  # a hang times out
    assert done.returncode == 0, done.stderr[-4000:]
    ckpt = read_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == 3 and ckpt["counters"]["skipped_nonfinite"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values())
    assert len(ckpt["optimizer"]["state"]) > 0  # the other steps trained

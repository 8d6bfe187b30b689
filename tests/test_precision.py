"""`--precision`: what `auto` picks per machine, that it is what runs, and that it is part of the resume fingerprint."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import torch

from mal_cli import precision
from mal_cli.errors import InputError
from mal_cli.labeling import LabelOptions, label, progress_path_for
from mal_cli.modeling.labeler import load_labeler
from mal_cli.predictor import BoxPredictor

DATA_DIR = Path(__file__).parent / "data"
MINI16_JSON = DATA_DIR / "annotations_mini16.json"
MINI16_IMAGES = DATA_DIR / "images"
# The lines of /proc/cpuinfo that matter, from an AVX-512 Xeon without AMX and from one with it.
NO_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8\n"


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """Set the CPU `auto` sees: cpu('flags text') or cpu(None) for a machine without /proc/cpuinfo."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # no oneDNN cap unless a test sets one
        monkeypatch.delenv(name, raising=False)

    def set_cpu(cpuinfo: str | None):
        path = tmp_path / "cpuinfo"
        path.unlink(missing_ok=True)
        if cpuinfo is not None:
            path.write_text(cpuinfo)
        monkeypatch.setattr(precision, "CPUINFO", path)
        precision.cpu_has_fast_bf16.cache_clear()

    yield set_cpu
    precision.cpu_has_fast_bf16.cache_clear()


def test_auto_is_fp32_on_a_cpu_without_amx_and_bf16_with_it(cpu, monkeypatch):
    monkeypatch.setattr(precision, "_timed_bf16_speedup", lambda: pytest.fail("flags were there: no timing"))
    cpu(NO_AMX)  # avx512_bf16 alone converts, it does not multiply fast: still fp32
    assert precision.resolve("auto", "cpu") == "fp32"
    cpu(AMX)
    assert precision.resolve("auto", "cpu") == "bf16"


@pytest.mark.parametrize(
    "cap, fast",
    [("AVX512_CORE", False), ("avx512_core_bf16", False), ("AVX2", False), ("AVX512_CORE_AMX", True), ("ALL", True)],
)
def test_auto_follows_onednns_isa_cap_on_an_amx_cpu(cpu, monkeypatch, cap, fast):
    """A cap below AMX keeps torch's bf16 matmuls off AMX (emulated, slow), so `auto` must not pick bf16 there."""
    monkeypatch.setattr(precision, "_timed_bf16_speedup", lambda: pytest.fail("flags were there: no timing"))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    cpu(AMX)
    assert precision.resolve("auto", "cpu") == ("bf16" if fast else "fp32")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", cap)  # oneDNN's older name of the same cap
    cpu(AMX)
    assert precision.resolve("auto", "cpu") == ("bf16" if fast else "fp32")


def test_auto_is_bf16_on_cuda_whatever_the_cpu(cpu):
    cpu(NO_AMX)
    assert precision.resolve("auto", torch.device("cuda")) == "bf16"
    assert precision.resolve("auto", "cuda:1") == "bf16"


def test_without_cpuinfo_one_timing_decides_and_is_kept(cpu, monkeypatch):
    calls = []

    def timed(speedup):
        def fake():
            calls.append(speedup)
            return speedup

        return fake

    cpu(None)
    monkeypatch.setattr(precision, "_timed_bf16_speedup", timed(0.6))  # emulated bf16: slower than fp32
    assert precision.resolve("auto", "cpu") == "fp32"
    assert precision.resolve("auto", "cpu") == "fp32"
    assert calls == [0.6]  # timed once per process
    cpu(None)
    monkeypatch.setattr(precision, "_timed_bf16_speedup", timed(2.0))
    assert precision.resolve("auto", "cpu") == "bf16"


def test_the_real_timing_is_cheap_and_positive():
    import time

    start = time.perf_counter()
    speedup = precision._timed_bf16_speedup()
    assert speedup > 0
    assert time.perf_counter() - start < 5  # well under a second alone; generous for a loaded CI machine


def test_explicit_choices_pass_through_and_others_are_refused(cpu):
    cpu(AMX)
    for choice in ("fp32", "bf16", "fp16"):
        assert precision.resolve(choice, "cpu") == choice
    with pytest.raises(InputError, match="--precision"):
        precision.resolve("float8", "cpu")
    with pytest.raises(InputError, match="--precision"):
        LabelOptions(precision="half").validate()


def test_autocast_runs_the_resolved_dtype():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with precision.autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    with precision.autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16


def test_the_predictor_runs_at_the_precision_it_reports(tiny_checkpoint, cpu):
    cpu(NO_AMX)
    model = load_labeler(tiny_checkpoint)
    assert BoxPredictor(model, "cpu").precision == "fp32"
    assert BoxPredictor(model, "cpu", amp=False, precision="bf16").precision == "fp32"  # --no-amp wins, as before
    crops = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    areas = torch.tensor([500.0, 5000.0])
    fp32 = BoxPredictor(model, "cpu", precision="fp32").predict_probs(crops, areas)
    bf16 = BoxPredictor(model, "cpu", precision="bf16").predict_probs(crops, areas)
    assert not torch.equal(fp32, bf16)  # a different precision did run
    torch.testing.assert_close(fp32, bf16, atol=0.05, rtol=0)  # within bf16's rounding


def test_precision_is_in_the_summary_and_the_resume_fingerprint(tmp_path, tiny_checkpoint, cpu):
    """bf16 and fp32 give different bytes (measured on this fixture: see docs/performance.md), so a progress
    file made at one precision cannot be resumed at the other."""
    cpu(NO_AMX)
    options = {
        "method": "mal",
        "checkpoint": str(tiny_checkpoint),
        "threshold": 0.499,
        "batch_size": 16,
        "workers": 0,
        "device": "cpu",
    }
    outs = {}
    for choice in ("fp32", "bf16"):
        out = tmp_path / f"{choice}.json"
        summary = label(
            str(MINI16_JSON),
            str(MINI16_IMAGES),
            str(out),
            LabelOptions(precision=choice, **options),
            progress_bar=False,
            keep_progress=True,
        )
        assert summary.precision == choice and f"on cpu, {choice}]" in summary.line()
        outs[choice] = out
    auto = label(
        str(MINI16_JSON), str(MINI16_IMAGES), str(tmp_path / "auto.json"), LabelOptions(**options), progress_bar=False
    )
    assert auto.precision == "fp32"
    assert (tmp_path / "auto.json").read_bytes() == outs["fp32"].read_bytes()
    header = {c: orjson.loads(progress_path_for(o).read_bytes().splitlines()[0]) for c, o in outs.items()}
    assert header["fp32"]["fingerprint"] != header["bf16"]["fingerprint"]
    with pytest.raises(InputError, match="other input or options"):
        label(
            str(MINI16_JSON),
            str(MINI16_IMAGES),
            str(outs["fp32"]),
            LabelOptions(precision="bf16", **options),
            progress_bar=False,
            resume=True,
        )
    box = label(
        str(MINI16_JSON),
        str(MINI16_IMAGES),
        str(tmp_path / "box.json"),
        LabelOptions(method="box", workers=0),
        progress_bar=False,
    )
    assert box.precision == "" and "[box on cpu]" in box.line()  # no model, no precision; unsharded: no shard


def test_training_precision(cpu):
    cpu(NO_AMX)
    assert precision.training_dtype("auto", True, "cpu") == ("fp32", None)
    assert precision.training_dtype("bf16", True, "cpu") == ("bf16", torch.bfloat16)
    assert precision.training_dtype("bf16", False, "cpu") == ("fp32", None)  # --no-amp
    assert precision.training_dtype("auto", True, "cuda") == ("bf16", torch.bfloat16)
    with pytest.raises(InputError, match="loss scaling"):
        precision.training_dtype("fp16", True, "cpu")


def test_cpu_model_name(cpu):
    cpu("processor\t: 0\nmodel name\t: Example CPU @ 2.00GHz\n" + NO_AMX.split("\n", 1)[1])
    assert precision.cpu_model_name() == "Example CPU @ 2.00GHz"

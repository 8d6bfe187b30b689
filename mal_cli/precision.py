"""Which floating-point precision the model runs at: `--precision auto|fp32|bf16|fp16` of label, train and bench.

`auto` picks what is fastest where it runs. On a CUDA GPU that is bf16 (tensor cores). On a CPU it is bf16
only where the CPU multiplies bf16 matrices fast (Intel AMX); elsewhere bf16 autocast is emulated through
fp32 plus conversions and runs slower than fp32 itself (docs/performance.md has the figures), so `auto` is
fp32. The CPU check reads the `amx_bf16` flag (Linux /proc/cpuinfo); where there is no such file it times
a small bf16 and fp32 matmul once (well under a second) and keeps the answer for the process. oneDNN's
ISA cap `ONEDNN_MAX_CPU_ISA` (or its older name `DNNL_MAX_CPU_ISA`), when set below AMX, keeps torch's
matmuls off AMX whatever the flags say, so `auto` is then fp32 too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mal_cli.errors import InputError

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: the CLI reads CHOICES for `--help` and `--method box` without it.
CHOICES = ("auto", "fp32", "bf16", "fp16")
CPUINFO = Path("/proc/cpuinfo")
# bf16 counts as fast when a timed bf16 matmul beats fp32 by this much (AMX beats it by far; emulated bf16 loses).
TIMED_SPEEDUP = 1.3


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where the file does not exist (macOS, Windows)."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo (`lscpu`'s "Model name"), else `platform.processor()`, else None."""
    try:
        for line in CPUINFO.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or None


def _timed_bf16_speedup(n: int = 256, repeats: int = 3) -> float:
    """fp32 time / bf16 time of an n x n matmul, best of `repeats` (a one-off of a few tens of milliseconds)."""
    import torch

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        a @ b  # first call: kernel selection
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / max(best(torch.bfloat16), 1e-9)


def onednn_isa_allows_amx() -> bool:
    """False where oneDNN is capped below AMX (`ONEDNN_MAX_CPU_ISA=AVX512_CORE` etc.; unset, ALL or DEFAULT: no cap)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if not cap:
        return True
    cap = cap.strip().upper()
    return cap in ("ALL", "DEFAULT") or "AMX" in cap


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether bf16 matmuls are native and fast on this CPU: the amx_bf16 flag (unless oneDNN is capped below
    AMX), else a one-off timing."""
    if not onednn_isa_allows_amx():
        return False
    flags = cpu_flags()
    if flags is not None:
        return "amx_bf16" in flags
    return _timed_bf16_speedup() >= TIMED_SPEEDUP


def check(precision: str) -> None:
    """InputError unless `precision` is one of CHOICES (what every command's --precision takes)."""
    if precision not in CHOICES:
        raise InputError(f"--precision must be one of {', '.join(CHOICES)}, got '{precision}'")


def resolve(precision: str, device: torch.device | str) -> str:
    """`--precision` on `device` -> the precision that runs: 'fp32', 'bf16' or 'fp16' ('auto' resolved)."""
    check(precision)
    if precision != "auto":
        return precision
    import torch

    device_type = torch.device(device).type
    if device_type == "cuda":
        return "bf16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def training_dtype(precision: str, amp: bool, device: torch.device | str) -> tuple[str, torch.dtype | None]:
    """`mal train`'s precision: the resolved name and its autocast dtype. amp=False (`--no-amp`) is fp32.
    fp16 is refused: training at fp16 needs loss scaling, which `mal train` does not do."""
    resolved = resolve(precision if amp else "fp32", device)
    if resolved == "fp16":
        raise InputError("--precision fp16 is for labelling: training at fp16 needs loss scaling; use bf16 or fp32")
    return resolved, autocast_dtype(resolved)


def autocast_dtype(resolved: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: fp32, no autocast)."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[resolved]


def autocast(device: torch.device | str, resolved: str):
    """An autocast context for a resolved precision (a no-op context for fp32)."""
    import torch

    dtype = autocast_dtype(resolved)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)

"""Helpers shared by the benchmarks: child processes, device sync, FLOP counts, memory."""

from __future__ import annotations

import os
import resource
import subprocess
import tempfile
import time
from typing import Optional, Sequence


def run_child(cmd: Sequence[str], what: str, env: Optional[dict] = None):
    """Run a benchmark subprocess (stdout dropped); returns its own rusage and wall seconds, or raises with
    the tail of its stderr.

    wait4: this child's own rusage (peak RSS of that process; its reaped workers are included as a maximum,
    never a sum), not the running maximum over all children that RUSAGE_CHILDREN gives.
    """
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err_file.seek(0)
            raise RuntimeError(f"{what} failed: {err_file.read().decode(errors='replace').strip()[-2000:]}")
    return usage, wall


def child_usage(usage) -> dict:
    """A child's peak RSS (MiB) and CPU seconds, from the rusage `run_child` returns."""
    return {
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1) if usage.ru_maxrss else None,
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
    }


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on a CPU), so a timer measures it."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def total_flops(fn) -> float:
    """FLOPs of `fn()` as torch's FlopCounterMode counts them (matmul, conv, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

"""N seeded steps of the CPU fine-tune `mal train DATASET --images DIR --init CKPT --batch-size 8`, every step logged.

    python benchmarks/train_steps.py run DATASET --images DIR --init CKPT --out RUN [--steps 50] [--precision P]
    python benchmarks/train_steps.py compare RUN_A RUN_B

`run` trains from `--init` for `--steps` steps (crop 224, seed 0, the command's other defaults), writes
RUN/metrics.jsonl with one line per step and prints wall seconds and samples/s. `--precision` is `default`
(what the tree's `mal train` runs without the flag), `fp32` (`--no-amp`) or `bf16`. To time an older version,
run this file with PYTHONPATH set to a checkout of it: only the config fields that version has are passed.

`compare` prints, over the steps both runs logged, the largest and mean relative difference of loss, MIL and
CRF, and each run's samples/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

BATCH_SIZE = 8  # the fine-tune's --batch-size (module docstring)


def run(args: argparse.Namespace) -> None:
    import mal_cli.train as train_module  # this checkout's (or PYTHONPATH's) training loop and its config

    config_cls = train_module.TrainConfig
    fields = {f.name for f in dataclasses.fields(config_cls)}
    wanted = dict(
        annotations=args.dataset,
        images=args.images,
        out=args.out,
        init=args.init,
        batch_size=BATCH_SIZE,
        max_steps=args.steps,
        log_every=1,
        seed=0,
    )
    if args.precision == "fp32":
        wanted["amp"] = False
    elif args.precision == "bf16":
        wanted.update(amp=True, precision="bf16")
    config = config_cls(**{k: v for k, v in wanted.items() if k in fields})
    start, cpu_start = time.perf_counter(), os.times()
    result = train_module.train(config, progress=False)
    wall, cpu_end = time.perf_counter() - start, os.times()
    cpu = sum(getattr(cpu_end, k) - getattr(cpu_start, k) for k in ("user", "system", "children_user"))
    print(
        json.dumps(
            {
                "tree": str(Path(train_module.__file__).parents[1]),
                "precision": args.precision,
                "steps": result["step"],
                "wall_s": round(wall, 1),
                "samples_per_s": round(result["step"] * BATCH_SIZE / wall, 2),
                "cpu_s": round(cpu, 1),
                "last_loss": result.get("loss"),
            }
        )
    )


def compare(args: argparse.Namespace) -> None:
    def steps(run_dir: str) -> dict[int, dict]:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        return {row["step"]: row for row in map(json.loads, lines) if "loss" in row}

    a, b = steps(args.run_a), steps(args.run_b)
    common = sorted(set(a) & set(b))
    if not common:
        raise SystemExit("the two runs logged no step in common")
    report = {"steps": len(common)}
    for key in ("loss", "mil", "crf"):
        rel = [abs(a[s][key] - b[s][key]) / max(abs(b[s][key]), 1e-12) for s in common]
        report[key] = {"max_rel_diff": max(rel), "mean_rel_diff": sum(rel) / len(rel)}
    last = common[-1]
    report["samples_per_s"] = [a[last]["samples_per_s"], b[last]["samples_per_s"]]
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("dataset")
    run_parser.add_argument("--images", required=True)
    run_parser.add_argument("--init", required=True)
    run_parser.add_argument("--out", required=True)
    run_parser.add_argument("--steps", type=int, default=50)
    run_parser.add_argument("--precision", choices=("default", "fp32", "bf16"), default="default")
    compare_parser = sub.add_parser("compare")
    compare_parser.add_argument("run_a")
    compare_parser.add_argument("run_b")
    args = parser.parse_args()
    run(args) if args.command == "run" else compare(args)


if __name__ == "__main__":
    main()

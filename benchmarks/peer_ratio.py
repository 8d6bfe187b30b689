"""`mal label` and MobileSAM side by side on the same images: boxes/s of each and the ratio.

    python benchmarks/peer_ratio.py BOXES.json --images DIR [--limit N] [--threads T] [-- MAL LABEL OPTIONS]

Both run as child processes of this one, one after the other, on the first N images of BOXES (all by
default), with T torch threads each (default: torch's default, as a user gets it). The peer is
`benchmarks/mobilesam_peer.py --time-only` (its recipe: one image embedding per image, all boxes batched).

Printed per tool: boxes/s as the tool reports it (mal: `mal label`'s summary, from its start with the model
load; MobileSAM: its labelling loop, after the model load) and boxes per CPU-second of the whole child
(start-up included for both: steadier than wall time on a shared machine). The ratio is mal / MobileSAM.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent


def subset(boxes: Path, limit: int | None, folder: Path) -> tuple[Path, int]:
    """The first `limit` images of BOXES with their annotations (a file both tools read) and its box count."""
    doc = orjson.loads(boxes.read_bytes())
    if limit is not None:
        doc["images"] = doc["images"][:limit]
        keep = {im["id"] for im in doc["images"]}
        doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in keep]
    path = folder / "boxes.json"
    path.write_bytes(orjson.dumps(doc))
    return path, len(doc["annotations"])


def run_child(cmd: list[str], env: dict) -> tuple[str, float, float]:
    """stdout, wall seconds and CPU seconds (user + system) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc.stdout, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("boxes", type=Path)
    parser.add_argument("--images", required=True)
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each tool (default: torch's)")
    parser.add_argument("--peer-script", type=Path, default=HERE / "mobilesam_peer.py")
    argv = sys.argv[1:]
    mal_options = argv[argv.index("--") + 1 :] if "--" in argv else []  # after --: extra `mal label` options
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="mal-peer-ratio-") as tmp:
        folder = Path(tmp)
        boxes, n_boxes = subset(args.boxes, args.limit, folder)
        summary = folder / "summary.json"
        mal_cmd = [
            sys.executable,
            "-m",
            "mal_cli",
            "label",
            str(boxes),
            "--images",
            args.images,
            "--out",
            str(folder / "mal.json"),
            "--no-progress",
            "--summary-json",
            str(summary),
            *mal_options,
        ]
        _, mal_wall, mal_cpu = run_child(mal_cmd, env)
        mal = orjson.loads(summary.read_bytes())
        peer_cmd = [sys.executable, str(args.peer_script), str(boxes), "--images", args.images, "--time-only"]
        if args.threads:
            peer_cmd += ["--threads", str(args.threads)]
        stdout, peer_wall, peer_cpu = run_child(peer_cmd, env)
        peer = orjson.loads(stdout.strip().splitlines()[-1])
    rows = {
        "mal": {
            "boxes": mal["boxes"],
            "boxes_per_s": mal["boxes_per_s"],
            "precision": mal.get("precision"),
            "boxes_per_cpu_s": round(mal["boxes"] / mal_cpu, 3),
            "wall_s": round(mal_wall, 1),
        },
        "mobilesam": {
            "boxes": peer["boxes"],
            "boxes_per_s": peer["boxes_per_s"],
            "boxes_per_cpu_s": round(peer["boxes"] / peer_cpu, 3),
            "wall_s": round(peer_wall, 1),
        },
    }
    result = {
        "boxes": n_boxes,
        "threads": args.threads,
        **rows,
        "ratio_boxes_per_s": round(rows["mal"]["boxes_per_s"] / rows["mobilesam"]["boxes_per_s"], 2),
        "ratio_boxes_per_cpu_s": round(rows["mal"]["boxes_per_cpu_s"] / rows["mobilesam"]["boxes_per_cpu_s"], 2),
    }
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()

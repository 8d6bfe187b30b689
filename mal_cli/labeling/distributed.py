"""torchrun: rank R labels shard R/W into OUT.shard-R-of-W.json; rank 0 merges them into OUT."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from mal_cli.errors import InputError
from mal_cli.labeling.options import LabelOptions
from mal_cli.labeling.run import LabelSummary, label_shard


def _total(summaries: list[dict], world: int, out: str) -> LabelSummary:
    total = LabelSummary(**summaries[0])
    for other in summaries[1:]:
        total.images += other["images"]
        total.boxes += other["boxes"]
        total.resumed_images += other["resumed_images"]
        total.failed_images += other.get("failed_images", 0)
        total.replaced += other.get("replaced", 0)
        total.below_min_score += other.get("below_min_score", 0)
        for key, v in other["fallbacks"].items():
            total.fallbacks[key] = total.fallbacks.get(key, 0) + v
        total.image_errors += other["image_errors"]
        total.seconds = max(total.seconds, other["seconds"])
    total.boxes_per_s = round(total.boxes / total.seconds, 1) if total.seconds > 0 else 0.0
    total.shard = f"torchrun x{world}"
    total.out = out
    return total


def label_distributed(
    boxes, images_dir, out, options: LabelOptions, image_info, resume, keep_progress, progress_bar
) -> LabelSummary:
    import torch
    import torch.distributed as dist

    from mal_cli.merge import merge_files

    if out == "-":
        raise InputError("under torchrun --out must be a file (the ranks write shard files beside it)")
    if boxes == "-":
        raise InputError("under torchrun BOXES must be a file (every rank reads it)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if options.device in ("auto", "cuda") and torch.cuda.is_available():
        options.device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        # Only barriers and small objects travel: gloo everywhere, with a timeout long enough for a big shard.
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    part = f"{out}.shard-{rank}-of-{world}.json"
    summary = label_shard(
        boxes, images_dir, part, options, image_info, (rank, world), resume, keep_progress, progress_bar and rank == 0
    )
    summaries: list = [None] * world
    dist.all_gather_object(summaries, summary.to_dict())
    if rank == 0:
        parts = [f"{out}.shard-{r}-of-{world}.json" for r in range(world)]
        merge_files(parts, out)
        for p in parts:
            Path(p).unlink(missing_ok=True)
        summary = _total(summaries, world, out)
    dist.barrier()
    dist.destroy_process_group()
    return summary

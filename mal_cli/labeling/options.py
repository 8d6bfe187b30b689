"""`mal label`'s options: what changes the labels (all of it goes into the resume fingerprint) and what only
changes the speed. The defaults here are the command line's."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mal_cli.errors import InputError
from mal_cli.precision import check as check_precision

DEFAULT_CHECKPOINT_NAME = "mal_vits14_coco343.pth"
METHODS = ("mal", "box")
FORMATS = ("rle", "polygon")
# Options that change speed, not results: left out of the resume and shard fingerprints.
# Not in the fingerprint as given; `precision` goes in resolved (`auto` is bf16 on one machine, fp32 on another).
SPEED_OPTIONS = ("device", "workers", "checkpoint", "strict", "compile", "precision", "allow_outside_images")


@dataclass
class LabelOptions:
    """What changes the labels plus how fast they are made."""

    method: str = "mal"  # "mal" (the labeler) or "box" (filled box, the floor baseline)
    checkpoint: Optional[str] = None  # None: `default_checkpoint()`
    teacher: bool = False
    threshold: Optional[float] = None  # None: the checkpoint's
    flip: bool = False
    format: str = "rle"  # "rle" or "polygon"
    only_missing: bool = False
    batch_size: int = 64
    crop_sizes: Any = None  # per box route (small, medium, large) or "full"; None: `predictor.default_crop_sizes`
    # Not in the fingerprint: they change speed, not results.
    device: str = "auto"
    workers: Optional[int] = None  # None: `auto_workers`
    strict: bool = False  # an unreadable image stops the run instead of becoming a flagged fallback
    compile: bool = False  # torch.compile the encoder's blocks (`modeling.labeler.compile_encoder_blocks`)
    precision: str = "auto"  # `mal_cli.precision`
    allow_outside_images: bool = False  # file_names may be absolute or climb out with '..' (`safe_paths`)
    min_score: float = 0.0  # detections scored below it are neither labelled nor written (`results.below_min_score`)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--method must be 'mal' or 'box', got '{self.method}'")
        if self.format not in FORMATS:
            raise InputError(f"--format must be 'rle' or 'polygon', got '{self.format}'")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise InputError(f"--workers must be 0 or more, got {self.workers}")
        check_precision(self.precision)
        if not self.min_score >= 0.0:  # NaN too
            raise InputError(f"--min-score must be 0 or more, got {self.min_score}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise InputError(f"--threshold must be between 0 and 1, got {self.threshold}")


def default_checkpoint() -> Path:
    """The shipped labeler: $MAL_CHECKPOINT, else `mal_vits14_coco343.pth` in <repo>/models or
    <prefix>/share/mal/models."""
    candidates = []
    env = os.environ.get("MAL_CHECKPOINT")
    if env:
        candidates.append(Path(env))
    candidates.append(Path(__file__).resolve().parents[2] / "models" / DEFAULT_CHECKPOINT_NAME)
    candidates.append(Path(sys.prefix) / "share" / "mal" / "models" / DEFAULT_CHECKPOINT_NAME)
    import site  # `pip install --user .` puts data files under the user base

    candidates.append(Path(site.getuserbase()) / "share" / "mal" / "models" / DEFAULT_CHECKPOINT_NAME)
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise InputError(
        f"no labeler checkpoint given and the default one was not found (looked in: {looked}); "
        f"pass --checkpoint PATH, set MAL_CHECKPOINT, or use --method box"
    )


def parse_crop_sizes(text: str) -> tuple[int, ...] | str:
    """'S,M,L' -> (S, M, L) crop sizes, or 'full' (checked against the model in `predictor.make_crop_plan`)."""
    if text.strip().lower() == "full":
        return "full"
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(
            f"--crop-sizes must be 'full' or comma-separated integers like 168,196,224, got '{text}'"
        ) from None
    if any(s < 1 for s in sizes):
        raise InputError(f"--crop-sizes must be positive, got '{text}'")
    return sizes


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 <= K < N."""
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise InputError(f"--shard must look like K/N (e.g. 0/4), got '{text}'") from None
    if n < 1 or not 0 <= k < n:
        raise InputError(f"--shard {text}: need 0 <= K < N")
    return k, n

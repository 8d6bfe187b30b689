"""`mal train`'s options: `TrainConfig`, the one place their defaults live. It is stored in every checkpoint.

torch-free, so that `mal train --help` (whose defaults come from here) does not load torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from mal_cli.pixels import TRAIN_MARGIN_MAX


@dataclass
class TrainConfig:
    """All training options (the CLI's `mal train` flags), stored in every checkpoint."""

    annotations: str = ""
    images: str = ""
    out: str = "runs/mal"
    # model
    backbone: str = "vit_small_patch14_dinov2"
    backbone_weights: Optional[str] = None
    init: Optional[str] = None  # fine-tune an existing labeler checkpoint
    crop_size: int = 224
    # data
    min_box_area: float = 2048.0  # MAL trains on boxes larger than 2048 px^2
    min_box_side: float = 2.0
    margin_max: float = TRAIN_MARGIN_MAX
    # optimisation (AdamW; MAL: betas 0.9/0.9, weight decay 5e-4)
    epochs: int = 10
    max_steps: Optional[int] = None
    batch_size: int = 32
    lr: float = 1e-4
    backbone_lr_mult: float = 0.1  # the pretrained ViT moves slower than the fresh decoder
    weight_decay: float = 5e-4
    beta1: float = 0.9
    beta2: float = 0.9
    warmup_steps: int = 200
    grad_clip: float = 1.0
    # losses
    mil_weight: float = 4.0
    mil_ramp_steps: int = 1000
    crf_weight: float = 0.5
    crf_ramp_steps: int = 4000
    crf_iterations: int = 100
    crf_zeta: float = 0.1
    ema_momentum: float = 0.996
    # student-view augmentation
    color_jitter: float = 0.4
    grayscale_prob: float = 0.2
    blur_prob: float = 0.3
    # running
    device: str = "auto"
    workers: Optional[int] = None  # None: auto_train_workers
    seed: int = 0
    amp: bool = True  # False (--no-amp): fp32 whatever `precision` says
    precision: str = "auto"  # `mal_cli.precision.training_dtype`
    compile: bool = False  # torch.compile the student's and teacher's encoder blocks
    checkpoint_every: int = 500
    log_every: int = 10
    val: Optional[str] = None
    val_images: Optional[str] = None
    val_every: int = 500
    val_limit: int = 500
    resume: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

"""`mal train`: train a MAL labeler from boxes alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mal_cli.commands import command
from mal_cli.train_config import TrainConfig

_TRAIN = TrainConfig()  # the defaults

_Boxes = Annotated[Path, typer.Argument(help="COCO or LVIS dataset JSON; only its boxes are used (masks are ignored).")]
_Images = Annotated[Path, typer.Option("--images", "-i", help="Folder with the dataset's images.")]
_Out = Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoint.pth, labeler.pth, metrics.jsonl.")]
_Backbone = Annotated[str, typer.Option(help="timm ViT name, e.g. vit_base_patch16_224.mae.")]
_BackboneWeights = Annotated[
    Optional[Path], typer.Option(help="ViT weights file in timm layout (else timm pretrained if online, else random).")
]
_Init = Annotated[
    Optional[Path], typer.Option(help="Start from an existing labeler checkpoint (fine-tune, e.g. the shipped one).")
]
_CropSize = Annotated[int, typer.Option(help="Crop side in pixels (a multiple of the patch size; the paper uses 512).")]
_Epochs = Annotated[int, typer.Option(help="Passes over the boxes.")]
_MaxSteps = Annotated[Optional[int], typer.Option(help="Stop after this many steps (overrides --epochs).")]
_BatchSize = Annotated[int, typer.Option(help="Boxes per step and process.")]
_Lr = Annotated[float, typer.Option(help="Peak learning rate of the decoder (AdamW, warm-up then cosine).")]
_BackboneLrMult = Annotated[float, typer.Option(help="Backbone learning rate = lr x this.")]
_WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.")]
_WarmupSteps = Annotated[int, typer.Option(help="Linear learning-rate warm-up steps.")]
_MinBoxArea = Annotated[float, typer.Option(help="Train on boxes with area above this (px^2).")]
_MarginMax = Annotated[
    float, typer.Option(help="Random crop expansion: per-side margins ~ U(0, this) x gate (1.0-1.6x crops).")
]
_ColorJitter = Annotated[float, typer.Option(help="Student view: brightness/contrast/saturation jitter strength.")]
_GrayscaleProb = Annotated[float, typer.Option(help="Student view: probability of grayscale.")]
_BlurProb = Annotated[float, typer.Option(help="Student view: probability of a Gaussian blur.")]
_GradClip = Annotated[float, typer.Option(help="Clip the gradient norm to this.")]
_MilWeight = Annotated[float, typer.Option(help="MIL loss weight.")]
_MilRampSteps = Annotated[int, typer.Option(help="Steps over which the MIL weight ramps in.")]
_CrfWeight = Annotated[float, typer.Option(help="CRF loss weight.")]
_CrfRampSteps = Annotated[int, typer.Option(help="Steps over which the CRF weight ramps in.")]
_CrfIterations = Annotated[int, typer.Option(help="Mean-field iterations of the CRF.")]
_CrfZeta = Annotated[float, typer.Option(help="Colour bandwidth of the CRF affinity (image in [0, 1]).")]
_EmaMomentum = Annotated[float, typer.Option(help="EMA teacher momentum.")]
_Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
_Workers = Annotated[
    Optional[int],
    typer.Option(
        min=0,
        help="Data-loading worker processes [default: 2 on a CPU; on a GPU, the process's share of the cores less 2, "
        "2 to 8].",
    ),
]
_Seed = Annotated[int, typer.Option(help="Seed of every random draw (same seed, same run).")]
_Amp = Annotated[bool, typer.Option("--amp/--no-amp", help="Autocast at --precision; --no-amp: fp32.")]
_Precision = Annotated[
    str,
    typer.Option(
        metavar="auto|fp32|bf16",
        help="auto: bf16 on a GPU or a CPU with fast bf16 (AMX), else fp32. The log says which runs.",
    ),
]
_Compile = Annotated[
    bool,
    typer.Option(
        "--compile", help="torch.compile the encoder's blocks, student and teacher (a one-off compile; meant for GPUs)."
    ),
]
_CheckpointEvery = Annotated[int, typer.Option(help="Write RUN_DIR/checkpoint.pth every N steps.")]
_Val = Annotated[
    Optional[Path], typer.Option(help="A dataset JSON with masks: log mIoU of the teacher every --val-every steps.")
]
_ValImages = Annotated[Optional[Path], typer.Option(help="Images of --val (default: --images).")]
_ValEvery = Annotated[int, typer.Option(help="Validation interval in steps.")]
_ValLimit = Annotated[int, typer.Option(help="Validate on at most this many instances.")]
_Resume = Annotated[bool, typer.Option("--resume", help="Continue from RUN_DIR/checkpoint.pth.")]


@command(
    "train",
    epilog=(
        "Examples:\n\n\b\n"
        "  mal train boxes.json --images imgs/ --out runs/a --backbone-weights models/dinov2_vits14_timm.pth\n"
        "  mal train boxes.json --images imgs/ --out runs/a --resume\n"
        "  torchrun --nproc-per-node 8 -m mal_cli train boxes.json --images imgs/ --out runs/a"
    ),
)
def train_command(
    boxes: _Boxes,
    images: _Images,
    out: _Out,
    backbone: _Backbone = _TRAIN.backbone,
    backbone_weights: _BackboneWeights = None,
    init: _Init = None,
    crop_size: _CropSize = _TRAIN.crop_size,
    epochs: _Epochs = _TRAIN.epochs,
    max_steps: _MaxSteps = _TRAIN.max_steps,
    batch_size: _BatchSize = _TRAIN.batch_size,
    lr: _Lr = _TRAIN.lr,
    backbone_lr_mult: _BackboneLrMult = _TRAIN.backbone_lr_mult,
    weight_decay: _WeightDecay = _TRAIN.weight_decay,
    warmup_steps: _WarmupSteps = _TRAIN.warmup_steps,
    min_box_area: _MinBoxArea = _TRAIN.min_box_area,
    margin_max: _MarginMax = _TRAIN.margin_max,
    color_jitter: _ColorJitter = _TRAIN.color_jitter,
    grayscale_prob: _GrayscaleProb = _TRAIN.grayscale_prob,
    blur_prob: _BlurProb = _TRAIN.blur_prob,
    grad_clip: _GradClip = _TRAIN.grad_clip,
    mil_weight: _MilWeight = _TRAIN.mil_weight,
    mil_ramp_steps: _MilRampSteps = _TRAIN.mil_ramp_steps,
    crf_weight: _CrfWeight = _TRAIN.crf_weight,
    crf_ramp_steps: _CrfRampSteps = _TRAIN.crf_ramp_steps,
    crf_iterations: _CrfIterations = _TRAIN.crf_iterations,
    crf_zeta: _CrfZeta = _TRAIN.crf_zeta,
    ema_momentum: _EmaMomentum = _TRAIN.ema_momentum,
    device: _Device = _TRAIN.device,
    workers: _Workers = _TRAIN.workers,
    seed: _Seed = _TRAIN.seed,
    amp: _Amp = _TRAIN.amp,
    precision: _Precision = _TRAIN.precision,
    compile: _Compile = _TRAIN.compile,
    checkpoint_every: _CheckpointEvery = _TRAIN.checkpoint_every,
    val: _Val = None,
    val_images: _ValImages = None,
    val_every: _ValEvery = _TRAIN.val_every,
    val_limit: _ValLimit = _TRAIN.val_limit,
    resume: _Resume = False,
) -> None:
    """Train a MAL labeler from boxes alone (MIL + CRF losses, EMA teacher)."""
    # Every option is the TrainConfig field of the same name (BOXES is `annotations`); paths go in as strings.
    options = {name: str(v) if isinstance(v, Path) else v for name, v in locals().items() if name != "boxes"}
    import logging

    from mal_cli.train import train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config = TrainConfig(annotations=str(boxes), **options)
    result = train(config)
    if result.get("interrupted"):
        raise typer.Exit(130)

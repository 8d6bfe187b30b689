"""Box-only training of a MAL labeler: MIL + CRF losses, an EMA teacher, one CPU or many GPUs (torchrun).

Determinism and resume: the sample order of an epoch and every random draw of a sample (margins,
flip) derive from (seed, epoch, index), and the batch augmentation from (seed, step). A checkpoint
stores the step, so `--resume` continues with exactly the batches and draws an uninterrupted run
would have used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from mal_cli import geometry, losses
from mal_cli import precision as precisions
from mal_cli.device import resolve_device
from mal_cli.errors import InputError, OutputError
from mal_cli.images import ImageLoadError, load_rgb, require_trainable_images
from mal_cli.modeling.image_encoder import load_backbone_weights
from mal_cli.modeling.labeler import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LabelerConfig,
    MaskLabeler,
    atomic_torch_save,
    compile_encoder_blocks,
    export_labeler,
    read_checkpoint,
)
from mal_cli.train_config import TrainConfig  # noqa: F401  (its home; `mal_cli.train.TrainConfig` still works)
from mal_cli.training_boxes import describe_training_boxes, left_out_reason

log = logging.getLogger(__name__)


# --- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoxRecord:
    image_path: str
    image_hw: tuple[int, int]
    box_xyxy: tuple[float, float, float, float]
    area: float


def collect_training_boxes(
    dataset,
    images_dir: str | Path,
    min_box_area: float,
    min_box_side: float,
    left_out: Optional[Counter] = None,
) -> list[BoxRecord]:
    """The boxes MAL trains on: non-crowd, w and h > min_box_side, area > min_box_area
    (`training_boxes.left_out_reason`). Masks are ignored. `left_out`, when given, counts the other boxes per
    reason (in the same pass, for `describe_training_boxes`)."""
    records: list[BoxRecord] = []
    for image in dataset.images:
        path = str(dataset.image_path(image, images_dir))
        hw = (int(image["height"]), int(image["width"]))
        for ann in dataset.annotations_by_image.get(image["id"], []):
            reason = left_out_reason(ann, min_box_area, min_box_side)
            if reason is not None:
                if left_out is not None:
                    left_out[reason] += 1
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            records.append(BoxRecord(path, hw, (x, y, x + w, y + h), w * h))
    return records


class BoxCropDataset(Dataset):
    """One sample per box: a randomly expanded crop (teacher view, un-augmented) and its box mask."""

    def __init__(self, records: list[BoxRecord], crop_size: int, mask_size: int, margin_max: float, seed: int):
        self.records = records
        self.crop_size = crop_size
        self.mask_size = mask_size
        self.margin_max = margin_max
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    @staticmethod
    @lru_cache(maxsize=512)  # per worker: a small dataset stays decoded, a large one cycles
    def _image(path: str, hw: tuple[int, int]) -> torch.Tensor:
        return torch.from_numpy(np.array(load_rgb(path, expected_hw=hw))).permute(2, 0, 1).contiguous()

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key
        rec = self.records[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        try:
            image = self._image(rec.image_path, rec.image_hw)
            valid = True
        except ImageLoadError as err:
            log.warning("skipping a sample: %s", err)
            image = torch.zeros(3, *rec.image_hw, dtype=torch.uint8)
            valid = False
        region = geometry.crop_region(rec.box_xyxy, geometry.random_margins(rng, self.margin_max))
        crop = geometry.crop_image(image, region, self.crop_size)
        mask = geometry.box_mask(rec.box_xyxy, region, self.mask_size)
        if rng.uniform() < 0.5:  # the same flip for both views
            crop, mask = crop.flip(-1), mask.flip(-1)
        return {
            "crop": crop.round().clamp(0, 255).to(torch.uint8),
            "box_mask": mask,
            "area": torch.tensor(rec.area, dtype=torch.float32),
            "valid": torch.tensor(valid),
        }


class StepSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, box index) for every sample from `start_step` to `total_steps`, split across ranks.

    Each epoch is a permutation drawn from (seed, epoch); starting mid-run (resume) yields exactly the
    samples an uninterrupted run would have used from there on. One sampler for the whole run lets
    the DataLoader keep its workers (and their image caches) alive across epochs.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = max(1, (size // world_size) // batch_size)
        self.start_step, self.total_steps = 0, 0

    def epoch_indices(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch, 7]).permutation(self.size)
        per_rank = self.batches_per_epoch * self.batch_size
        return np.resize(order, per_rank * self.world_size)[self.rank :: self.world_size][:per_rank]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step = self.start_step
        while step < self.total_steps:
            epoch, in_epoch = divmod(step, self.batches_per_epoch)
            indices = self.epoch_indices(epoch)
            for b in range(in_epoch, self.batches_per_epoch):
                if step >= self.total_steps:
                    return
                for i in indices[b * self.batch_size : (b + 1) * self.batch_size]:
                    yield (epoch, int(i))
                step += 1

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.batch_size


def auto_train_workers(device: torch.device, local_world_size: int = 1) -> int:
    """Default --workers of `mal train`: 2 on a CPU; on a GPU, this process's share of the cores less 2, 2 to 8.

    At 504 x 504 a worker makes ~270 samples/s here (2 workers: 440; 224: 690 / 1,060), and on the H100
    machine a sample took 7-8 ms of a core: 2 workers would hold a GPU below the 300 samples/s it can train
    at. On a CPU the model needs the cores.
    """
    if device.type != "cuda":
        return 2
    cores = len(os.sched_getaffinity(0)) // max(1, local_world_size)
    return max(2, min(8, cores - 2))


def loader_workers(config: TrainConfig, device: torch.device) -> int:
    """--workers, or `auto_train_workers` for this process (torchrun's LOCAL_WORLD_SIZE splits the cores)."""
    if config.workers is not None:
        return config.workers
    return auto_train_workers(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def make_loader(data: Dataset, sampler: Sampler, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """The training DataLoader: batches in the sampler's order, pinned for the GPU, 4 batches ahead a worker."""
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        prefetch_factor=4 if workers else None,
    )


# --- augmentation (batched, on the training device) ---------------------------------------------------


def augment_student(crops: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Colour jitter, random grayscale and blur on the student view; crops (B, 3, S, S) in [0, 255]."""
    b = crops.shape[0]
    dev = crops.device

    def uniform(lo: float, hi: float, shape=(b, 1, 1, 1)) -> torch.Tensor:
        return (torch.rand(shape, generator=generator) * (hi - lo) + lo).to(dev)

    x = crops.float() / 255.0
    j = config.color_jitter
    if j > 0:
        x = x * uniform(1 - j, 1 + j)  # brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * uniform(1 - j, 1 + j) + mean  # contrast
        gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        x = (x - gray) * uniform(1 - j, 1 + j) + gray  # saturation
    if config.grayscale_prob > 0:
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
        pick = (torch.rand(b, generator=generator) < config.grayscale_prob).to(dev).view(b, 1, 1, 1)
        x = torch.where(pick, gray, x)
    if config.blur_prob > 0:
        sigma = 1.0
        k = torch.arange(-2, 3, dtype=torch.float32, device=dev)
        k = torch.exp(-k * k / (2 * sigma * sigma))
        k = k / k.sum()
        blurred = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="reflect"), k.view(1, 1, 1, 5).expand(3, 1, 1, 5), groups=3)
        blurred = F.conv2d(
            F.pad(blurred, (0, 0, 2, 2), mode="reflect"), k.view(1, 1, 5, 1).expand(3, 1, 5, 1), groups=3
        )
        pick = (torch.rand(b, generator=generator) < config.blur_prob).to(dev).view(b, 1, 1, 1)
        x = torch.where(pick, blurred, x)
    return x.clamp(0, 1) * 255.0


# --- the training step ----------------------------------------------------------------------------


def ema_teacher(student: MaskLabeler, state: Optional[dict[str, torch.Tensor]] = None) -> MaskLabeler:
    """The frozen EMA teacher beside `student` (same config and device): a copy of it, or `state` on resume."""
    device = next(student.parameters()).device
    teacher = MaskLabeler(student.config).to(device)
    teacher.load_state_dict(state if state is not None else student.state_dict())
    return teacher.requires_grad_(False).eval()


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """theta_t <- m * theta_t + (1 - m) * theta_s, for every parameter and float buffer."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)


def predict_maps(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    student_crops: torch.Tensor,
    amp_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's mask probabilities on the augmented view (with grad) and the teacher's on the plain one."""
    device = student_crops.device
    crops = batch["crop"].to(device, non_blocking=True).float()
    areas = batch["area"]  # stays on the CPU: the decoder routes boxes there without a device sync
    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        logits = student(student_crops, areas)[:, 0].float()
        with torch.no_grad():
            teacher_logits = teacher(crops, areas)[:, 0].float()
    return torch.sigmoid(logits), torch.sigmoid(teacher_logits)


def box_losses(
    prob: torch.Tensor,
    teacher_prob: torch.Tensor,
    batch: dict[str, torch.Tensor],
    student_crops: torch.Tensor,
    step: int,
    config: TrainConfig,
) -> dict[str, torch.Tensor]:
    """MIL + CRF losses from the two maps, with their ramped weights. Returns a dict with 'loss'."""
    device = prob.device
    box = batch["box_mask"].to(device, non_blocking=True)
    valid = batch["valid"].to(device).float()
    mil = losses.mil_loss(prob, box)
    size = prob.shape[-1]
    small_image = F.interpolate(
        student_crops / 255.0, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    pseudo = losses.crf_pseudo_mask(
        prob.detach(),
        teacher_prob,
        box,
        small_image,
        losses.CRFConfig(iterations=config.crf_iterations, zeta=config.crf_zeta),
    )
    crf = losses.crf_loss(prob, pseudo)
    denom = valid.sum().clamp(min=1)
    mil_w = config.mil_weight * losses.ramp(step, config.mil_ramp_steps)
    crf_w = config.crf_weight * losses.ramp(step, config.crf_ramp_steps)
    mil_mean = (mil * valid).sum() / denom
    crf_mean = (crf * valid).sum() / denom
    return {"loss": mil_w * mil_mean + crf_w * crf_mean, "mil": mil_mean, "crf": crf_mean}


def compute_losses(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    student_crops: torch.Tensor,
    step: int,
    config: TrainConfig,
    amp_dtype: Optional[torch.dtype],
) -> dict[str, torch.Tensor]:
    """MIL + CRF losses of one batch, with their ramped weights. Returns a dict with 'loss'."""
    prob, teacher_prob = predict_maps(student, teacher, batch, student_crops, amp_dtype)
    return box_losses(prob, teacher_prob, batch, student_crops, step, config)


def apply_gradients(
    student: torch.nn.Module, teacher: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig
) -> tuple[torch.Tensor, bool]:
    """Clip the gradient norm, step, move the EMA teacher. Nothing is applied (False) if the norm is not finite."""
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
    if not torch.isfinite(grad_norm):
        return grad_norm, False
    optimizer.step()
    ema_update(teacher, student, config.ema_momentum)
    return grad_norm, True


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 0: a factor on the base learning rates."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: MaskLabeler, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay, enc_decay, enc_no_decay = [], [], [], []
    for name, p in model.named_parameters():
        is_encoder = name.startswith("encoder.")
        flat = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token", "mask_token"))
        if is_encoder:
            (enc_no_decay if flat else enc_decay).append(p)
        else:
            (no_decay if flat else decay).append(p)
    enc_lr = config.lr * config.backbone_lr_mult
    groups = [
        {"params": decay, "lr": config.lr, "weight_decay": config.weight_decay, "base_lr": config.lr},
        {"params": no_decay, "lr": config.lr, "weight_decay": 0.0, "base_lr": config.lr},
        {"params": enc_decay, "lr": enc_lr, "weight_decay": config.weight_decay, "base_lr": enc_lr},
        {"params": enc_no_decay, "lr": enc_lr, "weight_decay": 0.0, "base_lr": enc_lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(config.beta1, config.beta2))


# --- distributed --------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1); NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# --- the loop -----------------------------------------------------------------------------------------


def checkpoint_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoint.pth"


class _Interrupt:
    """Ctrl-C / SIGTERM: finish the current step, write a checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Interrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt received: finishing this step and writing a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _all_finite(loss: torch.Tensor, dist_info: DistInfo) -> bool:
    """Whether the loss is finite on every process: under DDP all ranks skip a step together (or none does),
    since a rank that skips backward() while the others run it would hang them in the gradient all-reduce."""
    finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if dist_info.world_size > 1 and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item() > 0)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume: drop the metrics lines logged after the checkpoint's step (a crash may have left some)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _load_training_dataset(path: str):
    """The dataset, checked up front: every error at once; training needs every image's height/width."""
    from mal_cli.check import check_document
    from mal_cli.dataset import Dataset, read_json

    obj = read_json(path)
    report = check_document(obj, str(path))
    report.raise_errors()
    if "image_bad_size" in report.groups:
        group = report.groups["image_bad_size"]
        raise InputError(
            f"{path}: {group.count} image(s) without a positive integer height/width "
            f"({'; '.join(group.examples[:3])}); "
            f"mal train needs the size of every image: add them"
        )
    return Dataset.from_dict(obj, str(path))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick check before asking timm for weights: offline, its retries would take a minute."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def build_labeler(config: TrainConfig) -> MaskLabeler:
    """The student at step 0: from --init, else a fresh decoder on backbone weights (file, timm, or random)."""
    if config.init:
        ckpt = read_checkpoint(config.init)
        model = MaskLabeler(LabelerConfig.from_dict({**ckpt["config"], "crop_size": config.crop_size}))
        state = ckpt.get("model") or ckpt["student"]
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        if state["encoder.vit.pos_embed"].shape != model.encoder.vit.pos_embed.shape:
            from timm.layers import resample_abs_pos_embed

            g = model.encoder.grid_size
            state["encoder.vit.pos_embed"] = resample_abs_pos_embed(
                state["encoder.vit.pos_embed"], new_size=(g, g), num_prefix_tokens=model.encoder.vit.num_prefix_tokens
            )
        model.load_state_dict(state)
        log.info("initialised from labeler %s", config.init)
        return model
    labeler_config = LabelerConfig(backbone=config.backbone, crop_size=config.crop_size)
    if config.backbone_weights:
        model = MaskLabeler(labeler_config)
        load_backbone_weights(model.encoder, config.backbone_weights)
        return model
    try:
        if not _hub_reachable():
            raise ConnectionError("the Hugging Face hub is not reachable (offline)")
        model = MaskLabeler(labeler_config, pretrained=True)
        log.info("backbone weights: timm pretrained '%s'", config.backbone)
        return model
    except Exception as err:  # noqa: BLE001 - offline, no hub: fall back loudly
        log.warning(
            "!!! NO PRETRAINED BACKBONE: could not get timm weights for '%s' (%s). Training from RANDOM weights "
            "gives poor masks; pass --backbone-weights FILE (see models/README.md for the offline DINOv2 ViT-S/14).",
            config.backbone,
            str(err).splitlines()[0][:200],
        )
        return MaskLabeler(labeler_config)


def train(config: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train a labeler from the boxes of `config.annotations`; returns the final metrics.

    Writes RUN_DIR/checkpoint.pth (every `checkpoint_every` steps and at the end), RUN_DIR/labeler.pth
    (inference weights), RUN_DIR/metrics.jsonl and RUN_DIR/config.json. Only rank 0 writes.
    """
    device = resolve_device(config.device)
    dist_info = init_distributed(device)
    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    out_dir = Path(config.out)
    ckpt_file = checkpoint_path(out_dir)
    resume_state = None
    if config.resume and ckpt_file.is_file():
        resume_state = read_checkpoint(ckpt_file)
        log.info("resuming from %s at step %d", ckpt_file, resume_state["step"])
    elif config.resume:
        log.warning("--resume: no checkpoint in %s, starting from scratch", out_dir)
    # The input first (every problem at once), then the run folder: both before any work.
    if not Path(config.images).is_dir():
        raise InputError(f"--images {config.images}: no such folder")
    dataset_doc = _load_training_dataset(config.annotations)
    if dist_info.is_main:
        probe = out_dir / ".write-test"
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise OutputError(
                f"--out {out_dir}: cannot write to the run folder ({err.strerror or err}); choose a writable location"
            ) from None
        if resume_state is not None:
            _truncate_metrics(out_dir / "metrics.jsonl", int(resume_state["step"]))

    torch.manual_seed(config.seed)
    left_out: Counter = Counter()
    records = collect_training_boxes(dataset_doc, config.images, config.min_box_area, config.min_box_side, left_out)
    if not records:
        raise InputError(
            f"no trainable boxes in {config.annotations} (non-crowd, w/h > {config.min_box_side}, "
            f"area > {config.min_box_area}): lower --min-box-area?"
        )
    require_trainable_images([(r.image_path, r.image_hw) for r in records], config.images)

    student = (
        build_labeler(config)
        if resume_state is None
        else MaskLabeler(LabelerConfig.from_dict(resume_state["config"]["labeler"]))
    )
    if resume_state is not None:
        student.load_state_dict(resume_state["student"])
    student.to(device)
    teacher = ema_teacher(student, resume_state["teacher"] if resume_state is not None else None)
    if config.compile:
        for labeler in (student, teacher):
            compile_encoder_blocks(labeler)

    data = BoxCropDataset(records, config.crop_size, student.mask_size, config.margin_max, config.seed)
    sampler = StepSampler(len(data), config.batch_size, config.seed, dist_info.rank, dist_info.world_size)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = config.max_steps or steps_per_epoch * config.epochs

    optimizer = build_optimizer(student, config)
    step = 0
    counters = {"skipped_nonfinite": 0}
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        step = int(resume_state["step"])
        counters.update(resume_state.get("counters", {}))

    model = student
    if dist_info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    run_precision, amp_dtype = precisions.training_dtype(config.precision, config.amp, device)
    workers = loader_workers(config, device)

    metrics_file = out_dir / "metrics.jsonl"
    if dist_info.is_main:
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        log.info(
            "training on %s, %d steps (%d per epoch), batch %d x %d process(es), device %s, %s, %d loader workers",
            describe_training_boxes(len(records), left_out),
            total_steps,
            steps_per_epoch,
            config.batch_size,
            dist_info.world_size,
            device,
            run_precision,
            workers,
        )

    def save(step_now: int, last_metrics: dict) -> None:
        if not dist_info.is_main:
            return
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "config": {"labeler": student.config.to_dict(), "train": config.to_dict()},
                "student": student.state_dict(),
                "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step_now,
                "counters": dict(counters),
                "metrics": last_metrics,
            },
            ckpt_file,
        )

    bar = None
    if dist_info.is_main and progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    last: dict[str, Any] = {}
    if config.val and dist_info.is_main and step == 0:
        # The untrained network's score: the baseline the curve should rise from.
        val = validate(teacher, config, device)
        with metrics_file.open("a") as f:
            f.write(json.dumps({"step": 0, **{f"val_{k}": v for k, v in val.items()}}) + "\n")
        log.info("step 0: val mIoU %.1f (untrained) over %d instances", val["miou"], val["count"])
    t_start = time.time()
    samples_seen = 0
    with _Interrupt() as interrupt:
        sampler.start_step, sampler.total_steps = step, total_steps
        loader = make_loader(data, sampler, config.batch_size, workers, device)
        for batch in loader:
            if step >= total_steps or interrupt.requested:
                break
            epoch = step // steps_per_epoch
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            crops = batch["crop"].to(device, non_blocking=True)
            student_crops = augment_student(crops, config, generator)
            out = compute_losses(model, teacher, batch, student_crops, step, config, amp_dtype)
            loss = out["loss"]
            factor = lr_at(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            optimizer.zero_grad(set_to_none=True)
            if _all_finite(loss, dist_info):
                loss.backward()
                grad_norm, applied = apply_gradients(student, teacher, optimizer, config)
                if not applied:
                    counters["skipped_nonfinite"] += 1
            else:
                counters["skipped_nonfinite"] += 1
                grad_norm = torch.tensor(float("nan"))
            step += 1
            samples_seen += crops.shape[0] * dist_info.world_size
            if dist_info.is_main and (step % config.log_every == 0 or step == total_steps):
                elapsed = time.time() - t_start
                last = {
                    "step": step,
                    "epoch": epoch,
                    "loss": float(loss.detach()),
                    "mil": float(out["mil"].detach()),
                    "crf": float(out["crf"].detach()),
                    "grad_norm": float(grad_norm),
                    "lr": optimizer.param_groups[0]["lr"],
                    "samples_per_s": samples_seen / max(elapsed, 1e-9),
                    "skipped_nonfinite": counters["skipped_nonfinite"],
                    "time": elapsed,
                }
                with metrics_file.open("a") as f:
                    f.write(json.dumps(last) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{float(loss.detach()):.3g}",  # 3 significant figures: tiny during the ramps
                    mil=f"{float(out['mil'].detach()):.3g}",
                    crf=f"{float(out['crf'].detach()):.3g}",
                    sps=f"{samples_seen / max(time.time() - t_start, 1e-9):.1f}",
                )
            if config.val and dist_info.is_main and (step % config.val_every == 0 or step == total_steps):
                val = validate(teacher, config, device)
                last = {**last, **{f"val_{k}": v for k, v in val.items()}, "step": step}
                with metrics_file.open("a") as f:
                    f.write(json.dumps({"step": step, **{f"val_{k}": v for k, v in val.items()}}) + "\n")
                log.info("step %d: val mIoU %.1f (teacher) over %d instances", step, val["miou"], val["count"])
            if step % config.checkpoint_every == 0 or step == total_steps:
                save(step, last)
        if interrupt.requested:
            save(step, last)
    if bar is not None:
        bar.close()
    if dist_info.is_main:
        if interrupt.requested:
            log.warning("stopped at step %d; checkpoint written to %s; continue with --resume", step, ckpt_file)
        else:
            export_labeler(teacher, out_dir / "labeler.pth", meta={"step": step, "train": config.to_dict()})
            log.info("done: %d steps; labeler written to %s", step, out_dir / "labeler.pth")
    if dist_info.world_size > 1 and dist.is_initialized():
        dist.barrier()
    return {**last, "step": step, "interrupted": interrupt.requested, "workers": workers, **counters}


def validate(model: MaskLabeler, config: TrainConfig, device: torch.device) -> dict[str, float]:
    """mIoU of `model` on the first `val_limit` non-crowd instances of --val, through the labelling path."""
    from mal_cli import masks
    from mal_cli.predictor import BoxPredictor, window_to_full

    val = _val_cache(config.val)
    images_dir = config.val_images or config.images
    was_training = model.training
    predictor = BoxPredictor(model, device=device, amp=config.amp, precision=config.precision)
    ious: list[float] = []
    for image in val.images:
        anns = [a for a in val.annotations_by_image.get(image["id"], []) if not a.get("iscrowd", 0)]
        if not anns:
            continue
        hw = (int(image["height"]), int(image["width"]))
        try:
            rgb = load_rgb(val.image_path(image, images_dir), expected_hw=hw)
        except ImageLoadError:
            continue
        preds = predictor.predict_image(rgb, [a["bbox"] for a in anns])
        for ann, pred in zip(anns, preds):
            gt = masks.decode(ann["segmentation"], hw[0], hw[1]).astype(bool)
            pm = window_to_full(pred, hw).astype(bool)
            union = np.logical_or(gt, pm).sum()
            ious.append(float(np.logical_and(gt, pm).sum() / union) if union else 1.0)
        if len(ious) >= config.val_limit:
            break
    model.train(was_training)
    return {"miou": 100.0 * float(np.mean(ious)) if ious else 0.0, "count": len(ious)}


@lru_cache(maxsize=2)
def _val_cache(path: str):
    from mal_cli.dataset import load_dataset

    return load_dataset(path)

"""`mal bench`: how fast `mal label` and `mal train` are (options: `bench.BenchConfig`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mal_cli.bench import BENCH_METHODS, BenchConfig
from mal_cli.commands import command
from mal_cli.commands._options import Device, Images
from mal_cli.precision import CHOICES as PRECISIONS

_BENCH = BenchConfig


_Dataset = Annotated[str, typer.Argument(metavar="DATASET", help="COCO/LVIS dataset JSON whose boxes are labelled.")]
_Checkpoint = Annotated[
    Optional[Path], typer.Option("--checkpoint", "-c", help="Labeler checkpoint [default: the shipped one].")
]
_BatchSize = Annotated[int, typer.Option(help="Boxes per model batch.")]
_Workers = Annotated[Optional[int], typer.Option(help="As `mal label --workers`.")]
_CropSizes = Annotated[
    Optional[str], typer.Option("--crop-sizes", metavar="S,M,L|full", help="As `mal label --crop-sizes`.")
]
_Compile = Annotated[bool, typer.Option("--compile", help="torch.compile for the end-to-end, model and training rows.")]
_Precision = Annotated[
    str,
    typer.Option(metavar="|".join(PRECISIONS), help="As `mal label --precision`, for every row that runs the model."),
]
_Limit = Annotated[Optional[int], typer.Option(help="Use the first whole images holding at least N boxes.")]
_Repeat = Annotated[int, typer.Option(min=1, help="Label the (limited) dataset N times over, new ids each time.")]
_Method = Annotated[
    str, typer.Option(metavar="|".join(BENCH_METHODS), help="Labelling runs (box: no model; none: no labelling).")
]
_Stages = Annotated[bool, typer.Option("--stages/--no-stages", help="Time the pipeline's stages apart (serial pass).")]
_Model = Annotated[bool, typer.Option("--model/--no-model", help="Time the model alone and count its FLOPs.")]
_Peak = Annotated[bool, typer.Option("--peak/--no-peak", help="Measure a bf16 matmul peak to compare with.")]
_Pipeline = Annotated[
    bool,
    typer.Option("--pipeline/--no-pipeline", help="Run `mal label` with a zero-cost model: the pipeline's ceiling."),
]
_Train = Annotated[
    bool, typer.Option("--train/--no-train", help="Also measure `mal train`'s loop: samples/s and TFLOP/s.")
]
_TrainCropSize = Annotated[int, typer.Option(help="Training crop side (a multiple of the patch size).")]
_TrainBatchSize = Annotated[int, typer.Option(help="Training boxes per step.")]
_TrainSteps = Annotated[int, typer.Option(help="Training steps to run.")]
_TrainWarmup = Annotated[int, typer.Option(help="Training steps left out of the steady rate.")]
_TrainWorkers = Annotated[Optional[int], typer.Option(help="Training data-loading workers [default: mal train's].")]
_TrainSplitSteps = Annotated[int, typer.Option(min=0, help="Steps of the training step split (0: skip).")]
_BackboneWeights = Annotated[
    Optional[Path], typer.Option(help="ViT weights file for the training run [default: random, same cost].")
]
_Backbone = Annotated[Optional[str], typer.Option(help="timm ViT name for the training run [default: mal train's].")]
_JsonOut = Annotated[Optional[str], typer.Option("--json", help="Write all figures as JSON here.")]


@command(
    "bench",
    epilog=(
        "Examples:\n\n\b\n"
        "  mal bench coco/annotations.json --images coco/images --limit 500 --json bench.json\n"
        "  mal bench boxes.json --images imgs/ --device cuda --batch-size 256 --workers 8 --repeat 15\n"
        "  mal bench boxes.json --images imgs/ --device cuda --method none --train --train-crop-size 504"
    ),
)
def bench_command(
    dataset: _Dataset,
    images: Images,
    checkpoint: _Checkpoint = None,
    device: Device = _BENCH.device,
    batch_size: _BatchSize = _BENCH.batch_size,
    workers: _Workers = _BENCH.workers,
    crop_sizes: _CropSizes = _BENCH.crop_sizes,
    compile: _Compile = _BENCH.compile,
    precision: _Precision = _BENCH.precision,
    limit: _Limit = _BENCH.limit,
    repeat: _Repeat = _BENCH.repeat,
    method: _Method = _BENCH.method,
    stages: _Stages = _BENCH.stages,
    model: _Model = _BENCH.model,
    peak: _Peak = _BENCH.peak,
    pipeline: _Pipeline = _BENCH.pipeline,
    train: _Train = _BENCH.train,
    train_crop_size: _TrainCropSize = _BENCH.train_crop_size,
    train_batch_size: _TrainBatchSize = _BENCH.train_batch_size,
    train_steps: _TrainSteps = _BENCH.train_steps,
    train_warmup: _TrainWarmup = _BENCH.train_warmup,
    train_workers: _TrainWorkers = _BENCH.train_workers,
    train_split_steps: _TrainSplitSteps = _BENCH.train_split_steps,
    backbone_weights: _BackboneWeights = None,
    backbone: _Backbone = _BENCH.backbone,
    json_out: _JsonOut = None,
) -> None:
    """Benchmark `mal label` (and with --train, `mal train`): throughput, memory, FLOP/s vs the device peak."""
    # Every option but --json is the BenchConfig field of the same name; paths go in as strings.
    options = {name: str(v) if isinstance(v, Path) else v for name, v in locals().items() if name != "json_out"}
    from rich.console import Console

    from mal_cli.bench import run_bench
    from mal_cli.bench.report import bench_table

    config = BenchConfig(**options)
    result = run_bench(config)
    Console(stderr=True).print(bench_table(result))
    if json_out:
        import orjson

        Path(json_out).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))

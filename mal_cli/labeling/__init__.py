"""`mal label`: turn every box of a dataset (or detector results) into a mask. Streaming, batched, resumable, sharded.

A box's path (docs/architecture.md): `index` reads and checks BOXES into compact columns; `plan` packs the
images into groups; `loader` decodes each image once, decides each box's pixel window and crops the model
boxes (DataLoader workers); the predictor runs the model; `postprocess` pastes, thresholds, scores and
RLE-encodes each box (numpy only, a process pool); `progress` appends each finished image to
OUT.progress.jsonl; `output` streams the input again into OUT with the results. `run` ties them together.

Nothing here imports torch at import time: `--method box` never does.
"""

from mal_cli.labeling.options import LabelOptions, default_checkpoint, parse_crop_sizes, parse_shard
from mal_cli.labeling.progress import progress_path_for
from mal_cli.labeling.run import LabelSummary, label, label_shard

__all__ = [
    "LabelOptions",
    "LabelSummary",
    "default_checkpoint",
    "label",
    "label_shard",
    "parse_crop_sizes",
    "parse_shard",
    "progress_path_for",
]

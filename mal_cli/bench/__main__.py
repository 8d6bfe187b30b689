"""`python -m mal_cli.bench ARGS` is `mal bench ARGS`; also the internal entry points of its subprocesses and
`python -m mal_cli.bench synthetic OUT --image-dir DIR [--images N] [--boxes N] [--masks]`."""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def _synthetic(argv: Sequence[str]) -> None:
    import argparse

    from mal_cli.bench.synthetic import synthetic_dataset

    parser = argparse.ArgumentParser(
        prog="python -m mal_cli.bench synthetic", description=synthetic_dataset.__doc__.split("\n")[0]
    )
    parser.add_argument("out")
    parser.add_argument("--image-dir", required=True)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--boxes", type=int, default=1_300_000)
    parser.add_argument("--masks", action="store_true")
    a = parser.parse_args(argv)
    print(synthetic_dataset(a.out, a.images, a.boxes, a.image_dir, masks=a.masks))


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-child"]:  # internal: the subprocess of train_benchmark
        from mal_cli.bench.training import _train_child

        _train_child(argv[1], argv[2], int(argv[3]) if len(argv) > 3 else 0)
    elif argv[:1] == ["pipeline-child"]:  # internal: the subprocess of pipeline_ceiling
        from mal_cli.bench.labelling import _pipeline_child

        _pipeline_child(argv[1], argv[2])
    elif argv[:1] == ["synthetic"]:
        _synthetic(argv[1:])
    else:
        from mal_cli.cli import main as cli_main

        cli_main(["bench", *argv])


if __name__ == "__main__":
    main()

"""Shared fixtures. Everything here reads tests/data only, never ../shared."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import orjson
import pytest
from mal_runner import Result, in_process_runner

DATA_DIR = Path(__file__).parent / "data"
MINI16_JSON = DATA_DIR / "annotations_mini16.json"
MINI16_IMAGES = DATA_DIR / "images"

_MINI16_CACHE: dict = {}


@pytest.fixture
def mini16_path() -> Path:
    """The 16-image COCO fixture (141 instances, real masks)."""
    return MINI16_JSON


@pytest.fixture
def mini16_raw() -> dict:
    """A fresh, mutable copy of the fixture's parsed JSON (parsed once per session)."""
    if "raw" not in _MINI16_CACHE:
        _MINI16_CACHE["raw"] = orjson.loads(MINI16_JSON.read_bytes())
    return copy.deepcopy(_MINI16_CACHE["raw"])


@pytest.fixture
def mal(capsys, monkeypatch) -> Callable[..., Result]:
    """Run `mal ARGS...` in-process as the console script does: exit code, stdout, stderr."""
    return in_process_runner(capsys, monkeypatch)


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.cuda` tests need a CUDA GPU: skipped without one (CI), run with `pytest -m cuda` on one."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (on one: pytest -m cuda)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random ViT-Tiny labeler at 64 px crops: exercises the model path without the shipped weights."""
    import torch

    from mal_cli.modeling.labeler import LabelerConfig, MaskLabeler, export_labeler

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    export_labeler(MaskLabeler(LabelerConfig(backbone="vit_tiny_patch16_224", crop_size=64)), path)
    return path

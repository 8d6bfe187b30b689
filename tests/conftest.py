"""Shared fixtures. Everything here reads tests/data only, never ../shared."""

from __future__ import annotations

import copy
from pathlib import Path

import orjson
import pytest

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

"""mal_cli.dataset: loading COCO/LVIS/results JSON, indices, image paths, errors, atomic writes."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import orjson
import pytest

from mal_cli.dataset import Dataset, image_file_name, load_any, load_dataset, load_results, read_json, write_json_atomic
from mal_cli.errors import InputError, OutputError


def _write(path: Path, obj) -> Path:
    path.write_bytes(orjson.dumps(obj))
    return path


def test_load_coco_fixture(mini16_path):
    ds = load_dataset(mini16_path)
    assert not ds.is_lvis
    assert len(ds.images) == 16 and len(ds.annotations) == 141
    assert set(ds.image_by_id) == {im["id"] for im in ds.images}
    assert sum(len(v) for v in ds.annotations_by_image.values()) == 141
    # Per-image lists keep input order and are the very dicts inside `raw`.
    for image_id, anns in ds.annotations_by_image.items():
        expected = [a for a in ds.raw["annotations"] if a["image_id"] == image_id]
        assert all(a is b for a, b in zip(anns, expected)) and len(anns) == len(expected)
    assert ds.source == str(mini16_path)


def test_every_field_passes_through_and_boxes_stay_exact(tmp_path, mini16_raw):
    mini16_raw["unknown_top_level"] = {"keep": [1, 2]}
    mini16_raw["annotations"][0]["bbox"] = [0.1, 0.2, 10.000000000000002, 3.3333333333333335]
    mini16_raw["annotations"][0]["custom"] = "x"
    path = _write(tmp_path / "in.json", mini16_raw)
    ds = load_dataset(path)
    out = tmp_path / "out.json"
    write_json_atomic(out, ds.raw)
    assert orjson.loads(out.read_bytes()) == mini16_raw
    assert ds.annotations[0]["bbox"] == [0.1, 0.2, 10.000000000000002, 3.3333333333333335]


def test_image_path_from_file_name_or_coco_url(tmp_path):
    ds = Dataset.from_dict(
        {
            "images": [
                {"id": 1, "file_name": "a/b.jpg", "coco_url": "http://x/train2017/ignored.jpg"},
                {"id": 2, "coco_url": "http://images.cocodataset.org/val2017/000000000139.jpg"},
                {"id": 3},
            ],
            "annotations": [],
        }
    )
    assert ds.image_path(ds.image_by_id[1], tmp_path) == tmp_path / "a" / "b.jpg"
    assert ds.image_path(ds.image_by_id[2], "imgs") == Path("imgs") / "000000000139.jpg"
    with pytest.raises(InputError, match="image id 3 has neither 'file_name' nor 'coco_url'"):
        image_file_name(ds.image_by_id[3])


def test_lvis_is_detected(mini16_raw):
    assert not Dataset.from_dict(mini16_raw).is_lvis
    by_categories = dict(mini16_raw, categories=[dict(c, frequency="f") for c in mini16_raw["categories"]])
    assert Dataset.from_dict(by_categories).is_lvis
    images = [{k: v for k, v in im.items() if k != "file_name"} for im in mini16_raw["images"]]
    assert Dataset.from_dict(dict(mini16_raw, images=images)).is_lvis


def test_results_lists_and_load_any(tmp_path, mini16_path):
    results = [{"image_id": 328, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.9}]
    path = _write(tmp_path / "res.json", results)
    assert load_results(path) == results
    assert load_any(path) == results
    assert isinstance(load_any(mini16_path), Dataset)
    with pytest.raises(InputError, match=r"result \[0\].*has no 'bbox'"):
        load_results(_write(tmp_path / "bad.json", [{"image_id": 1, "category_id": 1}]))
    with pytest.raises(InputError, match="expected a COCO results list"):
        load_results(mini16_path)


def test_stdin(monkeypatch, mini16_path):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(mini16_path.read_bytes())))
    ds = load_dataset("-")
    assert ds.source == "<stdin>" and len(ds.annotations) == 141


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"images": [], "annotations": [', "truncated JSON at byte"),
        (b'{"images": [] "annotations": []}', "invalid JSON at byte 14"),
        (b"[1, 2]", "got a JSON array"),
        (b'{"annotations": []}', "missing the top-level key 'images'"),
        (b'{"images": {}, "annotations": []}', "'images' must be a list"),
        (b'{"images": [{"id": 1}], "annotations": [{"id": 7, "image_id": 1}]}', "annotation id 7 has no 'bbox'"),
        (
            b'{"images": [{"id": 1}], "annotations": [{"id": 7, "image_id": 2, "bbox": [0, 0, 1, 1]}]}',
            "annotation id 7 refers to image id 2",
        ),
        (b'{"images": [{"id": 1}, {"id": 1}], "annotations": []}', "image id 1 appears twice"),
        (
            b'{"images": [{"id": 1}], "annotations": [{"id": 7, "image_id": 1, "bbox": [0, 0, 1, 1]},'
            b' {"id": 7, "image_id": 1, "bbox": [0, 0, 1, 1]}]}',
            "annotation id 7 appears twice",
        ),
        (
            b'{"images": [{"id": 1}], "annotations": [{"id": 7, "image_id": 1, "bbox": [0, 0, 1]}]}',
            "annotation id 7: 'bbox' must be",
        ),
    ],
)
def test_clear_input_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        load_dataset(path)
    assert message in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_json(tmp_path / "missing.json")
    with pytest.raises(InputError, match="is a directory"):
        read_json(tmp_path)


def test_write_json_atomic(tmp_path, capsysbinary):
    target = tmp_path / "out.json"
    target.write_text("old")
    write_json_atomic(target, {"a": [1, 2.5]})
    assert orjson.loads(target.read_bytes()) == {"a": [1, 2.5]}
    assert os.listdir(tmp_path) == ["out.json"]  # no temp file left behind
    write_json_atomic("-", {"b": 1})
    assert orjson.loads(capsysbinary.readouterr().out) == {"b": 1}
    with pytest.raises(OutputError, match="cannot write"):
        write_json_atomic(tmp_path / "no" / "such" / "dir.json", {})

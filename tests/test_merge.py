"""`mal merge`: shards back into input order, consistency checks, de-duplication, --into, progress files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from mal_cli.errors import InputError
from mal_cli.labeling import LabelOptions, label
from mal_cli.merge import merge_documents, merge_files

DATA_DIR = Path(__file__).parent / "data"
MINI16_JSON = DATA_DIR / "annotations_mini16.json"
MINI16_IMAGES = DATA_DIR / "images"
BOX = dict(method="box", workers=0)


def run_box(boxes, out, **kw) -> Path:
    label(str(boxes), str(MINI16_IMAGES), str(out), LabelOptions(**BOX), progress_bar=False, **kw)
    return out


@pytest.fixture
def shuffled_input(tmp_path, mini16_raw) -> Path:
    """The fixture with annotations interleaved across images, so input order is not image order."""
    anns = mini16_raw["annotations"]
    mini16_raw["annotations"] = anns[::2] + anns[1::2][::-1]
    path = tmp_path / "boxes.json"
    path.write_bytes(orjson.dumps(mini16_raw))
    return path


def test_shards_restore_input_order(tmp_path, shuffled_input):
    single = run_box(shuffled_input, tmp_path / "single.json")
    parts = [str(run_box(shuffled_input, tmp_path / f"p{k}.json", shard=(k, 4))) for k in range(4)]
    sizes = [len(orjson.loads(Path(p).read_bytes())["annotations"]) for p in parts]
    assert sum(sizes) == 141  # 64-box groups: 3 groups, so one shard is empty (and still merges)
    out = tmp_path / "merged.json"
    merge_files([parts[2], parts[0], parts[3], parts[1]], str(out))
    assert out.read_bytes() == single.read_bytes()


def test_missing_or_foreign_shards_are_errors(tmp_path, shuffled_input, mini16_raw):
    parts = [str(run_box(shuffled_input, tmp_path / f"p{k}.json", shard=(k, 2))) for k in range(2)]
    with pytest.raises(InputError, match="1/2 missing"):
        merge_files(parts[:1], str(tmp_path / "m.json"))
    with pytest.raises(InputError, match="same shard"):
        merge_files([parts[0], parts[0]], str(tmp_path / "m.json"))
    other = run_box(MINI16_JSON, tmp_path / "other.json", shard=(1, 2))
    with pytest.raises(InputError, match="another run"):
        merge_files([parts[0], str(other)], str(tmp_path / "m.json"))


def test_different_images_or_categories_are_errors(tmp_path, mini16_raw):
    a = {**mini16_raw}
    b = {**mini16_raw, "categories": mini16_raw["categories"][1:]}
    with pytest.raises(InputError, match="categories"):
        merge_documents([("a", a), ("b", b)])
    c = {**mini16_raw, "images": mini16_raw["images"][1:]}
    with pytest.raises(InputError, match="images"):
        merge_documents([("a", a), ("c", c)])


def test_duplicates_collapse_conflicts_need_prefer(mini16_raw):
    anns = mini16_raw["annotations"]
    a = {**mini16_raw, "annotations": anns[:10]}
    b = {**mini16_raw, "annotations": anns[5:20]}
    merged = merge_documents([("a", a), ("b", b)])
    assert [x["id"] for x in merged["annotations"]] == [x["id"] for x in anns[:20]]
    changed = [dict(x, area=-1.0) if i == 0 else x for i, x in enumerate(anns[5:20])]
    c = {**mini16_raw, "annotations": changed}
    with pytest.raises(InputError, match="--prefer"):
        merge_documents([("a", a), ("c", c)])
    first = merge_documents([("a", a), ("c", c)], prefer="first")
    last = merge_documents([("a", a), ("c", c)], prefer="last")
    assert first["annotations"][5]["area"] == anns[5]["area"]
    assert last["annotations"][5]["area"] == -1.0
    assert len(first["annotations"]) == len(last["annotations"]) == 20


def test_into_fills_missing_masks_only(tmp_path, mini16_raw):
    # A dataset where half the annotations have (human) masks; label the rest; merge into the original.
    for ann in mini16_raw["annotations"][1::2]:
        ann.pop("segmentation")
    base = tmp_path / "base.json"
    base.write_bytes(orjson.dumps(mini16_raw))
    labels = run_box(base, tmp_path / "labels.json")
    out = tmp_path / "complete.json"
    done = subprocess.run(
        [sys.executable, "-m", "mal_cli", "merge", str(labels), "--into", str(base), "--out", str(out)],
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr.decode()
    merged = orjson.loads(out.read_bytes())["annotations"]
    for i, (ann, original) in enumerate(zip(merged, mini16_raw["annotations"])):
        if i % 2 == 0:
            assert ann == original  # existing masks kept
        else:
            assert "segmentation" in ann and ann["mal_score"] == 0.5
    assert len(merged) == len(mini16_raw["annotations"])


def test_progress_file_into_input(tmp_path, mini16_raw):
    out = tmp_path / "labels.json"
    label(str(MINI16_JSON), str(MINI16_IMAGES), str(out), LabelOptions(**BOX), keep_progress=True, progress_bar=False)
    progress = Path(str(out) + ".progress.jsonl")
    assert progress.exists()
    with pytest.raises(InputError, match="--into"):
        merge_files([str(progress)], str(tmp_path / "x.json"))
    with open(progress, "ab") as handle:
        handle.write(b'{"image": 3, "res')  # torn last line: ignored
    merged_path = tmp_path / "from_progress.json"
    merge_files([str(progress)], str(merged_path), into=str(MINI16_JSON))
    assert merged_path.read_bytes() == out.read_bytes()

"""jsonstream: the streamed document equals orjson's parse of it, chunk boundaries and layouts notwithstanding."""

import json
from pathlib import Path

import orjson
import pytest

from mal_cli import jsonstream
from mal_cli.errors import InputError
from mal_cli.jsonstream import iter_document, iter_entries

DATA = Path(__file__).parent / "data"


def rebuild(path, keys=("images", "annotations")):
    """The document put back together from the stream, and the number of item chunks read."""
    doc, chunks, top = {}, 0, None
    for kind, key, value in iter_document(path, keys):
        if key is None:  # a top-level array or scalar
            if kind == "start":
                top = []
            elif kind == "items":
                top.extend(value)
                chunks += 1
            else:
                top = value
            continue
        if kind == "start":
            doc[key] = []
        elif kind == "items":
            doc[key].extend(value)
            chunks += 1
        else:
            doc[key] = value
    return (doc if top is None else top), chunks


def tricky_document() -> dict:
    """Items whose text has `},{` inside strings and nested objects (RLE dicts, part lists), unicode, escapes."""
    anns = []
    for i in range(300):
        ann = {"id": i, "image_id": i % 7, "bbox": [i * 0.5, 1, 2.25, 3e-3], "note": 'x},{"y": "z\\" }, {' * (i % 3)}
        if i % 4 == 0:
            ann["segmentation"] = {"size": [10, 12], "counts": "a},{b"}
        if i % 5 == 0:
            ann["parts"] = [{"a": 1}, {"b": [2, {"c": 3}]}]
        if i % 6 == 0:
            ann["name"] = 'café \u00e9 \u2603 \\ " end'
        anns.append(ann)
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 10, "width": 12} for i in range(7)]
    return {"info": {"k": [1, {"a": "]"}]}, "annotations": anns, "images": images, "categories": [{"id": 1}], "z": None}


@pytest.mark.parametrize("chunk_bytes", [64, 997, 1 << 22])
@pytest.mark.parametrize("indent", [None, 2])
def test_stream_equals_whole_parse(tmp_path, monkeypatch, chunk_bytes, indent):
    monkeypatch.setattr(jsonstream, "CHUNK_BYTES", chunk_bytes)
    doc = tricky_document()
    path = tmp_path / "d.json"
    path.write_text(json.dumps(doc, indent=indent, ensure_ascii=False))
    rebuilt, chunks = rebuild(path)
    assert rebuilt == orjson.loads(path.read_bytes())
    assert list(rebuilt) == list(doc)  # document order kept
    if chunk_bytes > 1 << 20:
        assert chunks <= 6  # big chunks: a few orjson parses (the last items of an array are read one by one)


def test_real_coco_file_in_few_chunks():
    path = DATA / "annotations_mini16.json"
    rebuilt, chunks = rebuild(path)
    assert rebuilt == orjson.loads(path.read_bytes())
    assert chunks == 4  # images, annotations: one parse each, then the last item of each


def test_top_level_array_and_scalars(tmp_path):
    path = tmp_path / "r.json"
    dets = [{"image_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}] * 50
    path.write_bytes(orjson.dumps(dets))
    assert rebuild(path)[0] == dets
    path.write_bytes(b"  []  ")
    assert rebuild(path)[0] == []
    path.write_bytes(b" 42 ")
    assert list(iter_document(path)) == [("value", None, 42)]
    path.write_bytes(b"{}")
    assert list(iter_document(path)) == []


def test_nan_and_infinity_are_read(tmp_path):
    path = tmp_path / "n.json"
    path.write_text('{"annotations": [{"id": 1, "bbox": [NaN, 1, 2, Infinity]}, {"id": 2, "bbox": [1, 2, 3, 4]}]}')
    rebuilt, _ = rebuild(path)
    assert rebuilt["annotations"][1]["bbox"] == [1, 2, 3, 4]
    assert rebuilt["annotations"][0]["bbox"][3] == float("inf")


def test_keys_not_streamed_come_whole(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(orjson.dumps(tricky_document()))
    kinds = [(kind, key) for kind, key, _ in iter_document(path, ("annotations",))]
    assert ("value", "images") in kinds and ("start", "annotations") in kinds


def test_entries_group_arrays(tmp_path):
    path = tmp_path / "d.json"
    doc = tricky_document()
    path.write_bytes(orjson.dumps(doc))
    seen = []
    for kind, key, value in iter_entries(path, ("images", "annotations")):
        if kind == "array":
            if key == "images":
                continue  # left unread: skipped for the caller
            value = [item for chunk in value for item in chunk]
        seen.append((key, value))
    assert seen == [(k, v) for k, v in doc.items() if k != "images"]


@pytest.mark.parametrize(
    "text, message",
    [
        (b"", "truncated JSON at byte 0 of 0"),
        (b"{", "truncated JSON at byte 1 of 1"),
        (b'{"images": [] "annotations": []}', "invalid JSON at byte 14 of 32"),
        (b'{"annotations": [{"id": 1},]}', "invalid JSON at byte 27"),
        (b'{"annotations": [{"id": 1}, {"id": 2},]}', "invalid JSON at byte"),
        (b'{"annotations": [{"id": 1}, {"id": 2}]} x', "invalid JSON at byte 40"),
        (b'{"annotations": [{"id": 1}, {"id": tru}]}', "invalid JSON at byte"),
        (b'{"annotations": [{"id": 1}, {"id": 2', "truncated JSON at byte"),
        (b'{"a": "unterminated', "truncated JSON"),
        (b"\x89PNG\r\n", "invalid JSON at byte 0"),
    ],
)
def test_bad_json_names_the_byte(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_bytes(text)
    with pytest.raises(InputError, match="bad.json: ") as err:
        list(iter_document(path, ("annotations",)))
    assert message in str(err.value)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        list(iter_document(tmp_path / "nope.json"))

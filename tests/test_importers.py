"""`mal import yolo|voc`: round trips against `mal export yolo`, VOC's pixel convention, hostile input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import oracles  # slow references (tests/oracles.py)
import orjson
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from mal_cli.dataset import Dataset
from mal_cli.errors import InputError
from mal_cli.export import export_yolo
from mal_cli.importers import image_size, import_voc, import_yolo, read_class_names

DATA_DIR = Path(__file__).parent / "data"
MINI16_IMAGES = DATA_DIR / "images"


def _box_labels(raw: dict) -> dict:
    """The fixture with integer boxes whose masks are exactly the filled boxes (an exact round trip)."""
    by_id = {image["id"]: image for image in raw["images"]}
    for ann in raw["annotations"]:
        image = by_id[ann["image_id"]]
        h, w = image["height"], image["width"]
        x0, y0 = int(ann["bbox"][0]), int(ann["bbox"][1])
        x1 = min(w, max(x0 + 1, round(ann["bbox"][0] + ann["bbox"][2])))
        y1 = min(h, max(y0 + 1, round(ann["bbox"][1] + ann["bbox"][3])))
        mask = np.zeros((h, w), np.uint8)
        mask[y0:y1, x0:x1] = 1
        ann["bbox"], ann["segmentation"], ann["iscrowd"] = [x0, y0, x1 - x0, y1 - y0], oracles.encode(mask), 0
    return raw


def _by_image_name(doc: dict) -> dict[str, list[tuple]]:
    names = {image["id"]: image["file_name"] for image in doc["images"]}
    out: dict[str, list[tuple]] = {}
    for ann in doc["annotations"]:
        out.setdefault(names[ann["image_id"]], []).append((ann["category_id"], ann["bbox"]))
    return out


def _exported(tmp_path: Path, raw: dict) -> Path:
    out = tmp_path / "yolo"
    export_yolo(Dataset.from_dict(raw, "labels.json"), out, link_images=MINI16_IMAGES)
    return out


def test_yolo_round_trip_gives_back_the_boxes_and_categories(tmp_path, mini16_raw):
    raw = _box_labels(mini16_raw)
    doc, summary = import_yolo(_exported(tmp_path, raw))
    # Categories: the same names in COCO-id order (ids renumbered 1..K as YOLO keeps no ids).
    original_names = [c["name"] for c in sorted(raw["categories"], key=lambda c: c["id"])]
    assert [c["name"] for c in doc["categories"]] == original_names
    name_of = {c["id"]: c["name"] for c in raw["categories"]}
    new_name_of = {c["id"]: c["name"] for c in doc["categories"]}
    # Images: every one, with its real size read from the file.
    assert sorted(i["file_name"] for i in doc["images"]) == sorted(i["file_name"] for i in raw["images"])
    sizes = {i["file_name"]: (i["width"], i["height"]) for i in raw["images"]}
    assert all(sizes[i["file_name"]] == (i["width"], i["height"]) for i in doc["images"])
    # Boxes: per image, the same (category, box) multiset within the 6-decimal + 2-decimal rounding.
    before = _by_image_name(raw)
    after = _by_image_name(doc)
    assert summary["boxes"] == len(raw["annotations"])
    for name, boxes in before.items():
        got = sorted((new_name_of[c], b) for c, b in after[name])
        want = sorted((name_of[c], b) for c, b in boxes)
        assert [g[0] for g in got] == [w[0] for w in want]
        np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=0.01)


def test_yolo_seg_lines_of_real_masks_give_the_masks_extent(tmp_path, mini16_raw):
    noncrowd = [a for a in mini16_raw["annotations"] if not a.get("iscrowd")]
    mini16_raw["annotations"] = noncrowd
    doc, _ = import_yolo(_exported(tmp_path, mini16_raw))
    size = {i["id"]: (i["height"], i["width"]) for i in mini16_raw["images"]}
    names = {i["id"]: i["file_name"] for i in mini16_raw["images"]}
    want: dict[str, list] = {}
    for ann in noncrowd:
        h, w = size[ann["image_id"]]
        rle = mask_utils.frPyObjects(ann["segmentation"], h, w)
        rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
        want.setdefault(names[ann["image_id"]], []).append(mask_utils.toBbox(rle).tolist())
    got = {name: [b for _, b in boxes] for name, boxes in _by_image_name(doc).items()}
    assert sum(map(len, got.values())) == len(noncrowd)
    for name, boxes in want.items():
        np.testing.assert_allclose(sorted(got[name]), sorted(boxes), atol=0.01)


def test_the_imported_json_is_a_dataset_mal_reads(tmp_path, mini16_raw, mal):
    root = _exported(tmp_path, _box_labels(mini16_raw))
    out = tmp_path / "boxes.json"
    result = mal("import", "yolo", root, "--out", out)
    assert result.code == 0 and result.out == ""
    assert "16 images" in result.err and f"{len(mini16_raw['annotations'])} boxes" in result.err
    dataset = Dataset.from_dict(orjson.loads(out.read_bytes()), str(out))
    assert all(dataset.image_path(i, root / "images").is_file() for i in dataset.images)


def _yolo_tree(tmp_path: Path, label: str, classes: str | None = "cat\ndog\n") -> Path:
    root = tmp_path / "y"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (200, 100)).save(root / "images" / "train" / "a.jpg")
    Image.new("RGB", (50, 40)).save(root / "images" / "train" / "b.png")  # no label file: background
    (root / "labels" / "train" / "a.txt").write_text(label)
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    return root


def test_yolo_box_lines_become_pixel_boxes(tmp_path):
    doc, summary = import_yolo(_yolo_tree(tmp_path, "1 0.5 0.5 0.5 0.2\n\n0 0.1 0.1 0.2 0.2\n"))
    assert [i["file_name"] for i in doc["images"]] == ["train/a.jpg", "train/b.png"]
    assert [(a["category_id"], a["bbox"]) for a in doc["annotations"]] == [
        (2, [50.0, 40.0, 100.0, 20.0]),
        (1, [0.0, 0.0, 40.0, 20.0]),
    ]
    assert summary["images_without_labels"] == 1


@pytest.mark.parametrize(
    "label, expected",
    [
        ("0 0.5 0.5 0.1\n", "line 1: expected 'class cx cy w h'"),
        (
            "0 0.5 0.5 0.1 0.1\n7 0.5 0.5 0.1 0.1\n",
            "line 2: class id 7 but only 2 class names",
        ),
        ("-1 0.5 0.5 0.1 0.1\n", "class id '-1' is not a non-negative integer"),
        ("0 0.5 1.5 0.1 0.1\n", "coordinate 1.5 outside [0, 1]"),
        ("0 0.5 0.5 nan 0.1\n", "coordinate nan outside [0, 1]"),
        ("0 0.5 0.5 0.1 x\n", "a coordinate is not a number"),
        ("0 0.5 0.5 0 0.1\n", "the box has no area"),
        ("0 0.1 0.1 0.2 0.2 0.3\n", "expected 'class cx cy w h'"),
    ],
)
def test_yolo_bad_lines_stop_with_file_and_line(tmp_path, mal, label, expected):
    root = _yolo_tree(tmp_path, label)
    with pytest.raises(InputError, match=None) as err:
        import_yolo(root)
    assert expected in str(err.value) and "a.txt" in str(err.value)
    result = mal("import", "yolo", root, "--out", tmp_path / "o.json")
    assert result.code == 2 and result.err.count("\n") == 1 and expected in result.err and "Traceback" not in result.err
    assert not (tmp_path / "o.json").exists()


def test_yolo_missing_folders_and_names(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        import_yolo(tmp_path / "nowhere")
    root = _yolo_tree(tmp_path, "0 0.5 0.5 0.1 0.1\n", classes=None)
    with pytest.raises(InputError, match="no classes.txt or data.yaml"):
        import_yolo(root)
    (root / "labels").rename(root / "lbl")
    with pytest.raises(InputError, match="labels: no such folder"):
        import_yolo(root)


@pytest.mark.parametrize(
    "yaml",
    [
        'path: .\ntrain: images\nnames:\n  0: "cat"\n  1: dog\nnc: 2\n',
        "names: ['cat', \"dog\"]\n",
        "names: [cat, dog]\n",
        "names:\n  - cat\n  - 'dog'\n",
    ],
)
def test_data_yaml_names(tmp_path, yaml):
    (tmp_path / "data.yaml").write_text(yaml)
    assert read_class_names(tmp_path) == ["cat", "dog"]


def test_data_yaml_with_gaps_is_refused(tmp_path):
    (tmp_path / "data.yaml").write_text("names:\n  0: cat\n  2: dog\n")
    with pytest.raises(InputError, match="without gaps"):
        read_class_names(tmp_path)


def test_image_size_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (30, 10))
    exif = image.getexif()
    exif[274] = 6  # rotated 90 degrees: displayed 10 wide, 30 high
    image.save(tmp_path / "r.jpg", exif=exif)
    assert image_size(tmp_path / "r.jpg") == (10, 30)


# --- VOC --------------------------------------------------------------------------------------------


def _voc_xml(
    objects: str,
    filename: str = "a.jpg",
    size: str = "<width>200</width><height>100</height>",
) -> str:
    return f"<annotation><filename>{filename}</filename><size>{size}<depth>3</depth></size>{objects}</annotation>"


def _voc_object(name: str, box: tuple) -> str:
    tags = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return f"<object><name>{name}</name><difficult>0</difficult><bndbox>{tags}</bndbox></object>"


def _voc_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for name, text in files.items():
        (root / "Annotations" / name).write_text(text)
    return root


def test_voc_boxes_follow_the_one_based_inclusive_convention(tmp_path):
    root = _voc_tree(
        tmp_path,
        {
            "a.xml": _voc_xml(_voc_object("person", (1, 1, 10, 20)) + _voc_object("dog", (50, 30, 200, 100))),
            "b.xml": _voc_xml(_voc_object("person", (11, 21, 11, 21)), filename="b.jpg"),
        },
    )
    doc, summary = import_voc(root)
    assert [c["name"] for c in doc["categories"]] == ["dog", "person"]
    boxes = [(a["image_id"], a["category_id"], a["bbox"]) for a in doc["annotations"]]
    # VOC pixel 1..10 is COCO's [0, 10): 10 pixels wide; a one-pixel box is 1 x 1.
    assert boxes == [
        (1, 2, [0.0, 0.0, 10.0, 20.0]),
        (1, 1, [49.0, 29.0, 151.0, 71.0]),
        (2, 2, [10.0, 20.0, 1.0, 1.0]),
    ]
    assert summary["images_missing"] == 2  # JPEGImages is empty


def test_voc_classes_txt_fixes_the_order_and_refuses_unknown_names(tmp_path):
    root = _voc_tree(tmp_path, {"a.xml": _voc_xml(_voc_object("person", (1, 1, 10, 20)))})
    (root / "classes.txt").write_text("person\ncar\n")
    doc, _ = import_voc(root)
    assert [c["name"] for c in doc["categories"]] == ["person", "car"] and doc["annotations"][0]["category_id"] == 1
    (root / "classes.txt").write_text("car\n")
    with pytest.raises(InputError, match="'person' is not in"):
        import_voc(root)


def test_voc_size_zero_reads_the_image(tmp_path):
    root = _voc_tree(
        tmp_path,
        {
            "a.xml": _voc_xml(
                _voc_object("cat", (1, 1, 5, 5)),
                size="<width>0</width><height>0</height>",
            )
        },
    )
    Image.new("RGB", (64, 48)).save(root / "JPEGImages" / "a.jpg")
    doc, _ = import_voc(root)
    assert (doc["images"][0]["width"], doc["images"][0]["height"]) == (64, 48)


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<annotation><filename>&lol3;</filename></annotation>"""


@pytest.mark.parametrize(
    "text, expected",
    [
        (BILLION_LAUGHS, "DOCTYPE or entity declarations is refused"),
        ("<annotation><filename>a.jpg</filename>", "malformed XML"),
        ("<foo/>", "expected <annotation>"),
        (
            _voc_xml("<object><name>cat</name></object>"),
            "object 1 (cat) has no <bndbox>",
        ),
        (_voc_xml(_voc_object("cat", (1, 1, "ten", 5))), "no numeric <xmax>"),
        (_voc_xml(_voc_object("cat", (10, 1, 5, 5))), "xmax < xmin"),
        (_voc_xml(_voc_object("cat", (1, 1, 500, 5))), "outside the 200x100 image"),
        (_voc_xml(_voc_object("", (1, 1, 5, 5))), "object 1 has no <name>"),
    ],
)
def test_voc_hostile_files_stop_with_one_line(tmp_path, mal, text, expected):
    root = _voc_tree(tmp_path, {"a.xml": text})
    with pytest.raises(InputError) as err:
        import_voc(root)
    assert expected in str(err.value) and "a.xml" in str(err.value)
    result = mal("import", "voc", root, "--out", tmp_path / "o.json")
    assert result.code == 2 and result.err.count("\n") == 1 and expected in result.err


def test_voc_missing_folders(tmp_path):
    with pytest.raises(InputError, match="Annotations: no such folder"):
        import_voc(tmp_path)
    (tmp_path / "Annotations").mkdir()
    with pytest.raises(InputError, match="no .xml files"):
        import_voc(tmp_path)

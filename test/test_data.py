"""Tests of lens_ros.training.data and .synthetic: the refer and ReasonSeg layouts, RLE, the generator.

Fixtures are written in the real layouts in tmp_path: the synthetic data set, a hand-made
refcocog-style (umd) data set with polygon, compressed-RLE and uncompressed-RLE annotations, and a
ReasonSeg folder with target and ignore polygons.
"""

from __future__ import annotations

import json
import pickle
import re
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from lens_ros.training import synthetic
from lens_ros.training.data import (
    ConcatSamples,
    ReasonSegDataset,
    RefDataset,
    Sample,
    concat,
    mask_box,
    mask_to_rle,
    polygons_to_mask,
    read_rgb,
    rle_counts_from_string,
    rle_counts_to_string,
    rle_to_mask,
)
from lens_ros.training.synthetic import make_synthetic_refer

N_SYNTHETIC_IMAGES = 60


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return make_synthetic_refer(tmp_path_factory.mktemp("synthetic"), n_images=N_SYNTHETIC_IMAGES, seed=0)


def _synthetic_refs(root: Path) -> list[dict]:
    with (root / "synthetic" / "refs(unc).p").open("rb") as file:
        return pickle.load(file)  # written by the test's own generator


def _synthetic_instances(root: Path) -> dict:
    return json.loads((root / "synthetic" / "instances.json").read_text())


# ---------------------------------------------------------------------------------------------
# Synthetic data set, read back with RefDataset
# ---------------------------------------------------------------------------------------------


def test_synthetic_layout_and_split_counts(synthetic_root):
    refs = _synthetic_refs(synthetic_root)
    instances = _synthetic_instances(synthetic_root)
    assert len(instances["images"]) == N_SYNTHETIC_IMAGES
    # Every shape is referred to, once.
    assert sorted(ref["ann_id"] for ref in refs) == sorted(a["id"] for a in instances["annotations"])
    images_per_split = defaultdict(set)
    for ref in refs:
        images_per_split[ref["split"]].add(ref["image_id"])
    assert {split: len(ids) for split, ids in images_per_split.items()} == {"train": 42, "val": 9, "testA": 9}
    assert not (images_per_split["train"] & images_per_split["val"]) and not (images_per_split["val"]
                                                                              & images_per_split["testA"])
    per_image = defaultdict(int)
    for annotation in instances["annotations"]:
        per_image[annotation["image_id"]] += 1
    assert set(per_image.values()) <= {2, 3, 4}
    for split in ("train", "val", "testA"):
        split_refs = [ref for ref in refs if ref["split"] == split]
        assert all(1 <= len(ref["sentences"]) <= 3 for ref in split_refs)
        every = RefDataset(synthetic_root, "synthetic", "unc", split)
        one_each = RefDataset(synthetic_root, "synthetic", "unc", split, sentences="random")
        assert len(every) == sum(len(ref["sentences"]) for ref in split_refs)
        assert len(one_each) == len(split_refs)
    for name in (f"synthetic_{i:06d}.jpg" for i in range(1, N_SYNTHETIC_IMAGES + 1)):
        assert (synthetic_root / "images/mscoco/images/train2014" / name).is_file()


def test_synthetic_samples_are_exact(synthetic_root):
    """Box = the annotation's bbox, mask = the drawn shape: its pixels have the shape's colour."""
    instances = _synthetic_instances(synthetic_root)
    annotations = {a["id"]: a for a in instances["annotations"]}
    refs = [ref for ref in _synthetic_refs(synthetic_root) if ref["split"] == "val"]
    dataset = RefDataset(synthetic_root, "synthetic", "unc", "val")
    first_sentence_samples = [dataset[i] for i in range(len(dataset)) if dataset[i].source.endswith(" sent 0")]
    assert len(first_sentence_samples) == len(refs)
    for sample, ref in zip(first_sentence_samples, refs):
        annotation = annotations[ref["ann_id"]]
        x, y, w, h = annotation["bbox"]
        assert sample.box == (x, y, x + w, y + h)
        assert sample.image.shape == (240, 320, 3) and sample.image.dtype == np.uint8
        assert sample.mask.shape == (240, 320) and sample.mask.dtype == bool
        assert int(sample.mask.sum()) == annotation["area"]
        assert sample.expression == ref["sentences"][0]["sent"]
        assert sample.success is None
        assert sample.source == f"synthetic/unc/val ref {ref['ref_id']} sent 0"
        # Inside the mask (eroded against JPEG ringing) the colour is uniform and saturated.
        inner = cv2.erode(sample.mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        pixels = sample.image[inner].astype(float)
        assert pixels.std(axis=0).max() < 12
        assert np.ptp(pixels.mean(axis=0)) > 80  # a strong colour, not the light grey background
        # The colour word, if any, matches the pixels.
        colour_words = [w for w in sample.expression.split() if w in synthetic.COLOURS]
        if colour_words and " the " not in sample.expression[3:]:  # no landmark named
            expected = np.array(synthetic.COLOURS[colour_words[0]], dtype=float)
            assert np.abs(pixels.mean(axis=0) - expected).max() < 40


def test_synthetic_expressions_unique_per_image_and_name_the_kind(synthetic_root):
    refs = _synthetic_refs(synthetic_root)
    categories = {c["id"]: c["name"] for c in _synthetic_instances(synthetic_root)["categories"]}
    texts_per_image = defaultdict(list)
    for ref in refs:
        texts = [s["sent"] for s in ref["sentences"]]
        assert len(set(texts)) == len(texts)
        texts_per_image[ref["image_id"]].extend(texts)
        for text in texts:
            # The head noun (before any relation to a landmark) is the ref's kind, or "shape".
            head = re.split(r" (?:left of|right of|above|below) ", text)[0]
            assert head.split()[-1] in ("shape", categories[ref["category_id"]]), text
    for image_id, texts in texts_per_image.items():
        assert len(texts) == len(set(texts)), f"image {image_id} has an expression for two shapes: {texts}"


def test_synthetic_referring_expressions_are_checked_against_other_shapes():
    def shape(kind, colour, x1, size):
        polygon = np.array([[x1, 10], [x1 + size, 10], [x1 + size, 10 + size], [x1, 10 + size]], np.int32)
        return synthetic._Shape(kind, colour, polygon, (size + 1) ** 2, x1, 10, x1 + size, 10 + size)

    big_red = shape("circle", "red", 0, 40)
    small_red = shape("circle", "red", 100, 20)
    blue = shape("square", "blue", 200, 30)
    shapes = [big_red, small_red, blue]
    for_big = synthetic.referring_expressions(big_red, shapes)
    assert "the red circle" not in for_big and "the circle" not in for_big
    assert {"the biggest red circle", "the leftmost circle", "the biggest shape"} <= set(for_big)
    assert "the circle left of the blue square" not in for_big  # both circles are left of it
    for_blue = synthetic.referring_expressions(blue, shapes)
    assert {"the blue square", "the square", "the blue shape", "the rightmost shape"} <= set(for_blue)
    # "the circle right of the ..." has no unique landmark among the two red circles.
    assert not any("red circle" in text for text in for_blue)


def test_random_sentences_are_seeded_per_epoch(synthetic_root):
    refs = [ref for ref in _synthetic_refs(synthetic_root) if ref["split"] == "train"]
    dataset = RefDataset(synthetic_root, "synthetic", "unc", "train", sentences="random", seed=5)
    again = RefDataset(synthetic_root, "synthetic", "unc", "train", sentences="random", seed=5)
    draws = [dataset[i].expression for i in range(len(dataset))]
    assert draws == [again[i].expression for i in range(len(again))]
    for text, ref in zip(draws, refs):
        assert text in [s["sent"] for s in ref["sentences"]]
    dataset.set_epoch(1)
    redrawn = [dataset[i].expression for i in range(len(dataset))]
    assert redrawn != draws  # many refs have 2-3 sentences
    dataset.set_epoch(0)
    assert [dataset[i].expression for i in range(len(dataset))] == draws


def test_synthetic_generator_is_deterministic(tmp_path):
    def contents(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    first = contents(make_synthetic_refer(tmp_path / "a", n_images=8, seed=3))
    second = contents(make_synthetic_refer(tmp_path / "b", n_images=8, seed=3))
    other = contents(make_synthetic_refer(tmp_path / "c", n_images=8, seed=4))
    assert len(first) == 8 + 2
    assert first == second
    assert first.keys() == other.keys() and first != other


def test_make_synthetic_main(tmp_path, capsys):
    assert synthetic.main([str(tmp_path), "--images", "5", "--seed", "1", "--size", "200x150"]) == 0
    printed = capsys.readouterr().out
    assert "refs(unc).p" in printed and "instances.json" in printed and "5 images" in printed
    dataset = RefDataset(tmp_path, "synthetic", "unc", "train")
    assert dataset[0].image.shape == (150, 200, 3)
    assert synthetic.main([str(tmp_path), "--size", "20x10"]) == 1
    assert "64x64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synthetic.main([str(tmp_path), "--size", "big"])


# ---------------------------------------------------------------------------------------------
# COCO masks: polygons and RLE
# ---------------------------------------------------------------------------------------------

# A 10 x 10 square at columns 20-29, rows 5-14 of a 30 x 40 (h x w) image, as COCO RLE runs over
# the pixels in column-major order: 20 empty columns + 5 rows, then (10 on, 20 off) x 9, 10 on,
# then 15 rows + 10 empty columns.
SQUARE_RUNS = [605] + [10, 20] * 9 + [10, 315]
# Worked out by hand from maskApi.c's rleToString: 605 -> "mb0", 10 -> ":", 20 -> "d0", then the
# differences to the count two before: 0 (x17) -> "0", 315 - 20 = 295 -> "W9".
SQUARE_RLE_STRING = "mb0:d0" + "0" * 17 + "W9"
SQUARE_POLYGON = [20.0, 5.0, 29.0, 5.0, 29.0, 14.0, 20.0, 14.0]


def _square_mask() -> np.ndarray:
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:15, 20:30] = True
    return mask


def test_compressed_rle_string_by_hand():
    assert sum(SQUARE_RUNS) == 30 * 40
    assert rle_counts_from_string(SQUARE_RLE_STRING) == SQUARE_RUNS
    assert rle_counts_from_string(SQUARE_RLE_STRING.encode()) == SQUARE_RUNS
    assert rle_counts_to_string(SQUARE_RUNS) == SQUARE_RLE_STRING
    # A negative difference: 1 - 2 = -1 -> "O" (0x1f: sign bit set, no more groups); 30 -> "n0".
    assert rle_counts_from_string("12n0O") == [1, 2, 30, 1]
    assert rle_counts_to_string([1, 2, 30, 1]) == "12n0O"


def test_rle_decodes_to_the_polygon_it_encodes():
    polygon_mask = polygons_to_mask([SQUARE_POLYGON], 30, 40)
    assert np.array_equal(polygon_mask, _square_mask())  # fillPoly includes the boundary: 10 x 10 px
    assert np.array_equal(rle_to_mask({"size": [30, 40], "counts": SQUARE_RLE_STRING}), polygon_mask)
    assert np.array_equal(rle_to_mask({"size": [30, 40], "counts": SQUARE_RUNS}), polygon_mask)
    assert mask_to_rle(polygon_mask) == {"size": [30, 40], "counts": SQUARE_RLE_STRING}
    assert mask_box(polygon_mask) == (20.0, 5.0, 30.0, 15.0)
    assert mask_box(np.zeros((4, 4), bool)) is None


def test_rle_round_trip_and_refusals():
    rng = np.random.default_rng(0)
    masks = [rng.random((17, 23)) < p for p in (0.05, 0.5, 0.95)]
    masks += [np.ones((5, 6), bool), np.zeros((5, 6), bool), cv2.resize(rng.random((8, 8)), (300, 200)) > 0.5]
    for mask in masks:
        assert np.array_equal(rle_to_mask(mask_to_rle(mask)), mask)
    assert mask_to_rle(np.ones((2, 2), bool))["counts"] == rle_counts_to_string([0, 4])
    with pytest.raises(ValueError, match="cover 5 pixels"):
        rle_to_mask({"size": [2, 2], "counts": [1, 4]})
    with pytest.raises(ValueError, match="truncated"):
        rle_counts_from_string("m")  # 'm' says another group follows
    with pytest.raises(ValueError, match="size"):
        rle_to_mask({"counts": "0"})


def test_polygons_are_united():
    # Two overlapping rectangles as two parts of one object: the overlap stays set.
    mask = polygons_to_mask([[0, 0, 9, 0, 9, 9, 0, 9], [5, 5, 14, 5, 14, 14, 5, 14]], 20, 20)
    assert mask.sum() == 100 + 100 - 25
    assert polygons_to_mask([[1, 1, 5, 5]], 10, 10).sum() == 0  # degenerate part: no area


# ---------------------------------------------------------------------------------------------
# A hand-made refcocog-style (umd) data set
# ---------------------------------------------------------------------------------------------


def _write_jpg(path: Path, image_rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))


def _sentences(texts, first_id):
    return [{"sent": text, "raw": text.capitalize(), "tokens": text.split(), "sent_id": first_id + i}
            for i, text in enumerate(texts)]


@pytest.fixture
def refcocog_root(tmp_path) -> Path:
    """refcocog/refs(umd).p + instances.json, images in root/images/train2014 (the flat variant)."""
    root = tmp_path
    image = np.full((30, 40, 3), 200, np.uint8)
    image[5:15, 20:30] = (255, 0, 0)
    _write_jpg(root / "images/train2014/COCO_train2014_000000000007.jpg", image)
    _write_jpg(root / "images/train2014/COCO_train2014_000000000008.jpg", np.zeros((60, 50, 3), np.uint8))
    instances = {
        "images": [
            {"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "width": 40, "height": 30},
            {"id": 8, "file_name": "COCO_train2014_000000000008.jpg", "width": 50, "height": 60},
        ],
        "annotations": [
            {"id": 101, "image_id": 7, "bbox": [20, 5, 10, 10], "segmentation": [SQUARE_POLYGON], "area": 100.0,
             "iscrowd": 0, "category_id": 1},
            {"id": 102, "image_id": 7, "bbox": [20, 5, 10, 10], "area": 100.0, "iscrowd": 0, "category_id": 1,
             "segmentation": {"size": [30, 40], "counts": SQUARE_RLE_STRING}},
            {"id": 103, "image_id": 7, "bbox": [20, 5, 10, 10], "area": 100.0, "iscrowd": 1, "category_id": 1,
             "segmentation": {"size": [30, 40], "counts": SQUARE_RUNS}},
            {"id": 104, "image_id": 8, "bbox": [1.5, 2.25, 10.5, 20.0], "area": 10.0, "iscrowd": 0,
             "category_id": 2, "segmentation": [[1.5, 2.25, 12.0, 2.25, 12.0, 22.25, 1.5, 22.25]]},
        ],
        "categories": [{"id": 1, "name": "box", "supercategory": "thing"},
                       {"id": 2, "name": "slab", "supercategory": "thing"}],
    }
    refs = [
        {"ref_id": 0, "ann_id": 101, "image_id": 7, "split": "train", "category_id": 1,
         "file_name": "COCO_train2014_000000000007_101.jpg", "sentences": _sentences(["the red square", "red box"], 0)},
        {"ref_id": 1, "ann_id": 102, "image_id": 7, "split": "val", "category_id": 1,
         "file_name": "COCO_train2014_000000000007_102.jpg", "sentences": _sentences(["a box in red"], 2)},
        {"ref_id": 2, "ann_id": 103, "image_id": 7, "split": "test", "category_id": 1,
         "file_name": "COCO_train2014_000000000007_103.jpg",
         "sentences": _sentences(["one", "two", "three"], 3)},
        {"ref_id": 3, "ann_id": 104, "image_id": 8, "split": "test", "category_id": 2,
         "file_name": "COCO_train2014_000000000008_104.jpg", "sentences": _sentences(["the dark thing"], 6)},
    ]
    (root / "refcocog").mkdir()
    (root / "refcocog" / "instances.json").write_text(json.dumps(instances))
    (root / "refcocog" / "refs(umd).p").write_bytes(pickle.dumps(refs, protocol=2))
    return root


def test_refcocog_umd_splits_boxes_and_masks(refcocog_root):
    train = RefDataset(refcocog_root, "refcocog", "umd", "train")
    val = RefDataset(refcocog_root, "refcocog", "umd", "val")
    test = RefDataset(refcocog_root, "refcocog", "umd", "test")
    assert (len(train), len(val), len(test)) == (2, 1, 4)
    assert len(RefDataset(refcocog_root, "refcocog", "umd", "test", sentences="random")) == 2
    assert [train[0].expression, train[1].expression] == ["the red square", "red box"]
    assert [s.source for s in test] == [f"refcocog/umd/test ref 2 sent {i}" for i in range(3)] + [
        "refcocog/umd/test ref 3 sent 0"]
    square = _square_mask()
    for sample in (train[0], val[0], test[0]):  # polygon, compressed RLE, uncompressed RLE
        assert sample.box == (20.0, 5.0, 30.0, 15.0)
        assert sample.mask.dtype == bool and sample.mask.shape == (30, 40)
        assert int(sample.mask.sum()) == 100
        assert np.array_equal(sample.mask, square)
        assert sample.image.shape == (30, 40, 3)
        assert tuple(sample.image[10, 25]) == pytest.approx((255, 0, 0), abs=40)  # RGB, not BGR
    continuous = test[-1]
    assert continuous.box == (1.5, 2.25, 12.0, 22.25)
    # Rounded vertices (2, 2)-(12, 22): 11 columns x 21 rows.
    assert int(continuous.mask.sum()) == 11 * 21 and continuous.mask[2, 2] and not continuous.mask[23, 2]
    assert test[-1].image.shape == (60, 50, 3)
    assert test[-1:][0].source == test[3].source and test[-1].source == test[3].source
    with pytest.raises(IndexError):
        test[4]


def test_refer_layout_problems_are_named(refcocog_root):
    with pytest.raises(ValueError, match=r"no refs in split 'testB'.*\['test', 'train', 'val'\]"):
        RefDataset(refcocog_root, "refcocog", "umd", "testB")
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.p"):
        RefDataset(refcocog_root, "refcocog", "google", "val")
    with pytest.raises(ValueError, match="sentences"):
        RefDataset(refcocog_root, "refcocog", "umd", "val", sentences="first")
    moved = refcocog_root / "elsewhere"
    (refcocog_root / "images/train2014").rename(moved)
    with pytest.raises(FileNotFoundError, match=r"images/mscoco/images/train2014.*images/train2014.*image_dir="):
        RefDataset(refcocog_root, "refcocog", "umd", "val")
    # An explicit image folder is used as given.
    assert RefDataset(refcocog_root, "refcocog", "umd", "val", image_dir=moved)[0].image.shape == (30, 40, 3)


def test_corrupt_missing_and_wrong_size_images_are_named(refcocog_root):
    image_dir = refcocog_root / "images/train2014"
    dataset = RefDataset(refcocog_root, "refcocog", "umd", "test")  # indexes without reading images
    (image_dir / "COCO_train2014_000000000007.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match=r"COCO_train2014_000000000007\.jpg"):
        dataset[0]
    (image_dir / "COCO_train2014_000000000007.jpg").unlink()
    with pytest.raises(ValueError, match=r"COCO_train2014_000000000007\.jpg"):
        dataset[0]
    _write_jpg(image_dir / "COCO_train2014_000000000008.jpg", np.zeros((50, 60, 3), np.uint8))
    with pytest.raises(ValueError, match=r"000000000008\.jpg is 60x50 px; instances\.json says 50x60"):
        dataset[3]
    with pytest.raises(ValueError, match="cannot read image"):
        read_rgb(image_dir / "absent.png")


@pytest.mark.parametrize("content, message", [
    (b"this is not a pickle", "not a readable pickle"),
    (pickle.dumps({"refs": []}), "must hold a list of refs, holds a dict"),
    (pickle.dumps(["ref"]), "entry 0 is a str, not a dict"),
    (pickle.dumps([{"ref_id": 1, "ann_id": 2, "image_id": 3, "split": "val"}]), r"lacks the keys \['sentences'\]"),
    (pickle.dumps([{"ref_id": 1, "ann_id": 2, "image_id": 3, "split": "val", "sentences": []}]), "non-empty list"),
])
def test_malformed_refs_file_is_refused(tmp_path, content, message):
    (tmp_path / "images/train2014").mkdir(parents=True)
    (tmp_path / "broken").mkdir()
    refs_path = tmp_path / "broken" / "refs(unc).p"
    refs_path.write_bytes(content)
    (tmp_path / "broken" / "instances.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(ValueError, match=message) as caught:
        RefDataset(tmp_path, "broken", "unc", "val")
    assert str(refs_path) in str(caught.value)


def test_malformed_instances_file_is_refused(refcocog_root):
    path = refcocog_root / "refcocog" / "instances.json"
    path.write_text('{"images": []}')
    with pytest.raises(ValueError, match=re.escape(str(path))):
        RefDataset(refcocog_root, "refcocog", "umd", "val")


def _python2_refs_pickle(sentence_utf8: bytes) -> bytes:
    """A protocol-2 pickle as Python 2 writes it: str values as byte strings (SHORT_BINSTRING)."""
    def string(data: bytes) -> bytes:
        return b"U" + bytes([len(data)]) + data

    def integer(value: int) -> bytes:
        return b"K" + bytes([value])

    sentence = b"}(" + string(b"sent") + string(sentence_utf8) + string(b"sent_id") + integer(0) + b"u"
    ref = (b"}(" + string(b"ref_id") + integer(0) + string(b"ann_id") + integer(101) + string(b"image_id")
           + integer(7) + string(b"split") + string(b"val") + string(b"sentences") + b"](" + sentence + b"e" + b"u")
    return b"\x80\x02](" + ref + b"e."


def test_python2_refs_with_utf8_sentences(refcocog_root):
    (refcocog_root / "refcocog" / "refs(umd).p").write_bytes(_python2_refs_pickle("the café sign".encode()))
    assert RefDataset(refcocog_root, "refcocog", "umd", "val")[0].expression == "the café sign"


# ---------------------------------------------------------------------------------------------
# ReasonSeg
# ---------------------------------------------------------------------------------------------


def _rectangle(x1, y1, x2, y2):
    return [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]


@pytest.fixture
def reasonseg_root(tmp_path) -> Path:
    val = tmp_path / "val"
    _write_jpg(val / "a_chair.jpg", np.full((40, 50, 3), 128, np.uint8))
    (val / "a_chair.json").write_text(json.dumps({
        "text": ["what could I sit on?", "the chair"], "is_sentence": True,
        "shapes": [
            # The ignore hole is listed first: LISA paints by decreasing area, so the order does not matter.
            {"label": "ignore", "shape_type": "polygon", "points": _rectangle(15, 10, 19, 14), "image_name": "a.jpg"},
            {"label": "target", "shape_type": "polygon", "points": _rectangle(10, 5, 29, 24), "image_name": "a.jpg"},
            {"label": "flag", "shape_type": "polygon", "points": _rectangle(0, 0, 49, 39), "image_name": "a.jpg"},
        ],
    }))
    _write_jpg(val / "b_cup.jpg", np.full((40, 50, 3), 128, np.uint8))
    (val / "b_cup.json").write_text(json.dumps({
        "text": "the cup", "is_sentence": False,
        "shapes": [
            {"label": "target", "shape_type": "polygon", "points": _rectangle(22.7, 12.2, 26.9, 16.9)},  # truncated
            {"label": "ignore", "shape_type": "polygon", "points": _rectangle(20, 10, 39, 29)},
        ],
    }))
    return tmp_path


def test_reasonseg_samples(reasonseg_root):
    dataset = ReasonSegDataset(reasonseg_root, "val")
    assert len(dataset) == 3
    chair, chair_again, cup = dataset[0], dataset[1], dataset[2]
    assert [chair.expression, chair_again.expression, cup.expression] == ["what could I sit on?", "the chair",
                                                                          "the cup"]
    assert chair.source == "reasonseg/val a_chair text 0" and cup.source == "reasonseg/val b_cup text 0"
    assert chair.image.shape == (40, 50, 3) and chair.success is None
    assert int(chair.mask.sum()) == 20 * 20 - 5 * 5
    assert int(chair.ignore.sum()) == 5 * 5 and not (chair.mask & chair.ignore).any()
    assert chair.box == (10.0, 5.0, 30.0, 25.0)
    assert [dataset.is_sentence(i) for i in range(3)] == [True, True, False]
    # A target inside a larger ignore region stays target (the smaller polygon is painted last).
    assert int(cup.mask.sum()) == 5 * 5 and cup.box == (22.0, 12.0, 27.0, 17.0)
    assert int(cup.ignore.sum()) == 20 * 20 - 5 * 5


def test_reasonseg_problems_are_named(reasonseg_root):
    val = reasonseg_root / "val"
    _write_jpg(val / "c_lamp.jpg", np.zeros((40, 50, 3), np.uint8))
    with pytest.raises(ValueError, match=r"c_lamp\.json"):
        ReasonSegDataset(reasonseg_root, "val")
    (val / "c_lamp.json").write_text(json.dumps({"text": ["x"], "shapes": [{"label": "chair", "points": [[0, 0]]}]}))
    dataset = ReasonSegDataset(reasonseg_root, "val")
    with pytest.raises(ValueError, match=r"c_lamp\.json.*'chair'"):
        dataset[3]
    (val / "c_lamp.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"c_lamp\.json is not valid JSON"):
        ReasonSegDataset(reasonseg_root, "val")
    with pytest.raises(FileNotFoundError):
        ReasonSegDataset(reasonseg_root, "train")


# ---------------------------------------------------------------------------------------------
# Concatenation
# ---------------------------------------------------------------------------------------------


def test_concat(refcocog_root, tmp_path):
    reason_root = tmp_path / "rs"
    _write_jpg(reason_root / "val" / "x.jpg", np.zeros((40, 50, 3), np.uint8))
    (reason_root / "val" / "x.json").write_text(json.dumps({"text": ["q1", "q2"], "shapes": []}))
    refs = RefDataset(refcocog_root, "refcocog", "umd", "test")
    reasonseg = ReasonSegDataset(reason_root, "val")
    both = concat(refs, reasonseg)
    assert isinstance(both, ConcatSamples) and len(both) == 4 + 2
    assert [s.expression for s in both] == ["one", "two", "three", "the dark thing", "q1", "q2"]
    assert both[-1].box is None and not both[-1].mask.any()  # no target: empty mask, no box
    assert isinstance(both[4], Sample) and both[-2].expression == "q1"
    with pytest.raises(IndexError):
        both[6]
    assert len(concat()) == 0
    both.set_epoch(2)
    assert refs.epoch == 2


# ---------------------------------------------------------------------------------------------
# Leaving expressions out (the trainer drops those with control tokens of the model)
# ---------------------------------------------------------------------------------------------


def test_expressions_are_left_out_from_the_index_without_reading_images(refcocog_root, tmp_path):
    from lens_ros.training.data import drop_expressions

    def reject(text):
        return "a bad word" if "two" in text or "dark" in text or "q2" in text else None

    reason_root = tmp_path / "rs"
    _write_jpg(reason_root / "val" / "x.jpg", np.zeros((40, 50, 3), np.uint8))
    (reason_root / "val" / "x.json").write_text(json.dumps({"text": ["q1", "q2"], "shapes": []}))
    every = RefDataset(refcocog_root, "refcocog", "umd", "test")  # ref 2: one, two, three; ref 3: the dark thing
    drawn = RefDataset(refcocog_root, "refcocog", "umd", "test", sentences="random")
    reasonseg = ReasonSegDataset(reason_root, "val")
    images = refcocog_root / "images"
    images.rename(tmp_path / "elsewhere")  # no image may be read while filtering
    kept_every, dropped_every = drop_expressions(every, reject)
    kept_drawn, dropped_drawn = drop_expressions(drawn, reject)
    kept_both, dropped_both = drop_expressions(concat(every, reasonseg), reject)
    (tmp_path / "elsewhere").rename(images)

    assert dropped_every == dropped_drawn == ["refcocog/umd/test ref 2 sent 1: a bad word",
                                              "refcocog/umd/test ref 3 sent 0: a bad word"]
    assert [(s.expression, s.source) for s in kept_every] == [("one", "refcocog/umd/test ref 2 sent 0"),
                                                              ("three", "refcocog/umd/test ref 2 sent 2")]
    assert len(every) == 4 and len(drawn) == 2  # the originals are untouched
    assert len(kept_drawn) == 1  # ref 3 has no sentence left
    seen = set()
    for epoch in range(12):
        kept_drawn.set_epoch(epoch)
        seen.add(kept_drawn[0].expression)
    assert seen == {"one", "three"}
    assert [s.expression for s in kept_both] == ["one", "three", "q1"]
    assert dropped_both == dropped_every + ["reasonseg/val x text 1: a bad word"]
    # Nothing to leave out: the very same data set, its random draws unchanged.
    unchanged, none = drop_expressions(drawn, lambda text: None)
    assert unchanged is drawn and none == []
    kept_plain, dropped_plain = drop_expressions([every[0], every[1]], reject)  # any Sequence[Sample]
    assert [s.expression for s in kept_plain] == ["one"]
    assert dropped_plain == ["refcocog/umd/test ref 2 sent 1: a bad word"]

"""A small synthetic referring-expression data set, written in the refer layout RefDataset reads.

Why: the trainer, rewards and evaluation need an end-to-end data set that any machine (CI
included) can make in a second, with no download and a ground truth that is exact: every mask is
the polygon the shape was drawn with, every expression names exactly one shape of its image.

Layout written (the same as RefCOCO's, data set name "synthetic", split_by "unc"):
``root/synthetic/refs(unc).p``, ``root/synthetic/instances.json`` and the images in
``root/images/mscoco/images/train2014/``. The image files are named ``synthetic_<id>.jpg`` so that
writing into a root that also holds the real COCO images overwrites none of them.

Console script: ``lens-make-synthetic DIR [--images N] [--seed S] [--size WxH]`` (``main``).
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

DATASET_NAME = "synthetic"
SPLIT_BY = "unc"
IMAGE_SUBDIR = "images/mscoco/images/train2014"
# RGB; each drawn shape's colour is jittered a little around these.
COLOURS = {"red": (215, 45, 40), "green": (40, 160, 65), "blue": (40, 80, 215), "yellow": (240, 205, 30)}
KINDS = ("circle", "square", "triangle")
CATEGORY_IDS = {"circle": 1, "square": 2, "triangle": 3}
HELD_OUT_FRACTION = 0.15  # of the images, for val and for testA each; the rest is train
# "biggest"/"smallest" only where the area differs by this factor from every rival: visibly so.
SIZE_MARGIN = 1.3
GAP_PX = 6  # free space between shapes (their enclosing circles)
MAX_LAYOUT_ATTEMPTS = 200


@dataclass(frozen=True, eq=False)  # shapes compare by identity: two alike shapes are still two
class _Shape:
    kind: str
    colour: str
    polygon: np.ndarray  # (N, 2) int32 vertices, exactly what is drawn and annotated
    area: int  # pixels filled
    x1: int
    y1: int
    x2: int
    y2: int

    # Strict relations: one shape's extent ends before the other's begins, so that no viewer doubts them.
    def left_of(self, other: _Shape) -> bool:
        return self.x2 < other.x1

    def right_of(self, other: _Shape) -> bool:
        return self.x1 > other.x2

    def above(self, other: _Shape) -> bool:
        return self.y2 < other.y1

    def below(self, other: _Shape) -> bool:
        return self.y1 > other.y2


RELATIONS: dict[str, Callable[[_Shape, _Shape], bool]] = {
    "left of": _Shape.left_of, "right of": _Shape.right_of, "above": _Shape.above, "below": _Shape.below,
}
# For "the leftmost X": t is strictly left of every other X, etc.
EXTREMES: dict[str, Callable[[_Shape, _Shape], bool]] = {
    "leftmost": _Shape.left_of, "rightmost": _Shape.right_of, "topmost": _Shape.above, "bottommost": _Shape.below,
}


def _shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Integer vertices of a shape that fits in the circle (cx, cy, radius)."""
    if kind == "circle":
        angles = np.linspace(0.0, 2 * math.pi, 40, endpoint=False)
        points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    elif kind == "square":
        angles = angle + np.array([0.25, 0.75, 1.25, 1.75]) * math.pi  # corners at radius: half side = r / sqrt 2
        points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    elif kind == "triangle":
        angles = angle - math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    return np.rint(points).astype(np.int32)


def _layout(rng: np.random.Generator, width: int, height: int) -> list[_Shape]:
    """2-4 shapes whose enclosing circles keep GAP_PX apart and stay inside the image."""
    count = int(rng.integers(2, 5))
    short_side = min(width, height)
    for _attempt in range(MAX_LAYOUT_ATTEMPTS):
        circles: list[tuple[float, float, float]] = []
        shapes: list[_Shape] = []
        for _ in range(count):
            for _try in range(50):
                radius = float(rng.uniform(0.08, 0.22) * short_side)
                cx = float(rng.uniform(radius + 3, width - radius - 3))
                cy = float(rng.uniform(radius + 3, height - radius - 3))
                if all(math.hypot(cx - ox, cy - oy) > radius + other + GAP_PX for ox, oy, other in circles):
                    break
            else:
                break  # no room: lay the image out afresh
            circles.append((cx, cy, radius))
            kind = KINDS[int(rng.integers(len(KINDS)))]
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            polygon = _shape_polygon(kind, cx, cy, radius, float(rng.uniform(-0.35, 0.35)))
            mask = np.zeros((height, width), dtype=np.uint8)
            cv2.fillPoly(mask, [polygon], 1)
            x1, y1 = polygon.min(axis=0)
            x2, y2 = polygon.max(axis=0)
            shapes.append(_Shape(kind, colour, polygon, int(mask.sum()), int(x1), int(y1), int(x2), int(y2)))
        if len(shapes) == count:
            return shapes
    raise RuntimeError(f"could not place {count} shapes in a {width}x{height} image; use a larger size")


def _is_biggest(shape: _Shape, group: Sequence[_Shape]) -> bool:
    rivals = [other for other in group if other is not shape]
    return bool(rivals) and any(s is shape for s in group) and shape.area >= SIZE_MARGIN * max(o.area for o in rivals)


def _is_smallest(shape: _Shape, group: Sequence[_Shape]) -> bool:
    rivals = [other for other in group if other is not shape]
    return bool(rivals) and any(s is shape for s in group) and shape.area * SIZE_MARGIN <= min(o.area for o in rivals)


def _is_extreme(shape: _Shape, group: Sequence[_Shape], relation: Callable[[_Shape, _Shape], bool]) -> bool:
    rivals = [other for other in group if other is not shape]
    return bool(rivals) and any(s is shape for s in group) and all(relation(shape, other) for other in rivals)


def referring_expressions(target: _Shape, shapes: Sequence[_Shape]) -> list[str]:
    """Every expression of the grammar below that fits ``target`` and no other shape of the image.

    Each candidate is a (text, predicate) pair; it is kept only if exactly the target satisfies the
    predicate among all shapes, so the text is unambiguous by construction, whatever the layout.
    """
    candidates: list[tuple[str, Callable[[_Shape], bool]]] = []
    # Nouns: (words, membership test).
    nouns: list[tuple[str, Callable[[_Shape], bool]]] = [("shape", lambda s: True)]
    nouns += [(kind, lambda s, k=kind: s.kind == k) for kind in KINDS]
    nouns += [(f"{colour} shape", lambda s, c=colour: s.colour == c) for colour in COLOURS]
    nouns += [(f"{colour} {kind}", lambda s, c=colour, k=kind: s.colour == c and s.kind == k)
              for colour in COLOURS for kind in KINDS]
    for words, member in nouns[1:]:  # "the shape" alone is never worth saying
        candidates.append((f"the {words}", member))
    for words, member in nouns:
        group = [s for s in shapes if member(s)]
        candidates.append((f"the biggest {words}", lambda s, g=group: _is_biggest(s, g)))
        candidates.append((f"the smallest {words}", lambda s, g=group: _is_smallest(s, g)))
        for extreme, relation in EXTREMES.items():
            candidates.append((f"the {extreme} {words}", lambda s, g=group, r=relation: _is_extreme(s, g, r)))
    # Relations to a landmark that "the <colour> <kind>" names unambiguously.
    for landmark in shapes:
        if landmark is target:
            continue
        if [s for s in shapes if s.colour == landmark.colour and s.kind == landmark.kind] != [landmark]:
            continue
        for words, member in nouns[:4]:  # "shape", "circle", "square", "triangle"
            for relation_words, relation in RELATIONS.items():
                candidates.append((
                    f"the {words} {relation_words} the {landmark.colour} {landmark.kind}",
                    lambda s, m=member, r=relation, lm=landmark: s is not lm and m(s) and r(s, lm),
                ))
    return [text for text, predicate in candidates if [s for s in shapes if predicate(s)] == [target]]


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A light, textured (blotches + stripes + grain) uint8 RGB background."""
    base = rng.uniform(210.0, 240.0, size=3)
    blotches = cv2.resize(rng.normal(0.0, 7.0, size=(height // 16 + 2, width // 16 + 2, 3)), (width, height),
                          interpolation=cv2.INTER_CUBIC)
    angle = rng.uniform(0.0, math.pi)
    period = rng.uniform(12.0, 40.0)
    ys, xs = np.mgrid[0:height, 0:width]
    stripes = 4.0 * np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)
    grain = rng.normal(0.0, 3.0, size=(height, width, 1))
    return np.clip(base + blotches + stripes[..., None] + grain, 175, 252).astype(np.uint8)


def _split_names(rng: np.random.Generator, n_images: int) -> list[str]:
    """Each image's split, at random: ~70/15/15 train/val/testA, each split non-empty from 3 images on."""
    held_out = max(1, round(HELD_OUT_FRACTION * n_images)) if n_images >= 3 else 0
    names = ["train"] * (n_images - 2 * held_out) + ["val"] * held_out + ["testA"] * held_out
    return [names[int(i)] for i in rng.permutation(n_images)]


def _generate(root: Path, n_images: int, size: tuple[int, int], seed: int) -> dict:
    """Write the data set; return counts per split for reporting."""
    width, height = (int(side) for side in size)
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    if width < 64 or height < 64:
        raise ValueError(f"size must be at least 64x64 px, got {width}x{height}")
    rng = np.random.default_rng(seed)
    data_dir = root / DATASET_NAME
    image_dir = root / IMAGE_SUBDIR
    data_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    splits = _split_names(rng, n_images)
    images, annotations, refs = [], [], []
    summary = {name: {"images": 0, "refs": 0, "sentences": 0} for name in ("train", "val", "testA")}
    ann_id = 0
    sent_id = 0
    for image_index in range(n_images):
        image_id = image_index + 1
        for _attempt in range(MAX_LAYOUT_ATTEMPTS):
            shapes = _layout(rng, width, height)
            expressions = [referring_expressions(shape, shapes) for shape in shapes]
            if all(expressions):
                break
        else:
            raise RuntimeError("could not lay out an image whose shapes all have an unambiguous expression")
        picture = _background(rng, width, height)
        file_name = f"{DATASET_NAME}_{image_id:06d}.jpg"
        split = splits[image_index]
        summary[split]["images"] += 1
        for shape, texts in zip(shapes, expressions):
            ann_id += 1
            colour = np.clip(np.array(COLOURS[shape.colour]) + rng.integers(-12, 13, size=3), 0, 255)
            cv2.fillPoly(picture, [shape.polygon], tuple(int(v) for v in colour))
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[shape.kind],
                "segmentation": [[float(v) for v in shape.polygon.ravel()]], "area": float(shape.area),
                "bbox": [float(shape.x1), float(shape.y1), float(shape.x2 - shape.x1), float(shape.y2 - shape.y1)],
                "iscrowd": 0,
            })
            chosen = rng.choice(len(texts), size=min(int(rng.integers(1, 4)), len(texts)), replace=False)
            sentences = []
            for choice in chosen:
                text = texts[int(choice)]
                sentences.append({"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text})
                sent_id += 1
            refs.append({
                "image_id": image_id, "split": split, "sentences": sentences,
                "file_name": f"{DATASET_NAME}_{image_id:06d}_{ann_id}.jpg", "category_id": CATEGORY_IDS[shape.kind],
                "ann_id": ann_id, "sent_ids": [s["sent_id"] for s in sentences], "ref_id": len(refs),
            })
            summary[split]["refs"] += 1
            summary[split]["sentences"] += len(sentences)
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode {file_name}")
        (image_dir / file_name).write_bytes(encoded.tobytes())
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    instances = {
        "info": {"description": f"lens_ros synthetic referring data, seed {seed}"},
        "images": images, "annotations": annotations,
        "categories": [{"id": i, "name": kind, "supercategory": "shape"} for kind, i in CATEGORY_IDS.items()],
    }
    (data_dir / "instances.json").write_text(json.dumps(instances), encoding="utf-8")
    # Protocol 2, as the refer release's Python 2 pickles; RefDataset reads either.
    (data_dir / f"refs({SPLIT_BY}).p").write_bytes(pickle.dumps(refs, protocol=2))
    return summary


def make_synthetic_refer(root: str | Path, n_images: int = 60, size: tuple[int, int] = (320, 240),
                         seed: int = 0) -> Path:
    """Write the synthetic data set under ``root``; return ``root`` (what RefDataset takes).

    ``size`` is (width, height). Same arguments, same bytes in every file. Read it back with
    ``RefDataset(root, dataset="synthetic", split_by="unc", split="train" | "val" | "testA")``.
    """
    root = Path(root)
    _generate(root, n_images, size, seed)
    return root


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` as (width, height); argparse's error type, so it also serves as an argparse ``type``."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 320x240, got {text!r}") from None
    return width, height


def main(argv: Sequence[str] | None = None) -> int:
    """lens-make-synthetic: write the synthetic refer-layout data set and say what was written."""
    parser = argparse.ArgumentParser(prog="lens-make-synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="root folder (as for RefDataset); created if missing")
    parser.add_argument("--images", type=int, default=60, help="number of images (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=parse_size, default=(320, 240), help="image size WxH (default 320x240)")
    args = parser.parse_args(argv)
    try:
        summary = _generate(args.dir, args.images, args.size, args.seed)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"lens-make-synthetic: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.dir / DATASET_NAME / f'refs({SPLIT_BY}).p'}")
    print(f"wrote {args.dir / DATASET_NAME / 'instances.json'}")
    print(f"wrote {args.images} images ({args.size[0]}x{args.size[1]}) to {args.dir / IMAGE_SUBDIR}")
    for split, counts in summary.items():
        print(f"  {split}: {counts['images']} images, {counts['refs']} refs, {counts['sentences']} sentences")
    print(f"read it with RefDataset({str(args.dir)!r}, dataset={DATASET_NAME!r}, split_by={SPLIT_BY!r}, split=...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

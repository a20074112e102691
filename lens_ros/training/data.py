"""Training and evaluation samples, read from the layouts the public data sets ship in.

One sample type (``Sample``) for every source, so that the trainer and the evaluator need not
know where an image came from. Data sets are lazy ``Sequence[Sample]``: they read their index
files (small) when constructed, so that a wrong path or a malformed file fails at once, and read
images and masks (large) only in ``__getitem__``.

Layouts read here:

* ``RefDataset``: RefCOCO / RefCOCO+ / RefCOCOg in the ``refer`` layout (LENS §4 "Data"),
  ``root/<dataset>/refs(<split_by>).p`` + ``root/<dataset>/instances.json`` + COCO train2014
  images.
* ``ReasonSegDataset``: LISA's ReasonSeg folders, ``root/<split>/<name>.jpg`` + ``<name>.json``.
* ``EpisodeDataset``: episodes the node recorded (``lens_ros.episodes`` bags), labelled by the
  operators' Feedback.

Only numpy, OpenCV and the standard library are needed: masks in COCO's RLE are decoded here
(pycocotools is not a dependency of this package).
"""

from __future__ import annotations

import bisect
import copy
import json
import pickle
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

Box = tuple[float, float, float, float]
# Why a text must not be used (e.g. it holds a control token of the model), or None to keep it.
Reject = Callable[[str], "str | None"]


@dataclass
class Sample:
    """One image + referring expression, with whatever ground truth or feedback the source has."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    expression: str  # the referring expression / command
    box: Box | None  # ground truth x1, y1, x2, y2 in source pixels (continuous), or None
    mask: np.ndarray | None  # ground truth bool (H, W), or None
    success: bool | None  # operator feedback label (episodes), or None
    source: str  # where it came from, e.g. "refcoco/unc/val ref 1234 sent 0" (for reports)
    # Pixels that evaluation leaves out of both intersection and union (ReasonSeg's "ignore"
    # polygons, LISA's label 255), bool (H, W); None where the source has none.
    ignore: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------
# Images and masks
# ---------------------------------------------------------------------------------------------


def read_rgb(path: str | Path, apply_exif_orientation: bool = True) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB, or raise a ValueError naming the file.

    ``apply_exif_orientation=False`` keeps the pixels as stored: COCO's annotations were made on
    the stored pixels (PIL does not rotate by EXIF), whereas OpenCV's default rotates them.
    The bytes are decoded with ``cv2.imdecode`` so that non-ASCII paths work everywhere.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise ValueError(f"cannot read image {path}: {error.strerror or error}") from error
    flags = cv2.IMREAD_COLOR if apply_exif_orientation else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None:
        raise ValueError(f"cannot decode image {path}: empty, corrupt or not an image format OpenCV reads")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons (each a flat ``[x1, y1, x2, y2, ...]``) into one bool mask.

    Each polygon is filled on its own (``cv2.fillPoly`` on rounded vertices) and the results
    united, as COCO merges an object's parts; filling them in one call would apply OpenCV's
    even-odd rule where parts overlap.
    """
    mask = np.zeros((height, width), dtype=np.uint8)
    for polygon in polygons:
        coords = np.asarray(polygon, dtype=np.float64).ravel()
        if coords.size % 2:
            raise ValueError(f"polygon has an odd number of coordinates ({coords.size})")
        if coords.size < 6:
            continue  # fewer than 3 vertices: no area (COCO has a few such degenerate parts)
        points = np.rint(coords.reshape(-1, 2)).astype(np.int32)
        cv2.fillPoly(mask, [points], 1)
    return mask.astype(bool)


def rle_counts_from_string(counts: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string into run lengths (``rleFrString`` in maskApi.c).

    Each count is written in 5-bit groups, least significant first, as characters from '0' (48):
    bit 0x20 says another group follows, bit 0x10 of the last group is the sign. From the fourth
    count on, the string holds the difference to the count two places before.
    """
    text = counts.decode("ascii") if isinstance(counts, bytes) else counts
    runs: list[int] = []
    position = 0
    while position < len(text):
        value = 0
        shift = 0
        more = True
        while more:
            if position >= len(text):
                raise ValueError(f"truncated compressed RLE string {text!r}")
            group = ord(text[position]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"invalid character {text[position]!r} in compressed RLE string")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift  # negative: extend the sign
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def rle_counts_to_string(runs: Sequence[int]) -> str:
    """Encode run lengths as COCO's compressed RLE string (``rleToString``); inverse of the above."""
    characters: list[str] = []
    for index, run in enumerate(runs):
        value = int(run) - (int(runs[index - 2]) if index > 2 else 0)
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = value != -1 if group & 0x10 else value != 0
            if more:
                group |= 0x20
            characters.append(chr(group + 48))
    return "".join(characters)


def rle_to_mask(rle: dict) -> np.ndarray:
    """Decode a COCO RLE (``{"size": [h, w], "counts": str | bytes | list[int]}``) to a bool mask.

    Runs alternate background/foreground starting with background, over the pixels in
    column-major (Fortran) order.
    """
    try:
        height, width = (int(side) for side in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"not a COCO RLE (needs 'size': [h, w] and 'counts'): {error}") from error
    runs = rle_counts_from_string(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if any(run < 0 for run in runs) or sum(runs) != height * width:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels (or are negative); size {height}x{width} needs "
                         f"{height * width}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((height, width), order="F")


def mask_to_rle(mask: np.ndarray) -> dict:
    """Encode a bool (H, W) mask as compressed COCO RLE (for writing masks the way COCO tools read)."""
    mask = np.asarray(mask, dtype=bool)
    flat = mask.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    boundaries = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(boundaries).tolist()
    if flat.size and flat[0]:
        runs.insert(0, 0)  # runs start with background
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle_counts_to_string(runs)}


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO annotation's ``segmentation`` (polygons, or RLE compressed or not) as bool (H, W)."""
    if isinstance(segmentation, dict):
        mask = rle_to_mask(segmentation)
        if mask.shape != (height, width):
            raise ValueError(f"RLE size {mask.shape[0]}x{mask.shape[1]} differs from the image's {height}x{width}")
        return mask
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    raise ValueError(f"segmentation must be a list of polygons or an RLE dict, got {type(segmentation).__name__}")


def mask_box(mask: np.ndarray) -> Box | None:
    """The box around a mask's pixels, pixel edges (x2, y2 one past the last pixel); None if empty.

    Edges rather than pixel centres, so that a box of a W x H region has width W, as COCO's
    ``[x, y, w, h]`` boxes do.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    columns = np.flatnonzero(mask.any(axis=0))
    return float(columns[0]), float(rows[0]), float(columns[-1] + 1), float(rows[-1] + 1)


# ---------------------------------------------------------------------------------------------
# RefCOCO / RefCOCO+ / RefCOCOg (refer layout)
# ---------------------------------------------------------------------------------------------

# The splits the public refs files define, (dataset, split_by) -> splits, for callers that evaluate
# on all of them; RefDataset itself accepts any split the refs file has (the synthetic set: testA).
STANDARD_SPLITS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}
REQUIRED_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
# Where refer keeps COCO's train2014 images (all RefCOCO images are from it), then a flatter one.
IMAGE_DIR_CANDIDATES = ("images/mscoco/images/train2014", "images/train2014")


def _load_refs(path: Path) -> list[dict]:
    """Load and check a refs(<split_by>).p file.

    pickle can run code while loading, so it is used on this file only, which is trusted input:
    it comes from the refer data release (or lens-make-synthetic), never from a robot or a user.
    The files were written by Python 2; a non-ASCII byte string is read as latin-1 and its
    sentences re-decoded as UTF-8 (see ``_sentence_text``).
    """
    try:
        with path.open("rb") as file:
            try:
                refs = pickle.load(file)  # trusted input, see the docstring
            except UnicodeDecodeError:
                file.seek(0)
                refs = pickle.load(file, encoding="latin1")
    except OSError:
        raise
    except Exception as error:  # unpickling raises many types for a file that is not a pickle
        raise ValueError(f"refs file {path} is not a readable pickle: {type(error).__name__}: {error}") from error
    if not isinstance(refs, list):
        raise ValueError(f"refs file {path} must hold a list of refs, holds a {type(refs).__name__}")
    for index, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise ValueError(f"refs file {path}: entry {index} is a {type(ref).__name__}, not a dict")
        missing = [key for key in REQUIRED_REF_KEYS if key not in ref]
        if missing:
            raise ValueError(f"refs file {path}: entry {index} lacks the keys {missing} "
                             f"(needs {list(REQUIRED_REF_KEYS)})")
        sentences = ref["sentences"]
        if (not isinstance(sentences, list) or not sentences
                or not all(isinstance(s, dict) and ("sent" in s or "raw" in s) for s in sentences)):
            raise ValueError(f"refs file {path}: entry {index} (ref_id {ref['ref_id']}) needs a non-empty list of "
                             "sentences, each a dict with 'sent' or 'raw'")
    return refs


def _sentence_text(sentence: dict) -> str:
    """The processed sentence (refer's 'sent', else 'raw'), undoing a latin-1 read of UTF-8."""
    text = str(sentence.get("sent", sentence.get("raw", ""))).strip()
    try:
        return text.encode("latin1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _load_instances(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """Read instances.json; return its images and annotations by id, or raise a ValueError."""
    try:
        with path.open("r", encoding="utf-8") as file:
            instances = json.load(file)
        images = {int(image["id"]): image for image in instances["images"]}
        annotations = {int(annotation["id"]): annotation for annotation in instances["annotations"]}
    except OSError:
        raise
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"instances file {path} is not COCO-style JSON with 'images' and 'annotations' lists "
                         f"of dicts with 'id': {type(error).__name__}: {error}") from error
    return images, annotations


def drop_expressions(samples: Sequence[Sample], reject: Reject) -> tuple[Sequence[Sample], list[str]]:
    """``samples`` without the expressions ``reject`` refuses, and one line ``"<source>: <reason>"``
    per expression left out.

    The data sets here hold their expressions in memory: they leave them out of their index and
    read no image (a RefDataset with random sentences draws only from the sentences left; a ref
    with none left is dropped). The originals are not changed; when nothing is left out, the same
    object comes back. Any other sequence is read sample by sample.
    """
    if isinstance(samples, _LazySamples):
        return samples.without_expressions(reject)
    return _drop_by_reading(samples, reject)


def _drop_by_reading(samples: Sequence[Sample], reject: Reject) -> tuple[Sequence[Sample], list[str]]:
    kept, dropped = [], []
    for sample in samples:
        reason = reject(sample.expression)
        if reason is None:
            kept.append(sample)
        else:
            dropped.append(f"{sample.source}: {reason}")
    return (kept if dropped else samples), dropped


class _LazySamples(Sequence):
    """A Sequence[Sample] that loads sample ``index`` in ``_sample`` (slices and negative indices
    handled here, once for every data set)."""

    def _sample(self, index: int) -> Sample:
        raise NotImplementedError

    def without_expressions(self, reject: Reject) -> tuple[Sequence[Sample], list[str]]:
        """See ``drop_expressions``; data sets that hold their expressions override this."""
        return _drop_by_reading(self, reject)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return self._sample(index)


@dataclass(frozen=True)
class _RefEntry:
    image_path: Path
    height: int
    width: int
    annotation: dict
    sentences: tuple[str, ...]
    source: str  # without the sentence part


class RefDataset(_LazySamples):
    """RefCOCO / RefCOCO+ / RefCOCOg (and any data set in the same layout) as a lazy Sequence[Sample].

    ``sentences="all"``: one sample per sentence (evaluation reports per sentence).
    ``sentences="random"``: one sample per ref, with one of its sentences drawn at random (training,
    LENS §4). The draw depends on (seed, epoch, index) only, so that runs repeat; call
    ``set_epoch`` each epoch to draw afresh.

    Image file names come from instances.json's images (a ref's own ``file_name`` carries an
    ``_<ann_id>`` suffix in the refer release); images are read without EXIF rotation, as COCO's
    annotations expect. Boxes are COCO's ``[x, y, w, h]`` as ``(x, y, x + w, y + h)``.
    """

    def __init__(self, root: str | Path, dataset: str = "refcoco", split_by: str = "unc", split: str = "val",
                 sentences: str = "all", seed: int = 0, image_dir: str | Path | None = None):
        if sentences not in ("all", "random"):
            raise ValueError(f"sentences must be 'all' or 'random', got {sentences!r}")
        self.root = Path(root)
        self.dataset = dataset
        self.split_by = split_by
        self.split = split
        self.sentences = sentences
        self.seed = seed
        self.epoch = 0
        data_dir = self.root / dataset
        refs_path = data_dir / f"refs({split_by}).p"
        if not refs_path.is_file():
            present = sorted(p.name for p in data_dir.glob("refs(*).p")) if data_dir.is_dir() else []
            raise FileNotFoundError(f"no refs file {refs_path}" + (f"; that folder has {present}" if present else ""))
        self.image_dir = self._find_image_dir(image_dir)
        refs = _load_refs(refs_path)
        instances_path = data_dir / "instances.json"
        images, annotations = _load_instances(instances_path)

        split_refs = [ref for ref in refs if ref["split"] == split]
        if not split_refs:
            splits = sorted({str(ref["split"]) for ref in refs})
            raise ValueError(f"refs file {refs_path} has no refs in split {split!r}; its splits are {splits}")
        self._entries: list[_RefEntry] = []
        for ref in split_refs:
            annotation = annotations.get(int(ref["ann_id"]))
            if annotation is None:
                raise ValueError(f"ref {ref['ref_id']} in {refs_path} names annotation {ref['ann_id']}, "
                                 f"which {instances_path} lacks")
            image = images.get(int(ref["image_id"]))
            if image is None:
                raise ValueError(f"ref {ref['ref_id']} in {refs_path} names image {ref['image_id']}, "
                                 f"which {instances_path} lacks")
            self._entries.append(_RefEntry(
                image_path=self.image_dir / image["file_name"],
                height=int(image["height"]),
                width=int(image["width"]),
                annotation=annotation,
                sentences=tuple(_sentence_text(sentence) for sentence in ref["sentences"]),
                source=f"{dataset}/{split_by}/{split} ref {ref['ref_id']}",
            ))
        self._excluded: frozenset[tuple[int, int]] = frozenset()  # (entry, sentence) left out
        self._index = self._build_index()

    def _sentence_choices(self, entry_index: int) -> list[int]:
        count = len(self._entries[entry_index].sentences)
        return [s for s in range(count) if (entry_index, s) not in self._excluded]

    def _build_index(self) -> list[tuple[int, int]]:
        """(entry, sentence) pairs for "all"; entries alone (with a sentence left) for "random"."""
        choices = [self._sentence_choices(e) for e in range(len(self._entries))]
        if self.sentences == "all":
            return [(e, s) for e, sentences in enumerate(choices) for s in sentences]
        return [(e, -1) for e, sentences in enumerate(choices) if sentences]

    def without_expressions(self, reject: Reject) -> tuple["RefDataset", list[str]]:
        excluded, dropped = set(self._excluded), []
        for e, entry in enumerate(self._entries):
            for s in self._sentence_choices(e):
                reason = reject(entry.sentences[s])
                if reason is not None:
                    excluded.add((e, s))
                    dropped.append(f"{entry.source} sent {s}: {reason}")
        if not dropped:
            return self, []
        kept = copy.copy(self)
        kept._excluded = frozenset(excluded)
        kept._index = kept._build_index()
        return kept, dropped

    def _find_image_dir(self, image_dir: str | Path | None) -> Path:
        if image_dir is not None:
            path = Path(image_dir)
            if not path.is_dir():
                raise FileNotFoundError(f"image_dir {path} is not a folder")
            return path
        for candidate in IMAGE_DIR_CANDIDATES:
            if (self.root / candidate).is_dir():
                return self.root / candidate
        tried = ", ".join(str(self.root / c) for c in IMAGE_DIR_CANDIDATES)
        raise FileNotFoundError(f"no COCO train2014 image folder found (tried {tried}); pass image_dir=")

    def set_epoch(self, epoch: int) -> None:
        """Draw other random sentences (``sentences="random"``) from now on; no effect for "all"."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._index)

    def _sample(self, index: int) -> Sample:
        entry_index, sentence_index = self._index[index]
        entry = self._entries[entry_index]
        if sentence_index < 0:
            rng = random.Random(f"{self.seed}/{self.epoch}/{index}")  # str seeds hash stably across runs
            choices = self._sentence_choices(entry_index)  # all sentences unless some were left out
            sentence_index = choices[rng.randrange(len(choices))]
        image = read_rgb(entry.image_path, apply_exif_orientation=False)
        if image.shape[:2] != (entry.height, entry.width):
            raise ValueError(f"image {entry.image_path} is {image.shape[1]}x{image.shape[0]} px; instances.json says "
                             f"{entry.width}x{entry.height} (wrong image folder?)")
        annotation = entry.annotation
        try:
            mask = segmentation_to_mask(annotation["segmentation"], entry.height, entry.width)
            x, y, w, h = (float(v) for v in annotation["bbox"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"annotation {annotation.get('id')} for {entry.source} is malformed: {error}") from error
        return Sample(image=image, expression=entry.sentences[sentence_index], box=(x, y, x + w, y + h), mask=mask,
                      success=None, source=f"{entry.source} sent {sentence_index}")

    def __repr__(self) -> str:
        return (f"RefDataset({self.dataset}/{self.split_by}/{self.split}, {len(self._entries)} refs, "
                f"{len(self)} samples, sentences={self.sentences!r})")


# ---------------------------------------------------------------------------------------------
# ReasonSeg (LISA's layout)
# ---------------------------------------------------------------------------------------------

REASONSEG_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def reasonseg_masks(shapes: list[dict], height: int, width: int, json_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Target and ignore masks from ReasonSeg's labelme shapes, exactly as LISA builds them.

    LISA (``get_mask_from_json``) paints the polygons from the largest to the smallest, each with
    ``cv2.polylines`` (1 px outline) + ``cv2.fillPoly`` on vertices truncated to int, target as 1
    and "ignore" as 255, so that a smaller polygon inside a larger one wins; "flag" shapes are
    skipped. The published ReasonSeg figures come from masks built this way.
    """
    polygons: list[tuple[int, np.ndarray, bool]] = []  # (area, points, is_ignore)
    for number, shape in enumerate(shapes):
        try:
            label = str(shape["label"]).lower()
            points = np.array([shape["points"]], dtype=np.float64).astype(np.int32)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{json_path}: shape {number} needs 'label' and 'points' [[x, y], ...]: "
                             f"{error}") from error
        if label == "flag":
            continue
        if "ignore" in label:
            is_ignore = True
        elif "target" in label:
            is_ignore = False
        else:
            raise ValueError(f"{json_path}: shape {number} has label {shape['label']!r}; "
                             "expected target, ignore or flag")
        if points.ndim != 3 or points.shape[-1] != 2:
            raise ValueError(f"{json_path}: shape {number}'s points are not a list of [x, y]")
        area_mask = np.zeros((height, width), dtype=np.uint8)
        cv2.polylines(area_mask, points, True, 1, 1)
        cv2.fillPoly(area_mask, points, 1)
        polygons.append((int(area_mask.sum()), points, is_ignore))
    label_map = np.zeros((height, width), dtype=np.uint8)
    # Largest first; the order of polygons of equal area (LISA's argsort leaves it unspecified)
    # matters only where such polygons overlap, which ReasonSeg's do not.
    for _area, points, is_ignore in sorted(polygons, key=lambda item: -item[0]):
        value = 255 if is_ignore else 1
        cv2.polylines(label_map, points, True, value, 1)
        cv2.fillPoly(label_map, points, value)
    return label_map == 1, label_map == 255


@dataclass(frozen=True)
class _ReasonSegEntry:
    image_path: Path
    json_path: Path
    texts: tuple[str, ...]
    is_sentence: bool


class ReasonSegDataset(_LazySamples):
    """ReasonSeg (LISA) as a lazy Sequence[Sample]: one sample per text of each image.

    Layout: ``root/<split>/<name>.jpg`` with ``root/<split>/<name>.json`` holding ``text`` (a list of
    queries, or one string), ``is_sentence`` and labelme ``shapes``. The mask is the "target"
    polygons less the "ignore" ones (see ``reasonseg_masks``); the ignore pixels are also returned
    in ``Sample.ignore`` for evaluation. The box is the mask's bounding box (None if empty).
    Images are read with their EXIF rotation applied, as labelme showed them to the annotators.
    """

    def __init__(self, root: str | Path, split: str = "val"):
        self.root = Path(root)
        self.split = split
        folder = self.root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"no ReasonSeg split folder {folder}")
        image_paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in REASONSEG_IMAGE_SUFFIXES)
        if not image_paths:
            raise ValueError(f"ReasonSeg folder {folder} has no images ({', '.join(REASONSEG_IMAGE_SUFFIXES)})")
        self._entries: list[_ReasonSegEntry] = []
        for image_path in image_paths:
            json_path = image_path.with_suffix(".json")
            annotation = self._read_json(json_path)
            texts = annotation["text"]
            texts = [texts] if isinstance(texts, str) else list(texts)
            if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise ValueError(f"{json_path}: 'text' must be a non-empty string or list of non-empty strings")
            self._entries.append(_ReasonSegEntry(image_path, json_path, tuple(t.strip() for t in texts),
                                                 bool(annotation.get("is_sentence", False))))
        self._index = [(e, t) for e, entry in enumerate(self._entries) for t in range(len(entry.texts))]

    @staticmethod
    def _read_json(json_path: Path) -> dict:
        if not json_path.is_file():
            raise ValueError(f"ReasonSeg annotation file {json_path} is missing (every image needs one)")
        try:
            with json_path.open("r", encoding="utf-8") as file:
                annotation = json.load(file)
        except ValueError as error:
            raise ValueError(f"{json_path} is not valid JSON: {error}") from error
        if not (isinstance(annotation, dict) and "text" in annotation and isinstance(annotation.get("shapes"), list)):
            raise ValueError(f"{json_path} must be a JSON object with 'text' and a 'shapes' list")
        return annotation

    def __len__(self) -> int:
        return len(self._index)

    def _source(self, entry_index: int, text_index: int) -> str:
        return f"reasonseg/{self.split} {self._entries[entry_index].image_path.stem} text {text_index}"

    def without_expressions(self, reject: Reject) -> tuple["ReasonSegDataset", list[str]]:
        index, dropped = [], []
        for entry_index, text_index in self._index:
            reason = reject(self._entries[entry_index].texts[text_index])
            if reason is None:
                index.append((entry_index, text_index))
            else:
                dropped.append(f"{self._source(entry_index, text_index)}: {reason}")
        if not dropped:
            return self, []
        kept = copy.copy(self)
        kept._index = index
        return kept, dropped

    def _sample(self, index: int) -> Sample:
        entry_index, text_index = self._index[index]
        entry = self._entries[entry_index]
        image = read_rgb(entry.image_path, apply_exif_orientation=True)
        shapes = self._read_json(entry.json_path)["shapes"]
        mask, ignore = reasonseg_masks(shapes, image.shape[0], image.shape[1], entry.json_path)
        return Sample(image=image, expression=entry.texts[text_index], box=mask_box(mask), mask=mask, success=None,
                      source=self._source(entry_index, text_index), ignore=ignore)

    def is_sentence(self, index: int) -> bool:
        """Whether the sample's query is a long sentence (LISA reports ReasonSeg by this too)."""
        return self._entries[self._index[index][0]].is_sentence

    def __repr__(self) -> str:
        return f"ReasonSegDataset({self.root / self.split}, {len(self._entries)} images, {len(self)} samples)"


# ---------------------------------------------------------------------------------------------
# Episode bags (operator-labelled robot episodes)
# ---------------------------------------------------------------------------------------------


class EpisodeDataset(_LazySamples):
    """Recorded robot episodes as Samples: the frame the node answered, its command and the
    labels an operator's Feedback gives (the newest feedback about an episode wins).

    * A corrected mask and/or box in the feedback is the ground truth (a box alone: box only;
      a mask alone: its bounding box too).
    * ``success`` true without a correction confirms the robot's own answer: its mask and box
      become the labels (when it found something).
    * ``success`` false without a correction: only ``success`` is known (the success reward
      can still use it).
    * No feedback: unlabelled; kept only with ``labelled_only=False``.

    Episodes are decoded once at construction (a retraining set is hundreds to a few thousand
    frames; at 640x480 that is about 1 GB per thousand): the bags are streams, not indexable.
    """

    def __init__(self, path, labelled_only: bool = True):
        from lens_ros.episodes import read_episodes

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no episode bags at {self.path}")
        self._samples = [s for s in (self._to_sample(e) for e in read_episodes(self.path))
                         if not labelled_only or s.success is not None or s.mask is not None or s.box is not None]

    @staticmethod
    def _to_sample(episode) -> Sample:
        from lens_ros.image_messages import color_image_to_rgb

        image = color_image_to_rgb(episode.image).copy()
        height, width = image.shape[:2]
        seg = episode.segmentation
        box = mask = success = None
        if episode.feedback:
            verdict = episode.feedback[-1]
            success = bool(verdict.success)
            if verdict.mask.width and verdict.mask.height:
                mask = _mono8_mask(verdict.mask, (height, width), f"feedback for episode {episode.request_id}")
                box = mask_box(mask)
            if verdict.has_box:
                box = tuple(float(v) for v in verdict.box)
            if success and mask is None and box is None and seg.found:  # the answer confirmed as right
                box = tuple(float(v) for v in seg.box)
                if seg.mask.width and seg.mask.height:
                    mask = _mono8_mask(seg.mask, (height, width), f"episode {episode.request_id}")
        return Sample(image=image, expression=episode.command, box=box, mask=mask, success=success,
                      source=f"episode {episode.request_id} at {episode.stamp_ns}")

    def __len__(self) -> int:
        return len(self._samples)

    def _sample(self, index: int) -> Sample:
        return self._samples[index]

    def without_expressions(self, reject: Reject) -> tuple["EpisodeDataset", list[str]]:
        samples, dropped = _drop_by_reading(self._samples, reject)  # decoded already: nothing is read
        if not dropped:
            return self, []
        kept = copy.copy(self)
        kept._samples = list(samples)
        return kept, dropped

    def __repr__(self) -> str:
        return f"EpisodeDataset({str(self.path)!r}, {len(self)} samples)"


def _mono8_mask(msg, size_hw: tuple[int, int], what: str) -> np.ndarray:
    from lens_ros.image_messages import image_to_array

    pixels = image_to_array(msg)
    if pixels.shape[:2] != size_hw:
        raise ValueError(f"{what}: mask is {pixels.shape[1]}x{pixels.shape[0]}, image is {size_hw[1]}x{size_hw[0]}")
    return (pixels if pixels.ndim == 2 else pixels[..., 0]) > 0
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Combining data sets
# ---------------------------------------------------------------------------------------------


class ConcatSamples(_LazySamples):
    """Several Sequence[Sample] one after another, as one (like torch's ConcatDataset, without torch)."""

    def __init__(self, datasets: Sequence[Sequence[Sample]]):
        self.datasets = list(datasets)
        self._ends: list[int] = []
        total = 0
        for dataset in self.datasets:
            total += len(dataset)
            self._ends.append(total)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _sample(self, index: int) -> Sample:
        which = bisect.bisect_right(self._ends, index)
        start = self._ends[which - 1] if which else 0
        return self.datasets[which][index - start]

    def without_expressions(self, reject: Reject) -> tuple["ConcatSamples", list[str]]:
        parts = [drop_expressions(dataset, reject) for dataset in self.datasets]
        dropped = [line for _, lines in parts for line in lines]
        return (ConcatSamples([kept for kept, _ in parts]) if dropped else self), dropped

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the parts that draw per epoch (RefDataset with random sentences)."""
        for dataset in self.datasets:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)

    def __repr__(self) -> str:
        return f"ConcatSamples({', '.join(repr(d) for d in self.datasets)})"


def concat(*datasets: Sequence[Sample]) -> ConcatSamples:
    """The given data sets one after another, as one Sequence[Sample]."""
    return ConcatSamples(datasets)

"""Data specs: one short string per data set, read the same way by ``lens-train`` and ``lens-eval``.

* ``refer:ROOT[:DATASET[:SPLIT_BY[:SPLIT]]]``: RefCOCO / RefCOCO+ / RefCOCOg (or any data set in
  the refer layout, e.g. ``refer:DIR:synthetic:unc:val`` for a ``lens-make-synthetic`` folder);
  defaults refcoco, unc, and the train split for training, val for evaluation;
* ``reasonseg:ROOT[:SPLIT]``: LISA's ReasonSeg (split defaults as above);
* ``episodes:DIR``: episodes the node recorded (``EpisodeDataset``), labelled by operator feedback;
* ``synthetic[:N[:WxH[:SPLIT]]]``: the synthetic shapes data set, generated (always with seed 0,
  so training and evaluation see the same images) into ``<work_dir>/synthetic_data``;
  defaults 8 images of 80x64.

Training draws one random expression per ref and epoch (LENS §4); evaluation takes every
expression, as the published figures count them. ``~`` and ``$VARS`` in paths are expanded.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

DATA_SPEC_FORMS = ("refer:ROOT[:DATASET[:SPLIT_BY[:SPLIT]]]", "reasonseg:ROOT[:SPLIT]", "episodes:DIR",
                   "synthetic[:N[:WxH[:SPLIT]]]")
SYNTHETIC_DIR = "synthetic_data"
SYNTHETIC_DEFAULTS = (8, (80, 64))


class DataSpecError(ValueError):
    """A data spec that cannot be read; the message names the accepted forms."""


def _error(spec: str, problem: str) -> DataSpecError:
    return DataSpecError(f"data spec {spec!r}: {problem} (accepted: {'; '.join(DATA_SPEC_FORMS)})")


def _size(spec: str, text: str) -> tuple[int, int]:
    from lens_ros.training.synthetic import parse_size

    try:
        return parse_size(text)
    except argparse.ArgumentTypeError as exc:
        raise _error(spec, str(exc)) from None


def load_data_spec(spec: str, *, training: bool, work_dir: str | os.PathLike = ".", seed: int = 0):
    """One data spec as a lazy Sequence[Sample] (see the module docstring)."""
    from lens_ros.training import data

    default_split = "train" if training else "val"
    kind, _, rest = os.path.expanduser(os.path.expandvars(str(spec))).partition(":")
    parts = rest.split(":") if rest else []
    if kind == "refer":
        if not parts or not parts[0]:
            raise _error(spec, "refer needs a root")
        root, dataset, split_by, split = (parts + ["refcoco", "unc", default_split][len(parts) - 1:])[:4]
        return data.RefDataset(root, dataset=dataset, split_by=split_by, split=split,
                               sentences="random" if training else "all", seed=seed)
    if kind == "reasonseg":
        if not parts or not parts[0]:
            raise _error(spec, "reasonseg needs a root")
        return data.ReasonSegDataset(parts[0], split=parts[1] if len(parts) > 1 else default_split)
    if kind == "episodes":
        if not rest:
            raise _error(spec, "episodes needs a directory")
        try:
            return data.EpisodeDataset(rest)
        except ImportError as exc:  # rosbags / mcap are the optional `bags` extra
            raise DataSpecError(f"data spec {spec!r}: reading episode bags needs {exc.name or 'rosbags and mcap'} "
                                "(pip install 'lens_ros[bags]')") from exc
    if kind == "synthetic":
        from lens_ros.training.synthetic import make_synthetic_refer

        n_images = int(parts[0]) if parts and parts[0].isdigit() else SYNTHETIC_DEFAULTS[0]
        if parts and parts[0] and not parts[0].isdigit():
            raise _error(spec, f"the number of images must be a whole number, got {parts[0]!r}")
        size = _size(spec, parts[1]) if len(parts) > 1 else SYNTHETIC_DEFAULTS[1]
        split = parts[2] if len(parts) > 2 else default_split
        root = make_synthetic_refer(Path(work_dir) / SYNTHETIC_DIR, n_images=n_images, size=size, seed=0)
        return data.RefDataset(root, dataset="synthetic", split_by="unc", split=split,
                               sentences="random" if training else "all", seed=seed)
    raise _error(spec, f"unknown kind {kind!r}")


def load_data(specs: str | Sequence[str], *, training: bool, work_dir: str | os.PathLike = ".", seed: int = 0):
    """One spec or several (concatenated) as one Sequence[Sample]."""
    from lens_ros.training.data import concat

    specs = [specs] if isinstance(specs, str) else list(specs)
    datasets = [load_data_spec(spec, training=training, work_dir=work_dir, seed=seed) for spec in specs]
    return datasets[0] if len(datasets) == 1 else concat(*datasets)

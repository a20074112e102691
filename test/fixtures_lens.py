"""Shared fixtures for the model, pipeline and CLI tests: one tiny checkpoint per session."""

import cv2
import numpy as np
import pytest

from lens_ros.model.tiny import build_tiny_checkpoint

PHOTO = __import__("pathlib").Path(__file__).resolve().parents[1] / "lens_ros" / "data" / "coffee.jpg"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random LENS checkpoint written in the released layout."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from lens_ros.model.checkpoint import load_lens_model

    return load_lens_model(str(tiny_checkpoint))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model):
    from lens_ros.pipeline import LensPipeline, PipelineConfig

    model, processor = tiny_model
    return LensPipeline(model, processor, PipelineConfig(model="tiny", max_new_tokens=12))


@pytest.fixture(scope="session")
def photo_640x480():
    """The shipped demo photo (a real one), as 640x480 RGB."""
    bgr = cv2.imread(str(PHOTO))
    assert bgr is not None, PHOTO
    return np.ascontiguousarray(cv2.resize(bgr, (640, 480), interpolation=cv2.INTER_AREA)[:, :, ::-1])


@pytest.fixture(scope="session")
def photo_file():
    return PHOTO

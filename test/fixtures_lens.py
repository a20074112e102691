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


# The answer the scripted checkpoint gives, and its box in the source pixels of a 160x120 image
# (the VLM sees the image at 196x140 after smart_resize; the box is scaled back).
SCRIPTED_ANSWER = "<think>the box</think><answer>[40,30,120,90]</answer>"


def script_answer(source, target, answer: str = SCRIPTED_ANSWER):
    """Copy a checkpoint and make greedy decoding produce ``answer`` after any prompt.

    Nothing in the weights changes: the checkpoint's generation_config.json gets a
    ``sequence_bias`` (transformers' own logits processor) that adds a large bias to each token
    of the answer when everything before it is the assistant turn's start plus the answer so far,
    and to the end-of-turn token after it. The tiny random model never finds anything on its
    own; this lets the found path (mask pass, grasps, grasp_pose) run end to end through the
    real generate() and SAM2 decoder.
    """
    import json
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(source, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    start = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    path = target / "generation_config.json"
    config = json.loads(path.read_text())
    end = config["eos_token_id"][0] if isinstance(config["eos_token_id"], list) else config["eos_token_id"]
    tokens = start + tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
    config["sequence_bias"] = [[tokens[:i], 100.0] for i in range(len(start) + 1, len(tokens) + 1)]
    path.write_text(json.dumps(config, indent=2) + "\n")
    return target


def part_under_box(mask, box):
    """The connected part of ``mask`` with the most pixels inside ``box``: the part the node and
    lens-segment grasp (GraspConfig(component="box"))."""
    count, labels, _, _ = cv2.connectedComponentsWithStats(np.asarray(mask, np.uint8), connectivity=8)
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    inside = np.bincount(labels[y1:y2 + 1, x1:x2 + 1].ravel(), minlength=count)
    inside[0] = 0  # the background
    return labels == int(np.argmax(inside))


@pytest.fixture(scope="session")
def scripted_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint, answering SCRIPTED_ANSWER to every command (see script_answer)."""
    return script_answer(tiny_checkpoint, tmp_path_factory.mktemp("scripted") / "checkpoint")

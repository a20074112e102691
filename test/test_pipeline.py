"""LensPipeline end to end on the tiny model, and its handling of bad input."""

import numpy as np
import pytest

from lens_ros.images import InvalidInputError, check_command, to_rgb8
from lens_ros.pipeline import PipelineConfig, SegmentationResult, sam_pixels, vlm_resize_shape


def test_vlm_resize_matches_lens():
    assert vlm_resize_shape(480, 640) == (476, 644)  # RefCOCO 640x480 -> 644x476
    h, w = vlm_resize_shape(3000, 4000)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 1_000_000


def test_sam_pixels_ignore_aspect_and_normalise():
    rgb = np.zeros((30, 90, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    pixels = sam_pixels(rgb, 64)
    assert pixels.shape == (1, 3, 64, 64)
    assert float(pixels[0, 0].mean()) == pytest.approx((255 - 123.675) / 58.395, rel=1e-5)
    assert float(pixels[0, 1].mean()) == pytest.approx((0 - 116.28) / 57.12, rel=1e-5)


def _fresh(pipeline):
    """Same model, empty image cache."""
    from lens_ros.pipeline import LensPipeline

    return LensPipeline(pipeline.model, pipeline.processor, pipeline.config)


def test_segment_a_photo_end_to_end(tiny_pipeline, photo_640x480):
    result = _fresh(tiny_pipeline).segment(photo_640x480, "the coffee cup")
    assert isinstance(result, SegmentationResult)
    assert result.error == ""
    assert result.mask.dtype == bool and result.mask.shape == (480, 640)
    assert result.image_size == (480, 640)
    if result.found:
        x1, y1, x2, y2 = result.box
        assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480
    else:
        assert result.box is None and not result.mask.any() and result.score == 0.0
    t = result.timings
    assert t.total_ms > 0 and t.reasoning_ms > 0 and t.vision_ms > 0 and t.preprocess_ms > 0
    assert t.image_encoder_ms > 0
    assert t.total_ms >= t.reasoning_ms + t.vision_ms
    assert 1 <= result.generated_tokens <= tiny_pipeline.config.max_new_tokens
    assert result.command == "the coffee cup" and result.model


def test_same_image_reuses_its_embeddings(tiny_pipeline, photo_640x480):
    tiny_pipeline = _fresh(tiny_pipeline)
    first = tiny_pipeline.segment(photo_640x480, "the cup on the left")
    second = tiny_pipeline.segment(photo_640x480.copy(), "the cup on the left")
    assert second.timings.image_encoder_ms == 0 and second.timings.vision_ms == 0
    assert second.reasoning == first.reasoning and np.array_equal(second.mask, first.mask)
    other = photo_640x480[::-1].copy()
    third = tiny_pipeline.segment(other, "the cup on the left")
    assert third.timings.image_encoder_ms > 0 and third.timings.vision_ms > 0


def test_progress_reports_stages(tiny_pipeline, photo_640x480):
    reports = []
    result = tiny_pipeline.segment(photo_640x480, "the spoon", progress=lambda *report: reports.append(report))
    stages = [stage for stage, _ in reports]
    assert stages[0] == "preparing" and stages[1] == "reasoning"
    streamed = [text for stage, text in reports if stage == "reasoning"]
    assert len(streamed) == 1 + result.generated_tokens  # the stage start, then one per token
    assert streamed[-1].strip() == result.reasoning


def test_cancel_stops_a_request(tiny_pipeline, photo_640x480):
    import threading

    from lens_ros.pipeline import Cancelled

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        tiny_pipeline.segment(photo_640x480, "the spoon", cancel=cancel)
    assert tiny_pipeline.segment(photo_640x480, "the spoon").error == ""  # still serving


@pytest.mark.parametrize("image, bgr, expected", [
    (np.full((40, 50), 7, np.uint8), False, (7, 7, 7)),
    (np.full((40, 50, 1), 9, np.uint8), False, (9, 9, 9)),
    (np.dstack([np.full((40, 50), v, np.uint8) for v in (1, 2, 3)]), False, (1, 2, 3)),
    (np.dstack([np.full((40, 50), v, np.uint8) for v in (1, 2, 3)]), True, (3, 2, 1)),
    (np.dstack([np.full((40, 50), v, np.uint8) for v in (1, 2, 3, 200)]), False, (1, 2, 3)),
    (np.dstack([np.full((40, 50), v, np.uint8) for v in (1, 2, 3, 200)]), True, (3, 2, 1)),
    (np.full((40, 50), 65535, np.uint16), False, (255, 255, 255)),
    (np.dstack([np.full((40, 50), v, np.uint16) for v in (0, 257, 65535)]), False, (0, 1, 255)),
])
def test_images_are_converted_to_rgb8(image, bgr, expected):
    rgb = to_rgb8(image, bgr=bgr)
    assert rgb.shape == (40, 50, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    assert tuple(int(c) for c in rgb[5, 5]) == expected


@pytest.mark.parametrize("image, message", [
    (np.zeros((0, 0, 3), np.uint8), "empty"),
    (np.zeros((480, 0, 3), np.uint8), "empty"),
    (np.zeros((20, 640, 3), np.uint8), "at least 28 px"),
    (np.zeros((480, 640, 3, 1), np.uint8), "2 or 3 dimensions"),
    (np.zeros(100, np.uint8), "2 or 3 dimensions"),
    (np.zeros((480, 640, 2), np.uint8), "1, 3 or 4 channels"),
    (np.zeros((480, 640, 3), np.float32), "uint8 or uint16"),
    (np.zeros((480, 640, 3), bool), "uint8 or uint16"),
    ([[1, 2], [3, 4]], "numpy array"),
    (None, "numpy array"),
])
def test_bad_images_are_refused_with_a_clear_error(tiny_pipeline, image, message):
    with pytest.raises(InvalidInputError, match=message):
        tiny_pipeline.segment(image, "the cup")
    assert issubclass(InvalidInputError, ValueError)


@pytest.mark.parametrize("command, message", [
    ("", "empty"), ("   \n\t", "only whitespace"), ("x" * 513, "513 characters long; the limit is 512"),
    ("y" * 10_000, "10000 characters"), (None, "must be a string"), (42, "must be a string"),
])
def test_bad_commands_are_refused_with_a_clear_error(tiny_pipeline, photo_640x480, command, message):
    with pytest.raises(InvalidInputError, match=message):
        tiny_pipeline.segment(photo_640x480, command)


def test_command_limit_is_configurable():
    assert check_command("  grab the mug \n") == "grab the mug"
    assert check_command("x" * 20, max_chars=20) == "x" * 20
    with pytest.raises(InvalidInputError, match="limit is 10"):
        check_command("x" * 11, max_chars=10)


@pytest.mark.parametrize("field, value", [("dtype", "float64"), ("max_new_tokens", 0), ("max_command_chars", -1)])
def test_bad_pipeline_config_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        PipelineConfig(**{field: value})


def test_answer_mask_logits_teacher_forces_a_given_answer(tiny_pipeline, photo_640x480):
    logits, score = tiny_pipeline.answer_mask_logits(photo_640x480, "the cup", "[64, 48, 320, 240]")
    assert logits.shape == (1, 1, 480, 640) and 0.0 <= score <= 1.0  # SAM2 predicts IoU through a sigmoid
    other, _ = tiny_pipeline.answer_mask_logits(photo_640x480, "the cup", "[300, 200, 600, 460]")
    assert not np.allclose(logits.numpy(), other.numpy())  # the answer text reaches the mask


@pytest.fixture(scope="module")
def scripted_pipeline(scripted_checkpoint):
    from lens_ros.pipeline import LensPipeline, PipelineConfig

    return LensPipeline.from_config(PipelineConfig(model=str(scripted_checkpoint), max_new_tokens=64))


def test_found_results_get_grasps_when_asked(scripted_pipeline, tiny_pipeline, photo_640x480):
    from lens_ros.grasp import GraspConfig, Intrinsics, grasp_regions

    reports = []
    result = scripted_pipeline.segment(photo_640x480, "the cup", grasp=GraspConfig(component="box"),
                                       progress=lambda *report: reports.append(report))
    assert result.found and result.mask.any()
    assert result.grasps == grasp_regions(result.mask, config=GraspConfig(component="box"), box=result.box)
    assert result.timings.grasp_ms > 0 and ("grasp", result.reasoning) in reports
    without = scripted_pipeline.segment(photo_640x480, "the cup")
    assert without.grasps == [] and without.timings.grasp_ms == 0
    # not found: nothing to grasp, and no grasp stage
    assert tiny_pipeline.segment(photo_640x480, "the cup", grasp=GraspConfig()).grasps == []
    # depth: checked against the image before any work, and handed to grasp_regions
    camera = Intrinsics(500, 500, 320, 240)
    with pytest.raises(InvalidInputError, match="depth is 320x240 but the image is 640x480"):
        scripted_pipeline.segment(photo_640x480, "the cup", grasp=GraspConfig(),
                                  depth=np.ones((240, 320), np.float32), intrinsics=camera)
    with pytest.raises(InvalidInputError, match="grasp: depth must be uint16"):
        scripted_pipeline.segment(photo_640x480, "the cup", grasp=GraspConfig(),
                                  depth=np.ones((480, 640), np.int64), intrinsics=camera)
    flat = scripted_pipeline.segment(photo_640x480, "the cup", grasp=GraspConfig(component="box"),
                                     depth=np.full((480, 640), 0.6, np.float32), intrinsics=camera)
    assert flat.grasps and not any(g.has_3d for g in flat.grasps)  # a mask on a flat table has no height
    assert "above its support plane" in flat.grasps[0].reason

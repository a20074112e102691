"""lens_ros.tracking: the streaming tracker against stock SAM2VideoPredictor, frame by frame.

Exactness: the same preprocessed frames (read back from the stock predictor's own inference state)
give identical masks, logits and object scores (tolerance 1e-4 on logits; zero differing pixels).
"""

from __future__ import annotations

import functools
import json
import time

import numpy as np
import pytest
import torch

from lens_ros.tracking.models import (
    SAM2_1_CONFIG,
    TrackerModelError,
    build_tracker_architecture,
    load_tracker_model,
    read_state_dict,
    tiny_tracker_spec,
)
from lens_ros.tracking.tracker import StreamingTracker
from lens_ros.training.metrics import mask_iou

FRAMES, HEIGHT, WIDTH = 32, 480, 640


def moving_shapes(n: int = FRAMES):
    """A red box that moves and turns (object 1), a blue ellipse (object 2), and a grey bar that
    hides most of the box around frames 18-22. Returns the frames and each object's true masks."""
    import cv2

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    background = np.stack([xx / WIDTH * 120 + 40, yy / HEIGHT * 120 + 60, (xx + yy) / (HEIGHT + WIDTH) * 80 + 90], -1)
    background = np.clip(background + rng.normal(0, 12, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
    bar = np.zeros((HEIGHT, WIDTH), bool)
    bar[:, 250:470] = True
    frames, masks = [], {1: [], 2: []}
    for t in range(n):
        image = background.copy()
        box = cv2.boxPoints(((120 + 12 * t, 200 + 40 * np.sin(t / 5)), (140, 80), 7.0 * t)).astype(np.int32)
        first, second = np.zeros((HEIGHT, WIDTH), np.uint8), np.zeros((HEIGHT, WIDTH), np.uint8)
        cv2.fillPoly(first, [box], 1)
        cv2.ellipse(second, (int(520 - 8 * t), int(330 - 2 * t)), (60, 40), 3.0 * t, 0, 360, 1, -1)
        first, second = first > 0, (second > 0) & ~(first > 0)
        image[second], image[first], image[bar] = (40, 60, 220), (220, 40, 40), (128, 128, 128)
        frames.append(image)
        masks[1].append(first & ~bar)
        masks[2].append(second & ~bar)
    return frames, masks


@pytest.fixture(scope="module")
def sequence(tmp_path_factory):
    """The frames, their true masks, and a folder of them as JPEG (sam2's video loader reads JPEG folders)."""
    from PIL import Image

    frames, masks = moving_shapes()
    folder = tmp_path_factory.mktemp("frames")
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:05d}.jpg", quality=95)
    return frames, masks, folder


@functools.lru_cache(maxsize=None)
def tiny_model(config_extra: tuple[str, ...] = (), seed: int = 0, config: str | None = None):
    from lens_ros.model.sam import Sam2Spec

    spec = tiny_tracker_spec()
    spec = Sam2Spec(config=config or spec.config, overrides=spec.overrides + config_extra)
    return build_tracker_architecture(spec, seed=seed)


def _stock_score(state, obj_idx: int, frame: int) -> float:
    for outputs in (state["temp_output_dict_per_obj"][obj_idx], state["output_dict_per_obj"][obj_idx]):
        for kind in ("cond_frame_outputs", "non_cond_frame_outputs"):
            if frame in outputs[kind]:
                return float(outputs[kind][frame]["object_score_logits"].reshape(-1)[0])
    raise KeyError(frame)


def run_stock(model, folder, prompts: dict[int, list], n: int = FRAMES):
    """Stock SAM2VideoPredictor driven as a stream: propagate through each prompt frame, add the masks
    there (a new object, or a correction), go on from the next frame. -> (images, (H, W),
    {frame: {obj_id: (logits H x W, object score)}})."""
    state = model.init_state(str(folder))
    out: dict[int, dict] = {}

    def collect(frame, obj_ids, video_res):
        out[frame] = {obj_id: (video_res[i, 0].clone(), _stock_score(state, state["obj_id_to_idx"][obj_id], frame))
                      for i, obj_id in enumerate(obj_ids)}

    start = 0
    for prompt in [*sorted(prompts), n]:
        last = min(prompt, n - 1)
        if state["obj_ids"] and last >= start:
            for frame, obj_ids, video_res in model.propagate_in_video(state, start_frame_idx=start,
                                                                       max_frame_num_to_track=last - start):
                collect(frame, obj_ids, video_res)
        if prompt >= n:
            break
        for obj_id, mask in prompts[prompt]:
            _, obj_ids, video_res = model.add_new_mask(state, frame_idx=prompt, obj_id=obj_id, mask=mask)
        collect(prompt, obj_ids, video_res)
        start = prompt + 1
    return state["images"], (state["video_height"], state["video_width"]), out


def run_streaming(tracker, frames, prompts: dict[int, list], orig_hw, after_frame=None):
    out = {}
    for index, frame in enumerate(frames):
        if index in prompts:
            if tracker.object_ids:
                tracker.update(frame, orig_hw=orig_hw)
            for obj_id, mask in prompts[index]:
                results = tracker.add_object(obj_id, frame, mask, orig_hw=orig_hw)
        else:
            results = tracker.update(frame, orig_hw=orig_hw)
        out[index] = {obj_id: (tracker.last_logits[obj_id].clone(), score, mask)
                      for obj_id, (mask, score, _) in results.items()}
        if after_frame:
            after_frame(index, tracker)
    return out


def assert_same(stock, ours, objects=None):
    compared = 0
    for frame in sorted(set(stock) & set(ours)):
        for obj_id in objects or sorted(stock[frame]):
            logits, score = stock[frame][obj_id]
            our_logits, our_score, our_mask = ours[frame][obj_id]
            assert float((logits - our_logits).abs().max()) <= 1e-4, (frame, obj_id)
            assert abs(score - our_score) <= 1e-4, (frame, obj_id)
            assert np.array_equal((logits > 0).numpy(), our_mask), (frame, obj_id)
            compared += 1
    assert compared >= len(stock)
    # Not a trivial comparison: the random model's masks are neither empty nor everything.
    areas = [mask.mean() for frame in ours.values() for _, _, mask in frame.values()]
    assert 0.01 < float(np.median(areas)) < 0.99


def test_one_object_is_tracked_exactly_as_stock_sam2_and_memory_stays_bounded(sequence):
    """32 frames (the box moves, turns and is hidden by a bar), prompted with its mask on frame 0;
    then 24 more frames: the state stops growing at SAM2's windows."""
    frames, masks, folder = sequence
    model = tiny_model()
    prompts = {0: [(1, masks[1][0])]}
    images, size, stock = run_stock(model, folder, prompts)
    tracker = StreamingTracker(model)
    sizes = {}
    ours = run_streaming(tracker, [images[i] for i in range(FRAMES)], prompts, size,
                         after_frame=lambda index, t: sizes.setdefault(index, t.memory_stats()[1]))
    assert_same(stock, ours)
    for k in range(24):
        tracker.update(images[k], orig_hw=size)
    end = tracker.memory_stats()[1]
    assert end["bytes"] == sizes[FRAMES - 1]["bytes"] and end["cond_frames"] == [0]
    assert len(end["non_cond_frames"]) == len(sizes[FRAMES - 1]["non_cond_frames"]) == model.max_obj_ptrs_in_encoder - 1
    assert len(end["with_maskmem"]) == model.num_maskmem - 1


def test_real_size_sam2_hiera_l_tracks_exactly_as_stock(tmp_path):
    """SAM 2.0 Hiera-L at 1024 (the architecture LENS starts from), random weights, 4 frames: the same
    logits, scores and masks as stock. About 3 minutes on 2 cores."""
    from PIL import Image

    from lens_ros.model.sam import Sam2Spec

    frames, masks = moving_shapes(4)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"{i:05d}.jpg", quality=95)
    model = build_tracker_architecture(Sam2Spec())
    assert model.image_size == 1024 and model.num_maskmem == 7
    prompts = {0: [(1, masks[1][0])]}
    images, size, stock = run_stock(model, tmp_path, prompts, n=4)
    assert_same(stock, run_streaming(StreamingTracker(model), [images[i] for i in range(4)], prompts, size))


def test_rgb_frames_are_preprocessed_as_sam2s_loader_does(sequence):
    """The tracker's own preprocessing of decoded frames gives stock's input tensors bit for bit, so
    RGB frames from a camera track as the stock predictor does."""
    from PIL import Image

    frames, masks, folder = sequence
    model = tiny_model()
    prompts = {0: [(1, masks[1][0])]}
    images, _, stock = run_stock(model, folder, prompts, n=8)
    decoded = [np.array(Image.open(folder / f"{i:05d}.jpg").convert("RGB")) for i in range(8)]
    tracker = StreamingTracker(model)
    for i in range(8):
        assert torch.equal(tracker.preprocess(decoded[i])[0], images[i])
    assert_same(stock, run_streaming(tracker, decoded, prompts, None))


def test_two_objects_are_tracked_exactly_and_one_can_stop(sequence):
    frames, masks, folder = sequence
    model = tiny_model()
    prompts = {0: [(1, masks[1][0]), (2, masks[2][0])]}
    images, size, stock = run_stock(model, folder, prompts)
    inputs = [images[i] for i in range(FRAMES)]
    assert_same(stock, run_streaming(StreamingTracker(model), inputs, prompts, size))

    def stop_second(index, tracker):
        if index == 15:
            tracker.remove_object(2)

    ours = run_streaming(StreamingTracker(model), inputs, prompts, size, after_frame=stop_second)
    assert all(2 not in ours[i] for i in range(16, FRAMES))
    assert_same(stock, ours, objects=[1])  # the other object's track is unchanged


def test_late_objects_and_corrections_track_as_stock_sam2_1(sequence):
    """SAM 2.1's config; object 2 added at frame 5; object 1 corrected with its mask on frames 10, 14
    and 26 (kept as conditioning frames, at most 2 attended); temporal stride 2; non-overlapping masks."""
    frames, masks, folder = sequence
    model = tiny_model(("++model.add_all_frames_to_correct_as_cond=true", "++model.max_cond_frames_in_attn=2",
                        "++model.memory_temporal_stride_for_eval=2", "++model.non_overlap_masks=true"),
                       seed=1, config=SAM2_1_CONFIG)
    prompts = {0: [(1, masks[1][0])], 5: [(2, masks[2][5])], 10: [(1, masks[1][10])], 14: [(1, masks[1][14])],
               26: [(1, masks[1][26]), (2, masks[2][26])]}
    images, size, stock = run_stock(model, folder, prompts)
    tracker = StreamingTracker(model)
    assert_same(stock, run_streaming(tracker, [images[i] for i in range(FRAMES)], prompts, size))
    assert tracker.memory_stats()[1]["cond_frames"] == [14, 26]  # the cap: older corrections are dropped


def test_a_sam2_without_memory_modules_is_refused():
    from lens_ros.model.sam import build_sam2_for_lens
    from lens_ros.model.tiny import TINY_SAM2_SPEC

    with pytest.raises(ValueError, match=r"lacks its video memory modules \['memory_attention', 'memory_encoder', "
                                         r"'maskmem_tpos_enc'\] \(LENS checkpoints delete them\)"):
        StreamingTracker(build_sam2_for_lens(TINY_SAM2_SPEC))


def test_tracker_weights_load_safely_from_sam2s_release_layout(tmp_path):
    """A .pt in sam2's layout ({"model": state_dict}) loads with weights_only; a pickle that needs
    code is refused; a hub id that is not cached offline names the fix."""
    import pickle

    model = tiny_model()
    checkpoint = tmp_path / "sam2_tiny.pt"
    torch.save({"model": model.state_dict()}, checkpoint)
    loaded = load_tracker_model(str(checkpoint), spec=tiny_tracker_spec()).state_dict()
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())

    class Payload:
        def __reduce__(self):
            return (print, ("this would run on load",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": Payload()}, protocol=2))
    with pytest.raises(TrackerModelError, match="not a plain tensor checkpoint"):
        read_state_dict(evil)
    with pytest.raises(TrackerModelError, match="not in the local Hugging Face cache"):
        load_tracker_model("facebook/sam2-hiera-large", allow_download=False)
    with pytest.raises(TrackerModelError, match="neither 'tiny'"):
        load_tracker_model(str(tmp_path / "missing.pt"))
    with pytest.raises(TrackerModelError, match="does not fit configs/sam2/sam2_hiera_l.yaml"):
        load_tracker_model(str(checkpoint))  # tiny weights for the Hiera-L architecture


def test_the_tracking_benchmark_prints_a_row_per_size_and_object_count(capsys):
    from lens_ros.bench.tracking import main

    assert main(["--sizes", "160x120,320x240", "--objects", "1,2", "--frames", "9"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith(("160x120", "320x240"))]
    assert [row[:2] for row in rows] == [["160x120", "1"], ["160x120", "2"], ["320x240", "1"], ["320x240", "2"]]
    assert all(float(value) > 0 for row in rows for value in row[2:])


# --- TrackingSession: lost, re-acquired, re-grounded -------------------------------------------------

class SteppedClock:
    """Seconds that advance by ``step`` each time a frame is given to the session."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        return self.now

    def frames(self, frames):
        for frame in frames:
            self.now += self.step
            yield frame


@pytest.fixture(scope="module")
def scripted_pipeline(scripted_checkpoint):
    from lens_ros.model.checkpoint import load_lens_model
    from lens_ros.pipeline import LensPipeline, PipelineConfig

    model, processor = load_lens_model(str(scripted_checkpoint))
    return LensPipeline(model, processor, PipelineConfig(model="scripted", max_new_tokens=40))


def test_a_track_without_its_object_is_lost_and_lens_finds_it_again(scripted_pipeline, sequence):
    """SAM2's object score decides presence. The random tiny tracker cannot see an object leave, so a
    presence threshold above its scores (~0.06) makes every tracked frame "absent": after lost_frames
    the track is LOST (empty masks); with reacquire, LENS (the checkpoint scripted to find a box)
    answers the command again on that frame and the track restarts from its mask: REACQUIRED."""
    from lens_ros.tracking.session import (
        LOST,
        REACQUIRED,
        TRACKING,
        TrackingConfig,
        TrackingSession,
    )

    frames = sequence[0]
    clock = SteppedClock(0.5)
    session = TrackingSession(scripted_pipeline, StreamingTracker(tiny_model()),
                              TrackingConfig(lost_frames=3, presence_threshold=1.0, reacquire=False), clock)
    assert session.start(7, "the cup", frames[0]).found and list(session.tracks) == [7]
    updates = [session.update(frame)[0] for frame in clock.frames(frames[1:6])]
    assert [u.state for u in updates] == [TRACKING, TRACKING, LOST, LOST, LOST]
    assert [[e.kind for e in u.events] for u in updates] == [[], [], ["lost"], [], []]
    assert all(u.area == 0 and u.box is None and not u.present for u in updates[2:]) and updates[0].area > 0

    session = TrackingSession(scripted_pipeline, StreamingTracker(tiny_model()),
                              TrackingConfig(lost_frames=3, presence_threshold=1.0), clock)
    session.start(7, "the cup", frames[0])
    updates = [session.update(frame)[0] for frame in clock.frames(frames[1:4])]
    assert [u.state for u in updates] == [TRACKING, TRACKING, REACQUIRED]
    assert [e.kind for e in updates[2].events] == ["lost", "reacquired"] and session.lens_calls == 1
    assert updates[2].present and updates[2].area > 0  # the restarted track's first mask: LENS's
    assert [e.kind for e in session.tracks[7].events] == ["lost", "reacquired"]
    assert [e.kind for e in session.stop_all()] == ["stopped"] and session.tracks == {} and session.tracker.object_ids == []


def test_reacquisition_attempts_are_spaced_while_lens_does_not_find_the_object(tiny_pipeline, scripted_pipeline, sequence):
    """The random tiny model writes no box: every attempt fails, and there is at most one per
    reacquire_interval_s (1 s, frames 0.5 s apart: every other frame)."""
    from lens_ros.tracking.session import LOST, TrackingConfig, TrackingSession

    frames = sequence[0]
    clock = SteppedClock(0.5)
    session = TrackingSession(tiny_pipeline, StreamingTracker(tiny_model()),
                              TrackingConfig(lost_frames=1, presence_threshold=1.0, reacquire_interval_s=1.0), clock)
    session.start(1, "the cup", frames[0], result=scripted_pipeline.segment(frames[0], "the cup"))
    updates = [session.update(frame)[0] for frame in clock.frames(frames[1:7])]
    assert all(u.state == LOST for u in updates) and session.lens_calls == 3


def test_regrounding_reports_the_drift_and_restarts_a_track_that_drifted(scripted_pipeline, sequence):
    from lens_ros.tracking.session import TRACKING, TrackingConfig, TrackingSession

    frames = sequence[0]
    clock = SteppedClock(0.5)
    session = TrackingSession(scripted_pipeline, StreamingTracker(tiny_model()),
                              TrackingConfig(reground_s=1.0, drift_iou=0.0, presence_threshold=float("-inf")), clock)
    session.start(1, "the cup", frames[0])
    for index, frame in enumerate(clock.frames(frames[1:5]), start=1):
        (update,) = session.update(frame)
        drift = [e for e in update.events if e.kind == "drift"]
        assert update.state == TRACKING and len(drift) == (index % 2 == 0)  # every 1 s: every other frame
        if drift:  # the IoU between this frame's tracked mask and LENS's fresh one (drift_iou 0: kept)
            assert drift[0].iou == pytest.approx(mask_iou(update.mask, scripted_pipeline.segment(frame, "the cup").mask))

    session = TrackingSession(scripted_pipeline, StreamingTracker(tiny_model()),
                              TrackingConfig(reground_s=1.0, drift_iou=1.0, presence_threshold=float("-inf")), clock)
    session.start(1, "the cup", frames[0])
    session.update(frames[1])
    clock.now += 1.0
    (update,) = session.update(frames[2])
    fresh = scripted_pipeline.segment(frames[2], "the cup").mask
    # Restarted from LENS's mask: a prompted frame's output is its mask (at SAM2's resolution).
    started = StreamingTracker(tiny_model()).add_object(1, frames[2], fresh)[1][0]
    assert update.events[0].iou < 1.0 and np.array_equal(update.mask, started)


def test_an_image_encoder_shared_with_lens_is_recognised_by_its_weights():
    from lens_ros.model.sam import build_sam2_for_lens
    from lens_ros.model.tiny import TINY_SAM2_SPEC
    from lens_ros.tracking.models import shares_image_encoder

    lens_sam = build_sam2_for_lens(TINY_SAM2_SPEC)
    tracker = build_tracker_architecture(tiny_tracker_spec(), seed=3)
    assert not shares_image_encoder(lens_sam, tracker)
    tracker.image_encoder.load_state_dict(lens_sam.image_encoder.state_dict())
    assert shares_image_encoder(lens_sam, tracker)
    with torch.no_grad():
        tracker.image_encoder.neck.convs[0].conv.bias[0] += 1e-6
    assert not shares_image_encoder(lens_sam, tracker)


def test_a_shared_image_encoder_runs_once_per_frame_for_lens_and_the_tracker(scripted_checkpoint, sequence):
    """With the tracker's image encoder weights equal to LENS's, a frame that answers a command and is
    tracked (start, re-grounding) is encoded once (counted); LENS's answers are those of a pipeline
    that does not share."""
    from lens_ros.model.checkpoint import load_lens_model
    from lens_ros.pipeline import LensPipeline, PipelineConfig
    from lens_ros.tracking.session import TrackingConfig, TrackingSession
    from lens_ros.tracking.shared_encoder import share_image_encoder

    frames = sequence[0][:5]

    def run(share: bool):
        model, processor = load_lens_model(str(scripted_checkpoint))
        pipeline = LensPipeline(model, processor, PipelineConfig(model="scripted", max_new_tokens=40))
        tracker = StreamingTracker(tiny_model())
        if share:
            assert "weights differ" in share_image_encoder(pipeline, tracker)
            tracker.model.image_encoder.load_state_dict(model.sam.image_encoder.state_dict())
            assert share_image_encoder(pipeline, tracker) == ""
        passes = []
        for encoder in {id(m): m for m in (model.sam.image_encoder, tracker.model.image_encoder)}.values():
            encoder.register_forward_hook(lambda *_: passes.append(1))
        clock = SteppedClock(1.0)
        session = TrackingSession(pipeline, tracker, TrackingConfig(reground_s=2.0, drift_iou=0.0), clock)
        answers = [session.start(1, "the cup", frames[0])]
        updates = [session.update(frame)[0] for frame in clock.frames(frames[1:])]
        answers.append(pipeline.segment(frames[-1], "the cup"))  # a command on the newest tracked frame
        pipeline.close()
        return len(passes), answers, updates

    passes, answers, updates = run(share=True)
    assert [e.kind for u in updates for e in u.events] == ["drift", "drift"]  # LENS answered on frames 2 and 4
    assert passes == len(frames)  # one pass per frame
    unshared_passes, unshared_answers, _ = run(share=False)
    # LENS's own passes on the start and both re-groundings (the last command reuses its prepared frame 4)
    assert unshared_passes == len(frames) + 1 + 2
    for ours, theirs in zip(answers, unshared_answers):
        assert np.array_equal(ours.mask, theirs.mask) and ours.box == theirs.box and ours.score == theirs.score


def test_lens_track_writes_a_mask_a_row_and_an_overlay_per_frame(scripted_checkpoint, sequence, tmp_path, capsys):
    from PIL import Image

    from lens_ros.tracking.cli import main

    frames = tmp_path / "frames"
    frames.mkdir()
    for i, frame in enumerate(sequence[0][:6]):
        Image.fromarray(frame).save(frames / f"{i:03d}.png")
    out = tmp_path / "out"
    assert main(["--model", str(scripted_checkpoint), "--tracker-model", "tiny", "--frames", str(frames),
                 "--command", "the red box", "--max-new-tokens", "40", "--offline", "--out", str(out),
                 "--propagation-decoder", "lens"]) == 0
    rows = [json.loads(line) for line in (out / "tracks.jsonl").read_text().splitlines()]
    # LENS's scripted box, [40,30,120,90] on its 644x476 input, in this frame's pixels.
    assert [row["frame"] for row in rows] == list(range(6)) and rows[0]["box"] == pytest.approx([40, 30, 120, 90], rel=0.02)
    assert all(row["state"] == "tracking" for row in rows)
    masks = sorted((out / "masks").iterdir())
    assert len(masks) == 6 and all(np.array(Image.open(m)).shape == (HEIGHT, WIDTH) for m in masks)
    assert Image.open(out / "overlay.gif").n_frames == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["found_at_frame"] == 0 and summary["frames"] == 6
    assert "6 frames; object found on frame 0" in capsys.readouterr().out


def test_lens_track_starts_from_a_given_mask(tiny_checkpoint, sequence, tmp_path, capsys):
    """--mask: the track starts from the given mask on the first frame (the tiny LENS finds nothing on
    its own); a mask of another size is refused."""
    from PIL import Image

    from lens_ros.tracking.cli import main

    frames = tmp_path / "frames"
    frames.mkdir()
    for i, frame in enumerate(sequence[0][:3]):
        Image.fromarray(frame).save(frames / f"{i:03d}.png")
    given = np.zeros((HEIGHT, WIDTH), np.uint8)
    given[100:200, 150:300] = 255
    Image.fromarray(given).save(tmp_path / "mask.png")
    Image.fromarray(given[:10]).save(tmp_path / "small.png")
    args = ["--model", str(tiny_checkpoint), "--tracker-model", "tiny", "--frames", str(frames), "--command", "the box",
            "--max-new-tokens", "8", "--offline"]
    assert main([*args, "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "out")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "tracks.jsonl").read_text().splitlines()]
    assert [row["state"] for row in rows] == ["tracking"] * 3 and rows[0]["reasoning"] == "(the given --mask)"
    first = np.array(Image.open(tmp_path / "out" / "masks" / "00000.png")) > 0
    assert mask_iou(first, given > 0) > 0.9  # a prompted frame's output is its mask, at SAM2's resolution
    assert main([*args, "--mask", str(tmp_path / "small.png"), "--out", str(tmp_path / "out2")]) == 2
    assert f"--mask is {WIDTH}x10, the first frame {WIDTH}x{HEIGHT}" in capsys.readouterr().err


def test_lens_track_refuses_a_folder_without_images(tmp_path, capsys):
    from lens_ros.tracking.cli import main

    assert main(["--model", "tiny", "--tracker-model", "tiny", "--frames", str(tmp_path), "--command", "x",
                 "--offline", "--out", str(tmp_path / "out")]) == 2
    assert "no image files" in capsys.readouterr().err


def test_the_lens_mask_decoder_can_propagate_instead_of_the_stock_one(sequence):
    from lens_ros.model.sam import build_sam2_for_lens
    from lens_ros.model.tiny import TINY_SAM2_SPEC
    from lens_ros.tracking.models import use_lens_mask_decoder

    frames, masks, _ = sequence
    torch.manual_seed(5)
    lens_sam = build_sam2_for_lens(TINY_SAM2_SPEC)
    stock, lens = build_tracker_architecture(tiny_tracker_spec()), build_tracker_architecture(tiny_tracker_spec())
    use_lens_mask_decoder(lens, lens_sam)
    for name, tensor in lens_sam.sam_mask_decoder.state_dict().items():
        assert torch.equal(lens.sam_mask_decoder.state_dict()[name], tensor)
    outputs = []
    for model in (stock, lens):
        tracker = StreamingTracker(model)
        tracker.add_object(1, frames[0], masks[1][0])
        tracker.update(frames[1])
        outputs.append(tracker.last_logits[1])
    assert not torch.equal(*outputs)  # the decoder that propagates is LENS's


def test_the_nodes_tracking_layer_skips_to_the_newest_frame_and_ends_lost_tracks(scripted_pipeline, sequence):
    """lens_ros.ros.tracking.NodeTracking without DDS: the newest frame is tracked and the ones in
    between are counted as skipped; a lost track ends when it cannot come back (reacquire off, or a
    goal that did not ask to keep it), and its goal hears why."""
    pytest.importorskip("rclpy")
    from lens_ros.ros.harness import image_msg
    from lens_ros.ros.params import NodeConfig
    from lens_ros.ros.sensors import SensorBuffers
    from lens_ros.ros.tracking import NodeTracking, TrackGoal
    from lens_ros.tracking.session import TrackingSession

    frames = sequence[0]

    def layer(**params):
        config = NodeConfig(tracker_model="tiny", lost_frames=2, presence_threshold=1.0, grasps=False, **params)
        sensors, published = SensorBuffers(), []
        session = TrackingSession(scripted_pipeline, StreamingTracker(tiny_model()), config.tracking_config())
        tracking = NodeTracking(session, "not shared", sensors, None, lambda *message: published.append(message),
                                None, lambda: None, lambda: config, print)
        return tracking, sensors, published

    def frame(sensors, index):
        sensors.add_frame(image_msg(frames[index], stamp_msg(index)))

    tracking, sensors, published = layer(reacquire=False)
    frame(sensors, 0)
    goal = TrackGoal(keep_when_lost=True)
    result = scripted_pipeline.segment(frames[0], "the cup")
    assert tracking.start(5, frames[0], 1, result, goal=goal) == ""
    for index in (1, 2, 3):  # three frames arrive while the last one is tracked: the newest is taken
        frame(sensors, index)
    tracking.process()
    (tracks, mask, grasp), = published
    assert tracks.frames_skipped == 2 and tracks.header.stamp == stamp_msg(3) and tracking.frames_skipped == 2
    assert [t.track_id for t in tracks.tracks] == [5] and (mask.height, mask.width) == frames[3].shape[:2]
    tracking.process()  # no new frame: nothing
    assert len(published) == 1
    frame(sensors, 4)
    tracking.process()
    assert published[-1][0].tracks[0].state == "lost" and goal.ended == "lost" and tracking.active == 0
    assert [list(t.events) for _, t in goal.updates] == [[], ["lost"]] and goal.frames == 2

    tracking, sensors, published = layer(reacquire=True, reacquire_interval_s=3600.0)
    frame(sensors, 0)
    kept, ended = TrackGoal(keep_when_lost=True), TrackGoal(keep_when_lost=False)
    tracking.start(1, frames[0], 1, result, goal=kept)
    tracking.start(2, frames[0], 1, result, goal=ended)
    for index in (1, 2):
        frame(sensors, index)
        tracking.process()
    # Both were lost on frame 2, and LENS found the object again at once: both came back.
    assert [t.state for t in published[-1][0].tracks] == ["reacquired", "reacquired"]
    tracking.request_stop(0)
    tracking.process()
    assert kept.ended == ended.ended == "stopped" and tracking.active == 0

    # A stop of every track ends the tracks whose commands came in before it, not one started after it
    # from a command it crossed on the way (the stop reached the worker later than the command).
    asked = time.monotonic()
    tracking.request_stop(0)
    before, after = TrackGoal(keep_when_lost=True), TrackGoal(keep_when_lost=True)
    tracking.start(3, frames[0], 3, result, goal=before, requested=asked - 1.0)
    tracking.start(4, frames[0], 3, result, goal=after, requested=asked + 1.0)
    frame(sensors, 3)
    tracking.process()
    assert before.ended == "stopped" and after.ended is None
    assert [t.track_id for t in published[-1][0].tracks] == [4]


def stamp_msg(index: int):
    from builtin_interfaces.msg import Time

    return Time(sec=1000 + index)

"""Stage backends (lens_ros.accel): every onnxruntime graph against the torch stage it replaces.

Tolerance (float32): max |onnxruntime - torch| <= 1e-4 x max(1, max |torch|), per output.
"""

from __future__ import annotations

import copy
import json
import re
import sys

import numpy as np
import pytest
import torch
from fixtures_lens import SCRIPTED_ANSWER

from lens_ros.accel import STAGES, export
from lens_ros.accel.check import stage_inputs, stage_outputs
from lens_ros.accel.stages import Stages

pytest.importorskip("onnxruntime", reason="the onnxruntime backend's tests need onnxruntime (make venv installs it)")

TOLERANCE = 1e-4


def assert_close(reference, candidate, what: str = ""):
    for ref, got in zip(reference, candidate, strict=True):
        assert ref.shape == got.shape and ref.dtype == got.dtype, what
        scale = max(1.0, float(ref.abs().max()))
        assert float((ref - got).abs().max()) <= TOLERANCE * scale, (what, float((ref - got).abs().max()))


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def lively_model(tiny_model):
    """The tiny model with no all-zero tensor in the exported stages: a random checkpoint's Hiera
    position embeddings (pos_embed, pos_embed_window) and no_mem_embed start at zero, which would
    leave their bicubic interpolation and the addition untested."""
    model, processor = tiny_model
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for stage in STAGES:
            for tensor in export.stage_tensors(model, stage).values():
                if tensor.is_floating_point() and tensor.numel() > 1 and not tensor.any():
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
    assert model.sam.image_encoder.trunk.pos_embed.any() and model.sam.no_mem_embed.any()
    return model, processor


@pytest.mark.parametrize("size", [(120, 160), (480, 640)])
def test_each_onnxruntime_stage_matches_torch(lively_model, export_cache, photo_640x480, size):
    """Every stage, alone on torch's inputs: SAM2's image encoder and the vision tower (the grid of a
    160x120 and of a 640x480 camera), the mask pass at two sequence lengths (one graph: its
    dynamic axis), SAM2's mask decoder."""
    import cv2

    from lens_ros.accel.onnxruntime_backend import OnnxRuntimeStages

    model, processor = lively_model
    rgb = np.ascontiguousarray(cv2.resize(photo_640x480, size[::-1], interpolation=cv2.INTER_AREA))
    backend = OnnxRuntimeStages(model, cache_dir=export_cache)
    for answer in (SCRIPTED_ANSWER, "the cup"):
        given = stage_inputs(model, processor, rgb, answer=answer)
        reference, got = stage_outputs(Stages(model), given), stage_outputs(backend, given)
        for stage in STAGES:
            assert_close(reference[stage], got[stage], stage)
        mask_pass_graph = backend.used[export.MASK_PASS]
    assert set(backend.used) == set(STAGES) and backend.used[export.MASK_PASS] == mask_pass_graph
    assert len([p for p in export_cache.iterdir() if p.name.startswith(export.MASK_PASS)]) == 1
    spec = json.loads((export_cache / mask_pass_graph / f"{export.MASK_PASS}.json").read_text())
    assert spec["inputs"]["attention_mask"]["shape"] == [1, "sequence"] and spec["outputs"]["token"]["shape"] == [1, 1, 256]
    assert spec["dynamic_axes"] == {"inputs_embeds": {"1": "sequence"}, "attention_mask": {"1": "sequence"}}
    assert backend.describe() == dict.fromkeys(STAGES, "onnxruntime")


def test_the_mask_decoder_graph_keeps_sam2s_fallback_to_its_best_multimask_output(lively_model, export_cache):
    """In eval mode SAM2's decoder replaces an unstable single mask by its best multi-mask output
    (a data-dependent choice): the traced graph must choose as torch does, both ways. Random
    weights give near-zero, unstable logits; a copy whose single-mask hypernetwork is scaled up
    gives stable ones."""
    from lens_ros.accel.onnxruntime_backend import OnnxRuntimeStages

    base, processor = lively_model
    given = stage_inputs(base, processor, np.zeros((120, 160, 3), np.uint8))
    stable = []
    for scale in (1.0, 1e3):
        model = copy.deepcopy(base)
        decoder = model.sam.sam_mask_decoder
        with torch.no_grad():
            decoder.output_hypernetworks_mlps[0].layers[-1].weight.mul_(scale)
        assert decoder.dynamic_multimask_via_stability and not decoder.training
        backend, reference = OnnxRuntimeStages(model, cache_dir=export_cache), Stages(model)
        for seed in range(4):
            token = torch.randn(given["token"].shape, generator=torch.Generator().manual_seed(seed))
            with torch.inference_mode():
                ref, got = reference.decode_mask(given["embedding"], token), backend.decode_mask(given["embedding"], token)
                multimask, _, _, _ = decoder(image_embeddings=given["embedding"].image_embed,
                                             image_pe=model.sam.sam_prompt_encoder.get_dense_pe(),
                                             sparse_prompt_embeddings=token,
                                             dense_prompt_embeddings=model.sam.sam_prompt_encoder(None, None, None)[1],
                                             multimask_output=True, repeat_image=True,
                                             high_res_features=given["embedding"].high_res_feats)
            assert_close(ref, got, f"scale {scale}, seed {seed}")
            stable.append(not any(torch.equal(ref[0][0, 0], mask) for mask in multimask[0]))
    assert True in stable and False in stable, stable  # both branches were taken


def test_onnxruntime_pipeline_answers_as_torch_does(scripted_checkpoint, tmp_path):
    """End to end on the checkpoint scripted to answer a box: the same generated tokens and box, and
    the same mask (IoU >= 0.999)."""
    from lens_ros.model.checkpoint import load_lens_model
    from lens_ros.pipeline import LensPipeline, PipelineConfig

    model, processor = load_lens_model(str(scripted_checkpoint))
    rgb = (np.random.default_rng(3).random((120, 160, 3)) * 255).astype(np.uint8)
    results = {}
    for backend in ("torch", "onnxruntime"):
        config = PipelineConfig(model="scripted", max_new_tokens=40, backend=backend, export_dir=str(tmp_path))
        results[backend] = LensPipeline(model, processor, config).segment(rgb, "the cup")
    ref, got = results["torch"], results["onnxruntime"]
    assert ref.found and got.found and ref.error == got.error == ""
    assert got.reasoning == ref.reasoning and got.generated_tokens == ref.generated_tokens
    assert "[40,30,120,90]" in SCRIPTED_ANSWER and got.box == ref.box
    union = np.logical_or(ref.mask, got.mask).sum()
    assert union > 0 and np.logical_and(ref.mask, got.mask).sum() / union >= 0.999
    assert abs(got.score - ref.score) <= TOLERANCE


def test_graphs_are_exported_once_then_read_from_the_cache(tiny_model, export_cache, monkeypatch):
    from lens_ros.accel.onnxruntime_backend import OnnxRuntimeStages

    model, processor = tiny_model
    given = stage_inputs(model, processor, (np.random.default_rng(1).random((120, 160, 3)) * 255).astype(np.uint8))
    stage_outputs(OnnxRuntimeStages(model, cache_dir=export_cache), given)  # exported (or cached)
    directories = sorted(p.name for p in export_cache.iterdir())

    def refuse(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(export, "export_stage", refuse)
    stage_outputs(OnnxRuntimeStages(model, cache_dir=export_cache), given)  # a new process, in effect
    assert sorted(p.name for p in export_cache.iterdir()) == directories


def test_the_export_key_follows_weights_shapes_grid_and_versions(tiny_model, monkeypatch):
    model, _ = tiny_model
    weights = export.weights_sha256(export.stage_tensors(model, export.SAM_IMAGE_ENCODER))
    inputs = {"pixels": {"shape": [1, 3, 256, 256], "dtype": "float32"}}
    key = export.export_key(export.SAM_IMAGE_ENCODER, weights, inputs, "float32")
    assert key == export.export_key(export.SAM_IMAGE_ENCODER, weights, inputs, "float32")

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.sam.image_encoder.neck.convs[0].conv.weight[0, 0, 0, 0] += 1e-3
    changed_weights = export.weights_sha256(export.stage_tensors(changed, export.SAM_IMAGE_ENCODER))
    assert changed_weights != weights
    # The mask decoder is not part of the encoder graph: training it (as LENS does) keeps the graph.
    with torch.no_grad():
        changed.sam.sam_mask_decoder.iou_prediction_head.layers[0].weight.add_(1.0)
    assert export.weights_sha256(export.stage_tensors(changed, export.SAM_IMAGE_ENCODER)) == changed_weights

    assert export.export_key(export.SAM_IMAGE_ENCODER, changed_weights, inputs, "float32") != key
    other_shape = {"pixels": {"shape": [1, 3, 512, 512], "dtype": "float32"}}
    assert export.export_key(export.SAM_IMAGE_ENCODER, weights, other_shape, "float32") != key
    assert export.export_key(export.SAM_IMAGE_ENCODER, weights, inputs, "float16") != key
    grid = export.export_key(export.VISION_TOWER, weights, inputs, "float32", {"image_grid_thw": [1, 10, 14]})
    assert grid != export.export_key(export.VISION_TOWER, weights, inputs, "float32", {"image_grid_thw": [1, 14, 10]})
    monkeypatch.setattr(export, "library_versions", lambda: {"torch": "0.0"})
    assert export.export_key(export.SAM_IMAGE_ENCODER, weights, inputs, "float32") != key


def test_a_graph_refuses_inputs_of_another_shape(tiny_model, export_cache):
    from lens_ros.accel.onnxruntime_backend import OnnxRuntimeStages

    model, processor = tiny_model
    backend = OnnxRuntimeStages(model, cache_dir=export_cache)
    stage_outputs(backend, stage_inputs(model, processor, np.zeros((120, 160, 3), np.uint8)))
    graph = next(g for g in backend._graphs.values() if g.directory.name == backend.used[export.SAM_IMAGE_ENCODER])
    with pytest.raises(ValueError, match=r"pixels: shape \[1, 3, 64, 64\], the graph takes \[1, 3, 256, 256\]"):
        graph(pixels=torch.zeros(1, 3, 64, 64))


def test_without_onnxruntime_the_error_names_the_package_and_the_fallback(tiny_model, monkeypatch):
    from lens_ros.accel import make_stages

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(RuntimeError, match=r"needs the onnxruntime package \(pip install onnxruntime.*backend 'torch'"):
        make_stages(tiny_model[0], "onnxruntime")


def test_unknown_backends_are_refused_by_name():
    from lens_ros.pipeline import PipelineConfig
    from lens_ros.ros.params import NodeConfig

    with pytest.raises(ValueError, match="backend must be one of torch, onnxruntime, tensorrt, got 'tensorrt7'"):
        PipelineConfig(backend="tensorrt7")
    with pytest.raises(ValueError, match="'backend'"):
        NodeConfig(backend="cuda")


def test_stage_backends_route_single_stages_to_another_backend(tiny_model, export_cache):
    from lens_ros.accel import make_stages
    from lens_ros.accel.stages import RoutedStages

    model, processor = tiny_model
    stages = make_stages(model, "onnxruntime", cache_dir=export_cache, stage_backends={"mask_pass": "torch"})
    assert isinstance(stages, RoutedStages)
    assert stages.describe() == {"sam_image_encoder": "onnxruntime", "vision_tower": "onnxruntime", "mask_pass": "torch",
                                 "sam_mask_decoder": "onnxruntime"}
    given = stage_inputs(model, processor, np.zeros((120, 160, 3), np.uint8))
    reference, got = stage_outputs(Stages(model), given), stage_outputs(stages, given)
    assert torch.equal(reference[export.MASK_PASS][0], got[export.MASK_PASS][0])  # torch's own code ran it
    onnx = stages.routes[export.SAM_IMAGE_ENCODER]
    assert onnx is stages.routes[export.SAM_MASK_DECODER] and set(onnx.used) == set(STAGES) - {export.MASK_PASS}
    for stage in set(STAGES) - {export.MASK_PASS}:
        assert_close(reference[stage], got[stage], stage)
    assert type(make_stages(model, "torch", stage_backends={"mask_pass": "torch"})) is Stages  # one backend: no router


@pytest.mark.parametrize("text, message", [
    ("mask_pass=cuda", "'mask_pass=cuda' is not <stage>=<backend>"),
    ("vision=torch", "'vision=torch' is not <stage>=<backend> (stages: sam_image_encoder, vision_tower, mask_pass, "
                     "sam_mask_decoder; backends: torch, onnxruntime, tensorrt)"),
    ("mask_pass=torch,mask_pass=onnxruntime", "mask_pass is given twice")])
def test_bad_stage_backends_are_refused_with_the_accepted_names(text, message):
    from lens_ros.pipeline import PipelineConfig
    from lens_ros.ros.params import NodeConfig

    with pytest.raises(ValueError, match="^stage_backends: " + re.escape(message)):
        PipelineConfig(stage_backends=text)
    with pytest.raises(ValueError, match="^parameter 'stage_backends': " + re.escape(message)):
        NodeConfig(stage_backends=text)


def test_lens_export_writes_graphs_and_a_manifest_the_backend_uses(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """`lens-export` for a 160x120 camera; then lens-segment with --backend onnxruntime --export-dir
    runs those graphs without exporting anything."""
    from lens_ros.accel.cli import export_main
    from lens_ros.cli import segment_main

    out = tmp_path / "engines"
    assert export_main(["--model", str(tiny_checkpoint), "--image-size", "160x120", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"{stage}: " in printed for stage in STAGES) and "OVER TOLERANCE" not in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_size"] == [160, 120] and manifest["dtype"] == "float32" and manifest["opset"] == export.OPSET
    assert set(manifest["graphs"]) == set(STAGES) and manifest["not_exported"] == {}
    assert {"torch", "transformers", "sam2", "onnx"} <= set(manifest["versions"])
    vision = manifest["graphs"][export.VISION_TOWER]
    assert vision["constants"]["image_grid_thw"][0] == 1 and vision["inputs"]["pixel_values"]["dtype"] == "float32"
    for stage, graph in manifest["graphs"].items():
        assert (out / graph["directory"] / graph["file"]).is_file()
        assert len(manifest["weights_sha256"][stage]) == 64
        assert manifest["max_abs_difference"][stage]["value"] <= TOLERANCE * manifest["max_abs_difference"][stage]["reference_max"]

    import cv2

    image = tmp_path / "camera.png"
    cv2.imwrite(str(image), (np.random.default_rng(5).random((120, 160, 3)) * 255).astype(np.uint8))

    def refuse(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(export, "export_stage", refuse)
    code = segment_main(["--model", str(tiny_checkpoint), "--image", str(image), "--command", "the cup",
                         "--backend", "onnxruntime", "--export-dir", str(out), "--max-new-tokens", "4",
                         "--out", str(tmp_path / "seg"), "--offline"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "seg" / "result.json").read_text())["command"] == "the cup"


def test_lens_export_refuses_a_bad_image_size(capsys):
    from lens_ros.accel.cli import export_main

    assert export_main(["--model", "tiny", "--image-size", "640by480", "--out", "/nonexistent"]) == 2
    assert "--image-size must be WIDTHxHEIGHT (e.g. 640x480), got '640by480'" in capsys.readouterr().err


def test_the_node_runs_the_onnxruntime_backend(scripted_checkpoint, tmp_path):
    """lens_node with backend:=onnxruntime, stage_backends:=vision_tower=torch and warm_up_size:=160x120
    over real DDS: /diagnostics says which backend runs each stage; before any frame arrives the
    warm-up exports the onnxruntime stages' graphs, with its progress in /diagnostics and the log;
    then a command is answered (a box: every stage runs) without exporting anything."""
    pytest.importorskip("rclpy")
    from node_clients import Harness

    graphs = tmp_path / "onnx"
    harness = Harness(scripted_checkpoint, "/cam_ort", backend="onnxruntime", export_dir=str(graphs),
                      max_new_tokens=40, stage_backends="vision_tower=torch", warm_up_size="160x120")

    def exported():
        return sorted(p.name for p in graphs.iterdir() if not p.name.startswith(".")) if graphs.is_dir() else []

    try:
        harness.wait_state("active")
        assert harness.state()["backend"] == ("sam_image_encoder=onnxruntime, vision_tower=torch, "
                                                "mask_pass=onnxruntime, sam_mask_decoder=onnxruntime")
        assert harness.peer.wait_for(lambda: harness.state()["warm_up"].startswith("warm-up done in"), 300), (
            harness.state()["warm_up"], harness.node.output()[-3000:])
        assert [name.split("-")[0] for name in exported()] == sorted(set(STAGES) - {export.VISION_TOWER})
        log = harness.node.output()
        assert "warm-up at 160x120 (sam_image_encoder=onnxruntime, vision_tower=torch" in log and "warm-up: mask" in log
        before = exported()
        harness.fresh_frame()
        answer = harness.command("the cup", timeout=300)
        assert answer.error == "" and answer.found, answer.error
        assert exported() == before  # the warm-up made them all
    finally:
        harness.close()


def test_warm_up_runs_every_stage_at_the_given_size(tiny_model, tmp_path):
    """The tiny model writes no box, so the warm-up runs the mask pass on a given answer: every graph
    is exported, and the first frame of that size exports nothing more."""
    from lens_ros.accel.warm_up import warm_up
    from lens_ros.pipeline import LensPipeline, PipelineConfig

    model, processor = tiny_model
    pipeline = LensPipeline(model, processor, PipelineConfig(model="tiny", max_new_tokens=4, backend="onnxruntime",
                                                             export_dir=str(tmp_path)))
    reports = []
    assert warm_up(pipeline, (160, 120), report=reports.append) > 0
    assert reports[0].startswith("warm-up at 160x120 (sam_image_encoder=onnxruntime")
    assert reports[1:-1] == ["warm-up: preparing", "warm-up: reasoning", "warm-up: mask (on a given answer)"]
    assert reports[-1].startswith("warm-up done in ")
    assert set(pipeline.stages.used) == set(STAGES)
    before = sorted(p.name for p in tmp_path.iterdir())
    pipeline.segment((np.random.default_rng(9).random((120, 160, 3)) * 255).astype(np.uint8), "the cup")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    pipeline.close()


def test_a_bad_warm_up_size_is_refused_by_name():
    from lens_ros.ros.params import NodeConfig

    with pytest.raises(ValueError, match=r"parameter 'warm_up_size' must be WIDTHxHEIGHT \(e.g. 640x480\), got '640'"):
        NodeConfig(warm_up_size="640")


# --- The SAM2 image encoder beside generation (accel.overlap) -------------------------------------------

class WaitingEncoder(Stages):
    """The torch stages, with an image encoder that first waits (up to 2 s) for reasoning to begin and
    records when it ran. Run before reasoning (sequentially), it waits in vain and ends first."""

    def __init__(self, model, reasoning_began) -> None:
        super().__init__(model)
        self.reasoning_began = reasoning_began
        self.intervals = []

    def encode_sam_image(self, pixels):
        import time

        start = time.perf_counter()
        self.reasoning_began.wait(2.0)
        embedding = super().encode_sam_image(pixels)
        self.intervals.append((start, time.perf_counter()))
        return embedding


def test_the_overlapped_encoder_runs_during_reasoning_and_changes_nothing(scripted_checkpoint):
    import threading
    import time

    from lens_ros.model.checkpoint import load_lens_model
    from lens_ros.pipeline import STAGE_REASONING, LensPipeline, PipelineConfig

    model, processor = load_lens_model(str(scripted_checkpoint))
    rgb = (np.random.default_rng(4).random((120, 160, 3)) * 255).astype(np.uint8)
    results, marks = {}, {}
    for overlap in (False, True):
        began, seen = threading.Event(), {}

        def progress(stage, text, began=began, seen=seen):
            seen.setdefault(stage, time.perf_counter())
            if stage == STAGE_REASONING:
                began.set()

        stages = WaitingEncoder(model, began)
        config = PipelineConfig(model="scripted", max_new_tokens=40, overlap_sam_encoder=overlap)
        results[overlap] = LensPipeline(model, processor, config, stages=stages).segment(rgb, "the cup",
                                                                                         progress=progress)
        marks[overlap] = (stages.intervals, seen)
    sequential, overlapped = results[False], results[True]
    assert overlapped.found and overlapped.reasoning == sequential.reasoning and overlapped.box == sequential.box
    assert np.array_equal(overlapped.mask, sequential.mask) and overlapped.score == sequential.score
    (encoded,), seen = marks[True]
    assert encoded[1] > seen[STAGE_REASONING]  # the encoder was still running when reasoning began
    (encoded,), seen = marks[False]
    assert encoded[1] < seen[STAGE_REASONING]  # sequential: the encoder first (it waited in vain)
    assert overlapped.timings.image_encoder_ms > 0 and sequential.timings.image_encoder_ms >= 2000


def test_a_failed_background_encoding_is_reported_and_not_kept(scripted_checkpoint):
    from lens_ros.model.checkpoint import load_lens_model
    from lens_ros.pipeline import LensPipeline, PipelineConfig

    class BrokenEncoder(Stages):
        calls = 0

        def encode_sam_image(self, pixels):
            BrokenEncoder.calls += 1
            if BrokenEncoder.calls == 1:
                raise RuntimeError("CUDA error: out of memory")
            return super().encode_sam_image(pixels)

    model, processor = load_lens_model(str(scripted_checkpoint))
    pipeline = LensPipeline(model, processor, PipelineConfig(model="scripted", max_new_tokens=40),
                            stages=BrokenEncoder(model))
    rgb = np.zeros((120, 160, 3), np.uint8)
    with pytest.raises(RuntimeError, match="out of memory"):
        pipeline.segment(rgb, "the cup")
    assert pipeline.segment(rgb, "the cup").found  # the same image is encoded again, not the failure reused
    assert BrokenEncoder.calls == 2


# --- The compiled decode loop (accel.decode) -----------------------------------------------------------

def test_the_compiled_decode_loop_generates_the_eager_tokens(tiny_checkpoint, scripted_checkpoint):
    """Static KV cache + torch.compile (inductor) against eager greedy decoding under each checkpoint's
    generation_config (repetition penalty 1.05): the same tokens, for commands of different lengths
    (the cache is sized once and reused) and for the scripted box answer end to end."""
    from lens_ros.model.checkpoint import load_lens_model
    from lens_ros.pipeline import LensPipeline, PipelineConfig

    rgb = (np.random.default_rng(6).random((120, 160, 3)) * 255).astype(np.uint8)
    for checkpoint, commands, tokens in ((tiny_checkpoint, ["the cup", "the small red cup on the left of the laptop"], 24),
                                         (scripted_checkpoint, ["the cup"], 40)):
        model, processor = load_lens_model(str(checkpoint))
        assert model.vlm.generation_config.repetition_penalty == 1.05
        pipelines = {compiled: LensPipeline(model, processor, PipelineConfig(
            model="t", max_new_tokens=tokens, compile=compiled, compile_backend="inductor")) for compiled in (False, True)}
        for command in commands:
            eager, compiled = (pipelines[c].segment(rgb, command) for c in (False, True))
            assert compiled.generated_tokens == eager.generated_tokens and compiled.reasoning == eager.reasoning
            assert compiled.box == eager.box and np.array_equal(compiled.mask, eager.mask)
        assert hasattr(model.vlm, "_compiled_call")  # transformers did compile the decode step
    assert compiled.found and compiled.box is not None


def test_compile_backends_are_checked(monkeypatch):
    from lens_ros.accel import decode
    from lens_ros.pipeline import PipelineConfig

    with pytest.raises(ValueError, match="compile_backend must be one of auto, inductor, tensorrt, eager, got 'xla'"):
        PipelineConfig(compile=True, compile_backend="xla")
    monkeypatch.setattr(decode, "_has_torch_tensorrt", lambda: False)
    assert decode.resolve_compile_backend("auto", torch.device("cpu")) == "inductor"
    with pytest.raises(RuntimeError, match=r"compile_backend 'tensorrt' needs torch_tensorrt"):
        decode.resolve_compile_backend("tensorrt", torch.device("cpu"))
    options = decode.decode_options("inductor", torch.device("cpu"), prompt_tokens=300, max_new_tokens=25)
    assert options["cache_implementation"] == "static" and options["max_cache_len"] == 512
    assert options["compile_config"].backend == "inductor"


# --- TensorRT: what runs without it (the engine build and execution need TensorRT and a GPU) ------------

def test_without_tensorrt_the_error_names_the_package_and_the_fallbacks(tiny_model, monkeypatch):
    from lens_ros.accel import make_stages

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(RuntimeError, match=r"needs TensorRT's Python package \(pip install tensorrt.*"
                                           r"python3-libnvinfer.*backend 'onnxruntime' or 'torch'"):
        make_stages(tiny_model[0], "tensorrt")


def test_tensorrt_needs_a_cuda_device(tiny_model, monkeypatch):
    import types

    from lens_ros.accel import make_stages

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # installed, but the model is on the CPU
    with pytest.raises(RuntimeError, match="needs a CUDA device, the model is on cpu"):
        make_stages(tiny_model[0], "tensorrt")


def test_lens_export_engines_refuses_at_once_without_tensorrt_or_a_gpu(tmp_path, monkeypatch, capsys):
    import types

    from lens_ros.accel.cli import export_main

    args = ["--model", "tiny", "--image-size", "160x120", "--out", str(tmp_path / "out"), "--engines"]
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert export_main(args) == 2
    assert "needs TensorRT's Python package" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    assert export_main(args) == 2  # --device cpu
    assert "needs a CUDA device, the model is on cpu" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before exporting anything


def test_an_engine_is_rebuilt_when_anything_it_depends_on_changes(tmp_path):
    from lens_ros.accel.tensorrt_backend import engine_key

    graph = tmp_path / "vision_tower.onnx"
    graph.write_bytes(b"graph")
    (tmp_path / "vision_tower.onnx.data").write_bytes(b"weights")
    spec = {"inputs": {"pixel_values": {"shape": [1564, 1176], "dtype": "float16"}}}
    gpu = ("NVIDIA Jetson AGX Orin", "8.7")
    key = engine_key(graph, spec, "float16", gpu, "10.3.0")
    assert key == engine_key(graph, spec, "float16", gpu, "10.3.0") and len(key.name()) == 24
    others = [engine_key(graph, spec, "float16", gpu, "10.7.0"),  # another JetPack's TensorRT
              engine_key(graph, spec, "float16", ("NVIDIA H200", "9.0"), "10.3.0"),
              engine_key(graph, spec, "float16", ("NVIDIA Jetson AGX Orin", "8.9"), "10.3.0"),
              engine_key(graph, spec, "bfloat16", gpu, "10.3.0"),
              engine_key(graph, {"inputs": {"pixel_values": {"shape": [1200, 1176], "dtype": "float16"}}}, "float16",
                         gpu, "10.3.0")]
    (tmp_path / "vision_tower.onnx.data").write_bytes(b"other weights")  # the graph's external weights count
    others.append(engine_key(graph, spec, "float16", gpu, "10.3.0"))
    assert len({key.name(), *(other.name() for other in others)}) == len(others) + 1
    with pytest.raises(ValueError, match="precision must be one of float32, float16, bfloat16, got 'int8'"):
        engine_key(graph, spec, "int8", gpu, "10.3.0")


def test_profile_shapes_fix_every_axis_but_the_dynamic_ones():
    from lens_ros.accel.tensorrt_backend import profile_shapes

    spec = {"inputs": {"inputs_embeds": {"shape": [1, 400, 2048]}, "attention_mask": {"shape": [1, 400]}}}
    profile = profile_shapes(spec, {"inputs_embeds": {1: (64, 512, 2048)}, "attention_mask": {1: (64, 512, 2048)}})
    assert profile == {"inputs_embeds": ((1, 64, 2048), (1, 512, 2048), (1, 2048, 2048)),
                       "attention_mask": ((1, 64), (1, 512), (1, 2048))}
    assert profile_shapes({"inputs": {"pixels": {"shape": [1, 3, 1024, 1024]}}}, {}) == {
        "pixels": ((1, 3, 1024, 1024),) * 3}
    with pytest.raises(ValueError, match=r"inputs_embeds axis 1: need 1 <= min <= opt <= max, got \(512, 64, 2048\)"):
        profile_shapes(spec, {"inputs_embeds": {1: (512, 64, 2048)}})


def test_real_size_stages_export_and_match(tmp_path):
    """`lens-export --model real-size` (Qwen2.5-VL-3B's vision tower from its published configuration
    and SAM2 Hiera-L, random weights) for a 640x480 camera: SAM2's image encoder and mask decoder
    and the vision tower export, and onnxruntime matches torch. About 9 minutes and 12 GB on 2 cores; in its own process, so the memory returns."""
    import os
    import shutil
    import subprocess

    out = tmp_path / "real"
    try:
        done = subprocess.run([sys.executable, "-m", "lens_ros.accel.cli", "--model", "real-size", "--image-size",
                               "640x480", "--out", str(out)], capture_output=True, text=True, timeout=2400,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        manifest = json.loads((out / "manifest.json").read_text())
        sam, vision = manifest["graphs"][export.SAM_IMAGE_ENCODER], manifest["graphs"][export.VISION_TOWER]
        # The 3B language model is not materialised (12 GB): no mask pass graph, and the manifest says why.
        assert set(manifest["graphs"]) == set(STAGES) - {export.MASK_PASS} and export.MASK_PASS in manifest["not_exported"]
        assert manifest["graphs"][export.SAM_MASK_DECODER]["outputs"]["low_res"]["shape"] == [1, 1, 256, 256]
        assert sam["inputs"]["pixels"]["shape"] == [1, 3, 1024, 1024]
        assert [o["shape"] for o in sam["outputs"].values()] == [[1, 256, 64, 64], [1, 32, 256, 256], [1, 64, 128, 128]]
        assert vision["inputs"]["pixel_values"]["shape"] == [1564, 1176]  # 476x644 after smart_resize
        assert vision["constants"]["image_grid_thw"] == [1, 34, 46] and vision["outputs"]["features"]["shape"] == [391, 2048]
        # 2.7 GB of float32 weights: beside the graph in one file, which onnxruntime found.
        assert (out / vision["directory"] / "vision_tower.onnx.data").stat().st_size > 2_000_000_000
        for stage, check in manifest["max_abs_difference"].items():
            assert check["value"] <= TOLERANCE * max(1.0, check["reference_max"]), stage
        assert "OVER TOLERANCE" not in done.stdout
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_the_benchmark_puts_backends_side_by_side(tiny_checkpoint, tmp_path, capsys):
    from lens_ros.bench.pipeline import main

    assert main(["--model", str(tiny_checkpoint), "--backend", "torch,onnxruntime", "--force-tokens", "3", "--runs", "1",
                 "--warmup", "1", "--export-dir", str(tmp_path), "--lens-two-pass"]) == 0
    printed = capsys.readouterr().out
    # LENS's own pass 2 (vision tower again, full forward with hidden states) gives this pipeline's prompt token.
    difference = re.search(r"its prompt token differs from this pipeline's mask pass by at most (\S+)", printed)
    assert difference and float(difference.group(1)) <= 1e-5, printed
    assert re.search(r"onnxruntime: command -> mask [\d.]+ ms, speed-up over LENS's path [\d.]+x", printed), printed
    assert "max_new_tokens 3 (forced)" in printed and "median ms per stage, new image each run" in printed
    table = printed.split("median ms per stage, new image each run")[1].splitlines()
    assert "torch" in table[1] and "onnxruntime" in table[1]
    assert any(line.split()[:1] == ["vision_ms"] and len(line.split()) == 3 for line in table)

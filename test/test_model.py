"""LensModel checkpoints and the mask pass, on tiny random models in the real layout."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lens_ros.model.checkpoint import (
    CheckpointError,
    ModelUnavailableError,
    from_checkpoint_key,
    load_lens_model,
    resolve_model_source,
    save_lens_checkpoint,
    to_checkpoint_key,
)
from lens_ros.model.lens import mask_pass_position_ids
from lens_ros.pipeline import LensPipeline, PreparedImage, sam_pixels


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(directory, edit):
    path = directory / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_checkpoint_is_in_the_lens_451_layout(tiny_checkpoint):
    keys = set(load_file(str(tiny_checkpoint / "model.safetensors")))
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert any(k.startswith("model.layers.0.") for k in keys)
    assert any(k.startswith("visual.blocks.0.") for k in keys)
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in keys)
    assert "lm_head.weight" not in keys  # tied to embed_tokens, as save_pretrained leaves it out
    assert tuple(load_file(str(tiny_checkpoint / "model.safetensors"))["learnable_query"].shape) == (1, 64, 64)
    for prefix in ("connector.blocks.3.attn.qkv.weight", "connector.pos_embed", "conv_1d.weight",
                   "proj_to_sam.0.weight", "proj_to_sam.2.weight", "sam.sam_mask_decoder.conv_s0.weight"):
        assert prefix in keys
    assert not any(k.startswith(("sam.memory_attention", "sam.memory_encoder", "sam.maskmem_tpos_enc")) for k in keys)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl"
    assert config["architectures"] == ["SAMR1ForConditionalGeneration_qwen2p5"]
    assert config["num_of_query"] == 64 and config["if_use_qwen_connector"] is True
    assert config["rope_scaling"]["type"] == "mrope" and "hidden_size" in config


def test_key_mapping_between_layouts():
    assert to_checkpoint_key("model.language_model.layers.1.mlp.up_proj.weight") == "model.layers.1.mlp.up_proj.weight"
    assert to_checkpoint_key("model.visual.merger.mlp.0.weight") == "visual.merger.mlp.0.weight"
    for old, new in [("model.layers.1.mlp.up_proj.weight", "model.language_model.layers.1.mlp.up_proj.weight"),
                     ("visual.blocks.0.attn.qkv.weight", "model.visual.blocks.0.attn.qkv.weight"),
                     ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
                     ("lm_head.weight", "lm_head.weight")]:
        assert from_checkpoint_key(old) == new
        assert from_checkpoint_key(new) == new  # 5.x names pass through


def test_save_then_load_is_bit_identical(tiny_model, tmp_path):
    model, processor = tiny_model
    save_lens_checkpoint(model, processor, tmp_path / "again")
    again, _ = load_lens_model(str(tmp_path / "again"))
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_transformers_5_layout_loads_identically(tiny_model, tiny_checkpoint, tmp_path):
    directory = _copy(tiny_checkpoint, tmp_path / "v5")
    _rewrite_weights(directory, lambda s: s.update({from_checkpoint_key(k): s.pop(k) for k in list(s)
                                                    if not k.startswith(("sam.", "connector.", "conv_1d.",
                                                                         "proj_to_sam.", "learnable_query"))}))
    assert any(k.startswith("model.language_model.") for k in load_file(str(directory / "model.safetensors")))
    model, _ = load_lens_model(str(directory))
    reference = tiny_model[0].state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key


@pytest.mark.parametrize("key", ["model.layers.1.mlp.up_proj.weight", "visual.merger.mlp.0.weight",
                                 "connector.blocks.0.norm1.weight", "learnable_query", "sam.no_mem_embed"])
def test_missing_key_is_an_error_that_names_it(tiny_checkpoint, tmp_path, key):
    directory = _copy(tiny_checkpoint, tmp_path / "missing")
    _rewrite_weights(directory, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match="missing") as info:
        load_lens_model(str(directory))
    assert key.removeprefix("sam.") in str(info.value)


def test_unexpected_key_is_an_error_that_names_it(tiny_checkpoint, tmp_path):
    directory = _copy(tiny_checkpoint, tmp_path / "extra")
    _rewrite_weights(directory, lambda s: s.update({"connector.blocks.9.norm1.weight": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected .*connector\.blocks\.9\.norm1\.weight"):
        load_lens_model(str(directory))


def test_pickle_only_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    directory = _copy(tiny_checkpoint, tmp_path / "pickle")
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_lens_model(str(directory))


def test_corrupt_weights_and_config_are_errors(tiny_checkpoint, tmp_path):
    directory = _copy(tiny_checkpoint, tmp_path / "corrupt")
    (directory / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        load_lens_model(str(directory))
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_lens_model(str(directory))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="not a LENS checkpoint"):
        load_lens_model(str(directory))


def test_unavailable_sources_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelUnavailableError, match=r"OuyBin/LENS.*downloads are disabled.*--model tiny"):
        resolve_model_source("OuyBin/LENS", allow_download=False)
    with pytest.raises(ModelUnavailableError, match="not a checkpoint directory"):
        resolve_model_source(str(tmp_path / "no" / "such" / "dir"))


def test_mask_pass_positions_formula():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    positions = mask_pass_position_ids(mask)
    assert positions.shape == (3, 2, 6)
    expected = torch.tensor([[0, 1, 2, 3, 4, 5], [1, 1, 0, 1, 2, 3]])
    for axis in range(3):
        assert torch.equal(positions[axis], expected)


def _prompt_and_answer(pipeline, image, answer):
    """Prompt + a given answer as token ids: the sequence the mask pass sees after generation."""
    from lens_ros import prompts

    prepared = pipeline.prepare_image(image)
    chat = pipeline.processor.apply_chat_template(prompts.build_messages("the cup"), tokenize=False,
                                                  add_generation_prompt=True)
    inputs = pipeline.processor(text=[chat], images=[prepared.vlm_image], return_tensors="pt")
    answer_ids = pipeline.processor.tokenizer(answer + "<|im_end|>", return_tensors="pt")["input_ids"]
    return prepared, inputs, torch.cat([inputs["input_ids"], answer_ids], dim=1)


def test_mask_pass_feeds_1d_positions_to_every_token(tiny_pipeline, photo_640x480):
    pipeline = tiny_pipeline
    prepared, inputs, sequence = _prompt_and_answer(pipeline, photo_640x480, "[10, 20, 200, 150]")
    with torch.inference_mode():
        prepared.vision_features = pipeline.model.image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        seen = []
        rotary = pipeline.model.vlm.model.language_model.rotary_emb
        handle = rotary.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
        try:
            pipeline.mask_logits(prepared, sequence)
        finally:
            handle.remove()
    assert len(seen) == 1
    positions = seen[0]
    length = sequence.shape[1] + pipeline.model.num_queries
    assert positions.shape == (3, 1, length)
    image_tokens = (sequence[0] == pipeline.model.config.image_token_id).sum()
    assert image_tokens == 391  # 640x480 -> 644x476 -> 391 merged visual tokens
    for axis in range(3):
        assert torch.equal(positions[axis, 0], torch.arange(length))  # images and queries included


def test_reused_vision_output_and_sam_embedding_are_exact(tiny_pipeline, photo_640x480):
    pipeline = tiny_pipeline
    prepared, inputs, sequence = _prompt_and_answer(pipeline, photo_640x480, "[64, 48, 320, 240]")
    with torch.inference_mode():
        pipeline.segment(prepared, "the cup")  # fills prepared.vision_features, reused below
        reused, reused_score = pipeline.mask_logits(prepared, sequence)
        model = pipeline.model
        fresh = PreparedImage(
            rgb=prepared.rgb, fingerprint="fresh", vlm_image=prepared.vlm_image,
            sam_embedding=model.encode_sam_image(sam_pixels(prepared.rgb, model.sam.image_size)),
            preprocess_ms=0, image_encoder_ms=0,
            vision_features=model.vlm.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                               return_dict=True))
        recomputed, recomputed_score = pipeline.mask_logits(fresh, sequence)
    assert reused.shape == (1, 1, 480, 640)
    assert torch.allclose(reused, recomputed, rtol=0, atol=1e-5)
    assert reused_score == pytest.approx(recomputed_score, abs=1e-6)


def test_context_head_maths(tiny_model):
    """connector -> conv_1d over the query positions -> proj_to_sam: one 256-d token."""
    model = tiny_model[0]
    states = torch.randn(2, model.num_queries, model.config.text_config.hidden_size)
    with torch.inference_mode():
        token = model.context_token(states)
        x = states + model.connector.pos_embed
        for block in model.connector.blocks:
            x = block(x)
        collapsed = torch.einsum("bqd,edq->be", x, model.conv_1d.weight) + model.conv_1d.bias
        expected = model.proj_to_sam(collapsed)[:, None]
    assert token.shape == (2, 1, 256)
    assert torch.allclose(token, expected, atol=1e-5)


def test_mask_logits_match_a_transcription_of_lens_forward(tiny_pipeline, photo_640x480):
    """Our staged mask pass against LENS's own forward (samr1.py), written out step by step."""
    import torch.nn.functional as F

    from lens_ros.pipeline import LensPipeline

    pipeline = LensPipeline(tiny_pipeline.model, tiny_pipeline.processor, tiny_pipeline.config)
    prepared, inputs, ids = _prompt_and_answer(pipeline, photo_640x480, "[64, 48, 320, 240]")
    model, vlm, sam = pipeline.model, pipeline.model.vlm, pipeline.model.sam
    with torch.inference_mode():
        prepared.vision_features = model.image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        ours, _ = pipeline.mask_logits(prepared, ids)

        # process_llm_input: embed, scatter the vision tower output, append the queries.
        embeds = vlm.get_input_embeddings()(ids)
        image = vlm.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        embeds = embeds.masked_scatter((ids == vlm.config.image_token_id)[..., None].expand_as(embeds), image)
        embeds = torch.cat([embeds, model.learnable_query.repeat(1, 1, 1)], dim=1)
        attention = torch.ones(embeds.shape[:2], dtype=torch.long)
        positions = (attention.cumsum(-1) - 1)[None].expand(3, -1, -1)  # transformers 4.51's fallback
        hidden = vlm(inputs_embeds=embeds, attention_mask=attention, position_ids=positions,
                     output_hidden_states=True).hidden_states[-1]
        # get_sam_embedding
        query = model.connector(hidden[:, -model.num_queries:])
        query = model.conv_1d(query.transpose(1, 2)).transpose(1, 2).contiguous()
        token = model.proj_to_sam(query)
        # the SAM branch of forward()
        size = sam.image_size
        backbone = sam.forward_image(sam_pixels(prepared.rgb, size))
        _, feats, _, _ = sam._prepare_backbone_features(backbone)
        feats = [f.to(torch.float32) for f in feats]  # .to(sam_images.dtype)
        feats[-1] = feats[-1] + sam.no_mem_embed
        sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
        feats = [f.permute(1, 2, 0).view(1, -1, *s) for f, s in zip(feats[::-1], sizes[::-1])][::-1]
        sparse, dense = sam.sam_prompt_encoder(points=None, boxes=None, masks=None)
        sparse = torch.cat([sparse, token], dim=1)  # LENS's prompt-encoder patch
        low_res, _, _, _ = sam.sam_mask_decoder(
            image_embeddings=feats[-1], image_pe=sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            repeat_image=True, high_res_features=feats[:-1])
        reference = F.interpolate(low_res.float(), (480, 640), mode="bilinear", align_corners=False)
    assert low_res.shape == (1, 1, size // 4, size // 4)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-5)


def test_tiny_source_is_built_once_then_reused(tmp_path):
    first = resolve_model_source("tiny", cache_dir=tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = resolve_model_source("tiny", cache_dir=tmp_path)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging leftovers


def _to_451_processor_files(directory):
    """Rewrite the processor files as transformers 4.51 saved them in the released checkpoints."""
    config = json.loads((directory / "processor_config.json").read_text())
    image = config["image_processor"]
    image.pop("size")
    image.update({"min_pixels": 3136, "max_pixels": 12845056, "processor_class": "Qwen2_5_VLProcessor"})
    (directory / "preprocessor_config.json").write_text(json.dumps(image))
    (directory / "processor_config.json").unlink()
    template = (directory / "chat_template.jinja").read_text()
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (directory / "chat_template.jinja").unlink()
    tokenizer = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer.pop("backend", None)
    tokenizer["tokenizer_class"] = "Qwen2Tokenizer"
    tokenizer["additional_special_tokens"] = tokenizer.pop("extra_special_tokens")
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer))


def test_processor_files_of_the_451_era_load(tiny_checkpoint, tmp_path, photo_640x480):
    directory = _copy(tiny_checkpoint, tmp_path / "old")
    _to_451_processor_files(directory)
    model, processor = load_lens_model(str(directory))
    assert type(processor.tokenizer).__name__ == "Qwen2Tokenizer"
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    result = LensPipeline(model, processor).segment(photo_640x480, "the cup")
    assert result.error == "" and result.mask.shape == (480, 640)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_runs_both_passes(tiny_checkpoint, photo_640x480, dtype):
    model, processor = load_lens_model(str(tiny_checkpoint), dtype=dtype)
    assert model.learnable_query.dtype == getattr(torch, dtype)
    assert model.sam.no_mem_embed.dtype == getattr(torch, dtype)
    pipeline = LensPipeline(model, processor)
    prepared, inputs, sequence = _prompt_and_answer(pipeline, photo_640x480, "[64, 48, 320, 240]")
    with torch.inference_mode():
        prepared.vision_features = model.image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        logits, score = pipeline.mask_logits(prepared, sequence)
    assert logits.dtype == torch.float32 and logits.shape == (1, 1, 480, 640)
    assert torch.isfinite(logits).all() and np.isfinite(score)


# -- code shipped with a checkpoint never runs (issue item 6) ------------------------------------
# A module the malicious checkpoints below point at: importing it leaves a marker file beside it.
CHECKPOINT_CODE = """\
import pathlib
pathlib.Path(__file__).with_name("CODE_RAN").write_text("the checkpoint's own Python ran")
from transformers import PretrainedConfig, PreTrainedTokenizerFast, Qwen2VLImageProcessor
class EvilConfig(PretrainedConfig):
    model_type = "evil"
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
class EvilImageProcessor(Qwen2VLImageProcessor):
    pass
"""


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _unknown_model_type(directory):
    # The case: without tokenizer_class, AutoTokenizer asks AutoConfig, which meets an unknown
    # model_type with an auto_map and asks on stdin whether to run the checkpoint's code.
    _edit_json(directory / "config.json",
               lambda c: c.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"}))
    _edit_json(directory / "tokenizer_config.json", lambda c: c.pop("tokenizer_class"))


def _tokenizer_auto_map(directory):
    code = {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": [None, "evil.EvilTokenizer"]}}
    _edit_json(directory / "tokenizer_config.json", lambda c: c.update(code))


def _image_processor_auto_map(directory):
    def edit(config):
        config["image_processor"].update(image_processor_type="EvilImageProcessor",
                                         auto_map={"AutoImageProcessor": "evil.EvilImageProcessor"})
    _edit_json(directory / "processor_config.json", edit)


CODE_CHECKPOINTS = {  # variant -> (edit, the file and key the refusal must name)
    "unknown_model_type": (_unknown_model_type, "config.json: key 'auto_map'"),
    "tokenizer_auto_map": (_tokenizer_auto_map, "tokenizer_config.json: key 'auto_map'"),
    "image_processor_auto_map": (_image_processor_auto_map, "processor_config.json: key 'image_processor.auto_map'"),
    "python_file_only": (lambda directory: None, None),  # inert: nothing names it, so it loads, unrun
}

LOAD_EACH_WITH_Y_ON_STDIN = """\
import json, sys
from lens_ros.model.checkpoint import load_lens_model
for directory in sys.argv[1:]:
    try:
        load_lens_model(directory)
        print(json.dumps({"directory": directory, "error": None}))
    except Exception as error:
        print(json.dumps({"directory": directory, "error": f"{type(error).__name__}: {error}"}))
print(json.dumps({"stdin_left": sys.stdin.read()}))
"""


def test_checkpoint_code_never_runs_and_no_load_reads_stdin(tiny_checkpoint, tmp_path):
    import os
    import subprocess
    import sys

    directories = []
    for variant, (edit, _) in CODE_CHECKPOINTS.items():
        directory = _copy(tiny_checkpoint, tmp_path / variant)
        (directory / "evil.py").write_text(CHECKPOINT_CODE)
        edit(directory)
        directories.append(directory)
    answers = "y\n" * 8  # what a user (or a pipe) would answer to "Do you wish to run the custom code?"
    proc = subprocess.run([sys.executable, "-c", LOAD_EACH_WITH_Y_ON_STDIN, *map(str, directories)], input=answers,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    *results, stdin = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert stdin == {"stdin_left": answers}, "a load read stdin"
    for directory, result, (_, named) in zip(directories, results, CODE_CHECKPOINTS.values()):
        assert not (directory / "CODE_RAN").exists(), f"{directory.name}: the checkpoint's code ran"
        if named is None:
            assert result["error"] is None, result
            continue
        error = result["error"] or ""
        assert error.startswith("CheckpointError: ") and "\n" not in error, (directory.name, error)
        assert f"{directory}/{named}" in error and "never runs code shipped with a checkpoint" in error


def test_the_processor_load_itself_never_trusts_checkpoint_code(tiny_checkpoint, tmp_path):
    """Behind the refusal, every transformers load passes trust_remote_code=False: loaded directly, the
    issue's checkpoint neither runs its code nor asks (stdin is closed: a prompt would raise EOFError)."""
    import subprocess
    import sys

    directory = _copy(tiny_checkpoint, tmp_path / "unknown_model_type")
    (directory / "evil.py").write_text(CHECKPOINT_CODE)
    _unknown_model_type(directory)
    code = "import sys; from lens_ros.model.checkpoint import load_processor; load_processor(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(directory)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]  # loaded, with transformers' own classes
    assert not (directory / "CODE_RAN").exists()
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr


# -- SAM2's Hydra overrides cannot instantiate anything (issue item 6) ----------------------------
def test_sam2_overrides_in_a_checkpoint_cannot_make_hydra_run_code(tiny_checkpoint, tmp_path):
    marker = tmp_path / "hydra_ran"
    # Hydra instantiates every node with a _target_, with _args_: here os.makedirs(marker), before
    # Hiera complains about the unexpected argument.
    override = f"++model.image_encoder.trunk.evil={{_target_:os.makedirs,_args_:[{marker}]}}"
    directory = _copy(tiny_checkpoint, tmp_path / "hydra")
    _edit_json(directory / "config.json", lambda c: c["lens_ros_sam2"]["overrides"].append(override))
    with pytest.raises(CheckpointError) as info:
        load_lens_model(str(directory))
    assert not marker.exists(), "Hydra ran the checkpoint's target"
    message = str(info.value)
    assert "\n" not in message and f"{directory}/config.json: lens_ros_sam2:" in message and "evil" in message


# Hydra special keys, interpolations and resolvers, dicts (instantiable nodes), strings, other
# override kinds (+ adds, ~ deletes, hydra.*), sweeps; then configs that are not sam2's model configs.
REFUSED_OVERRIDES = ["++model._target_=os.system", "++model.image_encoder._args_=[1]",
                     "++model.image_encoder.trunk._partial_=true", "++model.sam_mask_decoder_extra_args._convert_=all",
                     "++model.image_size=${oc.env:HOME}", "++model.image_size=[1,${oc.env:HOME}]",
                     "++model.image_encoder.trunk.stages={_target_:os.getcwd}", "++model.name=some_string",
                     "+model.image_size=256", "~model.memory_attention", "++hydra.run.dir=/tmp",
                     "++model.image_size=256,512", 256]
REFUSED_CONFIGS = ["configs/sam2.1_training/sam2.1_hiera_b+_MOSE_finetune.yaml", "/etc/evil.yaml",
                   "configs/sam2/../../evil.yaml", "pkg://os/evil.yaml", ["configs/sam2/sam2_hiera_l.yaml"]]


@pytest.mark.parametrize("spec", [{"overrides": [override]} for override in REFUSED_OVERRIDES]
                         + [{"config": config} for config in REFUSED_CONFIGS]
                         + [{"overrides": "++model.image_size=256"}, ["configs/sam2/sam2_hiera_l.yaml"],
                            {"config": "configs/sam2/sam2_hiera_l.yaml", "code": "os.system"}])
def test_sam2_specs_are_sam2s_own_configs_with_literal_overrides(spec):
    from lens_ros.model.sam import Sam2Spec

    with pytest.raises(ValueError) as info:
        Sam2Spec.from_dict(spec)
    assert "\n" not in str(info.value)


def test_plain_sam2_specs_still_load():
    from lens_ros.model.sam import SAM2_CONFIG, Sam2Spec
    from lens_ros.model.tiny import TINY_SAM2_SPEC

    assert Sam2Spec.from_dict(TINY_SAM2_SPEC.to_dict()) == TINY_SAM2_SPEC
    assert Sam2Spec.from_dict(None) == Sam2Spec() == Sam2Spec(SAM2_CONFIG)
    spec = {"config": "configs/sam2.1/sam2.1_hiera_b+.yaml",
            "overrides": ["++model.image_size=512", "++model.sigmoid_bias_for_mem_enc=-1.5e-3",
                          "++model.image_encoder.trunk.window_spec=[8, 4, 14, 7]",
                          "++model.use_obj_ptrs_in_encoder=false",
                          "++model.image_encoder.trunk.global_att_blocks=[]"]}
    assert Sam2Spec.from_dict(spec).to_dict() == spec

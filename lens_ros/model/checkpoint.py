"""Reading and writing LENS checkpoints, and finding them.

One loader for every source: a Hugging Face id (``OuyBin/LENS`` and the other released ids),
a local ``save_pretrained`` directory, our own saved checkpoints and tiny ones.

The layout on disk is LENS's (LENS_REFERENCE.md §1): one state dict with the Qwen weights
under transformers 4.51 names (``model.layers.*``, ``model.embed_tokens``, ``model.norm``,
``visual.*``, ``lm_head``) next to ``learnable_query``, ``connector.*``, ``conv_1d.*``,
``proj_to_sam.*`` and ``sam.*``; a config.json in the 4.51 Qwen2-VL style with
``num_of_query`` and ``if_use_qwen_connector``. Transformers 5.x names (``model.language_model.*``,
``model.visual.*``) are accepted too. Loading is strict: any missing or unexpected key is an
error that names it. Only safetensors are read, and no code that comes with a checkpoint ever runs:
a checkpoint that names its own code (``auto_map``) is refused (``refuse_checkpoint_code``), every
transformers load passes ``trust_remote_code=False`` (so none asks on stdin either), and the SAM2
build accepts only sam2's own configs with literal overrides (``Sam2Spec``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from lens_ros.model.lens import LensModel
from lens_ros.model.sam import Sam2Spec, Sam2SpecError, build_sam2_for_lens

log = logging.getLogger(__name__)

DEFAULT_MODEL = "OuyBin/LENS"
RELEASED_MODELS = ("OuyBin/LENS", "OuyBin/LENS_ReasonSeg", "OuyBin/LENS_ReasonSeg_FT", "OuyBin/LENS_ReasonSeg_CoT")
TINY_MODEL = "tiny"
LENS_ARCHITECTURE = "SAMR1ForConditionalGeneration_qwen2p5"
# Our own addition to config.json: the SAM2 build, stored only when it is not LENS's Hiera-L.
SAM2_SPEC_KEY = "lens_ros_sam2"

HEAD_PREFIXES = ("learnable_query", "connector.", "conv_1d.", "proj_to_sam.")
SAM_PREFIX = "sam."
# Files a checkpoint needs; weights in pickle formats are never fetched nor read, nor is code
# ("tokenizer*" would also match a tokenizer_*.py).
_CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]
_NEVER_FETCHED = ["*.py", "*.pyc"]
# JSON files of a checkpoint that are vocabularies, not configuration: their keys are tokens (a
# token may well be spelt "auto_map") and transformers never looks for code classes in them.
_VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "added_tokens.json")
_NO_CODE = "lens_ros never runs code shipped with a checkpoint"
_NON_QWEN_CONFIG_KEYS = {"model_type", "architectures", "num_of_query", "if_use_qwen_connector",
                         "if_include_sam", "auto_map", "transformers_version", SAM2_SPEC_KEY}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(RuntimeError):
    """A checkpoint is malformed: wrong layout, missing or unexpected weights."""


class ModelUnavailableError(RuntimeError):
    """A model source cannot be found here (and may not be downloaded).

    ``reason`` says why; the message adds how to run the tiny model instead, in the command-line
    tools' syntax. Front ends that spell it otherwise (the node's ``-p model:=tiny``) use
    ``reason`` with their own hint.
    """

    TINY_HINT = "use --model tiny to run the built-in tiny model (its masks are meaningless)"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}; {self.TINY_HINT}")


# -- key layouts ------------------------------------------------------------------------------
def to_checkpoint_key(key: str) -> str:
    """transformers 5.x Qwen2.5-VL name -> the 4.51 name LENS checkpoints use."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def from_checkpoint_key(key: str) -> str:
    """A Qwen2.5-VL name in either layout (4.51 or 5.x) -> the transformers 5.x name."""
    if key.startswith(("model.language_model.", "model.visual.", "lm_head.")):
        return key
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


def split_state_dict(state: dict[str, torch.Tensor]):
    """Checkpoint state dict -> (Qwen part in 5.x names, context head part, SAM2 part)."""
    qwen, head, sam = {}, {}, {}
    for key, value in state.items():
        if key.startswith(HEAD_PREFIXES):
            head[key] = value
        elif key.startswith(SAM_PREFIX):
            sam[key[len(SAM_PREFIX):]] = value
        else:
            qwen[from_checkpoint_key(key)] = value
    return qwen, head, sam


# -- config -----------------------------------------------------------------------------------
def is_lens_config(data: dict) -> bool:
    return "num_of_query" in data or LENS_ARCHITECTURE in (data.get("architectures") or [])


def qwen_config_from_lens(data: dict):
    """Build the Qwen2.5-VL configuration from a LENS config.json.

    LENS checkpoints say ``"model_type": "qwen2_vl"`` although the model is Qwen2.5-VL, so
    AutoConfig would build the wrong class; the fields themselves (4.51 style, text fields at
    the top level, ``rope_scaling`` of type mrope) are Qwen2.5-VL's and transformers converts them.
    """
    from transformers import Qwen2_5_VLConfig

    fields = {k: v for k, v in data.items() if k not in _NON_QWEN_CONFIG_KEYS}
    return Qwen2_5_VLConfig(**fields)


def lens_config_dict(qwen_config, num_queries: int, use_connector: bool, sam_spec: Sam2Spec) -> dict:
    """The config.json LENS writes: 4.51 Qwen2-VL style, text fields at the top level."""
    text = qwen_config.text_config.to_dict()
    rope = dict(text.pop("rope_parameters", None) or {})
    for key in ("model_type", "dtype", "torch_dtype", "transformers_version", "architectures", "output_hidden_states",
                "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type"):
        text.pop(key, None)
    vision = qwen_config.vision_config.to_dict()
    for key in ("dtype", "torch_dtype", "transformers_version"):
        vision.pop(key, None)
    data = dict(text)
    data["rope_theta"] = rope.pop("rope_theta", 1000000.0)
    rope.pop("rope_type", None)
    data["rope_scaling"] = {"type": "mrope", **rope}
    data["vision_config"] = vision
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                "tie_word_embeddings"):
        data[key] = getattr(qwen_config, key)
    dtype = qwen_config.text_config.dtype or torch.float32
    data["torch_dtype"] = str(dtype).replace("torch.", "")
    data.update({"model_type": "qwen2_vl", "architectures": [LENS_ARCHITECTURE],
                 "num_of_query": num_queries, "if_use_qwen_connector": use_connector})
    if sam_spec != Sam2Spec():
        data[SAM2_SPEC_KEY] = sam_spec.to_dict()
    return data


# -- finding a checkpoint -----------------------------------------------------------------------
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_model_source(source: str, allow_download: bool = False, cache_dir: str | os.PathLike | None = None) -> Path:
    """Turn a model source into a local checkpoint directory.

    ``tiny`` builds (or reuses) the cached tiny checkpoint; an existing directory is used as
    it is; ``owner/name`` is looked up in the Hugging Face cache and fetched only when
    ``allow_download`` is true. Raises ``ModelUnavailableError`` with a message a user can act on.
    """
    if source == TINY_MODEL:
        from lens_ros.model.tiny import ensure_tiny_checkpoint

        return ensure_tiny_checkpoint(cache_dir=cache_dir)
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not _HF_ID.match(source):
        raise ModelUnavailableError(
            f"model {source!r}: not a checkpoint directory and not a Hugging Face id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id=source, allow_patterns=_CHECKPOINT_FILES, ignore_patterns=_NEVER_FETCHED,
                                  local_files_only=not allow_download)
    except Exception as exc:  # hub errors have many types; all mean "not available here"
        how = ("downloads are disabled (allow downloads to fetch it)" if not allow_download
               else f"the download failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        raise ModelUnavailableError(f"model {source!r} is not in the local Hugging Face cache and {how}") from exc
    return Path(local)


# -- code in a checkpoint -------------------------------------------------------------------------
def _auto_map_key(data, path: str = "") -> str | None:
    """The dotted key of the first ``auto_map`` in a JSON document, or None."""
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "auto_map":
                return where
            found = _auto_map_key(value, where)
            if found:
                return found
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found = _auto_map_key(value, f"{path}[{index}]")
            if found:
                return found
    return None


def refuse_checkpoint_code(directory: Path) -> None:
    """Raise ``CheckpointError`` when the checkpoint comes with code of its own.

    What is refused, precisely, and why:

    * an ``auto_map`` key anywhere in any of its JSON configuration files (config.json,
      tokenizer_config.json, processor_config.json with its nested sub-processor configs,
      preprocessor_config.json, ...): that is how a checkpoint names classes in its own modules,
      which transformers then imports (or asks on stdin whether to). The vocabulary files
      (``_VOCABULARY_FILES``) are not searched: their keys are tokens, not configuration.

    Python files in the directory are not refused: with no ``auto_map`` and
    ``trust_remote_code=False`` nothing imports them, and a repository downloaded whole (its
    README's helper scripts, say) must still load. ``resolve_model_source`` never fetches them.

    Every load also passes ``trust_remote_code=False``; this check makes such a checkpoint fail at
    once, with the file and key named, instead of loading in some way that depends on transformers.
    """
    for path in sorted(directory.glob("*.json")):
        if path.name in _VOCABULARY_FILES:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"{path}: unreadable ({exc})") from exc
        key = _auto_map_key(data)
        if key is not None:
            raise CheckpointError(f"{path}: key '{key}' names classes in the checkpoint's own code; {_NO_CODE}")


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    if pickles:
        raise CheckpointError(f"{directory}: only pickle weights ({', '.join(pickles)}); "
                              f"this loader reads safetensors only (pickles can run code)")
    raise CheckpointError(f"{directory}: no *.safetensors weights found")


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(directory):
        if not file.is_file():
            raise CheckpointError(f"{directory}: weight file {file.name} listed in the index is missing")
        try:
            state.update(load_file(str(file), device="cpu"))
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot read safetensors ({exc})") from exc
    return state


def _names(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_keys(part: str, expected: set[str], found: set[str], allowed_missing: set[str] = frozenset()) -> None:
    missing = expected - found - allowed_missing
    unexpected = found - expected
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
    if problems:
        raise CheckpointError(f"{part}: " + "; ".join(problems))


# -- loading -------------------------------------------------------------------------------------
def load_lens_model(source: str = DEFAULT_MODEL, device: str = "cpu", dtype: str | torch.dtype = "float32",
                    allow_download: bool = False, cache_dir=None):
    """Load a LENS checkpoint from any source. Returns ``(model, processor)`` in eval mode."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    directory = resolve_model_source(source, allow_download=allow_download, cache_dir=cache_dir)
    refuse_checkpoint_code(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        data = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: unreadable ({exc})") from exc
    if not is_lens_config(data):
        raise CheckpointError(f"{directory}: not a LENS checkpoint (config.json has no num_of_query and "
                              f"architectures is {data.get('architectures')})")
    qwen_config = qwen_config_from_lens(data)
    num_queries = int(data.get("num_of_query") or 64)
    use_connector = bool(data.get("if_use_qwen_connector", True))
    try:
        sam_spec = Sam2Spec.from_dict(data.get(SAM2_SPEC_KEY))
    except Sam2SpecError as exc:
        raise CheckpointError(f"{config_path}: {SAM2_SPEC_KEY}: {exc}") from exc

    qwen_state, head_state, sam_state = split_state_dict(read_state_dict(directory))

    vlm, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        None, config=qwen_config, state_dict=qwen_state, dtype=torch_dtype, output_loading_info=True,
        trust_remote_code=False)
    del qwen_state
    tied = {"lm_head.weight"} if qwen_config.tie_word_embeddings else set()
    missing = set(info.get("missing_keys", ())) - tied
    unexpected = set(info.get("unexpected_keys", ()))
    mismatched = [str(m) for m in info.get("mismatched_keys", ())]
    if missing or unexpected or mismatched:
        parts = [f"missing {len(missing)} key(s): {_names(to_checkpoint_key(k) for k in missing)}" if missing else "",
                 f"unexpected {len(unexpected)} key(s): {_names(unexpected)}" if unexpected else "",
                 f"shape mismatch: {_names(mismatched)}" if mismatched else ""]
        raise CheckpointError(f"{directory}: Qwen2.5-VL weights: " + "; ".join(p for p in parts if p))
    if (directory / "generation_config.json").is_file():
        # LENS's demo generates with the checkpoint's generation config (do_sample overridden).
        # GenerationConfig names no classes and takes no trust_remote_code (it would store it as a field).
        vlm.generation_config = GenerationConfig.from_pretrained(directory)

    try:
        sam = build_sam2_for_lens(sam_spec, device="cpu")
    except Sam2SpecError as exc:
        raise CheckpointError(f"{config_path}: {SAM2_SPEC_KEY}: {exc}") from exc
    _check_keys(f"{directory}: SAM2 weights (sam.*)", set(sam.state_dict()), set(sam_state))
    try:
        sam.load_state_dict(sam_state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: SAM2 weights: {exc}") from exc

    with torch.device("meta"):
        model = LensModel(vlm, sam, num_queries=num_queries, use_connector=use_connector, sam_spec=sam_spec)
    expected_head = {k for k in model.state_dict() if k.startswith(HEAD_PREFIXES)}
    _check_keys(f"{directory}: context head", expected_head, set(head_state))
    try:
        model.load_state_dict(head_state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{directory}: context head: {exc}") from exc
    model = model.to(device=device, dtype=torch_dtype).eval()
    model.source = source
    return model, load_processor(directory)


def read_lens_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's weights under a ``LensModel``'s own state-dict names (``vlm.`` + the transformers 5.x
    Qwen names, the context head's and ``sam.*`` as they are)."""
    return {(key if key.startswith(HEAD_PREFIXES + (SAM_PREFIX,)) else "vlm." + from_checkpoint_key(key)): value
            for key, value in read_state_dict(Path(directory)).items()}


def load_lens_weights(model: LensModel, directory: str | os.PathLike, vlm: bool = True) -> None:
    """Copy the weights of the checkpoint in ``directory`` into ``model`` (an already built ``LensModel`` of
    the same architecture), in place: the parameter objects stay, so an optimizer that holds them keeps
    them. This is how training resumes from its own checkpoints.

    Strict, as ``load_lens_model`` is: a missing, unexpected or differently shaped weight is a
    ``CheckpointError`` that names it. With ``vlm=False`` only the context head and SAM2 are copied and
    the checkpoint's Qwen weights are checked against the model's instead: every one the model holds
    under the same name must be equal (LoRA resumes this way: the base stays frozen, and the
    checkpoint's merged projections are no longer model weights by that name).
    """
    directory = Path(directory)
    own = model.state_dict()  # detached views of the parameters and buffers: copy_ writes into them
    tied = {"vlm.lm_head.weight"} if model.vlm.config.tie_word_embeddings else set()
    state = read_lens_weights(directory)
    if vlm:
        _check_keys(f"{directory}", set(own) - tied, set(state) - tied)
    else:
        expected = {k for k in own if k.startswith(HEAD_PREFIXES + (SAM_PREFIX,))}
        _check_keys(f"{directory}: context head and SAM2", expected, {k for k in state if not k.startswith("vlm.")})
        differ = [k for k, v in state.items() if k.startswith("vlm.") and k in own and not torch.equal(own[k], v)]
        if differ:
            raise CheckpointError(f"{directory}: {len(differ)} frozen VLM weight(s) differ from the model's "
                                  f"({_names(differ)}): the checkpoint was trained from another model")
        state = {k: v for k, v in state.items() if not k.startswith("vlm.")}
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                  if k in own and state[k].shape != own[k].shape]
    if mismatched:
        raise CheckpointError(f"{directory}: shape mismatch: {_names(mismatched)}")
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(value)


def load_processor(directory: str | os.PathLike):
    """The checkpoint's Qwen2.5-VL processor (tokenizer, chat template, image and video processors).

    ``trust_remote_code=False`` reaches every Auto* load inside it: a tokenizer or image processor
    config naming code of its own then fails instead of asking on stdin whether to run it.
    """
    from transformers import Qwen2_5_VLProcessor

    try:
        return Qwen2_5_VLProcessor.from_pretrained(str(directory), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{directory}: cannot load the processor ({first})") from exc


# -- saving ----------------------------------------------------------------------------------------
def lens_state_dict(model: LensModel, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under LENS's checkpoint names (tied ``lm_head`` left out, as
    ``save_pretrained`` does). ``weights``, under the model's own state-dict names, replaces them: the
    whole weights of a model whose parameters are shards (FSDP, ZeRO-3), as the trainer gathers them;
    its names must be exactly the model's."""
    tied = bool(model.vlm.config.tie_word_embeddings)
    if weights is not None:
        _check_keys("weights to save", set(model.state_dict()), set(weights))
    state = {}
    for key, value in (weights if weights is not None else model.state_dict()).items():
        if key.startswith("vlm."):
            key = to_checkpoint_key(key[len("vlm."):])
            if tied and key == "lm_head.weight":
                continue
        state[key] = _own_storage(value.detach().contiguous())
    return state


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied when it is a view into a larger buffer (FSDP2's gathered state dict, DeepSpeed's
    flattened parameters), which safetensors refuses to write; a tensor that owns its storage stays as
    it is (no second copy of a 7B model's weights on the GPU while it is saved)."""
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def save_lens_checkpoint(model: LensModel, processor, directory: str | os.PathLike, max_shard_size: str = "5GB",
                         weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` in the released LENS layout (loadable by ``load_lens_model``); ``weights``: see
    ``lens_state_dict``."""
    from huggingface_hub import save_torch_state_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(lens_state_dict(model, weights), directory, max_shard_size=max_shard_size)
    config = lens_config_dict(model.vlm.config, model.num_queries, model.use_connector, model.sam_spec)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.vlm.generation_config.save_pretrained(directory)
    if processor is not None:
        processor.save_pretrained(str(directory))
    return directory

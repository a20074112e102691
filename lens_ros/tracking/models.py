"""The SAM2 that tracks: a stock SAM2 video model with its memory modules.

LENS's checkpoints delete SAM2's ``memory_attention``, ``memory_encoder`` and
``maskmem_tpos_enc`` (LENS_REFERENCE.md §1) and keep SAM2's image encoder frozen at the SAM 2.0
Hiera-L weights, so a stock SAM2 checkpoint supplies the memory. ``tracker_model`` sources:

  ``tiny``                          random tiny SAM2 with memory modules (tests; lens_ros's tiny spec)
  ``facebook/sam2-hiera-large``     SAM 2.0 Hiera-L (the release LENS started from), from the hub
  ``facebook/sam2.1-hiera-large``   SAM 2.1 Hiera-L, from the hub
  a ``.pt`` / ``.safetensors`` file  sam2's release layout (``{"model": state_dict}``) or a bare
                                    state dict, of the architecture ``spec`` (default SAM 2.0 Hiera-L)

Weights are loaded safely: safetensors, or ``torch.load(weights_only=True)`` (no pickled code).
From the hub only when downloads are allowed; otherwise the local cache or a clear error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lens_ros.model.sam import SAM2_CONFIG, Sam2Spec, check_packaged_config

TINY = "tiny"
SAM2_1_CONFIG = "configs/sam2.1/sam2.1_hiera_l.yaml"


@dataclass(frozen=True)
class StockCheckpoint:
    """A released SAM2 checkpoint on the Hugging Face hub: its file and its sam2 config."""

    repo_id: str
    filename: str
    config: str


STOCK = {
    "facebook/sam2-hiera-large": StockCheckpoint("facebook/sam2-hiera-large", "sam2_hiera_large.pt", SAM2_CONFIG),
    "facebook/sam2.1-hiera-large": StockCheckpoint("facebook/sam2.1-hiera-large", "sam2.1_hiera_large.pt",
                                                   SAM2_1_CONFIG),
}



def tiny_tracker_spec() -> Sam2Spec:
    """lens_ros's tiny SAM2 (``lens_ros.model.tiny.TINY_SAM2_SPEC``) with its memory attention's
    rotary grid at the tiny image size (256 / 16 = 16; sam2 would recompute it, this keeps the
    build exact)."""
    from lens_ros.model.tiny import TINY_SAM2_SPEC

    return Sam2Spec(config=TINY_SAM2_SPEC.config, overrides=TINY_SAM2_SPEC.overrides + (
        "++model.memory_attention.layer.self_attention.feat_sizes=[16,16]",
        "++model.memory_attention.layer.cross_attention.feat_sizes=[16,16]"))


class TrackerModelError(RuntimeError):
    """A tracker model that cannot be loaded (not cached offline, unsafe or wrong weights)."""


def build_tracker_architecture(spec: Sam2Spec = Sam2Spec(), device: str = "cpu", seed: int = 0):
    """sam2's ``SAM2VideoPredictor`` for ``spec`` with random weights, in eval mode. Its hole
    filling needs sam2's CUDA extension: where that is missing sam2 warns and skips it, so it is
    switched off here (``fill_hole_area = 0``) instead of warning on every frame."""
    check_packaged_config(spec.config)
    from sam2.build_sam import build_sam2_video_predictor  # heavy import (hydra)

    torch.manual_seed(seed)
    model = build_sam2_video_predictor(spec.config, ckpt_path=None, device=str(device), mode="eval",
                                       hydra_overrides_extra=list(spec.overrides))
    if not _has_cuda_extension():
        model.fill_hole_area = 0
    return model


def _has_cuda_extension() -> bool:
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a torch file read with ``weights_only=True`` (a file that
    needs pickled code is refused); sam2's release layout ``{"model": ...}`` is unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for code, RuntimeError for a broken file
        raise TrackerModelError(f"{path}: not a plain tensor checkpoint (read with weights_only=True): {exc}") from None
    data = data.get("model", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise TrackerModelError(f"{path}: expected a state dict of tensors (or {{'model': state_dict}})")
    return data


def load_tracker_model(source: str, device: str = "cpu", allow_download: bool = False,
                       spec: Sam2Spec = Sam2Spec()):
    """The tracking SAM2 for ``source`` (see the module docstring), on ``device``, in eval mode;
    ``spec`` is the architecture of a checkpoint file (default SAM 2.0 Hiera-L)."""
    if source == TINY:
        return build_tracker_architecture(tiny_tracker_spec(), device)
    if source in STOCK:
        stock = STOCK[source]
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = hf_hub_download(stock.repo_id, stock.filename, local_files_only=not allow_download)
        except LocalEntryNotFoundError:
            raise TrackerModelError(f"tracker model {source!r} is not in the local Hugging Face cache and downloads "
                                    f"are not allowed (allow_download), or use tracker model 'tiny'") from None
        path, spec = Path(path), Sam2Spec(config=stock.config)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise TrackerModelError(f"tracker model {source!r}: neither 'tiny', one of {', '.join(STOCK)}, nor a file")
    model = build_tracker_architecture(spec, "cpu")
    try:
        missing, unexpected = model.load_state_dict(read_state_dict(path), strict=False)
    except RuntimeError as exc:  # tensors of other shapes
        raise TrackerModelError(f"{path} does not fit {spec.config}: {str(exc).splitlines()[1].strip()}") from None
    if missing or unexpected:
        raise TrackerModelError(f"{path} does not fit {spec.config}: missing {sorted(missing)[:5]}, "
                                f"unexpected {sorted(unexpected)[:5]}")
    return model.to(device).eval()


def image_encoder_sha256(sam) -> str:
    """A hash of a SAM2's image encoder weights (names, dtypes, shapes, values)."""
    from lens_ros.accel.export import weights_sha256

    return weights_sha256(dict(sam.image_encoder.state_dict()))


def shares_image_encoder(lens_sam, tracker_model) -> bool:
    """True when the tracker's image encoder is LENS's (LENS keeps SAM 2.0 Hiera-L's frozen): then one
    image embedding per frame can serve both commands and tracking."""
    return image_encoder_sha256(lens_sam) == image_encoder_sha256(tracker_model)


# Which mask decoder propagates a track. Default "stock": SAM2's video training tuned its decoder with
# memory-conditioned features, the object pointer and the object score (presence) that tracking
# reads; LENS fine-tuned its decoder on single images with its one prompt token and never trained
# the object score. "lens" takes LENS's prompt encoder and mask decoder instead (the same
# architecture): masks closer to LENS's own on the first frames, presence scores untrained.
PROPAGATION_DECODERS = ("stock", "lens")


def use_lens_mask_decoder(tracker_model, lens_sam) -> None:
    """Make ``tracker_model`` propagate with LENS's prompt encoder and mask decoder (``"lens"``)."""
    for name in ("sam_prompt_encoder", "sam_mask_decoder"):
        getattr(tracker_model, name).load_state_dict(getattr(lens_sam, name).state_dict())

"""Masks at camera rate: one SAM2 memory per object, fed one frame at a time.

``StreamingTracker`` is SAM2's own video tracking made online: frames arrive one at a time, there
is no video file and no look-ahead, and what is kept is bounded. Every number comes from sam2's
code (``SAM2Base.forward_image``, ``_prepare_backbone_features``, ``track_step``, which runs
``_prepare_memory_conditioned_features``, ``_forward_sam_heads``, ``_use_mask_as_output`` and
``_encode_new_memory``, and ``_encode_new_memory`` for a prompted frame). This module only does
what ``SAM2VideoPredictor`` does around those calls, in the order ``add_new_mask`` and
``propagate_in_video`` do it, so its masks equal the stock predictor's bit for bit (tested):

* a prompted frame: ``track_step(is_init_cond_frame=True, mask_inputs=...)``, then, as
  ``propagate_in_video_preflight`` does, the memory encoded from the low-resolution output mask
  upsampled to the model's size with ``is_mask_from_pts=True``;
* every later frame: ``track_step(is_init_cond_frame=False, run_mem_encoder=True)`` one object at a
  time (batch size 1, like stock: a batched step differs in the last bits), one backbone pass per
  frame shared by all objects;
* memories stored as ``_run_single_frame_inference`` stores them (``maskmem_features`` in
  bfloat16, one shared ``maskmem_pos_enc``);
* output: the low-resolution logits (hole-filled where sam2's extension exists) resized bilinearly
  to the frame's size, optionally made non-overlapping across objects, ``> 0``.

Bounded: per object only what ``_prepare_memory_conditioned_features`` can still read is kept: the
conditioning frames (capped by ``max_cond_frames_in_attn``), the spatial memories of the last
``num_maskmem - 1`` frames (on the ``memory_temporal_stride_for_eval`` grid) and the object
pointers of the last ``max_obj_ptrs_in_encoder - 1`` frames. At SAM2's defaults that is 22 stored
frames per object, whatever the stream's length.

Frames: RGB uint8 H x W x 3 (preprocessed as sam2's frame loader does: resize to the model's
square size, /255, ImageNet mean and std), a PIL image, or a preprocessed (3, S, S) tensor with
``orig_hw``. A ROS ``bgr8`` image must be converted to RGB first.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sam2.utils.misc import fill_holes_in_mask_scores

from lens_ros.model.sam import VIDEO_ONLY_MODULES

# "num_frames" handed to sam2: a stream has no end. sam2 uses it as
# min(num_frames, max_obj_ptrs_in_encoder) and as a bound for reverse tracking only.
_UNBOUNDED = 1 << 62

Result = tuple[np.ndarray, float, bool]


class _Track:
    __slots__ = ("obj_id", "output_dict", "pred_masks", "score", "cond_overflow")

    def __init__(self, obj_id: int):
        self.obj_id = obj_id
        self.cond_overflow = False  # whether cond frames beyond max_cond_frames_in_attn were dropped
        # same layout as SAM2VideoPredictor's output_dict_per_obj[obj_idx]
        self.output_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        self.pred_masks: torch.Tensor | None = None  # (1,1,S/4,S/4) logits on the current frame
        self.score: torch.Tensor | None = None  # (1,1) object score logit on the current frame


class StreamingTracker:
    """Online multi-object SAM2 tracking from mask prompts.

    ``sam_model``: a ``SAM2Base`` (e.g. ``SAM2VideoPredictor``) that still has its memory modules.
    Predictor-level flags (``fill_hole_area``, ``non_overlap_masks``,
    ``clear_non_cond_mem_around_input``, ``add_all_frames_to_correct_as_cond``) are read from the
    model when it has them (SAM2VideoPredictor) unless given here; SAM2Base-level flags
    (``use_mask_input_as_output_without_sam``, ``binarize_mask_from_pts_for_mem_enc``, multimask,
    ``max_cond_frames_in_attn``, ...) act inside sam2's own functions.
    ``num_frames``: only to mimic a stock run on a known-length video shorter than
    ``max_obj_ptrs_in_encoder`` frames (sam2 clips the pointer window to it); None = unbounded.
    """

    def __init__(self, sam_model, *, fill_hole_area: int | None = None,
                 non_overlap_masks: bool | None = None,
                 clear_non_cond_mem_around_input: bool | None = None,
                 add_all_frames_to_correct_as_cond: bool | None = None,
                 num_frames: int | None = None,
                 img_mean=(0.485, 0.456, 0.406), img_std=(0.229, 0.224, 0.225)):
        missing = [n for n in VIDEO_ONLY_MODULES if getattr(sam_model, n, None) is None]
        if missing:
            raise ValueError(f"SAM2 model lacks its video memory modules {missing} "
                             "(LENS checkpoints delete them); build it with them to track")
        if sam_model.num_maskmem <= 0:
            raise ValueError("num_maskmem must be > 0 for tracking")
        self.model = sam_model.eval()  # dropout in memory attention must be off (stock: mode="eval")

        def flag(value, name, default):
            return getattr(sam_model, name, default) if value is None else value

        self.fill_hole_area = int(flag(fill_hole_area, "fill_hole_area", 0))
        self.non_overlap_masks = bool(flag(non_overlap_masks, "non_overlap_masks", False))
        self.clear_non_cond_mem_around_input = bool(
            flag(clear_non_cond_mem_around_input, "clear_non_cond_mem_around_input", False))
        self.add_all_frames_to_correct_as_cond = bool(
            flag(add_all_frames_to_correct_as_cond, "add_all_frames_to_correct_as_cond", False))
        self.num_frames = _UNBOUNDED if num_frames is None else int(num_frames)
        self.image_size = int(sam_model.image_size)
        self.device = sam_model.device
        self._mean = torch.tensor(img_mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(img_std, dtype=torch.float32)[:, None, None]
        self._image_encoder = None  # see use_image_encoder
        self._pixels = None
        self.reset()

    def use_image_encoder(self, image_encoder, pixels) -> None:
        """Take SAM2's raw image-encoder output from ``image_encoder(batch)`` (e.g. a
        ``lens_ros.tracking.shared_encoder.SharedImageEncoder``) and make RGB frames into pixels with
        ``pixels(rgb) -> (3, S, S)``; this model's own ``conv_s0``/``conv_s1`` are still applied."""
        self._image_encoder, self._pixels = image_encoder, pixels

    # ------------------------------------------------------------------ public API
    def reset(self) -> None:
        self.frame_idx = -1
        self._tracks: OrderedDict[int, _Track] = OrderedDict()
        self._feats = None  # (vision_feats, vision_pos_embeds, feat_sizes) of the current frame
        self._image: torch.Tensor | None = None  # preprocessed current frame (3,S,S)
        self._raw = None  # the object passed in for the current frame (to recognise it again)
        self.orig_hw: tuple[int, int] | None = None
        self._maskmem_pos_enc = None  # one shared copy, as SAM2VideoPredictor keeps it
        self.last_logits: dict[int, torch.Tensor] = {}  # obj_id -> (H, W) logits of the current frame

    @property
    def object_ids(self):
        return list(self._tracks)

    @torch.inference_mode()
    def add_object(self, obj_id: int, frame, mask: np.ndarray,
                   orig_hw: tuple[int, int] | None = None) -> dict[int, Result]:
        """Start a track (or correct an existing one) from a bool HxW mask on ``frame``.

        ``frame`` is the current frame (the one last given to ``update``/``add_object``; ``None``
        also means it) or a new frame, which is then first tracked for the existing objects (as
        ``update`` would). Returns the results of all objects on that frame.
        """
        if frame is not None and not self._is_current(frame):
            self.update(frame, orig_hw=orig_hw)
        if self._feats is None:
            raise RuntimeError("no current frame: pass a frame")
        obj_id = int(obj_id)
        f = self.frame_idx
        track = self._tracks.get(obj_id)
        is_init_cond_frame = track is None  # as add_new_mask: a frame never tracked for this object
        if track is None:
            track = self._tracks[obj_id] = _Track(obj_id)
        mask_inputs = self._mask_to_input(mask)
        is_cond = is_init_cond_frame or self.add_all_frames_to_correct_as_cond
        vf, vp, fs = self._feats
        # add_new_mask -> _run_single_frame_inference(run_mem_encoder=False)
        out = self.model.track_step(
            frame_idx=f, is_init_cond_frame=is_init_cond_frame, current_vision_feats=vf,
            current_vision_pos_embeds=vp, feat_sizes=fs, point_inputs=None, mask_inputs=mask_inputs,
            output_dict=track.output_dict, num_frames=self.num_frames, track_in_reverse=False,
            run_mem_encoder=False)
        pred_masks = self._fill_holes(out["pred_masks"])
        # propagate_in_video_preflight: encode memory from the low-res mask, upsampled
        high_res = F.interpolate(pred_masks, size=(self.image_size, self.image_size),
                                 mode="bilinear", align_corners=False)
        maskmem_features, maskmem_pos_enc = self.model._encode_new_memory(
            current_vision_feats=vf, feat_sizes=fs, pred_masks_high_res=high_res,
            object_score_logits=out["object_score_logits"], is_mask_from_pts=True)
        compact = self._compact(maskmem_features, maskmem_pos_enc, out["obj_ptr"])
        od = track.output_dict
        od["cond_frame_outputs" if is_cond else "non_cond_frame_outputs"][f] = compact
        if self.clear_non_cond_mem_around_input:
            self._clear_non_cond_mem_around(track, f)
        if is_cond:  # preflight's edge case: a cond output replaces a non-cond one on that frame
            od["non_cond_frame_outputs"].pop(f, None)
        track.pred_masks, track.score = pred_masks, out["object_score_logits"]
        self._prune(track)
        return self._results()

    @torch.inference_mode()
    def update(self, frame, orig_hw: tuple[int, int] | None = None) -> dict[int, Result]:
        """Track all objects on a new frame: {obj_id: (mask bool HxW, score logit, present)}."""
        self._set_frame(frame, orig_hw)
        f = self.frame_idx
        vf, vp, fs = self._feats
        for track in self._tracks.values():
            # propagate_in_video -> _run_single_frame_inference(batch_size=1, run_mem_encoder=True)
            out = self.model.track_step(
                frame_idx=f, is_init_cond_frame=False, current_vision_feats=vf,
                current_vision_pos_embeds=vp, feat_sizes=fs, point_inputs=None, mask_inputs=None,
                output_dict=track.output_dict, num_frames=self.num_frames, track_in_reverse=False,
                run_mem_encoder=True)
            track.output_dict["non_cond_frame_outputs"][f] = self._compact(
                out["maskmem_features"], out["maskmem_pos_enc"], out["obj_ptr"])
            track.pred_masks = self._fill_holes(out["pred_masks"])
            track.score = out["object_score_logits"]
            self._prune(track)
        return self._results()

    def remove_object(self, obj_id: int) -> None:
        """Stop tracking ``obj_id`` (other objects are unaffected, as in stock SAM2)."""
        self._tracks.pop(int(obj_id), None)
        self.last_logits.pop(int(obj_id), None)

    def memory_stats(self) -> dict:
        """Per object: stored frames and bytes of stored tensors (bounded in stream length)."""
        stats = {}
        for obj_id, tr in self._tracks.items():
            od = tr.output_dict
            outs = list(od["cond_frame_outputs"].values()) + list(od["non_cond_frame_outputs"].values())
            nbytes = sum(t.numel() * t.element_size() for o in outs
                         for t in (o["maskmem_features"], o["obj_ptr"]) if t is not None)
            stats[obj_id] = {
                "cond_frames": sorted(od["cond_frame_outputs"]),
                "non_cond_frames": sorted(od["non_cond_frame_outputs"]),
                "with_maskmem": sorted(t for t, o in od["non_cond_frame_outputs"].items()
                                       if o["maskmem_features"] is not None),
                "bytes": nbytes,
            }
        return stats

    # ------------------------------------------------------------------ internals
    def preprocess(self, frame) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """RGB uint8 HxWx3 / PIL image -> normalised (3,S,S) float32, as load_video_frames does."""
        if isinstance(frame, torch.Tensor):
            img = frame[0] if frame.dim() == 4 else frame
            if img.shape != (3, self.image_size, self.image_size):
                raise ValueError(f"preprocessed frame must be (3,{self.image_size},{self.image_size})")
            return img, None
        if self._pixels is not None:
            rgb = np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame)
            return self._pixels(rgb).float(), rgb.shape[:2]
        pil = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame))
        width, height = pil.size
        img_np = np.array(pil.convert("RGB").resize((self.image_size, self.image_size)))
        if img_np.dtype != np.uint8:
            raise ValueError(f"expected uint8 RGB, got {img_np.dtype}")
        img = torch.from_numpy(img_np / 255.0).permute(2, 0, 1).float()  # float64 -> float32 as stock
        img -= self._mean
        img /= self._std
        return img, (height, width)

    def _is_current(self, frame) -> bool:
        if self._raw is None:
            return False
        if frame is self._raw:
            return True
        if isinstance(frame, torch.Tensor):
            img = frame[0] if frame.dim() == 4 else frame
            return img.shape == self._image.shape and torch.equal(img.to(self._image.device), self._image)
        if isinstance(frame, np.ndarray) and isinstance(self._raw, np.ndarray):
            return frame.shape == self._raw.shape and np.array_equal(frame, self._raw)
        return False

    def _set_frame(self, frame, orig_hw) -> None:
        img, hw = self.preprocess(frame)
        hw = tuple(orig_hw) if orig_hw is not None else (hw or self.orig_hw or (self.image_size,) * 2)
        img = img.to(self.device).float()
        self.frame_idx += 1
        self._raw, self._image, self.orig_hw = frame, img, (int(hw[0]), int(hw[1]))
        # SAM2VideoPredictor._get_image_feature (batch size 1)
        backbone_out = self._forward_image(img.unsqueeze(0))
        _, vision_feats, vision_pos_embeds, feat_sizes = self.model._prepare_backbone_features(backbone_out)
        self._feats = (vision_feats, vision_pos_embeds, feat_sizes)
        for track in self._tracks.values():
            track.pred_masks = track.score = None

    def _forward_image(self, batch: torch.Tensor) -> dict:
        """SAM2Base.forward_image, with the raw encoder output from ``use_image_encoder``'s when set
        (copied: that output is shared and forward_image writes into its list)."""
        if self._image_encoder is None:
            return self.model.forward_image(batch)
        backbone_out = dict(self._image_encoder(batch))
        fpn = backbone_out["backbone_fpn"] = list(backbone_out["backbone_fpn"])
        if self.model.use_high_res_features_in_sam:
            fpn[0] = self.model.sam_mask_decoder.conv_s0(fpn[0])
            fpn[1] = self.model.sam_mask_decoder.conv_s1(fpn[1])
        return backbone_out

    def _mask_to_input(self, mask) -> torch.Tensor:
        """add_new_mask's resizing: bilinear+antialias to image_size, then >= 0.5."""
        m = mask if isinstance(mask, torch.Tensor) else torch.tensor(np.asarray(mask), dtype=torch.bool)
        if m.dim() != 2:
            raise ValueError("mask must be HxW")
        m = m[None, None].float().to(self.device)
        if m.shape[-2:] != (self.image_size, self.image_size):
            m = F.interpolate(m, size=(self.image_size, self.image_size), align_corners=False,
                              mode="bilinear", antialias=True)
            m = (m >= 0.5).float()
        return m

    def _fill_holes(self, pred_masks: torch.Tensor) -> torch.Tensor:
        if self.fill_hole_area > 0:  # needs sam2's CUDA extension; stock skips it with a warning otherwise
            return fill_holes_in_mask_scores(pred_masks, self.fill_hole_area)
        return pred_masks

    def _compact(self, maskmem_features, maskmem_pos_enc, obj_ptr) -> dict:
        """What sam2 reads back from a past frame, stored as _run_single_frame_inference stores it."""
        if self._maskmem_pos_enc is None:
            self._maskmem_pos_enc = [x[0:1].clone() for x in maskmem_pos_enc]
        return {"maskmem_features": maskmem_features.to(torch.bfloat16),
                "maskmem_pos_enc": self._maskmem_pos_enc,
                "obj_ptr": obj_ptr}

    def _clear_non_cond_mem_around(self, track: _Track, f: int) -> None:
        # the per-object version of SAM2VideoPredictor._clear_non_cond_mem_around_input (sam2 1.1.0
        # calls a missing `_clear_obj_non_cond_mem_around_input`, so stock crashes with this flag on)
        r = self.model.memory_temporal_stride_for_eval
        nc = track.output_dict["non_cond_frame_outputs"]
        for t in range(f - r * self.model.num_maskmem, f + r * self.model.num_maskmem + 1):
            nc.pop(t, None)

    def _prune(self, track: _Track) -> None:
        """Drop whatever _prepare_memory_conditioned_features can no longer read for frames > now."""
        m = self.model
        g = self.frame_idx + 1  # the next frame to be tracked
        r = m.memory_temporal_stride_for_eval
        # spatial memories: t_rel=1 -> g-1; t_rel>=2 -> ((g-2)//r)*r - (t_rel-2)*r, t_rel<=num_maskmem-1
        mem_from = g - 1
        if m.num_maskmem >= 3:
            mem_from = min(mem_from, ((g - 2) // r) * r - (m.num_maskmem - 3) * r)
        keep_from = mem_from
        if m.use_obj_ptrs_in_encoder:  # pointers of t_diff = 1 .. max_ptrs-1 frames back
            max_ptrs = min(self.num_frames, m.max_obj_ptrs_in_encoder)
            keep_from = min(keep_from, g - (max_ptrs - 1))
        nc = track.output_dict["non_cond_frame_outputs"]
        for t in [t for t in nc if t < keep_from]:
            del nc[t]
        for t, out in nc.items():
            # spatial memories older than g-1 are only ever read on the stride-r grid
            stale = t < mem_from or (t < g - 1 and t % r != 0)
            if stale and out["maskmem_features"] is not None:
                nc[t] = dict(out, maskmem_features=None)  # only its obj_ptr is still reachable
        # conditioning frames: all are attended to unless max_cond_frames_in_attn caps them; in a
        # stream the capped selection is always the most recent ones, older ones are only reachable
        # through the same windows as non-conditioning frames
        cap = m.max_cond_frames_in_attn
        cond = track.output_dict["cond_frame_outputs"]
        if cap != -1 and len(cond) > cap:
            recent = set(sorted(cond)[-cap:])
            dropped = [t for t in cond if t not in recent and t < keep_from]
            for t in dropped:
                del cond[t]
            track.cond_overflow |= bool(dropped)
        if track.cond_overflow and len(cond) == cap:
            # stock still holds > cap cond frames, so select_closest_cond_frames hands them to the
            # memory attention newest first; with exactly cap left it would keep insertion order
            # instead (same set, different token order -> float differences): restore stock's order
            items = sorted(cond.items(), reverse=True)
            cond.clear()
            cond.update(items)

    def _results(self) -> dict[int, Result]:
        tracks = [t for t in self._tracks.values() if t.pred_masks is not None]
        self.last_logits = {}
        if not tracks:
            return {}
        low_res = torch.cat([t.pred_masks for t in tracks], dim=0)
        h, w = self.orig_hw
        # SAM2VideoPredictor._get_orig_video_res_output
        video_res = low_res if low_res.shape[-2:] == (h, w) else F.interpolate(
            low_res, size=(h, w), mode="bilinear", align_corners=False)
        if self.non_overlap_masks:
            video_res = self.model._apply_non_overlapping_constraints(video_res)
        results = {}
        for i, t in enumerate(tracks):
            logits = video_res[i, 0]
            self.last_logits[t.obj_id] = logits
            score = float(t.score.reshape(-1)[0])
            results[t.obj_id] = ((logits > 0).cpu().numpy(), score, score > 0)
        return results

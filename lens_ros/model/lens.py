"""LensModel: transformers' Qwen2.5-VL, the LENS context head and SAM2, side by side.

The VLM is transformers' own ``Qwen2_5_VLForConditionalGeneration``, unmodified; the context
head and SAM2 sit next to it under the names LENS's checkpoints use. The two passes of LENS
inference are spelled out here as small steps so that the pipeline can time them, reuse the
vision tower output and the SAM2 image embedding, and the tests can check each one.
"""

from __future__ import annotations

import torch
from torch import nn

from lens_ros.model.context_head import Connector, init_context_head
from lens_ros.model.sam import (
    SamImageEmbedding,
    Sam2Spec,
    decode_mask,
    encode_image,
    keep_positional_encoding_float32,
)

DEFAULT_NUM_QUERIES = 64


def mask_pass_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of the mask pass: ``cumsum(attention_mask) - 1`` (1 where the mask is 0), the
    same value on all three M-RoPE axes, image tokens and queries included.

    LENS calls the model with ``inputs_embeds`` and no ``input_ids`` in this pass, so
    transformers 4.51 fell back to these plain 1-D positions, and the released weights were
    trained with them. They are computed explicitly here because newer transformers versions
    fill in other positions when ``input_ids`` is None.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions.unsqueeze(0).expand(3, -1, -1)


class LensModel(nn.Module):
    """Qwen2.5-VL + LENS context head + SAM2 (state-dict names as in LENS checkpoints)."""

    def __init__(self, vlm: nn.Module, sam: nn.Module, num_queries: int = DEFAULT_NUM_QUERIES,
                 use_connector: bool = True, sam_spec: Sam2Spec = Sam2Spec()) -> None:
        super().__init__()
        hidden = vlm.config.text_config.hidden_size
        prompt_dim = int(sam.sam_prompt_embed_dim)
        self.vlm = vlm
        self.num_queries = num_queries
        self.use_connector = use_connector
        self.sam_spec = sam_spec
        self.learnable_query = nn.Parameter(torch.empty(1, num_queries, hidden))
        if use_connector:
            self.connector = Connector(hidden, num_queries)
        self.conv_1d = nn.Conv1d(hidden, hidden, kernel_size=num_queries)
        self.proj_to_sam = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, prompt_dim))
        self.sam = sam
        if self.learnable_query.device.type != "meta":
            init_context_head(self.learnable_query, self.conv_1d)

    def _apply(self, fn, recurse=True):
        # Every .to()/.half()/.bfloat16() passes through here: restore SAM2's float32 buffer.
        super()._apply(fn, recurse)
        keep_positional_encoding_float32(self.sam)
        return self

    # -- VLM -----------------------------------------------------------------------------
    @property
    def config(self):
        return self.vlm.config

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        """The vision tower's output (transformers' ``BaseModelOutputWithPooling``), computed once
        per request and handed to both passes."""
        return self.vlm.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)

    def sequence_embeds(self, sequence_ids: torch.Tensor, image_features) -> torch.Tensor:
        """The token embeddings of prompt + answer with the image features scattered in (B, L, D)."""
        inputs_embeds = self.vlm.get_input_embeddings()(sequence_ids)
        features = torch.cat(tuple(image_features.pooler_output), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        image_mask = (sequence_ids == self.vlm.config.image_token_id).unsqueeze(-1)
        if int(image_mask.sum()) != features.shape[0]:
            raise ValueError(f"image tokens ({int(image_mask.sum())}) and image features ({features.shape[0]}) differ")
        return inputs_embeds.masked_scatter(image_mask.expand_as(inputs_embeds), features)

    def mask_pass_inputs(self, sequence_ids: torch.Tensor, attention_mask: torch.Tensor,
                         image_features) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs of the mask pass: the embedded prompt + answer with the image features
        scattered in, the learnable queries appended (attention 1), and explicit positions."""
        return self.with_queries(self.sequence_embeds(sequence_ids, image_features), attention_mask)

    def with_queries(self, inputs_embeds: torch.Tensor,
                     attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The learnable queries appended to embedded prompt + answer (attention 1), and the
        explicit positions of the whole (``mask_pass_position_ids``)."""
        batch = inputs_embeds.shape[0]
        queries = self.learnable_query.to(inputs_embeds.dtype).expand(batch, -1, -1)
        inputs_embeds = torch.cat([inputs_embeds, queries], dim=1)
        attention_mask = torch.cat(
            [attention_mask, attention_mask.new_ones(batch, self.num_queries)], dim=1)
        return inputs_embeds, attention_mask, mask_pass_position_ids(attention_mask)

    def query_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor) -> torch.Tensor:
        """Last-layer (final-norm) hidden states of the query positions, shape (B, Q, D)."""
        out = self.vlm.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                            position_ids=position_ids, use_cache=False)
        return out.last_hidden_state[:, -self.num_queries:]

    # -- context head --------------------------------------------------------------------
    def context_token(self, query_states: torch.Tensor) -> torch.Tensor:
        """Query states (B, Q, D) -> one SAM prompt token per sample, (B, 1, C)."""
        x = query_states.to(self.conv_1d.weight.dtype)
        if self.use_connector:
            x = self.connector(x)
        x = self.conv_1d(x.transpose(1, 2)).transpose(1, 2).contiguous()
        return self.proj_to_sam(x)

    # -- SAM2 ----------------------------------------------------------------------------
    def encode_sam_image(self, pixels: torch.Tensor) -> SamImageEmbedding:
        return encode_image(self.sam, pixels.to(self.sam.no_mem_embed.dtype))

    def decode_mask(self, embedding: SamImageEmbedding, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_mask(self.sam, embedding, token)

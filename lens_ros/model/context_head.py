"""The LENS context head: learnable queries -> connector -> conv_1d -> proj_to_sam.

Names, shapes and maths follow LENS exactly (LENS_REFERENCE.md §1) so that released state
dicts load key for key: ``learnable_query`` (1, Q, D); ``connector`` = ``pos_embed`` + 4
pre-norm blocks of plain multi-head self-attention (16 heads, no mask, no rotary) and a
quick-GELU MLP; ``conv_1d`` collapses the Q positions into one token; ``proj_to_sam`` maps it
to SAM2's prompt width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONNECTOR_DEPTH = 4
CONNECTOR_HEADS = 16
CONNECTOR_MLP_RATIO = 4


class ConnectorAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int = CONNECTOR_HEADS) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # qkv is laid out (3, heads, head_dim) along the features, as in LENS's checkpoints.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class ConnectorMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class ConnectorBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ConnectorAttention(dim)
        self.mlp = ConnectorMlp(dim, dim * CONNECTOR_MLP_RATIO)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Connector(nn.Module):
    def __init__(self, dim: int, num_queries: int, depth: int = CONNECTOR_DEPTH) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ConnectorBlock(dim) for _ in range(depth))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_queries, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


def init_context_head(learnable_query: nn.Parameter, conv_1d: nn.Conv1d) -> None:
    """LENS's initialisation of the freshly added parameters (the rest keeps PyTorch's)."""
    nn.init.normal_(learnable_query, mean=0.0, std=0.02)
    nn.init.normal_(conv_1d.weight, mean=0.0, std=0.02)
    nn.init.zeros_(conv_1d.bias)

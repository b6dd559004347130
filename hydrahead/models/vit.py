"""Vision Transformer (ViT-Ti/S/B) with an embedding neck.

Standard pre-norm ViT: conv patch embedding, class token, learned position embeddings,
blocks of (LayerNorm -> multi-head self-attention) and (LayerNorm -> MLP with GELU), each
with a residual connection, a final LayerNorm, then the class token goes through the neck
``Linear(dim, D)`` (attribute ``neck``). The trunk's parameter count equals timm's /
torchvision's ViT of the same size (ViT-B/16 at 224 px: 85,798,656).

With ``wta_crs_keep`` < 1 the blocks' linears (attention's qkv and proj, and the MLP's
two unless ``wta_crs_mlp`` is false) are ``WTACRSLinear``: the same parameters and
forward, a weight gradient estimated from that share of the batch x token rows
(``hydrahead/models/wta_crs.py``). The patch embedding and the neck stay exact.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from hydrahead.models.wta_crs import WTACRSLinear


def _linear(wta_crs_keep: float):
    """nn.Linear, or with keep < 1 the WTA-CRS linear that stores that fraction of its input rows."""
    return nn.Linear if wta_crs_keep >= 1 else functools.partial(WTACRSLinear, keep=wta_crs_keep)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_dropout: float = 0.0, wta_crs_keep: float = 1.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"ViT dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        linear = _linear(wta_crs_keep)
        self.qkv = linear(dim, 3 * dim)
        self.proj = linear(dim, dim)
        self.attn_dropout = attn_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # (B, N, 3*D) -> 3 x (B, heads, N, head_dim)
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        dropout = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        *,
        wta_crs_keep: float = 1.0,
        wta_crs_mlp: bool = True,
    ):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_dropout=dropout, wta_crs_keep=wta_crs_keep)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        linear = _linear(wta_crs_keep if wta_crs_mlp else 1.0)
        self.mlp = nn.Sequential(
            linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Images (B x 3 x image_size x image_size) -> embedding (B x embed_dim)."""

    input_kind = "images"

    def __init__(
        self,
        embed_dim: int,
        *,
        dim: int,
        depth: int,
        num_heads: int,
        image_size: int = 224,
        patch_size: int = 16,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        in_channels: int = 3,
        wta_crs_keep: float = 1.0,
        wta_crs_mlp: bool = True,
    ):
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"ViT image_size {image_size} is not divisible by patch_size {patch_size}")
        self.embed_dim = embed_dim
        self.dim = dim
        self.image_size = image_size
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(
            *[
                Block(dim, num_heads, mlp_ratio, dropout, wta_crs_keep=wta_crs_keep, wta_crs_mlp=wta_crs_mlp)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.neck = nn.Linear(dim, embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # DeiT / MAE recipe: small truncated-normal embeddings and Linear weights.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that, beside 1-D ones, should get no weight decay (as in timm)."""
        return {"cls_token", "pos_embed"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            # The position embeddings are fixed to one grid: say so instead of a shape error.
            raise ValueError(f"ViT was built for {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, num_patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.neck(x[:, 0])


def vit_tiny(embed_dim: int, **kwargs) -> VisionTransformer:
    return VisionTransformer(embed_dim, dim=192, depth=12, num_heads=3, **kwargs)


def vit_small(embed_dim: int, **kwargs) -> VisionTransformer:
    return VisionTransformer(embed_dim, dim=384, depth=12, num_heads=6, **kwargs)


def vit_base(embed_dim: int, **kwargs) -> VisionTransformer:
    return VisionTransformer(embed_dim, dim=768, depth=12, num_heads=12, **kwargs)

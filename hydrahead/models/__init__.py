"""Backbones: identical data-parallel replicas that map inputs to D-dim embeddings.

Every backbone has ``input_kind`` ("features" or "images"), ``embed_dim`` (D) and its
final projection under the attribute ``neck``.
"""

from __future__ import annotations

import warnings

from torch import nn

from hydrahead.config import BACKBONES  # the config's choices for model.backbone: one list
from hydrahead.models.mlp import MLP
from hydrahead.models.resnet import ResNet, resnet18, resnet34, resnet50
from hydrahead.models.vit import VisionTransformer, vit_base, vit_small, vit_tiny
from hydrahead.models.wta_crs import WTACRSLinear

_RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
_VITS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}


def build_backbone(
    name: str,
    embed_dim: int,
    *,
    input_dim: int = 64,
    hidden_dim: int = 256,
    depth: int = 2,
    image_size: int = 224,
    patch_size: int | None = None,
    zero_init_residual: bool = True,
    wta_crs_keep: float = 1.0,
    wta_crs_mlp: bool = True,
) -> nn.Module:
    """Build the backbone called ``name`` with an embedding neck of width ``embed_dim``.

    ``input_dim``, ``hidden_dim`` and ``depth`` apply to "mlp"; ``image_size``,
    ``patch_size`` (default 16) and the WTA-CRS options (``wta_crs_keep`` < 1: the blocks'
    linears store that share of their input rows, the MLPs' too with ``wta_crs_mlp``) to
    the ViTs; ``zero_init_residual`` to the ResNets.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    if patch_size is not None and name not in _VITS:
        warnings.warn(f"patch_size={patch_size} is ignored by backbone {name!r}", stacklevel=2)
    if wta_crs_keep < 1 and name not in _VITS:
        warnings.warn(f"wta_crs_keep={wta_crs_keep} is ignored by backbone {name!r}", stacklevel=2)
    if name == "mlp":
        return MLP(input_dim, embed_dim, hidden_dim=hidden_dim, depth=depth)
    if name in _RESNETS:
        return _RESNETS[name](embed_dim, zero_init_residual=zero_init_residual)
    return _VITS[name](
        embed_dim,
        image_size=image_size,
        patch_size=16 if patch_size is None else patch_size,
        wta_crs_keep=wta_crs_keep,
        wta_crs_mlp=wta_crs_mlp,
    )


def no_weight_decay_param_names(model: nn.Module) -> set[str]:
    """Names of trainable parameters that should get neither weight decay nor a trust ratio.

    These are the 1-D parameters (biases, norm weights and shifts) plus whatever the model
    lists in an optional ``no_weight_decay()`` method (a ViT's class token and position
    embeddings). Decaying them only shrinks scales and offsets that carry no capacity.
    """
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    return {n for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or n in extra)}


def param_groups_for_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer param groups: weights with ``weight_decay``, and the rest without it.

    The second group also carries ``exclude_from_trust=True``, which LARS and LAMB read to
    skip the layer-wise trust ratio; SGD and AdamW keep the key without using it.
    Empty groups are left out.
    """
    skip = no_weight_decay_param_names(model)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if n in skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "exclude_from_trust": True},
    ]
    return [g for g in groups if g["params"]]


def backbone_from_config(cfg) -> nn.Module:
    """The backbone a run's config (``hydrahead.config.Config``) describes: its ``model``
    keys, and ``data.image_size`` for the ViTs."""
    m = cfg.model
    return build_backbone(
        m.backbone,
        m.embed_dim,
        input_dim=m.input_dim,
        hidden_dim=m.hidden_dim,
        depth=m.depth,
        image_size=cfg.data.image_size,
        wta_crs_keep=m.wta_crs_keep,
        wta_crs_mlp=m.wta_crs_mlp,
    )


__all__ = [
    "BACKBONES",
    "MLP",
    "ResNet",
    "VisionTransformer",
    "WTACRSLinear",
    "backbone_from_config",
    "build_backbone",
    "no_weight_decay_param_names",
    "param_groups_for_decay",
    "resnet18",
    "resnet34",
    "resnet50",
    "vit_base",
    "vit_small",
    "vit_tiny",
]

"""Build a backbone optimizer by name, with biases and norm weights kept out of decay."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hydrahead.models import param_groups_for_decay
from hydrahead.optim.large_batch import LAMB, LARS

OPTIMIZERS = ("sgd", "adamw", "lars", "lamb")

# eps where the caller leaves it to the optimizer: Adam's usual 1e-8, the LAMB paper's 1e-6.
_DEFAULT_EPS = {"adamw": 1e-8, "lars": 1e-8, "lamb": 1e-6}


def _as_param_groups(params_or_groups, weight_decay: float) -> list[dict]:
    """Normalize the optimizer input to param groups.

    - an ``nn.Module``: split by ``param_groups_for_decay`` (names known, so a ViT's
      class token and position embeddings are excluded too);
    - an iterable of tensors: 1-D tensors (biases, norm weights) go to a group without
      weight decay and with ``exclude_from_trust=True``;
    - an iterable of dicts: used as given (copied).
    """
    if isinstance(params_or_groups, nn.Module):
        return param_groups_for_decay(params_or_groups, weight_decay)
    items = list(params_or_groups)
    if not items:
        raise ValueError("build_optimizer got an empty parameter list")
    if all(isinstance(x, dict) for x in items):
        return [dict(g) for g in items]
    if not all(isinstance(x, torch.Tensor) for x in items):
        raise ValueError("build_optimizer needs a module, an iterable of tensors or an iterable of param-group dicts")
    items = [p for p in items if p.requires_grad]
    groups = [
        {"params": [p for p in items if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in items if p.ndim <= 1], "weight_decay": 0.0, "exclude_from_trust": True},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    name: str,
    params_or_groups: nn.Module | Iterable[torch.Tensor] | Iterable[dict],
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float | None = None,
    trust_coefficient: float = 0.001,
) -> torch.optim.Optimizer:
    """Optimizer ``name`` (sgd, adamw, lars, lamb) over a module, tensors or param groups.

    Which settings each one reads: sgd: lr, momentum, weight_decay; adamw: lr, betas, eps,
    weight_decay; lars: lr, momentum, weight_decay, trust_coefficient, eps; lamb: lr,
    betas, eps, weight_decay. ``eps=None`` picks the optimizer's usual value.
    For a module or plain tensors, biases and norm weights get no weight decay (and, for
    lars/lamb, no trust ratio); explicit group dicts are passed through unchanged.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    groups = _as_param_groups(params_or_groups, weight_decay)
    if eps is None and name != "sgd":
        eps = _DEFAULT_EPS[name]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "lars":
        return LARS(
            groups, lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps
        )
    return LAMB(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

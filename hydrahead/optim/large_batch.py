"""Layer-wise adaptive optimizers for large-batch training: LARS and LAMB.

Both scale each parameter tensor's ("layer's") update by a trust ratio built from the norm
of its weights, so that every layer moves by a similar fraction of its own size whatever
the scale of its gradient. That is what lets the global batch (and with it the LR) grow
far beyond what plain SGD or Adam tolerate.

Param groups may set ``exclude_from_trust=True`` (meant for biases and norm weights, see
``hydrahead.models.param_groups_for_decay``): such parameters get trust ratio 1 and no
weight decay, i.e. a plain momentum-SGD (LARS) or Adam (LAMB) step.

The trust ratio is computed with tensor ops only (no ``.item()``), so a step never waits
on the GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer


def _trust_ratio(
    numerator: torch.Tensor, denominator: torch.Tensor, w_norm: torch.Tensor, other_norm: torch.Tensor
) -> torch.Tensor:
    """numerator / denominator, or 1 where either norm is 0 (fresh zero-init layers, zero grads)."""
    ok = (w_norm > 0) & (other_norm > 0)
    return torch.where(ok, numerator / denominator, torch.ones_like(w_norm))


class LARS(Optimizer):
    r"""SGD with momentum and a layer-wise trust ratio (You, Gitman & Ginsburg, 2017).

    For each parameter tensor w with gradient g, per step::

        local_lr = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)
                   (local_lr = 1 when ||w|| == 0 or ||g|| == 0)
        u        = local_lr * (g + weight_decay * w)
        buf      = momentum * buf + u               (buf starts at 0)
        w        = w - lr * buf

    In groups with ``exclude_from_trust=True``: ``u = g`` (no trust ratio, no decay).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0 or eps < 0:
            raise ValueError(
                f"invalid LARS settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                f"trust_coefficient={trust_coefficient}, eps={eps}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            exclude_from_trust=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # One multi-tensor op per stage for the whole group, not a few small kernels per
        # tensor: after the trainer's finite-gradient check the GPU idles until this step's
        # kernels are launched, so its host time is on the step's critical path.
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LARS does not support sparse gradients")
            grads = [p.grad for p in params]
            wd = group["weight_decay"]
            if group["exclude_from_trust"]:
                updates = [g.clone() for g in grads]
            else:
                w_norms = torch.stack(torch._foreach_norm(params))
                g_norms = torch.stack(torch._foreach_norm(grads))
                local_lrs = _trust_ratio(
                    group["trust_coefficient"] * w_norms, g_norms + wd * w_norms + group["eps"], w_norms, g_norms
                )
                updates = list(torch._foreach_add(grads, params, alpha=wd))
                torch._foreach_mul_(updates, list(local_lrs.unbind(0)))
            if group["momentum"] != 0:
                held = [i for i, p in enumerate(params) if "momentum_buffer" in self.state[p]]
                if held:
                    buffers = [self.state[params[i]]["momentum_buffer"] for i in held]
                    torch._foreach_mul_(buffers, group["momentum"])
                    torch._foreach_add_(buffers, [updates[i] for i in held])
                    for i, buffer in zip(held, buffers):
                        updates[i] = buffer
                for p, update in zip(params, updates):
                    self.state[p].setdefault("momentum_buffer", update)  # a first step: the buffer is the update
            torch._foreach_add_(params, updates, alpha=-group["lr"])
        return loss


class LAMB(Optimizer):
    r"""Adam moments with a layer-wise trust ratio (You et al., 2019, "Large Batch
    Optimization for Deep Learning: Training BERT in 76 minutes").

    For each parameter tensor w with gradient g, at step t (1-based)::

        m      = beta1 * m + (1 - beta1) * g
        v      = beta2 * v + (1 - beta2) * g^2
        m_hat  = m / (1 - beta1^t)
        v_hat  = v / (1 - beta2^t)
        u      = m_hat / (sqrt(v_hat) + eps) + weight_decay * w
        trust  = ||w|| / ||u||          (trust = 1 when ||w|| == 0 or ||u|| == 0)
        w      = w - lr * trust * u

    In groups with ``exclude_from_trust=True``: no decay term and trust = 1 (an Adam step).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LAMB settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, exclude_from_trust=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                g = p.grad
                state = self.state[p]
                if not state:
                    # A tensor step count, like torch.optim.Adam, so checkpoints treat it alike.
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = int(state["step"].item())  # a CPU tensor: no device sync
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                update = (m / (1 - beta1**t)).div_(denom)
                if group["exclude_from_trust"]:
                    p.add_(update, alpha=-group["lr"])
                    continue
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm = torch.linalg.vector_norm(p)
                u_norm = torch.linalg.vector_norm(update)
                trust = _trust_ratio(w_norm, u_norm, w_norm, u_norm)
                p.add_(update.mul_(trust), alpha=-group["lr"])
        return loss

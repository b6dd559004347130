"""The FP8 shard kernels' arithmetic, re-done in torch (float64 between the same roundings).

The kernels (hydrahead.kernels.shard_ce with fp8 weights) round in four places: features
to e4m3 rows with a scale each (done in torch, by ``feature_operand``), the softmax weights
of A = sum_c exp(z_c - m) w_c to bf16 tile by tile, P (times the features' row scales) to
e5m2 before P^T F, and the new weights onto the storage grid; the gemm backward also
rounds P's softmax part to e5m2 before P W. This module rounds at
exactly those places, with the kernels' tile order for the running maximum, so kernel
and emulation differ only by float32 summation order.
"""

from __future__ import annotations

import torch

from hydrahead.kernels.shard_ce import FeatureOperand, forward_splits, operand_scale
from hydrahead.kernels.tiles import tile_config
from hydrahead.optim.low_precision import round_nearest, rounding_uniforms, stochastic_round

E5M2 = torch.float8_e5m2


def _logits(op: FeatureOperand, weight, inv_norm, local_label, scale, target_shift):
    z = (op.values.double() @ weight.double().T) * op.row_scale.double()[:, None]
    if inv_norm is not None:
        z = z * inv_norm.double()[None, :]
    z = z * scale
    cols = torch.arange(weight.shape[0], device=weight.device)
    is_target = local_label[:, None] == cols[None, :]
    return torch.where(is_target, z - target_shift, z), is_target


def _to_e5m2(x: torch.Tensor) -> torch.Tensor:
    return x.float().to(E5M2).double()


def emulate_forward(op, weight, inv_norm, local_label, *, scale, target_shift):
    """(max, sum, target, A) per sample, as the forward kernel forms them split by split."""
    z, is_target = _logits(op, weight, inv_norm, local_label, scale, target_shift)
    w = weight.double()
    rows, classes = z.shape
    splits, per_split = forward_splits(rows, classes, w.device)
    block_c = tile_config("forward", w.device)[1]
    maxes, sums, accs = [], [], []
    for split in range(splits):
        m = torch.full((rows,), float("-inf"), dtype=torch.float64, device=w.device)
        l = torch.zeros(rows, dtype=torch.float64, device=w.device)
        acc = torch.zeros(rows, w.shape[1], dtype=torch.float64, device=w.device)
        for c0 in range(split * per_split, min((split + 1) * per_split, classes), block_c):
            c1 = min(c0 + block_c, (split + 1) * per_split, classes)
            tile = z[:, c0:c1]
            m_new = torch.maximum(m, tile.max(dim=1).values)
            alpha = torch.exp(m - m_new)
            p = torch.exp(tile - m_new[:, None])
            l = l * alpha + p.sum(dim=1)
            if inv_norm is not None:
                p = p * inv_norm.double()[None, c0:c1]
            acc = acc * alpha[:, None] + p.float().bfloat16().double() @ w[c0:c1]
            m = m_new
        maxes.append(m), sums.append(l), accs.append(acc)
    m = torch.stack(maxes)
    row_max = m.amax(dim=0)
    rescale = torch.exp(m - row_max)
    accumulated = sum(a * r[:, None] for a, r in zip(accs, rescale))
    target = torch.where(is_target, z, 0.0).sum(dim=1)
    return row_max, (torch.stack(sums) * rescale).sum(dim=0), target, accumulated


def emulate_weight_gradient(
    op, weight, inv_norm, local_label, lse, *, scale, target_shift, grad_scale, scaled_first=False
):
    """dW (float64) as the weight kernel forms it: P times the row scales in e5m2, then P^T F.
    ``scaled_first``: P times ``grad_scale`` before its rounding (the gemm backward)."""
    z, is_target = _logits(op, weight, inv_norm, local_label, scale, target_shift)
    p = torch.exp(z - lse.double()[:, None])
    p = torch.where(is_target, p - 1.0, p)
    p = torch.where(torch.isfinite(lse)[:, None], p, 0.0)
    row_scale = op.row_scale.double()
    after = grad_scale
    if scaled_first:
        p, after = p * grad_scale, 1.0
    p_scale = float(operand_scale(op.row_scale.max() * (grad_scale if scaled_first else 1.0)))
    grad = _to_e5m2(p * (row_scale * p_scale)[:, None]).T @ op.values.double() / p_scale * after
    if inv_norm is not None:
        inv = inv_norm.double()[:, None]
        w_unit = weight.double() * inv
        grad = (grad - w_unit * (w_unit * grad).sum(dim=1, keepdim=True)) * inv
    return grad


def emulate_feature_gradient(op, weight, inv_norm, local_label, lse, *, scale, target_shift, grad_scale):
    """dF (float64) as the gemm backward forms it for fp8 rows: the softmax part of P, times
    ``grad_scale`` (and 1 / ||w_c||), in e5m2 times W; the one-hot part, g w_y, exactly."""
    z, is_target = _logits(op, weight, inv_norm, local_label, scale, target_shift)
    counted = torch.isfinite(lse)[:, None]
    soft = torch.where(counted, torch.exp(z - lse.double()[:, None]), 0.0) * grad_scale
    onehot = torch.where(counted & is_target, grad_scale, 0.0)
    inv = torch.ones(weight.shape[0], dtype=torch.float64) if inv_norm is None else inv_norm.double()
    p_scale = float(operand_scale(torch.tensor(grad_scale) * inv.max()))
    return (_to_e5m2(soft * inv[None, :] * p_scale) / p_scale - onehot * inv[None, :]) @ weight.double()


def emulate_update(
    weight, grad, *, lr, momentum, weight_decay, buffer, rounding, seed, step, class_ids, compensation=None
):
    """The fused SGD step and the write-back rounding: (new weight, new buffer, new compensation)."""
    w32 = weight.float()
    step_value = grad.float() + weight_decay * w32
    if buffer is not None:  # the step uses the float32 buffer; storing it rounds to its dtype
        step_value = momentum * buffer.float() + step_value
        buffer = step_value.to(buffer.dtype)
    new = w32 - lr * step_value
    if compensation is not None:
        new = new + compensation.float()
    if rounding == "stochastic":
        stored = stochastic_round(new, weight.dtype, rounding_uniforms(seed, step, class_ids, weight.shape[1]))
    else:
        stored = round_nearest(new, weight.dtype)
    if compensation is not None:
        compensation = (new - stored.float()).to(compensation.dtype)
    return stored, buffer, compensation

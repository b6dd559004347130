"""The head's loss and update over an active subset of each shard's classes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_harness import run_ranks
from hydrahead.head import ShardedClassifier

NUM_CLASSES, DIM, BATCH = 101, 8, 20
LR, MOMENTUM, WEIGHT_DECAY = 0.5, 0.9, 1e-3


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
    labels[::5] = -100
    extra = torch.randperm(NUM_CLASSES, generator=gen)[:30]
    active = torch.unique(torch.cat([labels[labels >= 0], extra]))  # global ids: positives + 30 others
    buffer = torch.randn(NUM_CLASSES, DIM, generator=gen, dtype=torch.float64) * 0.1
    return features, labels, active, buffer


def make_head(impl, dtype):
    head = ShardedClassifier(NUM_CLASSES, DIM, seed=3, init_std=0.5, dtype=dtype, impl=impl, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    head.set_lr(LR)
    return head


def _worker(rank, world_size, impl, use_all):
    dtype = torch.float64 if impl == "reference" else torch.float32
    features, labels, active, buffer = problem()
    head = make_head(impl, dtype)
    head.momentum_buffer.copy_(buffer[head.class_start : head.class_stop])
    if use_all:
        active = torch.arange(NUM_CLASSES)
    mine = active[(active >= head.class_start) & (active < head.class_stop)] - head.class_start
    loss = head.loss(features.to(dtype).requires_grad_(), labels, mine)
    loss.backward()
    head.finish_step()
    return loss.detach().double(), head.weight.detach().double(), head.momentum_buffer.double()


def expected(use_all):
    """float64: softmax over the active classes, SGD with momentum on their rows only."""
    features, labels, active, buffer = problem()
    if use_all:
        active = torch.arange(NUM_CLASSES)
    weight = make_head("reference", torch.float64).weight.detach()
    sub = weight[active].clone().requires_grad_()
    valid = labels >= 0
    positions = torch.searchsorted(active, labels.clamp(min=0))
    loss = F.cross_entropy(features[valid] @ sub.t(), positions[valid])
    loss.backward()
    new_weight, new_buffer = weight.clone(), buffer.clone()
    step = sub.grad + WEIGHT_DECAY * weight[active]
    new_buffer[active] = MOMENTUM * buffer[active] + step
    new_weight[active] = weight[active] - LR * new_buffer[active]
    return loss.detach(), new_weight, new_buffer


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("use_all", [False, True])
def test_active_rows_train_the_softmax_over_their_union(impl, world_size, use_all):
    results = run_ranks(_worker, world_size, impl, use_all)
    ref_loss, ref_weight, ref_buffer = expected(use_all)
    tol = 1e-10 if impl == "reference" else 1e-5
    for loss, _, _ in results:
        assert abs(float(loss) - float(ref_loss)) <= tol * abs(float(ref_loss))
    weight = torch.cat([r[1] for r in results])
    buffer = torch.cat([r[2] for r in results])
    _, labels, active, initial_buffer = problem()
    inactive = torch.ones(NUM_CLASSES, dtype=torch.bool)
    inactive[torch.arange(NUM_CLASSES) if use_all else active] = False
    initial_weight = make_head("reference", torch.float64).weight.detach()
    # Rows outside the active set keep their weight and momentum exactly.
    weight_dtype = torch.float64 if impl == "reference" else torch.float32
    assert torch.equal(buffer[inactive], initial_buffer[inactive].float().double())  # the buffer is fp32
    assert torch.equal(weight[inactive], initial_weight[inactive].to(weight_dtype).double())
    delta, ref_delta = weight - initial_weight, ref_weight - initial_weight
    update_tol = 1e-6 if impl == "reference" else 1e-4  # the momentum buffer is fp32
    assert float((delta - ref_delta).norm() / ref_delta.norm()) < update_tol
    assert float((buffer - ref_buffer).norm() / ref_buffer.norm()) < update_tol


def test_all_active_rows_equal_the_full_head():
    features, labels, _, _ = problem(1)
    heads = [make_head("reference", torch.float64) for _ in range(2)]
    losses = []
    for head, rows in zip(heads, (None, torch.arange(NUM_CLASSES))):
        loss = head.loss(features.clone().requires_grad_(), labels, rows)
        loss.backward()
        head.finish_step()
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    assert torch.allclose(heads[0].weight, heads[1].weight, rtol=0, atol=1e-12)
    assert torch.allclose(heads[0].momentum_buffer, heads[1].momentum_buffer, rtol=0, atol=1e-12)


def test_bad_active_rows_fail_clearly():
    features, labels, _, _ = problem(2)
    head = make_head("reference", torch.float64)
    positives = torch.unique(labels[labels >= 0])
    with pytest.raises(ValueError, match="owned labels missing"):
        head.loss(features, labels, positives[1:])
    with pytest.raises(ValueError, match="sorted and unique"):
        head.loss(features, labels, positives.flip(0))
    head.loss(features, labels, positives)
    with pytest.raises(RuntimeError, match="finish_step"):
        head.loss(features, labels, positives)
    head.finish_step(skip=True)  # a skipped step leaves every row as it was
    assert torch.equal(head.weight, make_head("reference", torch.float64).weight)

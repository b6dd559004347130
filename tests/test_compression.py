"""Backbone gradient compression hooks (hydrahead.comm.compression) on 2 gloo ranks."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks
from launcher import launch, launch_together, metrics
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from hydrahead.comm.compression import WARMUP_START_DENSITY, TopK, register, topk_density
from hydrahead.config import CommConfig, ConfigError, load_config, validate


def test_warmup_falls_exponentially_from_a_quarter_to_the_target():
    target, warmup = 0.001, 100
    values = [topk_density(step, target, warmup) for step in range(1, 130)]
    assert values[0] == WARMUP_START_DENSITY
    assert math.isclose(values[50], WARMUP_START_DENSITY * (target / WARMUP_START_DENSITY) ** 0.5)  # halfway, geometric
    assert all(a > b for a, b in zip(values[:100], values[1:101]))
    assert all(v == target for v in values[100:])
    assert topk_density(1, 0.5, warmup) == 0.5 and topk_density(1, 0.25, warmup) == 0.25  # no warm-up at >= 25%
    assert topk_density(1, target, 0) == target


def test_residuals_advance_only_when_the_step_is_taken_and_resume_as_a_sum():
    param = nn.Parameter(torch.zeros(200))
    topk = TopK({param: "w"}, density=0.1, warmup_steps=0, min_numel=10)
    grad = torch.arange(200.0)
    indices, values = topk._select("w", grad, 0.1)
    assert sorted(indices.tolist()) == list(range(180, 200)) and torch.equal(values.sort().values, grad[180:])
    topk.discard()  # a skipped step
    assert topk.residuals == {} and torch.equal(topk.state_dict()["w"], torch.zeros(200))
    topk._select("w", grad, 0.1)
    topk.commit()
    kept = torch.where(grad < 180, grad, 0.0)
    assert torch.equal(topk.residuals["w"], kept)
    indices, values = topk._select("w", grad, 0.1)  # the residual joins the next gradient: 2 g below 180
    assert sorted(indices.tolist()) == list(range(160, 180)) and torch.equal(values.sort().values, 2 * grad[160:180])
    topk.discard()
    saved = topk.state_dict()
    topk.load_summed([saved, {"w": torch.ones(200)}])  # two saved ranks onto one
    assert torch.equal(topk.residuals["w"], kept + 1)
    topk.load_summed([])
    assert topk.residuals == {}


def _model():
    torch.manual_seed(0)  # identical replicas
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32), nn.ReLU(), nn.Linear(32, 10))


def _batch(rank, step):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(16, 64, generator=gen), torch.randint(0, 10, (16,), generator=gen)


def _hook_worker(rank, world_size, compression, density, steps):
    model = _model()
    ddp = DDP(model, bucket_cap_mb=0.01)  # several buckets
    cfg = CommConfig(grad_compression=compression, topk_density=density, topk_warmup_steps=0, topk_min_numel=100)
    counters, topk = register(ddp, None, cfg, {p: n for n, p in model.named_parameters()})
    params = list(model.parameters())
    synced, local, sent_bytes = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], []
    for step in range(1, steps + 1):
        x, y = _batch(rank, step)
        loss = nn.functional.cross_entropy(model(x), y)
        for acc, g in zip(local, torch.autograd.grad(loss, params)):  # this rank's own gradient, not exchanged
            acc += g
        for p in params:
            p.grad = None
        if topk is not None:
            topk.step = step
        nn.functional.cross_entropy(ddp(x), y).backward()
        if topk is not None:
            topk.commit()
        for acc, p in zip(synced, params):
            acc += p.grad
        sent_bytes.append(counters.take()["bytes_backbone_allreduce"])
    for t in local:
        dist.all_reduce(t)  # the dense sum over ranks
    residual = (
        [topk.residuals.get(n, torch.zeros(p.numel())).reshape(p.shape).clone() for n, p in model.named_parameters()]
        if topk
        else None
    )
    if residual is not None:
        for t in residual:
            dist.all_reduce(t)
    return synced, local, residual, sent_bytes, [p.numel() for p in params]


def _close(a, b, tol):
    return all(float((x - y).norm()) <= tol * float(y.norm()) + 1e-7 for x, y in zip(a, b))


def test_topk_keeping_every_entry_equals_the_plain_sum():
    # density just below 1: ceil(d * n) = n, so every entry goes through the sparse path
    (synced, local, residual, _, _), _ = run_ranks(_hook_worker, 2, "topk", 1 - 1e-7, 1)
    assert _close(synced, local, 1e-6)
    assert all(float(r.abs().max()) == 0.0 for r in residual)
    (plain, plain_local, _, _, _), _ = run_ranks(_hook_worker, 2, "none", 1.0, 1)
    assert _close(plain, plain_local, 1e-6) and _close(synced, plain, 1e-6)


def test_topk_sends_or_keeps_every_unit_of_the_dense_sum():
    results = run_ranks(_hook_worker, 2, "topk", 0.02, 5)
    synced, local, residual, _, _ = results[0]
    assert not _close(synced, local, 0.1)  # it really sent less
    total = [s + r for s, r in zip(synced, residual)]
    assert _close(total, local, 1e-5)  # sent over the steps + what the ranks still hold = the dense sum
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))  # every rank applies the same


def test_byte_counters_count_the_payload_handed_to_the_collectives():
    density, min_numel = 0.02, 100
    _, _, _, sent_bytes, sizes = run_ranks(_hook_worker, 2, "topk", density, 2)[0]
    expected = sum(8 * math.ceil(density * n) if n >= min_numel else 4 * n for n in sizes)  # int32 index + fp32 value
    assert sent_bytes == [expected, expected]
    _, _, _, dense_bytes, _ = run_ranks(_hook_worker, 2, "none", 1.0, 1)[0]
    assert dense_bytes == [4 * sum(sizes)] and expected * 10 < dense_bytes[0]
    _, _, _, bf16_bytes, _ = run_ranks(_hook_worker, 2, "bf16", 1.0, 1)[0]
    assert bf16_bytes == [2 * sum(sizes)]


@pytest.mark.parametrize("compression, tol", [("bf16", 1e-2), ("powersgd", 1e-6)])
def test_pytorch_hooks_sum_like_the_trainer_needs(compression, tol):
    # powersgd sends plain all-reduces before powersgd_start_step (10): exact here
    synced, local, _, _, _ = run_ranks(_hook_worker, 2, compression, 1.0, 2)[0]
    assert _close(synced, local, tol)


def test_comm_keys_are_checked():
    with pytest.raises(ConfigError, match="topk_density"):
        validate(load_config(None, ["comm.topk_density=0"]))
    with pytest.raises(ConfigError, match="grad_compression"):
        load_config(None, ["comm.grad_compression=fp4"])


def test_residuals_are_checkpointed_and_summed_onto_rank_0_on_another_world_size(tmp_path):
    topk = [
        "comm.grad_compression=topk",
        "comm.topk_density=0.01",
        "comm.topk_min_numel=64",
        "comm.topk_warmup_steps=0",
    ]
    run_dir, same = tmp_path / "run", tmp_path / "same"
    launch(run_dir, 2, *topk, "train.stop_after=4")
    shutil.copytree(run_dir, same)  # resumed below on the world size that saved it
    proc = launch(run_dir, 1, *topk, "train.stop_after=6")
    assert "residuals of 2 ranks summed onto rank 0 of 1" in proc.stderr
    rows = [r for r in metrics(run_dir) if "bytes_backbone_allreduce" in r]
    assert rows and all(r["bytes_backbone_allreduce"] > 0 and r["topk_density"] == 0.01 for r in rows)
    # TINY: global batch 48, D = 32, fp32 features on CPU; steps 1-4 on 2 ranks, 5-6 on 1
    for r in rows:
        local = 24 if r["step"] <= 4 else 48
        assert r["bytes_feature_gather"] == local * 32 * 4 + local * 8  # features + int64 labels
        assert r["bytes_grad_scatter"] == 48 * 32 * 4  # the full dF goes into the reduce-scatter
    proc = launch(same, 2, *topk, "train.stop_after=6")
    assert "summed" not in proc.stderr


def test_topk_warmup_compresses_each_step_at_its_own_density_and_resumes_exactly(tmp_path):
    """The warm-up density is the step's own (set before the backward, whose DDP hook reads
    it), also for the first step after a resume."""
    from launcher import train_losses

    topk = [
        "comm.grad_compression=topk",
        "comm.topk_density=0.01",
        "comm.topk_min_numel=64",
        "comm.topk_warmup_steps=8",
        "log.every=1",
    ]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch_together((whole, 2, *topk, "train.stop_after=8"), (resumed, 2, *topk, "train.stop_after=4"))
    launch(resumed, 2, *topk, "train.stop_after=8")
    assert train_losses(resumed) == train_losses(whole)
    rows = [r for r in metrics(whole) if "topk_density" in r]
    assert rows and all(r["topk_density"] == pytest.approx(topk_density(r["step"], 0.01, 8)) for r in rows)

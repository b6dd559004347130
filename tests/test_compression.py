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


def _message(topk, params, grads, world_size=1):
    """One worker's message for a bucket of ``params``: (dense values, indices, values)."""
    buffer = torch.cat([g.reshape(-1) for g in grads])
    views = [v.view_as(g) for v, g in zip(buffer.split([g.numel() for g in grads]), grads)]
    payload, (_, num_dense, num_sparse) = topk.pack(buffer, list(params), views, world_size)
    return (
        payload[:num_dense].view(torch.float32),
        payload[num_dense : num_dense + num_sparse].long(),
        payload[num_dense + num_sparse :].view(torch.float32),
    )


def test_residuals_advance_only_when_the_step_is_taken_and_resume_as_a_sum():
    param = nn.Parameter(torch.zeros(200))
    topk = TopK({param: "w"}, density=0.1, warmup_steps=0, min_numel=10)
    grad = torch.arange(200.0)
    _, indices, values = _message(topk, [param], [grad])
    assert sorted(indices.tolist()) == list(range(180, 200)) and torch.equal(values.sort().values, grad[180:])
    topk.discard()  # a skipped step
    assert topk.residuals == {} and torch.equal(topk.state_dict()["w"], torch.zeros(200))
    _message(topk, [param], [grad])
    topk.commit()
    kept = torch.where(grad < 180, grad, 0.0)
    assert torch.equal(topk.residuals["w"], kept)
    _, indices, values = _message(topk, [param], [grad])  # the residual joins the next gradient: 2 g below 180
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
    shutil.copytree(run_dir, same)  # resumed on the world size that saved it, beside the other
    proc, kept = launch_together((run_dir, 1, *topk, "train.stop_after=6"), (same, 2, *topk, "train.stop_after=6"))
    assert "residuals of 2 ranks summed onto rank 0 of 1" in proc.stderr
    rows = [r for r in metrics(run_dir) if "bytes_backbone_allreduce" in r]
    assert rows and all(r["bytes_backbone_allreduce"] > 0 and r["topk_density"] == 0.01 for r in rows)
    # TINY: global batch 48, D = 32, fp32 features on CPU; steps 1-4 on 2 ranks, 5-6 on 1
    for r in rows:
        local = 24 if r["step"] <= 4 else 48
        assert r["bytes_feature_gather"] == local * 32 * 4 + local * 8  # features + int64 labels
        assert r["bytes_grad_scatter"] == 48 * 32 * 4  # the full dF goes into the reduce-scatter
    assert "summed" not in kept.stderr


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


def _sent_and_kept(topk, params, grads):
    """One step of ``topk`` on ``grads``: the dense sum it sent (per parameter) and the residuals it keeps."""
    dense, indices, values = _message(topk, params, grads)
    buffer = torch.zeros(sum(g.numel() for g in grads))
    buffer.index_add_(0, indices, values)
    topk.commit()
    sizes = [p.numel() for p in params]
    sent = list(buffer.split(sizes))
    kept = [topk.residuals.get(topk.names[p], torch.zeros(p.numel())) for p in params]
    return sent, kept, dense


@pytest.mark.parametrize("threshold", [None, 1e9, 0.0])  # sampled as it comes, nothing clears it, everything does
def test_sampled_topk_keeps_in_the_residual_exactly_what_it_did_not_send(monkeypatch, threshold):
    from hydrahead.comm import compression
    from hydrahead.comm.topk_select import select_above

    if threshold is not None:
        monkeypatch.setattr(
            compression,
            "sampled_topk",
            lambda acc, plan, seed: select_above(acc, plan, torch.full((plan.caps.numel(),), threshold)),
        )
    params = [nn.Parameter(torch.zeros(50_000)), nn.Parameter(torch.zeros(8192))]
    topk = TopK({params[0]: "a", params[1]: "b"}, density=0.001, warmup_steps=0, select="sampled", min_numel=100)
    gen = torch.Generator().manual_seed(0)
    owed = [torch.zeros(p.numel()) for p in params]
    for _ in range(3):
        grads = [torch.randn(p.numel(), generator=gen) for p in params]
        acc = [o + g for o, g in zip(owed, grads)]
        sent, kept, _ = _sent_and_kept(topk, params, grads)
        for a, s, k, p in zip(acc, sent, kept, params):
            assert torch.equal(s + k, a)  # each entry sent whole or kept whole: nothing lost
            assert int((s != 0).sum()) <= math.ceil(0.001 * p.numel())
            assert threshold == 1e9 or int((s != 0).sum()) > 0
        owed = kept


def test_sampled_topk_selects_the_same_entries_in_any_bucket_layout():
    """The sample positions are keyed by parameter, not by bucket: a simulated worker packs
    other buckets than DDP does and must still send what the real rank sends."""
    params = [nn.Parameter(torch.zeros(40_000)), nn.Parameter(torch.zeros(30_000))]
    names = {params[0]: "a", params[1]: "b"}
    grads = [torch.randn(p.numel(), generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    # sample 1% with few entries sent: the threshold is an estimate, so its samples matter
    options = dict(density=0.0005, warmup_steps=0, select="sampled", sample_share=0.01, worker=3, seed=7)
    together, alone = TopK(names, **options), TopK(names, **options)
    joint, _, _ = _sent_and_kept(together, params, grads)
    for i, param in enumerate(params):
        single, _, _ = _sent_and_kept(alone, [param], [grads[i]])
        assert torch.equal(single[0], joint[i])
    assert all(torch.equal(together.residuals[n], alone.residuals[n]) for n in ("a", "b"))


def test_local_clipping_bounds_each_tensor_by_its_share_and_the_worker_count():
    small, large = nn.Parameter(torch.zeros(100)), nn.Parameter(torch.zeros(300))
    topk = TopK({small: "small", large: "large"}, density=0.5, warmup_steps=0, min_numel=1000, local_clip=2.0)
    g_small, g_large = torch.full((100,), 0.001), torch.full((300,), 10.0)
    dense, _, _ = _message(topk, [small, large], [g_small, g_large], world_size=4)
    bound = 2.0 * math.sqrt(300 / 400) / math.sqrt(4)
    assert torch.equal(dense[:100], g_small)  # under its bound: untouched
    assert float(dense[100:].norm()) == pytest.approx(bound, rel=1e-5)
    assert torch.allclose(dense[100:], torch.full((300,), bound / math.sqrt(300)))


def test_named_tensors_go_dense():
    from hydrahead.comm.compression import CommCounters, make_topk

    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32))
    names = {p: n for n, p in model.named_parameters()}
    cfg = CommConfig(grad_compression="topk", topk_min_numel=100, topk_dense=["0.*"])
    topk = make_topk(cfg, names, CommCounters())
    assert [topk.is_sparse(p) for p in model.parameters()] == [False, False, True, False]
    grads = [torch.randn(p.shape) for p in model.parameters()]
    dense, indices, _ = _message(topk, list(model.parameters()), grads)
    assert dense.numel() == 64 * 96 + 96 + 32 and indices.numel() == math.ceil(0.25 * 96 * 32)  # warm-up start


def _conv_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    return model.to(memory_format=torch.channels_last)


def _momentum_worker(rank, world_size, density, masking, steps, convolutional=False):
    from torch.optim import SGD

    model, reference = (_conv_model(), _conv_model()) if convolutional else (_model(), _model())
    ddp = DDP(model, bucket_cap_mb=0.01)
    cfg = CommConfig(
        grad_compression="topk",
        topk_density=density,
        topk_warmup_steps=0,
        topk_min_numel=100,
        topk_momentum_correction=True,
        topk_momentum_masking=masking,
    )
    decay = {n: 0.01 if p.ndim > 1 else 0.0 for n, p in model.named_parameters()}
    _, topk = register(ddp, None, cfg, {p: n for n, p in model.named_parameters()}, momentum=0.9, weight_decay=decay)
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.0)  # the exchange holds the momentum
    groups = [[p for p in reference.parameters() if p.ndim > 1], [p for p in reference.parameters() if p.ndim <= 1]]
    ref_optimizer = SGD(
        [{"params": groups[0], "weight_decay": 0.01}, {"params": groups[1], "weight_decay": 0.0}], lr=0.1, momentum=0.9
    )
    for step in range(1, steps + 1):
        x, y = _batch(rank, step)
        if convolutional:  # channels-last images: the gradients lie in the bucket in that order
            x = x.view(16, 4, 4, 4)[:, :3].contiguous(memory_format=torch.channels_last)
        topk.step = step
        nn.functional.cross_entropy(ddp(x), y).backward()
        topk.commit()
        optimizer.step()
        optimizer.zero_grad()
        grads = torch.autograd.grad(nn.functional.cross_entropy(reference(x), y), list(reference.parameters()))
        for p, g in zip(reference.parameters(), grads):
            dist.all_reduce(g)  # the dense sum over ranks
            p.grad = g
        ref_optimizer.step()
    return [p.detach() for p in model.parameters()], [p.detach() for p in reference.parameters()]


@pytest.mark.parametrize("density", [1.0, 1 - 1e-7])  # every tensor dense; every entry through the sparse path
@pytest.mark.parametrize("convolutional", [False, True], ids=["linear", "channels-last-conv"])
def test_momentum_correction_sending_everything_is_sgd_with_momentum_and_weight_decay(density, convolutional):
    corrected, reference = run_ranks(_momentum_worker, 2, density, False, 4, convolutional)[0]
    assert _close(corrected, reference, 1e-5)


def test_momentum_masking_clears_the_momentum_of_what_was_sent():
    # every entry is sent every step, so masking leaves the sparse tensors no momentum at all
    masked, reference = run_ranks(_momentum_worker, 2, 1 - 1e-7, True, 4)[0]
    assert not _close(masked, reference, 1e-2)
    sparse = [i for i, p in enumerate(masked) if p.numel() >= 100]
    dense = [i for i in range(len(masked)) if i not in sparse]
    assert _close([masked[i] for i in dense], [reference[i] for i in dense], 1e-1)  # dense ones keep theirs


def test_momentum_correction_needs_sgd_and_unused_topk_keys_are_warned_about():
    with pytest.raises(ConfigError, match="optim.backbone=sgd"):
        validate(
            load_config(
                None, ["comm.grad_compression=topk", "comm.topk_momentum_correction=true", "optim.backbone=lamb"]
            )
        )
    with pytest.warns(UserWarning, match="comm.topk_"):
        validate(load_config(None, ["comm.topk_select=sampled"]))


def test_momentum_correction_is_on_by_default_exactly_for_sgd():
    from hydrahead.config import topk_momentum_correction

    def resolved(*overrides: str) -> bool:
        cfg = load_config(None, list(overrides))
        validate(cfg)
        return topk_momentum_correction(cfg)

    assert resolved("comm.grad_compression=topk")
    assert not resolved("comm.grad_compression=topk", "optim.backbone=lamb")
    assert not resolved("comm.grad_compression=topk", "comm.topk_momentum_correction=false")
    assert not resolved("comm.grad_compression=none")


def test_top_k_takes_large_buckets_by_default():
    from hydrahead.config import bucket_mb

    def resolved(*overrides: str) -> float:
        cfg = load_config(None, list(overrides))
        validate(cfg)
        return bucket_mb(cfg)

    assert resolved() == 25.0 and resolved("comm.grad_compression=bf16") == 25.0
    assert resolved("comm.grad_compression=topk") == 400.0
    assert resolved("comm.grad_compression=topk", "comm.bucket_mb=10") == 10.0
    with pytest.raises(ConfigError, match="comm.bucket_mb"):
        validate(load_config(None, ["comm.bucket_mb=0"]))


@pytest.mark.parametrize("select", ["exact", "sampled"])
def test_state_follows_the_tensors_when_the_buckets_change(select):
    """DDP rebuilds its buckets after the first step: the residuals and velocities kept per
    bucket must move with their tensors, so a worker whose buckets change sends what one
    with fixed buckets sends."""
    params = [nn.Parameter(torch.randn(30_000)), nn.Parameter(torch.randn(20_000))]
    names = {params[0]: "a", params[1]: "b"}
    options = dict(density=0.001, warmup_steps=0, select=select, min_numel=100, momentum_correction=True)
    options.update(weight_decay={"a": 0.01}, worker=1, seed=2)
    fixed, moving = TopK(names, **options), TopK(names, **options)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 5):
        grads = [torch.randn(p.numel(), generator=gen) for p in params]
        fixed.step = moving.step = step
        joint, _, _ = _sent_and_kept(fixed, params, grads)
        if step % 2:  # one bucket each, in the other order
            apart = [_sent_and_kept(moving, [params[i]], [grads[i]])[0][0] for i in (1, 0)][::-1]
        else:
            apart, _, _ = _sent_and_kept(moving, params, grads)
        assert all(torch.equal(a, b) for a, b in zip(joint, apart))
        for name in ("a", "b"):
            assert torch.equal(fixed.residuals[name], moving.residuals[name])
            assert torch.equal(fixed.velocities[name], moving.velocities[name])


def test_ddp_gradient_layout_follows_dense_parameters_and_is_contiguous_otherwise():
    from hydrahead.comm.compression import ddp_gradient_layout

    conv = torch.randn(16, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    assert ddp_gradient_layout(conv) == ((16, 8, 3, 3), (72, 1, 24, 8))
    transposed = torch.randn(5, 7).t()
    assert ddp_gradient_layout(transposed) == ((7, 5), (1, 7))
    sliced = torch.randn(6, 8)[:, :4]  # not dense: DDP lays its gradient contiguously
    assert ddp_gradient_layout(sliced) == ((6, 4), (4, 1))
    single = torch.randn(3, 1, 4).transpose(0, 1)  # size-1 dimensions take any stride
    assert ddp_gradient_layout(single) == ((1, 3, 4), single.stride())


def _saved_state_worker(rank, world_size, channels_last):
    model = _conv_model()
    if not channels_last:
        model = model.to(memory_format=torch.contiguous_format)
    ddp = DDP(model, bucket_cap_mb=0.01)
    cfg = CommConfig(
        grad_compression="topk",
        topk_density=0.5,
        topk_warmup_steps=0,
        topk_min_numel=100,
        topk_momentum_correction=True,
        topk_momentum_masking=False,  # the velocities then do not depend on what was sent
    )
    decay = {n: 0.01 if p.ndim > 1 else 0.0 for n, p in model.named_parameters()}
    _, topk = register(ddp, None, cfg, {p: n for n, p in model.named_parameters()}, weight_decay=decay)
    for step in range(1, 3):
        x, y = _batch(rank, step)
        x = x.view(16, 4, 4, 4)[:, :3].contiguous(memory_format=torch.channels_last)
        topk.step = step
        nn.functional.cross_entropy(ddp(x), y).backward()
        topk.commit()
    return {name: value.clone() for name, value in topk.state_dict().items()}


def test_saved_state_is_in_the_parameters_order_whatever_their_memory_format():
    # A channels-last weight's gradient lies in its DDP bucket in memory order; the saved
    # velocities must not depend on it, or a run resumed in another layout (simulated
    # workers, another device) scrambles them.
    channels_last = run_ranks(_saved_state_worker, 1, True)[0]
    contiguous = run_ranks(_saved_state_worker, 1, False)[0]
    velocities = [key for key in contiguous if key.startswith("velocity/")]
    assert velocities and channels_last.keys() == contiguous.keys()
    for key in velocities:
        torch.testing.assert_close(channels_last[key], contiguous[key], rtol=1e-4, atol=1e-6)

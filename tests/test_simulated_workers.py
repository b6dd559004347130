"""comm.simulate_workers: W workers inside one process equal W real gloo ranks.

The real run is DDP with the top-k hook on W ranks; the simulation is one process that
cuts the global batch into W micro-batches (hydrahead.comm.simulated). Both train the
same BatchNorm network in float64 with every DGC option on, so the weights, the
BatchNorm buffers and the losses must agree to rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks
from launcher import launch, launch_together, saved_backbone, train_losses
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from hydrahead.comm.compression import CommCounters, make_topk, register
from hydrahead.comm.simulated import SimulatedWorkers
from hydrahead.config import CommConfig, ConfigError, load_config, validate
from hydrahead.train.checkpoint import latest_checkpoint

LOCAL_BATCH, STEPS = 6, 4
TOPK = CommConfig(
    grad_compression="topk",
    topk_density=0.05,
    topk_warmup_steps=2,
    topk_min_numel=100,
    topk_select="sampled",
    topk_sample_share=0.3,
    topk_momentum_correction=True,
    topk_local_clip=0.5,
    topk_dense=["head.*"],
)


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    net.add_module("head", nn.Linear(16, 10))
    return net.double()


def _global_batch(step, workers):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(workers * LOCAL_BATCH, 3, 6, 6, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 10, (workers * LOCAL_BATCH,), generator=gen)


def _loss(logits, labels, workers):
    # each worker's share of the global batch's mean: the summed gradients are the global one's
    return nn.functional.cross_entropy(logits, labels, reduction="sum") / (workers * LOCAL_BATCH)


def _optimizer(net):
    return torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.0)  # momentum correction holds the momentum


def _decay(net):
    return {n: 1e-3 if p.ndim > 1 else 0.0 for n, p in net.named_parameters()}


def _state(net, losses):
    return [p.detach().clone() for p in net.parameters()], [b.clone() for b in net.buffers()], losses


def _real_rank(rank, world_size, broadcast_buffers):
    from hydrahead.distributed.collectives import average_buffers

    net = _net()
    ddp = DDP(net, bucket_cap_mb=0.002, broadcast_buffers=broadcast_buffers)  # several buckets
    _, topk = register(ddp, None, TOPK, {p: n for n, p in net.named_parameters()}, weight_decay=_decay(net), seed=5)
    optimizer, losses = _optimizer(net), []
    for step in range(1, STEPS + 1):
        x, y = _global_batch(step, world_size)
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        topk.step = step
        loss = _loss(ddp(x[mine]), y[mine], world_size)
        loss.backward()
        topk.commit()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total))
    if not broadcast_buffers:
        average_buffers(net)
    return _state(net, losses)


def _simulated(workers, broadcast_buffers, exchange=True):
    net = _net()
    names = {p: n for n, p in net.named_parameters()}
    counters = CommCounters()
    exchanges = [make_topk(TOPK, names, counters, weight_decay=_decay(net), seed=5, worker=w) for w in range(workers)]
    simulated = SimulatedWorkers(
        net, workers, counters=counters, exchanges=exchanges if exchange else None, broadcast_buffers=broadcast_buffers
    )
    optimizer, losses = _optimizer(net), []
    for step in range(1, STEPS + 1):
        x, y = _global_batch(step, workers)
        for topk in exchanges:
            topk.step = step
        outputs = simulated.forward(x)
        features = outputs.detach().requires_grad_()
        loss = _loss(features, y, workers)
        loss.backward()
        simulated.backward(features.grad)
        for topk in exchanges:
            topk.commit()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    simulated.settle_buffers()
    return _state(net, losses)


def _same(a, b, tol=1e-10):
    return len(a) == len(b) and all(
        float((x - y).abs().max()) <= tol * (1 + float(y.abs().max())) for x, y in zip(a, b)
    )


@pytest.mark.parametrize("workers, broadcast_buffers", [(2, True), (3, True), (2, False)])
def test_simulated_workers_equal_real_ranks(workers, broadcast_buffers):
    params, buffers, losses = run_ranks(_real_rank, workers, broadcast_buffers)[0]
    sim_params, sim_buffers, sim_losses = _simulated(workers, broadcast_buffers)
    assert _same(sim_params, params) and _same(sim_buffers, buffers)
    assert sim_losses == pytest.approx(losses, rel=1e-12)
    # the workers' own residuals and statistics matter: one worker over the whole batch differs
    one_params, one_buffers, _ = _simulated(1, broadcast_buffers)
    assert not _same(one_params, params, 1e-3) and not _same(one_buffers, buffers, 1e-3)


def test_simulated_plain_sum_is_the_gradient_of_the_whole_batch():
    """``none``: summing the workers' gradients is the global batch's gradient; only the
    BatchNorm statistics (per micro-batch) tell the simulation from one big batch."""
    net = _net().eval()  # running statistics: no batch dependence at all
    x, y = _global_batch(1, 3)
    counters = CommCounters()
    simulated = SimulatedWorkers(net, 3, counters=counters)
    out = simulated.forward(x)
    grad = torch.autograd.grad(_loss(out, y, 3), out)[0]
    simulated.backward(grad)
    sim = [p.grad.clone() for p in net.parameters()]
    whole = torch.autograd.grad(_loss(net(x), y, 3), list(net.parameters()))
    assert _same(sim, list(whole), 1e-12)
    assert counters.take()["bytes_backbone_allreduce"] == 8 * sum(p.numel() for p in net.parameters())


def test_simulate_workers_is_checked():
    with pytest.raises(ConfigError, match="simulates the workers inside one rank"):
        validate(load_config(None, ["comm.simulate_workers=2"]), world_size=2)
    with pytest.raises(ConfigError, match="powersgd"):
        validate(load_config(None, ["comm.simulate_workers=2", "comm.grad_compression=powersgd"]), world_size=1)
    with pytest.raises(ConfigError, match="not divisible by comm.simulate_workers"):
        validate(load_config(None, ["comm.simulate_workers=3", "train.global_batch=256"]), world_size=1)


def test_one_rank_simulating_two_trains_like_two_ranks_and_hands_over_its_checkpoint(tmp_path):
    """The trainer end to end: ResNet-18 (BatchNorm) with sampled, momentum-corrected top-k;
    a run on 1 rank simulating 2 workers equals one on 2 ranks, and its checkpoint (one
    residual set per worker) resumes on 2 real ranks as if it had been theirs."""
    run = [
        "model.backbone=resnet18",
        "data.kind=procedural_images",
        "data.image_size=8",
        "train.steps=4",
        "train.eval_every=0",
        "checkpoint.every=2",
        "comm.grad_compression=topk",
        "comm.topk_density=0.01",
        "comm.topk_warmup_steps=2",
        "comm.topk_min_numel=64",
        "comm.topk_select=sampled",
        "comm.topk_momentum_correction=true",
        "comm.topk_dense=[conv1.weight]",
        # per-rank statistics, averaged into checkpoints: the saved buffers do not depend on
        # which rank's copy the checkpoint happens to keep
        "model.broadcast_buffers=false",
    ]
    real, simulated, handed = tmp_path / "real", tmp_path / "simulated", tmp_path / "handed"
    launch_together(
        (real, 2, *run),
        (simulated, 1, *run, "comm.simulate_workers=2"),
        (handed, 1, *run, "comm.simulate_workers=2", "train.stop_after=2"),
    )
    expected = train_losses(real)
    assert train_losses(simulated) == pytest.approx(expected, rel=1e-5)
    mine, theirs = saved_backbone(latest_checkpoint(simulated)), saved_backbone(latest_checkpoint(real))
    assert mine.keys() == theirs.keys()
    # The head is split over 1 or 2 shards, so the gradients differ by rounding, and an entry
    # at a top-k boundary can be sent by one run and kept by the other: those few entries
    # differ (by up to a whole update), every other one agrees to rounding.
    differ, total = 0, 0
    for name, value in theirs.items():
        diff = (mine[name].double() - value.double()).abs()
        differ += int((diff > 1e-5 * (1 + value.double().abs())).sum())
        total += value.numel()
    assert differ <= 1e-4 * total, f"{differ} of {total} entries differ"
    proc = launch(handed, 2, *run)
    assert "summed" not in proc.stderr  # each rank took its own worker's residuals
    resumed = train_losses(handed)
    assert [resumed[s] for s in (3, 4)] == pytest.approx([expected[3], expected[4]], rel=1e-5)


def test_per_worker_statistics_start_from_a_loaded_checkpoint():
    net = _net()
    simulated = SimulatedWorkers(net, 2, counters=CommCounters(), broadcast_buffers=False)
    loaded = {name: value + 1.0 if name.endswith("running_mean") else value for name, value in net.state_dict().items()}
    net.load_state_dict(loaded)  # a resume, before the first step
    x, _ = _global_batch(1, 2)
    simulated.forward(x)
    simulated.settle_buffers()
    # each worker moved the loaded statistics towards its own half's mean; then they were averaged
    momentum, means = net[1].momentum, []
    for half in x.chunk(2):
        batch_mean = nn.functional.conv2d(half, net[0].weight, net[0].bias, padding=1).mean(dim=(0, 2, 3))
        means.append((1 - momentum) * loaded["1.running_mean"] + momentum * batch_mean)
    assert torch.allclose(net[1].running_mean, torch.stack(means).mean(0), atol=1e-12)

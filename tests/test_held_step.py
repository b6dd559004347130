"""A bad loss's in-place step held back on the device (``SGDUpdate.skip``).

The fused loss writes its verdict (a loss that is not finite, or merge checks that fail) in
its forward, and the gemm and filtered paths' update reads it there: the rows, their buffer
and compensation keep every bit, with no host read between the forward and the backward.
Checked at each level: the update pass alone, the loss's backward on each path, a replayed
step, several ranks, the head and the trainer's one read.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hydrahead.distributed.sharded_softmax import MergeChecks
from hydrahead.kernels import SGDUpdate, triton_sharded_cross_entropy
from hydrahead.kernels.filtered import apply_sgd, apply_sgd_rows
from hydrahead.kernels.fused_loss import step_gated
from hydrahead.kernels.shard_ce import check_update

BATCH, DIM, NUM_CLASSES = 23, 32, 300  # 18 valid rows x 300: more entries than a filter first lists


def _rows(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(NUM_CLASSES, DIM, generator=gen) * 0.3).to(dtype)
    buffer = torch.randn(NUM_CLASSES, DIM, generator=gen) * 0.01
    return weight, buffer


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers: NaNs compare equal, -0.0 and 0.0 do not."""
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


def _flag(value: int) -> torch.Tensor:
    return torch.full((), value, dtype=torch.int32)


# ----------------------------------------------------------------------------------------
# The update pass
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["fp32", "bf16 stochastic with compensation"])
@pytest.mark.parametrize("dense", [True, False])
def test_the_update_pass_writes_nothing_when_held_back(storage, dense):
    """skip = 1: rows, buffer and compensation keep every bit, even with a NaN gradient;
    skip = 0: the same step as no flag at all."""
    low = storage != "fp32"
    weight, buffer = _rows(torch.bfloat16 if low else torch.float32)
    compensation = torch.zeros_like(weight) if low else None
    grad = torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(1))
    grad[13, 5] = float("nan")  # a row both the dense (10 to 60) and the sparse step take

    def step(skip):
        w, b = weight.clone(), buffer.clone()
        comp = compensation.clone() if low else None
        update = SGDUpdate(
            torch.full((1,), 0.1), 0.9, 5e-4, b, rounding="stochastic" if low else "nearest", seed=3,
            step=torch.full((1,), 4, dtype=torch.int64), compensation=comp, skip=skip,
        )  # fmt: skip
        if dense:
            apply_sgd_rows(w, grad[10:60], update, 10)
        else:
            touched = torch.tensor([2, 13, 40, 299])
            apply_sgd(w, touched, grad[touched], update)
        return w, b, comp

    held = step(_flag(1))
    assert torch.equal(_bits(held[0]), _bits(weight)) and torch.equal(_bits(held[1]), _bits(buffer))
    if low:
        assert torch.equal(_bits(held[2]), _bits(compensation))
    landed, plain = step(_flag(0)), step(None)
    for a, b in zip(landed, plain):
        if a is not None:
            assert torch.equal(_bits(a), _bits(b))
    assert not torch.equal(landed[1], buffer)  # the step moved the buffer
    assert bool(torch.isnan(landed[1]).any())  # and took the NaN: only the flag kept it out


def test_a_skip_flag_of_the_wrong_kind_is_refused():
    weight, buffer = _rows()
    for bad in (torch.zeros(2, dtype=torch.int32), torch.zeros((), dtype=torch.int64), 1):
        with pytest.raises(ValueError, match="SGDUpdate.skip must be one int32 value"):
            check_update(weight, SGDUpdate(0.1, 0.9, 0.0, buffer, skip=bad), device_scalars=True)
    with pytest.raises(ValueError, match="stationary kernels cannot hold a step back"):
        check_update(weight, SGDUpdate(0.1, 0.9, 0.0, buffer, skip=_flag(0)))


def test_a_caller_does_not_set_the_loss_verdict():
    weight, buffer = _rows()
    features = torch.randn(BATCH, DIM, requires_grad=True)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,))
    with pytest.raises(ValueError, match="the loss's own verdict"):
        update = SGDUpdate(0.1, 0.9, 0.0, buffer, skip=_flag(0))
        triton_sharded_cross_entropy(features, weight, labels, 0, update=update)


# ----------------------------------------------------------------------------------------
# The loss's backward
# ----------------------------------------------------------------------------------------

PATHS = {
    "gemm": dict(exact_kernels="gemm"),
    "gemm, cosface": dict(exact_kernels="gemm", scale=16.0, margin=0.2, margin_type="cosface"),
    "filtered": dict(grad_filter=1e-3),
    "filtered, falls back to the gemm step": dict(grad_filter=1e-30),
    "filtered, falls back to the stationary step": dict(grad_filter=1e-30, exact_kernels="stationary"),
}
FEW_ENTRIES = "10"  # HYDRAHEAD_FILTER_MAX_ENTRIES for the paths that fall back


def _batch(seed: int, num_rows: int = BATCH):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(num_rows, DIM, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (num_rows,), generator=gen)
    labels[::5] = -100
    return features, labels


def _step(weight, buffer, features, labels, options, *, checks=None, num_classes=None):
    """One loss and backward with the SGD step in place; (loss, dF, the warnings it gave)."""
    f = features.clone().requires_grad_()
    update = SGDUpdate(0.1, 0.9, 5e-4, buffer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = triton_sharded_cross_entropy(
            f, weight, labels, 0, update=update, checks=checks, num_classes=num_classes, **options
        )
        loss.backward()
    return loss.detach(), f.grad, [str(w.message) for w in caught]


@pytest.mark.parametrize("path", list(PATHS))
def test_a_nan_loss_leaves_the_rows_as_they_were(path, monkeypatch):
    """A NaN in one feature row makes the loss NaN: its backward leaves W and the buffer
    bit for bit; the next, sound step lands as it would have without the bad one."""
    options = PATHS[path]
    if "falls back" in path:
        monkeypatch.setenv("HYDRAHEAD_FILTER_MAX_ENTRIES", FEW_ENTRIES)
    weight, buffer = _rows()
    features, labels = _batch(0)
    bad = features.clone()
    bad[4, 7] = float("nan")
    loss, *_ = _step(weight, buffer, bad, labels, options)
    assert torch.isnan(loss)
    fresh_weight, fresh_buffer = _rows()
    assert torch.equal(weight, fresh_weight) and torch.equal(buffer, fresh_buffer)

    *_, said = _step(weight, buffer, features, labels, options)
    _step(fresh_weight, fresh_buffer, features, labels, options)
    assert any("ran the exact kernels instead" in text for text in said) == ("falls back" in path), said
    assert torch.equal(weight, fresh_weight) and torch.equal(buffer, fresh_buffer)
    assert not torch.equal(weight, _rows()[0])  # the sound step moved the rows


@pytest.mark.parametrize("path", ["gemm", "gemm, cosface", "filtered"])
def test_a_nan_in_an_ignored_row_holds_the_step_too(path):
    """An ignored row adds nothing to the loss, which stays finite, but a NaN there would
    still make its P, and through it all of dW, NaN: the verdict holds the step."""
    weight, buffer = _rows()
    features, labels = _batch(2)
    assert int(labels[0]) == -100
    features[0, 3] = float("nan")
    loss, grad, _ = _step(weight, buffer, features, labels, PATHS[path])
    assert torch.isfinite(loss)
    assert torch.equal(weight, _rows()[0]) and torch.equal(buffer, _rows()[1])


@pytest.mark.parametrize("path", ["gemm", "filtered"])
def test_failed_checks_hold_the_step_until_they_are_read(path):
    """A label no shard owns, with the checks left to the caller: no host read in the loss,
    the rows keep every bit after the backward, and the read then raises."""
    weight, buffer = _rows()
    features, labels = _batch(1)
    labels[2] = NUM_CLASSES + 3  # beyond every shard
    checks = MergeChecks()
    loss, *_ = _step(weight, buffer, features, labels, PATHS[path], checks=checks, num_classes=NUM_CLASSES)
    assert torch.isfinite(loss)
    assert torch.equal(weight, _rows()[0]) and torch.equal(buffer, _rows()[1])
    with pytest.raises(ValueError, match="belong to no shard"):
        checks.raise_if_failed(checks.values(loss.device).tolist())


def test_the_gated_paths_are_named():
    weight, _ = _rows()
    assert step_gated(weight, BATCH, 0.0, "gemm") and step_gated(weight, BATCH, 1e-3, "stationary")
    assert not step_gated(weight, BATCH, 0.0, "stationary")
    fp8 = weight.to(torch.float8_e4m3fn)
    assert step_gated(fp8, 4096, 0.0, "auto") and not step_gated(fp8, 8, 0.0, "auto")  # auto: stationary below 32 rows


# ----------------------------------------------------------------------------------------
# A replayed step, several ranks
# ----------------------------------------------------------------------------------------


def test_a_replayed_nan_step_leaves_the_rows_and_the_next_replay_lands():
    from test_graphed import Recorded

    graphs = Recorded()
    weight, buffer = _rows()
    twin_weight, twin_buffer = _rows()
    for step in range(5):
        features, labels = _batch(10 + step)
        bad = step == 3  # a replay (the first call is eager, the second captures)
        if bad:
            features[1, 0] = float("nan")  # a valid row (every fifth is ignored)
        for w, b, g in ((weight, buffer, graphs), (twin_weight, twin_buffer, None)):
            if bad and g is None:
                continue  # the twin never sees the bad batch
            f = features.clone().requires_grad_()
            checks = MergeChecks()
            loss = triton_sharded_cross_entropy(
                f, w, labels, 0, update=SGDUpdate(0.1, 0.9, 0.0, b), checks=checks, graphs=g, exact_kernels="gemm"
            )
            loss.backward()
            assert bool(torch.isnan(loss)) == bad
        assert torch.equal(weight, twin_weight) and torch.equal(buffer, twin_buffer)
    assert graphs.replays == 4


def _gated_rank(rank, world, label_sets):
    """Each batch's step on this rank's shard: whether its rows kept every bit."""
    import torch.distributed as dist

    shard = NUM_CLASSES // world
    kept = []
    for labels, nan in label_sets:
        weight, buffer = _rows(seed=rank)
        rows, rows_buffer = weight[:shard].clone(), buffer[:shard].clone()
        before = rows.clone()
        features, _ = _batch(3)  # the global batch: the same on every rank
        if nan:
            features[6, 1] = float("nan")
        f = features.requires_grad_()
        checks = MergeChecks()
        loss = triton_sharded_cross_entropy(
            f, rows, labels, rank * shard, group=dist.group.WORLD, num_classes=shard * world,
            update=SGDUpdate(0.1, 0.9, 0.0, rows_buffer), checks=checks, exact_kernels="gemm",
        )  # fmt: skip
        loss.backward()
        kept.append(bool(torch.equal(rows, before)))
    return kept


def test_every_rank_holds_its_step_on_the_merged_verdict():
    """Two gloo ranks: a label no shard owns (every rank's labels are the global batch's)
    or a NaN feature holds both ranks' steps, though only one rank sees the row's class
    range or the row itself matters to its shard; a sound batch moves both."""
    from dist_harness import run_ranks

    _, labels = _batch(3)
    stray = labels.clone()
    stray[1] = NUM_CLASSES + 5
    results = run_ranks(_gated_rank, 2, [(stray, False), (labels, True), (labels, False)])
    assert results == [[True, True, False], [True, True, False]]


def test_dataclass_replace_keeps_the_verdict_out_of_the_caller_update():
    """The loss gates a copy of the caller's update: the caller's object keeps skip None, so
    the next step's call is not refused."""
    weight, buffer = _rows()
    update = SGDUpdate(0.1, 0.9, 0.0, buffer)
    for seed in range(2):
        features, labels = _batch(seed)
        f = features.requires_grad_()
        triton_sharded_cross_entropy(f, weight, labels, 0, update=update, exact_kernels="gemm").backward()
        assert update.skip is None


# ----------------------------------------------------------------------------------------
# The trainer: no read between the head's forward and its backward
# ----------------------------------------------------------------------------------------


def _trainer_steps(rank, world, root, exact_kernels):
    import os

    from launcher import TINY

    from hydrahead.config import load_config
    from hydrahead.data.build import batches
    from hydrahead.train.faults import fault_plan_from_env
    from hydrahead.train.trainer import DistEnv, Trainer

    os.environ["HYDRAHEAD_INJECT_FAULT"] = "nan_loss@1"
    overrides = [f"run.dir={root}", *TINY, "head.impl=triton", "head.weight_dtype=fp32", "train.nonfinite=skip"]
    overrides.append("optim.warmup_steps=0")  # a first step with a learning rate
    cfg = load_config(None, [*overrides, f"head.exact_kernels={exact_kernels}"])
    trainer = Trainer(cfg, DistEnv(rank, world, rank, torch.device("cpu"), "gloo", None, None))
    judged_later = []
    head_step = trainer._head_step
    trainer._head_step = lambda *args: (lambda out: judged_later.append(out[3] is not None) or out)(head_step(*args))
    data = batches(trainer.train_data, start_step=0, global_batch=cfg.train.global_batch, rank=rank, world_size=world)
    rows = []
    for _ in range(2):
        trainer._set_learning_rates()
        before = trainer.head.weight.detach().clone()
        result = trainer.train_step(*next(data), timed=False)
        rows.append((result["nonfinite"], bool(torch.equal(trainer.head.weight.detach(), before))))
        os.environ.pop("HYDRAHEAD_INJECT_FAULT", None)  # the second step is sound
        trainer.faults = fault_plan_from_env()
    data.close()
    trainer.selector.close()
    return rows, judged_later


@pytest.mark.parametrize("exact_kernels", ["gemm", "stationary"])
def test_the_trainer_leaves_a_gated_step_to_its_one_read(tmp_path, exact_kernels):
    """Two ranks, fused head: a NaN loss is skipped with the rows as they were, and a sound
    step lands. On the gemm kernels the loss and its checks wait for the step's one read
    (no read between forward and backward); the stationary kernels are judged first."""
    from dist_harness import run_ranks

    for rows, judged_later in run_ranks(_trainer_steps, 2, str(tmp_path), exact_kernels):
        assert rows == [("loss", True), ("", False)]
        assert judged_later == [exact_kernels == "gemm"] * 2

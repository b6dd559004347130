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
    head = ShardedClassifier(
        NUM_CLASSES, DIM, seed=3, init_std=0.5, dtype=dtype, impl=impl, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
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


@pytest.mark.parametrize("impl, dtype", [("reference", torch.float64), ("triton", torch.float32)])
def test_unchecked_active_rows_missing_a_label_still_fail_in_the_loss(impl, dtype):
    """check_rows=False (the selector's rows, no host read) skips remap's check; a missing
    owned label must then surface through the loss's merge check, never as a silent loss."""
    features, labels, _, _ = problem(2)
    head = make_head(impl, dtype)
    positives = torch.unique(labels[labels >= 0])
    before = head.weight.detach().clone()
    with pytest.raises(ValueError, match="active rows needs every owned label"):
        head.loss(features, labels, positives[1:], check_rows=False)
    assert torch.equal(head.weight, before)
    head.loss(features, labels, positives, check_rows=False)  # the failed loss left no step pending


def _sgd_over_active_rows(
    impl, inactive_rows, momentum, weight_decay, steps=12, seed=4, settle=True, settle_every=None
):
    """The head over random active sets for ``steps`` steps, beside torch.optim.SGD on a dense
    copy whose gradient is zero outside the active rows (float64; LR changes every step).
    The head settles its deferred steps at the end unless ``settle`` is False."""
    from hydrahead.head import sharded_cross_entropy

    dtype = torch.float64 if impl == "reference" else torch.float32
    gen = torch.Generator().manual_seed(seed)
    head = ShardedClassifier(
        NUM_CLASSES,
        DIM,
        seed=3,
        init_std=0.5,
        dtype=dtype,
        impl=impl,
        momentum=momentum,
        weight_decay=weight_decay,
        momentum_dtype=dtype,
        inactive_rows=inactive_rows,
        settle_every=settle_every,
    )
    dense = head.weight.detach().double().clone().requires_grad_()
    optimizer = torch.optim.SGD([dense], lr=LR, momentum=momentum, weight_decay=weight_decay)
    never = 7  # rows 0..7 are never active: only the deferred steps move them
    for step in range(steps):
        lr = LR * (1 + step % 3) / 3
        head.set_lr(lr)
        optimizer.param_groups[0]["lr"] = lr
        features = torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64)
        labels = torch.randint(8, NUM_CLASSES, (BATCH,), generator=gen)
        rows = torch.unique(torch.cat([labels, torch.randint(8, NUM_CLASSES, (10,), generator=gen)]))
        loss = head.loss(features.to(dtype).requires_grad_(), labels, rows)
        loss.backward()
        head.finish_step()
        reference = sharded_cross_entropy(features, dense[rows], torch.searchsorted(rows, labels), 0)
        optimizer.zero_grad()
        reference.backward()
        if inactive_rows == "frozen":  # only the active rows take the step
            kept = dense.detach().clone()
            state = optimizer.state[dense]
            kept_buffer = state["momentum_buffer"].clone() if "momentum_buffer" in state else torch.zeros_like(kept)
        optimizer.step()
        if inactive_rows == "frozen":
            inactive = torch.ones(NUM_CLASSES, dtype=torch.bool)
            inactive[rows] = False
            with torch.no_grad():
                dense[inactive] = kept[inactive]
                if momentum:
                    optimizer.state[dense]["momentum_buffer"][inactive] = kept_buffer[inactive]
        assert float(loss) == pytest.approx(float(reference), rel=1e-12 if impl == "reference" else 1e-5)
    if inactive_rows == "continue" and settle_every is None:
        assert head._deferred.owing and int(head._deferred.row_updates[never]) == 0  # row 7 still owes every step
    if settle:
        head.settle()
    buffer = optimizer.state[dense]["momentum_buffer"] if momentum else None
    return head, dense.detach(), buffer


@pytest.mark.parametrize(
    "momentum, weight_decay, settle_every", [(0.9, 0.0, None), (0.0, 1e-2, None), (0.9, 1e-2, None), (0.9, 1e-2, 5)]
)
def test_inactive_rows_continue_as_full_sgd_with_zero_gradients(momentum, weight_decay, settle_every):
    head, weight, buffer = _sgd_over_active_rows(
        "reference", "continue", momentum, weight_decay, settle_every=settle_every
    )
    assert head.settles == (3 if settle_every else 1)  # after steps 5 and 10, and the final one
    assert torch.allclose(head.weight.detach(), weight, rtol=0, atol=1e-12)
    if momentum:
        assert torch.allclose(head.momentum_buffer, buffer, rtol=0, atol=1e-12)
    assert not head._deferred.owing


@pytest.mark.parametrize("momentum, weight_decay, chunk_rows", [(0.9, 0.0, 1 << 18), (0.9, 1e-2, 5), (0.0, 1e-2, 7)])
def test_rows_as_the_loss_reads_them_are_full_sgds_and_leave_the_debts_owed(
    momentum, weight_decay, chunk_rows, monkeypatch
):
    """What the search of head.search_paid_rows reads: every row with its owed steps paid
    (torch.optim.SGD's rows), while the stored rows and their debts stay as they were."""
    from hydrahead.optim import deferred_sgd

    monkeypatch.setattr(deferred_sgd, "_SETTLE_ROWS", chunk_rows)  # several chunks of rows, or one
    head, weight, _ = _sgd_over_active_rows("reference", "continue", momentum, weight_decay, settle=False)
    stored, last_current = head.weight.detach().clone(), head._deferred.row_updates.clone()
    assert not torch.allclose(stored, weight, rtol=0, atol=1e-6)  # the stored rows lag behind SGD's
    paid = head.rows_as_the_loss_reads_them()
    assert paid.dtype == torch.float64 and torch.allclose(paid, weight, rtol=0, atol=1e-12)
    assert torch.equal(head.weight.detach(), stored) and torch.equal(head._deferred.row_updates, last_current)
    head.settle()
    assert torch.equal(head.rows_as_the_loss_reads_them(), head.weight.detach())  # nothing owed: the rows as stored


def test_inactive_rows_continue_with_the_fused_kernels():
    head, weight, buffer = _sgd_over_active_rows("triton", "continue", 0.9, 1e-2, steps=4)
    assert torch.allclose(head.weight.detach().double(), weight, rtol=0, atol=1e-5)
    assert torch.allclose(head.momentum_buffer.double(), buffer, rtol=0, atol=1e-5)


def test_frozen_rows_keep_weight_and_momentum():
    head, weight, buffer = _sgd_over_active_rows("reference", "frozen", 0.9, 1e-2)
    assert head._deferred is None
    assert torch.allclose(head.weight.detach(), weight, rtol=0, atol=1e-12)
    assert torch.allclose(head.momentum_buffer, buffer, rtol=0, atol=1e-12)


@pytest.mark.parametrize("settle_every", [None, 3])
def test_deferred_steps_are_settled_every_settle_every_steps(settle_every):
    """head.settle_every: every row pays its debt at least that often (by default at the
    table's max_lag, 4,096 steps), and the head counts its settles."""
    head = ShardedClassifier(
        NUM_CLASSES, DIM, seed=3, init_std=0.5, dtype=torch.float64, momentum=MOMENTUM, settle_every=settle_every
    )
    head.set_lr(LR)
    head.momentum_buffer.normal_()
    rows = labels = torch.arange(10, 20)
    lags = []
    for _ in range(7):
        head.loss(torch.randn(10, DIM, dtype=torch.float64), labels, rows).backward()
        head.finish_step()
        lags.append(head._deferred.updates - head._deferred.oldest)
    if settle_every is None:
        assert lags == [1, 2, 3, 4, 5, 6, 7] and head.settles == 0
    else:
        assert lags == [1, 2, 0, 1, 2, 0, 1] and head.settles == 2
    from hydrahead.config import load_config, validate
    from hydrahead.optim.deferred_sgd import MAX_LAG

    with pytest.raises(ValueError, match="settle_every"):
        ShardedClassifier(NUM_CLASSES, DIM, momentum=MOMENTUM, settle_every=MAX_LAG + 1)
    validate(load_config(None, [f"head.settle_every={MAX_LAG}"]))  # the config's limit is the table's


def _train_rows(head, gen, steps):
    for _ in range(steps):
        rows = torch.unique(torch.randint(0, NUM_CLASSES, (12,), generator=gen))
        head.set_lr(LR * float(torch.rand((), generator=gen)))
        head.loss(torch.randn(len(rows), DIM, generator=gen), rows, rows).backward()
        head.finish_step()


def test_a_head_loaded_with_its_deferred_steps_continues_bit_for_bit():
    """What a checkpoint carries (rows as stored, what each owes) puts a fresh head on the
    same trajectory, to the last bit: it owes, catches up and settles (settle_every) as the
    original does. Paying the debts at the save instead would round differently."""
    gen = torch.Generator().manual_seed(0)
    head = make_head("reference", torch.float32)
    _train_rows(head, gen, 3)
    head._deferred.settle_every = 6
    _train_rows(head, gen, 2)
    saved = {
        "weight": head.weight.detach().clone(),
        "momentum": head.momentum_buffer.clone(),
        **{k: v.clone() for k, v in head.deferred_state().items()},
    }
    assert head._deferred.owing and int(saved["owed_steps"].max()) == 5 and int(saved["since_settled"]) == 5

    resumed = make_head("reference", torch.float32)
    resumed.weight.data.copy_(saved["weight"])
    resumed.momentum_buffer.copy_(saved["momentum"])
    resumed.load_deferred_state({k: saved[k] for k in ("owed_steps", "maps", "since_settled")})
    resumed._deferred.settle_every = 6
    settled_early = make_head("reference", torch.float32)  # the old save: debts paid when saving
    settled_early.load_state_dict(resumed.state_dict())
    settled_early.momentum_buffer.copy_(saved["momentum"])
    settled_early.load_deferred_state({k: saved[k] for k in ("owed_steps", "maps", "since_settled")})
    settled_early.settle()

    state = gen.get_state()
    _train_rows(head, gen, 4)  # the settle falls inside these steps
    for other in (resumed, settled_early):
        gen.set_state(state)
        _train_rows(other, gen, 4)
    assert head.settles == resumed.settles == 1 and head._deferred.owing == resumed._deferred.owing
    assert torch.equal(resumed.weight, head.weight) and torch.equal(resumed.momentum_buffer, head.momentum_buffer)
    assert torch.equal(
        resumed._deferred.row_updates - resumed._deferred.updates, head._deferred.row_updates - head._deferred.updates
    )
    assert not torch.equal(settled_early.weight, head.weight)  # so the test can tell


def test_a_loaded_debt_is_paid_at_once_by_a_head_that_defers_nothing():
    gen = torch.Generator().manual_seed(1)
    head = make_head("reference", torch.float64)
    _train_rows(head, gen, 3)
    debt = head.deferred_state()
    frozen = ShardedClassifier(
        NUM_CLASSES,
        DIM,
        seed=3,
        dtype=torch.float64,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        inactive_rows="frozen",
    )
    frozen.weight.data.copy_(head.weight.detach())
    frozen.momentum_buffer.copy_(head.momentum_buffer)
    frozen.load_deferred_state(debt)
    head.settle()
    assert not frozen._deferred.owing
    assert torch.equal(frozen.weight, head.weight) and torch.equal(frozen.momentum_buffer, head.momentum_buffer)


@pytest.mark.parametrize("settle_by", ["predict", "full loss"])
def test_full_loss_and_predict_settle_first(settle_by):
    head = make_head("reference", torch.float64)
    head.momentum_buffer = torch.randn_like(head.momentum_buffer, dtype=torch.float64)
    w0, b0 = head.weight.detach()[50].clone(), head.momentum_buffer[50].clone()
    rows = torch.tensor([1, 2, 3, 4])
    head.loss(torch.randn(4, DIM, dtype=torch.float64), rows, rows).backward()
    head.finish_step()
    assert torch.equal(head.weight.detach()[50], w0) and head._deferred.owing  # owed, not yet applied
    if settle_by == "predict":
        head.predict(torch.randn(2, DIM, dtype=torch.float64))
    else:
        head.loss(torch.randn(2, DIM, dtype=torch.float64), torch.tensor([0, 1]))
    # One zero-gradient SGD step: b = mu b0 + wd w0, w = w0 - lr b.
    b1 = MOMENTUM * b0 + WEIGHT_DECAY * w0
    assert torch.allclose(head.momentum_buffer[50], b1, rtol=0, atol=1e-14)
    assert torch.allclose(head.weight.detach()[50], w0 - LR * b1, rtol=0, atol=1e-14)
    assert not head._deferred.owing


def _step(impl, dtype, rows, *, checks=None, features=None, grad=2.5):
    """One step of a fresh head over ``rows``: (loss, weight, momentum, the head); the loss's
    incoming gradient is ``grad`` (the fused kernels read it from device memory)."""
    features_in, labels, _, buffer = problem(2)
    features = features_in if features is None else features
    head = make_head(impl, dtype)
    head.momentum_buffer.copy_(buffer.to(dtype))
    loss = head.loss(features.to(dtype).requires_grad_(), labels, rows, check_rows=False, checks=checks)
    (loss * grad).backward()
    return loss.detach(), head


@pytest.mark.parametrize("impl, dtype, tol", [("reference", torch.float64, 1e-12), ("triton", torch.float32, 1e-5)])
def test_deferred_checks_take_the_same_step_and_raise_when_read(impl, dtype, tol):
    """A loss given a MergeChecks reads nothing back: its loss and update equal the checked
    loss's (float64 reference impl), and a missing owned label raises from the values read
    later, with the step still dropped by finish_step(skip=True)."""
    from hydrahead.distributed.sharded_softmax import MergeChecks

    _, labels, _, _ = problem(2)
    positives = torch.unique(labels[labels >= 0])
    rows = torch.unique(torch.cat([positives, torch.arange(0, NUM_CLASSES, 3)]))
    want_loss, want = _step("reference", torch.float64, rows)
    want.finish_step()
    checks = MergeChecks()
    loss, head = _step(impl, dtype, rows, checks=checks)
    values = checks.values(loss.device)
    assert values.shape == (MergeChecks.WIDTH,) and values[2] == (labels >= 0).sum()
    checks.raise_if_failed(values.tolist())
    head.finish_step()
    assert float(loss) == pytest.approx(float(want_loss), rel=tol)
    assert torch.allclose(head.weight.double(), want.weight, rtol=0, atol=tol)
    assert torch.allclose(head.momentum_buffer.double(), want.momentum_buffer.double(), rtol=0, atol=tol)

    checks = MergeChecks()
    _, head = _step(impl, dtype, positives[1:], checks=checks)  # no error yet: nothing was read
    before = make_head(impl, dtype).weight.detach()
    assert head.step_discardable
    values = checks.values(head.weight.device).tolist()
    replayed = checks.again()  # a CUDA graph's replay reads the same checks anew
    with pytest.raises(ValueError, match="active rows needs every owned label"):
        checks.raise_if_failed(values)
    with pytest.raises(ValueError, match="active rows needs every owned label"):
        replayed.raise_if_failed(values)
    with pytest.raises(ValueError, match="expected 0 values for 0 loss"):
        checks.raise_if_failed(values)  # consumed by the first read
    head.finish_step(skip=True)
    assert torch.equal(head.weight.detach(), before)
    with pytest.raises(ValueError, match="expected 0 values for 0 loss"):
        MergeChecks().raise_if_failed([0.0, 1.0, 1.0])


@pytest.mark.parametrize("impl, dtype", [("reference", torch.float64), ("triton", torch.float32)])
def test_a_non_finite_loss_over_active_rows_can_still_be_dropped_after_its_backward(impl, dtype):
    """The trainer runs the backward before it has read whether the loss is finite (with
    active rows, or the reference impl); skipping the step must leave weight and momentum as
    they were. The fused kernels over the whole shard step it in place: not discardable."""
    from hydrahead.distributed.sharded_softmax import MergeChecks

    features, labels, _, buffer = problem(2)
    features = features.clone()
    features[3] = float("nan")
    rows = torch.unique(labels[labels >= 0])
    loss, head = _step(impl, dtype, rows, checks=MergeChecks(), features=features)
    assert not torch.isfinite(loss) and head.step_discardable
    head.finish_step(skip=True)
    assert torch.equal(head.weight.detach(), make_head(impl, dtype).weight.detach())
    assert torch.equal(head.momentum_buffer, buffer.to(head.momentum_buffer.dtype))
    whole = make_head(impl, dtype)
    whole.loss(features.to(dtype), labels)
    assert whole.step_discardable == (impl == "reference")


@pytest.mark.parametrize("impl", ["reference", "triton", "triton-micro-batches"])
def test_a_bad_shard_with_deferred_checks_runs_the_step_through_and_raises_when_read(impl):
    """A rank whose shard fails the local checks learns it only through the collectives; with
    MergeChecks every rank raises at the read, so until then the bad rank must run the
    forward and backward like the others (no local math) instead of failing on its own."""
    from hydrahead.distributed.sharded_softmax import MergeChecks
    from hydrahead.head import sharded_cross_entropy
    from hydrahead.kernels import triton_sharded_cross_entropy
    from hydrahead.kernels.fused_loss import FusedMicroBatches

    features, labels, _, _ = problem(2)
    features = features.float().requires_grad_()
    bad_weight = torch.randn(NUM_CLASSES, DIM + 1)  # the wrong width
    checks = MergeChecks()
    if impl == "triton-micro-batches":
        engine = FusedMicroBatches(bad_weight, labels, 0)
        _, grad = engine.chunk(features.detach(), torch.arange(BATCH))
        assert torch.equal(grad, torch.zeros_like(features)) and engine.finish() is None
        engine.check(checks)
    else:
        loss_fn = sharded_cross_entropy if impl == "reference" else triton_sharded_cross_entropy
        loss = loss_fn(features, bad_weight, labels, 0, checks=checks)
        loss.backward()
        assert torch.equal(features.grad, torch.zeros_like(features))
    with pytest.raises(ValueError, match="weight_shard is not a 2-D floating tensor"):
        checks.raise_if_failed(checks.values(features.device).tolist())


def test_a_settle_leaves_the_rows_that_owe_nothing_as_stored():
    """bf16 rows, stochastic rounding, Kahan compensation: a settle (head.settle_every makes
    them frequent) stores the rows that owe steps and leaves the just-updated ones bit for bit,
    compensation included; storing them again would fold the compensation into a new rounding."""
    head = ShardedClassifier(
        NUM_CLASSES,
        DIM,
        seed=3,
        init_std=0.5,
        dtype=torch.bfloat16,
        momentum=MOMENTUM,
        rounding="stochastic",
        kahan_dtype=torch.bfloat16,
    )
    head.set_lr(LR)
    gen = torch.Generator().manual_seed(6)
    owing, current = torch.arange(0, 20), torch.arange(40, 60)  # active at the first step, at the second
    for step, rows in enumerate((owing, current), start=1):
        head.set_step(step)
        head.loss(torch.randn(rows.numel(), DIM, generator=gen), rows, rows).backward()
        head.finish_step()
    before = head.weight.detach().clone(), head.compensation.clone()
    head.settle()
    assert torch.equal(head.weight.detach()[current], before[0][current])
    assert torch.equal(head.compensation[current], before[1][current])
    assert not torch.equal(head.weight.detach()[owing], before[0][owing])  # they paid their step


def _owing_head(dtype, buffer_dtype=torch.float32, rounding="stochastic"):
    """A head whose rows owe one, two or no steps: active sets at three steps, momentum on."""
    head = ShardedClassifier(
        NUM_CLASSES,
        DIM,
        seed=4,
        init_std=0.5,
        dtype=dtype,
        momentum=MOMENTUM,
        weight_decay=1e-3,
        rounding=rounding,
        momentum_dtype=buffer_dtype,
    )
    head.set_lr(LR)
    gen = torch.Generator().manual_seed(7)
    for step, rows in enumerate((torch.arange(0, 30), torch.arange(20, 50), torch.arange(45, 60)), start=1):
        head.set_step(step)
        head.loss(torch.randn(rows.numel(), DIM, generator=gen), rows, rows).backward()
        head.finish_step()
    head.class_start = 37  # as a second shard's: the settle's draws are keyed by global class id
    return head


@pytest.mark.parametrize(
    "dtype, buffer_dtype, rounding",
    [
        (torch.float32, torch.float32, "nearest"),
        (torch.bfloat16, torch.float32, "stochastic"),
        (torch.bfloat16, torch.bfloat16, "nearest"),
        (torch.float8_e4m3fn, torch.float32, "stochastic"),
    ],
)
def test_a_settle_in_one_kernel_stores_what_the_torch_settle_stores(monkeypatch, dtype, buffer_dtype, rounding):
    """hydrahead.kernels.deferred (Triton's interpreter here): the same rows, buffer and
    rounding draws as the torch path, bit for bit, and the rows that owe nothing untouched."""
    from hydrahead.kernels import deferred as deferred_kernels

    calls, pay = [], deferred_kernels.pay_rows_in_place
    monkeypatch.setattr(deferred_kernels, "pay_rows_in_place", lambda *a, **kw: calls.append(1) or pay(*a, **kw))
    settled = {}
    for one_kernel in (False, True):
        head = _owing_head(dtype, buffer_dtype, rounding)
        monkeypatch.setattr(ShardedClassifier, "_pays_in_one_kernel", lambda self, on=one_kernel, **_: on)
        before = head.weight.detach().clone()
        owed = head._deferred.updates - head._deferred.row_updates
        head.settle()
        assert not head._deferred.owing and head.settles == 1
        assert len(calls) == int(one_kernel)  # the torch path, then the one pass
        settled[one_kernel] = (head.weight.detach().float(), head.momentum_buffer.float(), before, owed)
    (w_torch, b_torch, before, owed), (w_kernel, b_kernel, _, _) = settled[False], settled[True]
    assert int((owed > 0).sum()) > 0 and int((owed == 0).sum()) > 0
    assert torch.equal(w_kernel, w_torch) and torch.equal(b_kernel, b_torch)
    assert torch.equal(w_kernel[owed == 0], before.float()[owed == 0])
    assert not torch.equal(w_kernel[owed > 0], before.float()[owed > 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_paid_rows_in_one_kernel_equal_the_torch_paid_rows(dtype):
    from hydrahead.kernels.deferred import paid_copy

    head = _owing_head(dtype)
    deferred = head._deferred
    stored = head.weight.detach().clone(), head.momentum_buffer.clone()
    want = deferred.paid_rows(head.weight.detach(), head.momentum_buffer)  # the torch path on the CPU
    got = paid_copy(head.weight.detach(), head.momentum_buffer, deferred.row_updates, deferred.updates, deferred.table)
    assert got.dtype == dtype and torch.equal(got.float(), want.float())
    assert not torch.equal(got.float(), stored[0].float())  # something was owed and paid
    assert torch.equal(head.weight.detach().float(), stored[0].float()) and torch.equal(head.momentum_buffer, stored[1])


def test_the_head_pays_its_rows_for_a_search_in_one_kernel_as_on_the_torch_path(monkeypatch):
    from hydrahead.kernels import deferred as deferred_kernels

    head = _owing_head(torch.bfloat16)
    want = head.rows_as_the_loss_reads_them()  # the torch path on the CPU
    monkeypatch.setattr(ShardedClassifier, "_pays_in_one_kernel", lambda self, **_: True)
    calls, paid_copy = [], deferred_kernels.paid_copy
    monkeypatch.setattr(deferred_kernels, "paid_copy", lambda *a: calls.append(1) or paid_copy(*a))
    got = head.rows_as_the_loss_reads_them()
    assert calls == [1]  # the one pass made them
    assert torch.equal(got.float(), want.float()) and not torch.equal(got.float(), head.weight.detach().float())


def test_the_one_pass_payment_checks_its_tables_and_keeps_float32_rows_exact():
    from hydrahead.kernels.deferred import pay_rows_in_place
    from hydrahead.optim.deferred_sgd import pay_owed_steps
    from hydrahead.optim.low_precision import LowPrecisionUpdate

    head = _owing_head(torch.float32, rounding="nearest")
    deferred = head._deferred
    with pytest.raises(ValueError, match="row_updates"):
        pay_rows_in_place(head.weight.data, head.momentum_buffer, deferred.row_updates.long(), 3, deferred.table)
    with pytest.raises(ValueError, match="maps"):
        pay_rows_in_place(head.weight.data, head.momentum_buffer, deferred.row_updates, 3, deferred.table.float())
    head.weight.data.mul_(1e-33)  # far below float32's normals: a grid step of 2^-126 would round them
    owed = deferred.updates - deferred.row_updates
    want, _ = pay_owed_steps(head.weight.detach(), head.momentum_buffer, owed, deferred.table)
    how = LowPrecisionUpdate("stochastic", seed=1, step=3, salt=1)
    pay_rows_in_place(
        head.weight.data, head.momentum_buffer, deferred.row_updates, deferred.updates, deferred.table, how=how
    )
    assert torch.equal(head.weight.detach(), want)

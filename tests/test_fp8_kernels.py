"""FP8 shard kernels (e4m3 weights, fused update with stochastic rounding) against a torch
emulation of the same arithmetic, and against float64 within fp8's error.

On CPU the kernels run in Triton's interpreter; the emulation (fp8_emulation.py) rounds
at the kernels' rounding points, so the two agree to float32 summation order.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from dist_harness import run_ranks
from fp8_emulation import emulate_feature_gradient, emulate_forward, emulate_update, emulate_weight_gradient

from hydrahead.distributed.sharded_softmax import normalize_rows
from hydrahead.head import ShardedClassifier, sharded_cross_entropy
from hydrahead.kernels import SGDUpdate, triton_sharded_cross_entropy
from hydrahead.kernels.exact_gemm import _transposed_padded, chunk_classes, exact_backward
from hydrahead.kernels.filtered import shard_lse
from hydrahead.kernels.shard_ce import (
    feature_operand,
    forward_splits,
    inverse_row_norms,
    shard_forward,
    shard_weight_backward,
)
from hydrahead.kernels.tiles import descriptor_loads

FP8 = torch.float8_e4m3fn
DIM, NUM_CLASSES = 24, 101
MARGINS = {"none": (4.0, 0.0), "cosface": (16.0, 0.3)}


def make_problem(seed, batch, margin_type, dim=DIM):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, dim, generator=gen) * 3.0
    weight = (torch.randn(NUM_CLASSES, dim, generator=gen) * 0.5).to(FP8)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    labels[::5] = -1  # rows whose label another shard owns (or that are ignored)
    scale, margin = MARGINS[margin_type]
    cosine = margin_type == "cosface"
    if cosine:
        features, _ = normalize_rows(features)
    inv_norm = inverse_row_norms(weight) if cosine else None
    options = dict(scale=scale, target_shift=scale * margin if cosine else 0.0)
    return feature_operand(features, FP8), weight, inv_norm, labels, options


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def weight_pass(exact_kernels, op, weight, inv_norm, labels, lse, *, update, grad_scale, options):
    """dW (update None) or the update in place, by the stationary weight kernel or the gemm backward."""
    cosine = inv_norm is not None
    if exact_kernels == "stationary":
        return shard_weight_backward(
            op, weight, inv_norm, labels, lse, cosine=cosine, grad_scale=grad_scale, update=update, **options
        )
    _, grad = exact_backward(
        op, weight, inv_norm, labels, lse, cosine=cosine, grad_scale=grad_scale, update=update,
        want_features=False, **options,
    )  # fmt: skip
    return grad


def lse_of(row_max, row_sum, labels):
    lse = row_max + torch.log(row_sum)
    lse[labels == -100] = float("inf")
    return lse.contiguous()


@pytest.mark.parametrize("margin_type", ["none", "cosface"])
@pytest.mark.parametrize("batch", [10, 37])  # 10: classes split over several programs
def test_forward_matches_the_emulation(margin_type, batch):
    op, weight, inv_norm, labels, options = make_problem(1, batch, margin_type)
    assert (forward_splits(batch, NUM_CLASSES, weight.device)[0] > 1) == (batch == 10)
    got = shard_forward(op, weight, inv_norm, labels, cosine=inv_norm is not None, **options)
    want = emulate_forward(op, weight, inv_norm, labels, **options)
    for name, g, w in zip(("max", "sum", "target", "A"), got, want):
        assert rel_err(g, w) < 1e-5, name


@pytest.mark.parametrize("exact_kernels", ["stationary", "gemm"])
@pytest.mark.parametrize("margin_type", ["none", "cosface"])
def test_weight_gradient_matches_the_emulation(margin_type, exact_kernels):
    """Both weight passes form P times the row scales in e5m2, then P^T F (the gemm backward
    with the gradient scale folded into P before its rounding)."""
    op, weight, inv_norm, labels, options = make_problem(2, 37, margin_type)
    row_max, row_sum, _, _ = shard_forward(op, weight, inv_norm, labels, cosine=inv_norm is not None, **options)
    lse = lse_of(row_max, row_sum, labels)
    got = weight_pass(exact_kernels, op, weight, inv_norm, labels, lse, update=None, grad_scale=0.1, options=options)
    assert got.dtype == torch.float32  # dW of fp8 weights is not rounded to fp8
    want = emulate_weight_gradient(
        op, weight, inv_norm, labels, lse, grad_scale=0.1, scaled_first=exact_kernels == "gemm", **options
    )
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("margin_type", ["none", "cosface"])
def test_gemm_feature_gradient_matches_the_emulation(margin_type):
    """The gemm backward's dF for fp8 rows: P's softmax part in e5m2 times W, and the one-hot
    part subtracted exactly (in e5m2, g(p - 1) would round alike in every row)."""
    op, weight, inv_norm, labels, options = make_problem(5, 37, margin_type)
    row_max, row_sum, _, _ = shard_forward(op, weight, inv_norm, labels, cosine=inv_norm is not None, **options)
    lse = lse_of(row_max, row_sum, labels)
    got, _ = exact_backward(
        op, weight, inv_norm, labels, lse, cosine=inv_norm is not None, grad_scale=0.1, update=None,
        want_weight=False, **options,
    )  # fmt: skip
    want = emulate_feature_gradient(op, weight, inv_norm, labels, lse, grad_scale=0.1, **options)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("num_rows, dim, width", [(37, 24, 48), (16, 40, 16), (5, 17, 21)])
def test_transposed_padded_copy_equals_torch(num_rows, dim, width):
    gen = torch.Generator().manual_seed(num_rows * dim)
    rows = (torch.randn(num_rows + 3, dim, generator=gen) * 4).to(FP8)[2 : 2 + num_rows]  # a slice, as W_c is
    want = torch.zeros(dim, width, dtype=torch.uint8)
    want[:, :num_rows] = rows.view(torch.uint8).t()
    got = _transposed_padded(rows, width)
    assert got.dtype == FP8 and got.is_contiguous()
    assert torch.equal(got.view(torch.uint8), want)


@pytest.mark.parametrize("margin_type", ["none", "cosface"])
def test_gemm_backward_writes_the_same_bits_through_descriptors_and_pointers(monkeypatch, margin_type):
    """fp8 rows: P and its transpose written through descriptors (a transposed tile) or by
    pointer stores give the same dF and dW, as do the LSE pass's two ways of loading. (At
    the other tests' width, 24 bytes a row, fp8 rows take the pointer loads.)"""
    op, weight, inv_norm, labels, options = make_problem(9, 37, margin_type, dim=32)
    cosine = inv_norm is not None
    assert descriptor_loads(op.values, weight)
    results = {}
    for tma in ("1", "0"):
        monkeypatch.setenv("HYDRAHEAD_TMA", tma)
        row_max, row_sum, _ = shard_lse(op, weight, inv_norm, labels, cosine=cosine, **options)
        lse = lse_of(row_max, row_sum, labels)
        grads = exact_backward(op, weight, inv_norm, labels, lse, cosine=cosine, grad_scale=0.1, update=None, **options)
        results[tma] = (lse, *grads)
    for with_tma, with_pointers in zip(results["1"], results["0"]):
        assert torch.equal(with_tma, with_pointers)


@pytest.mark.parametrize(
    "rounding, kahan, momentum, exact_kernels",
    [
        (rounding, kahan, momentum, "stationary")
        for rounding in ("nearest", "stochastic")
        for kahan in (None, torch.bfloat16, torch.float8_e5m2)
        for momentum in (0.0, 0.9)
    ]
    + [("stochastic", torch.bfloat16, 0.9, "gemm"), ("nearest", None, 0.0, "gemm")]
    # cosine logits on the gemm path: dW_c projected inside the update pass
    + [("stochastic", None, 0.9, "gemm-cosface"), ("nearest", None, 0.0, "gemm-cosface")],
)
def test_fused_update_matches_the_emulation(rounding, kahan, momentum, exact_kernels):
    exact_kernels, _, margin_type = exact_kernels.partition("-")
    op, weight, inv_norm, labels, options = make_problem(3, 37, margin_type or "none")
    gen = torch.Generator().manual_seed(4)
    cosine = inv_norm is not None
    row_max, row_sum, _, _ = shard_forward(op, weight, inv_norm, labels, cosine=cosine, **options)
    lse = lse_of(row_max, row_sum, labels)
    grad = weight_pass(exact_kernels, op, weight, inv_norm, labels, lse, update=None, grad_scale=0.1, options=options)
    buffer = (torch.randn(NUM_CLASSES, DIM, generator=gen) * 0.01).to(torch.bfloat16) if momentum else None
    compensation = (torch.randn(NUM_CLASSES, DIM, generator=gen) * 1e-3).to(kahan) if kahan else None
    class_ids = torch.randperm(10**6, generator=gen)[:NUM_CLASSES] + 3 * 10**9  # global ids, some past 2^31
    # cosine: the gradient through w / ||w|| is about ||w|| times smaller; a larger step moves the rows as far
    hyper = dict(lr=5.0 if cosine else 0.5, momentum=momentum, weight_decay=5e-4)
    want_w, want_buf, want_comp = emulate_update(
        weight,
        grad,
        buffer=None if buffer is None else buffer.clone(),
        rounding=rounding,
        seed=5,
        step=11,
        class_ids=class_ids,
        compensation=None if compensation is None else compensation.clone(),
        **hyper,
    )
    w = weight.clone()
    update = SGDUpdate(
        momentum_buffer=buffer,
        rounding=rounding,
        seed=5,
        step=11,
        class_ids=class_ids,
        compensation=compensation,
        **hyper,
    )
    weight_pass(exact_kernels, op, w, inv_norm, labels, lse, update=update, grad_scale=0.1, options=options)
    assert w.dtype == FP8
    moved = w.double() != weight.double()
    assert float(moved.float().mean()) > 0.3  # the update is not lost to rounding
    assert float((w.double() != want_w.double()).float().mean()) <= 1e-3  # a summation-order flip at most
    if buffer is not None:
        assert rel_err(buffer, want_buf) < 1e-2  # bf16 buffer: equal up to one rounding
    if compensation is not None:
        assert rel_err(compensation, want_comp) < 0.1


def test_stochastic_draws_are_keyed_by_class_id_and_step():
    op, weight, inv_norm, labels, options = make_problem(4, 37, "none")
    row_max, row_sum, _, _ = shard_forward(op, weight, inv_norm, labels, cosine=False, **options)
    lse = lse_of(row_max, row_sum, labels)

    def stepped(class_ids, step):
        w = weight.clone()
        update = SGDUpdate(lr=0.02, rounding="stochastic", seed=1, step=step, class_ids=class_ids)
        shard_weight_backward(op, w, inv_norm, labels, lse, cosine=False, grad_scale=1.0, update=update, **options)
        return w.double()

    consecutive = stepped(500, 3)
    assert torch.equal(consecutive, stepped(torch.arange(500, 500 + NUM_CLASSES), 3))  # first id == explicit ids
    assert not torch.equal(consecutive, stepped(501, 3))
    assert not torch.equal(consecutive, stepped(500, 4))


def _fp8_loss_and_grads(features, weight, labels, scale, exact_kernels="auto"):
    f = features.clone().requires_grad_()
    loss = triton_sharded_cross_entropy(
        f, weight, labels, 0, scale=scale, num_classes=NUM_CLASSES, exact_kernels=exact_kernels
    )
    loss.backward()
    return loss.detach(), f.grad


@pytest.mark.parametrize("exact_kernels", ["stationary", "gemm"])
def test_fp8_loss_and_feature_gradient_follow_float64_within_fp8_error(exact_kernels):
    gen = torch.Generator().manual_seed(6)
    features = torch.randn(37, DIM, generator=gen)
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen).to(FP8)  # unit-variance rows (unit scaling)
    labels = torch.randint(0, NUM_CLASSES, (37,), generator=gen)
    scale = 2.0 / DIM**0.5
    loss, grad = _fp8_loss_and_grads(features, weight, labels, scale, exact_kernels)
    f64 = features.double().requires_grad_()
    ref = sharded_cross_entropy(f64, weight.double(), labels, 0, scale=scale)
    ref.backward()
    # e4m3 features (3 mantissa bits) and e5m2 softmax weights (2), whose errors differ
    # from entry to entry: 1-2.5% here (a one-hot part in e5m2 put the gemm path at 5-10%)
    assert abs(float(loss) - float(ref)) < 0.02 * float(ref)
    assert rel_err(grad, f64.grad) < 0.04
    assert rel_err(grad, f64.grad) > 1e-4  # it did run in fp8 (a float32 path would be ~1e-7)


def _fp8_head_worker(rank, world_size, rounding):
    torch.manual_seed(0)
    head = ShardedClassifier(
        NUM_CLASSES, DIM, seed=3, dtype=FP8, impl="triton", unit_scaling=True, rounding=rounding, momentum=0.0
    )
    gen = torch.Generator().manual_seed(8)
    centres = torch.randn(NUM_CLASSES, DIM, generator=gen)
    losses = []
    for step in range(6):
        labels = torch.randint(0, NUM_CLASSES, (32,), generator=gen)
        features = centres[labels] + 0.3 * torch.randn(32, DIM, generator=gen)
        head.set_lr(30.0)
        head.set_step(step)
        loss = head.loss(features, labels)
        loss.backward()
        head.finish_step()
        losses.append(float(loss.detach()))
    return losses, head.weight.detach().double(), head.class_start


@pytest.mark.parametrize("rounding", ["stochastic"])
def test_fp8_head_learns_and_its_draws_do_not_depend_on_the_world_size(rounding):
    one = run_ranks(_fp8_head_worker, 1, rounding)[0]
    two = run_ranks(_fp8_head_worker, 2, rounding)
    assert one[0][-1] < one[0][0] - 0.2  # it learns
    for losses, _, _ in two:
        assert max(abs(a - b) for a, b in zip(losses, one[0])) < 1e-4
    merged = torch.cat([w for _, w, _ in sorted(two, key=lambda r: r[2])])
    assert float((merged != one[1]).float().mean()) <= 1e-3


def _filtered_inputs(seed):
    from test_kernels import threshold_in_a_gap

    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(37, DIM, generator=gen)
    weight = (torch.randn(NUM_CLASSES, DIM, generator=gen) * 0.5).to(FP8)
    labels = torch.randint(0, NUM_CLASSES, (37,), generator=gen)
    labels[::5] = -100
    op = feature_operand(features, FP8)
    seen = op.values.double() * op.row_scale.double()[:, None]  # the features the fp8 logits are made of
    # (clones: the reference marks its float64 inputs as requiring grad, in place)
    return (
        features,
        seen,
        weight,
        labels,
        threshold_in_a_gap(seen.clone(), weight.double(), labels, "none", quantile=0.75),
    )


def test_fp8_filtered_step_drops_exactly_the_small_entries():
    from test_kernels import MARGINS as CPU_MARGINS
    from test_kernels import masked_reference

    features, seen, weight, labels, threshold = _filtered_inputs(9)
    ref_loss, ref_fgrad, ref_wgrad, kept = masked_reference(seen.clone(), weight.double(), labels, "none", threshold)
    assert 0.05 < float((kept != 0).double().mean()) < 0.6
    f = features.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = triton_sharded_cross_entropy(f, w, labels, 0, scale=CPU_MARGINS["none"][0], grad_filter=threshold)
    loss.backward()
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
    assert rel_err(f.grad, ref_fgrad) < 1e-5


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fp8_filtered_update_rounds_like_the_exact_kernel(rounding):
    from test_kernels import MARGINS as CPU_MARGINS
    from test_kernels import masked_reference

    features, seen, weight, labels, threshold = _filtered_inputs(10)
    _, _, ref_wgrad, _ = masked_reference(seen.clone(), weight.double(), labels, "none", threshold)
    buffer = torch.zeros(NUM_CLASSES, DIM, dtype=torch.bfloat16)
    compensation = torch.zeros(NUM_CLASSES, DIM, dtype=torch.bfloat16)
    hyper = dict(lr=0.5, momentum=0.9, weight_decay=5e-4)
    want, _, _ = emulate_update(
        weight,
        ref_wgrad,
        buffer=buffer.clone(),
        rounding=rounding,
        seed=4,
        step=2,
        class_ids=torch.arange(NUM_CLASSES) + 40,
        compensation=compensation.clone(),
        **hyper,
    )
    w = weight.clone()
    update = SGDUpdate(
        momentum_buffer=buffer, rounding=rounding, seed=4, step=2, class_ids=40, compensation=compensation, **hyper
    )
    triton_sharded_cross_entropy(
        features.clone().requires_grad_(),
        w,
        labels,
        0,
        scale=CPU_MARGINS["none"][0],
        update=update,
        grad_filter=threshold,
    ).backward()
    assert float((w.double() != weight.double()).float().mean()) > 0.1
    assert float((w.double() != want.double()).float().mean()) <= 1e-3


def test_fp8_head_over_active_rows_steps_like_the_full_loss():
    """All rows active (their own copies, ids passed to the kernel) equals the full loss, Kahan
    buffer included; a step over a subset moves only the subset (the rest is deferred)."""
    heads = [
        ShardedClassifier(
            NUM_CLASSES,
            DIM,
            seed=2,
            dtype=FP8,
            impl="triton",
            unit_scaling=True,
            rounding="stochastic",
            kahan_dtype=torch.bfloat16,
            momentum=0.9,
            weight_decay=1e-3,
        )
        for _ in range(2)
    ]
    gen = torch.Generator().manual_seed(12)
    for step in range(2):
        features, labels = torch.randn(24, DIM, generator=gen), torch.randint(0, NUM_CLASSES, (24,), generator=gen)
        for head, rows in zip(heads, (None, torch.arange(NUM_CLASSES))):
            head.set_lr(5.0)
            head.set_step(step)
            head.loss(features.clone().requires_grad_(), labels, rows).backward()
            head.finish_step()
    assert torch.equal(heads[0].weight.double(), heads[1].weight.double())
    assert torch.equal(heads[0].compensation.float(), heads[1].compensation.float())
    assert float(heads[0].compensation.float().abs().max()) > 0

    head = heads[1]
    before = head.weight.detach().double().clone()
    features, labels = torch.randn(24, DIM, generator=gen), torch.randint(0, 50, (24,), generator=gen)
    head.set_step(2)
    head.loss(features.requires_grad_(), labels, torch.arange(50)).backward()
    head.finish_step()
    moved = (head.weight.double() != before).any(dim=1)
    assert bool(moved[:50].any()) and not bool(moved[50:].any())


def test_device_rounding_keys_are_the_host_keys():
    from hydrahead.kernels.rounding import signed32
    from hydrahead.optim.low_precision import device_rounding_keys, rounding_keys

    gen = torch.Generator().manual_seed(90)
    for seed, step, salt in zip(torch.randint(0, 2**62, (30,), generator=gen).tolist(),
                                torch.randint(0, 2**40, (30,), generator=gen).tolist(),
                                [0, 1] * 15):  # fmt: skip
        keys = device_rounding_keys(seed, torch.tensor([step]), salt)
        assert keys.dtype == torch.int32
        assert keys.tolist() == [signed32(k) for k in rounding_keys(seed, step, salt)]


@pytest.mark.parametrize("grad_filter", [0.0, 1e-3])
def test_an_lr_and_step_held_in_tensors_update_as_the_numbers_do(grad_filter):
    """SGDUpdate.lr and .step as one-element device tensors (what a CUDA graph replays): the
    gemm and filtered paths' update reads them there and writes what the numbers give, bit
    for bit, stochastic rounding included; values changed in place are the next call's."""
    gen = torch.Generator().manual_seed(91)
    features = torch.randn(37, DIM, generator=gen) * 3.0
    weight = (torch.randn(NUM_CLASSES, DIM, generator=gen) * 0.5).to(FP8)
    labels = torch.randint(0, NUM_CLASSES, (37,), generator=gen)
    lr, step = torch.tensor([0.5]), torch.tensor([11])
    results = []
    for rate, count in ((0.5, 11), (0.25, 12)):
        for held in (False, True):
            if held:
                lr.fill_(rate)
                step.fill_(count)  # in place, as a schedule between replays
            w, buf = weight.clone(), torch.zeros(NUM_CLASSES, DIM)
            update = SGDUpdate(
                lr=lr if held else rate, step=step if held else count, momentum=0.9, weight_decay=5e-4,
                momentum_buffer=buf, rounding="stochastic", seed=3,
            )  # fmt: skip
            f = features.clone().requires_grad_()
            triton_sharded_cross_entropy(
                f, w, labels, 0, scale=4.0, update=update, grad_filter=grad_filter, exact_kernels="gemm"
            ).backward()
            results.append((w.view(torch.uint8), buf))
    (w1, b1), (w1_held, b1_held), (w2, b2), (w2_held, b2_held) = results
    assert torch.equal(w1, w1_held) and torch.equal(b1, b1_held)
    assert torch.equal(w2, w2_held) and torch.equal(b2, b2_held)
    assert not torch.equal(w1, w2)  # the new lr and step were read


def test_a_step_in_a_tensor_draws_its_keys_once_per_backward(monkeypatch):
    """The gemm backward over several class chunks with the step in a device tensor: the
    rounding keys are made once (a dozen small ops each time), and the chunks' stochastic
    writes equal those of the step given as a number, bit for bit."""
    import hydrahead.kernels.rounding as rounding

    calls = []
    made = rounding.device_rounding_keys
    monkeypatch.setattr(rounding, "device_rounding_keys", lambda *a: calls.append(a) or made(*a))
    monkeypatch.setenv("HYDRAHEAD_EXACT_CHUNK_MIB", "0.001")  # the smallest chunks: 256 classes
    classes = 600  # three chunks, the last one short
    gen = torch.Generator().manual_seed(17)
    features = torch.randn(29, DIM, generator=gen) * 3.0
    weight = (torch.randn(classes, DIM, generator=gen) * 0.5).to(FP8)
    labels = torch.randint(0, classes, (29,), generator=gen)
    results = []
    for step in (7, torch.tensor([7])):
        w, buf = weight.clone(), torch.zeros(classes, DIM)
        update = SGDUpdate(lr=0.5, step=step, momentum=0.9, momentum_buffer=buf, rounding="stochastic", seed=5)
        f = features.clone().requires_grad_()
        triton_sharded_cross_entropy(f, w, labels, 0, scale=4.0, update=update, exact_kernels="gemm").backward()
        results.append(w.view(torch.uint8))
    assert chunk_classes(29, FP8, classes, DIM) == 256
    assert len(calls) == 1, f"the keys were made {len(calls)} times in one backward"
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], weight.view(torch.uint8))


@pytest.mark.parametrize("micro_batches", [False, True])
def test_a_filter_that_falls_back_steps_with_an_lr_in_a_tensor(monkeypatch, micro_batches):
    """When more entries pass the filter than it holds, the step runs exact: with exact
    kernels resolved to gemm, its weight pass is the gemm path's, which reads a tensor lr and
    step (the stationary kernels would refuse them mid-step), and it writes what the exact
    gemm step writes, bit for bit."""
    import hydrahead.kernels.filtered as filtered_kernels
    from hydrahead.kernels.fused_loss import FusedMicroBatches

    monkeypatch.setattr(filtered_kernels, "select_entries", lambda *args, **kwargs: (None, 10**9))
    gen = torch.Generator().manual_seed(23)
    features = torch.randn(37, DIM, generator=gen) * 3.0
    weight = (torch.randn(NUM_CLASSES, DIM, generator=gen) * 0.5).to(FP8)
    labels = torch.randint(0, NUM_CLASSES, (37,), generator=gen)
    results = []
    for grad_filter, held in ((0.0, False), (1e-3, True)):
        w, buf = weight.clone(), torch.zeros(NUM_CLASSES, DIM)
        lr, step = (torch.tensor([0.5]), torch.tensor([4])) if held else (0.5, 4)
        update = SGDUpdate(lr=lr, step=step, momentum=0.9, momentum_buffer=buf, rounding="stochastic", seed=2)
        options = dict(scale=4.0, update=update, grad_filter=grad_filter, exact_kernels="gemm")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's warning
            if micro_batches:
                engine = FusedMicroBatches(w, labels, 0, **options)
                for rows in (torch.arange(0, 20), torch.arange(20, 37)):
                    engine.chunk(features[rows], rows)
                engine.finish()
            else:
                f = features.clone().requires_grad_()
                triton_sharded_cross_entropy(f, w, labels, 0, **options).backward()
        results.append((w.view(torch.uint8), buf))
    (w_exact, b_exact), (w_fallback, b_fallback) = results
    assert torch.equal(w_exact, w_fallback) and torch.equal(b_exact, b_fallback)
    assert not torch.equal(w_exact, weight.view(torch.uint8))


def test_a_tensor_lr_that_the_kernels_cannot_take_is_refused_before_the_step():
    """fp8 rows and a global batch too small for the gemm path: 'auto' resolves to the
    stationary kernels, and a tensor lr is refused when the loss is called, not in the backward."""
    weight = torch.zeros(NUM_CLASSES, DIM).to(FP8)
    features = torch.randn(5, DIM, requires_grad=True)
    labels = torch.randint(0, NUM_CLASSES, (5,))
    update = SGDUpdate(lr=torch.tensor([0.1]), momentum=0.0)
    with pytest.raises(ValueError, match="FP8_GEMM_MIN_ROWS"):
        triton_sharded_cross_entropy(features, weight, labels, 0, update=update)


def test_an_lr_in_a_tensor_is_refused_where_the_kernels_take_numbers():
    op, weight, inv_norm, labels, options = make_problem(5, 37, "none")
    row_max, row_sum, _, _ = shard_forward(op, weight, inv_norm, labels, cosine=False, **options)
    lse = lse_of(row_max, row_sum, labels)
    for update in (SGDUpdate(lr=torch.tensor([0.1])), SGDUpdate(lr=0.1, step=torch.tensor([3]), rounding="stochastic")):
        with pytest.raises(ValueError, match="stationary kernels take a number"):
            weight_pass(
                "stationary", op, weight.clone(), inv_norm, labels, lse, update=update, grad_scale=0.1, options=options
            )
    for bad in (torch.tensor([0.1, 0.2]), torch.tensor([0.1], dtype=torch.float64)):
        with pytest.raises(ValueError, match="one torch.float32 value"):
            weight_pass(
                "gemm",
                op,
                weight.clone(),
                inv_norm,
                labels,
                lse,
                update=SGDUpdate(lr=bad),
                grad_scale=0.1,
                options=options,
            )

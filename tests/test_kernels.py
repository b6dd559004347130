"""Fused shard kernels against the torch reference (on CPU through Triton's interpreter, fp32)."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks

from hydrahead.distributed.sharding import shard_range
from hydrahead.head import sharded_cross_entropy
from hydrahead.kernels import SGDUpdate, shard_ce, triton_sharded_cross_entropy
from hydrahead.kernels.tiles import descriptor_loads

# Sizes that are not multiples of the interpreter's 16-wide tiles.
BATCH, DIM, NUM_CLASSES = 37, 24, 101
MARGINS = {"none": (2.0, 0.0), "cosface": (16.0, 0.3)}


def make_inputs(seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(BATCH, DIM, generator=gen)
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen) * 0.3
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
    labels[::5] = -100
    return features.to(dtype), weight.to(dtype), labels


def reference_step(features, weight, labels, margin_type, momentum_buffer, *, lr, momentum, weight_decay):
    """float64: loss, dF, dW by the torch reference, then torch.optim.SGD's step applied to dW."""
    scale, margin = MARGINS[margin_type]
    f = features.double().requires_grad_()
    w = weight.double().requires_grad_()
    loss = sharded_cross_entropy(f, w, labels, 0, scale=scale, margin=margin, margin_type=margin_type)
    loss.backward()
    w_new = w.detach().clone()
    buf = momentum_buffer.double().clone()
    optimizer = torch.optim.SGD([w_new], lr=lr, momentum=momentum, weight_decay=weight_decay)
    w_new.grad = w.grad
    if momentum:
        optimizer.state[w_new]["momentum_buffer"] = buf
    optimizer.step()
    return loss.detach(), f.grad, w.grad, w_new, buf


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


EXACT_KERNELS = ["gemm", "stationary"]


@pytest.mark.parametrize("exact_kernels", EXACT_KERNELS)
@pytest.mark.parametrize("margin_type", ["none", "cosface"])
def test_loss_and_gradients_equal_the_reference(margin_type, exact_kernels):
    features, weight, labels = make_inputs(1)
    scale, margin = MARGINS[margin_type]
    f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = triton_sharded_cross_entropy(
        f,
        w,
        labels,
        0,
        num_classes=NUM_CLASSES,
        scale=scale,
        margin=margin,
        margin_type=margin_type,
        exact_kernels=exact_kernels,
    )
    loss.backward()
    ref_loss, ref_fgrad, ref_wgrad, _, _ = reference_step(
        features, weight, labels, margin_type, torch.zeros_like(weight), lr=0, momentum=0, weight_decay=0
    )
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
    assert rel_err(f.grad, ref_fgrad) < 1e-5
    assert rel_err(w.grad, ref_wgrad) < 1e-5


def _loss_and_grads(features, weight, labels, **options):
    f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = triton_sharded_cross_entropy(f, w, labels, 0, scale=2.0, **options)
    loss.backward()
    return loss.detach(), f.grad, w.grad


@pytest.mark.parametrize("options", [dict(exact_kernels="gemm"), dict(grad_filter=1e-3)], ids=["gemm", "filtered"])
def test_descriptor_loads_equal_pointer_loads(monkeypatch, options):
    """The streaming kernels' two ways of reading F and W (and writing P) give the same bits."""
    features, weight, labels = make_inputs(7)
    assert descriptor_loads(features, weight)
    results = {}
    for tma in ("1", "0"):
        monkeypatch.setenv("HYDRAHEAD_TMA", tma)
        results[tma] = _loss_and_grads(features, weight, labels, **options)
    for with_tma, with_pointers in zip(results["1"], results["0"]):
        assert torch.equal(with_tma, with_pointers)


def test_widths_the_copy_engine_cannot_take_run_on_pointer_loads():
    """A row of 13 fp32 (52 bytes, not a multiple of 16) has no descriptor; the loss still
    matches the float64 reference, through both streaming kernels."""
    gen = torch.Generator().manual_seed(8)
    features, weight = torch.randn(BATCH, 13, generator=gen), torch.randn(NUM_CLASSES, 13, generator=gen) * 0.3
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
    assert not descriptor_loads(features, weight)
    assert descriptor_loads(features[:, :12].contiguous(), weight[:, :12].contiguous())
    assert not descriptor_loads(features[:, :12], weight[:, :12])  # a view keeps the 52-byte stride
    loss, fgrad, wgrad = _loss_and_grads(features, weight, labels, exact_kernels="gemm")
    f, w = features.double().requires_grad_(), weight.double().requires_grad_()
    ref = sharded_cross_entropy(f, w, labels, 0, scale=2.0)
    ref.backward()
    assert abs(float(loss) - float(ref)) < 1e-5 * abs(float(ref))
    assert rel_err(fgrad, f.grad) < 1e-5
    assert rel_err(wgrad, w.grad) < 1e-5


@pytest.mark.parametrize("exact_kernels", EXACT_KERNELS)
@pytest.mark.parametrize("margin_type", ["none", "cosface"])
@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 5e-4), (0.0, 0.0)])
def test_fused_update_equals_reference_gradient_then_sgd(margin_type, momentum, weight_decay, exact_kernels):
    features, weight, labels = make_inputs(2)
    scale, margin = MARGINS[margin_type]
    buffer = torch.randn_like(weight) * 0.01  # a momentum buffer from earlier steps
    ref_loss, ref_fgrad, _, ref_w, ref_buf = reference_step(
        features, weight, labels, margin_type, buffer, lr=0.5, momentum=momentum, weight_decay=weight_decay
    )

    w = weight.clone()
    buf = buffer.clone()
    f = features.clone().requires_grad_()
    update = SGDUpdate(lr=0.5, momentum=momentum, weight_decay=weight_decay, momentum_buffer=buf if momentum else None)
    loss = triton_sharded_cross_entropy(
        f, w, labels, 0, scale=scale, margin=margin, margin_type=margin_type, update=update, exact_kernels=exact_kernels
    )
    loss.backward()
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
    assert rel_err(f.grad, ref_fgrad) < 1e-5
    assert rel_err(w - weight, ref_w - weight.double()) < 1e-5, "the update itself, not just the weights"
    if momentum:
        assert rel_err(buf, ref_buf) < 1e-5
    assert w.grad is None


@pytest.mark.parametrize("margin_type", ["none", "cosface"])
@pytest.mark.parametrize("num_rows", [shard_ce.SLICED_MAX_ROWS, shard_ce.SLICED_MAX_ROWS + 1])
def test_both_stationary_weight_kernels_step_as_the_reference(num_rows, margin_type):
    """Up to SLICED_MAX_ROWS rows the update runs D slice by slice (``_weight_sliced_kernel``);
    one row more, on whole rows (``_weight_kernel``). Both follow the float64 step."""
    gen = torch.Generator().manual_seed(num_rows)
    features = torch.randn(num_rows, 40, generator=gen)
    weight = torch.randn(37, 40, generator=gen) * 0.3
    labels = torch.randint(0, 37, (num_rows,), generator=gen)
    labels[::7] = -100
    buffer = torch.randn_like(weight) * 0.01
    ref_loss, ref_fgrad, _, ref_w, ref_buf = reference_step(
        features, weight, labels, margin_type, buffer, lr=0.5, momentum=0.9, weight_decay=5e-4
    )
    w, buf = weight.clone(), buffer.clone()
    f = features.clone().requires_grad_()
    scale, margin = MARGINS[margin_type]
    update = SGDUpdate(lr=0.5, momentum=0.9, weight_decay=5e-4, momentum_buffer=buf)
    loss = triton_sharded_cross_entropy(
        f, w, labels, 0, scale=scale, margin=margin, margin_type=margin_type, update=update, exact_kernels="stationary"
    )
    loss.backward()
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
    assert rel_err(f.grad, ref_fgrad) < 1e-5
    assert rel_err(w - weight, ref_w - weight.double()) < 1e-5
    assert rel_err(buf, ref_buf) < 1e-5


@pytest.mark.parametrize("exact_kernels", EXACT_KERNELS)
def test_incoming_gradient_scales_both_outputs(exact_kernels):
    features, weight, labels = make_inputs(3)
    f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = triton_sharded_cross_entropy(f, w, labels, 0, scale=MARGINS["none"][0], exact_kernels=exact_kernels)
    (loss * -2.5).backward()
    _, ref_fgrad, ref_wgrad, _, _ = reference_step(
        features, weight, labels, "none", torch.zeros_like(weight), lr=0, momentum=0, weight_decay=0
    )
    assert rel_err(f.grad, -2.5 * ref_fgrad) < 1e-5 and rel_err(w.grad, -2.5 * ref_wgrad) < 1e-5


def masked_reference(features, weight, labels, margin_type, threshold):
    """float64 loss, dF, dW with every entry |softmax - onehot| < threshold set to zero."""
    scale, margin = MARGINS[margin_type]
    f = features.double().requires_grad_()
    w = weight.double().requires_grad_()
    valid = labels != -100
    rows = torch.nonzero(valid).squeeze(1)
    if margin_type == "cosface":
        z = scale * torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(w, dim=1).t()
        z = z.index_put((rows, labels[rows]), z[rows, labels[rows]] - scale * margin)
    else:
        z = scale * f @ w.t()
    onehot = torch.zeros_like(z)
    onehot[rows, labels[rows]] = 1.0
    lse = torch.logsumexp(z, dim=1)
    loss = (lse - (z * onehot).sum(dim=1))[valid].mean()
    p = (torch.softmax(z, dim=1) - onehot).detach()
    p = torch.where((p.abs() >= threshold) & valid[:, None], p, 0.0)
    (p * z).sum().div(len(rows)).backward()  # d/dz = the kept entries / n
    return loss.detach(), f.grad, w.grad, p


def threshold_in_a_gap(features, weight, labels, margin_type, quantile):
    """A threshold whose nearest |P| entries are >= 1% away (so fp32 and fp64 keep the same entries)."""
    *_, p = masked_reference(features, weight, labels, margin_type, 0.0)
    values = torch.sort(p.abs()[p != 0]).values
    gaps = values[1:] / values[:-1]
    candidates = torch.nonzero(gaps > 1.01).squeeze(1)
    pick = candidates[torch.argmin((candidates.double() / len(values) - quantile).abs())]
    return float((values[pick] * values[pick + 1]).sqrt())


@pytest.mark.parametrize("margin_type", ["none", "cosface"])
def test_filter_drops_exactly_the_small_entries(margin_type):
    features, weight, labels = make_inputs(4)
    scale, margin = MARGINS[margin_type]
    threshold = threshold_in_a_gap(features, weight, labels, margin_type, quantile=0.7)
    ref_loss, ref_fgrad, ref_wgrad, kept = masked_reference(features, weight, labels, margin_type, threshold)
    assert 0.05 < float((kept != 0).double().mean()) < 0.6  # the filter really drops entries here
    f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = triton_sharded_cross_entropy(
        f, w, labels, 0, scale=scale, margin=margin, margin_type=margin_type, grad_filter=threshold
    )
    loss.backward()
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
    assert rel_err(f.grad, ref_fgrad) < 1e-5
    assert rel_err(w.grad, ref_wgrad) < 1e-5


@pytest.mark.parametrize("momentum,weight_decay,buffer_dtype", [(0.9, 5e-4, torch.float32), (0.0, 1e-3, None)])
def test_filtered_update_equals_masked_gradient_then_sgd(momentum, weight_decay, buffer_dtype):
    features, weight, labels = make_inputs(8)
    threshold = threshold_in_a_gap(features, weight, labels, "none", quantile=0.8)
    _, ref_fgrad, ref_wgrad, _ = masked_reference(features, weight, labels, "none", threshold)
    buffer = torch.randn_like(weight) * 0.01
    ref_w, ref_buf = weight.double().clone(), buffer.double().clone()
    optimizer = torch.optim.SGD([ref_w], lr=0.5, momentum=momentum, weight_decay=weight_decay)
    ref_w.grad = ref_wgrad
    if momentum:
        optimizer.state[ref_w]["momentum_buffer"] = ref_buf
    optimizer.step()

    w, buf = weight.clone(), buffer.clone()
    f = features.clone().requires_grad_()
    update = SGDUpdate(lr=0.5, momentum=momentum, weight_decay=weight_decay, momentum_buffer=buf if momentum else None)
    triton_sharded_cross_entropy(
        f, w, labels, 0, scale=MARGINS["none"][0], update=update, grad_filter=threshold
    ).backward()
    assert rel_err(f.grad, ref_fgrad) < 1e-5
    assert rel_err(w - weight, ref_w - weight.double()) < 1e-5, "the update itself, every row (decay touches all)"
    if momentum:
        assert rel_err(buf, ref_buf) < 1e-5


def test_filter_bounds():
    features, weight, labels = make_inputs(4)
    grads = {}
    for threshold in (0.0, 1e-30, 1.0):
        f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
        triton_sharded_cross_entropy(f, w, labels, 0, grad_filter=threshold).backward()
        grads[threshold] = f.grad, w.grad
    for exact, tiny in zip(grads[0.0], grads[1e-30]):
        assert rel_err(tiny, exact) < 1e-5  # nothing is that small: the filtered path keeps every entry
    assert float(grads[1.0][0].abs().max()) == 0.0 and float(grads[1.0][1].abs().max()) == 0.0  # |P| < 1 everywhere


def test_filter_list_overflow_retries_then_falls_back_to_exact(monkeypatch):
    from hydrahead.kernels import filtered

    features, weight, labels = make_inputs(9)
    threshold = 1e-30  # every entry qualifies: 30 valid rows x 101 classes
    f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
    triton_sharded_cross_entropy(f, w, labels, 0, grad_filter=threshold).backward()
    expected = f.grad, w.grad

    monkeypatch.setattr(filtered, "initial_capacity", lambda rows: 7)  # too small: counted, then a second pass
    f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
    triton_sharded_cross_entropy(f, w, labels, 0, grad_filter=threshold).backward()
    assert rel_err(f.grad, expected[0]) < 1e-6 and rel_err(w.grad, expected[1]) < 1e-6

    monkeypatch.setenv("HYDRAHEAD_FILTER_MAX_ENTRIES", "100")  # beyond the limit: the exact kernels run
    f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
    with pytest.warns(RuntimeWarning, match="exact kernels"):
        triton_sharded_cross_entropy(f, w, labels, 0, grad_filter=threshold).backward()
    assert rel_err(f.grad, expected[0]) < 1e-5 and rel_err(w.grad, expected[1]) < 1e-5


def test_arcface_is_refused_with_a_pointer_to_the_reference():
    features, weight, labels = make_inputs(5)
    with pytest.raises(ValueError, match="head.impl=reference"):
        triton_sharded_cross_entropy(features, weight, labels, 0, scale=16.0, margin=0.3, margin_type="arcface")


def _sharded_worker(rank, world_size, margin_type, grad_filter=0.0, exact_kernels="auto"):
    features, weight, labels = make_inputs(6)
    start, stop = shard_range(NUM_CLASSES, world_size, rank)
    scale, margin = MARGINS[margin_type]
    f = features.clone().requires_grad_()
    w = weight[start:stop].clone().requires_grad_()
    loss = triton_sharded_cross_entropy(
        f,
        w,
        labels,
        start,
        scale=scale,
        margin=margin,
        margin_type=margin_type,
        grad_filter=grad_filter,
        exact_kernels=exact_kernels,
    )
    loss.backward()
    return loss.detach(), f.grad, w.grad


@pytest.mark.parametrize("margin_type, exact_kernels", [("none", "stationary"), ("cosface", "gemm")])
def test_three_shards_merge_like_one_device(margin_type, exact_kernels):
    results = run_ranks(_sharded_worker, 3, margin_type, 0.0, exact_kernels)
    features, weight, labels = make_inputs(6)
    ref_loss, ref_fgrad, ref_wgrad, _, _ = reference_step(
        features, weight, labels, margin_type, torch.zeros_like(weight), lr=0, momentum=0, weight_decay=0
    )
    for loss, _, _ in results:
        assert abs(float(loss) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
    assert rel_err(sum(r[1] for r in results), ref_fgrad) < 1e-5
    assert rel_err(torch.cat([r[2] for r in results]), ref_wgrad) < 1e-5


def test_three_filtered_shards_drop_what_one_device_drops():
    features, weight, labels = make_inputs(6)
    threshold = threshold_in_a_gap(features, weight, labels, "cosface", quantile=0.6)
    ref_loss, ref_fgrad, ref_wgrad, _ = masked_reference(features, weight, labels, "cosface", threshold)
    results = run_ranks(_sharded_worker, 3, "cosface", threshold)
    for loss, _, _ in results:
        assert abs(float(loss) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
    assert rel_err(sum(r[1] for r in results), ref_fgrad) < 1e-5
    assert rel_err(torch.cat([r[2] for r in results]), ref_wgrad) < 1e-5


def test_class_splits_merge_like_one_pass():
    """A small batch spreads the classes over several programs (splits), merged afterwards."""
    from hydrahead.kernels.shard_ce import shard_forward

    gen = torch.Generator().manual_seed(7)
    features, weight = torch.randn(10, DIM, generator=gen), torch.randn(NUM_CLASSES, DIM, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (10,), generator=gen)
    row_max, row_sum, target, accumulated = shard_forward(
        features, weight, None, labels, scale=2.0, target_shift=0.0, cosine=False
    )
    logits = 2.0 * features.double() @ weight.double().t()
    assert torch.allclose(row_max.double(), logits.amax(dim=1), rtol=1e-6)
    assert torch.allclose((row_max.double() + row_sum.double().log()), torch.logsumexp(logits, dim=1), rtol=1e-6)
    assert torch.allclose(target.double(), logits.gather(1, labels[:, None]).squeeze(1), rtol=1e-5)
    expected = torch.exp(logits - logits.amax(dim=1, keepdim=True)) @ weight.double()
    assert rel_err(accumulated, expected) < 1e-5


@pytest.mark.parametrize("num_classes, programs", [(1, None), (17, None), (101, None), (1000, 200)])
def test_the_lse_pass_adds_each_target_from_its_own_logit(num_classes, programs, monkeypatch):
    """The LSE pass leaves targets out of its max and sum and adds each one's shifted term
    afterwards: equal to the float64 log-sum-exp of the shifted logits, also where a row's
    target is the only class of its tile (17 classes: the last 16-wide tile holds one) or of
    the shard (1 class), and for rows whose label lies elsewhere or is ignored. With 200
    programs wanted, 1,000 classes come in 63 splits: more than one tile of the merge."""
    from hydrahead.kernels import filtered
    from hydrahead.kernels.filtered import shard_lse

    if programs is not None:
        monkeypatch.setattr(filtered, "_num_programs_target", lambda device: programs)

    gen = torch.Generator().manual_seed(num_classes)
    features = torch.randn(BATCH, DIM, generator=gen)
    weight = torch.randn(num_classes, DIM, generator=gen) * 0.3
    labels = torch.randint(0, num_classes, (BATCH,), generator=gen)
    labels[:6] = num_classes - 1  # targets in the last tile, alone there for 17 classes
    labels[6:9] = num_classes + 3  # a class of another shard
    labels[9] = -1  # ignored
    shift, scale = 0.35, 2.0
    row_max, row_sum, target = shard_lse(features, weight, None, labels, scale=scale, target_shift=shift, cosine=False)
    logits = scale * features.double() @ weight.double().t()
    here = (labels >= 0) & (labels < num_classes)
    rows = torch.arange(BATCH)[here]
    logits[rows, labels[here]] -= shift
    expected_target = torch.zeros(BATCH, dtype=torch.float64)
    expected_target[here] = logits[rows, labels[here]]
    assert torch.isfinite(row_max).all() and torch.isfinite(row_sum).all()
    lse = row_max.double() + row_sum.double().log()
    assert torch.allclose(lse, torch.logsumexp(logits, dim=1), rtol=1e-6, atol=1e-6)
    assert torch.allclose(target.double(), expected_target, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn], ids=["fp32", "fp8"])
def test_the_persistent_probs_kernel_writes_the_same_tiles_for_any_number_of_programs(monkeypatch, dtype):
    """Each program of the P kernel walks tiles i, i + programs, ...: one program, a few, or
    more than there are tiles (the launch caps them) write the same bytes, and P is the
    float64 softmax minus the one-hot, times the gradient scale (fp32 rows)."""
    from hydrahead.kernels import exact_gemm, tiles
    from hydrahead.kernels.shard_ce import feature_operand

    gen = torch.Generator().manual_seed(21)
    num_classes, chunk = 83, (5, 76)  # 3 row blocks x 5 class tiles of 16 in the chunk
    features = torch.randn(BATCH, DIM if dtype == torch.float32 else 32, generator=gen)
    weight = (torch.randn(num_classes, features.shape[1], generator=gen) * 0.3).to(dtype)
    labels = torch.randint(0, num_classes, (BATCH,), generator=gen)
    labels[1] = 9  # a target inside the chunk, in the first row block
    operand = feature_operand(features, dtype)
    logits = features.double() @ weight.double().t()
    lse = torch.logsumexp(logits, dim=1)
    options = dict(scale=1.0, target_shift=0.0, cosine=False)
    written = []
    for programs in (1, 2, 7, 1000):
        monkeypatch.setattr(tiles, "_INTERPRETED_PROGRAMS", programs)
        monkeypatch.setattr(exact_gemm, "_PROGRAMS", {})
        grad_scale = torch.full((1,), 0.5)
        probs_pass = exact_gemm._ProbsPass(operand, weight, None, labels, lse.float(), grad_scale, options)
        stored = chunk[1] - chunk[0] if dtype == torch.float32 else 80  # fp8: padded to a multiple of 16
        probs, probs_t = probs_pass.write(chunk[0], chunk[1], stored)
        written.append((probs.view(torch.uint8).clone(), probs_t.view(torch.uint8).clone()))
    for probs, probs_t in written[1:]:
        assert torch.equal(probs, written[0][0]) and torch.equal(probs_t, written[0][1])
    if dtype == torch.float32:
        expected = torch.softmax(logits, dim=1)
        expected[torch.arange(BATCH), labels] -= 1.0
        assert torch.allclose(probs.view(torch.float32).double(), 0.5 * expected[:, chunk[0] : chunk[1]], atol=1e-6)


@pytest.mark.parametrize("cosine", [False, True])
def test_gemm_backward_chunk_by_chunk_equals_one_chunk(monkeypatch, cosine):
    """The gemm backward over classes in 256-row chunks (three here, the last one short)
    gives the one-chunk result: each chunk's P, dF share and update are its own."""
    from hydrahead.kernels.exact_gemm import chunk_classes, exact_backward
    from hydrahead.kernels.shard_ce import inverse_row_norms

    gen = torch.Generator().manual_seed(8)
    features, weight = torch.randn(BATCH, DIM, generator=gen), torch.randn(600, DIM, generator=gen) * 0.3
    labels = torch.randint(0, 600, (BATCH,), generator=gen)
    labels[::4] = -1  # rows without a label here: no onehot entry
    lse = torch.logsumexp(2.0 * features @ weight.t(), dim=1)
    lse[::6] = float("inf")  # ignored rows: P = 0
    inv_norm = inverse_row_norms(weight) if cosine else None
    results = []
    for chunk_mib in ("1024", "0.01"):
        monkeypatch.setenv("HYDRAHEAD_EXACT_CHUNK_MIB", chunk_mib)
        w, buf = weight.clone(), torch.full_like(weight, 0.01)
        update = SGDUpdate(lr=0.5, momentum=0.9, weight_decay=1e-3, momentum_buffer=buf, class_ids=1000)
        grad_feat, _ = exact_backward(
            features, w, inv_norm, labels, lse.contiguous(), scale=2.0, target_shift=0.1, cosine=cosine,
            grad_scale=0.25, update=update,
        )  # fmt: skip
        results.append((chunk_classes(BATCH, torch.float32, 600), grad_feat, w, buf))
    (one, *whole), (many, *chunked) = results
    assert one >= 600 and many == 256
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not torch.equal(whole[1], weight), "the update moved the rows"


@pytest.mark.parametrize("grad_scaled", [True, False])
def test_update_pass_projects_cosine_gradients(grad_scaled):
    """apply_sgd_rows with the rows' 1 / ||w||: the gradient with respect to the unit rows is
    taken through the normalisation inside the pass, as autograd does through w / ||w||
    (float64 reference, SGD with momentum and weight decay, rows in the middle of the shard)."""
    from hydrahead.kernels.filtered import apply_sgd_rows
    from hydrahead.kernels.shard_ce import inverse_row_norms

    gen = torch.Generator().manual_seed(81)
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen) * 0.3
    buffer = torch.randn(NUM_CLASSES, DIM, generator=gen) * 0.01
    lo, hi = 13, 77
    unit_grad = torch.randn(hi - lo, DIM, generator=gen)  # dL/du for u = w / ||w||, rows lo..hi
    inv_norm = inverse_row_norms(weight)
    w64 = weight[lo:hi].double().requires_grad_()
    (w64 / w64.norm(dim=1, keepdim=True) * unit_grad.double()).sum().backward()
    lr, momentum, weight_decay = 0.5, 0.9, 1e-3
    want_buf = momentum * buffer[lo:hi].double() + w64.grad + weight_decay * weight[lo:hi].double()
    want_w = weight[lo:hi].double() - lr * want_buf

    given = unit_grad * inv_norm[lo:hi, None] if grad_scaled else unit_grad  # fp8 rows: 1 / ||w|| not yet applied
    w, buf = weight.clone(), buffer.clone()
    update = SGDUpdate(lr=lr, momentum=momentum, weight_decay=weight_decay, momentum_buffer=buf)
    apply_sgd_rows(w, given, update, lo, inv_norm[lo:hi], grad_scaled=grad_scaled)
    assert rel_err(w[lo:hi] - weight[lo:hi], want_w - weight[lo:hi].double()) < 1e-5
    assert rel_err(buf[lo:hi], want_buf) < 1e-5
    assert torch.equal(w[:lo], weight[:lo]) and torch.equal(w[hi:], weight[hi:]), "rows outside the slice untouched"
    with pytest.raises(ValueError, match="one value per row"):
        apply_sgd_rows(w, given, update, lo, inv_norm[lo : hi - 1])


def test_gemm_chunks_bound_both_the_probabilities_and_the_weight_gradient():
    """A chunk's P (G x chunk) and dW_c (chunk x D; for the cosine projection two float32
    copies, dW_c and the unit rows) both stay within the budget: small batches are bound by
    dW_c, large ones by P."""
    from hydrahead.kernels.exact_gemm import chunk_classes

    mib = 2**20
    fp8 = torch.float8_e4m3fn
    for rows, dtype, cosine in [(256, torch.bfloat16, False), (256, fp8, True), (4096, torch.bfloat16, True)]:
        chunk = chunk_classes(rows, dtype, 1 << 20, 512, cosine)
        p_bytes = rows * chunk * 2  # bf16 P, or fp8's two one-byte copies
        grad_bytes = chunk * 512 * (8 if cosine else 2)
        assert chunk % 256 == 0 and max(p_bytes, grad_bytes) <= 256 * mib
        assert max(p_bytes, grad_bytes) > 128 * mib, "the larger of the two fills the budget"
    assert chunk_classes(256, torch.bfloat16, 1 << 20, 512) == 262144  # dW_c bound: 256 MiB of bf16 rows
    assert chunk_classes(256, torch.bfloat16, 1 << 20) == 524288  # no dW_c: P alone


def test_exact_kernels_choice_is_checked():
    from hydrahead.kernels.exact_gemm import FP8_GEMM_MIN_ROWS, resolve_exact_kernels

    assert resolve_exact_kernels("auto", torch.bfloat16, 24, "cuda") == "gemm"
    assert resolve_exact_kernels("auto", torch.float8_e4m3fn, 512, "cuda", FP8_GEMM_MIN_ROWS) == "gemm"
    assert resolve_exact_kernels("auto", torch.float8_e4m3fn, 512, "cuda", FP8_GEMM_MIN_ROWS - 1) == "stationary"
    assert resolve_exact_kernels("auto", torch.float8_e4m3fn, 24, "cuda", 4096) == "stationary"  # width: no fp8 gemm
    assert resolve_exact_kernels("auto", torch.bfloat16, 512, "cuda", 8) == "gemm"
    assert resolve_exact_kernels("gemm", torch.float8_e4m3fn, 512, "cuda") == "gemm"
    assert resolve_exact_kernels("gemm", torch.float8_e4m3fn, 24, "cpu") == "gemm"
    with pytest.raises(ValueError, match="multiple of 16"):
        resolve_exact_kernels("gemm", torch.float8_e4m3fn, 24, "cuda")
    with pytest.raises(ValueError, match="one of"):
        resolve_exact_kernels("fast", torch.bfloat16)


def _offsets(seed, num_classes=NUM_CLASSES):
    """Per-class logit offsets like the fill correction's: zero on some classes, log(s) on others."""
    gen = torch.Generator().manual_seed(seed)
    offset = torch.rand(num_classes, generator=gen) * 4.0
    offset[::3] = 0.0
    return offset


@pytest.mark.parametrize("margin_type", ["none", "cosface"])
def test_logit_offsets_on_the_gemm_kernels_equal_the_reference(margin_type):
    """head.fill_correction on the fused kernels: the LSE and P passes add each class's offset
    to its logits, as the reference does (loss, dF and dW in float64 against it)."""
    features, weight, labels = make_inputs(41)
    offset = _offsets(42)
    scale, margin = MARGINS[margin_type]
    options = dict(num_classes=NUM_CLASSES, scale=scale, margin=margin, margin_type=margin_type)
    f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = triton_sharded_cross_entropy(f, w, labels, 0, exact_kernels="gemm", logit_offset=offset, **options)
    loss.backward()
    f64, w64 = features.double().requires_grad_(), weight.double().requires_grad_()
    ref_loss = sharded_cross_entropy(f64, w64, labels, 0, logit_offset=offset.double(), **options)
    ref_loss.backward()
    plain = sharded_cross_entropy(features.double(), weight.double(), labels, 0, **options)
    assert abs(float(ref_loss.detach()) - float(plain)) > 0.1  # the offsets change the loss
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
    assert rel_err(f.grad, f64.grad) < 1e-5
    assert rel_err(w.grad, w64.grad) < 1e-5


def test_logit_offsets_reach_the_fused_update():
    """With the SGD step in the backward, the rows move by the offset loss's gradient."""
    features, weight, labels = make_inputs(43)
    offset = _offsets(44)
    lr, momentum, weight_decay = 0.5, 0.9, 5e-4
    w = weight.clone()
    buf = torch.zeros_like(weight)
    update = SGDUpdate(lr=lr, momentum=momentum, weight_decay=weight_decay, momentum_buffer=buf)
    f = features.clone().requires_grad_()
    loss = triton_sharded_cross_entropy(
        f, w, labels, 0, scale=2.0, update=update, exact_kernels="gemm", logit_offset=offset
    )
    loss.backward()
    w64 = weight.double().requires_grad_()
    sharded_cross_entropy(features.double(), w64, labels, 0, scale=2.0, logit_offset=offset.double()).backward()
    want = weight.double() - lr * (w64.grad + weight_decay * weight.double())  # a fresh buffer: buf = grad + wd w
    assert rel_err(w - weight, want - weight.double()) < 1e-5


def test_logit_offsets_are_refused_where_the_kernels_take_none():
    features, weight, labels = make_inputs(45)
    offset = _offsets(46)
    for options in (dict(grad_filter=1e-3), dict(exact_kernels="stationary")):
        with pytest.raises(ValueError, match="exact gemm kernels"):
            triton_sharded_cross_entropy(features, weight, labels, 0, logit_offset=offset, **options)
    with pytest.raises(ValueError, match="one value per class"):
        triton_sharded_cross_entropy(features, weight, labels, 0, logit_offset=offset[:-1], exact_kernels="gemm")


def _offset_shard_worker(rank, world_size):
    features, weight, labels = make_inputs(47)
    offset = _offsets(48)
    start, stop = shard_range(NUM_CLASSES, world_size, rank)
    f, w = features.clone().requires_grad_(), weight[start:stop].clone().requires_grad_()
    loss = triton_sharded_cross_entropy(
        f,
        w,
        labels,
        start,
        scale=16.0,
        margin=0.3,
        margin_type="cosface",
        exact_kernels="gemm",
        logit_offset=offset[start:stop],
    )
    loss.backward()
    return loss.detach(), f.grad, w.grad


def test_logit_offsets_on_three_shards_merge_like_one_device():
    results = run_ranks(_offset_shard_worker, 3)
    features, weight, labels = make_inputs(47)
    f64, w64 = features.double().requires_grad_(), weight.double().requires_grad_()
    options = dict(scale=16.0, margin=0.3, margin_type="cosface")
    ref_loss = sharded_cross_entropy(f64, w64, labels, 0, logit_offset=_offsets(48).double(), **options)
    ref_loss.backward()
    for loss, _, _ in results:
        assert abs(float(loss) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
    assert rel_err(sum(r[1] for r in results), f64.grad) < 1e-5
    assert rel_err(torch.cat([r[2] for r in results]), w64.grad) < 1e-5


def test_preflight_compiles_the_offset_variants_only_when_asked(monkeypatch):
    """check_fused_kernels(logit_offsets=True) (head.fill_correction) runs the gemm path's LSE
    and P passes with offsets too, so they compile before training."""
    from hydrahead.kernels import fused_loss

    seen = []
    shard_lse = fused_loss.filtered_kernels.shard_lse

    def recording(*args, logit_offset=None, **kwargs):
        seen.append(logit_offset is not None)
        return shard_lse(*args, logit_offset=logit_offset, **kwargs)

    monkeypatch.setattr(fused_loss.filtered_kernels, "shard_lse", recording)
    options = dict(cosine=False, momentum_dtype=torch.float32, compensation_dtype=None, exact_kernels="gemm")
    fused_loss.preflight(torch.float32, 16, torch.device("cpu"), **options)
    assert seen and not any(seen)
    seen.clear()
    fused_loss.preflight(torch.float32, 16, torch.device("cpu"), logit_offsets=True, **options)
    assert any(seen) and not all(seen)


def test_offsets_that_the_kernels_cannot_read_are_refused():
    from hydrahead.kernels.filtered import shard_lse

    features, weight, labels = make_inputs(49)
    wide = torch.zeros(NUM_CLASSES * 2)[::2]  # a strided view: read by class index it would be misread
    for offset in (wide, torch.zeros(NUM_CLASSES, dtype=torch.float64), torch.zeros(NUM_CLASSES - 1)):
        with pytest.raises(ValueError, match="logit_offset must be a contiguous float32"):
            shard_lse(features, weight, None, labels, scale=1.0, target_shift=0.0, cosine=False, logit_offset=offset)


@pytest.mark.parametrize("grad_filter", [0.0, 1e-3])
def test_preflight_compiles_the_update_with_and_without_the_loss_verdict(grad_filter, monkeypatch):
    """The loss's gated update (SGDUpdate.skip, every step of the gemm and filtered paths) and
    the plain one (micro-batches) are different kernel variants: preflight runs both."""
    from hydrahead.kernels import filtered, fused_loss

    seen = []
    launch = filtered._launch_sgd

    def recording(weight, update, *args, **kwargs):
        seen.append(update.skip is not None)
        return launch(weight, update, *args, **kwargs)

    monkeypatch.setattr(filtered, "_launch_sgd", recording)
    options = dict(cosine=False, momentum_dtype=torch.float32, compensation_dtype=None, exact_kernels="gemm")
    fused_loss.preflight(torch.float32, 16, torch.device("cpu"), grad_filter=grad_filter, **options)
    assert True in seen and False in seen

"""bf16 fused kernels on a GPU against a float64 reference, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from test_kernels import MARGINS as CPU_MARGINS
from test_kernels import masked_reference, rel_err
from test_pingpong import consumer_stats

from hydrahead.kernels import SGDUpdate, triton_sharded_cross_entropy

pytestmark = pytest.mark.gpu
MARGINS = {"none": (1.0, 0.0), "cosface": (32.0, 0.3)}


def inputs(seed, batch=512, dim=512, num_classes=50_001):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, dim, generator=gen)
    weight = torch.randn(num_classes, dim, generator=gen) * 0.05
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    labels[::7] = -100
    return features.bfloat16(), weight.bfloat16(), labels


def float64_reference(features, weight, labels, margin_type):
    """Loss, dF, dW in float64 on the GPU from the bf16 inputs (the reference's exact math)."""
    from hydrahead.head import sharded_cross_entropy

    scale, margin = MARGINS[margin_type]
    f = features.cuda().double().requires_grad_()
    w = weight.cuda().double().requires_grad_()
    loss = sharded_cross_entropy(
        f, w, labels.cuda(), 0, scale=scale, margin=margin, margin_type=margin_type, chunk_size=8192
    )
    loss.backward()
    return loss.detach(), f.grad, w.grad


@pytest.mark.parametrize("exact_kernels", ["gemm", "stationary"])
@pytest.mark.parametrize("margin_type", ["none", "cosface"])
def test_bf16_gradients_within_bf16_error(margin_type, exact_kernels):
    features, weight, labels = inputs(11 if margin_type == "none" else 12)
    scale, margin = MARGINS[margin_type]
    f, w = features.cuda().requires_grad_(), weight.cuda().requires_grad_()
    loss = triton_sharded_cross_entropy(
        f, w, labels.cuda(), 0, scale=scale, margin=margin, margin_type=margin_type, exact_kernels=exact_kernels
    )
    loss.backward()
    ref_loss, ref_fgrad, ref_wgrad = float64_reference(features, weight, labels, margin_type)
    assert abs(float(loss) - float(ref_loss)) < 5e-3 * abs(float(ref_loss))
    assert rel_err(f.grad, ref_fgrad) < 2e-2
    assert rel_err(w.grad, ref_wgrad) < 2e-2


@pytest.mark.parametrize("exact_kernels", ["gemm", "stationary"])
@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.bfloat16])
def test_bf16_fused_update_follows_the_float64_step(buffer_dtype, exact_kernels):
    features, weight, labels = inputs(13)
    _, _, ref_wgrad = float64_reference(features, weight, labels, "cosface")
    lr, momentum, weight_decay = 0.5, 0.9, 5e-4
    buffer = (torch.randn(weight.shape, generator=torch.Generator().manual_seed(14)) * 1e-4).cuda()
    w64 = weight.cuda().double()
    ref_buf = momentum * buffer.double() + ref_wgrad + weight_decay * w64
    ref_delta = -lr * ref_buf

    w = weight.cuda().clone()
    buf = buffer.to(buffer_dtype).clone()
    scale, margin = MARGINS["cosface"]
    f = features.cuda().requires_grad_()  # the backward, where the update happens, needs a graph
    loss = triton_sharded_cross_entropy(
        f,
        w,
        labels.cuda(),
        0,
        scale=scale,
        margin=margin,
        margin_type="cosface",
        update=SGDUpdate(lr=lr, momentum=momentum, weight_decay=weight_decay, momentum_buffer=buf),
        exact_kernels=exact_kernels,
    )
    loss.backward()
    assert rel_err(buf, ref_buf) < 2e-2
    # bf16 weights take the fp32 step rounded to nearest: most steps are below bf16's
    # resolution at |w| (that is what stochastic rounding is for), so compare with the
    # float64 result rounded the same way.
    expected = (w64 + ref_delta).bfloat16()
    assert float((w == expected).float().mean()) > 0.99
    assert float((w.double() - (w64 + ref_delta)).abs().max()) <= float(w64.abs().max()) * 2**-7


@pytest.mark.parametrize("threshold", [2.0**-12, 1e-4])
def test_bf16_filtered_step_follows_the_float64_masked_step(threshold):
    """The filtered path against float64 with the same entries dropped (entries at the threshold may flip)."""
    features, weight, labels = inputs(16)
    scale, margin = CPU_MARGINS["cosface"]
    ref_loss, ref_fgrad, ref_wgrad, kept = masked_reference(
        features.cuda(), weight.cuda(), labels.cuda(), "cosface", threshold
    )
    assert 0 < float((kept != 0).double().mean()) < 0.01
    lr, momentum, weight_decay = 0.5, 0.9, 5e-4
    w, buf = weight.cuda().clone(), torch.zeros(weight.shape, device="cuda")
    f = features.cuda().requires_grad_()
    loss = triton_sharded_cross_entropy(
        f,
        w,
        labels.cuda(),
        0,
        scale=scale,
        margin=margin,
        margin_type="cosface",
        grad_filter=threshold,
        update=SGDUpdate(lr=lr, momentum=momentum, weight_decay=weight_decay, momentum_buffer=buf),
    )
    loss.backward()
    assert abs(float(loss) - float(ref_loss)) < 5e-3 * abs(float(ref_loss))
    assert rel_err(f.grad, ref_fgrad) < 2e-2
    ref_buf = ref_wgrad + weight_decay * weight.cuda().double()  # a zero buffer: the first step sets it
    assert rel_err(buf, ref_buf) < 2e-2


@pytest.mark.parametrize("grad_filter", [0.0, 2.0**-12])
def test_large_shard_indexes_past_two_to_the_31(grad_filter):
    """4.3M classes x 512 = 2.2e9 elements: row offsets must be 64-bit (exact and filtered kernels)."""
    num_classes, dim = 4_300_000, 512
    gen = torch.Generator(device="cuda").manual_seed(15)
    weight = (torch.randn(num_classes, dim, device="cuda", generator=gen) * 0.05).bfloat16()
    features = torch.randn(64, dim, device="cuda", generator=gen).bfloat16()
    labels = torch.tensor([num_classes - 1 - i for i in range(64)], device="cuda")  # rows past 2^31 / D
    f = features.clone().requires_grad_()
    w = weight.requires_grad_()
    loss = triton_sharded_cross_entropy(f, w, labels, 0, grad_filter=grad_filter)
    loss.backward()
    z = features.float() @ weight.detach().float().t()
    ref = torch.nn.functional.cross_entropy(z, labels)
    assert abs(float(loss) - float(ref)) < 1e-2 * abs(float(ref))
    tail = w.grad[-64:].float()
    assert float(tail.abs().max()) > 0 and torch.isfinite(tail).all()


@pytest.mark.parametrize("normalize, given_norms", [(False, False), (True, False), (True, True)])
def test_bf16_probed_list_scores_match_float64(normalize, given_norms):
    """The IVF scoring kernel on bf16 rows: each query against its probed lists' rows."""
    import math

    from hydrahead.head.index import _padded_lists
    from hydrahead.kernels.ivf_scores import probed_list_scores

    gen = torch.Generator().manual_seed(5)
    num_rows, dim, batch, nlist, nprobe = 20_011, 200, 300, 97, 6
    weight = (torch.randn(num_rows, dim, generator=gen) * 0.05).bfloat16().cuda()
    queries = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1).cuda()
    table = _padded_lists(torch.randint(0, nlist, (num_rows,), generator=gen).cuda(), nlist)
    probes = torch.stack([torch.randperm(nlist, generator=gen)[:nprobe] for _ in range(batch)]).cuda()
    inv_norms = torch.linalg.vector_norm(weight.float(), dim=1).reciprocal() if given_norms else None
    out = probed_list_scores(weight, queries, table, probes, normalize=normalize, inv_norms=inv_norms)
    w = weight.double()
    if normalize:
        w = torch.nn.functional.normalize(w, dim=1)
    candidates = table[probes].reshape(batch, -1)
    q = queries.bfloat16().double()  # the kernel multiplies in the rows' dtype
    ref = (w[candidates.clamp(min=0)] * q[:, None, :]).sum(-1).masked_fill(candidates < 0, -math.inf)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    assert (out.double()[finite] - ref[finite]).abs().max() < 1e-3 * ref[finite].abs().max()


def test_a_rebuilt_table_of_another_width_compiles_no_new_scoring_kernel():
    """A rebuild changes the longest list, so the table's width and row stride: a variant
    compiled for it mid-training stalls that step by a compile (about 0.5 s measured)."""
    from hydrahead.head.index import _padded_lists
    from hydrahead.kernels import ivf_scores

    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(600, 64, generator=gen).bfloat16().cuda()
    queries = torch.nn.functional.normalize(torch.randn(32, 64, generator=gen), dim=1).cuda()
    probes = torch.randint(0, 40, (32, 4), generator=gen).cuda()
    kernel_cache = ivf_scores._probed_scores_kernel.device_caches[torch.cuda.current_device()][0]
    widths = set()
    for width in (33, 48, 61, 64, 100, 112):  # widths that are and are not multiples of 16
        assign = torch.randint(1, 40, (600,), generator=gen)  # about 15 rows a list
        assign[:width] = 0  # list 0, of `width` rows, is the longest
        table = _padded_lists(assign.cuda(), 40)
        widths.add(table.shape[1])
        ivf_scores.probed_list_scores(weight, queries, table, probes)
        if len(widths) == 1:
            compiled = len(kernel_cache)
    torch.cuda.synchronize()
    assert widths == {33, 48, 61, 64, 100, 112}
    assert len(kernel_cache) == compiled


def test_gpu_ivf_search_agrees_with_the_gathered_search():
    """TorchIVFIndex on CUDA (per-list kernel) finds what the per-query gather finds."""
    from hydrahead.head.index import TorchIVFIndex

    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(50_000, 64, generator=gen).cuda()
    queries = torch.nn.functional.normalize(weight[:256] + 0.3 * torch.randn(256, 64, generator=gen).cuda(), dim=1)
    index = TorchIVFIndex(nlist=200, nprobe=8, cosine=True, copy_weights=False)
    index.build(weight)
    q = queries.float()
    probes = (q @ index._centroids.T).topk(8, dim=1).indices
    ref_scores, ref_rows = index._search_gathered(q, 10, weight, probes)
    inv_norms = torch.linalg.vector_norm(weight, dim=1).reciprocal()
    for norms in (None, inv_norms):  # norms summed by the kernel, or kept by the caller
        scores, rows = index.search(queries, 10, weight, row_inv_norms=norms)
        # The kernel's fp32 products go through TF32 tensor cores: only near-ties may swap.
        assert (rows == ref_rows).float().mean() > 0.95
        assert torch.allclose(scores, ref_scores, atol=5e-3)


# ---- FP8 weights: the kernels against the emulation of their arithmetic, and against float64


def fp8_problem(seed, margin_type, batch=512, dim=512, num_classes=20_001):
    from hydrahead.distributed.sharded_softmax import normalize_rows
    from hydrahead.kernels.shard_ce import feature_operand, inverse_row_norms

    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, dim, generator=gen).cuda()
    weight = torch.randn(num_classes, dim, generator=gen).cuda().to(torch.float8_e4m3fn)  # unit variance
    labels = torch.randint(0, num_classes, (batch,), generator=gen).cuda()
    labels[::7] = -1
    cosine = margin_type == "cosface"
    if cosine:
        features, _ = normalize_rows(features)
    scale = 32.0 if cosine else 1.0 / dim**0.5
    options = dict(scale=scale, target_shift=scale * 0.3 if cosine else 0.0)
    return (
        feature_operand(features, weight.dtype),
        weight,
        inverse_row_norms(weight) if cosine else None,
        labels,
        options,
    )


@pytest.mark.parametrize("margin_type", ["none", "cosface"])
def test_fp8_kernels_follow_the_emulation_of_their_arithmetic(margin_type):
    from fp8_emulation import emulate_forward, emulate_weight_gradient

    from hydrahead.kernels.shard_ce import shard_forward, shard_weight_backward

    op, weight, inv_norm, labels, options = fp8_problem(21, margin_type)
    cosine = inv_norm is not None
    got = shard_forward(op, weight, inv_norm, labels, cosine=cosine, **options)
    want = emulate_forward(op, weight, inv_norm, labels, **options)
    # Differences: float32 summation order, the tensor cores' fast accumulation inside one
    # 512-deep logit product, and the e5m2 roundings those flip.
    for name, g, w in zip(("max", "sum", "target", "A"), got, want):
        assert rel_err(g, w) < 5e-3, name
    lse = (got[0] + torch.log(got[1])).contiguous()
    grad = shard_weight_backward(
        op, weight, inv_norm, labels, lse, cosine=cosine, grad_scale=1e-2, update=None, **options
    )
    assert rel_err(grad, emulate_weight_gradient(op, weight, inv_norm, labels, lse, grad_scale=1e-2, **options)) < 5e-3


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fp8_fused_update_follows_the_emulation(rounding):
    from fp8_emulation import emulate_update, emulate_weight_gradient

    from hydrahead.kernels.shard_ce import shard_forward, shard_weight_backward

    op, weight, _, labels, options = fp8_problem(22, "none")
    row_max, row_sum, _, _ = shard_forward(op, weight, None, labels, cosine=False, **options)
    lse = (row_max + torch.log(row_sum)).contiguous()
    grad = emulate_weight_gradient(op, weight, None, labels, lse, grad_scale=1.0, **options)
    buffer = torch.zeros(weight.shape, device="cuda", dtype=torch.bfloat16)
    compensation = torch.zeros(weight.shape, device="cuda", dtype=torch.bfloat16)
    hyper = dict(lr=3.0, momentum=0.9, weight_decay=5e-4)
    want, _, _ = emulate_update(
        weight,
        grad,
        buffer=buffer.clone(),
        rounding=rounding,
        seed=2,
        step=9,
        class_ids=torch.arange(weight.shape[0], device="cuda") + 7,
        compensation=compensation.clone(),
        **hyper,
    )
    w = weight.clone()
    update = SGDUpdate(
        momentum_buffer=buffer, rounding=rounding, seed=2, step=9, class_ids=7, compensation=compensation, **hyper
    )
    shard_weight_backward(op, w, None, labels, lse, cosine=False, grad_scale=1.0, update=update, **options)
    moved = (w.float() != weight.float()).float().mean()
    assert float(moved) > 0.05
    assert float((w.float() != want.float()).float().mean()) < 0.01 * float(moved)


def test_fp8_step_follows_float64_within_fp8_error():
    from hydrahead.head import sharded_cross_entropy

    op, weight, _, labels, options = fp8_problem(23, "none")
    features = op.values.float() * op.row_scale[:, None]  # what the kernels see
    f = features.clone().requires_grad_()
    loss = triton_sharded_cross_entropy(f, weight, labels.clamp(min=0), 0, scale=options["scale"])
    loss.backward()
    f64 = features.double().requires_grad_()
    ref = sharded_cross_entropy(f64, weight.double(), labels.clamp(min=0), 0, scale=options["scale"], chunk_size=8192)
    ref.backward()
    assert abs(float(loss) - float(ref)) < 1e-3 * float(ref)
    assert rel_err(f.grad, f64.grad) < 0.05


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_updates_below_half_an_ulp_move_weights_only_with_stochastic_rounding(dtype):
    """The fused update with weights at 1.0 and a constant step far below half their ulp."""
    from hydrahead.kernels.shard_ce import feature_operand, shard_weight_backward

    rows, dim = 4096, 128
    features = torch.zeros(8, dim, device="cuda")
    labels = torch.full((8,), -1, device="cuda")
    lse = torch.full((8,), float("inf"), device="cuda")  # no gradient: weight decay alone moves them
    op = feature_operand(features, dtype)
    step = 1e-2 * (2.0**-3 if dtype == torch.float8_e4m3fn else 2.0**-7)  # 1% of the ulp at 1.0
    moved = {}
    for rounding in ("nearest", "stochastic"):
        w = torch.ones(rows, dim, device="cuda").to(dtype)
        for t in range(50):
            update = SGDUpdate(lr=1.0, weight_decay=-step, rounding=rounding, seed=0, step=t)  # w += step each time
            shard_weight_backward(
                op, w, None, labels, lse, scale=1.0, target_shift=0.0, cosine=False, grad_scale=1.0, update=update
            )
        moved[rounding] = float(w.float().mean()) - 1.0
    assert moved["nearest"] == 0.0
    expected = 50 * step
    assert abs(moved["stochastic"] - expected) < 0.05 * expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_round_to_storage_on_the_gpu_equals_the_torch_path(dtype, rounding):
    """On CUDA the head's round_to_storage takes the one-launch kernel: the same values as the torch path on the CPU."""
    from hydrahead.head.classifier import round_to_storage
    from hydrahead.optim.low_precision import LowPrecisionUpdate

    gen = torch.Generator().manual_seed(9)
    exact = torch.randn(3000, 512, generator=gen) * torch.exp2(torch.randint(-12, 9, (3000, 1), generator=gen).float())
    class_ids = torch.randint(0, 2**32 - 1, (3000,), generator=gen)
    how = LowPrecisionUpdate(rounding, seed=5, step=12, salt=1)
    on_gpu = round_to_storage(exact.cuda(), dtype, class_ids.cuda(), how)
    on_cpu = round_to_storage(exact, dtype, class_ids, how)
    assert on_gpu.dtype == dtype and torch.equal(on_gpu.cpu().float(), on_cpu.float())


# ----------------------------------------------------------------------------------------
# Every storage dtype at every width: the kernels compile, run and agree with float64
# ----------------------------------------------------------------------------------------

SWEEP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}
# relative error against float64 of the loss, dF and dW: fp32 runs in IEEE fp32; bf16 and
# e4m3 operands (e5m2 softmax weights in the fp8 weight kernel) allow their resolution
SWEEP_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp8_e4m3": 0.1}


def _masked_float64(features, weight, labels, scale, threshold):
    """Loss, dF, dW in float64 with entries |softmax - onehot| < threshold dropped (0: none)."""
    f, w = features.double().requires_grad_(), weight.double().requires_grad_()
    z = scale * f @ w.t()
    onehot = torch.nn.functional.one_hot(labels, w.shape[0]).double()
    loss = (torch.logsumexp(z, dim=1) - (z * onehot).sum(dim=1)).mean()
    p = (torch.softmax(z, dim=1) - onehot).detach()
    p = torch.where(p.abs() >= threshold, p, 0.0)
    (p * z).sum().div(len(labels)).backward()
    return loss.detach(), f.grad, w.grad


SWEEP_MODES = {"exact-gemm": (0.0, "gemm"), "exact-stationary": (0.0, "stationary"), "filtered": (2.0**-12, "auto")}


@pytest.mark.parametrize("mode", list(SWEEP_MODES))
@pytest.mark.parametrize("dim", [64, 128, 256, 384, 512, 768, 1024])
@pytest.mark.parametrize("dtype_name", list(SWEEP_DTYPES))
def test_every_storage_dtype_and_width_runs_against_float64(dtype_name, dim, mode):
    """Odd G and C_r; unit-variance rows and logits scaled by 2/sqrt(D) (unit scaling), so
    the softmax is neither flat nor one-hot. dW is read from the fused update's momentum
    buffer (momentum 0.9 from zero: the buffer is the gradient)."""
    dtype = SWEEP_DTYPES[dtype_name]
    grad_filter, exact_kernels = SWEEP_MODES[mode]
    gen = torch.Generator().manual_seed(dim + len(dtype_name))
    num_rows, num_classes = 33, 1001
    features = torch.randn(num_rows, dim, generator=gen).cuda()
    weight = torch.randn(num_classes, dim, generator=gen).to(dtype).cuda()
    labels = torch.randint(0, num_classes, (num_rows,), generator=gen).cuda()
    scale = 2.0 / dim**0.5
    # what the kernels multiply: features in the weights' dtype (e4m3 rows with a scale each)
    operand = features.to(torch.bfloat16).float() if dtype == torch.bfloat16 else features
    ref_loss, ref_fgrad, ref_wgrad = _masked_float64(operand, weight.float(), labels, scale, grad_filter)

    buffer = torch.zeros(weight.shape, device="cuda")
    f = features.clone().requires_grad_()
    update = SGDUpdate(lr=1e-3, momentum=0.9, weight_decay=0.0, momentum_buffer=buffer)
    loss = triton_sharded_cross_entropy(
        f,
        weight,
        labels,
        0,
        num_classes=num_classes,
        scale=scale,
        update=update,
        grad_filter=grad_filter,
        exact_kernels=exact_kernels,
    )
    loss.backward()
    tolerance = SWEEP_TOLERANCE[dtype_name] * (2 if grad_filter else 1)  # entries at the threshold may flip
    assert abs(float(loss) - float(ref_loss)) < tolerance * abs(float(ref_loss))
    assert rel_err(f.grad, ref_fgrad) < tolerance
    assert rel_err(buffer, ref_wgrad) < tolerance


FIT_CHECK = """
import torch, triton
from hydrahead.head import ShardedClassifier

utils = triton.runtime.driver.active.utils
real = utils.get_device_properties
utils.get_device_properties = lambda device: {**real(device), "max_shared_mem": 1024}
head = ShardedClassifier(1001, 80, dtype=torch.float32, impl="triton", momentum=0.9, device="cuda")
try:
    head.check_fused_kernels()
except ValueError as error:
    print(error)
"""


def test_a_storage_the_gpu_cannot_hold_fails_before_training():
    """If no tile shape fits (forced here: the GPU is said to have 1 KB of shared memory,
    which Triton then enforces), the head's check says so before any step runs.

    In a fresh process, as the trainer's check runs: Triton checks shared memory when it
    first loads a compiled kernel, so a variant that an earlier test loaded here would pass."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", FIT_CHECK], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cannot hold torch.float32 rows of width 80" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.parametrize("margin_type", ["none", "cosface"])
def test_bf16_logit_offsets_follow_float64(margin_type):
    """head.fill_correction on the GPU's gemm kernels: loss and gradients within bf16 error."""
    from hydrahead.head import sharded_cross_entropy

    features, weight, labels = inputs(33)
    gen = torch.Generator().manual_seed(34)
    offset = torch.rand(weight.shape[0], generator=gen) * 6.0
    offset[::3] = 0.0
    scale, margin = MARGINS[margin_type]
    options = dict(scale=scale, margin=margin, margin_type=margin_type)
    f, w = features.cuda().requires_grad_(), weight.cuda().requires_grad_()
    loss = triton_sharded_cross_entropy(
        f, w, labels.cuda(), 0, exact_kernels="gemm", logit_offset=offset.cuda(), **options
    )
    loss.backward()
    f64, w64 = features.cuda().double().requires_grad_(), weight.cuda().double().requires_grad_()
    ref = sharded_cross_entropy(
        f64, w64, labels.cuda(), 0, logit_offset=offset.cuda().double(), chunk_size=8192, **options
    )
    ref.backward()
    assert abs(float(loss) - float(ref)) < 5e-3 * abs(float(ref))
    assert rel_err(f.grad, f64.grad) < 2e-2
    assert rel_err(w.grad, w64.grad) < 2e-2


@pytest.mark.parametrize("margin_type", ["none", "cosface"])
def test_bf16_micro_batches_with_logit_offsets_follow_float64(margin_type):
    """comm.overlap with head.fill_correction on the GPU: the micro-batches' loss and dF and
    the step's dW (finish without an update) within bf16 error."""
    from hydrahead.comm.overlap import micro_batch_bounds
    from hydrahead.head import sharded_cross_entropy
    from hydrahead.kernels.fused_loss import FusedMicroBatches

    features, weight, labels = inputs(36)
    offset = torch.rand(weight.shape[0], generator=torch.Generator().manual_seed(37)) * 6.0
    scale, margin = MARGINS[margin_type]
    options = dict(scale=scale, margin=margin, margin_type=margin_type)
    engine = FusedMicroBatches(
        weight.cuda(), labels.cuda(), 0, exact_kernels="gemm", logit_offset=offset.cuda(), **options
    )
    grads = torch.empty(features.shape, dtype=features.dtype, device="cuda")
    loss_sum = 0.0
    for start, stop in micro_batch_bounds(features.shape[0], 3):
        rows = torch.arange(start, stop, device="cuda")
        chunk_loss, grads[start:stop] = engine.chunk(features[start:stop].cuda(), rows)
        loss_sum += float(chunk_loss)
    engine.check()
    grad_weight = engine.finish()
    loss = loss_sum / float(engine.num_valid)

    f64, w64 = features.cuda().double().requires_grad_(), weight.cuda().double().requires_grad_()
    ref = sharded_cross_entropy(
        f64, w64, labels.cuda(), 0, logit_offset=offset.cuda().double(), chunk_size=8192, **options
    )
    ref.backward()
    assert abs(loss - float(ref)) < 5e-3 * abs(float(ref))
    assert rel_err(grads, f64.grad) < 2e-2
    assert rel_err(grad_weight, w64.grad) < 2e-2


def test_fp8_logit_offsets_follow_float64_within_fp8_error():
    from hydrahead.head import sharded_cross_entropy

    op, weight, _, labels, options = fp8_problem(35, "none")
    features = op.values.float() * op.row_scale[:, None]  # what the kernels see
    offset = torch.rand(weight.shape[0], device="cuda") * 6.0
    f = features.clone().requires_grad_()
    loss = triton_sharded_cross_entropy(
        f, weight, labels.clamp(min=0), 0, scale=options["scale"], exact_kernels="gemm", logit_offset=offset
    )
    loss.backward()
    f64 = features.double().requires_grad_()
    ref = sharded_cross_entropy(
        f64,
        weight.double(),
        labels.clamp(min=0),
        0,
        scale=options["scale"],
        chunk_size=8192,
        logit_offset=offset.double(),
    )
    ref.backward()
    assert abs(float(loss) - float(ref)) < 1e-3 * float(ref)
    assert rel_err(f.grad, f64.grad) < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_a_settle_in_one_kernel_follows_the_torch_settle(dtype, monkeypatch):
    """On the GPU a product and a sum may fuse into one rounding, so a few rows may differ
    from the torch path's in their last bit; the rest is the same, buffer included."""
    from hydrahead.head import ShardedClassifier
    from hydrahead.kernels import deferred as deferred_kernels

    calls, pay = [], deferred_kernels.pay_rows_in_place
    monkeypatch.setattr(deferred_kernels, "pay_rows_in_place", lambda *a, **kw: calls.append(1) or pay(*a, **kw))
    settled = {}
    for one_kernel in (False, True):
        head = ShardedClassifier(
            100_003,
            512,
            seed=5,
            init_std=0.5,
            dtype=dtype,
            device="cuda",
            momentum=0.9,
            weight_decay=1e-3,
            rounding="stochastic",
        )
        head.set_lr(0.5)
        gen = torch.Generator().manual_seed(8)
        for step in (1, 2, 3):
            rows = torch.randperm(100_003, generator=gen)[:20_000].sort().values.cuda()
            head.set_step(step)
            head.loss(torch.randn(rows.numel(), 512, generator=gen).cuda(), rows, rows).backward()
            head.finish_step()
        monkeypatch.setattr(ShardedClassifier, "_pays_in_one_kernel", lambda self, on=one_kernel, **_: on)
        head.settle()
        assert len(calls) == int(one_kernel)  # the torch path, then the one pass
        settled[one_kernel] = head.weight.detach().float(), head.momentum_buffer.clone()
    (w_torch, b_torch), (w_kernel, b_kernel) = settled[False], settled[True]
    assert float((w_kernel != w_torch).float().mean()) < 1e-3
    assert rel_err(b_kernel, b_torch) < 1e-6


@pytest.mark.parametrize("by_pairs", [True, False])
def test_group_topk_in_bf16_finds_the_best_rows_of_each_group(by_pairs, monkeypatch):
    """The grouped top-k kernel with bf16 operands at the tiles the GPU takes (128 x 128),
    its second pass by (query, tile) pairs or by tiles: each returned score is its row's
    float64 score, and the k-th found is the float64 k-th up to bf16 near-ties."""
    from hydrahead.kernels import group_topk as gt

    monkeypatch.setattr(gt, "BY_PAIRS", by_pairs)

    gen = torch.Generator().manual_seed(21)
    rows = torch.nn.functional.normalize(torch.randn(40_000, 512, generator=gen), dim=1)
    rows[1000:1004] = rows[999] + 0.01 * torch.randn(4, 512, generator=gen)  # a family in one tile
    queries = torch.nn.functional.normalize(rows[torch.randint(0, 40_000, (5000,), generator=gen)], dim=1)
    queries[0] = rows[999]
    q, r = queries.cuda().bfloat16(), rows.cuda().bfloat16()
    bounds = ([0, 3000, 3000, 4000], [3000, 3000, 4000, 5000], [0, 0, 12_288, 27_000], [12_288, 5, 27_000, 40_000])
    stats = {}
    scores, positions = gt.group_topk(q, r, *bounds, 17, stats=stats)
    want, _ = gt.group_topk_reference(q.double(), r.double(), *bounds, 17)
    found = torch.einsum("qd,qkd->qk", q.double(), r.double()[positions])
    torch.testing.assert_close(scores.double(), found, rtol=0, atol=2e-5)
    assert (scores.double()[:, -1] - want[:, -1]).abs().max() < 2e-5
    assert set(positions[0, :5].tolist()) == {999, 1000, 1001, 1002, 1003}
    assert stats["searched_again"] == 0 and stats["survivors_mean"] < 64


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_a_captured_step_follows_an_lr_and_step_changed_between_replays(weight_dtype):
    """The fused step (gemm path, SGD in the backward) captured once in a CUDA graph with its
    lr and step held in device tensors, replayed three times with both changed in place
    between replays, leaves W and its buffer where three eager steps with those numbers do
    (stochastic rounding for fp8 rows: the draws follow the step)."""
    from hydrahead.distributed.sharded_softmax import MergeChecks

    features, weight, labels = inputs(21, batch=256, num_classes=20_001)
    weight, labels, features = weight.cuda().to(weight_dtype), labels.cuda(), features.cuda()
    rounding = "stochastic" if weight_dtype == torch.float8_e4m3fn else "nearest"
    schedule = [(0.5, 100), (0.3, 101), (0.1, 102)]

    def run(w, buf, lr, step):
        f = features.clone().requires_grad_() if static_f is None else static_f
        f.grad = None
        update = SGDUpdate(
            lr=lr, step=step, momentum=0.9, weight_decay=5e-4, momentum_buffer=buf, rounding=rounding, seed=7
        )
        loss = triton_sharded_cross_entropy(
            f, w, labels, 0, scale=1.0, update=update, exact_kernels="gemm", checks=MergeChecks()
        )
        loss.backward()
        return loss

    static_f = None
    eager_w, eager_buf = weight.clone(), torch.zeros(weight.shape, device="cuda")
    for lr, step in schedule:
        run(eager_w, eager_buf, lr, step)

    static_f = features.clone().requires_grad_()
    lr_t, step_t = torch.tensor([0.0], device="cuda"), torch.tensor([0], device="cuda")
    w, buf = weight.clone(), torch.zeros(weight.shape, device="cuda")
    scratch_w, scratch_buf = weight.clone(), torch.zeros(weight.shape, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiled and allocated outside the capture, on rows that are then dropped
        run(scratch_w, scratch_buf, lr_t, step_t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(w, buf, lr_t, step_t)
    torch.cuda.synchronize()
    assert torch.equal(w.view(torch.uint8), weight.view(torch.uint8)), "capturing runs nothing"
    for lr, step in schedule:
        lr_t.fill_(lr)
        step_t.fill_(step)
        graph.replay()
    torch.cuda.synchronize()
    # the same kernels on the same inputs; cuBLAS may pick another split inside a graph, which
    # can move a float32 sum by an ulp and flip a rounding: a few entries at most
    assert float((w.view(torch.uint8) != eager_w.view(torch.uint8)).float().mean()) < 1e-3
    torch.testing.assert_close(buf, eager_buf, rtol=1e-5, atol=1e-7)
    assert float((w.view(torch.uint8) != weight.view(torch.uint8)).float().mean()) > 0.01, "the steps moved W"


def _hopper_with_gluon():
    from hydrahead.kernels import dw_update

    return dw_update.GLUON and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not _hopper_with_gluon(), reason="the fused dW + update kernel runs on sm_90 with Gluon")
@pytest.mark.parametrize(
    "num_rows, num_classes, dim, programs",
    [
        (333, 784, 512, 1),  # dozens of tiles a program (F held: one per D column), six K slices each
        (200, 304, 256, 2),  # five tiles a program (an odd count), four K slices
        (64, 1000, 384, 3),  # one K slice a tile
        (577, 520, 128, 7),  # ten K slices, a batch one past a slice
        (1024, 4096, 512, None),  # one program an SM
        (1100, 640, 128, 5),  # 18 K slices, the last holding 12 rows
        (4100, 200, 128, 3),  # past the table's largest batch
    ],
)
@pytest.mark.parametrize(
    "tiles", [None, "64,64,64,4,4", "64,128,64,4,2", "64,64,64,4,4,384", "128,128,64,5,0"]
)  # None: the batch table's; then F's column held from 384 rows down; the wide variant
def test_the_fused_dw_update_follows_the_float64_step(num_rows, num_classes, dim, programs, tiles, monkeypatch):
    """Odd batch and class counts (tiles past the edges), and grids that give each program
    many tiles, against P^T F and SGD in float64, with each tile set the table holds."""
    from hydrahead.kernels import dw_update
    from hydrahead.kernels.dw_update import fused_dw_update

    gen = torch.Generator().manual_seed(num_rows + num_classes)
    probs = (torch.randn(num_rows, num_classes, generator=gen) * 1e-3).bfloat16().cuda()
    feats = torch.randn(num_rows, dim, generator=gen).bfloat16().cuda()
    rows = (torch.randn(num_classes, dim, generator=gen) * 0.02).bfloat16().cuda()
    buffer = (torch.randn(num_classes, dim, generator=gen) * 1e-3).cuda()
    lr, momentum, weight_decay = 0.1, 0.9, 5e-4
    if tiles is not None:
        monkeypatch.setenv("HYDRAHEAD_DW_UPDATE_TILES", tiles)
    elif dw_update._tiles(num_rows) is None:
        with pytest.raises(ValueError, match="slower"):  # past the table: the product and pass
            fused_dw_update(probs, feats, rows, buffer, lr=lr, momentum=momentum, weight_decay=weight_decay)
        return
    ref_buf = momentum * buffer.double() + probs.double().t() @ feats.double() + weight_decay * rows.double()
    ref_rows = rows.double() - lr * ref_buf
    new_rows, new_buf = rows.clone(), buffer.clone()
    fused_dw_update(
        probs, feats, new_rows, new_buf, lr=lr, momentum=momentum, weight_decay=weight_decay, programs=programs
    )
    assert rel_err(new_buf, ref_buf) < 1e-5  # float32 accumulation of bf16 products
    # the new rows are the float32 step rounded to bf16 once
    assert float((new_rows == ref_rows.bfloat16()).float().mean()) > 0.99
    assert float((new_rows.double() - ref_rows).abs().max()) <= float(ref_rows.abs().max()) * 2**-8
    assert float((new_rows != rows).float().mean()) > 0.5  # the step moved most rows


@pytest.mark.skipif(not _hopper_with_gluon(), reason="the fused dW + update kernel runs on sm_90 with Gluon")
@pytest.mark.parametrize("num_rows", [256, 600, 1000])  # F held, 64 x 128 tiles, the wide variant
def test_the_fused_dw_update_reads_an_lr_on_the_device_as_it_takes_a_number(num_rows):
    """A captured step holds its lr in a device tensor: the same step as a number gives, and
    a changed tensor moves the rows by its new value (D = 320: tiles past D's edge too)."""
    from hydrahead.kernels.dw_update import fused_dw_update

    gen = torch.Generator().manual_seed(num_rows)
    probs = (torch.randn(num_rows, 1000, generator=gen) * 1e-3).bfloat16().cuda()
    feats = torch.randn(num_rows, 320, generator=gen).bfloat16().cuda()
    rows = (torch.randn(1000, 320, generator=gen) * 0.02).bfloat16().cuda()
    buffer = (torch.randn(1000, 320, generator=gen) * 1e-3).cuda()
    ref_buf = 0.9 * buffer.double() + probs.double().t() @ feats.double() + 5e-4 * rows.double()
    results = []
    for lr in (0.3, torch.tensor([0.3], device="cuda"), torch.tensor([0.15], device="cuda")):
        new_rows, new_buf = rows.clone(), buffer.clone()
        fused_dw_update(probs, feats, new_rows, new_buf, lr=lr, momentum=0.9, weight_decay=5e-4)
        results.append((new_rows, new_buf))
    (rows_a, buf_a), (rows_b, buf_b), (rows_half, buf_half) = results
    assert rel_err(buf_a, ref_buf) < 1e-5
    assert torch.equal(buf_a, buf_b) and torch.equal(buf_a, buf_half)  # the buffer does not see the lr
    assert torch.equal(rows_a.view(torch.int16), rows_b.view(torch.int16))
    for got, lr in ((rows_a, 0.3), (rows_half, 0.15)):  # float32 w - lr * buffer, rounded to bf16 once
        expected = (rows.float() - lr * buf_a).bfloat16()
        assert float((got == expected).float().mean()) > 0.99, lr
    assert float((rows_half != rows_a).float().mean()) > 0.5


@pytest.mark.skipif(not _hopper_with_gluon(), reason="the fused dW + update kernel runs on sm_90 with Gluon")
@pytest.mark.parametrize("num_rows", [200, 300, 700])  # dF in the kernel; F held with slots; the wide variant
def test_the_fused_dw_update_held_back_writes_nothing(num_rows):
    """skip = 1 (a bad loss's verdict): rows and buffer keep every bit, even with a NaN in P,
    and the kernel's dF is the one a landing step gives; skip = 0: the step without a flag."""
    from hydrahead.kernels import dw_update
    from hydrahead.kernels.dw_update import fused_dw_update

    gen = torch.Generator().manual_seed(num_rows + 1)
    probs = (torch.randn(num_rows, 1000, generator=gen) * 1e-3).bfloat16().cuda()
    feats = torch.randn(num_rows, 320, generator=gen).bfloat16().cuda()
    rows = (torch.randn(1000, 320, generator=gen) * 0.02).bfloat16().cuda()
    buffer = (torch.randn(1000, 320, generator=gen) * 1e-3).cuda()
    features_grad = dw_update.takes_features_grad(num_rows)
    options = dict(lr=torch.tensor([0.1], device="cuda"), momentum=0.9, weight_decay=5e-4, features_grad=features_grad)
    outs = {}
    for name, skip, nan in (("held, NaN", 1, True), ("held", 1, False), ("landed", 0, False), ("plain", None, False)):
        p = probs.clone()
        if nan:
            p[5, 7] = float("nan")
        new_rows, new_buf = rows.clone(), buffer.clone()
        flag = None if skip is None else torch.full((), skip, dtype=torch.int32, device="cuda")
        grad = fused_dw_update(p, feats, new_rows, new_buf, skip=flag, **options)
        if skip == 1:
            assert torch.equal(new_rows.view(torch.int16), rows.view(torch.int16)), (num_rows, nan)
            assert torch.equal(new_buf.view(torch.int32), buffer.view(torch.int32)), (num_rows, nan)
        outs[name] = (grad, new_rows, new_buf)
    df_nan, df_held = outs["held, NaN"][0], outs["held"][0]
    (df_landed, rows_landed, buf_landed), (df_plain, rows_plain, buf_plain) = outs["landed"], outs["plain"]
    assert torch.equal(rows_landed.view(torch.int16), rows_plain.view(torch.int16))
    assert torch.equal(buf_landed, buf_plain)
    assert float((rows_landed != rows).float().mean()) > 0.5
    if features_grad:  # the rows before the step, either way
        assert torch.equal(df_landed, df_plain)
        assert rel_err(df_landed, probs.double() @ rows.double()) < 1e-5
        assert torch.equal(df_held, df_landed)  # held back or not, the same dF
        assert bool(torch.isnan(df_nan).any())  # a NaN in P reaches dF, never the rows
    else:
        assert df_nan is df_held is df_landed is df_plain is None


@pytest.mark.skipif(not _hopper_with_gluon(), reason="the fused dW + update kernel runs on sm_90 with Gluon")
@pytest.mark.parametrize(
    "num_rows, num_classes, dim, programs, tiles",
    [
        (64, 1000, 384, 3, None),  # the table's tiles at 64 rows: one dF partition
        (200, 776, 320, 2, "64,64,256,3,4,384"),  # two partitions, a batch short of the block; D past its edge
        (256, 4104, 512, None, "64,64,256,3,4,384"),  # one program an SM, a class tile past the edge
        (100, 520, 128, 5, "64,64,128,6,4,384"),  # a 128-row block, one partition
    ],
)
def test_the_fused_kernels_features_grad_is_p_times_the_rows_before_the_step(
    num_rows, num_classes, dim, programs, tiles, monkeypatch
):
    """dF = P W_c from the rows the kernel loads for the update, before it moves them: against
    float64, with the same rows and buffer as without dF, bit for bit, and the same dF twice."""
    from hydrahead.kernels import dw_update
    from hydrahead.kernels.dw_update import fused_dw_update

    if tiles:
        monkeypatch.setenv("HYDRAHEAD_DW_UPDATE_TILES", tiles)
    assert dw_update.takes_features_grad(num_rows)
    gen = torch.Generator().manual_seed(num_rows + dim)
    probs = (torch.randn(num_rows, num_classes, generator=gen) * 1e-2).bfloat16().cuda()
    feats = torch.randn(num_rows, dim, generator=gen).bfloat16().cuda()
    rows = (torch.randn(num_classes, dim, generator=gen) * 0.02).bfloat16().cuda()
    buffer = (torch.randn(num_classes, dim, generator=gen) * 1e-3).cuda()
    options = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, programs=programs)
    ref_df = probs.double() @ rows.double()
    outs = []
    for features_grad in (True, True, False):
        new_rows, new_buf = rows.clone(), buffer.clone()
        got = fused_dw_update(probs, feats, new_rows, new_buf, features_grad=features_grad, **options)
        outs.append((got, new_rows, new_buf))
    (df_a, rows_a, buf_a), (df_b, _, _), (none, rows_c, buf_c) = outs
    assert none is None and df_a.shape == (num_rows, dim) and df_a.dtype == torch.float32
    assert rel_err(df_a, ref_df) < 1e-5  # float32 accumulation of bf16 products
    assert torch.equal(df_a, df_b)  # partial sums in a fixed order
    assert torch.equal(rows_a.view(torch.int16), rows_c.view(torch.int16)) and torch.equal(buf_a, buf_c)
    ref_buf = 0.9 * buffer.double() + probs.double().t() @ feats.double() + 5e-4 * rows.double()
    assert rel_err(buf_a, ref_buf) < 1e-5


@pytest.mark.skipif(not _hopper_with_gluon(), reason="the fused dW + update kernel runs on sm_90 with Gluon")
@pytest.mark.parametrize("batch, tiles", [(512, None), (200, "64,64,256,3,4,384")])  # dF from cuBLAS; from the kernel
def test_a_head_step_with_the_fused_dw_update_follows_the_float64_step(batch, tiles, monkeypatch):
    from hydrahead.kernels import dw_update, exact_gemm

    if tiles:
        monkeypatch.setenv("HYDRAHEAD_DW_UPDATE_TILES", tiles)
    calls = []
    kernel = dw_update.fused_dw_update
    monkeypatch.setattr(exact_gemm, "FUSED_DW_UPDATE", True)
    monkeypatch.setattr(
        dw_update,
        "fused_dw_update",
        lambda *args, **kwargs: calls.append(kwargs["features_grad"]) or kernel(*args, **kwargs),
    )
    features, weight, labels = inputs(21, batch=batch)
    _, ref_fgrad, ref_wgrad = float64_reference(features, weight, labels, "none")
    lr, momentum, weight_decay = 0.5, 0.9, 5e-4
    buffer = (torch.randn(weight.shape, generator=torch.Generator().manual_seed(22)) * 1e-4).cuda()
    w64 = weight.cuda().double()
    ref_buf = momentum * buffer.double() + ref_wgrad + weight_decay * w64
    w, buf = weight.cuda().clone(), buffer.clone()
    f = features.cuda().requires_grad_()
    loss = triton_sharded_cross_entropy(
        f,
        w,
        labels.cuda(),
        0,
        scale=MARGINS["none"][0],
        update=SGDUpdate(lr=lr, momentum=momentum, weight_decay=weight_decay, momentum_buffer=buf),
        exact_kernels="gemm",
    )
    loss.backward()
    assert calls, "the step did not take the fused kernel"
    assert all(calls) == bool(tiles), calls  # dF inside the kernel where its batch is one block
    assert rel_err(f.grad, ref_fgrad) < 2e-2
    assert rel_err(buf, ref_buf) < 2e-2
    expected = (w64 - lr * ref_buf).bfloat16()
    assert float((w == expected).float().mean()) > 0.99


@pytest.mark.skipif(not _hopper_with_gluon(), reason="the fused dW + update kernel runs on sm_90 with Gluon")
def test_the_dw_update_benchmark_writes_both_sides_of_each_shape(tmp_path, monkeypatch):
    import json

    from benchmarks import dw_update as bench

    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    bench.main(["--shapes", "256x128x4096,8192x128x4096", "--tiles", "64,128,64,4,2", "--reps", "2"])
    rows = json.loads((tmp_path / "dw_update.json").read_text())["rows"]
    # 256 rows: the pair, the batch table's tiles, the given tiles; 8,192: no table entry
    assert [r["shape"] for r in rows].count("256x128x4096") == 3
    assert [r["shape"] for r in rows].count("8192x128x4096") == 2
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 and r["ratio"] == r["ms"] / r["floor_ms"] for r in rows)
    # with dF: the pair takes cuBLAS's product, the table's tiles at 256 rows take it inside the kernel
    bench.main(["--shapes", "256x128x4096", "--tiles", "64,128,64,4,2", "--reps", "2", "--features-grad"])
    rows = json.loads((tmp_path / "dw_update.json").read_text())["rows"]
    assert [r["features_grad"] for r in rows] == ["cuBLAS", "kernel", "cuBLAS"]
    assert all(r["df_product_ms"] > 0 and r["floor_ms"] >= r["df_product_ms"] for r in rows)


@pytest.mark.skipif(not _hopper_with_gluon(), reason="the ping-pong LSE pass runs on sm_90 with Gluon")
@pytest.mark.parametrize(
    "num_rows, num_classes, dim, tiles, cosine",
    [
        (1, 1, 64, None, False),  # one class: the second consumer has no tile
        (129, 1_000, 256, None, False),  # a row block past the first, a tile past the classes
        (512, 50_001, 512, None, False),  # the held rows' widest
        (300, 7 * 256 + 3, 128, "64,64,64,3", False),  # 64-row blocks, three stages
        (1000, 20_000, 384, "64,256,64,4", False),  # 256-class tiles
        (129, 1_000, 256, None, True),  # cosine logits: each class's over its row's norm
        (512, 50_001, 512, None, True),
    ],
)
def test_the_pingpong_lse_pass_writes_each_consumers_float64_stats(
    num_rows, num_classes, dim, tiles, cosine, monkeypatch
):
    """Each consumer's (max, sum of exp) over its alternate tiles of each split, targets left
    out, against float64; then the merged log-sum-exp against float64's over every class."""
    from hydrahead.kernels import filtered, pingpong

    if tiles:
        monkeypatch.setenv("HYDRAHEAD_PINGPONG_TILES", tiles)
    gen = torch.Generator().manual_seed(num_rows + num_classes)
    feats = torch.randn(num_rows, dim, generator=gen).bfloat16().cuda()
    weight = (torch.randn(num_classes, dim, generator=gen) * 0.05).bfloat16().cuda()
    labels = torch.randint(-1, num_classes, (num_rows,), generator=gen).cuda()  # -1: not a class of the shard
    scale = 8.0
    inv_norm = weight.float().norm(dim=1).reciprocal() if cosine else None
    assert pingpong.applies(feats, weight, fp8=False, cosine=cosine, offset=False)
    stats = pingpong.split_stats(feats, weight, labels, scale, inv_norm).double()

    block_g, block_c = pingpong._tiles()[:2]
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    _, splits, per_split = pingpong._grid(num_rows, num_classes, block_g, block_c, programs)
    assert stats.shape == (2, 2 * splits, num_rows)
    logits = scale * feats.double() @ weight.double().t()
    if cosine:
        logits *= inv_norm.double()[None, :]
    targets = torch.where(labels >= 0, labels, 0)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    ref_max, ref_sum = consumer_stats(logits, labels, splits, per_split, block_c)
    finite = ref_max > float("-inf")
    assert torch.equal(stats[0].t() > float("-inf"), finite)
    assert float((stats[0].t() - ref_max)[finite].abs().max()) < 1e-3  # float32 sums of exact bf16 products
    assert float(((stats[1].t() - ref_sum).abs() / ref_sum.clamp_min(1e-30))[finite].max()) < 1e-4
    assert float(stats[1].t()[~finite].abs().sum()) == 0.0  # a consumer with no class of a row: sum 0

    row_max, row_sum, target = filtered.shard_lse(
        feats, weight, inv_norm, labels, scale=scale, target_shift=0.0, cosine=cosine
    )
    lse = (row_max.double() + row_sum.double().log()).cpu()
    ref_lse = torch.logsumexp(logits, dim=1).cpu()
    assert float((lse - ref_lse).abs().max()) < 1e-4 * float(ref_lse.abs().max() + 1)
    here = (labels >= 0).cpu()
    assert float((target.double().cpu() - target_logit.cpu())[here].abs().sum()) < 1e-3 * max(1, int(here.sum()))


@pytest.mark.skipif(not _hopper_with_gluon(), reason="the ping-pong P kernel runs on sm_90 with Gluon")
@pytest.mark.parametrize(
    "num_rows, num_classes, chunk, dim, tiles, cosine",
    [
        (1, 1, (0, 1), 64, None, False),  # one entry
        (129, 1_000, (0, 1_000), 256, None, False),  # a row block past the first, a tile past the classes
        (512, 50_001, (20_000, 45_000), 512, None, False),  # a chunk inside W (its rows past the chunk are not P's)
        (300, 3_000, (1_000, 2_999), 128, "64,128,64,4", False),  # 64-row blocks, 128-class tiles
        (512, 50_001, (20_000, 45_000), 512, None, True),  # cosine: the chunk's own norms
    ],
)
@pytest.mark.parametrize("store", ["copy", "direct"])
def test_the_pingpong_p_kernel_writes_the_float64_softmax_times_the_scale(
    num_rows, num_classes, chunk, dim, tiles, cosine, store, monkeypatch
):
    """P = exp(s f·w - lse) · g over a chunk of the classes (cosine: s f·w / ||w|| and P's
    column over ||w|| too), every entry rounded to bf16 once; rows with lse +inf (ignored) all
    zero; nothing written past the chunk's columns rounded up to 16 bytes (stored from the
    registers: nothing past the chunk's columns)."""
    from hydrahead.kernels import pingpong

    monkeypatch.setitem(pingpong.ENABLED, "probs", True)  # at every batch (HYDRAHEAD_PINGPONG_PROBS=1)
    monkeypatch.setattr(pingpong, "PROBS_STORE", store)
    if tiles:
        monkeypatch.setenv("HYDRAHEAD_PINGPONG_PROBS_TILES", tiles)
    gen = torch.Generator().manual_seed(num_rows + num_classes)
    feats = torch.randn(num_rows, dim, generator=gen).bfloat16().cuda()
    weight = (torch.randn(num_classes, dim, generator=gen) * 0.05).bfloat16().cuda()
    scale, grad_scale = 8.0, torch.tensor([1.0 / num_rows], device="cuda")
    inv_norm = weight.float().norm(dim=1).reciprocal() if cosine else None
    logits = scale * feats.double() @ weight.double().t()
    if cosine:
        logits *= inv_norm.double()[None, :]
    lse = torch.logsumexp(logits, dim=1)
    lse[::5] = float("inf")  # ignored rows
    c_lo, c_hi = chunk
    assert pingpong.applies(feats, weight, fp8=False, cosine=cosine, offset=False, kind="probs")
    row_width = (c_hi - c_lo + 7) // 8 * 8 + 8  # 16-byte rows, with columns past the chunk
    padded = torch.full((num_rows, row_width), 7.0, dtype=torch.bfloat16, device="cuda")
    probs = padded[:, : c_hi - c_lo]
    pingpong.write_probs(probs, feats, weight, lse.float(), grad_scale, scale, c_lo, inv_norm)
    expected = (logits[:, c_lo:c_hi] - lse[:, None]).exp() * grad_scale.double()
    if cosine:
        expected *= inv_norm[c_lo:c_hi].double()[None, :]
    assert float((probs.double() - expected).abs().max()) <= float(expected.abs().max()) * 2**-7
    rounded = (probs == expected.bfloat16()).float().mean()
    assert float(rounded) > 0.98  # float32 logits: a few entries round the other way
    assert float(probs[::5].abs().max()) == 0.0
    # the copy engine stores whole 16-byte pieces: past the chunk's 16-byte boundary the row is untouched
    # (the head's P rows are that long; measured on an H100, the columns up to it get the next classes' p)
    assert bool((padded[:, (c_hi - c_lo + 7) // 8 * 8 :] == 7.0).all())
    if store == "direct":
        assert bool((padded[:, c_hi - c_lo :] == 7.0).all())

"""Low-precision head storage: stochastic rounding, Kahan compensation, fp8 weights."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from launcher import launch, launch_together, train_losses

from hydrahead.config import ConfigError, load_config, validate
from hydrahead.head import ShardedClassifier
from hydrahead.kernels.rounding import mix32 as triton_mix32
from hydrahead.optim.low_precision import (
    LowPrecisionUpdate,
    mix32,
    round_nearest,
    round_to_storage,
    rounding_uniforms,
    stochastic_round,
)

DTYPES = [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


def representable(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of ``dtype``, sorted, as float64 (from all bit patterns)."""
    bits = 8 if dtype.itemsize == 1 else 16
    patterns = torch.arange(2**bits, dtype=torch.int32).to(torch.uint8 if bits == 8 else torch.int16)
    values = patterns.view(dtype).double()
    return torch.unique(values[torch.isfinite(values)])


def sample_values(dtype, count, seed):
    """Values across the format's range: normals, subnormals, both signs, some exact ones."""
    gen = torch.Generator().manual_seed(seed)
    top = math.log2(torch.finfo(dtype).max) - 1
    low = math.log2(torch.finfo(dtype).smallest_normal) - 3
    magnitude = torch.exp2(torch.rand(count, generator=gen, dtype=torch.float64) * (top - low) + low)
    sign = torch.where(torch.rand(count, generator=gen) < 0.5, -1.0, 1.0).double()
    values = sign * magnitude
    values[:8] = representable(dtype)[torch.randint(0, len(representable(dtype)), (8,), generator=gen)]
    return values


@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_rounding_returns_a_neighbour(dtype):
    grid = representable(dtype)
    x = sample_values(dtype, 4000, seed=1)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rounded = stochastic_round(x, dtype, u).double()
    below = grid[(torch.searchsorted(grid, x, right=True) - 1).clamp(min=0)]
    above = grid[torch.searchsorted(grid, x).clamp(max=len(grid) - 1)]
    assert bool(((rounded == below) | (rounded == above)).all())
    exact = torch.isin(x, grid)
    assert torch.equal(rounded[exact], x[exact])  # representable values never move


@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_rounding_is_unbiased(dtype):
    x = sample_values(dtype, 64, seed=3)
    draws = 20000
    uniforms = rounding_uniforms(7, 1, torch.arange(draws), x.numel())  # counter draws, as in training
    rounded = stochastic_round(x.expand(draws, -1), dtype, uniforms).double()
    grid = representable(dtype)
    below = grid[(torch.searchsorted(grid, x, right=True) - 1).clamp(min=0)]
    above = grid[torch.searchsorted(grid, x).clamp(max=len(grid) - 1)]
    spread = (above - below).clamp(min=1e-300)
    # Each draw is one of two values: its standard deviation is at most half their gap.
    error = (rounded.mean(0) - x).abs() / (spread / 2 / math.sqrt(draws))
    assert float(error.max()) < 5.0
    # Round-to-nearest is biased for these values: the test can tell the two apart.
    nearest = round_nearest(x, dtype).double()
    assert float(((nearest - x).abs() / (spread / 2 / math.sqrt(draws))).max()) > 5.0


def test_rounding_saturates_and_keeps_nan():
    x = torch.tensor([1e6, -1e6, float("nan")], dtype=torch.float64)
    u = torch.full_like(x, 0.5)
    out = stochastic_round(x, torch.float8_e4m3fn, u).double()
    assert out[:2].tolist() == [448.0, -448.0] and math.isnan(out[2])
    assert round_nearest(x[:2], torch.float8_e4m3fn).double().tolist() == [448.0, -448.0]


def test_rounding_draws_depend_on_class_not_position():
    ids = torch.arange(100, 160)
    full = rounding_uniforms(5, 3, ids, 8)
    part = rounding_uniforms(5, 3, ids[20:40], 8)  # as a rank owning classes 120..139 would draw
    assert torch.equal(full[20:40], part)
    assert not torch.equal(full, rounding_uniforms(5, 4, ids, 8))  # fresh draws every step
    assert float(full.min()) > 0 and float(full.max()) < 1


def test_small_updates_stall_with_nearest_but_not_with_stochastic_or_kahan():
    """bf16 weights at 1.0 take 2,000 updates of +2e-3 (about half an ulp: 2^-8 = 3.9e-3)."""
    steps, delta, dim = 2000, 2e-3, 256
    ids = torch.arange(4)
    results = {}
    for name, rounding, kahan in (
        ("nearest", "nearest", False),
        ("stochastic", "stochastic", False),
        ("kahan", "nearest", True),
    ):
        weight = torch.ones(4, dim, dtype=torch.bfloat16)
        compensation = torch.zeros(4, dim, dtype=torch.bfloat16) if kahan else None
        for step in range(steps):
            how = LowPrecisionUpdate(rounding, seed=0, step=step)
            weight = round_to_storage(weight.double() + delta, torch.bfloat16, ids, how, compensation)
        results[name] = weight.double().mean().item()
    target = 1.0 + steps * delta
    assert results["nearest"] == 1.0  # every update rounds away
    assert abs(results["stochastic"] - target) < 0.02 * target
    assert abs(results["kahan"] - target) < 0.005 * target


def _train_head(dtype, rounding, kahan_dtype, steps=50, seed=1):
    torch.manual_seed(0)
    num_classes, dim, batch = 300, 16, 64
    head = ShardedClassifier(
        num_classes,
        dim,
        dtype=dtype,
        momentum=0.9,
        rounding=rounding,
        kahan_dtype=kahan_dtype,
        margin_type="cosface",
        scale=8.0,
        margin=0.1,
        init_std=0.1,
        seed=seed,
    )
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen)
    for step in range(steps):
        head.set_step(step + 1)
        head.set_lr(0.02)
        labels = torch.randint(0, num_classes, (batch,), generator=gen)
        features = centres[labels] + 0.5 * torch.randn(batch, dim, generator=gen)
        head.loss(features, labels).backward()
        head.finish_step()
    labels = torch.randint(0, num_classes, (4000,), generator=gen)
    features = centres[labels] + 0.5 * torch.randn(4000, dim, generator=gen)
    with torch.no_grad():
        loss = float(head.loss(features, labels))
    return head, loss


def test_fp8_head_learns_with_stochastic_rounding_or_kahan_and_lags_without():
    _, full = _train_head(torch.float32, "nearest", None)
    _, nearest = _train_head(torch.float8_e4m3fn, "nearest", None)
    head, stochastic = _train_head(torch.float8_e4m3fn, "stochastic", None)
    _, kahan = _train_head(torch.float8_e4m3fn, "nearest", torch.bfloat16)
    assert head.weight.dtype == torch.float8_e4m3fn
    assert nearest > full + 0.05  # round-to-nearest fp8 loses updates
    assert stochastic < nearest and kahan < nearest
    assert abs(kahan - full) < 0.05


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_moving_the_head_moves_every_per_row_buffer(device):
    """head.to(device) takes the weight, momentum, Kahan compensation and the deferred steps' state along."""
    head = ShardedClassifier(50, 8, dtype=torch.bfloat16, momentum=0.9, weight_decay=1e-3, kahan_dtype=torch.bfloat16)
    head.set_lr(0.1)
    rows = torch.arange(5)
    head.loss(torch.randn(5, 8), rows, rows).backward()
    head.finish_step()
    assert head._deferred.owing and head.compensation is not None
    head.to(device)
    tensors = {
        "weight": head.weight,
        "momentum": head.momentum_buffer,
        "compensation": head.compensation,
        "row_updates": head._deferred.row_updates,
        "table": head._deferred.table,
    }
    assert {name: t.device.type for name, t in tensors.items()} == dict.fromkeys(tensors, device)


def test_storage_options_are_checked():
    with pytest.raises(ValueError, match="fused kernels store"):
        ShardedClassifier(10, 4, dtype=torch.float16, impl="triton")
    validate(
        load_config(
            None, ["head.weight_dtype=fp8_e4m3", "head.impl=triton", "head.rounding=stochastic", "head.kahan=on"]
        )
    )
    with pytest.raises(ConfigError, match="head.momentum=0"):
        validate(load_config(None, ["head.momentum_dtype=none"]))
    with pytest.raises(ValueError, match="rounding"):
        LowPrecisionUpdate("up")
    with pytest.raises(ValueError, match="rounding"):
        ShardedClassifier(10, 4, rounding="up")


def test_fp8_run_with_kahan_resumes_exactly(tmp_path):
    """The Kahan buffer is checkpointed: a stopped and resumed run equals an uninterrupted one."""
    options = ("head.impl=reference", "head.weight_dtype=fp8_e4m3", "head.rounding=stochastic", "head.kahan=on")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    launch_together((straight, 2, *options), (stopped, 2, *options, "train.stop_after=7"))
    launch(stopped, 2, *options)
    want, got = train_losses(straight), train_losses(stopped)
    assert sorted(got) == sorted(want)
    assert all(got[step] == pytest.approx(want[step], rel=1e-6) for step in want)


@pytest.mark.parametrize("margin_type", ["none", "cosface"])
def test_unit_scaling_gives_the_same_logits_from_unit_variance_rows(margin_type):
    dim = 64
    scaled = ShardedClassifier(
        500, dim, seed=4, unit_scaling=True, margin_type=margin_type, scale=4.0, dtype=torch.float64
    )
    plain = ShardedClassifier(
        500, dim, seed=4, init_std=dim**-0.5, margin_type=margin_type, scale=4.0, dtype=torch.float64
    )
    assert abs(float(scaled.weight.std()) - 1.0) < 0.02
    assert torch.allclose(scaled.weight / dim**0.5, plain.weight, rtol=1e-12, atol=0)
    features = torch.randn(32, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 500, (32,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert float(scaled.loss(features, labels)) == pytest.approx(float(plain.loss(features, labels)), rel=1e-12)
        assert torch.equal(scaled.predict(features, k=3)[1], plain.predict(features, k=3)[1])


def test_unit_scaled_fp8_rows_sit_in_the_normal_range():
    """At init_std 0.01 most e4m3 rows are subnormal (below 2^-6, spacing 2^-9); at unit variance almost none."""
    small = ShardedClassifier(2000, 64, dtype=torch.float8_e4m3fn, impl="reference")
    unit = ShardedClassifier(2000, 64, dtype=torch.float8_e4m3fn, impl="reference", unit_scaling=True)
    subnormal = lambda w: float((w.float().abs() < 2.0**-6).float().mean())  # noqa: E731
    assert subnormal(small.weight) > 0.5 and subnormal(unit.weight) < 0.05


def test_fused_kernels_accept_their_default_bf16_storage():
    head = ShardedClassifier(100, 8, impl="triton", dtype=torch.bfloat16)
    assert head.low_precision and not head._steps_copies  # the kernel rounds its own update: no float32 copies
    cfg = load_config(None, ["head.impl=triton"])
    validate(cfg)
    assert cfg.head_weight_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "dtype, rounding, kahan",
    [
        (torch.float8_e4m3fn, "stochastic", None),
        (torch.float8_e4m3fn, "nearest", torch.bfloat16),
        (torch.bfloat16, "stochastic", None),
    ],
)
def test_settling_every_step_keeps_small_deferred_decay(dtype, rounding, kahan):
    """Inactive rows decay by (1 - lr wd) per step; settled every step, each settle is below
    half an ulp, so it must go through stochastic rounding or compensation, not to nearest."""
    lr, weight_decay, steps = 0.5, 0.01, 40
    head = ShardedClassifier(
        64, 32, dtype=dtype, rounding=rounding, kahan_dtype=kahan, weight_decay=weight_decay, unit_scaling=True, seed=3
    )
    start = head.weight.detach().float().clone()
    for step in range(steps):
        head.set_step(step + 1)
        head.set_lr(lr)
        head.loss(torch.randn(4, 32), torch.zeros(4, dtype=torch.long), torch.tensor([0])).backward()
        head.finish_step()
        head.settle()
    kept = (head.weight.detach().float()[1:] * start[1:]).sum() / (start[1:] * start[1:]).sum()
    assert float(kept) == pytest.approx((1 - lr * weight_decay) ** steps, abs=0.01)
    assert head.settles == steps


def test_a_settle_makes_the_next_ivf_rebuild_file_every_row():
    from hydrahead.head.active import ActiveClassSelector

    selector = ActiveClassSelector(
        "knn",
        0,
        400,
        knn_k=4,
        index="torch",
        index_type="ivf",
        nlist=8,
        rebuild_every=4,
        retrain_every=100,
        deterministic=True,
    )
    weight = torch.randn(400, 16)
    labels = torch.randint(0, 400, (8,))
    selector.select(1, torch.randn(8, 16), labels, weight)  # the first build
    selector.select(2, torch.randn(8, 16), labels, weight)
    assert not bool(selector._dirty.all())  # only the active rows are marked
    selector.select(3, torch.randn(8, 16), labels, weight, rows_moved=1)  # the head settled: every row moved
    assert bool(selector._dirty.all())
    selector.select(4, torch.randn(8, 16), labels, weight, rows_moved=1)  # a rebuild files them all
    assert selector._current.step == 3 and not bool(selector._dirty.all())


def _rows_to_round(seed: int, rows: int = 70, dim: int = 200):
    """float32 rows spanning the fp8 range: subnormals, normals, values past the largest."""
    gen = torch.Generator().manual_seed(seed)
    exact = torch.randn(rows, dim, generator=gen) * torch.exp2(torch.randint(-12, 9, (rows, 1), generator=gen).float())
    exact[0, :4] = torch.tensor([500.0, -460.0, 1e-6, 0.0])
    class_ids = torch.randint(0, 2**32 - 1, (rows,), generator=gen)
    return exact, class_ids


@triton.jit
def _mix32_kernel(X, OUT, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    x = tl.load(X + offsets, mask=ok, other=0).to(tl.uint32, bitcast=True)
    tl.store(OUT + offsets, triton_mix32(x).to(tl.int32, bitcast=True), mask=ok)


def test_triton_mix32_equals_the_torch_mix32():
    """The draws' 32-bit finaliser exists twice (torch for the reference path, Triton inside
    the kernels); every rounding decision depends on the two agreeing bit for bit."""
    gen = torch.Generator().manual_seed(3)
    values = torch.cat([torch.randint(0, 2**32, (4093,), generator=gen), torch.tensor([0, 1, 2**31, 2**32 - 1])])
    as_int32 = torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)
    out = torch.empty_like(as_int32)
    _mix32_kernel[(triton.cdiv(len(values), 1024),)](as_int32, out, len(values), BLOCK=1024)
    want = mix32(values)
    assert torch.equal(out.long() & 0xFFFFFFFF, want)
    assert (want != values).float().mean() > 0.99  # it does mix


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_round_rows_kernel_equals_round_to_storage(rounding):
    """The one-launch rounding draws and decides exactly as the torch path (fp8; bf16 on the GPU)."""
    from hydrahead.kernels.rounding import round_rows

    exact, class_ids = _rows_to_round(3)
    for step, salt in ((1, 0), (7, 1)):
        how = LowPrecisionUpdate(rounding, seed=11, step=step, salt=salt)
        kernel = round_rows(exact, torch.float8_e4m3fn, class_ids, how)
        torch_path = round_to_storage(exact, torch.float8_e4m3fn, class_ids, how)
        assert kernel.dtype == torch.float8_e4m3fn
        assert torch.equal(kernel.float(), torch_path.float())  # the same values (a zero's sign may differ)
    other = round_rows(exact, torch.float8_e4m3fn, class_ids, LowPrecisionUpdate(rounding, seed=11, step=2))
    assert (other.float() != kernel.float()).any() == (rounding == "stochastic")  # the draws follow the step
    with pytest.raises(ValueError, match="float32"):
        round_rows(exact.double(), torch.float8_e4m3fn, class_ids, how)


def test_a_steps_rounding_keys_are_hashed_once_and_differ_by_step_and_salt(monkeypatch):
    """The exact step asks for the keys once per class chunk: the hash runs once per
    (seed, step, salt), and its keys are those of the uncached hash and of the tensor hash
    that defines the draws."""
    import hydrahead.optim.low_precision as low_precision
    from hydrahead.counter_rng import counter_hash

    low_precision._rounding_keys.cache_clear()
    calls = []
    real_hash = low_precision.counter_hash_int
    monkeypatch.setattr(low_precision, "counter_hash_int", lambda *a: calls.append(a) or real_hash(*a))
    seed, step = 12345, 987654
    first = [low_precision.rounding_keys(seed, step, salt) for salt in (0, 1)]
    assert len(calls) == 2 and first[0] != first[1]
    for _ in range(5):  # five more chunks of the same step
        assert [low_precision.rounding_keys(seed, torch.tensor(step).item(), salt) for salt in (0, 1)] == first
    assert len(calls) == 2
    assert low_precision.rounding_keys(seed, step + 1) != first[0]
    assert len(calls) == 3
    uncached = low_precision._rounding_keys.__wrapped__(seed, step, 0)
    assert uncached == first[0] and all(0 <= key < 2**32 for key in uncached)
    gen = torch.Generator().manual_seed(7)
    for seed, step, salt in zip(*(torch.randint(0, 2**31, (3, 50), generator=gen).tolist()), strict=True):
        salt %= 2
        tensor_key = int(counter_hash(seed, low_precision._ROUNDING_STREAM, torch.tensor([2 * step + salt]))[0])
        assert low_precision._rounding_keys.__wrapped__(seed, step, salt) == (
            tensor_key & 0xFFFFFFFF,
            (tensor_key >> 32) & 0xFFFFFFFF,
        )

"""WTA-CRS linears: an unbiased weight gradient from a sample of the rows, everything else exact."""

import math

import pytest
import torch
from torch import nn

from hydrahead.models import wta_crs
from hydrahead.models.wta_crs import WTACRSLinear, keep_probabilities, row_budget, sample_rows

DRAWS = 2000  # sampled weight gradients per statistical test
Z_LIMIT = 4.5  # |mean - exact| / standard error, for every entry (see _worst_z)


@pytest.fixture(autouse=True)
def _one_thread():
    # Thousands of tiny backwards: thread hand-offs would cost more than the arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _skewed_rows(n=48, d_in=6, d_out=4, seed=0):
    """x with log-normal row norms (a few rows dominate), dy plain Gaussian."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) * torch.randn(n, 1, generator=g).mul(1.5).exp()
    return x, torch.randn(n, d_out, generator=g)


def _sampled_weight_grads(x, dy, keep, draws=DRAWS, *, fresh_estimates=True):
    """``draws`` weight gradients of one WTACRSLinear for the same x and dy (seeded)."""
    torch.manual_seed(1)
    layer = WTACRSLinear(x.shape[-1], dy.shape[-1], keep=keep)
    grads = []
    for _ in range(draws):
        layer.weight.grad = None
        if fresh_estimates:
            layer.grad_norms.mean = None  # scores from ||x|| alone, the same every draw
        layer(x).backward(dy)
        grads.append(layer.weight.grad)
    return torch.stack(grads)


def _worst_z(grads, exact):
    """The largest |mean - exact| / (sample std / sqrt(draws)) over the entries of dW.

    Each entry's mean over independent draws is nearly normal; a union bound over the 24
    entries (which needs no independence between them) puts the chance that an unbiased
    estimator exceeds Z_LIMIT = 4.5 anywhere below 24 * 7e-6 = 2e-4.
    """
    error = grads.mean(0) - exact
    standard_error = grads.std(0).clamp_min(1e-12) / math.sqrt(grads.shape[0])
    return (error / standard_error).abs().max().item()


def test_keep_probabilities_cap_the_winners_and_share_the_rest_by_score():
    scores = torch.tensor([100.0, 50.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0])
    pi = keep_probabilities(scores, 4)
    assert pi.sum().item() == pytest.approx(4)
    # 100 and 50 would ask for more than certainty; the other 2 rows' budget goes by score.
    assert pi[:2].tolist() == [1.0, 1.0]
    torch.testing.assert_close(pi[2:], 2 * scores[2:].double() / scores[2:].sum())
    # No winners when no score stands out; all rows kept when the budget covers them.
    torch.testing.assert_close(keep_probabilities(torch.ones(10), 3), torch.full((10,), 0.3, dtype=torch.float64))
    assert keep_probabilities(scores, 8).eq(1).all()


def test_sample_rows_draws_the_budget_with_the_inclusion_probabilities():
    torch.manual_seed(0)
    scores = torch.tensor([9.0, 5.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.25, 0.25, 0.1])
    pi = keep_probabilities(scores, 4)
    counts = torch.zeros(10, dtype=torch.float64)
    for _ in range(4000):
        rows, weights = sample_rows(pi, 4)
        assert rows.unique().numel() == 4  # exactly the budget, no row twice
        torch.testing.assert_close(weights, pi[rows].reciprocal().float())
        counts[rows] += 1
    frequency = counts / 4000
    assert frequency[pi == 1].eq(1).all()  # the winners are always in
    standard_error = (pi * (1 - pi) / 4000).sqrt().clamp_min(1e-12)
    assert ((frequency - pi).abs() / standard_error).max() < Z_LIMIT


def test_weight_gradient_is_unbiased():
    x, dy = _skewed_rows()
    assert _worst_z(_sampled_weight_grads(x, dy, keep=0.25), dy.t() @ x) < Z_LIMIT


@pytest.mark.parametrize("bias", ["no rescaling", "weights 5% high"])
def test_the_unbiasedness_test_catches_a_biased_estimator(monkeypatch, bias):
    draw = wta_crs.sample_rows

    def biased(probabilities, budget, generator=None):
        rows, weights = draw(probabilities, budget, generator)
        return rows, torch.ones_like(weights) if bias == "no rescaling" else 1.05 * weights

    monkeypatch.setattr(wta_crs, "sample_rows", biased)
    x, dy = _skewed_rows()
    assert _worst_z(_sampled_weight_grads(x, dy, keep=0.25), dy.t() @ x) > Z_LIMIT


def _dominant_rows(n=48, d_in=6, d_out=4):
    """Three rows of x 30 times longer than the rest."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=g)
    x[:3] *= 30
    return x, torch.randn(n, d_out, generator=g)


# Measured ratios to CRS: 0.39 and 0.19. Without the winners (probabilities budget * s / sum(s),
# uncapped, a row drawn once per whole unit of it) they are 0.52 and 0.58.
@pytest.mark.parametrize("rows, limit", [(_skewed_rows, 0.45), (_dominant_rows, 0.35)], ids=["lognormal", "dominant"])
def test_variance_is_below_column_row_sampling_at_the_same_keep(rows, limit):
    x, dy = rows()
    exact = dy.t() @ x
    budget = row_budget(0.25, x.shape[0])
    wta = (_sampled_weight_grads(x, dy, keep=0.25, draws=1000) - exact).square().sum((1, 2)).mean()
    # CRS: `budget` rows drawn with replacement, p ~ ||x_i|| (the same scores), each weighted
    # 1 / (budget p). Its total variance in closed form: (sum_i ||g_i||^2 / p_i - ||dW||^2) / budget.
    p = x.norm(dim=1) / x.norm(dim=1).sum()
    term_norms = (dy.norm(dim=1) * x.norm(dim=1)).square()
    crs = ((term_norms / p).sum() - exact.square().sum()) / budget
    assert wta < limit * crs


def test_per_token_gradient_estimates_cut_the_variance():
    # Token 0 carries nearly all of dy (as a ViT's class token does): after one backward the
    # running estimate makes its rows the winners; from ||x|| alone they are a random draw.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, 5, generator=g)
    dy = torch.randn(8, 6, 4, generator=g) * torch.tensor([1.0] + [0.02] * 5)[:, None]
    exact = torch.einsum("bto,bti->oi", dy, x)

    def variance(fresh):
        grads = _sampled_weight_grads(x, dy, keep=0.25, draws=200, fresh_estimates=fresh)
        return (grads[1:] - exact).square().sum((1, 2)).mean()  # the first draw has no estimate yet

    assert variance(fresh=False) < 0.05 * variance(fresh=True)
    layer = WTACRSLinear(5, 4, keep=0.25)
    layer(x).backward(dy)
    torch.testing.assert_close(layer.grad_norms.mean, dy.norm(dim=2).mean(0))


def test_keep_one_is_nn_linear_bit_for_bit():
    torch.manual_seed(0)
    plain = nn.Linear(6, 4)
    sampled = WTACRSLinear(6, 4, keep=1.0)
    sampled.load_state_dict(plain.state_dict())
    x = torch.randn(3, 7, 6)
    dy = torch.randn(3, 7, 4)
    results = []
    for layer in (plain, sampled):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        results.append((y, xi.grad, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_a_budget_covering_every_row_is_exact_to_rounding():
    # keep < 1 takes the sampled path, but ceil(0.99 * 12) = 12 rows: all kept, with weight 1.
    x, dy = _skewed_rows(n=12)
    grads = _sampled_weight_grads(x, dy, keep=0.99, draws=3)
    for grad in grads:
        torch.testing.assert_close(grad, dy.t() @ x, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("keep", [0.1, 0.5])
def test_forward_input_and_bias_gradients_are_unchanged(keep):
    torch.manual_seed(0)
    plain = nn.Linear(6, 4)
    sampled = WTACRSLinear(6, 4, keep=keep)
    sampled.load_state_dict(plain.state_dict())
    x, dy = torch.randn(5, 9, 6), torch.randn(5, 9, 4)
    outputs, input_grads = [], []
    for layer in (plain, sampled):
        xi = x.clone().requires_grad_()
        outputs.append(layer(xi))
        outputs[-1].backward(dy)
        input_grads.append(xi.grad)
    assert torch.equal(outputs[0], outputs[1])
    torch.testing.assert_close(input_grads[1], input_grads[0], rtol=0, atol=0)
    torch.testing.assert_close(sampled.bias.grad, plain.bias.grad, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(sampled.weight.grad, plain.weight.grad)  # that one is sampled


def _saved_activations(layer, x):
    """Elements the autograd graph saves for ``layer(x)``, parameters left out."""
    params = {p.data_ptr() for p in layer.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return saved


@pytest.mark.parametrize("autocast", [False, True])
def test_only_the_kept_rows_are_saved(autocast):
    x = torch.randn(4, 100, 32, requires_grad=True)  # 400 rows
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain = _saved_activations(nn.Linear(32, 8), x)
        sampled = _saved_activations(WTACRSLinear(32, 8, keep=0.25), x)
    # nn.Linear keeps all of x (and its weight, as a bf16 copy under autocast).
    assert sum(t.numel() for t in plain if t.numel() > 8 * 32) == 400 * 32
    rows = [t for t in sampled if t.dim() == 2]
    assert [tuple(t.shape) for t in rows] == [(100, 32)]  # ceil(0.25 * 400) rows of x
    assert rows[0].dtype == (torch.bfloat16 if autocast else torch.float32)  # the matmul's dtype, as nn.Linear
    # Besides them: one index and one weight per kept row.
    assert sum(t.numel() for t in sampled if t.dim() == 1) == 2 * 100


def test_autocast_backward_gives_gradients_in_the_parameters_dtype():
    torch.manual_seed(0)
    layer = WTACRSLinear(16, 8, keep=0.3)
    x = torch.randn(2, 10, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32
    assert all(torch.isfinite(t).all() for t in (x.grad, layer.weight.grad, layer.bias.grad))


def test_eval_no_grad_and_a_frozen_weight_take_the_plain_path():
    layer = WTACRSLinear(6, 4, keep=0.2)
    x = torch.randn(10, 6, requires_grad=True)
    assert layer(x).grad_fn.name() == "_SampledLinearBackward"
    with torch.no_grad():
        assert _saved_activations(layer, x) == []
    layer.eval()
    assert layer(x).grad_fn.name() == "AddmmBackward0"
    layer.train()
    layer.weight.requires_grad_(False)  # no dW to estimate: nothing of x to keep
    assert layer(x).grad_fn.name() == "AddmmBackward0"


def test_keep_out_of_range_is_refused():
    with pytest.raises(ValueError, match="keep"):
        WTACRSLinear(4, 4, keep=0.0)


def test_benchmark_rows_carry_method_shape_and_the_exact_steps_floor():
    """benchmarks/wta_crs.py: every row gets the results' common fields; the floor is the exact
    step's FLOPs (linear in the batch, the head's 6 B D C included) at the given rate."""
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import wta_crs as bench

    args = argparse.Namespace(image_size=32, patch_size=8, classes=10)
    rows = [
        {"model": "vit_tiny", "keep": 1.0, "batch": 4, "ms": 2.0},
        {"model": "vit_tiny", "keep": 0.3, "batch": 8},  # failed: no time
    ]
    bench._add_floors(rows, args, tflops=1e-6)
    assert [r["method"] for r in rows] == ["hydrahead-exact", "hydrahead-wta_crs keep 0.3"]
    assert rows[0]["shape"] == "vit_tiny, batch 4, 32 px"
    assert rows[1]["floor_ms"] == pytest.approx(2 * rows[0]["floor_ms"])
    assert rows[0]["ratio"] == pytest.approx(2.0 / rows[0]["floor_ms"]) and rows[1]["ratio"] is None
    assert rows[1]["peak_mib"] is None
    wider = bench.step_flops("vit_tiny", 4, argparse.Namespace(image_size=32, patch_size=8, classes=110))
    assert wider - bench.step_flops("vit_tiny", 4, args) == 6 * 4 * bench.EMBED_DIM * 100
    assert rows[0]["floor_ms"] == pytest.approx(bench.step_flops("vit_tiny", 4, args) / 1e6 * 1e3)

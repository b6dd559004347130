"""LARS / LAMB against hand-computed float64 steps; LR schedules; optimizer factory."""

import math

import pytest
import torch
from torch import nn

from hydrahead.optim import LAMB, LARS, build_optimizer, lr_multiplier


def _two_layer_params():
    """Weights of two layers with very different norms, a bias, and fixed gradients."""
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(4, 3, generator=g, dtype=torch.float64) * 10.0
    b1 = torch.randn(4, generator=g, dtype=torch.float64)
    w2 = torch.randn(2, 4, generator=g, dtype=torch.float64) * 0.1
    grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in (w1, b1, w2)]
    params = [nn.Parameter(p.clone()) for p in (w1, b1, w2)]
    for p, grad in zip(params, grads):
        p.grad = grad.clone()
    return params, [w1, b1, w2], grads


def _groups(params):
    w1, b1, w2 = params
    return [{"params": [w1, w2]}, {"params": [b1], "exclude_from_trust": True}]


def _lars_expected(w, g, buf, *, lr, momentum, wd, tc, eps):
    w_norm, g_norm = w.norm(), g.norm()
    local_lr = tc * w_norm / (g_norm + wd * w_norm + eps) if w_norm > 0 and g_norm > 0 else 1.0
    buf = momentum * buf + local_lr * (g + wd * w)
    return w - lr * buf, buf


def test_lars_two_steps_match_hand_computation():
    params, ws, gs = _two_layer_params()
    lr, momentum, wd, tc, eps = 0.5, 0.9, 1e-3, 0.02, 1e-8
    opt = LARS(_groups(params), lr=lr, momentum=momentum, weight_decay=wd, trust_coefficient=tc, eps=eps)
    bufs = [torch.zeros_like(w) for w in ws]
    for _ in range(2):
        opt.step()
        for i in (0, 2):  # trust-ratio layers
            ws[i], bufs[i] = _lars_expected(ws[i], gs[i], bufs[i], lr=lr, momentum=momentum, wd=wd, tc=tc, eps=eps)
        bufs[1] = momentum * bufs[1] + gs[1]  # excluded bias: plain momentum SGD, no decay
        ws[1] = ws[1] - lr * bufs[1]
        for p, w in zip(params, ws):
            torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)


def test_lars_trust_ratio_is_per_layer():
    params, ws, gs = _two_layer_params()
    lr, wd, tc = 1.0, 0.0, 0.01
    opt = LARS(_groups(params), lr=lr, momentum=0.0, weight_decay=wd, trust_coefficient=tc, eps=0.0)
    opt.step()
    effective = []
    for i in (0, 2):
        step = ws[i] - params[i].detach()
        local_lr = (step / gs[i]).mean()
        torch.testing.assert_close(step, local_lr * gs[i])
        torch.testing.assert_close(local_lr, tc * ws[i].norm() / gs[i].norm(), rtol=1e-9, atol=0)
        effective.append(local_lr.item())
    assert effective[0] > 50 * effective[1]  # ||w1|| is ~100x ||w2||
    # The excluded bias moves by exactly lr * g.
    torch.testing.assert_close(ws[1] - params[1].detach(), lr * gs[1])


def test_lars_parameter_whose_gradient_appears_late_starts_its_momentum_then():
    # Layer 0 has a gradient from step 1, layer 1 only from step 2 (an unused branch at first).
    torch.manual_seed(0)
    ws = [torch.randn(6, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    params = [nn.Parameter(w.clone()) for w in ws]
    grads = [[torch.randn_like(w) for w in ws] for _ in range(3)]
    lr, momentum, wd, tc, eps = 0.3, 0.9, 1e-2, 0.05, 1e-8
    opt = LARS(params, lr=lr, momentum=momentum, weight_decay=wd, trust_coefficient=tc, eps=eps)
    bufs = [torch.zeros_like(w) for w in ws]
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = grads[step][i].clone() if (i == 0 or step > 0) else None
        opt.step()
        for i in range(2):
            if i == 0 or step > 0:
                ws[i], bufs[i] = _lars_expected(
                    ws[i], grads[step][i], bufs[i], lr=lr, momentum=momentum, wd=wd, tc=tc, eps=eps
                )
            torch.testing.assert_close(params[i].detach(), ws[i], rtol=1e-12, atol=1e-12)


def test_lars_zero_weight_gets_trust_one():
    w = nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))
    w.grad = torch.ones(3, 3, dtype=torch.float64)
    LARS([w], lr=0.1, momentum=0.0, trust_coefficient=0.001).step()
    torch.testing.assert_close(w.detach(), torch.full((3, 3), -0.1, dtype=torch.float64))


def _lamb_expected(w, g, m, v, t, *, lr, b1, b2, eps, wd, excluded):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    u = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
    if excluded:
        return w - lr * u, m, v
    u = u + wd * w
    trust = w.norm() / u.norm() if w.norm() > 0 and u.norm() > 0 else 1.0
    return w - lr * trust * u, m, v


def test_lamb_two_steps_match_hand_computation():
    params, ws, gs = _two_layer_params()
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.99, 1e-6, 0.1
    opt = LAMB(_groups(params), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    for t in (1, 2):
        if t == 2:  # a different gradient on the second step exercises the moments
            gs = [0.5 * g + 0.1 for g in gs]
            for p, g in zip(params, gs):
                p.grad = g.clone()
        opt.step()
        for i in range(3):
            ws[i], ms[i], vs[i] = _lamb_expected(
                ws[i], gs[i], ms[i], vs[i], t, lr=lr, b1=b1, b2=b2, eps=eps, wd=wd, excluded=(i == 1)
            )
            torch.testing.assert_close(params[i].detach(), ws[i], rtol=1e-12, atol=1e-12)


def test_lamb_trust_ratio_is_per_layer_and_excluded_is_adam():
    params, ws, gs = _two_layer_params()
    lr = 1e-3
    opt = LAMB(_groups(params), lr=lr, weight_decay=0.0, eps=1e-6)
    opt.step()
    # First step: m_hat / sqrt(v_hat) = g / |g| elementwise, so u = sign(g) up to eps.
    steps = [ws[i] - params[i].detach() for i in range(3)]
    ratios = []
    for i in (0, 2):
        u = gs[i] / (gs[i].abs() + 1e-6)
        trust = ws[i].norm() / u.norm()
        torch.testing.assert_close(steps[i], lr * trust * u, rtol=1e-12, atol=1e-15)
        ratios.append(trust.item())
    assert ratios[0] > 50 * ratios[1]
    # Excluded bias: an Adam step of size lr per element, no trust ratio.
    torch.testing.assert_close(steps[1], lr * gs[1] / (gs[1].abs() + 1e-6), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("schedule", ["cosine", "poly", "constant"])
def test_warmup_is_linear_from_first_step(schedule):
    values = [lr_multiplier(s, 100, 10, schedule) for s in range(10)]
    assert values == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_multiplier(10, 100, 10, schedule) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", ["cosine", "poly"])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_decay_is_monotone_and_ends_at_min(schedule, min_lr_ratio):
    total, warmup = 200, 20
    values = [lr_multiplier(s, total, warmup, schedule, min_lr_ratio=min_lr_ratio) for s in range(warmup, total + 5)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(1.0)
    assert lr_multiplier(total, total, warmup, schedule, min_lr_ratio=min_lr_ratio) == pytest.approx(min_lr_ratio)
    assert lr_multiplier(total - 1, total, warmup, schedule, min_lr_ratio=min_lr_ratio) > min_lr_ratio
    assert lr_multiplier(total + 10, total, warmup, schedule, min_lr_ratio=min_lr_ratio) == pytest.approx(min_lr_ratio)


def test_decay_midpoint_values():
    # Halfway through the decay: cosine gives 1/2, poly gives (1/2)**power.
    assert lr_multiplier(60, 110, 10, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(60, 110, 10, "poly", poly_power=3.0) == pytest.approx(0.125)
    assert lr_multiplier(60, 110, 10, "cosine", min_lr_ratio=0.2) == pytest.approx(0.6)
    assert lr_multiplier(99, 100, 0, "constant") == 1.0
    assert lr_multiplier(0, 100, 0, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(25, 100, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="'linear'"):
        lr_multiplier(0, 100, 10, "linear")
    with pytest.raises(ValueError):
        lr_multiplier(0, 10, 20, "cosine")


def _model():
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


@pytest.mark.parametrize(
    "name, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("lars", LARS), ("lamb", LAMB)]
)
def test_build_optimizer_splits_decay_groups(name, cls):
    model = _model()
    opt = build_optimizer(name, model, lr=0.1, weight_decay=0.01)
    assert isinstance(opt, cls)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and no_decay["exclude_from_trust"] is True
    assert all(p.ndim == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 4
    # Plain tensors are split the same way (by dimension).
    opt = build_optimizer(name, model.parameters(), lr=0.1, weight_decay=0.01)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 4]
    loss = model(torch.randn(3, 4)).square().sum()
    loss.backward()
    opt.step()


def test_build_optimizer_defaults_and_errors():
    assert build_optimizer("lamb", _model(), lr=1e-3).defaults["eps"] == 1e-6
    assert build_optimizer("adamw", _model(), lr=1e-3, eps=1e-7).defaults["eps"] == 1e-7
    groups = [{"params": list(_model().parameters()), "lr": 0.5}]
    assert build_optimizer("lars", groups, lr=0.1).param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="'rmsprop'.*lamb"):
        build_optimizer("rmsprop", _model(), lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        build_optimizer("sgd", [], lr=0.1)


def _optimizer_state(model, opt):
    """Every parameter and optimizer-state value, cloned (tensors) or as they are."""
    params = [p.detach().clone() for p in model.parameters()]
    state = [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        for p in model.parameters()
        if p in opt.state
    ]
    return params, state


def _same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k] for k in x)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars", "lamb"])
def test_a_speculative_step_is_undone_bit_for_bit(name):
    """StepSnapshot: a step taken and then restored leaves parameters and optimizer state as
    they were (the first step's new state entries removed), so the next steps match a run
    that never took it; a released step stands."""
    from hydrahead.optim.speculative import StepSnapshot

    torch.manual_seed(0)
    model = _model()
    opt = build_optimizer(name, model, lr=0.1, momentum=0.9, weight_decay=0.01)
    twin = _model()
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(name, twin, lr=0.1, momentum=0.9, weight_decay=0.01)
    snapshot = StepSnapshot(opt)
    with pytest.raises(RuntimeError, match="without a take"):
        snapshot.restore()
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(3, 4, generator=gen)
        for m in (model, twin):
            m.zero_grad()
            m(x).square().sum().backward()
        if step in (0, 2):  # a step to skip: take it, then undo it
            before = _optimizer_state(model, opt)
            snapshot.take()
            opt.step()
            assert not torch.equal(next(model.parameters()), before[0][0])
            snapshot.restore()
            _same(_optimizer_state(model, opt), before)
            continue
        snapshot.take()
        opt.step()
        snapshot.release()
        twin_opt.step()
        _same(_optimizer_state(model, opt), _optimizer_state(twin, twin_opt))

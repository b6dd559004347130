"""The head step replayed from CUDA graphs (``hydrahead.kernels.graphed``), its bookkeeping on CPU.

A CPU has no CUDA graphs: ``Recorded`` stands in for them, keeping each captured body and
running it at each replay (a real capture runs nothing until its replays, so neither does
the stand-in). Its steps must equal the eager steps exactly, as the real graphs' must on a
GPU (``test_kernels_gpu.py``'s graph tests); the config's and the trainer's refusals are
checked here too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hydrahead.config import ConfigError, load_config, validate
from hydrahead.distributed.sharded_softmax import MergeChecks
from hydrahead.kernels import SGDUpdate, triton_sharded_cross_entropy
from hydrahead.kernels.graphed import HeadStepGraphs

BATCH, DIM, NUM_CLASSES = 19, 24, 70
MARGINS = {"none": dict(scale=2.0), "cosface": dict(scale=16.0, margin=0.3, margin_type="cosface")}


class _RecordedGraph:
    """Runs its body at each replay; the tensors the body leaves on the entry keep the
    first replay's storage, rewritten in place, as a graph's outputs are."""

    def __init__(self):
        self.body = self.entry = None
        self.outputs: dict[str, torch.Tensor] = {}

    def replay(self):
        self.body(self.entry)
        for name, value in vars(self.entry).items():
            if value is not None and name in ("loss", "check_values", "num_valid", "lse_valid", "grad_features"):
                kept = self.outputs.setdefault(name, value)
                kept.copy_(value)
                setattr(self.entry, name, kept)


class Recorded(HeadStepGraphs):
    """HeadStepGraphs on CPU tensors, with recorded bodies for graphs."""

    @staticmethod
    def _device_takes(features, weight) -> bool:
        return True

    @staticmethod
    def _new_graph():
        return _RecordedGraph()

    @staticmethod
    def _pool():
        return None

    @staticmethod
    def _capture(graph, pool, body, entry) -> None:
        graph.body, graph.entry = body, entry


def _batch(seed: int, num_rows: int = BATCH):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(num_rows, DIM, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (num_rows,), generator=gen)
    labels[::6] = -100
    return features, labels


def _head():
    """A head's rows and momentum buffer."""
    weight = torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(5)) * 0.3
    return weight, torch.zeros_like(weight)


def _loss(graphs, weight, buffer, features, labels, checks: MergeChecks | None):
    """The plain step's loss (lr 0.1, momentum 0.9) of ``features`` as a leaf that needs a gradient."""
    update = SGDUpdate(0.1, 0.9, 0.0, buffer)
    f = features.requires_grad_()
    return triton_sharded_cross_entropy(f, weight, labels, 0, update=update, checks=checks, graphs=graphs)


def _steps(graphs, batches, margin, *, fp8=False):
    """Each batch's step on one head (W, buffer): losses, dF, the checks' values, then W and
    buffer. ``fp8``: e4m3 rows stochastically rounded, their draws keyed by the step."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen) * (1.0 if fp8 else 0.3)
    weight = weight.to(torch.float8_e4m3fn) if fp8 else weight
    buffer = torch.zeros(weight.shape)
    rounding = "stochastic" if fp8 else "nearest"
    out = []
    for step, (features, labels) in enumerate(batches):
        f = features.clone().requires_grad_()
        checks = MergeChecks()
        update = SGDUpdate(0.1 / (step + 1), 0.9, 5e-4, buffer, step=step, rounding=rounding, seed=7)
        loss = triton_sharded_cross_entropy(
            f,
            weight,
            labels,
            0,
            num_classes=NUM_CLASSES,
            update=update,
            checks=checks,
            graphs=graphs,
            exact_kernels="gemm",
            **margin,
        )
        values = checks.values(loss.device).tolist()
        (loss * (1.5 + step)).backward()  # incoming gradients other than 1
        checks.raise_if_failed(values)
        out.append((loss.detach(), f.grad, values))
    return out, weight, buffer


@pytest.mark.parametrize("margin_type, fp8", [("none", False), ("cosface", False), ("none", True)])
def test_replayed_steps_equal_the_eager_ones(margin_type, fp8):
    """Four steps (the first eager, the second captured, two replays; lr, step and batch
    change every step): the same losses, dF, checks, rows and momentum buffer, bit for bit."""
    batches = [_batch(seed) for seed in range(4)]
    graphs = Recorded()
    replayed, w_replayed, b_replayed = _steps(graphs, batches, MARGINS[margin_type], fp8=fp8)
    eager, w_eager, b_eager = _steps(None, batches, MARGINS[margin_type], fp8=fp8)
    assert (graphs.captures, graphs.replays) == (1, 3)
    for (loss, grad, values), (loss_e, grad_e, values_e) in zip(replayed, eager):
        assert torch.equal(loss, loss_e) and torch.equal(grad, grad_e) and values == values_e
    assert torch.equal(w_replayed.float(), w_eager.float()) and torch.equal(b_replayed, b_eager)
    assert not torch.equal(w_eager.float(), _steps(None, [], MARGINS[margin_type], fp8=fp8)[1].float())  # rows moved


def test_handed_out_values_are_not_overwritten_by_the_next_replay():
    graphs = Recorded()
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen) * 0.3
    buffer = torch.zeros_like(weight)
    kept = []
    for step in range(4):
        features, labels = _batch(step, BATCH - step)  # each step's own count of valid labels
        labels[: step + 1] = -100
        f = features.requires_grad_()
        checks = MergeChecks()
        loss = triton_sharded_cross_entropy(
            f, weight, labels, 0, update=SGDUpdate(0.1, 0.9, 0.0, buffer), checks=checks, graphs=graphs
        )
        (loss * (step + 2)).backward()  # an incoming gradient other than 1
        kept.append((loss, loss.detach().clone(), f.grad, f.grad.clone(), checks, checks.values(loss.device)))
    assert graphs.replays == 0  # four shapes: each eager

    graphs, kept = Recorded(), []
    for step in range(4):
        features, labels = _batch(step)
        labels[: step + 1] = -100
        f = features.requires_grad_()
        handed = []  # the very dF tensor the backward hands out (a leaf's .grad may be a copy of it)
        f.register_hook(handed.append)
        checks = MergeChecks()
        loss = triton_sharded_cross_entropy(
            f, weight, labels, 0, update=SGDUpdate(0.1, 0.9, 0.0, buffer), checks=checks, graphs=graphs
        )
        (loss * (step + 2)).backward()
        kept.append((loss, loss.detach().clone(), handed[0], f.grad.clone(), checks, checks.values(loss.device)))
    assert graphs.replays == 3
    for loss, loss_then, grad, grad_then, checks, values_then in kept:
        assert torch.equal(loss.detach(), loss_then) and torch.equal(grad, grad_then)
        assert torch.equal(checks.values(loss.device), values_then)
    assert len({float(values[2]) for *_, values in kept}) == 4  # the valid counts differ: a stale copy would show


def test_second_forward_before_the_backward_runs_eagerly_and_a_new_shape_waits_one_call():
    graphs = Recorded()
    weight, buffer = _head()

    def loss_of(seed, num_rows=BATCH):
        return _loss(graphs, weight, buffer, *_batch(seed, num_rows), checks=MergeChecks())

    loss_of(0).backward()  # eager: first sight
    first = loss_of(1)  # captured and replayed; its backward is pending
    assert (graphs.captures, graphs.replays) == (1, 1)
    second = loss_of(2)  # the key is busy: eager
    assert graphs.replays == 1
    first.backward()
    second.backward()
    loss_of(3).backward()  # free again: replayed
    assert graphs.replays == 2
    del first, second
    pending = loss_of(4)  # a forward whose backward never comes ...
    del pending  # ... frees the key with its autograd graph
    loss_of(5).backward()
    assert graphs.replays == 4
    loss_of(6, BATCH + 3).backward()  # a new shape: eager, then captured
    assert (graphs.captures, graphs.replays) == (1, 4)
    loss_of(7, BATCH + 3).backward()
    assert (graphs.captures, graphs.replays) == (2, 5)
    held = loss_of(8)  # the first shape busy; a third shape evicts the second, the oldest idle one
    loss_of(9, BATCH + 5).backward()
    loss_of(10, BATCH + 5).backward()
    assert (
        graphs.captures == 3
        and len(graphs._entries) == 2
        and not any(call.features_shape[0] == BATCH + 3 for call in graphs._entries)
    )
    held.backward()


def test_a_label_no_shard_owns_fails_the_checks_of_a_replayed_step():
    graphs = Recorded()
    weight, buffer = _head()
    for seed in range(3):
        features, labels = _batch(seed)
        if seed == 2:
            labels[1] = NUM_CLASSES + 4
        checks = MergeChecks()
        loss = _loss(graphs, weight, buffer, features, labels, checks)
        values = checks.values(loss.device).tolist()
        if seed < 2:
            checks.raise_if_failed(values)
            loss.backward()
    assert graphs.replays == 2
    with pytest.raises(ValueError, match="belong to no shard"):
        checks.raise_if_failed(values)


def _failed_against_eager(run_steps, fails, warning: str) -> Recorded:
    """Four steps of ``run_steps`` on graphs whose capture of a body that ``fails`` raises
    (as a capture without its cuBLAS handle does): a warning, and the eager run's losses,
    dF, checks, rows and buffer bit for bit. Returns the graphs."""

    class Failing(Recorded):
        @staticmethod
        def _capture(graph, pool, body, entry) -> None:
            if fails(body):
                raise RuntimeError("CUBLAS_STATUS_NOT_INITIALIZED")
            Recorded._capture(graph, pool, body, entry)

    batches = [_batch(seed) for seed in range(4)]
    graphs = Failing()
    with pytest.warns(RuntimeWarning, match=warning):
        failed, w_failed, b_failed = run_steps(graphs, batches, MARGINS["none"])
    eager, w_eager, b_eager = run_steps(None, batches, MARGINS["none"])
    for (loss, grad, values), (loss_e, grad_e, values_e) in zip(failed, eager):
        assert torch.equal(loss, loss_e) and torch.equal(grad, grad_e) and values == values_e
    assert torch.equal(w_failed.float(), w_eager.float()) and torch.equal(b_failed, b_eager)
    return graphs


@pytest.mark.parametrize("failing", ["_forward_body", "_backward_body"])
def test_a_capture_that_fails_leaves_the_step_and_the_key_to_the_eager_path(failing):
    """The step whose capture fails still lands once (eager forward, or the backward's body
    run eagerly), with a warning; the key then stays eager."""

    graphs = _failed_against_eager(_steps, lambda body: body.__name__ == failing, "run eagerly from now on")
    assert len(graphs.failed) == 1 and "CUBLAS" in next(iter(graphs.failed.values()))
    assert graphs.replays == (0 if failing == "_forward_body" else 1)  # the failed key replays no more


def test_a_warm_up_whose_backward_never_ran_is_taken_again():
    """Capture waits for a warm-up whose backward finished (its kernels compiled)."""
    graphs = Recorded()
    weight, buffer = _head()
    loss = _loss(graphs, weight, buffer, *_batch(0), checks=MergeChecks())
    del loss  # skipped, as a trainer skips the backward of a non-finite loss
    _loss(graphs, weight, buffer, *_batch(1), checks=MergeChecks()).backward()  # warm-up again
    assert graphs.captures == 0
    _loss(graphs, weight, buffer, *_batch(2), checks=MergeChecks()).backward()
    assert (graphs.captures, graphs.replays) == (1, 1)


def test_a_second_backward_of_a_replayed_loss_is_refused():
    graphs = Recorded()
    weight, buffer = _head()
    _loss(graphs, weight, buffer, *_batch(0), checks=MergeChecks()).backward()
    loss = _loss(graphs, weight, buffer, *_batch(1), checks=MergeChecks())
    loss.backward(retain_graph=True)
    rows = weight.clone()
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()
    assert torch.equal(weight, rows)  # no second step


def _direct_steps(direct: bool, batches):
    """Plain steps (lr and step changing) backed by ``HeadStepGraphs.backward`` where it takes
    the loss (``direct``) or by autograd: losses, dF, whether each ran directly, W, buffer."""
    graphs = Recorded()
    weight, buffer = _head()
    out = []
    for step, (features, labels) in enumerate(batches):
        f = features.clone().requires_grad_()
        checks = MergeChecks()
        update = SGDUpdate(0.1 / (step + 1), 0.9, 5e-4, buffer, step=step)
        loss = triton_sharded_cross_entropy(f, weight, labels, 0, update=update, checks=checks, graphs=graphs)
        ran = direct and graphs.backward(loss, f)
        if not ran:
            loss.backward()
        out.append((loss.detach(), f.grad, ran))
    return out, weight, buffer, graphs


def test_the_direct_backward_of_a_replayed_loss_equals_autograds():
    """``HeadStepGraphs.backward`` takes the replayed losses whose backward graph is captured
    (not the eager warm-up, nor the capturing call: autograd's thread holds the library
    handles a capture needs), and gives autograd's dF, rows and buffer bit for bit."""
    batches = [_batch(seed) for seed in range(4)]
    direct, w_direct, b_direct, graphs = _direct_steps(True, batches)
    through_autograd, w_autograd, b_autograd, _ = _direct_steps(False, batches)
    assert [ran for *_, ran in direct] == [False, False, True, True] and graphs.replays == 3
    for (loss, grad, _), (loss_a, grad_a, _) in zip(direct, through_autograd):
        assert torch.equal(loss, loss_a) and torch.equal(grad, grad_a)
    assert torch.equal(w_direct, w_autograd) and torch.equal(b_direct, b_autograd)


def test_the_direct_backward_refuses_other_losses_and_features_and_runs_once():
    graphs, other = Recorded(), Recorded()
    weight, buffer = _head()
    for seed in range(2):  # the warm-up, then the capture
        _loss(graphs, weight, buffer, *_batch(seed), checks=MergeChecks()).backward()
    features, labels = _batch(2)
    loss = _loss(graphs, weight, buffer, features, labels, checks=MergeChecks())
    rows = weight.clone()
    assert not other.backward(loss, features)  # another head's graphs
    assert not graphs.backward(loss * 2, features)  # not the replayed loss itself
    with pytest.raises(ValueError, match="not the ones"):
        graphs.backward(loss, features.detach().clone().requires_grad_())
    assert torch.equal(weight, rows) and features.grad is None  # nothing ran
    assert graphs.backward(loss, features) and features.grad is not None
    assert not torch.equal(weight, rows)
    stepped = weight.clone()
    assert not graphs.backward(loss, features)  # its step landed: no second one
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()
    assert torch.equal(weight, stepped)


def test_the_direct_backward_leaves_non_leaf_and_hooked_features_to_autograd_and_adds_to_a_grad():
    """Features whose gradient flows on, or that a hook watches, are autograd's: the direct
    backward runs nothing for them. Into a leaf's existing .grad it adds, as autograd does."""
    graphs = Recorded()
    weight, buffer = _head()
    for seed in range(2):  # the warm-up, then the capture
        _loss(graphs, weight, buffer, *_batch(seed), checks=MergeChecks()).backward()

    base = _batch(2)[0].requires_grad_()
    features = base * 1.0  # not a leaf: dF must reach base
    loss = _loss(graphs, weight, buffer, features, _batch(2)[1], checks=MergeChecks())
    assert not graphs.backward(loss, features)
    loss.backward()
    assert base.grad is not None

    seen = []
    hooked = _batch(3)[0].requires_grad_()
    hooked.register_hook(seen.append)
    loss = _loss(graphs, weight, buffer, hooked, _batch(3)[1], checks=MergeChecks())
    assert not graphs.backward(loss, hooked)
    loss.backward()
    assert len(seen) == 1
    after_hooks = graphs.replays

    features, labels = _batch(4)
    features.requires_grad_()
    features.grad = torch.ones_like(features)
    loss = _loss(graphs, weight, buffer, features, labels, checks=MergeChecks())
    assert graphs.backward(loss, features) and graphs.replays == after_hooks + 1
    grad_features = next(iter(graphs._entries.values())).grad_features  # this replay's dF
    assert torch.equal(features.grad, torch.ones_like(features) + grad_features)
    assert float(grad_features.abs().sum()) > 0


def test_the_direct_backward_checks_the_features_on_the_capturing_call_too():
    graphs = Recorded()
    weight, buffer = _head()
    _loss(graphs, weight, buffer, *_batch(0), checks=MergeChecks()).backward()  # the warm-up
    features, labels = _batch(1)
    loss = _loss(graphs, weight, buffer, features, labels, checks=MergeChecks())  # the capturing call
    with pytest.raises(ValueError, match="not the ones"):
        graphs.backward(loss, features.detach().clone().requires_grad_())
    assert not graphs.backward(loss, features)  # the capture: autograd's
    loss.backward()


def test_the_head_backs_a_replayed_loss_directly_and_others_through_autograd():
    """``ShardedClassifier.backward``: dF in the features' .grad either way, the same rows."""
    from hydrahead.head.classifier import ShardedClassifier

    results = []
    for direct in (True, False):
        head = ShardedClassifier(NUM_CLASSES, DIM, seed=3, init_std=0.3, impl="triton", momentum=0.9)
        head.set_lr(0.1)
        head.step_graphs = graphs = Recorded()
        taken = []  # what the head's graphs answered: whether they ran the backward
        graphs.backward = lambda loss, f, answer=graphs.backward: taken.append(answer(loss, f)) or taken[-1]
        initial = head.weight.detach().clone()
        grads = []
        for step in range(3):
            features, labels = _batch(step)
            f = features.requires_grad_()
            loss = head.loss(f, labels, checks=MergeChecks())
            if direct:
                head.backward(loss, f)
            else:
                loss.backward()
            head.finish_step()
            grads.append(f.grad)
        assert not torch.equal(head.weight.detach(), initial)  # the rows moved
        assert taken == ([False, False, True] if direct else [])
        results.append((grads, head.weight.detach().clone(), head.step_graphs.replays))
    (grads, weight, replays), (grads_a, weight_a, _) = results
    assert replays == 2 and all(torch.equal(g, g_a) for g, g_a in zip(grads, grads_a))
    assert torch.equal(weight, weight_a)


def test_a_bad_shard_runs_eagerly_and_fails_the_checks():
    graphs = Recorded()
    weight, buffer = _head()
    for seed in range(3):
        features, labels = _batch(seed)
        checks = MergeChecks()
        update = SGDUpdate(0.1, 0.9, 0.0, buffer)
        f = features.requires_grad_()
        loss = triton_sharded_cross_entropy(  # the shard reaches past num_classes: a local error
            f, weight, labels, 5, num_classes=NUM_CLASSES, update=update, checks=checks, graphs=graphs
        )
        loss.backward()
        with pytest.raises(ValueError, match="sharded_cross_entropy"):
            checks.raise_if_failed(checks.values(loss.device).tolist())
    assert graphs.captures == 0


def _own_group_worker(rank, world_size):
    """Each rank a head of its own (a one-rank group): replayed steps equal its eager ones,
    with no statistics from the other rank."""
    import torch.distributed as dist

    groups = [dist.new_group([r]) for r in range(world_size)]
    results = []
    for graphs in (Recorded(), None):
        weight, buffer = _head()
        losses = []
        for step in range(3):
            features, labels = _batch(10 * rank + step)
            checks = MergeChecks()
            f = features.requires_grad_()
            update = SGDUpdate(0.1, 0.9, 0.0, buffer)
            loss = triton_sharded_cross_entropy(
                f, weight, labels, 0, group=groups[rank], update=update, checks=checks, graphs=graphs
            )
            loss.backward()
            losses.append(float(loss))
        results.append((losses, weight, graphs.replays if graphs else None))
    (replayed, w_replayed, replays), (eager, w_eager, _) = results
    return replays, replayed == eager and torch.equal(w_replayed, w_eager)


def test_a_head_group_of_one_rank_among_several_keeps_its_statistics_to_itself():
    from dist_harness import run_ranks

    for replays, equal in run_ranks(_own_group_worker, 2):
        assert replays == 2 and equal


def test_refusals_name_what_is_missing():
    graphs = HeadStepGraphs()
    features = torch.randn(4, DIM, requires_grad=True)
    weight = torch.randn(NUM_CLASSES, DIM)
    update = SGDUpdate(0.1)
    args = dict(
        group=None, update=update, grad_filter=0.0, exact_kernels="gemm", checks=MergeChecks(), logit_offset=None
    )
    assert "CUDA" in graphs.refusal(features, weight, **args)
    recorded = Recorded()
    assert recorded.refusal(features, weight, **args) is None
    refused = {
        "grad_filter": (dict(grad_filter=1e-3), "gemm path"),
        "stationary": (dict(exact_kernels="stationary"), "gemm path"),
        "update": (dict(update=None), "dW"),
        "checks": (dict(checks=None), "host"),
        "offset": (dict(logit_offset=torch.zeros(NUM_CLASSES)), "offsets"),
    }
    for name, (change, words) in refused.items():
        assert words in recorded.refusal(features, weight, **{**args, **change}), name
    assert "no backward" in recorded.refusal(features.detach(), weight, **args)
    with torch.no_grad():
        assert "no backward" in recorded.refusal(features, weight, **args)


def test_refused_calls_run_eagerly_and_capture_nothing():
    graphs = Recorded()
    weight, buffer = _head()
    for seed in range(3):
        _loss(graphs, weight, buffer, *_batch(seed), checks=None).backward()  # checks read mid-step: refused
    assert (graphs.captures, graphs.replays) == (0, 0)


def test_the_key_changes_with_what_the_kernels_bake_in():
    """A changed momentum, rows tensor or scale is a new key (eager first); lr and step are not."""
    graphs = Recorded()
    weight = torch.randn(NUM_CLASSES, DIM) * 0.3
    buffer = torch.zeros_like(weight)
    features, labels = _batch(0)

    def run(update, w=weight, scale=1.0):
        f = features.clone().requires_grad_()
        triton_sharded_cross_entropy(
            f, w, labels, 0, update=update, checks=MergeChecks(), graphs=graphs, scale=scale
        ).backward()

    base = SGDUpdate(0.1, 0.9, 0.0, buffer)
    run(base)
    run(dataclasses.replace(base, lr=0.05, step=3))
    assert (graphs.captures, graphs.replays) == (1, 1)
    for change in (dict(update=dataclasses.replace(base, momentum=0.8)), dict(scale=2.0), dict(w=weight.clone())):
        run(**{"update": base, **change})
        assert graphs.replays == 1, change
    run(base)
    assert graphs.replays == 2


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"head.impl": "reference"}, "head.impl=triton"),
        ({"head.grad_filter": 0.001}, "grad_filter=0"),
        ({"head.exact_kernels": "stationary"}, "exact_kernels=gemm"),
        ({"head.selection": "random", "head.budget": 64}, "selection=full"),
        ({"comm.overlap": True}, "micro-batches"),
    ],
)
def test_config_refuses_what_the_graphs_cannot_replay(overrides, words):
    cfg = load_config(None, ["head.impl=triton", "head.cuda_graph=true"] + [f"{k}={v}" for k, v in overrides.items()])
    with pytest.raises(ConfigError, match=words):
        validate(cfg)


def test_config_takes_one_rank_only_and_the_head_the_fused_kernels_only():
    cfg = load_config(None, ["head.impl=triton", "head.cuda_graph=true"])
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match="one rank"):
        validate(cfg, world_size=2)
    from hydrahead.head.classifier import ShardedClassifier

    with pytest.raises(ValueError, match="impl='triton'"):
        ShardedClassifier(10, 8, impl="reference", cuda_graph=True)
    assert isinstance(ShardedClassifier(10, 8, impl="triton", cuda_graph=True).step_graphs, HeadStepGraphs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a CPU run")
def test_trainer_refuses_cuda_graph_on_a_cpu_run(tmp_path):
    from launcher import launch

    proc = launch(tmp_path / "run", 1, "head.impl=triton", "head.cuda_graph=true", check=False)
    assert proc.returncode != 0
    assert "head.cuda_graph replays CUDA graphs: it needs a CUDA device" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------
# The loss and its backward as one graph (``HeadStepGraphs.step``)
# ----------------------------------------------------------------------------------------


def _whole_steps(graphs, batches, margin, *, fp8=False, hook=False):
    """``_steps`` with ``backward=True``: each step's loss and backward in one call (incoming
    gradient 1); with ``graphs`` None, the eager loss and ``loss.backward()`` instead.
    ``hook``: features watched by a hook (the step then runs eagerly)."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen) * (1.0 if fp8 else 0.3)
    weight = weight.to(torch.float8_e4m3fn) if fp8 else weight
    buffer = torch.zeros(weight.shape)
    out = []
    for step, (features, labels) in enumerate(batches):
        f = features.clone().requires_grad_()
        if hook:
            f.register_hook(lambda grad: grad)
        checks = MergeChecks()
        update = SGDUpdate(
            0.1 / (step + 1), 0.9, 5e-4, buffer, step=step, rounding="stochastic" if fp8 else "nearest", seed=7
        )
        options = dict(num_classes=NUM_CLASSES, update=update, checks=checks, exact_kernels="gemm", **margin)
        if graphs is None:
            loss = triton_sharded_cross_entropy(f, weight, labels, 0, **options)
            loss.backward()
            loss = loss.detach()
        else:
            loss = triton_sharded_cross_entropy(f, weight, labels, 0, graphs=graphs, backward=True, **options)
        values = checks.values(loss.device).tolist()
        checks.raise_if_failed(values)
        out.append((loss, f.grad, values))
    return out, weight, buffer


@pytest.mark.parametrize("margin_type, fp8", [("none", False), ("cosface", False), ("none", True)])
def test_one_graph_steps_equal_the_eager_ones(margin_type, fp8):
    """Four steps (the first runs the bodies eagerly, the second captures, two replays; lr,
    step and batch change every step): the eager loss and backward's losses, dF, checks,
    rows and buffer, bit for bit, and each loss handed out detached."""
    batches = [_batch(seed) for seed in range(4)]
    graphs = Recorded()
    whole, w_whole, b_whole = _whole_steps(graphs, batches, MARGINS[margin_type], fp8=fp8)
    eager, w_eager, b_eager = _whole_steps(None, batches, MARGINS[margin_type], fp8=fp8)
    assert (graphs.captures, graphs.replays) == (1, 3)
    assert [call.whole for call in graphs._entries] == [True]
    for (loss, grad, values), (loss_e, grad_e, values_e) in zip(whole, eager):
        assert loss.grad_fn is None and not loss.requires_grad
        assert torch.equal(loss, loss_e) and torch.equal(grad, grad_e) and values == values_e
    assert torch.equal(w_whole.float(), w_eager.float()) and torch.equal(b_whole, b_eager)
    assert len({float(loss) for loss, *_ in whole}) == 4  # each step's own loss, not a stale copy


def test_one_graph_steps_leave_hooked_features_to_the_eager_path():
    batches = [_batch(seed) for seed in range(3)]
    graphs = Recorded()
    hooked, w_hooked, _ = _whole_steps(graphs, batches, MARGINS["none"], hook=True)
    eager, w_eager, _ = _whole_steps(None, batches, MARGINS["none"])
    assert graphs.replays == 0 and not graphs._entries
    assert all(torch.equal(g, g_e) for (_, g, _), (_, g_e, _) in zip(hooked, eager))
    assert torch.equal(w_hooked, w_eager)


def test_one_graph_step_adds_to_an_existing_grad_and_hands_out_copies():
    graphs = Recorded()
    weight, buffer = _head()
    kept = []
    for step in range(4):
        features, labels = _batch(step)
        labels[: step + 1] = -100  # each step's own valid count
        f = features.requires_grad_()
        f.grad = torch.ones_like(f)
        checks = MergeChecks()
        loss = triton_sharded_cross_entropy(
            f, weight, labels, 0, update=SGDUpdate(0.1, 0.9, 0.0, buffer), checks=checks, graphs=graphs, backward=True
        )
        kept.append((loss, loss.clone(), f.grad, f.grad.clone(), checks, checks.values(loss.device)))
    assert graphs.replays == 3
    grad_features = next(iter(graphs._entries.values())).grad_features  # the last replay's dF
    assert torch.equal(kept[-1][2], torch.ones_like(grad_features) + grad_features)
    for loss, loss_then, grad, grad_then, checks, values_then in kept:
        assert torch.equal(loss, loss_then) and torch.equal(grad, grad_then)
        assert torch.equal(checks.values(loss.device), values_then)
    assert len({float(values[2]) for *_, values in kept}) == 4


def test_a_one_graph_capture_that_fails_leaves_the_step_and_the_key_eager():
    graphs = _failed_against_eager(_whole_steps, lambda body: True, "capturing the head's step failed")
    assert graphs.replays == 0 and len(graphs.failed) == 1 and not graphs._entries


def test_more_one_graph_shapes_than_keys_still_reach_their_capture():
    """Three batch shapes in turn, two keys kept: the warm-ups are remembered apart from the
    kept graphs, so each shape's second call captures (and, evicted, captures again)."""
    from hydrahead.kernels.graphed import MAX_KEYS

    graphs = Recorded()
    weight, buffer = _head()
    shapes = [BATCH + extra for extra in range(MAX_KEYS + 1)]
    for round_ in range(3):
        for num_rows in shapes:
            features, labels = _batch(round_, num_rows)
            triton_sharded_cross_entropy(
                features.requires_grad_(), weight, labels, 0, update=SGDUpdate(0.1, 0.9, 0.0, buffer),
                checks=MergeChecks(), graphs=graphs, backward=True,
            )  # fmt: skip
    assert (graphs.captures, graphs.replays) == (2 * len(shapes), 2 * len(shapes))
    assert len(graphs._entries) == MAX_KEYS


def test_one_graph_and_two_graph_keys_are_kept_apart():
    graphs = Recorded()
    weight, buffer = _head()
    for seed in range(3):
        _loss(graphs, weight, buffer, *_batch(seed), checks=MergeChecks()).backward()
        features, labels = _batch(10 + seed)
        triton_sharded_cross_entropy(
            features.requires_grad_(), weight, labels, 0, update=SGDUpdate(0.1, 0.9, 0.0, buffer),
            checks=MergeChecks(), graphs=graphs, backward=True,
        )  # fmt: skip
    assert sorted(call.whole for call in graphs._entries) == [False, True]
    assert (graphs.captures, graphs.replays) == (2, 4)  # two replays each


def test_backward_true_needs_features_that_need_a_gradient():
    weight, buffer = _head()
    features, labels = _batch(0)
    with pytest.raises(ValueError, match="backward=True"):
        triton_sharded_cross_entropy(
            features, weight, labels, 0, update=SGDUpdate(0.1, 0.9, 0.0, buffer), backward=True
        )


def test_the_head_takes_loss_and_backward_at_once_only_where_the_device_judges_the_step():
    """``ShardedClassifier.loss_and_backward``: the gemm head's one graph equals its loss and
    backward; a head on the stationary kernels is refused before anything runs."""
    from hydrahead.head.classifier import ShardedClassifier

    results = []
    for at_once in (True, False):
        head = ShardedClassifier(NUM_CLASSES, DIM, seed=3, init_std=0.3, impl="triton", momentum=0.9)
        head.set_lr(0.1)
        head.step_graphs = Recorded()
        grads = []
        for step in range(4):
            features, labels = _batch(step)
            f = features.requires_grad_()
            checks = MergeChecks()
            if at_once:
                loss = head.loss_and_backward(f, labels, checks=checks)
            else:
                loss = head.loss(f, labels, checks=checks)
                loss.backward()
            checks.raise_if_failed(checks.values(loss.device).tolist())
            head.finish_step()
            grads.append(f.grad)
        results.append((grads, head.weight.detach().clone(), head.step_graphs.replays))
    (grads, weight, replays), (grads_a, weight_a, replays_a) = results
    assert (replays, replays_a) == (3, 3)
    assert all(torch.equal(g, g_a) for g, g_a in zip(grads, grads_a)) and torch.equal(weight, weight_a)

    stationary = ShardedClassifier(NUM_CLASSES, DIM, seed=3, impl="triton", momentum=0.9, exact_kernels="stationary")
    rows = stationary.weight.detach().clone()
    assert not stationary.step_judged_on_device(BATCH)
    with pytest.raises(ValueError, match="loss\\(\\), then backward\\(\\)"):
        stationary.loss_and_backward(_batch(0)[0].requires_grad_(), _batch(0)[1], checks=MergeChecks())
    assert torch.equal(stationary.weight.detach(), rows)


# ----------------------------------------------------------------------------------------
# On a GPU: real graphs
# ----------------------------------------------------------------------------------------


def _gpu_steps(graphs, num_rows, weight_dtype, margin_type, steps=5, nan_at=None, at_once=False, incoming=2.0):
    """``steps`` head steps (G x 512 x 40,000, several P chunks) on fresh batches, lr and
    step changing each time: losses, dF, then the rows and buffer. ``nan_at``: that step's
    batch has a NaN in a valid row, and the rows must come out of it as they went in.
    ``at_once``: loss and backward in one call (``backward=True``, an incoming gradient of 1);
    else the loss, then its backward for ``incoming``."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    num_classes, dim = 40_000, 512
    fp8 = weight_dtype == torch.float8_e4m3fn
    weight = (torch.randn(num_classes, dim, device="cuda", generator=gen) * (1.0 if fp8 else 0.05)).to(weight_dtype)
    buffer = torch.zeros(num_classes, dim, device="cuda")
    margin = dict(margin_type="cosface", scale=32.0, margin=0.3) if margin_type == "cosface" else {}
    out = []
    for step in range(steps):
        f = torch.randn(num_rows, dim, device="cuda", generator=gen).bfloat16()
        if step == nan_at:
            f[1, 2] = float("nan")  # rows 0, 9, ... are ignored
            before = weight.clone(), buffer.clone()
        f.requires_grad_()
        labels = torch.randint(0, num_classes, (num_rows,), device="cuda", generator=gen)
        labels[::9] = -100
        update = SGDUpdate(
            0.5 / (step + 1), 0.9, 5e-4, buffer, step=step, seed=3, rounding="stochastic" if fp8 else "nearest"
        )
        checks = MergeChecks()
        options = dict(update=update, checks=checks, graphs=graphs, exact_kernels="gemm", **margin)
        if at_once:
            loss = triton_sharded_cross_entropy(f, weight, labels, 0, backward=True, **options)
        else:
            loss = triton_sharded_cross_entropy(f, weight, labels, 0, **options)
            (loss * incoming).backward()
        checks.raise_if_failed(checks.values(loss.device).tolist())
        out.append((loss.detach(), f.grad))
        if step == nan_at:
            assert bool(torch.isnan(loss)), "the NaN reached the loss"
            assert torch.equal(weight.view(torch.uint8), before[0].view(torch.uint8)), "rows moved on a NaN loss"
            assert torch.equal(buffer, before[1]), "the buffer moved on a NaN loss"
    torch.cuda.synchronize()
    return out, weight, buffer


@pytest.mark.gpu
@pytest.mark.parametrize(
    "num_rows, weight_dtype, margin_type",
    [
        (256, torch.bfloat16, "none"),
        (1000, torch.bfloat16, "none"),
        (256, torch.bfloat16, "cosface"),
        (512, torch.float8_e4m3fn, "none"),
    ],
    ids=["bf16-256", "bf16-1000", "cosface-256", "fp8-512"],
)
def test_cuda_graph_steps_equal_the_eager_ones(num_rows, weight_dtype, margin_type, monkeypatch):
    monkeypatch.setenv("HYDRAHEAD_EXACT_CHUNK_MIB", "8")  # several chunks, each its own launches
    graphs = HeadStepGraphs()
    replayed, w_replayed, b_replayed = _gpu_steps(graphs, num_rows, weight_dtype, margin_type)
    eager, w_eager, b_eager = _gpu_steps(None, num_rows, weight_dtype, margin_type)
    assert (graphs.captures, graphs.replays) == (1, 4)
    for step, ((loss, grad), (loss_e, grad_e)) in enumerate(zip(replayed, eager)):
        assert torch.equal(loss, loss_e), step
        assert torch.equal(grad, grad_e), step
    assert torch.equal(w_replayed.float(), w_eager.float()) and torch.equal(b_replayed, b_eager)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "num_rows, weight_dtype", [(256, torch.bfloat16), (700, torch.bfloat16), (512, torch.float8_e4m3fn)]
)
@pytest.mark.parametrize("at_once", [False, True], ids=["two graphs", "one graph"])
def test_a_nan_step_is_held_back_eager_and_replayed(num_rows, weight_dtype, at_once, monkeypatch):
    """The fourth step's loss is NaN (a replay with graphs): on the real kernels (the fused
    dW kernel with dF at 256 rows, its wide variant at 700, the fp8 update pass) neither the
    eager nor the replayed step moves the rows, and the runs stay equal bit for bit."""
    monkeypatch.setenv("HYDRAHEAD_EXACT_CHUNK_MIB", "8")
    graphs = HeadStepGraphs()
    incoming = 1.0 if at_once else 2.0
    _, w_replayed, b_replayed = _gpu_steps(graphs, num_rows, weight_dtype, "none", nan_at=3, at_once=at_once)
    _, w_eager, b_eager = _gpu_steps(None, num_rows, weight_dtype, "none", nan_at=3, incoming=incoming)
    assert graphs.replays == 4
    assert torch.equal(w_replayed.float(), w_eager.float()) and torch.equal(b_replayed, b_eager)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "num_rows, weight_dtype, margin_type",
    [(256, torch.bfloat16, "none"), (1000, torch.bfloat16, "none"), (256, torch.bfloat16, "cosface")]
    + [(512, torch.float8_e4m3fn, "none")],
    ids=["bf16-256", "bf16-1000", "cosface-256", "fp8-512"],
)
def test_one_cuda_graph_steps_equal_the_eager_ones(num_rows, weight_dtype, margin_type, monkeypatch):
    """The loss and its backward captured as one graph (the first call's bodies run eagerly
    in this thread, so the capture finds its cuBLAS handle): the eager steps bit for bit."""
    monkeypatch.setenv("HYDRAHEAD_EXACT_CHUNK_MIB", "8")
    graphs = HeadStepGraphs()
    whole, w_whole, b_whole = _gpu_steps(graphs, num_rows, weight_dtype, margin_type, at_once=True)
    eager, w_eager, b_eager = _gpu_steps(None, num_rows, weight_dtype, margin_type, incoming=1.0)
    assert (graphs.captures, graphs.replays) == (1, 4)
    for step, ((loss, grad), (loss_e, grad_e)) in enumerate(zip(whole, eager)):
        assert torch.equal(loss, loss_e), step
        assert torch.equal(grad, grad_e), step
    assert torch.equal(w_whole.float(), w_eager.float()) and torch.equal(b_whole, b_eager)


@pytest.mark.gpu
def test_trainer_with_cuda_graph_follows_the_eager_run(tmp_path):
    """The trainer's head steps replay from one graph (its metrics say so: captured once, a
    replay every step after the first two) and follow the eager run's losses."""
    from launcher import launch, metrics, train_losses

    common = ["dist.backend=nccl", "head.impl=triton", "train.global_batch=64"]
    launch(tmp_path / "eager", 1, *common)
    launch(tmp_path / "graph", 1, *common, "head.cuda_graph=true")
    want, got = train_losses(tmp_path / "eager"), train_losses(tmp_path / "graph")
    assert len(got) == len(want) >= 5
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), f"step {step}"
    last = [row for row in metrics(tmp_path / "graph") if "loss" in row][-1]
    assert (last["head_graph_captures"], last["head_graph_failed"]) == (1, 0)
    assert last["head_graph_replays"] == last["step"] - 1  # the first step warms up, the second captures
    assert "head_graph_replays" not in metrics(tmp_path / "eager")[-1]

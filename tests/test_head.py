"""The sharded head against single-process float64 F.cross_entropy, on 1, 2 and 3 gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dist_harness import run_ranks
from torch.utils._python_dispatch import TorchDispatchMode

from hydrahead.distributed.sharding import shard_range
from hydrahead.head import ShardedClassifier, sharded_cross_entropy

NUM_CLASSES = 1001  # splits unevenly over 2 and 3 ranks
DIM = 8
BATCH = 24
MARGINS = {"none": (2.0, 0.0), "cosface": (30.0, 0.35), "arcface": (16.0, 0.5)}
PATTERNS = ("random", "boundaries", "one_rank", "ignored")


# ----------------------------------------------------------------------------------------
# Inputs and the reference
# ----------------------------------------------------------------------------------------


def make_inputs(seed: int, pattern: str, margin_type: str, dtype=torch.float64):
    """Global features, full weight and labels, identical in every process that asks."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
    if pattern == "boundaries":  # first and last class of every shard for 2 and 3 ranks
        edges = sorted(
            {
                c
                for w in (2, 3)
                for r in range(w)
                for c in (shard_range(NUM_CLASSES, w, r)[0], shard_range(NUM_CLASSES, w, r)[1] - 1)
            }
        )
        labels[: len(edges)] = torch.tensor(edges)
    elif pattern == "one_rank":  # all labels owned by the last rank of a 3-way split
        labels = torch.randint(shard_range(NUM_CLASSES, 3, 2)[0], NUM_CLASSES, (BATCH,), generator=gen)
    elif pattern == "ignored":
        labels[::3] = -100
    if margin_type == "arcface":
        # Point a few samples away from their class so theta + m > pi takes the fallback branch.
        for i in (1, 4):
            if labels[i] >= 0:
                features[i] = -weight[labels[i]] * 3 + 0.01 * features[i]
    return features.to(dtype), weight.to(dtype), labels


def reference(features, weight, labels, margin_type, scale, margin, logit_offset=None):
    """Single-process float64 loss and gradients by plain autograd and F.cross_entropy
    (``logit_offset``: one constant per class added to its logits, after the margin)."""
    f = features.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    if margin_type == "none":
        logits = scale * f @ w.t()
    else:
        cos = F.normalize(f) @ F.normalize(w).t()
        valid = labels != -100
        target = labels.clamp_min(0)[:, None]
        cos_t = cos.gather(1, target).squeeze(1)
        if margin_type == "cosface":
            phi = cos_t - margin
        else:
            theta = torch.acos(cos_t.clamp(-1.0, 1.0))
            phi = torch.where(theta + margin > math.pi, cos_t - margin * math.sin(margin), torch.cos(theta + margin))
        logits = scale * cos.scatter(1, target, torch.where(valid, phi, cos_t)[:, None])
    if logit_offset is not None:
        logits = logits + logit_offset.double()
    loss = F.cross_entropy(logits, labels, ignore_index=-100)
    loss.backward()
    return loss.detach(), f.grad, w.grad


def assert_close(actual, expected, tol, what):
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-30)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"


# ----------------------------------------------------------------------------------------
# Loss and gradients
# ----------------------------------------------------------------------------------------


CASES = [(p, m, 7) for p in PATTERNS for m in MARGINS] + [("random", "none", 1), ("boundaries", "arcface", 100_000)]


def _loss_worker(rank, world_size, cases, dtype, logit_offset=None):
    start, stop = shard_range(NUM_CLASSES, world_size, rank)
    out = []
    for seed, (pattern, margin_type, chunk_size) in enumerate(cases):
        features, weight, labels = make_inputs(seed, pattern, margin_type, dtype)
        features.requires_grad_()
        shard = weight[start:stop].clone().requires_grad_()
        scale, margin = MARGINS[margin_type]
        # every other case leaves num_classes out, exercising the count-based label check
        loss = sharded_cross_entropy(
            features,
            shard,
            labels,
            start,
            num_classes=NUM_CLASSES if seed % 2 else None,
            scale=scale,
            margin=margin,
            margin_type=margin_type,
            chunk_size=chunk_size,
            logit_offset=None if logit_offset is None else logit_offset[start:stop],
        )
        loss.backward()
        out.append((loss.detach(), shard.grad, features.grad))
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_loss_and_gradients_match_float64_reference(world_size):
    results = run_ranks(_loss_worker, world_size, CASES, torch.float64)
    for seed, (pattern, margin_type, chunk_size) in enumerate(CASES):
        features, weight, labels = make_inputs(seed, pattern, margin_type)
        ref_loss, ref_fgrad, ref_wgrad = reference(features, weight, labels, margin_type, *MARGINS[margin_type])
        what = f"{pattern}/{margin_type}/chunk={chunk_size} on {world_size} ranks"
        for rank, per_case in enumerate(results):
            loss, wgrad, _ = per_case[seed]
            start, stop = shard_range(NUM_CLASSES, world_size, rank)
            assert abs(float(loss) - float(ref_loss)) < 1e-10 * max(1.0, abs(float(ref_loss))), (
                f"{what}: loss on rank {rank}"
            )
            assert_close(wgrad, ref_wgrad[start:stop], 1e-10, f"{what}: weight grad of rank {rank}")
        summed_fgrad = sum(per_case[seed][2] for per_case in results)
        assert_close(summed_fgrad, ref_fgrad, 1e-10, f"{what}: summed feature grad")


@pytest.mark.parametrize("margin_type", list(MARGINS))
def test_logit_offsets_match_float64_reference_on_two_ranks(margin_type):
    """Per-class logit offsets (sampled softmax's correction), each rank its own classes',
    added after the margin, in chunks of 7 classes: loss and gradients as F.cross_entropy's."""
    offset = torch.rand(NUM_CLASSES, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    results = [
        per_case[0] for per_case in run_ranks(_loss_worker, 2, [("ignored", margin_type, 7)], torch.float64, offset)
    ]
    features, weight, labels = make_inputs(0, "ignored", margin_type)
    ref_loss, ref_fgrad, ref_wgrad = reference(features, weight, labels, margin_type, *MARGINS[margin_type], offset)
    plain_loss = reference(features, weight, labels, margin_type, *MARGINS[margin_type])[0]
    assert abs(float(ref_loss) - float(plain_loss)) > 0.01  # the offsets matter here
    for rank, (loss, wgrad, _) in enumerate(results):
        start, stop = shard_range(NUM_CLASSES, 2, rank)
        assert abs(float(loss) - float(ref_loss)) < 1e-10 * max(1.0, abs(float(ref_loss)))
        assert_close(wgrad, ref_wgrad[start:stop], 1e-10, f"{margin_type}: weight grad of rank {rank}")
    assert_close(sum(r[2] for r in results), ref_fgrad, 1e-10, f"{margin_type}: summed feature grad")
    with pytest.raises(ValueError, match="logit_offset"):
        sharded_cross_entropy(features, weight, labels, 0, logit_offset=offset[:-1])


def test_bf16_inputs_match_within_bf16_tolerance():
    cases = [("random", "none", 64), ("ignored", "cosface", 100)]
    results = run_ranks(_loss_worker, 2, cases, torch.bfloat16)
    for seed, (pattern, margin_type, _) in enumerate(cases):
        features, weight, labels = make_inputs(seed, pattern, margin_type, torch.bfloat16)
        ref_loss, ref_fgrad, ref_wgrad = reference(features, weight, labels, margin_type, *MARGINS[margin_type])
        loss = results[0][seed][0]
        assert loss.dtype == torch.float32  # bf16 inputs, fp32 statistics
        assert abs(float(loss) - float(ref_loss)) < 1e-2 * abs(float(ref_loss))
        assert_close(torch.cat([r[seed][1] for r in results]), ref_wgrad, 3e-2, f"bf16 {margin_type} weight grad")
        assert_close(sum(r[seed][2] for r in results), ref_fgrad, 3e-2, f"bf16 {margin_type} feature grad")


def test_without_process_group_equals_reference():
    features, weight, labels = make_inputs(99, "ignored", "cosface")
    f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = sharded_cross_entropy(f, w, labels, 0, scale=30.0, margin=0.35, margin_type="cosface", chunk_size=50)
    loss.backward()
    ref_loss, ref_fgrad, ref_wgrad = reference(features, weight, labels, "cosface", 30.0, 0.35)
    assert abs(float(loss) - float(ref_loss)) < 1e-10
    assert_close(f.grad, ref_fgrad, 1e-10, "feature grad")
    assert_close(w.grad, ref_wgrad, 1e-10, "weight grad")


def test_all_ignored_batch_gives_zero_loss_and_zero_gradients():
    features, weight, _ = make_inputs(5, "random", "none")
    weight.requires_grad_()
    loss = sharded_cross_entropy(features, weight, torch.full((BATCH,), -100), 0)
    loss.backward()
    assert float(loss) == 0.0 and float(weight.grad.abs().max()) == 0.0


# ----------------------------------------------------------------------------------------
# Memory: the chunk loop never holds more than one chunk of logits
# ----------------------------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the element count of every tensor an op creates, except those shaped like the weight."""

    def __init__(self, weight_shape):
        super().__init__()
        self.weight_shape, self.largest = tuple(weight_shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and tuple(t.shape) != self.weight_shape:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("margin_type", ["none", "arcface"])
def test_largest_temporary_does_not_grow_with_shard_size(margin_type):
    batch, chunk = 32, 64
    largest = {}
    for num_local in (1_000, 16_000):
        features = torch.randn(batch, DIM, requires_grad=True)
        weight = torch.randn(num_local, DIM, requires_grad=True)
        labels = torch.randint(0, num_local, (batch,))
        scale, margin = MARGINS[margin_type]
        with _LargestTensor(weight.shape) as mode:
            loss = sharded_cross_entropy(
                features, weight, labels, 0, chunk_size=chunk, scale=scale, margin=margin, margin_type=margin_type
            )
            loss.backward()
        largest[num_local] = mode.largest
    # The only tensors the size of C_r are the weight's own gradient (excluded above).
    assert largest[1_000] == largest[16_000] <= batch * chunk


# ----------------------------------------------------------------------------------------
# ShardedClassifier: init, gathers, uneven batches, predict, state
# ----------------------------------------------------------------------------------------


def _classifier_worker(rank, world_size, local_sizes):
    torch.manual_seed(0)
    head = ShardedClassifier(
        NUM_CLASSES,
        DIM,
        seed=7,
        init_std=0.5,
        margin_type="cosface",
        scale=16.0,
        margin=0.2,
        chunk_size=100,
        dtype=torch.float64,
    )
    gen = torch.Generator().manual_seed(1)
    global_features = torch.randn(sum(local_sizes), DIM, generator=gen, dtype=torch.float64)
    global_labels = torch.randint(0, NUM_CLASSES, (sum(local_sizes),), generator=gen)
    offset = sum(local_sizes[:rank])
    rows = slice(offset, offset + local_sizes[rank])
    local_features = global_features[rows].clone().requires_grad_()
    loss = head(local_features, global_labels[rows])
    loss.backward()
    scores, ids = head.predict(global_features[rows], k=5)
    share = head.hard_negative_share(global_features[rows], global_labels[rows], k=3)
    # Both in one pass over the shard: the same as each alone.
    both = head.predict_with_share(global_features[rows], global_labels[rows], 5, 3)
    assert torch.equal(both[0], scores) and torch.equal(both[1], ids) and torch.equal(both[2], share)
    return {
        "share": share,
        "weight": head.weight.detach(),
        "loss": loss.detach(),
        "feature_grad": local_features.grad,
        "weight_grad": head.weight.grad,
        "scores": scores,
        "ids": ids,
        "extra": head.state_dict()["_extra_state"],
    }


@pytest.mark.parametrize("world_size,local_sizes", [(1, [11]), (2, [6, 6]), (3, [5, 9, 4])])
def test_classifier_gathers_predicts_and_inits_independently_of_world_size(world_size, local_sizes):
    results = run_ranks(_classifier_worker, world_size, local_sizes)
    full_weight = torch.cat([r["weight"] for r in results])
    single = ShardedClassifier(NUM_CLASSES, DIM, seed=7, init_std=0.5, dtype=torch.float64).weight.detach()
    assert torch.equal(full_weight, single), "init must depend on (seed, class id) only"

    gen = torch.Generator().manual_seed(1)
    features = torch.randn(sum(local_sizes), DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (sum(local_sizes),), generator=gen)
    ref_loss, ref_fgrad, ref_wgrad = reference(features, full_weight, labels, "cosface", 16.0, 0.2)
    local_fgrads = torch.cat([r["feature_grad"] for r in results])  # after the gather's reduce-scatter
    assert_close(local_fgrads, ref_fgrad, 1e-10, "local feature grads")
    assert_close(torch.cat([r["weight_grad"] for r in results]), ref_wgrad, 1e-10, "weight grads")
    for r in results:
        assert abs(float(r["loss"]) - float(ref_loss)) < 1e-10

    full_scores = 16.0 * F.normalize(features) @ F.normalize(full_weight).t()
    ref_scores, ref_ids = full_scores.topk(5, dim=1)
    assert torch.equal(torch.cat([r["ids"] for r in results]), ref_ids)
    assert_close(torch.cat([r["scores"] for r in results]), ref_scores, 1e-12, "top-k scores")

    assert_close(torch.cat([r["share"] for r in results]), _reference_share(full_scores, labels, 3), 1e-12, "share")

    for rank, r in enumerate(results):
        start, stop = shard_range(NUM_CLASSES, world_size, rank)
        assert r["extra"] == {"num_classes": NUM_CLASSES, "class_start": start, "class_stop": stop, "embed_dim": DIM}


def _reference_share(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Dense float64: the k largest non-label softmax probabilities over all non-label mass."""
    p = scores.double().softmax(dim=1)
    negatives = p.scatter(1, labels[:, None], 0.0)
    return negatives.topk(k, dim=1).values.sum(dim=1) / negatives.sum(dim=1)


@pytest.mark.parametrize("margin_type, scale", [("cosface", 24.0), ("cosface", 1000.0), ("none", 1.0)])
def test_hard_negative_share_matches_the_dense_softmax(margin_type, scale):
    gen = torch.Generator().manual_seed(3)
    head = ShardedClassifier(
        NUM_CLASSES, DIM, init_std=0.5, margin_type=margin_type, scale=scale, chunk_size=7, dtype=torch.float64
    )
    labels = torch.randint(0, NUM_CLASSES, (9,), generator=gen)
    weight = head.weight.detach()
    # Most samples near their label's row, as after training: the label scores highest.
    features = torch.randn(9, DIM, generator=gen, dtype=torch.float64)
    features[:6] = 3 * weight[labels[:6]] + 0.1 * features[:6]
    dense = scale * (
        F.normalize(features) @ F.normalize(weight).t() if margin_type != "none" else features @ weight.t()
    )
    for k in (1, 5, NUM_CLASSES - 1):
        share = head.hard_negative_share(features, labels, k=k)
        assert_close(share, _reference_share(dense, labels, k), 1e-12, f"share, k={k}")
    if scale == 1000.0:  # the label holds all but <1e-12 of the mass: the negatives' sum must not cancel
        assert (dense.softmax(dim=1).gather(1, labels[:, None])[:6] > 1 - 1e-12).all()
    assert torch.allclose(
        head.hard_negative_share(features, labels, k=NUM_CLASSES - 1), torch.ones(9, dtype=torch.float64)
    )
    # predict and the share in one pass (7-class chunks): each as alone. Labelled with their
    # top classes, the label's mask would remove every sample's first prediction if it leaked.
    top_labels = dense.argmax(dim=1)
    scores, ids, share = head.predict_with_share(features, top_labels, 5, 5)
    alone = head.predict(features, k=5)
    assert torch.equal(scores, alone[0]) and torch.equal(ids, alone[1])
    assert torch.equal(share, head.hard_negative_share(features, top_labels, k=5))
    # A sample with an ignored label has no share; the others keep theirs.
    ignored = labels.clone()
    ignored[7] = head.ignore_index
    share = head.hard_negative_share(features, ignored, k=5)
    kept = torch.arange(9) != 7
    assert share[7].isnan() and not share[kept].isnan().any()
    assert_close(share[kept], _reference_share(dense, labels, 5)[kept], 1e-12, "share beside an ignored label")
    with pytest.raises(ValueError, match="k must be"):
        head.hard_negative_share(features, labels, k=NUM_CLASSES)


@pytest.mark.parametrize("margin_type", ["cosface", "arcface"])
def test_predict_with_share_scores_do_not_depend_on_the_labels(margin_type):
    """The labels only mask the share's negatives: the scores equal predict's to the bit,
    also where a label is the top class (a margin-free target path moved it by an ulp)."""
    head = ShardedClassifier(1000, 32, init_std=0.5, margin_type=margin_type, scale=30.0, chunk_size=128)
    features = torch.randn(256, 32, generator=torch.Generator().manual_seed(4))
    scores, ids = head.predict(features, k=5)
    both = head.predict_with_share(features, ids[:, 0].clone(), 5, 5)
    assert torch.equal(both[0], scores) and torch.equal(both[1], ids)


def test_a_refused_micro_batch_engine_leaves_no_step_pending():
    head = ShardedClassifier(64, 16, margin_type="none", scale=1.0)
    labels = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(5))
    active = torch.unique(torch.cat([labels, torch.arange(0, 64, 4)]))
    with pytest.raises(ValueError, match="logit_offset"):
        head.micro_batches(labels, active, check_rows=False, logit_offset=torch.zeros(active.numel() + 1))
    loss = head.loss(torch.randn(8, 16), labels, active, logit_offset=torch.zeros(active.numel()))
    assert torch.isfinite(loss)


def test_predict_with_k_larger_than_a_shard():
    results = run_ranks(_predict_small_worker, 3)
    weight = torch.cat([r[1] for r in results])
    for x, _, (scores, ids) in results:
        ref_scores, ref_ids = (x @ weight.t()).topk(4, dim=1)
        assert torch.equal(ids, ref_ids) and torch.allclose(scores, ref_scores)


def _predict_small_worker(rank, world_size):
    head = ShardedClassifier(5, 4, seed=2)  # 3 ranks own 2, 2 and 1 classes
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(rank))
    return x, head.weight.detach(), head.predict(x, k=4)


def test_loading_state_of_another_shard_is_refused():
    head = ShardedClassifier(10, 4)
    state = head.state_dict()
    state["_extra_state"] = {**state["_extra_state"], "class_start": 3}
    with pytest.raises(ValueError, match="re-shard"):
        head.load_state_dict(state)
    with pytest.raises(ValueError, match="num_classes=11"):
        ShardedClassifier(11, 4).load_state_dict(head.state_dict())


# ----------------------------------------------------------------------------------------
# Bad input: the same ValueError on every rank, and no rank left hanging
# ----------------------------------------------------------------------------------------


def _bad_input_cases(rank, world_size):
    """(name, kwargs for sharded_cross_entropy on this rank, expected message fragment)."""
    features, weight, labels = make_inputs(0, "random", "none")
    start, stop = shard_range(NUM_CLASSES, world_size, rank)
    good = dict(features=features, weight_shard=weight[start:stop], labels=labels, class_start=start)
    too_big, negative = labels.clone(), labels.clone()
    too_big[3], negative[5] = NUM_CLASSES, -2
    wrong_width = weight[start:stop, :-1] if rank == world_size - 1 else weight[start:stop]
    return [
        ("label >= C, num_classes given", {**good, "labels": too_big, "num_classes": NUM_CLASSES}, "outside [0, 1001)"),
        ("label >= C, count check", {**good, "labels": too_big}, "belong to no shard"),
        ("negative label, count check", {**good, "labels": negative}, "belong to no shard"),
        ("float labels", {**good, "labels": labels.double()}, "integer dtype"),
        ("labels length", {**good, "labels": labels[:-1]}, "entries but features has"),
        ("1-D features", {**good, "features": features[0]}, "2-D floating"),
        ("weight width on one rank", {**good, "weight_shard": wrong_width}, "weight_shard is not"),
        (
            "class range past C on one rank",
            {**good, "class_start": start + (1 if rank == world_size - 1 else 0), "num_classes": NUM_CLASSES},
            "class range",
        ),
        ("margin type", {**good, "margin_type": "sphereface"}, "margin_type"),
        ("chunk size", {**good, "chunk_size": 0}, "chunk_size"),
        ("margin without margin type", {**good, "margin": 0.3}, "needs margin_type"),
    ]


def _bad_input_worker(rank, world_size):
    messages = []
    for name, kwargs, _ in _bad_input_cases(rank, world_size):
        try:
            sharded_cross_entropy(**kwargs)
            messages.append((name, None))
        except ValueError as exc:
            messages.append((name, str(exc)))
        # A valid call after each failure proves the ranks are still in step.
        features, weight, labels = make_inputs(0, "random", "none")
        start, stop = shard_range(NUM_CLASSES, world_size, rank)
        sharded_cross_entropy(features, weight[start:stop], labels, start)
    try:
        ShardedClassifier(NUM_CLASSES, DIM)(torch.randn(4, DIM + rank), torch.zeros(4, dtype=torch.long))
        messages.append(("feature width differs between ranks", None))
    except ValueError as exc:
        messages.append(("feature width differs between ranks", str(exc)))
    return messages


@pytest.mark.parametrize("world_size", [2, 3])
def test_bad_input_raises_on_every_rank_without_hanging(world_size):
    results = run_ranks(_bad_input_worker, world_size, timeout=120)
    expected = [(name, fragment) for name, _, fragment in _bad_input_cases(0, world_size)]
    expected.append(("feature width differs between ranks", "disagree on the feature width"))
    for rank, messages in enumerate(results):
        for (name, message), (_, fragment) in zip(messages, expected):
            assert message is not None, f"rank {rank}: {name} raised nothing"
            assert fragment in message, f"rank {rank}: {name}: {message!r} lacks {fragment!r}"


class _HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host (item, bool, int, nonzero)."""

    READS = {"_local_scalar_dense", "nonzero", "is_nonzero"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_a_label_past_num_classes_fails_the_deferred_checks_without_a_host_read(impl):
    """Given MergeChecks, the loss leaves the range check to them (a label past num_classes
    belongs to no shard), so num_classes adds no host read; without them it raises at once."""
    from hydrahead.distributed.sharded_softmax import MergeChecks
    from hydrahead.kernels import triton_sharded_cross_entropy

    loss_fn = sharded_cross_entropy if impl == "reference" else triton_sharded_cross_entropy
    features, weight, labels = make_inputs(0, "random", "none", dtype=torch.float32)
    features, weight = features.float(), weight.float()
    reads = {}
    for given in (None, NUM_CLASSES):
        with _HostReads() as counter:
            loss_fn(features, weight, labels, 0, num_classes=given, checks=MergeChecks())
        reads[given] = counter.count
    assert reads[NUM_CLASSES] == reads[None]
    labels[3] = NUM_CLASSES
    with pytest.raises(ValueError, match=r"outside \[0, 1001\)"):
        loss_fn(features, weight, labels, 0, num_classes=NUM_CLASSES)
    checks = MergeChecks()
    loss_fn(features, weight, labels, 0, num_classes=NUM_CLASSES, checks=checks)
    with pytest.raises(ValueError, match="1 label.* belong to no shard"):
        checks.raise_if_failed(checks.values(features.device).tolist())


def test_the_fused_kernels_add_logit_offsets_on_the_gemm_path_only():
    """A fused head over active rows takes one offset per row as the reference head does; the
    filtered kernels take none and say so."""
    gen = torch.Generator().manual_seed(9)
    features = torch.randn(5, 8, generator=gen)
    labels = torch.tensor([3, 7, 3, 12, 20])
    rows = torch.tensor([1, 3, 7, 9, 12, 20, 25])
    offset = torch.rand(rows.numel(), generator=gen) * 2
    losses = {}
    for impl in ("reference", "triton"):
        head = ShardedClassifier(30, 8, dtype=torch.float32, seed=2, init_std=0.5, impl=impl)
        losses[impl] = float(head.loss(features, labels, rows, logit_offset=offset))
    assert abs(losses["triton"] - losses["reference"]) < 1e-5 * losses["reference"]
    head = ShardedClassifier(30, 8, dtype=torch.float32, seed=2, impl="triton", grad_filter=1e-3)
    with pytest.raises(ValueError, match="exact gemm kernels"):
        head.loss(features, labels, rows, logit_offset=offset)


def test_a_head_over_active_rows_adds_their_logit_offsets():
    """ShardedClassifier.loss(active_rows, logit_offset=...): the softmax over the active rows
    with one offset per active row, as F.cross_entropy computes it (float64)."""
    gen = torch.Generator().manual_seed(8)
    head = ShardedClassifier(30, 8, dtype=torch.float64, seed=2, init_std=0.5)
    features = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    labels = torch.tensor([3, 7, 3, 12, 20])
    rows = torch.tensor([1, 3, 7, 9, 12, 20, 25])
    offset = torch.rand(rows.numel(), generator=gen, dtype=torch.float64) * 2
    loss = head.loss(features, labels, rows, logit_offset=offset)
    head.finish_step()
    logits = features @ head.weight.detach()[rows].t() + offset
    expected = F.cross_entropy(logits, torch.searchsorted(rows, labels))
    assert abs(float(loss) - float(expected)) < 1e-12
    assert abs(float(expected) - float(F.cross_entropy(logits - offset, torch.searchsorted(rows, labels)))) > 0.05

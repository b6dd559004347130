"""Procedural data and the global-cursor sampler."""

import math

import pytest
import torch

from hydrahead.counter_rng import _mix64, _mix64_int, _signed
from hydrahead.data import (
    GlobalCursor,
    ProceduralFeatures,
    counter_hash,
    counter_normal,
    counter_uniform,
    eval_indices,
    local_batch_size,
    rank_indices,
    zipf_ranks,
)


def _assert_same_batch(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(a[1], b[1])


# -- counter-based hashing ------------------------------------------------------------


def test_mix64_matches_uint64_reference():
    # Negative inputs and the extremes catch arithmetic (sign-extending) shifts.
    values = [0, 1, -1, 2**62, 2**63 - 1, -(2**63), -12345]
    values += torch.randint(-(2**63), 2**63 - 1, (200,), dtype=torch.int64).tolist()
    got = _mix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_signed(_mix64_int(v)) for v in values]


def test_counter_hash_keyed_and_collision_free():
    index = torch.arange(200_000)
    h = counter_hash(0, 0, index)
    assert torch.unique(h).numel() == index.numel()
    assert not torch.equal(h, counter_hash(1, 0, index))
    assert not torch.equal(h, counter_hash(0, 1, index))
    # A hash of one index does not depend on its neighbours in the tensor.
    assert torch.equal(h[1234:1240], counter_hash(0, 0, index[1234:1240]))


def test_uniform_and_normal_statistics():
    u = counter_uniform(3, 0, torch.arange(200_000))
    assert u.dtype == torch.float64 and 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() * 12 - 1) < 0.02

    z = counter_normal(3, 1, torch.arange(50_000), 7)  # odd width on purpose
    assert z.shape == (50_000, 7) and z.dtype == torch.float32
    assert z.mean(0).abs().max() < 0.03
    assert (z.std(0) - 1).abs().max() < 0.03
    assert abs((z**4).mean().item() - 3) < 0.15  # Gaussian kurtosis
    corr = torch.corrcoef(z.T) - torch.eye(7)
    assert corr.abs().max() < 0.03


# -- ProceduralFeatures -----------------------------------------------------------------


def test_same_seed_and_index_give_same_sample_in_any_order():
    a = ProceduralFeatures(5_000, 48, seed=7)
    b = ProceduralFeatures(5_000, 48, seed=7)
    index = torch.arange(3_000) * 1_000_003 + 17  # sparse, large indices
    perm = torch.randperm(index.numel(), generator=torch.Generator().manual_seed(0))
    x, y = a.batch(index)
    xp, yp = b.batch(index[perm])
    assert torch.equal(yp, y[perm])
    torch.testing.assert_close(xp, x[perm], rtol=1e-5, atol=1e-5)
    # Single samples and the separate entry points agree with the batch.
    _assert_same_batch(b.batch(index[5:6]), (x[5:6], y[5:6]))
    assert torch.equal(a.labels(index), y)
    torch.testing.assert_close(a.features(index), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.features(index, labels=y), x, rtol=1e-5, atol=1e-5)


def test_different_seed_changes_data():
    index = torch.arange(2_000)
    x0, y0 = ProceduralFeatures(10_000, 32, seed=0).batch(index)
    x1, y1 = ProceduralFeatures(10_000, 32, seed=1).batch(index)
    assert (y0 == y1).float().mean() < 0.1
    assert (x0 - x1).abs().mean() > 0.5
    # Same classes, other seed: other latents.
    classes = torch.arange(100)
    lat0 = ProceduralFeatures(10_000, 32, seed=0).class_latents(classes)
    lat1 = ProceduralFeatures(10_000, 32, seed=1).class_latents(classes)
    assert (lat0 * lat1).sum(-1).abs().mean() < 0.3


def test_features_are_order_one():
    x, _ = ProceduralFeatures(1_000, 256, noise=0.5).batch(torch.arange(2_000))
    assert 0.9 < x.std().item() < 1.3
    assert x.mean().abs() < 0.1
    clean, _ = ProceduralFeatures(1_000, 256, noise=0.0).batch(torch.arange(2_000))
    assert abs(clean.pow(2).mean().sqrt().item() - 1) < 0.1
    assert x.abs().max() < 10


@pytest.mark.parametrize("num_classes", [1, 7, 1_000, 100_000_000])
@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0, 2.0])
def test_labels_in_range(num_classes, exponent):
    gen = ProceduralFeatures(num_classes, 8, zipf_exponent=exponent)
    index = torch.cat([torch.arange(20_000), 2**62 - 1 - torch.arange(1_000)])
    labels = gen.labels(index)
    assert labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() < num_classes
    if num_classes == 1:
        assert torch.all(labels == 0)
    if num_classes == 100_000_000 and exponent == 0.0:
        # Uniform over 1e8: the ids really reach the whole range.
        assert labels.max() > 0.9 * num_classes and labels.min() < 0.1 * num_classes


def test_rank_to_class_is_a_bijection_that_spreads_popular_classes():
    # Uniform classes: every one of the 1000 classes appears (about 100 times each).
    labels = ProceduralFeatures(1_000, 8, zipf_exponent=0.0).labels(torch.arange(100_000))
    assert torch.bincount(labels, minlength=1_000).min() > 0
    # Zipf: the 16 most popular classes fall into most of 8 equal class-id ranges.
    labels = ProceduralFeatures(80_000, 8, zipf_exponent=1.0).labels(torch.arange(100_000))
    top = torch.bincount(labels).topk(16).indices
    assert torch.unique(top // 10_000).numel() >= 6


@pytest.mark.parametrize("exponent", [0.7, 1.0, 1.5])
def test_zipf_power_law(exponent):
    counts = torch.bincount(
        ProceduralFeatures(1_000, 8, zipf_exponent=exponent).labels(torch.arange(200_000)),
        minlength=1_000,
    )
    top = counts.sort(descending=True).values[:30].double()
    ratio = (top[0] / top[1]).item()
    assert ratio == pytest.approx(2.0**exponent, rel=0.05)
    # Log-log slope of count against rank over the head of the distribution.
    ranks = torch.arange(1, 31, dtype=torch.float64)
    x, y = ranks.log(), top.log()
    slope = (((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()).item()
    assert slope == pytest.approx(-exponent, abs=0.05)


@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0, 1.0 + 1e-9, 2.0])
def test_zipf_ranks_match_their_distribution(exponent):
    # Ranks 1..32 weigh exactly k^-s; rank k beyond weighs the integral of x^-s over
    # [k - 0.5, k + 0.5).
    u = counter_uniform(0, 0, torch.arange(200_000))
    counts = torch.bincount(zipf_ranks(u, 80, exponent), minlength=80).double()
    t = 1.0 - exponent
    if abs(t) < 1e-6:
        cdf = lambda v: math.log(v)  # noqa: E731
    else:
        cdf = lambda v: v**t / t  # noqa: E731
    mass = [k**-exponent if k <= 32 else cdf(k + 0.5) - cdf(k - 0.5) for k in range(1, 81)]
    mass = torch.tensor(mass, dtype=torch.float64)
    expected = mass / mass.sum() * u.numel()
    # Poisson noise only: within 5 standard deviations everywhere.
    assert counts.numel() == 80
    assert ((counts - expected).abs() <= 5 * expected.sqrt() + 1).all()


def test_zipf_ranks_small_and_huge_class_counts():
    u = counter_uniform(0, 0, torch.arange(100_000))
    assert torch.all(zipf_ranks(u, 1, 1.0) == 0)
    for num_classes in (5, 32, 33, 100_000_000):
        ranks = zipf_ranks(u, num_classes, 1.0)
        assert ranks.min() == 0 and ranks.max() < num_classes
    # Exactly Zipf when all ranks fit in the table: 1 : 1/2 : ... : 1/5.
    counts = torch.bincount(zipf_ranks(u, 5, 1.0), minlength=5).double()
    expected = torch.tensor([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5], dtype=torch.float64)
    torch.testing.assert_close(counts / counts.sum(), expected / expected.sum(), rtol=0.03, atol=0)


def test_family_structure():
    gen = ProceduralFeatures(400, 64, family_size=4, family_spread=0.3, noise=0.5, seed=2)
    classes = torch.arange(400)
    latents = gen.class_latents(classes)
    torch.testing.assert_close(latents.norm(dim=-1), torch.ones(400))
    cos = latents @ latents.T
    family = classes // 4
    same = (family[:, None] == family[None, :]) & ~torch.eye(400, dtype=torch.bool)
    other = family[:, None] != family[None, :]
    assert cos[same].mean() > 0.85
    assert cos[other].abs().mean() < 0.15

    # The nearest other class (a hard negative) is a family member.
    templates = gen.render(latents)
    dist = torch.cdist(templates, templates).fill_diagonal_(float("inf"))
    assert (family[dist.argmin(1)] == family).float().mean() > 0.95

    # Nearest noise-free class rendering recovers the label of a noisy sample.
    x, y = gen.batch(torch.arange(2_000))
    assert (torch.cdist(x, templates).argmin(1) == y).float().mean() > 0.9
    # With features of clean samples, the templates are exactly the rendering.
    clean = ProceduralFeatures(400, 64, family_size=4, noise=0.0, seed=2)
    torch.testing.assert_close(clean.features(torch.arange(100)), templates[y[:100]])


def test_train_and_eval_splits_differ_but_share_the_classes():
    index = torch.arange(50_000)
    train = ProceduralFeatures(1_000, 32, split="train")
    held_out = ProceduralFeatures(1_000, 32, split="eval")
    x_train, y_train = train.batch(index[:2_000])
    x_eval, y_eval = held_out.batch(index[:2_000])
    assert (y_train == y_eval).float().mean() < 0.2
    assert (x_train - x_eval).abs().mean() > 0.3
    # Same class latents, same class distribution.
    classes = torch.arange(50)
    assert torch.equal(train.class_latents(classes), held_out.class_latents(classes))
    freq_train = torch.bincount(train.labels(index), minlength=1_000).double() / index.numel()
    freq_eval = torch.bincount(held_out.labels(index), minlength=1_000).double() / index.numel()
    top = freq_train.topk(5).indices
    torch.testing.assert_close(freq_eval[top], freq_train[top], rtol=0.1, atol=0.0)


def test_argument_errors():
    with pytest.raises(ValueError, match="num_classes"):
        ProceduralFeatures(0, 8)
    with pytest.raises(ValueError, match="num_classes"):
        ProceduralFeatures(2**40, 8)
    with pytest.raises(ValueError, match="num_classes"):
        ProceduralFeatures(10.0, 8)
    with pytest.raises(ValueError, match="feature_dim"):
        ProceduralFeatures(10, 0)
    with pytest.raises(ValueError, match="family_size"):
        ProceduralFeatures(10, 8, family_size=0)
    with pytest.raises(ValueError, match="split"):
        ProceduralFeatures(10, 8, split="test")
    with pytest.raises(ValueError, match="noise"):
        ProceduralFeatures(10, 8, noise=-0.1)
    with pytest.raises(ValueError, match="zipf_exponent"):
        ProceduralFeatures(10, 8, zipf_exponent=float("nan"))
    with pytest.raises(ValueError, match="family_spread"):
        ProceduralFeatures(10, 8, family_spread=-1.0)
    gen = ProceduralFeatures(10, 8)
    with pytest.raises(ValueError, match="indices"):
        gen.labels(torch.arange(4.0))
    with pytest.raises(ValueError, match="indices"):
        gen.batch(torch.arange(4).view(2, 2))
    with pytest.raises(ValueError, match="class_ids"):
        gen.class_latents(torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="labels"):
        gen.features(torch.arange(4), labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels"):
        gen.features(torch.arange(2), labels=torch.tensor([0, -1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    index = torch.arange(4_096) * 3 + 5
    assert torch.equal(counter_hash(1, 2, index.cuda()).cpu(), counter_hash(1, 2, index))
    cpu = ProceduralFeatures(100_000_000, 128, seed=1)
    gpu = ProceduralFeatures(100_000_000, 128, seed=1, device="cuda")
    x, y = gpu.batch(index)
    assert x.is_cuda and y.is_cuda
    x_ref, y_ref = cpu.batch(index)
    # Labels could differ only if a draw fell within an ulp of a rank boundary.
    assert torch.equal(y.cpu(), y_ref)
    torch.testing.assert_close(x.cpu(), x_ref, rtol=1e-4, atol=1e-4)


# -- sampler ----------------------------------------------------------------------------


def test_global_batch_independent_of_world_size():
    gen = ProceduralFeatures(1_000, 16)
    global_batch = 12
    for step in range(3):
        cursor = step * global_batch
        expected = gen.batch(torch.arange(cursor, cursor + global_batch))
        for world_size in (1, 2, 3, 4):
            parts = [gen.batch(rank_indices(cursor, global_batch, rank, world_size)) for rank in range(world_size)]
            assert all(p[1].numel() == global_batch // world_size for p in parts)
            merged = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
            _assert_same_batch(merged, expected)


def test_rank_indices_slices():
    assert rank_indices(100, 8, 1, 4).tolist() == [102, 103]
    assert rank_indices(0, 6, 0, 1).tolist() == list(range(6))
    assert local_batch_size(4096, 8) == 512
    with pytest.raises(ValueError, match="divisible"):
        rank_indices(0, 10, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        rank_indices(0, 8, 4, 4)
    with pytest.raises(ValueError, match="world_size"):
        rank_indices(0, 8, 0, 0)
    with pytest.raises(ValueError, match="cursor"):
        rank_indices(-1, 8, 0, 1)
    with pytest.raises(ValueError, match="global_batch"):
        rank_indices(0, 0, 0, 1)


def test_cursor_resume_continues_the_stream():
    run = GlobalCursor()
    for _ in range(3):
        run.next_indices(8, 0, 2)
    state = run.state_dict()
    assert state == {"cursor": 24}
    tail = [run.next_indices(8, 1, 2) for _ in range(2)]

    resumed = GlobalCursor()
    resumed.load_state_dict(dict(state))
    assert [resumed.next_indices(8, 1, 2).tolist() for _ in range(2)] == [t.tolist() for t in tail]
    assert tail[0].tolist() == [28, 29, 30, 31]

    # Resuming at another world size still reads the same global batches.
    other = GlobalCursor()
    other.load_state_dict({"cursor": torch.tensor(24)})
    ranks = [GlobalCursor(other.cursor) for _ in range(4)]
    merged = torch.cat([c.next_indices(8, r, 4) for r, c in enumerate(ranks)])
    assert merged.tolist() == list(range(24, 32))
    assert all(c.cursor == 32 for c in ranks)

    with pytest.raises(ValueError, match="cursor"):
        GlobalCursor().load_state_dict({"step": 3})
    with pytest.raises(ValueError, match="cursor"):
        GlobalCursor().load_state_dict({"cursor": -8})
    with pytest.raises(ValueError, match="cursor"):
        GlobalCursor(1.5)


@pytest.mark.parametrize("num_samples,world_size", [(10, 3), (12, 4), (2, 5), (0, 2), (7, 1)])
def test_eval_indices_partition(num_samples, world_size):
    parts = [eval_indices(num_samples, rank, world_size) for rank in range(world_size)]
    assert torch.cat(parts).tolist() == list(range(num_samples))
    sizes = [p.numel() for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first ranks take the extra ones


def test_eval_indices_errors():
    with pytest.raises(ValueError, match="num_samples"):
        eval_indices(-1, 0, 1)
    with pytest.raises(ValueError, match="rank"):
        eval_indices(10, 2, 2)

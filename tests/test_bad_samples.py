"""data.on_bad_sample for image folders: stop naming the file, or substitute and count."""

import io
import itertools

import numpy as np
import pytest
import torch

from hydrahead.config import Config
from hydrahead.data import (
    BadImageError,
    ImageFolder,
    batches,
    build_dataset,
    eval_batches,
    eval_indices,
)
from hydrahead.data.build import BatchStream

Image = pytest.importorskip("PIL.Image")
from hydrahead.data.folder import _sample_seeds  # noqa: E402

NUM_CLASSES, PER_CLASS, IMAGE_SIZE, SEED = 3, 3, 8, 5
CORRUPT, TRUNCATED = "class_1/corrupt.jpg", "class_2/truncated.png"


def _png_bytes(rng, size=16):
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def root(tmp_path):
    """9 good PNGs, a file of garbage bytes named .jpg and a PNG cut in half."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in range(NUM_CLASSES):
        (folder / f"class_{c}").mkdir(parents=True)
        for j in range(PER_CLASS):
            (folder / f"class_{c}" / f"img_{j}.png").write_bytes(_png_bytes(rng))
    (folder / CORRUPT).write_bytes(b"\x00garbage, not an image at all" * 5)
    whole = _png_bytes(rng)
    (folder / TRUNCATED).write_bytes(whole[: len(whole) // 2])
    return folder


def _dataset(root, policy, split="train", **kwargs):
    return ImageFolder(root, image_size=IMAGE_SIZE, split=split, seed=SEED, on_bad_sample=policy, **kwargs)


def _bad_items(dataset):
    bad = {
        i
        for i in range(dataset.num_items)
        if dataset.file(i).relative_to(dataset.root).as_posix() in (CORRUPT, TRUNCATED)
    }
    assert len(bad) == 2
    return bad


def _expected(dataset, index, bad):
    """(item read, substituted?) for sample ``index``: the rule, written out independently."""
    n = dataset.num_items
    epoch, position = divmod(index, n)
    for k in range(n):
        item = int(dataset.items(torch.tensor([epoch * n + (position + k) % n]))[0])
        if item not in bad:
            return item, k > 0
    raise AssertionError("no good item")


def _take(stream, n):
    out = []
    for x, y in itertools.islice(stream, n):
        out.append((x, y, stream.bad_samples_skipped))
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya, ca), (xb, yb, cb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb) and ca == cb


def _stream(dataset, start_step=0, rank=0, world_size=1, num_workers=0, global_batch=5):
    return batches(
        dataset,
        start_step=start_step,
        global_batch=global_batch,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
    )


# -- error ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [CORRUPT, TRUNCATED])
def test_error_names_the_bad_file_in_process(root, name):
    cfg = Config()
    cfg.data.kind, cfg.data.path, cfg.data.image_size = "image_folder", str(root), IMAGE_SIZE
    cfg.head.num_classes = NUM_CLASSES
    assert cfg.data.on_bad_sample == "error"
    dataset = build_dataset(cfg, "eval")  # the default policy
    assert dataset.on_bad_sample == "error"
    item = next(i for i in range(dataset.num_items) if dataset.file(i) == root / name)
    dataset.batch(torch.tensor([item - 1]))  # its neighbour still reads
    with pytest.raises(BadImageError, match=name.split("/")[1]):
        dataset.batch(torch.tensor([item]))
    with pytest.raises(BadImageError, match=name.split("/")[1]):
        dataset[item]


def test_error_names_the_bad_file_from_workers(root):
    dataset = _dataset(root, "error", split="eval")
    # Eval reads the files in order: the first batch of 4 is good, the second holds
    # class_1/corrupt.jpg (item 3 in sorted order).
    assert dataset.file(3) == root / CORRUPT
    stream = eval_batches(dataset, num_samples=dataset.num_items, batch_size=3, rank=0, world_size=1, num_workers=2)
    x, y = next(stream)
    assert len(y) == 3
    with pytest.raises(BadImageError, match=r"worker process[\s\S]*corrupt\.jpg"):
        list(stream)


def test_policy_is_validated_and_passed_from_the_config(root):
    with pytest.raises(ValueError, match="'ignore'"):
        _dataset(root, "ignore")
    with pytest.raises(ValueError, match="max_bad_in_a_row"):
        _dataset(root, "skip", max_bad_in_a_row=0)
    cfg = Config()
    cfg.data.kind, cfg.data.path, cfg.data.image_size = "image_folder", str(root), IMAGE_SIZE
    cfg.head.num_classes = NUM_CLASSES
    cfg.data.on_bad_sample = "skip"
    for split in ("train", "eval"):
        assert build_dataset(cfg, split).on_bad_sample == "skip"
        # Reading every file works, substitutions included.
        x, y = build_dataset(cfg, split).batch(torch.arange(11))
        assert len(y) == 11


# -- skip -------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "eval"])
def test_skip_reads_the_next_good_file_with_the_original_augmentation(root, split):
    dataset = _dataset(root, "skip", split=split)
    clean = _dataset(root, "error", split=split)  # reads good items as usual
    bad = _bad_items(dataset)
    n = dataset.num_items
    indices = torch.arange(3 * n)
    x, y = dataset.batch(indices)
    substituted = 0
    for index in indices.tolist():
        item, swapped = _expected(dataset, index, bad)
        substituted += swapped
        seed = _sample_seeds(SEED, torch.tensor([index]))[0]
        want = clean.finish_batch(clean._load(item, seed)[None])[0]
        assert torch.equal(x[index], want), index
        assert y[index] == clean._labels[item]
    assert substituted == 3 * len(bad)  # each bad file once per epoch
    assert dataset.bad_samples_skipped == substituted
    # Sample by sample (the worker path) gives the same, with a count per sample.
    for index in (0, n, 2 * n + 1, *range(n)):
        pixels, label, count = dataset[index]
        assert label == y[index] and count == _expected(dataset, index, bad)[1]
        assert torch.equal(dataset.finish_batch(pixels[None])[0], x[index])


def test_skip_streams_full_good_batches_deterministically_and_counts(root):
    dataset = _dataset(root, "skip")
    bad = _bad_items(dataset)
    steps = 6  # 30 samples, over 2.7 epochs of 11
    stream = _stream(dataset)
    assert isinstance(stream, BatchStream) and stream.bad_samples_skipped == 0
    x, y = next(stream)  # (inputs, labels), as before
    assert x.shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE) and len(y) == 5
    first = _take(_stream(dataset), steps)
    expected_counts = list(
        itertools.accumulate(sum(_expected(dataset, i, bad)[1] for i in range(5 * s, 5 * s + 5)) for s in range(steps))
    )
    assert [c for _, _, c in first] == expected_counts
    own = dataset.items(torch.arange(5 * steps)).tolist()
    assert expected_counts[-1] == sum(item in bad for item in own) >= 4  # 2 per full epoch
    for x, y, _ in first:
        assert x.shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE) and len(y) == 5
    # Another construction reads the same; so do DataLoader workers, counts included.
    _assert_same(_take(_stream(_dataset(root, "skip")), steps), first)
    _assert_same(_take(_stream(_dataset(root, "skip"), num_workers=2), steps), first)


def _take_prefetching(stream, n):
    """``_take`` with a prefetch after every batch handed out, as the trainer does."""
    out = []
    for _ in range(n):
        x, y = next(stream)
        stream.prefetch()
        stream.prefetch()  # a second call waits for next(): no batch is skipped
        out.append((x, y, stream.bad_samples_skipped))
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_prefetched_batches_and_counts_equal_the_plain_stream(root, num_workers):
    """prefetch() makes the next batch early: the batches are the same, and a prefetched
    batch's substitutions count only once it is handed out."""
    steps = 6
    plain = _take(_stream(_dataset(root, "skip"), num_workers=num_workers), steps)
    assert plain[-1][2] > plain[0][2]  # substitutions happen along the way
    _assert_same(_take_prefetching(_stream(_dataset(root, "skip"), num_workers=num_workers), steps), plain)


def test_an_error_making_a_prefetched_batch_is_raised_by_the_next_that_asks_for_it(root):
    """The trainer prefetches batch N+1 during step N: a bad file in it must fail step N+1,
    as without the prefetch, not step N (whose checkpoint would then never be written)."""
    plain, ahead = (_stream(_dataset(root, "error"), global_batch=1) for _ in range(2))
    for step in range(40):
        try:
            want = next(plain)
        except BadImageError as error:
            with pytest.raises(BadImageError, match=str(error).split(":")[0]):
                next(ahead)
            break
        got = next(ahead)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        ahead.prefetch()  # never raises: the error waits for the next next()
    else:
        pytest.fail("no batch of the stream held a bad file")
    assert step >= 1  # the bad batch came after a prefetch


def test_skip_eval_counts_with_and_without_workers(root):
    dataset = _dataset(root, "skip", split="eval")
    kwargs = dict(num_samples=22, batch_size=4, rank=1, world_size=2)
    in_process = eval_batches(dataset, **kwargs)
    a = list(in_process)
    workers = eval_batches(_dataset(root, "skip", split="eval"), num_workers=2, **kwargs)
    b = list(workers)
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Eval reads file i % 11 for sample i; count rank 1's samples whose file is bad.
    bad = _bad_items(dataset)
    assert bad == {3, 10}  # class_1/corrupt.jpg, class_2/truncated.png in sorted order
    mine = eval_indices(22, 1, 2).tolist()
    want = sum(_expected(dataset, i, bad)[1] for i in mine)
    assert want == sum(1 for i in mine if i % 11 in bad) > 0
    assert in_process.bad_samples_skipped == workers.bad_samples_skipped == want


def test_skip_gives_up_when_every_file_is_bad(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"nope")
    (tmp_path / "a" / "y.jpg").write_bytes(b"nope either")
    dataset = ImageFolder(tmp_path, image_size=4, on_bad_sample="skip")
    with pytest.raises(BadImageError, match=r"none of the 2 image files[\s\S]*last tried"):
        dataset.batch(torch.tensor([0]))
    # Known-bad files fail again the same way (no hang, no half-filled counter).
    with pytest.raises(BadImageError, match=r"none of the 2 image files.*\.(png|jpg)"):
        dataset.batch(torch.tensor([5]))
    assert dataset.bad_samples_skipped == 0
    stream = batches(
        ImageFolder(tmp_path, image_size=4, on_bad_sample="skip"),
        start_step=0,
        global_batch=2,
        rank=0,
        world_size=1,
        num_workers=2,
    )
    with pytest.raises(BadImageError, match="none of the 2 image files"):
        next(stream)


def test_skip_gives_up_after_max_bad_in_a_row(root):
    # Three bad files in a row in eval order: class_1 holds corrupt.jpg, then two more.
    (root / "class_1" / "img_0.png").write_bytes(b"bad")
    (root / "class_1" / "img_1.png").write_bytes(b"bad")
    dataset = _dataset(root, "skip", split="eval", max_bad_in_a_row=3)
    assert [dataset.file(i).name for i in (3, 4, 5, 6)] == ["corrupt.jpg", "img_0.png", "img_1.png", "img_2.png"]
    with pytest.raises(BadImageError, match=r"3 files in a row.*corrupt\.jpg.*last tried.*img_1"):
        dataset.batch(torch.tensor([3]))
    # One more attempt reaches class_1/img_2.png.
    x, y = _dataset(root, "skip", split="eval", max_bad_in_a_row=4).batch(torch.tensor([3, 4]))
    want = _dataset(root, "error", split="eval").batch(torch.tensor([6, 6]))
    assert torch.equal(x, want[0]) and torch.equal(y, want[1])


def test_skip_keeps_world_size_independence_and_resume(root):
    dataset = _dataset(root, "skip")
    one = _take(_stream(dataset, global_batch=6), 4)
    assert one[-1][2] > 0  # bad files were met
    per_rank = [_take(_stream(dataset, rank=r, world_size=2, global_batch=6), 4) for r in range(2)]
    for step in range(4):
        x = torch.cat([per_rank[r][step][0] for r in range(2)])
        y = torch.cat([per_rank[r][step][1] for r in range(2)])
        assert torch.equal(y, one[step][1])
        torch.testing.assert_close(x, one[step][0], rtol=1e-5, atol=1e-5)
        assert per_rank[0][step][2] + per_rank[1][step][2] == one[step][2]

    full = _take(_stream(dataset, rank=1, world_size=2, global_batch=6), 6)
    for k in (2, 3):
        fresh = _dataset(root, "skip")
        resumed = _take(_stream(fresh, start_step=k, rank=1, world_size=2, global_batch=6), 6 - k)
        offset = full[k - 1][2]
        tail = [(x, y, c - offset) for x, y, c in full[k:]]
        _assert_same(resumed, tail)
    assert full[-1][2] > full[1][2]  # the resumed parts met bad files too

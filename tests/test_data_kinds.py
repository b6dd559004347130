"""The data kinds beyond procedural features: procedural images, image folders, feature files."""

import itertools
import random

import numpy as np
import pytest
import torch

from hydrahead.config import Config
from hydrahead.data import (
    BadImageError,
    EpochOrder,
    FeatureFiles,
    ImageFolder,
    ProceduralFeatures,
    ProceduralImages,
    batches,
    build_dataset,
    eval_batches,
)

Image = pytest.importorskip("PIL.Image")
from hydrahead.data.folder import _random_resized_box  # noqa: E402

NUM_CLASSES, PER_CLASS, IMAGE_SIZE = 3, 4, 8
NUM_ROWS, FEATURE_DIM, FEATURE_CLASSES = 10, 6, 5


# -- fixtures -------------------------------------------------------------------------


def _write_images(folder, num_classes=NUM_CLASSES, per_class=PER_CLASS, seed=0):
    """Tiny textured PNGs of varied sizes, one sub-folder per class."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        (folder / f"class_{c}").mkdir(parents=True)
        for j in range(per_class):
            h, w = rng.integers(10, 20, size=2)
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"class_{c}" / f"img_{j}.png")
    return folder


@pytest.fixture
def image_root(tmp_path):
    return _write_images(tmp_path / "images")


@pytest.fixture
def feature_root(tmp_path):
    """features[i, 0] == i, so the row read for a sample can be told from its features."""
    root = tmp_path / "features"
    root.mkdir()
    rng = np.random.default_rng(0)
    features = rng.standard_normal((NUM_ROWS, FEATURE_DIM)).astype(np.float32)
    features[:, 0] = np.arange(NUM_ROWS)
    np.save(root / "features.npy", features)
    np.save(root / "labels.npy", np.arange(NUM_ROWS, dtype=np.int64) % FEATURE_CLASSES)
    return root


def _config(kind, path=None, **data):
    cfg = Config()
    cfg.data.kind = kind
    cfg.data.path = None if path is None else str(path)
    cfg.data.image_size = IMAGE_SIZE
    cfg.run.seed = 3
    num_classes = {"image_folder": NUM_CLASSES, "features": FEATURE_CLASSES}
    cfg.head.num_classes = num_classes.get(kind, 1_000)
    cfg.model.input_dim = FEATURE_DIM if kind == "features" else cfg.data.feature_dim
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


@pytest.fixture(params=["procedural_images", "image_folder", "features"])
def kind_config(request, image_root, feature_root):
    path = {"image_folder": image_root, "features": feature_root}.get(request.param)
    return _config(request.param, path)


def _take(stream, n):
    return list(itertools.islice(stream, n))


def _assert_same_batches(a, b, exact=True):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        if exact:
            assert torch.equal(xa, xb)
        else:
            torch.testing.assert_close(xa, xb, rtol=1e-5, atol=1e-5)


# -- every kind -------------------------------------------------------------------------


def test_build_dataset_dispatches_every_kind(image_root, feature_root):
    expected = {
        "procedural_features": (ProceduralFeatures, "features", None),
        "procedural_images": (ProceduralImages, "images", None),
        "image_folder": (ImageFolder, "images", image_root),
        "features": (FeatureFiles, "features", feature_root),
    }
    for kind, (cls, input_kind, path) in expected.items():
        cfg = _config(kind, path)
        for split in ("train", "eval"):
            dataset = build_dataset(cfg, split)
            assert isinstance(dataset, cls)
            assert dataset.input_kind == input_kind
            assert dataset.num_classes == cfg.head.num_classes
            x, y = dataset.batch(torch.arange(5))
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and len(x) == len(y) == 5
            assert y.min() >= 0 and y.max() < dataset.num_classes


def test_same_seed_and_index_give_same_batch(kind_config):
    # Two separate constructions; indices out of order, repeated, and past an epoch.
    indices = torch.tensor([17, 3, 3, 40, 0, 11, 25])
    a = build_dataset(kind_config).batch(indices)
    b = build_dataset(kind_config).batch(indices)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    # A sample does not depend on the rest of its batch.
    single = build_dataset(kind_config).batch(indices[3:4])
    torch.testing.assert_close(single[0], a[0][3:4], rtol=1e-5, atol=1e-5)
    # Another seed, other samples.
    kind_config.run.seed += 1
    c = build_dataset(kind_config).batch(indices)
    assert not torch.equal(a[0], c[0])


def test_resume_reads_the_tail_of_the_stream(kind_config):
    dataset = build_dataset(kind_config)
    stream = dict(global_batch=4, rank=1, world_size=2)
    full = _take(batches(dataset, start_step=0, **stream), 6)
    resumed = _take(batches(build_dataset(kind_config), start_step=4, **stream), 2)
    _assert_same_batches(resumed, full[4:])


def test_global_batches_do_not_depend_on_world_size(kind_config):
    dataset = build_dataset(kind_config)
    one = _take(batches(dataset, start_step=0, global_batch=6, rank=0, world_size=1), 3)
    per_rank = [_take(batches(dataset, start_step=0, global_batch=6, rank=r, world_size=2), 3) for r in range(2)]
    for step in range(3):
        merged = tuple(torch.cat([per_rank[r][step][i] for r in range(2)]) for i in range(2))
        _assert_same_batches([merged], [one[step]], exact=False)


@pytest.mark.parametrize("kind", ["procedural_images", "image_folder", "features"])
def test_eval_batches_same_count_on_every_rank(kind, image_root, feature_root):
    path = {"image_folder": image_root, "features": feature_root}.get(kind)
    dataset = build_dataset(_config(kind, path), "eval")
    per_rank = [list(eval_batches(dataset, num_samples=5, batch_size=2, rank=r, world_size=3)) for r in range(3)]
    assert [len(p) for p in per_rank] == [1, 1, 1]
    assert [len(p[0][1]) for p in per_rank] == [2, 2, 1]
    # The ranks' shares, concatenated, are the first 5 eval samples.
    labels = torch.cat([y for p in per_rank for _, y in p])
    assert torch.equal(labels, dataset.batch(torch.arange(5))[1])


# -- epoch order ------------------------------------------------------------------------


def test_epoch_order_visits_every_item_once_per_epoch():
    order = EpochOrder(10, seed=5)
    items = order.items(torch.arange(40)).view(4, 10)
    for epoch in items:
        assert sorted(epoch.tolist()) == list(range(10))
    assert len({tuple(e.tolist()) for e in items}) == 4  # a fresh order each epoch
    # Same answer from a fresh object, asked in another order (and resumed mid-epoch).
    again = EpochOrder(10, seed=5).items(torch.arange(39, 14, -1))
    assert torch.equal(again, items.flatten()[15:40].flip(0))
    assert not torch.equal(EpochOrder(10, seed=6).items(torch.arange(10)), items[0])
    in_order = EpochOrder(10, seed=5, shuffle=False).items(torch.arange(25))
    assert in_order.tolist() == [i % 10 for i in range(25)]


def test_datasets_read_each_item_once_per_epoch(image_root, feature_root):
    files = build_dataset(_config("features", feature_root))
    rows = files.batch(torch.arange(2 * NUM_ROWS))[0][:, 0].long().view(2, NUM_ROWS)
    for epoch in rows:
        assert sorted(epoch.tolist()) == list(range(NUM_ROWS))
    assert not torch.equal(rows[0], rows[1])

    folder = build_dataset(_config("image_folder", image_root))
    n = NUM_CLASSES * PER_CLASS
    items = folder.items(torch.arange(2 * n)).view(2, n)
    for epoch in items:
        assert sorted(epoch.tolist()) == list(range(n))
    labels = folder.batch(torch.arange(n))[1]
    assert torch.bincount(labels).tolist() == [PER_CLASS] * NUM_CLASSES


# -- procedural images ------------------------------------------------------------------


def test_procedural_images_shape_and_values():
    data = ProceduralImages(100_000_000, 32, seed=1)  # nothing stored per class
    x, y = data.batch(torch.arange(64))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert 0.8 < x.std().item() < 1.5 and x.mean().abs() < 0.2
    assert y.min() >= 0 and y.max() < 100_000_000
    # Same labels as procedural features with the same seed: one problem, two renderings.
    assert torch.equal(y, ProceduralFeatures(100_000_000, 8, seed=1).labels(torch.arange(64)))
    # The eval split draws other samples.
    held_out = ProceduralImages(100_000_000, 32, seed=1, split="eval").batch(torch.arange(64))
    assert (held_out[1] == y).float().mean() < 0.2
    assert ProceduralImages(10, 32).batch(torch.arange(0))[0].shape == (0, 3, 32, 32)


def test_procedural_images_classes_and_families():
    data = ProceduralImages(400, 16, seed=2, family_size=4)
    classes = torch.arange(400)
    images = data.render(classes).flatten(1)
    family = classes // 4
    same = (family[:, None] == family[None, :]) & ~torch.eye(400, dtype=torch.bool)
    other = family[:, None] != family[None, :]
    dist = torch.cdist(images, images)
    rms = images.pow(2).mean().sqrt() * images.shape[1] ** 0.5
    # Different classes are clearly different pictures; family members are closer.
    assert dist[other].min() > 0.3 * rms
    assert dist[same].mean() < 0.6 * dist[other].mean()
    # The nearest other class is a family member for almost every class.
    assert (family[dist.fill_diagonal_(float("inf")).argmin(1)] == family).float().mean() > 0.9


def test_procedural_images_samples_follow_their_class():
    # Shifted, noisy samples still sit nearest to their own class's rendering.
    data = ProceduralImages(64, 16, seed=4, family_size=1, max_shift=0.03, noise=0.3, zipf_exponent=0.0)
    x, y = data.batch(torch.arange(256))
    templates = data.render(torch.arange(64))
    assert (torch.cdist(x.flatten(1), templates.flatten(1)).argmin(1) == y).float().mean() > 0.9
    # The per-sample shift moves the picture: two samples of a class are not identical.
    clean = ProceduralImages(64, 16, seed=4, family_size=1, noise=0.0, zipf_exponent=0.0)
    xc, yc = clean.batch(torch.arange(256))
    first, second = (yc == yc[0]).nonzero().flatten()[:2]
    assert (xc[first] - xc[second]).abs().mean() > 0.05


def test_num_workers_ignored_with_a_warning_for_generated_data():
    data = ProceduralImages(10, 8)
    with pytest.warns(UserWarning, match="num_workers=2 is ignored"):
        stream = batches(data, start_step=0, global_batch=4, rank=0, world_size=1, num_workers=2)
        x, _ = next(stream)
    assert x.shape == (4, 3, 8, 8)


# -- image folder -----------------------------------------------------------------------


def test_image_folder_workers_match_in_process(image_root):
    dataset = build_dataset(_config("image_folder", image_root))
    stream = dict(start_step=1, global_batch=6, rank=1, world_size=2)
    in_process = _take(batches(dataset, **stream), 4)
    rng_state = torch.get_rng_state()
    workers = _take(batches(dataset, num_workers=2, **stream), 4)
    _assert_same_batches(workers, in_process)
    assert torch.equal(torch.get_rng_state(), rng_state)  # starting workers drew no global RNG
    eval_data = build_dataset(_config("image_folder", image_root), "eval")
    kwargs = dict(num_samples=7, batch_size=2, rank=1, world_size=2)
    in_process = list(eval_batches(eval_data, **kwargs))
    _assert_same_batches(list(eval_batches(eval_data, num_workers=2, **kwargs)), in_process)


def test_image_folder_augments_train_and_not_eval(image_root):
    train = build_dataset(_config("image_folder", image_root))
    n = train.num_items
    # The same file in two epochs: other crops and flips.
    items = train.items(torch.arange(2 * n))
    first, second = 0, n + int((items[n:] == items[0]).nonzero()[0])
    x, _ = train.batch(torch.tensor([first, second]))
    assert not torch.equal(x[0], x[1])

    held_out = build_dataset(_config("image_folder", image_root), "eval")
    a, b = held_out.batch(torch.tensor([0, n])), held_out.batch(torch.tensor([0, n]))
    assert torch.equal(a[0][0], a[0][1]) and torch.equal(a[0], b[0])
    assert a[0].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_image_folder_normalises_with_imagenet_statistics(tmp_path):
    # A flat grey image is the same value everywhere after any crop and resize.
    (tmp_path / "a").mkdir()
    Image.new("RGB", (12, 9), (128, 64, 200)).save(tmp_path / "a" / "flat.png")
    x, y = ImageFolder(tmp_path, image_size=4).batch(torch.tensor([0, 1, 2]))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (torch.tensor([128, 64, 200]) / 255 - mean) / std
    torch.testing.assert_close(x, expected.view(1, 3, 1, 1).expand_as(x))
    assert y.tolist() == [0, 0, 0]


@pytest.mark.parametrize("width,height", [(40, 30), (30, 40), (100, 3), (3, 100), (1, 1)])
def test_random_resized_crop_boxes_stay_inside_the_image(width, height):
    for seed in range(200):
        left, top, w, h = _random_resized_box(width, height, random.Random(seed))
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        assert w >= 1 and h >= 1
        # The aspect stays in [3/4, 4/3] unless the image itself cannot hold it.
        if min(width, height) >= 10:
            assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1


def test_image_folder_train_and_val_subfolders(tmp_path):
    _write_images(tmp_path / "train", num_classes=3, per_class=2)
    # val holds a subset of the classes: ids still follow the training folder.
    (tmp_path / "val" / "class_2").mkdir(parents=True)
    Image.new("RGB", (10, 10)).save(tmp_path / "val" / "class_2" / "x.png")
    train = ImageFolder(tmp_path, image_size=4, split="train", num_classes=3)
    held_out = ImageFolder(tmp_path, image_size=4, split="eval", num_classes=3)
    assert train.num_items == 6 and held_out.num_items == 1
    assert held_out.batch(torch.arange(3))[1].tolist() == [2, 2, 2]

    (tmp_path / "val" / "class_9").mkdir()
    with pytest.raises(ValueError, match="class_9"):
        ImageFolder(tmp_path, image_size=4, split="eval")


def test_image_folder_errors(image_root, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="nowhere"):
        build_dataset(_config("image_folder", missing))
    with pytest.raises(ValueError, match="data.path"):
        build_dataset(_config("image_folder", None))
    cfg = _config("image_folder", image_root)
    cfg.head.num_classes = 7
    with pytest.raises(ValueError, match=r"num_classes=7.*3 class folders"):
        build_dataset(cfg)
    empty = tmp_path / "empty"
    (empty / "class_0").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        ImageFolder(empty, image_size=4)


def test_image_folder_corrupt_file_is_named(image_root):
    bad = image_root / "class_1" / "img_9.png"
    bad.write_bytes(b"this is not a png")
    dataset = ImageFolder(image_root, image_size=IMAGE_SIZE, split="eval")
    item = next(i for i in range(dataset.num_items) if dataset.file(i) == bad)
    dataset.batch(torch.tensor([item - 1]))  # the good files still read
    with pytest.raises(BadImageError, match="img_9.png"):
        dataset.batch(torch.tensor([item]))
    # Raised in a worker process, the error still names the file.
    stream = eval_batches(dataset, num_samples=dataset.num_items, batch_size=4, rank=0, world_size=1, num_workers=2)
    with pytest.raises(BadImageError, match=r"worker process[\s\S]*img_9.png"):
        list(stream)


# -- feature files ----------------------------------------------------------------------


def test_features_read_rows_and_labels(feature_root):
    dataset = FeatureFiles(feature_root, num_classes=FEATURE_CLASSES, input_dim=FEATURE_DIM, seed=1)
    x, y = dataset.batch(torch.arange(NUM_ROWS))
    rows = x[:, 0].long()
    stored = np.load(feature_root / "features.npy")
    torch.testing.assert_close(x, torch.from_numpy(stored[rows.numpy()]))
    assert torch.equal(y, rows % FEATURE_CLASSES)


def test_features_val_files_and_float16(feature_root):
    val = np.full((3, FEATURE_DIM), 7.0, dtype=np.float16)
    np.save(feature_root / "val_features.npy", val)
    np.save(feature_root / "val_labels.npy", np.array([4, 0, 2]))
    held_out = FeatureFiles(feature_root, num_classes=FEATURE_CLASSES, split="eval")
    x, y = held_out.batch(torch.arange(4))
    assert x.dtype == torch.float32 and torch.all(x == 7.0)
    assert y.tolist() == [4, 0, 2, 4]  # in file order, wrapping around
    # Without val files, eval reads the training files in order.
    (feature_root / "val_features.npy").unlink()
    (feature_root / "val_labels.npy").unlink()
    train_order = FeatureFiles(feature_root, num_classes=FEATURE_CLASSES, split="eval")
    assert train_order.batch(torch.arange(NUM_ROWS))[0][:, 0].tolist() == list(range(NUM_ROWS))


def test_features_errors(feature_root, tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        build_dataset(_config("features", tmp_path / "nowhere"))
    cfg = _config("features", feature_root)
    cfg.model.input_dim = 9
    with pytest.raises(ValueError, match=rf"input_dim=9.*D={FEATURE_DIM}"):
        build_dataset(cfg)

    # A bad label past the first chunk: named with its file, index and value.
    labels = np.arange(NUM_ROWS) % FEATURE_CLASSES
    labels[7] = 99
    np.save(feature_root / "labels.npy", labels)
    with pytest.raises(ValueError, match=r"labels.npy.*label 99 at index 7"):
        FeatureFiles(feature_root, num_classes=FEATURE_CLASSES, chunk_rows=3)
    labels[7], labels[2] = 1, -1
    np.save(feature_root / "labels.npy", labels)
    with pytest.raises(ValueError, match="label -1 at index 2"):
        FeatureFiles(feature_root, num_classes=FEATURE_CLASSES)

    np.save(feature_root / "labels.npy", np.zeros(NUM_ROWS + 1, dtype=np.int64))
    with pytest.raises(ValueError, match="rows"):
        FeatureFiles(feature_root, num_classes=FEATURE_CLASSES)
    np.save(feature_root / "labels.npy", np.zeros(NUM_ROWS, dtype=np.float32))
    with pytest.raises(ValueError, match="integer"):
        FeatureFiles(feature_root, num_classes=FEATURE_CLASSES)
    np.save(feature_root / "labels.npy", np.array([{"a": 1}] * NUM_ROWS, dtype=object))
    with pytest.raises(ValueError, match="labels.npy"):
        FeatureFiles(feature_root, num_classes=FEATURE_CLASSES)  # pickles are refused
    (feature_root / "labels.npy").unlink()
    with pytest.raises(ValueError, match="labels.npy"):
        FeatureFiles(feature_root, num_classes=FEATURE_CLASSES)

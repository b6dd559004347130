"""Images on disk: one sub-folder per class, read with PIL, addressed by global sample index.

Layout. ``path`` holds one sub-folder per class; class ids are the positions of the
sorted folder names. If ``path`` has a sub-folder named ``train``, the splits live below
it instead: ``path/train`` for training and ``path/val`` for evaluation (``path/train``
again when there is no ``val``); otherwise ``path`` serves both splits. The class list
always comes from the training folder, so both splits agree on the ids.

Sample stream. The finite set of N files is read epoch after epoch: global index ``i``
is position ``i % N`` of epoch ``i // N``'s permutation, which is seeded by (seed, epoch)
alone (``EpochOrder``). Training augmentations (random resized crop, horizontal flip)
draw from a generator seeded by (seed, i). So a sample is a pure function of
(seed, i): any rank, any world size, any resumed run reads the same pixels. The eval
split reads the files in order (``i % N``) with a deterministic resize and centre crop.

Decoding runs either in-process (``batch``) or one sample per call in DataLoader workers
(``__getitem__``, which returns uint8 pixels; ``finish_batch`` normalises them after they
reach the device, which moves 4x fewer bytes than float32).

Bad files (``on_bad_sample``). A file that cannot be read or decoded raises
``BadImageError`` naming it (``"error"``, the default). With ``"skip"``, sample ``i``
whose file is bad reads instead the file at the next position of the same epoch's order
(``i % N + 1``, ``+ 2``, ..., wrapping), the first one that decodes, with its label; its
augmentation stays seeded by (seed, i). The substitute is thus again a pure function of
(seed, i), so resuming and re-sharding still read the same pixels. Each substituted
sample is counted: ``bad_samples_skipped`` in-process, and the third element of
``__getitem__``'s answer in workers. After ``max_bad_in_a_row`` undecodable files in a
row (or all N files, when fewer) the sample fails with a ``BadImageError`` instead.
"""

from __future__ import annotations

import functools
import math
import os
import random
from pathlib import Path

import numpy as np
import torch

from hydrahead.counter_rng import counter_hash
from hydrahead.data.procedural import _check_index_tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "ON_BAD_SAMPLE",
    "BadImageError",
    "EpochOrder",
    "ImageFolder",
    "normalise_images",
    "read_eval_image",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Streams of the counter hash (procedural.py uses 0-5, images.py 16-19).
_EPOCH, _AUGMENT = 32, 33

# Eval resize: the short side to image_size / 0.875, then a centre crop (224 from 256).
_EVAL_CROP_FRACTION = 0.875
# RandomResizedCrop's usual ranges (Inception-style training).
_CROP_SCALE = (0.08, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)

SPLITS = ("train", "eval")
# What to do with a file that cannot be decoded (module doc).
ON_BAD_SAMPLE = ("error", "skip")


class BadImageError(ValueError):
    """An image file that cannot be read or decoded; the message names the file."""


def _pil_image():
    # Imported on use, so the other data kinds do not need Pillow.
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("data.kind=image_folder needs Pillow: pip install pillow") from e
    return Image


def _sample_seeds(seed: int, indices: torch.Tensor) -> list[int]:
    """One 63-bit generator seed per global sample index."""
    return (counter_hash(seed, _AUGMENT, indices) & ((1 << 63) - 1)).tolist()


class EpochOrder:
    """Global sample index -> item of a finite set of ``num_items``, epoch by epoch.

    Epoch ``e`` covers indices ``[e*N, (e+1)*N)`` and visits every item once, in the
    order of ``torch.randperm(N)`` under a generator seeded by (seed, e); with
    ``shuffle=False`` in the plain order 0..N-1. Each process caches the last two
    permutations: a batch spans at most a boundary, and workers compute their own.
    """

    def __init__(self, num_items: int, seed: int, *, shuffle: bool = True):
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self._cache: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s order of the items (int64, length N)."""
        perm = self._cache.get(epoch)
        if perm is None:
            h = counter_hash(self.seed, _EPOCH, torch.tensor([epoch], dtype=torch.int64))
            gen = torch.Generator().manual_seed(int(h.item()) & ((1 << 63) - 1))
            perm = torch.randperm(self.num_items, generator=gen)
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = perm
        return perm

    def items(self, indices: torch.Tensor) -> torch.Tensor:
        """Item of each global sample index (int64 tensor on the CPU)."""
        _check_index_tensor("indices", indices)
        indices = indices.cpu().long()
        if indices.numel() and indices.min() < 0:
            raise ValueError("indices must be >= 0")
        epochs = indices.div(self.num_items, rounding_mode="floor")
        positions = indices % self.num_items
        if not self.shuffle:
            return positions
        items = torch.empty_like(positions)
        for epoch in torch.unique(epochs).tolist():
            here = epochs == epoch
            items[here] = self.permutation(epoch)[positions[here]]
        return items


def split_folder(path: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(training folder, folder of ``split``) under ``path``, as the module doc lays out."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a directory")
    train = root / "train"
    if not train.is_dir():
        return root, root
    val = root / "val"
    return train, (val if split == "eval" and val.is_dir() else train)


def _class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: Path) -> list[str]:
    """Image files below ``folder``, recursively, as sorted paths relative to it."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, folder)
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(name if rel == "." else os.path.join(rel, name))
    return found


@functools.lru_cache(maxsize=8)
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ``x * scale + shift == (x / 255 - mean) / std``, per channel."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
    scale, shift = 1.0 / (255.0 * std), -mean / std
    return scale.float().view(3, 1, 1).to(device), shift.float().view(3, 1, 1).to(device)


class ImageFolder:
    """A class-per-folder image dataset, read by global sample index (module doc).

    ``num_classes`` (when given) must equal the number of class folders. Decoding
    failures raise ``BadImageError`` naming the file, or with ``on_bad_sample="skip"``
    are replaced by the next decodable file of the epoch order (module doc).

    ``bad_samples_skipped`` counts the samples substituted by this object's ``batch``
    calls (worker processes count in their own copies and report through
    ``__getitem__``; ``hydrahead.data.batches`` sums both per stream).
    """

    input_kind = "images"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_size: int,
        split: str = "train",
        seed: int = 0,
        num_classes: int | None = None,
        on_bad_sample: str = "error",
        max_bad_in_a_row: int = 64,
    ):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        if max_bad_in_a_row < 1:
            raise ValueError(f"max_bad_in_a_row must be >= 1, got {max_bad_in_a_row}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        train_folder, folder = split_folder(path, split)
        classes = _class_folders(train_folder)
        if not classes:
            raise ValueError(f"image folder {str(train_folder)!r} has no class sub-folders")
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(
                f"head.num_classes={num_classes} but image folder {str(train_folder)!r} "
                f"has {len(classes)} class folders"
            )
        class_ids = {name: c for c, name in enumerate(classes)}
        unknown = sorted(set(_class_folders(folder)) - set(class_ids))
        if unknown:
            raise ValueError(
                f"image folder {str(folder)!r} has class folders missing from {str(train_folder)!r}: {unknown[:5]}"
            )

        files, labels = [], []
        for name in _class_folders(folder):
            for rel in _image_files(folder / name):
                files.append(os.fsencode(os.path.join(name, rel)))
                labels.append(class_ids[name])
        if not files:
            raise ValueError(f"image folder {str(folder)!r} holds no image files {IMAGE_EXTENSIONS}")

        self.num_classes = len(classes)
        self.classes = classes
        self.image_size = image_size
        self.split = split
        self.seed = seed
        self.root = folder
        # numpy arrays rather than lists of str: forked workers then share these pages
        # instead of copying them as reference counts change.
        self._files = np.array(files)
        self._labels = np.array(labels, dtype=np.int64)
        self.order = EpochOrder(len(files), seed, shuffle=split == "train")
        self.on_bad_sample = on_bad_sample
        self.max_bad_in_a_row = max_bad_in_a_row
        self.bad_samples_skipped = 0
        # Under "skip": item -> its decoding error, so a bad file is tried once per process.
        self._bad_items: dict[int, str] = {}

    @property
    def num_items(self) -> int:
        """Number of image files N (one epoch)."""
        return len(self._files)

    def file(self, item: int) -> Path:
        """Path of item ``item`` (0 <= item < N)."""
        return self.root / os.fsdecode(self._files[item])

    def items(self, indices: torch.Tensor) -> torch.Tensor:
        """Item (file number) of each global sample index in the epoch order.

        This is the file read unless it is bad and ``on_bad_sample="skip"`` substitutes.
        """
        return self.order.items(indices)

    # -- reading ----------------------------------------------------------------------

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        """Sample ``index``: (uint8 3 x S x S pixels, label, substituted). For DataLoader workers.

        ``substituted`` is 1 when the sample's own file was bad and another one was read
        in its place (``on_bad_sample="skip"``), else 0; the collated batch sums it.
        """
        indices = torch.tensor([index], dtype=torch.int64)
        item = int(self.order.items(indices)[0])
        seed = _sample_seeds(self.seed, indices)[0]
        pixels, item, substituted = self._read(index, item, seed)
        return pixels, int(self._labels[item]), substituted

    def finish_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (B x 3 x S x S, any device) -> float32, normalised by ImageNet stats."""
        return normalise_images(images)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)``: normalised float32 B x 3 x S x S and int64 B, on the CPU."""
        items = self.order.items(indices)
        indices = indices.cpu().long()
        seeds = _sample_seeds(self.seed, indices)
        size = self.image_size
        pixels = torch.empty(len(seeds), 3, size, size, dtype=torch.uint8)
        read = items.clone()
        substituted = 0
        for row, (index, item, seed) in enumerate(zip(indices.tolist(), items.tolist(), seeds)):
            pixels[row], read[row], skipped = self._read(index, item, seed)
            substituted += skipped
        self.bad_samples_skipped += substituted
        return self.finish_batch(pixels), torch.from_numpy(self._labels[read.numpy()])

    def _read(self, index: int, item: int, seed: int) -> tuple[torch.Tensor, int, int]:
        """(pixels, item read, 1 if substituted else 0) of sample ``index``, whose item is ``item``.

        Under "skip" a bad item is replaced by the first decodable one at the next
        positions of the same epoch's order, wrapping (module doc).
        """
        try:
            return self._load(item, seed), item, 0
        except BadImageError:
            if self.on_bad_sample == "error":
                raise
        n = self.num_items
        limit = min(n, self.max_bad_in_a_row)
        epoch, position = divmod(index, n)
        following = epoch * n + (position + torch.arange(1, limit)) % n
        last = item
        for candidate in self.order.items(following).tolist():
            try:
                return self._load(candidate, seed), candidate, 1
            except BadImageError:
                last = candidate
        if limit == n:
            what = f"none of the {n} image files under {str(self.root)!r} can be decoded"
        else:
            what = f"{limit} files in a row (max_bad_in_a_row) cannot be decoded, from {str(self.file(item))!r}"
        raise BadImageError(
            f"on_bad_sample=skip found no readable substitute for sample {index}: {what}; "
            f"last tried: {self._bad_items[last]}"
        )

    def _load(self, item: int, seed: int) -> torch.Tensor:
        image = self._decode_item(item)
        if self.split == "train":
            image = self._augment(image, random.Random(seed))
        else:
            image = self._centre_crop(image, self.image_size)
        return self._to_pixels(image)

    @staticmethod
    def _to_pixels(image) -> torch.Tensor:
        # np.array copies: PIL's buffer is read-only and torch wants a writable one.
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def _decode_item(self, item: int):
        """Item ``item``'s RGB image; under "skip" a known-bad item fails without a retry."""
        if self.on_bad_sample == "error":
            return self._decode(self.file(item))
        known = self._bad_items.get(item)
        if known is not None:
            raise BadImageError(known)
        try:
            return self._decode(self.file(item))
        except BadImageError as e:
            self._bad_items[item] = str(e)
            raise

    @staticmethod
    def _decode(path: Path):
        Image = _pil_image()
        try:
            with Image.open(path) as image:
                return image.convert("RGB")  # also forces the (lazy) decode inside the try
        except Exception as e:
            raise BadImageError(f"cannot decode image file {str(path)!r}: {e}") from e

    # -- transforms (torchvision's RandomResizedCrop, flip, Resize + CenterCrop) ---------

    def _augment(self, image, rng: random.Random):
        Image = _pil_image()
        width, height = image.size
        left, top, w, h = _random_resized_box(width, height, rng)
        # One resize with a source box: crop and scale in a single resampling pass.
        size = (self.image_size, self.image_size)
        image = image.resize(size, Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    @staticmethod
    def _centre_crop(image, image_size: int):
        Image = _pil_image()
        width, height = image.size
        # The centred square that covers image_size pixels after resizing the short
        # side to image_size / 0.875, in source pixels.
        side = min(width, height) * _EVAL_CROP_FRACTION
        left, top = (width - side) / 2, (height - side) / 2
        size = (image_size, image_size)
        box = (left, top, left + side, top + side)
        return image.resize(size, Image.Resampling.BILINEAR, box=box)


def read_eval_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """One image file as the eval split reads it: uint8 3 x S x S pixels (short side resized
    to S / 0.875, centre crop). ``BadImageError`` naming the file if it cannot be decoded."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return ImageFolder._to_pixels(ImageFolder._centre_crop(ImageFolder._decode(Path(path)), image_size))


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (B x 3 x S x S, any device) -> float32, normalised by ImageNet stats."""
    scale, shift = _normalisation(images.device)
    return images.float().mul_(scale).add_(shift)


def _random_resized_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop: torchvision's RandomResizedCrop.get_params."""
    area = width * height
    log_ratio = (math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*_CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # Fallback: the largest centred crop whose aspect lies within the ratio range.
    aspect = width / height
    if aspect < _CROP_RATIO[0]:
        w, h = width, round(width / _CROP_RATIO[0])
    elif aspect > _CROP_RATIO[1]:
        w, h = round(height * _CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h

"""From the config to batches: one entry point for every data kind.

A dataset here is anything with ``num_classes`` and ``input_kind`` ("features" or
"images") and a method ``batch(indices) -> (inputs, labels)`` that is a pure function of
(seed, global sample index). ``batches`` turns one into this rank's stream of per-step
batches, starting at any step, so a resumed or re-sharded run reads exactly the samples
an uninterrupted one would.

Datasets read from disk may also load in DataLoader worker processes: they then define
``__getitem__(global_index) -> (raw input, label)``, decoded one sample per call in a
worker, and ``finish_batch(raw inputs) -> inputs``, applied once the collated batch is on
the device. Both paths give the same batches. ``__getitem__`` may return a third
element, an int: the number of bad samples substituted for that one (``ImageFolder``
with ``data.on_bad_sample=skip``); in-process, such datasets keep a running
``bad_samples_skipped`` counter instead. ``batches`` and ``eval_batches`` return a
``BatchStream``, which yields ``(inputs, labels)`` and sums those counts in its
``bad_samples_skipped`` attribute.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from hydrahead.config import Config
from hydrahead.data.feature_files import FeatureFiles
from hydrahead.data.folder import ImageFolder
from hydrahead.data.images import ProceduralImages
from hydrahead.data.procedural import ProceduralFeatures
from hydrahead.data.sampler import eval_indices, rank_indices

SPLITS = ("train", "eval")


def build_dataset(cfg: Config, split: str = "train", device: torch.device | str | None = None):
    """The dataset named by ``cfg.data.kind`` for ``split`` ("train" or "eval").

    Procedural kinds generate on ``device``; file-backed kinds return CPU tensors, which
    ``batches`` moves to the device.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data = cfg.data
    procedural = dict(
        seed=cfg.run.seed,
        family_size=data.family_size,
        family_spread=data.family_spread,
        noise=data.noise,
        zipf_exponent=data.zipf_exponent,
        split=split,
        device=device,
    )
    if data.kind == "procedural_features":
        return ProceduralFeatures(cfg.head.num_classes, data.feature_dim, **procedural)
    if data.kind == "procedural_images":
        return ProceduralImages(cfg.head.num_classes, data.image_size, **procedural)
    if data.kind in ("image_folder", "features"):
        if not data.path:
            raise ValueError(f"data.path is required for data.kind={data.kind}")
        if not Path(data.path).exists():
            raise ValueError(f"data.path={data.path!r} does not exist")
    if data.kind == "image_folder":
        return ImageFolder(
            data.path,
            image_size=data.image_size,
            split=split,
            seed=cfg.run.seed,
            num_classes=cfg.head.num_classes,
            on_bad_sample=data.on_bad_sample,
        )
    if data.kind == "features":
        return FeatureFiles(
            data.path,
            num_classes=cfg.head.num_classes,
            input_dim=cfg.model.input_dim,
            split=split,
            seed=cfg.run.seed,
        )
    raise ValueError(f"data.kind={data.kind!r} is not available")


class _Tally:
    """The counters a stream's generator updates (kept apart from ``BatchStream``, so the
    generator holds no reference to its stream and is closed as soon as it is dropped)."""

    __slots__ = ("bad_samples_skipped",)

    def __init__(self):
        self.bad_samples_skipped = 0


class BatchStream(Iterator[tuple[torch.Tensor, torch.Tensor]]):
    """This rank's stream of ``(inputs, labels)`` batches, from ``batches``/``eval_batches``.

    Iterate it (or call ``next``) as any iterator of ``(inputs, labels)``. Attribute:

    ``bad_samples_skipped`` (int): how many samples of the batches yielded so far were
    substituted because their own file could not be decoded (``data.on_bad_sample=skip``;
    always 0 otherwise). It counts this rank's samples only, whether decoded in-process
    or in DataLoader workers; sum it over the ranks for the global figure.

    ``prefetch()`` makes the next batch now (queues its device work, or its copy to the
    device) and ``next`` then hands it out; the batches are the same either way, and an
    error making it is raised by that ``next``, not by ``prefetch``.

    ``close()`` stops the stream (and its DataLoader workers, if any) at once.
    """

    def __init__(self, make: Callable[[_Tally], Iterator[tuple[torch.Tensor, torch.Tensor]]]):
        self._tally = _Tally()
        self._batches = make(self._tally)
        self._ahead: tuple[tuple[torch.Tensor, torch.Tensor] | BaseException, int] | None = (
            None  # (batch or error, its substitutions)
        )

    @property
    def bad_samples_skipped(self) -> int:
        """Substitutions in the batches handed out so far (a prefetched one counts once handed out)."""
        return self._tally.bad_samples_skipped - (self._ahead[1] if self._ahead is not None else 0)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ahead is not None:
            batch, self._ahead = self._ahead[0], None
            if isinstance(batch, BaseException):
                raise batch
            return batch
        return next(self._batches)

    def prefetch(self) -> None:
        """Make the next batch now; a no-op if one is already waiting."""
        if self._ahead is None:
            before = self._tally.bad_samples_skipped
            try:
                batch = next(self._batches)
            except Exception as error:  # the step that asks for this batch raises it
                batch = error
            self._ahead = (batch, self._tally.bad_samples_skipped - before)

    def close(self) -> None:
        self._batches.close()


def _in_process(dataset, indices: torch.Tensor, device, tally: _Tally):
    """``dataset.batch(indices)`` on ``device``, its substitutions added to ``tally``."""
    before = getattr(dataset, "bad_samples_skipped", 0)
    inputs, labels = dataset.batch(indices)
    tally.bad_samples_skipped += getattr(dataset, "bad_samples_skipped", 0) - before
    return inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def _uses_workers(dataset, num_workers: int) -> bool:
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if num_workers == 0:
        return False
    if not hasattr(dataset, "finish_batch"):
        warnings.warn(
            f"data.num_workers={num_workers} is ignored: {type(dataset).__name__} is generated in-process",
            stacklevel=3,
        )
        return False
    return True


def _from_workers(dataset, index_lists, num_workers: int, device, tally: _Tally, *, persistent: bool):
    """Batches of ``index_lists`` decoded by a DataLoader's workers, finished on ``device``.

    A third collated element (per-sample substitution counts) is summed into ``tally``.
    """
    loader = DataLoader(
        dataset,
        batch_sampler=index_lists,
        num_workers=num_workers,
        pin_memory=device is not None and torch.device(device).type == "cuda",
        persistent_workers=persistent,
        # Its own generator: starting the workers must not draw from the global RNG
        # (the samples themselves use no worker RNG).
        generator=torch.Generator().manual_seed(0),
    )
    iterator = iter(loader)
    try:
        for raw, labels, *counts in iterator:
            inputs = dataset.finish_batch(raw.to(device, non_blocking=True))
            if counts:
                tally.bad_samples_skipped += int(counts[0].sum())
            yield inputs, labels.to(device, non_blocking=True)
    finally:
        # Stop the workers as soon as the stream ends, fails or is dropped. Left to the
        # garbage collector (an error's traceback keeps the iterator in a reference
        # cycle), the queues can be finalised first and each worker's exit then waits
        # out a 5 s timeout.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class _StepIndices:
    """This rank's global sample indices for steps start_step, start_step + 1, ... (endless)."""

    def __init__(self, start_step: int, global_batch: int, rank: int, world_size: int):
        rank_indices(start_step * global_batch, global_batch, rank, world_size)  # checks args
        self.start_step, self.global_batch = start_step, global_batch
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            cursor = step * self.global_batch
            yield rank_indices(cursor, self.global_batch, self.rank, self.world_size).tolist()
            step += 1


def batches(
    dataset,
    *,
    start_step: int,
    global_batch: int,
    rank: int,
    world_size: int,
    device=None,
    num_workers: int = 0,
) -> BatchStream:
    """This rank's (inputs, labels) for steps start_step, start_step + 1, ... (endless).

    With ``num_workers > 0`` a dataset that supports it (``finish_batch``) is decoded in
    that many persistent DataLoader workers, into pinned memory when ``device`` is CUDA.
    The returned ``BatchStream`` also counts the bad samples substituted so far:
    ``stream.bad_samples_skipped``.
    """
    return BatchStream(
        lambda tally: _train_batches(dataset, start_step, global_batch, rank, world_size, device, num_workers, tally)
    )


def _train_batches(dataset, start_step, global_batch, rank, world_size, device, num_workers, tally):
    if _uses_workers(dataset, num_workers):
        steps = _StepIndices(start_step, global_batch, rank, world_size)
        yield from _from_workers(dataset, steps, num_workers, device, tally, persistent=True)
        return
    step = start_step
    while True:
        indices = rank_indices(step * global_batch, global_batch, rank, world_size)
        yield _in_process(dataset, indices, device, tally)
        step += 1


def eval_batches(
    dataset,
    *,
    num_samples: int,
    batch_size: int,
    rank: int,
    world_size: int,
    device=None,
    num_workers: int = 0,
) -> BatchStream:
    """This rank's share of the first ``num_samples`` held-out samples, in batches.

    Every rank yields the same number of batches (some possibly empty), because the
    evaluation's collectives need every rank at each of them. The returned
    ``BatchStream`` counts substituted bad samples in ``bad_samples_skipped``.
    """
    return BatchStream(
        lambda tally: _eval_batches(dataset, num_samples, batch_size, rank, world_size, device, num_workers, tally)
    )


def _eval_batches(dataset, num_samples, batch_size, rank, world_size, device, num_workers, tally):
    indices = eval_indices(num_samples, rank, world_size)
    largest_share = -(-num_samples // world_size)
    starts = range(0, max(largest_share, 1), batch_size)
    chunks = [indices[start : start + batch_size] for start in starts]
    if _uses_workers(dataset, num_workers):
        # Only the trailing chunks can be empty; they are made in-process below.
        full = [chunk.tolist() for chunk in chunks if chunk.numel()]
        if full:
            yield from _from_workers(dataset, full, num_workers, device, tally, persistent=False)
        chunks = chunks[len(full) :]
    for chunk in chunks:
        yield _in_process(dataset, chunk, device, tally)

"""Precomputed embeddings on disk, for training the head (and an mlp) on fixed features.

``path`` is a directory holding ``features.npy`` (N x D, float16 or float32) and
``labels.npy`` (N, integer). The eval split reads ``val_features.npy`` and
``val_labels.npy`` when both exist, else the training files. The arrays are memory-mapped
(never loaded whole), so files larger than RAM are fine.

Global sample index -> row as for image folders (``EpochOrder``): a fresh permutation of
the rows each epoch, seeded by (seed, epoch), for training; the rows in order for eval.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from hydrahead.data.folder import SPLITS, EpochOrder

__all__ = ["FeatureFiles"]

_FILES = {
    "train": ("features.npy", "labels.npy"),
    "eval": ("val_features.npy", "val_labels.npy"),
}
_FEATURE_DTYPES = (np.float16, np.float32)


def _open(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {str(path)!r} as a .npy array: {e}") from e


def _check_labels(path: Path, labels: np.ndarray, num_classes: int, chunk_rows: int) -> None:
    """Every label in [0, num_classes), checked chunk by chunk (bounded memory)."""
    for start in range(0, len(labels), chunk_rows):
        chunk = np.asarray(labels[start : start + chunk_rows])
        bad = (chunk < 0) | (chunk >= num_classes)
        if bad.any():
            first = int(np.argmax(bad))
            raise ValueError(
                f"{str(path)!r}: label {int(chunk[first])} at index {start + first} is outside "
                f"[0, {num_classes}) (head.num_classes={num_classes})"
            )


class FeatureFiles:
    """Memory-mapped feature vectors and labels, read by global sample index.

    ``num_classes`` bounds the labels; ``input_dim``, when given, must equal the feature
    width D. ``batch`` returns float32 features and int64 labels on the CPU.
    """

    input_kind = "features"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        num_classes: int,
        input_dim: int | None = None,
        split: str = "train",
        seed: int = 0,
        chunk_rows: int = 1 << 22,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        root = Path(path)
        if not root.is_dir():
            raise ValueError(f"feature folder {str(root)!r} does not exist or is not a directory")
        names = _FILES[split]
        if split == "eval" and not all((root / n).is_file() for n in names):
            if any((root / n).is_file() for n in names):
                raise ValueError(f"{str(root)!r} holds only one of {names}: give both or neither")
            names = _FILES["train"]
        feature_path, label_path = root / names[0], root / names[1]
        for p in (feature_path, label_path):
            if not p.is_file():
                raise ValueError(f"feature file {str(p)!r} does not exist")

        features, labels = _open(feature_path), _open(label_path)
        if features.ndim != 2 or features.dtype not in _FEATURE_DTYPES:
            raise ValueError(
                f"{str(feature_path)!r} must be a 2-D float16 or float32 array (N x D), "
                f"got shape {features.shape} and dtype {features.dtype}"
            )
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{str(label_path)!r} must be a 1-D integer array, got shape {labels.shape} and dtype {labels.dtype}"
            )
        if len(features) != len(labels):
            raise ValueError(
                f"{str(feature_path)!r} has {len(features)} rows but {str(label_path)!r} has {len(labels)} labels"
            )
        if len(labels) == 0:
            raise ValueError(f"{str(feature_path)!r} has no rows")
        dim = features.shape[1]
        if input_dim is not None and input_dim != dim:
            raise ValueError(
                f"model.input_dim={input_dim} does not match the feature width D={dim} of {str(feature_path)!r}"
            )
        _check_labels(label_path, labels, num_classes, chunk_rows)

        self.num_classes = num_classes
        self.feature_dim = dim
        self.split = split
        self.seed = seed
        self.feature_path, self.label_path = feature_path, label_path
        self._features, self._labels = features, labels
        self.order = EpochOrder(len(labels), seed, shuffle=split == "train")

    @property
    def num_items(self) -> int:
        """Number of rows N (one epoch)."""
        return len(self._labels)

    def items(self, indices: torch.Tensor) -> torch.Tensor:
        """Row read for each global sample index."""
        return self.order.items(indices)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, labels)``: float32 B x D and int64 B, on the CPU."""
        rows = self.order.items(indices).numpy()
        # Read the rows in file order (sequential on disk), then put them back in place.
        order = np.argsort(rows, kind="stable")
        features = np.empty((len(rows), self.feature_dim), dtype=np.float32)
        features[order] = self._features[rows[order]]
        labels = np.asarray(self._labels[rows], dtype=np.int64)
        return torch.from_numpy(features), torch.from_numpy(labels)

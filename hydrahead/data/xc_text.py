"""The extreme-classification text format, read into dense features and padded labels.

The format of the Extreme Classification Repository's data files::

    4 6 10              optional header: num_samples num_features num_labels
    0,7 0:1.5 4:-0.25   label ids (comma-separated), a space, then index:value features
     2:1.0              a sample without labels: the line starts with the space
    3                   a sample without features
    5,1 5:2e-3

Every line after the header is one sample (an empty line is a sample with neither labels
nor features). Label ids and feature indices count from 0; a label listed twice counts
once, a feature index listed twice in a line is an error. Without a header, the feature
width is ``num_features`` when given, else the largest index + 1.

The file is read whole: the result holds the dense N x num_features float32 features
(and, while reading, the nonzero entries as 20 bytes each). That suits evaluation files;
for training, write the features as .npy (data.kind=features), which is memory-mapped.
"""

from __future__ import annotations

import dataclasses
import math
import os
from array import array
from pathlib import Path

import numpy as np
import torch

__all__ = ["XCData", "read_xc_text"]


@dataclasses.dataclass
class XCData:
    """Samples of an extreme-classification text file, in file order.

    ``features``: float32, N x num_features (dense). ``labels``: int64, N x L, each row the
    sample's label ids in file order, padded with -1 (L: the most labels of any sample,
    0 when no sample has one). ``num_labels``: from the header or the caller, else None.
    """

    path: Path
    features: torch.Tensor
    labels: torch.Tensor
    num_features: int
    num_labels: int | None

    @property
    def num_samples(self) -> int:
        return self.features.shape[0]


def _header(line: str) -> tuple[int, int, int] | None:
    """(num_samples, num_features, num_labels) when ``line`` is a header: three plain integers.

    A sample line never is one: its features hold a ':' and its labels are one token.
    """
    tokens = line.split()
    if len(tokens) == 3 and all(token.isascii() and token.isdigit() for token in tokens):
        return int(tokens[0]), int(tokens[1]), int(tokens[2])
    return None


def _agree(path: Path, name: str, in_header: int, given: int | None) -> None:
    if given is not None and given != in_header:
        raise ValueError(f"{path}: the header says {name}={in_header}, but {name}={given} is expected")


class _Samples:
    """The samples parsed so far, as flat arrays (compact: no Python object per entry)."""

    def __init__(self):
        self.count = 0
        self.feature_rows, self.feature_cols, self.feature_values = array("q"), array("q"), array("f")
        self.label_rows, self.label_ids = array("q"), array("q")

    def add(self, where: str, text: str, num_features: int | None, num_labels: int | None) -> None:
        tokens = text.split()
        # The label list is the first token unless that is already a feature (no labels).
        if tokens and ":" not in tokens[0]:
            seen = set()
            for token in tokens.pop(0).split(","):
                label = _integer(where, "label id", token)
                if num_labels is not None and label >= num_labels:
                    raise ValueError(f"{where}: label id {label} is out of range: num_labels={num_labels}")
                if label not in seen:
                    seen.add(label)
                    self.label_rows.append(self.count)
                    self.label_ids.append(label)
        indices = set()
        for token in tokens:
            index_text, colon, value_text = token.partition(":")
            if not colon:
                raise ValueError(
                    f"{where}: bad token {token!r}: features are index:value (labels come first, comma-separated)"
                )
            index = _integer(where, "feature index", index_text)
            if num_features is not None and index >= num_features:
                raise ValueError(f"{where}: feature index {index} is out of range: num_features={num_features}")
            if index in indices:
                raise ValueError(f"{where}: feature index {index} appears twice")
            indices.add(index)
            try:
                value = float(value_text)
            except ValueError:
                raise ValueError(f"{where}: bad feature value in {token!r}") from None
            self.feature_values.append(value)
            if not math.isfinite(self.feature_values[-1]):  # as float32: 1e39 overflows too
                raise ValueError(f"{where}: feature value in {token!r} is not a finite float32")
            self.feature_rows.append(self.count)
            self.feature_cols.append(index)
        self.count += 1


def _integer(where: str, what: str, text: str) -> int:
    """A non-negative decimal integer, or a ValueError that says where."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{where}: bad {what} {text!r}: expected a non-negative integer")
    return int(text)


def _flat(values: array, dtype) -> np.ndarray:
    return np.frombuffer(values, dtype=dtype) if len(values) else np.zeros(0, dtype=dtype)


def read_xc_text(path: str | os.PathLike, *, num_features: int | None = None, num_labels: int | None = None) -> XCData:
    """Read an extreme-classification text file (module doc) whole.

    ``num_features`` and ``num_labels``, when given, bound the feature indices and label
    ids and must equal the header's values. Mistakes raise ValueError naming the file and
    line: a bad token, an index or label id out of range, a header whose sample count does
    not match the lines.
    """
    path = Path(path)
    for name, value in (("num_features", num_features), ("num_labels", num_labels)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or a positive int, got {value!r}")
    samples, header = _Samples(), None
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            text = line.rstrip("\r\n")
            if line_number == 1 and (header := _header(text)) is not None:
                _agree(path, "num_features", header[1], num_features)
                _agree(path, "num_labels", header[2], num_labels)
                num_features, num_labels = header[1], header[2]
                continue
            samples.add(f"{path}:{line_number}", text, num_features, num_labels)
    if header is not None and samples.count != header[0]:
        raise ValueError(f"{path}: the header says {header[0]} samples, but {samples.count} lines follow it")

    rows, cols = _flat(samples.feature_rows, np.int64), _flat(samples.feature_cols, np.int64)
    if num_features is None:
        num_features = int(cols.max()) + 1 if cols.size else 0
    features = np.zeros((samples.count, num_features), dtype=np.float32)
    features[rows, cols] = _flat(samples.feature_values, np.float32)

    label_rows, label_ids = _flat(samples.label_rows, np.int64), _flat(samples.label_ids, np.int64)
    per_sample = np.bincount(label_rows, minlength=samples.count)
    labels = np.full((samples.count, int(per_sample.max(initial=0))), -1, dtype=np.int64)
    # A sample's labels are consecutive in the flat arrays: position = index - its first index.
    first = np.concatenate([[0], np.cumsum(per_sample)[:-1]]) if samples.count else per_sample
    labels[label_rows, np.arange(label_rows.size) - first[label_rows]] = label_ids
    return XCData(path, torch.from_numpy(features), torch.from_numpy(labels), num_features, num_labels)

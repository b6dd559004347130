"""Loading DCP checkpoints without running code from them.

DCP's stock reader unpickles ``.metadata`` with plain ``pickle.load`` and its default
planner restores non-tensor items with ``torch.load(..., weights_only=False)``: a checkpoint
folder from an untrusted source can run arbitrary code on load. The two classes here keep
DCP's behaviour otherwise:

- ``SafeFileSystemReader`` unpickles the index with an allow-list of the globals a DCP index
  is made of (its own dataclasses and enums, ``torch.Size``, dtypes, paths, safe builtins).
- ``SafeLoadPlanner`` restores non-tensor items with ``torch.load(..., weights_only=True)``.

Tensor chunks are already read with ``weights_only=True`` by DCP. On top of that the reader
reads a row range of a stored chunk straight from the file instead of loading the whole
chunk and narrowing it, so reading a block of a head whose shards exceed RAM stays cheap.

Usage::

    dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(), no_dist=True)
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import enum
import importlib
import math
import os
import pathlib
import pickle
import sys
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.utils import _create_file_view

try:  # absent from older torch versions, whose indexes carry no StorageMeta either
    from torch.distributed.checkpoint.metadata import StorageMeta
except ImportError:  # pragma: no cover
    StorageMeta = None

_INDEX_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_SAFE_BUILTINS = frozenset(
    {
        "bool",
        "int",
        "float",
        "complex",
        "str",
        "bytes",
        "bytearray",
        "list",
        "tuple",
        "dict",
        "set",
        "frozenset",
        "slice",
        "range",
    }
)
_PATH_CLASSES = frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"})


class ForbiddenGlobalError(pickle.UnpicklingError):
    """A checkpoint index refers to a global that no DCP index needs (it may be malicious)."""


def _index_global(module: str, name: str) -> Any | None:
    """The object ``module.name`` when a DCP index may refer to it, else None."""
    # vars() rather than getattr: no lazy submodule imports, no dotted names.
    if module in _INDEX_MODULES:
        obj = vars(importlib.import_module(module)).get(name)
        # Only plain records: dataclasses and enums defined there (not readers, writers, file systems).
        if (
            isinstance(obj, type)
            and obj.__module__ == module
            and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
        ):
            return obj
        return None
    if module == "torch":
        if name == "Size":
            return torch.Size
        obj = vars(torch).get(name)
        return obj if isinstance(obj, torch.dtype) else None
    if (module, name) == ("torch.serialization", "_get_layout"):
        return torch.serialization._get_layout  # maps a layout's name to torch.strided etc.
    if module == "pathlib" and name in _PATH_CLASSES:
        # A concrete path of the other OS cannot be created here; its pure twin holds the same text.
        if name in ("PosixPath", "WindowsPath") and getattr(pathlib, name) is not type(pathlib.Path()):
            name = "Pure" + name
        return getattr(pathlib, name)
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module == "builtins" and name in _SAFE_BUILTINS:
        return getattr(builtins, name)
    return None


class _IndexUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        obj = _index_global(module, name)
        if obj is None:
            raise ForbiddenGlobalError(
                f"{self.source}: refusing to load the global {module}.{name}; a DCP checkpoint index "
                "never needs it (the file may be malicious)"
            )
        return obj


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose index unpickling cannot run code; row ranges are read in place."""

    def __init__(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        super().__init__(path, *args, **kwargs)
        self._layouts: dict[MetadataIndex, tuple[torch.Size, torch.dtype, int] | None] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        super().reset(checkpoint_id)
        self._layouts = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if hasattr(self, "_get_metadata_path"):
            path = self._get_metadata_path(rank)
        else:  # pragma: no cover - torch versions without rank-local indexes
            path = self.fs.concat_path(self.path, ".metadata")
        with self.fs.create_stream(path, "rb") as file:
            metadata = _IndexUnpickler(file, str(path)).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path}: holds a {type(metadata).__name__}, not a DCP index")
        for info in (metadata.storage_data or {}).values():
            name = getattr(info, "relative_path", None)
            # DCP writes its data files beside the index; anything else would read files outside the folder.
            if name is not None and (
                not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name
            ):
                raise ValueError(f"{path}: the index names a data file outside its folder: {name!r}")
        # What the parent does after unpickling: tag the index with this reader's load id.
        if StorageMeta is not None and hasattr(self, "load_id"):
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        # DCP loads a whole stored chunk for every read of part of it; row ranges are read
        # directly instead, the rest goes through DCP unchanged.
        rest = [item for item in plan.items if not self._read_rows(item, planner)]
        return super().read_data(dataclasses.replace(plan, items=rest), planner)

    def _layout(self, index: MetadataIndex) -> tuple[torch.Size, torch.dtype, int] | None:
        """(shape, dtype, byte offset of the data in the file) of a stored C-contiguous chunk, else None."""
        if index not in self._layouts:
            self._layouts[index] = None
            info = self.storage_data[index]
            if not info.transform_descriptors:  # transformed (e.g. compressed) bytes: only DCP decodes them
                try:
                    self._layouts[index] = self._probe(info)
                except Exception:  # anything unusual: DCP's own path reads it (and reports real damage)
                    pass
        return self._layouts[index]

    def _probe(self, info) -> tuple[torch.Size, torch.dtype, int] | None:
        with self.fs.create_stream(self.fs.concat_path(self.path, info.relative_path), "rb") as stream:
            # On the meta device torch.load reads only the pickled header, and records where
            # each storage's bytes start in the archive.
            meta = torch.load(
                _create_file_view(stream, info.offset, info.length), map_location="meta", weights_only=True
            )
            archive = torch._C.PyTorchFileReader(_create_file_view(stream, info.offset, info.length))
            byteorder = archive.get_record("byteorder").decode() if archive.has_record("byteorder") else sys.byteorder
        if not isinstance(meta, torch.Tensor) or meta.dim() == 0 or not meta.is_contiguous():
            return None
        start = getattr(meta.untyped_storage(), "_checkpoint_offset", None)
        if start is None or byteorder != sys.byteorder:
            return None
        return meta.shape, meta.dtype, info.offset + start + meta.storage_offset() * meta.element_size()

    def _read_rows(self, item: ReadItem, planner: LoadPlanner) -> bool:
        """Read a tensor item that takes whole rows of a stored chunk; False if it is not one."""
        if item.type != LoadItemType.TENSOR:
            return False
        layout = self._layout(item.storage_index)
        if layout is None:
            return False
        shape, dtype, data_start = layout
        if any(item.storage_offsets[1:]) or list(item.lengths[1:]) != list(shape[1:]):
            return False  # not whole rows, so not one contiguous byte range
        if item.storage_offsets[0] + item.lengths[0] > shape[0]:
            return False  # the index claims rows the chunk lacks: DCP's path reports it
        target = planner.resolve_tensor(item).detach()
        if target.size() != torch.Size(item.lengths):
            raise AssertionError(
                f"req {item.storage_index} mismatch sizes {target.size()} vs {torch.Size(item.lengths)}"
            )
        # Straight into the destination when its memory matches the file's bytes, else via a buffer.
        direct = target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
        rows = target if direct else torch.empty(target.shape, dtype=dtype)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        path = self.fs.concat_path(self.path, self.storage_data[item.storage_index].relative_path)
        with self.fs.create_stream(path, "rb") as stream:
            stream.seek(data_start + item.storage_offsets[0] * row_bytes)
            got = stream.readinto(rows.view(-1).view(torch.uint8).numpy())
        if got != rows.nbytes:
            raise OSError(f"{path}: truncated, {got} of {rows.nbytes} bytes for {item.storage_index.fqn}")
        if not direct:
            target.copy_(rows)
        planner.commit_tensor(item, target)
        return True


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that restores non-tensor items with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value) -> None:
        obj = torch.load(value, weights_only=True)
        # Placed exactly as DefaultLoadPlanner.load_bytes places it.
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

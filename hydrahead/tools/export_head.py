"""Export a checkpoint's classification head as one file, for inference elsewhere.

    python -m hydrahead.tools.export_head runs/r50/checkpoints/step-90000 head.safetensors
    python -m hydrahead.tools.export_head runs/r50 head.npy --dtype float16

A checkpoint holds the head's rows sharded by class range over the ranks that wrote it; the
export merges them in class order into one (num_classes, embed_dim) tensor. It needs no GPU,
no process group and not the world size of the run. Rows are read and written in blocks,
so heads larger than memory export too. Nothing in the checkpoint is unpickled beyond plain
data (see hydrahead.train.safe_dcp): exporting an untrusted checkpoint runs no code from it.

Output formats, chosen by OUT's extension:
  .safetensors  one tensor named head.weight (or head.momentum), with the metadata
                num_classes, embed_dim, step and tensor
  .npy          a (num_classes, embed_dim) array; bfloat16 is written as float32,
                since numpy has no bfloat16

Rows that sat out steps with head.inactive_rows=continue are exported as of the checkpoint's
step: the steps they still owe are paid on the way (as training's settle pays them, rounded
to nearest into the stored dtype).

Before reading, the checkpoint's files are checked against the checksums its save recorded
(as hydrahead.tools.verify_checkpoint does): a damaged checkpoint folder is an error naming
the file; for a run folder, the newest checkpoint that verifies is taken. --no-verify skips
that reading pass.

OUT is written as OUT.partial and renamed when complete: a crash never leaves a half-written OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import struct
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from tqdm import tqdm

from hydrahead.optim.deferred_sgd import pay_owed_steps
from hydrahead.optim.low_precision import FORMATS, round_nearest
from hydrahead.train.checkpoint import (
    HEAD_DEFERRED,
    META_FILE,
    OK,
    CheckpointCheck,
    NoLoadableCheckpointError,
    checkpoint_root,
    newest_loadable_checkpoint,
    read_meta,
    verify_checkpoint,
)
from hydrahead.train.safe_dcp import SafeFileSystemReader, SafeLoadPlanner

TENSORS = ("weight", "momentum")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
SUFFIXES = (".safetensors", ".npy")
DEFAULT_BLOCK_ROWS = 1 << 20
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclasses.dataclass
class _Head:
    """One per-class head tensor of a checkpoint, opened for reading."""

    path: Path
    fqn: str
    num_classes: int
    embed_dim: int
    dtype: torch.dtype
    step: int
    reader: SafeFileSystemReader
    metadata: Metadata
    owed: OwedSteps | None = None  # the steps its rows still owe (see OwedSteps)


class OwedSteps:
    """The zero-gradient steps a checkpoint's head rows still owe (``inactive_rows=continue``).

    A save pays none of them (``hydrahead.optim.deferred_sgd``): the rows are stored as they
    were last written, beside ``head.owed_steps`` and the maps that pay them. ``pay`` turns a
    block of stored rows into the rows of the checkpoint's step, as training's settle would
    with round-to-nearest into the stored dtype.
    """

    def __init__(self, reader: SafeFileSystemReader, metadata: Metadata):
        self.reader, self.metadata = reader, metadata
        saved = metadata.state_dict_metadata
        self.maps = _read_rows(reader, metadata, f"{HEAD_DEFERRED}.maps", 0, saved[f"{HEAD_DEFERRED}.maps"])
        self.has_momentum = isinstance(saved.get("head.momentum"), TensorStorageMetadata)

    def pay(self, tensor: str, start: int, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``start ..`` of head.``tensor`` (``rows``, as stored) after the steps they owe."""

        def stored(name: str) -> torch.Tensor:
            return _read_rows(
                self.reader,
                self.metadata,
                f"head.{name}",
                start,
                self.metadata.state_dict_metadata[f"head.{name}"],
                len(rows),
            )

        owed = stored("owed_steps")
        weight = rows if tensor == "weight" else stored("weight")
        momentum = None if not self.has_momentum else rows if tensor == "momentum" else stored("momentum")
        weight, momentum = pay_owed_steps(weight, momentum, owed, self.maps)
        paid = weight if tensor == "weight" else momentum
        return round_nearest(paid, rows.dtype) if rows.dtype in FORMATS else paid.to(rows.dtype)


def open_owed_steps(
    path: Path, reader: SafeFileSystemReader | None = None, metadata: Metadata | None = None
) -> OwedSteps | None:
    """The checkpoint's ``OwedSteps``, or None when its rows owe nothing (or it predates them)."""
    if not read_meta(path).get(HEAD_DEFERRED):
        return None
    reader = reader or SafeFileSystemReader(path)
    return OwedSteps(reader, metadata or reader.read_metadata())


def resolve_checkpoint(path: str | os.PathLike, *, verify: bool = True, group=None) -> Path:
    """``path`` itself when it is a checkpoint folder, else the newest loadable checkpoint of a run folder.

    With ``verify`` the checkpoint's files are checked against its checksums first (collective
    over ``group`` when a process group is up: each rank a share): a damaged or incomplete
    checkpoint folder is an error naming the file, a run folder's damaged checkpoints are
    skipped with a warning, and one written without checksums is taken with a warning.
    Without ``verify``, only what reads no data file is checked.
    """
    path = Path(path)
    if (path / ".metadata").is_file() or (path / META_FILE).is_file():
        check = verify_checkpoint(path, group=group, contents=verify)
        if not check.loadable:
            raise ValueError(f"checkpoint {path} is {check.describe()}")
    else:
        if not checkpoint_root(path).is_dir():
            raise FileNotFoundError(
                f"{path} is neither a checkpoint folder (no .metadata) nor a run folder "
                f"(no {checkpoint_root(path).name}/)"
            )

        def skipped(folder: Path, check: CheckpointCheck) -> None:
            warnings.warn(f"skipping checkpoint {folder}: {check.describe()}", stacklevel=4)

        try:
            found = newest_loadable_checkpoint(path, group=group, contents=verify, skipped=skipped)
        except NoLoadableCheckpointError as exc:
            raise ValueError(str(exc)) from None
        if found is None:
            raise FileNotFoundError(f"{path}: no checkpoint in {checkpoint_root(path)}")
        path, check = found
    if verify and check.status != OK:
        warnings.warn(f"checkpoint {path} is {check.describe()}", stacklevel=2)
    return path


def _open_head(checkpoint: str | os.PathLike, tensor: str, verify: bool = True) -> _Head:
    if tensor not in TENSORS:
        raise ValueError(f"tensor must be one of {', '.join(TENSORS)}, got {tensor!r}")
    path = resolve_checkpoint(checkpoint, verify=verify)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path} has no {META_FILE}: not a complete checkpoint")
    meta = read_meta(path)
    missing = [key for key in ("num_classes", "embed_dim", "step") if key not in meta]
    if missing:
        raise ValueError(f"{path / META_FILE} lacks {', '.join(missing)}")
    reader = SafeFileSystemReader(path)
    metadata = reader.read_metadata()
    fqn = f"head.{tensor}"
    saved = metadata.state_dict_metadata.get(fqn)
    if not isinstance(saved, TensorStorageMetadata):
        hint = " (a run with head.momentum=0 saves none)" if tensor == "momentum" else ""
        raise ValueError(f"{path} holds no tensor {fqn}{hint}")
    if tuple(saved.size) != (meta["num_classes"], meta["embed_dim"]):
        raise ValueError(
            f"{path}: {fqn} has shape {tuple(saved.size)} but {META_FILE} "
            f"says ({meta['num_classes']}, {meta['embed_dim']})"
        )
    _check_shards_tile_rows(path, fqn, saved)
    return _Head(
        path,
        fqn,
        saved.size[0],
        saved.size[1],
        saved.properties.dtype,
        int(meta["step"]),
        reader,
        metadata,
        open_owed_steps(path, reader, metadata),
    )


def _check_shards_tile_rows(path: Path, fqn: str, saved: TensorStorageMetadata) -> None:
    """The saved shards must be full-width row ranges covering every class once; else some rows would be left unread."""
    next_row = 0
    for chunk in sorted(saved.chunks, key=lambda c: c.offsets[0]):
        if chunk.offsets[0] != next_row or chunk.offsets[1] != 0 or chunk.sizes[1] != saved.size[1]:
            raise ValueError(
                f"{path}: the shards of {fqn} do not tile its rows (a shard "
                f"at {list(chunk.offsets)} of size {list(chunk.sizes)})"
            )
        next_row += chunk.sizes[0]
    if next_row != saved.size[0]:
        raise ValueError(f"{path}: the shards of {fqn} cover {next_row} of {saved.size[0]} rows")


class _RowBlockPlanner(SafeLoadPlanner):
    """Loads rows [start, start + len(block)) of the tensor ``fqn`` into ``block``, nothing else."""

    def __init__(self, fqn: str, start: int, block: torch.Tensor):
        super().__init__()
        self.fqn, self.start, self.block = fqn, start, block

    def create_local_plan(self) -> LoadPlan:
        saved = self.metadata.state_dict_metadata[self.fqn]
        wanted = ChunkStorageMetadata(
            offsets=torch.Size([self.start] + [0] * (self.block.dim() - 1)), sizes=self.block.shape
        )
        return LoadPlan(create_read_items_for_chunk_list(self.fqn, saved, [wanted]))

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        # Every read item lands in the block; its dest offsets are relative to the block.
        assert index.fqn == self.fqn, index
        return self.block


def _load(reader: SafeFileSystemReader, metadata: Metadata, planner: _RowBlockPlanner) -> None:
    """dcp.load's steps for a single process, without re-reading the index for every block."""
    planner.set_up_planner({}, metadata, True)
    reader.set_up_storage_reader(metadata, True)
    plan = reader.prepare_local_plan(planner.create_local_plan())
    plan = reader.prepare_global_plan(planner.create_global_plan([plan]))[0]
    reader.read_data(planner.finish_plan(plan), planner).wait()


def _read_rows(
    reader: SafeFileSystemReader,
    metadata: Metadata,
    fqn: str,
    start: int,
    saved: TensorStorageMetadata,
    num_rows: int | None = None,
) -> torch.Tensor:
    """Rows [start, start + num_rows) of the saved tensor ``fqn`` (all of them by default)."""
    num_rows = saved.size[0] - start if num_rows is None else num_rows
    block = torch.empty(num_rows, *saved.size[1:], dtype=saved.properties.dtype)
    _load(reader, metadata, _RowBlockPlanner(fqn, start, block))
    return block


def _blocks(head: _Head, block_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    saved = head.metadata.state_dict_metadata[head.fqn]
    tensor = head.fqn.removeprefix("head.")
    for start in range(0, head.num_classes, block_rows):
        block = _read_rows(
            head.reader, head.metadata, head.fqn, start, saved, min(block_rows, head.num_classes - start)
        )
        yield start, block if head.owed is None else head.owed.pay(tensor, start, block)


def _check_block_rows(block_rows: int) -> None:
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")


def iter_head_rows(
    checkpoint: str | os.PathLike,
    tensor: str = "weight",
    block_rows: int = DEFAULT_BLOCK_ROWS,
    *,
    verify: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first class, rows) blocks of the head tensor ``tensor`` in class order, in the saved dtype.

    ``checkpoint`` is a checkpoint folder or a run folder (its newest loadable checkpoint).
    The checkpoint is opened and checked now (its checksums too, with ``verify``); each
    block is read when it is asked for.
    """
    _check_block_rows(block_rows)
    return _blocks(_open_head(checkpoint, tensor, verify), block_rows)


def _write_npy(
    path: Path, blocks: Iterable[tuple[int, torch.Tensor]], shape: tuple[int, int], dtype: torch.dtype
) -> None:
    array = np.lib.format.open_memmap(path, mode="w+", dtype=torch.empty(0, dtype=dtype).numpy().dtype, shape=shape)
    for start, block in blocks:
        array[start : start + len(block)] = block.numpy()
    array.flush()
    del array  # closes the mapping before the rename


def _write_safetensors(
    path: Path,
    blocks: Iterable[tuple[int, torch.Tensor]],
    shape: tuple[int, int],
    dtype: torch.dtype,
    name: str,
    metadata: dict[str, str],
) -> None:
    """The safetensors layout written by hand, so that no step holds the whole tensor.

    8-byte little-endian header length, a JSON header padded with spaces to a multiple of 8,
    then the tensor's raw little-endian bytes.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files hold little-endian bytes; this machine is big-endian")
    nbytes = math.prod(shape) * dtype.itemsize
    header = {
        name: {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]},
        "__metadata__": metadata,
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        next_row = 0
        for start, block in blocks:
            assert start == next_row, "blocks must arrive in class order"
            file.write(block.contiguous().view(torch.uint8).numpy())
            next_row += len(block)
        file.flush()
        os.fsync(file.fileno())


def _with_progress(blocks: Iterable[tuple[int, torch.Tensor]], total: int, desc: str, enabled: bool):
    with tqdm(total=total, desc=desc, unit="row", unit_scale=True, disable=not enabled) as bar:
        for start, block in blocks:
            yield start, block
            bar.update(len(block))


def export_head(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tensor: str = "weight",
    dtype: str | torch.dtype | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    force: bool = False,
    progress: bool = True,
    verify: bool = True,
) -> Path:
    """Write head.``tensor`` of ``checkpoint`` (all shards, in class order) to ``out``; returns ``out``.

    ``out`` ends in .safetensors or .npy. ``dtype`` defaults to the saved dtype (a .npy file
    holds bfloat16 as float32). An existing ``out`` is replaced only with ``force``. With
    ``verify`` (the default) the checkpoint's checksums are checked before anything is read
    (see ``resolve_checkpoint``).
    """
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise ValueError(f"OUT must end in {' or '.join(SUFFIXES)}, got {out.name!r}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force (force=True) to overwrite it")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    _check_block_rows(block_rows)
    head = _open_head(checkpoint, tensor, verify)

    values_dtype = dtype or head.dtype  # the precision of the exported values
    file_dtype = values_dtype
    if out.suffix == ".npy" and values_dtype == torch.bfloat16:
        file_dtype = torch.float32
        warnings.warn(f"numpy has no bfloat16: {out} holds the bfloat16 values as float32", stacklevel=2)
    if file_dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"cannot export {head.fqn} of dtype {file_dtype}; supported: {', '.join(DTYPES)}")

    shape = (head.num_classes, head.embed_dim)
    blocks = ((start, block.to(values_dtype).to(file_dtype)) for start, block in _blocks(head, block_rows))
    blocks = _with_progress(blocks, head.num_classes, f"{head.fqn} -> {out.name}", progress)
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if out.suffix == ".npy":
            _write_npy(partial, blocks, shape, file_dtype)
        else:
            metadata = {
                "num_classes": str(head.num_classes),
                "embed_dim": str(head.embed_dim),
                "step": str(head.step),
                "tensor": head.fqn,
            }
            _write_safetensors(partial, blocks, shape, file_dtype, head.fqn, metadata)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hydrahead.tools.export_head",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="a checkpoint folder (run.dir/checkpoints/step-N), or a run folder: its newest checkpoint that verifies",
    )
    parser.add_argument("out", metavar="OUT", help="the file to write, ending in .safetensors or .npy")
    parser.add_argument(
        "--tensor",
        choices=TENSORS,
        default="weight",
        help="the head's weights or their SGD momentum buffer (default: weight)",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help=(
            "dtype to write (default: the saved dtype); a .npy file "
            "holds bfloat16 as float32, since numpy has no bfloat16"
        ),
    )
    parser.add_argument(
        "--block-rows",
        type=int,
        default=DEFAULT_BLOCK_ROWS,
        metavar="N",
        help=(
            "rows read and written at a time; memory use is about N x embed_dim "
            f"elements, twice that with --dtype (default: {DEFAULT_BLOCK_ROWS})"
        ),
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite OUT if it exists (otherwise an existing OUT is an error)"
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help=(
            "do not check the checkpoint's checksums first (by default every file is read once to check "
            "it, then the head is read again to export it; damage then goes unnoticed)"
        ),
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        path = export_head(
            args.checkpoint,
            args.out,
            tensor=args.tensor,
            dtype=args.dtype,
            block_rows=args.block_rows,
            force=args.force,
            verify=args.verify,
        )
    except (ValueError, FileExistsError, FileNotFoundError, pickle.UnpicklingError) as exc:
        print(f"export_head: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

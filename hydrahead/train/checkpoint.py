"""Checkpoints: torch.distributed.checkpoint (DCP), written atomically, re-shardable by class.

Layout of ``run.dir/checkpoints/``::

    step-120/            a complete checkpoint (only complete ones carry this name)
      .metadata          DCP's index of every saved chunk
      __0_0.distcp ...   the chunks, one file per rank
      meta.json          step, data cursor, world size, model shape, resolved config
    .step-140.partial/   a save in progress (or one a kill interrupted): never loaded

A save goes into the ``.partial`` folder; once every rank has written, rank 0 adds
``meta.json`` and renames the folder to ``step-N`` in one atomic rename, so a kill at any
moment leaves either the previous checkpoints or the new complete one.

The head's rows are saved as they are stored: with ``head.inactive_rows=continue`` over
active rows, rows that sat out steps still owe them, and ``head.owed_steps`` (per class)
and ``head_deferred`` (the maps that pay them) are saved beside them, so that a save
changes nothing a resumed run reads (see ``hydrahead.optim.deferred_sgd``).

The head's per-class tensors (weight, momentum, owed steps) are saved as sharded tensors whose shards
carry their global row offsets (``class_start``). DCP records those offsets, so a later
load on any number of ranks asks for its own class range and reads exactly the
overlapping rows, however the classes were split when saving. (Plain tensors would not do:
DCP treats same-named plain tensors on different ranks as replicated copies. DTensor's
``Shard(0)`` would not either: it splits like ``torch.chunk``, not like ``shard_range``.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from hydrahead.distributed.setup import DistEnv
from hydrahead.train.safe_dcp import SafeFileSystemReader, SafeLoadPlanner

CHECKPOINTS = "checkpoints"
# The head's deferred steps: ``head.owed_steps`` (per class) and this replicated item; its
# name is also meta.json's flag for whether a checkpoint holds them.
HEAD_DEFERRED = "head_deferred"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def class_rows(rows: torch.Tensor, class_start: int, num_classes: int, rank: int):
    """Wrap this rank's rows (C_r x ...) of a per-class tensor with their global offset for DCP.

    The shard shares storage with ``rows``: a DCP load writes straight into it.
    """
    from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards

    placement = f"rank:{rank}/{rows.device.type}" + (f":{rows.device.index}" if rows.device.type == "cuda" else "")
    metadata = ShardMetadata(
        shard_offsets=[class_start] + [0] * (rows.dim() - 1), shard_sizes=list(rows.shape), placement=placement
    )
    with warnings.catch_warnings():  # ShardedTensor is deprecated in favour of DTensor, which cannot express this split
        warnings.simplefilter("ignore")
        return init_from_local_shards([Shard(rows, metadata)], [num_classes, *rows.shape[1:]])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_durably(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a loadable checkpoint, or None when it looks complete.

    Checks that the DCP index and meta.json exist and parse, and that every data file the
    index refers to is present with at least the bytes the index says it holds.
    """
    meta_path, index_path = path / META_FILE, path / ".metadata"
    if not meta_path.is_file():
        return f"{META_FILE} is missing"
    if not index_path.is_file():
        return ".metadata is missing"
    try:
        json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        return f"{META_FILE} is unreadable ({exc})"
    try:
        metadata = SafeFileSystemReader(str(path)).read_metadata()  # refuses code in the pickled index
    except Exception as exc:  # any parse failure means the index is damaged
        return f".metadata is unreadable ({type(exc).__name__}: {exc})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        file = path / name
        if not file.is_file():
            return f"data file {name} is missing"
        if file.stat().st_size < size:
            return f"data file {name} is truncated ({file.stat().st_size} of {size} bytes)"
    return None


def complete_checkpoints(run_dir: str | os.PathLike, *, warn: bool = True) -> list[tuple[int, Path]]:
    """(step, folder) of every loadable checkpoint, oldest first; damaged ones are reported and skipped."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if not match or not entry.is_dir():
            continue
        problem = checkpoint_problem(entry)
        if problem is None:
            found.append((int(match.group(1)), entry))
        elif warn:
            warnings.warn(f"skipping checkpoint {entry}: {problem}", stacklevel=2)
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def read_meta(path: Path) -> dict:
    return json.loads((path / META_FILE).read_text())


def save_checkpoint(env: DistEnv, run_dir: str | os.PathLike, step: int, state: dict, meta: dict, *, keep: int) -> Path:
    """Save ``state`` (a DCP state dict) as ``checkpoints/step-{step}``; collective over all ranks.

    Returns the final folder. Keeps the newest ``keep`` complete checkpoints.
    """
    root = checkpoint_root(run_dir)
    partial = root / f".step-{step}.partial"
    final = root / f"step-{step}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left over from an interrupted save
    env.barrier()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(partial), sync_files=True), process_group=env.data_group)
    env.barrier()
    if env.is_main:
        _write_json_durably(partial / META_FILE, {**meta, "step": step})
        _fsync_dir(partial)
        if final.exists():  # the same step saved again: swap atomically, then drop the old copy
            old = root / f".step-{step}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, final)
        _fsync_dir(root)
        _prune(root, keep)
    env.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(
        (int(m.group(1)), entry) for entry in root.iterdir() if (m := _STEP_DIR.match(entry.name)) and entry.is_dir()
    )
    for _, old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(env: DistEnv, path: Path, state: dict) -> None:
    """Load ``path`` into ``state`` in place (collective); sharded head tensors are re-split as needed.

    The reader and planner deserialise nothing that could run code: the index through an
    allow-list unpickler, non-tensor items with ``weights_only=True``.
    """
    dcp.load(
        state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(), process_group=env.data_group
    )
    if dist.is_initialized():
        env.barrier()

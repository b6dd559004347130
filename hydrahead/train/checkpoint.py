"""Checkpoints: torch.distributed.checkpoint (DCP), written atomically, re-shardable by class.

Layout of ``run.dir/checkpoints/``::

    step-120/            a complete checkpoint (only complete ones carry this name)
      .metadata          DCP's index of every saved chunk
      __0_0.distcp ...   the chunks, one file per rank
      meta.json          step, data cursor, world size, model shape, resolved config
      manifest.json      size and checksums of each file above (written last)
    .step-140.partial/   a save in progress (or one a kill interrupted): never loaded

A save goes into the ``.partial`` folder. Each rank hashes its files as it writes them
(``hydrahead.train.checksums``); once every rank has written, rank 0 adds
``meta.json``, hashes it and DCP's index, writes ``manifest.json`` with every file's
checksums and renames the folder to ``step-N`` in one atomic rename, so a kill at any
moment leaves either the previous checkpoints or the new complete one.

A checkpoint is used only if it verifies (``verify_checkpoint``): every rank hashes a
share of the files (those it wrote, at the same world size) and compares them with the
manifest, and the ranks agree on the verdict. Resume hashes the data files while DCP reads
them (``load_verified``), after the small files DCP trusts have verified. Resume takes the newest checkpoint that
verifies and names the file of each one it skips. Checkpoints written before checksums
existed carry no manifest: they load after the structural checks, reported as unverified.

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

import contextlib
import dataclasses
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem

from hydrahead.distributed.collectives import all_gather_objects, group_rank, group_world_size
from hydrahead.distributed.setup import DistEnv
from hydrahead.train.checksums import (
    MANIFEST_FILE,
    HashingStream,
    PieceHasher,
    default_threads,
    file_problems,
    hash_files,
    make_manifest,
    read_manifest,
    size_problems,
)
from hydrahead.train.safe_dcp import SafeFileSystemReader, SafeLoadPlanner

CHECKPOINTS = "checkpoints"
# The head's deferred steps: ``head.owed_steps`` (per class) and this replicated item; its
# name is also meta.json's flag for whether a checkpoint holds them.
HEAD_DEFERRED = "head_deferred"
META_FILE = "meta.json"
INDEX_FILE = ".metadata"  # DCP's index
# meta.json's record that a manifest was written (its file name): without it, a checkpoint
# predates checksums; with it, a missing manifest is a missing file.
CHECKSUMS_KEY = "checksums"
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


# A check's verdicts, from best to worst.
OK, UNVERIFIED, INCOMPLETE, DAMAGED = "ok", "unverified", "incomplete", "damaged"
_SEVERITY = {OK: 0, UNVERIFIED: 1, INCOMPLETE: 2, DAMAGED: 3}
NO_CHECKSUMS = f"written without checksums (no {MANIFEST_FILE}): its contents cannot be verified"


@dataclasses.dataclass(frozen=True)
class CheckpointCheck:
    """What a check of a checkpoint folder found.

    ``status``: ``ok`` (every file matches its checksum), ``unverified`` (no checksums to
    check, or not asked to: the structure looks complete), ``incomplete`` (files are
    missing) or ``damaged`` (a file differs from what was saved, or cannot be read).
    ``problems``: one line per problem, each naming its file.
    """

    status: str
    problems: tuple[str, ...] = ()

    @property
    def loadable(self) -> bool:
        return self.status in (OK, UNVERIFIED)

    def describe(self) -> str:
        return f"{self.status}: {'; '.join(self.problems)}" if self.problems else self.status


def _index_files(path: Path) -> dict[str, int]:
    """{data file: bytes it must hold at least} for every file DCP's index refers to (raises if unreadable)."""
    metadata = SafeFileSystemReader(str(path)).read_metadata()  # refuses code in the pickled index
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    return needed


def _structure_check(path: Path) -> CheckpointCheck | None:
    """The checks that read no data file: meta.json and DCP's index exist and parse, and every
    data file the index refers to is present with at least the bytes it says it holds."""
    meta_path, index_path = path / META_FILE, path / INDEX_FILE
    if not meta_path.is_file():
        return CheckpointCheck(INCOMPLETE, (f"{META_FILE} is missing",))
    if not index_path.is_file():
        return CheckpointCheck(INCOMPLETE, (f"{INDEX_FILE} is missing",))
    try:
        json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        return CheckpointCheck(DAMAGED, (f"{META_FILE} is unreadable ({exc})",))
    try:
        needed = _index_files(path)
    except Exception as exc:  # any parse failure means the index is damaged
        return CheckpointCheck(DAMAGED, (f"{INDEX_FILE} is unreadable ({type(exc).__name__}: {exc})",))
    for name, size in needed.items():
        file = path / name
        if not file.is_file():
            return CheckpointCheck(INCOMPLETE, (f"data file {name} is missing",))
        if file.stat().st_size < size:
            return CheckpointCheck(DAMAGED, (f"data file {name} is truncated ({file.stat().st_size} of {size} bytes)",))
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a loadable checkpoint, or None when it looks complete.

    Checks that the DCP index and meta.json exist and parse, and that every data file the
    index refers to is present with at least the bytes the index says it holds. Reads no
    data file: ``verify_checkpoint`` checks their contents.
    """
    found = _structure_check(path)
    return None if found is None else found.problems[0]


def _folder_step(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def _problems(status_of: dict[str, str]) -> CheckpointCheck | None:
    """A check from {file: problem} (None when empty): incomplete if files are only missing."""
    if not status_of:
        return None
    status = INCOMPLETE if all(p == "is missing" for p in status_of.values()) else DAMAGED
    return CheckpointCheck(status, tuple(f"{name} {problem}" for name, problem in sorted(status_of.items())))


def check_share(
    path: str | os.PathLike,
    rank: int = 0,
    world_size: int = 1,
    *,
    contents: bool = True,
    threads: int | None = None,
    files: str = "all",
) -> CheckpointCheck:
    """Rank ``rank`` of ``world_size``'s part of checking the checkpoint folder ``path``.

    Every rank checks what reads no data (meta.json, the manifest: its own checksum, its
    step, every file's size); then the checksums of its share of the files: those written
    by rank ``rank`` (modulo ``world_size``; DCP's index and meta.json are rank 0's), so a
    resume at the same world size re-reads what each rank wrote, and a world of one checks
    them all. ``combine_checks`` merges the ranks' answers. ``contents=False``: only the
    structural checks of a checkpoint without checksums (``checkpoint_problem``).
    ``files``: ``"all"``; ``"small"``, all but the data files' checksums (what must hold
    before DCP may read the folder); ``"data"``, only the data files' checksums (the
    other half, which ``load_verified`` runs while DCP reads them).
    """
    if files not in ("all", "small", "data"):
        raise ValueError(f"files must be 'all', 'small' or 'data', got {files!r}")
    path = Path(path)
    if not contents:  # what loading needed before checkpoints carried checksums, and no more
        return _structure_check(path) or CheckpointCheck(UNVERIFIED, ("checksums not checked (asked not to)",))
    meta_path = path / META_FILE
    if not meta_path.is_file():
        return CheckpointCheck(INCOMPLETE, (f"{META_FILE} is missing",))
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        return CheckpointCheck(DAMAGED, (f"{META_FILE} is unreadable ({exc})",))
    if not (path / MANIFEST_FILE).is_file():
        if isinstance(meta, dict) and meta.get(CHECKSUMS_KEY):
            return CheckpointCheck(INCOMPLETE, (f"{MANIFEST_FILE} is missing ({META_FILE} says it was written)",))
        return _structure_check(path) or CheckpointCheck(UNVERIFIED, (NO_CHECKSUMS,))
    try:
        manifest = read_manifest(path / MANIFEST_FILE)
    except (OSError, ValueError) as exc:
        return CheckpointCheck(DAMAGED, (f"{MANIFEST_FILE} {exc}",))
    listed = manifest["files"]
    uncovered = [name for name in (INDEX_FILE, META_FILE) if name not in listed]
    if uncovered:
        return CheckpointCheck(DAMAGED, (f"{MANIFEST_FILE} lists no checksum of {', '.join(uncovered)}",))
    folder_step = _folder_step(path)
    if folder_step is not None and manifest["step"] != folder_step:
        return CheckpointCheck(
            DAMAGED, (f"{MANIFEST_FILE} is of step {manifest['step']}, the folder of step {folder_step}",)
        )
    found = _problems(size_problems(path, listed))
    if found is not None:
        return found
    share = {
        name: record
        for name, record in listed.items()
        if int(record.get("rank", 0)) % world_size == rank
        and (files == "all" or (name in (INDEX_FILE, META_FILE)) == (files == "small"))
    }
    found = _problems(file_problems(path, share, piece_bytes=manifest["piece_bytes"], threads=threads))
    if found is not None or rank != 0 or files == "data":
        return found or CheckpointCheck(OK)
    # Rank 0's share, DCP's index and meta.json, verifies: what DCP will read must be listed too,
    # and meta.json be of the manifest's step.
    try:
        needed = _index_files(path)
        step = json.loads(meta_path.read_text()).get("step")
    except Exception as exc:  # they verified, so this would be a save that wrote something unreadable
        return CheckpointCheck(DAMAGED, (f"{INDEX_FILE} or {META_FILE} is unreadable ({type(exc).__name__}: {exc})",))
    unlisted = sorted(set(needed) - set(listed))
    if unlisted:
        return CheckpointCheck(DAMAGED, (f"{MANIFEST_FILE} lists no checksum of {', '.join(unlisted)}",))
    if step != manifest["step"]:
        return CheckpointCheck(DAMAGED, (f"{MANIFEST_FILE} is of step {manifest['step']}, {META_FILE} of step {step}",))
    return CheckpointCheck(OK)


def combine_checks(checks: list[CheckpointCheck]) -> CheckpointCheck:
    """The verdict of all ranks: the worst status any rank found, with every rank's problems (once each)."""
    worst = max(checks, key=lambda check: _SEVERITY[check.status]).status
    if worst == OK:
        return CheckpointCheck(OK)
    problems = []
    for check in checks:
        if check.status == worst:
            problems += [problem for problem in check.problems if problem not in problems]
    return CheckpointCheck(worst, tuple(problems))


def verify_checkpoint(
    path: str | os.PathLike, *, group=None, contents: bool = True, threads: int | None = None, files: str = "all"
) -> CheckpointCheck:
    """Check the checkpoint folder ``path`` against its manifest; collective over ``group``.

    Each rank checks its share (``check_share``, which says what ``files`` selects) and all
    ranks get the same verdict (one all-gather of the answers). Without a process group,
    one process checks every file. ``contents=False`` leaves the manifest and checksums out
    (and says so: ``unverified``).
    """
    rank, world_size = group_rank(group), group_world_size(group)
    local = check_share(path, rank, world_size, contents=contents, threads=threads, files=files)
    return combine_checks(all_gather_objects(local, group))


def load_verified(
    path: str | os.PathLike,
    load: Callable[[Path], None],
    *,
    group=None,
    contents: bool = True,
    threads: int | None = None,
) -> CheckpointCheck:
    """Verify the checkpoint folder ``path`` and ``load`` it at once; collective over ``group``.

    Reading 100 GB twice, once to hash it and once to load it, would make a resume take
    half as long again; so the small files (DCP's index, meta.json, the manifest) are
    verified first, since DCP must be able to trust them, and the data files are hashed on
    a background thread while ``load(path)`` reads them. When the returned check is not
    ``loadable``, whatever ``load`` wrote came from a damaged checkpoint: the caller must
    load another one over it (or stop). An exception of ``load`` is raised only when the
    checkpoint verified; DCP raises on every rank alike.
    """
    path = Path(path)
    check = verify_checkpoint(path, group=group, contents=contents, threads=threads, files="small")
    if not check.loadable:
        return check
    if check.status == UNVERIFIED:  # nothing more to hash
        load(path)
        return check
    rank, world_size = group_rank(group), group_world_size(group)
    with ThreadPoolExecutor(1, thread_name_prefix="verify") as background:
        hashing = background.submit(check_share, path, rank, world_size, threads=threads, files="data")
        failure = None
        try:
            load(path)
        except Exception as exc:  # judged below, with the checksums
            failure = exc
        local = hashing.result()
    check = combine_checks(all_gather_objects(local, group))
    if check.loadable and failure is not None:
        raise failure
    return check


def step_folders(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step-N`` folder of ``run_dir``'s checkpoints, oldest first, loadable or not."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(
        (step, entry) for entry in root.iterdir() if (step := _folder_step(entry)) is not None and entry.is_dir()
    )


class NoLoadableCheckpointError(RuntimeError):
    """A run folder has checkpoints, but every one is damaged or incomplete."""


def newest_loadable_checkpoint(
    run_dir: str | os.PathLike,
    *,
    group=None,
    contents: bool = True,
    threads: int | None = None,
    skipped: Callable[[Path, CheckpointCheck], None] | None = None,
    load: Callable[[Path], None] | None = None,
) -> tuple[Path, CheckpointCheck] | None:
    """The newest checkpoint of ``run_dir`` that verifies (or, written without checksums, looks
    complete), with its check; None if there is no checkpoint folder. Collective over ``group``:
    the ranks take rank 0's list of folders and agree on each verdict. ``skipped(folder,
    check)`` hears of each newer one passed over. With ``load``, each candidate is loaded
    while it is verified (``load_verified``), so the one returned is also loaded. Raises
    ``NoLoadableCheckpointError`` when there are checkpoints but none can be loaded."""
    folders = all_gather_objects([str(folder) for _, folder in step_folders(run_dir)], group)[0]
    passed_over = []
    for folder in map(Path, reversed(folders)):
        if load is None:
            check = verify_checkpoint(folder, group=group, contents=contents, threads=threads)
        else:
            check = load_verified(folder, load, group=group, contents=contents, threads=threads)
        if check.loadable:
            return folder, check
        passed_over.append(f"{folder.name} ({check.describe()})")
        if skipped is not None:
            skipped(folder, check)
    if passed_over:
        raise NoLoadableCheckpointError(
            f"no checkpoint in {checkpoint_root(run_dir)} can be loaded: {', '.join(passed_over)}. "
            "Restore a good copy, or move the folder away to start afresh"
        )
    return None


def complete_checkpoints(run_dir: str | os.PathLike, *, warn: bool = True) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint that looks complete, oldest first; others are reported and skipped.

    Structural checks only (see ``checkpoint_problem``): ``newest_loadable_checkpoint`` is
    what verifies the contents."""
    found = []
    for step, entry in step_folders(run_dir):
        problem = checkpoint_problem(entry)
        if problem is None:
            found.append((step, entry))
        elif warn:
            warnings.warn(f"skipping checkpoint {entry}: {problem}", stacklevel=2)
    return found


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that looks complete (no checksums checked: see ``newest_loadable_checkpoint``)."""
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def read_meta(path: Path) -> dict:
    return json.loads((path / META_FILE).read_text())


class _HashingFileSystem(FileSystem):
    """DCP's local file system, whose data files opened for writing hash what is written to them."""

    def __init__(self, pool: ThreadPoolExecutor, helper: ThreadPoolExecutor) -> None:
        super().__init__()
        self.pool, self.helper = pool, helper
        self.streams: dict[str, HashingStream] = {}

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            if mode != "wb" or not str(path).endswith(".distcp"):
                yield stream
                return
            hashing = HashingStream(stream, PieceHasher(pool=self.pool), self.helper)
            yield hashing
            self.streams[Path(path).name] = hashing  # only a file written to its end


class ChecksummingWriter(dcp.FileSystemWriter):
    """DCP's file writer that hashes the files this rank writes as it writes them (on
    ``threads`` threads beside the writing one): ``checksums`` holds their manifest records.
    A file that could not be hashed on its way (see ``HashingStream``) is read back instead."""

    def __init__(self, path: str | os.PathLike, *, rank: int, threads: int | None = None, **kwargs) -> None:
        super().__init__(path, **kwargs)
        self.writer_rank, self.threads = rank, threads
        self.checksums: dict[str, dict] = {}

    def write_data(self, plan, planner):
        threads = default_threads() if self.threads is None else self.threads
        plain = self.fs
        with ThreadPoolExecutor(threads, thread_name_prefix="checksum") as pool, ThreadPoolExecutor(1) as helper:
            self.fs = _HashingFileSystem(pool, helper)
            try:
                future = super().write_data(plan, planner)  # DCP's file writer finishes before it returns
            finally:
                streams, self.fs = self.fs.streams, plain
        names = {result.storage_data.relative_path for result in future.wait()}
        prefix = getattr(plan.storage_data, "prefix", None)
        if prefix:  # a file of no item (an empty bucket) is written too
            names |= {file.name for file in Path(self.path).glob(f"{prefix}*.distcp")}
        records, unhashed = {}, []
        for name in sorted(names):
            stream = streams.get(name)
            hasher = None if stream is None else stream.hasher
            if hasher is not None and hasher.size == (Path(self.path) / name).stat().st_size:
                records[name] = {"bytes": hasher.size, "rank": self.writer_rank, "pieces": hasher.digests()}
            else:
                unhashed.append(name)
        records.update(hash_files(self.path, unhashed, rank=self.writer_rank, threads=threads))
        self.checksums = records
        return future


def save_checkpoint(
    env: DistEnv,
    run_dir: str | os.PathLike,
    step: int,
    state: dict,
    meta: dict,
    *,
    keep: int,
    checksums: bool = True,
) -> Path:
    """Save ``state`` (a DCP state dict) as ``checkpoints/step-{step}``; collective over all ranks.

    Returns the final folder. Keeps the newest ``keep`` complete checkpoints. ``checksums``:
    write the manifest (False only to measure what it costs: the checkpoint then loads unverified).
    """
    root = checkpoint_root(run_dir)
    partial = root / f".step-{step}.partial"
    final = root / f"step-{step}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left over from an interrupted save
    env.barrier()
    if checksums:
        writer = ChecksummingWriter(partial, rank=group_rank(env.data_group), sync_files=True)
    else:
        writer = dcp.FileSystemWriter(str(partial), sync_files=True)
    dcp.save(state, storage_writer=writer, process_group=env.data_group)
    written = all_gather_objects(writer.checksums, env.data_group) if checksums else None
    env.barrier()
    if env.is_main:
        meta = {**meta, "step": step}
        if checksums:
            meta[CHECKSUMS_KEY] = MANIFEST_FILE
        _write_json_durably(partial / META_FILE, meta)
        if checksums:  # last: the manifest covers every other file
            files = {name: record for records in written for name, record in records.items()}
            files.update(hash_files(partial, [INDEX_FILE, META_FILE], rank=0))
            _write_json_durably(partial / MANIFEST_FILE, make_manifest(step, files))
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
        _prune(root, keep, step)
    env.barrier()
    return final


def _prune(root: Path, keep: int, saved_step: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``saved_step`` (the one just written). Newer
    ones exist only when a resume skipped them as damaged: they stay until a save of their
    step replaces them, and they never push out a loadable one."""
    steps = sorted(
        (int(m.group(1)), entry) for entry in root.iterdir() if (m := _STEP_DIR.match(entry.name)) and entry.is_dir()
    )
    steps = [(step, entry) for step, entry in steps if step <= saved_step]
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

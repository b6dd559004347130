"""Checksums of checkpoint files: xxh3-128 over fixed-size pieces, read in a stream, in parallel.

A checkpoint folder's ``manifest.json`` (written last, see ``hydrahead.train.checkpoint``)::

    {"format": 1, "algorithm": "xxh3_128", "piece_bytes": 67108864, "step": 120,
     "files": {"__0_0.distcp": {"bytes": 1234, "rank": 0, "pieces": ["<32 hex digits>", ...]},
               ".metadata": {...}, "meta.json": {...}},
     "digest": "<xxh3_128 of the manifest's own JSON without this key>"}

A file is hashed in pieces of ``piece_bytes`` (the last one shorter; an empty file has one
empty piece), each read in blocks of ``READ_BYTES`` into a buffer of the thread that reads
it: memory stays at threads x READ_BYTES whatever the file size, and the pieces of one
large file are hashed on several threads at once (xxhash and file reads release the GIL).
A mismatch then also says which byte range differs.

Everything here is plain file arithmetic for one process; which rank checks which files,
and how the ranks agree, is ``hydrahead.train.checkpoint``'s.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

ALGORITHM = "xxh3_128"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
PIECE_BYTES = 64 << 20
READ_BYTES = 4 << 20
MAX_THREADS = 8


def default_threads() -> int:
    """Hashing threads for one process: the CPUs it may use, at most MAX_THREADS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))


def piece_ranges(size: int, piece_bytes: int = PIECE_BYTES) -> list[tuple[int, int]]:
    """[start, stop) byte ranges of a file's pieces, in order; one empty piece for an empty file."""
    if piece_bytes < 1:
        raise ValueError(f"piece_bytes must be positive, got {piece_bytes}")
    return [(start, min(start + piece_bytes, size)) for start in range(0, size, piece_bytes)] or [(0, 0)]


_buffers = threading.local()


def _buffer() -> memoryview:
    if getattr(_buffers, "view", None) is None:
        _buffers.view = memoryview(bytearray(READ_BYTES))
    return _buffers.view


def hash_range(path: str | os.PathLike, start: int, stop: int) -> str:
    """Hex digest of bytes [start, stop) of ``path``, read in blocks; raises OSError if the file is shorter."""
    hasher = xxhash.xxh3_128()
    buffer = _buffer()
    with open(path, "rb", buffering=0) as file:
        file.seek(start)
        left = stop - start
        while left > 0:
            got = file.readinto(buffer[: min(left, len(buffer))])
            if not got:
                raise OSError(f"{path}: ends {left} bytes before byte {stop}")
            hasher.update(buffer[:got])
            left -= got
    return hasher.hexdigest()


def _hash_pieces(
    tasks: list[tuple[Path, int, int]], threads: int
) -> list[str | OSError]:  # a digest, or the error reading that piece
    def one(task):
        try:
            return hash_range(*task)
        except OSError as error:
            return error

    if threads <= 1 or len(tasks) <= 1:
        return [one(task) for task in tasks]
    with ThreadPoolExecutor(max_workers=min(threads, len(tasks)), thread_name_prefix="checksum") as pool:
        return list(pool.map(one, tasks))


def hash_files(
    folder: str | os.PathLike,
    names: Iterable[str],
    *,
    rank: int = 0,
    piece_bytes: int = PIECE_BYTES,
    threads: int | None = None,
) -> dict[str, dict]:
    """The manifest records {name: {"bytes", "rank", "pieces"}} of files in ``folder``, hashed
    by ``threads`` threads (default: ``default_threads()``). ``rank``: who wrote them."""
    folder = Path(folder)
    sizes = {name: (folder / name).stat().st_size for name in names}
    tasks = [
        (folder / name, start, stop) for name, size in sizes.items() for start, stop in piece_ranges(size, piece_bytes)
    ]
    digests = iter(_hash_pieces(tasks, default_threads() if threads is None else threads))
    records = {}
    for name, size in sizes.items():
        pieces = [next(digests) for _ in piece_ranges(size, piece_bytes)]
        for piece in pieces:
            if isinstance(piece, OSError):  # the file changed while it was read
                raise piece
        records[name] = {"bytes": size, "rank": rank, "pieces": pieces}
    return records


class PieceHasher:
    """The piece digests of a byte stream fed to ``update`` in order: what ``hash_files``
    computes from the file they make up. The whole pieces of one large update are hashed on
    ``pool``'s threads (one at a time without a pool)."""

    def __init__(self, piece_bytes: int = PIECE_BYTES, pool: ThreadPoolExecutor | None = None):
        self.piece_bytes, self.pool = piece_bytes, pool
        self.size = 0
        self._digests: list[str] = []
        self._current, self._filled = xxhash.xxh3_128(), 0

    def _close_piece(self) -> None:
        self._digests.append(self._current.hexdigest())
        self._current, self._filled = xxhash.xxh3_128(), 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        self.size += len(view)
        start = 0
        if self._filled:  # the rest of the piece begun by earlier updates
            start = min(self.piece_bytes - self._filled, len(view))
            self._current.update(view[:start])
            self._filled += start
            if self._filled == self.piece_bytes:
                self._close_piece()
        whole = [(a, a + self.piece_bytes) for a in range(start, len(view) - self.piece_bytes + 1, self.piece_bytes)]
        if whole:

            def digest(span):
                return xxhash.xxh3_128(view[span[0] : span[1]]).hexdigest()

            self._digests += self.pool.map(digest, whole) if self.pool is not None else map(digest, whole)
            start = whole[-1][1]
        if start < len(view):  # the beginning of a piece later updates complete
            self._current.update(view[start:])
            self._filled = len(view) - start

    def digests(self) -> list[str]:
        """The digests so far, the last piece's as it stands (one empty piece for no bytes)."""
        last = [self._current.hexdigest()] if self._filled or not self._digests else []
        return self._digests + last


class HashingStream:
    """A binary file opened for writing that hashes what goes through it (``hasher``) while
    the bytes go to the file: a large write is hashed on a helper thread as it is written.

    Only a stream written from start to end in order can be hashed so: a seek, a truncation
    or a short write sets ``hasher`` to None, and the file must be hashed from disk instead.
    Anything else is the file's own (``tell``, ``fileno``, ``flush``, ...)."""

    CONCURRENT_BYTES = 1 << 20  # writes at least this large are hashed beside the write

    def __init__(self, raw, hasher: PieceHasher, helper: ThreadPoolExecutor):
        self.raw, self.hasher, self.helper = raw, hasher, helper

    def write(self, data) -> int:
        if self.hasher is None:
            return self.raw.write(data)
        try:
            view = memoryview(data).cast("B")
        except (TypeError, ValueError):  # not plain bytes: hash it from disk
            self.hasher = None
            return self.raw.write(data)
        hasher = self.hasher
        pending = self.helper.submit(hasher.update, view) if len(view) >= self.CONCURRENT_BYTES else None
        try:
            written = self.raw.write(view)
        finally:
            if pending is not None:
                pending.result()  # before the caller may reuse its buffer
        if pending is None:
            hasher.update(view)
        if written is not None and written != len(view):
            self.hasher = None
        return written

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def seek(self, *args):
        self.hasher = None
        return self.raw.seek(*args)

    def truncate(self, *args):
        self.hasher = None
        return self.raw.truncate(*args)

    def __getattr__(self, name):
        return getattr(self.raw, name)


def size_problems(folder: str | os.PathLike, records: Mapping[str, dict]) -> dict[str, str]:
    """{name: what is wrong} for each file of ``records`` that is missing or of another size
    than its record says; {} if none. Reads no file's contents."""
    folder = Path(folder)
    problems = {}
    for name, record in records.items():
        path = folder / name
        if not path.is_file():
            problems[name] = "is missing"
        elif (size := path.stat().st_size) != record["bytes"]:
            shorter = " (truncated)" if size < record["bytes"] else ""
            problems[name] = f"has {size:,} bytes, the manifest says {record['bytes']:,}{shorter}"
    return problems


def file_problems(
    folder: str | os.PathLike,
    records: Mapping[str, dict],
    *,
    piece_bytes: int = PIECE_BYTES,
    threads: int | None = None,
) -> dict[str, str]:
    """{name: what is wrong} for each file of ``records`` that is missing, of another size, or
    whose bytes do not match its digests (naming the first piece that differs); {} if all match.
    Sizes are checked before anything is read, so a missing or truncated file costs no reading."""
    folder = Path(folder)
    problems = size_problems(folder, records)
    tasks, owners = [], []
    for name, record in records.items():
        if name in problems:
            continue
        ranges = piece_ranges(record["bytes"], piece_bytes)
        if len(ranges) != len(record["pieces"]):
            problems[name] = f"has {len(record['pieces'])} piece digests in the manifest, {len(ranges)} expected"
            continue
        for (start, stop), digest in zip(ranges, record["pieces"]):
            tasks.append((folder / name, start, stop))
            owners.append((name, start, stop, digest))
    results = _hash_pieces(tasks, default_threads() if threads is None else threads)
    for (name, start, stop, digest), got in zip(owners, results):
        if name in problems:
            continue  # the first bad piece of a file is enough
        if isinstance(got, OSError):
            problems[name] = f"could not be read ({got})"
        elif got != digest:
            problems[name] = f"does not match its checksum (somewhere in bytes {start:,} to {stop:,})"
    return problems


def manifest_digest(manifest: Mapping) -> str:
    """The digest of a manifest's content: its JSON (sorted keys) without the ``digest`` key."""
    body = {key: value for key, value in manifest.items() if key != "digest"}
    return xxhash.xxh3_128(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def make_manifest(step: int, files: Mapping[str, dict], *, piece_bytes: int = PIECE_BYTES) -> dict:
    """The manifest of a checkpoint of ``step`` holding ``files`` (``hash_files`` records)."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "algorithm": ALGORITHM,
        "piece_bytes": piece_bytes,
        "step": step,
        "files": dict(sorted(files.items())),
    }
    return {**manifest, "digest": manifest_digest(manifest)}


def read_manifest(path: str | os.PathLike) -> dict:
    """A manifest file, checked against its own digest and for the fields this code reads.
    Raises ValueError saying what is wrong (OSError if it cannot be read)."""
    try:
        manifest = json.loads(Path(path).read_text())
    except ValueError as error:
        raise ValueError(f"is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("digest") != manifest_digest(manifest):
        raise ValueError("does not match its own checksum")
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("algorithm") != ALGORITHM:
        raise ValueError(
            f"is format {manifest.get('format')!r} with {manifest.get('algorithm')!r}; this version reads "
            f"format {MANIFEST_FORMAT} with {ALGORITHM}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(manifest.get("step"), int):
        raise ValueError("lacks the step or the files")
    if not isinstance(manifest.get("piece_bytes"), int) or manifest["piece_bytes"] < 1:
        raise ValueError(f"has an invalid piece size {manifest.get('piece_bytes')!r}")
    for name, record in files.items():
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"names a file outside its folder: {name!r}")
        if not (
            isinstance(record, dict) and isinstance(record.get("bytes"), int) and isinstance(record.get("pieces"), list)
        ):
            raise ValueError(f"has a malformed record for {name}")
    return manifest

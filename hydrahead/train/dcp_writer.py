"""DCP's file writer with checksums: each rank hashes its data files as it writes them.

Kept apart from ``hydrahead.train.checkpoint`` so that importing that module does not
import DCP (see there); ``save_checkpoint`` imports this one.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem

from hydrahead.train.checksums import HashingStream, PieceHasher, default_threads, hash_files


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


__all__ = ["ChecksummingWriter"]

"""What checkpoint checksums cost: hashing throughput, and save and resume time with and without them.

    python benchmarks/checkpoint_hashing.py                  # CPU dry run: configs/quickstart.yaml, one process
    python benchmarks/checkpoint_hashing.py --config configs/head_only_100m_fp8.yaml --run-dir /local/disk/bench

In order:
1. hashing: xxh3-128 (what checkpoints record, hydrahead.train.checksums) over a buffer in
   memory (the hash alone, as a save hashes what it writes) and over a file of --file-gb
   (read and hash, as a check does), its page cache warm and then evicted (cold), on one
   thread and on --threads (default: what a save or a check uses on this machine);
2. save: the config's trainer, built once (step 0, no training), saves its state
   --warmup-saves times untimed, then without and with checksums, alternately, --repeats
   times each; each checkpoint is deleted before the next save, so the disk needs room for one;
3. resume: the trainer resumes from the last one without and with verifying its checksums
   (hashed while DCP loads them), alternately, --resume-repeats times each, the files
   evicted from the page cache before each (--warm: not), as after a restart on another node.
Overhead = (median with - median without) / median without. The JSON goes to
benchmarks/results/checkpoint_hashing_<name>.json (or $HYDRAHEAD_RESULTS_DIR); a table is
printed last. One process: on a GPU with NCCL, on the CPU with gloo. Each row's
``peak_mib`` is the process's peak host memory when it was written.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
import xxhash  # noqa: E402

from benchmarks.common import environment, print_table, write_results  # noqa: E402
from hydrahead.config import load_config  # noqa: E402
from hydrahead.train.checksums import PieceHasher, default_threads, hash_files  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "quickstart.yaml"
GB = 1e9


def evict(paths) -> None:
    """Drop the files' pages from the page cache (they are clean after a save's fsync)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def hash_row(source: str, threads: int, nbytes: int, seconds: float) -> dict:
    return {
        "what": "hash",
        "detail": source,
        "threads": threads,
        "gb": nbytes / GB,
        "seconds": seconds,
        "gb_per_s": nbytes / GB / seconds,
        "s_per_gb": seconds / (nbytes / GB),
    }


def memory_rows(threads: int, memory_gb: float, reps: int = 3) -> list[dict]:
    """xxh3-128 over a buffer in memory: the hash alone, on 1 and on ``threads`` threads (best of ``reps``)."""
    nbytes = int(memory_gb * GB)
    buffer = memoryview(torch.randint(0, 256, (nbytes,), dtype=torch.uint8).numpy()).cast("B")
    rows = [hash_row("memory", 1, nbytes, min(timed(lambda: xxhash.xxh3_128(buffer).digest()) for _ in range(reps)))]
    with ThreadPoolExecutor(threads) as pool:
        best = min(timed(lambda: PieceHasher(pool=pool).update(buffer)) for _ in range(reps))
    return rows + [hash_row("memory", threads, nbytes, best)]


def file_rows(work_dir: Path, threads: int, file_gb: float, reps: int = 3) -> list[dict]:
    """xxh3-128 of a file as a check reads it: page cache warm (best of ``reps``), then cold."""
    rows = []
    path = work_dir / "hash_test.bin"
    block = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8).numpy().tobytes()
    with open(path, "wb") as file:
        for _ in range(max(1, int(file_gb * GB) // len(block))):
            file.write(block)
        file.flush()
        os.fsync(file.fileno())
    size = path.stat().st_size
    try:
        hash_files(work_dir, [path.name], threads=threads)  # warm the cache
        for count in (1, threads):
            best = min(timed(lambda: hash_files(work_dir, [path.name], threads=count)) for _ in range(reps))
            rows.append(hash_row("file, page cache warm", count, size, best))
        for count in (1, threads):
            evict([path])
            rows.append(
                hash_row(
                    "file, page cache cold",
                    count,
                    size,
                    timed(lambda: hash_files(work_dir, [path.name], threads=count)),
                )
            )
    finally:
        path.unlink()
    return rows


def head_bytes(trainer) -> int:
    """About what a checkpoint of ``trainer`` holds: its head's per-class tensors (the rest is small)."""
    head = trainer.head
    tensors = [head.weight, head.momentum_buffer, head.compensation]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) + 8 * head.num_local_classes


def folder_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.iterdir() if file.is_file())


def timing_row(what: str, key: str, flag: bool, nbytes: int, seconds: float, note: str = "") -> dict:
    """A save or resume of ``nbytes``, with (``flag``) or without checksums (``key``: checksums, verify)."""
    detail = {"checksums": ("without checksums", "with checksums"), "verify": ("not verified", "verified")}[key][flag]
    return {
        "what": what,
        "detail": detail + note,
        key: flag,
        "gb": nbytes / GB,
        "seconds": seconds,
        "gb_per_s": nbytes / GB / seconds,
    }


def overhead(rows: list[dict], what: str, key: str) -> dict:
    """Medians (and minima: the least disturbed runs) of the seconds without and with, and the added percent."""
    without = [r["seconds"] for r in rows if r["what"] == what and not r[key]]
    with_ = [r["seconds"] for r in rows if r["what"] == what and r[key]]
    median_without, median_with = statistics.median(without), statistics.median(with_)
    return {
        "seconds_without": median_without,
        "seconds_with": median_with,
        "percent": 100 * (median_with - median_without) / median_without,
        "min_seconds_without": min(without),
        "min_seconds_with": min(with_),
        "min_percent": 100 * (min(with_) - min(without)) / min(without),
    }


def save_and_resume_rows(args, run_dir: Path, rows: list[dict], flush) -> None:
    """Append the save and resume rows to ``rows``, calling ``flush()`` after each."""
    from hydrahead.distributed.setup import destroy_distributed, init_distributed
    from hydrahead.train.trainer import Trainer

    overrides = [*args.overrides, f"run.dir={run_dir}", "log.progress=false", "checkpoint.keep=1"]
    cfg = load_config(str(args.config), overrides)
    env = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    try:
        start = time.perf_counter()
        trainer = Trainer(cfg, env)
        print(f"trainer built in {time.perf_counter() - start:.1f} s", flush=True)
        root = run_dir / "checkpoints"
        need = head_bytes(trainer) * 1.05 + 1e9
        free = shutil.disk_usage(run_dir).free
        if free < need:
            raise SystemExit(
                f"checkpoint_hashing: {run_dir} has {free / GB:.1f} GB free, a checkpoint of this config needs about "
                f"{need / GB:.1f} GB: pass --run-dir on a larger disk, or a smaller head.num_classes=..."
            )
        for warmup in range(args.warmup_saves):
            shutil.rmtree(root, ignore_errors=True)
            seconds = timed(lambda: trainer.save(checksums=True))
            print(f"warm-up save {warmup + 1}/{args.warmup_saves} (not counted): {seconds:.2f} s", flush=True)
        path = None
        for repeat in range(args.repeats):
            # ABBA, so that neither side always goes first, ending with checksums: the resumes' checkpoint
            for checksums in (False, True) if (args.repeats - repeat) % 2 else (True, False):
                shutil.rmtree(root, ignore_errors=True)
                seconds = timed(lambda: trainer.save(checksums=checksums))
                path = root / "step-0"
                size = folder_bytes(path)
                rows.append(timing_row("save", "checksums", checksums, size, seconds))
                print(f"save {repeat + 1}/{args.repeats}, checksums={checksums}: {seconds:.2f} s", flush=True)
                flush()
        files = [file for file in path.iterdir() if file.is_file()]
        for repeat in range(args.resume_repeats):
            for verify in (False, True) if repeat % 2 == 0 else (True, False):
                if not args.warm:
                    evict(files)
                seconds = timed(lambda: trainer.resume(verify=verify))
                rows.append(timing_row("resume", "verify", verify, size, seconds, ", warm" if args.warm else ", cold"))
                print(f"resume {repeat + 1}/{args.resume_repeats}, verify={verify}: {seconds:.2f} s", flush=True)
                flush()
    finally:
        destroy_distributed()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/checkpoint_hashing.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config (default: quickstart)")
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="a folder on the disk to measure: the checkpoints and the test file go to a new folder in it, "
        "removed afterwards (default: $TMPDIR)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="saves and resumes of each kind (default: 1)")
    parser.add_argument("--resume-repeats", type=int, default=None, help="resumes of each kind (default: --repeats)")
    parser.add_argument(
        "--warmup-saves",
        type=int,
        default=1,
        help="untimed saves first: a disk's first writes to fresh blocks can be much slower (default: 1)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help=f"hashing threads for the parallel rows (default: what a save uses here, {default_threads()})",
    )
    parser.add_argument("--memory-gb", type=float, default=1.0, help="buffer hashed in memory (default: 1)")
    parser.add_argument("--file-gb", type=float, default=2.0, help="file hashed from disk (default: 2)")
    parser.add_argument("--warm", action="store_true", help="resume with the checkpoint in the page cache")
    parser.add_argument("--hash-only", action="store_true", help="only the hashing rows (no trainer)")
    parser.add_argument("--name", help="results name (default: from the config, plus _cpu without a GPU)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. head.num_classes=1000000"
    )
    args = parser.parse_args(argv)
    if args.resume_repeats is None:
        args.resume_repeats = args.repeats
    if min(args.repeats, args.resume_repeats, args.threads) < 1 or args.warmup_saves < 0:
        parser.error("--repeats, --resume-repeats and --threads must be at least 1, --warmup-saves at least 0")
    return args


def standard_fields(rows: list[dict], peak_mib: float | None) -> None:
    """Give each row the fields every results file carries (method, shape, ms, floor_ms, ratio,
    peak_mib). The floor of a hash is its bytes at the fastest rate hashing reached here (many
    threads, in memory); the floor of a save or resume with checksums is the median of the
    same without them, so ``ratio`` is what checksums cost (1.0 for the rows without)."""
    hashes = [r for r in rows if r["what"] == "hash"]
    best_rate = max((r["gb_per_s"] for r in hashes), default=None)
    for row in rows:
        if row["what"] == "hash":
            method = f"hydrahead xxh3-128 hash, {row['detail']}, {row['threads']} threads"
            floor = row["gb"] / best_rate
        else:
            key = "checksums" if row["what"] == "save" else "verify"
            method = f"hydrahead {row['what']}, {row['detail']}"
            without = [r["seconds"] for r in rows if r["what"] == row["what"] and not r[key]]
            floor = statistics.median(without) if without else None
        row.update(
            method=method,
            shape=f"{row['gb']:.2f} GB",
            ms=1000 * row["seconds"],
            floor_ms=None if floor is None else 1000 * floor,
            ratio=None if floor is None else row["seconds"] / floor,
        )
        row.setdefault("peak_mib", peak_mib)


def peak_host_mib() -> float:
    """This process's peak resident memory (what a save or resume holds on the host)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarise(rows: list[dict], threads: int) -> dict:
    """Save and resume overheads, from the rows there are so far."""
    summary = {}
    for what, key in (("save", "checksums"), ("resume", "verify")):
        if {r[key] for r in rows if r["what"] == what} == {False, True}:
            summary[what] = overhead(rows, what, key)
    if "save" in summary:
        # The hashing a save adds, at the in-memory rate on ``threads`` threads: what the save
        # would grow by if none of it overlapped the writing (it does overlap).
        checkpoint_gb = next(r["gb"] for r in rows if r["what"] == "save")
        rate = next(r["gb_per_s"] for r in rows if r["detail"] == "memory" and r["threads"] == threads)
        summary["save"]["hash_seconds_at_memory_rate"] = checkpoint_gb / rate
        summary["save"]["hash_percent_at_memory_rate"] = 100 * checkpoint_gb / rate / summary["save"]["seconds_without"]
    return summary


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*ShardedTensor", category=FutureWarning)  # see checkpoint.class_rows
    name = args.name or f"checkpoint_hashing_{args.config.stem}" + ("" if torch.cuda.is_available() else "_cpu")
    config = args.config.resolve()
    payload = {
        **environment(),
        "benchmark": "checkpoint_hashing",
        "what": "xxh3-128 hashing throughput (GB = 1e9 bytes), and checkpoint save/resume seconds without and with "
        "checksums (resume: page cache " + ("warm" if args.warm else "cold, evicted before each") + ")",
        "config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
        "overrides": args.overrides,
        "cpus": len(os.sched_getaffinity(0)),
        "threads": args.threads,
        "checkpoint_gb": None,
        "overhead": {},
        "rows": [],
    }
    rows = payload["rows"]

    def flush() -> Path:  # after every row: a run cut short still leaves what it measured
        payload["overhead"] = summarise(rows, args.threads)
        payload["checkpoint_gb"] = next((r["gb"] for r in rows if r["what"] == "save"), None)
        standard_fields(rows, peak_host_mib())
        return write_results(name, payload)

    if args.run_dir is not None:
        args.run_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="checkpoint_hashing_", dir=args.run_dir))
    try:
        rows += memory_rows(args.threads, args.memory_gb)
        rows += file_rows(run_dir, args.threads, args.file_gb)
        flush()
        if not args.hash_only:
            save_and_resume_rows(args, run_dir, rows, flush)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    path = flush()
    print(f"wrote {path}")
    for what, numbers in payload["overhead"].items():
        how, repeats = ("written", args.repeats) if what == "save" else ("loaded", args.resume_repeats)
        print(
            f"{what} of {payload['checkpoint_gb']:.2f} GB: {numbers['seconds_without']:.3f} s without checksums, "
            f"{numbers['seconds_with']:.3f} s with (hashed while {how}): "
            f"{numbers['percent']:+.1f}% (medians of {repeats}; minima {numbers['min_percent']:+.1f}%)"
            + (
                f"; hashing it all at the in-memory rate would add {numbers['hash_percent_at_memory_rate']:.1f}%"
                if what == "save"
                else ""
            )
        )
    print_table(rows, ["what", "detail", "threads", "gb", "seconds", "gb_per_s", "s_per_gb", "ratio"])


if __name__ == "__main__":
    main()

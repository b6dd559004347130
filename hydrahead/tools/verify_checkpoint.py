"""Check a run's checkpoints against the checksums recorded when they were saved.

    python -m hydrahead.tools.verify_checkpoint runs/r50
    python -m hydrahead.tools.verify_checkpoint runs/r50/checkpoints/step-9000

Every checkpoint folder holds manifest.json, written last by the save: the size and the
xxh3-128 checksums (one per 64 MiB piece) of each file. This tool reads every file of each
checkpoint and prints one line per checkpoint, oldest first:

  ok           every file matches its checksums
  damaged      a file differs from what was saved (which file, and which bytes), is of
               another size, or cannot be read
  incomplete   files are missing (which ones); a .step-N.partial folder is a save that
               did not finish, never loaded
  unverified   written before checkpoints carried checksums: the files the index names
               are there and large enough, but their contents cannot be checked

and then which checkpoint a resume would load (the newest that is ok or unverified).

Exit status: 0 when the newest checkpoint is ok; 1 when it is damaged, incomplete or
unverified, or there is no checkpoint; 2 for a path that is neither a run folder nor a
checkpoint folder. Training resumes, export_head and predict run the same checks before
they read a checkpoint.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from hydrahead.train.checkpoint import (
    INCOMPLETE,
    META_FILE,
    OK,
    CheckpointCheck,
    checkpoint_root,
    step_folders,
    verify_checkpoint,
)
from hydrahead.train.checksums import MANIFEST_FILE, default_threads

_PARTIAL = re.compile(r"^\.step-(\d+)\.partial$")


def _contents(folder: Path) -> str:
    files = [file for file in folder.iterdir() if file.is_file()]
    return f"{len(files)} files, {_human(sum(file.stat().st_size for file in files))}"


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError  # pragma: no cover


def check_run(path: str | Path, *, threads: int | None = None) -> list[tuple[str, Path, CheckpointCheck]]:
    """(kind, folder, check) of each checkpoint of a run folder, or of one checkpoint folder; kind is
    ``checkpoint`` or ``partial`` (an unfinished save). Raises FileNotFoundError for anything else."""
    path = Path(path)
    if (path / META_FILE).is_file() or (path / MANIFEST_FILE).is_file() or (path / ".metadata").is_file():
        return [("checkpoint", path, verify_checkpoint(path, threads=threads))]
    root = checkpoint_root(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{path} is neither a run folder (no {root.name}/) nor a checkpoint folder (no {META_FILE})"
        )
    found = [(step, "checkpoint", folder) for step, folder in step_folders(path)]
    found += [(int(m.group(1)), "partial", entry) for entry in root.iterdir() if (m := _PARTIAL.match(entry.name))]
    results = []
    for _, kind, folder in sorted(found, key=lambda item: (item[0], item[1] == "checkpoint")):
        if kind == "partial":
            check = CheckpointCheck(INCOMPLETE, ("a save that did not finish: never loaded",))
        else:
            check = verify_checkpoint(folder, threads=threads)
        results.append((kind, folder, check))
    return results


def report(results: list[tuple[str, Path, CheckpointCheck]]) -> tuple[str, int]:
    """The lines to print and the exit status (0 when the newest checkpoint is ok)."""
    checkpoints = [(folder, check) for kind, folder, check in results if kind == "checkpoint"]
    width = max((len(folder.name) for _, folder, _ in results), default=0)
    lines = []
    for _, folder, check in results:
        detail = f"{_contents(folder)}, checksums match" if check.status == OK else "; ".join(check.problems)
        lines.append(f"{folder.name:<{width}}  {check.status:<10}  {detail}")
    if not checkpoints:
        lines.append("no checkpoint found")
        return "\n".join(lines), 1
    loadable = [folder for folder, check in checkpoints if check.loadable]
    newest, newest_check = checkpoints[-1]
    if len(checkpoints) > 1 or not newest_check.loadable:
        lines.append(
            f"a resume would load {loadable[-1].name}" if loadable else "no checkpoint can be loaded: a resume refuses"
        )
    return "\n".join(lines), 0 if newest_check.status == OK else 1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hydrahead.tools.verify_checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "path", metavar="RUN_DIR", help="a run folder (all its checkpoints) or one checkpoint folder (step-N)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help=f"files and pieces hashed at once (default: the CPUs available, at most 8; here {default_threads()})",
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = check_run(args.path, threads=args.threads)
    except FileNotFoundError as exc:
        print(f"verify_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    text, status = report(results)
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoint checksums: the hashing and manifest functions, each check's verdict, the verify tool.

Multi-rank resumes from damaged checkpoints run through the launcher in test_reliability.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import xxhash
from torch.distributed.checkpoint.filesystem import FileSystem

from hydrahead.distributed.setup import DistEnv
from hydrahead.tools import verify_checkpoint as verify_tool
from hydrahead.train import checkpoint as checkpoint_module
from hydrahead.train import checksums
from hydrahead.train.checkpoint import (
    CHECKSUMS_KEY,
    DAMAGED,
    INCOMPLETE,
    OK,
    UNVERIFIED,
    CheckpointCheck,
    NoLoadableCheckpointError,
    check_share,
    combine_checks,
    load_verified,
    newest_loadable_checkpoint,
    save_checkpoint,
    step_folders,
    verify_checkpoint,
)
from hydrahead.train.checksums import (
    MANIFEST_FILE,
    file_problems,
    hash_files,
    make_manifest,
    piece_ranges,
    read_manifest,
)

ROOT = Path(__file__).resolve().parent.parent
ONE_PROCESS = DistEnv(0, 1, 0, torch.device("cpu"), "gloo", data_group=None, head_group=None)


def flip_byte(path, at=None, mask=0xFF):
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= mask
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------
# Hashing and the manifest
# ----------------------------------------------------------------------------------------


def test_piece_ranges_cover_the_file_once():
    assert piece_ranges(0, 10) == [(0, 0)]
    assert piece_ranges(1, 10) == [(0, 1)]
    assert piece_ranges(20, 10) == [(0, 10), (10, 20)]
    assert piece_ranges(21, 10) == [(0, 10), (10, 20), (20, 21)]
    with pytest.raises(ValueError, match="piece_bytes"):
        piece_ranges(5, 0)


@pytest.fixture
def small_reads(monkeypatch):
    """Reads of 7 bytes: the streaming loop runs many times per piece (a new thread-local buffer)."""
    monkeypatch.setattr(checksums, "READ_BYTES", 7)
    monkeypatch.setattr(checksums, "_buffers", type(checksums._buffers)())


def test_hash_files_digests_each_piece_in_a_stream_on_any_number_of_threads(tmp_path, small_reads):
    data = {"a.bin": bytes(range(256)) * 3 + b"x", "empty": b"", "b.bin": b"hello"}
    for name, content in data.items():
        (tmp_path / name).write_bytes(content)
    records = hash_files(tmp_path, list(data), rank=3, piece_bytes=100, threads=1)
    for name, content in data.items():
        expected = [xxhash.xxh3_128(content[a:b]).hexdigest() for a, b in piece_ranges(len(content), 100)]
        assert records[name] == {"bytes": len(content), "rank": 3, "pieces": expected}
    assert hash_files(tmp_path, list(data), rank=3, piece_bytes=100, threads=4) == records


@pytest.mark.parametrize("chunks", [[250], [1] * 250, [99, 1, 100, 50], [7, 193, 0, 50], [100, 100, 50]])
@pytest.mark.parametrize("threads", [None, 3])
def test_piece_hasher_fed_in_any_chunks_equals_hashing_the_file(tmp_path, chunks, threads):
    data = bytes(range(250))
    (tmp_path / "f").write_bytes(data)
    with ThreadPoolExecutor(threads) if threads else contextlib.nullcontext() as pool:
        hasher = checksums.PieceHasher(piece_bytes=100, pool=pool)
        start = 0
        for size in chunks:
            hasher.update(data[start : start + size])
            start += size
    assert hasher.size == 250
    assert hasher.digests() == hash_files(tmp_path, ["f"], piece_bytes=100)["f"]["pieces"]
    assert checksums.PieceHasher(piece_bytes=100).digests() == [xxhash.xxh3_128(b"").hexdigest()]


def test_a_hashing_stream_writes_through_and_gives_up_on_a_seek(tmp_path, monkeypatch):
    monkeypatch.setattr(checksums.HashingStream, "CONCURRENT_BYTES", 64)  # the helper thread hashes big writes
    with ThreadPoolExecutor(1) as helper, open(tmp_path / "f", "wb") as raw:
        stream = checksums.HashingStream(raw, checksums.PieceHasher(piece_bytes=100), helper)
        assert stream.write(b"x" * 30) == 30 and stream.write(memoryview(b"y" * 170)) == 170
        stream.writelines([b"z" * 5])
        assert stream.tell() == 205
    assert stream.hasher.digests() == hash_files(tmp_path, ["f"], piece_bytes=100)["f"]["pieces"]
    with ThreadPoolExecutor(1) as helper, open(tmp_path / "g", "wb") as raw:
        stream = checksums.HashingStream(raw, checksums.PieceHasher(), helper)
        stream.write(b"abc")
        stream.seek(0)
        stream.write(b"d")
    assert stream.hasher is None and (tmp_path / "g").read_bytes() == b"dbc"


def test_file_problems_name_the_file_and_the_piece(tmp_path, small_reads):
    for name in ("a.bin", "b.bin", "c.bin", "d.bin"):
        (tmp_path / name).write_bytes(bytes(range(250)))
    records = hash_files(tmp_path, ["a.bin", "b.bin", "c.bin", "d.bin"], piece_bytes=100)
    assert file_problems(tmp_path, records, piece_bytes=100, threads=2) == {}
    flip_byte(tmp_path / "a.bin", at=150)  # the second piece: bytes 100 to 200
    (tmp_path / "b.bin").write_bytes(bytes(range(249)))
    (tmp_path / "c.bin").unlink()
    (tmp_path / "d.bin").write_bytes(bytes(range(250)) + b"!")
    assert file_problems(tmp_path, records, piece_bytes=100, threads=2) == {
        "a.bin": "does not match its checksum (somewhere in bytes 100 to 200)",
        "b.bin": "has 249 bytes, the manifest says 250 (truncated)",
        "c.bin": "is missing",
        "d.bin": "has 251 bytes, the manifest says 250",
    }


def test_manifest_round_trip_and_its_own_checksum(tmp_path):
    (tmp_path / "x").write_bytes(b"abc")
    manifest = make_manifest(7, hash_files(tmp_path, ["x"]))
    path = tmp_path / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2))
    assert read_manifest(path) == manifest
    # any change to a digest, a size or the step is caught by the manifest's own checksum
    for key, value in (("step", 8), ("files", {"x": {**manifest["files"]["x"], "bytes": 4}})):
        path.write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(ValueError, match="does not match its own checksum"):
            read_manifest(path)
    path.write_text(json.dumps(manifest)[:-5])
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(path)
    outside = make_manifest(7, {"../x": manifest["files"]["x"]})
    path.write_text(json.dumps(outside))
    with pytest.raises(ValueError, match="outside its folder"):
        read_manifest(path)
    other = make_manifest(7, manifest["files"])
    other = {**other, "algorithm": "md5"}
    path.write_text(json.dumps({**other, "digest": checksums.manifest_digest(other)}))
    with pytest.raises(ValueError, match="md5"):
        read_manifest(path)


# ----------------------------------------------------------------------------------------
# Checks of a checkpoint folder
# ----------------------------------------------------------------------------------------


def _save(run_dir, step, *, checksums=True, keep=10):
    """A small checkpoint written by save_checkpoint in this process (a world of one)."""
    generator = torch.Generator().manual_seed(step)
    state = {
        "backbone": {"weight": torch.randn(64, 16, generator=generator)},
        "head": {"rows": torch.randn(200, 16, generator=generator)},
    }
    return save_checkpoint(ONE_PROCESS, run_dir, step, state, {"note": "test"}, keep=keep, checksums=checksums)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4, 6):
        _save(run, step)
    return run


def _data_file(folder):
    return next(folder.glob("*.distcp"))


def test_a_saved_checkpoint_verifies_and_its_manifest_is_written_last(run_dir):
    folder = run_dir / "checkpoints" / "step-6"
    manifest = read_manifest(folder / MANIFEST_FILE)
    assert manifest["step"] == 6
    assert sorted(manifest["files"]) == sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_FILE)
    assert json.loads((folder / "meta.json").read_text())[CHECKSUMS_KEY] == MANIFEST_FILE
    assert max(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns).name == MANIFEST_FILE
    assert verify_checkpoint(folder) == CheckpointCheck(OK)


def test_data_files_are_hashed_as_they_are_written_or_else_read_back(tmp_path, monkeypatch):
    read_back = []
    hash_files_of = checkpoint_module.hash_files

    def recording(folder, names, **kwargs):
        read_back.extend(names)
        return hash_files_of(folder, names, **kwargs)

    monkeypatch.setattr(checkpoint_module, "hash_files", recording)
    folder = _save(tmp_path / "run", 1)
    assert read_back == [".metadata", "meta.json"]  # the data file was hashed on its way to the disk
    assert verify_checkpoint(folder) == CheckpointCheck(OK)

    def plain(pool, helper):  # a file system that hashes nothing: the writer reads its files back
        file_system = FileSystem()
        file_system.streams = {}
        return file_system

    monkeypatch.setattr(checkpoint_module, "_HashingFileSystem", plain)
    read_back.clear()
    folder = _save(tmp_path / "run", 2)
    assert read_back == ["__0_0.distcp", ".metadata", "meta.json"]
    assert verify_checkpoint(folder) == CheckpointCheck(OK)


@pytest.mark.parametrize(
    "damage, status, message",
    [
        ("flip data", DAMAGED, r"__0_0\.distcp does not match its checksum"),
        ("flip index", DAMAGED, r"\.metadata does not match its checksum"),
        ("flip meta", DAMAGED, r"meta\.json (does not match its checksum|is unreadable)"),
        ("flip manifest", DAMAGED, r"manifest\.json does not match its own checksum"),
        ("truncate data", DAMAGED, r"__0_0\.distcp has [\d,]+ bytes, the manifest says [\d,]+ \(truncated\)"),
        ("delete data", INCOMPLETE, r"__0_0\.distcp is missing"),
        ("delete manifest", INCOMPLETE, r"manifest\.json is missing \(meta\.json says it was written\)"),
        ("manifest of step 4", DAMAGED, r"manifest\.json is of step 4, the folder of step 6"),
    ],
)
def test_each_damage_is_found_and_named(run_dir, damage, status, message):
    root = run_dir / "checkpoints"
    folder = root / "step-6"
    data = _data_file(folder)
    if damage == "flip data":
        flip_byte(data)
    elif damage == "flip index":
        flip_byte(folder / ".metadata")
    elif damage == "flip meta":
        flip_byte(folder / "meta.json")
    elif damage == "flip manifest":
        # one bit of a digest's hex digit: still valid JSON
        flip_byte(folder / MANIFEST_FILE, at=(folder / MANIFEST_FILE).read_text().index('"pieces"') + 24, mask=1)
    elif damage == "truncate data":
        data.write_bytes(data.read_bytes()[:-1])
    elif damage == "delete data":
        data.unlink()
    elif damage == "delete manifest":
        (folder / MANIFEST_FILE).unlink()
    elif damage == "manifest of step 4":
        shutil.copy(root / "step-4" / MANIFEST_FILE, folder / MANIFEST_FILE)
    check = verify_checkpoint(folder)
    assert check.status == status and not check.loadable
    assert any(re.search(message, problem) for problem in check.problems), check.problems
    if damage not in ("delete data", "truncate data", "flip index", "flip meta"):  # what only checksums see
        unchecked = verify_checkpoint(folder, contents=False)
        assert unchecked.loadable and unchecked.problems == ("checksums not checked (asked not to)",)
    skipped = []
    path, found = newest_loadable_checkpoint(run_dir, skipped=lambda f, c: skipped.append((f.name, c)))
    assert (path.name, found) == ("step-4", CheckpointCheck(OK))
    assert skipped == [("step-6", check)]
    # Loading while verifying: DCP reads a folder only once its index, meta.json and manifest
    # verified; damaged data is read, then step-4 loaded over it, with the same verdicts.
    loads, skipped = [], []
    path, found = newest_loadable_checkpoint(
        run_dir, skipped=lambda f, c: skipped.append((f.name, c)), load=lambda f: loads.append(_load(f).name)
    )
    assert (path.name, found) == ("step-4", CheckpointCheck(OK)) and skipped == [("step-6", check)]
    assert loads == (["step-6", "step-4"] if damage == "flip data" else ["step-4"])


def _load(folder):
    """DCP-load ``folder`` (saved by ``_save``) and check what was read against what ``_save`` wrote."""
    state = {"backbone": {"weight": torch.zeros(64, 16)}, "head": {"rows": torch.zeros(200, 16)}}
    checkpoint_module.load_checkpoint(ONE_PROCESS, folder, state)
    generator = torch.Generator().manual_seed(int(folder.name.split("-")[1]))
    intact = torch.equal(state["backbone"]["weight"], torch.randn(64, 16, generator=generator))
    assert intact or folder.name == "step-6", f"{folder} verified but did not load what was saved"
    return folder


def test_load_verified_hashes_while_loading_and_keeps_errors_of_good_checkpoints(run_dir, monkeypatch):
    folder = run_dir / "checkpoints" / "step-6"
    threads = []

    def load(path):  # the data files are hashed on another thread meanwhile
        threads.append(threading.current_thread().name)
        _load(path)

    assert load_verified(folder, load) == CheckpointCheck(OK) and threads == ["MainThread"]

    def failing(path):
        raise RuntimeError("read failed")

    with pytest.raises(RuntimeError, match="read failed"):  # an intact checkpoint that fails to load is an error
        load_verified(folder, failing)
    flip_byte(_data_file(folder))
    check = load_verified(folder, failing)  # ... a damaged one is just damaged
    assert check.status == DAMAGED and "__0_0.distcp does not match its checksum" in check.describe()
    hashed = []
    monkeypatch.setattr(
        checkpoint_module, "check_share", lambda *a, **k: hashed.append(k["files"]) or CheckpointCheck(OK)
    )
    assert load_verified(folder, lambda path: None) == CheckpointCheck(OK) and hashed == ["small", "data"]
    with pytest.raises(ValueError, match="files must be"):
        check_share(folder, files="some")


def test_each_rank_hashes_its_share_and_the_ranks_agree(tmp_path):
    folder = tmp_path / "step-3"
    folder.mkdir()
    for name in ("__0_0.distcp", "__1_0.distcp", "__2_0.distcp"):
        (folder / name).write_bytes(name.encode() * 100)
    (folder / ".metadata").write_bytes(b"index")
    (folder / "meta.json").write_text(json.dumps({"step": 3}))
    files = {}
    for rank in range(3):
        files.update(hash_files(folder, [f"__{rank}_0.distcp"], rank=rank))
    files.update(hash_files(folder, [".metadata", "meta.json"], rank=0))
    (folder / MANIFEST_FILE).write_text(json.dumps(make_manifest(3, files)))
    flip_byte(folder / "__1_0.distcp")
    flip_byte(folder / "__2_0.distcp")
    # at 2 ranks, rank 1 hashes what rank 1 wrote, rank 0 the rest (rank 2's file: 2 % 2 == 0)
    zero, one = check_share(folder, 0, 2), check_share(folder, 1, 2)
    assert zero.status == one.status == DAMAGED
    assert [p.split()[0] for p in zero.problems] == ["__2_0.distcp"]
    assert [p.split()[0] for p in one.problems] == ["__1_0.distcp"]
    both = combine_checks([zero, one])
    assert both.status == DAMAGED and [p.split()[0] for p in both.problems] == ["__2_0.distcp", "__1_0.distcp"]
    # the cheap checks are every rank's: a missing file is seen by all
    (folder / "__1_0.distcp").unlink()
    assert (
        check_share(folder, 0, 2)
        == check_share(folder, 1, 2)
        == CheckpointCheck(INCOMPLETE, ("__1_0.distcp is missing",))
    )


def test_combine_checks_takes_the_worst_with_every_problem_once():
    ok, old = CheckpointCheck(OK), CheckpointCheck(UNVERIFIED, ("no checksums",))
    bad_a, bad_b = CheckpointCheck(DAMAGED, ("a differs",)), CheckpointCheck(DAMAGED, ("b differs", "a differs"))
    assert combine_checks([ok, ok]) == ok
    assert combine_checks([old, old]) == old
    assert combine_checks([ok, bad_a, CheckpointCheck(INCOMPLETE, ("c is missing",)), bad_b]) == CheckpointCheck(
        DAMAGED, ("a differs", "b differs")
    )


def test_a_checkpoint_without_checksums_loads_unverified(tmp_path):
    run = tmp_path / "run"
    _save(run, 3)
    old = _save(run, 5, checksums=False)
    assert not (old / MANIFEST_FILE).exists() and CHECKSUMS_KEY not in json.loads((old / "meta.json").read_text())
    path, check = newest_loadable_checkpoint(run)
    assert path == old and check.status == UNVERIFIED and check.loadable
    assert "written without checksums" in check.describe()
    _data_file(old).unlink()  # what can still be checked is checked
    path, check = newest_loadable_checkpoint(run)
    assert path.name == "step-3" and check.status == OK


def test_no_loadable_checkpoint_is_an_error_and_no_checkpoint_is_none(run_dir, tmp_path):
    assert newest_loadable_checkpoint(tmp_path / "empty") is None
    for _, folder in step_folders(run_dir):
        flip_byte(_data_file(folder))
    with pytest.raises(NoLoadableCheckpointError, match=r"step-6 \(damaged: __0_0\.distcp"):
        newest_loadable_checkpoint(run_dir)


def test_a_save_never_prunes_for_a_newer_damaged_checkpoint(run_dir):
    """A resume that skipped a damaged step-6 saves step-5 next: with keep=2, step-5 and the
    loadable step-4 stay; the damaged step-6 stays too, until a save of step 6 replaces it."""
    flip_byte(_data_file(run_dir / "checkpoints" / "step-6"))
    _save(run_dir, 5, keep=2)
    assert [step for step, _ in step_folders(run_dir)] == [4, 5, 6]
    _save(run_dir, 6, keep=2)
    assert [step for step, _ in step_folders(run_dir)] == [5, 6]
    assert verify_checkpoint(run_dir / "checkpoints" / "step-6").status == OK


# ----------------------------------------------------------------------------------------
# The verify tool
# ----------------------------------------------------------------------------------------


def test_verify_tool_lists_each_checkpoint_and_exits_by_the_newest(run_dir, capsys):
    root = run_dir / "checkpoints"
    assert verify_tool.main([str(run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [["step-2", "ok"], ["step-4", "ok"], ["step-6", "ok"]]
    assert lines[-1] == "a resume would load step-6"

    flip_byte(_data_file(root / "step-6"))
    (root / "step-4" / "__0_0.distcp").unlink()
    shutil.copytree(root / "step-2", root / ".step-8.partial")
    assert verify_tool.main([str(run_dir), "--threads", "1"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["step-2", "ok"]
    assert lines[1].split()[:3] == ["step-4", "incomplete", "__0_0.distcp"]
    assert lines[2].split()[:3] == ["step-6", "damaged", "__0_0.distcp"]
    assert lines[3].split()[:2] == [".step-8.partial", "incomplete"]
    assert lines[-1] == "a resume would load step-2"

    # one checkpoint folder: its status alone
    assert verify_tool.main([str(root / "step-2")]) == 0
    assert capsys.readouterr().out.split()[:2] == ["step-2", "ok"]
    assert verify_tool.main([str(root / "step-6")]) == 1


def test_verify_tool_exit_codes_for_unverified_empty_and_wrong_paths(tmp_path, capsys):
    run = tmp_path / "run"
    _save(run, 1, checksums=False)
    assert verify_tool.main([str(run)]) == 1
    assert capsys.readouterr().out.split()[:2] == ["step-1", "unverified"]
    (run / "checkpoints" / "step-1").rename(run / "checkpoints" / ".step-1.partial")
    assert verify_tool.main([str(run)]) == 1
    assert "no checkpoint found" in capsys.readouterr().out
    assert verify_tool.main([str(tmp_path / "nowhere")]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        verify_tool.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(word in text for word in ("RUN_DIR", "ok", "damaged", "incomplete", "unverified", "Exit status"))


def test_the_hashing_benchmark_measures_each_side_and_writes_the_common_fields(tmp_path):
    """A small run of benchmarks/checkpoint_hashing.py (one process, gloo): every row carries
    the fields all results files have, and the overheads come from its own rows."""
    env = {**os.environ, "HYDRAHEAD_RESULTS_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "benchmarks" / "checkpoint_hashing.py"), "--memory-gb", "0.02"]
    command += ["--file-gb", "0.07", "--warmup-saves", "1", "--name", "small", f"--run-dir={tmp_path}"]
    subprocess.run([*command, "head.num_classes=2000", "train.global_batch=8"], check=True, env=env, timeout=300)
    payload = json.loads((tmp_path / "small.json").read_text())
    assert {"device", "torch", "triton", "date"} <= payload.keys()
    rows = payload["rows"]
    assert sorted({(r["what"], r["detail"]) for r in rows if r["what"] != "hash"}) == [
        ("resume", "not verified, cold"),
        ("resume", "verified, cold"),
        ("save", "with checksums"),
        ("save", "without checksums"),
    ]
    for row in rows:
        assert row["method"].startswith("hydrahead ") and row["ms"] == pytest.approx(1000 * row["seconds"])
        assert row["ratio"] == pytest.approx(row["ms"] / row["floor_ms"]) and row["peak_mib"] > 0
        if row["what"] != "hash" and not row.get("checksums", row.get("verify")):
            assert row["ratio"] == 1.0  # one run of each: the row without is its own floor
    save = payload["overhead"]["save"]
    with_, without = (next(r["seconds"] for r in rows if r.get("checksums") is flag) for flag in (True, False))
    assert save["percent"] == pytest.approx(100 * (with_ - without) / without)
    assert not any(tmp_path.glob("checkpoint_hashing_*")), "the benchmark leaves its checkpoints behind"

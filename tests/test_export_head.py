"""Exporting the sharded head, and loading checkpoints without running code from them."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType

from hydrahead.distributed.sharding import shard_sizes
from hydrahead.tools import export_head as export_module
from hydrahead.tools.export_head import export_head, iter_head_rows
from hydrahead.train.checkpoint import latest_checkpoint
from hydrahead.train.safe_dcp import SafeFileSystemReader, SafeLoadPlanner

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES, EMBED_DIM = 101, 32
TINY = [
    "train.steps=4",
    "train.global_batch=48",
    "train.eval_every=0",
    "model.embed_dim=32",
    "model.hidden_dim=64",
    "model.input_dim=16",
    "data.feature_dim=16",
    "head.num_classes=101",
    "checkpoint.every=2",
    "checkpoint.keep=2",
    "log.progress=false",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """Run folders written by the real launcher with 2 and 3 ranks (checkpoints at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("export_runs")
    procs = {}
    for nproc in (2, 3):  # at once: torchrun --standalone picks its own free port
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            str(REPO / "launch" / "train.py"),
            f"run.dir={root / f'ranks{nproc}'}",
            *TINY,
        ]
        procs[nproc] = subprocess.Popen(
            cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    for nproc, proc in procs.items():
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{nproc}-rank run failed:\n{output[-4000:]}"
    return {nproc: root / f"ranks{nproc}" for nproc in procs}


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step}"


def full_load(checkpoint: Path, fqn: str) -> torch.Tensor:
    """The whole tensor through stock DCP, resharded to one full-size plain tensor."""
    state = {fqn: torch.full((NUM_CLASSES, EMBED_DIM), float("nan"))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(checkpoint)), no_dist=True)
    return state[fqn]


def saved_shards(checkpoint: Path, fqn: str) -> list[tuple[int, torch.Tensor]]:
    """(first row, rows) of each rank's saved shard, read straight from the .distcp files, in row order."""
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata()
    shards = []
    for chunk in metadata.state_dict_metadata[fqn].chunks:
        info = metadata.storage_data[MetadataIndex(fqn, chunk.offsets)]
        with open(checkpoint / info.relative_path, "rb") as file:
            file.seek(info.offset)
            rows = torch.load(io.BytesIO(file.read(info.length)), weights_only=True)
        shards.append((chunk.offsets[0], rows))
    return sorted(shards, key=lambda shard: shard[0])


def _plant_marker(path: str) -> None:
    """What a malicious pickle would run; the marker file shows that it ran."""
    Path(path).write_text("code from the checkpoint ran")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _plant_marker, (str(self.marker),)


# ---------------------------------------------------------------------------------------
# safe_dcp
# ---------------------------------------------------------------------------------------


def test_safe_reader_reads_a_real_index_like_the_stock_one(runs):
    ckpt = step_dir(runs[3], 4)
    safe = SafeFileSystemReader(ckpt)
    ours, stock = safe.read_metadata(), dcp.FileSystemReader(str(ckpt)).read_metadata()
    assert ours.state_dict_metadata == stock.state_dict_metadata
    assert ours.storage_data == stock.storage_data and ours.planner_data == stock.planner_data
    assert ours.storage_meta.load_id == safe.load_id  # tagged like the parent tags it
    assert ours.state_dict_metadata["head.weight"].properties.dtype == torch.float32


@pytest.mark.parametrize(
    "module, name",
    [
        ("builtins", "eval"),
        ("builtins", "getattr"),
        ("os", "system"),
        ("posix", "system"),
        ("subprocess", "Popen"),
        ("torch", "load"),
        ("torch.serialization", "load"),
        ("torch.distributed.checkpoint.filesystem", "FileSystemWriter"),
        ("pathlib", "Path.write_text"),
    ],
)
def test_safe_reader_refuses_globals_an_index_never_needs(tmp_path, module, name):
    (tmp_path / ".metadata").write_bytes(f"c{module}\n{name}\n.".encode())  # a pickle of just that global
    with pytest.raises(pickle.UnpicklingError, match=f"{module}.{name}"):
        SafeFileSystemReader(tmp_path).read_metadata()


def test_safe_reader_refuses_a_pickle_that_is_no_index(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"not": "an index"}))
    with pytest.raises(pickle.UnpicklingError, match="not a DCP index"):
        SafeFileSystemReader(tmp_path).read_metadata()


def test_safe_reader_refuses_data_files_outside_the_folder(runs, tmp_path):
    ckpt = tmp_path / "step-4"
    shutil.copytree(step_dir(runs[2], 4), ckpt)
    metadata = dcp.FileSystemReader(str(ckpt)).read_metadata()
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../secret"
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ValueError, match="outside its folder"):
        SafeFileSystemReader(ckpt).read_metadata()


def _without_checksums(checkpoint: Path) -> None:
    """Make ``checkpoint`` look as written before checkpoints carried checksums."""
    (checkpoint / "manifest.json").unlink()
    meta = json.loads((checkpoint / "meta.json").read_text())
    del meta["checksums"]
    (checkpoint / "meta.json").write_text(json.dumps(meta))


@pytest.fixture()
def malicious_checkpoint(runs, tmp_path):
    """A copy of a real checkpoint whose index hides a payload among genuine entries."""
    ckpt = tmp_path / "step-4"
    shutil.copytree(step_dir(runs[2], 4), ckpt)
    marker = tmp_path / "marker"
    metadata = dcp.FileSystemReader(str(ckpt)).read_metadata()
    metadata.planner_data["extra"] = _Payload(marker)
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    return ckpt, marker


def test_a_malicious_index_runs_nothing(malicious_checkpoint):
    ckpt, marker = malicious_checkpoint
    with pytest.raises(pickle.UnpicklingError, match="_plant_marker"):
        SafeFileSystemReader(ckpt).read_metadata()
    with pytest.raises(CheckpointException, match="_plant_marker"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP reports the refusal as "metadata is None" with the reason
        dcp.load(
            {"head.weight": torch.empty(NUM_CLASSES, EMBED_DIM)},
            storage_reader=SafeFileSystemReader(ckpt),
            planner=SafeLoadPlanner(),
            no_dist=True,
        )
    # export checks the files against the manifest first: the changed index is not even parsed
    with pytest.raises(ValueError, match=r"\.metadata has [\d,]+ bytes, the manifest says"):
        export_head(ckpt, ckpt.parent / "head.npy", progress=False)
    _without_checksums(ckpt)  # as a checkpoint from before checksums: parsed, safely
    with pytest.raises(ValueError, match=r"\.metadata is unreadable \(ForbiddenGlobalError: .*_plant_marker"):
        export_head(ckpt, ckpt.parent / "head.npy", progress=False)
    assert not marker.exists()
    dcp.FileSystemReader(str(ckpt)).read_metadata()  # the payload is live: the stock reader runs it
    assert marker.exists()


def test_safe_planner_refuses_code_in_non_tensor_items(tmp_path):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "marker"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            {"w": torch.ones(3), "extra": _Payload(marker)},
            storage_writer=dcp.FileSystemWriter(str(ckpt)),
            no_dist=True,
        )
        with pytest.raises(CheckpointException) as refused:
            dcp.load(
                {"w": torch.zeros(3), "extra": None},
                storage_reader=SafeFileSystemReader(ckpt),
                planner=SafeLoadPlanner(),
                no_dist=True,
            )
        ((error, _),) = refused.value.failures.values()
        assert isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error)
        assert not marker.exists()
        dcp.load({"w": torch.zeros(3), "extra": None}, storage_reader=dcp.FileSystemReader(str(ckpt)), no_dist=True)
        assert marker.exists()  # the payload is live: the stock planner runs it

    payload = io.BytesIO()
    torch.save(_Payload(marker), payload)
    payload.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        SafeLoadPlanner().load_bytes(None, payload)


def test_safe_reader_and_planner_load_a_checkpoint_like_the_stock_ones(runs):
    ckpt = step_dir(runs[3], 4)
    index = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata

    def empty_state():  # every saved entry, head.weight as one full-size plain tensor
        return {
            fqn: torch.zeros(md.size, dtype=md.properties.dtype) if isinstance(md, TensorStorageMetadata) else None
            for fqn, md in index.items()
        }

    stock, safe = empty_state(), empty_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(stock, storage_reader=dcp.FileSystemReader(str(ckpt)), no_dist=True)
        dcp.load(safe, storage_reader=SafeFileSystemReader(ckpt), planner=SafeLoadPlanner(), no_dist=True)
    assert stock.keys() == safe.keys()
    for fqn, value in stock.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(safe[fqn], value), fqn
        else:
            assert safe[fqn] == value, fqn
    assert safe["backbone_optim.param_groups.0.lr"] > 0  # a non-tensor item went through load_bytes
    assert safe["head.weight"].abs().sum() > 0


def test_row_ranges_are_read_in_place_and_match_whole_chunk_reads(runs, monkeypatch):
    ckpt = step_dir(runs[3], 4)
    passed_on = []  # the items of every plan handed to DCP's own read_data
    parent_read_data = dcp.FileSystemReader.read_data

    def spy(self, plan, planner):
        passed_on.append([item.type for item in plan.items])
        return parent_read_data(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemReader, "read_data", spy)
    in_place = torch.cat([block for _, block in iter_head_rows(ckpt, block_rows=7)])
    assert passed_on == [[]] * 15  # every block read, none of it through whole-chunk loads

    passed_on.clear()
    monkeypatch.setattr(SafeFileSystemReader, "_layout", lambda self, index: None)  # force DCP's own reads
    whole_chunks = torch.cat([block for _, block in iter_head_rows(ckpt, block_rows=7)])
    assert len(passed_on) == 15 and all(types and set(types) == {LoadItemType.TENSOR} for types in passed_on)
    assert torch.equal(in_place, whole_chunks) and torch.equal(in_place, full_load(ckpt, "head.weight"))


# ---------------------------------------------------------------------------------------
# export_head
# ---------------------------------------------------------------------------------------


def read_export(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path))
    tensors = load_file(path)
    assert len(tensors) == 1
    return next(iter(tensors.values()))


@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_export_is_every_shard_in_class_order(runs, tmp_path, nproc, suffix):
    ckpt = step_dir(runs[nproc], 4)
    shards = saved_shards(ckpt, "head.weight")
    assert [len(rows) for _, rows in shards] == shard_sizes(NUM_CLASSES, nproc)  # really one shard per rank
    out = export_head(ckpt, tmp_path / f"head{suffix}", block_rows=7, progress=False)  # 7 does not divide 101
    exported = read_export(out)
    assert exported.shape == (NUM_CLASSES, EMBED_DIM) and exported.dtype == torch.float32
    assert torch.equal(exported, full_load(ckpt, "head.weight"))
    for start, rows in shards:
        assert torch.equal(exported[start : start + len(rows)], rows)
    assert not out.with_name(out.name + ".partial").exists()


def test_safetensors_layout_and_metadata(runs, tmp_path):
    out = export_head(step_dir(runs[2], 4), tmp_path / "head.safetensors", progress=False)
    metadata = {"num_classes": "101", "embed_dim": "32", "step": "4", "tensor": "head.weight"}
    with safe_open(out, "pt") as file:
        assert list(file.keys()) == ["head.weight"] and file.metadata() == metadata
    raw = out.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    nbytes = NUM_CLASSES * EMBED_DIM * 4
    assert header_len % 8 == 0 and len(raw) == 8 + header_len + nbytes  # header padded to 8 bytes, then the data
    assert json.loads(raw[8 : 8 + header_len]) == {
        "head.weight": {"dtype": "F32", "shape": [NUM_CLASSES, EMBED_DIM], "data_offsets": [0, nbytes]},
        "__metadata__": metadata,
    }


def test_iter_head_rows_yields_blocks_in_class_order(runs):
    ckpt = step_dir(runs[3], 4)
    blocks = list(iter_head_rows(ckpt, block_rows=7))
    assert [start for start, _ in blocks] == list(range(0, NUM_CLASSES, 7))
    assert [len(block) for _, block in blocks] == [7] * 14 + [3]
    assert torch.equal(torch.cat([block for _, block in blocks]), full_load(ckpt, "head.weight"))


def test_momentum_export(runs, tmp_path):
    ckpt = step_dir(runs[3], 4)
    out = export_head(ckpt, tmp_path / "momentum.safetensors", tensor="momentum", block_rows=7, progress=False)
    momentum = load_file(out)["head.momentum"]
    assert torch.equal(momentum, full_load(ckpt, "head.momentum"))
    assert momentum.abs().sum() > 0 and not torch.equal(momentum, full_load(ckpt, "head.weight"))


@pytest.fixture(scope="module")
def owing_runs(tmp_path_factory) -> dict[str, Path]:
    """Two 2-rank runs over random active rows whose inactive rows owe momentum and decay
    steps: ``settled`` evaluates at step 4 (which pays every debt) before its save there,
    ``owing`` saves its rows as they are, beside what they owe."""
    root = tmp_path_factory.mktemp("owing_runs")
    selection = ["head.selection=random", "head.budget=0.3", "head.weight_decay=0.01", "train.eval_samples=48"]
    evals = {"settled": "train.eval_every=4", "owing": "train.eval_every=0"}
    procs = {}
    for name, eval_every in evals.items():
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(REPO / "launch" / "train.py"),
            f"run.dir={root / name}",
            *TINY,
            *selection,
            eval_every,
        ]
        procs[name] = subprocess.Popen(
            cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name} run failed:\n{output[-4000:]}"
    return {name: step_dir(root / name, 4) for name in procs}


@pytest.mark.parametrize("tensor", ["weight", "momentum"])
def test_export_pays_the_steps_inactive_rows_owe(owing_runs, tmp_path, tensor):
    """A save pays no deferred steps; the export pays them: it equals the export of the same
    run settled by an evaluation before its save, bit for bit."""
    settled, owing = owing_runs["settled"], owing_runs["owing"]
    fqn = f"head.{tensor}"
    assert not torch.equal(full_load(owing, fqn), full_load(settled, fqn))  # the stored rows still owe steps
    exported = {
        name: read_export(
            export_head(path, tmp_path / f"{name}.safetensors", tensor=tensor, block_rows=7, progress=False)
        )
        for name, path in owing_runs.items()
    }
    assert torch.equal(exported["owing"], exported["settled"])
    assert torch.equal(exported["settled"], full_load(settled, fqn))  # nothing left to pay there
    assert torch.equal(torch.cat([rows for _, rows in iter_head_rows(owing, tensor, block_rows=13)]), exported["owing"])


def test_a_run_folder_exports_its_newest_checkpoint(runs, tmp_path):
    run = runs[2]
    assert latest_checkpoint(run) == step_dir(run, 4)
    out = export_head(run, tmp_path / "head.safetensors", block_rows=7, progress=False)
    with safe_open(out, "pt") as file:
        assert file.metadata()["step"] == "4"
    assert torch.equal(read_export(out), full_load(step_dir(run, 4), "head.weight"))
    assert not torch.equal(read_export(out), full_load(step_dir(run, 2), "head.weight"))  # training moved the head


def test_a_malicious_index_in_a_run_folder_runs_nothing(runs, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(runs[2] / "checkpoints", run / "checkpoints")
    bad = step_dir(run, 9)
    shutil.copytree(step_dir(run, 4), bad)
    (bad / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _without_checksums(bad)  # else its manifest would reject it unread; so the index is parsed, safely
    with pytest.warns(UserWarning, match="step-9.*_plant_marker"):
        out = export_head(run, tmp_path / "head.npy", progress=False)  # the newest safe one: step 4
    assert torch.equal(read_export(out), full_load(step_dir(run, 4), "head.weight"))
    assert not marker.exists()
    with contextlib.suppress(Exception):  # the payload unpickles to None, which the stock reader trips on
        dcp.FileSystemReader(str(bad)).read_metadata()  # ... after running it: the payload is live
    assert marker.exists()


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_export_verifies_the_checkpoint_before_reading_it(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs[2], run)
    data = step_dir(run, 4) / "__1_0.distcp"
    _flip_byte(data, data.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"step-4 is damaged: __1_0\.distcp does not match its checksum"):
        export_head(step_dir(run, 4), tmp_path / "folder.npy", progress=False)
    assert not (tmp_path / "folder.npy").exists()
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-4: damaged: __1_0\.distcp does not match"):
        out = export_head(run, tmp_path / "run.safetensors", progress=False)  # the newest that verifies
    with safe_open(out, "pt") as file:
        assert file.metadata()["step"] == "2"
    assert torch.equal(read_export(out), full_load(step_dir(runs[2], 2), "head.weight"))
    assert export_module.main([str(step_dir(run, 4)), str(tmp_path / "cli.npy")]) == 1
    assert "export_head: error: checkpoint" in capsys.readouterr().err

    # --no-verify reads without checking: a manifest with a wrong checksum no longer stops it
    shutil.copy(runs[2] / "checkpoints" / "step-4" / "__1_0.distcp", data)
    manifest = step_dir(run, 4) / "manifest.json"
    _flip_byte(manifest, manifest.read_text().index('"pieces": [') + 24)
    with pytest.raises(ValueError, match=r"manifest\.json does not match its own checksum"):
        export_head(step_dir(run, 4), tmp_path / "checked.npy", progress=False)
    assert export_module.main([str(run), str(tmp_path / "unchecked.npy"), "--no-verify"]) == 0
    assert torch.equal(
        torch.from_numpy(np.load(tmp_path / "unchecked.npy")), full_load(step_dir(run, 4), "head.weight")
    )


def test_dtype_conversion(runs, tmp_path):
    ckpt = step_dir(runs[2], 4)
    weight = full_load(ckpt, "head.weight")
    bf16 = load_file(export_head(ckpt, tmp_path / "h.safetensors", dtype="bfloat16", block_rows=7, progress=False))[
        "head.weight"
    ]
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, weight.to(torch.bfloat16))
    with pytest.warns(UserWarning, match="numpy has no bfloat16"):
        out = export_head(ckpt, tmp_path / "bf16.npy", dtype=torch.bfloat16, block_rows=7, progress=False)
    as_float32 = np.load(out)
    assert as_float32.dtype == np.float32 and torch.equal(
        torch.from_numpy(as_float32), weight.to(torch.bfloat16).float()
    )
    half = np.load(export_head(ckpt, tmp_path / "f16.npy", dtype="float16", block_rows=7, progress=False))
    assert half.dtype == np.float16 and torch.equal(torch.from_numpy(half), weight.half())


def test_existing_output_needs_force(runs, tmp_path):
    ckpt, out = step_dir(runs[2], 4), tmp_path / "head.npy"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--force"):
        export_head(ckpt, out, progress=False)
    assert out.read_bytes() == b"keep me"
    export_head(ckpt, out, force=True, progress=False)
    assert torch.equal(read_export(out), full_load(ckpt, "head.weight"))


def test_bad_arguments_are_errors(runs, tmp_path):
    ckpt = step_dir(runs[2], 4)
    with pytest.raises(ValueError, match=r"\.safetensors or \.npy"):
        export_head(ckpt, tmp_path / "head.pt", progress=False)
    with pytest.raises(ValueError, match="tensor must be one of"):
        export_head(ckpt, tmp_path / "head.npy", tensor="bias", progress=False)
    with pytest.raises(ValueError, match="block_rows"):
        export_head(ckpt, tmp_path / "head.npy", block_rows=0, progress=False)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        export_head(tmp_path, tmp_path / "head.npy", progress=False)
    assert not list(tmp_path.iterdir())


def test_a_failed_export_leaves_no_output(runs, tmp_path, monkeypatch):
    ckpt, out = step_dir(runs[2], 4), tmp_path / "head.safetensors"
    out.write_bytes(b"previous export")
    calls = []
    real_load = export_module._load

    def failing_load(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk went away")
        real_load(*args)

    monkeypatch.setattr(export_module, "_load", failing_load)
    with pytest.raises(OSError, match="disk went away"):
        export_head(ckpt, out, block_rows=7, force=True, progress=False)
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.safetensors"]  # no .partial left behind


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hydrahead.tools.export_head", *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli(runs, tmp_path, capsys):
    ckpt, out = step_dir(runs[3], 4), tmp_path / "head.npy"
    proc = run_cli(str(ckpt), str(out), "--block-rows", "7")
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(read_export(out), full_load(ckpt, "head.weight"))

    # The same main() that `python -m` ran above, called here: no second start of the tool.
    assert export_module.main([str(ckpt), str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert export_module.main([str(ckpt), str(tmp_path / "head.pt")]) == 1
    assert ".safetensors or .npy" in capsys.readouterr().err

    with pytest.raises(SystemExit) as helped:
        export_module.main(["--help"])
    assert helped.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())
    for text in ("--tensor", "momentum", "--dtype", "--block-rows", "--force", "run folder", "numpy has no bfloat16"):
        assert text in usage, text

"""benchmarks/kernel_resources.py: the P kernel and the sliced weight kernel compiled for
Hopper on this machine, their registers, spills and shared memory read from the cubin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "benchmarks" / "kernel_resources.py"
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _tool_env() -> dict[str, str]:
    """The tool compiles for real: no interpreter, the repository importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _run(*args):
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, env=_tool_env(), timeout=600
    )


# Each command line given to the tool's main() in one process (Gluon, which it compiles,
# cannot be imported under the interpreter this suite runs in), one import for them all:
# what each one exited with, its message and what it wrote to stderr.
_REFUSALS = """
import contextlib, io, json, sys
from benchmarks import kernel_resources
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            kernel_resources.main(argv)
        out.append(None)
    except SystemExit as exit:
        out.append(f"{exit.code} {err.getvalue()}")
print(json.dumps(out))
"""


def _refusals(*argvs: list[str]) -> list[str]:
    """For each command line, which the tool must refuse: its exit message and stderr."""
    done = subprocess.run(
        [sys.executable, "-c", _REFUSALS, json.dumps(argvs)],
        capture_output=True,
        text=True,
        env=_tool_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    messages = json.loads(done.stdout.splitlines()[-1])
    ran = [argv for argv, message in zip(argvs, messages) if message is None]
    assert not ran, f"not refused: {ran}"
    return messages


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="this Triton ships no NVIDIA tools")
def test_a_deeper_pipeline_takes_more_shared_memory_and_the_counts_are_a_gpus(tmp_path):
    out = tmp_path / "resources.json"
    done = _run("--kernels", "probs", "--dtypes", "bf16", "--tiles", "64,64,64,4,2;64,64,64,4,3", "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    two, three = json.loads(out.read_text())["rows"]
    assert (two["tiles"], three["tiles"]) == ("64,64,64,4,2", "64,64,64,4,3")
    # one more 64 x 64 bf16 slice of F and of W per stage: 16 KiB
    assert three["shared_kib"] - two["shared_kib"] == pytest.approx(16, abs=1)
    for row in (two, three):
        assert 16 <= row["regs"] <= 255 and row["spill_bytes"] >= 0
        assert 1 <= row["per_sm"] <= 16
    assert "spill_bytes" in done.stdout and "64,64,64,4,3" in done.stdout


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="this Triton ships no NVIDIA tools")
def test_a_stage_of_the_sliced_weight_kernel_holds_a_slice_of_the_whole_batch(tmp_path):
    out = tmp_path / "resources.json"
    done = _run("--kernels", "sliced", "--dtypes", "bf16", "--tiles", "64,64,4,2;64,64,4,3", "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    two, three = json.loads(out.read_text())["rows"]
    # 64-wide bf16 slices of all 256 rows of F and of 64 weight rows: 40 KiB a stage
    assert three["shared_kib"] - two["shared_kib"] == pytest.approx(40, abs=1)
    assert all(16 <= row["regs"] <= 255 for row in (two, three))


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="this Triton ships no NVIDIA tools")
def test_the_sliced_kernel_compiles_for_a_batch_of_a_few_rows_with_fp8_operands(tmp_path):
    """dW's product sums over the batch, and wgmma takes fp8 operands 32 deep at least: a batch
    of 8 once gave the kernel a 16-row block that only the GPU's compile refused."""
    out = tmp_path / "resources.json"
    done = _run(
        "--kernels", "sliced", "--dtypes", "fp8,bf16", "--batch", "8", "--tiles", "64,64,4,2", "--json", str(out)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert [row["dtype"] for row in json.loads(out.read_text())["rows"]] == ["fp8", "bf16"]


def test_bad_tiles_and_names_are_refused_before_anything_compiles():
    tiles, sliced, batch, name = _refusals(
        ["--tiles", "64,64,4,2"],
        ["--kernels", "sliced", "--tiles", "64,64,64,4,2"],
        ["--kernels", "sliced", "--batch", "257"],
        ["--kernels", "flag"],
    )
    assert "BLOCK_G,BLOCK_C,BLOCK_K,num_warps,num_stages" in tiles
    assert "BLOCK_C,BLOCK_K,num_warps,num_stages" in sliced
    assert "1 to 256 rows" in batch
    assert "not one of probs, lse" in name


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="this Triton ships no NVIDIA tools")
def test_the_fused_dw_kernels_warpgroups_get_the_registers_the_host_reckons(tmp_path):
    """dw_update's warpgroups set their own register counts from the launch's pool: the row
    gives each one's count and whether the cubin sets them, on the same tiles for a batch of
    one K block (one dF partition) and one of three (no dF)."""
    out = tmp_path / "resources.json"
    done = _run("--kernels", "dw_update", "--rows", "128,384", "--dw-tiles", "64,64,128,6,4,384", "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    one, held = json.loads(out.read_text())["rows"]
    assert (one["rows"], one["tiles"], held["rows"]) == (128, "64,64,128,6,4,384", 384)
    # 16 warps: 128 registers a thread at launch; the consumers, loaders and dF's partition
    first, second, loaders, features = map(int, one["warpgroups"].split("/"))
    assert one["regs"] == 128 and 4 * 128 == first + second + loaders + features
    assert abs(first - second) <= 8 and one["cubin_agrees"] and one["spill_bytes"] == 0
    # three 128-row slices of F held, more than one K block: dF is left to the product, no partition
    assert held["tiles"] == "64,64,128,6,4,384" and held["warpgroups"].count("/") == 2 and held["cubin_agrees"]
    assert "cubin_agrees" in done.stdout


def test_the_fused_dw_kernels_batches_and_tiles_are_refused_before_anything_compiles():
    rows, tiles = _refusals(
        ["--kernels", "dw_update", "--rows", "32"], ["--kernels", "dw_update", "--dw-tiles", "64,64,64,1,4"]
    )
    assert "64 to 4096 rows" in rows
    assert "STAGES 2 or more" in tiles

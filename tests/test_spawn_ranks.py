"""The tests' launcher of several ranks: torchrun's variables, failures and signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SPAWN = str(Path(__file__).resolve().parent / "spawn_ranks.py")

RANK_SCRIPT = """
import json, os, signal, sys, time
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
out = sys.argv[1]
rank = int(os.environ["RANK"])
def on_term(signum, frame):
    open(f"{out}.term{rank}", "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
with open(f"{out}.{rank}", "w") as f:
    json.dump({k: os.environ[k] for k in keys}, f)
mode = sys.argv[2]
if mode == "fail" and rank == 1:
    sys.exit(3)
if mode != "ok":
    time.sleep(60)
"""


PRELOADS = ["", "--preload=json,signal"]  # each rank a new interpreter, or forked from the launcher


def spawn(tmp_path, nproc, mode, preload=""):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    return subprocess.Popen(
        [
            sys.executable,
            SPAWN,
            f"--nproc={nproc}",
            *([preload] if preload else []),
            str(script),
            str(tmp_path / "out"),
            mode,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("preload", PRELOADS)
def test_every_rank_gets_torchruns_variables_and_a_port_of_its_launch(tmp_path, preload):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = spawn(tmp_path / "a", 3, "ok", preload), spawn(tmp_path / "b", 2, "ok", preload)  # at once
    assert first.wait(timeout=30) == 0 and second.wait(timeout=30) == 0
    a = [json.loads((tmp_path / "a" / f"out.{r}").read_text()) for r in range(3)]
    b = [json.loads((tmp_path / "b" / f"out.{r}").read_text()) for r in range(2)]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in a] == [
        (str(r), str(r), "3", "3") for r in range(3)
    ]
    assert len({e["MASTER_PORT"] for e in a}) == 1 and len({e["MASTER_PORT"] for e in b}) == 1
    assert a[0]["MASTER_PORT"] != b[0]["MASTER_PORT"]


@pytest.mark.parametrize("preload", PRELOADS)
def test_a_failed_rank_stops_the_others_and_the_launch_fails(tmp_path, preload):
    proc = spawn(tmp_path, 2, "fail", preload)
    begun = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "exit codes of ranks 0-1: [" in stderr
    assert time.monotonic() - begun < 20  # rank 0 would sleep 60 s
    rank0, rank1 = json.loads(stderr.split("exit codes of ranks 0-1: ")[1].splitlines()[0])
    # Rank 0 got SIGTERM: its handler exits 0, or (still starting, on a loaded machine) the
    # signal's default action ends it.
    assert rank1 == 3 and rank0 in (0, -signal.SIGTERM)
    assert rank0 != 0 or (tmp_path / "out.term0").is_file()


@pytest.mark.parametrize("preload", PRELOADS)
def test_sigterm_reaches_every_rank(tmp_path, preload):
    proc = spawn(tmp_path, 2, "wait", preload)
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"out.{r}").is_file() for r in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert all((tmp_path / f"out.term{r}").is_file() for r in range(2))

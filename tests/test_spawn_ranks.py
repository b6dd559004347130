"""The tests' launcher of several ranks: torchrun's variables, failures and signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SPAWN = str(Path(__file__).resolve().parent / "spawn_ranks.py")

RANK_SCRIPT = """
import json, os, signal, sys, time
def parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])
launcher = os.getppid()
with open(f"{sys.argv[1]}.pids{os.environ['RANK']}", "w") as f:  # this rank, its launcher, and the zygote's
    json.dump([os.getpid(), launcher, parent(parent(launcher))], f)
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


# Each rank a new interpreter; forked from the launcher; or the launcher forked from a zygote.
PRELOADS = ["", "--preload=json,signal", "zygote"]
ZYGOTE_ENV = {"HYDRAHEAD_ZYGOTE": "1", "HYDRAHEAD_ZYGOTE_IDLE_S": "20"}  # these tests' zygotes go soon


def spawn(tmp_path, nproc, mode, preload="", path=None, out=None):
    """The ranks write their files as ``out`` (by default under ``tmp_path``) + a suffix."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = dict(os.environ)
    for name in ZYGOTE_ENV:
        env.pop(name, None)
    if preload == "zygote":
        preload = "--preload=json,signal" + (f",helper --path={path}" if path else "")
        env.update(ZYGOTE_ENV)
    return subprocess.Popen(
        [
            sys.executable,
            SPAWN,
            f"--nproc={nproc}",
            *(preload.split(" ") if preload else []),
            str(script),
            str(out or tmp_path / "out"),
            mode,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
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


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def _pids(tmp_path, rank):
    return json.loads((tmp_path / f"out.pids{rank}").read_text())


def test_a_zygote_serves_launches_until_a_file_it_imported_changes(tmp_path):
    helper = tmp_path / "lib" / "helper.py"
    helper.parent.mkdir()
    helper.write_text("VALUE = 1\n")
    zygotes = []
    for value in (1, 1, 22):  # the third launch after helper.py has changed
        if value != 1:
            helper.write_text(f"VALUE = {value}\n")
        run = tmp_path / str(len(zygotes))
        run.mkdir()
        proc = spawn(tmp_path, 2, "ok", "zygote", path=helper.parent, out=run / "out")  # one script, one zygote
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        zygotes.append({_pids(run, r)[2] for r in range(2)})
    assert len(zygotes[0]) == 1 and zygotes[0] == zygotes[1] != zygotes[2]


def test_a_killed_client_takes_its_launch_and_ranks_with_it(tmp_path):
    proc = spawn(tmp_path, 2, "wait", "zygote")
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"out.{r}").is_file() for r in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks, launcher = [_pids(tmp_path, r)[0] for r in range(2)], _pids(tmp_path, 0)[1]
    assert launcher != proc.pid  # the launch ran in the zygote's fork, not in the client
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in [launcher, *ranks]) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in [launcher, *ranks] if _running(pid)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left


def test_a_zygote_is_shared_only_by_launches_that_import_alike():
    import zygote

    env = {"PATH": "/bin", "OMP_NUM_THREADS": "1", "PYTEST_CURRENT_TEST": "a"}
    base = zygote.socket_path("train.py", ["hydrahead"], ["/repo"], env)
    for name in zygote.RUNTIME_ONLY:  # read only while running
        assert zygote.socket_path("train.py", ["hydrahead"], ["/repo"], {**env, name: "other"}) == base
    assert zygote.socket_path("train.py", ["hydrahead"], ["/repo"], {**env, "OMP_NUM_THREADS": "2"}) != base
    assert zygote.socket_path("train.py", ["hydrahead"], ["/repo"], {**env, "TRITON_INTERPRET": "1"}) != base
    assert zygote.socket_path("other.py", ["hydrahead"], ["/repo"], env) != base
    assert zygote.socket_path("train.py", ["hydrahead", "x"], ["/repo"], env) != base
    assert zygote.socket_path("train.py", ["hydrahead"], ["/elsewhere"], env) != base


ALONE_SCRIPT = """
import os, signal, sys
print("alone", "RANK" in os.environ, "MASTER_PORT" in os.environ, flush=True)
print("to stderr", file=sys.stderr, flush=True)
if sys.argv[1] == "signal":
    os.kill(os.getpid(), signal.SIGTERM)
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("preload", PRELOADS)
@pytest.mark.parametrize("ending", ["0", "7", "signal"])
def test_alone_runs_one_process_as_python_does_and_ends_as_it_ends(tmp_path, preload, ending):
    script = tmp_path / "alone.py"
    script.write_text(ALONE_SCRIPT)
    env = {name: value for name, value in os.environ.items() if name not in ZYGOTE_ENV}
    if preload == "zygote":
        preload = "--preload=json,signal"
        env.update(ZYGOTE_ENV)
    args = [sys.executable, SPAWN, "--nproc=1", "--alone", *([preload] if preload else []), str(script), ending]
    proc = subprocess.run(args, capture_output=True, text=True, env={**env, "RANK": "5"}, timeout=60)
    direct = subprocess.run([sys.executable, str(script), ending], capture_output=True, text=True, timeout=60)
    assert proc.returncode == direct.returncode == {"0": 0, "7": 7, "signal": -signal.SIGTERM}[ending]
    assert proc.stdout == "alone True False\n"  # the caller's own variables only, none of torchrun's
    assert proc.stderr == direct.stderr == "to stderr\n"


def test_alone_is_one_process():
    proc = subprocess.run([sys.executable, SPAWN, "--nproc=2", "--alone", "x.py"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--alone starts one process" in proc.stderr


def test_a_zygote_ends_with_the_process_that_started_it(tmp_path):
    """A test session's worker starts the first client; once it has gone, so has the zygote."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, **ZYGOTE_ENV, "HYDRAHEAD_ZYGOTE_IDLE_S": "600"}  # a zygote of its own, not idle soon
    client = [sys.executable, SPAWN, "--nproc=1", "--preload=json,signal", str(script), str(tmp_path / "out"), "ok"]
    starter = f"import subprocess, sys; sys.exit(subprocess.run({client!r}).returncode)"
    assert subprocess.run([sys.executable, "-c", starter], env=env, timeout=60).returncode == 0
    zygote = _pids(tmp_path, 0)[2]
    deadline = time.monotonic() + 15
    while _running(zygote) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(zygote)


def test_the_clients_replies_are_read_line_by_line_even_when_they_come_together():
    """A launch that ends at once: its pid and its exit status reach the client in one read."""
    import zygote

    mine, theirs = socket.socketpair()
    theirs.sendall(b'{"pid": 12}\n{"exit": 3}\n{"exit"')  # the last one cut short
    theirs.close()
    with mine, mine.makefile("rb") as replies:
        assert [zygote._read_message(replies) for _ in range(3)] == [{"pid": 12}, {"exit": 3}, None]

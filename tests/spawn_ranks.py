"""Start a script as N ranks on this machine, with the variables torchrun gives them.

    python tests/spawn_ranks.py --nproc 2 launch/train.py key=value ...

The end-to-end tests launch the trainer some hundred times on a 2-core machine. torchrun's
agent is itself a torch process: its start costs about 2.5 CPU-seconds a launch, a third
of a tiny 2-rank run. This launcher imports no torch of its own. With ``--preload`` it
imports the given modules once and forks the ranks from itself, so that they do not
each import torch and hydrahead again (another 2.5 CPU-seconds of a 2-rank launch; the
ranks start with one thread, as OMP_NUM_THREADS=1 leaves the import). What the tests
rely on behaves as under torchrun: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT
(env:// rendezvous); SIGTERM, SIGINT and SIGUSR1 are passed on to every rank; when a rank
fails the others are stopped, and the exit status is 1. The tests that are about torchrun
itself (restarts, its signal handling, the reference run) still use torchrun.

Ports come from a counter shared by every launch on the machine (a locked file), below
the range the kernel hands out for port 0, so two runs started at once never pick the
same one.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zygote

FIRST_PORT, PORTS = 20_000, 12_000  # below Linux's ephemeral range (32768-60999)
STOP_GRACE_S = 30  # a failed run's other ranks get this long after SIGTERM (torchrun's default)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def next_port() -> int:
    """A free port that no other launch on this machine has taken recently."""
    counter = Path(tempfile.gettempdir()) / "hydrahead-test-ports"
    with open(counter, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read().strip()
        n = int(text) if text.isdigit() else os.getpid()
        for _ in range(PORTS):
            n += 1
            port = FIRST_PORT + n % PORTS
            if _is_free(port):
                break
        else:
            raise RuntimeError(f"no free port in {FIRST_PORT}-{FIRST_PORT + PORTS - 1}")
        f.seek(0)
        f.truncate()
        f.write(str(n))
    return port


class _Forked:
    """A forked rank, with the part of Popen's interface that main() uses."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self):
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def send_signal(self, signum):
        os.kill(self.pid, signum)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def _fork_rank(script: str, script_args: list[str], env: dict) -> _Forked:
    """Fork a rank that runs ``script`` as ``__main__`` with ``env`` added to its environment.

    The child never returns: the script's end (or its SystemExit, or an uncaught error)
    unwinds out of this process's main() and the interpreter exits as after
    ``python script``: threads joined, exit handlers run, a traceback printed on error."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return _Forked(pid)
    os.environ.update(env)
    sys.argv = [script, *script_args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, required=True, help="ranks to start")
    parser.add_argument(
        "--preload",
        default="",
        help="comma-separated modules to import once here; the ranks are then forked from this "
        "process and run the script in place, instead of each starting Python and importing them",
    )
    parser.add_argument(
        "--path",
        action="append",
        default=[],
        help="with --preload: a folder to import from first, as the script will (its checkout)",
    )
    parser.add_argument(
        "--alone",
        action="store_true",
        help="one process as `python script` runs it: no torchrun variables, and the launcher's "
        "exit status is the script's (a signal that ended it ends the launcher too)",
    )
    parser.add_argument("script", help="the Python script every rank runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    if args.alone and args.nproc != 1:
        parser.error(f"--alone starts one process, not --nproc={args.nproc}")
    if args.preload and os.environ.get(zygote.ENABLE) == "1":
        served = zygote.launch(args.script, args.preload.split(","), args.path, argv)
        if served is not None:
            return served
    world = str(args.nproc)
    shared = {}  # alone: no rendezvous, so no port to take
    if not args.alone:
        shared = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(next_port()), "WORLD_SIZE": world}
        shared.update(LOCAL_WORLD_SIZE=world, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))

    def variables(rank: int) -> dict:
        return {} if args.alone else {**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}

    if args.preload:
        sys.path[0] = os.path.dirname(os.path.abspath(args.script))  # as the ranks will see it
        sys.path[1:1] = args.path  # a script that puts its checkout first imports from there
        for module in args.preload.split(","):
            importlib.import_module(module)
        ranks = [_fork_rank(args.script, args.args, variables(r)) for r in range(args.nproc)]
    else:
        ranks = [
            subprocess.Popen(
                [sys.executable, args.script, *args.args],
                env={**os.environ, **variables(rank)},
            )
            for rank in range(args.nproc)
        ]

    def pass_on(signum, _frame):
        # No poll() here: a handler can run between the main loop's reaping of a rank and
        # its recording the exit status. A rank that has ended ignores the signal.
        for proc in ranks:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    for signum in FORWARDED:
        signal.signal(signum, pass_on)

    failed = False
    while True:
        codes = [proc.poll() for proc in ranks]  # every rank's, each time
        failed = any(code not in (None, 0) for code in codes)
        if failed or None not in codes:
            break
        time.sleep(0.05)
    if failed:  # as torchrun does: stop the rest, then kill what is left
        pass_on(signal.SIGTERM, None)
        deadline = time.monotonic() + STOP_GRACE_S
        while any(proc.poll() is None for proc in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    codes = [proc.returncode for proc in ranks]
    if args.alone:
        return codes[0]
    if any(codes):
        print(f"spawn_ranks: exit codes of ranks 0-{args.nproc - 1}: {codes}", file=sys.stderr)
        return 1
    return 0


def exit_as(code: int) -> None:
    """Exit with ``code`` as a Popen returncode gives it: a negative one by that signal."""
    if code < 0:
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    exit_as(main())

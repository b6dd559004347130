"""A process that imports the trainer once and forks a launch from itself for each client.

spawn_ranks.py --preload imports torch and hydrahead once a launch and forks the ranks
from that import; still, each launch pays that import (3-4 CPU-seconds on a small CI
machine), and the end-to-end tests make some hundred launches. With HYDRAHEAD_ZYGOTE=1 in
its environment, spawn_ranks.py asks a zygote (this module's server, started on first use
and shared by every launch of the same kind) to fork the launcher from an import made
once. The client stays in place of the launcher: its stdin, stdout and stderr are the
launcher's, the signals it gets are passed on, and its exit status is the launcher's.

A zygote serves only launches that would have imported the same code the same way: the
key of its socket names the interpreter, the script, the modules and paths to preload,
and the environment (less the variables only read while running). Before each launch it
checks that no file it imported has changed since (else it stops, and the client
imports for itself). It exits after IDLE_EXIT_S without a client, or once the process that
started the first client has ended (a test session's worker: nothing outlives the tests).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

ENABLE = "HYDRAHEAD_ZYGOTE"
IDLE_EXIT_S = float(os.environ.get("HYDRAHEAD_ZYGOTE_IDLE_S", 120))
START_TIMEOUT_S = 120.0
# Read only while a run goes on, never on import: launches that differ in them share a zygote.
RUNTIME_ONLY = ("PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER", "HYDRAHEAD_INJECT_FAULT")
PASSED_ON = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def socket_path(script: str, modules: list[str], paths: list[str], env: dict) -> str:
    imported_with = {name: value for name, value in env.items() if name not in RUNTIME_ONLY}
    what = json.dumps([sys.executable, os.path.abspath(script), modules, paths, imported_with], sort_keys=True)
    key = hashlib.sha256(what.encode()).hexdigest()[:20]
    return os.path.join(tempfile.gettempdir(), f"hydrahead-zygote-{os.getuid()}-{key}.sock")


# ----------------------------------------------------------------------------------------
# The client: spawn_ranks.py, in place of the launcher it asks for
# ----------------------------------------------------------------------------------------


def launch(script: str, modules: list[str], paths: list[str], argv: list[str]) -> int | None:
    """Have a zygote run ``spawn_ranks.main(argv)`` (whose ranks run ``script`` after
    importing ``modules`` from ``paths``); its exit status, or None where no zygote could
    take the launch (the caller then runs it itself)."""
    path = socket_path(script, modules, paths, dict(os.environ))
    conn = _connect(path) or _start_and_connect(path, script, modules, paths)
    if conn is None:
        return None
    with conn, conn.makefile("rb") as replies:  # buffered: both replies may come in one read
        body = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
        try:
            socket.send_fds(conn, [len(body).to_bytes(8, "little")], [0, 1, 2])
            conn.sendall(body)
            reply = _read_message(replies)
        except OSError:
            return None
        if reply is None or "pid" not in reply:
            return None  # the zygote went away, or found its imports stale
        pid = reply["pid"]

        def pass_on(signum, _frame):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

        for signum in PASSED_ON:
            signal.signal(signum, pass_on)
        done = _read_message(replies)
    if done is None:  # the zygote was killed under the launch
        print("spawn_ranks: the zygote running this launch ended before it", file=sys.stderr)
        return 1
    return done["exit"]


def _connect(path: str) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    return conn


def _start_and_connect(path: str, script: str, modules: list[str], paths: list[str]) -> socket.socket | None:
    """Start the zygote of ``path`` (one client at a time: a lock beside the socket), wait
    until it listens, and connect."""
    with open(path + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _connect(path)  # another client started it meanwhile
        if conn is not None:
            return conn
        command = [sys.executable, __file__, "--serve", path, "--script", script, "--preload", ",".join(modules)]
        command += ["--watch", str(os.getppid())]
        command += [f"--path={p}" for p in paths]
        with open(path + ".log", "ab") as log:
            server = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while server.poll() is None and time.monotonic() < deadline:
            conn = _connect(path)
            if conn is not None:
                return conn
            time.sleep(0.05)
        if server.poll() is None:
            server.kill()
        return None


def _read_message(replies) -> dict | None:
    """The next JSON line; None at the end of the stream."""
    line = replies.readline()
    return json.loads(line) if line.endswith(b"\n") else None


def _send_message(conn: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):  # a client that has gone needs no answer
        conn.sendall(json.dumps(message).encode() + b"\n")


# ----------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------


def serve(path: str, script: str, modules: list[str], paths: list[str], watch: int | None = None) -> dict:
    """Import, listen, and fork a session for each client. Returns only in a launch forked
    for a client, with the client's request; the server and its sessions exit here."""
    import importlib

    import spawn_ranks  # noqa: F401  (beside this file: imported before sys.path[0] moves)

    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as spawn_ranks.py sets it
    sys.path[1:1] = paths
    for module in modules:
        importlib.import_module(module)
    imported = _imported_files()
    staging = f"{path}.{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(staging)
    listener.listen(64)
    os.replace(staging, path)  # clients see the socket only once it listens
    listener.settimeout(1.0)
    last_client = time.monotonic()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sessions are reaped as they end
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if time.monotonic() - last_client > IDLE_EXIT_S or (watch is not None and not _alive(watch)):
                break
            continue
        last_client = time.monotonic()
        conn.settimeout(None)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            return _session(conn, imported)  # in the launch only: the session exits inside
        conn.close()
    with contextlib.suppress(OSError):  # unless a newer zygote has taken the name meanwhile
        if os.stat(path).st_ino == os.fstat(listener.fileno()).st_ino:
            os.unlink(path)
    sys.exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: it exists
        pass
    return True


def _imported_files() -> dict[str, tuple[int, int]]:
    files = {}
    for module in list(sys.modules.values()):
        name = getattr(module, "__file__", None)
        if name:
            with contextlib.suppress(OSError):
                stat = os.stat(name)
                files[name] = (stat.st_mtime_ns, stat.st_size)
    return files


def _session(conn: socket.socket, imported: dict) -> dict:
    """Take a client's request and fork its launch (which returns the request); pass on
    its pid and, once it ends, its exit status. A client that goes away kills the launch."""
    try:
        header, fds, _, _ = socket.recv_fds(conn, 8, 3)
        size = int.from_bytes(header, "little")
        body = b""
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                os._exit(0)
            body += chunk
        request = json.loads(body)
        if len(fds) != 3 or _imported_files_changed(imported):
            _send_message(conn, {"stale": True})
            os.kill(os.getppid(), signal.SIGTERM)  # the next client starts a fresh zygote
            os._exit(0)
        pid = os.fork()
        if pid == 0:
            conn.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            return request
        with contextlib.suppress(OSError):  # as the launch does itself: whichever comes first
            os.setpgid(pid, pid)
        for fd in fds:
            os.close(fd)
        _send_message(conn, {"pid": pid})
        launch_ended = os.pidfd_open(pid)
        while True:
            ready, _, _ = select.select([conn, launch_ended], [], [])
            if launch_ended in ready:
                _send_message(conn, {"exit": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])})
                break
            if not conn.recv(1):  # the client was killed: so are its launch and the ranks
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
    except BaseException:
        import traceback

        traceback.print_exc()
    os._exit(0)


def _imported_files_changed(imported: dict) -> bool:
    for name, (mtime, size) in imported.items():
        try:
            stat = os.stat(name)
        except OSError:
            return True
        if (stat.st_mtime_ns, stat.st_size) != (mtime, size):
            return True
    return False


def become(request: dict) -> None:
    """In a launch forked for a client: take on the client's place and environment."""
    os.setpgid(0, 0)  # the launch and its ranks: one group, killed together if the client is
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.pop(ENABLE, None)  # this launch runs here: it asks no zygote
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
        stream.reconfigure(line_buffering=fd == 2 or os.isatty(fd))
    sys.argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "spawn_ranks.py"), *request["argv"]]
    # A fresh process's random state, not the zygote's: every launch would share it.
    if "torch" in sys.modules:
        sys.modules["torch"].seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", required=True, help="the socket to listen on")
    parser.add_argument("--script", required=True, help="the script the ranks run (sys.path[0] is its folder)")
    parser.add_argument("--preload", required=True, help="comma-separated modules to import")
    parser.add_argument("--path", action="append", default=[], help="a folder to import from first")
    parser.add_argument("--watch", type=int, help="exit once this process has ended")
    args = parser.parse_args(argv)
    request = serve(args.serve, args.script, args.preload.split(","), args.path, args.watch)
    become(request)
    import spawn_ranks

    spawn_ranks.exit_as(spawn_ranks.main(request["argv"]))


if __name__ == "__main__":
    main()

"""A one-node Slurm cluster on localhost for tests: munged, slurmctld and slurmd run as
children of the test, with their configuration, state and logs in a temporary folder.

Debian's Slurm packages (slurm-wlm 22.05 on bookworm) are installed with apt-get when
they are missing. Daemons and clients reach each other through 127.0.0.1 only, and
slurmctld listens nowhere else; the node is called ``localhost`` so that the job's
rendezvous endpoint (the first node's name) stays on loopback too.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "squeue")
NODE_CPUS = 2

SLURM_CONF = """\
# A one-node test cluster on localhost, written by tests/slurm_cluster.py.
ClusterName=hydrahead-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
# slurmctld binds to 127.0.0.1 only (slurmd and srun bind to any address but are only
# ever reached through 127.0.0.1, the node's NodeAddr).
CommunicationParameters=NoCtldInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire (default 120 s) is also how long a requeued job is held (Reason=BeginTime)
# before it may start again; slurmd refuses to relaunch a job id whose credential it
# revoked less than that ago, so the hold is shortened here rather than skipped.
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
MailProg=/bin/true
# No cgroups: works in containers, and nothing here needs resource enforcement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Starts a job as soon as the node is free, without waiting for a backfill pass; a
# requeued job whose hold has passed waits for the next full pass (every 60 s by default).
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
# Requeueing is off by default here, as at many sites: a job's own --requeue must allow it.
JobRequeue=0
ReturnToService=2
# Trust the node line below even on a machine with more or fewer CPUs.
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def ensure_installed() -> dict[str, str]:
    """Absolute paths of the Slurm and munge programs; installs the packages if needed.

    Skips the calling test only on a machine that cannot run a cluster at all (not root, or
    no Slurm and no apt-get), and never under CI (``CI`` set), whose machines can. A failed
    install fails the test: a skip would hide it."""
    unable = None
    if os.geteuid() != 0:
        unable = "needs root: the Slurm daemons run as root and run the job as root"
    elif not all(_which(name) for name in DAEMONS + CLIENTS) and _which("apt-get") is None:
        unable = f"Slurm is not installed and there is no apt-get to install {' '.join(PACKAGES)}"
    if unable:
        if os.environ.get("CI"):
            pytest.fail(f"{unable} (CI machines can run this test; deselect it with -m 'not slurm' elsewhere)")
        pytest.skip(unable)
    if not all(_which(name) for name in DAEMONS + CLIENTS):
        apt_get = _which("apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = [apt_get, "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
        result = None
        # A fresh machine may have no package lists yet: update once and try again.
        for attempt in ([install], [[apt_get, "update", "-q"], install]):
            try:
                for cmd in attempt:
                    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
                    if result.returncode != 0:
                        break
            except subprocess.TimeoutExpired as e:
                pytest.fail(f"installing {' '.join(PACKAGES)} timed out: {' '.join(e.cmd)}")
            if result.returncode == 0:
                break
        else:
            pytest.fail(
                f"could not install {' '.join(PACKAGES)} with apt-get:\n{(result.stdout + result.stderr)[-2000:]}"
            )
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    assert not missing, f"installed {' '.join(PACKAGES)} but still lack {missing}"
    return {name: _which(name) for name in DAEMONS + CLIENTS}


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (all held open together, so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class SlurmCluster:
    """munged + slurmctld + slurmd on localhost, all under ``root``; ``stop()`` always ends them."""

    def __init__(self, root: Path, programs: dict[str, str]):
        self.root = root
        self.programs = programs
        self.conf = root / "slurm.conf"
        self.logs = root / "log"
        self.munge_socket = root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = self.client_env(os.environ)

    def client_env(self, base) -> dict[str, str]:
        """``base`` for this cluster: another cluster's or job's Slurm variables (pytest may
        itself run inside a job) are dropped, and SLURM_CONF points here. Every command,
        daemon and job of this cluster carries that SLURM_CONF and nothing else on the
        machine does, which is how stop() finds strays."""
        env = {k: v for k, v in base.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        for sub in ("state", "spool", "run", "log", "munge", "munge-key"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge-key").chmod(0o700)
        key = self.root / "munge-key" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)  # munged refuses a key that others can read
        ctld_port, slurmd_port = free_ports(2)
        self.conf.write_text(
            SLURM_CONF.format(
                ctld_port=ctld_port,
                slurmd_port=slurmd_port,
                root=self.root,
                munge_socket=self.munge_socket,
                cpus=NODE_CPUS,
            )
        )

        # --force: run as root and accept the temporary folders' permissions.
        self._spawn(
            "munged",
            [
                self.programs["munged"],
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.root / 'run' / 'munged.pid'}",
                f"--seed-file={self.root / 'munge-key' / 'munged.seed'}",
            ],
        )
        self._wait("munged to create its socket", self.munge_socket.exists, 15)
        self._spawn("slurmctld", [self.programs["slurmctld"], "-D", "-f", str(self.conf)])
        self._wait("slurmctld to answer", lambda: "is UP" in self.run("scontrol", "ping", check=False).stdout, 30)
        self._spawn("slurmd", [self.programs["slurmd"], "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait("the node to become idle", lambda: self.node_state() == "IDLE", 30)

    def stop(self) -> None:
        """Cancel every job, end the daemons, then any process still carrying our SLURM_CONF."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                with contextlib.suppress(AssertionError):
                    self._wait(
                        "cancelled jobs to end", lambda: not self.run("squeue", "-h", check=False).stdout.strip(), 30
                    )
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        # slurmstepd and job processes outlive slurmd by design.
        for pid in self._stray_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        # Startup errors go to stderr, before a daemon opens its log file.
        with open(self.logs / f"{name}.stderr", "wb") as log:  # the child keeps its own copy
            self.procs[name] = subprocess.Popen(
                cmd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} exited with status {proc.returncode}\n{self.diagnostics()}"
            assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}\n{self.diagnostics()}"
            time.sleep(0.2)

    def _stray_pids(self) -> list[int]:
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
        return pids

    # --- commands --------------------------------------------------------------------

    def run(
        self,
        program: str,
        *args: str,
        check: bool = True,
        env: dict | None = None,
        cwd: Path | None = None,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [self.programs[program], *args],
            env=env or self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert not check or result.returncode == 0, (
            f"{program} {' '.join(args)} exited with status {result.returncode}:\n{result.stdout}{result.stderr}"
        )
        return result

    def node_state(self) -> str:
        return (
            self.run("scontrol", "show", "node", "localhost", check=False).stdout.partition("State=")[2].split(" ")[0]
        )

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Reason, Restarts, ExitCode, ...); {} once forgotten."""
        result = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        fields: dict[str, str] = {}
        for key, value in re.findall(r"(\w+)=(\S*)", result.stdout if result.returncode == 0 else ""):
            fields.setdefault(key, value)
        return fields

    # --- failure reports -------------------------------------------------------------

    def diagnostics(self, *job_outputs: Path) -> str:
        parts = []
        for name in DAEMONS:
            # The log file has timestamps; stderr has what came before it was opened.
            path = next((p for p in (self.logs / f"{name}.log", self.logs / f"{name}.stderr") if p.exists()), None)
            if path:
                parts.append(f"--- {path.name} (tail) ---\n{_tail(path)}")
        parts += [f"--- job output {path} (tail) ---\n{_tail(path, 120)}" for path in job_outputs]
        return "\n".join(parts)

    @contextlib.contextmanager
    def report_on_failure(self, *job_outputs: Path):
        """On any failure inside the block, print the daemons' logs and the job outputs
        (pytest shows a failed test's captured output)."""
        try:
            yield
        except BaseException:
            print(self.diagnostics(*job_outputs))
            raise

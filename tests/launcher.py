"""Launch the real trainer for end-to-end tests, on tiny gloo runs (several ranks: see command())."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import launcher  # noqa: E402

TINY = [
    "train.steps=12",
    "train.global_batch=48",
    "train.eval_every=6",
    "train.eval_samples=96",
    "model.embed_dim=32",
    "model.hidden_dim=64",
    "model.input_dim=16",
    "data.feature_dim=16",
    "head.num_classes=101",
    "head.chunk_size=16",
    "head.margin_type=cosface",
    "head.scale=8",
    "data.noise=0.1",
    "head.lr=0.5",
    "optim.lr=0.2",
    "optim.warmup_steps=2",
    "checkpoint.every=4",
    "checkpoint.keep=2",
    "log.every=1",
    "log.progress=false",
]


def command(run_dir: Path, nproc: int, *overrides: str, torchrun_args=(), torchrun: bool = False) -> list[str]:
    """The trainer as ``nproc`` ranks, forked by spawn_ranks.py from one import of the
    trainer (made once for many launches by a zygote: see environment()): one rank as the
    script alone (it forms a world of one), several with what torchrun sets and without
    torchrun's own start (together 5 CPU-seconds a launch here); unless the test is about
    torchrun (``torchrun``) or asks it for something (``torchrun_args``)."""
    script = [str(REPO / "launch" / "train.py"), f"run.dir={run_dir}", *TINY, *overrides]
    if not (torchrun or torchrun_args):
        preload = ["--preload=hydrahead.train.trainer", f"--path={REPO}"]  # train.py imports from REPO
        alone = ["--alone"] if nproc == 1 else []  # as `python launch/train.py` runs
        spawn = [str(REPO / "tests" / "spawn_ranks.py"), f"--nproc={nproc}", *alone, *preload]
        return [sys.executable, *spawn, *script]
    return [sys.executable, *launcher(nproc, {}, torchrun_args)[0], *script]


def environment(faults: str | None = None, threads: int = 1) -> dict:
    # no surrounding launcher's rank variables: a one-rank run must not try to rendezvous
    env = launcher(1, {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"})[1]
    env.pop("HYDRAHEAD_INJECT_FAULT", None)
    env["HYDRAHEAD_ZYGOTE"] = "1"  # spawn_ranks.py's launches fork from one import (zygote.py)
    if faults:
        env["HYDRAHEAD_INJECT_FAULT"] = faults
    return env


def launch(
    run_dir: Path,
    nproc: int,
    *overrides: str,
    check: bool = True,
    faults: str | None = None,
    torchrun_args=(),
    torchrun: bool = False,
    cwd: Path = REPO,
    timeout: float = 300,
    threads: int = 1,
) -> subprocess.CompletedProcess:
    """Run launch/train.py as ``nproc`` gloo ranks of ``threads`` CPU threads each (see
    command()); a hang fails after ``timeout``."""
    proc = subprocess.run(
        command(run_dir, nproc, *overrides, torchrun_args=torchrun_args, torchrun=torchrun),
        cwd=cwd,
        env=environment(faults, threads),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        _check(proc)
    return proc


def start(
    run_dir: Path,
    nproc: int,
    *overrides: str,
    faults: str | None = None,
    torchrun_args=(),
    torchrun: bool = False,
    cwd: Path = REPO,
    threads: int = 1,
) -> subprocess.Popen:
    """launch() without waiting for it: finish() collects the runs started together.

    On a machine of 2 cores a launch leaves one idle for much of its time (a 1-rank worker,
    or the single import before the ranks are forked, runs on one core), so a second launch
    beside it costs little more wall time. Each launch of several ranks gets a port of its own."""
    return subprocess.Popen(
        command(run_dir, nproc, *overrides, torchrun_args=torchrun_args, torchrun=torchrun),
        cwd=cwd,
        env=environment(faults, threads),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(*procs: subprocess.Popen, timeout: float = 300, check: bool = True) -> list[subprocess.CompletedProcess]:
    """Wait for runs start()ed together, all within ``timeout``; with ``check`` each must
    succeed. A hang or an error here stops the runs still going."""
    try:
        deadline = time.monotonic() + timeout
        done = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        _stop(procs)
    if check:
        for proc in done:
            _check(proc)
    return done


def launch_together(*runs: tuple, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """launch() for independent runs, all started at once (see start()) and all required to
    succeed; each run is a tuple (run_dir, nproc, *overrides)."""
    procs = []
    try:
        for run_dir, nproc, *overrides in runs:
            procs.append(start(run_dir, nproc, *overrides))
    except BaseException:
        _stop(procs)
        raise
    return finish(*procs, timeout=timeout)


def _stop(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}")


@contextlib.contextmanager
def cpu_hog(processes: int = 2):
    """Busy-looping processes beside whatever runs inside the block (a loaded machine)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def saved_backbone(checkpoint) -> dict:
    """The backbone's state dict (weights and buffers) from a checkpoint folder."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from hydrahead.config import config_from_dict
    from hydrahead.models import backbone_from_config
    from hydrahead.train.checkpoint import read_meta

    backbone = backbone_from_config(config_from_dict(read_meta(checkpoint)["config"]))
    state = {"backbone": backbone.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(checkpoint)), no_dist=True)
    return state["backbone"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics(run_dir) if "loss" in row}

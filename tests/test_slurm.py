"""launch/slurm/train.sbatch on a real one-node Slurm cluster (see tests/slurm_cluster.py).

The job trains a tiny config on 2 gloo ranks and is sent USR1 as Slurm's
``--signal=B:USR1@300`` would send it near the time limit. It must checkpoint, write
run.dir/PREEMPTED, requeue itself under the same job id, resume from the checkpoint and
finish with the per-step losses of an uninterrupted run.

    python -m pytest -m slurm tests/test_slurm.py

Runs as root only (it installs Debian's Slurm packages when they are missing and runs the
daemons). It skips itself only where no cluster can run (not root, or neither Slurm nor
apt-get), never under CI; a failed package install fails it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launcher import REPO, TINY, environment, train_losses
from slurm_cluster import SlurmCluster, ensure_installed, free_ports

from hydrahead.train.checkpoint import latest_checkpoint

CONFIG = "configs/quickstart.yaml"
NPROC = 2
STEPS = 12  # train.steps in TINY

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    programs = ensure_installed()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), programs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _wait_for(what: str, ready, job: str, cluster: SlurmCluster, timeout: float) -> dict[str, str]:
    """Poll until ``ready(job_fields)``; fail at once if the job ended, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        fields = cluster.job(job)
        if ready(fields):
            return fields
        state = fields.get("JobState", "(forgotten)")
        assert state in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"), (
            f"job {job} ended ({state}, exit code {fields.get('ExitCode')}) while waiting for {what}"
        )
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}; job {job} is {state}"
        time.sleep(0.2)


@pytest.mark.timeout(420)  # above the usual 300 s: a fresh machine first installs the packages
def test_usr1_checkpoints_requeues_and_resumes_identically(slurm, tmp_path, monkeypatch):
    # gloo picks its interface from the host name; keep all traffic on loopback.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    reference = tmp_path / "reference"
    # The uninterrupted run: the same command line as the job's, under plain torchrun. It
    # starts while the requeued job is held (below), when the machine is otherwise idle.
    reference_command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={NPROC}",
        "launch/train.py",
        "--config",
        CONFIG,
        f"run.dir={reference}",
        *TINY,
    ]

    run_dir, job_out = tmp_path / "run", tmp_path / "slurm-job.out"
    (rdzv_port,) = free_ports(1)
    env = slurm.client_env(environment("sleep=0.5"))  # slow steps, so that the signal lands mid-run
    env.update(
        {
            # The batch shell finds torchrun and python on PATH (sbatch passes this environment on).
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "PYTHON": sys.executable,
            "GPUS_PER_NODE": str(NPROC),  # no GPUs here, so Slurm cannot tell the script how many
            "RDZV_PORT": str(rdzv_port),
        }
    )
    for name in ("RUN_DIR", "MAX_RESTARTS", "HYDRAHEAD_ROOT"):
        env.pop(name, None)
    with slurm.report_on_failure(job_out), contextlib.ExitStack() as cleanup:
        submit = slurm.run(
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--cpus-per-task=2",
            # The template asks for 8 GPUs per node; a count of 0 drops the request (--gres=none
            # does not: Slurm still rejects the gpu request on a cluster without GRES).
            "--gpus-per-node=0",
            # Longer than the 300 s USR1 lead, or Slurm would signal the job as it starts.
            "--time=10",
            f"--output={job_out}",
            "launch/slurm/train.sbatch",
            CONFIG,
            f"run.dir={run_dir}",
            *TINY,
            env=env,
            cwd=REPO,
        )
        job = submit.stdout.strip().split(";")[0]

        def trained_a_few_steps(fields):
            return (
                fields.get("JobState") == "RUNNING"
                and (run_dir / "metrics.jsonl").is_file()
                and len(train_losses(run_dir)) >= 3
            )

        _wait_for("the first training steps", trained_a_few_steps, job, slurm, timeout=120)

        # What --signal=B:USR1@300 does near the time limit: USR1 to the batch shell only.
        slurm.run("scancel", "--signal=USR1", "--batch", job)

        # The requeued job is held for the credential lifetime (cred_expire, 10 s on this
        # cluster) before it starts again; meanwhile the first leg's results stand alone.
        _wait_for(
            "the requeue", lambda f: f.get("JobState") == "PENDING" and f.get("Restarts") == "1", job, slurm, timeout=90
        )
        ref = subprocess.Popen(
            reference_command, cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        cleanup.callback(ref.terminate)  # a no-op once it has exited; torchrun ends its workers
        marker = run_dir / "PREEMPTED"
        assert marker.is_file(), "the job was requeued without run.dir/PREEMPTED"
        stopped_at = int(marker.read_text().split()[1])
        assert 3 <= stopped_at < STEPS, f"preempted after step {stopped_at}: the signal did not land mid-run"
        assert latest_checkpoint(run_dir).name == f"step-{stopped_at}"
        log = job_out.read_text()
        assert f"job {job} (restart 0)" in log
        assert f"requeueing job {job}" in log

        fields = _wait_for(
            "the resumed job to finish", lambda f: f.get("JobState") == "COMPLETED", job, slurm, timeout=120
        )
        assert fields["Restarts"] == "1" and fields["ExitCode"] == "0:0", fields
        log = job_out.read_text()  # one file for both legs (--open-mode=append)
        assert f"job {job} (restart 1)" in log
        assert f"resumed at step {stopped_at}" in log
        assert "training ended with exit status 0" in log
        assert not marker.exists(), "the resumed leg left run.dir/PREEMPTED behind"
        _, ref_stderr = ref.communicate(timeout=300)
        assert ref.returncode == 0, f"reference run: exit {ref.returncode}\n{ref_stderr[-6000:]}"
        got, want = train_losses(run_dir), train_losses(reference)
        assert sorted(got) == list(range(1, STEPS + 1)), f"logged steps {sorted(got)}"
        for step in range(1, STEPS + 1):
            assert got[step] == want[step], f"step {step}: {got[step]} after the requeue, {want[step]} uninterrupted"

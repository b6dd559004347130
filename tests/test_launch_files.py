"""Launch files: the shipped configs, the Slurm script and the Dockerfile.

The Slurm script's preemption flow is exercised end to end with stub `srun`, `torchrun`,
`scontrol` and `scancel` executables first on PATH: the script is sent USR1 as Slurm would,
the stub torchrun answers SIGTERM like the workers will (checkpoint marker, then exit), and
the test checks that the job asked to be requeued.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from hydrahead.config import load_config, validate

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


# ---------------------------------------------------------------------------------------
# Configs


def test_the_documented_configs_exist():
    names = {path.name for path in CONFIGS}
    assert {"resnet50_1m.yaml", "vit_base_10m.yaml", "resnet50_100m.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_validates(path):
    cfg = load_config(path)
    sizes = [w for w in WORLD_SIZES if cfg.train.global_batch % w == 0]
    assert sizes, f"{path.name}: global_batch {cfg.train.global_batch} fits none of {WORLD_SIZES}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an option the config sets but the run would ignore
        for world_size in sizes:
            validate(cfg, world_size=world_size)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_header_says_how_to_launch(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{path.name} has no header comment"
    assert re.search(r"\b(torchrun|sbatch)\b", "\n".join(header)), f"{path.name}: header shows no launch command"


def test_class_counts_are_what_the_names_say():
    expected = {
        "resnet50_1m.yaml": 1_000_000,
        "vit_base_10m.yaml": 10_000_000,
        "resnet50_100m.yaml": 100_000_000,
        "resnet50_100m_fp8.yaml": 100_000_000,
        "head_only_100m_fp8.yaml": 100_000_000,
        "head_only_1m_families.yaml": 1_000_000,
    }
    for name, num_classes in expected.items():
        cfg = load_config(ROOT / "configs" / name)
        assert type(cfg.head.num_classes) is int and cfg.head.num_classes == num_classes


# ---------------------------------------------------------------------------------------
# Slurm script, static checks


@needs_bash
def test_sbatch_script_parses():
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sbatch_script_has_the_preemption_pieces():
    text = SBATCH.read_text()
    for piece in (
        "#SBATCH --signal=B:USR1@",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --ntasks-per-node=1",
        "trap ",
        "scontrol requeue",
        "PREEMPTED",
        "--rdzv-backend c10d",
        "--rdzv-id",
        "--max-restarts",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
    ):
        assert piece in text, f"{SBATCH.name} lacks {piece!r}"
    # Slurm stops reading #SBATCH lines at the first command.
    lines = text.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))


# ---------------------------------------------------------------------------------------
# Slurm script, behaviour with stub Slurm and torchrun

_STUBS = {
    # Host list for `show hostnames`; every other call is recorded.
    "scontrol": """#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then printf 'node-a\\nnode-b\\n'; exit 0; fi
echo "$*" >> "$STUB_LOG/scontrol"
""",
    # Drops srun's own options and runs the command, as srun does on each node.
    "srun": """#!/bin/bash
echo "$*" >> "$STUB_LOG/srun"
while [[ $1 == -* ]]; do shift; done
exec "$@"
""",
    # Slurm signalling the step: SIGTERM to the (stub) torchrun.
    "scancel": """#!/bin/bash
echo "$*" >> "$STUB_LOG/scancel"
kill -TERM "$(cat "$STUB_LOG/torchrun.pid")"
""",
    # Stands in for torchrun and its workers: on SIGTERM it leaves the marker and exits
    # non-zero, as torchrun does after a signal even when its workers exit 0.
    "torchrun": """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_LOG/torchrun.args"
[[ -e $STUB_RUN_DIR/PREEMPTED ]] && touch "$STUB_LOG/stale_marker_seen"
on_term() { touch "$STUB_RUN_DIR/PREEMPTED"; exit 1; }
trap on_term TERM
echo $$ > "$STUB_LOG/torchrun.pid.tmp" && mv "$STUB_LOG/torchrun.pid.tmp" "$STUB_LOG/torchrun.pid"
case $STUB_MODE in
    finish) exit 0 ;;
    crash) exit 3 ;;
esac
for _ in $(seq 400); do sleep 0.05; done
exit 9
""",
}


def _run_env(tmp_path: Path, run_dir: Path, mode: str) -> tuple[dict, Path]:
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log_dir.mkdir()
    for name, text in _STUBS.items():
        stub = bin_dir / name
        stub.write_text(text)
        stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for name in ("RUN_DIR", "GPUS_PER_NODE", "MAX_RESTARTS", "RDZV_PORT"):
        env.pop(name, None)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_NNODES="2",
        SLURM_GPUS_ON_NODE="8",
        SLURM_CPUS_PER_TASK="64",
        SLURM_SUBMIT_DIR=str(ROOT),
        HYDRAHEAD_ROOT=str(ROOT),
        PYTHON=sys.executable,
        STUB_LOG=str(log_dir),
        STUB_RUN_DIR=str(run_dir),
        STUB_MODE=mode,
    )
    return env, log_dir


def _start(args: list[str], env: dict, tmp_path: Path) -> subprocess.Popen:
    with open(tmp_path / "sbatch.out", "w") as out:  # the child keeps its own copy of the file
        return subprocess.Popen(
            ["bash", str(SBATCH), *args],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _finish(proc: subprocess.Popen, tmp_path: Path, timeout: float = 15.0) -> tuple[int, str]:
    try:
        returncode = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return returncode, (tmp_path / "sbatch.out").read_text()


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@needs_bash
def test_usr1_checkpoints_and_requeues(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "PREEMPTED").touch()  # left by an earlier leg: must not count for this one
    env, log = _run_env(tmp_path, run_dir, mode="preempt")
    # run.dir comes from the overrides here, so the script resolves it through the config loader.
    proc = _start(["configs/resnet50_1m.yaml", f"run.dir={run_dir}", "train.steps=5000"], env, tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not (log / "torchrun.pid").exists():
            assert proc.poll() is None, f"script exited early:\n{_read(tmp_path / 'sbatch.out')}"
            assert time.monotonic() < deadline, "the stub torchrun never started"
            time.sleep(0.02)
        assert not (log / "stale_marker_seen").exists(), "a stale PREEMPTED marker survived the job start"
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 delivers
    finally:
        returncode, output = _finish(proc, tmp_path)

    assert returncode == 0, output
    assert _read(log / "scancel").split() == ["--signal=TERM", "4242"], output
    assert _read(log / "scontrol").splitlines() == ["requeue 4242"], output
    assert (run_dir / "PREEMPTED").exists()

    args = _read(log / "torchrun.args").splitlines()
    joined = " ".join(args)
    for piece in (
        "--nnodes 2",
        "--nproc-per-node 8",
        "--rdzv-backend c10d",
        "--rdzv-endpoint node-a:29500",
        "--rdzv-id 4242",
        "--max-restarts 0",
        f"launch/train.py --config configs/resnet50_1m.yaml run.dir={run_dir} train.steps=5000",
    ):
        assert piece in joined, f"torchrun got {args}"
    srun_args = _read(log / "srun").split()
    assert "--ntasks-per-node=1" in srun_args and "--cpus-per-task=64" in srun_args


@needs_bash
@pytest.mark.parametrize(("mode", "expected_status"), [("finish", 0), ("crash", 3)])
def test_no_marker_means_no_requeue(tmp_path, mode, expected_status):
    run_dir = tmp_path / "shared" / "run"
    env, log = _run_env(tmp_path, run_dir, mode=mode)
    env["RUN_DIR"] = str(run_dir)  # taken as given and passed on as the last override
    env["MAX_RESTARTS"] = "2"
    proc = _start(["configs/resnet50_1m.yaml", "run.dir=ignored"], env, tmp_path)
    returncode, output = _finish(proc, tmp_path)

    assert returncode == expected_status, output
    assert not (log / "scontrol").exists(), output
    assert not (log / "scancel").exists(), output
    assert run_dir.is_dir()
    args = _read(log / "torchrun.args").splitlines()
    assert args[-1] == f"run.dir={run_dir}"
    assert args[args.index("--max-restarts") + 1] == "2"


@needs_bash
def test_bad_config_fails_before_launching(tmp_path):
    env, log = _run_env(tmp_path, tmp_path / "run", mode="finish")
    proc = _start(["configs/resnet50_1m.yaml", "head.num_clases=5"], env, tmp_path)
    returncode, output = _finish(proc, tmp_path)
    assert returncode != 0
    assert "num_clases" in output
    assert not (log / "torchrun.args").exists()


# ---------------------------------------------------------------------------------------
# Docker


def test_dockerfile_builds_on_the_nvidia_pytorch_image_and_installs_the_package():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3\s*$", text, re.MULTILINE)
    assert re.search(r"pip install\b.*\s-e\s+\"?\.", text), "the package is not installed"
    # The base image's torch must stay: nothing may install torch itself.
    assert not re.search(r"pip install[^\n]*\storch(?:[=<>~\s]|$)", text, re.MULTILINE)
    assert re.search(r"^CMD .*--help", text, re.MULTILINE)


def test_dockerignore_sits_at_the_build_context_root():
    entries = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", "runs", "**/__pycache__"):
        assert entry in entries


def test_a_failed_workers_error_file_appears_whole(tmp_path, monkeypatch):
    """The worker's record of its exception is written beside the error file and renamed,
    so torchrun's agent never reads a half-written one; the agent's parser reads it back."""
    import importlib.util

    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, ProcessFailure

    spec = importlib.util.spec_from_file_location("train_launcher", ROOT / "launch" / "train.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    written = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (written.append((a, b)), real_replace(a, b)))
    try:
        raise ValueError("head.num_classes must be >= 1")
    except ValueError as error:
        launcher.AtomicErrorHandler().record_exception(error)
    assert written == [(f"{error_file}.partial", str(error_file))] and sorted(os.listdir(tmp_path)) == ["error.json"]
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(error_file))
    assert failure.message["message"] == "ValueError: head.num_classes must be >= 1"
    stock_file = tmp_path / "stock.json"  # torchrun's own handler writes the same layout
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(stock_file))
    try:
        raise ValueError("head.num_classes must be >= 1")
    except ValueError as error:
        ErrorHandler().record_exception(error)
    stock = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(stock_file))
    assert (
        stock.message.keys() == failure.message.keys()
        and stock.message["extraInfo"].keys() == failure.message["extraInfo"].keys()
    )

"""Kills, preemption, world-size changes, non-finite values and bad input, through torchrun."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from launcher import REPO, command, environment, launch, launch_together, metrics, train_losses

from hydrahead.train.checkpoint import complete_checkpoints, latest_checkpoint


@pytest.fixture(scope="module")
def reference_run(tiny_two_rank_run):
    """An uninterrupted 2-rank run (the session's, see conftest.py): every other scenario
    must reproduce its losses."""
    return tiny_two_rank_run


def assert_same_losses(run_dir, reference, steps, exact=False):
    got, want = train_losses(run_dir), train_losses(reference)
    for step in steps:
        if exact:
            assert got[step] == want[step], f"step {step}: {got[step]} != {want[step]}"
        else:
            assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), f"step {step}"


# ----------------------------------------------------------------------------------------
# World-size changes
# ----------------------------------------------------------------------------------------


def test_three_ranks_to_one_rank(reference_run, tmp_path):
    run_dir = tmp_path / "three_to_one"
    launch(run_dir, 3, "train.stop_after=6")  # 101 classes as 34/34/33
    launch(run_dir, 1)  # all 101 on one rank, momentum included
    assert_same_losses(run_dir, reference_run, range(1, 13))


def test_rows_owing_steps_are_resplit_with_what_they_owe(tmp_path):
    """Random active rows (chosen by class id, whatever the split) leave the inactive rows
    owing momentum and decay steps at every save: a checkpoint of 3 ranks resumed on 1 must
    hand each row its own debt, and train as the uninterrupted 2-rank run does."""
    random_rows = ["head.selection=random", "head.budget=0.3", "head.weight_decay=0.01", "train.eval_every=0"]
    straight, resplit = tmp_path / "straight", tmp_path / "resplit"
    launch_together((straight, 2, *random_rows), (resplit, 3, *random_rows, "train.stop_after=6"))
    launch(resplit, 1, *random_rows)
    assert_same_losses(resplit, straight, range(1, 13))


def test_resume_accepts_and_refuses_config_changes(reference_run, tmp_path):
    run_dir = tmp_path / "changes"
    launch(run_dir, 2, "train.stop_after=4")
    config_before = (run_dir / "config.yaml").read_text()
    # One launch changes them all: the refusal lists every refused key with both its values.
    refused = {"model.embed_dim": ("32", "64"), "model.depth": ("2", "3"), "run.seed": ("0", "3")}
    refused["train.global_batch"] = ("48", "96")
    proc = launch(run_dir, 2, *(f"{key}={now}" for key, (_, now) in refused.items()), check=False)
    assert proc.returncode != 0
    assert "cannot resume" in proc.stderr, proc.stderr[-2000:]
    for key, (there, now) in refused.items():
        assert f"{key}={there} there, {now} now" in proc.stderr, proc.stderr[-2000:]
    assert latest_checkpoint(run_dir).name == "step-4", "a refused resume must not write a checkpoint"
    assert (run_dir / "config.yaml").read_text() == config_before, "nor rewrite the run's config"
    # more steps, another world size and other logging are accepted; the schedule follows train.steps
    launch(run_dir, 3, "train.stop_after=8", "log.every=2", "checkpoint.every=2")
    assert latest_checkpoint(run_dir).name == "step-8"
    proc = launch(run_dir, 1, "optim.lr=0.1", "train.stop_after=9")
    assert "resuming with optim.lr changed from 0.2 to 0.1" in proc.stderr


# ----------------------------------------------------------------------------------------
# Preemption and crashes
# ----------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (torchrun's workers), read from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_sigterm_to_torchrun_saves_and_rerun_finishes_identically(reference_run, tmp_path):
    run_dir = tmp_path / "preempted"
    cmd = command(run_dir, 2, torchrun=True)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=environment("sleep=0.25"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a few steps are logged
        if (run_dir / "metrics.jsonl").is_file() and len(train_losses(run_dir)) >= 3:
            break
        time.sleep(0.1)
    # As Slurm's scancel --signal=TERM does: torchrun and every worker get SIGTERM, and then
    # all of them once more while the workers are finishing the step or saving.
    workers = _children(proc.pid)
    assert len(workers) == 2
    for _ in range(2):
        for pid in [proc.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
    _, stderr = proc.communicate(timeout=120)
    marker = run_dir / "PREEMPTED"
    assert marker.is_file(), stderr[-3000:]
    stopped_at = int(marker.read_text().split()[1])
    assert 3 <= stopped_at < 12
    for rank in (0, 1):
        assert f"rank {rank}: preempted after step {stopped_at}, checkpoint saved, exiting 0" in stderr
    assert latest_checkpoint(run_dir).name == f"step-{stopped_at}"
    launch(run_dir, 2)  # the requeued job: the same command
    assert not marker.exists()
    assert_same_losses(run_dir, reference_run, range(1, 13), exact=True)


def test_sigkill_of_one_rank_is_restarted_and_resumes(reference_run, tmp_path):
    run_dir = tmp_path / "killed"
    proc = launch(run_dir, 2, faults="kill@7:1", torchrun_args=["--max-restarts=1"])
    assert "resumed at step 4" in proc.stdout + proc.stderr  # the newest complete checkpoint
    assert_same_losses(run_dir, reference_run, range(1, 13), exact=True)


# ----------------------------------------------------------------------------------------
# Damaged checkpoints: verified on resume, skipped for the newest one that verifies
# ----------------------------------------------------------------------------------------

EVERY_STEP = ["train.steps=8", "train.eval_every=0", "checkpoint.every=1", "checkpoint.keep=8"]


@pytest.fixture(scope="module")
def saved_every_step(tmp_path_factory):
    """A 2-rank run with a checkpoint after each of its 8 steps."""
    run_dir = tmp_path_factory.mktemp("damaged") / "saved"
    launch(run_dir, 2, *EVERY_STEP)
    return run_dir


@pytest.fixture(scope="module")
def resumed_from_step_4(saved_every_step, tmp_path_factory):
    """The same run resumed directly from its step-4 checkpoint (the newer ones removed), to step 6."""
    run_dir = tmp_path_factory.mktemp("damaged") / "direct"
    shutil.copytree(saved_every_step, run_dir)
    for step in range(5, 9):
        shutil.rmtree(run_dir / "checkpoints" / f"step-{step}")
    launch(run_dir, 2, *EVERY_STEP, "train.stop_after=6")
    return run_dir


def _flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01
    path.write_bytes(bytes(data))


def _damage(folder: Path, damage: str) -> None:
    if damage == "flip meta.json":  # a digit of the data cursor: still valid JSON, with a wrong value
        text = (folder / "meta.json").read_text()
        _flip_byte(folder / "meta.json", text.index('"cursor": ') + len('"cursor": '))
    elif damage == "flip manifest.json":  # a digit of a checksum: still valid JSON
        text = (folder / "manifest.json").read_text()
        _flip_byte(folder / "manifest.json", text.index('"pieces": [') + 24)
    elif damage.startswith("flip "):
        _flip_byte(folder / damage.removeprefix("flip "))
    elif damage.startswith("truncate "):
        path = folder / damage.removeprefix("truncate ")
        path.write_bytes(path.read_bytes()[:-100])
    elif damage.startswith("delete "):
        (folder / damage.removeprefix("delete ")).unlink()
    elif damage == "manifest of step 3":
        shutil.copy(folder.parent / "step-3" / "manifest.json", folder / "manifest.json")
    else:
        raise AssertionError(damage)


# Four damaged checkpoints at a time (steps 8, 7, 6, 5), newest first, with what the warning
# that skips each must say. Rank 0 hashes __0_0.distcp, .metadata and meta.json, rank 1
# __1_0.distcp: what only rank 1 finds must still stop rank 0 from loading it.
DAMAGES = {
    "data files, index, missing file, manifest of another step": [
        ("flip __1_0.distcp", r"damaged: __1_0\.distcp does not match its checksum"),
        ("flip .metadata", r"damaged: \.metadata does not match its checksum"),
        ("delete __1_0.distcp", r"incomplete: __1_0\.distcp is missing"),
        ("manifest of step 3", r"damaged: manifest\.json is of step 3, the folder of step 5"),
    ],
    "data file, meta.json, truncated file, manifest": [
        ("flip __0_0.distcp", r"damaged: __0_0\.distcp does not match its checksum"),
        ("flip meta.json", r"damaged: meta\.json does not match its checksum"),
        ("truncate __0_0.distcp", r"damaged: __0_0\.distcp has [\d,]+ bytes, the manifest says [\d,]+ \(truncated\)"),
        ("flip manifest.json", r"damaged: manifest\.json does not match its own checksum"),
    ],
}


@pytest.mark.parametrize("damages", DAMAGES.values(), ids=DAMAGES.keys())
def test_damaged_checkpoints_are_skipped_for_the_newest_that_verifies(
    saved_every_step, resumed_from_step_4, tmp_path, damages
):
    run_dir = tmp_path / "run"
    shutil.copytree(saved_every_step, run_dir)
    for step, (damage, _) in zip((8, 7, 6, 5), damages):
        _damage(run_dir / "checkpoints" / f"step-{step}", damage)
    proc = launch(run_dir, 2, *EVERY_STEP, "train.stop_after=6", timeout=120)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: skipping checkpoint")]
    assert len(warnings) == 4, proc.stderr[-3000:]  # rank 0 says it, once per checkpoint
    for step, (_, message), warning in zip((8, 7, 6, 5), damages, warnings):
        assert warning.startswith(f"warning: skipping checkpoint {run_dir / 'checkpoints' / f'step-{step}'}: ")
        assert re.search(message, warning), warning
    assert "resumed at step 4 from step-4 (checksums verified)" in proc.stdout
    assert_same_losses(run_dir, resumed_from_step_4, range(5, 7), exact=True)
    assert_same_losses(run_dir, saved_every_step, range(5, 7), exact=True)


def test_a_checkpoint_without_checksums_still_loads_with_a_note(saved_every_step, tmp_path):
    """As written before checkpoints carried checksums: no manifest, no mention in meta.json."""
    run_dir = tmp_path / "old"
    shutil.copytree(saved_every_step, run_dir)
    newest = run_dir / "checkpoints" / "step-8"
    (newest / "manifest.json").unlink()
    meta = json.loads((newest / "meta.json").read_text())
    del meta["checksums"]
    (newest / "meta.json").write_text(json.dumps(meta))
    proc = launch(run_dir, 2, *EVERY_STEP, timeout=120)
    assert f"note: loading checkpoint {newest}, not verified: written without checksums" in proc.stderr
    assert "resumed at step 8 from step-8 (not verified: written without checksums" in proc.stdout
    assert "nothing to do" in proc.stdout


# ----------------------------------------------------------------------------------------
# Non-finite values
# ----------------------------------------------------------------------------------------


def test_nan_loss_stops_every_rank_without_a_new_checkpoint(tmp_path):
    run_dir = tmp_path / "nan_stop"
    proc = launch(run_dir, 2, "train.nonfinite=stop", check=False, faults="nan_loss@6:1", timeout=120)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"[rank{rank}]: hydrahead.train.faults.NonFiniteError: step 6: non-finite loss" in proc.stderr
    # it claims of the checkpoints only what this run knows: it saved step-4, and verified nothing
    assert "No checkpoint was written for this step" in proc.stderr and "(this run last saved step-4)" in proc.stderr
    assert "intact" not in proc.stderr
    assert [step for step, _ in complete_checkpoints(run_dir)] == [4]
    assert max(train_losses(run_dir)) == 5


@pytest.mark.parametrize(
    "overlap",
    [(), ("comm.overlap=true", "comm.micro_batches=2"), ("head.fill_correction=true", "head.impl=reference")],
    ids=["serial", "overlapped", "fill corrected"],
)
def test_a_failed_loss_check_stops_every_rank_before_the_step_lands(tmp_path, overlap):
    """The loss's merge check is read with the step's flags, after the backward: a rank whose
    active rows miss a label it owns must still stop every rank with the loss's error, and
    neither the step nor a checkpoint of it may land. With the fill's correction the offsets
    lose the missing row's too, so the loss, not a misaligned offset, is what fails."""
    run_dir = tmp_path / "lost_label"
    proc = launch(
        run_dir,
        2,
        "head.selection=random",
        "head.budget=30",
        *overlap,
        check=False,
        faults="lost_label@6:1",
        timeout=120,
    )
    assert proc.returncode != 0
    for rank in (0, 1):
        assert re.search(rf"\[rank{rank}\]: ValueError: \d+ label\(s\) of the batch belong to no shard", proc.stderr), (
            proc.stderr[-3000:]
        )
    assert [step for step, _ in complete_checkpoints(run_dir)] == [4]
    assert max(train_losses(run_dir)) == 5


def test_nan_gradient_and_loss_are_skipped_under_skip(reference_run, tmp_path):
    run_dir = tmp_path / "nan_skip"
    launch(run_dir, 2, "train.nonfinite=skip", faults="nan_grad@6:1,nan_loss@7", timeout=120)
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 8, 9, 10, 11, 12]
    assert rows[-1]["skipped_steps"] == 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert_same_losses(run_dir, reference_run, range(1, 6), exact=True)  # identical until the fault


def test_a_skipped_nan_loss_leaves_powersgd_state_clean(tmp_path):
    """PowerSGD's error feedback changes inside the backward and cannot be undone, so a
    non-finite loss must be judged before the backward: the steps after it stay finite."""
    run_dir = tmp_path / "powersgd_skip"
    launch(
        run_dir,
        2,
        "comm.grad_compression=powersgd",
        "comm.powersgd_start_step=2",
        "train.nonfinite=skip",
        "train.max_skipped=3",
        faults="nan_loss@7",
        timeout=120,
    )
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12]
    assert rows[-1]["skipped_steps"] == 1 and all(np.isfinite(r["loss"]) for r in rows)


def test_too_many_skipped_steps_in_a_row_stop(tmp_path):
    run_dir = tmp_path / "nan_limit"
    proc = launch(
        run_dir,
        2,
        "train.nonfinite=skip",
        "train.max_skipped=2",
        check=False,
        faults="nan_loss@5,nan_loss@6",
        timeout=120,
    )
    assert proc.returncode != 0
    assert "2 steps in a row skipped" in proc.stderr


# ----------------------------------------------------------------------------------------
# Bad input: a clear error naming the thing, and nothing written
# ----------------------------------------------------------------------------------------


def _feature_files(folder, bad_label_at=None):
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.save(folder / "features.npy", rng.standard_normal((200, 16)).astype(np.float32))
    labels = rng.integers(0, 101, 200)
    if bad_label_at is not None:
        labels[bad_label_at] = 101
    np.save(folder / "labels.npy", labels)
    return folder


@pytest.mark.parametrize(
    "name,overrides,message",
    [
        ("batch not divisible", ["train.global_batch=47"], "train.global_batch"),
        (
            "missing data folder",
            ["data.kind=features", "data.path=/nonexistent/hydrahead-data"],
            "/nonexistent/hydrahead-data",
        ),
        ("label out of range", ["data.kind=features"], "index 37"),
        ("unknown key", ["head.num_clases=5"], "head.num_classes"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, name, overrides, message):
    run_dir = tmp_path / "run"
    if name == "label out of range":
        overrides = [*overrides, f"data.path={_feature_files(tmp_path / 'feats', bad_label_at=37)}"]
    proc = launch(run_dir, 2, *overrides, check=False, timeout=120)
    assert proc.returncode != 0, name
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not run_dir.exists(), f"{name}: the run folder must not be created"


def test_checkpoint_of_another_embed_dim_is_refused(reference_run, tmp_path):
    run_dir = tmp_path / "other_dim"
    shutil.copytree(reference_run, run_dir)
    proc = launch(run_dir, 1, "model.embed_dim=16", check=False)
    assert proc.returncode != 0 and "model.embed_dim=32 there, 16 now" in proc.stderr


def test_training_writes_nothing_outside_the_run_folder(tmp_path):
    workdir, run_dir = tmp_path / "cwd", tmp_path / "elsewhere" / "run"
    workdir.mkdir()
    launch(run_dir, 2, "train.steps=4", "train.eval_every=2", "log.tensorboard=true", cwd=workdir)
    assert list(workdir.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["run"]


def _image_folder(root, corrupt: bool):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in range(4):
        (root / f"class{label}").mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{label}" / f"{i}.png")
    if corrupt:
        (root / "class2" / "broken.png").write_bytes(b"definitely not a png")
    return root


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_corrupt_image_errors_or_is_skipped_and_counted(tmp_path, policy):
    data = _image_folder(tmp_path / "images", corrupt=True)
    run_dir = tmp_path / "run"
    overrides = [
        "model.backbone=resnet18",
        "data.kind=image_folder",
        f"data.path={data}",
        "data.image_size=16",
        "head.num_classes=4",
        "train.global_batch=8",
        "train.steps=4",
        "train.eval_every=0",
        f"data.on_bad_sample={policy}",
    ]
    proc = launch(run_dir, 2, *overrides, check=False, timeout=180)
    if policy == "error":
        assert proc.returncode != 0 and "broken.png" in proc.stderr
        assert not (run_dir / "checkpoints").exists()
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        # 13 files, 32 samples: two whole epochs meet the broken file, the third part may
        counts = [row["bad_samples_skipped"] for row in metrics(run_dir) if "loss" in row]
        assert counts == sorted(counts) and 2 <= counts[-1] <= 3, counts

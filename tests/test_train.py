"""The trainer through the real launcher: torchrun on gloo, resume, world-size independence."""

from __future__ import annotations

import json
import shutil

import pytest

from hydrahead.train.checkpoint import complete_checkpoints, latest_checkpoint
from launcher import launch, train_losses


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "two_ranks"
    launch(run_dir, 2)
    return run_dir


def test_torchrun_two_ranks_trains_and_writes_its_run_folder(two_rank_run):
    rows = [json.loads(line) for line in (two_rank_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    assert [r["step"] for r in train] == list(range(1, 13))
    for row in train:
        assert {"step", "loss", "lr", "samples_per_s", "head_ms", "peak_mem_mib"} <= row.keys()
    first, last = [r["loss"] for r in train[:3]], [r["loss"] for r in train[-3:]]
    assert sum(last) / 3 < sum(first) / 3 - 1.0, f"loss should fall visibly: {first} ... {last}"
    assert [r["step"] for r in evals] == [6, 12]
    for row in evals:
        assert "loss" not in row and {"eval_top1", "eval_top5", "eval_loss"} <= row.keys()
        assert 0.0 <= row["eval_top1"] <= row["eval_top5"] <= 1.0
    assert (two_rank_run / "config.yaml").is_file()
    assert "num_classes: 101" in (two_rank_run / "config.yaml").read_text()
    # every 4 steps, keep the newest 2
    assert [step for step, _ in complete_checkpoints(two_rank_run)] == [8, 12]


def test_stop_after_then_rerun_gives_identical_losses(two_rank_run, tmp_path):
    run_dir = tmp_path / "resumed"
    launch(run_dir, 2, "train.stop_after=6")
    assert max(train_losses(run_dir)) == 6 and latest_checkpoint(run_dir).name == "step-6"
    launch(run_dir, 2)  # the same command without stop_after continues from step 6
    assert train_losses(run_dir) == train_losses(two_rank_run)


def test_one_rank_matches_two_ranks(two_rank_run, tmp_path):
    run_dir = tmp_path / "one_rank"
    launch(run_dir, 1)
    one, two = train_losses(run_dir), train_losses(two_rank_run)
    assert one.keys() == two.keys()
    for step in one:
        assert one[step] == pytest.approx(two[step], rel=1e-4, abs=1e-5), f"step {step}"


def test_resume_on_three_ranks_from_a_two_rank_checkpoint(two_rank_run, tmp_path):
    run_dir = tmp_path / "resharded"
    launch(run_dir, 2, "train.stop_after=6")
    launch(run_dir, 3)  # 101 classes: 51/50 per rank before, 34/34/33 after
    resumed, uninterrupted = train_losses(run_dir), train_losses(two_rank_run)
    for step in range(7, 13):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-4, abs=1e-5), f"step {step}"


def test_resume_refuses_a_different_model_shape(two_rank_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(two_rank_run, run_dir)
    proc = launch(run_dir, 1, "head.num_classes=102", check=False)
    assert proc.returncode != 0
    assert "head.num_classes=101" in proc.stderr + proc.stdout


def test_interrupted_and_damaged_checkpoints_are_skipped(two_rank_run, tmp_path):
    run_dir = tmp_path / "damaged"
    shutil.copytree(two_rank_run, run_dir)
    root = run_dir / "checkpoints"
    # a save that a kill interrupted: never named step-N, so never a candidate
    shutil.copytree(root / "step-12", root / ".step-16.partial")
    # the newest complete-looking folder has a truncated data file
    data_file = next((root / "step-12").glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:100])
    with pytest.warns(UserWarning, match="step-12.*truncated"):
        assert latest_checkpoint(run_dir).name == "step-8"
    # and the trainer resumes from step 8, reproducing the same losses
    launch(run_dir, 2)
    assert train_losses(run_dir) == train_losses(two_rank_run)


def test_resnet18_on_procedural_images_two_ranks(tmp_path):
    run_dir = tmp_path / "resnet18"
    launch(
        run_dir, 2, "model.backbone=resnet18", "data.kind=procedural_images", "data.image_size=32",
        "train.global_batch=8", "train.steps=3", "train.eval_every=3", "train.eval_samples=16", "checkpoint.every=0",
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(0 < loss < 100 for loss in losses)
    assert any("eval_top1" in r for r in rows)
    assert latest_checkpoint(run_dir).name == "step-3"


def test_tensorboard_scalars_match_metrics_file(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run_dir = tmp_path / "tb"
    launch(run_dir, 1, "log.tensorboard=true", "train.steps=4", "train.eval_every=4")
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("loss")}
    assert logged.keys() == train_losses(run_dir).keys()
    for step, value in train_losses(run_dir).items():
        assert logged[step] == pytest.approx(value, rel=1e-6)
    assert [e.step for e in events.Scalars("eval_top1")] == [4]


def test_compiled_backbone_trains_like_eager(tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    short = ["train.steps=3", "train.eval_every=0"]
    launch(eager, 1, *short)
    launch(compiled, 1, *short, "model.compile=true")
    for step, loss in train_losses(eager).items():
        assert train_losses(compiled)[step] == pytest.approx(loss, rel=1e-4), f"step {step}"


def test_triton_head_follows_the_reference_curve(two_rank_run, tmp_path):
    """head.impl=triton (fused update in the backward; the interpreter on CPU) vs reference."""
    run_dir = tmp_path / "triton"
    launch(run_dir, 2, "head.impl=triton", "head.weight_dtype=fp32")
    fused, reference = train_losses(run_dir), train_losses(two_rank_run)
    assert fused.keys() == reference.keys()
    for step in fused:
        assert fused[step] == pytest.approx(reference[step], rel=1e-4), f"step {step}"

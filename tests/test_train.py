"""The trainer through the real launcher: torchrun on gloo, resume, world-size independence."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from dist_harness import run_ranks
from launcher import finish, launch, launch_together, saved_backbone, start, train_losses

from hydrahead.config import load_config
from hydrahead.distributed.collectives import average_buffers
from hydrahead.distributed.setup import DistEnv
from hydrahead.train.checkpoint import complete_checkpoints, latest_checkpoint
from hydrahead.train.trainer import Trainer


@pytest.fixture(scope="module")
def two_rank_run(tiny_two_rank_run):
    return tiny_two_rank_run  # the session's (conftest.py); tests that change it take a copy


@pytest.fixture(scope="module")
def stopped_at_step_6(tmp_path_factory):
    """The same 2-rank run stopped after step 6; each test resumes its own copy."""
    run_dir = tmp_path_factory.mktemp("runs") / "stopped"
    launch(run_dir, 2, "train.stop_after=6")
    return run_dir


@pytest.fixture(scope="module")
def one_rank_runs(two_rank_run, tmp_path_factory):
    """The 1-rank launches of three tests below, started together (a launch of one rank
    leaves a core idle for much of its time): name -> (run folder, finished process)."""
    root = tmp_path_factory.mktemp("one_rank")
    shutil.copytree(two_rank_run, root / "copy")
    runs = {
        "plain": (root / "one_rank",),
        "other_shape": (root / "copy", "head.num_classes=102"),
        "tensorboard": (root / "tb", "log.tensorboard=true", "train.steps=4", "train.eval_every=4"),
    }
    done = finish(*(start(run_dir, 1, *overrides) for run_dir, *overrides in runs.values()), check=False)
    return {name: (run[0], proc) for (name, run), proc in zip(runs.items(), done)}


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
        # 16 of 100 negatives: at least their uniform share, at most all of it
        assert 0.16 <= row["eval_hard_negative_share"] <= 1.0
    assert (two_rank_run / "config.yaml").is_file()
    assert "num_classes: 101" in (two_rank_run / "config.yaml").read_text()
    # every 4 steps, keep the newest 2
    assert [step for step, _ in complete_checkpoints(two_rank_run)] == [8, 12]


def test_stop_after_then_rerun_gives_identical_losses(two_rank_run, stopped_at_step_6, tmp_path):
    run_dir = tmp_path / "resumed"
    shutil.copytree(stopped_at_step_6, run_dir)
    assert max(train_losses(run_dir)) == 6 and latest_checkpoint(run_dir).name == "step-6"
    launch(run_dir, 2)  # the same command without stop_after continues from step 6
    assert train_losses(run_dir) == train_losses(two_rank_run)


def test_one_rank_matches_two_ranks(two_rank_run, one_rank_runs):
    run_dir, proc = one_rank_runs["plain"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = train_losses(run_dir), train_losses(two_rank_run)
    assert one.keys() == two.keys()
    for step in one:
        assert one[step] == pytest.approx(two[step], rel=1e-4, abs=1e-5), f"step {step}"


def test_resume_on_three_ranks_from_a_two_rank_checkpoint(two_rank_run, stopped_at_step_6, tmp_path):
    run_dir = tmp_path / "resharded"
    shutil.copytree(stopped_at_step_6, run_dir)
    launch(run_dir, 3)  # 101 classes: 51/50 per rank before, 34/34/33 after
    resumed, uninterrupted = train_losses(run_dir), train_losses(two_rank_run)
    for step in range(7, 13):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-4, abs=1e-5), f"step {step}"


def test_resume_refuses_a_different_model_shape(one_rank_runs):
    _, proc = one_rank_runs["other_shape"]  # on a copy of the 2-rank run
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
    resnet = [
        "model.backbone=resnet18",
        "data.kind=procedural_images",
        "data.image_size=32",
        "train.global_batch=8",
        "train.steps=3",
        "train.eval_every=3",
        "train.eval_samples=16",
        "checkpoint.every=0",
    ]
    broadcast, per_rank = tmp_path / "broadcast", tmp_path / "per_rank"
    # The second run (per-rank BatchNorm statistics, checked below) beside the first.
    launch_together(
        (broadcast, 2, *resnet), (per_rank, 2, *resnet, "model.broadcast_buffers=false", "train.eval_every=0")
    )
    rows = [json.loads(line) for line in (broadcast / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(0 < loss < 100 for loss in losses)
    assert any("eval_top1" in r for r in rows)
    assert latest_checkpoint(broadcast).name == "step-3"

    # Per-rank BatchNorm statistics: the same losses (training forwards use batch statistics),
    # and the checkpoint holds the ranks' mean rather than rank 0's copy.
    assert train_losses(per_rank) == train_losses(broadcast)
    rank0, mean = saved_backbone(latest_checkpoint(broadcast)), saved_backbone(latest_checkpoint(per_rank))
    stats = [name for name in rank0 if name.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(rank0[name], mean[name]) for name in stats)


def test_average_buffers_gives_every_rank_the_mean():
    per_rank, averaged = zip(*run_ranks(_average_buffers_on_rank, 3))
    for name, value in averaged[0].items():
        if value.is_floating_point():
            expected = torch.stack([stats[name] for stats in per_rank]).mean(dim=0)
            assert not torch.equal(per_rank[0][name], expected)  # the ranks did differ
            for stats in averaged:
                torch.testing.assert_close(stats[name], expected, rtol=1e-6, atol=0)
        else:  # integer buffers (the batch counters, made to differ by rank) keep each rank's own
            assert len({int(stats[name]) for stats in per_rank}) == len(per_rank)
            for before, after in zip(per_rank, averaged):
                assert torch.equal(after[name], before[name])


def test_evaluation_averages_per_rank_batchnorm_statistics():
    before, after = zip(*run_ranks(_evaluate_on_rank, 2))
    for name, value in after[0].items():
        if value.is_floating_point():
            for stats in after:
                torch.testing.assert_close(stats[name], (before[0][name] + before[1][name]) / 2, rtol=1e-6, atol=1e-7)


def _evaluate_on_rank(rank, world_size):
    cfg = load_config(
        None,
        [
            "model.backbone=resnet18",
            "data.kind=procedural_images",
            "data.image_size=32",
            "train.global_batch=8",
            "train.eval_every=1",
            "train.eval_samples=8",
            "model.broadcast_buffers=false",
        ],
    )
    trainer = Trainer(cfg, DistEnv(rank, world_size, rank, torch.device("cpu"), "gloo", None, None))
    with torch.no_grad():  # statistics that differ by rank, as training would leave them
        for buf in trainer.backbone_module.buffers():
            if buf.is_floating_point():
                buf.add_(torch.rand(buf.shape, generator=torch.Generator().manual_seed(rank)))
    before = {name: b.clone() for name, b in trainer.backbone_module.named_buffers()}
    trainer.evaluate()
    return before, dict(trainer.backbone_module.named_buffers())


def test_evaluation_leaves_samples_with_an_ignored_label_out_of_every_metric(tmp_path):
    """Each held-out batch twice, the copy with every label ignored: the same metrics, 2 ranks."""
    for plain, doubled in run_ranks(_evaluation_with_ignored_copies_on_rank, 2, str(tmp_path)):
        assert doubled.keys() == plain.keys() >= {"eval_top1", "eval_top5", "eval_loss", "eval_hard_negative_share"}
        assert plain["eval_top5"] > 0 and plain["eval_hard_negative_share"] > 0
        for key, value in plain.items():
            assert doubled[key] == pytest.approx(value, rel=1e-9), key


def _evaluation_with_ignored_copies_on_rank(rank, world_size, root):
    trainer = _tiny_trainer(rank, world_size, root)
    plain = trainer.evaluate()

    def with_ignored_copies(inputs, labels):
        yield inputs, labels
        yield inputs, torch.full_like(labels, trainer.head.ignore_index)

    doubled = _evaluate_with(trainer, with_ignored_copies)
    trainer.selector.close()
    return plain, doubled


def _tiny_trainer(rank, world_size, root):
    from launcher import TINY

    cfg = load_config(None, [f"run.dir={root}", *TINY])
    return Trainer(cfg, DistEnv(rank, world_size, rank, torch.device("cpu"), "gloo", None, None))


def _evaluate_with(trainer, rebatch):
    """``trainer.evaluate()`` on the batches that ``rebatch(inputs, labels)`` yields for each held-out batch."""
    import hydrahead.train.trainer as trainer_module

    original = trainer_module.eval_batches

    def rebatched(*args, **kwargs):
        for inputs, labels in original(*args, **kwargs):
            yield from rebatch(inputs, labels)

    trainer_module.eval_batches = rebatched
    try:
        return trainer.evaluate()
    finally:
        trainer_module.eval_batches = original


def test_evaluation_is_the_same_on_one_and_two_ranks_with_some_labels_ignored(tmp_path):
    """Samples with odd labels ignored, so the ranks hold uneven labelled counts: each batch's
    loss must be weighted by its labelled samples, not by rank."""
    (one,) = run_ranks(_evaluation_with_odd_labels_ignored_on_rank, 1, str(tmp_path / "one"))
    two = run_ranks(_evaluation_with_odd_labels_ignored_on_rank, 2, str(tmp_path / "two"))
    assert two[0] == two[1]
    assert one.keys() >= {"eval_top1", "eval_top5", "eval_loss", "eval_hard_negative_share"}
    assert 0 < one["eval_top5"] < 1 and one["eval_loss"] > 0
    for key, value in one.items():
        assert two[0][key] == pytest.approx(value, rel=1e-5), key


def _evaluation_with_odd_labels_ignored_on_rank(rank, world_size, root):
    trainer = _tiny_trainer(rank, world_size, root)

    def odd_labels_ignored(inputs, labels):
        yield inputs, torch.where(labels % 2 == 1, trainer.head.ignore_index, labels)

    result = _evaluate_with(trainer, odd_labels_ignored)
    trainer.selector.close()
    return result


def test_trainer_builds_and_steps_a_vit_with_wta_crs():
    sampled, loss = run_ranks(_wta_crs_step_on_rank, 1)[0]
    assert sampled == [0.3] * 4 * 12  # qkv, proj and the MLP's two in every block of vit_tiny
    assert 0 < loss < 100


def _wta_crs_step_on_rank(rank, world_size):
    from hydrahead.data.build import batches
    from hydrahead.models import WTACRSLinear

    cfg = load_config(
        None,
        [
            "model.backbone=vit_tiny",
            "data.kind=procedural_images",
            "data.image_size=32",
            "train.global_batch=8",
            "model.wta_crs_keep=0.3",
        ],
    )
    trainer = Trainer(cfg, DistEnv(rank, world_size, rank, torch.device("cpu"), "gloo", None, None))
    sampled = [m.keep for m in trainer.backbone_module.modules() if isinstance(m, WTACRSLinear)]
    data = batches(trainer.train_data, start_step=0, global_batch=8, rank=rank, world_size=world_size)
    result = trainer.train_step(*next(data), timed=False)
    data.close()
    trainer.selector.close()
    return sampled, float(result["loss"])


def test_samples_per_s_leaves_out_evaluation_time(tmp_path):
    # Evaluation after step 2 takes a second; the interval logged at step 3 must not hold it.
    rows = run_ranks(_slow_evaluation_on_rank, 1, str(tmp_path / "run"))[0]
    train = {r["step"]: r for r in rows if "loss" in r}
    assert [r["step"] for r in rows if "eval_top1" in r] == [2, 4]
    interval_s = 48 / train[3]["samples_per_s"]  # one step of 48 samples
    assert interval_s < 0.5, f"step 3's interval took {interval_s:.2f} s: the evaluation's second counted"


def _slow_evaluation_on_rank(rank, world_size, run_dir):
    import time

    from launcher import TINY

    cfg = load_config(None, [f"run.dir={run_dir}", *TINY, "train.steps=4", "train.eval_every=2", "checkpoint.every=0"])
    trainer = Trainer(cfg, DistEnv(rank, world_size, rank, torch.device("cpu"), "gloo", None, None))

    def slow_evaluate():
        time.sleep(1.0)
        return {"eval_top1": 0.0, "eval_top5": 0.0, "eval_loss": 0.0}

    trainer.evaluate = slow_evaluate
    trainer.train()
    return [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("gc_every", [2, 0])
def test_garbage_collection_runs_between_steps_not_inside_them(tmp_path, gc_every):
    """train.gc_every=2: automatic collection off during the steps, the young generations
    collected after steps 2 and 4, all of them after the evaluation at 4 and the final
    checkpoint at 5, automatic collection back on afterwards; 0 leaves it on throughout."""
    inside, collections, enabled_after = run_ranks(_collections_on_rank, 1, str(tmp_path / "run"), gc_every)[0]
    assert enabled_after
    if gc_every == 0:
        assert all(inside)
        return
    assert inside and not any(inside), "automatic collection was on during a step"
    assert not [c for c in collections if c[2]], f"a collection ran inside a step: {collections}"
    young = sorted({step for step, generation, _ in collections if generation == 1})
    full = sorted({step for step, generation, _ in collections if generation == 2})
    assert young == [2, 4], collections
    assert {4, 5} <= set(full), collections


def test_garbage_collection_is_back_on_when_training_fails(tmp_path):
    inside, _, enabled_after = run_ranks(_collections_on_rank, 1, str(tmp_path / "run"), 2, 2)[0]
    assert inside == [False, False]  # the second step raised
    assert enabled_after


def _collections_on_rank(rank, world_size, run_dir, gc_every, fail_at_step=None):
    """(automatic collection on, per step; (step, generation, inside a step) of each
    collection; on after train()). ``fail_at_step``: that step raises, train() with it."""
    import gc

    from launcher import TINY

    cfg = load_config(
        None,
        [
            f"run.dir={run_dir}",
            *TINY,
            "train.steps=5",
            "train.eval_every=4",
            "checkpoint.every=0",
            f"train.gc_every={gc_every}",
        ],
    )
    trainer = Trainer(cfg, DistEnv(rank, world_size, rank, torch.device("cpu"), "gloo", None, None))
    inside, collections, stepping = [], [], [False]
    step = trainer.train_step

    def recording_step(*args, **kwargs):
        inside.append(gc.isenabled())
        if trainer.step + 1 == fail_at_step:
            raise RuntimeError(f"step {fail_at_step} failed")
        stepping[0] = True
        try:
            return step(*args, **kwargs)
        finally:
            stepping[0] = False

    def record(phase, info):
        if phase == "start":
            collections.append((trainer.step, info["generation"], stepping[0]))

    trainer.train_step = recording_step
    gc.callbacks.append(record)
    try:
        trainer.train()
    except RuntimeError as failure:
        if str(failure) != f"step {fail_at_step} failed":
            raise
    finally:
        gc.callbacks.remove(record)
    return inside, collections, gc.isenabled()


def _average_buffers_on_rank(rank, world_size):
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.BatchNorm1d(6)
    )
    module = module.double()
    with torch.no_grad():
        module(torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(rank)) * (rank + 1))
        for counter in (module[1].num_batches_tracked, module[3].num_batches_tracked):
            counter += rank
    # a buffer that requires grad (the average runs outside autograd; in place on it would not)
    module.register_buffer("gain", torch.full((3,), float(rank + 1), dtype=torch.float64, requires_grad=True))
    before = {name: b.detach().clone() for name, b in module.named_buffers()}
    assert average_buffers(module) == 5
    return before, {name: b.detach() for name, b in module.named_buffers()}


def test_tensorboard_scalars_match_metrics_file(one_rank_runs):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run_dir, proc = one_rank_runs["tensorboard"]
    assert proc.returncode == 0, proc.stderr[-3000:]
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
    launch_together((eager, 1, *short), (compiled, 1, *short, "model.compile=true"))
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


class _Cycle:
    def __init__(self):
        self.me = self


def test_startup_objects_frozen_hides_what_existed_before_and_collects_what_came_after():
    """Inside, an object from before the freeze is out of the collector's reach (its cycle
    outlives a full collection) while the run's own cyclic garbage is collected; on exit the
    earlier object is collected too. Objects frozen by someone else stay theirs."""
    import gc
    import weakref

    from hydrahead.train.collector import startup_objects_frozen

    assert gc.get_freeze_count() == 0
    before = _Cycle()
    before_ref = weakref.ref(before)
    with startup_objects_frozen():
        assert gc.get_freeze_count() > 0
        after = _Cycle()
        after_ref = weakref.ref(after)
        del before, after
        gc.collect()
        assert after_ref() is None, "the run's own cyclic garbage was not collected"
        assert before_ref() is not None, "an object from before the freeze was walked"
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert before_ref() is None
    with startup_objects_frozen(enabled=False):
        assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with startup_objects_frozen():
            pass
        assert gc.get_freeze_count() == frozen  # not unfrozen by the inner call
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("gc_every", [50, 0])
def test_the_trainer_runs_with_the_imports_frozen_unless_the_collector_is_left_alone(monkeypatch, gc_every):
    import gc

    import hydrahead.distributed.setup as setup
    import hydrahead.train.trainer as trainer_module
    from launch import train as train_script  # the repository is on the path (launcher)

    seen = []

    class Recording:
        def __init__(self, cfg, env):
            pass

        def train(self):
            seen.append(gc.get_freeze_count())

    monkeypatch.setattr(setup, "init_distributed", lambda backend, timeout: None)
    monkeypatch.setattr(setup, "destroy_distributed", lambda: None)
    monkeypatch.setattr(trainer_module, "Trainer", Recording)
    assert train_script.main([f"train.gc_every={gc_every}"]) == 0
    assert len(seen) == 1 and (seen[0] > 0) == (gc_every > 0)
    assert gc.get_freeze_count() == 0


def test_step_collector_runs_a_full_collection_every_full_every_steps_and_lets_forks_collect():
    """Between steps, every FULL_EVERY-th collection is a full one; a process forked while the
    collector holds automatic collection off (a data loader worker) collects automatically;
    close restores it once."""
    import gc
    import os

    from hydrahead.train.collector import FULL_EVERY, StepGarbageCollector

    generations = []

    def record(phase, info):
        if phase == "start":
            generations.append(info["generation"])

    collector = StepGarbageCollector(1)
    gc.callbacks.append(record)
    try:
        for step in range(1, FULL_EVERY + 1):
            collector.after_step(step)
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the child reports and leaves at once
            os.write(write, b"1" if gc.isenabled() else b"0")
            os._exit(0)
        os.waitpid(child, 0)
        in_child = os.read(read, 1)
        os.close(read)
        os.close(write)
        assert not gc.isenabled()
    finally:
        gc.callbacks.remove(record)
        collector.close()
        collector.close()
    assert generations == [1] * (FULL_EVERY - 1) + [2]
    assert in_child == b"1", "a process forked under the collector kept automatic collection off"
    assert gc.isenabled()

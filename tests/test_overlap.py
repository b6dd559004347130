"""comm.overlap: the micro-batched head step against the whole-batch path.

Multi-rank checks run the reference head in float64 on gloo; the fused kernels' micro-batch
engine is checked against their single call in one process (Triton's interpreter, fp32).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks
from launcher import launch_together, metrics

from hydrahead.comm.overlap import OverlappedHead, global_rows, micro_batch_bounds
from hydrahead.comm.timing import CommClock, union_ms
from hydrahead.distributed.collectives import Pending, all_gather_features
from hydrahead.distributed.sharded_softmax import MergeChecks
from hydrahead.head import ShardedClassifier
from hydrahead.kernels import SGDUpdate, triton_sharded_cross_entropy
from hydrahead.kernels.fused_loss import FusedMicroBatches

LOCAL_BATCH, DIM, NUM_CLASSES = 7, 6, 23
MARGINS = {"none": (2.0, 0.0), "cosface": (8.0, 0.2), "arcface": (8.0, 0.3)}


def test_micro_batches_cover_the_batch_in_near_equal_slices():
    assert micro_batch_bounds(7, 3) == [(0, 2), (2, 4), (4, 7)]
    assert micro_batch_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="micro_batches"):
        micro_batch_bounds(3, 4)
    assert global_rows(1, 3, 5, 3, "cpu").tolist() == [1, 2, 6, 7, 11, 12]


def test_union_counts_overlapping_intervals_once():
    assert union_ms([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == pytest.approx(4.0)
    assert union_ms([]) == 0.0


class _SlowWork:
    """A collective stand-in that completes ``delay`` seconds after it is issued (another thread)."""

    def __init__(self, delay: float):
        self.future = torch.futures.Future()
        threading.Timer(delay, lambda: self.future.set_result(None)).start()

    def get_future(self):
        return self.future

    def wait(self):
        self.future.wait()


def test_clock_separates_a_collectives_own_time_from_the_wait_it_causes():
    clock = CommClock(torch.device("cpu"))
    clock.enabled = True
    hidden = clock.start("feature_gather", lambda: Pending(_SlowWork(0.05), lambda: torch.ones(1)))
    time.sleep(0.15)  # compute outlasts the transfer: nothing left to wait for
    assert hidden.wait().item() == 1
    exposed = clock.start("grad_scatter", lambda: Pending(_SlowWork(0.05), lambda: torch.ones(1)))
    exposed.wait()  # waited for at once: all of it is exposed
    timing = clock.take()
    assert 45 <= timing["ms_feature_gather"] < 140 and timing["ms_feature_gather_waited"] < 10
    assert 45 <= timing["ms_grad_scatter"] < 140
    assert timing["ms_grad_scatter_waited"] == pytest.approx(timing["ms_grad_scatter"], rel=0.2)
    busy = timing["ms_feature_gather"] + timing["ms_grad_scatter"]
    assert timing["comm_hidden"] == pytest.approx(1 - timing["ms_grad_scatter_waited"] / busy, abs=0.05)
    assert 0.3 < timing["comm_hidden"] < 0.7
    assert clock.take() == {}  # taken once


def _make_head(margin_type, world_size):
    scale, margin = MARGINS[margin_type]
    return ShardedClassifier(
        NUM_CLASSES,
        DIM,
        seed=3,
        init_std=0.3,
        margin_type=margin_type,
        scale=scale,
        margin=margin,
        dtype=torch.float64,
        momentum=0.9,
        weight_decay=1e-3,
        chunk_size=4,
    )


def _inputs(rank, world_size, seed):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(world_size * LOCAL_BATCH, DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (world_size * LOCAL_BATCH,), generator=gen)
    labels[3::5] = -100
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return features[rows].clone(), labels[rows].clone(), labels


def _selection(head, global_labels):
    """Active rows: the shard's rows owning a label of the batch, plus every third row."""
    local = global_labels[global_labels >= 0] - head.class_start
    owned = local[(local >= 0) & (local < head.num_local_classes)]
    return torch.unique(torch.cat([owned, torch.arange(0, head.num_local_classes, 3)]))


def _offsets(head, active):
    """Per active row, a logit offset (as head.fill_correction's): the same on every call."""
    gen = torch.Generator().manual_seed(17 + head.class_start)
    return torch.rand(head.num_local_classes, generator=gen, dtype=torch.float64)[active] * 2


def _step_worker(rank, world_size, margin_type, micro_batches, selected, offsets=False):
    torch.manual_seed(0)
    transfer = dist.new_group(list(range(world_size)))
    out = {}
    for name in ("whole", "overlap"):
        head = _make_head(margin_type, world_size)
        head.set_lr(0.1)
        features, labels, global_labels = _inputs(rank, world_size, seed=11)
        features.requires_grad_()
        if name == "whole":
            gathered = all_gather_features(features)
            active = _selection(head, global_labels) if selected else None
            offset = _offsets(head, active) if offsets else None
            loss = head.loss(gathered, global_labels, active, logit_offset=offset)
            loss.backward()
            local_grad, payload = features.grad, None
        else:
            clock = CommClock(torch.device("cpu"))
            clock.enabled = True
            pipeline = OverlappedHead(head, micro_batches, transfer, clock)

            def select(_features, y, head=head):
                active = _selection(head, y)
                return active, (_offsets(head, active) if offsets else None)

            select = select if selected else None
            checks = MergeChecks()
            loss, local_grad, payload, pending = pipeline.step(features, labels, select, checks=checks)
            assert pending is checks  # the reference head's step waits in .grad: its loss is judged by the caller
            checks.raise_if_failed(checks.values(loss.device).tolist())
            out["timing"] = clock.take()
        out[name] = {"loss": loss.detach(), "df": local_grad, "dw": head.pending_grad.clone()}
        head.finish_step()
        out[name]["weight"] = head.weight.detach().clone()
        out[name]["momentum"] = head.momentum_buffer.clone()
    out["payload"] = payload
    return out


@pytest.mark.parametrize(
    "world_size,margin_type,micro_batches,selected,offsets",
    [
        (2, "none", 3, False, False),
        (3, "cosface", 2, False, False),
        (2, "arcface", 7, False, False),
        (2, "cosface", 3, True, False),
        (3, "none", 1, True, False),
        (2, "cosface", 3, True, True),  # head.fill_correction's offsets ride with the active rows
    ],
)
def test_overlapped_step_equals_the_whole_batch_step(world_size, margin_type, micro_batches, selected, offsets):
    results = run_ranks(_step_worker, world_size, margin_type, micro_batches, selected, offsets)
    for rank, out in enumerate(results):
        whole, overlap = out["whole"], out["overlap"]
        for key in ("loss", "df", "dw", "weight", "momentum"):
            torch.testing.assert_close(overlap[key], whole[key], rtol=1e-12, atol=1e-14, msg=f"rank {rank}: {key}")
        assert overlap["df"].abs().sum() > 0 and overlap["dw"].abs().sum() > 0
        # The payload: this rank's features and labels out, the global batch's gradient rows in.
        assert out["payload"] == {
            "bytes_feature_gather": LOCAL_BATCH * (DIM * 8 + 8),
            "bytes_grad_scatter": world_size * LOCAL_BATCH * DIM * 8,
        }
        timing = out["timing"]
        for kind in ("feature_gather", "grad_scatter"):
            assert timing[f"ms_{kind}"] >= timing[f"ms_{kind}_waited"] >= 0
        assert 0 <= timing["comm_hidden"] <= 1


# ----------------------------------------------------------------------------------------
# The fused kernels' engine, in one process
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "margin_type,grad_filter,offsets",
    [
        ("none", 0.0, False),
        ("cosface", 0.0, False),
        ("none", 1e-3, False),
        ("cosface", 1e-3, False),
        ("none", 0.0, True),  # head.fill_correction's offsets, on the exact gemm kernels
        ("cosface", 0.0, True),
    ],
)
def test_fused_micro_batches_equal_the_single_call(margin_type, grad_filter, offsets):
    gen = torch.Generator().manual_seed(5)
    batch, dim, classes = 29, 24, 53
    features = torch.randn(batch, dim, generator=gen)
    weight = torch.randn(classes, dim, generator=gen) * 0.3
    labels = torch.randint(0, classes, (batch,), generator=gen)
    labels[::6] = -100
    scale, margin = MARGINS[margin_type]
    options = dict(scale=scale, margin=margin, margin_type=margin_type, grad_filter=grad_filter)
    if offsets:
        options.update(exact_kernels="gemm", logit_offset=torch.rand(classes, generator=gen) * 3)

    def update(buffer):
        return SGDUpdate(0.5, 0.9, 1e-3, buffer)

    w_whole, buf_whole = weight.clone(), torch.randn(classes, dim, generator=gen) * 0.01
    w_micro, buf_micro = w_whole.clone(), buf_whole.clone()
    f = features.clone().requires_grad_()
    loss = triton_sharded_cross_entropy(f, w_whole, labels, 0, update=update(buf_whole), **options)
    loss.backward()

    engine = FusedMicroBatches(w_micro, labels, 0, update=update(buf_micro), **options)
    if offsets:  # the filtered kernels take no offsets: refused, not dropped
        with pytest.raises(ValueError, match="exact gemm kernels only"):
            FusedMicroBatches(w_micro, labels, 0, **{**options, "grad_filter": 1e-3})
    loss_sum, grads = torch.zeros(()), torch.empty_like(features)
    for start, stop in micro_batch_bounds(batch, 3):
        rows = torch.arange(start, stop)
        chunk_loss, grads[start:stop] = engine.chunk(features[start:stop], rows)
        loss_sum += chunk_loss
    engine.finish()
    checks = MergeChecks()
    engine.check(checks)  # handed over, not read: the valid count stays on the device
    values = checks.values(features.device).tolist()
    assert values == [0.0, float((labels >= 0).sum()), float((labels >= 0).sum())]
    checks.raise_if_failed(values)

    torch.testing.assert_close(loss_sum / engine.num_valid, loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, f.grad, rtol=1e-4, atol=1e-6)
    assert not torch.equal(w_micro, weight)  # the update happened, once: it matches the single call's
    torch.testing.assert_close(w_micro, w_whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(buf_micro, buf_whole, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# The trainer, end to end
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        (),
        ("head.impl=triton", "head.weight_dtype=fp32", "head.selection=random", "head.budget=30"),
        (
            "head.impl=triton",
            "head.weight_dtype=fp32",
            "head.exact_kernels=gemm",
            "head.selection=random",
            "head.budget=30",
            "head.fill_correction=true",
        ),
    ],
    ids=["reference", "triton-active", "triton-fill-corrected"],
)
def test_training_with_overlap_follows_the_whole_batch_run(tmp_path, head):
    """The overlapped head in training, against the whole-batch one: with the fused kernels
    over active rows its checks and finiteness are left to the step's one read."""
    common = (
        "train.eval_every=0",
        "train.steps=6",
        "checkpoint.every=0",
        "head.margin_type=none",
        "head.scale=1",
        *head,
    )
    launch_together(
        (tmp_path / "whole", 2, *common),
        (tmp_path / "overlap", 2, *common, "comm.overlap=true", "comm.micro_batches=3"),
    )
    whole = [row for row in metrics(tmp_path / "whole") if "loss" in row]
    overlap = [row for row in metrics(tmp_path / "overlap") if "loss" in row]
    assert [row["step"] for row in overlap] == [row["step"] for row in whole] == list(range(1, 7))
    for a, b in zip(whole, overlap):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["bytes_grad_scatter"] == a["bytes_grad_scatter"] > 0
        assert b["bytes_feature_gather"] == a["bytes_feature_gather"] > 0
        assert 0 <= b["comm_hidden"] <= 1 and b["ms_feature_gather"] >= b["ms_feature_gather_waited"]
    assert overlap[-1]["loss"] < overlap[0]["loss"]

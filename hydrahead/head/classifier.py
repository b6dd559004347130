"""ShardedClassifier: the class-sharded fully-connected head as an nn.Module."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from hydrahead.counter_rng import counter_normal, counter_uniform
from hydrahead.distributed.collectives import (
    all_gather_features,
    all_gather_labels,
    gather_row_counts,
    group_rank,
    group_world_size,
)
from hydrahead.distributed.sharded_softmax import MARGIN_TYPES, MergeChecks
from hydrahead.distributed.sharding import shard_range
from hydrahead.head.cross_entropy import DEFAULT_CHUNK_SIZE, MicroBatches, ShardProblem, sharded_cross_entropy
from hydrahead.optim.deferred_sgd import MAX_LAG, DeferredSGD
from hydrahead.optim.low_precision import LowPrecisionUpdate, check_rounding
from hydrahead.optim.low_precision import round_to_storage as round_to_storage_torch

INIT_KINDS = ("normal", "uniform")
IMPLS = ("reference", "triton")
INACTIVE_ROWS = ("continue", "frozen")
_INIT_STREAM = 1000  # counter-hash stream reserved for head weights (data streams are small ints)
_INIT_BLOCK_ROWS = 1 << 16  # rows initialised per pass: bounds the temporary hash tensors


@torch.no_grad()
def init_class_weights(
    weight: torch.Tensor, class_start: int, *, seed: int, init: str = "normal", std: float = 0.01
) -> None:
    """Fill ``weight`` (rows = classes ``class_start ..``) from (seed, class id) alone.

    Row c is the same whichever rank owns it and however many ranks there are, and only
    one block of rows exists in a temporary at a time, so a 100M-class head is initialised
    without the full matrix anywhere. ``normal``: N(0, std^2); ``uniform``: U(-a, a) with
    the same standard deviation (a = std * sqrt(3)).
    """
    if init not in INIT_KINDS:
        raise ValueError(f"init must be one of {INIT_KINDS}, got {init!r}")
    num_rows, dim = weight.shape
    for start in range(0, num_rows, _INIT_BLOCK_ROWS):
        stop = min(start + _INIT_BLOCK_ROWS, num_rows)
        class_ids = torch.arange(class_start + start, class_start + stop, device=weight.device)
        if init == "normal":
            block = counter_normal(seed, _INIT_STREAM, class_ids, dim).mul_(std)
        else:
            entry_ids = class_ids[:, None] * dim + torch.arange(dim, device=weight.device)
            block = counter_uniform(seed, _INIT_STREAM, entry_ids).mul_(2.0).sub_(1.0).mul_(std * 3.0**0.5)
        weight[start:stop].copy_(block)


def round_to_storage(exact, dtype, class_ids, how: LowPrecisionUpdate, compensation=None) -> torch.Tensor:
    """``hydrahead.optim.low_precision.round_to_storage``; on a GPU, float32 rows without
    compensation take the one-launch kernel that rounds them bit for bit the same way."""
    if (
        exact.is_cuda
        and compensation is None
        and exact.dtype == torch.float32
        and dtype in (torch.bfloat16, torch.float8_e4m3fn)
    ):
        from hydrahead.kernels.rounding import round_rows

        return round_rows(exact, dtype, class_ids, how)
    return round_to_storage_torch(exact, dtype, class_ids, how, compensation)


@torch.no_grad()
def _sgd_step_(weight, grad, buffer, lr, momentum, weight_decay) -> None:
    """torch.optim.SGD's step in place (weight decay added to the gradient, no dampening)."""
    step = grad.add(weight, alpha=weight_decay) if weight_decay else grad
    if buffer is not None:
        buffer.mul_(momentum).add_(step)
        step = buffer
    weight.add_(step.to(weight.dtype), alpha=-lr)


class ActiveCopies(NamedTuple):
    """A loss over active rows, until ``finish_step``: the rows (sorted local row numbers)
    and the copies of their weight, momentum and compensation that the step updates."""

    rows: torch.Tensor
    weight: torch.Tensor
    momentum: torch.Tensor | None
    compensation: torch.Tensor | None


class ShardedClassifier(nn.Module):
    """Owns this rank's weight shard (C_r x D), its class range, the process group, and its SGD.

    ``forward(local_features, local_labels)`` gathers the global batch itself and returns
    the global-mean cross-entropy (the same scalar on every rank); ``predict`` returns an
    exact top-k over all shards with global class ids.

    The head trains itself with torch.optim.SGD's rule (weight decay added to the gradient,
    momentum buffer, no dampening, no Nesterov) at the LR given by ``set_lr`` each step:
    with ``impl="triton"`` the step happens inside the loss's backward and no weight
    gradient exists; with ``impl="reference"`` ``finish_step()`` applies it from ``.grad``.
    Either way, exactly one update per backward of the loss.
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        *,
        group: dist.ProcessGroup | None = None,
        seed: int = 0,
        init: str = "normal",
        init_std: float = 0.01,
        margin_type: str = "none",
        scale: float = 1.0,
        margin: float = 0.0,
        ignore_index: int = -100,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        impl: str = "reference",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        momentum_dtype: torch.dtype = torch.float32,
        grad_filter: float = 0.0,
        inactive_rows: str = "continue",
        settle_every: int | None = None,
        rounding: str = "nearest",
        kahan_dtype: torch.dtype | None = None,
        unit_scaling: bool = False,
        exact_kernels: str = "auto",
        cuda_graph: bool = False,
    ):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if inactive_rows not in INACTIVE_ROWS:
            raise ValueError(f"inactive_rows must be one of {INACTIVE_ROWS}, got {inactive_rows!r}")
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        if margin_type not in MARGIN_TYPES:
            raise ValueError(f"margin_type must be one of {MARGIN_TYPES}, got {margin_type!r}")
        self.group = group
        self.world_size, self.rank = group_world_size(group), group_rank(group)
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.class_start, self.class_stop = shard_range(num_classes, self.world_size, self.rank)
        # Unit scaling: rows at unit variance (they use a low-precision format's range, not
        # its subnormals), and the 1/sqrt(D) that keeps logits O(1) moves into the logit scale.
        self.unit_scaling = unit_scaling
        self.seed, self.init, self.init_std = seed, init, 1.0 if unit_scaling else init_std
        self.margin_type, self.scale, self.margin = margin_type, scale, margin
        # Cosine logits do not depend on the rows' scale: only the plain inner product is rescaled.
        self.logit_scale = scale / embed_dim**0.5 if unit_scaling and margin_type == "none" else scale
        self.ignore_index, self.chunk_size = ignore_index, chunk_size
        self.weight = nn.Parameter(torch.empty(self.num_local_classes, embed_dim, dtype=dtype, device=device))
        self.impl, self.momentum, self.weight_decay, self.grad_filter = impl, momentum, weight_decay, grad_filter
        self.exact_kernels = exact_kernels  # how the fused exact step runs (hydrahead.kernels.exact_gemm)
        if cuda_graph and impl != "triton":
            raise ValueError(f"cuda_graph replays the fused kernels' step: it needs impl='triton', got {impl!r}")
        self.step_graphs = None  # the exact step's CUDA graphs (hydrahead.kernels.graphed), with cuda_graph
        if cuda_graph:
            from hydrahead.kernels.graphed import HeadStepGraphs

            self.step_graphs = HeadStepGraphs()
        self.lr = 0.0
        self.step = 0  # the optimizer step being taken: keys the stochastic rounding draws
        check_rounding(rounding)
        self.rounding = rounding
        if impl != "reference" and dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float8_e4m3fn):
            raise ValueError(f"the fused kernels store float32, bfloat16 or float8_e4m3fn weights, not {dtype}")
        self._active: ActiveCopies | None = None  # a loss over active rows, until finish_step
        self.inactive_rows = inactive_rows
        if settle_every is not None and not 1 <= settle_every <= MAX_LAG:
            raise ValueError(f"settle_every must be in [1, {MAX_LAG}], got {settle_every}")
        self.settle_every = settle_every  # pay every row's debt at least this often (None: MAX_LAG)
        self._deferred: DeferredSGD | None = None  # steps owed by rows outside the active sets ("continue")
        self.settles = 0  # how many times settle() moved rows (an index over the rows must file them again)
        # Per-class optimizer state, checkpointed by class range like the weight.
        self.momentum_buffer = torch.zeros_like(self.weight, dtype=momentum_dtype) if momentum else None
        # Kahan compensation of the stored weights: what the last rounding of each element lost.
        self.compensation = torch.zeros_like(self.weight, dtype=kahan_dtype) if kahan_dtype is not None else None
        self.reset_parameters()

    def check_fused_kernels(self, logit_offsets: bool = False) -> None:
        """With the fused kernels on a GPU: compile and run every kernel this head's steps
        launch (its storage dtype, width, momentum and compensation buffers, rounding and
        filter; ``logit_offsets``: the variants that add head.fill_correction's offsets) on a
        few rows, so that a combination the GPU cannot hold fails now with a ValueError
        instead of in the first step. Nothing to do elsewhere."""
        if self.impl != "triton" or self.weight.device.type != "cuda":
            return
        from hydrahead.kernels.fused_loss import preflight
        from hydrahead.kernels.tiles import TilesDoNotFit

        try:
            preflight(
                self.weight.dtype,
                self.embed_dim,
                self.weight.device,
                cosine=self.margin_type == "cosface",
                momentum_dtype=self.momentum_buffer.dtype if self.momentum_buffer is not None else None,
                compensation_dtype=self.compensation.dtype if self.compensation is not None else None,
                rounding=self.rounding,
                grad_filter=self.grad_filter,
                exact_kernels=self.exact_kernels,
                logit_offsets=logit_offsets,
            )
        except TilesDoNotFit as error:
            raise ValueError(
                f"the fused head kernels cannot hold {self.weight.dtype} rows of width {self.embed_dim} on "
                f"{torch.cuda.get_device_name(self.weight.device)}: {error}"
            ) from error

    @property
    def num_local_classes(self) -> int:
        return self.class_stop - self.class_start

    def reset_parameters(self) -> None:
        init_class_weights(self.weight, self.class_start, seed=self.seed, init=self.init, std=self.init_std)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, classes=[{self.class_start}, {self.class_stop}), "
            f"embed_dim={self.embed_dim}, margin_type={self.margin_type!r}, scale={self.scale}, margin={self.margin}"
        )

    @property
    def low_precision(self) -> bool:
        """Whether updates are rounded into the stored weights (any storage but float32/float64,
        stochastic rounding, or Kahan compensation). The reference impl computes them on
        float32 copies and rounds those; the fused kernels round inside the update."""
        return (
            self.weight.dtype not in (torch.float32, torch.float64)
            or self.rounding != "nearest"
            or self.compensation is not None
        )

    @property
    def _steps_copies(self) -> bool:
        """The reference impl's low-precision path: float32 copies take the step, then are rounded back."""
        return self.low_precision and self.impl == "reference"

    def set_step(self, step: int) -> None:
        """The optimizer step about to be taken (keys the stochastic rounding of its update)."""
        self.step = int(step)

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next update (the trainer's schedule, step by step)."""
        self.lr = float(lr)

    def _apply(self, fn, recurse=True):
        # Keep the per-row optimizer state on the weight's device (it is not made of registered
        # buffers, so that module state dicts stay as they were; checkpoints store it explicitly).
        super()._apply(fn, recurse)
        device = self.weight.device
        if self.momentum_buffer is not None:
            self.momentum_buffer = self.momentum_buffer.to(device)
        if self.compensation is not None:
            self.compensation = self.compensation.to(device)
        if self._deferred is not None:
            self._deferred.to(device)
        return self

    @torch.no_grad()
    def finish_step(self, *, skip: bool = False) -> None:
        """End a training step: apply the SGD update from ``.grad`` (reference impl), or
        nothing (triton: it already happened in the backward). ``skip`` drops the step.

        After a loss over ``active_rows`` those rows take the SGD step with their
        gradients. The other rows, with ``inactive_rows="continue"`` (the default), take
        the step of a zero gradient, as full SGD would: momentum keeps moving them and
        weight decay shrinks them. That step is deferred (``DeferredSGD``) and paid when a
        row is next active, or for all rows at ``settle()``, which the full loss and
        ``predict`` call (checkpoints save the debts instead: ``deferred_state``). With
        ``"frozen"`` (Partial FC's rule) the other rows keep weight and momentum as they
        were, as if the step had not happened for them.
        """
        grad, self.weight.grad = self.weight.grad, None
        active, self._active = self._active, None
        if active is not None:
            rows, sub_weight, sub_buffer, sub_compensation = (
                active.rows,
                active.weight,
                active.momentum,
                active.compensation,
            )
            if skip:
                return
            if self.impl == "reference":
                if sub_weight.grad is None:
                    return
                _sgd_step_(sub_weight.data, sub_weight.grad, sub_buffer, self.lr, self.momentum, self.weight_decay)
                self._store_rows(rows, sub_weight.detach())
            else:  # the backward already stepped the copies and rounded them into the storage format
                self.weight.data[rows] = sub_weight
                if sub_compensation is not None:
                    self.compensation[rows] = sub_compensation
            if sub_buffer is not None:
                self.momentum_buffer[rows] = sub_buffer
            self._record_step(None if rows.numel() == self.num_local_classes else rows)
            return
        if skip or (grad is None and self.impl == "reference"):
            return
        if grad is not None:
            _sgd_step_(self.weight.data, grad, self.momentum_buffer, self.lr, self.momentum, self.weight_decay)
        self._record_step(None)

    def _store_rows(self, rows: torch.Tensor, values: torch.Tensor, salt: int = 0) -> None:
        """Write updated rows back: as they are, or rounded into a low-precision store
        (``salt`` 1: independent draws for a second rounding in the same step)."""
        if not self.low_precision:
            self.weight.data[rows] = values
            return
        how = LowPrecisionUpdate(self.rounding, seed=self.seed, step=self.step, salt=salt)
        compensation = self.compensation[rows] if self.compensation is not None else None
        self.weight.data[rows] = round_to_storage(values, self.weight.dtype, rows + self.class_start, how, compensation)
        if compensation is not None:
            self.compensation[rows] = compensation

    def _record_step(self, rows: torch.Tensor | None) -> None:
        if self._deferred is None or not self.defers_steps:
            return
        self._deferred.record_step(self.lr, rows)
        if self._deferred.must_settle:
            self.settle()

    @torch.no_grad()
    def settle(self) -> None:
        """Apply every row's deferred steps (``inactive_rows="continue"``): afterwards the
        weights and momentum are those of full SGD with zero gradients outside the active
        rows (float32/float64 storage: up to rounding; low-precision storage: rounded into
        it as ``rounding`` and ``compensation`` say, with draws of their own). A no-op when
        nothing is owed."""
        if self._deferred is None or not self._deferred.owing:
            return
        deferred = self._deferred
        if self._pays_in_one_kernel():
            from hydrahead.kernels.deferred import pay_rows_in_place

            how = LowPrecisionUpdate(self.rounding, seed=self.seed, step=self.step, salt=1)
            pay_rows_in_place(
                self.weight.data,
                self.momentum_buffer,
                deferred.row_updates,
                deferred.updates,
                deferred.table,
                how=how if self.low_precision else None,
                class_start=self.class_start,
            )
            deferred.mark_settled()
        else:
            write = (lambda rows, values: self._store_rows(rows, values, salt=1)) if self.low_precision else None
            deferred.settle_(self.weight.data, self.momentum_buffer, write)
        self.settles += 1

    def _pays_in_one_kernel(self, kahan_too: bool = False) -> bool:
        """Whether owed steps are paid in one pass over the shard (``hydrahead.kernels.deferred``):
        on a GPU, rows it can store, and for a settle no Kahan compensation (which stays on the
        torch path; ``kahan_too``: the paid copy, which stores nothing, takes none)."""
        if not self.weight.is_cuda or (self.compensation is not None and not kahan_too):
            return False
        from hydrahead.kernels.deferred import supported

        return supported(self.weight.detach(), self.momentum_buffer)

    @torch.no_grad()
    def rows_as_the_loss_reads_them(self) -> torch.Tensor:
        """This shard's rows with the steps they owe paid, where the next loss over them will
        read them, in the stored dtype (rounded to nearest; not stored); the stored weight
        itself when nothing is owed. With momentum a row keeps moving after its last active
        step, while its stored copy stays where that step wrote it."""
        if self._deferred is None or not self._deferred.owing:
            return self.weight.detach()
        if self._pays_in_one_kernel(kahan_too=True):  # one pass, no float32 temporaries
            from hydrahead.kernels.deferred import paid_copy

            deferred = self._deferred
            return paid_copy(
                self.weight.detach(), self.momentum_buffer, deferred.row_updates, deferred.updates, deferred.table
            )
        return self._deferred.paid_rows(self.weight.detach(), self.momentum_buffer)

    @property
    def defers_steps(self) -> bool:
        """Whether rows outside an active set can owe steps (``inactive_rows="continue"`` with
        momentum or weight decay): then checkpoints carry what each row owes."""
        return self.inactive_rows == "continue" and bool(self.momentum or self.weight_decay)

    def _deferred_steps(self) -> DeferredSGD:
        if self._deferred is None:
            self._deferred = DeferredSGD(
                self.num_local_classes,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
                device=self.weight.device,
                settle_every=self.settle_every,
            )
        return self._deferred

    def deferred_state(self) -> dict:
        """What the rows owe (``DeferredSGD.state_dict``; nothing owed before the first step),
        to be saved beside the weights as they are stored: saving settles nothing, so a run
        that saves takes the same steps, to the last bit, as one that does not."""
        return self._deferred_steps().state_dict()

    def empty_deferred_state(self) -> dict:
        return self._deferred_steps().empty_state_dict()

    def load_deferred_state(self, state: dict) -> None:
        """Owe what a saved run owed (its weights and momentum loaded as stored). A head that
        defers no steps (say, a resume with ``inactive_rows="frozen"``) pays the debt now."""
        self._deferred_steps().load_state_dict(state)
        if not self.defers_steps:
            self.settle()

    @property
    def pending_grad(self) -> torch.Tensor | None:
        """The weight gradient the next ``finish_step`` applies (reference impl): the full
        shard's, or the active rows' after a loss over ``active_rows``; None with triton."""
        if self._active is not None:
            return self._active.weight.grad
        return self.weight.grad

    @property
    def step_discardable(self) -> bool:
        """Whether ``finish_step(skip=True)`` can still drop the step of the last loss: the
        reference impl's waits in ``.grad``, and the fused kernels step copies of active rows.
        Not so when the fused kernels stepped the whole shard in place in the backward."""
        return self.impl == "reference" or self._active is not None

    def step_judged_on_device(self, num_rows: int) -> bool:
        """Whether a loss over the whole shard (no active rows) of a global batch of
        ``num_rows`` steps the rows in place and lands that step only if the loss is finite
        and its checks pass, judged on the device (the fused gemm and filtered kernels:
        ``SGDUpdate.skip``). A caller may then leave both to its step's one read, with the
        backward right after the loss (``loss_and_backward``); what it cannot do is drop the
        step for another reason once the backward has run."""
        if self.impl != "triton":  # and no import of the kernels: a CPU install has no triton
            return False
        from hydrahead.kernels.fused_loss import step_gated

        return step_gated(self.weight, num_rows, self.grad_filter, self.exact_kernels)

    def _active_problem(self, global_labels: torch.Tensor, active_rows: torch.Tensor, check_rows: bool):
        """Copies of the active rows (weight, momentum) and the labels in their frame."""
        from hydrahead.head.selection import remap_labels

        if self._active is not None:
            raise RuntimeError("one loss over active rows per step: call finish_step() before the next loss")
        active_rows = active_rows.to(device=self.weight.device, dtype=torch.long)
        positions = remap_labels(
            global_labels, active_rows, self.class_start, self.class_stop, self.ignore_index, check=check_rows
        )
        # Owned labels become positions in the active rows; the others stay valid but unowned.
        labels = torch.where(
            global_labels == self.ignore_index,
            global_labels,
            torch.where(positions >= 0, positions, active_rows.numel()),
        )
        stored = self.weight.detach()[active_rows]
        # Low precision: steps run on float32 copies (the reference impl rounds them back in
        # finish_step; for the fused kernels the deferred steps are rounded back here, with
        # the second draws of this step, and the kernel rounds its own update).
        sub_weight = stored.float() if self.low_precision else stored
        sub_buffer = self.momentum_buffer[active_rows] if self.momentum_buffer is not None else None
        sub_compensation = self.compensation[active_rows] if self.compensation is not None else None
        caught_up = False
        if self.defers_steps:
            caught_up = self._deferred_steps().catch_up_(active_rows, sub_weight, sub_buffer)  # the steps they sat out
        if self.low_precision and self.impl != "reference":
            if caught_up:
                how = LowPrecisionUpdate(self.rounding, seed=self.seed, step=self.step, salt=1)
                sub_weight = round_to_storage(
                    sub_weight, self.weight.dtype, active_rows + self.class_start, how, sub_compensation
                )
            else:
                sub_weight = stored
        self._active = ActiveCopies(active_rows, sub_weight, sub_buffer, sub_compensation)
        return sub_weight, sub_buffer, labels

    def _prepare(self, global_labels: torch.Tensor, active_rows: torch.Tensor | None, check_rows: bool = True):
        """(weight, labels, class_start, num_classes, fused-kernel update) of this step's loss:
        the shard itself, or copies of the active rows in their own frame."""
        weight, buffer, labels = self.weight, self.momentum_buffer, global_labels
        class_start, num_classes = self.class_start, self.num_classes
        if active_rows is None:
            self.settle()  # every row takes part: none may lag
            if self._steps_copies and torch.is_grad_enabled():
                # A float32 copy of every row takes the step; _store_rows rounds it back.
                active_rows = torch.arange(self.num_local_classes, device=self.weight.device)
        if active_rows is not None:
            weight, buffer, labels = self._active_problem(global_labels, active_rows, check_rows)
            class_start, num_classes = 0, None  # each rank in its own frame: rows [0, n_active)
            if self.impl == "reference":
                weight.requires_grad_()
        update = None
        if self.impl == "triton":
            from hydrahead.kernels import SGDUpdate

            class_ids, compensation = self.class_start, self.compensation
            if self._active is not None:
                class_ids, compensation = self._active.rows + self.class_start, self._active.compensation
            update = SGDUpdate(
                self.lr,
                self.momentum,
                self.weight_decay,
                buffer,
                rounding=self.rounding,
                seed=self.seed,
                step=self.step,
                class_ids=class_ids,
                compensation=compensation,
            )
        return weight, labels, class_start, num_classes, update

    def loss(
        self,
        global_features: torch.Tensor,
        global_labels: torch.Tensor,
        active_rows: torch.Tensor | None = None,
        *,
        check_rows: bool = True,
        checks: MergeChecks | None = None,
        logit_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of an already-gathered global batch (features identical on every rank).

        ``active_rows`` (sorted local rows of this shard, holding every owned label of the
        batch): the softmax runs over the union of the ranks' active rows only, and the
        next ``finish_step`` updates only those rows. ``check_rows=False`` skips checking
        that they are (one host read; for rows from ``ActiveClassSelector``, which are by
        construction): a missing label is then reported by the loss as owned by no shard.
        ``checks`` (a ``MergeChecks``): the loss's checks are raised by their owner after
        its one read, not here; until then the step must stay discardable
        (``step_discardable``), since the checks may still fail. ``logit_offset``: one constant
        per scored row (per active row, in their order), added to its logits (the reference
        implementation, or the fused exact gemm kernels: ``grad_filter`` 0).
        """
        weight, labels, class_start, num_classes, update = self._prepare(global_labels, active_rows, check_rows)
        with self._no_step_pending_on_error():
            if self.impl == "triton":
                from hydrahead.kernels import triton_sharded_cross_entropy

                # graphs for the whole shard only: active rows are copies, new every step
                graphs = self.step_graphs if self._active is None else None
                return triton_sharded_cross_entropy(
                    global_features,
                    weight,
                    labels,
                    class_start,
                    graphs=graphs,
                    **self._loss_options(num_classes, update, checks=checks, logit_offset=logit_offset),
                )
            return sharded_cross_entropy(
                global_features,
                weight,
                labels,
                class_start,
                **self._loss_options(num_classes, None, checks=checks, logit_offset=logit_offset),
            )

    def loss_and_backward(
        self,
        global_features: torch.Tensor,
        global_labels: torch.Tensor,
        *,
        checks: MergeChecks,
        logit_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``loss`` over the whole shard and its backward for an incoming gradient of 1, with
        nothing read between them: dF lands in ``global_features.grad`` (a leaf that needs a
        gradient) and the SGD step is applied in place, held back on the device if the loss
        is not finite or ``checks`` fail (so only where ``step_judged_on_device``; the
        caller reads ``checks`` afterwards). With head.cuda_graph one CUDA graph holds both
        (``HeadStepGraphs.step``). Returns the loss, detached."""
        num_rows = global_features.shape[0]
        if not self.step_judged_on_device(num_rows):
            raise ValueError(
                "loss_and_backward needs a step held back on the device (head.impl=triton on the exact gemm "
                f"or filtered kernels); this head ({self.impl}, exact_kernels={self.exact_kernels}) at {num_rows} "
                "rows must have its loss read before the backward: loss(), then backward()"
            )
        weight, labels, class_start, num_classes, update = self._prepare(global_labels, None)
        with self._no_step_pending_on_error():
            from hydrahead.kernels import triton_sharded_cross_entropy

            return triton_sharded_cross_entropy(
                global_features,
                weight,
                labels,
                class_start,
                graphs=self.step_graphs,
                backward=True,
                **self._loss_options(num_classes, update, checks=checks, logit_offset=logit_offset),
            )

    def backward(self, loss: torch.Tensor, global_features: torch.Tensor) -> None:
        """``loss.backward()`` for a loss of ``loss`` whose features were ``global_features``: a
        step replayed from this head's CUDA graphs runs its backward directly (no pass
        through autograd's engine: ``HeadStepGraphs.backward``), any other through autograd.
        dF lands in ``global_features.grad`` either way."""
        if self.step_graphs is None or not self.step_graphs.backward(loss, global_features):
            loss.backward()

    def micro_batches(
        self,
        global_labels: torch.Tensor,
        active_rows: torch.Tensor | None = None,
        *,
        check_rows: bool = True,
        logit_offset: torch.Tensor | None = None,
    ):
        """The same loss as ``loss`` taken micro-batch by micro-batch: an object whose
        ``chunk(features, rows)`` returns (loss sum, feature gradient) of those rows of the
        global batch and whose ``finish()`` applies the step's one update (triton) or leaves
        the whole gradient in ``.grad`` for ``finish_step`` (reference). The labels are the
        whole step's; ``rows`` index into them. ``check_rows`` and ``logit_offset`` as for
        ``loss``."""
        weight, labels, class_start, num_classes, update = self._prepare(global_labels, active_rows, check_rows)
        with self._no_step_pending_on_error():  # an engine refused before its first chunk
            options = self._loss_options(num_classes, update, logit_offset=logit_offset)
            if self.impl == "triton":
                from hydrahead.kernels.fused_loss import FusedMicroBatches

                return FusedMicroBatches(weight, labels, class_start, **options)
            return MicroBatches(weight, labels, class_start, **options)

    def _loss_options(self, num_classes, update, **extra) -> dict:
        """The head's settings as the loss functions and micro-batch engines take them: the
        fused kernels' (with the step's update) or the reference's (with its chunk size)."""
        options = dict(
            group=self.group,
            num_classes=num_classes,
            scale=self.logit_scale,
            margin=self.margin,
            margin_type=self.margin_type,
            ignore_index=self.ignore_index,
            **extra,
        )
        if self.impl == "triton":
            return {**options, "update": update, "grad_filter": self.grad_filter, "exact_kernels": self.exact_kernels}
        return {**options, "chunk_size": self.chunk_size}

    @contextlib.contextmanager
    def _no_step_pending_on_error(self):
        """A loss that raised leaves no step pending: the rows keep their stored values."""
        try:
            yield
        except Exception:
            self._active = None
            raise

    def forward(self, local_features: torch.Tensor, local_labels: torch.Tensor, *, sizes=None) -> torch.Tensor:
        """Gather features (autograd) and labels over the group, then the sharded loss.

        ``sizes``: per-rank batch sizes when known (skips one small all-gather).
        """
        if local_features.dim() != 2 or local_labels.dim() != 1 or local_features.shape[0] != local_labels.shape[0]:
            raise ValueError(
                "expected features (b x D) and labels (b,), got "
                f"{tuple(local_features.shape)} and {tuple(local_labels.shape)}"
            )
        if sizes is None and self.world_size > 1:
            sizes = gather_row_counts(
                local_features.shape[0], local_features.shape[1], local_features.device, self.group
            )
        global_features = all_gather_features(local_features, self.group, sizes=sizes)
        global_labels = all_gather_labels(local_labels, self.group, sizes=sizes)
        return self.loss(global_features, global_labels)

    @torch.no_grad()
    def predict(self, local_features: torch.Tensor, k: int = 1, *, sizes=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k classes of each local sample over all shards.

        Returns (scores, class_ids), each (b x k), best first; scores are the logits without
        margin (``scale * f.w``, or ``scale * cos`` for the margin heads). Each rank takes a
        local top-k chunk by chunk, the candidates are all-gathered, and each rank merges
        the rows of its own samples.
        """
        self._check_predict_k(k)
        scores, ids, _ = self._scan_shard(local_features, None, k, 0, sizes)
        return scores, ids

    @torch.no_grad()
    def hard_negative_share(
        self, local_features: torch.Tensor, local_labels: torch.Tensor, k: int, *, sizes=None
    ) -> torch.Tensor:
        """Per local sample, the share of its softmax mass outside its label that its ``k``
        highest-scoring other classes hold, over all shards (logits without margin); NaN for
        a sample whose label is ``ignore_index`` (it has no label to stand outside of).

        Full softmax pushes each negative row by that row's share, so near 1 a handful of
        rows per sample take the whole push on the negatives, and a selection that finds
        them (knn) can stand in for full softmax; well below 1 the push spreads over the
        shard, as random rows spread theirs (docs/selection.md).
        """
        self._check_share_k(k)
        return self._scan_shard(local_features, local_labels, 0, k, sizes)[2]

    @torch.no_grad()
    def predict_with_share(
        self, local_features: torch.Tensor, local_labels: torch.Tensor, k: int, hard_k: int, *, sizes=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``predict(k)`` and ``hard_negative_share(hard_k)`` of the same samples in one pass
        over the shard (evaluation: one read of the rows instead of two)."""
        self._check_predict_k(k)
        self._check_share_k(hard_k)
        return self._scan_shard(local_features, local_labels, k, hard_k, sizes)

    def _check_predict_k(self, k) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_classes:
            raise ValueError(f"k must be an int in [1, num_classes={self.num_classes}], got {k!r}")

    def _check_share_k(self, k) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < self.num_classes:
            raise ValueError(f"k must be an int in [1, num_classes - 1 = {self.num_classes - 1}], got {k!r}")

    def _scan_shard(self, local_features, local_labels, k: int, hard_k: int, sizes):
        """One pass over the shard's rows: the top ``k`` classes (scores, ids) and the share of
        the ``hard_k`` hardest negatives, each None when its k is 0."""
        problem, features, sizes = self._margin_free_problem(local_features, local_labels, sizes)
        n, device = features.shape[0], features.device
        scores = features.new_empty((n, 0), dtype=problem.compute_dtype)
        ids = torch.empty((n, 0), dtype=torch.long, device=device)
        # The negatives' mass is summed with the label masked out, never as the total less
        # the label's: that difference cancels when the label holds nearly all of the mass.
        # The logits stay in the problem's dtype (a float64 copy of a chunk would double its
        # memory); the per-sample sums accumulate in float64.
        hardest = features.new_empty((n, 0), dtype=problem.compute_dtype)
        negatives = features.new_full((n,), float("-inf"), dtype=torch.float64)
        for start, stop, rows, cols in problem.chunks():
            w_op, _, _ = problem.chunk_weight(start, stop)
            # No targets for logits(): its (margin-free) target path may move a label's logit
            # by an ulp, and predict's scores must not depend on the labels.
            logits = problem.logits(w_op, rows[:0], cols[:0])[0]
            if k:
                chunk_ids = torch.arange(self.class_start + start, self.class_start + stop, device=device)
                scores = torch.cat([scores, logits], dim=1)  # a copy: the mask below leaves it alone
                ids = torch.cat([ids, chunk_ids.expand(n, -1)], dim=1)
                scores, order = scores.topk(min(k, scores.shape[1]), dim=1)
                ids = ids.gather(1, order)
            if hard_k:
                logits[rows, cols] = float("-inf")  # the label is no negative
                negatives = torch.logaddexp(negatives, logits.logsumexp(dim=1).double())
                hardest = torch.cat([hardest, logits], dim=1)
                hardest = hardest.topk(min(hard_k, hardest.shape[1]), dim=1).values
        top = self._merge_top(scores, ids, k, sizes) if k else (None, None)
        share = self._merge_share(hardest.double(), negatives, hard_k, sizes, local_labels) if hard_k else None
        return *top, share

    def _margin_free_problem(self, local_features, local_labels, sizes):
        """Settle the rows, gather the global batch (and its labels, if given) and set up
        the shard's logits without margin: (problem, global features, sizes)."""
        self.settle()
        if sizes is None and self.world_size > 1:
            sizes = gather_row_counts(
                local_features.shape[0], local_features.shape[1], local_features.device, self.group
            )
        features = all_gather_features(local_features.detach(), self.group, sizes=sizes)
        labels = None if local_labels is None else all_gather_labels(local_labels, self.group, sizes=sizes)
        problem = ShardProblem(
            features,
            self.weight.detach(),
            labels,
            self.class_start,
            self.logit_scale,
            0.0,
            self.margin_type,
            self.ignore_index,
            self.chunk_size,
        )
        return problem, features, sizes

    def _merge_top(self, scores, ids, k, sizes):
        """Each rank's top-k candidates of every sample -> the top k over all shards of its own samples."""
        if self.world_size == 1:
            return scores, ids
        # Pad to k so every rank sends the same shape; -inf never wins the merge.
        missing = k - scores.shape[1]
        scores = torch.cat([scores, scores.new_full((scores.shape[0], missing), float("-inf"))], dim=1)
        ids = torch.cat([ids, ids.new_full((ids.shape[0], missing), -1)], dim=1)
        all_scores = [torch.empty_like(scores) for _ in range(self.world_size)]
        all_ids = [torch.empty_like(ids) for _ in range(self.world_size)]
        dist.all_gather(all_scores, scores.contiguous(), group=self.group)
        dist.all_gather(all_ids, ids.contiguous(), group=self.group)
        start = sum(sizes[: self.rank])
        rows = slice(start, start + sizes[self.rank])
        scores = torch.cat([s[rows] for s in all_scores], dim=1)
        ids = torch.cat([i[rows] for i in all_ids], dim=1)
        scores, order = scores.topk(k, dim=1)
        return scores, ids.gather(1, order)

    def _merge_share(self, hardest, negatives, k, sizes, local_labels):
        """Each rank's hardest negatives and negative mass of every sample -> the share of its
        own samples over all shards."""
        n = hardest.shape[0]
        if self.world_size > 1:
            # Pad to k so every rank sends the same shape; -inf adds no mass.
            hardest = torch.cat([hardest, hardest.new_full((n, k - hardest.shape[1]), float("-inf"))], dim=1)
            packed = torch.cat([hardest, negatives[:, None]], dim=1).contiguous()
            gathered = [torch.empty_like(packed) for _ in range(self.world_size)]
            dist.all_gather(gathered, packed, group=self.group)
            start = sum(sizes[: self.rank])
            mine = torch.stack([g[start : start + sizes[self.rank]] for g in gathered])  # ranks x b x (k + 1)
            hardest = mine[..., :k].permute(1, 0, 2).flatten(1).topk(k, dim=1).values
            negatives = mine[..., k].logsumexp(dim=0)
        share = torch.exp(hardest.logsumexp(dim=1) - negatives).clamp(max=1.0)
        return share.masked_fill(local_labels == self.ignore_index, float("nan"))

    # The shard layout travels with the weights so a checkpoint can be re-split by class range.
    def get_extra_state(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "class_start": self.class_start,
            "class_stop": self.class_stop,
            "embed_dim": self.embed_dim,
        }

    def set_extra_state(self, state: dict) -> None:
        if state.get("num_classes") != self.num_classes or state.get("embed_dim") != self.embed_dim:
            raise ValueError(
                f"head state is for num_classes={state.get('num_classes')}, embed_dim={state.get('embed_dim')}; "
                f"this head has num_classes={self.num_classes}, embed_dim={self.embed_dim}"
            )
        if (state.get("class_start"), state.get("class_stop")) != (self.class_start, self.class_stop):
            raise ValueError(
                f"head state holds classes [{state.get('class_start')}, {state.get('class_stop')}) but this rank owns "
                f"[{self.class_start}, {self.class_stop}): re-shard it by class range (hydrahead.train.checkpoint) "
                "instead of loading it directly"
            )

"""The math a class-sharded softmax shares across its implementations, and its merge.

Every rank holds the whole global batch (G x D) and a contiguous shard of the classes;
each computes per-sample statistics over its own classes (a running max and sum of exp,
the target logit where it owns the label), and the ranks merge them with two collectives
of ~G floats: a MAX all-reduce of the maxima, then a SUM all-reduce of the rescaled sums
and the target logits. The chunked torch reference (``hydrahead.head.cross_entropy``) and
the fused kernels (``hydrahead.kernels.fused_loss``) both use what is here:

- pure math: row normalisation and its backward, target margins, the online log-sum-exp;
- the merge (``merge_across_shards``, the only collectives) and the mean loss after it;
- input checks, shared so that both paths raise the same errors: the ones every rank can
  see raise at once; a problem with one rank's own shard travels as a code inside the MAX
  all-reduce (``LOCAL_ERRORS``), and the count of owned labels inside the SUM, so every
  rank raises the same error and none hangs in a collective. ``MergeChecks`` leaves the
  host read of those checks to the caller.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from hydrahead.distributed.collectives import group_world_size

MARGIN_TYPES = ("none", "cosface", "arcface")
NORM_EPS = 1e-12  # as torch.nn.functional.normalize

# Problems only one rank can see (its own weight shard) travel as a code inside the MAX
# all-reduce, so every rank raises instead of the healthy ones hanging in a collective.
LOCAL_ERRORS = {
    1: "a rank's weight_shard is not a 2-D floating tensor with the features' width",
    2: "a rank's class range [class_start, class_start + C_r) lies outside [0, num_classes)",
}


# ----------------------------------------------------------------------------------------
# Pure math
# ----------------------------------------------------------------------------------------


def normalize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows divided by max(||row||, eps), and that divisor (as ``F.normalize``)."""
    norm = x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return x / norm, norm


def normalize_rows_backward(grad_unit: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Gradient through ``x / max(||x||, eps)`` given the forward's unit rows and divisor."""
    radial = (unit * grad_unit).sum(dim=1, keepdim=True)
    clamped = norm <= NORM_EPS  # below eps the divisor is a constant, so no radial term
    return (grad_unit - torch.where(clamped, 0.0, radial) * unit) / norm


def target_margin(cos: torch.Tensor, margin_type: str, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The margin-adjusted target cosine phi(cos) and its derivative d phi / d cos."""
    if margin_type == "cosface":
        return cos - margin, torch.ones_like(cos)
    if margin_type == "arcface":
        cos_m, sin_m = math.cos(margin), math.sin(margin)
        sin_theta = (1.0 - cos * cos).clamp_min(0.0).sqrt()
        phi = cos * cos_m - sin_theta * sin_m
        dphi = cos_m + sin_m * cos / sin_theta.clamp_min(1e-30)
        # theta + m > pi (cos < cos(pi - m)): cos(theta + m) would turn back up, so use
        # the usual monotone continuation cos - m * sin(m).
        beyond = cos < -cos_m
        return torch.where(beyond, cos - margin * sin_m, phi), torch.where(beyond, 1.0, dphi)
    return cos, torch.ones_like(cos)


def merge_logsumexp(
    running_max: torch.Tensor, running_sum: torch.Tensor, chunk_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one chunk's per-row log-sum-exp into a running (max, sum of exp(x - max)).

    Keeping (max, sum) rather than a single lse lets the ranks merge with one MAX and one
    SUM all-reduce.
    """
    new_max = torch.maximum(running_max, chunk_lse)
    new_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(chunk_lse - new_max)
    return new_max, new_sum


# ----------------------------------------------------------------------------------------
# The merge across shards
# ----------------------------------------------------------------------------------------


def merge_across_shards(running_max, running_sum, target_logit, owned_count, local_error, group):
    """Global log-sum-exp and target logit per sample, with two collectives of ~G floats.

    The local error code rides on the MAX all-reduce and the owned-label count on the SUM
    all-reduce, so input checks add no collective of their own.
    """
    if group_world_size(group) == 1:
        lse = running_max + torch.log(running_sum)
        return lse, target_logit, owned_count, local_error
    num_rows = running_max.shape[0]
    error = running_max.new_full((1,), float(local_error))
    maxima = torch.cat([running_max, error])
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    global_max, error = maxima[:num_rows], maxima[num_rows]
    safe_max = torch.where(torch.isfinite(global_max), global_max, 0.0)
    sums = torch.cat([running_sum * torch.exp(running_max - safe_max), target_logit, owned_count.reshape(1)])
    dist.all_reduce(sums, group=group)
    lse = safe_max + torch.log(sums[:num_rows])
    return lse, sums[num_rows : 2 * num_rows], sums[2 * num_rows], error


def _raise_if_failed(error: float, owned_total: float, num_valid: float, labels, valid, ignore_index) -> int:
    """Raise what the merged checks (already read to the host) reveal; else the valid count."""
    error, owned_total, num_valid = int(error), int(round(owned_total)), int(num_valid)
    if error:
        raise ValueError(f"sharded_cross_entropy: {LOCAL_ERRORS[error]}")
    if owned_total != num_valid:
        raise ValueError(
            f"{num_valid - owned_total} label(s) of the batch belong to no shard: labels must lie in "
            f"[0, num_classes) or equal ignore_index={ignore_index}, and a loss over active rows needs "
            "every owned label among them; labels seen range from "
            f"{int(labels[valid].min())} to {int(labels[valid].max())}"
        )
    return num_valid


def raise_merge_errors(error, owned_total, num_valid, labels, valid, ignore_index) -> int:
    """Raise what the collectives revealed (the same on every rank): one host read for all
    checks. ``num_valid`` may be a device tensor (read in the same go); returns it as an int."""
    values = (error, owned_total, num_valid)
    tensors = [v.reshape(()).double() for v in values if isinstance(v, torch.Tensor)]
    read = iter(torch.stack(tensors).tolist() if tensors else ())
    error, owned_total, num_valid = (next(read) if isinstance(v, torch.Tensor) else v for v in values)
    return _raise_if_failed(error, owned_total, num_valid, labels, valid, ignore_index)


class MergeChecks:
    """A loss's merge checks with the host read left to the caller.

    A loss given ``checks=MergeChecks()`` raises nothing itself and keeps its valid count on
    the device; the caller reads ``values()`` together with whatever else its step reads
    (the trainer: in the same read as its finiteness flags) and passes what it read to
    ``raise_if_failed``. Until then the loss and its gradients are only as sound as the
    checks: a caller must not keep the step's updates before it has raised or not.
    """

    WIDTH = 3  # error code, owned labels, valid labels

    def __init__(self):
        self._pending: list[tuple] = []

    def add(self, error, owned_total, num_valid, labels, valid, ignore_index) -> None:
        self._pending.append((error, owned_total, num_valid, labels, valid, ignore_index))

    def values(self, device: torch.device) -> torch.Tensor:
        """float64 (WIDTH x number of losses,) on ``device``: no host read."""
        # a Python number (a single shard's error code) as a fill: a copy from the host would sync
        rows = [
            v.reshape(()).to(device=device, dtype=torch.float64)
            if isinstance(v, torch.Tensor)
            else torch.full((), float(v), dtype=torch.float64, device=device)
            for entry in self._pending
            for v in entry[:3]
        ]
        return torch.stack(rows) if rows else torch.zeros(0, dtype=torch.float64, device=device)

    def again(self) -> "MergeChecks":
        """A copy holding the same checks, for a step replayed from a CUDA graph (whose
        ``values()`` tensor each replay rewrites): ``raise_if_failed`` consumes them."""
        copy = MergeChecks()
        copy._pending = list(self._pending)
        return copy

    def raise_if_failed(self, values) -> None:
        """``values``: ``values()`` as read to the host (a list of floats)."""
        values = list(values)
        if len(values) != self.WIDTH * len(self._pending):
            raise ValueError(
                f"expected {self.WIDTH * len(self._pending)} values "
                f"for {len(self._pending)} loss(es), got {len(values)}"
            )
        pending, self._pending = self._pending, []
        for i, (_, _, _, labels, valid, ignore_index) in enumerate(pending):
            _raise_if_failed(*values[self.WIDTH * i : self.WIDTH * (i + 1)], labels, valid, ignore_index)


def per_valid_label(num_valid):
    """The mean's divisor: max(num_valid, 1), for an int or a device count alike."""
    return num_valid.clamp_min(1) if isinstance(num_valid, torch.Tensor) else max(num_valid, 1)


def mean_loss_after_merge(
    lse, target_logit, owned_total, error, labels, valid, ignore_index, checks: MergeChecks | None = None
):
    """(mean loss, valid count). Raises what the collectives revealed; with ``checks`` that
    is left to their owner and the count stays a device tensor (no host read)."""
    if checks is None:
        num_valid = raise_merge_errors(error, owned_total, valid.sum(), labels, valid, ignore_index)
    else:
        num_valid = valid.sum()
        checks.add(error, owned_total, num_valid, labels, valid, ignore_index)
    loss = torch.where(valid, lse - target_logit, 0.0).sum() / per_valid_label(num_valid)
    return loss, num_valid


# ----------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------


def check_global_inputs(features, labels, scale, margin, margin_type, chunk_size):
    """Checks on inputs that are identical on every rank: every rank raises the same error."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(f"features must be a 2-D floating tensor (G x D), got {_describe(features)}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of class ids, got {_describe(labels)}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but features has {features.shape[0]} rows")
    if labels.device != features.device:
        raise ValueError(f"labels are on {labels.device} but features on {features.device}")
    if margin_type not in MARGIN_TYPES:
        raise ValueError(f"margin_type must be one of {MARGIN_TYPES}, got {margin_type!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin)):
        raise ValueError(f"margin must be a finite number, got {margin!r}")
    if margin_type == "none" and margin != 0:
        raise ValueError(f"margin={margin} needs margin_type 'cosface' or 'arcface' (got 'none')")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def check_logit_offset(logit_offset, weight_shard) -> None:
    """A per-class logit offset holds one float per class of this shard."""
    if not isinstance(logit_offset, torch.Tensor) or (
        logit_offset.shape != (weight_shard.shape[0],) or not logit_offset.is_floating_point()
    ):
        raise ValueError(
            f"logit_offset must be a float tensor of one value per class of the shard ({weight_shard.shape[0]},), "
            f"got {_describe(logit_offset)}"
        )


def local_error_code(features, weight_shard, class_start, num_classes) -> int:
    """Problems with this rank's own shard, reported through the collectives (see ``LOCAL_ERRORS``)."""
    if (
        not isinstance(weight_shard, torch.Tensor)
        or weight_shard.dim() != 2
        or not weight_shard.is_floating_point()
        or weight_shard.shape[0] == 0
        or weight_shard.shape[1] != features.shape[1]
        or weight_shard.device != features.device
    ):
        return 1
    if class_start < 0 or (num_classes is not None and class_start + weight_shard.shape[0] > num_classes):
        return 2
    return 0


def check_label_range(labels, ignore_index, num_classes):
    """With num_classes known, an out-of-range label is found locally (costs one host sync)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"label {int(labels[first])} at position {first} is outside [0, {num_classes}) "
            f"(and is not ignore_index={ignore_index}); {int(bad.sum())} such labels in the batch"
        )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__

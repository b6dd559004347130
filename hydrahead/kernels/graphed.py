"""The exact gemm step of a head replayed from CUDA graphs (``head.cuda_graph``).

At small global batches the eager step waits on the host: after each step's read the GPU
idles while Python queues about sixty launches, longer than some of the kernels run
(docs/kernels.md, "Where the small step's GPU idles, traced"). ``HeadStepGraphs`` captures
the loss's forward and its backward (the SGD step on the rows included) once per key and
replays them:

    first call of a key   eager, its learning rate and step read from device scalars, so
                          that every kernel the graphs will hold is compiled and tuned (until
                          such a call's backward has run, the key's calls stay eager)
    second call           captures the forward and replays it; its backward captures the
                          backward (against a fixed incoming-gradient buffer, in autograd's
                          thread, where the warm-up's backward made its library handles)
                          and replays it: the step lands once
    later calls           copy the features and labels into the graphs' inputs, fill the
                          learning rate and step, replay

A caller that runs the backward right after the loss, for an incoming gradient of 1, with
nothing to read in between (the trainer, where the loss holds a bad step back on the
device: ``SGDUpdate.skip``), takes ``step`` instead (``backward=True`` of the loss): one
graph over the forward and the backward, so no host work falls between them:

    first call of a key   the forward's and backward's bodies, eagerly, in this thread, on
                          the key's inputs (kernels compiled, this thread's cuBLAS handle made)
    second call           captures both bodies as one graph and replays it
    later calls           copy, fill, replay; the loss, dF (added to features.grad) and the
                          checks' values handed out as copies

The key holds everything the kernels take as a fixed value: shapes, dtypes, the rows', buffer's
and compensation's addresses, the class range, the logit settings and the update's momentum,
weight decay, rounding, seed and salt. The learning rate and the step are read on the device
(``SGDUpdate``'s tensor form), so a schedule needs no new capture. What the kernels read
from the environment (``HYDRAHEAD_EXACT_CHUNK_MIB``, the tile and pass switches) is read
once, at capture. At most ``MAX_KEYS`` keys keep graphs (the oldest idle one goes first);
each holds its step's temporaries (the P chunk, dF: up to about 0.6 GiB) in its own pool.

What it takes (``refusal`` names what is missing): CUDA tensors, the exact gemm path (no
gradient filter, no logit offsets), an SGD update, the checks left to the caller (a
``MergeChecks``, read after the step as the trainer does), a head group of one rank (the
merge's all-reduces are not captured), and features that need a gradient under grad mode.
A call that does not qualify runs eagerly, as without graphs; so do a shard that fails the
local checks (the eager path reports it), a second forward of a key whose first has not had
its backward yet, and every call of a key whose capture failed (with a warning). A loss
replayed from the graphs takes one backward: a second (``retain_graph``) raises.
``backward(loss, features)`` runs that backward without autograd's engine, which spends
about 0.1 ms handing a CUDA backward to its device thread (the trainer's way). The loss
and dF handed out are copies, and the checks' values are copied at the forward, so nothing
a caller holds is overwritten by the next replay.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections import OrderedDict

import torch

from hydrahead.distributed.collectives import group_world_size
from hydrahead.distributed.sharded_softmax import MergeChecks, local_error_code
from hydrahead.kernels.shard_ce import SGDUpdate

MAX_KEYS = 2


@dataclasses.dataclass(frozen=True)
class _Call:
    """One call's settings, as the graphs bake them in."""

    features_shape: tuple[int, int]
    features_dtype: torch.dtype
    labels_dtype: torch.dtype
    weight: tuple  # (address, shape, stride, dtype)
    class_start: int
    num_classes: int | None
    scale: float
    margin: float
    margin_type: str
    ignore_index: int
    update: tuple  # SGDUpdate's fields other than lr and step, tensors by address
    whole: bool = False  # one graph over the loss and its backward (``HeadStepGraphs.step``)


def _tensor_key(tensor: torch.Tensor | None):
    if tensor is None:
        return None
    return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def _call_of(features, labels, weight, settings, update: SGDUpdate, whole: bool) -> _Call:
    """The key of a call: ``settings`` = (class_start, num_classes, scale, margin,
    margin_type, ignore_index)."""
    class_start, num_classes, scale, margin, margin_type, ignore_index = settings
    return _Call(
        tuple(features.shape),
        features.dtype,
        labels.dtype,
        _tensor_key(weight),
        int(class_start),
        num_classes,
        float(scale),
        float(margin),
        margin_type,
        int(ignore_index),
        _update_key(update),
        whole,
    )


def _update_key(update: SGDUpdate) -> tuple:
    values = (getattr(update, field.name) for field in dataclasses.fields(update) if field.name not in ("lr", "step"))
    return tuple(_tensor_key(value) if isinstance(value, torch.Tensor) else value for value in values)


class _Entry:
    """The graphs of one key, their inputs and what the forward leaves for the backward."""

    def __init__(self, call: _Call, weight: torch.Tensor, group, update: SGDUpdate, device: torch.device):
        self.call, self.weight, self.group, self.update = call, weight, group, update
        self.features = torch.empty(call.features_shape, dtype=call.features_dtype, device=device)
        self.labels = torch.empty(call.features_shape[0], dtype=call.labels_dtype, device=device)
        self.lr = torch.zeros(1, dtype=torch.float32, device=device)
        self.step = torch.zeros(1, dtype=torch.int64, device=device)
        self.grad = torch.zeros((), dtype=torch.float32, device=device)
        self.forward_graph = self.backward_graph = None
        self.backward_captured = False
        self.whole_graph = None  # ``step``'s one graph, captured at the key's second call
        self.pool = None
        self.pending = None  # a weak reference to the autograd context of a forward awaiting its backward
        # Set by the captured forward, read by the backward and the callers (static: each replay rewrites them)
        self.loss = self.check_values = self.num_valid = self.lse_valid = self.local_pass = None
        self.grad_features = None

    @property
    def busy(self) -> bool:
        return self.pending is not None and self.pending() is not None


class HeadStepGraphs:
    """Captured forward and backward graphs of the exact gemm head step, per key (module doc)."""

    def __init__(self):
        self._entries: OrderedDict[_Call, _Entry] = OrderedDict()
        # keys whose eager warm-up finished its backward (so every kernel of both graphs is
        # compiled, in the threads that will capture them), most recent last
        self._warmed: OrderedDict[_Call, None] = OrderedDict()
        self.captures = 0  # keys captured so far
        self.replays = 0  # forwards replayed (the capturing call's included)
        self.failed: dict[_Call, str] = {}  # keys whose capture failed (they run eagerly), and why

    # -- what qualifies -------------------------------------------------------------------

    def refusal(self, features, weight, group, update, grad_filter, exact_kernels, checks, logit_offset) -> str | None:
        """Why this call cannot replay a graph (None: it can)."""
        if not self._device_takes(features, weight):
            return "the tensors are not on a CUDA device"
        if grad_filter > 0 or exact_kernels != "gemm":
            return "only the exact gemm path is captured (head.grad_filter=0, gemm kernels)"
        if update is None:
            return "no SGD update: the step would hand out dW"
        if checks is None:
            return "the loss would read its checks on the host mid-step (no MergeChecks given)"
        if logit_offset is not None:
            return "logit offsets change from step to step"
        if group_world_size(group) != 1:
            return "the head group has more than one rank: its all-reduces are not captured"
        if not (torch.is_grad_enabled() and features.requires_grad):
            return "no backward will follow (grad mode off, or features that need no gradient)"
        if features.is_cuda and torch.cuda.is_current_stream_capturing():
            return "a capture is already under way"
        return None

    # -- the loss -------------------------------------------------------------------------

    def loss(self, features, weight, labels, group, class_start, num_classes, scale, margin, margin_type,
             ignore_index, update: SGDUpdate, checks: MergeChecks, eager) -> torch.Tensor:  # fmt: skip
        """The loss of a call that ``refusal`` accepted. ``eager(update)`` runs the eager loss
        with the given update (its warm-up and fallback)."""
        if local_error_code(features, weight, class_start, num_classes):  # a bad shard: the eager path reports it
            return eager(update)
        settings = (class_start, num_classes, scale, margin, margin_type, ignore_index)
        call = _call_of(features, labels, weight, settings, update, whole=False)
        entry = self._entries.get(call)
        if entry is None and call not in self._warmed:  # a warm-up, on device scalars as captured
            loss = eager(_with_device_scalars(update, features.device))
            loss.grad_fn.register_hook(lambda *_: self._warm(call))  # after its backward ran
            return loss
        if call in self.failed or (entry is not None and entry.busy):
            # eager: a key whose capture failed, or whose graphs' outputs still wait for their backward
            return eager(_with_device_scalars(update, features.device))
        if entry is None:
            entry = self._new_entry(call, weight, group, update, features.device)
        else:
            self._entries.move_to_end(call)
        try:
            return _ReplayedLoss.apply(features, labels, self, entry, update, checks)
        except _CaptureFailed:  # nothing ran: this step eagerly, and the key from now on
            return eager(_with_device_scalars(update, features.device))

    def step(self, features, weight, labels, group, class_start, num_classes, scale, margin, margin_type,
             ignore_index, update: SGDUpdate, checks: MergeChecks, eager) -> torch.Tensor:  # fmt: skip
        """The loss of a call that ``refusal`` accepted and its backward for an incoming
        gradient of 1, as one graph: dF is added to ``features.grad`` and the SGD step lands
        (held back on the device on a bad loss: ``SGDUpdate.skip``). Returns the loss,
        detached. No host work runs between the forward and the backward, which the two
        graphs of ``loss`` cannot avoid (docs/kernels.md).

        A key's first call runs the two bodies eagerly in this thread, on the key's inputs:
        every kernel compiles, and the library handles the capture will use (cuBLAS's) are
        made in the thread that captures. Its second call captures them as one graph and
        replays it; later calls replay. Features that are not a leaf free of hooks, a bad
        shard, and a key whose capture failed take ``eager(update)`` and its backward."""

        def eager_step(step_update):
            loss = eager(step_update)
            loss.backward()
            return loss.detach()

        if local_error_code(features, weight, class_start, num_classes) or not _plain_leaf(features):
            return eager_step(update)
        settings = (class_start, num_classes, scale, margin, margin_type, ignore_index)
        call = _call_of(features, labels, weight, settings, update, whole=True)
        if call in self.failed:
            return eager_step(_with_device_scalars(update, features.device))
        entry = self._entries.get(call)
        if entry is None and call not in self._warmed:
            # the warm-up: the bodies eagerly, in this thread, on inputs of their own (no
            # graphs kept, so that more shapes than MAX_KEYS still reach their capture)
            entry = _Entry(call, weight, group, dataclasses.replace(update), features.device)
            entry.grad.fill_(1.0)  # the incoming gradient, fixed
            self._copy_inputs(entry, features, labels, update)
            _whole_body(entry)
            self._warm(call)
        else:
            if entry is None:
                entry = self._new_entry(call, weight, group, update, features.device)
                entry.grad.fill_(1.0)
            else:
                self._entries.move_to_end(call)
            self._copy_inputs(entry, features, labels, update)
            if entry.whole_graph is None:
                entry.pool, entry.whole_graph = self._pool(), self._new_graph()
                try:
                    self._capture(entry.whole_graph, entry.pool, _whole_body, entry)
                except Exception as error:  # noqa: BLE001 - nothing ran: this step eagerly, and the key from now on
                    self._give_up(entry, error, "step")
                    return eager_step(_with_device_scalars(update, features.device))
                self.captures += 1
            entry.whole_graph.replay()
            self.replays += 1
        values = entry.check_values.clone()
        checks.add(values[0], values[1], values[2], labels, labels != entry.call.ignore_index, entry.call.ignore_index)
        if features.grad is None:
            features.grad = entry.grad_features.clone()
        else:
            features.grad += entry.grad_features
        return entry.loss.clone()

    def _give_up(self, entry: _Entry, error: BaseException, where: str) -> None:
        """A capture that failed: the key runs eagerly from now on, with a warning."""
        self._entries.pop(entry.call, None)
        self.failed[entry.call] = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"head.cuda_graph: capturing the head's {where} failed ({type(error).__name__}: {error}); "
            f"steps of batch shape {entry.call.features_shape} run eagerly from now on",
            RuntimeWarning,
            stacklevel=3,
        )

    def _warm(self, call: _Call) -> None:
        self._warmed[call] = None
        self._warmed.move_to_end(call)
        while len(self._warmed) > 4 * MAX_KEYS:
            self._warmed.popitem(last=False)

    def _new_entry(self, call, weight, group, update, device) -> _Entry:
        idle = [key for key, entry in self._entries.items() if not entry.busy]  # oldest first
        for key in idle[: max(0, len(self._entries) - MAX_KEYS + 1)]:  # their graphs and pools go
            del self._entries[key]
        entry = _Entry(call, weight, group, dataclasses.replace(update), device)
        self._entries[call] = entry
        return entry

    # -- capture and replay ---------------------------------------------------------------

    # What a capture is; the CPU tests put a recording stand-in here.

    @staticmethod
    def _device_takes(features, weight) -> bool:
        return features.is_cuda and weight.is_cuda

    @staticmethod
    def _new_graph():
        return torch.cuda.CUDAGraph()

    @staticmethod
    def _pool():
        return torch.cuda.graph_pool_handle()

    @staticmethod
    def _capture(graph, pool, body, entry) -> None:
        # thread_local: a trainer's other threads (NCCL's watchdog, pinned-memory copies) may
        # make CUDA calls meanwhile; only this thread's must be capturable
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            body(entry)

    @staticmethod
    def _copy_inputs(entry: _Entry, features: torch.Tensor, labels: torch.Tensor, update: SGDUpdate) -> None:
        entry.features.copy_(features.detach())
        entry.labels.copy_(labels)
        _fill(entry.lr, update.lr)
        _fill(entry.step, update.step)

    def run_forward(self, entry: _Entry, features: torch.Tensor, labels: torch.Tensor, update: SGDUpdate) -> None:
        self._copy_inputs(entry, features, labels, update)
        if entry.forward_graph is None:
            entry.pool = self._pool()
            entry.forward_graph, entry.backward_graph = self._new_graph(), self._new_graph()
            try:
                self._capture(entry.forward_graph, entry.pool, _forward_body, entry)
            except Exception as error:  # noqa: BLE001 - any failure: the eager step instead
                self._give_up(entry, error, "forward")
                raise _CaptureFailed from error
            self.captures += 1
        entry.forward_graph.replay()
        self.replays += 1

    def backward(self, loss: torch.Tensor, features: torch.Tensor) -> bool:
        """``loss.backward()`` run directly, without autograd's engine, where ``loss`` is a
        replayed loss awaiting its backward and ``features`` the features it was called
        with: its backward graph replays for an incoming gradient of 1 (the SGD step lands)
        and dF is added to ``features.grad``, as autograd would. Returns whether it ran;
        False (nothing ran) for any other loss, for the call that captures the backward
        graph, and for features that are not a leaf free of hooks (their gradient flows on,
        or a hook awaits it): the caller backs those through autograd.

        The engine hands a CUDA backward to its device thread and waits for it, about 0.1 ms
        in which a small replayed step's GPU idles (docs/kernels.md); a replayed loss has
        one input that needs a gradient, so the engine has nothing else to do."""
        ctx = loss.grad_fn
        if not isinstance(ctx, _ReplayedLoss._backward_cls) or ctx.graphs is not self or ctx.token is None:
            return False
        if ctx.features() is not features:
            raise ValueError("HeadStepGraphs.backward: features are not the ones this loss was computed from")
        if not ctx.entry.backward_captured:  # captured in autograd's thread, where its library handles are
            return False
        if not _plain_leaf(features):
            return False
        grad_features = _replayed_backward(ctx, 1.0)
        if features.grad is None:
            features.grad = grad_features
        else:
            features.grad += grad_features
        return True

    def run_backward(self, entry: _Entry, grad_loss: torch.Tensor | float) -> None:
        _fill(entry.grad, grad_loss)
        if not entry.backward_captured:
            # Captured here, in the thread autograd runs backwards in, as the eager warm-up's
            # was: the library handles it made (cuBLAS's) belong to that thread, and creating
            # one during a capture fails.
            try:
                self._capture(entry.backward_graph, entry.pool, _backward_body, entry)
            except Exception as error:  # noqa: BLE001 - the forward's state is intact: run the body eagerly
                self._give_up(entry, error, "backward")
                _backward_body(entry)
                return
            entry.backward_captured = True
        entry.backward_graph.replay()


def _plain_leaf(features: torch.Tensor) -> bool:
    """Whether dF may be added to ``features.grad`` directly: only autograd carries it past a
    non-leaf or runs a tensor's hooks (torch keeps them on these two attributes; a leaf
    without hooks has them empty or None)."""
    return (
        features.is_leaf and not features._backward_hooks and not getattr(features, "_post_accumulate_grad_hooks", None)
    )


def _fill(target: torch.Tensor, value) -> None:
    """A device scalar set from a number (a fill: no host sync) or from a tensor."""
    if isinstance(value, torch.Tensor):
        target.copy_(value.detach().reshape(target.shape))
    else:
        target.fill_(value)


def _with_device_scalars(update: SGDUpdate, device) -> SGDUpdate:
    """The update with its learning rate and step as one-element device tensors (fresh ones:
    an eager step never shares the graphs' inputs)."""
    lr = torch.empty(1, dtype=torch.float32, device=device)
    step = torch.empty(1, dtype=torch.int64, device=device)
    _fill(lr, update.lr)
    _fill(step, update.step)
    return dataclasses.replace(update, lr=lr, step=step)


def _forward_body(entry: _Entry) -> None:
    """The forward as the eager gemm path runs it, on the entry's inputs."""
    from hydrahead.kernels.fused_loss import merged_pass

    call = entry.call
    checks = MergeChecks()
    entry.local_pass, _, _, entry.loss, entry.num_valid, entry.lse_valid = merged_pass(
        entry.features,
        entry.weight,
        entry.labels,
        call.class_start,
        entry.group,  # one rank: no collective
        call.num_classes,
        call.scale,
        call.margin,
        call.margin_type,
        call.ignore_index,
        True,
        checks,
    )
    entry.check_values = checks.values(entry.features.device)


def _backward_body(entry: _Entry) -> None:
    """The backward as the eager gemm path runs it: dF, and the SGD step on the rows."""
    from hydrahead.kernels.fused_loss import features_gradient, gemm_backward, gradient_scale

    # the forward's verdict held on the device: a replay whose loss is not finite, or whose
    # checks fail, leaves the rows as they were
    update = dataclasses.replace(entry.update, lr=entry.lr, step=entry.step, skip=entry.local_pass.skip)
    grad_scale = gradient_scale(entry.grad, entry.call.scale, entry.num_valid)
    grad_feat_op, _ = gemm_backward(entry.local_pass, entry.lse_valid, grad_scale, update, True, True)
    entry.grad_features = features_gradient(entry.local_pass, grad_feat_op, entry.call.features_dtype)


def _whole_body(entry: _Entry) -> None:
    """The forward and, for the entry's fixed incoming gradient, the backward (``step``)."""
    _forward_body(entry)
    _backward_body(entry)


class _CaptureFailed(Exception):
    """A forward's capture failed before anything ran: the caller takes the eager step."""


class _Token:
    """Held by a replayed forward's autograd context until its backward: the key stays busy."""


class _ReplayedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, labels, graphs: HeadStepGraphs, entry: _Entry, update: SGDUpdate, checks):
        graphs.run_forward(entry, features, labels, update)
        values = entry.check_values.clone()  # the next replay rewrites the entry's
        ignore_index = entry.call.ignore_index
        checks.add(values[0], values[1], values[2], labels, labels != ignore_index, ignore_index)
        ctx.token = _Token()
        entry.pending = weakref.ref(ctx.token)
        ctx.graphs, ctx.entry, ctx.features = graphs, entry, weakref.ref(features)
        return entry.loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        return _replayed_backward(ctx, grad_loss), None, None, None, None, None


def _replayed_backward(ctx, grad_loss: torch.Tensor | float) -> torch.Tensor:
    """dF of a replayed loss (a copy), its backward graph replayed for ``grad_loss``."""
    if ctx.token is None:  # its step landed already; the entry may hold a later forward's state
        raise RuntimeError(
            "the head step's backward ran already (it applied the SGD step): with head.cuda_graph a loss "
            "takes one backward (no retain_graph)"
        )
    entry = ctx.entry
    ctx.graphs.run_backward(entry, grad_loss)
    grad_features = entry.grad_features.clone()
    entry.pending = ctx.token = None
    return grad_features

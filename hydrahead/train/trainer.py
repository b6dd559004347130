"""The training loop: a DDP backbone feeding the class-sharded head.

One step, on every rank:
    inputs_r --backbone (DDP)--> f_r --all-gather--> F (G x D), labels Y
    head loss over this rank's classes, all or the step's active rows (head.selection;
        one MAX + one SUM all-reduce of G floats)
    head backward: weight grad (local) and dF (partial) --reduce-scatter--> df_r
    backbone backward from df_r; DDP all-reduces the backbone gradients (a SUM, see below)
    backbone optimizer (sgd/adamw/lars/lamb); head SGD on its own shard
With comm.overlap the gather, head and reduce-scatter run on micro-batches with the
transfers in flight behind compute (hydrahead.comm.overlap): same loss, same gradients.

Gradient bookkeeping: the loss is the mean over the global batch, and the reduce-scatter
already hands each rank the full gradient of that loss for its own samples. The
backbone gradient of the global loss is therefore the *sum* over ranks of the per-rank
gradients, so DDP's communication hook sums instead of averaging. A 1-rank and a 2-rank run
of the same global batch then compute the same gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import record_function

from hydrahead.comm import compression
from hydrahead.comm.overlap import OverlappedHead, transfer_group
from hydrahead.comm.simulated import SimulatedWorkers
from hydrahead.comm.timing import CommClock
from hydrahead.config import Config, bucket_mb, config_to_dict, save_config, topk_momentum_correction, validate
from hydrahead.counter_rng import counter_hash
from hydrahead.data.build import batches, build_dataset, eval_batches
from hydrahead.data.sampler import local_batch_size
from hydrahead.distributed.collectives import (
    all_gather_labels,
    all_reduce_sums,
    average_buffers,
    group_rank,
    start_gather_rows,
    start_sum_own_rows,
)
from hydrahead.distributed.setup import DistEnv
from hydrahead.distributed.sharded_softmax import MergeChecks
from hydrahead.eval.metrics import SAMPLES, add_sums, means, single_label_sums, topk_hits
from hydrahead.head import ShardedClassifier
from hydrahead.head.active import ActiveClassSelector
from hydrahead.models import backbone_from_config, param_groups_for_decay
from hydrahead.optim import build_optimizer, lr_multiplier
from hydrahead.optim.speculative import StepSnapshot
from hydrahead.train import checkpoint as ckpt
from hydrahead.train.collector import StepGarbageCollector
from hydrahead.train.faults import NonFiniteError, PreemptionWatcher, fault_plan_from_env
from hydrahead.train.metrics import MetricsLogger, peak_memory_mib

PREEMPTED_MARKER = "PREEMPTED"

# What a resume may change (docs/reliability.md). Keys that shape the saved tensors or the
# data stream are refused; keys that only steer this invocation are taken silently; any
# other change is taken with a warning, since it alters the training being continued.
REJECTED_ON_RESUME = (
    "run.seed",
    "train.global_batch",
    "model.backbone",
    "model.embed_dim",
    "model.input_dim",
    "model.hidden_dim",
    "model.depth",
    "head.num_classes",
    "data.kind",
    "data.feature_dim",
    "data.image_size",
    "data.family_size",
    "data.family_spread",
    "data.noise",
    "data.zipf_exponent",
    "optim.backbone",
)
ACCEPTED_ON_RESUME = (
    "run.dir",
    "train.steps",
    "train.stop_after",
    "train.eval_every",
    "train.eval_samples",
    "train.eval_hard_negatives",
    "train.nonfinite",
    "train.max_skipped",
    "train.gc_every",
    "model.compile",
    "data.path",
    "data.num_workers",
    "data.on_bad_sample",
    "checkpoint.*",
    "log.*",
    "dist.*",
)
_RNG_STREAM = 2000


def _total_norm(parameters) -> torch.Tensor:
    """L2 norm over all gradients: finite exactly when every gradient entry is."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([norm.float() for norm in torch._foreach_norm(grads)]))


def _without_an_owned_label(
    active_rows: torch.Tensor, global_labels: torch.Tensor, class_start: int, class_stop: int
) -> torch.Tensor:
    """The injected ``lost_label`` fault: the active rows less the row of the first label this
    shard owns (unchanged if it owns none)."""
    owned = global_labels[(global_labels >= class_start) & (global_labels < class_stop)]
    if owned.numel() == 0:
        return active_rows
    return active_rows[active_rows != owned[0] - class_start]


def autocast(cfg: Config, device: torch.device):
    """The forward passes' autocast: bf16 where model.autocast asks for it on this device
    (``auto``: on CUDA), else none. Training, evaluation and prediction share it."""
    if cfg.model.autocast == "bf16" or (cfg.model.autocast == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def config_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """Dotted keys whose values differ between two config dicts: {key: (saved, current)}."""
    return {
        f"{section}.{key}": (saved.get(section, {}).get(key), value)
        for section, values in current.items()
        for key, value in values.items()
        if saved.get(section, {}).get(key) != value
    }


def check_resume_changes(saved: dict, current: dict, checkpoint: Path) -> list[str]:
    """Raise for a refused change; return warnings for changes that are taken but alter training."""
    changes = config_changes(saved, current)
    refused = [key for key in changes if key in REJECTED_ON_RESUME]
    if refused:
        details = "; ".join(f"{key}={changes[key][0]!r} there, {changes[key][1]!r} now" for key in refused)
        raise ValueError(
            f"cannot resume {checkpoint}: {details}. These keys fix the saved model or the data stream; "
            "use a new run.dir, or the checkpoint's values"
        )
    silent = {key for key in changes if key in ACCEPTED_ON_RESUME or f"{key.split('.')[0]}.*" in ACCEPTED_ON_RESUME}
    return [
        f"resuming with {key} changed from {old!r} to {new!r}"
        for key, (old, new) in changes.items()
        if key not in silent
    ]


def cpu_threads(cfg: Config, device: torch.device) -> int | None:
    """Intra-op threads to pin (None: leave torch's default). CPU reductions split by thread
    count, so a deterministic CPU run pins one count whatever the environment says."""
    if cfg.run.cpu_threads is not None:
        return cfg.run.cpu_threads
    return 1 if cfg.head.index_deterministic and device.type == "cpu" else None


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv):
        validate(cfg, world_size=env.world_size)
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.dir)
        self.device = env.device
        self.local_batch = local_batch_size(cfg.train.global_batch, env.world_size)
        threads = cpu_threads(cfg, self.device)
        if threads is not None:
            torch.set_num_threads(threads)

        # Same seed on every rank and at every world size: identical replicas from the start.
        torch.manual_seed(cfg.run.seed)
        backbone = backbone_from_config(cfg).to(self.device)
        if cfg.model.sync_batchnorm and self.device.type == "cuda":
            backbone = torch.nn.SyncBatchNorm.convert_sync_batchnorm(backbone, process_group=env.data_group)
        self.memory_format = (
            torch.channels_last
            if (cfg.model.channels_last and backbone.input_kind == "images" and self.device.type == "cuda")
            else torch.contiguous_format
        )
        backbone = backbone.to(memory_format=self.memory_format)
        self.backbone_module = backbone
        self.backbone = DDP(
            backbone,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            process_group=env.data_group,
            bucket_cap_mb=bucket_mb(cfg),
            broadcast_buffers=cfg.model.broadcast_buffers,
        )
        # The gradient exchange sums over ranks (see above), compressed as comm.grad_compression says.
        o = cfg.optim
        # Momentum correction moves SGD's momentum and weight decay from the optimizer into the exchange.
        self.exchange_momentum = topk_momentum_correction(cfg)
        self.clock = CommClock(self.device)  # time in each collective on logged steps
        self._build_exchange(backbone)
        self.forward_backbone = torch.compile(self.backbone) if cfg.model.compile else self.backbone

        if cfg.head.cuda_graph and self.device.type != "cuda":
            raise ValueError(
                f"head.cuda_graph replays CUDA graphs: it needs a CUDA device, this run is on {self.device}"
            )
        # The head trains itself (torch.optim.SGD's rule, the LR handed over each step); it is in
        # no torch optimizer and outside gradient clipping. With head.impl=triton its update
        # runs inside the loss's backward.
        self.head = ShardedClassifier(
            cfg.head.num_classes,
            cfg.model.embed_dim,
            group=env.head_group,
            seed=cfg.run.seed,
            init=cfg.head.init,
            init_std=cfg.head.init_std,
            margin_type=cfg.head.margin_type,
            scale=cfg.head.scale,
            margin=cfg.head.margin,
            chunk_size=cfg.head.chunk_size,
            device=self.device,
            dtype=cfg.head_weight_dtype,
            impl=cfg.head_impl,
            momentum=cfg.head.momentum,
            weight_decay=cfg.head.weight_decay,
            momentum_dtype=cfg.head_momentum_dtype or torch.float32,
            grad_filter=cfg.head.grad_filter,
            exact_kernels=cfg.head.exact_kernels,
            cuda_graph=cfg.head.cuda_graph,
            inactive_rows=cfg.head.inactive_rows,
            settle_every=cfg.head.settle_every,
            rounding=cfg.head.rounding,
            kahan_dtype=cfg.head_kahan_dtype,
            unit_scaling=cfg.head.unit_scaling,
        )

        try:  # a storage dtype and width the fused kernels cannot hold fail here, not in the first step
            self.head.check_fused_kernels(logit_offsets=cfg.head.fill_correction)
        except ValueError as error:
            raise ValueError(
                f"head.weight_dtype={cfg.head.weight_dtype}, model.embed_dim={cfg.model.embed_dim}: {error}"
            ) from error

        self.overlapped = None
        if cfg.comm.overlap:
            # The pipeline's bulk transfers get a communicator of their own (see hydrahead.comm.overlap).
            transfers = transfer_group(env.head_group, env.backend)
            self.overlapped = OverlappedHead(self.head, cfg.comm.micro_batches, transfers, self.clock)

        h = cfg.head
        build_group = None
        if h.selection == "graph" and not h.index_deterministic and self.head.world_size > 1:
            # The graph's background builds exchange rows in a worker thread: a communicator of their own.
            build_group = transfer_group(env.head_group, env.backend)
        self.selector = ActiveClassSelector(
            h.selection,
            self.head.class_start,
            self.head.class_stop,
            budget=h.budget,
            knn_k=h.knn_k,
            knn_skip_label=h.knn_skip_label,
            trim_to_budget=h.knn_trim_to_budget,
            graph_k=h.graph_k,
            graph_search=h.graph_search,
            graph_refresh_every=h.graph_refresh_every,
            graph_refresh_window=h.graph_refresh_window,
            num_classes=h.num_classes,
            fixed_size=h.knn_fixed_size,
            rebuild_every=h.rebuild_every,
            max_index_age=h.index_max_age,
            retrain_every=h.index_retrain_every,
            index=h.index,
            index_type=h.index_type,
            nlist=h.index_nlist,
            nprobe=h.index_nprobe,
            deterministic=h.index_deterministic,
            cosine=h.margin_type != "none",
            seed=cfg.run.seed,
            recall_every=h.recall_every,
            ignore_index=self.head.ignore_index,
            device=self.device,
            group=env.head_group,
            build_group=build_group,
            rows_move_every_step=h.search_paid_rows,
            fill_correction=h.fill_correction,
        )

        self.backbone_optim = build_optimizer(
            o.backbone,
            backbone,
            lr=o.lr,
            momentum=0.0 if self.exchange_momentum else o.momentum,
            weight_decay=0.0 if self.exchange_momentum else o.weight_decay,
            betas=tuple(o.betas),
            eps=o.eps,
            trust_coefficient=o.trust_coefficient,
        )
        self.base_lrs = [g["lr"] for g in self.backbone_optim.param_groups]
        self.step_snapshot = StepSnapshot(self.backbone_optim)  # the step is taken before it is judged
        # PowerSGD's error feedback and warm start change inside the backward's gradient hook
        # and cannot be put back: with it, a loss is judged before the backward runs.
        self.backward_undoable = cfg.comm.grad_compression != "powersgd"

        data_device = self.device  # procedural data is generated where it is consumed
        self.train_data = build_dataset(cfg, "train", device=data_device)
        self.eval_data = build_dataset(cfg, "eval", device=data_device) if cfg.train.eval_every > 0 else None
        self.step = 0
        # What this run knows of its checkpoints, for messages that must claim no more.
        self.resumed_from: str | None = None
        self.last_checkpoint: str | None = None
        self.skipped_total, self.skipped_in_a_row = 0, 0
        self.faults = fault_plan_from_env()

    def _build_exchange(self, backbone: torch.nn.Module) -> None:
        """The backbone's gradient exchange: the configured DDP hook, or with
        comm.simulate_workers the W workers simulated in this rank. Sets ``comm_counters``,
        ``simulated`` and ``topk_workers`` (top-k state by worker: its rank, or the simulated
        worker's index)."""
        cfg, env, o = self.cfg, self.env, self.cfg.optim
        comm = dataclasses.replace(cfg.comm, topk_momentum_correction=self.exchange_momentum)  # null resolved
        names = {param: name for name, param in backbone.named_parameters()}
        decay = {
            names[p]: group["weight_decay"]
            for group in param_groups_for_decay(backbone, o.weight_decay)
            for p in group["params"]
        }
        self.simulated, self.topk_workers = None, {}
        if comm.simulate_workers <= 1:
            self.comm_counters, topk = compression.register(
                self.backbone,
                env.data_group,
                comm,
                names,
                wrap=lambda hook: self.clock.hook("backbone_allreduce", hook),
                momentum=o.momentum,
                weight_decay=decay,
                seed=cfg.run.seed,
            )
            if topk is not None:
                self.topk_workers = {env.rank: topk}
            return
        self.comm_counters = compression.CommCounters()
        if comm.grad_compression == "topk":
            self.topk_workers = {
                w: compression.make_topk(
                    comm,
                    names,
                    self.comm_counters if w == 0 else compression.CommCounters(),  # one worker's bytes
                    momentum=o.momentum,
                    weight_decay=decay,
                    seed=cfg.run.seed,
                    worker=w,
                )
                for w in range(comm.simulate_workers)
            }
        self.simulated = SimulatedWorkers(
            backbone,
            comm.simulate_workers,
            counters=self.comm_counters,
            exchanges=list(self.topk_workers.values()) or None,
            forward=torch.compile(backbone) if cfg.model.compile else backbone,
            broadcast_buffers=cfg.model.broadcast_buffers,
        )

    # ------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------

    def _state(self, deferred: dict | None = None) -> dict:
        """The DCP state dict: backbone and its optimizer (replicated), head rows (sharded by
        class). ``deferred``: the steps the head's rows owe (``ShardedClassifier.deferred_state``):
        ``owed_steps`` is a per-class row tensor, the maps and their age are replicated."""
        model_state, optim_state = get_state_dict(self.backbone, self.backbone_optim)
        head_rows = {"weight": self.head.weight.data}
        if self.head.momentum_buffer is not None:
            head_rows["momentum"] = self.head.momentum_buffer
        if self.head.compensation is not None:
            head_rows["compensation"] = self.head.compensation
        if deferred is not None:
            head_rows["owed_steps"] = deferred["owed_steps"]
        head = {
            name: ckpt.class_rows(rows, self.head.class_start, self.head.num_classes, self.env.rank)
            for name, rows in head_rows.items()
        }
        state = {"backbone": model_state, "backbone_optim": optim_state, "head": head}
        if deferred is not None:
            state[ckpt.HEAD_DEFERRED] = {"maps": deferred["maps"], "since_settled": deferred["since_settled"]}
        return state

    @property
    def _saves_deferred_steps(self) -> bool:
        """Rows can owe steps only when some sit out a step (a selection) and continue moving."""
        return self.head.defers_steps and self.cfg.head.selection != "full"

    def _meta(self) -> dict:
        cfg = self.cfg
        return {
            "cursor": self.step * cfg.train.global_batch,
            "world_size": self.env.world_size,
            "num_classes": cfg.head.num_classes,
            "embed_dim": cfg.model.embed_dim,
            "backbone": cfg.model.backbone,
            "config": config_to_dict(cfg),
            "rng": "derived from (run.seed, step, rank) at every step",
        }

    def _settle_buffers(self) -> None:
        """Per-rank BatchNorm statistics (model.broadcast_buffers=false) become their mean over
        the ranks, so evaluation and checkpoints see one model; training-mode forwards use
        batch statistics, so the losses do not change."""
        if not self.cfg.model.broadcast_buffers:
            if self.simulated is not None:
                self.simulated.settle_buffers()
            average_buffers(self.backbone_module, self.env.data_group)

    def save(self, *, checksums: bool = True) -> Path:
        """Checkpoint the run as it stands. Nothing that training reads is changed by a save
        (the head's deferred steps are saved, not paid), so a run's steps do not depend on
        when it saved. ``checksums=False`` writes no manifest (only to measure its cost)."""
        self._settle_buffers()
        deferred = self.head.deferred_state() if self._saves_deferred_steps else None
        state, meta = self._state(deferred), self._meta()
        meta[ckpt.HEAD_DEFERRED] = deferred is not None
        if self.selector.saves_index:
            self.selector.note_rows_moved(self.head.settles)  # what the next step's select would note
            # Per-rank keys: an index belongs to one shard and is reloaded only at the same world size.
            state["head_index"] = {f"rank{self.env.rank}": self.selector.index_state()}
            meta["head_index_world_size"] = self.env.world_size
            meta["head_index"] = self.selector.index_signature
        graph = self.selector.graph_state() if self.selector.saves_graph else None
        if graph is not None:
            # By class, as the head's rows: a resume at any world size reads its own classes' neighbours.
            table, built_step = graph
            state["head_graph"] = self._graph_checkpoint_state(
                table, self.selector.graph_scores(), self.selector.graph_moved_at()
            )
            if self.cfg.head.graph_refresh_every:  # the same on every rank: saved once
                state["head_graph"]["seen_labels"] = self.selector.seen_labels(self._seen_labels_length)
            meta["head_graph"] = {**self.selector.graph_signature, "built_step": built_step}
        if self.topk_workers:  # per worker: what each has not sent yet
            state["comm_residuals"] = {f"rank{w}": topk.state_dict() for w, topk in self.topk_workers.items()}
            meta["comm_residuals_world_size"] = self.num_workers
        path = ckpt.save_checkpoint(
            self.env, self.run_dir, self.step, state, meta, keep=self.cfg.checkpoint.keep, checksums=checksums
        )
        self.last_checkpoint = f"this run last saved {path.name}"
        return path

    @property
    def num_workers(self) -> int:
        """Data-parallel workers: the ranks, or the workers simulated inside the one rank."""
        return self.env.world_size * self.cfg.comm.simulate_workers

    def _resume_residuals(self, path: Path, meta: dict) -> None:
        """topk: load each worker's unsent gradients. On another number of workers the saved
        workers' residuals are summed onto worker 0 (what they owed together is still sent, once)."""
        if not self.topk_workers:
            return
        saved = meta.get("comm_residuals_world_size")
        if saved is None:
            if self.env.is_main:
                print(
                    f"warning: checkpoint {path} holds no top-k residuals: they start at zero",
                    file=sys.stderr,
                    flush=True,
                )
            return
        same = saved == self.num_workers
        template = next(iter(self.topk_workers.values()))
        wanted = list(self.topk_workers) if same else (list(range(saved)) if 0 in self.topk_workers else [])
        state = {"comm_residuals": {f"rank{w}": template.empty_state_dict() for w in wanted}}
        # DCP's load is collective: a rank with nothing to read takes part with an empty state.
        ckpt.load_checkpoint(self.env, path, state)
        loaded = state["comm_residuals"]
        for worker, topk in self.topk_workers.items():
            if same:
                topk.load_summed([loaded[f"rank{worker}"]])
            else:
                topk.load_summed(list(loaded.values()) if worker == 0 else [])
        if not same and self.env.is_main:
            unit = "worker" if self.simulated is not None else "rank"
            print(
                f"notice: top-k residuals of {saved} {unit}s summed onto {unit} 0 of {self.num_workers}",
                file=sys.stderr,
                flush=True,
            )

    def _resume_index(self, path: Path, meta: dict) -> None:
        """Deterministic knn: load this shard's saved index, or say why it is rebuilt instead."""
        if not self.selector.saves_index:
            return
        saved, signature = meta.get("head_index_world_size"), meta.get("head_index")
        if saved != self.env.world_size or not self.selector.loads_index_of(signature):
            if self.env.is_main:
                if saved is None:
                    why = "holds no index"
                elif saved != self.env.world_size:
                    why = f"was saved by {saved} ranks, not {self.env.world_size}"
                else:
                    why = f"holds an index {signature}, not {self.selector.index_signature}"
                what = (
                    "knn index is rebuilt at the next step"
                    if self.cfg.head.selection == "knn"
                    else ("refreshed class graph's index is built anew from the resumed rows")
                )
                print(
                    f"warning: checkpoint {path} {why}: the {what}, so this run "
                    "will not select exactly what an uninterrupted one would",
                    file=sys.stderr,
                    flush=True,
                )
            return
        key = f"rank{self.env.rank}"
        state = {"head_index": {key: self.selector.empty_index_state(self.cfg.model.embed_dim)}}
        ckpt.load_checkpoint(self.env, path, state)
        self.selector.load_index_state(state["head_index"][key], self._rows_to_search())

    def _resume_graph(self, path: Path, meta: dict) -> None:
        """Deterministic graph: load this shard's rows of the saved class graph, or say why it is rebuilt."""
        if not self.selector.saves_graph:
            return
        saved = meta.get("head_graph")
        signature = None if saved is None else {key: saved.get(key) for key in self.selector.graph_signature}
        if signature != self.selector.graph_signature:
            if self.env.is_main:
                why = "holds no class graph" if saved is None else f"holds a class graph {signature}"
                print(
                    f"warning: checkpoint {path} {why}, not {self.selector.graph_signature}: the class graph is "
                    "rebuilt at the next step, so this run will not select exactly what an uninterrupted one would",
                    file=sys.stderr,
                    flush=True,
                )
            return
        table = self.selector.empty_graph_table()
        scores = seen = moved_at = None
        if self.cfg.head.graph_refresh_every:
            scores = torch.empty(table.shape, dtype=torch.float32, device=table.device)
            seen = torch.empty(self._seen_labels_length, dtype=torch.long, device=table.device)
        if self.cfg.head.graph_refresh_window:
            moved_at = torch.empty(table.shape[0], dtype=torch.int64, device=table.device)
        state = {"head_graph": self._graph_checkpoint_state(table, scores, moved_at)}
        if seen is not None:
            state["head_graph"]["seen_labels"] = seen
        ckpt.load_checkpoint(self.env, path, state)
        if not self.cfg.head.graph_refresh_every:
            self.selector.load_graph_state(table, saved["built_step"])
            return
        self.selector.load_graph_state(table, saved["built_step"], scores, seen, self._rows_to_search(), moved_at)

    def _graph_checkpoint_state(
        self, table: torch.Tensor, scores: torch.Tensor | None, moved_at: torch.Tensor | None = None
    ) -> dict:
        """The class graph's per-class tensors, by class as the head's rows: a resume at any
        world size reads its own classes' neighbours."""
        rows = {"table": table, "scores": scores, "moved_at": moved_at}
        rows = {name: tensor for name, tensor in rows.items() if tensor is not None}
        return {
            name: ckpt.class_rows(tensor, self.head.class_start, self.head.num_classes, self.env.rank)
            for name, tensor in rows.items()
        }

    @property
    def _seen_labels_length(self) -> int:
        """Room for the labels of one refresh period (a refreshed graph's checkpoint)."""
        return self.cfg.head.graph_refresh_every * self.cfg.train.global_batch

    def resume(self, *, verify: bool = True) -> bool:
        """Load the newest checkpoint of run.dir that verifies, if any; True when one was loaded.

        All ranks check it against its manifest (each its share of the files, hashed while
        DCP reads them) and agree; a damaged or incomplete one is skipped with a warning
        naming the file, and the one before it loaded over what was read. ``verify=False``
        checks all but the checksums (only to measure their cost)."""

        def skipped(path: Path, check: ckpt.CheckpointCheck) -> None:
            if self.env.is_main:
                print(f"warning: skipping checkpoint {path}: {check.describe()}", file=sys.stderr, flush=True)

        loaded = {}

        def load(path: Path) -> None:  # runs while the data files are hashed; kept only if they verify
            meta = ckpt.read_meta(path)  # meta.json verified before this
            # A refused change (a tensor's shape, the data stream) raises before DCP reads anything.
            notices = check_resume_changes(meta["config"], config_to_dict(self.cfg), path)
            # Checkpoints from before deferred steps were saved hold settled rows: nothing is owed.
            deferred = self.head.empty_deferred_state() if meta.get(ckpt.HEAD_DEFERRED) else None
            state = self._state(deferred)
            loaded.clear()
            ckpt.load_checkpoint(self.env, path, state)
            loaded.update(meta=meta, deferred=deferred, state=state, notices=notices)

        found = ckpt.newest_loadable_checkpoint(
            self.run_dir, group=self.env.data_group, contents=verify, skipped=skipped, load=load
        )
        if found is None:
            return False
        path, check = found
        meta, deferred, state = loaded["meta"], loaded["deferred"], loaded["state"]
        if check.status == ckpt.OK:
            how = "checksums verified"
        else:
            how = f"not verified: {'; '.join(check.problems)}"
            if self.env.is_main:
                print(f"note: loading checkpoint {path}, {how}", file=sys.stderr, flush=True)
        self.resumed_from = f"{path.name} ({how})"
        self.last_checkpoint = f"this run resumed from {path.name}, " + (
            "whose checksums verified then" if check.status == ckpt.OK else how
        )
        for notice in loaded["notices"]:
            if self.env.is_main:
                print(f"warning: {notice}", file=sys.stderr, flush=True)
        if deferred is not None:
            self.head.load_deferred_state({**state[ckpt.HEAD_DEFERRED], "owed_steps": deferred["owed_steps"]})
        set_state_dict(
            self.backbone,
            self.backbone_optim,
            model_state_dict=state["backbone"],
            optim_state_dict=state["backbone_optim"],
        )
        self._resume_graph(path, meta)
        self._resume_index(path, meta)  # after the graph: a refreshed graph's IVF goes into it
        self._resume_residuals(path, meta)
        self.step = int(meta["step"])
        if meta["cursor"] != self.step * self.cfg.train.global_batch:
            raise ValueError(f"checkpoint {path}: data cursor {meta['cursor']} does not match step {self.step}")
        return True

    # ------------------------------------------------------------------------------------
    # Steps
    # ------------------------------------------------------------------------------------

    def _autocast(self):
        return autocast(self.cfg, self.device)

    def _set_learning_rates(self) -> float:
        o = self.cfg.optim
        mult = lr_multiplier(
            self.step,
            self.cfg.train.steps,
            o.warmup_steps,
            o.schedule,
            poly_power=o.poly_power,
            min_lr_ratio=o.min_lr_ratio,
        )
        for group, base in zip(self.backbone_optim.param_groups, self.base_lrs):
            group["lr"] = base * mult
        self.head.set_lr(self.cfg.head_lr * mult)
        self.head.set_step(self.step + 1)
        return o.lr * mult

    def _seed_step(self) -> None:
        # RNG state is a function of (seed, step, rank): any resume, at any world size, replays it.
        key = torch.tensor([self.step * 65536 + self.env.rank])
        torch.manual_seed(int(counter_hash(self.cfg.run.seed, _RNG_STREAM, key)) & (2**63 - 1))

    def train_step(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        *,
        timed: bool,
        preempt_requested: bool = False,
        prefetch: Callable[[], None] | None = None,
    ) -> dict:
        """One optimizer step on this rank's share of the global batch.

        Returns ``loss``, ``head_ms``, ``nonfinite`` (where a NaN/inf appeared, "" if
        nowhere) and ``preempt`` (whether any rank has been asked to stop). Parameters
        change only when every rank saw finite values. The gradients are judged in one
        small all-reduce that also carries the preemption flag, and that all-reduce's read
        is the step's one host read: the loss (the same number on every rank) and its
        checks are read with it, unless the head steps its shard in place in the backward
        with kernels that cannot hold that step back on the device (the stationary exact
        kernels with no active rows), which must know them before the backward.
        ``prefetch`` (say, the data stream's) is called before that read, so the next
        batch's device work is queued while the GPU still has this step's.
        """
        self.backbone.train()
        step = self.step + 1  # the step being taken, as logged
        sizes = [self.local_batch] * self.env.world_size
        self.clock.enabled = timed
        with self._autocast(), record_function("hydrahead::backbone_forward"):
            inputs = inputs.contiguous(memory_format=self.memory_format) if inputs.dim() == 4 else inputs
            forward = self.forward_backbone if self.simulated is None else self.simulated.forward
            local_features = forward(inputs)
        if self.faults.fires("nan_loss", step, self.env.rank):
            local_features = local_features * float("nan")

        # The head runs on detached features so its time can be measured alone and its
        # gradient handed to the backbone afterwards.
        if timed and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        with record_function("hydrahead::head"):
            loss, local_grad, comm_bytes, unjudged = self._head_step(step, local_features, labels, sizes)
        if timed and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        head_ms = (time.perf_counter() - start) * 1e3

        for topk in self.topk_workers.values():
            topk.step = step  # the density of this step's warm-up: read by the DDP hook in the backward
        with record_function("hydrahead::backbone_backward"):
            if local_grad is not None and self.simulated is not None:
                self.simulated.backward(local_grad)  # each worker's backward and message, then their sum
            elif local_grad is not None:
                local_features.backward(local_grad)  # backbone backward, DDP's bucketed sum behind it
        with record_function("hydrahead::step_end"):
            nonfinite, preempt = self._apply_updates(
                step,
                loss=loss,
                loss_finite=local_grad is not None,
                unjudged=unjudged,
                preempt_requested=preempt_requested,
                prefetch=prefetch,
            )
        timing = {}
        if timed:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            timing = self.clock.take()
            self.clock.enabled = False
        return {
            "loss": loss.detach(),
            "head_ms": head_ms,
            "nonfinite": nonfinite,
            "preempt": preempt,
            **comm_bytes,
            **self.comm_counters.take(),
            **timing,
        }

    def _head_step(self, step: int, local_features: torch.Tensor, labels: torch.Tensor, sizes: list[int]):
        """(loss, gradient for the local features or None if the loss is known not to be
        finite, bytes handed to the head's collectives, the loss's ``MergeChecks`` if they and
        its finiteness are left to the step's read in ``_apply_updates``, else None)."""
        if self.overlapped is not None:
            return self.overlapped.step(
                local_features,
                labels,
                None if self.cfg.head.selection == "full" else (lambda f, y: self._select(step, f, y)),
                checks=MergeChecks() if self.backward_undoable else None,
            )
        head_group = self.env.head_group
        gathered = self.clock.start(
            "feature_gather", lambda: start_gather_rows(local_features.detach(), sizes, head_group)
        ).wait()
        global_labels = all_gather_labels(labels, head_group, sizes=sizes)
        head_input = gathered.requires_grad_()
        with record_function("hydrahead::select"):
            active_rows, logit_offset = self._select(step, head_input, global_labels)
        unjudged = MergeChecks()
        # the whole shard's step held back on the device on a bad loss: loss and backward at
        # once (one CUDA graph with head.cuda_graph), judged at the step's one read
        at_once = (
            active_rows is None and self.backward_undoable and self.head.step_judged_on_device(head_input.shape[0])
        )
        with record_function("hydrahead::head_loss_and_backward" if at_once else "hydrahead::head_loss"):
            if at_once:
                loss = self.head.loss_and_backward(
                    head_input, global_labels, checks=unjudged, logit_offset=logit_offset
                )
            else:
                loss = self.head.loss(
                    head_input,
                    global_labels,
                    active_rows,
                    check_rows=False,
                    checks=unjudged,
                    logit_offset=logit_offset,
                )
        local_grad = None
        if not (at_once or (self.head.step_discardable and self.backward_undoable)):
            # the backward cannot be undone, nor held back on the device: judge the loss first
            values = torch.cat([torch.isfinite(loss).double().reshape(1), unjudged.values(self.device)]).tolist()
            unjudged.raise_if_failed(values[1:])
            finite, unjudged = bool(values[0]), None
        else:
            finite = True  # or not: read with the step's flags, and the step dropped then
        if finite:
            if not at_once:
                with record_function("hydrahead::head_backward"):
                    self.head.backward(loss, head_input)
            rank = group_rank(head_group)
            local_grad = self.clock.start(
                "grad_scatter", lambda: start_sum_own_rows(head_input.grad, sizes, rank, head_group)
            ).wait()
        # Payload this rank hands to the head's collectives (as for the backbone's, not wire bytes).
        comm_bytes = {
            "bytes_feature_gather": local_features.numel() * local_features.element_size()
            + labels.numel() * labels.element_size(),
            "bytes_grad_scatter": head_input.grad.numel() * head_input.grad.element_size()
            if local_grad is not None
            else 0,
        }
        return loss, local_grad, comm_bytes, unjudged

    def _rows_to_search(self) -> torch.Tensor:
        """The rows the selector searches: as stored, or (head.search_paid_rows) with the steps
        they owe paid, where the loss will read them."""
        return self.head.rows_as_the_loss_reads_them() if self.cfg.head.search_paid_rows else self.head.weight

    def _select(
        self, step: int, global_features: torch.Tensor, global_labels: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This shard's active rows for the step (None: all), with the lost_label fault applied,
        and head.fill_correction's logit offsets for them (None without it). The paid rows
        (head.search_paid_rows, a copy of the shard) are made only in the steps that read
        them: knn's every step, a graph's builds and recall measurements."""
        rows = self._rows_to_search if self.cfg.head.search_paid_rows else self.head.weight
        active_rows = self.selector.select(step, global_features, global_labels, rows, self.head.settles)
        logit_offset = self.selector.logit_offset  # one per active row
        if active_rows is not None and self.faults.fires("lost_label", step, self.env.rank):
            selected = active_rows
            active_rows = _without_an_owned_label(
                active_rows, global_labels, self.head.class_start, self.head.class_stop
            )
            if logit_offset is not None:
                logit_offset = logit_offset[torch.isin(selected, active_rows)]
        return active_rows, logit_offset

    def _apply_updates(
        self,
        step: int,
        *,
        loss: torch.Tensor,
        loss_finite: bool,
        unjudged: MergeChecks | None,
        preempt_requested: bool,
        prefetch: Callable[[], None] | None = None,
    ) -> tuple[str, bool]:
        """Judge the step on every rank (one small all-reduce, the step's host read), then step
        the optimizers or skip. ``unjudged``: the loss's checks, read here with the flags (and
        the loss's finiteness with them). Returns (where non-finite values were, "" if
        nowhere; preempt).

        The read drains the GPU's queue, so what the host queues before it runs while the
        host waits, and what it queues after, the GPU waits for: the backbone's optimizer
        step is taken before the read (and undone from a copy if the step is skipped), and
        ``prefetch`` (the next batch) is called before it too."""
        flags = torch.zeros(4, device=self.device)  # [preempt, backbone grads bad, head grads bad, loss bad]
        flags[:1].fill_(float(preempt_requested))  # fill_, not a copy from the host: no sync
        if loss_finite:
            head_grad = self.head.pending_grad  # None with head.impl=triton: updated in the backward
            if head_grad is not None and self.faults.fires("nan_grad", step, self.env.rank):
                head_grad[0, 0] = float("nan")
            flags[1] = ~torch.isfinite(_total_norm(self.backbone_module.parameters()))
            if head_grad is not None:
                flags[2] = ~torch.isfinite(head_grad.sum())
            if unjudged is not None:
                flags[3] = ~torch.isfinite(loss)
        dist.all_reduce(flags, group=self.env.data_group)
        read = flags if unjudged is None else torch.cat([flags.double(), unjudged.values(self.device)])
        if loss_finite:  # on speculation: most steps land
            self.step_snapshot.take()
            if self.cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.backbone_module.parameters(), self.cfg.train.grad_clip)
            self.backbone_optim.step()
        self.backbone_optim.zero_grad(
            set_to_none=True
        )  # a skipped step is undone from the copy: no gradient is needed again
        if prefetch is not None:
            prefetch()
        values = read.tolist()
        preempt, bad_backbone, bad_head, bad_loss = (int(v) for v in values[:4])
        if unjudged is not None:
            try:
                unjudged.raise_if_failed(values[4:])
            except ValueError:  # nothing of this step may land
                if loss_finite:
                    self.step_snapshot.restore()
                self.head.finish_step(skip=True)
                for topk in self.topk_workers.values():
                    topk.discard()
                raise
        nonfinite = (
            "loss"
            if not loss_finite or bad_loss
            else ", ".join(
                f"{what} gradients on {count} rank(s)"
                for what, count in (("backbone", bad_backbone), ("head", bad_head))
                if count
            )
        )
        for topk in self.topk_workers.values():  # a skipped step's unsent gradients must not advance
            topk.discard() if nonfinite else topk.commit()
        if loss_finite:
            self.step_snapshot.restore() if nonfinite else self.step_snapshot.release()
        self.head.finish_step(skip=bool(nonfinite))
        return nonfinite, preempt > 0

    def _selection_metrics(self) -> dict:
        """active_classes (mean per shard) and, where measured, knn_recall, graph_recall, active_recall,
        index_build_s, index_age, graph_refresh_s and graph_refreshed (the newest refresh's time and classes)
        (means over ranks; graph_recall and active_recall are the same on every rank)."""
        if self.cfg.head.selection == "full":
            return {}
        names = (
            "active_classes",
            "knn_recall",
            "graph_recall",
            "active_recall",
            "index_build_s",
            "index_age",
            "graph_refresh_s",
            "graph_refreshed",
        )
        last = self.selector.last
        values = torch.tensor(
            [math.nan if last[n] is None else float(last[n]) for n in names], dtype=torch.float64, device=self.device
        )
        dist.all_reduce(values, group=self.env.head_group)
        means = (values / self.env.world_size).tolist()
        return {name: value for name, value in zip(names, means) if not math.isnan(value)}

    def _sum_over_ranks(self, value: int) -> int:
        total = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(total, group=self.env.data_group)
        return int(total)

    def _handle_nonfinite(self, where: str, logger: MetricsLogger) -> None:
        """Apply train.nonfinite to a step whose loss or gradients were not finite (all ranks agree)."""
        message = f"step {self.step}: non-finite {where}"
        if self.cfg.train.nonfinite == "stop":
            raise NonFiniteError(
                f"{message}; stopping (train.nonfinite=stop). No checkpoint was written for this step, "
                f"so {ckpt.checkpoint_root(self.run_dir)} is as it was before it "
                f"({self.last_checkpoint or 'this run has neither resumed from nor saved a checkpoint'}); "
                f"python -m hydrahead.tools.verify_checkpoint {self.run_dir} checks them"
            )
        self.skipped_total += 1
        self.skipped_in_a_row += 1
        logger.message(f"{message}; step skipped ({self.skipped_in_a_row} in a row, {self.skipped_total} in all)")
        if self.skipped_in_a_row >= self.cfg.train.max_skipped:
            raise NonFiniteError(
                f"{message}; {self.skipped_in_a_row} steps in a row skipped, "
                f"the limit train.max_skipped={self.cfg.train.max_skipped}"
            )

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1, top-5, loss and the hard negatives' share of the softmax mass
        (``train.eval_hard_negatives``) on the first train.eval_samples held-out samples;
        a sample whose label is the head's ignore_index counts in none of them."""
        self._settle_buffers()
        self.backbone.eval()
        cfg = self.cfg
        k = min(5, cfg.head.num_classes)
        hard_k = min(cfg.train.eval_hard_negatives, cfg.head.num_classes - 1)
        total = None  # float64 sums over this rank's labelled samples (hydrahead.eval.metrics)
        for inputs, labels in eval_batches(
            self.eval_data,
            num_samples=cfg.train.eval_samples,
            batch_size=self.local_batch,
            rank=self.env.rank,
            world_size=self.env.world_size,
            device=self.device,
            num_workers=cfg.data.num_workers,
        ):
            with self._autocast():
                features = self.backbone_module(
                    inputs.contiguous(memory_format=self.memory_format) if inputs.dim() == 4 else inputs
                )
            features = features.float()
            loss = self.head(features, labels)  # the same mean over the global batch's labelled samples on every rank
            if hard_k:  # one pass over the shard for both
                _, ids, share = self.head.predict_with_share(features, labels, k, hard_k)
            else:
                _, ids = self.head.predict(features, k=k)
            labelled = labels != self.head.ignore_index
            ids, labels = ids[labelled], labels[labelled]
            sums = single_label_sums(ids, labels, ks=(1,))
            sums["top5"] = topk_hits(ids, labels, k).sum(dtype=torch.float64)
            # The global batch's mean loss weighted by this rank's labelled samples: summed over
            # the ranks, the mean times the batch's labelled count (a batch without has a NaN mean).
            sums["loss"] = torch.where(sums[SAMPLES] > 0, loss.double() * sums[SAMPLES], 0.0)
            if hard_k:
                sums["hard_negative_share"] = share[labelled].sum(dtype=torch.float64)
            total = add_sums(total, sums)
        total = all_reduce_sums(total, self.env.data_group)
        if total[SAMPLES] == 0:
            raise ValueError(
                f"none of the first {cfg.train.eval_samples} held-out samples has a label other than "
                f"ignore_index ({self.head.ignore_index}): nothing to evaluate"
            )
        return {f"eval_{name}": value for name, value in means(total).items() if name != SAMPLES}

    # ------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------

    def _metrics_row(self, lr: float, result: dict, losses: list[torch.Tensor], elapsed: float, data) -> dict:
        """The metrics.jsonl row of a logged step: ``result`` is its ``train_step``'s, ``losses``
        the finite losses since the last row, over ``elapsed`` seconds."""
        cfg = self.cfg
        row = {
            "loss": float(losses[-1]),
            "lr": lr,
            "head_lr": self.head.lr,
            "samples_per_s": len(losses) * cfg.train.global_batch / elapsed,
            "head_ms": result["head_ms"],
            "peak_mem_mib": peak_memory_mib(self.device),
            "skipped_steps": self.skipped_total,
            **{key: result[key] for key in ("bytes_feature_gather", "bytes_grad_scatter", "bytes_backbone_allreduce")},
            **{key: value for key, value in result.items() if key.startswith("ms_") or key == "comm_hidden"},
        }
        if self.topk_workers:
            row["topk_density"] = next(iter(self.topk_workers.values())).current_density()
        graphs = self.head.step_graphs
        if graphs is not None:  # head.cuda_graph: whether its steps replay, or run eagerly and why
            row.update(head_graph_captures=graphs.captures, head_graph_replays=graphs.replays)
            row["head_graph_failed"] = len(graphs.failed)
        row.update(self._selection_metrics())
        if cfg.data.on_bad_sample == "skip":
            row["bad_samples_skipped"] = self._sum_over_ranks(data.bad_samples_skipped)
        return row

    def _evaluate_and_save(self, end: int, logger: MetricsLogger, *, preempted: bool) -> bool:
        """After a step: evaluation and checkpoint as their cadence says, or the save of a
        preempted run. True when the run must stop here (preempted and saved)."""
        cfg, env = self.cfg, self.env
        # Evaluation first, also when preempted: it settles the head's deferred steps, which
        # the uninterrupted run does at this step too.
        if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
            logger.log_eval(self.step, self.evaluate())
            self.garbage.at_pause()
        if preempted:
            path = self.save()
            if env.is_main:
                (self.run_dir / PREEMPTED_MARKER).write_text(f"step {self.step}\n")
            logger.message(f"preempted: saved {path} and stopping; rerun the same command to continue")
            print(
                f"rank {env.rank}: preempted after step {self.step}, checkpoint saved, exiting 0",
                file=sys.stderr,
                flush=True,
            )
            return True
        if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or self.step == end:
            logger.message(f"saved checkpoint {self.save()}")
            self.garbage.at_pause()
        return False

    def train(self) -> int:
        """Run (or continue) training to train.stop_after or train.steps; returns the last step."""
        cfg, env = self.cfg, self.env
        resumed = self.resume()  # first: a refused resume must leave the run folder untouched
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)  # this invocation is the requeued one
        env.barrier()
        end = cfg.train.stop_after or cfg.train.steps
        watcher = PreemptionWatcher()
        logger = MetricsLogger(
            self.run_dir,
            enabled=env.is_main,
            total_steps=cfg.train.steps,
            start_step=self.step,
            progress=cfg.log.progress,
            tensorboard=cfg.log.tensorboard,
        )
        data = None
        self.garbage = StepGarbageCollector(cfg.train.gc_every)
        try:
            logger.message(
                f"hydrahead: {env.world_size} rank(s) on {env.backend}, {cfg.model.backbone} backbone, "
                f"{cfg.head.num_classes:,} classes ({self.head.num_local_classes:,} "
                f"on rank 0), global batch {cfg.train.global_batch}"
                + (f"; resumed at step {self.step} from {self.resumed_from}" if resumed else "")
            )
            if self.step >= end:
                logger.message(f"nothing to do: step {self.step} already reached {end}")
                return self.step
            data = batches(
                self.train_data,
                start_step=self.step,
                global_batch=cfg.train.global_batch,
                rank=env.rank,
                world_size=env.world_size,
                device=self.device,
                num_workers=cfg.data.num_workers,
            )
            pending_losses, interval_start = [], time.perf_counter()
            while self.step < end:
                lr = self._set_learning_rates()
                self._seed_step()
                inputs, labels = next(data)
                self.faults.before_step(self.step + 1, env.rank)
                log_now = (self.step + 1) % cfg.log.every == 0 or self.step + 1 == end
                prefetch = data.prefetch if self.step + 1 < end else None  # no batch past the run's last step
                preempt = watcher.requested or self.faults.fires("preempt", self.step + 1, env.rank)
                result = self.train_step(inputs, labels, timed=log_now, preempt_requested=preempt, prefetch=prefetch)
                self.step += 1
                logger.advance()
                if result["nonfinite"]:
                    self._handle_nonfinite(result["nonfinite"], logger)
                else:
                    self.skipped_in_a_row = 0
                    pending_losses.append(result["loss"])
                if log_now and pending_losses:
                    logger.log_train(
                        self.step,
                        self._metrics_row(lr, result, pending_losses, time.perf_counter() - interval_start, data),
                    )
                    pending_losses, interval_start = [], time.perf_counter()
                paused = time.perf_counter()
                stop = self._evaluate_and_save(end, logger, preempted=result["preempt"])
                self.garbage.after_step(self.step)
                # Evaluation, checkpoints and collections are not training: keep them out of samples_per_s.
                interval_start += time.perf_counter() - paused
                if stop:
                    return self.step
            return self.step
        finally:
            self.garbage.close()  # first: automatic collection back on whatever fails below
            if data is not None:
                data.close()  # stop loader workers on every exit path
            watcher.close()
            self.selector.close()
            logger.close()

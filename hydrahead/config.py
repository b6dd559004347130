"""Typed run configuration: dataclasses, a YAML file and dotted command-line overrides.

A run is configured by an optional YAML file whose nested mappings mirror the sections
below, followed by `key=value` overrides such as `head.num_classes=1000000`. Every value
is checked against the field's type (and its choices, where it has them); unknown keys
are errors that suggest the closest valid key. The resolved config is saved in the run
folder with `save_config` and loads back unchanged.
"""

import copy
import dataclasses
import difflib
import functools
import math
import operator
import os
import types
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value, key or combination of values that cannot be used."""


def _key(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    """A config key: its default, a one-line description and optionally its allowed values."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None}
    if isinstance(default, list):
        # A mutable default needs a factory so instances do not share one list.
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


BACKBONES = ("mlp", "resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small", "vit_base")
IMAGE_DATA_KINDS = ("procedural_images", "image_folder")


@dataclass
class RunConfig:
    dir: str = _key("runs/default", "run folder: checkpoints, logs and the resolved config.yaml")
    seed: int = _key(0, "base random seed (data, initialisation)")
    cpu_threads: int | None = _key(
        None,
        "intra-op CPU threads per rank (null: torch's default, which follows OMP_NUM_THREADS; a CPU run with "
        "head.index_deterministic=true takes 1, since CPU reductions such as LayerNorm's backward add in an "
        "order that depends on the thread count)",
    )


@dataclass
class TrainConfig:
    steps: int = _key(200, "total optimizer steps; the LR schedule spans them")
    stop_after: int | None = _key(
        None,
        "end this invocation after that many total steps, checkpointing there; schedule unchanged",
    )
    global_batch: int = _key(256, "samples per step over all ranks")
    eval_every: int = _key(100, "steps between evaluations (0 disables)")
    eval_samples: int = _key(2048, "held-out samples per evaluation")
    eval_hard_negatives: int = _key(
        16,
        "k of eval_hard_negative_share: the share of each held-out sample's softmax mass outside its label "
        "that its k highest-scoring other classes hold (near 1: a selection of k rows per sample can stand in "
        "for full softmax; clamped to num_classes - 1; 0: not measured, one pass over the shard less per eval batch)",
    )
    grad_clip: float = _key(0.0, "max global L2 norm of backbone gradients (0 disables; the head is excluded)")
    nonfinite: str = _key(
        "stop",
        "a NaN/inf loss or gradient on any rank: stop (exit with an error, no new checkpoint) "
        "or skip (drop the whole step)",
        ("stop", "skip"),
    )
    max_skipped: int = _key(3, "with nonfinite=skip: stop after this many skipped steps in a row")
    gc_every: int = _key(
        50,
        "Python's automatic garbage collection is off while training (a full collection inside a step "
        "stalled it 89 ms beside a background index build); its young generations are collected between "
        "steps every this many steps, all of them every 20th time and at evaluations and checkpoints "
        "(0: automatic collection)",
    )


@dataclass
class ModelConfig:
    backbone: str = _key("mlp", "backbone network producing the embeddings", BACKBONES)
    embed_dim: int = _key(128, "embedding width D fed to the classifier head")
    input_dim: int = _key(64, "width of feature inputs for the mlp")
    hidden_dim: int = _key(256, "width of the mlp's hidden layers")
    depth: int = _key(2, "number of hidden layers of the mlp")
    compile: bool = _key(False, "wrap the backbone in torch.compile")
    channels_last: bool = _key(True, "channels-last memory format for convolutional backbones")
    autocast: str = _key("auto", "mixed precision: auto uses bf16 autocast on GPU only", ("auto", "bf16", "none"))
    wta_crs_keep: float = _key(
        1.0,
        "ViT backbones: share of each block linear's input rows (batch x tokens) stored for its weight "
        "gradient, which becomes an unbiased WTA-CRS estimate (1: off, exact); the forward is unchanged",
    )
    wta_crs_mlp: bool = _key(
        True, "with model.wta_crs_keep < 1: sample the ViT blocks' MLP linears too (false: attention's qkv and proj)"
    )
    sync_batchnorm: bool = _key(False, "synchronise BatchNorm statistics across ranks")
    broadcast_buffers: bool = _key(
        True,
        "copy rank 0's buffers (BatchNorm running statistics) to every rank before each forward, as DDP "
        "does by default; false keeps them per rank while training and averages them over the ranks "
        "before each evaluation and checkpoint (training losses are the same either way)",
    )


@dataclass
class HeadConfig:
    num_classes: int = _key(10000, "number of classes C, sharded over the ranks")
    impl: str = _key(
        "auto",
        "sharded softmax loss: triton (fused kernels, head SGD inside the backward), reference "
        "(chunked torch), auto (triton on CUDA, reference on CPU)",
        ("auto", "triton", "reference"),
    )
    weight_dtype: str = _key(
        "auto",
        "head weight storage, no fp32 master copy (auto: bf16 with "
        "triton, fp32 with reference; fp8_e4m3 runs on reference)",
        ("auto", "fp32", "bf16", "fp8_e4m3"),
    )
    momentum_dtype: str = _key(
        "fp32", "the head's momentum buffer (none: no buffer, needs head.momentum=0)", ("none", "bf16", "fp32")
    )
    rounding: str = _key(
        "nearest",
        "how head updates are rounded into the stored weights: nearest, "
        "or stochastic (unbiased, keyed by seed, step, class, dim)",
        ("nearest", "stochastic"),
    )
    unit_scaling: bool = _key(
        False,
        "head weights initialised at unit variance (head.init_std ignored) "
        "and plain logits multiplied by 1/sqrt(D) besides head.scale",
    )
    kahan: bool = _key(False, "Kahan compensation buffer for the stored head weights (on/off, true/false)")
    kahan_dtype: str = _key("bf16", "dtype of the Kahan compensation buffer", ("bf16", "e5m2"))
    grad_filter: float = _key(
        0.0,
        "triton: drop entries of softmax - onehot below this in dF and dW (0: exact; 2.4e-4 = 2**-12 is a usual value)",
    )
    exact_kernels: str = _key(
        "auto",
        "triton, exact step (head.grad_filter=0): gemm (an LSE pass, then softmax chunks and library "
        "products), stationary (two kernels holding blocks of rows), auto (gemm; fp8 rows take stationary "
        "below a global batch of 32)",
        ("auto", "gemm", "stationary"),
    )
    cuda_graph: bool = _key(
        False,
        "triton, exact gemm step, one GPU: replay the head's forward and backward (its SGD step included) from "
        "one CUDA graph captured at the second step of each batch shape, so the host's launches leave the step "
        "(small global batches wait on them); the same results as without",
    )
    selection: str = _key(
        "full",
        "classes each shard scores per step: full (all), random (positives + random negatives up to "
        "head.budget, Partial FC), knn (positives + each sample's head.knn_k nearest rows from an index), "
        "graph (positives + each label's head.graph_k nearest classes in a class graph rebuilt every "
        "head.rebuild_every steps)",
        ("full", "random", "knn", "graph"),
    )
    budget: int | float | None = _key(
        None,
        "active classes per shard per step: an int count, or a float fraction of the shard (world-size "
        "independent for random); knn and graph fill up to it with random classes (null: no fill)",
    )
    inactive_rows: str = _key(
        "continue",
        "random/knn/graph: rows outside a step's active set take full SGD's zero-gradient step (continue: momentum and "
        "weight decay go on, applied lazily) or keep weight and momentum unchanged (frozen, Partial FC's rule)",
        ("continue", "frozen"),
    )
    knn_k: int = _key(16, "knn: nearest rows per sample and shard (clamped to the shard)")
    knn_skip_label: bool = _key(
        True,
        "knn: search knn_k + 1 rows and drop each sample's own label, so its knn_k rows are its hardest "
        "negatives (false: the knn_k best rows, the label often among them; the positives are active either way)",
    )
    knn_trim_to_budget: bool = _key(
        False,
        "knn with head.budget: a union of neighbours and positives larger than the budget keeps the positives, then "
        "the neighbours in rank order (every sample's first before any second) up to it (false: it is kept whole)",
    )
    fill_correction: bool = _key(
        False,
        "random/knn/graph with head.budget: add log(s) to the logits of the random rows that fill the active set, "
        "each standing for s rows the step leaves out (their number over the fill's; 1/budget for a fractional "
        "random budget), so the softmax over the active set estimates the full one (sampled softmax's correction; "
        "head.impl=reference, or triton on the exact gemm kernels: head.grad_filter=0)",
    )
    settle_every: int | None = _key(
        None,
        "inactive_rows=continue: pay every row's owed steps into the stored rows at least every this many steps "
        "(null: every 4,096), so that an index over the stored rows sees where momentum carried them; a settle is a "
        "pass over the shard's rows and momentum, with a rounding of each row in low-precision storage",
    )
    search_paid_rows: bool = _key(
        False,
        "knn/graph with inactive_rows=continue and head momentum or weight decay: search (and build the graph from) "
        "the rows with the steps they owe paid, where the loss will read them, not where their last active step "
        "left them (a copy of the shard in its storage dtype at every step)",
    )
    graph_k: int = _key(
        16,
        "graph: neighbours per class in the class graph, its nearest classes over all shards by weight row "
        "(clamped to num_classes - 1); each label brings its graph_k, each shard takes those it owns",
    )
    graph_search: str = _key(
        "probes",
        "graph builds and refreshes, torch ivf: each row searched through its own index_nprobe lists (probes), "
        "or the rows of a list together against the index_nprobe lists nearest it (groups: faster per list, "
        "lower recall at the same index_nprobe; docs/selection.md)",
        ("probes", "groups"),
    )
    graph_refresh_every: int = _key(
        0,
        "graph: every this many steps, search again the rows of the classes that were labels since the last "
        "refresh (they moved most) and offer each to the rows it found, about N·G / C_r of a rebuild's work "
        "(0: off; torch index; docs/selection.md)",
    )
    graph_refresh_window: int = _key(
        0,
        "graph refreshes: 0 searches the index; P > 0 searches, exactly and with no index, the rows of the classes "
        "refreshed in the last P refreshes (the rows that moved) and each class's current neighbours; the graph "
        "then starts empty, is never rebuilt, and a refresh costs n x (P·n + graph_k) row products for its n "
        "classes, whatever C_r (docs/selection.md)",
    )
    knn_fixed_size: bool = _key(
        False,
        "knn/graph: fill each shard's active set to exactly G·(k + 1) rows (k: knn_k or graph_k) with rows "
        "outside the union, so its size needs no host read (about 5% random negatives at k 16; not with head.budget)",
    )
    rebuild_every: int = _key(100, "knn/graph: steps between index (class graph) rebuilds from the current weights")
    index_max_age: int | None = _key(
        None,
        "knn/graph background rebuilds: a step whose index is older than this many steps waits for the running "
        "build (null: no step waits; a rebuild due while one runs starts when it ends; at least rebuild_every)",
    )
    index_retrain_every: int = _key(
        10,
        "torch ivf: knn rebuilds (graph refreshes) per k-means run; those between file again only the rows "
        "updated since the last",
    )
    index: str = _key(
        "auto",
        "knn/graph index backend (auto: FAISS if it can serve the device, else torch; graph: the search of its builds)",
        ("auto", "faiss", "torch"),
    )
    index_type: str = _key(
        "auto",
        "knn/graph index structure (auto: flat up to 2^20 rows per shard, ivf above; hnsw is FAISS only)",
        ("auto", "flat", "ivf", "hnsw"),
    )
    index_nlist: int | None = _key(None, "knn/graph ivf: inverted lists per shard (null: ~4 sqrt(C_r))")
    index_nprobe: int = _key(8, "knn/graph ivf: lists probed per query (a sample; graph: a class's row)")
    index_deterministic: bool = _key(
        False,
        "knn/graph: rebuild inside the step that starts it and checkpoint the index "
        "(graph: its table, loadable at any world size), so a resumed run equals an uninterrupted one",
    )
    recall_every: int = _key(
        100,
        "random/knn/graph: steps between recall measurements against exact search (knn_recall, graph_recall, "
        "active_recall; 0: never)",
    )
    margin_type: str = _key("none", "margin applied to the target logit", ("none", "cosface", "arcface"))
    scale: float = _key(1.0, "logit scale s")
    margin: float = _key(0.0, "margin m (cosface: subtracted cosine; arcface: added angle)")
    lr: float | None = _key(None, "head learning rate (null: optim.lr)")
    momentum: float = _key(0.9, "SGD momentum of the head weights")
    weight_decay: float = _key(0.0, "weight decay of the head weights")
    chunk_size: int = _key(32768, "classes per chunk of the reference loss (extra memory ~ G x chunk fp32)")
    init: str = _key("normal", "initial distribution of the head weights", ("normal", "uniform"))
    init_std: float = _key(0.01, "standard deviation of the initial head weights")


@dataclass
class DataConfig:
    kind: str = _key(
        "procedural_features",
        "data source",
        ("procedural_features", "procedural_images", "image_folder", "features"),
    )
    path: str | None = _key(None, "dataset location for image_folder/features")
    feature_dim: int = _key(64, "input width of procedural features")
    image_size: int = _key(32, "side length of input images in pixels")
    family_size: int = _key(4, "classes per family of near-duplicates")
    family_spread: float = _key(0.3, "how far classes of one family sit from their centre, relative to families")
    noise: float = _key(0.5, "per-sample noise around the class centre")
    zipf_exponent: float = _key(1.0, "exponent of the Zipf class frequencies (0: uniform)")
    num_workers: int = _key(0, "DataLoader worker processes per rank")
    on_bad_sample: str = _key(
        "error",
        "an unreadable or corrupt sample: error (stop, naming the file) or skip (substitute "
        "the next good sample, counted in the log)",
        ("error", "skip"),
    )


@dataclass
class OptimConfig:
    backbone: str = _key("sgd", "optimizer of the backbone", ("sgd", "adamw", "lars", "lamb"))
    lr: float = _key(0.1, "peak learning rate (after warmup)")
    momentum: float = _key(0.9, "momentum for sgd and lars")
    weight_decay: float = _key(1e-4, "weight decay of the backbone")
    betas: list[float] = _key([0.9, 0.999], "Adam betas for adamw and lamb")
    eps: float = _key(1e-8, "Adam epsilon for adamw and lamb")
    trust_coefficient: float = _key(0.001, "LARS trust coefficient")
    warmup_steps: int = _key(0, "steps of linear warmup from 0 to the peak learning rate")
    schedule: str = _key("cosine", "learning-rate decay after warmup", ("cosine", "poly", "constant"))
    poly_power: float = _key(2.0, "power of the poly schedule")
    min_lr_ratio: float = _key(0.0, "final learning rate as a fraction of the peak")


@dataclass
class CheckpointConfig:
    every: int = _key(100, "steps between checkpoints (0: only at the end or at stop_after)")
    keep: int = _key(2, "number of newest checkpoints kept")


@dataclass
class LogConfig:
    every: int = _key(10, "steps between metric log lines")
    tensorboard: bool = _key(False, "also write TensorBoard scalars to the run folder")
    progress: bool = _key(True, "tqdm progress bar on rank 0")


@dataclass
class DistConfig:
    backend: str = _key(
        "auto",
        "torch.distributed backend (auto: nccl on GPU, gloo on CPU)",
        ("auto", "nccl", "gloo"),
    )
    timeout_s: int = _key(600, "timeout of collective operations in seconds")


@dataclass
class CommConfig:
    bucket_mb: float | None = _key(
        None,
        "DDP gradient bucket size in MiB (the exchange overlaps the backbone's backward bucket by bucket); "
        "null: 25, or 400 under topk (its selection costs launches per bucket, its messages are tiny)",
    )
    overlap: bool = _key(
        False,
        "run the head on micro-batches with its feature gathers and gradient reduce-scatters in flight behind compute",
    )
    micro_batches: int = _key(2, "overlap: micro-batches per step (each rank's batch is cut into this many slices)")
    grad_compression: str = _key(
        "none",
        "backbone gradient compression in DDP's all-reduce: none, bf16 / "
        "powersgd (PyTorch's hooks), topk (layer-wise, error feedback)",
        ("none", "bf16", "powersgd", "topk"),
    )
    simulate_workers: int = _key(
        1,
        "train one rank as this many data-parallel workers: its batch is cut into W micro-batches, each "
        "forwarded (its own BatchNorm statistics) and backpropagated alone, each gradient exchanged as rank w "
        "of W would send it (topk: with worker w's own residual), then summed; a 1-GPU run reproduces a W-GPU "
        "run (needs one rank, grad_compression none or topk)",
    )
    topk_density: float = _key(0.001, "topk: share of each large gradient's entries sent per step")
    topk_warmup_steps: int = _key(
        1000, "topk: steps over which the density falls exponentially from topk_warmup_start to topk_density"
    )
    topk_warmup_start: float = _key(0.25, "topk: density of the first step of the warm-up")
    topk_select: str = _key(
        "exact",
        "topk: how each tensor's entries are chosen: exact (torch.topk per tensor) or sampled (a threshold "
        "estimated from topk_sample_share of each tensor, all tensors of a bucket at once; Deep Gradient "
        "Compression's selection)",
        ("exact", "sampled"),
    )
    topk_sample_share: float = _key(
        0.01, "topk sampled: share of each tensor's entries read to estimate its threshold (1: exact top-k)"
    )
    topk_momentum_correction: bool | None = _key(
        None,
        "topk: move the backbone SGD's momentum and weight decay into the exchange: each worker sends "
        "(the top of) its own velocity and the optimizer steps without either (Deep Gradient Compression; "
        "optim.backbone=sgd); null: on exactly when optim.backbone=sgd",
    )
    topk_momentum_masking: bool = _key(
        True, "topk with momentum correction: clear the velocity's entries that were sent (momentum factor masking)"
    )
    topk_local_clip: float = _key(
        0.0,
        "topk: clip each worker's gradient before it enters the residual, tensor j to c*sqrt(n_j/n)/sqrt(W) "
        "(its share of an L2 bound c/sqrt(W)); 0 disables",
    )
    topk_dense: list[str] = _key(
        [], "topk: glob patterns of backbone parameter names always sent dense (e.g. conv1.weight, neck.*)"
    )
    topk_min_numel: int = _key(4096, "topk: tensors with fewer entries (biases, norms) are all-reduced dense")
    powersgd_rank: int = _key(4, "powersgd: rank of the low-rank approximation")
    powersgd_start_step: int = _key(10, "powersgd: steps of plain all-reduce before compression starts")


@dataclass
class Config:
    run: RunConfig = _section(RunConfig, "run folder and seed")
    train: TrainConfig = _section(TrainConfig, "steps, batch size and evaluation")
    model: ModelConfig = _section(ModelConfig, "backbone")
    head: HeadConfig = _section(HeadConfig, "sharded classifier head and its loss")
    data: DataConfig = _section(DataConfig, "dataset")
    optim: OptimConfig = _section(OptimConfig, "optimizers and learning-rate schedule")
    checkpoint: CheckpointConfig = _section(CheckpointConfig, "checkpointing")
    log: LogConfig = _section(LogConfig, "metrics and progress")
    dist: DistConfig = _section(DistConfig, "process groups")
    comm: CommConfig = _section(CommConfig, "communication: DDP buckets and gradient compression")

    @property
    def head_impl(self) -> str:
        """head.impl with auto resolved: triton on CUDA, reference elsewhere."""
        import torch

        if self.head.impl != "auto":
            return self.head.impl
        return "triton" if torch.cuda.is_available() and self.head.margin_type != "arcface" else "reference"

    @property
    def head_weight_dtype(self):
        """head.weight_dtype as a torch dtype, auto resolved: bf16 for the fused kernels, fp32 for the reference."""
        name = self.head.weight_dtype
        if name == "auto":
            name = "bf16" if self.head_impl == "triton" else "fp32"
        return torch_dtype(name)

    @property
    def head_momentum_dtype(self):
        """The momentum buffer's torch dtype (None: no buffer)."""
        return None if self.head.momentum_dtype == "none" else torch_dtype(self.head.momentum_dtype)

    @property
    def head_kahan_dtype(self):
        """The Kahan buffer's torch dtype, or None with head.kahan=off."""
        return torch_dtype(self.head.kahan_dtype) if self.head.kahan else None

    @property
    def head_lr(self) -> float:
        """Learning rate of the head: head.lr when set, else optim.lr."""
        return self.head.lr if self.head.lr is not None else self.optim.lr


def torch_dtype(name: str):
    """A config dtype name (fp32, bf16, fp8_e4m3, e5m2) as a torch dtype; torch is imported only here."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[
        name
    ]


# ---------------------------------------------------------------------------------------
# Field introspection


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Resolves the annotations whether or not they were written as strings.
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _leaves(cls: type = Config, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) of every non-section field, in declaration order."""
    out = []
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            out.extend(_leaves(tp, f"{prefix}{f.name}."))
        else:
            out.append((prefix + f.name, f, tp))
    return out


@functools.cache
def _valid_keys() -> tuple[str, ...]:
    sections = [f.name for f in dataclasses.fields(Config)]
    return tuple(sections + [key for key, _, _ in _leaves()])


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "None"
    return tp.__name__


def _show(value: Any) -> str:
    """A value as it would be written in YAML or an override."""
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=math.inf)
    except yaml.YAMLError:  # not representable in YAML, e.g. a tuple set from Python
        return repr(value)
    return text.strip().removesuffix("\n...")


# ---------------------------------------------------------------------------------------
# Value checking


def _quoted(value: Any) -> str:
    """A value for an error message; strings quoted so that `'3'` and `3` differ."""
    return repr(value) if isinstance(value, str) else _show(value)


class _Mismatch(Exception):
    """Internal: a value does not fit a type; the caller reports it with the key."""


def _convert(value: Any, tp: Any) -> Any:
    """`value` converted to type `tp`, or _Mismatch. Conversions are deliberately narrow."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        (elem,) = typing.get_args(tp)
        return [_convert(v, elem) for v in value]
    # bool is a subclass of int, so it is excluded explicitly in both directions.
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config field type {tp!r}")
    raise _Mismatch


def _check_value(key: str, value: Any, f: dataclasses.Field, tp: Any, where: str = "") -> Any:
    """`value` converted for the field at `key`; ConfigError naming the key if it does not fit."""
    try:
        converted = _convert(value, tp)
    except _Mismatch:
        hint = ""
        if str in (tp, *typing.get_args(tp)) and isinstance(value, (bool, int, float)):
            hint = "; quote it to give a string"
        raise ConfigError(
            f"{where}{key}: expected {_type_name(tp)}, got {_quoted(value)} ({type(value).__name__}){hint}"
        ) from None
    choices = f.metadata.get("choices")
    if choices and converted not in choices:
        close = difflib.get_close_matches(str(converted), choices, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{where}{key}: must be one of {', '.join(choices)}; got {_quoted(converted)}{hint}")
    return converted


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _valid_keys(), n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(f"{where}unknown config key {key!r}{hint}")


def _set(cfg: Config, key: str, value: Any, where: str) -> None:
    """Set the dotted `key` of `cfg` in place; a mapping given for a section sets its keys."""
    parts = key.split(".")
    obj: Any = cfg
    for depth, name in enumerate(parts):
        prefix = ".".join(parts[: depth + 1])
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if name not in fields:
            raise _unknown_key(key, where)
        tp = _type_hints(type(obj))[name]
        last = depth == len(parts) - 1
        if _is_section(tp):
            if not last:
                obj = getattr(obj, name)
                continue
            if value is None:  # a YAML section with every key commented out
                return
            if not isinstance(value, dict):
                example = dataclasses.fields(tp)[0].name
                raise ConfigError(
                    f"{where}{key} is a section, not a value; set its keys "
                    f"(e.g. {key}.{example}=...), got {_show(value)}"
                )
            for sub, sub_value in value.items():
                _set(cfg, f"{key}.{sub}", sub_value, where)
            return
        if not last:
            raise ConfigError(f"{where}{prefix} is a value of type {_type_name(tp)}, not a section; cannot set {key!r}")
        setattr(obj, name, _check_value(key, value, fields[name], tp, where))


# ---------------------------------------------------------------------------------------
# Public API


def config_from_dict(d: dict[str, Any] | None, *, where: str = "") -> Config:
    """A Config with the defaults updated from nested mapping `d` (partial mappings are fine)."""
    cfg = Config()
    if d is None:
        return cfg
    if not isinstance(d, dict):
        raise ConfigError(f"{where}the config must be a mapping of sections, got {_show(d)}")
    for key, value in d.items():
        _set(cfg, str(key), value, where)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain dict of `cfg`, keys in dataclass order."""
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of `cfg` with `key=value` overrides applied in order (later ones win).

    Each value is read as a YAML scalar or list: `false`, `3`, `1e-3`, `null`, `[0.9,0.95]`.
    """
    if isinstance(overrides, str):
        # A bare string would otherwise be iterated character by character.
        overrides = [overrides]
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        where = f"override {text!r}: "
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"{where}expected key=value (e.g. head.num_classes=1000), found no '='")
        if not key:
            raise ConfigError(f"{where}the key before '=' is empty")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}cannot parse the value as YAML: {e}") from None
        _set(cfg, key, value, where)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """The defaults, updated from the YAML file at `path` (if any), then from `overrides`."""
    cfg = Config()
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        cfg = config_from_dict(data, where=f"{path}: ")
    return apply_overrides(cfg, overrides)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML (keys in dataclass order); `load_config(path)` gives it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    # Write then rename, so a crash never leaves a half-written config in the run folder.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def describe_config() -> str:
    """Help text: every dotted key with its type, default and description."""
    rows = []
    for key, f, tp in _leaves():
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help = f.metadata["help"]
        if f.metadata.get("choices"):
            help += f" (one of: {', '.join(f.metadata['choices'])})"
        rows.append((key, _type_name(tp), _show(default), help))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "Config keys: set them in a YAML file (nested by section) or as key=value overrides.",
        "",
        f"  {'key':<{widths[0]}}  {'type':<{widths[1]}}  {'default':<{widths[2]}}  description",
    ]
    section = None
    for key, type_name, default, help in rows:
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines.append("")
        lines.append(f"  {key:<{widths[0]}}  {type_name:<{widths[1]}}  {default:<{widths[2]}}  {help}")
    return "\n".join(lines)


class _Checks:
    """The problems one ``validate`` call finds; each section's validator adds to them."""

    def __init__(self, cfg: Config, world_size: int | None):
        self.cfg, self.world_size, self.problems = cfg, world_size, []

    def need(self, ok: bool, message: str) -> None:
        if not ok:
            self.problems.append(message)

    def at_least(self, key: str, minimum: float, *, nullable: bool = False) -> None:
        value = operator.attrgetter(key)(self.cfg)
        ok = (nullable and value is None) or (value is not None and value >= minimum)
        self.need(ok, f"{key} must be {'null or ' if nullable else ''}>= {minimum}, got {value}")

    def positive(self, key: str, *, nullable: bool = False) -> None:
        value = operator.attrgetter(key)(self.cfg)
        ok = (nullable and value is None) or (value is not None and value > 0)
        self.need(ok, f"{key} must be {'null or ' if nullable else ''}> 0, got {value}")

    def fraction(self, key: str) -> None:
        value = operator.attrgetter(key)(self.cfg)
        self.need(0 <= value < 1, f"{key} must be in [0, 1), got {value}")


def _check_run(c: _Checks) -> None:
    c.need(bool(c.cfg.run.dir), "run.dir must not be empty")
    c.at_least("run.cpu_threads", 1, nullable=True)


def _check_train(c: _Checks) -> None:
    t, world_size = c.cfg.train, c.world_size
    c.positive("train.steps")
    c.need(
        t.stop_after is None or 1 <= t.stop_after <= t.steps,
        f"train.stop_after must be null or in [1, train.steps={t.steps}], got {t.stop_after}",
    )
    c.positive("train.global_batch")
    if world_size is not None:
        c.need(
            t.global_batch % world_size == 0,
            f"train.global_batch={t.global_batch} is not divisible by the world size "
            f"{world_size} (each rank takes global_batch / world_size samples)",
        )
    c.at_least("train.eval_every", 0)
    c.need(
        t.eval_every == 0 or t.eval_samples >= 1,
        f"train.eval_samples must be >= 1 when train.eval_every > 0, got {t.eval_samples}",
    )
    c.at_least("train.eval_hard_negatives", 0)
    c.at_least("train.grad_clip", 0)
    c.at_least("train.max_skipped", 1)
    c.at_least("train.gc_every", 0)


def _check_model(c: _Checks) -> None:
    m, d = c.cfg.model, c.cfg.data
    for name in ("embed_dim", "input_dim", "hidden_dim"):
        c.positive(f"model.{name}")
    c.at_least("model.depth", 0)
    c.need(
        m.backbone == "mlp" or d.kind in IMAGE_DATA_KINDS,
        f"model.backbone={m.backbone} needs image data; data.kind={d.kind} gives feature "
        f"vectors (use one of {', '.join(IMAGE_DATA_KINDS)})",
    )
    c.need(
        not (m.backbone == "mlp" and d.kind == "procedural_features") or m.input_dim == d.feature_dim,
        f"model.input_dim={m.input_dim} must equal data.feature_dim={d.feature_dim} for the mlp on procedural_features",
    )
    c.need(0 < m.wta_crs_keep <= 1, f"model.wta_crs_keep must be in (0, 1] (1: exact), got {m.wta_crs_keep}")


def _check_head(c: _Checks) -> None:
    h, cfg = c.cfg.head, c.cfg
    c.at_least("head.num_classes", 1)
    if c.world_size is not None:
        c.need(
            h.num_classes >= c.world_size,
            f"head.num_classes={h.num_classes} is smaller than the world "
            f"size {c.world_size}; every rank needs at least one class",
        )
    c.positive("head.scale")
    c.at_least("head.margin", 0)
    c.positive("head.lr", nullable=True)
    c.fraction("head.momentum")
    c.need(
        h.momentum_dtype != "none" or h.momentum == 0,
        f"head.momentum_dtype=none keeps no momentum buffer: set head.momentum=0 (got {h.momentum})",
    )
    c.at_least("head.weight_decay", 0)
    c.at_least("head.chunk_size", 1)
    c.positive("head.init_std")
    c.at_least("head.grad_filter", 0)
    c.need(
        h.grad_filter == 0 or cfg.head_impl == "triton",
        f"head.grad_filter={h.grad_filter} needs the fused kernels "
        f"(head.impl=triton); head.impl={h.impl} runs {cfg.head_impl}",
    )
    c.need(
        h.impl == "reference" or h.margin_type != "arcface",
        "head.margin_type=arcface runs on head.impl=reference (the "
        f"fused kernels take none and cosface), got head.impl={h.impl}",
    )
    _check_selection(c)


def _check_selection(c: _Checks) -> None:
    """head.selection, its budget and the knn index."""
    h = c.cfg.head
    if h.budget is not None:
        c.need(
            (isinstance(h.budget, int) and h.budget >= 1) or (isinstance(h.budget, float) and 0 < h.budget <= 1),
            f"head.budget must be null, an int >= 1 or a fraction in (0, 1], got {h.budget}",
        )
    c.need(
        h.selection != "random" or h.budget is not None,
        "head.selection=random needs head.budget (a count per shard or a fraction)",
    )
    c.at_least("head.knn_k", 1)
    c.at_least("head.graph_k", 1)
    c.at_least("head.graph_refresh_every", 0)
    c.need(
        not h.graph_refresh_every or (h.selection == "graph" and h.index != "faiss" and h.index_type != "hnsw"),
        "head.graph_refresh_every refreshes the class graph through a torch index: it needs head.selection=graph, "
        f"head.index torch or auto and head.index_type flat, ivf or auto, got selection {h.selection}, index "
        f"{h.index} and index_type {h.index_type}",
    )
    c.at_least("head.graph_refresh_window", 0)
    c.need(
        not h.graph_refresh_window or h.graph_refresh_every,
        "head.graph_refresh_window sets what graph refreshes search: it needs head.graph_refresh_every > 0",
    )
    c.need(
        h.selection != "graph" or h.num_classes >= 2,
        f"head.selection=graph needs head.num_classes >= 2 (neighbours are other classes), got {h.num_classes}",
    )
    c.need(
        not h.knn_fixed_size or h.selection in ("knn", "graph"),
        f"head.knn_fixed_size needs head.selection=knn or graph, got {h.selection}",
    )
    c.need(
        not (h.knn_fixed_size and h.budget is not None),
        "head.knn_fixed_size fills the active set itself: leave head.budget null",
    )
    c.need(
        not h.knn_trim_to_budget or (h.selection == "knn" and h.budget is not None),
        f"head.knn_trim_to_budget trims knn's union to head.budget: it needs head.selection=knn and a budget, got "
        f"selection {h.selection} and budget {h.budget}",
    )
    c.need(
        not h.search_paid_rows
        or (h.selection in ("knn", "graph") and h.inactive_rows == "continue" and (h.momentum or h.weight_decay)),
        "head.search_paid_rows searches the rows with the steps they owe paid: it needs head.selection=knn or graph, "
        f"head.inactive_rows=continue and head momentum or weight decay, got selection {h.selection}, inactive_rows "
        f"{h.inactive_rows}, momentum {h.momentum} and weight_decay {h.weight_decay}",
    )
    for key in ("rebuild_every", "index_retrain_every", "index_nprobe"):
        c.at_least(f"head.{key}", 1)
    c.at_least("head.index_max_age", h.rebuild_every, nullable=True)  # younger than a rebuild period: every step waits
    c.at_least("head.index_nlist", 1, nullable=True)
    c.at_least("head.settle_every", 1, nullable=True)
    c.need(
        not h.fill_correction or (h.selection != "full" and h.budget is not None and not h.knn_fixed_size),
        "head.fill_correction corrects the random rows that fill a budget: it needs head.selection=random, knn or "
        f"graph, a head.budget and no head.knn_fixed_size (got selection {h.selection}, budget {h.budget}, "
        f"knn_fixed_size {h.knn_fixed_size})",
    )
    # The fused kernels add the offsets in the gemm path's LSE and P passes only; auto takes the
    # stationary kernels for fp8 rows at small batches, so fp8 rows name gemm.
    gemm_kernels = h.exact_kernels == "gemm" or (h.exact_kernels == "auto" and h.weight_dtype != "fp8_e4m3")
    c.need(
        not (h.fill_correction and c.cfg.head_impl == "triton") or (h.grad_filter == 0 and gemm_kernels),
        "head.fill_correction with head.impl=triton runs on the exact gemm kernels: it needs head.grad_filter=0 and "
        f"head.exact_kernels=gemm (or auto with bf16/fp32 rows); got grad_filter {h.grad_filter}, exact_kernels "
        f"{h.exact_kernels}, weight_dtype {h.weight_dtype}",
    )
    c.need(
        not h.cuda_graph
        or (c.cfg.head_impl == "triton" and h.grad_filter == 0 and gemm_kernels and h.selection == "full"),
        "head.cuda_graph replays the exact gemm step over the whole shard: it needs head.impl=triton, "
        "head.grad_filter=0, head.exact_kernels=gemm (or auto with bf16/fp32 rows) and head.selection=full; got "
        f"impl {c.cfg.head_impl}, grad_filter {h.grad_filter}, exact_kernels {h.exact_kernels}, weight_dtype "
        f"{h.weight_dtype}, selection {h.selection}",
    )
    c.need(
        not (h.cuda_graph and c.cfg.comm.overlap),
        "head.cuda_graph captures the single-call head step; comm.overlap's micro-batches run eagerly: set one of them",
    )
    c.need(
        not h.cuda_graph or c.world_size is None or c.world_size == 1,
        f"head.cuda_graph runs on a head group of one rank (its all-reduces are not captured); the world has "
        f"{c.world_size} ranks",
    )
    c.need(  # 4096: hydrahead.optim.deferred_sgd.MAX_LAG (a test holds them equal; this module stays torch-free)
        h.settle_every is None or h.settle_every <= 4096,
        f"head.settle_every={h.settle_every}: the owed steps are kept for at most 4,096 steps; give at most 4096",
    )
    c.need(
        h.settle_every is None or (h.inactive_rows == "continue" and (h.momentum or h.weight_decay)),
        f"head.settle_every={h.settle_every} pays the steps that rows outside the active sets owe: it needs "
        f"head.inactive_rows=continue and head momentum or weight decay, got inactive_rows {h.inactive_rows}, "
        f"momentum {h.momentum} and weight_decay {h.weight_decay}",
    )
    c.at_least("head.recall_every", 0)
    c.need(
        not (h.index == "torch" and h.index_type == "hnsw"),
        "head.index_type=hnsw needs head.index=faiss (the torch backend has flat and ivf)",
    )
    c.need(
        not (h.index_deterministic and (h.index == "faiss" or h.index_type == "hnsw")),
        "head.index_deterministic=true saves the index in checkpoints, which the torch backend does: "
        f"use head.index=torch or auto (got head.index={h.index}, head.index_type={h.index_type})",
    )


def _check_comm(c: _Checks) -> None:
    comm, t, world_size = c.cfg.comm, c.cfg.train, c.world_size
    c.positive("comm.bucket_mb", nullable=True)
    c.at_least("comm.micro_batches", 1)
    if world_size is not None and comm.overlap and t.global_batch % world_size == 0:
        c.need(
            comm.micro_batches <= t.global_batch // world_size,
            f"comm.micro_batches={comm.micro_batches} exceeds the per-rank batch {t.global_batch // world_size} "
            "(each micro-batch takes at least one sample of every rank)",
        )
    c.need(0 < comm.topk_density <= 1, f"comm.topk_density must be in (0, 1], got {comm.topk_density}")
    c.at_least("comm.topk_warmup_steps", 0)
    c.need(0 < comm.topk_warmup_start <= 1, f"comm.topk_warmup_start must be in (0, 1], got {comm.topk_warmup_start}")
    c.need(0 < comm.topk_sample_share <= 1, f"comm.topk_sample_share must be in (0, 1], got {comm.topk_sample_share}")
    c.at_least("comm.topk_local_clip", 0)
    c.need(
        not (comm.grad_compression == "topk" and comm.topk_momentum_correction is True)
        or c.cfg.optim.backbone == "sgd",
        "comm.topk_momentum_correction moves SGD's momentum into the exchange: it needs optim.backbone=sgd, "
        f"got {c.cfg.optim.backbone}",
    )
    _check_simulated_workers(c)
    c.at_least("comm.topk_min_numel", 0)
    c.at_least("comm.powersgd_rank", 1)
    c.need(
        comm.powersgd_start_step >= 2,
        f"comm.powersgd_start_step must be >= 2 (PowerSGD's own minimum), got {comm.powersgd_start_step}",
    )


def _check_simulated_workers(c: _Checks) -> None:
    comm, m = c.cfg.comm, c.cfg.model
    workers = comm.simulate_workers
    c.at_least("comm.simulate_workers", 1)
    if workers <= 1:
        return
    c.need(
        c.world_size in (None, 1),
        f"comm.simulate_workers={workers} simulates the workers inside one rank: run it on one, not {c.world_size}",
    )
    c.need(
        comm.grad_compression in ("none", "topk"),
        "comm.simulate_workers simulates the none and topk exchanges, not "
        f"comm.grad_compression={comm.grad_compression}",
    )
    c.need(
        c.cfg.train.global_batch % workers == 0,
        f"train.global_batch={c.cfg.train.global_batch} is not divisible by comm.simulate_workers={workers}",
    )
    c.need(not m.sync_batchnorm, "model.sync_batchnorm shares statistics that comm.simulate_workers keeps per worker")
    c.need(
        m.wta_crs_keep == 1,
        "model.wta_crs_keep < 1 keeps running state per rank, which comm.simulate_workers does not split by worker",
    )


def _check_data(c: _Checks) -> None:
    d = c.cfg.data
    c.need(d.kind not in ("image_folder", "features") or bool(d.path), f"data.path is required for data.kind={d.kind}")
    for name in ("feature_dim", "image_size", "family_size"):
        c.at_least(f"data.{name}", 1)
    for name in ("family_spread", "noise", "zipf_exponent", "num_workers"):
        c.at_least(f"data.{name}", 0)


def _check_optim(c: _Checks) -> None:
    o, t = c.cfg.optim, c.cfg.train
    c.positive("optim.lr")
    c.fraction("optim.momentum")
    c.at_least("optim.weight_decay", 0)
    c.need(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"optim.betas must be two numbers in [0, 1), got {_show(o.betas)}",
    )
    c.positive("optim.eps")
    c.positive("optim.trust_coefficient")
    c.need(
        0 <= o.warmup_steps <= t.steps,
        f"optim.warmup_steps must be in [0, train.steps={t.steps}], got {o.warmup_steps}",
    )
    c.positive("optim.poly_power")
    c.need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")


def _check_run_folder(c: _Checks) -> None:
    """checkpoint, log and dist."""
    c.at_least("checkpoint.every", 0)
    c.at_least("checkpoint.keep", 1)
    c.at_least("log.every", 1)
    c.at_least("dist.timeout_s", 1)


_SECTION_CHECKS = (
    _check_run,
    _check_train,
    _check_model,
    _check_head,
    _check_comm,
    _check_data,
    _check_optim,
    _check_run_folder,
)


DENSE_BUCKET_MB, TOPK_BUCKET_MB = 25.0, 400.0


def bucket_mb(cfg: Config) -> float:
    """DDP's bucket size: comm.bucket_mb, or where it is null 25 MiB, and 400 MiB under top-k,
    which puts all of ResNet-50 (98 MB) or ViT-B (345 MB) in one bucket: sampled selection
    costs about 35 launches per bucket, 4.4 and 8-12 ms a step at 25 MiB against 1.0 and
    1.8 ms in one bucket on one H200, while its messages (0.4 and 1.2 MB at density 0.001)
    leave little to overlap (docs/comm.md)."""
    if cfg.comm.bucket_mb is not None:
        return cfg.comm.bucket_mb
    return TOPK_BUCKET_MB if cfg.comm.grad_compression == "topk" else DENSE_BUCKET_MB


def topk_momentum_correction(cfg: Config) -> bool:
    """Whether top-k moves SGD's momentum into the exchange: comm.topk_momentum_correction,
    or where it is null, whether the backbone's optimizer is SGD (without it top-k lost 7
    points of top-1 to dense at density 0.001; with it, none: docs/comm.md)."""
    if cfg.comm.grad_compression != "topk":
        return False
    if cfg.comm.topk_momentum_correction is None:
        return cfg.optim.backbone == "sgd"
    return cfg.comm.topk_momentum_correction


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check types, choices and cross-field constraints; one ConfigError lists every problem."""
    if world_size is not None and (not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1):
        raise ConfigError(f"world_size must be a positive int, got {world_size!r}")

    # Values set from Python bypass the checks done when loading, so repeat them here.
    problems: list[str] = []
    for key, f, tp in _leaves():
        try:
            _check_value(key, operator.attrgetter(key)(cfg), f, tp)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))

    checks = _Checks(cfg, world_size)
    for check_section in _SECTION_CHECKS:
        check_section(checks)
    if checks.problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(checks.problems))
    _warn_about_ignored_keys(cfg)


def _warn_about_ignored_keys(cfg: Config) -> None:
    """Options that are valid but would be silently ignored, or whose promise another option breaks."""
    h, d, m = cfg.head, cfg.data, cfg.model
    if m.wta_crs_keep < 1 and not m.backbone.startswith("vit_"):
        warnings.warn(f"model.wta_crs_keep={m.wta_crs_keep} is ignored: it samples ViT linears, not {m.backbone}'s")
    if m.wta_crs_keep == 1 and not m.wta_crs_mlp:
        warnings.warn("model.wta_crs_mlp=false is ignored because model.wta_crs_keep=1 (nothing is sampled)")
    if m.wta_crs_keep < 1 and m.backbone.startswith("vit_") and h.index_deterministic:
        warnings.warn(
            "head.index_deterministic=true with model.wta_crs_keep < 1: a resumed run differs from the uninterrupted "
            "one, since the running gradient norms that steer WTA-CRS sampling are not checkpointed"
        )
    comm = cfg.comm
    topk_options = (
        comm.topk_momentum_correction or comm.topk_select != "exact" or comm.topk_dense or comm.topk_local_clip
    )
    if comm.grad_compression != "topk" and topk_options:
        warnings.warn(f"comm.topk_* keys are ignored because comm.grad_compression={comm.grad_compression}")
    if h.selection not in ("knn", "graph") and (h.index_deterministic or h.index_nlist is not None):
        warnings.warn(f"head.index_* keys are ignored because head.selection={h.selection}")
    if h.selection == "full" and h.budget is not None:
        warnings.warn("head.budget is ignored because head.selection=full")
    if h.margin_type == "none" and h.margin != 0:
        warnings.warn(f"head.margin={h.margin} is ignored because head.margin_type=none")
    if d.path is not None and d.kind.startswith("procedural"):
        warnings.warn(f"data.path is ignored for data.kind={d.kind}")
    if cfg.optim.backbone in ("lars", "lamb") and h.lr is None:
        # A trust-ratio LR is on another scale than plain SGD's: LARS's is 10-100x larger.
        warnings.warn(
            f"head.lr is null, so the head's SGD takes optim.lr={cfg.optim.lr}, a {cfg.optim.backbone} "
            "learning rate that trust ratios rescale per layer; set head.lr for the head"
        )

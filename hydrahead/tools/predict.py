"""Top-k classes of every sample of an input, from a checkpoint; metrics when labels are known.

    python -m hydrahead.tools.predict runs/mlp features.npy --out top5.tsv --labels labels.npy
    python -m hydrahead.tools.predict runs/xc/checkpoints/step-4000 test.txt --out top5.npy
    torchrun --nproc-per-node 8 -m hydrahead.tools.predict runs/r50 /data/imagenet --out val.tsv -k 10

The checkpoint's training config rebuilds the backbone and the class-sharded head for the
ranks of this invocation: the head's rows are re-split by class range, whatever number of
ranks wrote them. Only the backbone and head weights are read (no optimizer state). A
plain `python -m` is one rank (on a GPU when there is one, else the CPU); under torchrun
every rank takes a share of each global batch (BATCH samples per rank; rank r the r-th
contiguous slice), so the slices in rank order are the input order, and rank 0 writes the
results as they come.

Inputs (--input-kind auto chooses by the path):
  .npy         features, N x model.input_dim, for the mlp backbone; labels from --labels
  text file    mlp backbone: an extreme-classification text file (see
               hydrahead.data.xc_text) whose labels give P@k and nDCG@k; image
               backbones: image paths, one per non-empty line, relative to the list's
               folder or absolute; labels from --labels
  folder       images in one sub-folder per class, as for data.kind=image_folder (its
               val/ split when it holds train/ and val/); the folders are the labels
Images are read as the training run's evaluation reads them: resized, centre-cropped to
its data.image_size and normalised.

Before loading, the ranks check the checkpoint's files against the checksums its save
recorded, each rank a share (as hydrahead.tools.verify_checkpoint does): a damaged
checkpoint folder is an error naming the file; for a run folder, the newest checkpoint that
verifies is taken. --no-verify skips that reading pass.

--labels FILE.npy holds (N,) class ids (single-label: top1 and top5 accuracy) or N x L
class ids padded with -1 (multi-label: P@1,3,5 and nDCG@1,3,5; a sample without labels
scores 0 and counts in the mean). Definitions: hydrahead.eval.metrics. Metrics at a k
above the number of classes are left out.

Output, by OUT's extension:
  .tsv  a header line (id_1 .. id_k, score_1 .. score_k), then one line per sample in
        input order: its k class ids, best first, then their k scores, tab-separated
  .npy  the ids as an int64 N x k array; their float32 scores go to OUT with the
        extension .scores.npy
Scores are the head's logits without margin (scale * f.w, or scale * cos for the margin
heads). With labels, the metrics are printed and written as JSON to OUT with the
extension .metrics.json. Every file is written as NAME.partial and renamed when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from tqdm import tqdm

from hydrahead.config import Config, config_from_dict
from hydrahead.data.folder import ImageFolder, normalise_images, read_eval_image
from hydrahead.data.xc_text import read_xc_text
from hydrahead.distributed.collectives import all_reduce_sums, start_gather_rows
from hydrahead.distributed.setup import BACKENDS, DistEnv, destroy_distributed, init_distributed
from hydrahead.eval.metrics import WITHOUT_POSITIVES, add_sums, means, multi_label_sums, single_label_sums
from hydrahead.head import ShardedClassifier
from hydrahead.models import backbone_from_config
from hydrahead.tools.export_head import DEFAULT_BLOCK_ROWS, open_owed_steps, resolve_checkpoint
from hydrahead.train import checkpoint as ckpt
from hydrahead.train.safe_dcp import SafeFileSystemReader
from hydrahead.train.trainer import autocast

INPUT_KINDS = ("auto", "npy", "xc", "image_folder", "image_list")
FEATURE_KINDS = ("npy", "xc")
OUTPUT_SUFFIXES = (".tsv", ".npy")
SINGLE_LABEL_KS = (1, 5)
MULTI_LABEL_KS = (1, 3, 5)
DEFAULT_K = 5
DEFAULT_BATCH = 256


@dataclasses.dataclass
class Trained:
    """A checkpoint folder, its step and the training config saved with it."""

    path: Path
    step: int
    cfg: Config


@dataclasses.dataclass
class PredictInput:
    """Samples in input order. ``read(start, stop)`` gives rows [start, stop) as float32
    inputs on the CPU and their labels (None without labels); ``labels`` is None,
    "single" ((N,) ids) or "multi" (N x L ids padded with -1)."""

    path: Path
    description: str
    num_samples: int
    read: Callable[[int, int], tuple[torch.Tensor, torch.Tensor | None]]
    labels: str | None


def open_checkpoint(checkpoint: str | os.PathLike, *, verify: bool = True, group=None) -> Trained:
    """A checkpoint folder, or a run folder's newest loadable checkpoint, with its config.

    ``verify``: check its files against their checksums first, collective over ``group``
    when a process group is up (see ``hydrahead.tools.export_head.resolve_checkpoint``)."""
    path = resolve_checkpoint(checkpoint, verify=verify, group=group)
    meta_path = path / ckpt.META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} has no {ckpt.META_FILE}: not a complete checkpoint")
    meta = ckpt.read_meta(path)
    if "config" not in meta or "step" not in meta:
        raise ValueError(f"{meta_path} lacks the training config or the step")
    return Trained(path, int(meta["step"]), config_from_dict(meta["config"], where=f"{meta_path}: "))


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------


def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {what} {path} as a .npy array: {exc}") from exc


def read_labels(path: str | os.PathLike, num_samples: int, num_classes: int) -> tuple[torch.Tensor, str]:
    """Labels from a .npy file: (N,) ids ("single") or N x L ids padded with -1 ("multi")."""
    path = Path(path)
    labels = np.asarray(_load_npy(path, "labels"))
    if labels.ndim not in (1, 2) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels {path} must be an integer array, (N,) or N x L padded "
            f"with -1; got shape {labels.shape}, dtype {labels.dtype}"
        )
    if len(labels) != num_samples:
        raise ValueError(f"labels {path} has {len(labels)} rows, but the input has {num_samples} samples")
    lowest = 0 if labels.ndim == 1 else -1
    bad = (labels < lowest) | (labels >= num_classes)
    if bad.any():
        where = np.argwhere(bad)[0]
        raise ValueError(
            f"labels {path}: {int(labels[tuple(where)])} at {tuple(int(i) for i in where)} is outside "
            f"[{lowest}, {num_classes}) (head.num_classes={num_classes}{', -1 pads' if lowest else ''})"
        )
    return torch.from_numpy(labels.astype(np.int64)), "single" if labels.ndim == 1 else "multi"


def _rows(labels: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if labels is None else labels[start:stop]


def _feature_input(
    path: Path, description: str, features, labels: torch.Tensor | None, labels_kind: str | None
) -> PredictInput:
    def read(start: int, stop: int):
        return torch.from_numpy(np.array(features[start:stop], dtype=np.float32)), _rows(labels, start, stop)

    return PredictInput(path, description, len(features), read, labels_kind)


def _npy_input(path: Path, cfg: Config) -> PredictInput:
    features = _load_npy(path, "features")
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise ValueError(
            f"features {path} must be a 2-D float array (N x model.input_dim), "
            f"got shape {features.shape}, dtype {features.dtype}"
        )
    if features.shape[1] != cfg.model.input_dim:
        raise ValueError(
            f"features {path} are {features.shape[1]} wide, but the checkpoint's model.input_dim={cfg.model.input_dim}"
        )
    return _feature_input(path, f"{path} ({len(features)} feature vectors)", features, None, None)


def _xc_input(path: Path, cfg: Config) -> PredictInput:
    try:
        data = read_xc_text(path, num_features=cfg.model.input_dim, num_labels=cfg.head.num_classes)
    except ValueError as exc:
        raise ValueError(
            f"{exc} (the checkpoint's model.input_dim={cfg.model.input_dim}, head.num_classes={cfg.head.num_classes})"
        ) from None
    return _feature_input(
        path,
        f"{path} ({data.num_samples} samples, extreme-classification text)",
        data.features.numpy(),
        data.labels,
        "multi",
    )


def _image_folder_input(path: Path, cfg: Config) -> PredictInput:
    images = ImageFolder(path, image_size=cfg.data.image_size, split="eval", num_classes=cfg.head.num_classes)

    def read(start: int, stop: int):
        return images.batch(torch.arange(start, stop))

    return PredictInput(
        path,
        f"{images.root} ({images.num_items} images in {images.num_classes} class folders)",
        images.num_items,
        read,
        "single",
    )


def _image_list_input(path: Path, cfg: Config) -> PredictInput:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    files = [path.parent / line for line in lines if line]  # an absolute line replaces the folder
    if not files:
        raise ValueError(f"image list {path} names no image files")
    size = cfg.data.image_size

    def read(start: int, stop: int):
        pixels = [read_eval_image(file, size) for file in files[start:stop]]
        batch = torch.stack(pixels) if pixels else torch.empty((0, 3, size, size), dtype=torch.uint8)
        return normalise_images(batch), None

    return PredictInput(path, f"{path} ({len(files)} image paths)", len(files), read, None)


_OPENERS = {"npy": _npy_input, "xc": _xc_input, "image_folder": _image_folder_input, "image_list": _image_list_input}


def open_input(
    path: str | os.PathLike, cfg: Config, *, kind: str = "auto", labels: str | os.PathLike | None = None
) -> PredictInput:
    """The samples of ``path`` for the model ``cfg`` describes (module doc); ``labels``: a .npy of labels."""
    path = Path(path)
    if kind not in INPUT_KINDS:
        raise ValueError(f"input kind must be one of {', '.join(INPUT_KINDS)}, got {kind!r}")
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    backbone = cfg.model.backbone
    if kind == "auto":
        if path.is_dir():
            kind = "image_folder"
        elif path.suffix == ".npy":
            kind = "npy"
        else:
            kind = "xc" if backbone == "mlp" else "image_list"
    if (kind in FEATURE_KINDS) != (backbone == "mlp"):
        holds = "feature vectors" if kind in FEATURE_KINDS else "images"
        takes = "feature vectors" if backbone == "mlp" else "images"
        raise ValueError(
            f"input {path} ({kind}) holds {holds}, but the checkpoint's model.backbone={backbone} takes {takes}"
        )
    source = _OPENERS[kind](path, cfg)
    if labels is not None:
        if source.labels is not None:
            raise ValueError(f"--labels {labels}: input {path} ({kind}) carries its own labels")
        values, kind = read_labels(labels, source.num_samples, cfg.head.num_classes)
        unlabelled = source.read
        source = dataclasses.replace(
            source, read=lambda start, stop: (unlabelled(start, stop)[0], values[start:stop]), labels=kind
        )
    return source


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------


def _saved_head_dtype(path: Path) -> torch.dtype:
    saved = SafeFileSystemReader(path).read_metadata().state_dict_metadata.get("head.weight")
    if not isinstance(saved, TensorStorageMetadata):
        raise ValueError(f"{path} holds no tensor head.weight")
    return saved.properties.dtype


def load_model(trained: Trained, env: DistEnv) -> tuple[nn.Module, ShardedClassifier]:
    """The backbone (eval mode) and this rank's head shard, loaded from ``trained`` (collective).

    The head is split over ``env.head_group`` as a training run of that many ranks splits
    it; DCP reads each rank's class range from however the checkpoint's shards lie.
    """
    cfg = trained.cfg
    m, h = cfg.model, cfg.head
    backbone = backbone_from_config(cfg).to(env.device)
    # The stored dtype, so that scores are computed as the training run's evaluation computed them.
    head = ShardedClassifier(
        h.num_classes,
        m.embed_dim,
        group=env.head_group,
        margin_type=h.margin_type,
        scale=h.scale,
        margin=h.margin,
        chunk_size=h.chunk_size,
        dtype=_saved_head_dtype(trained.path),
        device=env.device,
        unit_scaling=h.unit_scaling,
    )
    state = {
        "backbone": get_model_state_dict(backbone),
        "head": {"weight": ckpt.class_rows(head.weight.data, head.class_start, head.num_classes, env.rank)},
    }
    with warnings.catch_warnings():  # DCP's notice that ShardedTensor (see class_rows) is deprecated
        warnings.filterwarnings("ignore", message=".*ShardedTensor", category=FutureWarning)
        ckpt.load_checkpoint(env, trained.path, state)
    owed = open_owed_steps(trained.path)
    if owed is not None:  # rows that sat out steps pay what they owe, as training would have at this step
        rows = head.weight.data
        for start in range(0, rows.shape[0], DEFAULT_BLOCK_ROWS):
            block = rows[start : start + DEFAULT_BLOCK_ROWS]
            block.copy_(owed.pay("weight", head.class_start + start, block.cpu()))
    set_model_state_dict(backbone, state["backbone"])
    return backbone.eval(), head


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def output_paths(out: str | os.PathLike, *, with_metrics: bool) -> dict[str, Path]:
    """The files a prediction writes: ``ids`` (OUT), ``scores`` (.npy output), ``metrics``."""
    out = Path(out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out must end in {' or '.join(OUTPUT_SUFFIXES)}, got {out.name!r}")
    paths = {"ids": out}
    if out.suffix == ".npy":
        paths["scores"] = out.with_suffix(".scores.npy")
    if with_metrics:
        paths["metrics"] = out.with_suffix(".metrics.json")
    return paths


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


class _Writer:
    """Rank 0's predictions, appended batch by batch in input order into .partial files."""

    def __init__(self, paths: dict[str, Path], num_samples: int, k: int):
        self.paths, self.next_row, self.closed = paths, 0, False
        self.names = ["ids", "scores"] if "scores" in paths else ["ids"]  # .npy output: ids and scores apart
        self.partials = [_partial(paths[name]) for name in self.names]
        paths["ids"].parent.mkdir(parents=True, exist_ok=True)
        if len(self.names) == 2:
            self.ids = np.lib.format.open_memmap(self.partials[0], mode="w+", dtype=np.int64, shape=(num_samples, k))
            self.scores = np.lib.format.open_memmap(
                self.partials[1], mode="w+", dtype=np.float32, shape=(num_samples, k)
            )
        else:
            self.text = open(self.partials[0], "w")
            header = [f"id_{i}" for i in range(1, k + 1)] + [f"score_{i}" for i in range(1, k + 1)]
            self.text.write("\t".join(header) + "\n")
            # float32 scores round-trip through 9 significant digits; float64 holds every id exactly.
            self.formats = ["%d"] * k + ["%.9g"] * k

    def write(self, ids: torch.Tensor, scores: torch.Tensor) -> None:
        ids, scores = ids.cpu().numpy(), scores.float().cpu().numpy()
        rows = slice(self.next_row, self.next_row + len(ids))
        if len(self.names) == 2:
            self.ids[rows], self.scores[rows] = ids, scores
        else:
            np.savetxt(
                self.text,
                np.hstack([ids.astype(np.float64), scores.astype(np.float64)]),
                fmt=self.formats,
                delimiter="\t",
            )
        self.next_row = rows.stop

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if len(self.names) == 2:
            self.ids.flush()
            self.scores.flush()
            del self.ids, self.scores  # closes the mappings before the rename
        else:
            self.text.close()

    def commit(self) -> None:
        self._close()
        for partial, name in zip(self.partials, self.names):
            os.replace(partial, self.paths[name])

    def discard(self) -> None:
        self._close()
        for partial in self.partials:
            partial.unlink(missing_ok=True)


def _write_json(path: Path, payload: dict) -> None:
    partial = _partial(path)
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------


def check_k(k: int, num_classes: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_classes:
        raise ValueError(f"k must be an int in [1, {num_classes}] (the checkpoint's head.num_classes), got {k!r}")


def split_rows(num_rows: int, world_size: int) -> list[int]:
    """Rows of each rank in a global batch of ``num_rows``: "
    "contiguous, the first ``num_rows % world_size`` ranks one more."""
    base, extra = divmod(num_rows, world_size)
    return [base + (1 if rank < extra else 0) for rank in range(world_size)]


def metric_ks(labels: str | None, num_classes: int) -> tuple[int, ...]:
    """The k of each metric for labels of this kind (none above ``num_classes``)."""
    if labels is None:
        return ()
    return tuple(k for k in (SINGLE_LABEL_KS if labels == "single" else MULTI_LABEL_KS) if k <= num_classes)


@torch.no_grad()
def predict(
    trained: Trained,
    source: PredictInput,
    out: str | os.PathLike,
    *,
    env: DistEnv,
    k: int = DEFAULT_K,
    batch_size: int = DEFAULT_BATCH,
    progress: bool = True,
) -> dict[str, float | int]:
    """Write the top-``k`` classes of every sample of ``source`` to ``out`` (rank 0) and return the
    metrics (means over all samples; empty without labels). Collective over ``env``'s ranks."""
    cfg = trained.cfg
    num_classes = cfg.head.num_classes
    check_k(k, num_classes)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    ks = metric_ks(source.labels, num_classes)
    paths = output_paths(out, with_metrics=bool(ks))
    search_k = max((k, *ks))  # the metrics may look deeper than what is written
    sums_of = single_label_sums if source.labels == "single" else multi_label_sums

    backbone, head = load_model(trained, env)
    writer = _Writer(paths, source.num_samples, k) if env.is_main else None
    total = None
    global_batch = batch_size * env.world_size
    try:
        with tqdm(
            total=source.num_samples, desc="predict", unit="sample", disable=not (progress and env.is_main)
        ) as bar:
            for start in range(0, source.num_samples, global_batch):
                sizes = split_rows(min(global_batch, source.num_samples - start), env.world_size)
                first = start + sum(sizes[: env.rank])
                inputs, labels = source.read(first, first + sizes[env.rank])
                if len(inputs):
                    with autocast(cfg, env.device):  # as the training run's evaluation
                        features = backbone(inputs.to(env.device, non_blocking=True)).float()
                else:  # this rank's share of the last batch is empty; it still takes part in the collectives
                    features = torch.empty((0, cfg.model.embed_dim), device=env.device)
                scores, ids = head.predict(features, k=search_k, sizes=sizes)
                if ks:
                    total = add_sums(total, sums_of(ids, labels.to(env.device), ks))
                ids = start_gather_rows(ids[:, :k], sizes, env.data_group).wait()
                scores = start_gather_rows(scores[:, :k], sizes, env.data_group).wait()
                if writer is not None:
                    writer.write(ids, scores)
                bar.update(sum(sizes))
        metrics = means(all_reduce_sums(total, env.data_group)) if ks else {}
        if writer is not None:
            writer.commit()
            if ks:
                _write_json(
                    paths["metrics"],
                    {
                        "checkpoint": str(trained.path),
                        "step": trained.step,
                        "input": str(source.path),
                        "k": k,
                        **metrics,
                    },
                )
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    return metrics


def format_metrics(metrics: dict[str, float | int]) -> str:
    """One line: each metric in percent, then the sample counts."""
    values = "  ".join(f"{name} {100 * value:.2f}%" for name, value in metrics.items() if isinstance(value, float))
    counts = f"{metrics['samples']} samples"
    if metrics.get(WITHOUT_POSITIVES):
        counts += f", {metrics[WITHOUT_POSITIVES]} without labels (scored 0)"
    return f"{values}  ({counts})"


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hydrahead.tools.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="a checkpoint folder (run.dir/checkpoints/step-N), or a run folder: its newest checkpoint that verifies",
    )
    parser.add_argument(
        "input",
        metavar="INPUT",
        help=(
            "the samples: a .npy of features, an extreme-classification text "
            "file, an image folder or a text file of image paths (see above)"
        ),
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="OUT",
        help=(
            "the predictions to write, ending in .tsv (ids and scores) or "
            ".npy (ids; the scores in OUT with the extension .scores.npy)"
        ),
    )
    parser.add_argument(
        "-k",
        type=int,
        default=DEFAULT_K,
        help=f"classes written per sample, best first, at most head.num_classes (default: {DEFAULT_K})",
    )
    parser.add_argument(
        "--labels",
        metavar="FILE",
        help=(
            "labels of a .npy or image-list input, as a .npy: (N,) class "
            "ids, or N x L class ids padded with -1 for multi-label data"
        ),
    )
    parser.add_argument(
        "--input-kind",
        choices=INPUT_KINDS,
        default="auto",
        help="what INPUT is (default auto: a folder is an image folder, a .npy holds features, another file is an "
        "extreme-classification text file for the mlp backbone and a list of image paths for image backbones)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        metavar="B",
        help=f"samples per rank and batch (default: {DEFAULT_BATCH})",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="torch.distributed backend (default auto: nccl with GPUs, gloo on CPUs)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite OUT and the files beside it if they exist (otherwise an existing one is an error)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar (by default rank 0 shows one)"
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help=(
            "do not check the checkpoint's checksums first (by default the ranks read every file once "
            "to check it before loading; damage then goes unnoticed)"
        ),
    )
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


_USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, pickle.UnpicklingError)


def _error(exc: BaseException, rank: int | None = None) -> int:
    where = "" if rank is None else f" (rank {rank})"
    print(f"predict: error{where}: {exc}", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    args = parse_args(argv)
    launched_rank = int(os.environ.get("RANK", "0"))
    # Mistakes in the arguments or the files surface here, the same on every rank: rank 0 says so.
    try:
        # Checked without reading the data files here; the ranks verify them together below.
        trained = open_checkpoint(args.checkpoint, verify=False)
        num_classes = trained.cfg.head.num_classes
        check_k(args.k, num_classes)
        source = open_input(args.input, trained.cfg, kind=args.input_kind, labels=args.labels)
        paths = output_paths(args.out, with_metrics=bool(metric_ks(source.labels, num_classes)))
        existing = [str(path) for path in paths.values() if path.exists()]
        if existing and not args.force:
            raise FileExistsError(f"{', '.join(existing)} exists; pass --force to overwrite")
    except _USER_ERRORS as exc:
        return _error(exc) if launched_rank == 0 else 1

    owns_group = not dist.is_initialized()  # a caller's process group is left as it was
    env = init_distributed(args.backend)
    try:
        if args.verify:  # each rank hashes a share of the files; a run folder's damaged checkpoints are skipped
            with warnings.catch_warnings():
                if not env.is_main:
                    warnings.simplefilter("ignore")
                trained = open_checkpoint(args.checkpoint, group=env.data_group)
        if env.is_main:
            print(
                f"predict: {source.description} on {env.world_size} rank(s) ({env.backend}), "
                f"checkpoint {trained.path} (step {trained.step})",
                file=sys.stderr,
                flush=True,
            )
        metrics = predict(
            trained, source, args.out, env=env, k=args.k, batch_size=args.batch_size, progress=args.progress
        )
    except _USER_ERRORS as exc:  # on the rank that met it: a bad image, say
        return _error(exc, env.rank if env.world_size > 1 else None)
    finally:
        if owns_group:
            destroy_distributed()
    if env.is_main:
        if metrics:
            print(format_metrics(metrics))
        print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

r"""Which of a trained head's nearest classes moved in training, and what an IVF finds of them.

    # the 100k task trained with full softmax (4 minutes on 2 CPU cores), then this (15 s)
    python launch/train.py --config configs/head_only_1m_families.yaml head.num_classes=100000 \
        model.embed_dim=64 train.global_batch=100 train.steps=400 head.lr=333.333 head.scale=48 \
        head.impl=reference train.eval_samples=8192 train.eval_every=400 run.dir=runs/full_100k
    python benchmarks/graph_neighbours.py runs/full_100k --name graph_neighbours_100k_scale48

A class graph refresh searches each label's row for its k nearest classes. This reads a
checkpoint's head (any world size) and asks what those neighbours are: rows that training
moved (cosine to the row's initial value below --moved-cosine; the initial rows are
recomputed from the run's seed, as the head draws them) or rows still where they started.
For --queries moved rows (seeded sample) it reports, against their exact k nearest
classes (cosine, the row itself left out):

  moved_share        the share of those neighbours that are moved rows
  neighbour_cosine   their mean cosine (kth_cosine: the k-th's)
  mass_share         the share of exp(s * cosine) over all rows that the k hold (s: head.scale)

and one row per IVF setting (torch k-means, --nlist lists, the probes of --nprobes; the
lists filed from all rows), k-means trained on all rows or on the moved rows only:

  recall             found / k, a neighbour found if its list is among the probed
  moved_recall       the same over the moved neighbours only
  mass_recall        the share of the k's exp(s * cosine) mass in the probed lists

and ``exact_over_moved``: the recall of an exact search over the moved rows alone, what a
refresh of the moved rows (head.graph_refresh_window) can find at best. The JSON's rows
carry ``ms`` (the probes' search on this machine, CPU), ``floor_ms``, ``ratio`` and
``peak_mib`` as None: this measures neighbours, not speed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import environment, print_table, write_results  # noqa: E402
from hydrahead.head.classifier import init_class_weights  # noqa: E402
from hydrahead.head.index import _nearest_centroid, default_nlist, kmeans  # noqa: E402
from hydrahead.tools.export_head import iter_head_rows  # noqa: E402
from hydrahead.tools.predict import open_checkpoint  # noqa: E402


def load_rows(run: str) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(trained rows, initial rows, the run's config), float32 on the CPU."""
    trained = open_checkpoint(run)
    h = trained.cfg.head
    blocks = [rows.float() for _, rows in iter_head_rows(trained.path)]
    weight = torch.cat(blocks)
    initial = torch.empty_like(weight)
    std = 1.0 if h.unit_scaling else h.init_std
    init_class_weights(initial, 0, seed=trained.cfg.run.seed, init=h.init, std=std)
    return weight, initial, trained.cfg


def neighbour_structure(weight, initial, *, k, queries, moved_cosine, scale, nlist, nprobes, seed) -> dict:
    """The fields described in the module's docstring, and one row per (k-means sample, probes)."""
    unit = F.normalize(weight, dim=1)
    moved = F.cosine_similarity(weight, initial, dim=1) < moved_cosine
    moved_rows = moved.nonzero().squeeze(1)
    if moved_rows.numel() < 2:
        raise ValueError(f"only {moved_rows.numel()} rows moved (cosine to their initial row < {moved_cosine})")
    generator = torch.Generator().manual_seed(seed)
    picked = moved_rows[torch.randperm(moved_rows.numel(), generator=generator)[:queries]]
    scores = unit[picked] @ unit.T
    scores[torch.arange(picked.numel()), picked] = -math.inf
    exact_scores, exact = scores.topk(k, dim=1)
    weights = torch.exp(scale * (exact_scores - 1))  # exp(s * cos), shifted by s: no overflow
    total = torch.exp(scale * (scores - 1)).sum(1)
    exact_moved = moved[exact]
    summary = {
        "classes": weight.shape[0],
        "dim": weight.shape[1],
        "moved_rows": moved_rows.numel(),
        "queries": picked.numel(),
        "k": k,
        "moved_share": exact_moved.float().mean().item(),
        "neighbour_cosine": exact_scores.mean().item(),
        "kth_cosine": exact_scores[:, -1].mean().item(),
        "mass_share": (weights.sum(1) / total).mean().item(),
    }
    over_moved = scores[:, moved_rows].topk(k, dim=1).indices
    found = (moved_rows[over_moved].unsqueeze(2) == exact.unsqueeze(1)).any(1)
    summary["exact_over_moved"] = found.float().mean().item()
    rows = []
    for sample_name, sample in (("all rows", unit), ("moved rows", unit[moved_rows])):
        centroids = kmeans(sample, nlist, 10, seed)
        lists = _nearest_centroid(unit, centroids, 65536, True, "ip")
        for nprobe in nprobes:
            start = time.perf_counter()
            probes = (unit[picked] @ centroids.T).topk(min(nprobe, nlist), dim=1).indices
            ms = (time.perf_counter() - start) * 1e3
            hit = (lists[exact].unsqueeze(2) == probes.unsqueeze(1)).any(2)
            rows.append(
                {
                    "method": f"ivf {nlist}:{nprobe}, k-means on {sample_name}",
                    "ms": ms,
                    "floor_ms": None,
                    "ratio": None,
                    "peak_mib": None,
                    "nlist": nlist,
                    "nprobe": nprobe,
                    "kmeans_on": sample_name,
                    "recall": hit.float().mean().item(),
                    "moved_recall": (hit & exact_moved).sum().item() / max(1, exact_moved.sum().item()),
                    "mass_recall": ((weights * hit).sum(1) / weights.sum(1)).mean().item(),
                }
            )
    return {"summary": summary, "rows": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run folder (its newest loadable checkpoint) or a checkpoint folder")
    parser.add_argument("--k", type=int, default=12, help="neighbours per class (head.graph_k)")
    parser.add_argument("--queries", type=int, default=2000, help="moved rows taken as queries (seeded sample)")
    parser.add_argument(
        "--moved-cosine", type=float, default=0.9, help="a row moved when its cosine to its initial row is below this"
    )
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(classes))")
    parser.add_argument("--nprobes", default="1,4,8,32,128", help="comma-separated lists probed")
    parser.add_argument("--seed", type=int, default=1, help="seed of the query sample and k-means")
    parser.add_argument("--name", default="graph_neighbours", help="results file name (without .json)")
    args = parser.parse_args(argv)
    if args.k < 1 or args.queries < 1 or not 0 < args.moved_cosine <= 1:
        parser.error("--k and --queries must be >= 1 and --moved-cosine in (0, 1]")
    nprobes = [int(item) for item in args.nprobes.split(",")]
    if min(nprobes) < 1:
        parser.error(f"--nprobes: each at least 1, got {args.nprobes}")
    weight, initial, cfg = load_rows(args.run)
    nlist = args.nlist or default_nlist(weight.shape[0])
    found = neighbour_structure(
        weight,
        initial,
        k=min(args.k, weight.shape[0] - 1),
        queries=args.queries,
        moved_cosine=args.moved_cosine,
        scale=cfg.head.scale,
        nlist=nlist,
        nprobes=nprobes,
        seed=args.seed,
    )
    shape = f"C={weight.shape[0]} D={weight.shape[1]} k={args.k}"
    for row in found["rows"]:
        row["shape"] = shape
    payload = {**environment(), "run": str(args.run), "scale": cfg.head.scale, **found}
    path = write_results(args.name, payload)
    print({key: round(value, 3) if isinstance(value, float) else value for key, value in found["summary"].items()})
    print(f"wrote {path}")
    print_table(found["rows"], ["method", "recall", "moved_recall", "mass_recall"])


if __name__ == "__main__":
    main()

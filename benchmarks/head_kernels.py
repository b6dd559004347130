"""One full training step of a shard's head: the fused Triton kernels against every alternative.

    python benchmarks/head_kernels.py                                 # all shapes, kinds, methods
    python benchmarks/head_kernels.py --shapes 4096x512x1048576 --kinds peaked --methods ours,cce
    python benchmarks/head_kernels.py --resume                        # go on after an interruption
    HYDRAHEAD_RESULTS_DIR=/tmp/r python benchmarks/head_kernels.py --dry-run   # CPU, tiny shape

Every row is one step of the head: forward + backward + the SGD update of W (lr 0.1,
momentum 0.9, weight decay 5e-4, torch.optim.SGD semantics, momentum buffer in
``--momentum-dtype``), so every method does the same work. Ours run as the trainer calls
them: the loss's checks (label ownership, bad shards) are read once the step is queued
(``MergeChecks``), not between the forward and the backward, where the read would leave the
GPU idle while the host launches the backward.

  ours             hydrahead.kernels.triton_sharded_cross_entropy (exact_kernels auto: the gemm
                   path for bf16 rows): an LSE pass, then class chunks of P written by a kernel,
                   dF and dW on cuBLAS, the SGD step on each chunk's rows
  ours-stationary  the same loss on the stationary kernels (blocks of rows held in registers,
                   A = P W in the forward, the update fused into the weight kernel)
  ours-filtered    hydrahead's filtered path: entries with |softmax - onehot| < --grad-filter
                   dropped; the LSE pass, one recompute listing the kept entries, a sparse
                   update (4·G·D·C_r FLOPs)
  ours-dw          the same kernels returning dW, then the SGD step in torch
  ours-graph       ours captured once as a CUDA graph and replayed each step (GPU only): the
                   same kernels without the host's launches, the loss's checks read after
                   each replay; against ours, the time the host adds to the step
  ours-cg          ours with head.cuda_graph (``hydrahead.kernels.graphed``), as the trainer runs
                   it: the loss and its backward in one call, which the library captures as one
                   graph at the second step and replays (the first step, which the loss error
                   is measured on, runs eagerly)
  ours-cg-split    head.cuda_graph for a caller that takes the loss and then its backward: two
                   graphs, the forward's and the backward's (run without autograd's engine)
  ours-fp8         the gemm path with W stored in fp8 e4m3 (unit-scaled: W / 0.02, logits times
                   0.02): both logit passes on FP8 tensor cores, P written in e5m2 (and
                   transposed), dF and dW by torch._scaled_mm, the update stochastically rounded
                   into e4m3; its floor counts four matmuls at the fp8 rate
  ours-fp8-graph   ours-fp8 captured the same way (GPU only); its step counter lives on the
                   device and advances after each replay, so each replay draws the rounding
                   bits the plain step of that number draws
  ours-fp8-cg      ours-fp8 with head.cuda_graph
  ours-fp8-stationary  the stationary kernels on the same fp8 W: A = P W in bf16 (its floor
                   counts that one at the bf16 rate), the update inside the weight kernel
  ours-fp8-filtered  the filtered path on fp8 W: both logit passes on FP8 tensor cores, the
                   sparse update stochastically rounded; floor: the exact fp8 step's
  cce              cut_cross_entropy.linear_cross_entropy (its default gradient filter) + SGD
  cce-nofilter     the same with filter_eps=None (exact) + SGD
  torch            F.cross_entropy(features @ W.T, labels) + SGD
  reference        hydrahead.head.sharded_cross_entropy (chunk 32768) + SGD
  liger            liger_kernel's fused linear cross-entropy + SGD (first shape only: seconds a step)

--margin-type cosface runs the loss of configs/resnet50_1m.yaml instead: logits 64 (cos - 0.35
at the target) on unit features and rows (ours, torch and reference only; cut-cross-entropy
and liger-kernel take no margin). Its floors are the plain step's: the row norms' extra read
of W and the normalisation are the method's own cost.

The default filter, 2**-12 = 2.44e-4, is cut-cross-entropy's own for bf16 (its "high" and
"auto": finfo(bf16).eps / 32), so both filters drop the same probabilities.

Two kinds of logits, from the same W ~ N(0, 0.02^2) and labels:
  flat    features ~ N(0, 1): logits ~ N(0, 0.2), a nearly uniform softmax (random init);
  peaked  features f_i = t W[y_i] / ||W[y_i]||^2 + noise, as in a trained model: the
          target logit is t, the others ~N(0, s^2 + t^2/D) with s = --logit-noise. t is
          set per shape so that the target holds about --target-prob of the softmax mass;
          the mean target probability actually reached is measured and printed.

Reported per row: the median time of --reps steps (CUDA events) and its ratio to the
floor, the larger of two:
  matmul floor  8·G·D·C_r FLOPs (logits, their recomputation in the backward, dF, dW), each
                2·G·D·C_r product at the rate cuBLAS reaches on this very G x D x C_r product
                (F @ W^T in class chunks, in the same run; bf16, or fp8 e4m3 via
                torch._scaled_mm for the fp8 rows' fp8 products);
  memory floor  the bytes of W, its momentum buffer (and Kahan buffer, none here) that any
                step without stored logits must move: W read twice (the softmax's normaliser
                needs every row before any row's gradient is known) and written once, the
                buffer read and written once, at the copy bandwidth measured in the same run.
Both floors are in every row (matmul_floor_ms, memory_floor_ms), with peak_floor_ms (the
8·G·D·C_r FLOPs at the square-matmul rate, the floor of earlier results). On a GPU also
kernel_ms, the time the profiler counts in the step's kernels (three more steps), split
by kernel name in kernels_ms, and idle_ms, the rest of the step: the GPU waiting for the host to queue work, and
allocator_per_step, the caching allocator's cudaMalloc, cudaFree, retries and device-wide
syncs per timed step (each of those stalls the host or the device). Then the peak memory
and the peak beyond what was allocated before the step (W, momentum buffer, features,
labels), and the relative error of the first step's loss (before W moves) against a
float64 computation on the same bf16 inputs. Each (method, shape, kind) runs in its own subprocess, so an out-of-memory
error, a crash or an illegal memory access (which leaves the CUDA context unusable) costs
only its own row. Rows are appended to ``<name>.rows.jsonl`` as they come; ``--resume``
keeps those already there. Results: ``benchmarks/results/<name>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    bf16_matmul_tflops,
    copy_bandwidth_gbps,
    cpu_time_ms,
    cuda_time_ms,
    environment,
    fp8_matmul_tflops,
    kernel_times_ms,
    median,
    print_table,
    pyplot,
    write_results,
)

# The G sweep at C_r = 250k and 1M (small G: bound by memory; large: by arithmetic).
DEFAULT_SHAPES = ",".join(
    [f"{g}x512x262144" for g in (256, 512, 1024)] + [f"{g}x512x1048576" for g in (256, 512, 1024, 4096, 8192)]
)
DRY_RUN_SHAPES = "64x16x1000"
KINDS = ("flat", "peaked")
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
WEIGHT_STD = 0.02
CCE_BF16_FILTER = torch.finfo(torch.bfloat16).eps / 32  # 2**-12, cut-cross-entropy's bf16 default
REFERENCE_CHUNK = 32768
FLOAT64_CHUNK_BYTES = 1 << 29  # one G x chunk float64 block of logits in the float64 loss
ROW_MARKER = "HEAD_KERNELS_ROW "  # prefixes the one JSON line a child prints for the parent
MIB = 2**20
COSFACE = {"scale": 64.0, "margin": 0.35}  # configs/resnet50_1m.yaml's head
NO_MARGIN = ("cce", "cce-nofilter", "liger")  # methods with no cosine-margin loss


@dataclass(frozen=True)
class Method:
    name: str  # row label; ours start with "hydrahead"
    update: str  # "fused" (inside the backward) or "torch" (an SGD step on the returned dW)
    modules: tuple[str, ...]  # imported before any input is made: missing ones give a skip row
    slow: bool = False  # seconds per step: --slow-reps, no extra warm-up, first shape only


METHODS = {
    "ours": Method("hydrahead-triton gemm path (SGD in the backward)", "fused", ("hydrahead.kernels",)),
    "ours-stationary": Method("hydrahead-triton stationary kernels (fused SGD)", "fused", ("hydrahead.kernels",)),
    "ours-filtered": Method("hydrahead-triton filtered (fused SGD)", "fused", ("hydrahead.kernels",)),
    "ours-dw": Method("hydrahead-triton (dW + torch SGD)", "torch", ("hydrahead.kernels",)),
    "ours-graph": Method(
        "hydrahead-triton gemm path in a CUDA graph (SGD in the backward)", "fused", ("hydrahead.kernels",)
    ),
    "ours-fp8": Method(
        "hydrahead-triton fp8 e4m3 W gemm backward (SGD, stochastic rounding)", "fused", ("hydrahead.kernels",)
    ),
    "ours-fp8-graph": Method(
        "hydrahead-triton fp8 e4m3 W gemm backward in a CUDA graph (SGD, stochastic rounding)",
        "fused",
        ("hydrahead.kernels",),
    ),
    "ours-cg": Method(
        "hydrahead-triton gemm path, head.cuda_graph (SGD in the backward)", "fused", ("hydrahead.kernels",)
    ),
    "ours-cg-split": Method(
        "hydrahead-triton gemm path, head.cuda_graph, loss then backward (SGD in the backward)",
        "fused",
        ("hydrahead.kernels",),
    ),
    "ours-fp8-cg": Method(
        "hydrahead-triton fp8 e4m3 W gemm backward, head.cuda_graph (SGD, stochastic rounding)",
        "fused",
        ("hydrahead.kernels",),
    ),
    "ours-fp8-stationary": Method(
        "hydrahead-triton fp8 e4m3 W stationary kernels (fused SGD, stochastic rounding)",
        "fused",
        ("hydrahead.kernels",),
    ),
    "ours-fp8-filtered": Method(
        "hydrahead-triton fp8 e4m3 W filtered (fused SGD, stochastic rounding)", "fused", ("hydrahead.kernels",)
    ),
    "cce": Method("cut-cross-entropy (dW + torch SGD)", "torch", ("cut_cross_entropy",)),
    "cce-nofilter": Method("cut-cross-entropy no filter (dW + torch SGD)", "torch", ("cut_cross_entropy",)),
    "torch": Method("torch F.cross_entropy (dW + torch SGD)", "torch", ()),
    "reference": Method(f"hydrahead-reference chunk {REFERENCE_CHUNK} (dW + torch SGD)", "torch", ("hydrahead.head",)),
    "liger": Method("liger-kernel (dW + torch SGD)", "torch", ("liger_kernel.transformers.functional",), slow=True),
}
OURS = (
    "ours",
    "ours-stationary",
    "ours-filtered",
    "ours-dw",
    "ours-cg",
    "ours-cg-split",
    "ours-fp8",
    "ours-fp8-cg",
    "ours-fp8-stationary",
    "ours-fp8-filtered",
)
# The rate each of the four matmuls (logits, P W, recomputed logits, P^T F) runs at. The
# stationary fp8 kernels run A = P W in bf16: FP8 tensor cores take K-major operands only
# and the fp8 W tile is D-major there (the gemm path transposes W's chunk for it instead).
# The filtered rows keep the floor of the exact step they replace (as ours-filtered does).
GRAPHED = {"ours-graph": "ours", "ours-fp8-graph": "ours-fp8"}  # captured row -> the step it captures
MATMUL_DTYPES = {
    "ours-fp8": ("fp8",) * 4,
    "ours-fp8-graph": ("fp8",) * 4,
    "ours-fp8-cg": ("fp8",) * 4,
    "ours-fp8-stationary": ("fp8", "bf16", "fp8", "fp8"),
    "ours-fp8-filtered": ("fp8",) * 4,
}


def floor_ms(key: str, shape, rates: dict) -> float:
    """The step's arithmetic floor: each of its four 2·G·D·C_r matmuls at its own measured rate."""
    G, D, C = shape
    return sum(2 * G * D * C / (rates[dtype] * 1e12) * 1e3 for dtype in MATMUL_DTYPES.get(key, ("bf16",) * 4))


def memory_floor_ms(key: str, shape, momentum_dtype: str, copy_gbps: float) -> float:
    """Bytes of W (read twice, written once) and of its momentum buffer (read and written once)
    at the measured copy bandwidth (GB/s)."""
    _, D, C = shape
    weight_bytes = 1 if "fp8" in key else 2
    buffer_bytes = 4 if momentum_dtype == "fp32" else 2
    return (3 * weight_bytes + 2 * buffer_bytes) * C * D / (copy_gbps * 1e9) * 1e3


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().replace("_", "").split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"a shape is GxDxC with positive integers, got {text!r}")
    return tuple(int(p) for p in parts)


def shape_name(shape: tuple[int, int, int]) -> str:
    return "x".join(str(n) for n in shape)


def peaked_target_logit(num_classes: int, dim: int, target_prob: float, noise: float) -> float:
    """Target logit t at which a sample with zero noise gives its class ``target_prob``.

    The other logits are ~N(0, v) with v = noise^2 + t^2/D (noise, plus the random overlap
    of W[y] with the other rows), so their sum of exp is about (C-1) exp(v/2) and
    t = ln(C-1) + v/2 + logit(target_prob); v depends on t, hence the fixed point.
    """
    base = math.log(num_classes - 1) + math.log(target_prob / (1 - target_prob))
    t = base
    for _ in range(100):
        t_next = base + (noise**2 + t * t / dim) / 2
        if abs(t_next - t) < 1e-9:
            return t_next
        t = t_next
        if t > 10 * dim:
            break
    raise ValueError(
        f"no target logit reaches p={target_prob} at C={num_classes}, D={dim}: lower --target-prob or --logit-noise"
    )


@dataclass
class Problem:
    features: torch.Tensor  # G x D bf16, requires grad (dF is part of the step)
    weight: torch.Tensor  # C x D bf16 leaf, requires grad
    labels: torch.Tensor  # G int64
    momentum_buffer: torch.Tensor | None  # C x D in --momentum-dtype
    target_logit: float | None  # t of the peaked kind


def make_problem(shape, kind: str, device: torch.device, args, *, with_buffer: bool = True) -> Problem:
    """The same seeded inputs in every subprocess; W and labels do not depend on the kind."""
    G, D, C = shape
    gen = torch.Generator(device=device).manual_seed(args.seed)
    weight = torch.empty(C, D, device=device, dtype=torch.bfloat16)
    weight.normal_(0.0, WEIGHT_STD, generator=gen)  # in place: no fp32 copy of a 25M x 512 matrix
    labels = torch.randint(0, C, (G,), device=device, generator=gen)
    noise = torch.randn(G, D, device=device, generator=gen)
    target_logit = None
    if kind == "flat":
        features = noise
    else:
        target_logit = peaked_target_logit(C, D, args.target_prob, args.logit_noise)
        w_y = weight[labels].float()
        toward_target = w_y / (w_y * w_y).sum(dim=1, keepdim=True)  # dot with W[y] is exactly 1
        noise_std = args.logit_noise / (WEIGHT_STD * math.sqrt(D))  # logit noise (noise . W[j]) of std s
        features = target_logit * toward_target + noise_std * noise
    buffer = None
    if with_buffer:
        buffer = torch.zeros(
            C, D, device=device, dtype=torch.float32 if args.momentum_dtype == "fp32" else torch.bfloat16
        )
    return Problem(
        features=features.to(torch.bfloat16).requires_grad_(),
        weight=weight.requires_grad_(),
        labels=labels,
        momentum_buffer=buffer,
        target_logit=target_logit,
    )


def _float64_rows(weight: torch.Tensor, cosine: bool) -> torch.Tensor:
    rows = weight.double()
    return rows / rows.norm(dim=1, keepdim=True) if cosine else rows


def _float64_logits(features, weight, labels, start: int, chunk: int, margin_type: str) -> torch.Tensor:
    """Classes [start, start + chunk) of the G x C logits in float64 (cosface: scale times the
    cosine, the margin taken off at each row's target)."""
    cosine = margin_type == "cosface"
    rows = _float64_rows(weight[start : start + chunk], cosine)
    logits = features @ rows.t()
    if cosine:
        local = labels - start
        here = (local >= 0) & (local < rows.shape[0])
        hit = torch.nonzero(here).squeeze(1)
        logits[hit, local[hit]] -= COSFACE["margin"]
        logits *= COSFACE["scale"]
    return logits


@torch.no_grad()
def float64_loss(problem: Problem, grad_filter: float, margin_type: str = "none") -> dict:
    """The exact loss on the bf16 inputs, in float64 over class chunks (F.cross_entropy's math;
    cosface: on unit features and rows, as ``--margin-type`` says).

    Also the mean target probability (how peaked the softmax is) and the share of all
    softmax entries at or above the gradient filter (what a filter cannot skip).
    """
    cosine = margin_type == "cosface"
    features = problem.features.detach().double()
    if cosine:
        features = features / features.norm(dim=1, keepdim=True)
    weight, labels = problem.weight.detach(), problem.labels
    G, C = features.shape[0], weight.shape[0]
    chunk = max(1, FLOAT64_CHUNK_BYTES // (8 * G))
    target = (features * _float64_rows(weight[labels], cosine)).sum(dim=1)
    if cosine:
        target = COSFACE["scale"] * (target - COSFACE["margin"])
    run_max = torch.full((G,), -math.inf, dtype=torch.float64, device=features.device)
    run_sum = torch.zeros_like(run_max)
    for start in range(0, C, chunk):
        logits = _float64_logits(features, weight, labels, start, chunk, margin_type)
        new_max = torch.maximum(run_max, logits.max(dim=1).values)
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max[:, None]).sum(dim=1)
        run_max = new_max
        del logits
    lse = run_max + torch.log(run_sum)
    # Second pass: entries with softmax >= grad_filter, i.e. logit >= lse + log(grad_filter).
    above = 0
    if grad_filter > 0:
        cut = lse[:, None] + math.log(grad_filter)
        for start in range(0, C, chunk):
            above += int((_float64_logits(features, weight, labels, start, chunk, margin_type) >= cut).sum())
    return {
        "loss64": float((lse - target).mean()),
        "mean_target_prob": float(torch.exp(target - lse).mean()),
        "frac_p_above_filter": above / (G * C),
    }


# ----------------------------------------------------------------------------------------
# Methods: each builds step(), one full training step of the head
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def sgd_step_(weight: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor) -> None:
    """torch.optim.SGD's step (no dampening, no Nesterov); the buffer keeps its own dtype.

    The buffer starts at zero, so the first step sets it to the gradient, as torch does.
    """
    buffer.mul_(SGD["momentum"]).add_(grad).add_(weight, alpha=SGD["weight_decay"])
    weight.add_(buffer, alpha=-SGD["lr"])


def build_step(key: str, p: Problem, args):
    """step() -> loss (detached): forward, backward and the SGD update of p.weight."""
    num_classes = p.weight.shape[0]
    cosine = args.margin_type == "cosface"
    if cosine and key in NO_MARGIN:
        raise ValueError(f"--margin-type cosface: {key} takes no margin; run ours, torch or reference")
    margin = dict(margin_type="cosface", **COSFACE) if cosine else {}  # the loss's options beyond the plain one

    if key in GRAPHED:
        return captured(GRAPHED[key], p, args)
    if key in OURS:
        from hydrahead.distributed.sharded_softmax import MergeChecks
        from hydrahead.kernels import SGDUpdate, triton_sharded_cross_entropy

        if key == "ours-dw":

            def loss_fn(f, w, y):
                return triton_sharded_cross_entropy(f, w, y, 0, num_classes=num_classes, **margin)
        else:
            fp8 = key in MATMUL_DTYPES
            scale = 1.0
            if fp8:  # unit scaling: rows stored as W / std in e4m3 (their normal range), logits times std
                weight8 = torch.empty(p.weight.shape, device=p.weight.device, dtype=torch.float8_e4m3fn)
                for start in range(0, weight8.shape[0], 1 << 20):
                    rows = slice(start, start + (1 << 20))
                    weight8[rows] = (p.weight[rows].detach().float() / WEIGHT_STD).to(weight8.dtype)
                p.weight, scale = weight8, WEIGHT_STD  # the bf16 rows are freed: the step's memory is the fp8 head's
            grad_filter = args.grad_filter if key.endswith("filtered") else 0.0
            exact_kernels = "stationary" if key.endswith("stationary") else "gemm"
            # fresh stochastic-rounding draws every step; in a CUDA graph the counter is a device tensor
            state = {"step": 0, "device_step": torch.zeros(1, dtype=torch.int64, device=p.weight.device)}
            graphs = None
            at_once = key.endswith("-cg")  # loss and backward in one call, as train.py runs head.cuda_graph=true
            if at_once or key.endswith("-cg-split"):  # the library's own graphs
                from hydrahead.kernels.graphed import HeadStepGraphs

                graphs = HeadStepGraphs()

            def fused_step(*, capture: bool = False):
                """The step, its loss detached; with ``capture`` (inside a CUDA graph, where
                nothing may be read to the host) also the checks and their values tensor,
                left for the caller to read after each replay."""
                p.features.grad = None
                checks = MergeChecks()  # read once the step is queued, as the trainer does: no read mid-step
                update = SGDUpdate(
                    momentum_buffer=p.momentum_buffer,
                    rounding="stochastic" if fp8 else "nearest",
                    step=state["device_step"] if capture else state["step"],
                    **SGD,
                )
                loss = triton_sharded_cross_entropy(
                    p.features,
                    p.weight,
                    p.labels,
                    0,
                    num_classes=num_classes,
                    update=update,
                    grad_filter=grad_filter,
                    exact_kernels=exact_kernels,
                    checks=checks,
                    graphs=graphs,
                    backward=at_once,  # the backward (the SGD step on p.weight) inside the call
                    **{"scale": scale, **margin},  # cosface: its own scale (unit rows: the storage scale cancels)
                )
                # else the SGD step lands here (a replayed step's backward without autograd's engine)
                if not at_once and (graphs is None or not graphs.backward(loss, p.features)):
                    loss.backward()
                state["step"] += 1
                if capture:
                    return loss.detach(), checks, checks.values(loss.device), state["device_step"]
                checks.raise_if_failed(checks.values(loss.device).tolist())
                return loss.detach()

            fused_step.graphs = graphs  # what a caller may ask of head.cuda_graph's rows: replays, failures
            return fused_step
    elif key in ("cce", "cce-nofilter"):
        from cut_cross_entropy import linear_cross_entropy

        filter_eps = "high" if key == "cce" else None  # "high" is its default: 2**-12 for bf16

        def loss_fn(f, w, y):
            return linear_cross_entropy(f, w, y, filter_eps=filter_eps)
    elif key == "torch":

        def loss_fn(f, w, y):
            if not cosine:
                return F.cross_entropy(f @ w.t(), y)
            logits = F.normalize(f, dim=1) @ F.normalize(w, dim=1).t()
            # in place (the product's backward needs its inputs only): the plain row's G x C, no more
            logits[torch.arange(len(y), device=y.device), y] -= COSFACE["margin"]
            return F.cross_entropy(logits.mul_(COSFACE["scale"]), y)
    elif key == "reference":
        from hydrahead.head import sharded_cross_entropy

        def loss_fn(f, w, y):
            return sharded_cross_entropy(f, w, y, 0, num_classes=num_classes, chunk_size=REFERENCE_CHUNK, **margin)
    elif key == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        loss_fn = liger_fused_linear_cross_entropy
    else:
        raise ValueError(f"unknown method {key!r}")

    def step():
        p.features.grad = p.weight.grad = None  # zero_grad(set_to_none=True)
        loss = loss_fn(p.features, p.weight, p.labels)
        loss.backward()
        sgd_step_(p.weight, p.weight.grad, p.momentum_buffer)
        return loss.detach()

    return step


def captured(key: str, p: Problem, args):
    """The step of ``key`` (ours or ours-fp8) captured once as a CUDA graph: each call replays it
    and reads the loss's checks, as ours does after each step. W and its momentum buffer
    are put back after the warm-up steps, so the first replay's loss is that of the
    untouched rows, as every other row's is."""
    if p.weight.device.type != "cuda":
        raise RuntimeError(f"the {key} row in a CUDA graph: it runs on a GPU only")
    step = build_step(key, p, args)  # ours-fp8 swaps in the fp8 rows: saved below, after it
    saved = p.weight.detach().clone(), p.momentum_buffer.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiled, tuned and allocated outside the capture, both variants
        step()
        step(capture=True)  # the device step's: its update kernel and key ops, run once before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, checks, values, device_step = step(capture=True)
    with torch.no_grad():
        p.weight.copy_(saved[0])
        p.momentum_buffer.copy_(saved[1])
        device_step.zero_()  # the first replay is the plain step 0's
    del saved

    def replay():
        graph.replay()
        device_step.add_(1)  # outside the graph: the next replay's draws
        checks.again().raise_if_failed(values.tolist())
        return loss

    return replay


# ----------------------------------------------------------------------------------------
# One (method, shape, kind) in a subprocess
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def shape_matmul_tflops(p: Problem, output_bytes: int = 4 << 30) -> dict:
    """The rate cuBLAS reaches on this shape's product F @ W^T (bf16, and e4m3 x e4m3 via
    torch._scaled_mm), in class chunks whose bf16 output stays below ``output_bytes``."""
    features, weight = p.features.detach(), p.weight.detach()
    (G, D), C = features.shape, weight.shape[0]
    chunk = max(256, min(C, output_bytes // (2 * G)))
    flops = 2 * G * D * C

    def timed(fn) -> float:
        if features.device.type != "cuda":
            return flops / (median(cpu_time_ms(fn, warmup=0, reps=1)) * 1e-3) / 1e12
        return flops / (median(cuda_time_ms(fn, warmup=1, reps=3)) * 1e-3) / 1e12

    rates = {"shape_tflops_bf16": timed(lambda: [features @ w.t() for w in weight.split(chunk)])}
    if features.device.type == "cuda":
        f8 = features.to(torch.float8_e4m3fn)
        one = torch.ones((), device=features.device)
        w8 = [w.to(torch.float8_e4m3fn) for w in weight.split(chunk)]  # rows x D: its .t() is column-major
        rates["shape_tflops_fp8"] = timed(
            lambda: [torch._scaled_mm(f8, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16) for w in w8]
        )
        del w8
    else:
        rates["shape_tflops_fp8"] = rates["shape_tflops_bf16"]
    return rates


def cpu_bf16_matmul_tflops(size: int = 512, reps: int = 5) -> float:
    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    ms = median(cpu_time_ms(lambda: a @ b, warmup=1, reps=reps))
    return 2 * size**3 / (ms * 1e-3) / 1e12


def error_note(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        wanted = re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", str(exc))
        return "out of memory" + (f" (tried to allocate {wanted.group(1)})" if wanted else "")
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    if "illegal memory access" in str(exc).lower():
        text += " [the CUDA context is unusable after this error]"
    return text


def measure(key: str, p: Problem, args, device: torch.device) -> dict:
    method = METHODS[key]
    step = build_step(key, p, args)
    reps = args.slow_reps if method.slow else args.reps
    warmup = 0 if method.slow else 1  # the first step below already compiled and tuned
    row = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        row["loss"] = float(step())  # before W moves: the loss error is measured on it
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        row.update(peak_mib=peak / MIB, extra_mib=(peak - baseline) / MIB)
        before = torch.cuda.memory_stats()
        times = cuda_time_ms(step, warmup=warmup, reps=reps)
        # cudaMalloc/cudaFree inside the timed steps (a free synchronises the device): a
        # step that runs slow in one process and fast in another may differ here
        after = torch.cuda.memory_stats()
        row["allocator_per_step"] = {
            name: (after.get(name, 0) - before.get(name, 0)) / (warmup + reps)
            for name in ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
        }
    else:
        row.update(loss=float(step()), peak_mib=None, extra_mib=None)
        times = cpu_time_ms(step, warmup=warmup, reps=reps)
    row.update(ms=median(times), times_ms=times, reps=reps)
    if device.type == "cuda" and not method.slow:  # what of the step the GPU spends in kernels
        try:
            # by kernel: which pass to work on next (names cut to 80 characters, summed where
            # they then coincide)
            row["kernels_ms"] = {}
            for name, ms in kernel_times_ms(step).items():
                row["kernels_ms"][name[:80]] = row["kernels_ms"].get(name[:80], 0.0) + ms
            row["kernel_ms"] = sum(row["kernels_ms"].values())
            row["idle_ms"] = row["ms"] - row["kernel_ms"]
        except Exception as exc:  # noqa: BLE001 - a profiler that cannot start costs the column, not the row
            row["kernel_note"] = f"no kernel time: {error_note(exc)}"
    weight = p.weight.detach()
    if weight.dtype == torch.float8_e4m3fn:
        weight = weight[:: max(1, weight.shape[0] // 65536)].float()  # no fp8 reductions in torch: a sample of rows
    if not (math.isfinite(float(weight.amax())) and math.isfinite(float(weight.amin()))):  # reductions: no copy of W
        row["note"] = "W is no longer finite after the steps"
    return row


def run_child(task: list[str], args) -> dict:
    """The --one modes: 'matmul', 'float64 SHAPE KIND', or 'METHOD SHAPE KIND'."""
    device = torch.device("cpu" if args.dry_run else "cuda")
    if task[0] == "matmul":
        if device.type == "cuda" and not torch.cuda.is_available():
            return {"error": "this benchmark needs a CUDA device (or --dry-run)"}
        tflops = bf16_matmul_tflops() if device.type == "cuda" else cpu_bf16_matmul_tflops()
        fp8 = fp8_matmul_tflops() if device.type == "cuda" else tflops  # CPU dry run: no fp8 units
        return {
            **environment(),
            "matmul_tflops_bf16": tflops,
            "matmul_tflops_fp8": fp8,
            "copy_gbps": copy_bandwidth_gbps(device),
        }

    what, shape, kind = task[0], parse_shape(task[1]), task[2]
    if what == "float64":
        try:
            p = make_problem(shape, kind, device, args, with_buffer=False)
            rates = shape_matmul_tflops(p)
            return {**float64_loss(p, args.grad_filter, args.margin_type), "target_logit": p.target_logit, **rates}
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which carries on
            return {"note": error_note(exc)}

    row = {
        "method": METHODS[what].name,
        "key": what,
        "shape": shape_name(shape),
        "kind": kind,
        "update": METHODS[what].update,
    }
    for module in METHODS[what].modules:
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001 - a missing competitor is a skip row, not a failure
            return {**row, "ms": None, "note": f"skipped: import {module} failed ({type(exc).__name__}: {exc})"}
    try:
        p = make_problem(shape, kind, device, args)
    except Exception as exc:  # noqa: BLE001
        return {**row, "ms": None, "note": f"inputs: {error_note(exc)}"}
    try:
        row.update(measure(what, p, args, device))
    except Exception as exc:  # noqa: BLE001 - OOM, crash: the row says why
        row.update(ms=None, note=error_note(exc))
    if what in OURS and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        # The Triton interpreter's bf16 tl.dot is unreliable: this row checks the flow, not the numbers.
        row["note"] = ((row.get("note") or "") + " [TRITON_INTERPRET on CPU: loss error not meaningful]").strip()
    return row


def spawn(task: list[str], args) -> dict:
    """Run one --one task in a fresh process; whatever happens there, return a dict."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", *task, *child_options(args)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        stdout, stderr, ending = done.stdout, done.stderr, f"process exited with {done.returncode}"
    except subprocess.TimeoutExpired as exc:  # a row printed before a hang at exit still counts
        stdout, stderr, ending = _text(exc.stdout), _text(exc.stderr), f"timed out after {args.timeout:g} s"
    for line in reversed(stdout.splitlines()):
        if line.startswith(ROW_MARKER):
            return json.loads(line[len(ROW_MARKER) :])
    last = [line for line in stderr.splitlines() if line.strip()][-1:] or ["no output"]
    return {"ms": None, "note": f"{ending}: {last[0][:200]}"}


def _text(output) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def child_options(args) -> list[str]:
    """The options a child needs to rebuild the same inputs and steps."""
    options = [
        "--reps",
        str(args.reps),
        "--slow-reps",
        str(args.slow_reps),
        "--seed",
        str(args.seed),
        "--momentum-dtype",
        args.momentum_dtype,
        "--grad-filter",
        repr(args.grad_filter),
        "--target-prob",
        repr(args.target_prob),
        "--logit-noise",
        repr(args.logit_noise),
        "--margin-type",
        args.margin_type,
    ]
    return options + (["--dry-run"] if args.dry_run else [])


# ----------------------------------------------------------------------------------------
# The parent: run everything, write JSON and PNG, print the table
# ----------------------------------------------------------------------------------------


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """Grouped bars: time / floor per method, one group per (shape, kind), log scale."""
    plt = pyplot()
    if plt is None:
        return None
    groups = list(dict.fromkeys((r["shape"], r["kind"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ratio = {(r["method"], r["shape"], r["kind"]): r.get("ratio") for r in rows}
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.8 * len(groups) + 3), 4.5))
    for i, method in enumerate(methods):
        points = [(j + (i - (len(methods) - 1) / 2) * width, ratio.get((method, *g))) for j, g in enumerate(groups)]
        points = [(x, y) for x, y in points if y]
        if points:
            ax.bar(*zip(*points), width=width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), [f"{shape}\n{kind}" for shape, kind in groups], fontsize=8)
    ax.set_ylabel("time / max(matmul floor, memory floor)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def fmt_sci(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes",
        default=None,
        help=f"comma-separated GxDxC_r (default {DEFAULT_SHAPES}; --dry-run: {DRY_RUN_SHAPES})",
    )
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated logit kinds: flat, peaked")
    parser.add_argument(
        "--methods",
        default=None,
        help=(
            f"comma-separated, from {','.join(METHODS)} (default all; "
            "--dry-run: torch,reference, plus ours under TRITON_INTERPRET=1)"
        ),
    )
    parser.add_argument("--reps", type=int, default=5, help="timed steps per row (median reported)")
    parser.add_argument("--slow-reps", type=int, default=2, help="timed steps for liger-kernel (seconds each)")
    parser.add_argument(
        "--momentum-dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the SGD momentum buffer"
    )
    parser.add_argument(
        "--grad-filter",
        type=float,
        default=CCE_BF16_FILTER,
        help="ours-filtered's threshold on |softmax - onehot| (default 2**-12, as cut-cross-entropy's bf16 filter)",
    )
    parser.add_argument(
        "--target-prob", type=float, default=0.25, help="peaked logits: share of the softmax mass aimed at the target"
    )
    parser.add_argument("--logit-noise", type=float, default=1.0, help="peaked logits: std of the noise on every logit")
    parser.add_argument(
        "--margin-type",
        choices=("none", "cosface"),
        default="none",
        help=(
            "the loss: plain logits, or cosface (scale 64, margin 0.35, as configs/resnet50_1m.yaml; "
            "ours, torch and reference only)"
        ),
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of W, labels and features (the same in every subprocess)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds allowed to one (method, shape, kind) subprocess"
    )
    parser.add_argument("--name", default="head_kernels", help="results file name (without .json)")
    parser.add_argument(
        "--collect",
        action="store_true",
        help="only rebuild <name>.json and the plot from <name>.rows.jsonl (no GPU needed)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep the rows already in <name>.rows.jsonl (same options assumed)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="run the whole flow on CPU at a tiny shape (torch-based methods)"
    )
    parser.add_argument("--one", nargs="+", metavar="TASK", help=argparse.SUPPRESS)  # internal: one subprocess's task
    args = parser.parse_args(argv)

    if args.one:
        print(ROW_MARKER + json.dumps(run_child(args.one, args)), flush=True)
        sys.stderr.flush()
        os._exit(0)  # skip interpreter and CUDA teardown, which can hang after a device error

    if not 0 < args.target_prob < 1:
        parser.error("--target-prob must lie in (0, 1)")
    try:
        shapes = [
            parse_shape(s) for s in (args.shapes or (DRY_RUN_SHAPES if args.dry_run else DEFAULT_SHAPES)).split(",")
        ]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    kinds = args.kinds.split(",")
    if args.methods:
        methods = args.methods.split(",")
    elif args.dry_run:
        methods = ["torch", "reference"] + (list(OURS) if os.environ.get("TRITON_INTERPRET") == "1" else [])
    else:
        methods = list(METHODS)
    for name, allowed in (("kind", KINDS), ("method", METHODS)):
        unknown = [v for v in (kinds if name == "kind" else methods) if v not in allowed]
        if unknown:
            parser.error(f"unknown {name}(s) {unknown}; choose from {list(allowed)}")
    if args.margin_type == "cosface":
        if args.methods is None:
            methods = [m for m in methods if m not in NO_MARGIN]
        elif any(m in NO_MARGIN for m in methods):
            parser.error(f"--margin-type cosface: {', '.join(m for m in methods if m in NO_MARGIN)} take no margin")

    if args.collect:
        return collect(args.name)
    # The matmul rate (and the device's description) come from a subprocess too, so this
    # process never holds a CUDA context (memory) while the rows run.
    env = spawn(["matmul"], args)
    if "matmul_tflops_bf16" not in env:
        sys.exit(f"head_kernels: {env.get('error') or env.get('note')}")
    tflops, tflops_fp8, copy_gbps = env.pop("matmul_tflops_bf16"), env.pop("matmul_tflops_fp8"), env.pop("copy_gbps")
    print(
        f"{env['device']}: bf16 matmul {tflops:.1f} TFLOP/s, fp8 {tflops_fp8:.1f} (8192^3), copy {copy_gbps:.0f} GB/s",
        flush=True,
    )

    # Rows land in a JSON-lines file as they come, so an interrupted run can --resume.
    out_dir = Path(os.environ.get("HYDRAHEAD_RESULTS_DIR", RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_file = out_dir / f"{args.name}.rows.jsonl"
    records = (
        [json.loads(line) for line in rows_file.read_text().splitlines()] if args.resume and rows_file.is_file() else []
    )
    if not args.resume:
        rows_file.write_text("")

    def keep(record: dict) -> None:
        records.append(record)
        with rows_file.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    payload = {
        **env,
        "benchmark": "head_kernels",
        "what": "one shard, one training step of the head: forward + backward + SGD update of W, bf16 W and features"
        + (", cosface logits" if args.margin_type == "cosface" else ""),
        "matmul_tflops_bf16": tflops,
        "matmul_tflops_fp8": tflops_fp8,
        "copy_gbps": copy_gbps,
        "floor": (
            "max(matmul floor, memory floor). matmul floor: 8*G*D*C_r FLOPs (logits, their recomputation, dF, dW), "
            "each 2*G*D*C_r product at the rate cuBLAS reaches on this G x D x C_r product in this run (bf16, or fp8 "
            "e4m3 via torch._scaled_mm; see each row's matmul_dtypes and the inputs' shape_tflops_*). memory floor: "
            "W read twice and written once, its momentum buffer read and written once, at the copy bandwidth measured "
            "in this run. peak_floor_ms: the 8*G*D*C_r FLOPs at the 8192^3 matmul rates"
        ),
        "settings": {
            "sgd": SGD,
            "momentum_dtype": args.momentum_dtype,
            "grad_filter": args.grad_filter,
            "weight_std": WEIGHT_STD,
            "target_prob": args.target_prob,
            "logit_noise": args.logit_noise,
            "margin_type": args.margin_type,
            **(COSFACE if args.margin_type == "cosface" else {}),
            "seed": args.seed,
            "reps": args.reps,
            "slow_reps": args.slow_reps,
            "dry_run": args.dry_run,
        },
        "inputs": [],
        "rows": [],
    }

    peak_rates = {"bf16": tflops, "fp8": tflops_fp8}
    for shape in shapes:
        for kind in kinds:
            where = {"shape": shape_name(shape), "kind": kind}
            inputs = next(
                (
                    r
                    for r in records
                    if r.get("record") == "inputs" and r["shape"] == where["shape"] and r["kind"] == kind
                ),
                None,
            )
            if inputs is None:
                inputs = {"record": "inputs", **where, **spawn(["float64", shape_name(shape), kind], args)}
                keep(inputs)
            loss64 = inputs.get("loss64")
            rates = {
                "bf16": inputs.get("shape_tflops_bf16") or tflops,
                "fp8": inputs.get("shape_tflops_fp8") or tflops_fp8,
            }
            bf16_floor_ms, fp8_floor_ms = floor_ms("ours", shape, rates), floor_ms("ours-fp8", shape, rates)
            if loss64 is None:
                print(f"== {where['shape']} {kind}: no float64 loss ({inputs.get('note')})", flush=True)
            else:
                print(
                    f"== {where['shape']} {kind}: float64 loss {loss64:.6f}, mean target probability "
                    f"{inputs['mean_target_prob']:.3f}, softmax entries >= {args.grad_filter:.3g}: "
                    f"{inputs['frac_p_above_filter']:.2e}; cuBLAS on this product {rates['bf16']:.0f} TFLOP/s "
                    f"(fp8 {rates['fp8']:.0f}): matmul floor {bf16_floor_ms:.2f} ms (bf16), {fp8_floor_ms:.2f} "
                    f"ms (fp8 rows); memory floor "
                    f"{memory_floor_ms('ours', shape, args.momentum_dtype, copy_gbps):.2f} ms (bf16 rows)",
                    flush=True,
                )
            for key in methods:
                if METHODS[key].slow and shape != shapes[0]:
                    print(f"   {METHODS[key].name}: first shape only (seconds per step)", flush=True)
                    continue
                row = next(
                    (
                        r
                        for r in records
                        if r.get("record") == "row"
                        and r["key"] == key
                        and r["shape"] == where["shape"]
                        and r["kind"] == kind
                    ),
                    None,
                )
                if row is None:
                    row = {"method": METHODS[key].name, "key": key, **where, **spawn([key, *where.values()], args)}
                    ms = row.get("ms")
                    matmul_floor = floor_ms(key, shape, rates)
                    memory_floor = memory_floor_ms(key, shape, args.momentum_dtype, copy_gbps)
                    row_floor = max(matmul_floor, memory_floor)
                    row.update(
                        record="row",
                        floor_ms=row_floor,
                        matmul_floor_ms=matmul_floor,
                        memory_floor_ms=memory_floor,
                        peak_floor_ms=floor_ms(key, shape, peak_rates),
                        bound="memory" if memory_floor > matmul_floor else "matmul",
                        matmul_dtypes=list(MATMUL_DTYPES.get(key, ("bf16",) * 4)),
                        matmul_tflops=rates,
                        copy_gbps=copy_gbps,
                        ratio=None if ms is None else ms / row_floor,
                        loss_rel_err=None
                        if row.get("loss") is None or not loss64
                        else abs(row["loss"] - loss64) / abs(loss64),
                    )
                    row.setdefault("note", None)
                    keep(row)
                ms, ratio = row.get("ms"), row.get("ratio")
                timing = "-" if ms is None else f"{ms:.2f} ms ({ratio:.2f}x floor)"
                print(
                    f"   {row['method']}: {timing}, extra {row.get('extra_mib')} MiB, loss "
                    f"rel err {fmt_sci(row.get('loss_rel_err'))} {row.get('note') or ''}",
                    flush=True,
                )
                payload["rows"].append({k: v for k, v in row.items() if k != "record"})
                path = write_results(args.name, payload)  # after every row: partial results survive
            payload["inputs"].append({k: v for k, v in inputs.items() if k != "record"})
            path = write_results(args.name, payload)

    title = f"{payload['device']}: one head step (fwd + bwd + SGD) / max(matmul floor, memory floor)"
    png = plot(payload["rows"], path, title)
    print(f"\nbf16 matmul {tflops:.1f} TFLOP/s; wrote {path}" + (f" and {png}" if png else ""))
    table = [{**r, "loss_rel_err": fmt_sci(r.get("loss_rel_err"))} for r in payload["rows"]]
    print_table(
        table,
        [
            "method",
            "shape",
            "kind",
            "ms",
            "kernel_ms",
            "matmul_floor_ms",
            "memory_floor_ms",
            "ratio",
            "extra_mib",
            "loss_rel_err",
            "note",
        ],
    )


def collect(name: str) -> None:
    """Rebuild the results JSON and plot from every row gathered so far, over several invocations.

    Each row keeps the floor of its own invocation (the matmul rate measured there).
    """
    out_dir = Path(os.environ.get("HYDRAHEAD_RESULTS_DIR", RESULTS_DIR))
    records = [json.loads(line) for line in (out_dir / f"{name}.rows.jsonl").read_text().splitlines()]
    previous = json.loads((out_dir / f"{name}.json").read_text())
    rows = [{k: v for k, v in r.items() if k != "record"} for r in records if r.get("record") == "row"]
    for row in rows:  # floors from the rates of the row's own invocation (older rows: the JSON's)
        if "matmul_floor_ms" in row:  # both floors were measured with the row
            continue
        rates = row.get("matmul_tflops") or {
            "bf16": previous["matmul_tflops_bf16"],
            "fp8": previous.get("matmul_tflops_fp8"),
        }
        row["matmul_dtypes"] = list(MATMUL_DTYPES.get(row["key"], ("bf16",) * 4))
        row["floor_ms"] = floor_ms(row["key"], parse_shape(row["shape"]), rates)
        row["ratio"] = None if row.get("ms") is None else row["ms"] / row["floor_ms"]
    inputs = [{k: v for k, v in r.items() if k != "record"} for r in records if r.get("record") == "inputs"]
    payload = {**{k: v for k, v in previous.items() if k not in ("rows", "inputs")}, "inputs": inputs, "rows": rows}
    payload["floor"] += "; each row's floor_ms uses the rates measured in its own invocation"
    path = write_results(name, payload)
    png = plot(rows, path, f"{payload['device']}: one head step (fwd + bwd + SGD) / its floor")
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    table = [{**r, "loss_rel_err": fmt_sci(r.get("loss_rel_err"))} for r in rows]
    print_table(table, ["method", "shape", "kind", "ms", "ratio", "extra_mib", "loss_rel_err", "note"])


if __name__ == "__main__":
    main()

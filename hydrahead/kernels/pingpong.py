"""The two passes over W with their epilogues beside the products: two consumer warpgroups
(Gluon, Hopper).

The Triton LSE pass (``filtered._lse_kernel``) and P kernel (``exact_gemm._probs_kernel``)
run each tile's product and then the tile's epilogue (a scale and an exp2 per logit; a max
and a sum, or P's store) in the same warps, so the tensor cores idle while the exps run:
they reach about 0.8x cuBLAS's rate on the same product (docs/kernels.md). Here the work is
split over warps that run at once:

loader      one warp: TMA copies of the program's F rows (held for the whole program) and
            of W's K slices, tile after tile, into a ring of STAGES buffers
consumers   two warpgroups that take alternate class tiles of the program's split: a wgmma
            chain over D into a BLOCK_G x BLOCK_C float32 tile, then the tile's epilogue:
            LSE pass  folded into that consumer's running (max, sum of exp) per row
            P kernel  P = exp(logit - lse) · grad_scale in bf16, written by the copy engine
                      from a shared-memory tile of the consumer's own, or from its registers
                      (``PROBS_STORE``)

While one consumer runs its epilogue, the other's products keep the tensor cores busy. In
the LSE pass each consumer writes its own (max, sum) per row, so a program gives two of the
splits that ``filtered._lse_merge_kernel`` merges: the result is that of the Triton pass,
with the sum taken in another order. The P kernel writes what the Triton kernel writes for
bf16 rows (``_fix_targets`` then writes the targets' entries).

What they take: bf16 rows and features (cosine logits too: a column scale a tile), no fp8
row scales or logit offsets, D a multiple of BLOCK_K and at most HELD_DIM (F's rows held in
shared memory), operands that tensor descriptors can read, an sm_90 GPU (``applies``).
HYDRAHEAD_PINGPONG_LSE=0 turns the LSE pass off. The P kernel takes batches of 512 to 1,024
rows (``PROBS_BATCHES``: measured in the step on an H100, 5-7% faster than the Triton kernel
there, as fast at 256 rows, 1% slower at 4,096; docs/kernels.md);
HYDRAHEAD_PINGPONG_PROBS=1 or 0 turns it on or off at every batch.
"""

from __future__ import annotations

import os

import torch
import triton

from hydrahead.kernels.dw_update import GLUON, _descriptor, _tma_ready

if GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

    from hydrahead.kernels.dw_update import _tma_load, _tma_store, tile_products, wgmma_layout

ENABLED = {
    "lse": os.environ.get("HYDRAHEAD_PINGPONG_LSE", "1") != "0",
    # None: by the batch (PROBS_BATCHES); HYDRAHEAD_PINGPONG_PROBS=1 or 0: at every batch
    "probs": {"1": True, "0": False}.get(os.environ.get("HYDRAHEAD_PINGPONG_PROBS", ""), None),
}
# The batches at which the P kernel beat the Triton one in the step (one H100): 4.6% of the
# kernel at 512 x 1M, 7% at 1,024 x 262k, 6% at 1,024 x 1M; at 256 rows as fast (262k) or 1.6%
# slower (1M), at 4,096 1% slower; between 1,024 and 4,096 rows not measured
PROBS_BATCHES = (512, 1024)
# BLOCK_G, BLOCK_C, BLOCK_K, STAGES. F held: 128 KiB at D = 512. The LSE pass's ring: 80 KiB;
# the P kernel's 64-class tiles leave room for each consumer's 16 KiB tile of P beside a
# ring of 48 KiB.
TILES = {"lse": (128, 128, 64, 5), "probs": (128, 64, 64, 6)}
# How the P kernel writes P: "copy", from a shared-memory tile by the copy engine (the tiles
# above), or "direct", from the consumer's registers (HYDRAHEAD_PINGPONG_PROBS_STORE=direct):
# no tile of P in shared memory, so the LSE pass's 128-class tiles fit, and F's held rows are
# read from shared memory once for 128 classes instead of 64.
PROBS_STORE = os.environ.get("HYDRAHEAD_PINGPONG_PROBS_STORE", "copy")
DIRECT_TILES = (128, 128, 64, 5)
_TILES_VARIABLE = {"lse": "HYDRAHEAD_PINGPONG_TILES", "probs": "HYDRAHEAD_PINGPONG_PROBS_TILES"}
HELD_DIM = 512
CONSUMER_REGS, LOADER_REGS = 232, 40


def _tiles(kind: str = "lse") -> tuple[int, int, int, int]:
    """BLOCK_G, BLOCK_C, BLOCK_K, STAGES of a pass ("lse" or "probs");
    HYDRAHEAD_PINGPONG_TILES (the LSE pass) and HYDRAHEAD_PINGPONG_PROBS_TILES =g,c,k,stages
    override them."""
    variable = _TILES_VARIABLE[kind]
    given = os.environ.get(variable)
    if not given:
        return DIRECT_TILES if kind == "probs" and _direct() else TILES[kind]
    try:
        tiles = tuple(int(v) for v in given.split(","))
    except ValueError:
        tiles = ()
    if (
        len(tiles) != 4
        or tiles[0] not in (64, 128)
        or tiles[1] not in (64, 128, 256)
        or tiles[0] * tiles[1] > 128 * 128  # a consumer's float32 tile: 128 registers a thread
        or tiles[2] not in (32, 64, 128)
        or tiles[3] < 2
    ):
        raise ValueError(
            f"{variable} takes BLOCK_G,BLOCK_C,BLOCK_K,STAGES (BLOCK_G 64 or 128, BLOCK_C 64-256, "
            f"BLOCK_G x BLOCK_C at most 128 x 128, BLOCK_K 32-128, STAGES 2 or more), got {given!r}"
        )
    return tiles


def _direct() -> bool:
    if PROBS_STORE not in ("copy", "direct"):
        raise ValueError(f"HYDRAHEAD_PINGPONG_PROBS_STORE must be copy or direct, got {PROBS_STORE!r}")
    return PROBS_STORE == "direct"


SHARED_LIMIT = 227 * 1024


def shared_bytes(dim: int, tiles=None, kind: str = "lse") -> int:
    """F's held rows, the ring's W slices, the P kernel's two tiles of P (stored by the copy
    engine), and the barriers."""
    block_g, block_c, block_k, stages = tiles or _tiles(kind)
    held = triton.cdiv(dim, block_k)
    out = 2 * 2 * block_g * block_c if kind == "probs" and not _direct() else 0
    return 2 * block_g * held * block_k + 2 * stages * block_c * block_k + out + 8 * (2 * stages + 2) + 1024


if GLUON:

    @gluon.jit
    def _loader(f_desc, w_desc, f_bufs, w_bufs, bars, row0, w_lo, num_tiles):
        # F's rows once, then W's K slices of tiles w_lo, w_lo + BLOCK_C, ... in order
        ring_ready, ring_empty, f_ready, _ = bars
        held: gl.constexpr = f_bufs.type.shape[0]
        stages: gl.constexpr = w_bufs.type.shape[0]
        block_c: gl.constexpr = w_desc.block_type.shape[0]
        block_k: gl.constexpr = w_desc.block_type.shape[1]
        mbarrier.expect(f_ready.index(0), held * f_desc.block_type.nbytes)
        for h in gl.static_range(held):
            _tma_load(f_desc, [row0, h * block_k], f_ready.index(0), f_bufs.index(h))
        step = 0
        for t in range(num_tiles):
            c0 = w_lo + t * block_c
            for k in range(held):
                s = step % stages
                mbarrier.wait(ring_empty.index(s), ((step // stages) & 1) ^ 1)  # a fresh barrier passes phase 1
                mbarrier.expect(ring_ready.index(s), w_desc.block_type.nbytes)
                _tma_load(w_desc, [c0, k * block_k], ring_ready.index(s), w_bufs.index(s))
                step += 1

    @gluon.jit
    def _as_type(flag: gl.constexpr):
        """A kernel's flag as the shape of an unused 1 or 2 element shared allocation: a
        constexpr passed through warp_specialize reaches the partitions as a runtime value (the
        branch on it then fails to lower on Triton 3.6), a shape stays a constant."""
        return gl.allocate_shared_memory(gl.int8, [1 + flag], gl.SwizzledSharedLayout(1, 1, 1, [0]))

    @gluon.constexpr_function
    def _flag(shaped):
        return shaped.type.shape[0] == 2

    @gluon.jit
    def _shared(f_desc, w_desc, HELD: gl.constexpr, STAGES: gl.constexpr):
        """F's held slices, the ring, and its barriers (ready, empty, F ready, turn), initialised."""
        block_g: gl.constexpr = f_desc.block_type.shape[0]
        block_k: gl.constexpr = f_desc.block_type.shape[1]
        block_c: gl.constexpr = w_desc.block_type.shape[0]
        f_bufs = gl.allocate_shared_memory(f_desc.dtype, [HELD, block_g, block_k], f_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, block_c, block_k], w_desc.layout)
        ring_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ring_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        f_ready = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())  # tile t's slices in
        mbarrier.init(f_ready.index(0), count=1)
        mbarrier.init(turn.index(0), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ring_ready.index(i), count=1)
            mbarrier.init(ring_empty.index(i), count=1)
        return f_bufs, w_bufs, (ring_ready, ring_empty, f_ready, turn)

    @gluon.jit
    def _tile_logits(acc, f_bufs, w_bufs, bars, t):
        """acc (zeros) + tile t's F W^T: F's held slices times W's from the ring."""
        ring_ready, ring_empty, _, turn = bars
        held: gl.constexpr = f_bufs.type.shape[0]
        return tile_products(acc, f_bufs, w_bufs, (ring_ready, ring_empty, turn), t, held, False, False, True, True)

    @gluon.jit
    def _lse_consumer(
        which: gl.constexpr, f_bufs, w_bufs, bars, label_ptr, inv_norm_ptr, stats_ptr, G, row0, c_lo, c_hi, num_tiles,
        out_split, row_factor, cosine_flag, NUM_WARPS: gl.constexpr,
    ):  # fmt: skip
        COSINE: gl.constexpr = _flag(cosine_flag)
        block_g: gl.constexpr = f_bufs.type.shape[1]
        block_c: gl.constexpr = w_bufs.type.shape[1]
        layout: gl.constexpr = wgmma_layout(block_c, NUM_WARPS)
        rows = row0 + gl.arange(0, block_g, layout=gl.SliceLayout(1, layout))
        row_ok = rows < G
        label = gl.load(label_ptr + rows, mask=row_ok, other=-1).to(gl.int32)
        m2 = gl.full([block_g], float("-inf"), gl.float32, gl.SliceLayout(1, layout))
        total = gl.zeros([block_g], gl.float32, gl.SliceLayout(1, layout))
        mbarrier.wait(bars[2].index(0), 0)  # F's rows are in
        for t in range(which, num_tiles, 2):
            acc = _tile_logits(gl.zeros([block_g, block_c], gl.float32, layout), f_bufs, w_bufs, bars, t)
            # the tile's logits, in log2 units, folded into the row's running max and sum; the
            # targets are left out (the merge adds each one's term from its own logit)
            cols = c_lo + t * block_c + gl.arange(0, block_c, layout=gl.SliceLayout(0, layout))
            if COSINE:  # each class's logits over its weight row's norm
                z2 = acc * (gl.load(inv_norm_ptr + cols, mask=cols < c_hi, other=0.0) * row_factor)[None, :]
            else:
                z2 = acc * row_factor
            z2 = gl.where((label[:, None] == cols[None, :]) | (cols >= c_hi)[None, :], float("-inf"), z2)
            m2_new = gl.maximum(m2, gl.max(z2, axis=1))
            # a row with nothing counted yet keeps -inf: shift by 0 there, so no exp2 sees -inf - -inf
            shift = gl.where(m2_new == float("-inf"), 0.0, m2_new)
            total = total * gl.exp2(m2 - shift) + gl.sum(gl.exp2(z2 - shift[:, None]), axis=1)
            m2 = m2_new
        out = (out_split + which) * G + rows
        gl.store(stats_ptr + out, m2 * 0.6931471805599453, mask=row_ok)  # back to natural-log units
        gl.store(stats_ptr + out + 2 * gl.num_programs(1) * G, total, mask=row_ok)

    @gluon.jit
    def _lse_first(args):
        _, _, f_bufs, w_bufs, bars, labels, inv, stats, G, row0, c_lo, c_hi, tiles, split, factor, cos = args
        _lse_consumer(0, f_bufs, w_bufs, bars, labels, inv, stats, G, row0, c_lo, c_hi, tiles, split, factor, cos, 4)

    @gluon.jit
    def _lse_second(args):
        _, _, f_bufs, w_bufs, bars, labels, inv, stats, G, row0, c_lo, c_hi, tiles, split, factor, cos = args
        _lse_consumer(1, f_bufs, w_bufs, bars, labels, inv, stats, G, row0, c_lo, c_hi, tiles, split, factor, cos, 4)

    @gluon.jit
    def _lse_loading(args):
        f_desc, w_desc, f_bufs, w_bufs, bars, _, _, _, _, row0, c_lo, _, num_tiles, _, _, _ = args
        _loader(f_desc, w_desc, f_bufs, w_bufs, bars, row0, c_lo, num_tiles)

    @gluon.jit
    def _pingpong_lse_kernel(
        f_desc,
        w_desc,
        label_ptr,
        inv_norm_ptr,
        stats_ptr,
        G,
        C,
        classes_per_split,
        row_factor,
        COSINE: gl.constexpr,
        HELD: gl.constexpr,
        STAGES: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        LOADER_REGS: gl.constexpr,
    ):
        """Program (row block, class split): its rows' (max, sum of exp) over the split's
        classes, one pair per consumer, at stats[0 / 1, 2 * split + consumer, row]. COSINE: each
        class's logits times inv_norm[class]."""
        f_bufs, w_bufs, bars = _shared(f_desc, w_desc, HELD, STAGES)
        row0 = gl.program_id(0) * f_desc.block_type.shape[0]
        c_lo = gl.program_id(1) * classes_per_split
        c_hi = gl.minimum(c_lo + classes_per_split, C)
        num_tiles = gl.cdiv(c_hi - c_lo, w_desc.block_type.shape[0])
        args = (
            f_desc, w_desc, f_bufs, w_bufs, bars, label_ptr, inv_norm_ptr, stats_ptr, G, row0, c_lo, c_hi, num_tiles,
            2 * gl.program_id(1), row_factor, _as_type(COSINE),
        )  # fmt: skip
        gl.warp_specialize(
            [(_lse_first, (args,)), (_lse_second, (args,)), (_lse_loading, (args,))],
            [4, 1],
            [CONSUMER_REGS, LOADER_REGS],
        )

    @gluon.jit
    def _probs_consumer(
        which: gl.constexpr, f_bufs, w_bufs, p_bufs, bars, p_desc, lse_ptr, grad_scale_ptr, inv_norm_ptr, G, row0, c_lo,
        width, num_tiles, row_factor, cosine_flag, p_ptr, stride_p, direct_flag, NUM_WARPS: gl.constexpr,
    ):  # fmt: skip
        COSINE: gl.constexpr = _flag(cosine_flag)
        DIRECT: gl.constexpr = _flag(direct_flag)
        block_g: gl.constexpr = f_bufs.type.shape[1]
        block_c: gl.constexpr = w_bufs.type.shape[1]
        layout: gl.constexpr = wgmma_layout(block_c, NUM_WARPS)
        rows = row0 + gl.arange(0, block_g, layout=gl.SliceLayout(1, layout))
        # in log2 units; +inf for rows past the batch and ignored rows: p = 0 there
        lse2 = gl.load(lse_ptr + rows, mask=rows < G, other=float("inf")) * 1.4426950408889634
        grad_scale = gl.load(grad_scale_ptr)
        if DIRECT:
            row_at = p_ptr + rows.to(gl.int64)[:, None] * stride_p
        else:
            tile = p_bufs.index(which)
        mbarrier.wait(bars[2].index(0), 0)  # F's rows are in
        for t in range(which, num_tiles, 2):
            acc = _tile_logits(gl.zeros([block_g, block_c], gl.float32, layout), f_bufs, w_bufs, bars, t)
            if COSINE:  # the logits over the classes' norms, and P too (dF = P W: the unit rows' gradient)
                cols = c_lo + t * block_c + gl.arange(0, block_c, layout=gl.SliceLayout(0, layout))
                inv = gl.load(inv_norm_ptr + cols, mask=cols < width, other=0.0)[None, :]  # the chunk's own
                probs = gl.exp2(acc * row_factor * inv - lse2[:, None]) * (grad_scale * inv)
            else:
                probs = gl.exp2(acc * row_factor - lse2[:, None]) * grad_scale
            if DIRECT:  # from the registers, rows past the batch and classes past the chunk masked off
                cols = c_lo + t * block_c + gl.arange(0, block_c, layout=gl.SliceLayout(0, layout))
                inside = (rows < G)[:, None] & (cols < width)[None, :]
                gl.store(row_at + cols[None, :], probs.to(gl.bfloat16), mask=inside)
            else:
                tma.store_wait(0)  # this consumer's tile before has left the buffer
                tile.store(probs.to(gl.bfloat16))
                fence_async_shared()  # the stores above, before the copy engine reads them
                # the descriptor's bounds are the chunk's: rows past the batch and classes past the
                # chunk are not written
                _tma_store(p_desc, [row0, c_lo + t * block_c], tile)
        if not DIRECT:
            tma.store_wait(0)

    @gluon.jit
    def _probs_first(args):
        base, store = args
        _, _, f_bufs, w_bufs, p_bufs, bars, p_desc, lse, scale, inv, G, row0, c_lo, width, tiles, factor, _, cos = base
        p_ptr, stride_p, direct = store
        _probs_consumer(
            0, f_bufs, w_bufs, p_bufs, bars, p_desc, lse, scale, inv, G, row0, c_lo, width, tiles, factor, cos, p_ptr,
            stride_p, direct, 4,
        )  # fmt: skip

    @gluon.jit
    def _probs_second(args):
        base, store = args
        _, _, f_bufs, w_bufs, p_bufs, bars, p_desc, lse, scale, inv, G, row0, c_lo, width, tiles, factor, _, cos = base
        p_ptr, stride_p, direct = store
        _probs_consumer(
            1, f_bufs, w_bufs, p_bufs, bars, p_desc, lse, scale, inv, G, row0, c_lo, width, tiles, factor, cos, p_ptr,
            stride_p, direct, 4,
        )  # fmt: skip

    @gluon.jit
    def _probs_loading(args):
        f_desc, w_desc, f_bufs, w_bufs, _, bars, _, _, _, _, _, row0, c_lo, _, num_tiles, _, chunk_lo, _ = args[0]
        _loader(f_desc, w_desc, f_bufs, w_bufs, bars, row0, chunk_lo + c_lo, num_tiles)

    @gluon.jit
    def _pingpong_probs_kernel(
        f_desc,
        w_desc,
        p_desc,
        lse_ptr,
        grad_scale_ptr,
        inv_norm_ptr,
        G,
        chunk_lo,
        width,
        classes_per_split,
        row_factor,
        p_ptr,
        stride_p,
        COSINE: gl.constexpr,
        DIRECT: gl.constexpr,
        HELD: gl.constexpr,
        STAGES: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        LOADER_REGS: gl.constexpr,
    ):
        """Program (row block, class split of the chunk): P over its rows and the split's
        classes of the chunk [chunk_lo, chunk_lo + width), at P's columns from 0. COSINE: each
        class's logits, and its column of P, times inv_norm[class]. DIRECT: P stored from the
        consumers' registers through ``p_ptr`` (rows ``stride_p`` apart), not by the copy
        engine through ``p_desc``."""
        f_bufs, w_bufs, bars = _shared(f_desc, w_desc, HELD, STAGES)
        block_g: gl.constexpr = f_desc.block_type.shape[0]
        block_c: gl.constexpr = w_desc.block_type.shape[0]
        if DIRECT:
            p_bufs = _as_type(False)  # no tiles of P: the consumers do not use it
        else:
            p_bufs = gl.allocate_shared_memory(p_desc.dtype, [2, block_g, block_c], p_desc.layout)
        row0 = gl.program_id(0) * block_g
        c_lo = gl.program_id(1) * classes_per_split
        num_tiles = gl.cdiv(gl.minimum(c_lo + classes_per_split, width) - c_lo, block_c)
        args = (
            f_desc, w_desc, f_bufs, w_bufs, p_bufs, bars, p_desc, lse_ptr, grad_scale_ptr, inv_norm_ptr + chunk_lo, G,
            row0, c_lo, width, num_tiles, row_factor, chunk_lo, _as_type(COSINE),
        )  # fmt: skip
        args = (args, (p_ptr, stride_p, _as_type(DIRECT)))
        gl.warp_specialize(
            [(_probs_first, (args,)), (_probs_second, (args,)), (_probs_loading, (args,))],
            [4, 1],
            [CONSUMER_REGS, LOADER_REGS],
        )


def enabled(kind: str, num_rows: int) -> bool:
    """Whether the ping-pong pass (``kind``) is on for a batch of ``num_rows``: as
    ``ENABLED`` says, or for the P kernel by default as ``PROBS_BATCHES`` does."""
    setting = ENABLED[kind]
    if setting is None:
        fewest, most = PROBS_BATCHES
        return fewest <= num_rows <= most
    return setting


def supported(feats: torch.Tensor, weight: torch.Tensor, *, fp8: bool, cosine: bool, offset: bool, kind="lse") -> bool:
    """Whether the pass (``kind``: "lse" or "probs") implements this work on these operands,
    wherever they live."""
    dim = feats.shape[1]
    block_k = _tiles(kind)[2]
    return (
        enabled(kind, feats.shape[0])
        and not (fp8 or offset)
        and feats.dtype == weight.dtype == torch.bfloat16
        and dim % block_k == 0
        and dim <= HELD_DIM
        and shared_bytes(dim, kind=kind) <= SHARED_LIMIT
        and _tma_ready(feats)
        and _tma_ready(weight)
    )


def applies(feats: torch.Tensor, weight: torch.Tensor, *, fp8: bool, cosine: bool, offset: bool, kind="lse") -> bool:
    """Whether the ping-pong pass takes this work (else the Triton pass)."""
    on_hopper = weight.device.type == "cuda" and torch.cuda.get_device_capability(weight.device)[0] == 9
    return GLUON and on_hopper and supported(feats, weight, fp8=fp8, cosine=cosine, offset=offset, kind=kind)


def _grid(num_rows: int, num_classes: int, block_g: int, block_c: int, programs: int) -> tuple[int, int, int]:
    """(row blocks, class splits, classes per split): about 4 waves of one program an SM, each
    split a whole number of tile pairs (one tile each consumer)."""
    row_blocks = triton.cdiv(num_rows, block_g)
    pairs = triton.cdiv(num_classes, 2 * block_c)
    splits = max(1, min(pairs, 4 * programs // row_blocks))
    per_split = triton.cdiv(pairs, splits) * 2 * block_c
    return row_blocks, triton.cdiv(num_classes, per_split), per_split


def _programs(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_inv_norm(inv_norm, weight: torch.Tensor) -> None:
    if inv_norm is not None and (
        inv_norm.shape != (weight.shape[0],) or inv_norm.dtype != torch.float32 or not inv_norm.is_contiguous()
    ):
        raise ValueError(
            f"inv_norm must be a contiguous float32 tensor of one value per class ({weight.shape[0]}), "
            f"got {inv_norm.dtype} {tuple(inv_norm.shape)}"
        )


def _constants(dim: int, tiles) -> dict:
    return dict(HELD=triton.cdiv(dim, tiles[2]), STAGES=tiles[3], CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS)


def split_stats(
    feats: torch.Tensor, weight: torch.Tensor, local_label: torch.Tensor, scale: float, inv_norm=None
) -> torch.Tensor:
    """(2, splits, G) float32: per split of the classes, each row's max logit (targets left
    out) and sum of exp(logit - max), as ``filtered._lse_kernel`` writes them. ``inv_norm``
    (cosine logits: float32, one per class): each class's logits times it."""
    num_rows, dim = feats.shape
    if weight.shape[1] != dim or local_label.shape != (num_rows,):
        raise ValueError(
            f"split_stats takes F (G x D), W (C x D) and G labels; got F {tuple(feats.shape)}, "
            f"W {tuple(weight.shape)}, labels {tuple(local_label.shape)}"
        )
    _check_inv_norm(inv_norm, weight)
    tiles = _tiles("lse")
    block_g, block_c, block_k, _ = tiles
    row_blocks, splits, per_split = _grid(num_rows, weight.shape[0], block_g, block_c, _programs(weight.device))
    stats = torch.empty((2, 2 * splits, num_rows), dtype=torch.float32, device=weight.device)
    _pingpong_lse_kernel[(row_blocks, splits)](
        _descriptor(feats, [block_g, block_k]),
        _descriptor(weight, [block_c, block_k]),
        local_label,
        inv_norm if inv_norm is not None else stats,
        stats,
        num_rows,
        weight.shape[0],
        per_split,
        float(scale) * 1.4426950408889634,
        COSINE=inv_norm is not None,
        **_constants(dim, tiles),
        num_warps=4,
    )
    return stats


def write_probs(
    probs: torch.Tensor, feats: torch.Tensor, weight: torch.Tensor, lse: torch.Tensor, grad_scale, scale: float,
    chunk_lo: int, inv_norm=None,
) -> None:  # fmt: skip
    """P[:, j] = exp(scale · f · w_{chunk_lo + j} - lse) · grad_scale for the chunk's classes
    j < P's width, every entry (the targets' too, as the Triton kernel writes them); rows whose
    lse is +inf get 0. ``grad_scale``: a one-element float32 tensor on the device. ``inv_norm``
    (cosine logits: float32, one per class of W): each logit times its class's, and P's
    column j too. The copy engine stores whole 16-byte pieces of a row: where the width is not
    a multiple of 8, the columns up to the next multiple are written too (the next classes'
    p), so P's rows must reach that far, as the head's do (``PROBS_STORE`` "direct" writes
    exactly the width, and is held to the same contract)."""
    num_rows, dim = feats.shape
    width = probs.shape[1]
    if probs.shape[0] != num_rows or weight.shape[1] != dim or chunk_lo + width > weight.shape[0]:
        raise ValueError(
            f"write_probs takes P (G x width), F (G x D), W (C x D) with the chunk inside W; got P "
            f"{tuple(probs.shape)}, F {tuple(feats.shape)}, W {tuple(weight.shape)}, chunk from {chunk_lo}"
        )
    if not _tma_ready(probs) or probs.dtype != torch.bfloat16:
        raise ValueError("write_probs writes bf16 P through a descriptor: unit column stride, 16-byte rows")
    reach = probs.storage_offset() + (num_rows - 1) * probs.stride(0) + triton.cdiv(width, 8) * 8
    if num_rows and reach * 2 > probs.untyped_storage().nbytes():
        raise ValueError("write_probs stores whole 16-byte pieces: P's last row must reach its width rounded up to 8")
    _check_inv_norm(inv_norm, weight)
    tiles = _tiles("probs")
    block_g, block_c, block_k, _ = tiles
    row_blocks, splits, per_split = _grid(num_rows, width, block_g, block_c, _programs(weight.device))
    _pingpong_probs_kernel[(row_blocks, splits)](
        _descriptor(feats, [block_g, block_k]),
        _descriptor(weight, [block_c, block_k]),
        _descriptor(probs, [block_g, block_c]),
        lse,
        grad_scale,
        inv_norm if inv_norm is not None else lse,
        num_rows,
        chunk_lo,
        width,
        per_split,
        float(scale) * 1.4426950408889634,
        probs,
        probs.stride(0),
        COSINE=inv_norm is not None,
        DIRECT=_direct(),
        **_constants(dim, tiles),
        num_warps=4,
    )


def compile_for(arch: int = 90, dim: int = 512, kind: str = "lse", cosine: bool = False):
    """A pass compiled for ``arch`` with no GPU present (its cubin, registers and shared
    memory can be read from the result)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    tiles = _tiles(kind)
    block_g, block_c, block_k, _ = tiles
    feats = torch.empty(256, dim, dtype=torch.bfloat16)
    weight = torch.empty(1024, dim, dtype=torch.bfloat16)
    signature = dict(
        f_desc=mangle_type(_descriptor(feats, [block_g, block_k])),
        w_desc=mangle_type(_descriptor(weight, [block_c, block_k])),
    )
    if kind == "lse":
        fn = _pingpong_lse_kernel
        signature.update(label_ptr="*i64", inv_norm_ptr="*fp32", stats_ptr="*fp32", G="i32", C="i32")
    else:
        fn = _pingpong_probs_kernel
        probs = torch.empty(256, 1024, dtype=torch.bfloat16)
        signature.update(p_desc=mangle_type(_descriptor(probs, [block_g, block_c])))
        signature.update(lse_ptr="*fp32", grad_scale_ptr="*fp32", inv_norm_ptr="*fp32")
        signature.update(G="i32", chunk_lo="i32", width="i32")
    signature.update(classes_per_split="i32", row_factor="fp32")
    constants = dict(COSINE=cosine, **_constants(dim, tiles))
    aligned = {}
    if kind == "probs":
        signature.update(p_ptr="*bf16", stride_p="i32")
        constants.update(DIRECT=_direct())
        # as a launch on the head's P specialises: its pointer 16-byte aligned; its row stride, width
        # and split multiples of 16 (P stored in 4-byte pairs from the registers, not one entry at a time)
        for name in ("p_ptr", "stride_p", "width", "classes_per_split"):
            aligned[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in constants})
    return triton.compile(
        GluonASTSource(fn=fn, signature=signature, constexprs=constants, attrs=aligned),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=4),
    )


__all__ = ["applies", "compile_for", "split_stats", "supported", "write_probs"]

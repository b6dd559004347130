"""dW_c = P^T F with torch.optim.SGD's step in its epilogue, warp-specialised (Gluon, Hopper).

The gemm path's update pass moves 14 bytes a weight at the copy rate after the dW product
has finished, and the Triton versions of this fusion lost because each program ran its
product and then its update with nothing beside it (docs/kernels.md). Here the work is
split over warps that run at once:

ring loader      one warp: TMA copies of P's and F's K slices into a ring of STAGES buffers
epilogue loader  one warp: TMA copies of each tile's rows and momentum buffer into the
                 next of SLOTS epilogue slots, as far ahead as the slots allow
consumers        two warpgroups that take alternate tiles of dW (BLOCK_C classes x BLOCK_D
                 dims): a wgmma chain over the batch, then the update of the same tile
                 (buffer = momentum·buffer + dW + weight_decay·w; w -= lr·buffer; w
                 rounded to bf16, nearest), written back by TMA from its slot
dF partitions    at batches of one K block (up to 256 rows), one or two more warpgroups:
                 dF^T += W_c^T P^T from the slot's rows (before the consumer writes the
                 step into the slot) and the ring's tile, each over its share of the batch,
                 so the gemm path runs no product for dF (``takes_features_grad``)

While one consumer waits on its tile's update traffic, the other runs its products, so the
update's bytes move under the products' arithmetic; at small batches, where those bytes are
the time, the epilogue loader keeps the next tiles' loads in flight beside the write-backs.
No dW_c reaches memory: 12 bytes a weight instead of the product's 2 and the update pass's 14.

What it takes: bf16 rows, a float32 momentum buffer, round-to-nearest, no Kahan buffer, no
cosine projection, momentum and weight decay as numbers (the lr may be a device tensor, which
the kernel reads, as a captured step needs), rows and P whose row strides are multiples
of 16 bytes, a batch of 64 to 4,096 rows (``TILES_BY_BATCH``), on an sm_90 GPU
(``fused_update_applies``); the gemm path keeps its product and update pass otherwise. It
is on by default; HYDRAHEAD_FUSED_DW_UPDATE=0 (``exact_gemm.FUSED_DW_UPDATE``) turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from hydrahead.kernels.shard_ce import _device_scalar

try:  # Gluon ships with Triton 3.4 and later; its TMA copies were renamed in 3.7
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    GLUON = True
except (ImportError, AttributeError):  # pragma: no cover - a Triton without these: the product and update pass
    GLUON = False

BLOCK_C, BLOCK_D, BLOCK_K, STAGES, SLOTS = 64, 64, 64, 6, 4  # 176 KiB of shared memory at 256 rows
HOLD_ROWS = 384  # batches up to this many rows hold F's column in shared memory (0: F rides the ring)
TILES = (BLOCK_C, BLOCK_D, BLOCK_K, STAGES, SLOTS, HOLD_ROWS)
# Tiles by batch size, measured on an H100 from 256 to 4,096 rows x 512 x 262k and 1M
# (docs/kernels.md): up to 256 rows the batch is one K block (three stages of P's whole tile),
# so the kernel also takes dF's product (``takes_features_grad``: 4% less kernel time at 256 x
# 1M on an H200); then 64 x 64 tiles with F held; from 384 rows the wide variant (128 x 128,
# shared by both consumers: a third fewer L2 bytes a weight than the 64 x 128 tiles), which
# beats the other tiles and the product and pass at every batch measured from 384 to 4,096
# rows since its epilogue moves whole-row vectors (2.70 against 3.10 ms at 512 x 1M, 8.19
# against the product and pass's 8.83 at 4,096).
FEATURES_TILES = (64, 64, 256, 3, 4, 384)
WIDE_TILES = (128, 128, 64, 5, 0, 0)  # five stages: the accumulators' regrouping takes 64 KiB
TILES_BY_BATCH = (
    (256, FEATURES_TILES),
    (383, TILES),
    (4096, WIDE_TILES),
)
FEWEST_ROWS = 64  # the smallest batch run on a GPU so far: below it, the product and pass


def _tiles(num_rows: int | None = None) -> tuple[int, int, int, int, int, int] | None:
    """BLOCK_C, BLOCK_D, BLOCK_K, STAGES, SLOTS, HOLD_ROWS for a batch of ``num_rows`` (None:
    the fused kernel is slower there); HYDRAHEAD_DW_UPDATE_TILES=c,d,k,stages,slots[,hold_rows]
    overrides them."""
    given = os.environ.get("HYDRAHEAD_DW_UPDATE_TILES")
    if not given:
        if num_rows is None:
            return TILES
        if num_rows < FEWEST_ROWS:
            return None
        return next((tiles for most, tiles in TILES_BY_BATCH if num_rows <= most), None)
    try:
        tiles = tuple(int(v) for v in given.split(","))
    except ValueError:
        tiles = ()
    wide = len(tiles) in (5, 6) and tiles[4] == 0  # the wide variant: a 128-class tile, D up to 128, no F held
    if (
        len(tiles) not in (5, 6)
        or tiles[3] < 2  # one stage: each slot waits on itself
        or tiles[4] < 0
        or tiles[4] % 2
        or (wide and (tiles[0] != 128 or tiles[1] > 128 or tiles[5:] not in ((), (0,))))
    ):
        raise ValueError(
            "HYDRAHEAD_DW_UPDATE_TILES takes BLOCK_C,BLOCK_D,BLOCK_K,STAGES,SLOTS[,HOLD_ROWS] (STAGES 2 or more, "
            f"SLOTS even; SLOTS 0: the wide variant, BLOCK_C 128, BLOCK_D up to 128, no F held), got {given!r}"
        )
    return tiles + (0,) * (6 - len(tiles))


def _held_slices(num_rows: int, tiles) -> int:
    """F's K slices held for the whole kernel (0: F's slices ride the ring with P's)."""
    return triton.cdiv(num_rows, tiles[2]) if num_rows <= tiles[5] else 0


SHARED_LIMIT = 227 * 1024  # a Hopper program's shared memory


def shared_bytes(tiles, held: int, features_parts: int = 0) -> int:
    """The kernel's shared memory at these tiles: the ring's P (and F) slices, F's held
    slices, the epilogue slots' rows and buffer, and the barriers (``features_parts``: the dF
    partitions', one a slot)."""
    block_c, block_d, block_k, stages, slots = tiles[:5]
    f_slices = held or stages
    barriers = 8 * (2 * stages + 2 * slots + 1 + held + 1 + slots * features_parts + 1)
    compiler = 1024  # alignment and scratch: the compiled kernels took 224-256 bytes beyond the rest
    regroup = 0
    if slots == 0:  # the wide variant: the ring's barriers, and each consumer's float32 accumulator
        barriers = 8 * 2 * stages  # turned into the epilogue's layout through shared memory
        regroup = 4 * block_c * block_d
    return (
        2 * block_k * (stages * block_c + f_slices * block_d)
        + 6 * slots * block_c * block_d
        + regroup
        + barriers
        + compiler
    )


def _grid(num_tiles: int, tiles_d: int, programs: int, held: int) -> int:
    grid = max(1, min(programs, num_tiles))
    if held:  # a multiple of the D columns, so that a program's tiles share one column of F
        grid = max(tiles_d, grid // tiles_d * tiles_d)
    return grid


_CONSUMER_REGS, _LOADER_REGS = 232, 40
# A launch's registers are one pool of 64K: its count a thread (rounded down to 8) times its
# 12 + 4 x dF-partitions warps. Each worker warpgroup then sets its own count, and the first
# consumer (the default partition) gets what the workers leave. So the second consumer's count
# is the first's too, near enough: given 96 beside dF's two partitions, it ran its update at
# 96 while the first had 168. A dF share's 64 x 128 float32 accumulator takes 64 registers.
# (second consumer, loaders, each dF partition) by dF partitions:
_FEATURES_GRAD_REGS = {1: (184, 24, 120), 2: (128, 24, 96)}
FEATURES_GRAD = os.environ.get("HYDRAHEAD_FUSED_DW_FEATURES", "1") != "0"


def partition_registers(parts: int) -> dict:
    """Registers a thread of each partition with ``parts`` dF partitions: the workers' counts
    as set, and the first consumer's, which is what the launch's pool leaves it."""
    second, loaders, features = _FEATURES_GRAD_REGS.get(parts, (_CONSUMER_REGS, _LOADER_REGS, 0))
    warpgroups = 3 + parts
    launch = 65536 // (128 * warpgroups) // 8 * 8
    first = launch * warpgroups - second - loaders - parts * features
    return dict(first_consumer=first, second_consumer=second, loaders=loaders, features=features)


def features_parts(num_rows: int, tiles=None) -> int:
    """dF partitions at this batch (0: the kernel leaves dF to the product). Each holds a
    64 x (block / parts) float32 share, at most 64 x 128: the launch's pool of registers
    leaves each partition 120 a thread with one, 96 with two (``partition_registers``)."""
    tiles = tiles or _tiles(num_rows)
    if not takes_features_grad(num_rows, tiles):
        return 0
    return 1 if tiles[2] <= 128 else 2


def takes_features_grad(num_rows: int, tiles=None) -> bool:
    """Whether the kernel also computes the chunk's dF = P W_c at this batch: F held in one K
    slice (the batch is one block of at most 256 rows, dF's widest product) and epilogue
    slots that hold the rows it reads. HYDRAHEAD_FUSED_DW_FEATURES=0 turns it off."""
    tiles = tiles or _tiles(num_rows)
    return (
        FEATURES_GRAD and tiles is not None and tiles[4] > 0 and tiles[2] <= 256 and _held_slices(num_rows, tiles) == 1
    )


if GLUON:

    @gluon.constexpr_function
    def wgmma_layout(width, num_warps=4):
        """The registers of a wgmma accumulator ``width`` columns wide, its rows over ``num_warps``
        warps (one warpgroup: 16 rows a warp per instruction)."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, width, 16])

    @gluon.jit
    def _operand_slice(bufs, s, k, IN_RING: gl.constexpr, TRANSPOSED: gl.constexpr):
        if IN_RING:
            view = bufs.index(s)
        else:
            view = bufs.index(k)
        if TRANSPOSED:
            view = view.permute((1, 0))
        return view

    @gluon.jit
    def tile_products(
        acc, a_bufs, b_bufs, ring, j, k_steps, A_IN_RING: gl.constexpr, A_TRANSPOSED: gl.constexpr,
        B_IN_RING: gl.constexpr, B_TRANSPOSED: gl.constexpr, ALTERNATE: gl.constexpr = True,
    ):  # fmt: skip
        """acc + the wgmma chain of tile ``j`` of the tiles the loader fills the ring with
        (``k_steps`` K slices each): each operand's slices from the ring's stage (the loader's
        count of slices) or held (the K step), as a transposed view where asked. The ring's
        stages are given back as their products complete; ``ring`` = (ready, empty, turn).
        ALTERNATE: consumers take alternate tiles, ordered by ``turn`` (else each takes every
        tile and ``turn`` is not used)."""
        ring_ready, ring_empty, turn = ring
        stages: gl.constexpr = ring_ready.type.shape[0]
        step = j * k_steps  # the loader's count of K slices before this tile
        previous = 0
        if ALTERNATE:
            # Not before tile j - 1's slices have all landed: a ring slot's parity names its
            # fill only to within two, and the other consumer may still be that far behind.
            mbarrier.wait(turn.index(0), (j & 1) ^ 1)
        for k in range(k_steps):
            s = step % stages
            mbarrier.wait(ring_ready.index(s), (step // stages) & 1)
            if ALTERNATE:
                mbarrier.arrive(turn.index(0), count=1, pred=k == k_steps - 1)
            a = _operand_slice(a_bufs, s, k, A_IN_RING, A_TRANSPOSED)
            b = _operand_slice(b_bufs, s, k, B_IN_RING, B_TRANSPOSED)
            token = warpgroup_mma(a, b, acc, is_async=True)
            # one product in flight; the slot of the one before it is free again
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(token,))
            mbarrier.arrive(ring_empty.index(previous), count=1, pred=k > 0)
            previous = s
            step += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(ring_empty.index(previous), count=1)
        return acc

    @gluon.jit
    def _ring_loader(p_desc, f_desc, rings, bars, num_tiles, tiles_d, k_steps):
        p_bufs, f_bufs = rings
        ring_ready, ring_empty, _, _, _, f_ready, _ = bars
        held: gl.constexpr = f_ready.type.shape[0] - 1  # HELD, carried by a type
        stages: gl.constexpr = p_bufs.type.shape[0]
        block_k: gl.constexpr = p_desc.block_type.shape[0]
        block_c: gl.constexpr = p_desc.block_type.shape[1]
        block_d: gl.constexpr = f_desc.block_type.shape[1]
        if held:  # the program's one D column of F, all its K slices, once
            mbarrier.expect(f_ready.index(0), held * f_desc.block_type.nbytes)
            d_held = (gl.program_id(0) % tiles_d) * block_d
            for h in gl.static_range(held):
                _tma_load(f_desc, [h * block_k, d_held], f_ready.index(0), f_bufs.index(h))
        step = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            c0 = (tile // tiles_d) * block_c
            d0 = (tile % tiles_d) * block_d
            for k in range(k_steps):
                s = step % stages
                mbarrier.wait(ring_empty.index(s), ((step // stages) & 1) ^ 1)  # a fresh barrier passes phase 1
                if held:
                    mbarrier.expect(ring_ready.index(s), p_desc.block_type.nbytes)
                else:
                    mbarrier.expect(ring_ready.index(s), p_desc.block_type.nbytes + f_desc.block_type.nbytes)
                    _tma_load(f_desc, [k * block_k, d0], ring_ready.index(s), f_bufs.index(s))
                _tma_load(p_desc, [k * block_k, c0], ring_ready.index(s), p_bufs.index(s))
                step += 1

    @gluon.jit
    def _epilogue_loader(w_desc, b_desc, epilogue, bars, num_tiles, tiles_d):
        # a warp of its own, so the rows and buffer of the next tiles stream in while the
        # ring waits on the products: at small batches this traffic is the kernel's time
        w_bufs, b_bufs = epilogue
        _, _, epi_ready, epi_empty, _, _, _ = bars
        slots: gl.constexpr = w_bufs.type.shape[0]
        block_c: gl.constexpr = w_desc.block_type.shape[0]
        block_d: gl.constexpr = w_desc.block_type.shape[1]
        j = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            slot = j % slots
            mbarrier.wait(epi_empty.index(slot), ((j // slots) & 1) ^ 1)
            mbarrier.expect(epi_ready.index(slot), w_desc.block_type.nbytes + b_desc.block_type.nbytes)
            _tma_load(
                w_desc,
                [(tile // tiles_d) * block_c, (tile % tiles_d) * block_d],
                epi_ready.index(slot),
                w_bufs.index(slot),
            )
            _tma_load(
                b_desc,
                [(tile // tiles_d) * block_c, (tile % tiles_d) * block_d],
                epi_ready.index(slot),
                b_bufs.index(slot),
            )
            j += 1

    @gluon.jit
    def _consumer(
        which: gl.constexpr,
        w_desc,
        b_desc,
        rings,
        epilogue,
        bars,
        num_tiles,
        tiles_d,
        k_steps,
        lr,
        hold,
        momentum,
        weight_decay,
        NUM_WARPS: gl.constexpr,
    ):
        p_bufs, f_bufs = rings
        w_bufs, b_bufs = epilogue
        ring_ready, ring_empty, epi_ready, epi_empty, turn, f_ready, w_read = bars
        held: gl.constexpr = f_ready.type.shape[0] - 1
        features_grad: gl.constexpr = w_read.type.shape[0] > 1  # a dF partition reads the slots' rows
        slots: gl.constexpr = w_bufs.type.shape[0]
        block_c: gl.constexpr = w_desc.block_type.shape[0]
        block_d: gl.constexpr = w_desc.block_type.shape[1]
        acc_layout: gl.constexpr = wgmma_layout(block_d, NUM_WARPS)
        if held:
            mbarrier.wait(f_ready.index(0), 0)
        j = 0
        written = 0  # the slot of this consumer's tile before, once its copies are under way
        pending = False
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            if j % 2 == which:
                c0 = (tile // tiles_d) * block_c
                d0 = (tile % tiles_d) * block_d
                acc = gl.zeros([block_c, block_d], gl.float32, acc_layout)
                # P^T's slices (BLOCK_C x BLOCK_K) as transposed views of P's, from the ring; F's
                # held or from the ring beside them
                ring = (ring_ready, ring_empty, turn)
                acc = tile_products(acc, p_bufs, f_bufs, ring, j, k_steps, True, True, held == 0, False)

                slot = j % slots
                mbarrier.wait(epi_ready.index(slot), (j // slots) & 1)
                w = w_bufs.index(slot).load(acc_layout).to(gl.float32)
                buf = momentum * b_bufs.index(slot).load(acc_layout) + (acc + weight_decay * w)
                if features_grad:  # the dF partition's product has read the rows before the step
                    mbarrier.wait(w_read.index(slot), (j // slots) & 1)
                b_bufs.index(slot).store(buf)
                w_bufs.index(slot).store((w - lr * buf).to(gl.bfloat16))
                fence_async_shared()  # the stores above, before the copy engine reads them
                if hold == 0:  # the loss's verdict: a held-back step writes nothing back
                    _tma_store(b_desc, [c0, d0], b_bufs.index(slot))
                    _tma_store(w_desc, [c0, d0], w_bufs.index(slot))
                if slots == 2:  # a slot each: given back once its copies have left it
                    tma.store_wait(0)
                    mbarrier.arrive(epi_empty.index(slot), count=1)
                else:
                    # two slots each (an even count keeps a slot with one consumer, so that a
                    # barrier's parity names its fill): this consumer's tile before is given
                    # back now that its copies have left, and none waits on its own write-back
                    tma.store_wait(2)
                    mbarrier.arrive(epi_empty.index(written), count=1, pred=pending)
                    written = slot
                    pending = True
            j += 1
        tma.store_wait(0)

    @gluon.jit
    def _first_consumer(
        w_desc, b_desc, rings, epilogue, bars, num_tiles, tiles_d, k_steps, lr, hold, momentum, weight_decay
    ):
        _consumer(
            0, w_desc, b_desc, rings, epilogue, bars, num_tiles, tiles_d, k_steps, lr, hold, momentum, weight_decay, 4
        )

    @gluon.jit
    def _second_consumer(args):  # each worker partition takes the same tuple (worker_args in the kernel)
        _, _, w_desc, b_desc, rings, epilogue, bars, num_tiles, tiles_d, k_steps, lr, hold, momentum, decay, _ = args
        _consumer(1, w_desc, b_desc, rings, epilogue, bars, num_tiles, tiles_d, k_steps, lr, hold, momentum, decay, 4)

    @gluon.jit
    def _ring_partition(args):
        p_desc, f_desc, _, _, rings, _, bars, num_tiles, tiles_d, k_steps, _, _, _, _, _ = args
        _ring_loader(p_desc, f_desc, rings, bars, num_tiles, tiles_d, k_steps)

    @gluon.jit
    def _epilogue_partition(args):
        _, _, w_desc, b_desc, _, epilogue, bars, num_tiles, tiles_d, _, _, _, _, _, _ = args
        _epilogue_loader(w_desc, b_desc, epilogue, bars, num_tiles, tiles_d)

    @gluon.jit
    def _features_grad(which: gl.constexpr, rings, epilogue, bars, num_tiles, df_ptr):
        # dF^T (BLOCK_D x the batch) += W_c^T P^T over the program's tiles, all of one D column:
        # the rows are in the slot for the update and P's tile in the ring for dW, so dF costs
        # no byte of memory traffic; one K step a tile (the batch is one block), so the ring's
        # stage is the tile's. Each of ``parts`` partitions takes its share of the batch (a
        # thread's registers cap a share's float32 accumulator at 64 x 128). Written once at
        # the end, a partial sum of its program.
        p_bufs, _ = rings
        w_bufs, _ = epilogue
        ring_ready, ring_empty, epi_ready, _, _, _, w_read = bars
        stages: gl.constexpr = p_bufs.type.shape[0]
        block_k: gl.constexpr = p_bufs.type.shape[1]
        slots: gl.constexpr = w_bufs.type.shape[0]
        parts: gl.constexpr = (w_read.type.shape[0] - 1) // slots  # FEATURES_GRAD, carried by a type
        share: gl.constexpr = block_k // parts
        block_d: gl.constexpr = w_bufs.type.shape[2]
        layout: gl.constexpr = wgmma_layout(share)
        acc = gl.zeros([block_d, share], gl.float32, layout)
        j = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            s = j % stages
            slot = j % slots
            # this partition's arrivals free the stage and the slot's rows, so neither is
            # refilled before it has read them: each barrier's parity names this tile's fill
            mbarrier.wait(ring_ready.index(s), (j // stages) & 1)
            mbarrier.wait(epi_ready.index(slot), (j // slots) & 1)
            probs = p_bufs.index(s).slice(which * share, share, dim=0)
            acc = warpgroup_mma(w_bufs.index(slot).permute((1, 0)), probs.permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(ring_empty.index(s), count=1)
            mbarrier.arrive(w_read.index(slot), count=1)
            j += 1
        dims = gl.arange(0, block_d, layout=gl.SliceLayout(1, layout))
        batch = which * share + gl.arange(0, share, layout=gl.SliceLayout(0, layout))
        at = df_ptr + gl.program_id(0) * (block_d * block_k) + dims[:, None] * block_k + batch[None, :]
        gl.store(at, acc)

    @gluon.jit
    def _features_grad_first(args):
        _, _, _, _, rings, epilogue, bars, num_tiles, _, _, _, _, _, _, df_ptr = args
        _features_grad(0, rings, epilogue, bars, num_tiles, df_ptr)

    @gluon.jit
    def _features_grad_second(args):
        _, _, _, _, rings, epilogue, bars, num_tiles, _, _, _, _, _, _, df_ptr = args
        _features_grad(1, rings, epilogue, bars, num_tiles, df_ptr)

    @gluon.jit
    def _dw_update_kernel(
        p_desc,
        f_desc,
        w_desc,
        b_desc,
        G,
        C,
        D,
        lr_ptr,
        skip_ptr,
        momentum,
        weight_decay,
        df_ptr,
        STAGES: gl.constexpr,
        SLOTS: gl.constexpr,
        HELD: gl.constexpr,
        FEATURES_GRAD: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        LOADER_REGS: gl.constexpr,
        FEATURES_GRAD_REGS: gl.constexpr,
    ):
        block_k: gl.constexpr = p_desc.block_type.shape[0]
        block_c: gl.constexpr = p_desc.block_type.shape[1]
        block_d: gl.constexpr = f_desc.block_type.shape[1]
        lr = gl.load(lr_ptr)  # on the device: a captured step reads the lr of each replay
        hold = gl.load(skip_ptr)  # the loss's verdict, also on the device: nonzero, no row is written
        p_bufs = gl.allocate_shared_memory(p_desc.dtype, [STAGES, block_k, block_c], p_desc.layout)
        # F's slices ride the ring beside P's, or (HELD > 0: a batch of HELD slices, a grid
        # that keeps each program on one D column) are loaded once and held
        f_count: gl.constexpr = HELD if HELD > 0 else STAGES
        f_bufs = gl.allocate_shared_memory(f_desc.dtype, [f_count, block_k, block_d], f_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [SLOTS, block_c, block_d], w_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [SLOTS, block_c, block_d], b_desc.layout)
        ring_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ring_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        epi_ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
        epi_empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())  # tile j's slices in
        mbarrier.init(turn.index(0), count=1)
        # F held: its barrier is the first of HELD + 1, so that the count reaches the partitions
        # as a type (a constant passed through warp_specialize arrives as a value)
        f_ready = gl.allocate_shared_memory(gl.int64, [HELD + 1, 1], mbarrier.MBarrierLayout())
        mbarrier.init(f_ready.index(0), count=1)
        # FEATURES_GRAD (1 or 2): that many more partitions compute dF from the same tiles, each
        # for its share of the batch; the first SLOTS barriers here say that they have read a
        # slot's rows (the count, as a type, tells the partitions how many share the batch)
        w_read = gl.allocate_shared_memory(gl.int64, [SLOTS * FEATURES_GRAD + 1, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(SLOTS * FEATURES_GRAD + 1):
            mbarrier.init(w_read.index(i), count=max(FEATURES_GRAD, 1))
        for i in gl.static_range(STAGES):
            mbarrier.init(ring_ready.index(i), count=1)
            mbarrier.init(ring_empty.index(i), count=1 + FEATURES_GRAD)  # the dF partitions give it back too
        for i in gl.static_range(SLOTS):
            mbarrier.init(epi_ready.index(i), count=1)
            mbarrier.init(epi_empty.index(i), count=1)
        tiles_d = gl.cdiv(D, block_d)
        num_tiles = gl.cdiv(C, block_c) * tiles_d
        k_steps = gl.cdiv(G, block_k)
        rings = (p_bufs, f_bufs)
        epilogue = (w_bufs, b_bufs)
        bars = (ring_ready, ring_empty, epi_ready, epi_empty, turn, f_ready, w_read)
        worker_args = (
            p_desc,
            f_desc,
            w_desc,
            b_desc,
            rings,
            epilogue,
            bars,
            num_tiles,
            tiles_d,
            k_steps,
            lr,
            hold,
            momentum,
            weight_decay,
            df_ptr,
        )
        consumer_args = (w_desc, b_desc, rings, epilogue, bars, num_tiles, tiles_d, k_steps, lr, hold, momentum)
        consumer_args += (weight_decay,)
        if FEATURES_GRAD == 2:
            gl.warp_specialize(
                [
                    (_first_consumer, consumer_args),
                    (_second_consumer, (worker_args,)),
                    (_ring_partition, (worker_args,)),
                    (_epilogue_partition, (worker_args,)),
                    (_features_grad_first, (worker_args,)),
                    (_features_grad_second, (worker_args,)),
                ],
                [4, 1, 1, 4, 4],
                [CONSUMER_REGS, LOADER_REGS, LOADER_REGS, FEATURES_GRAD_REGS, FEATURES_GRAD_REGS],
            )
        elif FEATURES_GRAD == 1:
            gl.warp_specialize(
                [
                    (_first_consumer, consumer_args),
                    (_second_consumer, (worker_args,)),
                    (_ring_partition, (worker_args,)),
                    (_epilogue_partition, (worker_args,)),
                    (_features_grad_first, (worker_args,)),
                ],
                [4, 1, 1, 4],
                [CONSUMER_REGS, LOADER_REGS, LOADER_REGS, FEATURES_GRAD_REGS],
            )
        else:
            gl.warp_specialize(
                [
                    (_first_consumer, consumer_args),
                    (_second_consumer, (worker_args,)),
                    (_ring_partition, (worker_args,)),
                    (_epilogue_partition, (worker_args,)),
                ],
                [4, 1, 1],
                [CONSUMER_REGS, LOADER_REGS, LOADER_REGS],
            )

    # The wide variant for larger batches: both consumers share one tile of BLOCK_C = 128
    # classes (64 each) x BLOCK_D, so F's slice serves 128 classes and P's 128 dims, half the
    # slice bytes a weight of 64 x 128 tiles. Its rows and buffer (192 KiB at 128 x 128) do
    # not fit beside the ring, so each consumer loads its half into registers when its tile
    # starts (the products hide the loads) and stores it from there: no epilogue slots. They
    # move as whole-row vectors, the accumulator regrouped to match through shared memory:
    # in the accumulator's own layout each load and store reaches eight rows with 8 bytes (the
    # buffer) or 4 (the rows) a thread, and the kernel was bound by L2 (docs/kernels.md).

    @gluon.jit
    def _wide_loader(p_desc, f_desc, rings, bars, num_tiles, tiles_d, k_steps):
        p_lo, p_hi, f_bufs = rings
        ring_ready, ring_empty = bars
        stages: gl.constexpr = f_bufs.type.shape[0]
        block_k: gl.constexpr = p_desc.block_type.shape[0]
        half: gl.constexpr = p_desc.block_type.shape[1]
        block_d: gl.constexpr = f_desc.block_type.shape[1]
        step = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            c0 = (tile // tiles_d) * (2 * half)
            d0 = (tile % tiles_d) * block_d
            for k in range(k_steps):
                s = step % stages
                # both consumers give a slot back (count 2); a fresh barrier passes phase 1
                mbarrier.wait(ring_empty.index(s), ((step // stages) & 1) ^ 1)
                mbarrier.expect(ring_ready.index(s), 2 * p_desc.block_type.nbytes + f_desc.block_type.nbytes)
                _tma_load(p_desc, [k * block_k, c0], ring_ready.index(s), p_lo.index(s))
                _tma_load(p_desc, [k * block_k, c0 + half], ring_ready.index(s), p_hi.index(s))
                _tma_load(f_desc, [k * block_k, d0], ring_ready.index(s), f_bufs.index(s))
                step += 1

    @gluon.jit
    def _wide_consumer(
        which: gl.constexpr,
        p_bufs,
        f_bufs,
        bars,
        rows_ptr,
        buf_ptr,
        C,
        D,
        stride_rows,
        stride_buf,
        num_tiles,
        tiles_d,
        k_steps,
        lr,
        hold,
        momentum,
        weight_decay,
        NUM_WARPS: gl.constexpr,
    ):
        ring_ready, ring_empty = bars
        half: gl.constexpr = p_bufs.type.shape[2]
        block_d: gl.constexpr = f_bufs.type.shape[2]
        acc_layout: gl.constexpr = wgmma_layout(block_d, NUM_WARPS)
        # the rows and buffer in whole-row vectors: 16 bytes of the buffer a thread, a warp a
        # row of the tile (the accumulator's own layout gives 8 and 4 bytes, eight rows a warp)
        epi_layout: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [NUM_WARPS, 1], [1, 0])
        offs_c = gl.arange(0, half, layout=gl.SliceLayout(1, epi_layout))
        offs_d = gl.arange(0, block_d, layout=gl.SliceLayout(0, epi_layout))
        j = 0  # this consumer's count of tiles (each is every tile)
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            classes = (tile // tiles_d) * (2 * half) + which * half + offs_c
            dims = (tile % tiles_d) * block_d + offs_d
            inside = (classes < C)[:, None] & (dims < D)[None, :]
            written = inside & (hold == 0)  # the loss's verdict: a held-back step stores nothing
            at = classes.to(gl.int64)[:, None]
            row_ptrs = rows_ptr + at * stride_rows + dims[None, :]
            buf_ptrs = buf_ptr + at * stride_buf + dims[None, :]
            # the buffer (two thirds of the bytes) issued now and used after the products, which
            # hide its latency; the rows after them, where 32 registers more would spill
            buf = gl.load(buf_ptrs, mask=inside, other=0.0)
            acc = gl.zeros([half, block_d], gl.float32, acc_layout)
            ring = (ring_ready, ring_empty, ring_ready)  # both consumers take every tile: no turns
            acc = tile_products(acc, p_bufs, f_bufs, ring, j, k_steps, True, True, True, False, False)
            j += 1
            acc = gl.convert_layout(acc, epi_layout)
            w = gl.load(row_ptrs, mask=inside, other=0.0).to(gl.float32)
            buf = momentum * buf + (acc + weight_decay * w)
            gl.store(buf_ptrs, buf, mask=written)
            gl.store(row_ptrs, (w - lr * buf).to(gl.bfloat16), mask=written)

    @gluon.jit
    def _wide_first(
        p_desc,
        f_desc,
        rings,
        bars,
        rows_ptr,
        buf_ptr,
        C,
        D,
        stride_rows,
        stride_buf,
        num_tiles,
        tiles_d,
        k_steps,
        lr,
        hold,
        momentum,
        weight_decay,
    ):
        p_lo, p_hi, f_bufs = rings
        _wide_consumer(
            0,
            p_lo,
            f_bufs,
            bars,
            rows_ptr,
            buf_ptr,
            C,
            D,
            stride_rows,
            stride_buf,
            num_tiles,
            tiles_d,
            k_steps,
            lr,
            hold,
            momentum,
            weight_decay,
            4,
        )

    @gluon.jit
    def _wide_second(
        p_desc,
        f_desc,
        rings,
        bars,
        rows_ptr,
        buf_ptr,
        C,
        D,
        stride_rows,
        stride_buf,
        num_tiles,
        tiles_d,
        k_steps,
        lr,
        hold,
        momentum,
        weight_decay,
    ):
        p_lo, p_hi, f_bufs = rings
        _wide_consumer(
            1,
            p_hi,
            f_bufs,
            bars,
            rows_ptr,
            buf_ptr,
            C,
            D,
            stride_rows,
            stride_buf,
            num_tiles,
            tiles_d,
            k_steps,
            lr,
            hold,
            momentum,
            weight_decay,
            4,
        )

    @gluon.jit
    def _wide_loading(
        p_desc,
        f_desc,
        rings,
        bars,
        rows_ptr,
        buf_ptr,
        C,
        D,
        stride_rows,
        stride_buf,
        num_tiles,
        tiles_d,
        k_steps,
        lr,
        hold,
        momentum,
        weight_decay,
    ):
        _wide_loader(p_desc, f_desc, rings, bars, num_tiles, tiles_d, k_steps)

    @gluon.jit
    def _dw_update_wide_kernel(
        p_desc,
        f_desc,
        rows_ptr,
        buf_ptr,
        G,
        C,
        D,
        stride_rows,
        stride_buf,
        lr_ptr,
        skip_ptr,
        momentum,
        weight_decay,
        STAGES: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        LOADER_REGS: gl.constexpr,
    ):
        block_k: gl.constexpr = p_desc.block_type.shape[0]
        half: gl.constexpr = p_desc.block_type.shape[1]
        block_d: gl.constexpr = f_desc.block_type.shape[1]
        lr = gl.load(lr_ptr)
        hold = gl.load(skip_ptr)
        p_lo = gl.allocate_shared_memory(p_desc.dtype, [STAGES, block_k, half], p_desc.layout)
        p_hi = gl.allocate_shared_memory(p_desc.dtype, [STAGES, block_k, half], p_desc.layout)
        f_bufs = gl.allocate_shared_memory(f_desc.dtype, [STAGES, block_k, block_d], f_desc.layout)
        ring_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ring_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ring_ready.index(i), count=1)
            mbarrier.init(ring_empty.index(i), count=2)
        tiles_d = gl.cdiv(D, block_d)
        num_tiles = gl.cdiv(C, 2 * half) * tiles_d
        k_steps = gl.cdiv(G, block_k)
        args = (
            p_desc,
            f_desc,
            (p_lo, p_hi, f_bufs),
            (ring_ready, ring_empty),
            rows_ptr,
            buf_ptr,
            C,
            D,
            stride_rows,
            stride_buf,
            num_tiles,
            tiles_d,
            k_steps,
            lr,
            hold,
            momentum,
            weight_decay,
        )
        gl.warp_specialize(
            [(_wide_first, args), (_wide_second, args), (_wide_loading, args)], [4, 1], [CONSUMER_REGS, LOADER_REGS]
        )


@functools.cache
def _shared_layout(block: tuple[int, ...], dtype: torch.dtype):
    # built once per block and dtype: two thirds of a descriptor's host time, several a step
    element = {torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for(list(block), element)


def _descriptor(tensor: torch.Tensor, block: list[int]):
    return TensorDescriptor.from_tensor(tensor, block, _shared_layout(tuple(block), tensor.dtype))


def descriptors(probs, feats, rows, buffer, tiles=TILES) -> tuple:
    """TMA descriptors of P (G x C), F (G x D), the rows and their buffer (C x D)."""
    block_c, block_d, block_k = tiles[:3]
    return (
        _descriptor(probs, [block_k, block_c]),
        _descriptor(feats, [block_k, block_d]),
        _descriptor(rows, [block_c, block_d]),
        _descriptor(buffer, [block_c, block_d]),
    )


def _tma_ready(tensor: torch.Tensor) -> bool:
    element = tensor.element_size()
    return (
        tensor.dim() == 2
        and tensor.stride(1) == 1
        and (tensor.stride(0) * element) % 16 == 0
        and tensor.data_ptr() % 16 == 0
    )


def fused_update_applies(probs: torch.Tensor, feats: torch.Tensor, rows: torch.Tensor, update) -> bool:
    """Whether ``fused_dw_update`` takes this chunk's step (else the product, then the pass)."""
    on_hopper = rows.device.type == "cuda" and torch.cuda.get_device_capability(rows.device)[0] == 9
    return GLUON and on_hopper and step_supported(probs, feats, rows, update)


def step_supported(probs: torch.Tensor, feats: torch.Tensor, rows: torch.Tensor, update) -> bool:
    """Whether the kernel implements this step on these operands, wherever they live."""
    buffer = update.momentum_buffer
    return (
        rows.dtype == torch.bfloat16
        and probs.dtype == feats.dtype == torch.bfloat16
        and update.momentum != 0
        and buffer is not None
        and buffer.dtype == torch.float32
        and update.rounding == "nearest"
        and update.compensation is None
        and all(_tma_ready(t) for t in (probs, feats, rows, buffer))
        and _fits(probs.shape[0])
    )


def _fits(num_rows: int) -> bool:
    tiles = _tiles(num_rows)
    return (
        tiles is not None
        and shared_bytes(tiles, _held_slices(num_rows, tiles), features_parts(num_rows, tiles)) <= SHARED_LIMIT
    )


def fused_dw_update(
    probs,
    feats,
    rows,
    buffer,
    *,
    lr: float | torch.Tensor,
    momentum: float,
    weight_decay: float,
    programs: int | None = None,
    features_grad: bool = False,
    skip: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """rows -= lr · (buffer = momentum · buffer + P^T F + weight_decay · rows), in place, with
    P^T F never stored (P: G x C, the gradient's scale folded in; F: G x D; rows, buffer: C x D).
    ``lr``: a number, or a one-element tensor the kernel reads on the device (no host read).
    ``programs``: the persistent grid (one program an SM by default; fewer give each more tiles).
    ``features_grad``: also return P W_c (G x D, float32) from the rows before the step, where
    ``takes_features_grad`` says the batch allows it (ValueError elsewhere). ``skip``: a
    one-element int32 device tensor (``SGDUpdate.skip``, the loss's verdict); where it holds
    a nonzero value the kernel writes no row and no buffer back (dF is still returned)."""
    if feats.shape[0] == 0 or rows.shape[0] == 0:
        raise ValueError("fused_dw_update needs at least one row of the batch and one class")
    batch, classes = probs.shape
    if feats.shape != (batch, rows.shape[1]) or rows.shape != (classes, feats.shape[1]) or buffer.shape != rows.shape:
        raise ValueError(
            f"fused_dw_update takes P (G x C), F (G x D), rows and buffer (C x D); got P {tuple(probs.shape)}, "
            f"F {tuple(feats.shape)}, rows {tuple(rows.shape)}, buffer {tuple(buffer.shape)}"
        )
    tiles = _tiles(feats.shape[0])
    if tiles is None:
        raise ValueError(f"fused_dw_update is slower than the product and pass at {feats.shape[0]} rows")
    held = _held_slices(feats.shape[0], tiles)
    parts = features_parts(feats.shape[0], tiles) if features_grad else 0
    if shared_bytes(tiles, held, parts) > SHARED_LIMIT:
        raise ValueError(
            f"tiles {tiles} at {feats.shape[0]} rows need {shared_bytes(tiles, held, parts)} bytes of shared memory, "
            f"more than {SHARED_LIMIT}: fewer stages, slots or held rows"
        )
    if features_grad and not takes_features_grad(feats.shape[0], tiles):
        raise ValueError(
            f"the kernel's dF needs F held in one K slice of at most 256 rows and epilogue slots; tiles {tiles} "
            f"at {feats.shape[0]} rows"
        )
    programs = programs or torch.cuda.get_device_properties(rows.device).multi_processor_count
    lr = _device_scalar(lr, rows.device, "lr")
    if skip is None:
        skip = torch.zeros((), dtype=torch.int32, device=rows.device)
    elif skip.numel() != 1 or skip.dtype != torch.int32 or skip.device != rows.device:
        raise ValueError(f"skip must be one int32 value on the rows' device, got {tuple(skip.shape)} {skip.dtype}")
    if tiles[4] == 0:
        _launch_wide(probs, feats, rows, buffer, tiles, lr, skip, float(momentum), float(weight_decay), programs)
        return None
    p_desc, f_desc, w_desc, b_desc = descriptors(probs, feats, rows, buffer, tiles)
    block_c, block_d, block_k = tiles[:3]
    tiles_d = triton.cdiv(rows.shape[1], block_d)
    grid = _grid(triton.cdiv(rows.shape[0], block_c) * tiles_d, tiles_d, programs, held)
    # each program's dF^T over its tiles (one D column each), summed over the column's programs
    # below in a fixed order: the same dF every run
    partial = torch.empty(grid, block_d, block_k, dtype=torch.float32, device=rows.device) if features_grad else lr
    regs = partition_registers(parts)
    _dw_update_kernel[(grid,)](
        p_desc,
        f_desc,
        w_desc,
        b_desc,
        feats.shape[0],
        rows.shape[0],
        rows.shape[1],
        lr,
        skip,
        float(momentum),
        float(weight_decay),
        partial,
        tiles[3],
        tiles[4],
        held,
        parts,
        regs["second_consumer"],
        regs["loaders"],
        regs["features"],
        num_warps=4,
    )
    if not features_grad:
        return None
    columns = partial.view(grid // tiles_d, tiles_d * block_d, block_k).sum(0)
    return columns[: rows.shape[1], : feats.shape[0]].t().contiguous()


def _launch_wide(probs, feats, rows, buffer, tiles, lr, skip, momentum, weight_decay, programs) -> None:
    # no descriptors for the rows and buffer here to check them: their pointers are indexed
    # as bf16 and float32 rows with unit steps along D
    if rows.dtype != torch.bfloat16 or buffer.dtype != torch.float32 or rows.stride(1) != 1 or buffer.stride(1) != 1:
        raise ValueError(
            f"the wide variant takes bf16 rows and a float32 buffer, each with unit stride along D; got "
            f"{rows.dtype} {tuple(rows.stride())}, {buffer.dtype} {tuple(buffer.stride())}"
        )
    block_c, block_d, block_k, stages = tiles[:4]
    num_tiles = triton.cdiv(rows.shape[0], block_c) * triton.cdiv(rows.shape[1], block_d)
    _dw_update_wide_kernel[(max(1, min(programs, num_tiles)),)](
        _descriptor(probs, [block_k, block_c // 2]),
        _descriptor(feats, [block_k, block_d]),
        rows,
        buffer,
        feats.shape[0],
        rows.shape[0],
        rows.shape[1],
        rows.stride(0),
        buffer.stride(0),
        lr,
        skip,
        momentum,
        weight_decay,
        stages,
        _CONSUMER_REGS,
        _LOADER_REGS,
        num_warps=4,
    )


def compile_for(arch: int = 90, dim: int = 512, num_rows: int = 256):
    """The kernel compiled for ``arch`` with no GPU present (its cubin, registers and shared
    memory can be read from the result): descriptors of small CPU tensors give its types;
    ``num_rows`` picks the tiles, as a step of that batch would, and how many of F's slices
    a held-F variant holds."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    probs = torch.empty(num_rows, 1024, dtype=torch.bfloat16)
    feats = torch.empty(num_rows, dim, dtype=torch.bfloat16)
    rows = torch.empty(1024, dim, dtype=torch.bfloat16)
    buffer = torch.empty(1024, dim, dtype=torch.float32)
    tiles = _tiles(num_rows)
    if tiles is None:
        raise ValueError(f"no tiles for a batch of {num_rows} rows: the step keeps the product and pass there")
    if tiles[4] == 0:
        return _compile_wide(arch, probs, feats, tiles)
    names = _dw_update_kernel.arg_names
    descs = descriptors(probs, feats, rows, buffer, tiles)
    signature = {name: mangle_type(desc) for name, desc in zip(names, descs)}
    signature.update(G="i32", C="i32", D="i32", lr_ptr="*fp32", skip_ptr="*i32", momentum="fp32", weight_decay="fp32")
    signature.update(df_ptr="*fp32")
    parts = features_parts(num_rows, tiles)
    regs = partition_registers(parts)
    constants = dict(
        STAGES=tiles[3],
        SLOTS=tiles[4],
        HELD=_held_slices(num_rows, tiles),
        FEATURES_GRAD=parts,
        CONSUMER_REGS=regs["second_consumer"],
        LOADER_REGS=regs["loaders"],
        FEATURES_GRAD_REGS=regs["features"],
    )
    signature.update({name: "constexpr" for name in constants})
    return triton.compile(
        GluonASTSource(fn=_dw_update_kernel, signature=signature, constexprs=constants),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=4),
    )


def _compile_wide(arch, probs, feats, tiles):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    block_c, block_d, block_k, stages = tiles[:4]
    fn = _dw_update_wide_kernel
    signature = dict(
        p_desc=mangle_type(_descriptor(probs, [block_k, block_c // 2])),
        f_desc=mangle_type(_descriptor(feats, [block_k, block_d])),
        rows_ptr="*bf16",
        buf_ptr="*fp32",
    )
    signature.update(G="i32", C="i32", D="i32", stride_rows="i32", stride_buf="i32")
    signature.update(lr_ptr="*fp32", skip_ptr="*i32", momentum="fp32", weight_decay="fp32")
    constants = dict(STAGES=stages, CONSUMER_REGS=_CONSUMER_REGS, LOADER_REGS=_LOADER_REGS)
    signature.update({name: "constexpr" for name in constants})
    # as a launch at D = 512 specialises: pointers 16-byte aligned, D and the strides multiples of 16
    aligned = {
        (fn.arg_names.index(name),): [["tt.divisibility", 16]]
        for name in ("rows_ptr", "buf_ptr", "D", "stride_rows", "stride_buf")
    }
    return triton.compile(
        GluonASTSource(fn=fn, signature=signature, constexprs=constants, attrs=aligned),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=4),
    )


__all__ = ["GLUON", "compile_for", "descriptors", "fused_dw_update", "fused_update_applies", "step_supported"]

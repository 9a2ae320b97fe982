"""Prefill (large M) NVFP4 W4A16 GEMM for sm_90a in CuTeDSL: ``y[M, N] = x[M, K] @ dequant(W)^T * alpha[N]``.

**Correct on a Hopper GPU; the op dispatches it for M in (64, 1024] (2048 for K > 4096 where its plan fills
about a wave; any M for K > 4096 and N >= 4096 where its tiles fill their waves)** (``ops.gemm.use_wgmma``): there it
beats dequantize + cuBLAS, elsewhere it does not; and, with one
64-token tile, for M in [33, 64] where that grid fills, there faster than the decode kernel. Where its grid would
leave SMs idle it splits K across CTAs (``split_k``, :func:`wgmma_plan`); two splits of a tile form a cluster and meet
in distributed shared memory (``dsmem_split``, the default for two: 6-15% faster than the fp32 workspace at M = 64..256 on
an H100), four as a cluster of four where at most DSMEM4_MAX_CTAS CTAs run (fused_wqa_wkv M = 128 21.6 -> 16.6 us),
others through the workspace. **Stream-K** (``stream_k``): one
part per cluster of SMs, each a contiguous share of all tiles' K quads (at most a few tile segments, met
through the split-K sum). Correct (GPU tests, graph replay bit-equal); each segment restart and fix-up costs
~10 us, about what balanced waves gain (``data/bench/wgmma_split_probe_*_{e89ab12,7ca7278}.json``), so it is
the default only where the unsplit plan leaves the last wave mostly idle (:func:`stream_k_pays`: gate_up at
M = 1024 on an H100 141.7 against 166.6 us, ``wgmma_split_probe_*_517eb25.json``). Where that cost goes
(H100 at M = 256, ``wgmma_variants_*_41487b0_streamk.json``): with one segment a part stream-K is 5-7% slower
than the same unsplit grid (gate_up 78.3 against 73.7 us, wo_b 169.4 against 158.8: four chunks of weight
words in flight instead of eight there, eight since 0a9ed0a; no staged epilogue); with two parts a tile, as slow as split K or a little
slower (50.7 against 48.1, 107.6 against 99.0); and on all 132 SMs (2-3 segments a part) slower still
(56.1, 108.9), though each part has 27% fewer quads. Nor does it pay as a persistent schedule: 64 parts over whole
tiles (no fix-up; the next tile's fill hides under the epilogue, but the epilogue is the direct one) ran 1-16% slower
than the unsplit grid at M = 4096 and 8192 for all four DeepSeek-V4 shapes (gate_up M = 4096 532 against 517-520 us,
wo_b M = 8192 2949 against 2741-2801; ``wgmma_variants_*_e5ec4b9_persistent.json``). Each extra segment costs ~14 us: its partial written and
fenced mid-run (``MEMBAR``/``CCTL.IVALL`` show in the stall samples,
``data/profiles/ncu_source_streamk_gate_up_m256_*_41487b0.csv.gz``), and a tile of three or more segments
summed at the end by a last arriver that writes its own partial too and reads every one back in order.
Both kernels launch with PDL at 128-token tiles (``pdl``). The decoder schedule also comes as

- the **SwiGLU** kernel (``swiglu``): gate_up with the clamped SwiGLU in the epilogue (``gemm_w4a16_swiglu``
  above M = 64, every M);
- the **grouped** kernel (:func:`run_grouped_wgmma`): E weights, rows grouped by ``offsets`` through a tile
  table built on the device, one launch (the MoE prefill: 1.26x the cuBLAS BF16 loop over 48 experts on an H100);
- the **batched** kernel (:func:`run_batched_wgmma`): G weights each over all rows of its own K columns of x
  (wo_a up to 2048 tokens: 56.6 us at 256 tokens against cuBLAS bmm's 67.3 on an H100).

Two schedules, both tested on an H200 and an H100 (rel err ~1e-4 at M = 1..4097, ``tests/test_gemm_wgmma.py``):

- ``schedule="register"`` (:class:`GemmWgmmaKernel`, described below): the MMA warpgroups decode their own
  A fragments. gate_up at M = 8192: 1.22-1.24 ms against cuBLAS BF16's 1.04-1.07 ms.
- ``schedule="decoder"`` (:class:`GemmWgmmaDecoderKernel`): a third warpgroup decodes into shared memory
  and the MMA warpgroups run SS-WGMMA; ``cluster_m=2`` shares the x tile of two CTAs by TMA multicast.
  gate_up at M = 8192: 1.125 ms (cluster 2) against cuBLAS 1.047 and dequantize + cuBLAS 1.089; at 4096:
  553 against 519 and 548 us; down at M = 1024: 78 us against 65 and 85 (the one shape class where it
  beats dequantize + cuBLAS).

What the timing probes (``probe=...``, wrong results on purpose; ``data/bench/wgmma_probe_nvidia_h200_*.json``)
showed: decode inside the MMA warps does not hide under the MMAs (its instructions add to the time almost
one for one; ping-pong scheduling of the warpgroups did not help); decode on another warpgroup mostly
does; what remains of the decoder schedule's gap is the weight loads (``decoder_noload``: 1.03 ms at
M = 8192), not their latency (8 chunks in flight no better than 4) nor the x traffic out of L2 (halved by
the cluster: 3% gained). Caveat: probes that replace the weights by made-up or constant values also
change the data the tensor cores multiply, hence their power draw and clock: cuBLAS itself runs 3-4% faster
on constant or few-valued weights than on random ones (``data/bench/power_probe_nvidia_h200.json``), so the
probes' times are optimistic by about that much.

Shapes and dtypes: x bf16 [M, K] row-major (contiguous, 16-byte aligned), K a multiple of 256; the weight
in the existing ``"sm90"`` layout of :func:`.dequant.repack_weight` (int32 words [RG, K/64, 32, 4], int32
scale words [RG, K/256, 32, 2], RG = ceil(N/16)); alpha fp32 [N]; y bf16 [M, N] row-major. fp32 accumulate,
one rounding: ``y = bf16(acc * alpha[n] * 2**7)`` (the decoded products are ``v * s * 2**-7``, exact).

Design (swap AB, register-sourced WGMMA):

- The weight is the WGMMA **A operand from registers** (``wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16``
  with A a list of four bf16x2 registers, B a shared-memory descriptor), tokens are the MMA N dimension (``TILE_N`` = 128 or 256 tokens per CTA), x is
  operand B in shared memory (K-major, 128-byte swizzle, loaded by TMA; rows past M are zero-filled by
  the TMA unit). A CTA is two warpgroups, one 64-row slice of the 128-row weight tile each; warp w of
  warpgroup v owns row group ``8 * blockIdx.x + 4v + w``.
- x goes through a ``stages``-deep mbarrier pipeline (``PipelineTmaAsync``): warp 0 issues the TMA of
  chunk kt + stages - 1 once chunk kt - 1's MMAs have retired.
- Per 64-k chunk a warpgroup issues four ``m64nNk16`` WGMMAs (one commit group), then waits for the
  *previous* chunk's group (``wgmma.wait_group 1``) and decodes the next chunk's weights into the other
  half of a double-buffered register A fragment while the MMAs run; the raw weight words are loaded from
  global two chunks ahead of their decode, the scale words one quad (256 k) ahead.
- The k order. The sm90 layout gives lane (g, t) the k range ``64c + 16t .. 64c + 16t + 15`` of its rows
  (``k = 64c + 16t + 4kk + 2h + e``), so that one mma.sync lane sees one 16-wide scale block. WGMMA's B
  operand in shared memory only has canonical layouts (8 contiguous k per core matrix row), which forces
  the *standard* k order on A: lane t' of step s needs ``k = 64c + 16s + 2t' + 8h' + e``. That is a 4x4
  transpose inside each quad of lanes: register ``j' = rh + 2h'`` of lane (g, t') at step s is register
  ``j = rh + 2(t' % 2)`` of word ``kk = t' // 2 + 2h'`` of lane (g, s). Rather than shuffle, every lane
  loads the two words it needs from each of the four lanes of its quad straight from global memory (8
  x 4-byte loads per chunk instead of one 16-byte load; the quad's 64 bytes are L1 hits) and decodes only
  the half it needs (:func:`decode_half_word`: 11 integer ops + 2 ``mul.rn.bf16x2`` per word, as
  ``decode_word`` for a whole word). The block scale of step s is the one of lane (g, s): a lane loads
  its quad's 32 scale bytes per 256 k (two 16-byte loads). The existing layout is kept (decode kernel,
  prepare_weight unchanged); a prefill-specific layout in the standard k order would save half the
  decode work and the extra loads.
- Resources (ptxas for sm_90a via CuTeDSL 4.8.1, K = 7168): 162 registers at tile_n = 128, 218 at 256, no
  local memory; the SASS holds ``HGMMA.64xNx16.F32.BF16 R.., R<A regs>, gdesc[..]`` groups of four with
  ``WARPGROUP.DEPBAR.LE gsb0, 0x1`` between them (not serialized). Both tiles give one CTA (8 warps) per SM.
- Epilogue: ``acc * alpha[col] * 2**7`` -> bf16, stored transposed into y (row = token) with the token
  (M) and column (N) bounds masked. N need not be a multiple of 128 (row groups past RG are clamped for
  the loads and masked at the store); K must be a multiple of 256 (ValueError otherwise).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..cute_compile import compile_kernel, import_cute
from ..launch import current_stream, sm_count, split_counters
from . import dequant as D
from .gemm_decode import PDL_MODES, bits_of_f32 as _bits_of_f32, decode_word, prmt

cutlass, cute = import_cute()

from cutlass import BFloat16, Float32, Int32  # noqa: E402
import cutlass.pipeline as pipeline  # noqa: E402
import cutlass.utils.hopper_helpers as sm90_utils  # noqa: E402
from cutlass._mlir.dialects import llvm, nvvm as _nvvm  # noqa: E402
from cutlass.cute.nvgpu import cpasync, warpgroup  # noqa: E402
from cutlass.experimental.primitives import nvvm_wrapper as _nvvm_wrapper  # noqa: E402
from cutlass.cutlass_dsl import T, dsl_user_op  # noqa: E402

_CLUSTER_SCOPE = _nvvm.MemScopeKind.CLUSTER  # remote mbarrier arrivals that hand over data (dsmem_split)

TILE_M = 128  # weight rows per CTA: two warpgroups of 64
WARPGROUPS = 2
THREADS = 128 * WARPGROUPS
TILE_K = D.CHUNK_K  # one 64-k chunk per pipeline stage
STEPS = TILE_K // 16  # k16 WGMMAs per chunk
FULL_MASK = D.EM_MASK | D.SIGN_MASK
SCALE_BIAS2 = (D.SCALE_BIAS_BITS << 16) | D.SCALE_BIAS_BITS
PROBES = ("full", "own", "nodecode", "noload", "sidecar", "sidecar_idle")
ARRIVE_FIRST_FRAG = 64  # the split sum's order (GemmWgmmaDecoderKernel._sum_splits) from this many fp32 a thread


@dsl_user_op
def decode_half_word(word: Int32, shift: Int32, select: Int32, scale_g: Int32, scale_g8: Int32, *, loc=None, ip=None):
    """Half of :func:`.gemm_decode.decode_word`: the two registers ``j = 2*hsel`` (row g) and ``j = 2*hsel + 1``
    (row g + 8) of one word, times their scales. ``shift = 6 * hsel``; ``select`` = all ones when hsel = 1,
    else 0 (register 1 and register 3 decode differently: both are computed, one is kept)."""
    asm = (
        "{\n.reg .b32 u, a, b, v;\n"
        "shl.b32 u, $2, $3;\n"
        f"and.b32 u, u, {FULL_MASK:#x};\n"
        "mul.rn.bf16x2 $0, u, $5;\n"
        "shl.b32 a, $2, 3;\n"
        f"and.b32 a, a, {FULL_MASK:#x};\n"
        "shr.u32 b, $2, 4;\n"
        "and.b32 b, b, 0x00C000C0;\n"
        "shr.u32 v, $2, 5;\n"
        "lop3.b32 b, b, v, 0x01000100, 0xF8;\n"
        "shl.b32 v, $2, 1;\n"
        "lop3.b32 b, b, v, 0x80008000, 0xF8;\n"
        "lop3.b32 u, a, b, $4, 0xD8;\n"  # select ? b : a
        "mul.rn.bf16x2 $1, u, $6;\n}"
    )
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.i32()] * 2),
        [Int32(v).ir_value(loc=loc, ip=ip) for v in (word, shift, select, scale_g, scale_g8)],
        asm, "=r,=r,r,r,r,r,r", has_side_effects=False, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT)
    return [Int32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(2)]


def _global_tensors(x_ptr, w_ptr, alpha_ptr, y_ptr, m, n, row_groups, k: int):
    """x bf16 [m, k], weight words int32 [RG, k/64, 32, 4], alpha fp32 [n], y bf16 [m, n] (both schedules)."""
    chunks = k // D.CHUNK_K
    return (cute.make_tensor(x_ptr, cute.make_layout((m, k), stride=(k, 1))),
            cute.make_tensor(w_ptr, cute.make_layout((row_groups, chunks, 32, 4), stride=(chunks * 128, 128, 4, 1))),
            cute.make_tensor(alpha_ptr, cute.make_layout((n,))),
            cute.make_tensor(y_ptr, cute.make_layout((m, n), stride=(n, 1))))


def _tiled_mma(tile_n: int, a_source):
    """Two warpgroups of m64n{tile_n}k16 bf16 -> fp32 WGMMA, K-major operands, A from ``a_source``."""
    return sm90_utils.make_trivial_tiled_mma(BFloat16, BFloat16, warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.K,
                                             Float32, (WARPGROUPS, 1, 1), (64, tile_n), a_source)


@cute.jit
def _kernel_ids(tma_atom: cute.CopyAtom):
    """(thread, weight row block, token block, warp, lane, lane // 4); warp 0 prefetches the TMA descriptor."""
    tidx, _, _ = cute.arch.thread_idx()
    rb, tb, _ = cute.arch.block_idx()
    warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
    if warp == 0:
        cpasync.prefetch_descriptor(tma_atom)
    lane = tidx % 32
    return tidx, rb, tb, warp, lane, lane // 4


def _check_shape(k: int, tile_n: int, allowed: tuple = (128, 256)) -> None:
    D.check_decode_shape(16, k)
    if tile_n not in allowed:
        raise ValueError(f"tile_n (tokens per CTA) must be one of {allowed}, got {tile_n}")


DECODER_TILE_N = (16, 32, 64, 128, 256)  # tokens per CTA the decoder schedule takes (m64nNk16 WGMMAs)


def default_stages(k: int, tile_n: int) -> int:
    """x pipeline depth: as many 64-k stages as fit in ~200 KB of shared memory, at most 8 and at most the
    number of chunks."""
    per_stage = tile_n * TILE_K * 2
    return max(2, min(8, (200 * 1024) // per_stage, k // TILE_K))


class StreamWork(NamedTuple):
    """A stream_k part's share of the work (device values): units [u0, u1) of ``units`` = tiles x quads, its
    tiles t_first .. t_first + segments - 1; rank: the CTA's rank in its cluster."""
    part: Int32
    parts: Int32
    units: Int32
    u0: Int32
    u1: Int32
    t_first: Int32
    segments: Int32
    pair_blocks: Int32
    row_blocks: Int32
    rank: Int32


def stream_segments(tiles: int, quads: int, parts: int) -> int:
    """The most segments any tile has when ``parts`` share ``tiles`` x ``quads`` work units evenly (the
    stream_k kernel's split sum: the workspace's second dimension)."""
    units = tiles * quads

    def part_of(u):
        return ((u + 1) * parts - 1) // units

    return max(part_of((t + 1) * quads - 1) - part_of(t * quads) + 1 for t in range(tiles))


class GemmWgmmaKernel:
    """Static: k (a multiple of 256), tile_n (tokens per CTA: 128 or 256), stages (x pipeline depth).
    Dynamic: m, n, row_groups (RG of the weight)."""

    def __init__(self, k: int, tile_n: int = 128, stages: int | None = None, probe: str = "full", pingpong: bool = False):
        _check_shape(k, tile_n)
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
        # timing probes (wrong results on purpose, never dispatched): "own" = each lane decodes its own words
        # with one 16-byte load (the cost of a layout in the standard k order); "nodecode" = no weight loads
        # or decode at all (the cost of the x pipeline and the MMAs alone); "noload" = the full decode of words
        # made up in registers (the cost of the decode without the weight loads)
        self.probe = probe
        # pingpong: the two warpgroups take turns issuing their MMAs (named barriers 1 and 2), so that one
        # decodes while the other's MMAs keep the tensor cores busy. Warp 0 then refills the x stage of chunk
        # kt - 2 (not kt - 1, which warpgroup 1 releases only after its own turn: waiting for it would hold
        # warpgroup 0's decode back by a whole turn)
        self.pingpong = pingpong
        self.refill_lag = 2 if pingpong else 1
        self.sidecar = probe.startswith("sidecar")  # a third warpgroup (its decode work: "sidecar" only)
        self.threads = THREADS + (128 if self.sidecar else 0)
        self.k = k
        self.chunks = k // D.CHUNK_K
        self.quads = k // D.QUAD_K
        self.tile_n = tile_n
        self.stages = stages or default_stages(k, tile_n)
        self.buffer_align = 1024

    @cute.jit
    def __call__(self, x_ptr: cute.Pointer, w_ptr: cute.Pointer, s_ptr: cute.Pointer, alpha_ptr: cute.Pointer,
                 y_ptr: cute.Pointer, m: Int32, n: Int32, row_groups: Int32, stream):
        """x_ptr: bf16 [m, k]; w_ptr: int32 [RG, k/64, 32, 4]; s_ptr: int32 [RG, k/256, 32, 2]; alpha_ptr:
        fp32 [n]; y_ptr: bf16 [m, n]; row_groups = RG = ceil(n / 16)."""
        mX, mW, mAlpha, mY = _global_tensors(x_ptr, w_ptr, alpha_ptr, y_ptr, m, n, row_groups, self.k)
        # scale words seen per quad of lanes: [RG, k/256, g, 8 words = (source lane s, word)]
        mS = cute.make_tensor(s_ptr, cute.make_layout((row_groups, self.quads, 8, 8), stride=(self.quads * 64, 64, 8, 1)))
        tiled_mma = _tiled_mma(self.tile_n, warpgroup.OperandSource.RMEM)
        mma_tiler = (TILE_M, self.tile_n, TILE_K)
        x_smem_staged = sm90_utils.make_smem_layout_b(cutlass.utils.LayoutEnum.ROW_MAJOR, mma_tiler, BFloat16, self.stages)
        x_smem_one = cute.slice_(x_smem_staged, (None, None, 0))
        tma_atom, tma_x = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), mX, x_smem_one, (self.tile_n, TILE_K))
        tma_bytes = cute.size_in_bytes(BFloat16, x_smem_one)

        @cute.struct
        class SharedStorage:
            barriers: cute.struct.MemRange[cutlass.Int64, self.stages * 2]
            sX: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(x_smem_staged)], self.buffer_align]

        self.shared_storage = SharedStorage
        self.tma_bytes = tma_bytes
        row_blocks = (row_groups + 2 * 4 - 1) // (2 * 4)
        token_blocks = (m + self.tile_n - 1) // self.tile_n
        self.kernel(tma_atom, tma_x, mW, mS, mAlpha, mY, tiled_mma, x_smem_staged, m, n, row_groups).launch(
            grid=[row_blocks, token_blocks, 1], block=[self.threads, 1, 1], stream=stream)

    @cute.jit
    def _load_words(self, mW: cute.Tensor, rg: Int32, chunk: Int32, g: Int32, kk0: Int32, wr: cute.Tensor, slot: int):
        """The 8 words of one chunk this lane decodes: from each lane (g, s) of its quad, words kk0 and kk0 + 2."""
        if cutlass.const_expr(self.probe == "own"):
            lane = 4 * g + (cute.arch.lane_idx() % 4)
            own = cute.make_rmem_tensor((4,), Int32)
            cute.autovec_copy(mW[rg, chunk, lane, None], own)
            for i in cutlass.range_constexpr(4):
                wr[slot, i // 2, i % 2] = own[i]
            return
        if cutlass.const_expr(self.probe == "nodecode" or self.sidecar):
            return
        if cutlass.const_expr(self.probe == "noload"):
            for s in cutlass.range_constexpr(4):
                for hh in cutlass.range_constexpr(2):
                    wr[slot, s, hh] = chunk * 0x01010101 + g * 0x10001 + (2 * s + hh)
            return
        for s in cutlass.range_constexpr(4):
            for hh in cutlass.range_constexpr(2):
                wr[slot, s, hh] = mW[rg, chunk, 4 * g + s, kk0 + 2 * hh]

    @cute.jit
    def _decode(self, wr: cute.Tensor, slot: int, sw: cute.Tensor, ci: int, shift: Int32, select: Int32, frag: cute.Tensor):
        """Chunk (slot) -> bf16x2 A registers of the 4 k16 steps: frag[j', step]."""
        if cutlass.const_expr(self.probe == "own"):
            for s in cutlass.range_constexpr(4):
                word = sw[2 * s + ci // 2]
                byte = (ci % 2) * 2
                scale_g = prmt(word, Int32(0), 0x4040 + byte * 0x0101) * 16 + SCALE_BIAS2
                scale_g8 = prmt(word, Int32(0), 0x4040 + (byte + 1) * 0x0101) * 16 + SCALE_BIAS2
                regs = decode_word(wr[slot, s // 2, s % 2], scale_g, scale_g8)
                for j in cutlass.range_constexpr(4):
                    frag[j, s] = regs[j]
            return
        if cutlass.const_expr(self.probe == "nodecode" or self.sidecar):
            return
        for s in cutlass.range_constexpr(4):
            word = sw[2 * s + ci // 2]
            byte = (ci % 2) * 2
            scale_g = prmt(word, Int32(0), 0x4040 + byte * 0x0101) * 16 + SCALE_BIAS2
            scale_g8 = prmt(word, Int32(0), 0x4040 + (byte + 1) * 0x0101) * 16 + SCALE_BIAS2
            for hh in cutlass.range_constexpr(2):
                regs = decode_half_word(wr[slot, s, hh], shift, select, scale_g, scale_g8)
                frag[2 * hh, s] = regs[0]
                frag[2 * hh + 1, s] = regs[1]

    @cute.kernel
    def kernel(self, tma_atom: cute.CopyAtom, mX_tma: cute.Tensor, mW: cute.Tensor, mS: cute.Tensor, mAlpha: cute.Tensor,
               mY: cute.Tensor, tiled_mma: cute.TiledMma, x_smem_staged: cute.ComposedLayout, m: Int32, n: Int32,
               row_groups: Int32):
        tidx, rb, tb, warp, lane, g = _kernel_ids(tma_atom)
        t = lane % 4
        hsel = t % 2
        shift = hsel * 6
        select = Int32(0) - hsel  # all ones for odd t
        kk0 = t // 2
        # this warp's row group (warp w of warpgroup v owns rows 16w.. of the warpgroup's 64), clamped for loads
        rg = cutlass.min(rb * 8 + warp, row_groups - 1)

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        producer_group = pipeline.CooperativeGroup(pipeline.Agent.Thread)
        consumer_group = pipeline.CooperativeGroup(pipeline.Agent.Thread, THREADS // 32)
        x_pipe = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.barriers.data_ptr(), num_stages=self.stages, producer_group=producer_group,
            consumer_group=consumer_group, tx_count=self.tma_bytes, cta_layout_vmnk=cute.make_layout((1, 1, 1, 1)))
        sX = storage.sX.get_tensor(x_smem_staged.outer, swizzle=x_smem_staged.inner)

        # TMA partition of x: (tile_n, 64) tiles of token block tb, all chunks
        gX = cute.local_tile(mX_tma, (self.tile_n, TILE_K), (tb, None))
        tXsX, tXgX = cpasync.tma_partition(tma_atom, 0, cute.make_layout(1), cute.group_modes(sX, 0, 2), cute.group_modes(gX, 0, 2))

        thr_mma = tiled_mma.get_slice(tidx)
        tCsB = thr_mma.partition_B(sX)
        tCrB = tiled_mma.make_fragment_B(tCsB)  # (vals, MMA_N, STEPS, stages)
        acc = cute.make_rmem_tensor(thr_mma.partition_shape_C((TILE_M, self.tile_n)), Float32)
        acc.fill(0.0)
        # register A fragments (double buffer): bf16 ((2,2,2), 1, STEPS); their int32 view is [j = rh + 2h, step]
        frags = []
        frag32 = []
        for b in cutlass.range_constexpr(2):
            f = tiled_mma.make_fragment_A(thr_mma.partition_shape_A((TILE_M, TILE_K)))
            if cutlass.const_expr(self.probe == "nodecode" or self.sidecar):
                f.fill(1.0)
            frags.append(f)
            frag32.append(cute.make_tensor(cute.recast_ptr(f.iterator, dtype=Int32), cute.make_layout((4, STEPS), stride=(1, 4))))
        wr = cute.make_rmem_tensor(cute.make_ordered_layout((2, 4, 2), order=(2, 1, 0)), Int32)  # raw words [slot, s, hh]
        scur = cute.make_rmem_tensor((8,), Int32)
        snxt = cute.make_rmem_tensor((8,), Int32)
        tiled_mma.set(warpgroup.Field.ACCUMULATE, True)

        # prologue: TMA for the first stages, weights of chunks 0 and 1, decode chunk 0, words of chunk 2
        producer_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        if warp == 0:
            for _ in cutlass.range(min(self.stages, self.chunks), unroll=1):
                x_pipe.producer_acquire(producer_state)
                cute.copy(tma_atom, tXgX[(None, producer_state.count)], tXsX[(None, producer_state.index)],
                          tma_bar_ptr=x_pipe.producer_get_barrier(producer_state))
                x_pipe.producer_commit(producer_state)
                producer_state.advance()
        if warp < 4 * WARPGROUPS:
            self._consume(mW, mS, mAlpha, mY, tiled_mma, thr_mma, x_pipe, tma_atom, tXgX, tXsX, tCrB, acc, frags, frag32, wr,
                          scur, snxt, producer_state, rg, g, kk0, shift, select, warp, rb, tb, m, n)
        if cutlass.const_expr(self.sidecar):
            if warp >= 4 * WARPGROUPS:
                self._sidecar(mY, g, tidx)

    @cute.jit
    def _consume(self, mW, mS, mAlpha, mY, tiled_mma, thr_mma, x_pipe, tma_atom, tXgX, tXsX, tCrB, acc, frags, frag32, wr,
                 scur, snxt, producer_state, rg, g, kk0, shift, select, warp, rb, tb, m, n):
        """The two MMA warpgroups: main loop and epilogue."""
        wg = warp // 4
        cute.autovec_copy(mS[rg, 0, g, None], scur)
        cute.autovec_copy(mS[rg, cutlass.min(1, self.quads - 1), g, None], snxt)
        self._load_words(mW, rg, Int32(0), g, kk0, wr, 0)
        self._load_words(mW, rg, Int32(1), g, kk0, wr, 1)
        self._decode(wr, 0, scur, 0, shift, select, frag32[0])
        self._load_words(mW, rg, Int32(2), g, kk0, wr, 0)

        read_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        release_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        if cutlass.const_expr(self.pingpong):
            if wg == 1:  # warpgroup 0 issues first
                cute.arch.barrier_arrive(barrier_id=1, number_of_threads=THREADS)
        for q in cutlass.range(self.quads, unroll=1):
            for ci in cutlass.range_constexpr(4):
                kt = q * 4 + ci
                x_pipe.consumer_wait(read_state)
                if cutlass.const_expr(self.pingpong):
                    cute.arch.barrier(barrier_id=1 + wg, number_of_threads=THREADS)  # my turn
                warpgroup.fence()
                for s in cutlass.range_constexpr(STEPS):
                    cute.gemm(tiled_mma, acc, frags[ci % 2][None, None, s], tCrB[None, None, s, read_state.index], acc)
                warpgroup.commit_group()
                if cutlass.const_expr(self.pingpong):
                    cute.arch.barrier_arrive(barrier_id=2 - wg, number_of_threads=THREADS)  # the other's turn
                warpgroup.wait_group(1)  # chunk kt - 1's MMAs are done: its x stage and A buffer are free
                if kt > 0:
                    x_pipe.consumer_release(release_state)
                    release_state.advance()
                read_state.advance()
                # refill the stage of chunk kt - lag with chunk kt - lag + stages. Not before kt = lag: the stage
                # the producer would wait for is released by every warp only at kt = lag (warp 0 included, which
                # would deadlock waiting on itself)
                if (warp == 0) & (kt >= self.refill_lag):
                    if producer_state.count < self.chunks:
                        x_pipe.producer_acquire(producer_state)
                        cute.copy(tma_atom, tXgX[(None, producer_state.count)], tXsX[(None, producer_state.index)],
                                  tma_bar_ptr=x_pipe.producer_get_barrier(producer_state))
                        x_pipe.producer_commit(producer_state)
                        producer_state.advance()
                # decode chunk kt + 1 (past the end: a harmless decode of clamped data) and load chunk kt + 3
                if cutlass.const_expr(ci < 3):
                    self._decode(wr, (ci + 1) % 2, scur, ci + 1, shift, select, frag32[(ci + 1) % 2])
                else:
                    self._decode(wr, (ci + 1) % 2, snxt, 0, shift, select, frag32[(ci + 1) % 2])
                    for i in cutlass.range_constexpr(8):
                        scur[i] = snxt[i]
                self._load_words(mW, rg, cutlass.min(kt + 3, self.chunks - 1), g, kk0, wr, (ci + 1) % 2)
                if cutlass.const_expr(ci == 3):
                    cute.autovec_copy(mS[rg, cutlass.min(q + 2, self.quads - 1), g, None], snxt)
        if cutlass.const_expr(self.pingpong):
            if wg == 0:  # match warpgroup 1's last arrive
                cute.arch.barrier(barrier_id=1, number_of_threads=THREADS)
        warpgroup.wait_group(0)

        store_tile(acc, thr_mma, mAlpha, mY, rb, tb * self.tile_n, m, n, g, self.tile_n)

    @cute.jit
    def _sidecar(self, mY: cute.Tensor, g: Int32, tidx: Int32):
        """Probe "sidecar": a third warpgroup runs the decode work a decoder warpgroup would need for the
        CTA's 128 x 64 weight tile per chunk (8 words per thread, made up in registers) for every chunk,
        unpaced, while the MMA warpgroups run without decode: does decode on OTHER warps slow the MMAs?
        One value per thread is kept alive through a store that never happens. "sidecar_idle": the same
        kernel, the third warpgroup idle (the cost of the register cap of 384 threads alone)."""
        acc = Int32(0)
        scale = Int32(0x77807780)
        for kt in cutlass.range(self.chunks if cutlass.const_expr(self.probe == "sidecar") else 0, unroll=1):
            for w in cutlass.range_constexpr(8):
                regs = decode_word(kt * 0x01010101 + tidx * 0x10001 + w, scale, scale)
                acc = acc ^ regs[0] ^ regs[1] ^ regs[2] ^ regs[3]
        if acc == Int32(0x7FFFFFFF) - tidx:  # practically never: keeps the work alive
            mY32 = cute.make_tensor(cute.recast_ptr(mY.iterator, dtype=Int32), cute.make_layout((1,)))
            mY32[0] = acc


DECODER_THREADS = 128  # the decoder warpgroup of GemmWgmmaDecoderKernel
DECODER_PROBES = ("full", "noload", "nofence", "nostore", "noepilogue")
STAGE_HALF_WORDS = 64 * D.CHUNK_K // 2  # one MMA warpgroup's 64 rows of a weight stage, in words


def decoder_default_stages(tile_n: int, tile_m: int = TILE_M) -> int:
    """x + weight stages of the decoder schedule: as many as fit in ~200 KB (at most 8)."""
    per_stage = (tile_n + tile_m) * TILE_K * 2
    return max(2, min(8, (200 * 1024) // per_stage))


class GemmWgmmaDecoderKernel:
    """The decoder schedule (``schedule="decoder"``): warpgroup 0 decodes, warpgroups 1 and 2 only multiply.

    - Warpgroup 0 (128 threads): warp w decodes row groups Rw .. Rw + R - 1 of the CTA's ``tile_m`` weight
      rows (R = tile_m / 64), one 16-byte load per lane and row group per 64-k chunk (loaded ``ahead`` chunks
      early), the full register
      decode (:func:`.gemm_decode.decode_word`), and writes the bf16 tile into a ``stages``-deep shared
      buffer in WGMMA's canonical K-major 128-byte-swizzled layout (16-byte stores, 8 k of a row each; or
      ``store_bytes=8``: lanes of even and odd ``g // 2`` take their words in opposite order so a store
      instruction costs the minimum 2 wavefronts). Where the decoder bounds the kernel (tiles of 64 tokens or
      fewer), the stores and the decode feeding them (which the compiler drops with them) are its largest
      cost: the ``nostore`` probe halved gate_up at M = 64 (33.5 -> 17.2 us,
      data/bench/wgmma_probes_m64_nvidia_h200_8062a02.json); moving the weight words through a shared ring
      (cp.async.bulk) instead of registers was 10-25% slower (wgmma_ring_probe_*_8062a02.json, removed).
      Its warp 0 also issues the TMA of x. Weight stage full/empty: a :class:`PipelineAsync` (an arrival of
      every decoder thread after ``fence.proxy.async``, 256 consumer arrivals).
    - ``decoders=2`` (run_wgmma's default at tiles of up to 128 tokens, not the SwiGLU kernel): warpgroups 0
      and 1 decode, warp w of the eight taking row group w of the 128-row tile (two warps an SM sub-partition
      hide each other's latencies; the launch's 512 threads cap the registers at 128). Warp 0 issues the TMA.
    - The last two warpgroups: SS-WGMMA ``m64n{tile_n}k16`` (A and B from shared memory), 4 per chunk, one
      commit group per chunk, the previous chunk's stages released after ``wait_group(1)``; then the
      epilogue shared with the register schedule (:func:`store_tile`).

    Why: the timing probes (``probe="sidecar"``) showed decode work on a separate warpgroup costs 1-6%
    while decode inside the MMA warps costs ~17-30%. ``cluster_m=2``: see :meth:`__init__`. ``tile_m=256``
    (256 weight rows x 128 tokens) measured slower than 128 x 256 (1.33 against 1.17 ms at M = 8192)."""

    def __init__(self, k: int, tile_n: int = 256, stages: int | None = None, ahead: int = 2, probe: str = "full",
                 tile_m: int = TILE_M, cluster_m: int = 1, grouped: bool = False, swiglu: bool = False, batched: bool = False,
                 split_k: bool = False, pdl: str = "off", stream_k: bool = False, store_bytes: int = 16, decoders: int = 1,
                 staged: bool = False, early_alpha: bool = False, dsmem_split: bool = False):
        _check_shape(k, tile_n, DECODER_TILE_N)
        # decoders: decoder warpgroups (1 or 2); with 2 each decodes half the rows of every chunk, so two warps an
        # SM sub-partition hide each other's latencies (the launch's 512 threads cap the registers at 128 a thread)
        if decoders not in (1, 2) or (decoders == 2 and (swiglu or tile_m * tile_n > 128 * 128)):
            raise ValueError(f"decoders must be 1, or 2 without the SwiGLU and with at most 128 tokens a 128-row tile "
                             f"(128 registers a thread), got {decoders}")
        self.decoders = decoders
        self.decoder_threads = DECODER_THREADS * decoders
        # store_bytes: the decoder's shared stores of the bf16 tile, 8 bytes (rows g and g + 8, 4 k each; lanes of
        # odd g // 2 swap their word order so a store costs the minimum 2 wavefronts) or 16 (8 k of a row: half
        # the store instructions, no word swap)
        if store_bytes not in (8, 16):
            raise ValueError(f"store_bytes must be 8 or 16, got {store_bytes}")
        self.store_bytes = store_bytes
        # stream_k: ``parts`` CTAs (clusters) share the (tile, quad) work evenly, each a contiguous range of it in
        # tile-major order, so that every SM gets the same work whatever the tile count: a part covers the end of
        # one tile and the start of the next (at most a few segments). A tile's segments meet as split_k's do (the
        # last to arrive adds the others' fp32 partials in segment order and runs the epilogue)
        self.stream_k = stream_k
        if stream_k and (grouped or split_k):
            raise ValueError("stream_k is for the plain (and SwiGLU) kernel, without split_k")
        # pdl (programmatic dependent launch, see gemm_decode.PDL_MODES): the CTAs may start while the previous
        # kernel on the stream still runs; the decoder warps load their first weight chunks, the TMA warp waits
        # (griddepcontrol.wait) before the first x load, the MMA warps before they write y or the workspace.
        # Not for the grouped kernel: its tile table is written by the kernel before it.
        if pdl not in PDL_MODES or (pdl != "off" and grouped):
            raise ValueError(f"pdl must be one of {PDL_MODES} (off for the grouped kernel), got {pdl!r}")
        self.pdl = pdl
        # split_k: the grid's z axis splits K (quads per split from the launch); each MMA warp writes its fp32
        # fragment to a workspace (16-byte stores, coalesced across the warp) and the last of a tile's splits to
        # arrive (an acq_rel counter per tile and warp, reset by it) adds the others' (2 splits: own + other,
        # the same sum whichever arrives last; more: all in split order) and runs the epilogue. For grids too
        # small to fill the SMs (see wgmma_plan)
        self.split_k = split_k
        if split_k and grouped:
            raise ValueError("split_k is for the plain (and SwiGLU) kernel, not the grouped or batched ones")
        # batched (with grouped): every group takes its own K columns of one x [m, E * k] (group e: columns
        # e k .. e k + k - 1, by the TMA coordinates: no regrouping copy) and writes its own n columns of one
        # y [m, E * n]; the tile table then lists (e, first row, m) for every group (wo_a: 16 groups, all tokens)
        self.batched = batched
        if batched and (not grouped or swiglu):
            raise ValueError("the batched kernel is a grouped kernel without the SwiGLU epilogue")
        # swiglu: the weight is gate_up ([gate; up], 2I rows) and y the clamped SwiGLU [M, I]. Decoder warp w takes
        # gate row group 4 rb + w and its up row group and writes them interleaved by 8 rows (tile row group 2w + h:
        # rows 0-7 the gate rows 8h..8h+7 of the pair, rows 8-15 the same up rows), so that the thread holding the
        # gate accumulator of (column, token) in the WGMMA fragment (row g) also holds its up (row g + 8)
        self.swiglu = swiglu
        if swiglu and tile_m != TILE_M:
            raise ValueError(f"the SwiGLU epilogue needs tile_m={TILE_M} (one gate and one up row group per decoder warp)")
        # grouped: E weights stacked, token tile j of the grid is row j of a tile table (expert, first row, end row
        # of its expert; see grouped_tile_table), so one launch covers every expert's rows
        self.grouped = grouped
        if cluster_m not in (1, 2):
            raise ValueError(f"cluster_m must be 1 or 2, got {cluster_m}")
        # cluster_m = 2: two CTAs on neighbouring weight row blocks and the same tokens form a cluster, and each
        # loads half of the x tile by TMA multicast to both: half the x traffic out of L2
        self.cluster_m = cluster_m
        if tile_m not in (128, 256) or tile_m * tile_n > 128 * 256:
            raise ValueError(f"tile_m must be 128 or 256 with tile_m * tile_n <= 128 * 256 (128 fp32 accumulators a thread), "
                             f"got {tile_m} x {tile_n}")
        self.tile_m = tile_m
        self.rg_per_warp = tile_m // (4 * decoders * D.ROWS_PER_GROUP)  # weight row groups each decoder warp decodes
        self.a_stage_words = tile_m * TILE_K // 2
        if ahead not in (2, 4, 8, 16):
            raise ValueError(f"ahead (chunks of weight words in flight) must be 2, 4, 8 or 16, got {ahead}")
        if probe not in DECODER_PROBES:
            raise ValueError(f"probe must be one of {DECODER_PROBES}, got {probe!r}")
        self.ahead = ahead  # 8 / 16: two / four quads per decode-loop trip, the quads past whole trips one at a time
        # timing only: "noload" (made-up words), "nofence" (no proxy fence), "nostore" (no tile stores), "noepilogue" (no y
        # stores, unless the first accumulator is an impossible value, which keeps the MMAs live): wrong results
        self.probe = probe
        self.k = k
        self.chunks = k // D.CHUNK_K
        self.quads = k // D.QUAD_K
        self.tile_n = tile_n
        self.stages = stages or decoder_default_stages(tile_n, tile_m)
        self.threads = self.decoder_threads + THREADS
        # staged: the epilogue through shared memory (store_tile_staged), each MMA warp in its own warpgroup's half of
        # the weight stages (free once the warpgroup's last MMAs are done; the other warpgroup never reads it). Not with
        # stream-K (the decoder fills the stages with the next segment meanwhile) nor the SwiGLU epilogue; the launch
        # asks for it only where y allows 16-byte stores.
        self.staged = (staged and tile_m == TILE_M and not (stream_k or swiglu)
                       and 4 * tile_n * 8 <= self.stages * STAGE_HALF_WORDS)
        # early_alpha: the MMA warps read their rows' alpha (epilogue_alphas: 2 values a thread) before each tile's (or
        # segment's) main loop, not after it, where the epilogue (or the split sum before it) waited for them; the
        # direct epilogues (split K, stream-K, SwiGLU, 64-token tiles) read one per accumulator pair there, each behind
        # the y store before it (64 a thread at 256 tokens). H100, late and early alternating in one process
        # (data/bench/wgmma_variants_nvidia_h100_80gb_hbm3_defdabc_early_alpha.json): M = 64 gate_up 25.4 -> 24.4 us,
        # down 14.8 -> 14.0, wo_b 50.4 -> 49.5; gate_up + SwiGLU M = 256 51.6 -> 50.6; but fused_wqa_wkv M = 256 (128-token
        # tiles, 4 splits) 22.7 -> 23.2; M = 1024 within the drift of that run (+-3%)
        self.early_alpha = early_alpha
        # dsmem_split: two K splits of a tile form a cluster (1, 1, 2) and meet in distributed shared memory instead
        # of the workspace: after its main loop each CTA tells the other its x stages are free, its warpgroup 1 - z
        # writes its fp32 fragment into the other CTA's x stages (st.async, counted on that CTA's mbarrier), and
        # its warpgroup z adds the other's fragment to its own and stores its 64 rows (_sum_splits_dsmem). No x
        # multicast (cluster_m 1), no workspace, no counters, no gpu-scope fences. H100, the workspace split (with x
        # multicast) and this one alternating in one process (data/bench/wgmma_variants_nvidia_h100_80gb_hbm3_a80d730_dsmem.json):
        # gate_up M = 64 24.3 -> 22.9 us, M = 128 32.2 -> 28.7, M = 256 47.5 -> 43.1; down M = 64 14.0 -> 12.5, M = 128
        # 17.8 -> 15.1; gate_up + SwiGLU M = 128 34.3 -> 31.6, M = 256 51.5 -> 48.9; wo_b M = 128 64.2 -> 61.7
        # dsmem_split=4 (four splits, the plain kernel with the direct epilogue): a cluster (1, 1, 4); CTA z finishes
        # the z-th quarter of the tile's tokens, every thread sending the other quarters of its fragment to their CTAs
        # and summing the four in split order, as the workspace's sum of more than two splits does
        # (_sum_splits_dsmem_tokens)
        self.dsmem_splits = 0 if not dsmem_split else 2 if dsmem_split is True else int(dsmem_split)
        if self.dsmem_splits and not (self.dsmem_splits in (2, 4) and split_k and cluster_m == 1 and tile_m == TILE_M
                                      and not (grouped or stream_k) and not (self.dsmem_splits == 4 and swiglu)):
            raise ValueError("dsmem_split is split K (2 splits, or 4 without the SwiGLU) of the plain or SwiGLU kernel with tile_m 128 "
                             "and cluster_m 1")
        self.dsmem_split = bool(self.dsmem_splits)
        if self.dsmem_splits == 4:
            self.staged = False  # each CTA stores a quarter of the tokens: the direct epilogue

    @cute.jit
    def __call__(self, x_ptr: cute.Pointer, w_ptr: cute.Pointer, s_ptr: cute.Pointer, alpha_ptr: cute.Pointer,
                 y_ptr: cute.Pointer, tiles_ptr: cute.Pointer, ws_ptr: cute.Pointer, cnt_ptr: cute.Pointer, m: Int32, n: Int32,
                 row_groups: Int32, experts: Int32, token_tiles: Int32, limit: Float32, splits: Int32, parts: Int32, stream):
        """As :meth:`GemmWgmmaKernel.__call__` (the scale words are read per lane: [RG, k/256, 32, 2]), with E =
        ``experts`` weights stacked (words [E * RG, ...], scale words [E * RG, ...], alpha fp32 [E, n]; E = 1
        when not grouped). ``token_tiles``: the grid's token tiles (ceil(m / tile_n) when not grouped); grouped,
        tiles_ptr is int32 [token_tiles, 3] (:func:`grouped_tile_table`), else unused. With ``swiglu``: n = I (y is
        bf16 [m, I]), row_groups = 2I / 16, alpha [E, 2I], ``limit`` the SwiGLU clamp. With ``split_k``: ``splits``
        K splits (grid z), ws_ptr fp32 [tiles, splits, F / 4, 256, 4] (F = tile_m * tile_n / 256 accumulators a
        thread) and cnt_ptr int32 [2, tiles, 8], zero before the first launch (the kernel leaves it zero); tiles =
        row blocks x token tiles. With ``stream_k``: ``parts`` clusters share the work and ``splits`` is the most
        segments any tile has (:func:`stream_segments`; the workspace's second dimension)."""
        mX, mW, mAlpha, mY = _global_tensors(x_ptr, w_ptr, alpha_ptr, y_ptr, m, n, experts * row_groups, self.k)
        if cutlass.const_expr(self.batched):
            mX = cute.make_tensor(x_ptr, cute.make_layout((m, experts * self.k), stride=(experts * self.k, 1)))
            mY = cute.make_tensor(y_ptr, cute.make_layout((m, experts * n), stride=(experts * n, 1)))
        if cutlass.const_expr(self.swiglu):
            mAlpha = cute.make_tensor(alpha_ptr, cute.make_layout((2 * n,)))
        mS = cute.make_tensor(s_ptr, cute.make_layout((experts * row_groups, self.quads, 32, 2), stride=(self.quads * 64, 64, 2, 1)))
        mTiles = cute.make_tensor(tiles_ptr, cute.make_layout((token_tiles, 3), stride=(3, 1)))
        tiled_mma = _tiled_mma(self.tile_n, warpgroup.OperandSource.SMEM)
        mma_tiler = (self.tile_m, self.tile_n, TILE_K)
        a_staged = sm90_utils.make_smem_layout_a(cutlass.utils.LayoutEnum.ROW_MAJOR, mma_tiler, BFloat16, self.stages)
        x_staged = sm90_utils.make_smem_layout_b(cutlass.utils.LayoutEnum.ROW_MAJOR, mma_tiler, BFloat16, self.stages)
        x_one = cute.slice_(x_staged, (None, None, 0))
        if cutlass.const_expr(self.cluster_m > 1):
            tma_atom, tma_x = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SMulticastOp(), mX, x_one,
                                                          (self.tile_n, TILE_K), num_multicast=self.cluster_m)
        else:
            tma_atom, tma_x = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), mX, x_one, (self.tile_n, TILE_K))
        tma_bytes = cute.size_in_bytes(BFloat16, x_one)

        @cute.struct
        class SharedStorage:
            x_barriers: cute.struct.MemRange[cutlass.Int64, self.stages * 2]
            a_barriers: cute.struct.MemRange[cutlass.Int64, self.stages * 2]
            split_barriers: cute.struct.MemRange[cutlass.Int64, 2]  # dsmem_split: [the other CTA's x stages free, its fragment in]
            sA: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(a_staged)], 1024]
            sX: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(x_staged)], 1024]

        self.shared_storage = SharedStorage
        self.tma_bytes = tma_bytes
        rg_per_cta = self.tile_m // D.ROWS_PER_GROUP
        row_blocks = (row_groups + rg_per_cta - 1) // rg_per_cta  # with swiglu: I / 64 (64 gate and 64 up rows a CTA)
        row_blocks = (row_blocks + self.cluster_m - 1) // self.cluster_m * self.cluster_m  # whole clusters
        frag = self.tile_m * self.tile_n // THREADS
        # [tile, split, frag / 4, thread, 4]: a warp's 16-byte store of fragment elements 4j..4j+3 is 512
        # consecutive bytes (coalesced)
        mWs = cute.make_tensor(ws_ptr, cute.make_layout((row_blocks * token_tiles, splits, frag // 4, THREADS, 4),
                                                        stride=(splits * THREADS * frag, THREADS * frag, THREADS * 4, 4, 1)))
        # [arrivals | written, tile, MMA warp] (see _sum_splits)
        mCnt = cute.make_tensor(cnt_ptr, cute.make_layout((2, row_blocks * token_tiles, THREADS // 32),
                                                          stride=(row_blocks * token_tiles * (THREADS // 32), THREADS // 32, 1)))
        grid = [row_blocks, token_tiles, splits]
        if cutlass.const_expr(self.stream_k):
            grid = [self.cluster_m, 1, parts]
        self.kernel(tma_atom, tma_x, mW, mS, mAlpha, mY, mTiles, mWs, mCnt, tiled_mma, a_staged, x_staged, m, n, row_groups, limit,
                    splits, row_blocks, token_tiles, parts).launch(
            grid=grid, block=[self.threads, 1, 1], cluster=[self.cluster_m, 1, self.dsmem_splits or 1], stream=stream,
            use_pdl=self.pdl != "off")

    @cute.kernel
    def kernel(self, tma_atom: cute.CopyAtom, mX_tma: cute.Tensor, mW: cute.Tensor, mS: cute.Tensor, mAlpha: cute.Tensor,
               mY: cute.Tensor, mTiles: cute.Tensor, mWs: cute.Tensor, mCnt: cute.Tensor, tiled_mma: cute.TiledMma,
               a_staged: cute.ComposedLayout, x_staged: cute.ComposedLayout, m: Int32, n: Int32, row_groups: Int32, limit: Float32,
               splits: Int32, row_blocks: Int32, token_tiles: Int32, parts: Int32):
        tidx, rb, tb, warp, lane, g = _kernel_ids(tma_atom)
        if cutlass.const_expr(self.pdl == "start"):
            cute.arch.griddepcontrol_launch_dependents()
        # this CTA's quads of K: all of them, or split z of ``splits`` (ceil(quads / splits) quads each)
        q_begin, q_end, split = 0, self.quads, Int32(0)
        if cutlass.const_expr(self.split_k):
            _, _, split = cute.arch.block_idx()
            per_split = (self.quads + splits - 1) // splits
            q_begin = split * per_split
            q_end = cutlass.min(q_begin + per_split, self.quads)
        if cutlass.const_expr(self.grouped):
            expert, row0, row_end = mTiles[tb, 0], mTiles[tb, 1], mTiles[tb, 2]
        else:
            expert, row0, row_end = Int32(0), tb * self.tile_n, m
        # grouped: the table's tiles past the last expert's have no rows (both CTAs of a cluster share tb, so
        # they skip together, before any cluster-wide barrier)
        stream = None
        if cutlass.const_expr(self.stream_k):
            # grid (cluster_m, 1, parts): part z takes the work units [z U / P, (z + 1) U / P) of U = tiles x quads,
            # tiles in the order (token tile, row block pair); rank x of its cluster takes row block 2 pair + x
            _, _, part = cute.arch.block_idx()
            pair_blocks = row_blocks // self.cluster_m
            units = pair_blocks * token_tiles * self.quads
            u0 = part * units // parts
            u1 = (part + 1) * units // parts
            stream = StreamWork(part, parts, units, u0, u1, u0 // self.quads, (u1 - 1) // self.quads - u0 // self.quads + 1,
                                pair_blocks, row_blocks, rb)
        if row0 < row_end:
            self._tile(tma_atom, mX_tma, mW, mS, mAlpha, mY, mWs, mCnt, tiled_mma, a_staged, x_staged, tidx, rb, warp, lane, g, expert,
                       row0, row_end, n, row_groups, limit, q_begin, q_end, split, splits, tb * row_blocks + rb, stream)

    @cute.jit
    def _stream_segment(self, stream, si: Int32):
        """Segment si of a stream_k part: (row block, first token row, first quad, end quad, the segment's index
        among its tile's segments, the tile's segment count, the tile's workspace slot)."""
        Q = self.quads
        t = stream.t_first + si
        qa = cutlass.max(stream.u0, t * Q) - t * Q
        qb = cutlass.min(stream.u1, (t + 1) * Q) - t * Q
        tb = t // stream.pair_blocks
        rb = (t - tb * stream.pair_blocks) * self.cluster_m + stream.rank
        # the part holding work unit u is ((u + 1) P - 1) // U: the tile's first and last parts
        first = ((t * Q + 1) * stream.parts - 1) // stream.units
        last = ((t + 1) * Q * stream.parts - 1) // stream.units
        return rb, tb * self.tile_n, qa, qb, stream.part - first, last - first + 1, tb * stream.row_blocks + rb

    @cute.jit
    def _tile(self, tma_atom: cute.CopyAtom, mX_tma: cute.Tensor, mW: cute.Tensor, mS: cute.Tensor, mAlpha: cute.Tensor,
              mY: cute.Tensor, mWs: cute.Tensor, mCnt: cute.Tensor, tiled_mma: cute.TiledMma, a_staged: cute.ComposedLayout,
              x_staged: cute.ComposedLayout, tidx: Int32, rb: Int32, warp: Int32, lane: Int32, g: Int32, expert: Int32, row0: Int32,
              row_end: Int32, n: Int32, row_groups: Int32, limit: Float32, q_begin, q_end, split: Int32, splits: Int32, slot: Int32,
              stream=None):
        """One CTA tile: weight rows of row block rb (of weight ``expert``) x the tile_n token rows from row0; with
        stream_k the segments of ``stream`` (a :class:`StreamWork`) one after another instead."""
        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        # x: the stage a CTA's TMA fills is the same in every CTA of the cluster, so its empty barrier counts the
        # releases of every CTA's MMA warps (cluster_m x 8)
        cta_layout_mnk = cute.make_layout((self.cluster_m, 1, 1))
        cluster_rank = cute.arch.make_warp_uniform(cute.arch.block_idx_in_cluster())
        if cutlass.const_expr(self.dsmem_split):  # the cluster is the tile's two K splits: no x multicast
            cluster_rank = Int32(0)
        cluster_coord = cta_layout_mnk.get_flat_coord(cluster_rank)
        x_pipe = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.x_barriers.data_ptr(), num_stages=self.stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.cluster_m * (THREADS // 32)),
            tx_count=self.tma_bytes, cta_layout_vmnk=cute.make_layout((1, self.cluster_m, 1, 1)), defer_sync=True)
        a_pipe = pipeline.PipelineAsync.create(
            barrier_storage=storage.a_barriers.data_ptr(), num_stages=self.stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.decoder_threads),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, THREADS), defer_sync=True)
        pipeline.pipeline_init_arrive(cluster_shape_mn=(self.cluster_m, 1), is_relaxed=True)
        pipeline.pipeline_init_wait(cluster_shape_mn=(self.cluster_m, 1))
        dsmem = None
        if cutlass.const_expr(self.dsmem_split):
            bars = storage.split_barriers.data_ptr()
            if tidx == 0:
                cute.arch.mbarrier_init(bars, THREADS * (self.dsmem_splits - 1))  # the other CTAs' MMA threads: their x stages are free
                cute.arch.mbarrier_init(bars + 1, 1)  # this CTA's receiving warpgroup expects the other's fragment
                cute.arch.mbarrier_init_fence()
            cute.arch.cluster_arrive_relaxed()  # both CTAs' barriers exist before either arrives on the other's
            cute.arch.cluster_wait()
            dsmem = (bars, cute.recast_ptr(storage.sX.data_ptr(), dtype=Float32))
        sA = storage.sA.get_tensor(a_staged.outer, swizzle=a_staged.inner)
        sX = storage.sX.get_tensor(x_staged.outer, swizzle=x_staged.inner)
        if warp < self.decoder_threads // 32:
            sA32 = cute.make_tensor(cute.recast_ptr(storage.sA.data_ptr(), dtype=Int32),
                                    cute.make_layout((self.stages * self.a_stage_words,)))
            mcast_mask = cute.make_layout_image_mask(cta_layout_mnk, cluster_coord, mode=0) if cutlass.const_expr(self.cluster_m > 1) else 0
            x_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
            a_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
            if cutlass.const_expr(self.stream_k):
                for si in cutlass.range(stream.segments, unroll=1):
                    s_rb, s_row0, s_qa, s_qb, _, _, _ = self._stream_segment(stream, si)
                    x_state, a_state = self._decode_segment(mX_tma, mW, mS, sA32, sX, x_pipe, a_pipe, tma_atom, cluster_coord, warp, lane,
                                                            s_rb, s_row0, expert, row_groups, mcast_mask, s_qa, s_qb, x_state, a_state)
            else:
                x_state, a_state = self._decode_segment(mX_tma, mW, mS, sA32, sX, x_pipe, a_pipe, tma_atom, cluster_coord, warp, lane,
                                                        rb, row0, expert, row_groups, mcast_mask, q_begin, q_end, x_state, a_state)
            if cutlass.const_expr(self.cluster_m > 1):
                if warp == 0:  # every release (the peer CTA's too) has landed before this CTA exits
                    x_pipe.producer_tail(x_state)
        else:
            thr_mma = tiled_mma.get_slice(tidx - self.decoder_threads)
            tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
            tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sX))
            acc = cute.make_rmem_tensor(thr_mma.partition_shape_C((self.tile_m, self.tile_n)), Float32)
            tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
            read = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
            release = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
            if cutlass.const_expr(self.stream_k):
                for si in cutlass.range(stream.segments, unroll=1):
                    s_rb, s_row0, s_qa, s_qb, s_part, s_parts, s_slot = self._stream_segment(stream, si)
                    read, release = self._mma_segment(tiled_mma, thr_mma, tCrA, tCrB, acc, x_pipe, a_pipe, read, release, mAlpha, mY, mWs, mCnt,
                                                       tidx, lane, g, expert, s_rb, s_row0, row_end, n, limit, s_qa, s_qb, s_part, s_parts, s_slot)
            else:
                stage32 = None
                if cutlass.const_expr(self.staged):
                    mwarp = (tidx - self.decoder_threads) // 32  # MMA warp 4v + w: warpgroup v's half of the stages, slot w
                    offset = (mwarp % 4) * self.tile_n * 8
                    stage32 = cute.make_tensor(cute.recast_ptr(storage.sA.data_ptr(), dtype=Int32)
                                               + (offset // STAGE_HALF_WORDS) * self.a_stage_words + (mwarp // 4) * STAGE_HALF_WORDS
                                               + offset % STAGE_HALF_WORDS, cute.make_layout((self.tile_n * 8,)))
                read, release = self._mma_segment(tiled_mma, thr_mma, tCrA, tCrB, acc, x_pipe, a_pipe, read, release, mAlpha, mY, mWs, mCnt,
                                                   tidx, lane, g, expert, rb, row0, row_end, n, limit, q_begin, q_end, split, splits, slot,
                                                   stage32, dsmem)

    @cute.jit
    def _mma_segment(self, tiled_mma, thr_mma, tCrA, tCrB, acc: cute.Tensor, x_pipe, a_pipe, read, release, mAlpha: cute.Tensor,
                     mY: cute.Tensor, mWs: cute.Tensor, mCnt: cute.Tensor, tidx: Int32, lane: Int32, g: Int32, expert: Int32, rb: Int32,
                     row0: Int32, row_end: Int32, n: Int32, limit: Float32, q_begin, q_end, split: Int32, splits: Int32, slot: Int32,
                     stage32=None, dsmem=None):
        """MMA warpgroups: quads q_begin .. q_end - 1 of one tile (row block rb x the tile_n tokens from row0) into
        ``acc``, then the split sum (``splits`` > 1: this is part ``split`` of the tile's K) and the epilogue.
        Returns the consumer states (read, release), both past the segment's last chunk."""
        alphas = None
        if cutlass.const_expr(self.early_alpha):  # the epilogue's factors, read now so that the main loop hides their latency
            if cutlass.const_expr(self.pdl != "off"):
                cute.arch.griddepcontrol_wait()  # alpha is read after the kernel before, as x is (the MMAs wait for x anyway)
            alphas = epilogue_alphas(acc, thr_mma, self._expert_alpha(mAlpha, expert, n), rb, n, self.tile_n, self.tile_m, self.swiglu)
        acc.fill(0.0)
        for kt in cutlass.range((q_end - q_begin) * 4, unroll=1):
            x_pipe.consumer_wait(read)
            a_pipe.consumer_wait(read)
            warpgroup.fence()
            for s in cutlass.range_constexpr(STEPS):
                cute.gemm(tiled_mma, acc, tCrA[None, None, s, read.index], tCrB[None, None, s, read.index], acc)
            warpgroup.commit_group()
            warpgroup.wait_group(1)  # chunk kt - 1's MMAs are done: release its stages
            if kt > 0:
                x_pipe.consumer_release(release)
                a_pipe.consumer_release(release)
                release.advance()
            read.advance()
        warpgroup.wait_group(0)
        if cutlass.const_expr(self.staged):  # the whole warpgroup's MMAs are done before its warps overwrite the stages
            cute.arch.barrier(barrier_id=1 + (tidx - self.decoder_threads) // 128, number_of_threads=128)
        # the last chunk's stages too: with a cluster the producer's tail waits for every release
        x_pipe.consumer_release(release)
        a_pipe.consumer_release(release)
        release.advance()
        if cutlass.const_expr(self.pdl == "loop"):
            cute.arch.griddepcontrol_launch_dependents()
        if cutlass.const_expr(self.pdl != "off" and not self.early_alpha):  # (early_alpha: waited before reading alpha)
            cute.arch.griddepcontrol_wait()  # before the first global write (returns at once: x has arrived)
        last = cutlass.Boolean(True)
        if cutlass.const_expr(self.dsmem_splits == 4):
            # the sum and the epilogue of this CTA's quarter of the tokens (its pairs, static in each branch)
            pairs = cute.size(acc) // 2 // 4
            for zz in cutlass.range_constexpr(4):
                if split == zz:
                    self._sum_splits_dsmem_tokens(acc, dsmem, tidx - self.decoder_threads, zz)
                    store_tile(acc, thr_mma, self._expert_alpha(mAlpha, expert, n), mY, rb, row0, row_end, n, g, self.tile_n, self.tile_m,
                               0, alphas, (zz * pairs, (zz + 1) * pairs))
            last = cutlass.Boolean(False)
        elif cutlass.const_expr(self.dsmem_split):
            last = self._sum_splits_dsmem(acc, dsmem, tidx - self.decoder_threads, split)
        elif cutlass.const_expr(self.split_k or self.stream_k):
            if splits > 1:
                last = self._sum_splits(acc, mWs, mCnt, tidx - self.decoder_threads, lane, split, splits, slot)
        if cutlass.const_expr(self.probe == "noepilogue"):
            last = last & (acc[0] == Float32(-1.0e30))
        if last:
            alpha = self._expert_alpha(mAlpha, expert, n)
            if cutlass.const_expr(self.swiglu):
                store_tile_swiglu(acc, thr_mma, alpha, mY, rb, row0, row_end, n, g, limit, self.tile_n, alphas)
            else:
                y_col0 = expert * n if cutlass.const_expr(self.batched) else 0  # batched: the group's n columns
                if cutlass.const_expr(self.staged):
                    store_tile_staged(acc, thr_mma, alpha, mY, rb, row0, row_end, n, g, lane, (tidx - self.decoder_threads) // 32,
                                      stage32, self.tile_n, y_col0, alphas)
                else:
                    store_tile(acc, thr_mma, alpha, mY, rb, row0, row_end, n, g, self.tile_n, self.tile_m, y_col0, alphas)
        return read, release

    @cute.jit
    def _expert_alpha(self, mAlpha: cute.Tensor, expert: Int32, n: Int32):
        """The alpha of weight ``expert``: fp32 [n] (with swiglu [2I], the gate columns first)."""
        if cutlass.const_expr(self.swiglu):
            return cute.make_tensor(mAlpha.iterator + expert * 2 * n, cute.make_layout((2 * n,)))
        return cute.make_tensor(mAlpha.iterator + expert * n, cute.make_layout((n,)))

    @cute.jit
    def _add_partial(self, flat: cute.Tensor, base, frag: int):
        """flat[i] += the partial at ``base`` (one thread's [frag / 4, stride THREADS * 4, 4] slice), 16 loads in flight."""
        for j0 in cutlass.range_constexpr(0, frag // 4, 16):
            part = [load_cg_v4_f32((base + (j0 + j) * THREADS * 4).llvm_ptr) for j in range(min(16, frag // 4 - j0))]
            for j in cutlass.range_constexpr(len(part)):
                for e in cutlass.range_constexpr(4):
                    flat[4 * (j0 + j) + e] = flat[4 * (j0 + j) + e] + part[j][e]

    @cute.jit
    def _sum_splits(self, acc: cute.Tensor, mWs: cute.Tensor, mCnt: cute.Tensor, mt: Int32, lane: Int32, split: Int32,
                    splits: Int32, slot: Int32):
        """Split K: a tile's splits meet through the workspace, per MMA warp; the last warp to arrive (an acq_rel
        counter per tile and warp, ``mCnt[0]``) adds the others' fp32 fragments (own + other for two splits; all
        in split order for more: the same sum whichever arrives last), resets the counters and runs the
        epilogue. Returns whether this warp is that last one (warp-uniform).

        Two orders. Fragments of at least :data:`ARRIVE_FIRST_FRAG` floats a thread (tiles of 128 x 128 and up):
        a warp counts its arrival first; every warp but the last then writes its fragment and counts that
        (``mCnt[1]``, release), and the last keeps its own in registers (two splits) and waits until the others'
        are written. It waits only on warps that have already arrived, so the wait always ends. Smaller
        fragments: every warp writes, then arrives (no wait). H100 K sweeps (``data/bench/wgmma_k_sweep_*``,
        2230fba against d5897c9): the two-split sum 1.4-1.7 us cheaper at 256-token tiles, 0.4-1.3 at 128, and
        0.3-0.6 us dearer at 64 with the first order."""
        frag = cute.size(acc)
        flat = cute.make_tensor(acc.iterator, cute.make_layout(frag))  # acc is compact: a flat view
        arrive_first = frag >= ARRIVE_FIRST_FRAG
        mwarp = mt // 32
        arrivals = mCnt.iterator + cute.crd2idx((0, slot, mwarp), mCnt.layout)
        written = mCnt.iterator + cute.crd2idx((1, slot, mwarp), mCnt.layout)
        own = mWs.iterator + cute.crd2idx((slot, split, 0, mt, 0), mWs.layout)
        if cutlass.const_expr(not arrive_first):
            self._store_partial(flat, own, frag)
            cute.arch.fence_acq_rel_gpu()
            cute.arch.sync_warp()
        rank = Int32(0)
        if lane == 0:
            rank = cute.arch.atomic_add(arrivals.llvm_ptr, Int32(1), sem="acq_rel", scope="gpu")
        rank = cute.arch.shuffle_sync(rank, 0)
        last = rank == splits - 1
        if cutlass.const_expr(arrive_first):
            if (not last) or splits > 2:  # the last's own fragment stays in registers with two splits
                self._store_partial(flat, own, frag)
            if not last:
                cute.arch.fence_acq_rel_gpu()
                cute.arch.sync_warp()
                if lane == 0:
                    cute.arch.atomic_add(written.llvm_ptr, Int32(1), sem="release", scope="gpu")
        if last:
            if cutlass.const_expr(arrive_first):
                if lane == 0:  # the others have arrived: wait until their fragments are written
                    seen = cute.arch.load(written.llvm_ptr, Int32, sem="acquire", scope="gpu")
                    while seen < splits - 1:
                        seen = cute.arch.load(written.llvm_ptr, Int32, sem="acquire", scope="gpu")
                cute.arch.sync_warp()
            cute.arch.fence_acq_rel_gpu()
            if splits == 2:  # own + other: the same two fp32 whichever split arrives last (addition commutes)
                self._add_partial(flat, mWs.iterator + cute.crd2idx((slot, 1 - split, 0, mt, 0), mWs.layout), frag)
            else:  # every split in split order (deterministic)
                for i in cutlass.range_constexpr(frag):
                    flat[i] = Float32(0.0)
                for s in cutlass.range(splits, unroll=1):
                    self._add_partial(flat, mWs.iterator + cute.crd2idx((slot, s, 0, mt, 0), mWs.layout), frag)
            if lane == 0:
                cute.arch.store(arrivals.llvm_ptr, Int32(0))
                if cutlass.const_expr(arrive_first):
                    cute.arch.store(written.llvm_ptr, Int32(0))
        return last

    @cute.jit
    def _sum_splits_dsmem(self, acc: cute.Tensor, dsmem, mt: Int32, split: Int32):
        """dsmem_split: the tile's two K splits (CTAs z = 0, 1 of the cluster) meet in distributed shared memory.
        Every MMA thread arrives on the other CTA's ``free`` barrier (its own MMAs are done, so this CTA's x stages
        are free; 256 arrivals complete it). Warpgroup 1 - z waits for the other's arrivals, then writes its fragment
        into the other CTA's x stages ([frag / 4, 128 threads, 4] fp32: conflict-free 16-byte reads) with st.async,
        counted in bytes on that CTA's ``full`` barrier; warpgroup z expects those bytes, waits, adds them to its
        own fragment (own + other: the same fp32 sum whichever split holds the rows) and is the one that stores
        (returns True). A CTA exits only after the other's arrivals and bytes have landed (both warpgroups wait)."""
        bars, recv = dsmem
        free_bar, full_bar = bars, bars + 1
        frag = cute.size(acc)
        flat = cute.make_tensor(acc.iterator, cute.make_layout(frag))
        other = 1 - split
        wg = mt // 128
        i = mt % 128
        cute.arch.mbarrier_arrive(free_bar, other, scope=_CLUSTER_SCOPE)
        keep = wg == split
        if keep:
            if i == 0:
                cute.arch.mbarrier_arrive_and_expect_tx(full_bar, 128 * frag * 4)
            cute.arch.mbarrier_wait(full_bar, 0)
            for j in cutlass.range_constexpr(frag // 4):
                part = load_v4_b32((recv + (j * 128 + i) * 4).align(16))
                for e in cutlass.range_constexpr(4):
                    flat[4 * j + e] = flat[4 * j + e] + _f32_of_bits(part[e])
        else:
            mbarrier_wait_cluster(free_bar, 0)  # the other CTAs' arrivals: cluster-scope acquire
            for j in cutlass.range_constexpr(frag // 4):
                cute.arch.store_async_dsmem((recv + (j * 128 + i) * 4).align(16),
                                            tuple(_bits_of_f32(flat[4 * j + e]) for e in range(4)), full_bar, other)
        return keep

    @cute.jit
    def _sum_splits_dsmem_tokens(self, acc: cute.Tensor, dsmem, mt: Int32, z: int):
        """dsmem_split=4, in CTA z of the cluster (z static: the caller branches on the split): CTA zz finishes the
        fragment's token blocks v2 in [zz B, zz B + B) (B = tile_n / 32; flat fragment indices [zz Q, zz Q + Q), Q = F / 4).
        Every MMA thread arrives on each other CTA's ``free`` barrier, waits for the other three CTAs' 768 arrivals, and
        writes its quarter for CTA zz into CTA zz's x stages ([sender, Q / 4, 256 threads, 4] fp32) with st.async,
        counted in bytes on CTA zz's ``full`` barrier; then waits for its own quarter's three parts and sums the four in
        split order (the workspace's order for more than two splits) into its own fragment's quarter."""
        S = 4
        bars, recv = dsmem
        free_bar, full_bar = bars, bars + 1
        frag = cute.size(acc)
        Q = frag // S
        flat = cute.make_tensor(acc.iterator, cute.make_layout(frag))
        for zz in cutlass.range_constexpr(S):
            if cutlass.const_expr(zz != z):
                cute.arch.mbarrier_arrive(free_bar, zz, scope=_CLUSTER_SCOPE)
        if mt == 0:
            cute.arch.mbarrier_arrive_and_expect_tx(full_bar, (S - 1) * THREADS * Q * 4)
        mbarrier_wait_cluster(free_bar, 0)  # the other CTAs' arrivals: cluster-scope acquire
        for zz in cutlass.range_constexpr(S):
            if cutlass.const_expr(zz != z):
                for j in cutlass.range_constexpr(Q // 4):
                    cute.arch.store_async_dsmem((recv + ((z * (Q // 4) + j) * THREADS + mt) * 4).align(16),
                                                tuple(_bits_of_f32(flat[zz * Q + 4 * j + e]) for e in range(4)), full_bar, zz)
        cute.arch.mbarrier_wait(full_bar, 0)
        for j in cutlass.range_constexpr(Q // 4):
            parts = []
            for s_ in cutlass.range_constexpr(S):
                if cutlass.const_expr(s_ == z):
                    parts.append([flat[z * Q + 4 * j + e] for e in range(4)])
                else:
                    word = load_v4_b32((recv + ((s_ * (Q // 4) + j) * THREADS + mt) * 4).align(16))
                    parts.append([_f32_of_bits(word[e]) for e in range(4)])
            for e in cutlass.range_constexpr(4):
                total = parts[0][e]
                for s_ in cutlass.range_constexpr(1, S):
                    total = total + parts[s_][e]
                flat[z * Q + 4 * j + e] = total

    @cute.jit
    def _store_partial(self, flat: cute.Tensor, base, frag: int):
        """This thread's fragment -> its workspace slice at ``base`` (16-byte stores, coalesced across the warp)."""
        for j in cutlass.range_constexpr(frag // 4):
            store_v4_f32((base + j * THREADS * 4).llvm_ptr, flat[4 * j], flat[4 * j + 1], flat[4 * j + 2], flat[4 * j + 3])

    @cute.jit
    def _load_words(self, mW: cute.Tensor, rg: Int32, chunk: Int32, lane: Int32, wr: cute.Tensor, slot: int, i: int):
        if cutlass.const_expr(self.probe == "noload"):
            for w in cutlass.range_constexpr(4):
                wr[slot, i, w] = chunk * 0x01010101 + lane * 0x10001 + w
        else:
            cute.autovec_copy(mW[rg, chunk, lane, None], wr[slot, i, None])

    @cute.jit
    def _decode_segment(self, mX_tma: cute.Tensor, mW: cute.Tensor, mS: cute.Tensor, sA32: cute.Tensor, sX: cute.Tensor, x_pipe, a_pipe,
                        tma_atom, cluster_coord, warp: Int32, lane: Int32, rb: Int32, row0: Int32, expert: Int32, row_groups: Int32,
                        mcast_mask, q_begin, q_end, x_state, a_state):
        """Warpgroup 0: per chunk, the TMA of x (warp 0) and the decoded bf16 weight tile into shared memory, for
        row block rb of weight ``expert`` and the tile_n tokens from row0, quads q_begin .. q_end - 1 of K (all of
        them unless split_k / stream_k). Returns the producer states (x_state, a_state) past the segment."""
        x_col0 = expert * self.k if cutlass.const_expr(self.batched) else 0  # batched: the group's K columns
        gX = cute.local_tile(cute.domain_offset((row0, x_col0), mX_tma), (self.tile_n, TILE_K), (0, None))
        tXsX, tXgX = cpasync.tma_partition(tma_atom, cluster_coord[0], cute.make_layout(self.cluster_m),
                                           cute.group_modes(sX, 0, 2), cute.group_modes(gX, 0, 2))
        R = self.rg_per_warp
        rgs = self._row_groups(rb, warp, expert, row_groups)
        # raw words [slot, row group, word], `ahead` chunks in flight; scale words [row group, word] per quad
        wr = cute.make_rmem_tensor(cute.make_ordered_layout((self.ahead, R, 4), order=(2, 1, 0)), Int32)
        scur = cute.make_rmem_tensor(cute.make_ordered_layout((R, 2), order=(1, 0)), Int32)
        snxt = cute.make_rmem_tensor(cute.make_ordered_layout((R, 2), order=(1, 0)), Int32)
        c_end = q_end * 4
        for i in cutlass.range_constexpr(R):
            for c in cutlass.range_constexpr(self.ahead):
                self._load_words(mW, rgs[i], cutlass.min(q_begin * 4 + c, c_end - 1), lane, wr, c, i)
            cute.autovec_copy(mS[rgs[i], q_begin, lane, None], scur[i, None])
            cute.autovec_copy(mS[rgs[i], cutlass.min(q_begin + 1, q_end - 1), lane, None], snxt[i, None])
        if cutlass.const_expr(self.pdl != "off"):
            if warp == 0:  # the first weight chunks are in flight: now wait for the kernel that wrote x
                cute.arch.griddepcontrol_wait()
        per_trip = max(1, self.ahead // 4)  # quads per loop trip: the word ring is indexed statically
        trips = (q_end - q_begin) // per_trip
        for qt in cutlass.range(trips, unroll=1):
            for cu in cutlass.range_constexpr(4 * per_trip):
                x_state, a_state = self._decode_step(mW, mS, sA32, x_pipe, a_pipe, tma_atom, tXgX, tXsX, mcast_mask, warp, lane, rgs, wr,
                                                     scur, snxt, q_begin + qt * per_trip + cu // 4, cu, q_end, x_state, a_state)
        # quads past the whole trips (a split or stream-K segment): one at a time; after whole trips the ring is at slot 0
        for r in cutlass.range_constexpr(per_trip - 1):
            if (q_end - q_begin) % per_trip > r:
                for cu in cutlass.range_constexpr(4 * r, 4 * r + 4):
                    x_state, a_state = self._decode_step(mW, mS, sA32, x_pipe, a_pipe, tma_atom, tXgX, tXsX, mcast_mask, warp, lane, rgs,
                                                         wr, scur, snxt, q_begin + trips * per_trip + r, cu, q_end, x_state, a_state)
        return x_state, a_state

    @cute.jit
    def _decode_step(self, mW: cute.Tensor, mS: cute.Tensor, sA32: cute.Tensor, x_pipe, a_pipe, tma_atom, tXgX, tXsX, mcast_mask,
                     warp: Int32, lane: Int32, rgs, wr: cute.Tensor, scur: cute.Tensor, snxt: cute.Tensor, q, cu: int, q_end,
                     x_state, a_state):
        """Chunk cu % 4 of quad q from ring slot cu % ahead; then the words of the chunk ``ahead`` later into that slot
        and, at the quad's end, the scale words of quad q + 2."""
        ci = cu % 4
        kt = q * 4 + ci
        slot = cu % self.ahead
        x_state, a_state = self._decode_chunk(x_pipe, a_pipe, tma_atom, tXgX, tXsX, sA32, mcast_mask, warp, lane, kt, ci,
                                              wr[slot, None, None], scur, x_state, a_state)
        for i in cutlass.range_constexpr(self.rg_per_warp):
            self._load_words(mW, rgs[i], cutlass.min(kt + self.ahead, q_end * 4 - 1), lane, wr, slot, i)
        if cutlass.const_expr(ci == 3):
            for i in cutlass.range_constexpr(self.rg_per_warp):
                for w in cutlass.range_constexpr(2):
                    scur[i, w] = snxt[i, w]
                cute.autovec_copy(mS[rgs[i], cutlass.min(q + 2, q_end - 1), lane, None], snxt[i, None])
        return x_state, a_state

    @cute.jit
    def _row_groups(self, rb: Int32, warp, expert: Int32, row_groups: Int32):
        """The weight row groups decoder warp ``warp`` decodes for row block rb (R = tile_m / 64 of them; with
        swiglu its gate row group and that row group's up row group), clamped to the weight's last."""
        rg_base = expert * row_groups
        R = self.rg_per_warp
        if cutlass.const_expr(self.swiglu):  # [gate row group, its up row group]
            gate_rg = cutlass.min(rb * 4 + warp, row_groups // 2 - 1)
            return [rg_base + gate_rg, rg_base + gate_rg + row_groups // 2]
        return [rg_base + cutlass.min(rb * (self.tile_m // D.ROWS_PER_GROUP) + R * warp + i, row_groups - 1) for i in range(R)]

    @cute.jit
    def _decode_chunk(self, x_pipe, a_pipe, tma_atom, tXgX, tXsX, sA32: cute.Tensor, mcast_mask, warp: Int32, lane: Int32, kt, ci: int,
                      words: cute.Tensor, scales: cute.Tensor, x_state, a_state):
        """Chunk kt (ci = kt % 4 within its quad): warp 0 issues its x TMA; the warpgroup decodes ``words`` [R, 4]
        (this lane's words of its R row groups) with the quad's ``scales`` [R, 2] into the next A stage."""
        g = lane // 4
        t = lane % 4
        flip = (g >> 1) & 1  # word order: lanes of odd g // 2 store words kk ^ 1 (bank-conflict-free 8-byte stores)
        flip_mask = Int32(0) - flip
        R = self.rg_per_warp
        if warp == 0:
            x_pipe.producer_acquire(x_state)
            if cutlass.const_expr(self.cluster_m > 1):
                cute.copy(tma_atom, tXgX[(None, kt)], tXsX[(None, x_state.index)],
                          tma_bar_ptr=x_pipe.producer_get_barrier(x_state), mcast_mask=mcast_mask)
            else:
                cute.copy(tma_atom, tXgX[(None, kt)], tXsX[(None, x_state.index)],
                          tma_bar_ptr=x_pipe.producer_get_barrier(x_state))
            x_pipe.producer_commit(x_state)
            x_state.advance()
        a_pipe.producer_acquire(a_state)
        base = a_state.index * self.a_stage_words
        for i in cutlass.range_constexpr(R):
            word = scales[i, ci // 2]
            sel = (ci % 2) * 2
            scale_g = prmt(word, Int32(0), 0x4040 + sel * 0x0101) * 16 + SCALE_BIAS2
            scale_g8 = prmt(word, Int32(0), 0x4040 + (sel + 1) * 0x0101) * 16 + SCALE_BIAS2
            # tile rows of the row group's rows g and g + 8
            row = (R * warp + i) * D.ROWS_PER_GROUP + g
            row8 = row + 8
            if cutlass.const_expr(self.swiglu):  # interleaved: gate (i = 0) rows 0-7, up (i = 1) rows 8-15
                row = R * warp * D.ROWS_PER_GROUP + 8 * i + g
                row8 = row + D.ROWS_PER_GROUP
            if cutlass.const_expr(self.store_bytes == 16):
                for h in cutlass.range_constexpr(2):
                    # words kk = 2h, 2h + 1: k = 64 c + 16 t + 8 h .. + 7, the 16-byte chunk 2t + h (swizzled
                    # with the row) of rows g and g + 8; a quarter warp (g, g + 1) covers all 8 chunks once
                    even = decode_word(words[i, 2 * h], scale_g, scale_g8)
                    odd = decode_word(words[i, 2 * h + 1], scale_g, scale_g8)
                    chunk = ((2 * t + h) ^ g) * 4
                    if cutlass.const_expr(self.probe != "nostore"):
                        store_v4_b32(sA32.iterator + base + row * 32 + chunk, even[0], even[2], odd[0], odd[2])
                        store_v4_b32(sA32.iterator + base + row8 * 32 + chunk, even[1], even[3], odd[1], odd[3])
            else:
                for j in cutlass.range_constexpr(4):
                    # store j takes word kk = j ^ flip: the lane's words j and j ^ 1, swapped when flip
                    src = (words[i, j] & ~flip_mask) | (words[i, j ^ 1] & flip_mask)
                    regs = decode_word(src, scale_g, scale_g8)
                    kk = j ^ flip
                    # k = 64 c + 16 t + 4 kk: 16-byte chunk 2t + kk // 2 (swizzled with the row), byte 8 (kk % 2)
                    chunk = ((2 * t + (kk >> 1)) ^ g) * 4 + (kk & 1) * 2
                    lo = cute.make_rmem_tensor((2,), Int32)
                    hi = cute.make_rmem_tensor((2,), Int32)
                    lo[0] = regs[0]
                    lo[1] = regs[2]
                    hi[0] = regs[1]
                    hi[1] = regs[3]
                    if cutlass.const_expr(self.probe != "nostore"):
                        cute.autovec_copy(lo, cute.make_tensor(sA32.iterator + base + row * 32 + chunk, cute.make_layout((2,))))
                        cute.autovec_copy(hi, cute.make_tensor(sA32.iterator + base + row8 * 32 + chunk, cute.make_layout((2,))))
        if cutlass.const_expr(self.probe != "nofence"):
            cute.arch.fence_view_async_shared()  # the generic-proxy stores, visible to the WGMMAs (async proxy)
        a_pipe.producer_commit(a_state)
        a_state.advance()
        return x_state, a_state


@cute.jit
def mbarrier_wait_cluster(bar, phase: int):
    """Wait for phase ``phase`` of the mbarrier at ``bar`` (this CTA's shared memory) with cluster-scope acquire
    (``mbarrier.try_wait.parity.acquire.cluster``), for arrivals that other CTAs of the cluster made with cluster-scope
    release: their writes and reads before the arrival happen before this thread's accesses after the wait.
    ``cute.arch.mbarrier_wait`` waits with the default CTA-scope acquire."""
    done = _nvvm_wrapper.mbarrier_wait_parity(bar, phase, _nvvm_wrapper.MBarrierWait.TRY,
                                              scope=_nvvm_wrapper.MBarrierScope.CLUSTER, order=_nvvm_wrapper.MemOrder.ACQUIRE)
    while not done:
        done = _nvvm_wrapper.mbarrier_wait_parity(bar, phase, _nvvm_wrapper.MBarrierWait.TRY,
                                                  scope=_nvvm_wrapper.MBarrierScope.CLUSTER, order=_nvvm_wrapper.MemOrder.ACQUIRE)


@cute.jit
def store_tile(acc: cute.Tensor, thr_mma, mAlpha: cute.Tensor, mY: cute.Tensor, rb: Int32, row0: Int32, row_end: Int32, n: Int32,
               g: Int32, tile_n: cutlass.Constexpr, tile_m: cutlass.Constexpr = TILE_M, col0: Int32 = 0, alphas=None, pairs=None):
    """Epilogue of both schedules: the fp32 accumulators of a warpgroup's (64 weight rows x tile_n tokens,
    the tokens from row ``row0`` of y) -> ``y[token, col0 + col] = bf16(acc * alpha[col] * 2**7)``; tokens
    from ``row_end`` on (the end of y, or of the tile's expert) and columns past n are not stored. y's row
    pitch is ``mY.shape[1]`` (n, or E n for the batched kernel); col0 is even. ``alphas``: the factors read
    before (:func:`epilogue_alphas`), else read here. ``pairs`` (lo, hi): only the accumulator pairs lo .. hi - 1."""
    # epilogue: acc[(v0, v1, v2)] is (weight row mm, token nn) of the CTA tile, v0 the token pair. Lanes g and
    # g ^ 1 (same t) swap halves so that each lane stores two adjacent columns of one token (4 bytes).
    mY32 = cute.make_tensor(cute.recast_ptr(mY.iterator, dtype=Int32) + col0 // 2,
                            cute.make_layout((mY.shape[0], n // 2), stride=(mY.shape[1] // 2, 1)))
    shift7 = Float32(2.0 ** D.MAGNITUDE_SHIFT)
    odd = g % 2
    cC = cute.make_identity_tensor((tile_m, tile_n))
    tCcC = thr_mma.partition_C(cC)
    # acc is compact ((2, 2, tile_n / 8), tile_m / 128, 1): consecutive pairs (v0) are one column's two tokens
    for p in cutlass.range_constexpr(*_pair_range(pairs, cute.size(acc) // 2)):
        mm, nn = tCcC[2 * p]
        col = rb * tile_m + mm
        a = alphas[p] if cutlass.const_expr(alphas is not None) else mAlpha[cutlass.min(col, n - 1)] * shift7
        _store_pair(mY32, acc[2 * p] * a, acc[2 * p + 1] * a, odd, row0 + nn, col, row_end, n)


@cute.jit
def epilogue_alphas(acc: cute.Tensor, thr_mma, mAlpha: cute.Tensor, rb: Int32, n: Int32, tile_n: cutlass.Constexpr,
                    tile_m: cutlass.Constexpr = TILE_M, swiglu: cutlass.Constexpr = False):
    """The epilogue's factors ``alpha[col] * 2**7`` of this thread's accumulator rows, read ahead of the epilogue:
    a list over the accumulator pairs p (``acc[2p], acc[2p + 1]``: one weight row, two tokens) for :func:`store_tile`
    and :func:`store_tile_staged`; with ``swiglu`` the pair (gate, up) factors of the thread's one output column for
    :func:`store_tile_swiglu`. acc is compact ((2, 2, tile_n / 8), tile_m / 128, 1): pair p's row is v1 = p % 2
    (row g or g + 8) of row block r = p // (tile_n / 4), so each distinct row is read once."""
    shift7 = Float32(2.0 ** D.MAGNITUDE_SHIFT)
    tCcC = thr_mma.partition_C(cute.make_identity_tensor((tile_m, tile_n)))
    if cutlass.const_expr(swiglu):  # rows g / g + 8 are gate / up of column 64 rb + 8 (mm // 16) + mm % 8
        mm, _ = tCcC[0]
        col = cutlass.min(rb * 64 + 8 * (mm // D.ROWS_PER_GROUP) + mm % 8, n - 1)
        return mAlpha[col] * shift7, mAlpha[col + n] * shift7
    first, slot_of = _pair_rows(cute.size(acc) // 2, tile_n)
    rows = [mAlpha[cutlass.min(rb * tile_m + tCcC[2 * p][0], n - 1)] * shift7 for p in first]
    return [rows[r] for r in slot_of]


def _pair_range(pairs, count: int) -> tuple:
    """(lo, hi) of the accumulator pairs an epilogue stores: ``pairs``, or all ``count`` of them."""
    return tuple(pairs) if pairs is not None else (0, count)


def _pair_rows(pairs: int, tile_n: int):
    """(the first pair of each distinct accumulator row, each pair's index into that list): pair p's row is v1 = p % 2
    of row block p // (tile_n / 4) (see :func:`epilogue_alphas`)."""
    keys = [(p % 2, p // (tile_n // 4)) for p in range(pairs)]
    distinct = list(dict.fromkeys(keys))
    return [keys.index(key) for key in distinct], [distinct.index(key) for key in keys]


@cute.jit
def store_tile_staged(acc: cute.Tensor, thr_mma, mAlpha: cute.Tensor, mY: cute.Tensor, rb: Int32, row0: Int32, row_end: Int32,
                      n: Int32, g: Int32, lane: Int32, mwarp: Int32, stage32, tile_n: cutlass.Constexpr, col0: Int32 = 0, alphas=None):
    """:func:`store_tile` (tile_m 128) through shared memory, one MMA warp at a time: the warp writes its 16 weight
    rows x tile_n tokens as bf16 into ``stage32`` (Int32 shared memory, [tile_n tokens, 8 words]: one token's 16
    columns of y), then stores each token's 32 bytes with two 16-byte stores (whole sectors, a quarter of
    store_tile's 4-byte stores). Needs n, y's row pitch and col0 multiples of 8 and y 16-byte aligned (the launch
    checks: :func:`staged_epilogue`). H100 K sweep with the ``noepilogue`` probe
    (``data/bench/wgmma_k_sweep_*_945e304*``): store_tile cost ~5 us a 256-token tile, ~3 us a 128-token one; this
    one saved 1.0-1.6 of them (:data:`STAGED_EPILOGUE_MIN_TILE_N`)."""
    shift7 = Float32(2.0 ** D.MAGNITUDE_SHIFT)
    odd = g % 2
    tCcC = thr_mma.partition_C(cute.make_identity_tensor((TILE_M, tile_n)))
    for p in cutlass.range_constexpr(cute.size(acc) // 2):
        mm, nn = tCcC[2 * p]
        a = alphas[p] if cutlass.const_expr(alphas is not None) else mAlpha[cutlass.min(rb * TILE_M + mm, n - 1)] * shift7
        lo, hi = _swap_pair(acc[2 * p] * a, acc[2 * p + 1] * a, odd)
        stage32[(nn + odd) * 8 + (mm % D.ROWS_PER_GROUP - odd) // 2] = pack_bf16x2(lo, hi)
    cute.arch.sync_warp()
    pitch = mY.shape[1] // 2  # y's row pitch in words
    y_words = cute.recast_ptr(mY.iterator, dtype=Int32)
    for it in cutlass.range_constexpr(tile_n * 2 // 32):
        c = it * 32 + lane
        tok = c // 2
        col = rb * TILE_M + mwarp * D.ROWS_PER_GROUP + (c % 2) * 8
        if (row0 + tok < row_end) & (col < n):  # n a multiple of 8: a piece is wholly inside or outside y
            vals = load_v4_b32(stage32.iterator + tok * 8 + (c % 2) * 4)
            store_v4_b32(y_words + (row0 + tok) * pitch + (col0 + col) // 2, vals[0], vals[1], vals[2], vals[3])


@cute.jit
def _swap_pair(v0: Float32, v1: Float32, odd: Int32):
    """One column's values of tokens tok0 and tok0 + 1 (v0, v1) -> (lo, hi): lanes g and g ^ 1 (same t, columns col
    and col ^ 1) swap halves, so each holds two adjacent columns of one token: the even lane token tok0, the odd
    lane tok0 + 1."""
    recv = cute.arch.shuffle_sync_bfly(cutlass.select_(odd == 1, v0, v1), offset=4)
    return cutlass.select_(odd == 1, recv, v0), cutlass.select_(odd == 1, v1, recv)


@cute.jit
def _store_pair(mY32: cute.Tensor, v0: Float32, v1: Float32, odd: Int32, tok0: Int32, col: Int32, row_end: Int32, n: Int32):
    """Column ``col`` of tokens tok0 and tok0 + 1 (v0, v1) -> y, two adjacent columns of one token (4 bytes) a
    lane (:func:`_swap_pair`)."""
    lo, hi = _swap_pair(v0, v1, odd)
    tok = tok0 + odd
    if (tok < row_end) & (col < n):
        mY32[tok, (col - odd) // 2] = pack_bf16x2(lo, hi)


@cute.jit
def store_tile_swiglu(acc: cute.Tensor, thr_mma, mAlpha: cute.Tensor, mY: cute.Tensor, rb: Int32, row0: Int32, row_end: Int32,
                      n: Int32, g: Int32, limit: Float32, tile_n: cutlass.Constexpr, alphas=None):
    """Epilogue of the SwiGLU decoder kernel (tile_m 128): tile row 16j + r is gate (r < 8) or up (r >= 8) of
    output column ``64 rb + 8 j + r % 8``, so a thread's accumulators of rows g and g + 8 (fragment index
    v1 = 0, 1) are gate and up of one column -> ``y[token, col] = bf16(silu(min(gate, L)) * clamp(up, -L, L))``,
    gate and up each scaled by their alpha (``mAlpha``: [2I], gate columns first) and 2**7; y is [M, I]."""
    mY32 = cute.make_tensor(cute.recast_ptr(mY.iterator, dtype=Int32), cute.make_layout((mY.shape[0], n // 2), stride=(n // 2, 1)))
    shift7 = Float32(2.0 ** D.MAGNITUDE_SHIFT)
    odd = g % 2
    tCcC = thr_mma.partition_C(cute.make_identity_tensor((TILE_M, tile_n)))
    # acc is compact ((2 tokens, 2 rows g / g + 8, tile_n / 8), 1, 1): flat index 4 v2 + 2 v1 + v0
    for v2 in cutlass.range_constexpr(cute.size(acc) // 4):
        mm, nn = tCcC[4 * v2]
        col = rb * 64 + 8 * (mm // D.ROWS_PER_GROUP) + mm % 8
        cc = cutlass.min(col, n - 1)
        if cutlass.const_expr(alphas is not None):  # (gate, up) of the thread's one column (epilogue_alphas)
            a_gate, a_up = alphas
        else:
            a_gate = mAlpha[cc] * shift7
            a_up = mAlpha[cc + n] * shift7
        h = []
        for v0 in cutlass.range_constexpr(2):
            gate = cute.arch.fmin(acc[4 * v2 + v0] * a_gate, limit)
            up = cute.arch.fmax(cute.arch.fmin(acc[4 * v2 + 2 + v0] * a_up, limit), -limit)
            h.append(gate / (Float32(1.0) + cute.math.exp(-gate)) * up)
        _store_pair(mY32, h[0], h[1], odd, row0 + nn, col, row_end, n)


@dsl_user_op
def _f32_of_bits(v: Int32, *, loc=None, ip=None) -> Float32:
    """The fp32 value of an int32 bit pattern (``mov.b32``)."""
    return Float32(llvm.inline_asm(T.f32(), [Int32(v).ir_value(loc=loc, ip=ip)], "mov.b32 $0, $1;", "=f,r",
                                   has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT))


@dsl_user_op
def store_v4_f32(ptr, a: Float32, b: Float32, c: Float32, d: Float32, *, loc=None, ip=None):
    """Four fp32 to 16 aligned bytes of global memory (``st.global.v4``)."""
    from cutlass._mlir import ir
    from cutlass._mlir.dialects import arith

    v = llvm.mlir_undef(ir.VectorType.get([4], T.f32()), loc=loc, ip=ip)
    for i, value in enumerate((a, b, c, d)):
        v = llvm.insertelement(v, Float32(value).ir_value(loc=loc, ip=ip), arith.constant(T.i32(), i, loc=loc, ip=ip), loc=loc, ip=ip)
    cute.arch.store(ptr, v, loc=loc, ip=ip)


@dsl_user_op
def store_v4_b32(ptr, a: Int32, b: Int32, c: Int32, d: Int32, *, loc=None, ip=None):
    """Four words to 16 aligned bytes (``st.shared.v4.b32`` / ``st.global.v4.b32``); ``ptr`` an Int32 pointer."""
    from cutlass._mlir import ir
    from cutlass._mlir.dialects import arith

    v = llvm.mlir_undef(ir.VectorType.get([4], T.i32()), loc=loc, ip=ip)
    for i, value in enumerate((a, b, c, d)):
        v = llvm.insertelement(v, Int32(value).ir_value(loc=loc, ip=ip), arith.constant(T.i32(), i, loc=loc, ip=ip), loc=loc, ip=ip)
    cute.arch.store(ptr.llvm_ptr, v, loc=loc, ip=ip)


@dsl_user_op
def load_v4_b32(ptr, *, loc=None, ip=None):
    """Four words from 16 aligned bytes (``ld.shared.v4.b32`` for a shared-memory ``ptr``, an Int32 pointer)."""
    from cutlass._mlir import ir
    from cutlass._mlir.dialects import arith

    v = cute.arch.load(ptr.llvm_ptr, ir.VectorType.get([4], T.i32()), loc=loc, ip=ip)
    return [Int32(llvm.extractelement(v, arith.constant(T.i32(), i, loc=loc, ip=ip), loc=loc, ip=ip)) for i in range(4)]


@dsl_user_op
def load_cg_v4_f32(ptr, *, loc=None, ip=None):
    """Four fp32 (16 aligned bytes) from global memory through L2 only (``ld.global.cg.v4``: another CTA wrote
    them; an ordinary load, so the compiler keeps it after the fences and may batch it)."""
    from cutlass._mlir import ir
    from cutlass._mlir.dialects import arith

    v = cute.arch.load(ptr, ir.VectorType.get([4], T.f32()), cop="cg", loc=loc, ip=ip)
    return [Float32(llvm.extractelement(v, arith.constant(T.i32(), i, loc=loc, ip=ip), loc=loc, ip=ip)) for i in range(4)]


@dsl_user_op
def pack_bf16x2(lo: Float32, hi: Float32, *, loc=None, ip=None) -> Int32:
    """bf16x2 (lo in the low half) of two fp32, each rounded to nearest even."""
    return Int32(llvm.inline_asm(
        T.i32(), [Float32(lo).ir_value(loc=loc, ip=ip), Float32(hi).ir_value(loc=loc, ip=ip)],
        "cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,f,f", has_side_effects=False, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT))


def _pointers(x=None, words=None, scale_words=None, alpha=None, y=None, tiles=None, with_tiles=False, ws=None, cnt=None):
    from cutlass.cute.runtime import make_ptr

    gmem = cute.AddressSpace.gmem

    def pointer(dtype, t, align):
        return make_ptr(dtype, 0 if t is None else t.data_ptr(), gmem, assumed_align=align)

    pointers = (pointer(BFloat16, x, 16), pointer(Int32, words, 16), pointer(Int32, scale_words, 16), pointer(Float32, alpha, 4),
                pointer(BFloat16, y, 4))
    return pointers + (pointer(Int32, tiles, 4), pointer(Float32, ws, 16), pointer(Int32, cnt, 4)) if with_tiles else pointers


def compile_wgmma(k: int, tile_n: int = 128, stages: int | None = None, arch: str | None = None, keep_ptx: bool = False,
                  probe: str = "full", pingpong: bool | None = None, schedule: str | None = None, ahead: int | None = None,
                  tile_m: int | None = None, cluster_m: int | None = None, grouped: bool = False, swiglu: bool = False,
                  batched: bool = False, split_k: bool = False, pdl: str = "off", stream_k: bool = False,
                  store_bytes: int | None = None, decoders: int | None = None, staged: bool = False,
                  early_alpha: bool | None = None, dsmem_split: bool | int = False):
    """Compile (cached) the WGMMA prefill kernel for K = k. Works without a GPU (fake pointers); pass
    ``arch="sm_90a"`` on a machine whose default target is something else. ``grouped`` (decoder schedule
    only): the one-launch grouped kernel of :func:`run_grouped_wgmma`; ``swiglu`` (decoder schedule only): the
    clamped SwiGLU of a gate_up weight in the epilogue."""
    from cutlass.cute.runtime import make_fake_stream

    schedule = SCHEDULE if schedule is None else schedule
    if schedule == "decoder":
        # the word ring holds ahead x (row groups per decoder warp) x 4 registers: 8 chunks only at tile_m 128
        # split K and stream-K too (a split or segment of an odd number of quads decodes its last quad alone). H100, M = 128 and
        # 256, four runs each (data/bench/wgmma_variants_nvidia_h100_80gb_hbm3_0a9ed0a_ahead8.json): 8 against 4 chunks equal
        # or faster for every split plan, gate_up + SwiGLU at M = 128 37.3 -> 34.6 us, wo_b 66.1 -> 64.3, at M = 256 98.8 -> 97.2
        # 16 (four quads a trip) only as an option: within the noise of 8 (+-3-5% between runs of one kernel) for gate_up, down
        # and wo_b at M = 64..256, 3-6% faster for fused_wqa_wkv (M = 128 21.2 -> 20.0 us; ..._e8e1864_ahead16.json)
        ahead = ahead or DECODER_AHEAD or (8 if k % (2 * D.QUAD_K) == 0 and (tile_m or TILE_M) == TILE_M else 4)
        kernel = GemmWgmmaDecoderKernel(k, tile_n, stages, ahead,
                                        "full" if probe in ("full", "decoder") else probe.removeprefix("decoder_"), tile_m or TILE_M,
                                        cluster_m or DECODER_CLUSTER_M, grouped or batched, swiglu, batched, split_k, pdl, stream_k,
                                        store_bytes or DECODER_STORE_BYTES, decoders or 1, staged,
                                        DECODER_EARLY_ALPHA if early_alpha is None else early_alpha, dsmem_split)
        key = ("GemmWgmmaDecoderKernel", k, tile_n, kernel.stages, kernel.ahead, kernel.probe, kernel.tile_m, kernel.cluster_m,
               grouped or batched, swiglu, batched, split_k, pdl, stream_k, kernel.store_bytes, kernel.decoders, kernel.staged,
               kernel.early_alpha, kernel.dsmem_splits)
        return compile_kernel(key, kernel, *_pointers(with_tiles=True), Int32(256), Int32(128), Int32(16), Int32(1), Int32(1),
                              Float32(0.0), Int32(1), Int32(1), make_fake_stream(), arch=arch, keep_ptx=keep_ptx)
    if grouped or swiglu or batched or split_k or stream_k or pdl != "off" or store_bytes or decoders or staged or early_alpha or dsmem_split:
        raise ValueError("only the decoder schedule has the store width and decoders options and the grouped, batched, SwiGLU, split-K, stream-K and PDL kernels")
    if schedule != "register":
        raise ValueError(f"schedule must be 'register' or 'decoder', got {schedule!r}")
    pingpong = PINGPONG if pingpong is None else pingpong
    kernel = GemmWgmmaKernel(k, tile_n, stages, probe, pingpong)
    key = ("GemmWgmmaKernel", k, tile_n, kernel.stages, probe, pingpong)
    return compile_kernel(key, kernel, *_pointers(), Int32(256), Int32(128), Int32(8), make_fake_stream(), arch=arch, keep_ptx=keep_ptx)


DECODER_CLUSTER_M = 2  # x by TMA multicast across two CTAs: 2-6% faster than 1 on an H200 (38950a4)
# the decoder's shared stores of the bf16 tile (GemmWgmmaDecoderKernel's store_bytes). H100
# (data/bench/wgmma_decoder_probe_nvidia_h100_80gb_hbm3_8062a02.json): 16 against 8 bytes 3-8% faster where the
# decoder bounds the kernel (64-token tiles: gate_up M = 64 33.8 -> 31.1 us, down 19.2 -> 17.9), within noise from M = 256
# (gate_up M = 4096 567 against 585-598 us, down 312 against 304-314)
DECODER_STORE_BYTES = 16
DECODER_DSMEM_SPLIT = True  # two K splits through distributed shared memory (GemmWgmmaDecoderKernel.dsmem_split)
DECODER_EARLY_ALPHA = True  # the decoder kernel's epilogue factors read before the main loop (GemmWgmmaDecoderKernel.early_alpha)
DECODER_AHEAD = None  # chunks of weight words in flight per decoder lane: None = 8 where K and the registers allow, else 4
SCHEDULE = "decoder"  # faster than "register" at every shape measured on an H200 (data/bench/wgmma_probe_*)
PDL = "auto"  # programmatic dependent launch of the plain / SwiGLU decoder kernel (gemm_decode.PDL_MODES; "auto": run_wgmma's rule)
PINGPONG = False  # measured 1-10% slower on an H200 (data/bench/wgmma_probe_nvidia_h200_bf8138c.json): kept as an option


WGMMA_MAX_SPLITS = 4  # measured up to 4 (data/bench/wgmma_split_probe_nvidia_h100_80gb_hbm3_7e5ffe1.json)


SMALL_TILE_MAX_M = 64  # up to this M the plan takes one 64-token tile (the decoder, not the MMA, bounds the time there)
# Above SMALL_TILE_MAX_M and up to this M, where the plan's splits would meet in the workspace, 64-token tiles with two
# splits (their sum in distributed shared memory) on at least as many CTAs replace it. H100, the two alternating in one
# process (data/bench/wgmma_variants_nvidia_h100_80gb_hbm3_e5ec4b9_fused_m256.json): fused_wqa_wkv M = 256 (128 CTAs
# either way) 23.4 / 23.7 us with 128 tokens x 4 splits, 22.6 / 22.9 with 64 x 2 (256 x 4 on 64 CTAs: 27.2)
SMALL_TILE_DSMEM_MAX_M = 256


def _row_blocks(row_groups: int, tile_m: int, cluster_m: int) -> int:
    """Row blocks of the decoder kernel's grid: ceil(RG * 16 / tile_m), rounded up to whole clusters."""
    return -(-(-(-row_groups // (tile_m // D.ROWS_PER_GROUP))) // cluster_m) * cluster_m


def wgmma_plan(m: int, row_groups: int, k: int, sm_count: int = 132, cluster_m: int | None = None) -> tuple:
    """(tile_n, K splits) of the plain / SwiGLU decoder kernel: the most CTAs that fit in ONE wave, over tiles
    of 64 tokens up to M = SMALL_TILE_MAX_M, else of 128 tokens (256 too from M = 256), and 1..WGMMA_MAX_SPLITS
    splits (each at least 2 quads); ties go to
    256 tokens for K >= 4096 (the split sum, a fixed cost per tile, pays off over a long K), to 128 below.
    Up to M = SMALL_TILE_DSMEM_MAX_M a choice whose splits would meet in the workspace (:func:`dsmem_sum`) gives way to
    64-token tiles with 2 splits on at least as many CTAs. With no one-wave choice, :func:`tile_n_for` and no split. H100 (data/bench/wgmma_split_probe_*_7e5ffe1.json):
    gate_up M = 128 48 CTAs -> 2 splits: 39.2 against 59.8 us; M = 256 256 tokens x 2 splits: 52.7 against 60.1;
    wo_b M = 256 98.7 against 129.3 (cuBLAS 91.2); fused_wqa_wkv M = 256 4 splits 27.5 (dequantize + cuBLAS 32.7)."""
    cluster_m = cluster_m or DECODER_CLUSTER_M
    row_blocks = _row_blocks(row_groups, TILE_M, cluster_m)
    quads = k // D.QUAD_K
    best = None
    for tile_n in (64,) if m <= SMALL_TILE_MAX_M else (128, 256):
        if tile_n == 256 and m < 256:
            continue
        ctas = row_blocks * -(-m // tile_n)
        for splits in range(1, WGMMA_MAX_SPLITS + 1):
            if ctas * splits > sm_count or (splits > 1 and quads < 2 * splits):
                break
            key = (ctas * splits, tile_n if k >= 4096 else -tile_n)
            if best is None or key > best[0]:
                best = (key, tile_n, splits)
    if best is not None and SMALL_TILE_MAX_M < m <= SMALL_TILE_DSMEM_MAX_M and not dsmem_sum(best[2], best[0][0]):
        small = row_blocks * -(-m // 64) * 2
        if best[0][0] <= small <= sm_count and quads >= 4:
            return 64, 2
    return (64 if m <= SMALL_TILE_MAX_M else tile_n_for(m), 1) if best is None else best[1:]


def dsmem_sum(splits: int, ctas: int) -> bool:
    """Whether a split plan of ``ctas`` CTAs (all splits) sums its splits in distributed shared memory by default (two
    splits, or four on at most :data:`DSMEM4_MAX_CTAS`: :func:`dsmem_split_fits`), or has none to sum; the others go
    through the workspace."""
    return splits == 1 or dsmem_split_fits("decoder", splits, None, None, False, ctas=ctas)


# Stream-K where the plan's tiles leave the last wave mostly idle. H100 (data/bench/wgmma_split_probe_nvidia_h100_80gb_hbm3_517eb25.json):
# gate_up M = 1024 (192 tiles of 256 tokens on 132 SMs, the waves 73% full) 141.7 us against 166.6 unsplit, gate_up + SwiGLU
# 148.3 against 165.6; where the waves are >= 85% full the unsplit kernel was as fast or faster (down and wo_b at M = 1024,
# gate_up at 2048: 275.0 against 331.7). Only for K >= STREAM_K_MIN_K: each segment's restart and fix-up (~10 us) is a fixed
# cost that a short K does not earn back (down at M = 1024: 84.5 against 78.7 unsplit).
STREAM_K_BELOW_FILL = 0.8
STREAM_K_MIN_K = 4096


def dsmem_split_fits(schedule: str, splits: int, tile_m: int | None, cluster_m: int | None, stream_k: bool, swiglu: bool = False,
                     ctas: int | None = None) -> bool:
    """Whether a run_wgmma launch can take dsmem_split (GemmWgmmaDecoderKernel): the decoder schedule with two K splits
    (or four, not the SwiGLU kernel, on at most :data:`DSMEM4_MAX_CTAS` CTAs when ``ctas`` is given), 128-row tiles, no
    stream-K, and no x multicast asked for (cluster_m None or 1)."""
    four = splits == 4 and not swiglu and (ctas is None or ctas <= DSMEM4_MAX_CTAS)
    return (schedule == "decoder" and (splits == 2 or four) and (tile_m or TILE_M) == TILE_M
            and not stream_k and cluster_m in (None, 1))


# Four-split DSMEM clusters (four CTAs of one SM each on one GPC) pay only while they all fit at once. H100, the workspace
# and DSMEM sums alternating in one process (data/bench/wgmma_variants_nvidia_h100_80gb_hbm3_2fa7fb8_dsmem4.json):
# fused_wqa_wkv M = 128 (64 CTAs) 21.6 -> 16.6 us, but M = 256 (128 CTAs, 32 clusters of four) 23.1 -> 32.9: not all of
# them ran at once
DSMEM4_MAX_CTAS = 64


def stream_k_pays(m: int, row_groups: int, k: int, tile_n: int, splits: int, sm_count: int = 132,
                  cluster_m: int | None = None) -> bool:
    """Whether the plain / SwiGLU decoder kernel should run stream-K instead of the plan ``(tile_n, splits)`` of
    :func:`wgmma_plan`: an unsplit plan of more than one wave of tiles (one CTA an SM) whose waves are less than
    :data:`STREAM_K_BELOW_FILL` full, and K >= :data:`STREAM_K_MIN_K`."""
    tiles = _row_blocks(row_groups, TILE_M, cluster_m or DECODER_CLUSTER_M) * -(-m // tile_n)
    if splits > 1 or k < STREAM_K_MIN_K or tiles <= sm_count:
        return False
    return tiles / (-(-tiles // sm_count) * sm_count) < STREAM_K_BELOW_FILL


def tile_n_for(m: int) -> int:
    """Tokens per CTA: 256 (half the decode work per FLOP) from M = 512 up, 128 below (more CTAs). On an H200
    256 was faster at M = 1024 for both schedules (decoder: 161 against 190 us for gate_up)."""
    return 256 if m >= 512 else 128


# The decoder kernel's epilogue through shared memory, 16-byte stores of whole sectors (store_tile_staged), from this many
# tokens a tile, where y allows. H100 K sweeps (data/bench/wgmma_k_sweep_*_b6e7ad5_*): the fixed cost of a tile 7.9 -> 6.3 us
# at 256 tokens, 3.5 -> 2.5 at 128, 14.3 -> 12.0 at 256 with two K splits; at 64 tokens (two decoder warpgroups, 128
# registers a thread) the main loop slowed by 0.13 us a quad (1.37 -> 1.50), more than the 1.1 us it saved.
STAGED_EPILOGUE_MIN_TILE_N = 128


def staged_epilogue(y: torch.Tensor, n: int, tile_n: int) -> bool:
    """Whether a decoder-kernel launch of ``tile_n``-token tiles writing ``n`` columns of y asks for the staged
    epilogue: tile_n >= STAGED_EPILOGUE_MIN_TILE_N, and y 16-byte aligned with its row pitch and n multiples of 8
    elements (the kernel also needs tile_m 128, enough stages, and no stream-K or SwiGLU). run_wgmma, run_grouped_wgmma
    and run_batched_wgmma (y seen as [T, G * n]) ask for it by this rule."""
    return tile_n >= STAGED_EPILOGUE_MIN_TILE_N and n % 8 == 0 and y.data_ptr() % 16 == 0 and y.stride(-2) % 8 == 0


def run_wgmma(x: torch.Tensor, words: torch.Tensor, scale_words: torch.Tensor, alpha: torch.Tensor, n: int,
              out: torch.Tensor | None = None, tile_n: int | None = None, stages: int | None = None,
              probe: str = "full", pingpong: bool | None = None, schedule: str | None = None, ahead: int | None = None,
              tile_m: int | None = None, cluster_m: int | None = None, swiglu_limit: float | None = None,
              splits: int | None = None, pdl: str | None = None, stream_k: bool | None = None, parts: int | None = None,
              store_bytes: int | None = None, decoders: int | None = None, staged: bool | None = None,
              early_alpha: bool | None = None, dsmem_split: bool | None = None) -> torch.Tensor:
    """x bf16 [M, K] (contiguous, on a Hopper GPU); words / scale_words from :func:`~.dequant.repack_weight`;
    alpha fp32 [N] -> bf16 [M, N] (``out`` if given). ``swiglu_limit`` (a float, ``inf`` for no clamp;
    decoder schedule): W is gate_up ([gate; up], N = 2I rows, I a multiple of 64) and the result the clamped
    SwiGLU of the product, bf16 [M, I], computed in the epilogue. ``splits`` (decoder schedule): K split
    over that many CTAs per tile (1: none). ``stream_k`` (decoder schedule, plain or SwiGLU): ``parts``
    clusters (default: one per pair of SMs) share the tiles' K quads evenly instead; with neither ``tile_n``
    nor ``splits`` given, :func:`wgmma_plan` picks both and, with ``stream_k`` None, :func:`stream_k_pays`
    whether to run stream-K instead (it needs a transient fp32 workspace of up to a few tile sums per tile). ``pdl`` (decoder schedule; default ``PDL``): programmatic dependent launch, as
    :func:`~.gemm_decode.run_decode` (the weights must not be written by the kernel just before). No host
    sync; CUDA-graph capturable after a first eager call (which compiles). ``staged`` (decoder schedule): the epilogue
    through shared memory (default :func:`staged_epilogue`). ``early_alpha`` (decoder schedule, default
    ``DECODER_EARLY_ALPHA``): the epilogue's alpha read before the main loop. ``dsmem_split`` (default: where
    :func:`dsmem_split_fits` and ``DECODER_DSMEM_SPLIT``): two K splits meet in distributed shared memory, the pair a
    cluster, instead of through the workspace."""
    if x.dtype != torch.bfloat16 or x.dim() != 2:
        raise ValueError(f"x must be bf16 [M, K], got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    if k % D.QUAD_K:
        raise ValueError(f"the WGMMA kernel needs K a multiple of {D.QUAD_K}, got K={k}")
    if words.dtype != torch.int32 or words.dim() != 4 or words.shape[1] * D.CHUNK_K != k:
        raise ValueError(f"words must be int32 [RG, K/64, 32, 4] with K={k}, got {words.dtype} {tuple(words.shape)}")
    row_groups = words.shape[0]
    if not (row_groups - 1) * D.ROWS_PER_GROUP < n <= row_groups * D.ROWS_PER_GROUP:
        raise ValueError(f"n={n} does not match {row_groups} row groups of 16")
    if n % 2:
        raise ValueError(f"the WGMMA kernel stores column pairs: N must be even, got N={n}")
    if alpha.shape != (n,) or alpha.dtype != torch.float32:
        raise ValueError(f"alpha must be fp32 [{n}], got {alpha.dtype} {tuple(alpha.shape)}")
    swiglu = swiglu_limit is not None
    if swiglu and n % 128:
        raise ValueError(f"the SwiGLU epilogue takes 64 gate and 64 up rows a CTA: gate_up must have 2I rows, I a multiple of 64, got {n}")
    out_n = n // 2 if swiglu else n
    y = out if out is not None else torch.empty(m, out_n, dtype=torch.bfloat16, device=x.device)
    if m == 0:
        return y
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.contiguous().clone() if x.data_ptr() % 16 else x.contiguous()
    if out is not None and (out.shape != (m, out_n) or out.dtype != torch.bfloat16 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous bf16 [{m}, {out_n}] tensor")
    schedule = SCHEDULE if schedule is None else schedule
    if tile_n is None and splits is None and schedule == "decoder" and (tile_m or TILE_M) == TILE_M:
        tile_n, splits = wgmma_plan(m, row_groups, k, sm_count(x.device), cluster_m)
        if stream_k is None:
            stream_k = stream_k_pays(m, row_groups, k, tile_n, splits, sm_count(x.device), cluster_m)
    stream_k = bool(stream_k)
    tile_n = tile_n or tile_n_for(m)
    quads = k // D.QUAD_K
    splits = max(1, min(splits or 1, quads))
    splits = -(-quads // -(-quads // splits))  # every split holds at least one quad
    if splits > 1 and schedule != "decoder":
        raise ValueError("split K needs the decoder schedule")
    if pdl is None:
        pdl = PDL if schedule == "decoder" else "off"
        if pdl == "auto":
            # H100, graph replay (data/bench/pdl_probe_nvidia_h100_80gb_hbm3_7e77c8f.json): "start" gained 1.4-2.9 us
            # for every shape at 128-token tiles (gate_up M = 128 39.6 -> 37.5, fused_wqa_wkv M = 256 27.5 -> 25.5)
            # and -1.2..+1.1 us at 256-token tiles (gate_up M = 256 52.5 -> 53.7, wo_b M = 1024 384.4 -> 380.5); at
            # 64-token tiles (two decoder warpgroups) it gained 0.2-3.3 us
            # (data/bench/wgmma_decoders_probe_nvidia_h100_80gb_hbm3_7d19538.json: wo_b M = 64 60.6 -> 57.3)
            pdl = "start" if tile_n <= 128 else "off"
    if decoders is None and schedule == "decoder":
        # two decoder warpgroups where the decoder bounds the kernel (tiles of up to 128 tokens, not the SwiGLU
        # kernel): H100 (wgmma_decoders_probe_*_7d19538.json) gate_up M = 128 36.5 -> 33.7 us, wo_b 73.1 -> 65.8,
        # down M = 256 26.9 -> 25.8, gate_up M = 64 31.4 -> 30.4
        decoders = 2 if not (swiglu or stream_k) and tile_n <= 128 and (tile_m or TILE_M) == TILE_M else 1
    if stream_k and (schedule != "decoder" or splits > 1):
        raise ValueError("stream_k needs the decoder schedule and no split_k")
    if dsmem_split is None:
        ctas = _row_blocks(row_groups, tile_m or TILE_M, 1) * -(-m // tile_n) * splits
        dsmem_split = DECODER_DSMEM_SPLIT and dsmem_split_fits(schedule, splits, tile_m, cluster_m, stream_k, swiglu, ctas)
    if dsmem_split:
        if not dsmem_split_fits(schedule, splits, tile_m, cluster_m, stream_k, swiglu):
            raise ValueError(f"dsmem_split needs the decoder schedule, 2 K splits (or 4 without the SwiGLU), tile_m {TILE_M}, no stream-K and "
                             f"cluster_m 1 or None (got {schedule}, {splits} splits, tile_m {tile_m}, cluster_m {cluster_m})")
        cluster_m = 1  # the cluster is the tile's two K splits
    compiled = compile_wgmma(k, tile_n, stages, probe=probe, pingpong=pingpong, schedule=schedule, ahead=ahead, tile_m=tile_m,
                             cluster_m=cluster_m, swiglu=swiglu, split_k=splits > 1, pdl=pdl, stream_k=stream_k, store_bytes=store_bytes,
                             decoders=decoders, staged=(schedule == "decoder" and staged_epilogue(y, out_n, tile_n)) if staged is None else staged,
                             early_alpha=early_alpha, dsmem_split=splits if dsmem_split else False)
    tensors = (x, words.contiguous(), scale_words.contiguous(), alpha.contiguous(), y)
    if schedule == "decoder":
        ws = cnt = None
        tm, cm = tile_m or TILE_M, cluster_m or DECODER_CLUSTER_M
        tiles = _row_blocks(row_groups, tm, cm) * -(-m // tile_n)
        if stream_k:  # splits: the most segments a tile has (the workspace's second dimension)
            parts = min(parts or sm_count(x.device) // cm, tiles // cm * quads)
            splits = stream_segments(tiles // cm, quads, parts)
        if splits > 1 and not dsmem_split:
            ws = torch.empty(tiles * splits * tm * tile_n, dtype=torch.float32, device=x.device)
            cnt = split_counters(x.device, 2 * tiles * (THREADS // 32))
        compiled(*_pointers(*tensors, with_tiles=True, ws=ws, cnt=cnt), Int32(m), Int32(out_n), Int32(row_groups), Int32(1),
                 Int32(-(-m // tile_n)), Float32(swiglu_limit if swiglu else 0.0), Int32(splits), Int32(parts or 1), current_stream())
    else:
        compiled(*_pointers(*tensors), Int32(m), Int32(n), Int32(row_groups), current_stream())
    return y



def _check_stacked(words: torch.Tensor, scale_words: torch.Tensor, alpha: torch.Tensor, n: int, k: int):
    """(E, RG) of E stacked sm90 weights for the grouped / batched kernels, or ValueError naming the mismatch."""
    if words.dim() != 5 or scale_words.dim() != 5 or words.shape[:2] != scale_words.shape[:2]:
        raise ValueError(f"words / scale_words must be int32 [E, RG, K/64, 32, 4] / [E, RG, K/256, 32, 2], got "
                         f"{tuple(words.shape)} and {tuple(scale_words.shape)}")
    experts, row_groups = words.shape[:2]
    if k % D.QUAD_K or words.shape[2] * D.CHUNK_K != k:
        raise ValueError(f"the WGMMA kernel needs K a multiple of {D.QUAD_K} matching the words, got K={k}, words {tuple(words.shape)}")
    if not (row_groups - 1) * D.ROWS_PER_GROUP < n <= row_groups * D.ROWS_PER_GROUP or n % 2:
        raise ValueError(f"n={n} must be even and match {row_groups} row groups of 16")
    if alpha.shape != (experts, n) or alpha.dtype != torch.float32:
        raise ValueError(f"alpha must be fp32 [E, n] = [{experts}, {n}], got {alpha.dtype} {tuple(alpha.shape)}")
    return experts, row_groups


def grouped_tile_table(offsets: torch.Tensor, tile_n: int, max_tiles: int) -> torch.Tensor:
    """int32 [max_tiles, 3]: per token tile of the grouped kernel, (expert, first row, end row of the expert).

    offsets: int [E+1] on the device, non-decreasing from 0 (group e is rows offsets[e]:offsets[e+1]). Group e
    gets ceil(rows / tile_n) tiles, in expert order (so that consecutive CTAs share an expert's weights in L2);
    the rows of a group's last tile past its end belong to the next group (computed, not stored). Rows past
    the last group's tiles: (E - 1, 0, 0), which the kernel skips. Device ops only: no host sync, capturable.
    max_tiles must bound the tiles: :func:`grouped_max_tiles`."""
    offsets = offsets.to(torch.int64)
    experts = offsets.shape[0] - 1
    tiles = (offsets[1:] - offsets[:-1] + tile_n - 1) // tile_n
    ends = torch.cumsum(tiles, 0)
    t = torch.arange(max_tiles, device=offsets.device)
    e = torch.searchsorted(ends, t, right=True)
    valid = e < experts
    e = e.clamp(max=experts - 1)
    row0 = offsets[e] + (t - (ends[e] - tiles[e])) * tile_n
    row_end = offsets[e + 1]
    return torch.stack([e, torch.where(valid, row0, 0), torch.where(valid, row_end, 0)], 1).to(torch.int32)


def grouped_max_tiles(m: int, experts: int, tile_n: int) -> int:
    """A bound on the token tiles of E groups of m rows in all: sum ceil(m_e / tile_n) <= (m + E (tile_n - 1)) / tile_n."""
    return max(1, (m + experts * (tile_n - 1)) // tile_n)


GROUPED_TILE_N_256_FROM = 256  # average rows per group from which the grouped kernel takes 256-token tiles


def grouped_tile_n(m: int, experts: int) -> int:
    """Tokens per CTA of the grouped kernel, from the AVERAGE rows per group (each group wastes half a tile on
    average): 256 from 256 rows a group up. On an H100 (grouped_probe_*_2048tok_00c6f9f.json, MoE at 2048
    tokens, ~256 rows per expert) 256-token tiles were 10-11% faster than 128 for gate_up and down; wo_a at
    256 rows a group likewise (56 against 73 us)."""
    return 256 if m // max(1, experts) >= GROUPED_TILE_N_256_FROM else 128


def run_grouped_wgmma(x: torch.Tensor, offsets: torch.Tensor, words: torch.Tensor, scale_words: torch.Tensor,
                      alpha: torch.Tensor, n: int, out: torch.Tensor | None = None, tile_n: int | None = None,
                      tiles: torch.Tensor | None = None, cluster_m: int | None = None,
                      swiglu_limit: float | None = None, staged: bool | None = None) -> torch.Tensor:
    """One launch for E weights: ``y[rows of group e] = x[rows of group e] @ dequant(W_e)^T * alpha[e]``.

    x bf16 [M, K] (contiguous, expert-sorted rows); offsets int [E+1] on the device (0 .. M, non-decreasing;
    not checked here: no host sync); words int32 [E, RG, K/64, 32, 4], scale_words int32 [E, RG, K/256, 32, 2]
    (:func:`nvfp4lib.moe.repack_experts`); alpha fp32 [E, n]. ``tiles``: a precomputed
    :func:`grouped_tile_table` for this tile_n (the gate_up and down GEMMs of one MoE block share it).
    ``swiglu_limit`` (a float, ``inf`` for no clamp): W is gate_up ([gate; up], n = 2I rows, I a multiple of 64)
    and the result the clamped SwiGLU of the product, computed in the epilogue from the fp32 accumulators
    (one bf16 rounding). Returns bf16 [M, n] (or [M, I]); rows outside every group are left unwritten.
    CUDA-graph capturable after a first eager call (which compiles)."""
    if x.dtype != torch.bfloat16 or x.dim() != 2:
        raise ValueError(f"x must be bf16 [M, K], got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    experts, row_groups = _check_stacked(words, scale_words, alpha, n, k)
    swiglu = swiglu_limit is not None
    if swiglu and n % 128:
        raise ValueError(f"the SwiGLU epilogue takes 64 gate and 64 up rows a CTA: gate_up must have 2I rows, I a multiple of 64, got {n}")
    out_n = n // 2 if swiglu else n
    if offsets.shape != (experts + 1,) or offsets.dtype.is_floating_point:
        raise ValueError(f"offsets must be an integer tensor [E+1] = [{experts + 1}], got {offsets.dtype} {tuple(offsets.shape)}")
    y = out if out is not None else torch.empty(m, out_n, dtype=torch.bfloat16, device=x.device)
    if out is not None and (out.shape != (m, out_n) or out.dtype != torch.bfloat16 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous bf16 [{m}, {out_n}] tensor")
    if m == 0:
        return y
    tile_n = tile_n or grouped_tile_n(m, experts)
    max_tiles = grouped_max_tiles(m, experts, tile_n)
    if tiles is None:
        tiles = grouped_tile_table(offsets, tile_n, max_tiles)
    elif tiles.shape != (max_tiles, 3) or tiles.dtype != torch.int32:
        raise ValueError(f"tiles must be int32 [{max_tiles}, 3] (grouped_tile_table for tile_n={tile_n}), got {tiles.dtype} {tuple(tiles.shape)}")
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.contiguous().clone() if x.data_ptr() % 16 else x.contiguous()
    compiled = compile_wgmma(k, tile_n, schedule="decoder", cluster_m=cluster_m, grouped=True, swiglu=swiglu,
                             staged=staged_epilogue(y, out_n, tile_n) if staged is None else staged)
    compiled(*_pointers(x, words.contiguous(), scale_words.contiguous(), alpha.contiguous(), y, tiles.contiguous(), with_tiles=True),
             Int32(m), Int32(out_n), Int32(row_groups), Int32(experts), Int32(max_tiles), Float32(swiglu_limit if swiglu else 0.0),
             Int32(1), Int32(1), current_stream())
    return y


_batched_tables: dict = {}


def batched_tile_table(tokens: int, groups: int, tile_n: int, device) -> torch.Tensor:
    """int32 [groups * ceil(tokens / tile_n), 3]: the tile table of the batched kernel, (group, first row, tokens)
    for every group's token tiles, group-major. Static for a (tokens, groups, tile_n): built once on the device
    and cached (built per call, uncached, under CUDA-graph capture)."""
    key = (tokens, groups, tile_n, str(device))
    table = _batched_tables.get(key)
    if table is None:
        per_group = -(-tokens // tile_n)
        t = torch.arange(groups * per_group, device=device, dtype=torch.int32)
        table = torch.stack([t // per_group, (t % per_group) * tile_n, torch.full_like(t, tokens)], 1).contiguous()
        if t.device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            _batched_tables[key] = table
    return table


BATCHED_TILE_N = 256  # wo_a on an H100 (data/bench/wo_a_probe_*_1053aa4.json): 55.9 us against 73.3 with 128 at 256 tokens


def run_batched_wgmma(x: torch.Tensor, words: torch.Tensor, scale_words: torch.Tensor, alpha: torch.Tensor, n: int,
                      out: torch.Tensor | None = None, tile_n: int | None = None, cluster_m: int | None = None,
                      staged: bool | None = None) -> torch.Tensor:
    """G weights, each over ALL rows of its own slice of x: ``y[:, g] = x[:, g] @ dequant(W_g)^T * alpha[g]`` (wo_a).

    x bf16 [T, G, K] (contiguous; group g reads columns g K .. g K + K - 1 of the [T, G K] view in place, by
    TMA coordinates); words int32 [G, RG, K/64, 32, 4], scale_words int32 [G, RG, K/256, 32, 2]; alpha fp32
    [G, n] -> bf16 [T, G, n] (``out`` if given). One launch; the tile table is static per T and cached, so
    there is nothing to compute per call; CUDA-graph capturable after a first eager call (which compiles)."""
    if x.dtype != torch.bfloat16 or x.dim() != 3 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous bf16 [T, G, K], got {x.dtype} {tuple(x.shape)}")
    tokens, groups, k = x.shape
    experts, row_groups = _check_stacked(words, scale_words, alpha, n, k)
    if experts != groups:
        raise ValueError(f"x has {groups} groups, the weights {experts}")
    y = out if out is not None else torch.empty(tokens, groups, n, dtype=torch.bfloat16, device=x.device)
    if out is not None and (out.shape != (tokens, groups, n) or out.dtype != torch.bfloat16 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous bf16 [{tokens}, {groups}, {n}] tensor")
    if tokens == 0:
        return y
    if x.data_ptr() % 16:
        x = x.clone()
    tile_n = tile_n or BATCHED_TILE_N
    tiles = batched_tile_table(tokens, groups, tile_n, x.device)
    if staged is None:  # y is [T, G * n] to the kernel: group g's columns start at g * n
        staged = staged_epilogue(y.view(tokens, groups * n), n, tile_n)
    compiled = compile_wgmma(k, tile_n, schedule="decoder", cluster_m=cluster_m, batched=True, staged=staged)
    compiled(*_pointers(x, words.contiguous(), scale_words.contiguous(), alpha.contiguous(), y, tiles, with_tiles=True),
             Int32(tokens), Int32(n), Int32(row_groups), Int32(groups), Int32(tiles.shape[0]), Float32(0.0), Int32(1), Int32(1),
             current_stream())
    return y

"""Decode (small M) NVFP4 W4A16 GEMM for sm_90a in CuTeDSL: ``y[M, N] = x[M, K] @ dequant(W)^T * alpha (+ bias)``.

Memory-bound design (the weights are 4.5 bits per element; everything else is small):

- Swap AB: ``mma.sync.m16n8k16`` bf16 -> fp32 with 16 weight rows as operand A (decoded in registers)
  and 8 tokens as operand B; ``tiles`` (1 or 2) token tiles of 8 share each decoded A fragment.
- One warp owns a row group of 16 weight rows and a K range; a CTA holds ``WARPS`` warps on consecutive
  row groups and the same K range, so the activations a warp loads come from L1 for the other warps.
- Per 256 k a lane issues four 16-byte weight loads (one per 64-k chunk, coalesced: 512 contiguous bytes
  per warp and chunk) and one 8-byte scale load, prefetched one step ahead (register double buffer).
  Activations: by default each step loads its 32 bytes per lane and token row (L1/L2 hits shared by the
  CTA's warps); ``prefetch_x`` loads them one step ahead, ``x_smem`` stages the CTA's slice in shared
  memory once. On the H100 neither option paid off by more than 10% (data/bench/gemm_h100*.json
  "variants"), so both are off by default (``DEFAULTS``). Nor does ``x_stagger`` (odd token rows load their
  two 16-byte halves in the opposite order, so that a load instruction's 8 rows use all 32 L1 banks): Nsight
  Compute saw the L1 throughput fall by a quarter (down M = 16 43.5 -> 32.6%, gate_up 52.0 -> 39.8%), but the
  kernel is not L1-bound and the selects cost more than the wavefronts saved (graph replay: gate_up M = 16
  13.0 -> 13.6 us, gate_up + SwiGLU 14.5 -> 16.3, down 8.3 -> 8.0; H100,
  data/bench/decode_variants_nvidia_h100_80gb_hbm3_2dd4fe9_stagger.json).
- Register decode (see :mod:`.dequant`): 5 shifts + 6 logic ops + 4 ``mul.rn.bf16x2`` per MMA turn one
  word of E2M1 codes and two E4M3 scales into the exact bf16 products ``v * s * 2**-7``.
- Grouped (``grouped=True``, the MoE experts and attention's wo_a): one launch for E weights stacked
  ``[E * RG, ...]`` and rows grouped by an ``offsets`` int32 [E+1] tensor on the device (rows of group e are
  ``offsets[e]:offsets[e+1]``). The grid's z axis is ``splits * E``; a CTA whose token block lies past its
  group's rows exits before loading anything, so an expert with no rows costs no weight traffic. The token
  blocks per group come from a static bound on the rows of any group (``max_rows``), so nothing is read on
  the host and the launch is CUDA-graph safe.
- In-CTA split K (up to M = 64, :func:`ksplit_plan`): a CTA of ``rows`` row groups x ``ksplit`` warps, each
  warp on a slice of K; the slices' partial sums meet in shared memory behind one barrier. The kernel is
  latency-bound (a warp waits on each step's loads), so the plan puts the most warps on each row group that
  still run in ONE wave; ptxas is told the CTAs per SM it counts on (minnctapersm). The SwiGLU kernel runs
  ``paired`` there (gate and up row groups on separate warps; up to M = 8 in two CTAs of a cluster, ``paired="cluster"``,
  so that its 384 CTAs spread over the SMs as evenly as the plain kernel's: gate_up + SwiGLU M = 1 10.8 -> 10.0 us). Weights stream through
  ``ld.global.nc.L1::no_allocate.L2::256B`` (:func:`stream_loads_for`). Two token tiles in one token block
  (M = 9..16) plan with 128 registers a thread instead of 80 (:func:`wide_registers`): fewer warps, but no
  spill and each warp's whole quad of x in flight at once (gate_up M = 16 14.8 -> 12.6 us on an H100).
- Programmatic dependent launch (``pdl``, :func:`pdl_for`): the kernel may start while the previous kernel on
  the stream still runs; it issues its first two weight quads, then ``griddepcontrol.wait`` before any x load
  or global store, and (``"start"``) lets the next kernel launch at once. The weights must not be written by
  the kernel just before (``prepare_weight`` synchronizes after its repack). Off for the grouped kernel.
- Split K across the grid (where no such CTA shape exists, and the grouped kernel): grid ``(token blocks, row-group blocks, splits)``; each split writes its fp32 fragment into a
  workspace and the last warp to arrive (per row group, counted with a gpu-scope acq_rel atomic) sums
  the others (L2 loads) and runs the epilogue; it resets its counter, so the kernel is replayable in a
  CUDA graph. Epilogue: ``acc * alpha[n] * 2**7 (+ bias[n])`` rounded once to bf16. Where the in-CTA plan's register
  cap holds them (:func:`early_scales_fit`: M <= 16 but wo_b's long K slices at M <= 8), the lane's alpha (and bias)
  values are read before the main loop (``early_scales``): read in the epilogue, behind the y stores they may alias,
  they were a load latency on every warp's tail (gate_up M = 1 9.9 -> 9.4 us, fused_wqa_wkv M = 16 6.7 -> 6.2 on
  an H100).
"""
from __future__ import annotations

import torch

from ..cute_compile import compile_kernel, import_cute
from ..launch import current_stream, sm_count, split_counters
from . import dequant as D

cutlass, cute = import_cute()

from cutlass import Boolean, Float32, Int32  # noqa: E402
from cutlass._mlir.dialects import llvm  # noqa: E402
from cutlass.cutlass_dsl import T, dsl_user_op  # noqa: E402
from cutlass.memory import SmemAllocator  # noqa: E402

PDL_MODES = ("off", "start", "loop")  # programmatic dependent launch: off, or where the next kernel is let launch
WARPS = 8
THREADS = 32 * WARPS
TOKENS_PER_TILE = 8
MAX_TILES = 2
MAX_SMEM_QUADS = 8  # with x_smem a split covers at most 8 x 256 k (the smem slice is sized for it)


@dsl_user_op
def prmt(a: Int32, b: Int32, selector: int, *, loc=None, ip=None) -> Int32:
    """``prmt.b32 d, a, b, selector`` (byte permute)."""
    return Int32(llvm.inline_asm(
        T.i32(), [Int32(a).ir_value(loc=loc, ip=ip), Int32(b).ir_value(loc=loc, ip=ip)],
        f"prmt.b32 $0, $1, $2, {selector:#x};", "=r,r,r", has_side_effects=False, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT))


@dsl_user_op
def decode_word(word: Int32, scale_g: Int32, scale_g8: Int32, *, loc=None, ip=None):
    """One word of repacked E2M1 codes -> the four bf16x2 A registers (rows g, g+8) times their scales.
    ``scale_g`` / ``scale_g8``: bf16x2 pairs ``(s * 2**119, s * 2**119)``."""
    full = f"{D.EM_MASK | D.SIGN_MASK:#x}"
    asm = (
        "{\n.reg .b32 t1, t2, t3, u, v;\n"
        f"and.b32 u, $4, {full};\n"
        "mul.rn.bf16x2 $0, u, $5;\n"
        "shl.b32 t1, $4, 3;\n"
        f"and.b32 u, t1, {full};\n"
        "mul.rn.bf16x2 $1, u, $6;\n"
        "shl.b32 t2, $4, 6;\n"
        f"and.b32 u, t2, {full};\n"
        "mul.rn.bf16x2 $2, u, $5;\n"
        "shr.u32 t3, $4, 4;\n"
        "and.b32 u, t3, 0x00C000C0;\n"
        "shr.u32 t3, $4, 5;\n"
        "lop3.b32 u, u, t3, 0x01000100, 0xF8;\n"
        "shl.b32 v, $4, 1;\n"
        "lop3.b32 u, u, v, 0x80008000, 0xF8;\n"
        "mul.rn.bf16x2 $3, u, $6;\n}"
    )
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.i32()] * 4),
        [Int32(word).ir_value(loc=loc, ip=ip), Int32(scale_g).ir_value(loc=loc, ip=ip),
         Int32(scale_g8).ir_value(loc=loc, ip=ip)],
        asm, "=r,=r,=r,=r,r,r,r", has_side_effects=False, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT)
    return [Int32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4)]


@dsl_user_op
def bits_of_f32(v: Float32, *, loc=None, ip=None) -> Int32:
    """The bit pattern of an fp32 value as an int32 (``mov.b32``)."""
    return Int32(llvm.inline_asm(T.i32(), [Float32(v).ir_value(loc=loc, ip=ip)], "mov.b32 $0, $1;", "=r,f",
                                 has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT))


def _load_v4(ptr, instruction: str, loc=None, ip=None):
    """Four words from 16 aligned bytes at ``ptr`` (an LLVM pointer) through ``instruction`` (a PTX 16-byte load)."""
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.i32()] * 4), [ptr],
        f"{instruction} {{$0,$1,$2,$3}}, [$4];", "=r,=r,=r,=r,l",
        has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)
    return [Int32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4)]


@dsl_user_op
def load_stream_v4(ptr, *, loc=None, ip=None):
    """16 bytes (four words) the kernel reads once: ``ld.global.nc.L1::no_allocate.L2::256B.v4.b32`` (read-only
    path, no L1 line kept, L2 fetches 256-byte pieces from HBM)."""
    return _load_v4(ptr, "ld.global.nc.L1::no_allocate.L2::256B.v4.b32", loc, ip)


@dsl_user_op
def load_global_v4(ptr, *, loc=None, ip=None):
    """16 bytes (four words) through L1: ``ld.global.v4.b32`` (the activations, which every warp of the CTA reads)."""
    return _load_v4(ptr, "ld.global.v4.b32", loc, ip)


@dsl_user_op
def mma_bf16_16816(a, b0: Int32, b1: Int32, c, *, loc=None, ip=None):
    """``mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32``: a = 4 Int32 (bf16x2), c = 4 Float32."""
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.f32()] * 4),
        [Int32(v).ir_value(loc=loc, ip=ip) for v in a] + [Int32(b0).ir_value(loc=loc, ip=ip), Int32(b1).ir_value(loc=loc, ip=ip)]
        + [Float32(v).ir_value(loc=loc, ip=ip) for v in c],
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};",
        "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", has_side_effects=False, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT)
    return [Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4)]


class GemmDecodeKernel:
    """Static configuration: k (a multiple of 256), tiles (token tiles of 8 per CTA: 1 or 2), has_bias,
    swiglu (gate_up with the clamped SwiGLU in the epilogue), prefetch_x (load the next 256-k step's
    activations together with its weights). Dynamic: m, n (output columns), warp row groups, quads (of
    256 k) per split, splits, swiglu limit.

    With swiglu the weight's rows are [gate (I rows); up (I rows)], I a multiple of 16: each warp owns gate
    row group rg and up row group rg + I/16, so the gate and up accumulators of an output column sit in
    the same lane and the epilogue ``silu(min(gate, L)) * clamp(up, -L, L)`` is lane-local (n = I).

    ``paired`` (SwiGLU with the in-CTA K split): one row group per warp instead, a CTA of 2 x ksplit warps
    on gate row group rg (slot 0) and up row group rg + I/16 (slot 1); after the K slices meet, the up warp
    hands its sums to the gate warp through shared memory. The warps then hold one weight fragment, not two:
    the plain kernel's ~80 registers instead of ~150, so twice the warps fit on an SM.

    ``paired="cluster"``: the same with the gate and the up row group in two CTAs of a cluster (1, 2, 1) of
    ``ksplit`` warps each (rank 0 the gate, rank 1 the up): after its K slices meet, the up CTA's first warp sends
    its sums into the gate CTA's shared memory with ``st.async`` (counted in bytes on the gate CTA's mbarrier).
    Twice the CTAs of half the size: 384 instead of 192 for gate_up, which spread over 132 SMs as evenly as the
    plain kernel's (192 put two CTAs on 60 SMs and one on the other 72)."""

    def __init__(self, k: int, tiles: int, has_bias: bool, swiglu: bool = False, prefetch_x: bool = True, x_smem: bool = False,
                 grouped: bool = False, rows: int | None = None, ksplit: int = 1, stream_loads: bool = False, paired: bool = False,
                 pdl: str = "off", ctas_per_sm: int | None = None, x_stagger: bool = False, early_scales: bool = False):
        D.check_decode_shape(16, k)
        if pdl not in PDL_MODES:
            raise ValueError(f"pdl must be one of {PDL_MODES}, got {pdl!r}")
        if pdl != "off" and grouped:
            raise ValueError("the grouped kernel reads its row offsets (written by the kernel before it) first: no PDL")
        # Programmatic dependent launch: the kernel may start while the previous kernel on the stream still
        # runs; it loads its first weight quads, then waits (griddepcontrol.wait) before touching x, y or the
        # workspace. "start" / "loop": it lets the next kernel launch at its start / after its main loop.
        self.pdl = pdl
        if tiles not in range(1, MAX_TILES + 1):
            raise ValueError(f"tiles must be 1..{MAX_TILES}, got {tiles}")
        if swiglu and has_bias:
            raise ValueError("the SwiGLU epilogue takes no bias")
        if ksplit < 1 or (ksplit > 1 and x_smem):
            raise ValueError(f"ksplit must be >= 1 and cannot combine with x_smem, got ksplit={ksplit}, x_smem={x_smem}")
        self.k = k
        self.chunks = k // D.CHUNK_K
        self.quads = k // D.QUAD_K
        self.tiles = tiles
        self.has_bias = has_bias
        self.swiglu = swiglu
        if paired not in (False, True, "cluster"):
            raise ValueError(f"paired must be False, True or 'cluster', got {paired!r}")
        self.cluster_pair = paired == "cluster"  # gate and up row groups in two CTAs of a cluster
        if self.cluster_pair and (not swiglu or ksplit < 2 or grouped or rows not in (None, 1) or x_smem):
            raise ValueError("paired='cluster' is the SwiGLU kernel with the in-CTA K split (ksplit >= 2), 1 row, not grouped")
        if paired is True and (not swiglu or ksplit < 2 or grouped or rows not in (None, 2)):
            raise ValueError("paired is the SwiGLU kernel with the in-CTA K split (ksplit >= 2), 2 rows, not grouped")
        self.paired = paired is True
        self.groups = 2 if swiglu and not (self.paired or self.cluster_pair) else 1  # row groups (weight fragments) a warp holds
        self.row_mult = 2 if swiglu else 1  # weight row groups per output row group (gate and up)
        self.grouped = grouped  # E stacked weights, rows grouped by offsets (see the module docstring)
        self.x_smem = x_smem  # stage the CTA's activation slice in shared memory once (then no x loads in the loop)
        self.prefetch_x = prefetch_x and not x_smem
        # x_stagger: lanes of odd token rows load the two 16-byte halves of their 32 bytes a chunk in the opposite
        # order (and swap them back with selects). A row's chunk is one 128-byte L1 line and lane t reads bytes
        # 32t..32t+31 of it, so with the plain order the 8 rows of one load instruction hit the same 16 of L1's 32
        # banks (8 wavefronts for 512 bytes); staggered, even and odd rows take disjoint banks (4, the minimum)
        self.x_stagger = x_stagger and not x_smem
        # early_scales: the epilogue's factors (alpha * 2**7 of the lane's two output columns, the up columns' with
        # SwiGLU, bias) are read into registers before the main loop (after the PDL wait), not in the epilogue,
        # where each was a dependent L2 / HBM miss on the kernel's tail (Nsight, gate_up M = 16: the epilogue's
        # FMULs waited on two alpha loads issued one after the other, behind the y stores they may alias)
        self.early_scales = early_scales
        self.row_words = MAX_SMEM_QUADS * 128 + 16  # padded smem row: conflict-free 16-byte reads
        # the SwiGLU kernel holds two row groups per warp (~150 registers): 4-warp CTAs keep 3 CTAs per SM
        self.rows = 2 if self.paired else 1 if self.cluster_pair else rows or (WARPS // 2 if swiglu else WARPS)  # row groups per CTA (warps sharing a K range)
        # ksplit: warps per row group, each on its own slice of the CTA's K range; their partial sums meet in
        # shared memory (one barrier) instead of the workspace + atomic counter of the grid's split K
        self.ksplit = ksplit
        self.stream_loads = stream_loads  # weight loads through load_stream_v4 (no L1 allocation, L2 256-byte fetches)
        self.warps = self.rows * ksplit
        if self.warps * 32 > 1024:
            raise ValueError(f"rows x ksplit = {self.warps} warps is more than a CTA holds (32)")
        self.threads = 32 * self.warps
        # With the in-CTA split the launch plan counts on ksplit_ctas(...) CTAs per SM: ptxas is told so
        # (minnctapersm), which caps the registers (the counts otherwise move by +-10 with rows and ksplit,
        # and one more allocation unit halves a wave: gate_up at M = 64 ran 58 instead of 36 us)
        # (not with prefetch_x: its 32 more registers would spill under that cap)
        if ctas_per_sm is not None:  # an explicit count (fewer CTAs: more registers a thread)
            if ksplit < 2 or not 1 <= ctas_per_sm * self.warps <= 64:
                raise ValueError(f"ctas_per_sm needs the in-CTA split and at most 64 warps an SM, got {ctas_per_sm} x {self.warps}")
            self.min_ctas = ctas_per_sm
        else:
            self.min_ctas = ksplit_ctas(self.groups == 2, tiles, self.warps) if ksplit > 1 and not self.prefetch_x else 0
        self.smem_carveout = 0
        if ksplit > 1:  # percent of the 228 KB unified L1 / shared memory the CTAs' reduction buffers need
            need = self.min_ctas * ((ksplit - 1 + (self.paired or self.cluster_pair)) * self.rows * 32 * 4 * tiles * self.groups * 4 + 1024)
            self.smem_carveout = min(100, -(-100 * need // (228 * 1024)))

    @cute.jit
    def __call__(self, x_ptr: cute.Pointer, w_ptr: cute.Pointer, s_ptr: cute.Pointer, alpha_ptr: cute.Pointer,
                 bias_ptr: cute.Pointer, y_ptr: cute.Pointer, ws_ptr: cute.Pointer, cnt_ptr: cute.Pointer, off_ptr: cute.Pointer,
                 m: Int32, n: Int32, warp_groups: Int32, quads_per_split: Int32, splits: Int32, limit: Float32,
                 experts: Int32, max_rows: Int32, stream):
        """x_ptr: int32 view of bf16 x [m, k]; w_ptr: int32 [E*RG, k/64, 32, 4]; s_ptr: int32 [E*RG, k/256, 32, 2]
        (RG = warp_groups * groups, E = experts, 1 unless grouped); alpha_ptr: fp32 [E*RG*16]; bias_ptr: fp32
        [n] (read only with has_bias); y_ptr: bf16 [m, n]; ws_ptr: fp32 workspace [E * token blocks, splits,
        warp_groups, 32, 4*tiles*groups]; cnt_ptr: int32 [E * token blocks, warp_groups], zero before the first
        launch (the kernel leaves it zero); off_ptr: int32 [E+1] row offsets (read only when grouped);
        max_rows: a bound on any group's rows (m when not grouped)."""
        tpb = self.tiles * TOKENS_PER_TILE
        token_blocks = (max_rows + tpb - 1) // tpb
        row_groups = warp_groups * self.row_mult
        mX = cute.make_tensor(x_ptr, cute.make_layout((m, self.chunks, 4, 8), stride=(self.k // 2, 32, 8, 1)))
        mXv = cute.make_tensor(x_ptr, cute.make_layout((m, self.chunks * 8, 4), stride=(self.k // 2, 4, 1)))
        mW = cute.make_tensor(w_ptr, cute.make_layout((experts * row_groups, self.chunks, 32, 4), stride=(self.chunks * 128, 128, 4, 1)))
        mS = cute.make_tensor(s_ptr, cute.make_layout((experts * row_groups, self.quads, 32, 2), stride=(self.quads * 64, 64, 2, 1)))
        mAlpha = cute.make_tensor(alpha_ptr, cute.make_layout((experts * row_groups * D.ROWS_PER_GROUP,)))
        mOff = cute.make_tensor(off_ptr, cute.make_layout((experts + 1,)))
        mBias = cute.make_tensor(bias_ptr, cute.make_layout((n,)))
        mY = cute.make_tensor(y_ptr, cute.make_layout((m, n), stride=(n, 1)))
        frag = 4 * self.tiles * self.groups
        mWs = cute.make_tensor(ws_ptr, cute.make_layout((experts * token_blocks, splits, warp_groups, 32, frag),
                                                        stride=(splits * warp_groups * 32 * frag, warp_groups * 32 * frag, 32 * frag, frag, 1)))
        mCnt = cute.make_tensor(cnt_ptr, cute.make_layout((experts * token_blocks, warp_groups), stride=(warp_groups, 1)))
        self.kernel(mX, mXv, mW, mS, mAlpha, mBias, mY, mWs, mCnt, mOff, m, n, warp_groups, quads_per_split, splits, limit,
                    token_blocks).launch(
            grid=[token_blocks, warp_groups if self.paired else 2 * warp_groups if self.cluster_pair else (warp_groups + self.rows - 1) // self.rows,
                  splits * experts],
            block=[self.threads, 1, 1], stream=stream, use_pdl=self.pdl != "off",
            min_blocks_per_mp=self.min_ctas, preferred_smem_carveout=self.smem_carveout if self.min_ctas else None,
            **({"cluster": [1, 2, 1]} if self.cluster_pair else {}))

    @cute.jit
    def _load_quad(self, mW: cute.Tensor, mS: cute.Tensor, rg: Int32, q: Int32, lane: Int32, wreg: cute.Tensor, sreg: cute.Tensor, j: int):
        for ci in cutlass.range_constexpr(4):
            if cutlass.const_expr(self.stream_loads):
                words = load_stream_v4((mW.iterator + cute.crd2idx((rg, 4 * q + ci, lane, 0), mW.layout)).llvm_ptr)
                for e in cutlass.range_constexpr(4):
                    wreg[j, ci, e] = words[e]
            else:
                cute.autovec_copy(mW[rg, 4 * q + ci, lane, None], wreg[j, ci, None])
        cute.autovec_copy(mS[rg, q, lane, None], sreg[j, None])

    @cute.jit
    def _wait_for_previous_grid(self):
        """With PDL: block until the previous kernel on the stream has finished and its writes are visible."""
        if cutlass.const_expr(self.pdl != "off"):
            cute.arch.griddepcontrol_wait()

    @cute.jit
    def _load_epilogue_factors(self, mAlpha: cute.Tensor, mBias: cute.Tensor, col_base: Int32, wg: Int32, g: Int32, n: Int32,
                               ep: cute.Tensor):
        """``ep`` [6] fp32 <- for the lane's output columns col = 16 wg + g + 8h (h = 0, 1; clamped to n - 1, the
        stores mask them): alpha[col] * 2**7 (ep[h]), with SwiGLU the up column's alpha[col + n] * 2**7 (ep[2 + h]),
        with a bias bias[col] (ep[4 + h]). The same products the epilogue formed itself (bit-identical y)."""
        shift = Float32(2.0 ** D.MAGNITUDE_SHIFT)
        for h in cutlass.range_constexpr(2):
            col = cutlass.min(wg * D.ROWS_PER_GROUP + g + 8 * h, n - 1)
            ep[h] = mAlpha[col_base + col] * shift
            if cutlass.const_expr(self.swiglu):
                ep[2 + h] = mAlpha[col_base + col + n] * shift
            if cutlass.const_expr(self.has_bias):
                ep[4 + h] = mBias[col]

    @cute.jit
    def _load_x(self, mX: cute.Tensor, first_row: Int32, g: Int32, t: Int32, q: Int32, row_end: Int32, xr: cute.Tensor):
        for tau in cutlass.range_constexpr(self.tiles):
            row = first_row + tau * TOKENS_PER_TILE + g
            if row < row_end:
                for ci in cutlass.range_constexpr(4):
                    if cutlass.const_expr(self.x_stagger):
                        odd = g % 2
                        base = mX.iterator + cute.crd2idx((row, 4 * q + ci, t, 0), mX.layout)
                        # kept in load order (odd rows: halves swapped); _mma_chunk selects each MMA's words
                        first = load_global_v4((base + 4 * odd).llvm_ptr)  # even rows: words 0-3, odd rows: 4-7
                        second = load_global_v4((base + 4 - 4 * odd).llvm_ptr)
                        for e in cutlass.range_constexpr(4):
                            xr[tau, ci, e] = first[e]
                            xr[tau, ci, 4 + e] = second[e]
                    else:
                        cute.autovec_copy(mX[row, 4 * q + ci, t, None], xr[tau, ci, None])
            else:
                for i in cutlass.range_constexpr(32):
                    xr[tau, i // 8, i % 8] = Int32(0)

    @cute.jit
    def _mma_chunk(self, wcur: cute.Tensor, scur: cute.Tensor, j: int, ci: int, xs: cute.Tensor, acc: cute.Tensor, x_swap):
        """Fragment j's 64-k chunk ci: decode its four words (two E4M3 scales each row half) and multiply them
        into every token tile; ``xs``: the chunk's x words [tiles, 8] (with x_stagger in load order: halves swapped
        where ``x_swap``, the lane's token row is odd)."""
        word = scur[j, ci // 2]
        sel = (ci % 2) * 2
        scale_g = prmt(word, Int32(0), 0x4040 + sel * 0x0101) * 16 + ((D.SCALE_BIAS_BITS << 16) | D.SCALE_BIAS_BITS)
        scale_g8 = prmt(word, Int32(0), 0x4040 + (sel + 1) * 0x0101) * 16 + ((D.SCALE_BIAS_BITS << 16) | D.SCALE_BIAS_BITS)
        for kk in cutlass.range_constexpr(4):
            a = decode_word(wcur[j, ci, kk], scale_g, scale_g8)
            for tau in cutlass.range_constexpr(self.tiles):
                b0, b1 = xs[tau, 2 * kk], xs[tau, 2 * kk + 1]
                if cutlass.const_expr(self.x_stagger):  # the same words from the other half where the halves are swapped
                    other = (2 * kk + 4) % 8
                    b0 = Int32(cutlass.select_(x_swap, xs[tau, other], b0))
                    b1 = Int32(cutlass.select_(x_swap, xs[tau, other + 1], b1))
                c = mma_bf16_16816(a, b0, b1, [acc[j, tau, 0], acc[j, tau, 1], acc[j, tau, 2], acc[j, tau, 3]])
                for i in cutlass.range_constexpr(4):
                    acc[j, tau, i] = c[i]

    @cute.jit
    def _cluster_pair_setup(self, tidx: Int32):
        """paired="cluster", at the kernel's start: (allocator, mbarrier, ups) with ``ups`` fp32 [32, 4 * tiles] the up CTA's
        sums as the gate CTA receives them and the mbarrier that counts their bytes (initialised here; every thread arrives
        on the cluster barrier so the up CTA, which waits on it before sending, finds it initialised)."""
        smem = SmemAllocator()
        bar = smem.allocate_array(cutlass.Int64, 1)
        nfrag = 4 * self.tiles
        ups = smem.allocate_tensor(Float32, cute.make_layout((32, nfrag), stride=(nfrag, 1)), byte_alignment=16)
        if tidx == 0:
            cute.arch.mbarrier_init(bar, 1)
            cute.arch.mbarrier_init_fence()
        cute.arch.cluster_arrive_relaxed()
        return smem, bar, ups

    @cute.jit
    def _cluster_pair_handoff(self, acc: cute.Tensor, pair_smem, up_cta: Int32, lane: Int32, nfrag: int):
        """paired="cluster", the first warp of each CTA once its K slices have met: the up CTA's sends its ``nfrag`` sums a
        lane into the gate CTA's ``ups`` (st.async, 16 bytes each, counted on the gate CTA's mbarrier); the gate CTA's
        expects those bytes and waits for them."""
        _, bar, ups = pair_smem
        if up_cta == 1:
            cute.arch.cluster_wait()  # the gate CTA's mbarrier is initialised
            for j in cutlass.range_constexpr(nfrag // 4):
                words = tuple(bits_of_f32(acc[0, (4 * j + e) // 4, (4 * j + e) % 4]) for e in range(4))
                cute.arch.store_async_dsmem((ups.iterator + lane * nfrag + 4 * j).align(16), words, bar, 0)
        else:
            if lane == 0:
                cute.arch.mbarrier_arrive_and_expect_tx(bar, 32 * nfrag * 4)
            cute.arch.mbarrier_wait(bar, 0)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mXv: cute.Tensor, mW: cute.Tensor, mS: cute.Tensor, mAlpha: cute.Tensor, mBias: cute.Tensor,
               mY: cute.Tensor, mWs: cute.Tensor, mCnt: cute.Tensor, mOff: cute.Tensor, m: Int32, n: Int32, warp_groups: Int32,
               quads_per_split: Int32, splits: Int32, limit: Float32, token_blocks: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        tb, rgb, z = cute.arch.block_idx()
        if cutlass.const_expr(self.pdl == "start"):
            cute.arch.griddepcontrol_launch_dependents()
        G = self.groups
        # group e's rows are row_begin:row_end, its weight row groups e*RG.., its alphas e*RG*16..
        expert = Int32(0)
        split = z
        row_begin = Int32(0)
        row_end = m
        if cutlass.const_expr(self.grouped):
            expert = z // splits
            split = z - expert * splits
            row_begin = mOff[expert]
            row_end = mOff[expert + 1]
        rg_base = expert * (warp_groups * self.row_mult)
        col_base = rg_base * D.ROWS_PER_GROUP
        slot = expert * token_blocks + tb  # this CTA's token block in the workspace and the counters
        lane = tidx % 32
        warp = tidx // 32
        ks = warp // self.rows  # this warp's slice of the CTA's K range (0 without ksplit)
        row_slot = warp - ks * self.rows
        wg = rgb * self.rows + row_slot  # this warp's row group (gate row group with swiglu)
        my_rg = rg_base + wg  # the weight row group of its first fragment
        if cutlass.const_expr(self.paired):  # the CTA's gate row group rgb: slot 0 loads it, slot 1 its up row group
            wg = rgb
            my_rg = rg_base + rgb + row_slot * warp_groups
        up_cta = Int32(0)
        pair_smem = None
        if cutlass.const_expr(self.cluster_pair):  # cluster (1, 2, 1): rank 0 the gate row group rgb // 2, rank 1 its up row group
            up_cta = rgb % 2
            wg = rgb // 2
            my_rg = rg_base + wg + up_cta * warp_groups
            pair_smem = self._cluster_pair_setup(tidx)
        g = lane // 4
        t = lane % 4
        tpb = self.tiles * TOKENS_PER_TILE
        first_row = row_begin + tb * tpb
        q_begin = split * quads_per_split
        q_end = cutlass.min(q_begin + quads_per_split, self.quads)
        cta_q_begin = q_begin  # the x_smem slice covers the CTA's whole K range
        if cutlass.const_expr(self.ksplit > 1):
            # warp slice ks of ksplit: quads [span*ks/S, span*(ks+1)/S) of the CTA's range (balanced to one quad)
            span = q_end - q_begin
            q_end = q_begin + (span * (ks + 1)) // self.ksplit
            q_begin = q_begin + (span * ks) // self.ksplit
        sX = None
        if cutlass.const_expr(self.x_smem):
            self._wait_for_previous_grid()
            # the CTA's activations [tpb rows, its k range] -> shared memory (rows past m: zeros), once
            smem = SmemAllocator()
            sX = smem.allocate_tensor(Int32, cute.make_layout((tpb, MAX_SMEM_QUADS * 4, 4, 8), stride=(self.row_words, 32, 8, 1)), byte_alignment=16)
            sXv = cute.make_tensor(sX.iterator, cute.make_layout((tpb, MAX_SMEM_QUADS * 32, 4), stride=(self.row_words, 4, 1)))
            per_row = (q_end - cta_q_begin) * 32
            for idx in cutlass.range(tidx, tpb * per_row, self.threads):
                r = idx // per_row
                v = idx - r * per_row
                if first_row + r < row_end:
                    cute.autovec_copy(mXv[first_row + r, cta_q_begin * 32 + v, None], sXv[r, v, None])
                else:
                    for i in cutlass.range_constexpr(4):
                        sXv[r, v, i] = Int32(0)
            cute.arch.sync_threads()
        x_swap = (g % 2) == Int32(1)  # x_stagger: this lane's token rows are odd (its x halves load swapped)
        active = (wg < warp_groups) & (first_row < row_end)
        acc = cute.make_rmem_tensor(cute.make_ordered_layout((G, self.tiles, 4), order=(2, 1, 0)), Float32)
        for i in cutlass.range_constexpr(G * self.tiles * 4):
            acc[i // (4 * self.tiles), (i // 4) % self.tiles, i % 4] = Float32(0.0)
        nfrag = G * self.tiles * 4
        ep = cute.make_rmem_tensor((6,), Float32)  # the epilogue's factors with early_scales (_load_epilogue_factors)
        # early_scales: where the loads may go. Without PDL (or with x_smem, which waited above) before the main loop;
        # with PDL right after the wait in its first quad, or, for a warp with no quads, in the epilogue
        scales_first = self.early_scales and (self.pdl == "off" or self.x_smem)
        scales_at_wait = self.early_scales and not scales_first
        if active:
            wcur = cute.make_rmem_tensor(cute.make_ordered_layout((G, 4, 4), order=(2, 1, 0)), Int32)
            wnxt = cute.make_rmem_tensor(cute.make_ordered_layout((G, 4, 4), order=(2, 1, 0)), Int32)
            scur = cute.make_rmem_tensor(cute.make_ordered_layout((G, 2), order=(1, 0)), Int32)
            snxt = cute.make_rmem_tensor(cute.make_ordered_layout((G, 2), order=(1, 0)), Int32)
            xr = cute.make_rmem_tensor(cute.make_ordered_layout((self.tiles, 4, 8), order=(2, 1, 0)), Int32)
            xnxt = cute.make_rmem_tensor(cute.make_ordered_layout((self.tiles, 4, 8), order=(2, 1, 0)), Int32)
            if q_begin < q_end:
                for j in cutlass.range_constexpr(G):
                    self._load_quad(mW, mS, my_rg + j * warp_groups, q_begin, lane, wcur, scur, j)
                if cutlass.const_expr(self.prefetch_x):
                    self._wait_for_previous_grid()
                    self._load_x(mX, first_row, g, t, q_begin, row_end, xr)
                    if cutlass.const_expr(scales_at_wait):
                        self._load_epilogue_factors(mAlpha, mBias, col_base, wg, g, n, ep)
            if cutlass.const_expr(scales_first):
                self._load_epilogue_factors(mAlpha, mBias, col_base, wg, g, n, ep)
            for q in cutlass.range(q_begin, q_end, 1):
                if q + 1 < q_end:
                    for j in cutlass.range_constexpr(G):
                        self._load_quad(mW, mS, my_rg + j * warp_groups, q + 1, lane, wnxt, snxt, j)
                    if cutlass.const_expr(self.prefetch_x):
                        self._load_x(mX, first_row, g, t, q + 1, row_end, xnxt)
                if cutlass.const_expr(self.x_smem):
                    for tau in cutlass.range_constexpr(self.tiles):
                        for ci in cutlass.range_constexpr(4):
                            cute.autovec_copy(sX[tau * TOKENS_PER_TILE + g, (q - q_begin) * 4 + ci, t, None], xr[tau, ci, None])
                elif cutlass.const_expr(not self.prefetch_x):
                    if cutlass.const_expr(self.pdl != "off"):
                        if q == q_begin:  # the first two quads' weight loads are in flight: now x may be read
                            cute.arch.griddepcontrol_wait()
                            if cutlass.const_expr(scales_at_wait):
                                self._load_epilogue_factors(mAlpha, mBias, col_base, wg, g, n, ep)
                    self._load_x(mX, first_row, g, t, q, row_end, xr)
                for j in cutlass.range_constexpr(G):
                    for ci in cutlass.range_constexpr(4):
                        self._mma_chunk(wcur, scur, j, ci, xr[None, ci, None], acc, x_swap)
                if q + 1 < q_end:
                    for i in cutlass.range_constexpr(G * 16):
                        wcur[i // 16, (i // 4) % 4, i % 4] = wnxt[i // 16, (i // 4) % 4, i % 4]
                    for i in cutlass.range_constexpr(G * 2):
                        scur[i // 2, i % 2] = snxt[i // 2, i % 2]
                    if cutlass.const_expr(self.prefetch_x):
                        for i in cutlass.range_constexpr(self.tiles * 32):
                            xr[i // 32, (i // 8) % 4, i % 8] = xnxt[i // 32, (i // 8) % 4, i % 8]

        if cutlass.const_expr(self.pdl == "loop"):
            cute.arch.griddepcontrol_launch_dependents()
        # every thread that writes y, the workspace or the counters has waited (a no-op where it already did)
        self._wait_for_previous_grid()
        ups = None
        if cutlass.const_expr(self.ksplit > 1):
            # slices 1.. of each row group hand their partial sums to slice 0 through shared memory
            smem_red = pair_smem[0] if cutlass.const_expr(self.cluster_pair) else SmemAllocator()
            red = smem_red.allocate_tensor(
                Float32, cute.make_layout((self.ksplit - 1, self.rows, 32, nfrag),
                                          stride=(self.rows * 32 * nfrag, 32 * nfrag, nfrag, 1)), byte_alignment=16)
            if cutlass.const_expr(self.paired):
                ups = smem_red.allocate_tensor(Float32, cute.make_layout((32, nfrag), stride=(nfrag, 1)), byte_alignment=16)
            if active & (ks > 0):
                part = cute.make_rmem_tensor((nfrag,), Float32)
                for i in cutlass.range_constexpr(nfrag):
                    part[i] = acc[i // (4 * self.tiles), (i // 4) % self.tiles, i % 4]
                cute.autovec_copy(part, red[ks - 1, row_slot, lane, None])
            cute.arch.sync_threads()
            if active & (ks == 0):
                for other in cutlass.range_constexpr(self.ksplit - 1):  # a fixed order: deterministic
                    for i in cutlass.range_constexpr(nfrag):
                        idx = (i // (4 * self.tiles), (i // 4) % self.tiles, i % 4)
                        acc[idx] = acc[idx] + red[other, row_slot, lane, i]
            if cutlass.const_expr(self.paired):  # the up warp's sums -> the gate warp
                if active & (ks == 0) & (row_slot == 1):
                    part = cute.make_rmem_tensor((nfrag,), Float32)
                    for i in cutlass.range_constexpr(nfrag):
                        part[i] = acc[0, (i // 4) % self.tiles, i % 4]
                    cute.autovec_copy(part, ups[lane, None])
                cute.arch.sync_threads()
            if cutlass.const_expr(self.cluster_pair):
                ups = pair_smem[2]
                if active & (ks == 0):
                    self._cluster_pair_handoff(acc, pair_smem, up_cta, lane, nfrag)
        lead = ks == 0  # the warp that finishes its row group (with paired: the gate warp only)
        if cutlass.const_expr(self.paired):
            lead = lead & (row_slot == 0)
        if cutlass.const_expr(self.cluster_pair):
            lead = lead & (up_cta == 0)
        if active & lead:
            last = Boolean(True)
            if splits > 1:
                frag = cute.make_rmem_tensor((nfrag,), Float32)
                for i in cutlass.range_constexpr(nfrag):
                    frag[i] = acc[i // (4 * self.tiles), (i // 4) % self.tiles, i % 4]
                cute.autovec_copy(frag, mWs[slot, split, wg, lane, None])
                cute.arch.fence_acq_rel_gpu()
                cute.arch.sync_warp()
                arrived = Int32(0)
                if lane == 0:
                    arrived = cute.arch.atomic_add((mCnt.iterator + slot * warp_groups + wg).llvm_ptr, Int32(1),
                                                   sem="acq_rel", scope="gpu")
                arrived = cute.arch.shuffle_sync(arrived, 0)
                last = arrived == splits - 1
                if last:
                    # sum the splits in a fixed order (deterministic whichever warp arrives last)
                    cute.arch.fence_acq_rel_gpu()
                    for i in cutlass.range_constexpr(nfrag):
                        acc[i // (4 * self.tiles), (i // 4) % self.tiles, i % 4] = Float32(0.0)
                    for other in cutlass.range(0, splits, 1):
                        if other == split:
                            for i in cutlass.range_constexpr(nfrag):
                                idx = (i // (4 * self.tiles), (i // 4) % self.tiles, i % 4)
                                acc[idx] = acc[idx] + frag[i]
                        else:
                            base = mWs.iterator + cute.crd2idx((slot, other, wg, lane, 0), mWs.layout)
                            for i in cutlass.range_constexpr(nfrag):
                                idx = (i // (4 * self.tiles), (i // 4) % self.tiles, i % 4)
                                acc[idx] = acc[idx] + cute.arch.load((base + i).llvm_ptr, Float32, cop="cg")
                    if lane == 0:
                        mCnt[slot, wg] = Int32(0)
            if last:
                if cutlass.const_expr(scales_at_wait):
                    if q_begin >= q_end:  # no quads: the main loop never read them
                        self._load_epilogue_factors(mAlpha, mBias, col_base, wg, g, n, ep)
                shift = Float32(2.0 ** D.MAGNITUDE_SHIFT)
                for tau in cutlass.range_constexpr(self.tiles):
                    for i in cutlass.range_constexpr(4):
                        tok = first_row + tau * TOKENS_PER_TILE + 2 * t + (i % 2)
                        h = i // 2
                        col = wg * D.ROWS_PER_GROUP + g + 8 * h
                        if (tok < row_end) & (col < n):
                            if cutlass.const_expr(self.early_scales):
                                a_gate, a_up, b = ep[h], ep[2 + h], ep[4 + h]
                            else:  # read here, each behind the y stores before it
                                a_gate = mAlpha[col_base + col] * shift
                                a_up = mAlpha[col_base + col + n] * shift if cutlass.const_expr(self.swiglu) else a_gate
                                b = mBias[col] if cutlass.const_expr(self.has_bias) else a_gate
                            value = acc[0, tau, i] * a_gate
                            if cutlass.const_expr(self.swiglu):
                                if cutlass.const_expr(self.paired or self.cluster_pair):
                                    up = ups[lane, tau * 4 + i] * a_up
                                else:
                                    up = acc[1, tau, i] * a_up
                                gate = cute.arch.fmin(value, limit)
                                up = cute.arch.fmax(cute.arch.fmin(up, limit), -limit)
                                value = gate / (Float32(1.0) + cute.math.exp(-gate)) * up
                            if cutlass.const_expr(self.has_bias):
                                value = value + b
                            mY[tok, col] = value.to(cutlass.BFloat16)


def _pointers(x=None, words=None, scale_words=None, alpha=None, bias=None, y=None, ws=None, cnt=None, offsets=None):
    from cutlass.cute.runtime import make_ptr

    gmem = cute.AddressSpace.gmem

    def pointer(dtype, t, align):
        return make_ptr(dtype, 0 if t is None else t.data_ptr(), gmem, assumed_align=align)

    return (pointer(Int32, x, 16), pointer(Int32, words, 16), pointer(Int32, scale_words, 8), pointer(Float32, alpha, 4),
            pointer(Float32, bias, 4), pointer(cutlass.BFloat16, y, 2), pointer(Float32, ws, 16), pointer(Int32, cnt, 4),
            pointer(Int32, offsets, 4))


def compile_decode(k: int, tiles: int, has_bias: bool, swiglu: bool = False, prefetch_x: bool | None = None,
                   arch: str | None = None, keep_ptx: bool = False, x_smem: bool | None = None, grouped: bool = False,
                   rows: int | None = None, ksplit: int = 1, stream_loads: bool | None = None, paired: bool = False,
                   pdl: str = "off", ctas_per_sm: int | None = None, x_stagger: bool | None = None,
                   early_scales: bool | None = None):
    """Compile (cached) the decode kernel for K = k (``grouped``: the one-launch grouped variant; ``rows`` x
    ``ksplit`` warps per CTA, see :class:`GemmDecodeKernel`). Works without a GPU (fake pointers)."""
    from cutlass.cute.runtime import make_fake_stream

    prefetch_x = DEFAULTS["prefetch_x"] if prefetch_x is None else prefetch_x
    x_smem = DEFAULTS["x_smem"] if x_smem is None else x_smem
    stream_loads = DEFAULTS["stream_loads"] if stream_loads is None else stream_loads
    x_stagger = DEFAULTS["x_stagger"] if x_stagger is None else x_stagger
    if early_scales is None:
        early_scales = DEFAULTS["early_scales"] and early_scales_fit(ksplit, tiles, ctas_per_sm is not None, k // D.QUAD_K)
    kernel = GemmDecodeKernel(k, tiles, has_bias, swiglu, prefetch_x, x_smem, grouped, rows, ksplit, stream_loads, paired, pdl,
                              ctas_per_sm, x_stagger, early_scales)
    sizes = (Int32(1), Int32(16), Int32(1), Int32(1), Int32(1), Float32(10.0), Int32(1), Int32(1))
    key = ("GemmDecodeKernel", k, tiles, has_bias, swiglu, prefetch_x, x_smem, grouped, kernel.rows, ksplit, stream_loads, paired, pdl,
           kernel.min_ctas, kernel.x_stagger, early_scales)
    return compile_kernel(key, kernel, *_pointers(), *sizes, make_fake_stream(), arch=arch, keep_ptx=keep_ptx)


# Tuning defaults (the benchmark also times the alternatives: data/bench/gemm_h100.json "variants")
DEFAULTS = dict(prefetch_x=False, warps_per_sm=16, x_smem=False, swiglu_warps_per_sm=12, stream_loads=False,  # chosen from the variants recorded at 15f0806 (H100)
                pdl="auto",  # "auto": pdl_for(...)
                x_stagger=False, early_scales=True)


def tiles_for(m: int) -> int:
    """Token tiles of 8 per CTA: 1 up to M = 16 (two token blocks read the weights from L2 twice, still
    faster than 2 tiles there on the H100), 2 above."""
    return 1 if m <= 2 * TOKENS_PER_TILE else MAX_TILES


def splits_for(row_groups: int, quads: int, token_blocks: int, sm_count: int = 132, warps_per_sm: int = 16,
               max_per_split: int | None = None):
    """(quads per split, splits): enough warps to keep every SM streaming, at least one quad each (and at
    most ``max_per_split``)."""
    want = max(1, -(-sm_count * warps_per_sm // (row_groups * token_blocks)))
    per_split = max(1, -(-quads // want))
    if max_per_split:
        per_split = min(per_split, max_per_split)
    return per_split, -(-quads // per_split)


# Registers per thread of the plain decode kernel, by (swiglu, tiles): ptxas for sm_90a via CuTeDSL 4.8.1
# (tests/test_gemm.py checks them where ptxas is installed). They set how many CTAs an SM holds at once.
REGISTERS = {(False, 1): 72, (False, 2): 80, (True, 1): 145, (True, 2): 193}
# The same with the in-CTA K split, any rows x ksplit: an upper bound, rounded up to the allocation unit of 8
# (the counts vary by a few registers with rows and ksplit; tests/test_gemm.py checks the bound).
KSPLIT_REGISTERS = {(False, 1): 80, (False, 2): 80, (True, 1): 152, (True, 2): 192}
WIDE_REGISTERS = 128  # the budget of a wide_registers(...) plan (ptxas takes ~120 there uncapped)
KSPLIT_MAX_M = 64  # the in-CTA K split is measured (and used) up to 64 rows (the decode kernel's range)
KSPLIT_MAX_WARPS = 16  # CTAs of at most 512 threads


def resident_warps(swiglu: bool, tiles: int) -> int:
    """Warps of the plain decode kernel one SM holds at once: whole CTAs within the 64K-register file."""
    warps = WARPS // 2 if swiglu else WARPS
    ctas = 65536 // (REGISTERS[(swiglu, tiles)] * 32 * warps)
    return max(1, ctas) * warps


def stream_loads_for(ksplit: int) -> bool:
    """Whether the plain launch streams its weights (:func:`load_stream_v4`). Measured on an H100 at M = 1..64
    (data/bench/ksplit_probe_nvidia_h100_80gb_hbm3_9399366.json): faster for every CTA shape the plans take
    (gate_up M = 1 12.1 -> 11.0 us, down 8.3 -> 7.4, wo_b M = 16 40.9 -> 31.3) and for the grid's split K,
    except the 1 x 12..16 slice shapes of fused_wqa_wkv (equal at M <= 8, 8.1 against 7.2 us at M = 16)."""
    return ksplit < 12


def pdl_for(tiles: int, ksplit: int, stream_loads: bool, paired: bool, wide: bool = False) -> str:
    """The PDL mode (:data:`PDL_MODES`) of a plain launch. Measured on an H100 in graph replay of back-to-back
    calls (data/bench/pdl_probe_nvidia_h100_80gb_hbm3_7e77c8f.json), "start" against "off": faster for every
    in-CTA split plan of one token tile (gate_up M = 1 11.1 -> 10.1 us, down 7.5 -> 6.1, fused_wqa_wkv M = 8
    5.6 -> 5.0, shared expert M = 1 19.2 -> 16.0), for the paired SwiGLU kernel (M = 64 42.3 -> 36.3) and for
    the plans without streaming loads (fused_wqa_wkv M = 16 7.3 -> 6.5); slower for two token tiles with
    streaming loads under the 80-register cap (gate_up M = 16 14.9 -> 16.1, wo_b M = 16 31.7 -> 40.0), but faster
    for the same plans with ``wide`` registers (:func:`wide_registers`; gate_up M = 16 13.7 -> 12.6, down 9.2 -> 8.1,
    wo_b equal: data/bench/decode_variants_nvidia_h100_80gb_hbm3_01e940a.json). The grid's split K: not measured, off."""
    if ksplit > 1 and (tiles == 1 or paired or not stream_loads or wide):
        return "start"
    return "off"


# early_scales in the plans of the 80-register cap: where a warp's K slice is at most this many quads (H100, A/B in one
# process, data/bench/decode_variants_nvidia_h100_80gb_hbm3_2e22bb1_early.json: 0.2-0.5 us faster at 1.75-4.7 quads a warp,
# the same at 7, 0.2-0.3 us slower for wo_b at 10.7)
EARLY_SCALES_MAX_QUADS = 8


def early_scales_fit(ksplit: int, tiles: int, wide: bool, quads: int) -> bool:
    """Whether a launch of a K of ``quads`` quads reads the epilogue's factors before the main loop
    (``early_scales``, where ``DEFAULTS["early_scales"]``): the in-CTA split plans with wide registers (M = 9..16),
    and those of one token tile whose warps' K slices are at most :data:`EARLY_SCALES_MAX_QUADS` quads. Read in the
    epilogue, the factors were a load latency on every warp's tail, which the short slices feel most; early, they
    are 2-4 more live registers through the main loop, which the long slices under the 80-register cap pay for
    (wo_b at M = 1..8). H100 (graph replay, the late and early kernels alternating in one process,
    data/bench/decode_variants_nvidia_h100_80gb_hbm3_2e22bb1_early.json): gate_up M = 1 9.9 -> 9.4 us, M = 16
    12.8 -> 12.4; down M = 1 6.1 -> 5.9, M = 16 8.4 -> 8.2; fused_wqa_wkv M = 1 5.0 -> 4.7, M = 16 6.7 -> 6.2;
    wo_b M = 16 30.4 -> 29.5. Not elsewhere: the 80-register two-tile plans (M = 17..64) spilled 36 bytes instead
    of 16 (ptxas, sm_90a), and the grid's split K and the grouped kernel, compiled without a register cap,
    grew (72 -> 80 registers at one tile, 80 -> 128 at two), which would change their planned resident warps."""
    if ksplit < 2:
        return False
    return wide or (tiles == 1 and -(-quads // ksplit) <= EARLY_SCALES_MAX_QUADS)


def wide_registers(swiglu: bool, tiles: int, token_blocks: int) -> bool:
    """Whether the in-CTA split plan gives the kernel :data:`WIDE_REGISTERS`: two token tiles in ONE token block
    (M = 9..16), not SwiGLU. Under the 80-register cap ptxas issues that kernel's 64 activation registers a quad
    in four batches, each waited on by the next MMA (Nsight Compute at M = 16: two thirds of the stalls are
    those waits), and it issues the next quad's weight loads only before the last chunk. With ~120
    registers the plan holds fewer warps but each loads a whole quad ahead: gate_up M = 16 14.8 -> 12.6 us, down
    9.4 -> 8.1, wo_b 32.0 -> 29.9 (H100, data/bench/decode_variants_nvidia_h100_80gb_hbm3_01e940a.json). Budgets between
    80 and 128 for more warps a row group (no spill at 80-96, ptxas) were slower still (H100, alternating in one process,
    data/bench/decode_variants_nvidia_h100_80gb_hbm3_e5ec4b9_m16_regs_*.json): gate_up M = 16 12.5-12.6 us against 13.8
    with 6 warps a row group at 96 registers and 17.0 with 7 at 80; down 8.2 against 8.6 (5 warps, 96) and 9.5 (6, 80)."""
    return tiles == 2 and token_blocks == 1 and not swiglu


def ksplit_ctas(swiglu: bool, tiles: int, warps: int, wide: bool = False) -> int:
    """CTAs of ``warps`` warps an SM holds with the in-CTA K split (registers per :data:`KSPLIT_REGISTERS`, or
    :data:`WIDE_REGISTERS` with ``wide``; at most 64 warps and 32 CTAs); the kernel is compiled to fit that many
    (minnctapersm)."""
    regs = WIDE_REGISTERS if wide else KSPLIT_REGISTERS[(swiglu, tiles)]
    return min(65536 // (regs * 32 * warps), 64 // warps, 32)


def ksplit_plan(row_groups: int, quads: int, token_blocks: int, sm_count: int, swiglu: bool, tiles: int, waves: int = 1,
                rows_options=(1, 2, 4, 8), wide: bool = False):
    """(rows, ksplit, warps, resident warps per SM) of the in-CTA K split launch, or None: the CTA shape
    (``rows`` row groups x ``ksplit`` K slices) that puts the most warps on each row group's K range while
    every CTA fits in ONE wave (CTAs <= SMs x resident CTAs; ``waves``: that many). Ties go to more resident warps per SM, then
    to 2 rows (L1 sharing of x); ``wide``: the :data:`WIDE_REGISTERS` budget (:func:`wide_registers`). The decode kernel is latency-bound: a warp waits on each quad's loads, so
    many warps with few quads each keep the most bytes in flight; measured on an H100 against the grid's
    split K (data/bench/ksplit_probe_nvidia_h100_80gb_hbm3_c2e6517.json): gate_up M = 1 16.3 -> 12.1 us, down 11.1 -> 8.3, fused_wqa_wkv 9.9 -> 5.2, fused_wqa_wkv M = 64 25.2 -> 13.1."""
    best = None
    for rows in rows_options:
        blocks = -(-row_groups // rows)
        for ksplit in range(2, min(quads, KSPLIT_MAX_WARPS // rows) + 1):
            warps = rows * ksplit
            resident = ksplit_ctas(swiglu, tiles, warps, wide)
            if resident == 0 or token_blocks * blocks > waves * sm_count * resident:
                continue
            key = (blocks * rows * ksplit, resident * warps, -abs(rows - 2))
            if best is None or key > best[0]:
                best = (key, rows, ksplit)
    return None if best is None else (best[1], best[2], best[0][0], best[0][1])


def splits_for_wave(row_groups: int, quads: int, token_blocks: int, sm_count: int, resident: int,
                    max_per_split: int | None = None):
    """(quads per split, splits) of the plain decode kernel: as many splits as keep every warp in ONE wave
    (row_groups x token_blocks x splits <= SMs x resident warps), but no split shorter than 3 quads
    (K <= 4096) or 4 (longer K), where the split-K sum costs more than the parallelism gains. Measured on an
    H100 against every split count (data/bench/splits_probe_nvidia_h100_80gb_hbm3_56e74ac.json): best or
    within 8% of best for gate_up, down, fused_wqa_wkv and gate_up + SwiGLU at M = 1, 16 and 64, where the
    former rule (:func:`splits_for`, 16 warps a SM rounded up) spilled into a second wave (down at M = 64:
    39.3 against 25.3 us)."""
    cap = max(1, sm_count * resident // (row_groups * token_blocks))
    splits = max(1, min(cap, quads // (3 if quads <= 16 else 4)))
    per_split = -(-quads // splits)
    if max_per_split:
        per_split = min(per_split, max_per_split)
    return per_split, -(-quads // per_split)


# paired="cluster" (gate and up row groups in two CTAs of a cluster) for the SwiGLU plan up to this M (None: never). H100,
# alternating in one process (data/bench/decode_variants_nvidia_h100_80gb_hbm3_cfe50da_cluster_pair.json): gate_up + SwiGLU
# M = 1 10.7-10.9 -> 10.0 us, M = 4 11.0-11.1 -> 10.2, M = 8 10.8-10.9 -> 10.2-10.4 (384 CTAs of 8 warps, 3 an SM, against
# the paired kernel's 192 of 12, two on 60 SMs and one on 72: the plain kernel with that grid took 10.5 against 9.6 us at
# M = 1, decode_variants_*_02b2a12_imbalance.json); slower from M = 16 (14.7-14.9 -> 15.7, M = 64 36.9 -> 52.3)
CLUSTER_PAIR_MAX_M = 8


def auto_ksplit(row_groups: int, quads: int, rows_m: int, sm_count: int, swiglu: bool, tiles: int | None = None,
                cluster_pair: bool | None = None):
    """(tiles, rows, ksplit, paired) the plain launch takes for M = ``rows_m`` <= :data:`KSPLIT_MAX_M`, or None (then
    the grid's split K): :func:`ksplit_plan` for each token tiling, the one with the most warps per row
    group, then the most resident warps, then fewer token tiles (no MMA on empty token columns). The SwiGLU
    kernel takes its paired form (``paired`` True: CTAs of one gate and one up row group x ksplit; "cluster" up to
    M = CLUSTER_PAIR_MAX_M: the two row groups in two CTAs of a cluster, each planned as the plain kernel's one row
    group; ``cluster_pair`` True / False forces it either way); on an H100 gate_up + SwiGLU at M = 1 went 16.3 (grid
    split) -> 14.1 (two fragments a warp) -> 12.1 us."""
    if rows_m > KSPLIT_MAX_M:
        return None

    def best(tile_options, plan_rows, waves=1, **options):
        plans = []
        for t in ([tiles] if tiles else tile_options):
            blocks = -(-rows_m // (t * TOKENS_PER_TILE))
            plan = ksplit_plan(plan_rows, quads, blocks, sm_count, False, t, waves, wide=wide_registers(swiglu, t, blocks), **options)
            if plan:
                plans.append((plan[2:], -t, t, plan[:2]))
        return max(plans) if plans else None

    every_tiling = range(1, MAX_TILES + 1)
    if swiglu:  # the paired SwiGLU kernel: CTAs of a gate and its up row group, the plain kernel's registers
        # 1 token tile up to M = 16: 2 tiles measured slower there (18.4 against 16.0 us at M = 16, H100)
        tilings = [1] if rows_m <= 2 * TOKENS_PER_TILE else every_tiling
        if cluster_pair is None:
            cluster_pair = CLUSTER_PAIR_MAX_M is not None and rows_m <= CLUSTER_PAIR_MAX_M
        if cluster_pair:  # gate and up CTAs of a cluster: the plain kernel's plan for twice the row groups
            chosen = best(tilings, 2 * row_groups, rows_options=(1,))
            if chosen is not None:
                return chosen[2], 1, chosen[3][1], "cluster"
        chosen = best(tilings, 2 * row_groups, rows_options=(2,))
        return None if chosen is None else (chosen[2], 2, chosen[3][1], True)
    # where no one-wave shape exists (down and wo_b at M = 64), two waves still beat the grid's split K
    # (down 22.6 against 26.8 us, wo_b 104.9 against 171.6)
    chosen = best(every_tiling, row_groups) or best(every_tiling, row_groups, waves=2)
    return None if chosen is None else (chosen[2], *chosen[3], False)


def _launch(x, words, scale_words, alpha, n, bias, out, swiglu_limit, prefetch_x, warps_per_sm, tiles, x_smem,
            offsets=None, experts=1, max_rows=None, active_groups=1, splits=None, rows=None, ksplit=1, stream_loads=None,
            paired=False, pdl=None, ctas_per_sm=None, x_stagger=None, early_scales=None):
    """Shared host side of the plain and the grouped launch (see :func:`run_decode`, :func:`run_grouped_decode`)."""
    m, k = x.shape
    swiglu = swiglu_limit is not None
    groups = 2 if swiglu else 1
    row_groups = words.shape[0] // experts
    if swiglu and (n % D.ROWS_PER_GROUP or row_groups != 2 * n // D.ROWS_PER_GROUP):
        raise ValueError(f"the fused SwiGLU needs gate_up of 2*I rows with I a multiple of 16, got I={n} and {row_groups} row groups")
    warp_groups = row_groups // groups
    max_rows = m if max_rows is None else max_rows
    quads = k // D.QUAD_K
    x_smem = DEFAULTS["x_smem"] if x_smem is None else x_smem
    if ksplit is None:  # automatic: the in-CTA K split where measured and a one-wave CTA shape exists
        ksplit = 1
        if offsets is None and warps_per_sm is None and not x_smem and not splits and rows is None:
            plan = auto_ksplit(warp_groups, quads, max_rows, sm_count(x.device), swiglu, tiles,
                               cluster_pair=True if paired == "cluster" else None)
            if plan:
                tiles, rows, ksplit, paired = plan
                splits = 1
                if wide_registers(swiglu, tiles, -(-max_rows // (tiles * TOKENS_PER_TILE))):
                    ctas_per_sm = ksplit_ctas(False, tiles, rows * ksplit, wide=True)
    if ksplit > 1 and not splits:
        splits = 1  # the K split is inside the CTA
    if stream_loads is None:
        stream_loads = DEFAULTS["stream_loads"] if offsets is not None else stream_loads_for(ksplit)
    tiles = tiles or tiles_for(max_rows)
    tpb = tiles * TOKENS_PER_TILE
    token_blocks = -(-max_rows // tpb)
    default_warps = DEFAULTS["swiglu_warps_per_sm"] if swiglu else DEFAULTS["warps_per_sm"]
    if splits:  # an explicit split count (the in-CTA split: 1; probes): per split ceil(quads / splits) quads
        per_split = -(-quads // splits)
        nsplit = -(-quads // per_split)
    elif offsets is None and warps_per_sm is None:
        per_split, nsplit = splits_for_wave(warp_groups, quads, token_blocks, sm_count(x.device), resident_warps(swiglu, tiles),
                                            MAX_SMEM_QUADS if x_smem else None)
    else:  # the grouped kernel (measured with this rule: MoE decode and wo_a), or an explicit warps_per_sm (variants)
        per_split, nsplit = splits_for(warp_groups, quads, token_blocks * active_groups, sm_count(x.device),
                                       warps_per_sm or default_warps, MAX_SMEM_QUADS if x_smem else None)
    if pdl is None:
        pdl = "off" if offsets is not None else DEFAULTS["pdl"]
        if pdl == "auto":
            pdl = pdl_for(tiles, ksplit, stream_loads, paired, wide=ctas_per_sm is not None)
    compiled = compile_decode(k, tiles, bias is not None, swiglu, prefetch_x, x_smem=x_smem, grouped=offsets is not None,
                              rows=rows, ksplit=ksplit, stream_loads=stream_loads, paired=paired, pdl=pdl, ctas_per_sm=ctas_per_sm,
                              x_stagger=x_stagger, early_scales=early_scales)
    y = out if out is not None else torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    frag = 4 * tiles * groups
    slots = experts * token_blocks
    if paired and nsplit > 1:
        raise ValueError(f"the paired SwiGLU kernel splits K inside the CTA only (got {nsplit} grid splits)")
    ws = torch.empty(slots * nsplit * warp_groups * 32 * frag if nsplit > 1 else 4, dtype=torch.float32, device=x.device)
    cnt = split_counters(x.device, slots * warp_groups) if nsplit > 1 else ws  # read only with split K
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    compiled(*_pointers(x, words, scale_words, alpha, bias32 if bias32 is not None else alpha, y, ws, cnt,
                        offsets if offsets is not None else cnt),
             Int32(m), Int32(n), Int32(warp_groups), Int32(per_split), Int32(nsplit),
             Float32(swiglu_limit if swiglu else 0.0), Int32(experts), Int32(max_rows), current_stream())
    return y


def run_decode(x: torch.Tensor, words: torch.Tensor, scale_words: torch.Tensor, alpha: torch.Tensor, n: int,
               bias: torch.Tensor | None = None, out: torch.Tensor | None = None, swiglu_limit: float | None = None,
               prefetch_x: bool | None = None, warps_per_sm: int | None = None, tiles: int | None = None,
               x_smem: bool | None = None, splits: int | None = None, rows: int | None = None, ksplit: int | None = None,
               stream_loads: bool | None = None, paired: bool | str = False, pdl: str | None = None,
               ctas_per_sm: int | None = None, x_stagger: bool | None = None, early_scales: bool | None = None) -> torch.Tensor:
    """x bf16 [M, K] (contiguous) on the GPU; words / scale_words from :func:`~.dequant.repack_weight`;
    alpha fp32 [N]; bias [N] or None -> bf16 [M, N]. With ``swiglu_limit`` (a float, ``inf`` for no clamp)
    the weight is gate_up [gate; up] of N = 2I rows and the result is the clamped SwiGLU, bf16 [M, I]
    (``n`` is then I). ``rows`` / ``ksplit``: the CTA shape (:class:`GemmDecodeKernel`); ``ksplit=None`` picks
    it (:func:`ksplit_plan`, M <= 16), ``ksplit=1`` forces the grid's split K. ``pdl`` (:data:`PDL_MODES`, default
    ``DEFAULTS["pdl"]``): programmatic dependent launch, the weight loads start before the previous kernel on
    the stream has finished, so ``words`` / ``scale_words`` must not be written by that kernel (x, bias and
    alpha are read after the wait). ``ctas_per_sm``: the CTAs an SM holds that the in-CTA split kernel is
    compiled for (fewer: more registers a thread); the automatic plan sets it at M = 9..16
    (:func:`wide_registers`), and a launch with it set takes PDL by default. ``x_stagger`` (default
    ``DEFAULTS["x_stagger"]``, off): bank-staggered activation loads, measured no faster (module docstring).
    ``early_scales`` (default: where :func:`early_scales_fit`): the epilogue's alpha (and bias) read before the main
    loop instead of in the epilogue (:class:`GemmDecodeKernel`). No host sync; CUDA-graph
    capturable after a first eager call (compile, counters)."""
    return _launch(x, words, scale_words, alpha, n, bias, out, swiglu_limit, prefetch_x, warps_per_sm, tiles, x_smem, splits=splits,
                   rows=rows, ksplit=ksplit, stream_loads=stream_loads, paired=paired, pdl=pdl, ctas_per_sm=ctas_per_sm,
                   x_stagger=x_stagger, early_scales=early_scales)


def run_grouped_decode(x: torch.Tensor, offsets: torch.Tensor, words: torch.Tensor, scale_words: torch.Tensor,
                       alpha: torch.Tensor, n: int, max_rows: int, swiglu_limit: float | None = None,
                       out: torch.Tensor | None = None, warps_per_sm: int | None = None, tiles: int | None = None) -> torch.Tensor:
    """One launch for E weights: rows ``offsets[e]:offsets[e+1]`` of x (bf16 [M, K], contiguous) times weight e.

    offsets: int32 [E+1] on the GPU (non-decreasing, 0 .. M; not checked here: no host sync);
    words: int32 [E, RG, K/64, 32, 4] and scale_words int32 [E, RG, K/256, 32, 2] (each expert from
    :func:`~.dequant.repack_weight`); alpha fp32 [E, RG*16] (n a multiple of 16); max_rows: a bound on the
    rows of any group (rows past it are NOT computed: pass M when unsure). ``swiglu_limit`` as in
    :func:`run_decode` (n is then I). Returns bf16 [M, n]; rows outside every group are left unwritten.
    CUDA-graph capturable after a first eager call."""
    experts = words.shape[0]
    if n % D.ROWS_PER_GROUP:
        raise ValueError(f"the grouped kernel needs N (I with SwiGLU) a multiple of {D.ROWS_PER_GROUP}, got {n}")
    if offsets.dtype != torch.int32 or offsets.shape != (experts + 1,):
        raise ValueError(f"offsets must be int32 [E+1] = [{experts + 1}], got {offsets.dtype} {tuple(offsets.shape)}")
    if not 0 < max_rows:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    stacked = (words.reshape(-1, *words.shape[2:]), scale_words.reshape(-1, *scale_words.shape[2:]))
    active = min(experts, x.shape[0])  # at most one group per row has work
    # Token tiles from the AVERAGE rows per group, not the bound: MoE decode (8 tokens top-6 over 48
    # experts, ~1 row each) is fastest with 1 tile, wo_a at 16 tokens (16 rows in every group) with 2
    # (H200, data/bench/grouped_variants_nvidia_h200.json).
    tiles = tiles or (1 if -(-x.shape[0] // experts) <= TOKENS_PER_TILE else MAX_TILES)
    return _launch(x, *stacked, alpha.reshape(-1), n, None, out, swiglu_limit, None, warps_per_sm, tiles, None,
                   offsets=offsets, experts=experts, max_rows=max_rows, active_groups=active)

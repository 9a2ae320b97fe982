"""NVFP4 x NVFP4 GEMM for Blackwell (sm_100a) on the tcgen05 block-scaled MMA. ONE GROUP.

COMPILE-VERIFIED ONLY: this kernel compiles to PTX holding ``tcgen05.mma ... block_scale`` on a
machine without a GPU (tests/test_sm100_compile.py); it has never run on Blackwell hardware here (no
such GPU exists in this workbook's environment). Its numerical test (tests/test_sm100_gpu.py) runs only
on a compute-capability-10.x GPU and is skipped everywhere else.

Computes ``C[M, N] = ((A x SFA) @ (B x SFB)^T) * alpha[N]`` rounded to bf16, where

- A: E2M1 [M, K] K-major (``nvfp4lib.quantize(x).packed``, uint8 [M, K/2], element 2i in the low nibble);
- B: E2M1 [N, K] K-major (a checkpoint ``weight``, uint8 [N, K/2]);
- SFA / SFB: float8_e4m3fn block scales, one per 16 elements along K, in exactly the 128x4 layout that
  :func:`nvfp4lib.layout.swizzle_scales` writes (CuTeDSL's ``BlockScaledBasicChunk`` K-major atom
  ((32,4),(16,4)):((16,4),(0,1)), atoms K-major; rows padded to 128, scale columns to 4, padding zero);
- alpha: fp32 [N], the product of the two global scales (``input_scale * weight_scale_2`` per column);
  the global scales are never folded into the E4M3 block scales.

Design (one output tile per CTA, warp-specialised, no cluster): warp 5 issues TMA loads of A, B,
SFA, SFB into a multi-stage shared-memory ring (``PipelineTmaUmma``); warp 4 copies the scales to
tensor memory (``tcgen05.cp``) and issues ``tcgen05.mma.kind::mxf4nvf4.block_scale`` (tile 128 x
``tile_n`` x 256, fp32 accumulator in tensor memory); warps 0-3 load the accumulator (``tcgen05.ld``: one row per thread),
multiply by the per-column alpha, convert to bf16 and store each thread's row fragment with 16-byte
vector stores under a row predicate. The shared per-tile
body (:meth:`BlockScaledGemmSm100.gemm_tile`) takes the tile's placement (row start, scale tile, valid
rows, group), so the grouped kernel reuses it unchanged.

The host side takes raw device pointers (``cute.runtime.make_ptr``): torch has no E2M1 dtype, and a
pointer interface compiles identically with or without a GPU. Sizes M, N, K are dynamic Int32.
Constraints: K % 256 == 0, N % 128 == 0 (DeepSeek-V4: K in {7168, 3072}, N in {6144, 7168}).
"""

from typing import Tuple

from ..cute_compile import import_cute

cutlass, cute = import_cute()

import cutlass.pipeline as pipeline  # noqa: E402
import cutlass.utils as utils  # noqa: E402
import cutlass.utils.blackwell_helpers as sm100_utils  # noqa: E402
import cutlass.utils.blockscaled_layout as blockscaled_utils  # noqa: E402
from cutlass.cute.nvgpu import cpasync, tcgen05  # noqa: E402

SF_VEC_SIZE = 16  # NVFP4: one E4M3 scale per 16 elements
TILE_M = 128  # one tcgen05 MMA of a single CTA: 128 rows (the 128-row scale atom)
MMA_K_BLOCKS = 4  # k-blocks of 64 per mainloop stage: tile K = 256 elements = 16 scale columns
MAX_AB_STAGES = 8


class BlockScaledGemmSm100:
    """NVFP4 block-scaled GEMM for one group: ``C = (A x SFA) @ (B x SFB)^T * alpha`` (bf16 out).

    COMPILE-VERIFIED ONLY (never run on Blackwell hardware here).

    tile_n: output tile width, 128 or 256. Static; one compiled kernel per (tile_n, arch).
    """

    def __init__(self, tile_n: int = 128):
        if tile_n not in (128, 256):
            raise ValueError(f"tile_n must be 128 or 256, got {tile_n}")
        self.tile_n = tile_n
        self.acc_dtype = cutlass.Float32
        self.ab_dtype = cutlass.Float4E2M1FN
        self.sf_dtype = cutlass.Float8E4M3FN
        self.c_dtype = cutlass.BFloat16
        self.cta_group = tcgen05.CtaGroup.ONE
        self.cluster_shape_mn = (1, 1)
        self.epilogue_warps = (0, 1, 2, 3)
        self.mma_warp = 4
        self.tma_warp = 5
        self.threads_per_cta = 32 * 6
        self.epilogue_barrier = pipeline.NamedBarrier(barrier_id=1, num_threads=32 * len(self.epilogue_warps))
        self.tmem_alloc_barrier = pipeline.NamedBarrier(barrier_id=2, num_threads=32 * (1 + len(self.epilogue_warps)))
        self.smem_capacity = utils.get_smem_capacity_in_bytes("sm_100")
        self.tmem_alloc_cols = cute.arch.get_max_tmem_alloc_cols("sm_100")

    # ------------------------------------------------------------------------------------------
    # static configuration (trace time)
    # ------------------------------------------------------------------------------------------
    def _make_tiled_mma(self):
        return sm100_utils.make_blockscaled_trivial_tiled_mma(
            self.ab_dtype, self.ab_dtype, tcgen05.OperandMajorMode.K, tcgen05.OperandMajorMode.K,
            self.sf_dtype, SF_VEC_SIZE, self.cta_group, (TILE_M, self.tile_n),
        )

    def _setup(self):
        tiled_mma = self._make_tiled_mma()
        mma_inst_k = cute.size(tiled_mma.shape_mnk, mode=[2])
        self.mma_tiler = (TILE_M, self.tile_n, mma_inst_k * MMA_K_BLOCKS)
        self.cta_tile_shape_mnk = self.mma_tiler
        self.cluster_layout_vmnk = cute.tiled_divide(cute.make_layout((1, 1, 1)), (tiled_mma.thr_id.shape,))
        self.c_layout = utils.LayoutEnum.ROW_MAJOR
        self.epi_tile = sm100_utils.compute_epilogue_tile_shape(self.cta_tile_shape_mnk, False, self.c_layout, self.c_dtype)

        one_stage = (
            cute.size_in_bytes(self.ab_dtype, sm100_utils.make_smem_layout_a(tiled_mma, self.mma_tiler, self.ab_dtype, 1))
            + cute.size_in_bytes(self.ab_dtype, sm100_utils.make_smem_layout_b(tiled_mma, self.mma_tiler, self.ab_dtype, 1))
            + cute.size_in_bytes(self.sf_dtype, blockscaled_utils.make_smem_layout_sfa(tiled_mma, self.mma_tiler, SF_VEC_SIZE, 1))
            + cute.size_in_bytes(self.sf_dtype, blockscaled_utils.make_smem_layout_sfb(tiled_mma, self.mma_tiler, SF_VEC_SIZE, 1))
        )
        reserved = 1024  # barriers and the tensor-memory address
        self.num_ab_stage = min(MAX_AB_STAGES, (self.smem_capacity - reserved) // one_stage)

        self.a_smem_layout_staged = sm100_utils.make_smem_layout_a(tiled_mma, self.mma_tiler, self.ab_dtype, self.num_ab_stage)
        self.b_smem_layout_staged = sm100_utils.make_smem_layout_b(tiled_mma, self.mma_tiler, self.ab_dtype, self.num_ab_stage)
        self.sfa_smem_layout_staged = blockscaled_utils.make_smem_layout_sfa(tiled_mma, self.mma_tiler, SF_VEC_SIZE, self.num_ab_stage)
        self.sfb_smem_layout_staged = blockscaled_utils.make_smem_layout_sfb(tiled_mma, self.mma_tiler, SF_VEC_SIZE, self.num_ab_stage)

        # tensor memory columns: accumulator (tile_n fp32 columns), then SFA, then SFB
        sf_atom_rows = 32
        self.num_acc_tmem_cols = self.tile_n
        self.num_sfa_tmem_cols = (TILE_M // sf_atom_rows) * MMA_K_BLOCKS
        self.num_sfb_tmem_cols = (self.tile_n // sf_atom_rows) * MMA_K_BLOCKS
        return tiled_mma

    def _operand_tensors(self, a_ptr, b_ptr, sfa_ptr, sfb_ptr, c_ptr, alpha_ptr, m, n, k, num_groups, scale_rows):
        """Global tensors: A (m, k, 1), B (n, k, L), SFA over (scale_rows, k, 1), SFB over (n, k, L),
        C (m, n, 1) row-major, alpha (n, L). L = num_groups (1 for a single group)."""
        k_aligned = cute.assume(k, 256)
        a = cute.make_tensor(a_ptr, cute.make_ordered_layout((m, k_aligned, 1), order=(1, 0, 2)))
        b = cute.make_tensor(b_ptr, cute.make_ordered_layout((cute.assume(n, 128), k_aligned, num_groups), order=(1, 0, 2)))
        sfa = cute.make_tensor(sfa_ptr, blockscaled_utils.tile_atom_to_shape_SF((scale_rows, k_aligned, 1), SF_VEC_SIZE))
        sfb = cute.make_tensor(sfb_ptr, blockscaled_utils.tile_atom_to_shape_SF(b.shape, SF_VEC_SIZE))
        c = cute.make_tensor(c_ptr, cute.make_ordered_layout((m, cute.assume(n, 128), 1), order=(1, 0, 2)))
        alpha = cute.make_tensor(alpha_ptr, cute.make_ordered_layout((cute.assume(n, 128), num_groups), order=(0, 1)))
        return a, b, sfa, sfb, c, alpha

    def _tma_atoms(self, tiled_mma, a, b, sfa, sfb):
        """TMA load atoms and coordinate tensors for A, B, SFA, SFB (no multicast: cluster 1x1)."""
        cluster = self.cluster_layout_vmnk.shape
        a_op = sm100_utils.cluster_shape_to_tma_atom_A(self.cluster_shape_mn, tiled_mma.thr_id)
        b_op = sm100_utils.cluster_shape_to_tma_atom_B(self.cluster_shape_mn, tiled_mma.thr_id)
        sfb_op = sm100_utils.cluster_shape_to_tma_atom_SFB(self.cluster_shape_mn, tiled_mma.thr_id)
        a_smem = cute.slice_(self.a_smem_layout_staged, (None, None, None, 0))
        b_smem = cute.slice_(self.b_smem_layout_staged, (None, None, None, 0))
        sfa_smem = cute.slice_(self.sfa_smem_layout_staged, (None, None, None, 0))
        sfb_smem = cute.slice_(self.sfb_smem_layout_staged, (None, None, None, 0))
        tma_a = cute.nvgpu.make_tiled_tma_atom_A(a_op, a, a_smem, self.mma_tiler, tiled_mma, cluster)
        tma_b = cute.nvgpu.make_tiled_tma_atom_B(b_op, b, b_smem, self.mma_tiler, tiled_mma, cluster)
        tma_sfa = cute.nvgpu.make_tiled_tma_atom_A(a_op, sfa, sfa_smem, self.mma_tiler, tiled_mma, cluster, internal_type=cutlass.Int16)
        tma_sfb = cute.nvgpu.make_tiled_tma_atom_B(sfb_op, sfb, sfb_smem, self.mma_tiler, tiled_mma, cluster, internal_type=cutlass.Int16)
        self.num_tma_load_bytes = (
            cute.size_in_bytes(self.ab_dtype, a_smem) + cute.size_in_bytes(self.ab_dtype, b_smem)
            + cute.size_in_bytes(self.sf_dtype, sfa_smem) + cute.size_in_bytes(self.sf_dtype, sfb_smem)
        )
        return tma_a, tma_b, tma_sfa, tma_sfb

    def _shared_storage(self):
        stages = self.num_ab_stage

        @cute.struct
        class SharedStorage:
            ab_full_mbar: cute.struct.MemRange[cutlass.Int64, stages]
            ab_empty_mbar: cute.struct.MemRange[cutlass.Int64, stages]
            acc_full_mbar: cute.struct.MemRange[cutlass.Int64, 1]
            acc_empty_mbar: cute.struct.MemRange[cutlass.Int64, 1]
            tmem_holding_buf: cutlass.Int32
            sA: cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(self.a_smem_layout_staged.outer)], 1024]
            sB: cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(self.b_smem_layout_staged.outer)], 1024]
            sSFA: cute.struct.Align[cute.struct.MemRange[self.sf_dtype, cute.cosize(self.sfa_smem_layout_staged)], 1024]
            sSFB: cute.struct.Align[cute.struct.MemRange[self.sf_dtype, cute.cosize(self.sfb_smem_layout_staged)], 1024]

        return SharedStorage

    # ------------------------------------------------------------------------------------------
    # host launch (single group)
    # ------------------------------------------------------------------------------------------
    @cute.jit
    def __call__(self, a_ptr: cute.Pointer, b_ptr: cute.Pointer, sfa_ptr: cute.Pointer, sfb_ptr: cute.Pointer,
                 c_ptr: cute.Pointer, alpha_ptr: cute.Pointer, m: cutlass.Int32, n: cutlass.Int32, k: cutlass.Int32,
                 stream):
        """a_ptr: E2M1 [M, K]; b_ptr: E2M1 [N, K]; sfa_ptr / sfb_ptr: E4M3, 128x4 swizzled for M and N
        rows; c_ptr: bf16 [M, N] row-major; alpha_ptr: fp32 [N]. Grid: ceil(M/128) x N/tile_n."""
        tiled_mma = self._setup()
        scale_rows = cute.round_up(m, TILE_M)
        a, b, sfa, sfb, c, alpha = self._operand_tensors(a_ptr, b_ptr, sfa_ptr, sfb_ptr, c_ptr, alpha_ptr, m, n, k, 1, scale_rows)
        tma_a, tma_b, tma_sfa, tma_sfb = self._tma_atoms(tiled_mma, a, b, sfa, sfb)
        self.shared_storage = self._shared_storage()
        grid = (cute.ceil_div(m, TILE_M), cute.ceil_div(n, self.tile_n), 1)
        self.kernel(
            tiled_mma, tma_a[0], tma_a[1], tma_b[0], tma_b[1], tma_sfa[0], tma_sfa[1], tma_sfb[0], tma_sfb[1],
            c, alpha, m,
        ).launch(grid=grid, block=[self.threads_per_cta, 1, 1], cluster=(1, 1, 1), stream=stream, min_blocks_per_mp=1)

    @cute.kernel
    def kernel(self, tiled_mma: cute.TiledMma, tma_atom_a: cute.CopyAtom, mA: cute.Tensor, tma_atom_b: cute.CopyAtom,
               mB: cute.Tensor, tma_atom_sfa: cute.CopyAtom, mSFA: cute.Tensor, tma_atom_sfb: cute.CopyAtom,
               mSFB: cute.Tensor, mC: cute.Tensor, mAlpha: cute.Tensor, m: cutlass.Int32):
        """One CTA per (128-row, tile_n-column) output tile of the single group."""
        bidx, bidy, _ = cute.arch.block_idx()
        row_start = bidx * TILE_M
        self.gemm_tile(
            tiled_mma, tma_atom_a, mA, tma_atom_b, mB, tma_atom_sfa, mSFA, tma_atom_sfb, mSFB, mC, mAlpha,
            row_start, bidx, bidy, cutlass.Int32(0), m - row_start, cutlass.Float32(1.0),
        )

    # ------------------------------------------------------------------------------------------
    # the per-tile body shared with the grouped kernel
    # ------------------------------------------------------------------------------------------
    @cute.jit
    def gemm_tile(self, tiled_mma: cute.TiledMma, tma_atom_a: cute.CopyAtom, mA: cute.Tensor,
                  tma_atom_b: cute.CopyAtom, mB: cute.Tensor, tma_atom_sfa: cute.CopyAtom, mSFA: cute.Tensor,
                  tma_atom_sfb: cute.CopyAtom, mSFB: cute.Tensor, mC: cute.Tensor, mAlpha: cute.Tensor,
                  row_start: cutlass.Int32, scale_tile_m: cutlass.Int32, tile_n: cutlass.Int32, group: cutlass.Int32,
                  rows_valid: cutlass.Int32, row_scale: cutlass.Float32):
        """Compute one output tile: rows row_start .. row_start+127 of A and C (rows >= rows_valid are
        neither stored nor meaningful), scale rows of 128-row tile scale_tile_m of SFA, columns of tile
        tile_n, weights and alpha of group ``group``; the result is multiplied by
        ``row_scale * alpha[col, group]``."""
        # Layout values built on the host cannot cross into the kernel region: rebuild them here
        # (all static, so they equal the host's).
        self._setup()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        if warp_idx == self.tma_warp:
            cpasync.prefetch_descriptor(tma_atom_a)
            cpasync.prefetch_descriptor(tma_atom_b)
            cpasync.prefetch_descriptor(tma_atom_sfa)
            cpasync.prefetch_descriptor(tma_atom_sfb)

        smem = utils.SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        ab_pipeline = pipeline.PipelineTmaUmma.create(
            barrier_storage=storage.ab_full_mbar.data_ptr(),
            num_stages=self.num_ab_stage,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 1),
            tx_count=self.num_tma_load_bytes,
            cta_layout_vmnk=self.cluster_layout_vmnk,
            defer_sync=True,
        )
        acc_pipeline = pipeline.PipelineUmmaAsync.create(
            barrier_storage=storage.acc_full_mbar.data_ptr(),
            num_stages=1,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 32 * len(self.epilogue_warps)),
            cta_layout_vmnk=self.cluster_layout_vmnk,
            defer_sync=True,
        )
        tmem = utils.TmemAllocator(
            storage.tmem_holding_buf,
            barrier_for_retrieve=self.tmem_alloc_barrier,
            allocator_warp_id=self.epilogue_warps[0],
        )
        pipeline.pipeline_init_arrive(cluster_shape_mn=self.cluster_shape_mn, is_relaxed=True)

        sA = storage.sA.get_tensor(self.a_smem_layout_staged.outer, swizzle=self.a_smem_layout_staged.inner)
        sB = storage.sB.get_tensor(self.b_smem_layout_staged.outer, swizzle=self.b_smem_layout_staged.inner)
        sSFA = storage.sSFA.get_tensor(self.sfa_smem_layout_staged)
        sSFB = storage.sSFB.get_tensor(self.sfb_smem_layout_staged)

        # This tile's A rows and C rows start at row_start: shift the domains, then take tile 0.
        mA_tile = cute.domain_offset((row_start, 0, 0), mA)
        mC_tile = cute.domain_offset((row_start, 0, 0), mC)
        # (bM, bK, RestM, RestK, RestL)
        gA = cute.local_tile(mA_tile, cute.slice_(self.mma_tiler, (None, 0, None)), (None, None, None))
        gB = cute.local_tile(mB, cute.slice_(self.mma_tiler, (0, None, None)), (None, None, None))
        gSFA = cute.local_tile(mSFA, cute.slice_(self.mma_tiler, (None, 0, None)), (None, None, None))
        gSFB = cute.local_tile(mSFB, cute.slice_(self.mma_tiler, (0, None, None)), (None, None, None))
        gC = cute.local_tile(mC_tile, cute.slice_(self.mma_tiler, (None, None, 0)), (None, None, None))
        cC = cute.local_tile(
            cute.make_identity_tensor(mC_tile.shape), cute.slice_(self.mma_tiler, (None, None, 0)), (None, None, None)
        )
        k_tile_cnt = cute.size(gA, mode=[3])

        thr_mma = tiled_mma.get_slice(0)
        tCgA = thr_mma.partition_A(gA)
        tCgB = thr_mma.partition_B(gB)
        tCgSFA = thr_mma.partition_A(gSFA)
        tCgSFB = thr_mma.partition_B(gSFB)
        tCgC = thr_mma.partition_C(gC)
        tCcC = thr_mma.partition_C(cC)

        one_cta = cute.make_layout(1)
        tAsA, tAgA = cpasync.tma_partition(tma_atom_a, 0, one_cta, cute.group_modes(sA, 0, 3), cute.group_modes(tCgA, 0, 3))
        tBsB, tBgB = cpasync.tma_partition(tma_atom_b, 0, one_cta, cute.group_modes(sB, 0, 3), cute.group_modes(tCgB, 0, 3))
        tAsSFA, tAgSFA = cpasync.tma_partition(tma_atom_sfa, 0, one_cta, cute.group_modes(sSFA, 0, 3), cute.group_modes(tCgSFA, 0, 3))
        tBsSFB, tBgSFB = cpasync.tma_partition(tma_atom_sfb, 0, one_cta, cute.group_modes(sSFB, 0, 3), cute.group_modes(tCgSFB, 0, 3))
        tAsSFA = cute.filter_zeros(tAsSFA)
        tAgSFA = cute.filter_zeros(tAgSFA)
        tBsSFB = cute.filter_zeros(tBsSFB)
        tBgSFB = cute.filter_zeros(tBgSFB)

        tCrA = tiled_mma.make_fragment_A(sA)
        tCrB = tiled_mma.make_fragment_B(sB)
        acc_shape = tiled_mma.partition_shape_C(self.mma_tiler[:2])
        tCtAcc_fake = tiled_mma.make_fragment_C(acc_shape)

        pipeline.pipeline_init_wait(cluster_shape_mn=self.cluster_shape_mn)

        # ---------------- TMA warp: A, B, SFA, SFB k-tiles into the ring ----------------
        if warp_idx == self.tma_warp:
            tAgA_tile = tAgA[(None, 0, None, 0)]
            tBgB_tile = tBgB[(None, tile_n, None, group)]
            tAgSFA_tile = tAgSFA[(None, scale_tile_m, None, 0)]
            tBgSFB_tile = tBgSFB[(None, tile_n, None, group)]
            producer_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.num_ab_stage)
            for k_tile in cutlass.range(0, k_tile_cnt, 1, unroll=1):
                ab_pipeline.producer_acquire(producer_state)
                barrier = ab_pipeline.producer_get_barrier(producer_state)
                cute.copy(tma_atom_a, tAgA_tile[(None, producer_state.count)], tAsA[(None, producer_state.index)], tma_bar_ptr=barrier)
                cute.copy(tma_atom_b, tBgB_tile[(None, producer_state.count)], tBsB[(None, producer_state.index)], tma_bar_ptr=barrier)
                cute.copy(tma_atom_sfa, tAgSFA_tile[(None, producer_state.count)], tAsSFA[(None, producer_state.index)], tma_bar_ptr=barrier)
                cute.copy(tma_atom_sfb, tBgSFB_tile[(None, producer_state.count)], tBsSFB[(None, producer_state.index)], tma_bar_ptr=barrier)
                producer_state.advance()
            ab_pipeline.producer_tail(producer_state)

        # ---------------- MMA warp: scales to tensor memory, block-scaled MMA ----------------
        if warp_idx == self.mma_warp:
            tmem.wait_for_alloc()
            acc_tmem_ptr = tmem.retrieve_ptr(self.acc_dtype)
            tCtAcc = cute.make_tensor(acc_tmem_ptr, tCtAcc_fake.layout)
            sfa_tmem_ptr = cute.recast_ptr(acc_tmem_ptr + self.num_acc_tmem_cols, dtype=self.sf_dtype)
            tCtSFA = cute.make_tensor(sfa_tmem_ptr, blockscaled_utils.make_tmem_layout_sfa(
                tiled_mma, self.mma_tiler, SF_VEC_SIZE, cute.slice_(self.sfa_smem_layout_staged, (None, None, None, 0))))
            sfb_tmem_ptr = cute.recast_ptr(acc_tmem_ptr + self.num_acc_tmem_cols + self.num_sfa_tmem_cols, dtype=self.sf_dtype)
            tCtSFB = cute.make_tensor(sfb_tmem_ptr, blockscaled_utils.make_tmem_layout_sfb(
                tiled_mma, self.mma_tiler, SF_VEC_SIZE, cute.slice_(self.sfb_smem_layout_staged, (None, None, None, 0))))
            copy_s2t_sfa, tCsSFA_s2t, tCtSFA_s2t = self._scale_copy_to_tmem(sSFA, tCtSFA)
            copy_s2t_sfb, tCsSFB_s2t, tCtSFB_s2t = self._scale_copy_to_tmem(sSFB, tCtSFB)

            consumer_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.num_ab_stage)
            acc_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
            acc_pipeline.producer_acquire(acc_state)
            tiled_mma.set(tcgen05.Field.ACCUMULATE, False)
            for k_tile in cutlass.range(0, k_tile_cnt, 1, unroll=1):
                ab_pipeline.consumer_wait(consumer_state)
                stage = (None, None, None, None, consumer_state.index)
                cute.copy(copy_s2t_sfa, tCsSFA_s2t[stage], tCtSFA_s2t)
                cute.copy(copy_s2t_sfb, tCsSFB_s2t[stage], tCtSFB_s2t)
                for kblock in cutlass.range(cute.size(tCrA, mode=[2]), unroll_full=True):
                    tiled_mma.set(tcgen05.Field.SFA, tCtSFA[(None, None, kblock)].iterator)
                    tiled_mma.set(tcgen05.Field.SFB, tCtSFB[(None, None, kblock)].iterator)
                    block = (None, None, kblock, consumer_state.index)
                    cute.gemm(tiled_mma, tCtAcc, tCrA[block], tCrB[block], tCtAcc)
                    tiled_mma.set(tcgen05.Field.ACCUMULATE, True)
                ab_pipeline.consumer_release(consumer_state)
                consumer_state.advance()
            acc_pipeline.producer_commit(acc_state)
            acc_state.advance()
            acc_pipeline.producer_tail(acc_state)

        # ---------------- epilogue warps: TMEM -> registers -> * alpha -> bf16 -> global ----------------
        if warp_idx < self.mma_warp:
            tmem.allocate(self.tmem_alloc_cols)
            tmem.wait_for_alloc()
            acc_tmem_ptr = tmem.retrieve_ptr(self.acc_dtype)
            tCtAcc = cute.make_tensor(acc_tmem_ptr, tCtAcc_fake.layout)

            copy_atom_t2r = sm100_utils.get_tmem_load_op(
                self.cta_tile_shape_mnk, self.c_layout, self.c_dtype, self.acc_dtype, self.epi_tile, False)
            tAcc_epi = cute.flat_divide(tCtAcc[((None, None), 0, 0)], self.epi_tile)
            tiled_copy_t2r = tcgen05.make_tmem_copy(copy_atom_t2r, tAcc_epi[(None, None, 0, 0)])
            thr_copy_t2r = tiled_copy_t2r.get_slice(tidx)
            # (T2R, T2R_M, T2R_N, EPI_M, EPI_N)
            tTR_tAcc = thr_copy_t2r.partition_S(tAcc_epi)
            gC_epi = cute.flat_divide(tCgC[((None, None), 0, 0, 0, tile_n, 0)], self.epi_tile)
            cC_epi = cute.flat_divide(tCcC[((None, None), 0, 0, 0, tile_n, 0)], self.epi_tile)
            tTR_gC = thr_copy_t2r.partition_D(gC_epi)
            tTR_cC = thr_copy_t2r.partition_D(cC_epi)
            tTR_rAcc = cute.make_rmem_tensor(tTR_gC[(None, None, None, 0, 0)].shape, self.acc_dtype)

            tTR_tAcc = cute.group_modes(tTR_tAcc, 3, cute.rank(tTR_tAcc))
            tTR_gC = cute.group_modes(tTR_gC, 3, cute.rank(tTR_gC))
            tTR_cC = cute.group_modes(tTR_cC, 3, cute.rank(tTR_cC))

            n_cols = cute.size(mC, mode=[1])
            acc_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1)
            acc_pipeline.consumer_wait(acc_state)
            tTR_rC = cute.make_rmem_tensor(tTR_rAcc.shape, self.c_dtype)
            for subtile in cutlass.range(cute.size(tTR_tAcc, mode=[3])):
                cute.copy(tiled_copy_t2r, tTR_tAcc[(None, None, None, subtile)], tTR_rAcc)
                gC_sub = tTR_gC[(None, None, None, subtile)]
                cC_sub = tTR_cC[(None, None, None, subtile)]
                # a thread holds consecutive columns of ONE row (tcgen05.ld 32x32b: lane = row), and N is
                # a multiple of the epilogue tile, so one predicate covers the thread's whole fragment
                for i in cutlass.range(cute.size(tTR_rAcc), unroll_full=True):
                    tTR_rC[i] = (tTR_rAcc[i] * (row_scale * mAlpha[cC_sub[i][1], group])).to(self.c_dtype)
                if cC_sub[0][0] < rows_valid and cC_sub[0][1] < n_cols:
                    cute.autovec_copy(tTR_rC, gC_sub)
            cute.arch.fence_view_async_tmem_load()
            acc_pipeline.consumer_release(acc_state)

            tmem.relinquish_alloc_permit()
            self.epilogue_barrier.arrive_and_wait()
            tmem.free(acc_tmem_ptr)

    def _scale_copy_to_tmem(self, sSF: cute.Tensor, tSF: cute.Tensor) -> Tuple:
        """tcgen05.cp (4x32x128b) of one stage of scales from shared to tensor memory."""
        tCsSF_compact = cute.filter_zeros(sSF)
        tCtSF_compact = cute.filter_zeros(tSF)
        copy_atom = cute.make_copy_atom(tcgen05.Cp4x32x128bOp(self.cta_group), self.sf_dtype)
        tiled_copy = tcgen05.make_s2t_copy(copy_atom, tCtSF_compact)
        thr_copy = tiled_copy.get_slice(0)
        tCsSF_s2t = tcgen05.get_s2t_smem_desc_tensor(tiled_copy, thr_copy.partition_S(tCsSF_compact))
        tCtSF_s2t = thr_copy.partition_D(tCtSF_compact)
        return tiled_copy, tCsSF_s2t, tCtSF_s2t


def fake_pointers(num_pointers_alpha: int = 1):
    """Null device pointers of the kernel's operand types, for compiling without a GPU:
    (A, B, SFA, SFB, C, alpha, *extra fp32)."""
    from cutlass.cute.runtime import make_ptr

    gmem = cute.AddressSpace.gmem
    return (
        make_ptr(cutlass.Float4E2M1FN, 0, gmem, assumed_align=16),
        make_ptr(cutlass.Float4E2M1FN, 0, gmem, assumed_align=16),
        make_ptr(cutlass.Float8E4M3FN, 0, gmem, assumed_align=32),
        make_ptr(cutlass.Float8E4M3FN, 0, gmem, assumed_align=32),
        make_ptr(cutlass.BFloat16, 0, gmem, assumed_align=16),
        make_ptr(cutlass.Float32, 0, gmem, assumed_align=16),
    )


def compile_blockscaled_gemm(tile_n: int = 128, arch: str | None = None, keep_ptx: bool = False):
    """Compile the single-group kernel (cached by tile_n and arch). Works without a GPU."""
    from cutlass.cute.runtime import make_fake_stream

    from ..cute_compile import compile_kernel

    kernel = BlockScaledGemmSm100(tile_n)
    args = (*fake_pointers(), cutlass.Int32(256), cutlass.Int32(256), cutlass.Int32(256), make_fake_stream())
    return compile_kernel(("BlockScaledGemmSm100", tile_n), kernel, *args, arch=arch or "sm_100a", keep_ptx=keep_ptx)


def run_blockscaled_gemm(packed_a, swizzled_sfa, weight, swizzled_sfb, alpha, tile_n: int = 128):
    """Launch on a Blackwell GPU. packed_a: uint8 [M, K/2]; swizzled_sfa: e4m3 ``swizzle_scales`` of the
    [M, K/16] activation scales; weight: uint8 [N, K/2]; swizzled_sfb: e4m3 ``swizzle_scales`` of the
    [N, K/16] weight scales; alpha: fp32 [N] -> bf16 [M, N]. NEVER RUN ON HARDWARE HERE."""
    import torch
    from cuda.bindings import driver as cuda_driver
    from cutlass.cute.runtime import make_ptr

    m, k = packed_a.shape[0], packed_a.shape[1] * 2
    n = weight.shape[0]
    if k % 256 or n % 128:
        raise ValueError(f"the sm100 kernel needs K % 256 == 0 and N % 128 == 0, got K={k}, N={n}")
    out = torch.empty(m, n, dtype=torch.bfloat16, device=packed_a.device)
    alpha = alpha.float().contiguous()
    gmem = cute.AddressSpace.gmem
    pointers = (
        make_ptr(cutlass.Float4E2M1FN, packed_a.data_ptr(), gmem, assumed_align=16),
        make_ptr(cutlass.Float4E2M1FN, weight.data_ptr(), gmem, assumed_align=16),
        make_ptr(cutlass.Float8E4M3FN, swizzled_sfa.data_ptr(), gmem, assumed_align=32),
        make_ptr(cutlass.Float8E4M3FN, swizzled_sfb.data_ptr(), gmem, assumed_align=32),
        make_ptr(cutlass.BFloat16, out.data_ptr(), gmem, assumed_align=16),
        make_ptr(cutlass.Float32, alpha.data_ptr(), gmem, assumed_align=16),
    )
    stream = cuda_driver.CUstream(torch.cuda.current_stream().cuda_stream)
    compile_blockscaled_gemm(tile_n)(*pointers, cutlass.Int32(m), cutlass.Int32(n), cutlass.Int32(k), stream)
    return out

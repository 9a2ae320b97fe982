"""Grouped NVFP4 x NVFP4 GEMM over MoE experts for Blackwell (sm_100a), tcgen05 block-scaled MMA.

COMPILE-VERIFIED ONLY: it compiles to PTX holding ``tcgen05.mma ... block_scale`` on a machine without
a GPU (tests/test_sm100_compile.py); it has never run on Blackwell hardware here. Its numerical test
(tests/test_sm100_gpu.py) runs only on a compute-capability-10.x GPU and is skipped elsewhere.

For every expert e, rows ``offsets[e]:offsets[e+1]`` of the activations (expert-contiguous order):

    C[rows] = ((A[rows] x SFA) @ (W[e] x SFW[e])^T) * act_global_scale[e] * alpha[e, n]   -> bf16

- A: E2M1 [M, K] (uint8 [M, K/2]) in the routed order; SFA: E4M3 in the grouped 128x4 layout that
  :func:`nvfp4lib.moe.quantize_groups` (and the scale-assembly issue's grouped op) writes: group e's scale
  rows start at ``padded_offsets[e]`` (a multiple of 128) of a buffer of ``capacity_rows`` rows; padding 0.
- W: E2M1 [E, N, K] (uint8 [E, N, K/2]); SFW: E4M3 [E, Np*K16p], ``swizzle_scales`` of each expert.
- act_global_scale: fp32 [E] (the activation decode multipliers); alpha: fp32 [E, N] (``weight_scale_2``
  per output column, so gate and up may differ). Both are applied in the epilogue, in fp32.

One launch, CUDA-graph safe: the grid is fixed by the capacity bound, ``capacity_rows/128`` row tiles x
``N/tile_n`` column tiles. Row tile t covers padded rows [128t, 128t+128); its CTA finds its expert e by
scanning ``padded_offsets`` on the device (so SFA is read at tile t directly), reads A and writes C from row
``offsets[e] + 128t - padded_offsets[e]`` on, and stores only rows of expert e. Tiles past
``padded_offsets[E]`` exit at once. No host synchronisation anywhere.
"""
from ..cute_compile import import_cute
from .blockscaled_gemm import TILE_M, BlockScaledGemmSm100, fake_pointers

cutlass, cute = import_cute()


class GroupedBlockScaledGemmSm100(BlockScaledGemmSm100):
    """Grouped NVFP4 block-scaled GEMM over experts (one launch; per-expert global scales in the
    epilogue). COMPILE-VERIFIED ONLY (never run on Blackwell hardware here).

    tile_n: output tile width, 128 or 256 (static).
    """

    @cute.jit
    def __call__(self, a_ptr: cute.Pointer, b_ptr: cute.Pointer, sfa_ptr: cute.Pointer, sfb_ptr: cute.Pointer,
                 c_ptr: cute.Pointer, alpha_ptr: cute.Pointer, act_scale_ptr: cute.Pointer, offsets_ptr: cute.Pointer,
                 padded_offsets_ptr: cute.Pointer, m: cutlass.Int32, n: cutlass.Int32, k: cutlass.Int32,
                 num_experts: cutlass.Int32, capacity_rows: cutlass.Int32, stream):
        """a_ptr: E2M1 [M, K]; b_ptr: E2M1 [E, N, K]; sfa_ptr: E4M3 grouped swizzled [capacity_rows rows];
        sfb_ptr: E4M3 [E, Np*K16p]; c_ptr: bf16 [M, N]; alpha_ptr: fp32 [E, N]; act_scale_ptr: fp32 [E];
        offsets_ptr / padded_offsets_ptr: int32 [E+1]. capacity_rows: a multiple of 128."""
        tiled_mma = self._setup()
        a, b, sfa, sfb, c, alpha = self._operand_tensors(a_ptr, b_ptr, sfa_ptr, sfb_ptr, c_ptr, alpha_ptr, m, n, k, num_experts, capacity_rows)
        act_scale = cute.make_tensor(act_scale_ptr, cute.make_layout(num_experts))
        offsets = cute.make_tensor(offsets_ptr, cute.make_layout(num_experts + 1))
        padded_offsets = cute.make_tensor(padded_offsets_ptr, cute.make_layout(num_experts + 1))
        tma_a, tma_b, tma_sfa, tma_sfb = self._tma_atoms(tiled_mma, a, b, sfa, sfb)
        self.shared_storage = self._shared_storage()
        grid = (cute.ceil_div(capacity_rows, TILE_M), cute.ceil_div(n, self.tile_n), 1)
        self.kernel(
            tiled_mma, tma_a[0], tma_a[1], tma_b[0], tma_b[1], tma_sfa[0], tma_sfa[1], tma_sfb[0], tma_sfb[1],
            c, alpha, act_scale, offsets, padded_offsets, num_experts,
        ).launch(grid=grid, block=[self.threads_per_cta, 1, 1], cluster=(1, 1, 1), stream=stream, min_blocks_per_mp=1)

    @cute.kernel
    def kernel(self, tiled_mma: cute.TiledMma, tma_atom_a: cute.CopyAtom, mA: cute.Tensor, tma_atom_b: cute.CopyAtom,
               mB: cute.Tensor, tma_atom_sfa: cute.CopyAtom, mSFA: cute.Tensor, tma_atom_sfb: cute.CopyAtom,
               mSFB: cute.Tensor, mC: cute.Tensor, mAlpha: cute.Tensor, mActScale: cute.Tensor, mOffsets: cute.Tensor,
               mPaddedOffsets: cute.Tensor, num_experts: cutlass.Int32):
        """One CTA per (128 padded rows, tile_n columns); the expert comes from padded_offsets."""
        bidx, bidy, _ = cute.arch.block_idx()
        tile_row = bidx * TILE_M
        if tile_row < mPaddedOffsets[num_experts]:
            expert = cutlass.Int32(0)
            for e in cutlass.range(num_experts, unroll=1):
                if mPaddedOffsets[e + 1] <= tile_row:
                    expert = e + 1
            row_start = mOffsets[expert] + (tile_row - mPaddedOffsets[expert])
            rows_valid = mOffsets[expert + 1] - row_start
            self.gemm_tile(
                tiled_mma, tma_atom_a, mA, tma_atom_b, mB, tma_atom_sfa, mSFA, tma_atom_sfb, mSFB, mC, mAlpha,
                row_start, bidx, bidy, expert, rows_valid, mActScale[expert],
            )


def tile_placement(tile: int, offsets, padded_offsets):
    """Host mirror of :meth:`GroupedBlockScaledGemmSm100.kernel`'s per-CTA arithmetic, step for step, so
    tests can check it on CPU: row tile ``tile`` (128 padded rows) -> None when unused (the CTA exits),
    else ``(expert, row_start, rows_valid, scale_tile)``: the CTA reads A and writes C rows
    ``row_start + r`` for ``r < min(128, rows_valid)``, with scale rows ``128 * scale_tile + r``.
    offsets, padded_offsets: sequences of E+1 ints."""
    num_experts = len(offsets) - 1
    tile_row = tile * TILE_M
    if not tile_row < padded_offsets[num_experts]:
        return None
    expert = 0
    for e in range(num_experts):
        if padded_offsets[e + 1] <= tile_row:
            expert = e + 1
    row_start = offsets[expert] + (tile_row - padded_offsets[expert])
    rows_valid = offsets[expert + 1] - row_start
    return expert, row_start, rows_valid, tile


def _fake_grouped_args():
    from cutlass.cute.runtime import make_fake_stream, make_ptr

    gmem = cute.AddressSpace.gmem
    extra = (
        make_ptr(cutlass.Float32, 0, gmem, assumed_align=16),
        make_ptr(cutlass.Int32, 0, gmem, assumed_align=16),
        make_ptr(cutlass.Int32, 0, gmem, assumed_align=16),
    )
    sizes = tuple(cutlass.Int32(v) for v in (256, 256, 256, 2, 512))
    return (*fake_pointers(), *extra, *sizes, make_fake_stream())


def compile_grouped_blockscaled_gemm(tile_n: int = 128, arch: str | None = None, keep_ptx: bool = False):
    """Compile the grouped kernel (cached by tile_n and arch). Works without a GPU (null pointers)."""
    from ..cute_compile import compile_kernel

    kernel = GroupedBlockScaledGemmSm100(tile_n)
    return compile_kernel(("GroupedBlockScaledGemmSm100", tile_n), kernel, *_fake_grouped_args(), arch=arch or "sm_100a", keep_ptx=keep_ptx)


def run_grouped_blockscaled_gemm(packed_act, swizzled_act_scale, act_global_scale, offsets, padded_offsets, weight, swizzled_weight_scale, alpha, tile_n: int = 128):
    """Launch on a Blackwell GPU (torch CUDA tensors, shapes as in ``torch.ops.nvfp4lib.grouped_gemm_nvfp4_sm100``).
    Returns bf16 [M, N] (every row belongs to a group: offsets end at M).
    NEVER RUN ON HARDWARE HERE (compile-verified only)."""
    import torch
    from cuda.bindings import driver as cuda_driver
    from cutlass.cute.runtime import make_ptr

    from ...layout import padded_scale_cols

    m, k = packed_act.shape[0], packed_act.shape[1] * 2
    num_experts, n = weight.shape[0], weight.shape[1]
    if k % 256 or n % 128:
        raise ValueError(f"the sm100 grouped kernel needs K % 256 == 0 and N % 128 == 0, got K={k}, N={n}")
    capacity_rows = swizzled_act_scale.numel() // padded_scale_cols(k // 16)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=packed_act.device)
    compiled = compile_grouped_blockscaled_gemm(tile_n)
    gmem = cute.AddressSpace.gmem
    offsets32 = offsets.to(torch.int32)
    padded32 = padded_offsets.to(torch.int32)
    act_scale = act_global_scale.float().contiguous()
    alpha = alpha.float().contiguous()
    pointers = (
        make_ptr(cutlass.Float4E2M1FN, packed_act.data_ptr(), gmem, assumed_align=16),
        make_ptr(cutlass.Float4E2M1FN, weight.data_ptr(), gmem, assumed_align=16),
        make_ptr(cutlass.Float8E4M3FN, swizzled_act_scale.data_ptr(), gmem, assumed_align=32),
        make_ptr(cutlass.Float8E4M3FN, swizzled_weight_scale.data_ptr(), gmem, assumed_align=32),
        make_ptr(cutlass.BFloat16, out.data_ptr(), gmem, assumed_align=16),
        make_ptr(cutlass.Float32, alpha.data_ptr(), gmem, assumed_align=16),
        make_ptr(cutlass.Float32, act_scale.data_ptr(), gmem, assumed_align=16),
        make_ptr(cutlass.Int32, offsets32.data_ptr(), gmem, assumed_align=16),
        make_ptr(cutlass.Int32, padded32.data_ptr(), gmem, assumed_align=16),
    )
    stream = cuda_driver.CUstream(torch.cuda.current_stream().cuda_stream)
    sizes = tuple(cutlass.Int32(v) for v in (m, n, k, num_experts, capacity_rows))
    compiled(*pointers, *sizes, stream)
    return out

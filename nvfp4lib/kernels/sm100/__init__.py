"""Blackwell (sm_100a) CuTeDSL kernels on the tcgen05 block-scaled MMA with NVFP4 operands.

COMPILE-VERIFIED ONLY: these kernels compile to PTX holding the block-scaled ``tcgen05.mma`` on a
machine without a GPU, and their numerical tests run only on a compute-capability-10.x GPU. No Blackwell
GPU exists in this workbook's environment, so they have never run on hardware here.

- :mod:`.blockscaled_gemm`: :class:`BlockScaledGemmSm100`, one group (A x SFA @ (B x SFB)^T * alpha[N]).
- :mod:`.grouped_blockscaled_gemm`: :class:`GroupedBlockScaledGemmSm100`, MoE experts in one launch with
  device offsets and per-expert global scales in the epilogue.

Import the submodules explicitly (they import cutlass).
"""

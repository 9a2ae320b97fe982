"""torch.library ops of the MoE expert GEMMs (namespace ``nvfp4lib``), with fake implementations so
``torch.compile`` traces the MoE block.

- ``grouped_gemm_w4a16(x_sorted, offsets, weight, block_scale, alpha) -> bf16 [M, N]``: weight-only.
  CPU: :func:`nvfp4lib.moe.reference_grouped_gemm_w4a16` (exact); CUDA: a loop of ``nvfp4_linear``
  over experts (reads offsets on the host; a one-launch Hopper grouped kernel is not written yet).
- ``grouped_gemm_nvfp4_sm100(packed_act, swizzled_act_scale, act_global_scale, offsets, padded_offsets,
  weight, swizzled_weight_scale, alpha) -> bf16 [M, N]``: W4A4 on the Blackwell tcgen05 block-scaled MMA
  (:class:`nvfp4lib.kernels.sm100.grouped_blockscaled_gemm.GroupedBlockScaledGemmSm100`).
  COMPILE-VERIFIED ONLY: it has never run on a Blackwell GPU here. On other devices it computes the
  exact reference of what the kernel must produce (so its semantics are testable on CPU).
"""
from __future__ import annotations

import torch

from .. import moe as _moe
from ..formats import check_nvfp4_tensors


@torch.library.custom_op("nvfp4lib::grouped_gemm_w4a16", mutates_args=())
def grouped_gemm_w4a16(x_sorted: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor, block_scale: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x_sorted bf16 [M, K] (expert-contiguous rows); offsets int [E+1]; weight uint8 [E, N, K/2];
    block_scale e4m3 [E, N, K/16]; alpha fp32 [E, N] -> bf16 [M, N]."""
    _moe._check_grouped_args(x_sorted, offsets, weight, block_scale, alpha)
    _moe.check_offsets(offsets, x_sorted.shape[0], weight.shape[0])
    if x_sorted.device.type == "cuda":
        return _moe._loop_grouped_gemm_w4a16(x_sorted, offsets, weight, block_scale, alpha)
    return _moe.reference_grouped_gemm_w4a16(x_sorted, offsets, weight, block_scale, alpha)


@grouped_gemm_w4a16.register_fake
def _(x_sorted, offsets, weight, block_scale, alpha):
    return x_sorted.new_empty((x_sorted.shape[0], weight.shape[1]), dtype=torch.bfloat16)


def _check_sm100_args(packed_act, swizzled_act_scale, act_global_scale, offsets, padded_offsets, weight, swizzled_weight_scale, alpha):
    if packed_act.dtype != torch.uint8 or packed_act.dim() != 2:
        raise ValueError(f"packed_act must be uint8 [M, K/2], got {packed_act.dtype} {tuple(packed_act.shape)}")
    if weight.dtype != torch.uint8 or weight.dim() != 3 or weight.shape[2] != packed_act.shape[1]:
        raise ValueError(f"weight must be uint8 [E, N, K/2] with K/2={packed_act.shape[1]}, got {weight.dtype} {tuple(weight.shape)}")
    num_experts, n = weight.shape[0], weight.shape[1]
    for name, t in (("swizzled_act_scale", swizzled_act_scale), ("swizzled_weight_scale", swizzled_weight_scale)):
        if t.dtype != torch.float8_e4m3fn:
            raise ValueError(f"{name} must be float8_e4m3fn (128x4 swizzled), got {t.dtype}")
    for name, t in (("offsets", offsets), ("padded_offsets", padded_offsets)):
        if t.shape != (num_experts + 1,) or t.dtype.is_floating_point:
            raise ValueError(f"{name} must be an integer tensor [E+1] = [{num_experts + 1}], got {t.dtype} {tuple(t.shape)}")
    if act_global_scale.shape != (num_experts,) or alpha.shape != (num_experts, n):
        raise ValueError(f"act_global_scale must be [E] and alpha [E, N] = [{num_experts}, {n}], got {tuple(act_global_scale.shape)}, {tuple(alpha.shape)}")


@torch.library.custom_op("nvfp4lib::grouped_gemm_nvfp4_sm100", mutates_args=())
def grouped_gemm_nvfp4_sm100(
    packed_act: torch.Tensor,
    swizzled_act_scale: torch.Tensor,
    act_global_scale: torch.Tensor,
    offsets: torch.Tensor,
    padded_offsets: torch.Tensor,
    weight: torch.Tensor,
    swizzled_weight_scale: torch.Tensor,
    alpha: torch.Tensor,
) -> torch.Tensor:
    """W4A4 grouped GEMM. packed_act uint8 [M, K/2]; swizzled_act_scale e4m3 [capacity*K16p] (group e's
    rows from padded_offsets[e]); act_global_scale fp32 [E]; offsets / padded_offsets int [E+1];
    weight uint8 [E, N, K/2]; swizzled_weight_scale e4m3 [E, Np*K16p]; alpha fp32 [E, N] -> bf16 [M, N]
    = (A x SFA) @ (W x SFW)^T * act_global_scale[e] * alpha[e, n] per group."""
    _check_sm100_args(packed_act, swizzled_act_scale, act_global_scale, offsets, padded_offsets, weight, swizzled_weight_scale, alpha)
    if _moe.is_blackwell(packed_act.device):
        from ..kernels.sm100.grouped_blockscaled_gemm import run_grouped_blockscaled_gemm

        return run_grouped_blockscaled_gemm(packed_act, swizzled_act_scale, act_global_scale, offsets, padded_offsets, weight, swizzled_weight_scale, alpha)
    # Not Blackwell: the exact reference of the kernel's result (used by the CPU tests).
    from ..layout import unswizzle_scales
    from ..scales import GroupedScaleAssembly

    num_experts, n, k = weight.shape[0], weight.shape[1], packed_act.shape[1] * 2
    weight_scale = unswizzle_scales(swizzled_weight_scale.reshape(num_experts, -1), n, k)
    check_nvfp4_tensors(weight, weight_scale)
    acts = GroupedScaleAssembly(packed_act, swizzled_act_scale, padded_offsets, act_global_scale)
    return _moe.reference_grouped_gemm_w4a4(acts, offsets, _moe.GroupedWeight(weight, weight_scale, alpha, (n,)))


@grouped_gemm_nvfp4_sm100.register_fake
def _(packed_act, swizzled_act_scale, act_global_scale, offsets, padded_offsets, weight, swizzled_weight_scale, alpha):
    return packed_act.new_empty((packed_act.shape[0], weight.shape[1]), dtype=torch.bfloat16)

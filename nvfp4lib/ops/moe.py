"""torch.library ops of the MoE expert GEMMs (namespace ``nvfp4lib``), with fake implementations so
``torch.compile`` traces the MoE block.

- ``grouped_gemm_w4a16(x_sorted, offsets, weight, block_scale, alpha) -> bf16 [M, N]``: weight-only,
  ModelOpt layout. CPU: :func:`nvfp4lib.moe.reference_grouped_gemm_w4a16` (exact); CUDA: a loop over
  experts through a torch dequantization (reads offsets on the host; correct, slow).
- ``grouped_gemm_w4a16_sm90(x_sorted, offsets, words, scale_words, alpha, n, max_rows, swiglu_limit)
  -> bf16 [M, n] (or [M, n/2] with the clamped SwiGLU)``: weight-only, sm90 layout. CUDA, one launch,
  offsets read on the device (CUDA-graph safe):

  - ``max_rows <= GROUPED_KERNEL_MAX_ROWS`` (decode): the grouped decode kernel
    (:func:`nvfp4lib.kernels.sm90.gemm_decode.run_grouped_decode`, mma.sync, split K);
  - larger groups (prefill), K a multiple of 256: the grouped WGMMA kernel
    (:func:`nvfp4lib.kernels.sm90.gemm_wgmma.run_grouped_wgmma`: a device tile table over the groups, the
    SwiGLU in its epilogue). On an H200 the MoE prefill (8192 tokens, 48 experts) ran 1.16x faster than the
    cuBLAS BF16 loop over experts (``data/bench/moe_nvidia_h200.json``);
  - otherwise the decode kernel under capture, or eagerly a host loop over the experts through the sm90
    GEMM (:func:`grouped_sm90_loop`: dequantize + cuBLAS, the dequantization on a side stream).

  CPU: the exact reference.
- ``grouped_gemm_nvfp4_sm100(packed_act, swizzled_act_scale, act_global_scale, offsets, padded_offsets,
  weight, swizzled_weight_scale, alpha) -> bf16 [M, N]``: W4A4 on the Blackwell tcgen05 block-scaled MMA
  (:class:`nvfp4lib.kernels.sm100.grouped_blockscaled_gemm.GroupedBlockScaledGemmSm100`).
  COMPILE-VERIFIED ONLY: it has never run on a Blackwell GPU here. On other devices it computes the
  exact reference of what the kernel must produce (so its semantics are testable on CPU).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import moe as _moe
from ..formats import check_nvfp4_tensors
from .gemm import _check_sm90_args, clamped_swiglu_reference, dequantize_sm90

GROUPED_KERNEL_MAX_ROWS = 64  # groups bounded by this many rows run the one-launch decode kernel
GROUPED_WGMMA = True  # larger groups: the one-launch grouped WGMMA kernel (else the host loop, or the decode kernel under capture)


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


def _check_grouped_sm90_args(x_sorted, offsets, words, scale_words, alpha, n, max_rows, swiglu_limit):
    if words.dim() != 5 or scale_words.dim() != 5 or words.shape[0] != scale_words.shape[0]:
        raise ValueError("words / scale_words must be the stacked int32 sm90 layout [E, RG, K/64, 32, 4] / [E, RG, K/256, 32, 2] "
                         f"(nvfp4lib.moe.repack_experts), got {tuple(words.shape)} and {tuple(scale_words.shape)}")
    num_experts = words.shape[0]
    if n % 16 or (swiglu_limit is not None and n % 32):
        raise ValueError(f"the grouped sm90 GEMM needs N a multiple of 16 (of 32 with the SwiGLU: gate and up halves), got N={n}")
    if alpha.shape != (num_experts, n) or alpha.dtype != torch.float32:
        raise ValueError(f"alpha must be fp32 [E, N] = [{num_experts}, {n}], got {alpha.dtype} {tuple(alpha.shape)}")
    _check_sm90_args(x_sorted, words[0], scale_words[0], alpha[0], None, n)
    if offsets.shape != (num_experts + 1,) or offsets.dtype.is_floating_point:
        raise ValueError(f"offsets must be an integer tensor [E+1] = [{num_experts + 1}], got {offsets.dtype} {tuple(offsets.shape)}")
    if max_rows <= 0:
        raise ValueError(f"max_rows must be positive, got {max_rows}")


def _grouped_sm90_reference(x_sorted, bounds, words, scale_words, alpha, n, swiglu_limit):
    """Exact: per group (``bounds``: the E+1 offsets as ints) fp32 ``x @ (e2m1*block)^T * alpha[e]`` (then
    the clamped SwiGLU in fp32), one bf16 rounding; rows outside every group are zero."""
    out_n = n // 2 if swiglu_limit is not None else n
    out = torch.zeros(x_sorted.shape[0], out_n, dtype=torch.bfloat16, device=x_sorted.device)
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            acc = x_sorted[start:end].float() @ dequantize_sm90(words[e], scale_words[e], n).t() * alpha[e]
            out[start:end] = (acc if swiglu_limit is None else clamped_swiglu_reference(acc, swiglu_limit)).to(torch.bfloat16)
    return out


_side_streams: dict = {}


def _side_stream(device) -> torch.cuda.Stream:
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def grouped_sm90_loop(x_sorted, bounds, words, scale_words, alpha, n, swiglu_limit=None, overlap=True):
    """The eager CUDA path for large groups: one sm90 GEMM per non-empty expert, its bounds given on the
    host (``bounds``: the E+1 offsets as ints). Groups of at most DECODE_MAX_M rows run the decode kernel;
    larger ones dequantize to bf16 and run cuBLAS. With ``overlap`` the dequantizations run on a side
    stream into two alternating buffers, one expert ahead, so expert e+1's (memory-bound) dequantization
    overlaps expert e's (compute-bound) GEMM; the streams fork from and join back into the current one,
    so the loop can be captured in a CUDA graph. With ``swiglu_limit`` the gate_up GEMM is followed by the
    clamped SwiGLU in fp32. Returns bf16 [M, n or n/2]."""
    from ..kernels.sm90 import dequant as D
    from ..kernels.sm90.gemm_prefill import dequantize_to_bf16
    from .gemm import DECODE_MAX_M

    m = x_sorted.shape[0]
    out_n = n // 2 if swiglu_limit is not None else n
    out = torch.empty(m, out_n, dtype=torch.bfloat16, device=x_sorted.device)
    spans = [(e, start, end) for e, (start, end) in enumerate(zip(bounds, bounds[1:])) if end > start]
    large = [span for span in spans if span[2] - span[1] > DECODE_MAX_M]
    if overlap and len(large) > 1:
        k = words.shape[2] * D.CHUNK_K
        main, side = torch.cuda.current_stream(), _side_stream(x_sorted.device)
        buffers = [torch.empty(words.shape[1] * D.ROWS_PER_GROUP * k, dtype=torch.bfloat16, device=x_sorted.device) for _ in range(2)]
        dequantized = [torch.cuda.Event() for _ in large]
        consumed = [torch.cuda.Event() for _ in large]
        # with the SwiGLU the GEMMs fill one bf16 [M, n] buffer and the SwiGLU runs once over the rows of the
        # large groups (one pass of a few elementwise kernels, not a pass per expert)
        hidden = out if swiglu_limit is None else torch.empty(m, n, dtype=torch.bfloat16, device=x_sorted.device)
        side.wait_stream(main)  # fork: the buffers and the weights are ready
        for i, (e, start, end) in enumerate(large):
            with torch.cuda.stream(side):
                if i >= 2:
                    side.wait_event(consumed[i - 2])  # the buffer's previous GEMM is done
                weight = dequantize_to_bf16(words[e], scale_words[e], alpha[e], n, out=buffers[i % 2])
                dequantized[i].record(side)
            main.wait_event(dequantized[i])
            hidden[start:end] = torch.nn.functional.linear(x_sorted[start:end], weight)
            consumed[i].record(main)
        main.wait_stream(side)  # join
        spans = [span for span in spans if span not in large]
        if swiglu_limit is not None:
            lo, hi = large[0][1], large[-1][2]
            if not spans and (lo, hi) == (0, m):
                out = _moe.clamped_swiglu(hidden, swiglu_limit)
            else:  # rows of small groups in between are overwritten below
                out[lo:hi] = _moe.clamped_swiglu(hidden[lo:hi], swiglu_limit)
    for e, start, end in spans:
        rows = x_sorted[start:end]
        if swiglu_limit is None:
            out[start:end] = torch.ops.nvfp4lib.gemm_w4a16_sm90(rows, words[e], scale_words[e], alpha[e], None, n)
        else:
            out[start:end] = torch.ops.nvfp4lib.gemm_w4a16_swiglu(rows, words[e], scale_words[e], alpha[e], n, swiglu_limit)
    return out


@torch.library.custom_op("nvfp4lib::grouped_gemm_w4a16_sm90", mutates_args=())
def grouped_gemm_w4a16_sm90(x_sorted: torch.Tensor, offsets: torch.Tensor, words: torch.Tensor, scale_words: torch.Tensor,
                            alpha: torch.Tensor, n: int, max_rows: int, swiglu_limit: Optional[float]) -> torch.Tensor:
    """x_sorted bf16 [M, K] (expert-contiguous rows); offsets int [E+1] (0 .. M); words int32
    [E, n/16, K/64, 32, 4]; scale_words int32 [E, n/16, K/256, 32, 2]; alpha fp32 [E, n]; max_rows: a
    bound on any group's rows (checked when eager; under graph capture it is the caller's contract);
    swiglu_limit: None -> bf16 [M, n]; a float (``inf``: no clamp) -> the clamped SwiGLU of the gate_up
    product, bf16 [M, n/2]."""
    _check_grouped_sm90_args(x_sorted, offsets, words, scale_words, alpha, n, max_rows, swiglu_limit)
    capturing = x_sorted.is_cuda and torch.cuda.is_current_stream_capturing()
    bounds = None
    if not capturing:
        bounds = _moe.check_offsets(offsets, x_sorted.shape[0], words.shape[0])
        largest = max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
        if largest > max_rows:
            raise ValueError(f"a group has {largest} rows but max_rows={max_rows}: rows past the bound would not be computed")
    if not x_sorted.is_cuda:
        return _grouped_sm90_reference(x_sorted, bounds, words, scale_words, alpha, n, swiglu_limit)
    out_n = n // 2 if swiglu_limit is not None else n
    if x_sorted.shape[0] == 0:
        return x_sorted.new_empty((0, out_n))
    if max_rows > GROUPED_KERNEL_MAX_ROWS and grouped_wgmma_takes(x_sorted.shape[1], n, swiglu_limit is not None):
        from ..kernels.sm90 import gemm_wgmma

        return gemm_wgmma.run_grouped_wgmma(x_sorted.contiguous(), offsets, words, scale_words, alpha, n, swiglu_limit=swiglu_limit)
    if capturing or max_rows <= GROUPED_KERNEL_MAX_ROWS:
        from ..kernels.sm90 import gemm_decode

        return gemm_decode.run_grouped_decode(x_sorted.contiguous(), offsets.to(torch.int32), words, scale_words, alpha, out_n,
                                              max_rows, swiglu_limit)
    return grouped_sm90_loop(x_sorted, bounds, words, scale_words, alpha, n, swiglu_limit)  # eager here: bounds known


def grouped_wgmma_fits(k: int) -> bool:
    """Whether the one-launch grouped WGMMA kernel takes groups of K = k (a multiple of 256; CuTeDSL installed)."""
    from .gemm import wgmma_takes

    return GROUPED_WGMMA and wgmma_takes(k)


def grouped_wgmma_takes(k: int, n: int, swiglu: bool) -> bool:
    """:func:`grouped_wgmma_fits` and N: even, and with the SwiGLU epilogue 2I rows with I a multiple of 64."""
    return grouped_wgmma_fits(k) and n % (128 if swiglu else 2) == 0


@grouped_gemm_w4a16_sm90.register_fake
def _(x_sorted, offsets, words, scale_words, alpha, n, max_rows, swiglu_limit):
    return x_sorted.new_empty((x_sorted.shape[0], n // 2 if swiglu_limit is not None else n), dtype=torch.bfloat16)


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

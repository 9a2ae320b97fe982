"""The NVFP4 weight-only GEMM (W4A16): ``y[M, N] = x[M, K] @ dequant(W)[N, K]^T * alpha[N] (+ bias)``.

Public API:
- :func:`prepare_weight` takes a checkpoint linear (ModelOpt ``weight``, ``weight_scale``,
  ``weight_scale_2``), or a fused one whose contiguous row segments carry their own global scales, and
  returns a :class:`PreparedWeight` (no bf16 copy of the weight is kept). On a Hopper GPU with CuTeDSL it
  repacks into the ``"sm90"`` layout (``kernels/sm90/dequant.py``; N*K*9/16 bytes, the ModelOpt copy is not
  kept); elsewhere, or for K not a multiple of 256 or an E4M3-subnormal/NaN block scale, it keeps the
  ModelOpt layout.
- :func:`nvfp4_linear` runs ``torch.ops.nvfp4lib.gemm_w4a16`` (ModelOpt layout) or
  ``torch.ops.nvfp4lib.gemm_w4a16_sm90`` (sm90 layout); ``torch.ops.nvfp4lib.gemm_w4a16_swiglu`` is the
  gate_up GEMM with the clamped SwiGLU fused (either layout).

Dispatch on CUDA (sm90 layout): M <= ``DECODE_MAX_M`` (64) runs the CuTeDSL decode kernel
(``kernels/sm90/gemm_decode.py``: mma.sync swap-AB, register decode of E2M1 x E4M3, split-K), except from
``SMALL_WGMMA_MIN_M`` (33) for weights of many row blocks; M up to ``WGMMA_MAX_M`` (1024;
``WGMMA_MAX_M_LONG_K``, 2048, for K > 4096; any M for K > 4096 and N >= ``WIDE_N`` where the tiles fill their waves) the WGMMA kernel (``kernels/sm90/gemm_wgmma.py``, decoder schedule; 64-token tiles up to
M = 64) where its grid fills most of the GPU and there is no bias (:func:`use_wgmma`); otherwise the prefill path
(``kernels/sm90/gemm_prefill.py``: a CuTeDSL dequantization to bf16 with alpha folded in, then cuBLAS). The
ModelOpt layout on CUDA goes through a torch dequantization and cuBLAS (correct, slow). On CPU
every op is the exact reference: fp32 accumulation over the exact dequantized values, one bf16 rounding.

The global scale is never folded into the E4M3 block scales: each output column n gets its own fp32
``alpha[n]`` (the global scale of the segment that row n of W belongs to), applied in the epilogue.
That keeps a fused weight whose parts were quantized separately exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..formats import BLOCK_SIZE, check_global_scale, check_nvfp4_tensors, e2m1_decode, unpack_nibbles

LAYOUT_MODELOPT = "modelopt"  # weight uint8 [N, K/2], block scales e4m3 [N, K/16], row-major
LAYOUT_SM90 = "sm90"  # kernels/sm90/dequant.py: int32 words [RG, K/64, 32, 4], scale words [RG, K/256, 32, 2]
DECODE_MAX_M = 64  # M up to this runs the memory-bound decode kernel; larger M the prefill path
# The WGMMA kernel against dequantize + cuBLAS on an H200 (data/bench/wgmma_probe_nvidia_h200_146e842.json,
# _38950a4.json, gemm_nvidia_h200.json at 7fdae0f and b64321e): faster at M = 256 for K = 3072, 7168 and 16384
# (gate_up 59.8 against 69.0 us, down 29.5 against 33.9, wo_b 129.3 against 175.6) and at M = 1024 for
# K = 3072 (down 77.4 against 80.2); slower at M = 1024 for K = 7168 (gate_up 160.6 against 146.5) and above.
WGMMA_MAX_M = 1024
# For K above WGMMA_LONG_K, on an H100 (data/bench/wgmma_split_probe_nvidia_h100_80gb_hbm3_517eb25.json, the op then
# dequantize + cuBLAS above M = 512): gate_up M = 1024 141.7 us (stream-K, gemm_wgmma.stream_k_pays) against 163.9,
# M = 2048 275.0 against 298.5; fused_wqa_wkv M = 2048 87.8 against 95.2; wo_b M = 2048 790.1 against 787.5 (even).
# At M = 4096 the two were within 4% either way (gate_up 560.6 against 580.6, fused_wqa_wkv 186.7 against 180.9):
# dequantize + cuBLAS there.
WGMMA_MAX_M_LONG_K = 2048
WGMMA_LONG_K = 4096
# ... but there, above M = 512, only where the plan fills about one wave (90% of an H100's 132 SMs): fused_wqa_wkv at
# M = 1536 (16 row blocks x 6 token tiles = 96 CTAs) ran 83.0 us against 71.1 for dequantize + cuBLAS, at M = 2048
# (128 CTAs) 87.7 against 94.4 (data/bench/dispatch_check_nvidia_h100_80gb_hbm3_7ca588a.json)
LONG_K_FULL_WAVE_ABOVE_M = 512
LONG_K_FULL_WAVE_CTAS = 119
WGMMA_MIN_CTAS = 64  # CTAs x K splits (gemm_wgmma.wgmma_plan): with the split, fused_wqa_wkv's 16 row blocks too
# M <= DECODE_MAX_M: the WGMMA kernel with one 64-token tile (two decoder warpgroups) against the decode kernel on an
# H100 (data/bench/wgmma_crossover_nvidia_h100_80gb_hbm3_cb1b594.json): the WGMMA kernel's time does not move with M
# there (gate_up 27.7-27.9 us, down 15.5-15.6, wo_b 56.2-57.2 from M = 24 to 48), while the decode kernel's jumps past
# M = 32 (gate_up 19.0 -> 29.5, down 12.7 -> 16.5, wo_b 50.6 -> 75.3). fused_wqa_wkv (16 row blocks, 64 CTAs with 4
# splits: 18.0 us at M = 64) stays on the decode kernel (13.1)
SMALL_WGMMA_MIN_M = 33
SMALL_WGMMA_MIN_CTAS = 96
# Above WGMMA_MAX_M_LONG_K, for K > WGMMA_LONG_K and N >= WIDE_N (32+ row blocks), the WGMMA kernel again where its
# unsplit tiles fill their waves to WIDE_N_MIN_WAVE_FILL. H100 (data/bench/dispatch_check_nvidia_h100_80gb_hbm3_81c6f75.json,
# against dequantize + cuBLAS): gate_up M = 4096 / 6144 / 8192 527 / 813 / 1082 us against 561 / 835 / 1102, wo_b
# 1400 / 2206 / 2770 against 1476 / 2258 / 2833 (the waves 93-97% full); at M = 3072 (waves 85-87% full) gate_up lost
# (431 against 424; 442 against 426 at 43f6e18) and wo_b won (1130 against 1165). fused_wqa_wkv (16 row blocks) went
# either way by up to 3% (M = 8192: 360 against 349), down (K = 3072) too: those stay on dequantize + cuBLAS.
WIDE_N = 4096
WIDE_N_MIN_WAVE_FILL = 0.9
SM_COUNT = 132  # the H100 these rules were measured on (gemm_wgmma.wgmma_plan's default too)


def wgmma_takes(k: int) -> bool:
    """Whether the WGMMA kernel can run here at all: K a multiple of 256, CuTeDSL installed."""
    from ..kernels.cute_compile import cute_available

    return k % 256 == 0 and cute_available()


def use_wgmma(m: int, n: int, k: int, has_bias: bool) -> bool:
    """Whether the sm90 op runs the WGMMA kernel for an [M, K] x [N, K]^T GEMM: above DECODE_MAX_M up to
    WGMMA_MAX_M (WGMMA_MAX_M_LONG_K for K > WGMMA_LONG_K; see there) where its plan fills WGMMA_MIN_CTAS
    (LONG_K_FULL_WAVE_CTAS for K > WGMMA_LONG_K above M = LONG_K_FULL_WAVE_ABOVE_M); above that, for K > WGMMA_LONG_K
    and N >= WIDE_N, where its tiles fill their waves to WIDE_N_MIN_WAVE_FILL (an H100's SM_COUNT SMs); at or below
    DECODE_MAX_M, from SMALL_WGMMA_MIN_M (see there) where the 64-token plan fills SMALL_WGMMA_MIN_CTAS, the decode
    kernel otherwise."""
    if has_bias or n % 2:
        return False
    if m <= DECODE_MAX_M:
        least_m, least_ctas = SMALL_WGMMA_MIN_M, SMALL_WGMMA_MIN_CTAS
    else:
        least_m, least_ctas = DECODE_MAX_M + 1, WGMMA_MIN_CTAS
        if k > WGMMA_LONG_K and m > LONG_K_FULL_WAVE_ABOVE_M:
            least_ctas = LONG_K_FULL_WAVE_CTAS
    most = WGMMA_MAX_M if k <= WGMMA_LONG_K else WGMMA_MAX_M_LONG_K
    if m < least_m:
        return False
    from ..kernels.sm90.gemm_wgmma import wgmma_plan

    tile_n, splits = wgmma_plan(m, -(-n // 16), k)
    ctas = -(-n // 128) * -(-m // tile_n) * splits
    if m > most:
        return k > WGMMA_LONG_K and n >= WIDE_N and ctas / (-(-ctas // SM_COUNT) * SM_COUNT) >= WIDE_N_MIN_WAVE_FILL
    return ctas >= least_ctas


@dataclass
class PreparedWeight:
    """An NVFP4 weight ready for :func:`nvfp4_linear`.

    weight: uint8, [N, K/2] in the ModelOpt layout (kernels may repack; ``layout`` names the layout).
    block_scale: float8_e4m3fn, [N, K/16] for the ModelOpt layout.
    alpha: fp32 [N], the global scale (decode multiplier) of each output column's segment.
    segment_sizes: the row counts of the fused parts, in order (one entry for an unfused weight).
    """

    weight: torch.Tensor
    block_scale: torch.Tensor
    alpha: torch.Tensor
    n: int
    k: int
    segment_sizes: tuple
    layout: str = LAYOUT_MODELOPT

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.block_scale, self.alpha))


def alpha_per_column(global_scales: Sequence, segment_sizes: Sequence[int], device=None) -> torch.Tensor:
    """fp32 [N]: global_scales[i] repeated segment_sizes[i] times (each scale validated)."""
    if len(global_scales) != len(segment_sizes):
        raise ValueError(f"{len(global_scales)} global scales for {len(segment_sizes)} segments")
    scales = [check_global_scale(g, f"weight_scale_2[{i}]") for i, g in enumerate(global_scales)]
    counts = torch.tensor([int(s) for s in segment_sizes])
    return torch.repeat_interleave(torch.stack([s.detach().cpu() for s in scales]), counts).to(device=device, dtype=torch.float32)


def sm90_layout_usable(weight: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    """True when the weight lives on a Hopper GPU with CuTeDSL installed and the sm90 decode layout can
    hold it exactly (K a multiple of 256, no NaN or subnormal block scale)."""
    from ..kernels.cute_compile import cute_available

    if not (weight.is_cuda and torch.cuda.get_device_capability(weight.device)[0] == 9 and cute_available()):
        return False
    from ..kernels.sm90 import dequant

    return weight.shape[1] * 2 % dequant.QUAD_K == 0 and dequant.decode_layout_supported(weight_scale)


def prepare_weight(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2, segment_sizes: Optional[Sequence[int]] = None,
                   layout: Optional[str] = None) -> PreparedWeight:
    """Prepare a ModelOpt NVFP4 linear for :func:`nvfp4_linear`.

    weight: uint8 [N, K/2]; weight_scale: float8_e4m3fn [N, K/16] (row-major, not swizzled);
    weight_scale_2: one fp32 scalar, or a sequence / 1-D tensor with one scalar per segment;
    segment_sizes: row counts of the fused parts (sum N), required when several scales are given;
    layout: None picks ``"sm90"`` (repacked for the Hopper kernels, the ModelOpt copy is not kept) when
    :func:`sm90_layout_usable`, else ``"modelopt"``; naming a layout forces it (``"sm90"`` raises a
    ValueError naming the constraint it breaks).
    """
    check_nvfp4_tensors(weight, weight_scale, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K/2], got shape {tuple(weight.shape)}")
    n, k = weight.shape[0], weight.shape[1] * 2
    if isinstance(weight_scale_2, torch.Tensor) and weight_scale_2.numel() > 1:
        weight_scale_2 = list(weight_scale_2.reshape(-1))
    scales = list(weight_scale_2) if isinstance(weight_scale_2, (list, tuple)) else [weight_scale_2]
    if segment_sizes is None:
        if len(scales) != 1:
            raise ValueError(f"{len(scales)} weight_scale_2 values need segment_sizes (row counts summing to N={n})")
        segment_sizes = (n,)
    segment_sizes = tuple(int(s) for s in segment_sizes)
    if sum(segment_sizes) != n or any(s <= 0 for s in segment_sizes):
        raise ValueError(f"segment_sizes {segment_sizes} must be positive and sum to N={n}")
    alpha = alpha_per_column(scales, segment_sizes, device=weight.device)
    if layout is None:
        layout = LAYOUT_SM90 if sm90_layout_usable(weight, weight_scale) else LAYOUT_MODELOPT
    if layout == LAYOUT_SM90:
        from ..kernels.sm90 import dequant

        words, scale_words = dequant.repack_weight(weight, weight_scale)
        if words.is_cuda:
            # the Hopper kernels launch with PDL and read their weights before the previous kernel on the stream
            # has finished: the repack must be complete (and visible) before any of them can start
            torch.cuda.current_stream(words.device).synchronize()
        return PreparedWeight(words, scale_words, alpha, n, k, segment_sizes, LAYOUT_SM90)
    if layout != LAYOUT_MODELOPT:
        raise ValueError(f"unknown layout {layout!r}: expected {LAYOUT_MODELOPT!r} or {LAYOUT_SM90!r}")
    return PreparedWeight(weight.contiguous(), weight_scale.contiguous(), alpha, n, k, segment_sizes)


def dequantize_rows(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] = e2m1 * block_scale (exact in fp32; the global scale is *not* applied)."""
    values = e2m1_decode(unpack_nibbles(weight)).reshape(weight.shape[0], -1, BLOCK_SIZE)
    return (values * weight_scale.float().unsqueeze(-1)).reshape(weight.shape[0], -1)


def reference_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, alpha: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The exact reference: fp32 ``(x @ (e2m1*block)^T) * alpha + bias``, rounded once to bf16."""
    acc = x.float() @ dequantize_rows(weight, weight_scale).t()
    acc = acc * alpha.float()
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(torch.bfloat16)


def _check_gemm_args(x, weight, weight_scale, alpha, bias):
    if x.dtype != torch.bfloat16:
        raise ValueError(f"x must be bf16 (weight-only NVFP4 keeps activations in bf16), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    n, k = weight.shape[0], weight.shape[1] * 2
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} but the weight has K={k}")
    if alpha.shape != (n,) or alpha.dtype != torch.float32:
        raise ValueError(f"alpha must be fp32 [{n}], got {alpha.dtype} {tuple(alpha.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")


def _dense_gemm(x: torch.Tensor, dequantized: torch.Tensor, alpha: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """GPU path through a bf16 weight (exact values e2m1 * block scale): cuBLAS, then alpha and bias in fp32."""
    acc = torch.nn.functional.linear(x, dequantized.to(torch.bfloat16)).float() * alpha
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(torch.bfloat16)


@torch.library.custom_op("nvfp4lib::gemm_w4a16", mutates_args=())
def gemm_w4a16(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, alpha: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x bf16 [M, K]; weight uint8 [N, K/2]; weight_scale e4m3 [N, K/16]; alpha fp32 [N]; bias [N] or None
    -> bf16 [M, N]. CPU: the exact reference. CUDA (ModelOpt layout, i.e. not prepared for sm90): through a
    bf16 dequantized weight and cuBLAS (correct, not the fast path)."""
    _check_gemm_args(x, weight, weight_scale, alpha, bias)
    if x.is_cuda:
        return _dense_gemm(x, dequantize_rows(weight, weight_scale), alpha, bias)
    return reference_gemm(x, weight, weight_scale, alpha, bias)


@gemm_w4a16.register_fake
def _(x, weight, weight_scale, alpha, bias=None):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.bfloat16)


def _check_sm90_args(x, words, scale_words, alpha, bias, n):
    if x.dtype != torch.bfloat16:
        raise ValueError(f"x must be bf16 (weight-only NVFP4 keeps activations in bf16), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if words.dim() != 4 or words.dtype != torch.int32 or scale_words.dim() != 4 or scale_words.dtype != torch.int32:
        raise ValueError("words / scale_words must be the int32 sm90 layout (kernels/sm90/dequant.repack_weight)")
    k = words.shape[1] * 64
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} but the weight has K={k}")
    if not (words.shape[0] - 1) * 16 < n <= words.shape[0] * 16:
        raise ValueError(f"n={n} does not match {words.shape[0]} row groups of 16")
    if alpha.shape != (n,) or alpha.dtype != torch.float32:
        raise ValueError(f"alpha must be fp32 [{n}], got {alpha.dtype} {tuple(alpha.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")


def dequantize_sm90(words: torch.Tensor, scale_words: torch.Tensor, n: int) -> torch.Tensor:
    """fp32 [N, K] = e2m1 * block scale from the sm90 layout (exact; torch ops on the tensors' device)."""
    from ..kernels.sm90 import dequant

    codes, scale_bits = dequant.unpack_repacked(words, scale_words, n, words.shape[1] * 64)
    values = e2m1_decode(codes).reshape(n, -1, BLOCK_SIZE)
    scales = scale_bits.view(torch.float8_e4m3fn).float().unsqueeze(-1)
    return (values * scales).reshape(n, -1)


@torch.library.custom_op("nvfp4lib::gemm_w4a16_sm90", mutates_args=())
def gemm_w4a16_sm90(x: torch.Tensor, words: torch.Tensor, scale_words: torch.Tensor, alpha: torch.Tensor, bias: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """The same GEMM as ``gemm_w4a16`` with the weight in the sm90 layout -> bf16 [M, n].
    CUDA: the WGMMA kernel where :func:`use_wgmma` says so, else M <= DECODE_MAX_M the CuTeDSL decode kernel,
    else the prefill path. CPU: the exact reference (the layout is unpacked first)."""
    _check_sm90_args(x, words, scale_words, alpha, bias, n)
    if x.is_cuda:
        if x.shape[0] == 0:
            return x.new_empty((0, n))
        if use_wgmma(x.shape[0], n, x.shape[1], bias is not None):
            from ..kernels.sm90 import gemm_wgmma

            return gemm_wgmma.run_wgmma(x.contiguous(), words, scale_words, alpha, n)
        if x.shape[0] <= DECODE_MAX_M:
            from ..kernels.sm90 import gemm_decode

            return gemm_decode.run_decode(x.contiguous(), words, scale_words, alpha, n, bias)
        from ..kernels.sm90 import gemm_prefill

        return gemm_prefill.run_prefill(x.contiguous(), words, scale_words, alpha, n, bias)
    acc = x.float() @ dequantize_sm90(words, scale_words, n).t() * alpha.float()
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(torch.bfloat16)


@gemm_w4a16_sm90.register_fake
def _(x, words, scale_words, alpha, bias, n):
    return x.new_empty((x.shape[0], n), dtype=torch.bfloat16)


def clamped_swiglu_reference(h: torch.Tensor, limit: float) -> torch.Tensor:
    """fp32 ``silu(min(gate, limit)) * clamp(up, -limit, limit)`` of h [M, 2I] = [gate | up]."""
    gate, up = h.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


@torch.library.custom_op("nvfp4lib::gemm_w4a16_swiglu", mutates_args=())
def gemm_w4a16_swiglu(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, alpha: torch.Tensor, n: int, limit: float) -> torch.Tensor:
    """gate_up GEMM with the clamped SwiGLU fused: weight rows [gate (n/2); up (n/2)] in the ModelOpt or the
    sm90 layout (int32 words), alpha fp32 [n] -> bf16 [M, n/2] = ``silu(min(gate, limit)) *
    clamp(up, -limit, limit)`` (``limit = inf``: no clamp). CUDA + sm90 layout, the SwiGLU in the kernel's
    epilogue (fp32 accumulators, one bf16 rounding): with n/2 a multiple of 64 and K of 256, the WGMMA kernel
    above DECODE_MAX_M and from SMALL_WGMMA_MIN_M where :func:`use_wgmma` says so; otherwise, M <= DECODE_MAX_M with
    n/2 a multiple of 16, the decode kernel. Both beat the GEMM followed by the SwiGLU pass at every M measured
    (its fp32 round trip over [M, n] costs about a third of the GEMM). Otherwise the GEMM (bf16 out on the GPU, fp32 on CPU) then the SwiGLU in fp32."""
    if n % 2:
        raise ValueError(f"gate_up must have an even number of rows, got n={n}")
    sm90 = weight.dtype == torch.int32
    if sm90:
        _check_sm90_args(x, weight, weight_scale, alpha, None, n)
    else:
        _check_gemm_args(x, weight, weight_scale, alpha, None)
    half = n // 2
    if x.is_cuda:
        m = x.shape[0]
        # the WGMMA kernel above DECODE_MAX_M, and from SMALL_WGMMA_MIN_M where use_wgmma says so (H100,
        # data/bench/wgmma_crossover_nvidia_h100_80gb_hbm3_bea9875.json: gate_up + SwiGLU 29.2-30.2 us at M = 33..64
        # against the decode kernel's 34.3-36.3; 19.4 for the decode kernel at M <= 32)
        if sm90 and m > 0 and half % 64 == 0 and wgmma_takes(x.shape[1]) and (m > DECODE_MAX_M or use_wgmma(m, n, x.shape[1], False)):
            from ..kernels.sm90 import gemm_wgmma

            return gemm_wgmma.run_wgmma(x.contiguous(), weight, weight_scale, alpha, n, swiglu_limit=float(limit))
        if sm90 and 0 < m <= DECODE_MAX_M and half % 16 == 0:
            from ..kernels.sm90 import gemm_decode

            return gemm_decode.run_decode(x.contiguous(), weight, weight_scale, alpha, half, swiglu_limit=float(limit))
        h = gemm_w4a16_sm90(x, weight, weight_scale, alpha, None, n) if sm90 else gemm_w4a16(x, weight, weight_scale, alpha, None)
    else:
        rows = dequantize_sm90(weight, weight_scale, n) if sm90 else dequantize_rows(weight, weight_scale)
        h = x.float() @ rows.t() * alpha.float()
    return clamped_swiglu_reference(h, float(limit)).to(torch.bfloat16)


@gemm_w4a16_swiglu.register_fake
def _(x, weight, weight_scale, alpha, n, limit):
    return x.new_empty((x.shape[0], n // 2), dtype=torch.bfloat16)


def nvfp4_linear(x: torch.Tensor, prepared: PreparedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x[..., K]`` bf16 @ the prepared NVFP4 weight -> bf16 ``[..., N]`` (leading dims flattened for the op)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if prepared.layout == LAYOUT_SM90:
        y = torch.ops.nvfp4lib.gemm_w4a16_sm90(x2, prepared.weight, prepared.block_scale, prepared.alpha, bias, prepared.n)
    else:
        y = torch.ops.nvfp4lib.gemm_w4a16(x2, prepared.weight, prepared.block_scale, prepared.alpha, bias)
    return y.reshape(*lead, prepared.n)

"""A fused NVFP4 weight whose parts carry different global scales (``fused_wqa_wkv``): three strategies.

DeepSeek-V4 runs wq_a [1536, K] and wkv [512, K] as one GEMM, ``fused_wqa_wkv`` [2048, K]. When the two
were quantized separately, each has its own ``weight_scale_2`` (g_q, g_kv) and its E4M3 block scales are
relative to it. A single GEMM epilogue multiplier cannot serve both parts, so something has to give:

(a) ``"max"``: keep g = max(g_q, g_kv) for the whole weight and leave the block scales alone. This is what
    vLLM 0.33 does (with a warning): the part with the smaller scale decodes ``g / g_i`` times too large.
(b) ``"fold"``: keep g = max(...) and fold each part's ratio ``g_i / g <= 1`` into its E4M3 block scales,
    ``E4M3(block * g_i / g)``. Exact only when the ratio is a power of two and nothing goes subnormal;
    otherwise every block scale is rounded again to 3 mantissa bits (<= 2**-4 relative), and at large
    ratios block scales fall into E4M3's subnormals (coarser) or below 2**-10 and flush to zero: those
    blocks decode to 0. (Folding into the *larger* part instead, g = min, saturates scales at 448.)
(c) ``"segment_alpha"``: our default. The GEMM applies a per-output-column fp32 ``alpha[n]`` in the
    epilogue (:func:`nvfp4lib.ops.gemm.prepare_weight` with ``segment_sizes``): each row keeps its own
    global scale, so the result equals dequantizing each part with its own scale, at no extra cost (one
    fp32 per column, loaded once per output tile).

:func:`fuse` builds the :class:`~nvfp4lib.ops.gemm.PreparedWeight` for any strategy;
:func:`error_table` measures all three for given scale ratios.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .formats import E4M3_MAX, dequantize, quantize
from .ops.gemm import PreparedWeight, nvfp4_linear, prepare_weight

STRATEGY_MAX = "max"
STRATEGY_FOLD = "fold"
STRATEGY_SEGMENT_ALPHA = "segment_alpha"
STRATEGIES = (STRATEGY_MAX, STRATEGY_FOLD, STRATEGY_SEGMENT_ALPHA)
DEFAULT_STRATEGY = STRATEGY_SEGMENT_ALPHA
TABLE_RATIOS = (1.0, 1.25, 2.0, 10.0, 1000.0)


@dataclass
class Part:
    """One separately quantized part of a fused weight: weight uint8 [N_i, K/2], weight_scale e4m3
    [N_i, K/16], weight_scale_2 fp32 [] (an :class:`~nvfp4lib.checkpoint.NVFP4Linear` also fits)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_scale_2: torch.Tensor


def fold_block_scales(block_scale: torch.Tensor, factor: float) -> torch.Tensor:
    """E4M3(block_scale * factor): block scales float8_e4m3fn [..., K/16] rescaled by ``factor`` (fp32
    product, round-to-nearest-even into E4M3 including subnormals; below 2**-10 becomes 0; saturates at 448)."""
    if not factor > 0:
        raise ValueError(f"factor must be positive, got {factor}")
    return torch.clamp(block_scale.float() * factor, max=E4M3_MAX).to(torch.float8_e4m3fn)


def _check_parts(parts: Sequence) -> List[float]:
    if len(parts) < 1:
        raise ValueError("a fused weight needs at least one part")
    k = parts[0].weight.shape[1]
    for i, part in enumerate(parts):
        if part.weight.dim() != 2 or part.weight.shape[1] != k:
            raise ValueError(f"part {i}: weight {tuple(part.weight.shape)} must be [N_i, {k}] like part 0 (same K to fuse along N)")
    return [float(p.weight_scale_2) for p in parts]


def fuse(parts: Sequence, strategy: str = DEFAULT_STRATEGY) -> PreparedWeight:
    """Stack ``parts`` along N (in order) into one prepared weight, reconciling their global scales by
    ``strategy`` ("max", "fold" or "segment_alpha"; see the module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    scales = _check_parts(parts)
    weight = torch.cat([p.weight for p in parts])
    sizes = [p.weight.shape[0] for p in parts]
    if strategy == STRATEGY_SEGMENT_ALPHA:
        block = torch.cat([p.weight_scale for p in parts])
        return prepare_weight(weight, block, [p.weight_scale_2 for p in parts], segment_sizes=sizes)
    largest = max(scales)
    common = next(p.weight_scale_2 for p in parts if float(p.weight_scale_2) == largest)
    if strategy == STRATEGY_MAX:
        block = torch.cat([p.weight_scale for p in parts])
    else:
        block = torch.cat([p.weight_scale if s == largest else fold_block_scales(p.weight_scale, s / largest) for p, s in zip(parts, scales)])
    return prepare_weight(weight, block, common)


def true_weight(parts: Sequence, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[sum N_i, K]: each part dequantized with its own global scale (what the fused weight means)."""
    return torch.cat([dequantize(p.weight, p.weight_scale, p.weight_scale_2, dtype) for p in parts])


def prepared_weight_fp32(prepared: PreparedWeight) -> torch.Tensor:
    """[N, K] fp32: the weight a prepared ModelOpt-layout weight decodes to, alpha included."""
    from .ops.gemm import dequantize_rows

    return dequantize_rows(prepared.weight, prepared.block_scale) * prepared.alpha.unsqueeze(1)


def make_parts(sizes: Sequence[int], k: int, ratios: Sequence[float], generator: Optional[torch.Generator] = None, row_spread: float = 1.0) -> List[Part]:
    """Random parts [sizes[i], k], quantized so that weight_scale_2[i] = ratios[i] * weight_scale_2[0]
    (the data of part i is scaled so its amax is ratios[i] times part 0's; fp32 data, exact scales).

    Rows are Gaussian with a log-normal row magnitude, exp(row_spread * N(0, 1)): trained weights have
    rows of very different norms, so block amax spans orders of magnitude below the tensor amax. That
    spread decides how many block scales strategy (b) pushes into E4M3's subnormals; row_spread=0 gives
    plain Gaussian data, whose block scales all sit near the top of the E4M3 range."""
    parts, base_amax = [], None
    for size, ratio in zip(sizes, ratios):
        data = torch.randn(size, k, generator=generator) * torch.exp(row_spread * torch.randn(size, 1, generator=generator))
        if base_amax is None:
            base_amax = data.abs().amax()
        data = data * (ratio * base_amax / data.abs().amax())
        nvfp4 = quantize(data, ratio * base_amax / 2688.0)
        parts.append(Part(nvfp4.packed, nvfp4.block_scale, nvfp4.global_scale))
    return parts


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error, reduced in fp64 (an fp32 norm over ~10M elements drifts by ~1e-4)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def _worst_row(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max over rows of ||out_row - ref_row|| / ||ref_row|| (rows of ref that are all zero skipped)."""
    out, ref = out.double(), ref.double()
    norms = ref.norm(dim=1)
    keep = norms > 0
    return float(((out - ref).norm(dim=1)[keep] / norms[keep]).max()) if bool(keep.any()) else 0.0


def strategy_errors(parts: Sequence, x: torch.Tensor, names: Sequence[str]) -> List[dict]:
    """For each strategy: the relative error of the decoded weight and of the GEMM output per part,
    against each part dequantized with its own scale (the truth; output reference in fp32).

    x: bf16 [M, K]. Rows: strategy, weight_err_<name> (relative Frobenius), worst_row_err_<name> (the
    worst output channel: Frobenius hides small rows, whose blocks are the ones that underflow),
    output_err_<name>, output_err (whole), zero_block_scales (block scales that are 0 in the prepared
    weight but not in the checkpoint).
    """
    truth = true_weight(parts)
    reference = x.float() @ truth.t()
    bounds = torch.cumsum(torch.tensor([0] + [p.weight.shape[0] for p in parts]), 0).tolist()
    original_zeros = int(sum(int((p.weight_scale.view(torch.uint8) & 0x7F).eq(0).sum()) for p in parts))
    rows = []
    for strategy in STRATEGIES:
        prepared = fuse(parts, strategy)
        decoded = prepared_weight_fp32(prepared)
        out = nvfp4_linear(x, prepared)
        row = {"strategy": strategy}
        for name, lo, hi in zip(names, bounds[:-1], bounds[1:]):
            row[f"weight_err_{name}"] = _rel(decoded[lo:hi], truth[lo:hi])
            row[f"worst_row_err_{name}"] = _worst_row(decoded[lo:hi], truth[lo:hi])
            row[f"output_err_{name}"] = _rel(out[:, lo:hi], reference[:, lo:hi])
        row["output_err"] = _rel(out, reference)
        row["zero_block_scales"] = int((prepared.block_scale.view(torch.uint8) & 0x7F).eq(0).sum()) - original_zeros
        rows.append(row)
    return rows


def error_table(ratios: Sequence[float] = TABLE_RATIOS, sizes: Sequence[int] = (1536, 512), k: int = 7168, m: int = 16, names: Sequence[str] = ("wq_a", "wkv"), seed: int = 0, row_spread: float = 1.0) -> List[dict]:
    """The three strategies at each ratio ``weight_scale_2[wkv] / weight_scale_2[wq_a]``.

    The fused weight is [wq_a; wkv] with shapes ``sizes`` x k (DeepSeek-V4-Pro by default; pass smaller
    ones on a CPU), data from :func:`make_parts` (``row_spread``); wq_a holds the *smaller* global scale, so it is the part strategies
    (a) and (b) get wrong. x: bf16 [m, k] Gaussian. One row per (ratio, strategy), ready for pandas.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for ratio in ratios:
        parts = make_parts(sizes, k, (1.0, ratio), generator, row_spread)
        x = torch.randn(m, k, generator=generator).to(torch.bfloat16)
        measured = float(parts[1].weight_scale_2 / parts[0].weight_scale_2)
        for row in strategy_errors(parts, x, names):
            rows.append({"ratio": ratio, "measured_ratio": measured, **row})
    return rows

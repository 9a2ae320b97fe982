"""The routed-expert (MoE) block on NVFP4 experts: routing, grouped GEMMs, clamped SwiGLU, combine.

Data flow for T tokens, hidden H, E local experts, top-k routing, expert intermediate I:

1. :func:`route` (on the device, no host synchronisation, static shapes): the T*k (token, expert)
   pairs are sorted by expert (stable, so rows of one expert stay in token order). It returns
   ``token_of_row`` [T*k] (the token each sorted row reads), ``weight_of_row`` [T*k] fp32,
   ``expert_of_row`` [T*k], ``offsets`` [E+1] (rows of expert e are ``offsets[e]:offsets[e+1]``), and
   ``padded_offsets`` [E+1] (each group's rows rounded up to 128, the grouped scale layout; its end is
   bounded by :func:`padded_rows_capacity`).
2. ``x_sorted = x[token_of_row]`` [T*k, H]; gate_up GEMM per expert group -> [T*k, 2I];
   :func:`clamped_swiglu` (limit 10: gate clamped above at 10, up to [-10, 10]) -> [T*k, I];
   down GEMM per group -> [T*k, H]; the weighted combine sums each token's k rows in fp32 -> bf16 [T, H].

Each projection of every expert goes through :func:`expert_gemm`, the one dispatch point:

- CUDA, compute capability 10.x (Blackwell) with CuTeDSL: W4A4 on the tcgen05 block-scaled MMA
  (:mod:`nvfp4lib.kernels.sm100`, op ``nvfp4lib::grouped_gemm_nvfp4_sm100``). The activations are
  quantized per expert group by the scale assembly (:func:`quantize_groups` ->
  :func:`nvfp4lib.scales.assemble_scales_grouped`: exactly :func:`nvfp4lib.quantize` per group, one global
  scale per group), and the kernel reads its swizzled scales and padded offsets as they are. **This path
  is compile-verified only: it has never run on hardware here (no Blackwell GPU exists in this
  workbook's environment).** :func:`moe_block_w4a4_reference` is what it must equal.
- Hopper (weights prepared in the ``"sm90"`` layout, the default there): op
  ``nvfp4lib::grouped_gemm_w4a16_sm90``, weight-only, one launch per projection with the offsets read on
  the device (no host sync, CUDA-graph safe): groups of at most 64 rows (decode) run the grouped decode
  kernel (:func:`nvfp4lib.kernels.sm90.gemm_decode.run_grouped_decode`), larger groups (prefill) the grouped
  WGMMA kernel (:func:`nvfp4lib.kernels.sm90.gemm_wgmma.run_grouped_wgmma`). Both run gate_up with the
  clamped SwiGLU in their epilogue, so the block is two grouped launches plus routing and combine.
- Everything else: :func:`grouped_gemm_w4a16` (op ``nvfp4lib::grouped_gemm_w4a16``, weight-only,
  ModelOpt layout). On CPU the exact reference (:func:`reference_grouped_gemm_w4a16`: fp32
  ``x @ (e2m1*block)^T * alpha`` per group, rounded once to bf16); on a CUDA GPU a loop over experts
  through a torch dequantization (correct, slow, reads the offsets on the host).

Weights are held by :class:`GroupedWeight` (E experts of one projection, ModelOpt or sm90 layout, a
per-column fp32 ``alpha`` [E, N] so gate and up may carry different ``weight_scale_2``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch

from . import scales as _scales
from .formats import BLOCK_SIZE, check_global_scale, check_nvfp4_tensors
from .layout import swizzle_scales, unswizzle_scales
from .ops.gemm import LAYOUT_MODELOPT, LAYOUT_SM90, PreparedWeight, alpha_per_column, dequantize_rows, dequantize_sm90, nvfp4_linear

SWIGLU_LIMIT = 10.0


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------
@dataclass
class GroupedWeight:
    """The NVFP4 weights of E experts for one projection (gate_up or down).

    layout ``"modelopt"``: weight uint8 [E, N, K/2] (element 2i in the low nibble); block_scale
    float8_e4m3fn [E, N, K/16] row-major (the sm100 kernels swizzle them with :func:`swizzled_block_scale`).
    layout ``"sm90"`` (the Hopper kernels'; see ``kernels/sm90/dequant.py``): weight int32 words
    [E, N/16, K/64, 32, 4], block_scale int32 scale words [E, N/16, K/256, 32, 2].
    alpha: fp32 [E, N], the ``weight_scale_2`` of the segment (gate or up) each output column belongs to.
    """

    weight: torch.Tensor
    block_scale: torch.Tensor
    alpha: torch.Tensor
    segment_sizes: tuple
    layout: str = LAYOUT_MODELOPT
    _swizzled_block_scale: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def n(self) -> int:
        return self.alpha.shape[1]

    @property
    def k(self) -> int:
        return self.weight.shape[2] * (64 if self.layout == LAYOUT_SM90 else 2)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.block_scale, self.alpha))

    def expert(self, e: int) -> PreparedWeight:
        """Expert e as a :class:`PreparedWeight` for :func:`nvfp4_linear` (views, no copy)."""
        return PreparedWeight(self.weight[e], self.block_scale[e], self.alpha[e], self.n, self.k, self.segment_sizes, self.layout)

    def dequantized(self, e: int) -> torch.Tensor:
        """fp32 [N, K]: expert e's weight fully decoded (e2m1 * block * alpha)."""
        if self.layout == LAYOUT_SM90:
            rows = dequantize_sm90(self.weight[e], self.block_scale[e], self.n)
        else:
            rows = dequantize_rows(self.weight[e], self.block_scale[e])
        return rows * self.alpha[e].unsqueeze(1)

    def to(self, device, layout: Optional[str] = None) -> "GroupedWeight":
        """These (ModelOpt-layout) weights on ``device``, in ``layout`` (None: sm90 where usable)."""
        if self.layout != LAYOUT_MODELOPT:
            raise ValueError(f"only ModelOpt-layout weights can be moved and re-prepared, these are {self.layout!r}")
        return _in_layout(self.weight.to(device), self.block_scale.to(device), self.alpha.to(device), self.segment_sizes, layout)

    def swizzled_block_scale(self) -> torch.Tensor:
        """The block scales in the 128x4 layout the sm100 kernels read: e4m3 [E, Np * K16p]. Computed once
        (a weight-load-time step) and kept; the weights must not change afterwards."""
        if self.layout != LAYOUT_MODELOPT:
            raise ValueError(f"swizzled block scales come from the ModelOpt layout; these weights are in the {self.layout!r} layout")
        if self._swizzled_block_scale is None:
            self._swizzled_block_scale = swizzle_scales(self.block_scale)
        return self._swizzled_block_scale


def grouped_sm90_usable(weight: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    """True when E stacked ModelOpt experts (uint8 [E, N, K/2]) can take the sm90 layout of the one-launch
    grouped kernel: a Hopper GPU with CuTeDSL, N a multiple of 16, K of 256, every block scale a normal."""
    from .ops.gemm import sm90_layout_usable

    return weight.shape[1] % 16 == 0 and sm90_layout_usable(weight[0], weight_scale)


def repack_experts(weight: torch.Tensor, weight_scale: torch.Tensor):
    """ModelOpt experts (uint8 [E, N, K/2], e4m3 [E, N, K/16]) -> the sm90 layout (int32 words
    [E, N/16, K/64, 32, 4], int32 scale words [E, N/16, K/256, 32, 2]), one expert at a time so the
    temporaries stay one expert's size. Raises ValueError where the layout cannot hold them."""
    from .kernels.sm90 import dequant

    if weight.shape[1] % 16:
        raise ValueError(f"the grouped sm90 layout needs N a multiple of 16, got N={weight.shape[1]}")
    first = dequant.repack_weight(weight[0], weight_scale[0])
    words = torch.empty((weight.shape[0],) + tuple(first[0].shape), dtype=torch.int32, device=weight.device)
    scale_words = torch.empty((weight.shape[0],) + tuple(first[1].shape), dtype=torch.int32, device=weight.device)
    words[0], scale_words[0] = first
    for e in range(1, weight.shape[0]):
        words[e], scale_words[e] = dequant.repack_weight(weight[e], weight_scale[e])
    return words, scale_words


def prepare_grouped_weight(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2, segment_sizes: Optional[Sequence[int]] = None,
                           layout: Optional[str] = None) -> GroupedWeight:
    """Stack of E ModelOpt NVFP4 linears -> :class:`GroupedWeight`.

    weight: uint8 [E, N, K/2]; weight_scale: float8_e4m3fn [E, N, K/16]; weight_scale_2: fp32 [E]
    (one per expert) or [E, S] (one per fused segment, e.g. S=2 for gate and up);
    segment_sizes: the S row counts (sum N), required when S > 1; layout: None picks ``"sm90"`` (repacked
    for the Hopper grouped kernel; the ModelOpt copy is not kept) where :func:`grouped_sm90_usable`, else
    ``"modelopt"``; naming one forces it.
    """
    check_nvfp4_tensors(weight, weight_scale, "expert weight")
    if weight.dim() != 3:
        raise ValueError(f"expert weight must be 3-D [E, N, K/2], got shape {tuple(weight.shape)}")
    num_experts, n = weight.shape[0], weight.shape[1]
    scales = torch.as_tensor(weight_scale_2, dtype=torch.float32)
    if scales.dim() == 1:
        scales = scales.unsqueeze(1)
    if scales.dim() != 2 or scales.shape[0] != num_experts:
        raise ValueError(f"weight_scale_2 must be [E={num_experts}] or [E, S], got shape {tuple(scales.shape)}")
    if segment_sizes is None:
        if scales.shape[1] != 1:
            raise ValueError(f"{scales.shape[1]} weight_scale_2 per expert need segment_sizes (row counts summing to N={n})")
        segment_sizes = (n,)
    segment_sizes = tuple(int(s) for s in segment_sizes)
    if len(segment_sizes) != scales.shape[1] or sum(segment_sizes) != n or any(s <= 0 for s in segment_sizes):
        raise ValueError(f"segment_sizes {segment_sizes} must be {scales.shape[1]} positive counts summing to N={n}")
    alpha = torch.stack([
        alpha_per_column([check_global_scale(g, f"weight_scale_2[{e}][{i}]") for i, g in enumerate(scales[e])], segment_sizes)
        for e in range(num_experts)
    ]).to(weight.device)
    return _in_layout(weight, weight_scale, alpha, segment_sizes, layout)


def _in_layout(weight, weight_scale, alpha, segment_sizes, layout) -> GroupedWeight:
    """ModelOpt expert tensors -> a GroupedWeight in ``layout`` (None: sm90 where usable)."""
    if layout is None:
        layout = LAYOUT_SM90 if grouped_sm90_usable(weight, weight_scale) else LAYOUT_MODELOPT
    if layout == LAYOUT_SM90:
        words, scale_words = repack_experts(weight, weight_scale)
        return GroupedWeight(words, scale_words, alpha, segment_sizes, LAYOUT_SM90)
    if layout != LAYOUT_MODELOPT:
        raise ValueError(f"unknown layout {layout!r}: expected {LAYOUT_MODELOPT!r} or {LAYOUT_SM90!r}")
    return GroupedWeight(weight.contiguous(), weight_scale.contiguous(), alpha, segment_sizes)


# ----------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------
class Routing(NamedTuple):
    """Token -> expert-contiguous order (all on the routing ids' device; shapes static).

    token_of_row: int64 [T*k], the token each sorted row reads; weight_of_row: fp32 [T*k];
    expert_of_row: int64 [T*k] (non-decreasing); offsets: int64 [E+1], rows of expert e are
    offsets[e]:offsets[e+1]; padded_offsets: int64 [E+1], each group rounded up to a multiple of 128
    rows (the grouped block-scale layout; equal to what :func:`nvfp4lib.scales.assemble_scales_grouped`
    returns); counts: int64 [E].
    """

    token_of_row: torch.Tensor
    weight_of_row: torch.Tensor
    expert_of_row: torch.Tensor
    offsets: torch.Tensor
    padded_offsets: torch.Tensor
    counts: torch.Tensor


def padded_rows_capacity(num_rows: int, num_experts: int) -> int:
    """Static bound on ``padded_offsets[-1]`` (rows of the grouped scale buffer): the scale assembly's
    :func:`nvfp4lib.scales.grouped_scale_rows`, a multiple of 128 that depends on sizes only."""
    return _scales.grouped_scale_rows(num_rows, num_experts)


def route(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, check: bool = True) -> Routing:
    """Sort the (token, expert) pairs of top-k routing by expert, on the device, without host sync.

    topk_ids: int [T, k], values in [0, num_experts); topk_weights: float [T, k] (combine weights).
    check: validate ids on the host (one synchronisation); pass False under CUDA-graph capture or
    torch.compile. Out-of-range ids with check=False are clamped into range (never an out-of-bounds
    access), which silently misroutes: validate eagerly first.
    """
    if topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids and topk_weights must both be [T, k], got {tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    if topk_ids.dtype.is_floating_point:
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if num_experts <= 0:
        raise ValueError(f"num_experts must be positive, got {num_experts}")
    ids = topk_ids.reshape(-1).long()
    if check and ids.numel() and bool(((ids < 0) | (ids >= num_experts)).any()):
        bad = ids[(ids < 0) | (ids >= num_experts)][0].item()
        raise ValueError(f"topk_ids holds expert {bad}, outside [0, {num_experts}): route only to local experts")
    ids = ids.clamp(0, num_experts - 1)
    top_k = topk_ids.shape[1]
    expert_of_row, pair_of_row = torch.sort(ids, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    padded_offsets = _scales.padded_group_offsets(offsets, ids.numel(), ids.numel()).long()
    token_of_row = pair_of_row // top_k
    weight_of_row = topk_weights.reshape(-1).float()[pair_of_row]
    return Routing(token_of_row, weight_of_row, expert_of_row, offsets, padded_offsets, counts)


def check_distinct_per_token(topk_ids: torch.Tensor) -> None:
    """Eager check (host sync): each token's k expert ids are distinct, as top-k routing gives them. The
    MoE block relies on it to bound any expert's rows by the token count T."""
    if topk_ids.shape[1] > 1 and topk_ids.numel():
        per_token = torch.sort(topk_ids.long(), dim=1).values
        repeated = (per_token[:, 1:] == per_token[:, :-1]).any(dim=1)
        if bool(repeated.any()):
            token = int(torch.nonzero(repeated)[0, 0])
            raise ValueError(f"token {token} is routed to one expert twice ({topk_ids[token].tolist()}): top-k ids must be distinct per token")


def check_offsets(offsets: torch.Tensor, num_rows: int, num_experts: int) -> list:
    """Eager-mode check (host sync): offsets [E+1] non-decreasing from 0 to num_rows. Returns them as a
    list of ints (the one host copy, for callers that need the bounds too)."""
    if offsets.shape != (num_experts + 1,):
        raise ValueError(f"offsets must be [E+1] = [{num_experts + 1}], got {tuple(offsets.shape)}")
    o = offsets.tolist()
    if o[0] != 0 or o[-1] != num_rows or any(b < a for a, b in zip(o, o[1:])):
        raise ValueError(f"offsets must be non-decreasing from 0 to {num_rows} rows, got {o}")
    return o


def group_of_row(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """int64 [num_rows]: the group each row belongs to, from offsets [E+1] (on the device)."""
    rows = torch.arange(num_rows, device=offsets.device)
    return torch.searchsorted(offsets[1:].contiguous(), rows, right=True).clamp(max=offsets.shape[0] - 2)


# ----------------------------------------------------------------------------------------------
# Activation
# ----------------------------------------------------------------------------------------------
def clamped_swiglu(gate_up: torch.Tensor, limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """[..., 2I] (gate first, then up) -> [..., I]: silu(min(gate, limit)) * clamp(up, -limit, limit).

    Computed in fp32, returned in the input dtype (DeepSeek-V4's swiglu_limit is 10).
    """
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dimension must be even (gate then up), got {gate_up.shape[-1]}")
    gate, up = gate_up.float().chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


# ----------------------------------------------------------------------------------------------
# Grouped GEMM
# ----------------------------------------------------------------------------------------------
def _check_grouped_args(x_sorted, offsets, weight, block_scale, alpha):
    if x_sorted.dim() != 2:
        raise ValueError(f"x_sorted must be 2-D [M, K], got shape {tuple(x_sorted.shape)}")
    if x_sorted.dtype != torch.bfloat16:
        raise ValueError(f"x_sorted must be bf16, got {x_sorted.dtype}")
    check_nvfp4_tensors(weight, block_scale, "expert weight")
    if weight.dim() != 3:
        raise ValueError(f"weight must be [E, N, K/2], got shape {tuple(weight.shape)}")
    num_experts, n, k = weight.shape[0], weight.shape[1], weight.shape[2] * 2
    if x_sorted.shape[1] != k:
        raise ValueError(f"x_sorted has K={x_sorted.shape[1]} but the expert weights have K={k}")
    if alpha.shape != (num_experts, n) or alpha.dtype != torch.float32:
        raise ValueError(f"alpha must be fp32 [E, N] = [{num_experts}, {n}], got {alpha.dtype} {tuple(alpha.shape)}")
    if offsets.shape != (num_experts + 1,) or offsets.dtype.is_floating_point:
        raise ValueError(f"offsets must be an integer tensor [E+1] = [{num_experts + 1}], got {offsets.dtype} {tuple(offsets.shape)}")


def reference_grouped_gemm_w4a16(x_sorted: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor, block_scale: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Exact reference: rows offsets[e]:offsets[e+1] of x_sorted (bf16 [M, K]) times expert e's weight
    -> bf16 [M, N], computed as fp32 ``(x @ (e2m1*block)^T) * alpha[e]`` and rounded once.
    Rows outside every group (none when offsets end at M) are zero."""
    m, n = x_sorted.shape[0], weight.shape[1]
    out = torch.zeros(m, n, dtype=torch.bfloat16, device=x_sorted.device)
    bounds = offsets.tolist()
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            acc = x_sorted[start:end].float() @ dequantize_rows(weight[e], block_scale[e]).t()
            out[start:end] = (acc * alpha[e]).to(torch.bfloat16)
    return out


def _loop_grouped_gemm_w4a16(x_sorted, offsets, weight, block_scale, alpha):
    """CUDA fallback (Hopper): one nvfp4_linear per non-empty expert (reads offsets on the host)."""
    m, n, k = x_sorted.shape[0], weight.shape[1], x_sorted.shape[1]
    out = torch.zeros(m, n, dtype=torch.bfloat16, device=x_sorted.device)
    bounds = offsets.tolist()
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            prepared = PreparedWeight(weight[e], block_scale[e], alpha[e], n, k, (n,))
            out[start:end] = nvfp4_linear(x_sorted[start:end], prepared)
    return out


def grouped_gemm_w4a16(x_sorted: torch.Tensor, offsets: torch.Tensor, weights: GroupedWeight, max_rows: Optional[int] = None,
                       swiglu_limit: Optional[float] = None) -> torch.Tensor:
    """Weight-only grouped GEMM: bf16 [M, K] rows in expert-contiguous order, offsets [E+1] on the
    device -> bf16 [M, N] (rows of group e times expert e), or with ``swiglu_limit`` the clamped SwiGLU of
    it, bf16 [M, N/2] (gate_up weights).

    sm90 layout: op ``nvfp4lib::grouped_gemm_w4a16_sm90`` (one launch on the GPU: the grouped decode kernel
    for groups of at most 64 rows, the grouped WGMMA kernel above; see :mod:`nvfp4lib.ops.moe`). max_rows bounds any group's rows (None: M,
    always safe; a tighter bound launches fewer token blocks per group). ModelOpt layout: op
    ``nvfp4lib::grouped_gemm_w4a16`` (exact reference on CPU, a per-expert loop on CUDA; the SwiGLU then
    runs separately)."""
    from .ops import moe as _moe_ops  # registers the grouped ops

    del _moe_ops
    if weights.layout == LAYOUT_SM90:
        rows = x_sorted.shape[0] if max_rows is None else max_rows
        return torch.ops.nvfp4lib.grouped_gemm_w4a16_sm90(x_sorted, offsets, weights.weight, weights.block_scale, weights.alpha,
                                                          weights.n, max(int(rows), 1), swiglu_limit)
    y = torch.ops.nvfp4lib.grouped_gemm_w4a16(x_sorted, offsets, weights.weight, weights.block_scale, weights.alpha)
    return y if swiglu_limit is None else clamped_swiglu(y, swiglu_limit)


def is_blackwell(device: torch.device) -> bool:
    """True for a CUDA device of compute capability 10.x (the sm100 block-scaled kernels' target)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 10


# ----------------------------------------------------------------------------------------------
# W4A4: grouped activation quantization (Blackwell path)
# ----------------------------------------------------------------------------------------------
def quantize_groups(x_sorted: torch.Tensor, offsets: torch.Tensor, input_scale: Optional[torch.Tensor] = None, check: bool = True) -> "_scales.GroupedScaleAssembly":
    """Quantize bf16 [M, K] expert-contiguous rows group by group for the W4A4 path: the scale assembly's
    :func:`nvfp4lib.scales.assemble_scales_grouped` (its CuTeDSL kernel on a GPU, its exact reference on
    CPU), i.e. ``nvfp4lib.quantize(x[offsets[e]:offsets[e+1]], input_scale[e])`` per group with the block
    scales of group e swizzled from scale row ``padded_offsets[e]`` on. input_scale: fp32 [E] decode
    multipliers, or None for dynamic per-group scales. check=False skips the eager host checks.

    Returns ``GroupedScaleAssembly(packed uint8 [M, K/2], swizzled_scale e4m3 [R*K16p],
    padded_offsets int32 [E+1], global_scales fp32 [E])`` with R = :func:`padded_rows_capacity`.
    """
    return _scales.assemble_scales_grouped(x_sorted, offsets, input_scale, validate=check)


def grouped_block_scales(activations, offsets: torch.Tensor) -> torch.Tensor:
    """Row-major block scales e4m3 [M, K/16] of grouped activations, read back from their swizzled buffer
    (row r of group e sits at scale row ``padded_offsets[e] + r - offsets[e]``)."""
    m, k = activations.packed.shape[0], activations.packed.shape[1] * 2
    k16p = (k // BLOCK_SIZE + 3) // 4 * 4
    capacity = activations.swizzled_scale.numel() // k16p
    padded = unswizzle_scales(activations.swizzled_scale.reshape(-1), capacity, k)
    groups = group_of_row(offsets, m)
    padded_row = activations.padded_offsets.long()[groups] + (torch.arange(m, device=offsets.device) - offsets[groups])
    return padded[padded_row.clamp(max=capacity - 1)]


def reference_grouped_gemm_w4a4(activations, offsets: torch.Tensor, weights: GroupedWeight) -> torch.Tensor:
    """What the sm100 grouped kernel computes, exactly, on any device: for rows of group e,
    fp32 ``(e2m1_a*sfa) @ (e2m1_w*sfw)^T * (global_a[e] * alpha[e])`` rounded once to bf16 [M, N].
    activations: a :func:`quantize_groups` result (``GroupedScaleAssembly``)."""
    m = activations.packed.shape[0]
    x_dequant = dequantize_rows(activations.packed, grouped_block_scales(activations, offsets))
    groups = group_of_row(offsets, m)
    x_dequant = x_dequant * activations.global_scales[groups].unsqueeze(1)
    return reference_grouped_gemm_w4a16_fp32(x_dequant, offsets, weights).to(torch.bfloat16)


def reference_grouped_gemm_w4a16_fp32(x_sorted: torch.Tensor, offsets: torch.Tensor, weights: GroupedWeight) -> torch.Tensor:
    """fp32 [M, N]: each group's rows (any float dtype, used as fp32) times its fully decoded expert."""
    out = torch.zeros(x_sorted.shape[0], weights.n, dtype=torch.float32, device=x_sorted.device)
    bounds = offsets.tolist()
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            out[start:end] = x_sorted[start:end].float() @ weights.dequantized(e).t()
    return out


# ----------------------------------------------------------------------------------------------
# The MoE block
# ----------------------------------------------------------------------------------------------
@dataclass
class MoEWeights:
    """Routed experts of one layer: gate_up [E, 2I, H/2] (gate rows first) and down [E, H, I/2]."""

    gate_up: GroupedWeight
    down: GroupedWeight
    swiglu_limit: float = SWIGLU_LIMIT
    # fp32 [E] checkpoint input_scale per expert for the W4A4 (Blackwell) path; None = dynamic per group
    gate_up_input_scale: Optional[torch.Tensor] = None
    down_input_scale: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.gate_up.num_experts != self.down.num_experts:
            raise ValueError(f"gate_up has {self.gate_up.num_experts} experts, down {self.down.num_experts}")
        if self.gate_up.n != 2 * self.down.k:
            raise ValueError(f"gate_up N={self.gate_up.n} must be twice down's K={self.down.k} (gate and up)")
        if self.down.n != self.gate_up.k:
            raise ValueError(f"down N={self.down.n} must equal gate_up's K={self.gate_up.k} (the hidden size)")

    @property
    def num_experts(self) -> int:
        return self.gate_up.num_experts

    def to(self, device, layout: Optional[str] = None) -> "MoEWeights":
        """These weights on ``device`` (see :meth:`GroupedWeight.to`: sm90 layout on a Hopper GPU)."""
        move = (lambda t: None if t is None else t.to(device))
        return MoEWeights(self.gate_up.to(device, layout), self.down.to(device, layout), self.swiglu_limit,
                          move(self.gate_up_input_scale), move(self.down_input_scale))


def combine(y_sorted: torch.Tensor, routing: Routing, num_tokens: int) -> torch.Tensor:
    """Weighted combine: out[t] = sum over t's rows of weight * y, in fp32, rounded once -> bf16 [T, H]."""
    out = torch.zeros(num_tokens, y_sorted.shape[1], dtype=torch.float32, device=y_sorted.device)
    out.index_add_(0, routing.token_of_row, y_sorted.float() * routing.weight_of_row.unsqueeze(1))
    return out.to(torch.bfloat16)


def _check_block_inputs(x, topk_ids, weights):
    if x.dim() != 2 or x.dtype != torch.bfloat16:
        raise ValueError(f"x must be bf16 [T, H], got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] != weights.gate_up.k:
        raise ValueError(f"x has hidden size {x.shape[1]}, the experts expect {weights.gate_up.k}")
    if topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} tokens, x has {x.shape[0]}")


def expert_gemm(x_sorted: torch.Tensor, routing: Routing, weights: GroupedWeight, input_scale: Optional[torch.Tensor] = None, check: bool = True,
                max_rows: Optional[int] = None, swiglu_limit: Optional[float] = None) -> torch.Tensor:
    """One projection of every expert over the sorted rows: bf16 [M, K] -> bf16 [M, N], or with
    ``swiglu_limit`` (gate_up) the clamped SwiGLU of it, bf16 [M, N/2]. The dispatch point of the MoE
    block. max_rows: a bound on any expert's rows (None: M).

    - Compute capability 10.x with CuTeDSL: W4A4. Rows are quantized per group by the scale assembly
      (:func:`quantize_groups`: ``nvfp4lib.quantize`` semantics, global scale ``input_scale[e]`` or
      dynamic when None) and multiplied on the tcgen05 block-scaled MMA by the sm100 grouped kernel
      (``torch.ops.nvfp4lib.grouped_gemm_nvfp4_sm100``). COMPILE-VERIFIED ONLY: this path has never run
      on a Blackwell GPU here; :func:`reference_grouped_gemm_w4a4` is what it must equal.
    - Everything else: :func:`grouped_gemm_w4a16` (weight-only; ``input_scale`` unused; with sm90
      weights the SwiGLU is fused into the grouped kernel's epilogue).
    """
    if is_blackwell(x_sorted.device):
        from .kernels.cute_compile import cute_available

        if cute_available():
            from .ops import moe as _moe_ops

            del _moe_ops
            acts = quantize_groups(x_sorted, routing.offsets, input_scale, check=check)
            y = torch.ops.nvfp4lib.grouped_gemm_nvfp4_sm100(
                acts.packed, acts.swizzled_scale, acts.global_scales, routing.offsets, acts.padded_offsets,
                weights.weight, weights.swizzled_block_scale(), weights.alpha,
            )
            return y if swiglu_limit is None else clamped_swiglu(y, swiglu_limit)
    return grouped_gemm_w4a16(x_sorted, routing.offsets, weights, max_rows, swiglu_limit)


def moe_block(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights, check: bool = True) -> torch.Tensor:
    """The routed-expert block: bf16 x [T, H], top-k ids/weights [T, k] -> bf16 [T, H].

    gate_up -> clamped SwiGLU -> down per expert through :func:`expert_gemm` (bf16 between the
    steps), weighted combine in fp32. check=False skips the host-side routing check (graph capture).
    Each token's k ids must be distinct (top-k routing): an expert then holds at most T rows, the bound
    the grouped kernel is launched with (checked when check=True).
    """
    _check_block_inputs(x, topk_ids, weights)
    if check:
        check_distinct_per_token(topk_ids)
    routing = route(topk_ids, topk_weights, weights.num_experts, check=check)
    x_sorted = x[routing.token_of_row]
    max_rows = x.shape[0]
    activated = expert_gemm(x_sorted, routing, weights.gate_up, weights.gate_up_input_scale, check, max_rows, weights.swiglu_limit)
    y_sorted = expert_gemm(activated, routing, weights.down, weights.down_input_scale, check, max_rows)
    return combine(y_sorted, routing, x.shape[0])


def moe_block_w4a4_reference(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights) -> torch.Tensor:
    """Exactly what :func:`moe_block` computes on Blackwell (W4A4, the sm100 kernels), on any device:
    activations quantized per expert group (``input_scale`` or dynamic) before each projection,
    :func:`reference_grouped_gemm_w4a4`, bf16 between steps, fp32 combine. Returns bf16 [T, H]."""
    _check_block_inputs(x, topk_ids, weights)
    routing = route(topk_ids, topk_weights, weights.num_experts)
    rows = x[routing.token_of_row]
    for projection, input_scale in ((weights.gate_up, weights.gate_up_input_scale), (weights.down, weights.down_input_scale)):
        acts = quantize_groups(rows, routing.offsets, input_scale)
        rows = reference_grouped_gemm_w4a4(acts, routing.offsets, projection)
        if projection is weights.gate_up:
            rows = clamped_swiglu(rows, weights.swiglu_limit)
    return combine(rows, routing, x.shape[0])


def moe_block_fp32(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights) -> torch.Tensor:
    """The accuracy oracle: the same block over the same dequantized weights, fp32 throughout (no
    intermediate rounding), computed token by token from the routing ids without the sorted layout.
    Returns fp32 [T, H]."""
    _check_block_inputs(x, topk_ids, weights)
    out = torch.zeros(x.shape[0], weights.down.n, dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in range(weights.num_experts):
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if token.numel() == 0:
            continue
        hidden = xf[token] @ weights.gate_up.dequantized(e).t()
        gate, up = hidden.chunk(2, dim=-1)
        activated = torch.nn.functional.silu(gate.clamp(max=weights.swiglu_limit)) * up.clamp(-weights.swiglu_limit, weights.swiglu_limit)
        y = activated @ weights.down.dequantized(e).t()
        out.index_add_(0, token, y * topk_weights[token, slot].float().unsqueeze(1))
    return out


def moe_block_dense_weights(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, swiglu_limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """The block over dense (e.g. the original bf16) weights, fp32 math: gate_up [E, 2I, H], down
    [E, H, I] -> fp32 [T, H]. Compares quantized experts with the unquantized model."""
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in range(gate_up.shape[0]):
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if token.numel() == 0:
            continue
        gate, up = (xf[token] @ gate_up[e].float().t()).chunk(2, dim=-1)
        activated = torch.nn.functional.silu(gate.clamp(max=swiglu_limit)) * up.clamp(-swiglu_limit, swiglu_limit)
        out.index_add_(0, token, (activated @ down[e].float().t()) * topk_weights[token, slot].float().unsqueeze(1))
    return out


def quantize_experts(dense: torch.Tensor, segment_sizes: Optional[Sequence[int]] = None) -> GroupedWeight:
    """Quantize dense expert weights [E, N, K] (bf16/fp32) ModelOpt-style: each segment (gate, up) of
    each expert gets its own global scale (amax / 2688). Returns a :class:`GroupedWeight`."""
    from .formats import quantize

    num_experts, n, k = dense.shape
    segment_sizes = tuple(segment_sizes) if segment_sizes is not None else (n,)
    packed = torch.empty(num_experts, n, k // 2, dtype=torch.uint8, device=dense.device)
    block = torch.empty(num_experts, n, k // BLOCK_SIZE, dtype=torch.float8_e4m3fn, device=dense.device)
    scales = torch.empty(num_experts, len(segment_sizes), dtype=torch.float32)
    for e in range(num_experts):
        start = 0
        for s, size in enumerate(segment_sizes):
            q = quantize(dense[e, start:start + size])
            packed[e, start:start + size], block[e, start:start + size] = q.packed, q.block_scale
            scales[e, s] = q.global_scale
            start += size
    return prepare_grouped_weight(packed, block, scales, segment_sizes if len(segment_sizes) > 1 else None)


__all__ = [
    "GroupedWeight",
    "MoEWeights",
    "Routing",
    "SWIGLU_LIMIT",
    "clamped_swiglu",
    "combine",
    "expert_gemm",
    "grouped_block_scales",
    "grouped_gemm_w4a16",
    "moe_block",
    "moe_block_dense_weights",
    "moe_block_fp32",
    "moe_block_w4a4_reference",
    "padded_rows_capacity",
    "prepare_grouped_weight",
    "quantize_experts",
    "quantize_groups",
    "reference_grouped_gemm_w4a16",
    "reference_grouped_gemm_w4a4",
    "route",
]

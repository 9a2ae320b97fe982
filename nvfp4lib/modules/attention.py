"""DeepSeek-V4 attention projections as nn.Modules over the NVFP4 W4A16 GEMM (:func:`nvfp4_linear`).

Shapes (DeepSeek-V4-Pro; T tokens; activations bf16, row-major):

- ``fused_wqa_wkv``  x [T, 7168] -> q_latent [T, 1536], kv [T, 512]; one GEMM over [wq_a; wkv] [2048, 7168]
  whose two parts keep their own ``weight_scale_2`` as a per-column alpha (:mod:`nvfp4lib.dual_scale`).
- ``wq_b``           q_latent [T, 1536] -> q [T, 65536] (128 heads x 512).
- ``wo_a``           o [T, 16, 4096] -> [T, 16, 1024]: 16 groups, group g multiplies its own [1024, 4096]
  slice of the [16384, 4096] checkpoint weight (a batched GEMM, not one big one).
- ``wo_b``           [T, 16384] -> [T, 7168].

Only the projections live here: the q / kv RMSNorms, RoPE and its inverse and the attention core sit
between them in the model and are not part of this module.

wo_a dispatch: on a CPU the NVFP4 grouped projection is one batched exact reference (fp32 einsum,
rounded once to bf16). On a Hopper GPU (weights in the sm90 layout) it is the grouped op
``nvfp4lib::grouped_gemm_w4a16_sm90``: ONE launch of the grouped decode kernel for T <= 64 tokens; up to
``BATCHED_WGMMA_MAX_T`` tokens ONE launch of the batched WGMMA kernel (each group reads its own columns of
x in place); larger T dequantize the whole weight once and run one cuBLAS bmm; other GPUs a loop of 16
:func:`nvfp4_linear` launches. ``GroupedNVFP4Projection.grouped_kernel`` says whether the grouped op can
run. The FP8 path (:class:`GroupedFP8Projection`, the ModelOpt FP8 per-tensor format a checkpoint may
carry for wo_a instead) quantizes activations with the static ``input_scale`` (W8A8) and runs
``torch._scaled_mm`` per group on a GPU, an exact fp32 emulation on a CPU.

Modules hold prepared weights built on the device of the tensors they are given (the GEMM's prepared
layout may be device-specific): build them on the device you run on, ``.to()`` is refused.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..checkpoint import Checkpoint, FP8Linear, NVFP4Linear
from ..dual_scale import DEFAULT_STRATEGY, fuse
from ..formats import E4M3_MAX
from ..ops.moe import GROUPED_KERNEL_MAX_ROWS
from ..ops.gemm import LAYOUT_SM90, PreparedWeight, dequantize_rows, nvfp4_linear, prepare_weight
from ..synthetic import WKV, WO_A, WO_B, WQ_A, WQ_B, DSV4Dims

# wo_a above 64 tokens: the batched WGMMA kernel up to this many tokens, dequantize + cuBLAS bmm above. On an
# H100 (data/bench/wo_a_probe_nvidia_h100_80gb_hbm3_23654fa.json) it took 56.6 / 228 / 447 / 937 us at
# 256 / 1024 / 2048 / 4096 tokens against 137 / 264 / 465 / 869 for dequantize + bmm (cuBLAS bmm on the
# dequantized weight alone: 67.3 / 214 / 417 / 823)
BATCHED_WGMMA_MAX_T = 2048


class _PreparedModule(nn.Module):
    """Refuses ``.to()`` / ``.cuda()``: prepared weights are built for one device (see module docstring)."""

    def _apply(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} holds prepared NVFP4 weights for one device: build it from tensors on the target device instead of moving it")


def _to_device(linear, device):
    if device is None:
        return linear
    moved = {name: getattr(linear, name) for name in ("weight", "weight_scale", "weight_scale_2", "input_scale") if hasattr(linear, name)}
    moved = {name: (t.to(device) if isinstance(t, torch.Tensor) else t) for name, t in moved.items()}
    return type(linear)(linear.prefix, **moved)


def _check_bf16(x: torch.Tensor, k: int, name: str) -> None:
    if x.dtype != torch.bfloat16:
        raise ValueError(f"{name}: x must be bf16, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"{name}: x has {x.shape[-1]} features in its last dimension, the weight expects K={k}")


def _check_grouped_input(x: torch.Tensor, groups: int, k: int, name: str) -> None:
    """ValueError unless x is bf16 [T, groups, k] (the input of a grouped projection such as wo_a)."""
    _check_bf16(x, k, name)
    if x.dim() != 3 or x.shape[1] != groups:
        raise ValueError(f"{name}: x must be [T, {groups}, {k}], got {tuple(x.shape)}")


class NVFP4Projection(_PreparedModule):
    """y [..., N] = x [..., K] @ W^T * weight_scale_2 through :func:`nvfp4_linear` (W4A16; x bf16)."""

    def __init__(self, linear: NVFP4Linear, device=None):
        super().__init__()
        linear = _to_device(linear, device)
        self.name = linear.prefix
        self.prepared: PreparedWeight = prepare_weight(linear.weight, linear.weight_scale, linear.weight_scale_2)

    @property
    def n(self) -> int:
        return self.prepared.n

    @property
    def k(self) -> int:
        return self.prepared.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_bf16(x, self.k, self.name)
        return nvfp4_linear(x, self.prepared)


class FusedWqaWkv(_PreparedModule):
    """fused_wqa_wkv: x [..., hidden] -> (q_latent [..., q_lora_rank], kv [..., head_dim]) in one GEMM.

    strategy: how the two ``weight_scale_2`` are reconciled ("segment_alpha", exact, the default;
    "max" and "fold" only to compare, see :mod:`nvfp4lib.dual_scale`).
    """

    def __init__(self, wq_a: NVFP4Linear, wkv: NVFP4Linear, strategy: str = DEFAULT_STRATEGY, device=None):
        super().__init__()
        wq_a, wkv = _to_device(wq_a, device), _to_device(wkv, device)
        if wq_a.k != wkv.k:
            raise ValueError(f"{wq_a.prefix} has K={wq_a.k} but {wkv.prefix} has K={wkv.k}: they read the same input")
        self.strategy = strategy
        self.split = (wq_a.n, wkv.n)
        self.weight_scales_2 = (float(wq_a.weight_scale_2), float(wkv.weight_scale_2))
        self.prepared: PreparedWeight = fuse([wq_a, wkv], strategy)

    @property
    def k(self) -> int:
        return self.prepared.k

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        _check_bf16(x, self.k, "fused_wqa_wkv")
        y = nvfp4_linear(x, self.prepared)
        return y.split(self.split, dim=-1)


def reference_grouped_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The exact grouped reference: x bf16 [T, G, K]; weight uint8 [G, N, K/2]; weight_scale e4m3
    [G, N, K/16]; alpha fp32 [G, N] -> bf16 [T, G, N] = (x_g @ (e2m1*block)_g^T) * alpha_g in fp32,
    rounded once to bf16. One batched einsum over the groups."""
    groups, n = weight.shape[0], weight.shape[1]
    decoded = dequantize_rows(weight.reshape(groups * n, -1), weight_scale.reshape(groups * n, -1)).reshape(groups, n, -1)
    acc = torch.einsum("tgk,gnk->tgn", x.float(), decoded)
    return (acc * alpha.float()).to(torch.bfloat16)


class GroupedNVFP4Projection(_PreparedModule):
    """wo_a in NVFP4: o [T, G, K_g] bf16 -> [T, G, N_g] bf16, group g through rows g*N_g..(g+1)*N_g of the
    checkpoint weight [G*N_g, K_g] (one ``weight_scale_2`` for all groups, as ModelOpt writes it).

    Three ways to compute it, all equal to bf16 rounding:

    - :meth:`forward_reference`: :func:`reference_grouped_gemm`, one batched exact launch (CPU default).
    - :meth:`forward_grouped`: the grouped op over all G groups (GPU default with the sm90 layout and
      T <= 64): one launch of the grouped decode kernel.
    - :meth:`forward_wgmma`: one launch of the batched WGMMA kernel, each group reading its own K columns of
      x in place (GPU default with the sm90 layout for 64 < T <= BATCHED_WGMMA_MAX_T).
    - :meth:`forward_batched`: one dequantization of the whole weight to bf16, one cuBLAS bmm (GPU
      default with the sm90 layout above).
    - :meth:`forward_loop`: one :func:`nvfp4_linear` per group, G launches (GPU default otherwise).
    - :meth:`forward_diagonal`: ONE :func:`nvfp4_linear` of all G*T rows against the whole weight, keeping
      the G diagonal blocks. It reads the weight once in one launch but does G times the FLOPs and writes
      G times the output, so it only suits decode (small T); the benchmark times it beside the loop.

    ``grouped_kernel`` is True when the weight took the sm90 layout (the grouped op can run).
    """

    def __init__(self, linear: NVFP4Linear, groups: int, device=None):
        super().__init__()
        linear = _to_device(linear, device)
        if linear.n % groups:
            raise ValueError(f"{linear.prefix}: N={linear.n} rows do not split into {groups} groups")
        self.name, self.groups = linear.prefix, groups
        self.n_group, self.k = linear.n // groups, linear.k
        # The ModelOpt tensors, viewed per group (views: no copy); the reference path reads these.
        self.weight = linear.weight.view(groups, self.n_group, -1)
        self.weight_scale = linear.weight_scale.view(groups, self.n_group, -1)
        self.alpha = linear.weight_scale_2.float().reshape(1, 1).expand(groups, self.n_group).contiguous()
        # The whole weight prepared once; the per-group weights are views of it (in the sm90 layout, G
        # consecutive runs of row groups: the stacked layout the grouped op reads).
        self._weight_scale_2 = linear.weight_scale_2
        self.prepared_whole = prepare_weight(linear.weight, linear.weight_scale, linear.weight_scale_2)
        self.prepared = [self._group_view(g) for g in range(groups)]
        self._diagonal = torch.arange(groups, device=linear.weight.device)
        self._offsets: dict = {}

    @property
    def grouped_kernel(self) -> bool:
        return self.prepared_whole.layout == LAYOUT_SM90 and self.n_group % 16 == 0

    def _group_view(self, g: int) -> PreparedWeight:
        p, n = self.prepared_whole, self.n_group
        if p.layout == LAYOUT_SM90 and n % 16 == 0:
            rg = n // 16
            return PreparedWeight(p.weight[g * rg:(g + 1) * rg], p.block_scale[g * rg:(g + 1) * rg], p.alpha[g * n:(g + 1) * n], n, p.k, (n,), p.layout)
        return prepare_weight(self.weight[g], self.weight_scale[g], self._weight_scale_2)

    def _check(self, x: torch.Tensor) -> None:
        _check_grouped_input(x, self.groups, self.k, self.name)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return reference_grouped_gemm(x, self.weight, self.weight_scale, self.alpha)

    def forward_loop(self, x: torch.Tensor) -> torch.Tensor:
        """One :func:`nvfp4_linear` per group (x is regrouped to [G, T, K] once so each slice is contiguous)."""
        self._check(x)
        by_group = x.transpose(0, 1).contiguous()
        return torch.stack([nvfp4_linear(by_group[g], self.prepared[g]) for g in range(self.groups)], dim=1)

    def forward_grouped(self, x: torch.Tensor) -> torch.Tensor:
        """All groups through the grouped op (sm90 layout only): x regrouped to [G*T, K] (group-major
        rows, offsets g*T), one launch of the grouped kernel for T <= 64 or under graph capture."""
        self._check(x)  # (the module-level import of ops.moe registered the op)
        if not self.grouped_kernel:
            raise RuntimeError(f"{self.name}: the grouped op needs the sm90 layout with N_g a multiple of 16 (layout {self.prepared_whole.layout!r})")
        tokens, p = x.shape[0], self.prepared_whole
        offsets = self._offsets.get(tokens)
        if offsets is None:
            offsets = self._offsets[tokens] = torch.arange(self.groups + 1, device=x.device, dtype=torch.int32) * tokens
        stacked = x.transpose(0, 1).reshape(self.groups * tokens, self.k)
        y = torch.ops.nvfp4lib.grouped_gemm_w4a16_sm90(
            stacked, offsets, p.weight.view(self.groups, -1, *p.weight.shape[1:]), p.block_scale.view(self.groups, -1, *p.block_scale.shape[1:]),
            p.alpha.view(self.groups, self.n_group), self.n_group, max(tokens, 1), None)
        return y.view(self.groups, tokens, self.n_group).transpose(0, 1)

    def forward_wgmma(self, x: torch.Tensor) -> torch.Tensor:
        """All groups in one launch of the batched WGMMA kernel (sm90 layout; K a multiple of 256): x [T, G, K]
        read in place, y [T, G, N_g] written in place. Capturable (its tile table is static per T)."""
        from ..kernels.sm90 import gemm_wgmma

        self._check(x)
        p = self.prepared_whole
        return gemm_wgmma.run_batched_wgmma(x.contiguous(), p.weight.view(self.groups, -1, *p.weight.shape[1:]),
                                            p.block_scale.view(self.groups, -1, *p.block_scale.shape[1:]),
                                            p.alpha.view(self.groups, self.n_group), self.n_group)

    @property
    def wgmma_kernel(self) -> bool:
        """True when :meth:`forward_wgmma` can run: the sm90 layout, K a multiple of 256, CuTeDSL installed."""
        from ..ops.gemm import wgmma_takes

        return self.grouped_kernel and self.n_group % 2 == 0 and wgmma_takes(self.k)

    def forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        """Prefill (sm90 layout): the whole weight dequantized to bf16 in ONE kernel (alpha folded in, as
        the dense GEMM path does), then one cuBLAS batched GEMM over the groups. Capturable (no host reads)."""
        from ..kernels.sm90.gemm_prefill import dequantize_to_bf16

        self._check(x)
        p = self.prepared_whole
        weight = dequantize_to_bf16(p.weight, p.block_scale, p.alpha, p.n).view(self.groups, self.n_group, self.k)
        return torch.bmm(x.transpose(0, 1), weight.transpose(1, 2)).transpose(0, 1)

    def forward_diagonal(self, x: torch.Tensor) -> torch.Tensor:
        """All groups' rows in one GEMM against the whole weight; block (g, g) of the [G*T, G*N_g] product
        is group g's output (the off-diagonal blocks are computed and dropped)."""
        self._check(x)
        tokens = x.shape[0]
        stacked = x.transpose(0, 1).reshape(self.groups * tokens, self.k)  # row g*T + t
        full = nvfp4_linear(stacked, self.prepared_whole).view(self.groups, tokens, self.groups, self.n_group)
        return full[self._diagonal, :, self._diagonal, :].transpose(0, 1)  # [G, T, N_g] -> [T, G, N_g]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return self.forward_reference(x)
        if not self.grouped_kernel:
            return self.forward_loop(x)
        # the grouped decode kernel up to 64 tokens, the batched WGMMA kernel up to BATCHED_WGMMA_MAX_T, above
        # it one dequantization of the whole weight and one bmm
        if x.shape[0] <= GROUPED_KERNEL_MAX_ROWS:
            return self.forward_grouped(x)
        if x.shape[0] <= BATCHED_WGMMA_MAX_T and self.wgmma_kernel:
            return self.forward_wgmma(x)
        return self.forward_batched(x)


def quantize_fp8_activations(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor FP8: E4M3(clamp(x / input_scale, +-448)), x any float dtype, same shape."""
    return torch.clamp(x.float() / input_scale.float(), -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


class GroupedFP8Projection(_PreparedModule):
    """wo_a in the ModelOpt FP8 per-tensor format: o [T, G, K_g] bf16 -> [T, G, N_g] bf16.

    activations="fp8" (default, W8A8 with the checkpoint's static ``input_scale``):
    y = (E4M3(x / input_scale) @ W_fp8^T) * (input_scale * weight_scale); ``torch._scaled_mm`` per group
    on a GPU, the same products in fp32 on a CPU. activations="bf16": weight-only, y = x @ (W * scale)^T.
    :meth:`forward_scaled_mm` is the GPU path; it also runs on a CPU (torch's CPU ``_scaled_mm``), which
    is how the tests check its layouts against :meth:`forward_reference`.
    """

    def __init__(self, linear: FP8Linear, groups: int, activations: str = "fp8", device=None):
        super().__init__()
        linear = _to_device(linear, device)
        if activations not in ("fp8", "bf16"):
            raise ValueError(f"activations must be 'fp8' or 'bf16', got {activations!r}")
        if activations == "fp8" and linear.input_scale is None:
            raise ValueError(f"{linear.prefix}.input_scale: missing, W8A8 needs the static activation scale")
        if linear.n % groups:
            raise ValueError(f"{linear.prefix}: N={linear.n} rows do not split into {groups} groups")
        self.name, self.groups, self.activations = linear.prefix, groups, activations
        self.n_group, self.k = linear.n // groups, linear.k
        self.weight = linear.weight.view(groups, self.n_group, self.k)
        self.weight_scale = linear.weight_scale.float().reshape(())
        self.input_scale = None if linear.input_scale is None else linear.input_scale.float().reshape(())

    def _check(self, x: torch.Tensor) -> None:
        _check_grouped_input(x, self.groups, self.k, self.name)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        if self.activations == "bf16":
            acc = torch.einsum("tgk,gnk->tgn", x.float(), self.weight.float()) * self.weight_scale
        else:
            x_fp8 = quantize_fp8_activations(x, self.input_scale)
            acc = torch.einsum("tgk,gnk->tgn", x_fp8.float(), self.weight.float()) * (self.input_scale * self.weight_scale)
        return acc.to(torch.bfloat16)

    def forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        if self.activations == "bf16":
            decoded = (self.weight.float() * self.weight_scale).to(torch.bfloat16)
            return torch.bmm(x.transpose(0, 1), decoded.transpose(1, 2)).transpose(0, 1)
        x_fp8 = quantize_fp8_activations(x, self.input_scale).transpose(0, 1).contiguous()
        outs = [torch._scaled_mm(x_fp8[g], self.weight[g].t(), scale_a=self.input_scale, scale_b=self.weight_scale, out_dtype=torch.bfloat16) for g in range(self.groups)]
        return torch.stack(outs, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_scaled_mm(x) if x.is_cuda else self.forward_reference(x)


class AttentionProjections(_PreparedModule):
    """The four projections of one DeepSeek-V4 attention layer, built from a checkpoint.

    ``project_in(x [T, hidden]) -> (q [T, n_heads*head_dim], kv [T, head_dim])`` runs fused_wqa_wkv then
    wq_b on the q latent (the model's q RMSNorm in between is not applied here);
    ``project_out(o [T, n_heads*head_dim]) -> [T, hidden]`` runs wo_a (grouped) then wo_b.
    """

    def __init__(self, fused_wqa_wkv: FusedWqaWkv, wq_b: NVFP4Projection, wo_a: nn.Module, wo_b: NVFP4Projection):
        super().__init__()
        self.fused_wqa_wkv, self.wq_b, self.wo_a, self.wo_b = fused_wqa_wkv, wq_b, wo_a, wo_b

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, layer: int, dims: Optional[DSV4Dims] = None, strategy: str = DEFAULT_STRATEGY, device=None) -> "AttentionProjections":
        """Read and validate layer ``layer``'s attention linears (shapes from ``dims`` or config.json)."""
        if dims is None:
            if checkpoint.model_config is None:
                raise ValueError(f"{checkpoint.directory}: no config.json, pass dims")
            dims = DSV4Dims.from_model_config(checkpoint.model_config)
        shapes = dims.shapes()
        name = lambda linear: f"layers.{layer}.{linear}"  # noqa: E731
        fused = FusedWqaWkv(checkpoint.nvfp4_linear(name(WQ_A), shapes[WQ_A]), checkpoint.nvfp4_linear(name(WKV), shapes[WKV]), strategy, device)
        wq_b = NVFP4Projection(checkpoint.nvfp4_linear(name(WQ_B), shapes[WQ_B]), device)
        if checkpoint.linear_format(name(WO_A)) == "fp8":
            wo_a = GroupedFP8Projection(checkpoint.fp8_linear(name(WO_A), shapes[WO_A]), dims.o_groups, device=device)
        else:
            wo_a = GroupedNVFP4Projection(checkpoint.nvfp4_linear(name(WO_A), shapes[WO_A]), dims.o_groups, device)
        wo_b = NVFP4Projection(checkpoint.nvfp4_linear(name(WO_B), shapes[WO_B]), device)
        return cls(fused, wq_b, wo_a, wo_b)

    def project_in(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        q_latent, kv = self.fused_wqa_wkv(x)
        return self.wq_b(q_latent.contiguous()), kv

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        groups = self.wo_a.groups
        z = self.wo_a(o.reshape(o.shape[0], groups, -1))
        return self.wo_b(z.reshape(o.shape[0], -1))


def wo_a_format_errors(weight: torch.Tensor, x: torch.Tensor, groups: int, names: Sequence[str] = ("nvfp4", "fp8 W8A8", "fp8 weight-only")) -> list:
    """Accuracy of wo_a's two checkpoint formats against the bf16 original.

    weight: bf16 [G*N_g, K_g] original; x: bf16 [T, G, K_g]. Quantizes the weight both ways
    (ModelOpt recipes, :mod:`nvfp4lib.synthetic`), runs each module's forward on x's device and returns
    rows {format, rel_err, cosine} against the fp32 product with the original weight.
    """
    from ..synthetic import quantize_fp8_linear, quantize_nvfp4_linear

    device = x.device
    reference = torch.einsum("tgk,gnk->tgn", x.float(), weight.float().view(groups, -1, x.shape[-1]))
    input_amax = float(x.float().abs().amax())
    modules = (
        GroupedNVFP4Projection(quantize_nvfp4_linear("wo_a", weight, input_amax), groups, device),
        GroupedFP8Projection(quantize_fp8_linear("wo_a", weight, input_amax), groups, "fp8", device),
        GroupedFP8Projection(quantize_fp8_linear("wo_a", weight, input_amax), groups, "bf16", device),
    )
    rows = []
    for label, module in zip(names, modules):
        out = module(x).float()
        rel = float((out - reference).norm() / reference.norm())
        cos = float(torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0))
        rows.append({"format": label, "rel_err": rel, "cosine": cos})
    return rows

"""DeepSeek-V4's shared expert over the NVFP4 W4A16 GEMM: ``down(swiglu_clamped(gate_up(x)))``.

Shapes (DeepSeek-V4-Pro; T tokens; bf16 activations, row-major):

- gate_up  x [T, 7168] -> [T, 6144]: one GEMM over the fused weight ``[w1; w3]`` ([3072 + 3072, 7168]);
  each half keeps its own ``weight_scale_2`` as the per-column alpha (exact even when the two differ).
- clamped SwiGLU  [T, 6144] -> [T, 3072]: ``silu(min(gate, limit)) * clamp(up, -limit, limit)`` with
  ``swiglu_limit`` = 10 (gate clamped above only, up on both sides), computed in fp32, rounded to bf16.
- down  [T, 3072] -> [T, 7168].

Checkpoint names (the DeepSeek-V4 checkpoint, as :mod:`nvfp4lib.synthetic` writes them):
``<prefix>.w1`` (gate), ``<prefix>.w3`` (up), ``<prefix>.w2`` (down), each with ``.weight``,
``.weight_scale``, ``.weight_scale_2`` (and optionally ``.input_scale``, unused: W4A16 keeps the
activations in bf16); ``prefix`` is ``layers.<i>.ffn.shared_experts``.

Dispatch, honestly: the GEMMs are :func:`nvfp4lib.ops.gemm.nvfp4_linear` (exact reference on a CPU, the
CuTeDSL sm_90 kernels on a Hopper GPU). gate_up and the SwiGLU go through the fused op
``torch.ops.nvfp4lib.gemm_w4a16_swiglu(x [M, K], prepared.weight, prepared.block_scale, prepared.alpha,
n=2I, limit) -> bf16 [M, I]`` whenever the GEMM package registers it and x is on a GPU
(:attr:`SharedExpert.fused`): on Hopper with M <= 64 the decode kernel applies the SwiGLU to its fp32
accumulators (one bf16 rounding, the [M, 2I] intermediate never reaches memory); otherwise the op runs the
GEMM then the SwiGLU. On a CPU the module composes the GEMM (rounded to bf16) and the SwiGLU in fp32.
:func:`reference_shared_expert` is the fp32 reference both are tested against.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from ..checkpoint import Checkpoint, NVFP4Linear, validate_nvfp4_linear
from ..formats import dequantize
from ..ops.gemm import PreparedWeight, nvfp4_linear, prepare_weight

SWIGLU_LIMIT = 10.0
GATE_NAME, UP_NAME, DOWN_NAME = "w1", "w3", "w2"


def shared_expert_prefix(layer: int) -> str:
    """The checkpoint prefix of layer ``layer``'s shared expert."""
    return f"layers.{layer}.ffn.shared_experts"


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: Optional[float] = SWIGLU_LIMIT) -> torch.Tensor:
    """fp32 ``silu(min(gate, limit)) * clamp(up, -limit, limit)`` (no clamp when limit is None)."""
    gate, up = gate.float(), up.float()
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return torch.nn.functional.silu(gate) * up


def _fused_op():
    """The fused gate_up + clamped SwiGLU op when the GEMM package provides it, else None."""
    return getattr(torch.ops.nvfp4lib, "gemm_w4a16_swiglu", None) if hasattr(torch.ops, "nvfp4lib") else None


def _check_linears(gate: NVFP4Linear, up: NVFP4Linear, down: NVFP4Linear) -> int:
    """The intermediate size; ValueError naming the mismatch otherwise."""
    if gate.n != up.n or gate.k != up.k:
        raise ValueError(f"gate {gate.prefix} is [{gate.n}, {gate.k}] but up {up.prefix} is [{up.n}, {up.k}]: they must match")
    if down.k != gate.n:
        raise ValueError(f"down {down.prefix} has K={down.k} but the intermediate size (gate rows) is {gate.n}")
    if down.n != gate.k:
        raise ValueError(f"down {down.prefix} has N={down.n} but the hidden size (gate K) is {gate.k}")
    return gate.n


def _on(linear: NVFP4Linear, device) -> NVFP4Linear:
    if device is None:
        return linear
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return NVFP4Linear(linear.prefix, move(linear.weight), move(linear.weight_scale), move(linear.weight_scale_2), move(linear.input_scale))


def prepare_gate_up(gate: NVFP4Linear, up: NVFP4Linear) -> PreparedWeight:
    """The fused gate_up weight [2I, K]: rows of gate then up, each half with its own global scale."""
    weight = torch.cat([gate.weight, up.weight])
    scale = torch.cat([gate.weight_scale, up.weight_scale])
    return prepare_weight(weight, scale, [gate.weight_scale_2, up.weight_scale_2], segment_sizes=[gate.n, up.n])


class SharedExpert(nn.Module):
    """x [..., hidden] bf16 -> [..., hidden] bf16 (see the module docstring).

    Build it with :meth:`from_checkpoint`, :meth:`from_tensors` or from three :class:`NVFP4Linear`;
    the prepared weights live on the device of the tensors (or ``device``), ``.to()`` is refused.
    """

    def __init__(self, gate: NVFP4Linear, up: NVFP4Linear, down: NVFP4Linear, swiglu_limit: Optional[float] = SWIGLU_LIMIT, device=None):
        super().__init__()
        gate, up, down = _on(gate, device), _on(up, device), _on(down, device)
        self.intermediate = _check_linears(gate, up, down)
        self.hidden = gate.k
        self.swiglu_limit = swiglu_limit
        self.names = (gate.prefix, up.prefix, down.prefix)
        self.gate_up: PreparedWeight = prepare_gate_up(gate, up)
        self.down: PreparedWeight = prepare_weight(down.weight, down.weight_scale, down.weight_scale_2)

    def _apply(self, *args, **kwargs):
        raise RuntimeError("SharedExpert holds prepared NVFP4 weights for one device: build it from tensors on the target device instead of moving it")

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str, swiglu_limit: Optional[float] = SWIGLU_LIMIT, device=None) -> "SharedExpert":
        """From checkpoint tensors by full name (``<prefix>.w1.weight`` ...), validated."""
        linears = [validate_nvfp4_linear(f"{prefix}.{name}", tensors, require_input_scale=False) for name in (GATE_NAME, UP_NAME, DOWN_NAME)]
        return cls(*linears, swiglu_limit=swiglu_limit, device=device)

    @classmethod
    def from_checkpoint(cls, checkpoint, layer: int = 0, prefix: Optional[str] = None, swiglu_limit: Optional[float] = SWIGLU_LIMIT, device=None) -> "SharedExpert":
        """From a :class:`~nvfp4lib.checkpoint.Checkpoint` (or its directory): layer ``layer``'s shared
        expert, or the linears under ``prefix``."""
        if not isinstance(checkpoint, Checkpoint):
            checkpoint = Checkpoint(checkpoint)
        prefix = prefix or shared_expert_prefix(layer)
        linears = [checkpoint.nvfp4_linear(f"{prefix}.{name}", require_input_scale=False) for name in (GATE_NAME, UP_NAME, DOWN_NAME)]
        return cls(*linears, swiglu_limit=swiglu_limit, device=device)

    @property
    def fused(self) -> bool:
        """True when the gate_up GEMM runs with the SwiGLU in its epilogue (GPU op present)."""
        return _fused_op() is not None and self.gate_up.weight.is_cuda

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 [..., I]: the clamped SwiGLU of the gate_up GEMM."""
        op = _fused_op()
        if op is not None and x.is_cuda:
            lead = x.shape[:-1]
            p = self.gate_up
            limit = float("inf") if self.swiglu_limit is None else float(self.swiglu_limit)
            h = op(x.reshape(-1, self.hidden), p.weight, p.block_scale, p.alpha, p.n, limit)
            return h.reshape(*lead, self.intermediate)
        h = nvfp4_linear(x, self.gate_up)
        gate, up = h.split(self.intermediate, dim=-1)
        return clamped_swiglu(gate, up, self.swiglu_limit).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            raise ValueError(f"shared expert: x must be bf16, got {x.dtype}")
        if x.shape[-1] != self.hidden:
            raise ValueError(f"shared expert: x has {x.shape[-1]} features, the weights expect hidden={self.hidden}")
        return nvfp4_linear(self.activation(x), self.down)

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


def reference_shared_expert(x: torch.Tensor, gate: NVFP4Linear, up: NVFP4Linear, down: NVFP4Linear, swiglu_limit: Optional[float] = SWIGLU_LIMIT, weights=None) -> torch.Tensor:
    """The fp32 reference over the dequantized weights (each with its own global scale), rounded to bf16
    where the module rounds: after gate_up, after the SwiGLU, after down. ``weights``: the original
    (e.g. bf16) [gate, up, down] weights instead, to measure the quantization error."""
    if weights is None:
        weights = [dequantize(l.weight, l.weight_scale, l.weight_scale_2, torch.float32) for l in (gate, up, down)]
    wg, wu, wd = (w.float().to(x.device) for w in weights)
    xf = x.float()
    g = (xf @ wg.t()).to(torch.bfloat16)
    u = (xf @ wu.t()).to(torch.bfloat16)
    a = clamped_swiglu(g, u, swiglu_limit).to(torch.bfloat16)
    return (a.float() @ wd.t()).to(torch.bfloat16)

"""torch.library ops for activation scale assembly (namespace ``nvfp4lib``), with fake implementations.

- ``nvfp4lib::assemble_scales(Tensor x, Tensor? input_scale) -> (packed, swizzled_scale, global_scale)``
  x bf16 [M, K]; input_scale fp32 [] or None (dynamic) -> uint8 [M, K/2], e4m3 [Mp*K16p], fp32 [].
- ``nvfp4lib::assemble_scales_grouped(Tensor x, Tensor offsets, Tensor? input_scale, int capacity)
  -> (packed, swizzled_scale, padded_offsets, global_scales)``
  x bf16 [M, K]; offsets int [E+1]; input_scale fp32 [] / [E] or None -> uint8 [M, K/2],
  e4m3 [R*K16p] with R = grouped_scale_rows(M, E, capacity), int32 [E+1], fp32 [E].

Output sizes depend only on input sizes, so ``torch.compile(fullgraph=True)`` traces the ops and a
CUDA graph can capture them. The real implementations (:mod:`nvfp4lib.scales`) run the CuTeDSL kernel
on sm_90 / sm_100 and the exact torch reference elsewhere; they read no tensor values on the host.
Use the wrappers :func:`nvfp4lib.scales.assemble_scales` / ``assemble_scales_grouped``: they add the
eager-mode value checks.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..formats import BLOCK_SIZE
from ..layout import padded_scale_cols, swizzled_size
from .. import scales as _scales


@torch.library.custom_op("nvfp4lib::assemble_scales", mutates_args=())
def assemble_scales_op(x: torch.Tensor, input_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    packed, swizzled, global_scale = _scales.assemble_impl(x, input_scale)
    return packed, swizzled, global_scale


@assemble_scales_op.register_fake
def _(x, input_scale):
    m, k = x.shape
    return (
        x.new_empty((m, k // 2), dtype=torch.uint8),
        x.new_empty((swizzled_size(m, k // BLOCK_SIZE),), dtype=torch.float8_e4m3fn),
        x.new_empty((), dtype=torch.float32),
    )


@torch.library.custom_op("nvfp4lib::assemble_scales_grouped", mutates_args=())
def assemble_scales_grouped_op(x: torch.Tensor, offsets: torch.Tensor, input_scale: Optional[torch.Tensor], capacity: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    result = _scales.assemble_grouped_impl(x, offsets, input_scale, capacity)
    return tuple(result)


@assemble_scales_grouped_op.register_fake
def _(x, offsets, input_scale, capacity):
    m, k = x.shape
    num_groups = offsets.shape[0] - 1
    rows = _scales.grouped_scale_rows(m, num_groups, capacity)
    return (
        x.new_empty((m, k // 2), dtype=torch.uint8),
        x.new_empty((rows * padded_scale_cols(k // BLOCK_SIZE),), dtype=torch.float8_e4m3fn),
        x.new_empty((num_groups + 1,), dtype=torch.int32),
        x.new_empty((num_groups,), dtype=torch.float32),
    )

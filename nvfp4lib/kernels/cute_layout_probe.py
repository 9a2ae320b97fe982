"""Read the block-scale layout that CuTeDSL itself builds, without a GPU, to check ours against it.

``cutlass.utils.blockscaled_layout.tile_atom_to_shape_SF((M, K, L), 16)`` is the layout a Blackwell
block-scaled GEMM uses for the scales of a K-major NVFP4 operand. For static shapes it is a static
layout: we trace a tiny ``@cute.jit`` function (compiled, never run), take its shape and stride, and
evaluate the layout for every (row, scale column) on the host.
"""
from __future__ import annotations

import torch

from .cute_compile import import_cute


def _flatten(shape, stride):
    if isinstance(shape, tuple):
        pairs = []
        for sub_shape, sub_stride in zip(shape, stride):
            pairs += _flatten(sub_shape, sub_stride)
        return pairs
    return [(int(shape), int(stride))]


def _mode_offset(coord: torch.Tensor, shape, stride) -> torch.Tensor:
    """CuTe's colexicographic coordinate-to-index for one (possibly nested) mode."""
    offset = torch.zeros_like(coord)
    for extent, step in _flatten(shape, stride):
        offset += (coord % extent) * step
        coord = coord // extent
    return offset


def cutedsl_sf_layout(m: int, k: int):
    """(shape, stride) of CuTeDSL's scale-factor layout for a K-major NVFP4 operand of m x k elements."""
    _, cute = import_cute()
    from cutlass.utils import blockscaled_layout

    captured = {}

    @cute.jit
    def trace():
        layout = blockscaled_layout.tile_atom_to_shape_SF((m, k, 1), 16)
        captured["shape"], captured["stride"] = layout.shape, layout.stride

    cute.compile(trace)
    return captured["shape"], captured["stride"]


def cute_scale_offsets(m: int, k: int) -> torch.Tensor:
    """int64 [m, k/16]: the offset CuTeDSL's layout gives the scale of (row, scale column)."""
    shape, stride = cutedsl_sf_layout(m, k)
    rows, cols = torch.meshgrid(torch.arange(m), torch.arange(k // 16) * 16, indexing="ij")
    return _mode_offset(rows, shape[0], stride[0]) + _mode_offset(cols, shape[1], stride[1])

"""The 128x4 block-scale layout that Blackwell block-scaled MMA (tcgen05) and cuBLAS read.

Block scales ``sf[m, kb]`` (row m, scale column kb = k // 16) are stored in 512-byte *atoms* of 128 rows
x 4 scale columns. Inside an atom, row m sits at ``(m % 32) * 16 + ((m % 128) // 32) * 4`` and column
``kb % 4`` adds ``kb % 4``: the four 32-row groups of an atom interleave, so one 16-byte line holds the 4
scale columns of 4 rows 32 apart. Atoms are laid out K-major: all atoms of one 128-row band, left to
right, then the next band. Rows are padded to a multiple of 128 and scale columns to a multiple of 4;
the padding is zero (uninitialised padding has produced NaN in a serving engine, vLLM #30260).

The same layout is torchao's ``to_blocked`` and CuTeDSL's ``BlockScaledBasicChunk`` for a K-major
operand (atom shape ((32, 4), (16, 4)), stride ((16, 4), (0, 1)) in units of elements per 16-wide block).
"""
from __future__ import annotations

import torch

ATOM_ROWS = 128
ATOM_COLS = 4
ATOM_BYTES = ATOM_ROWS * ATOM_COLS  # 512
ROW_GROUP = 32  # rows of one 32-row group inside an atom


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def padded_rows(m: int) -> int:
    """Rows of the swizzled buffer for m rows: the next multiple of 128."""
    return ceil_div(m, ATOM_ROWS) * ATOM_ROWS


def padded_scale_cols(k16: int) -> int:
    """Scale columns of the swizzled buffer for k16 = K/16 columns: the next multiple of 4."""
    return ceil_div(k16, ATOM_COLS) * ATOM_COLS


def swizzled_size(m: int, k16: int) -> int:
    """Elements (bytes) of one swizzled scale matrix of m rows and k16 scale columns."""
    return padded_rows(m) * padded_scale_cols(k16)


def scale_offset(m, kb, k16: int):
    """Byte offset of scale (row m, scale column kb) in the swizzled buffer of a matrix with k16 = K/16
    scale columns. Works on ints and on integer tensors (elementwise).

    ((m // 128) * ceil(k16 / 4) + kb // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + kb % 4
    """
    atoms_per_band = ceil_div(k16, ATOM_COLS)
    atom = (m // ATOM_ROWS) * atoms_per_band + kb // ATOM_COLS
    return atom * ATOM_BYTES + (m % ROW_GROUP) * 16 + ((m % ATOM_ROWS) // ROW_GROUP) * 4 + kb % ATOM_COLS


def _check_scale_matrix(sf: torch.Tensor) -> None:
    if not isinstance(sf, torch.Tensor) or sf.dim() not in (2, 3):
        shape = tuple(sf.shape) if isinstance(sf, torch.Tensor) else type(sf).__name__
        raise ValueError(f"block scales must be [M, K/16] or [L, M, K/16], got {shape}")
    if sf.element_size() != 1:
        raise ValueError(f"block scales must be a 1-byte dtype (float8_e4m3fn or uint8), got {sf.dtype}")


def swizzle_scales(sf: torch.Tensor) -> torch.Tensor:
    """Row-major block scales -> the 128x4 swizzled layout.

    sf: [M, K/16] or [L, M, K/16], float8_e4m3fn (or uint8 bytes). Returns a flat tensor of the same
    dtype, [Mp * K16p] or [L, Mp * K16p] with Mp = ceil(M/128)*128 and K16p = ceil(K16/4)*4; element
    ``scale_offset(m, kb, K16)`` holds ``sf[m, kb]`` and every padding byte is zero.
    """
    _check_scale_matrix(sf)
    batched = sf.dim() == 3
    sf3 = sf if batched else sf.unsqueeze(0)
    batch, m, k16 = sf3.shape
    mp, k16p = padded_rows(m), padded_scale_cols(k16)
    padded = sf3
    if (mp, k16p) != (m, k16):
        padded = torch.zeros((batch, mp, k16p), dtype=sf.dtype, device=sf.device)
        padded[:, :m, :k16] = sf3
    # rows m = band*128 + group*32 + row; cols kb = atom*4 + col  ->  order (band, atom, row, group, col)
    atoms = padded.view(batch, mp // ATOM_ROWS, 4, ROW_GROUP, k16p // ATOM_COLS, ATOM_COLS)
    swizzled = atoms.permute(0, 1, 4, 3, 2, 5).reshape(batch, mp * k16p)
    return swizzled if batched else swizzled[0]


def unswizzle_scales(swizzled: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """Invert :func:`swizzle_scales`: the swizzled buffer of a matrix with m rows and K = k elements per
    row (k a multiple of 16, so k // 16 scale columns) -> row-major scales [m, k/16] (or [L, m, k/16]
    for a [L, n] buffer), padding dropped.
    """
    if k % 16 != 0:
        raise ValueError(f"k is the number of elements per row and must be a multiple of 16, got {k}")
    k16 = k // 16
    mp, k16p = padded_rows(m), padded_scale_cols(k16)
    batched = swizzled.dim() == 2
    flat = swizzled if batched else swizzled.unsqueeze(0)
    if flat.dim() != 2 or flat.shape[1] != mp * k16p:
        raise ValueError(
            f"swizzled buffer of shape {tuple(swizzled.shape)} does not hold m={m}, k={k}: "
            f"expected {mp * k16p} bytes per matrix ({mp} rows x {k16p} scale columns after padding)"
        )
    atoms = flat.reshape(flat.shape[0], mp // ATOM_ROWS, k16p // ATOM_COLS, ROW_GROUP, 4, ATOM_COLS)
    rows = atoms.permute(0, 1, 4, 3, 2, 5).reshape(flat.shape[0], mp, k16p)[:, :m, :k16]
    return rows if batched else rows[0]

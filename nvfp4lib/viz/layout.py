"""Pictures of the 128x4 block-scale layout (notebook 01)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..layout import ATOM_ROWS, ATOM_COLS, ROW_GROUP, ceil_div, padded_rows, padded_scale_cols, scale_offset

GROUP_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759")  # one per 32-row group of an atom


def atom_byte_map() -> np.ndarray:
    """[32, 16] array: entry (line, byte) is the row m (0..127) stored at byte line*16 + byte of one atom;
    the scale column is byte % 4."""
    rows, cols = np.meshgrid(np.arange(ATOM_ROWS), np.arange(ATOM_COLS), indexing="ij")
    offsets = scale_offset(rows, cols, ATOM_COLS)
    byte_to_row = np.empty(ATOM_ROWS * ATOM_COLS, dtype=np.int64)
    byte_to_row[offsets.ravel()] = rows.ravel()
    return byte_to_row.reshape(32, 16)


def plot_atom(ax=None, annotate: bool = True):
    """The 512 bytes of one atom as 32 lines of 16 bytes, each coloured by the 32-row group of the scale
    it holds and labelled 'row,col'."""
    ax = ax or plt.subplots(figsize=(12, 9))[1]
    rows = atom_byte_map()
    group = rows // ROW_GROUP
    colours = np.array([plt.matplotlib.colors.to_rgb(c) for c in GROUP_COLOURS])
    ax.imshow(colours[group], aspect="auto")
    if annotate:
        for line in range(32):
            for byte in range(16):
                ax.text(byte, line, f"{rows[line, byte]},{byte % 4}", ha="center", va="center", fontsize=5.5, color="white")
    ax.set_xticks(range(16))
    ax.set_xlabel("byte within the 16-byte line  (byte % 4 = scale column kb % 4; byte // 4 = 32-row group)")
    ax.set_ylabel("16-byte line = row % 32")
    ax.set_title("One 512-byte atom: (row m, scale column kb) at each byte, coloured by 32-row group")
    handles = [plt.matplotlib.patches.Patch(color=c, label=f"rows {32 * i}-{32 * i + 31}") for i, c in enumerate(GROUP_COLOURS)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1))
    return ax


def plot_atom_order(m: int, k16: int, ax=None):
    """Each atom of an m x k16 scale matrix coloured (and, when few, labelled) by its position in memory."""
    ax = ax or plt.subplots(figsize=(10, 5))[1]
    bands, atoms = ceil_div(m, ATOM_ROWS), ceil_div(k16, ATOM_COLS)
    order = np.arange(bands * atoms).reshape(bands, atoms)
    image = ax.imshow(order, aspect="auto", cmap="viridis", interpolation="nearest")
    if bands * atoms <= 64:
        ax.set_xticks(range(atoms))
        ax.set_yticks(range(bands))
        for b in range(bands):
            for a in range(atoms):
                ax.text(a, b, str(order[b, a]), ha="center", va="center", color="white", fontsize=8)
    ax.set_xlabel(f"atom column (4 scale columns = 64 elements of K each), {atoms} in all")
    ax.set_ylabel(f"row band (128 rows), {bands} in all")
    ax.set_title(f"Atom order in memory for a {m} x {k16 * 16} tensor ({m} x {k16} scales): K-major")
    plt.colorbar(image, ax=ax, label="atom index (x 512 bytes)")
    return ax


def plot_padding_overhead(ms, k16: int, ax=None):
    """Fraction of the swizzled buffer that is padding, against the number of rows m."""
    ax = ax or plt.subplots(figsize=(8, 3.5))[1]
    ms = np.asarray(list(ms))
    total = np.array([padded_rows(int(m)) * padded_scale_cols(k16) for m in ms])
    ax.plot(ms, 1 - ms * k16 / total, drawstyle="steps-post")
    ax.set_xlabel("rows m (tokens for activations, N for weights)")
    ax.set_ylabel("padding fraction")
    ax.set_title(f"Padding in the swizzled buffer (K/16 = {k16}): rows round up to 128")
    ax.grid(alpha=0.3)
    return ax


def trace_scale(m: int, kb: int, k16: int) -> dict:
    """Where scale (m, kb) lives: its atom, line and byte, spelled out term by term."""
    atoms_per_band = ceil_div(k16, ATOM_COLS)
    terms = {
        "row band m//128": m // ATOM_ROWS,
        "atom column kb//4": kb // ATOM_COLS,
        "atom index": (m // ATOM_ROWS) * atoms_per_band + kb // ATOM_COLS,
        "line m%32 (x16 bytes)": m % ROW_GROUP,
        "32-row group (m%128)//32 (x4 bytes)": (m % ATOM_ROWS) // ROW_GROUP,
        "column in atom kb%4": kb % ATOM_COLS,
    }
    terms["byte offset"] = int(scale_offset(m, kb, k16))
    return terms


def decode_rows_from_swizzled(swizzled: torch.Tensor, rows: int, k16: int) -> torch.Tensor:
    """fp32 [rows, k16]: what a kernel reading the swizzled buffer sees for every (row, column), padding
    rows included (rows may exceed the tensor's real row count, up to the padded count)."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(k16), indexing="ij")
    return swizzled.view(torch.float8_e4m3fn)[scale_offset(r, c, k16)].float()

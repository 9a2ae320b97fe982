"""Pictures and tables for activation scale assembly (notebook 02)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..layout import ATOM_ROWS, padded_rows, padded_scale_cols, unswizzle_scales

GROUP_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7")
PADDING_COLOUR = "#d9d9d9"


def plot_single_pipeline(x: torch.Tensor, block_scale: torch.Tensor, swizzled: torch.Tensor, max_cols: int = 64):
    """Three panels for one group: |x| (first max_cols*16 columns), the row-major E4M3 block scales, and
    the same scales read back from the swizzled buffer over the padded [Mp, K16p] grid (padding grey).

    x: [M, K]; block_scale: e4m3 [M, K/16]; swizzled: e4m3 [Mp*K16p]."""
    m, k16 = block_scale.shape
    mp, k16p = padded_rows(m), padded_scale_cols(k16)
    cols = min(k16, max_cols)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw=dict(width_ratios=[2, 1, 1]))
    axes[0].imshow(x[:, : cols * 16].float().abs().log10().clamp(min=-4).numpy(), aspect="auto", cmap="magma")
    axes[0].set_title(f"log10 |x|   ({m} rows x {cols * 16} of {k16 * 16} columns)")
    axes[0].set_xlabel("element k")
    axes[0].set_ylabel("token row")
    scales = block_scale.float()[:, :cols].log2().numpy()
    axes[1].imshow(scales, aspect="auto", cmap="viridis")
    axes[1].set_title("log2 block scale (row-major)")
    axes[1].set_xlabel("scale column kb = k // 16")
    padded = unswizzle_scales(swizzled, mp, k16p * 16).float()[:, : max(cols, min(k16p, cols + 4))]
    image = np.ma.masked_where(padded.numpy() == 0, np.log2(np.where(padded.numpy() == 0, 1, padded.numpy())))
    axes[2].set_facecolor(PADDING_COLOUR)
    axes[2].imshow(image, aspect="auto", cmap="viridis")
    axes[2].axhline(m - 0.5, color="k", lw=1, ls="--")
    axes[2].set_title(f"read back from the swizzled buffer\n{mp} rows (grey: zero padding from row {m})")
    axes[2].set_xlabel("scale column")
    fig.tight_layout()
    return fig


def grouped_row_map(offsets, padded_offsets, total_rows: int) -> np.ndarray:
    """int [total_rows]: the group owning each scale row of the grouped buffer, -1 for padding."""
    owner = np.full(total_rows, -1)
    for e in range(len(offsets) - 1):
        rows = int(offsets[e + 1]) - int(offsets[e])
        start = int(padded_offsets[e])
        owner[start : start + rows] = e
    return owner


def plot_grouped_layout(offsets, padded_offsets, total_rows: int, ax=None):
    """Token rows (left, permuted by expert) and their scale rows in the grouped swizzled buffer (right):
    each group starts on a 128-row band; grey is zero padding up to the capacity bound."""
    offsets = [int(v) for v in offsets]
    padded_offsets = [int(v) for v in padded_offsets]
    m = offsets[-1]
    ax = ax or plt.subplots(figsize=(10, 5))[1]
    for e in range(len(offsets) - 1):
        colour = GROUP_COLOURS[e % len(GROUP_COLOURS)]
        rows = offsets[e + 1] - offsets[e]
        ax.add_patch(plt.Rectangle((0, offsets[e]), 1, rows, color=colour))
        ax.add_patch(plt.Rectangle((2, padded_offsets[e]), 1, rows, color=colour))
        if rows:
            ax.plot([1, 2], [offsets[e] + rows / 2, padded_offsets[e] + rows / 2], color=colour, lw=1)
            ax.text(0.5, offsets[e] + rows / 2, f"expert {e}\n{rows} rows", ha="center", va="center", fontsize=8, color="white")
        else:
            ax.text(-0.1, offsets[e], f"expert {e}: empty", ha="right", va="center", fontsize=8, color=colour)
        padding = padded_offsets[e + 1] - padded_offsets[e] - rows
        if padding > 0:
            ax.add_patch(plt.Rectangle((2, padded_offsets[e] + rows), 1, padding, color=PADDING_COLOUR))
    ax.add_patch(plt.Rectangle((2, padded_offsets[-1]), 1, total_rows - padded_offsets[-1], color=PADDING_COLOUR, hatch="//", fill=True))
    for band in range(0, total_rows + 1, ATOM_ROWS):
        ax.plot([2, 3], [band, band], color="k", lw=0.4)
    ax.set_xlim(-1.2, 3.2)
    ax.set_ylim(max(total_rows, m) + 10, -10)
    ax.set_xticks([0.5, 2.5])
    ax.set_xticklabels([f"token rows (M = {m})", f"scale rows of the buffer (R = {total_rows}, capacity bound)"])
    ax.set_ylabel("row")
    ax.set_title("MoE groups: every group's scales start on a 128-row band; padding (grey) is zero")
    return ax


def plot_amplification(sweeps: dict, ax=None):
    """Round-trip relative error against the scale mismatch factor, one line per cast; NaN results
    marked at the top. sweeps: {label: list of dicts from audit.amplification_sweep}."""
    ax = ax or plt.subplots(figsize=(9, 4.5))[1]
    nan_axis = ax.twinx()
    for (label, rows), marker in zip(sweeps.items(), "os^"):
        factors = np.array([r["factor"] for r in rows])
        errors = np.array([r["relative_error"] for r in rows])
        nan = np.isnan(errors)
        ax.loglog(factors[~nan], errors[~nan], marker=marker, label=f"{label}: relative error")
        if nan.any():
            ax.scatter(factors[nan], np.full(nan.sum(), 3.0), marker="x", color="red", zorder=5,
                       label=f"{label}: output holds NaN")
            nan_axis.semilogx(factors, [r["nan_fraction"] for r in rows], color="red", ls="--", lw=1,
                              label=f"{label}: NaN fraction (right axis)")
    nan_axis.set_ylabel("fraction of values NaN", color="red")
    nan_axis.set_ylim(0, 1.05)
    ax.axvline(3977, color="grey", ls=":", lw=1)
    nan_axis.text(3977, 0.5, "3977x ", color="grey", ha="right")
    ax.set_xlabel("mismatch factor: true amax / (6 * 448 * input_scale)")
    ax.set_ylabel("relative error of dequant(quant(x))")
    ax.set_title("A checkpoint input_scale that is too small")
    handles = ax.get_legend_handles_labels()
    nan_handles = nan_axis.get_legend_handles_labels()
    ax.legend(handles[0] + nan_handles[0], handles[1] + nan_handles[1], fontsize=8, loc="center right")
    ax.grid(True, which="both", alpha=0.3)
    return ax


def plot_padding_outputs(outputs: dict, valid_rows: int, ax=None):
    """NaN / Inf map of emulated block-scaled GEMM outputs [Mp, N], one panel per padding fill.
    outputs: {label: fp32 [Mp, N]}."""
    fig, axes = plt.subplots(1, len(outputs), figsize=(5 * len(outputs), 4), squeeze=False)
    for ax, (label, y) in zip(axes[0], outputs.items()):
        bad = (~torch.isfinite(y)).numpy()
        ax.imshow(bad, aspect="auto", cmap="Reds", vmin=0, vmax=1, interpolation="nearest")
        ax.axhline(valid_rows - 0.5, color="k", ls="--", lw=1)
        ax.set_title(f"{label}: {bad[:valid_rows].mean():.1%} of valid outputs NaN/Inf")
        ax.set_xlabel("output column n")
        ax.set_ylabel("row (dashed: end of real rows)")
    fig.tight_layout()
    return fig


def bandwidth_table(recorded: dict):
    """pandas DataFrame of recorded timings (case, M, K, mode, us, floor, fraction of copy bandwidth)."""
    import pandas as pd

    rows = []
    for r in recorded["timings"]:
        rows.append({
            "case": r["case"] + (f" ({r['groups']} experts)" if r.get("groups") else ""),
            "M": r["m"], "K": r["k"], "mode": r["mode"], "us / call": round(r["us"], 2),
            "HBM floor us": round(r["floor_us"], 2), "of copy bandwidth": f"{r['fraction_of_copy_bandwidth']:.1%}",
            "torch reference us": round(r["torch_reference_us"], 1) if r.get("torch_reference_us") else None,
        })
    return pd.DataFrame(rows)

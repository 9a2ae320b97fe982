"""Pictures of the MoE expert path (notebook 06): routing load, the grouped row layout, accuracy, recorded speed."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..layout import ATOM_ROWS

EMPTY_COLOUR = "#e15759"


def plot_routing_histogram(counts: torch.Tensor, ax=None, title: str = "Rows routed to each expert"):
    """Bar chart of rows per expert (counts int [E]); empty experts marked in red on the axis."""
    ax = ax or plt.subplots(figsize=(12, 3.5))[1]
    counts = counts.cpu().numpy()
    experts = np.arange(len(counts))
    ax.bar(experts, counts, color="#4e79a7")
    empty = experts[counts == 0]
    ax.scatter(empty, np.zeros_like(empty), marker="x", color=EMPTY_COLOUR, zorder=3, label=f"empty experts ({len(empty)})")
    ax.axhline(counts.mean(), color="grey", linestyle="--", linewidth=1, label=f"mean {counts.mean():.1f}")
    ax.set_xlabel("expert")
    ax.set_ylabel("rows (token, slot) pairs")
    ax.set_title(title)
    ax.legend(loc="upper right")
    return ax


def expert_of_tiles(padded_offsets: torch.Tensor, capacity_rows: int) -> np.ndarray:
    """int [capacity_rows / 128]: the expert each 128-row tile of the padded layout serves (-1: unused),
    the same search the grouped sm100 kernel does per CTA."""
    padded = padded_offsets.cpu().numpy()
    starts = np.arange(0, capacity_rows, ATOM_ROWS)
    expert = np.searchsorted(padded[1:], starts, side="right")
    expert[starts >= padded[-1]] = -1
    return expert


def plot_grouped_layout(offsets: torch.Tensor, padded_offsets: torch.Tensor, capacity_rows: int, ax=None):
    """Two bars, rows top to bottom: the expert-contiguous activation rows (offsets) and the padded
    scale rows (padded_offsets, each group rounded up to 128; hatched = zero padding; grey = capacity
    not used this step). Dotted lines: the 128-row tiles the grouped kernel assigns to CTAs."""
    ax = ax or plt.subplots(figsize=(7, 8))[1]
    offsets, padded = offsets.cpu().numpy(), padded_offsets.cpu().numpy()
    cmap = plt.get_cmap("tab20")
    for e in range(len(offsets) - 1):
        colour = cmap(e % 20)
        rows = offsets[e + 1] - offsets[e]
        if rows == 0:
            continue
        ax.add_patch(plt.Rectangle((0, offsets[e]), 1, rows, color=colour))
        ax.add_patch(plt.Rectangle((1.5, padded[e]), 1, rows, color=colour))
        pad = padded[e + 1] - padded[e] - rows
        if pad:
            ax.add_patch(plt.Rectangle((1.5, padded[e] + rows), 1, pad, facecolor="white", edgecolor=colour, hatch="///"))
        if rows >= 0.02 * capacity_rows:
            ax.text(0.5, offsets[e] + rows / 2, f"e{e}: {rows}", ha="center", va="center", fontsize=7)
    ax.add_patch(plt.Rectangle((1.5, padded[-1]), 1, capacity_rows - padded[-1], color="#dddddd"))
    for tile_start in range(0, capacity_rows + 1, ATOM_ROWS):
        ax.plot([1.45, 2.55], [tile_start, tile_start], color="black", linestyle=":", linewidth=0.6)
    ax.set_xlim(-0.2, 2.7)
    ax.set_ylim(capacity_rows, 0)
    ax.set_xticks([0.5, 2.0])
    ax.set_xticklabels(["activation rows\n(expert-contiguous)", f"scale rows, padded per group\n(capacity {capacity_rows})"])
    ax.set_ylabel("row")
    ax.set_title("Grouped layout: offsets vs padded scale offsets (128-row tiles dotted)")
    return ax


def plot_accuracy_scatter(out: torch.Tensor, reference: torch.Tensor, ax=None, label: str = "", max_points: int = 20000):
    """out against reference, one dot per element (subsampled), with the identity line."""
    ax = ax or plt.subplots(figsize=(4.5, 4.5))[1]
    x, y = reference.float().flatten().cpu(), out.float().flatten().cpu()
    if x.numel() > max_points:
        pick = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:max_points]
        x, y = x[pick], y[pick]
    ax.scatter(x.numpy(), y.numpy(), s=2, alpha=0.4)
    lim = float(max(x.abs().max(), y.abs().max()))
    ax.plot([-lim, lim], [-lim, lim], color="black", linewidth=0.8)
    ax.set_xlabel("reference")
    ax.set_ylabel("output")
    ax.set_title(label)
    return ax


def plot_recorded_speed(results: Sequence[dict], axes=None):
    """One panel per recorded MoE benchmark (``data/bench/moe_*.json``): for each case (decode, prefill)
    our time, cuBLAS BF16's and the HBM floor of the touched weights, log scale, with the issue's bound
    (1.5x floor for decode, cuBLAS / 0.9 for prefill) drawn as a tick. Titles name device and commit."""
    if axes is None:
        _, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
        axes = axes[0]
    for ax, result in zip(axes, results):
        rows = result["rows"]
        x = np.arange(len(rows))
        width = 0.27
        for i, (key, name, color) in enumerate((("time_us", "ours", "tab:blue"), ("cublas_bf16_us", "cuBLAS BF16", "tab:orange"),
                                                 ("floor_us", "HBM floor", "tab:gray"))):
            ax.bar(x + (i - 1) * width, [r[key] or 0 for r in rows], width, label=name, color=color)
        for xi, r in zip(x, rows):
            bound = 1.5 * r["floor_us"] if r["case"] == "decode" else (r["cublas_bf16_us"] / 0.9 if r["cublas_bf16_us"] else None)
            if bound:
                ax.hlines(bound, xi - 1.5 * width, xi + 1.5 * width, colors="black", linestyles="--",
                          label="target bound" if xi == 0 else None)
        ax.set_xticks(x, [f"{r['case']}\n{r['tokens']} tokens" for r in rows])
        ax.set_yscale("log")
        ax.set_ylabel("microseconds (lower is better)")
        ax.set_title(f"{result.get('device', '?')} @ {result.get('commit', '?')}", fontsize=10)
        ax.legend(fontsize=8)
    return axes


def plot_grouped_probe(result: dict, ax=None):
    """The recorded per-projection probe of the grouped WGMMA kernel (``data/bench/grouped_probe_*.json``,
    ``scripts/gpu/grouped_probe.py``): for gate_up and down over the MoE prefill routing, the cuBLAS BF16
    loop over experts, ``torch._grouped_mm`` (both on dequantized weights) and our one-launch kernel at each
    recorded (tile_n, cluster) variant, as achieved TFLOP/s (higher is better); gate_up also with the
    SwiGLU (ours fused in the epilogue, cuBLAS followed by the SwiGLU pass)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4.2))
    rows = result["rows"]
    series = [("cublas_loop_us", "cuBLAS BF16 loop", "tab:orange"), ("grouped_mm_us", "torch._grouped_mm bf16", "tab:red")]
    variants = sorted({k[len("wgmma_"):-len("_us")] for r in rows for k in r if k.startswith("wgmma_t") and k.endswith("_us")})
    blues = plt.cm.Blues(np.linspace(0.45, 0.9, max(1, len(variants))))
    series += [(f"wgmma_{v}_us", f"ours {v.replace('_', ' ')}", c) for v, c in zip(variants, blues)]
    series += [("cublas_loop_swiglu_us", "cuBLAS loop + SwiGLU pass", "tab:brown"), ("wgmma_swiglu_us", "ours + fused SwiGLU", "tab:green")]
    width = 0.8 / len(series)
    x = np.arange(len(rows))
    for i, (key, name, color) in enumerate(series):
        values = [r["flops"] / r[key] / 1e6 if r.get(key) else 0 for r in rows]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name, color=color)
    ax.set_xticks(x, [f"{r['shape']}\n[{r['n']}, {r['k']}] x {r['rows']} rows" for r in rows])
    ax.set_ylabel("TFLOP/s (higher is better)")
    ax.set_title(f"grouped GEMM per projection, {rows[0]['experts']} experts - recorded on {result.get('device', '?')} "
                 f"@ {result.get('commit', '?')}", fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    return ax

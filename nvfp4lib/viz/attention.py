"""Tables and plots for notebook 04 (attention projections, dual weight_scale_2, checkpoint audit, timings)."""
from __future__ import annotations

import glob
import os
import tempfile
from typing import List, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..bench.harness import load_recorded
from ..checkpoint import Checkpoint, CheckpointError, save_checkpoint
from ..dual_scale import STRATEGIES
from ..synthetic import WKV, WO_A, WO_B, WQ_A, WQ_B, DSV4Dims, repository_path

STRATEGY_LABELS = {
    "max": "(a) max of the two (vLLM 0.33)",
    "fold": "(b) fold ratio into E4M3 block scales",
    "segment_alpha": "(c) per-segment alpha (ours)",
}
STRATEGY_COLOURS = {"max": "#e15759", "fold": "#f28e2b", "segment_alpha": "#4e79a7"}
E4M3_MIN_NORMAL = 2.0**-6
E4M3_UNDERFLOW = 2.0**-10  # at or below this a product rounds to 0 (half the smallest subnormal 2**-9)


def projection_table(dims: DSV4Dims) -> List[dict]:
    """One row per attention projection: shape, sizes in bf16 and NVFP4, and where each scale lives."""
    shapes = dims.shapes()
    rows = []
    specs = (
        ("fused_wqa_wkv", (shapes[WQ_A][0] + shapes[WKV][0], dims.hidden), 1, "two: wq_a's and wkv's -> alpha[N] per segment"),
        ("wq_b", shapes[WQ_B], 1, "one -> alpha[N]"),
        ("wo_a", shapes[WO_A], dims.o_groups, f"one for all {dims.o_groups} groups -> alpha[N]"),
        ("wo_b", shapes[WO_B], 1, "one -> alpha[N]"),
    )
    for name, (n, k), groups, global_scales in specs:
        rows.append({
            "projection": name,
            "weight [N, K]": f"[{n}, {k}]" if groups == 1 else f"{groups} x [{n // groups}, {k}]",
            "bf16 MB": 2 * n * k / 1e6,
            "NVFP4 MB": (n * k / 2 + n * k / 16 + 4 * n) / 1e6,
            "weight (uint8)": f"[{n}, {k // 2}]",
            "weight_scale (e4m3, per 16)": f"[{n}, {k // 16}]",
            "weight_scale_2 (fp32)": global_scales,
        })
    return rows


def checkpoint_tensor_table(checkpoint: Checkpoint, prefix: str) -> List[dict]:
    """Name, dtype and shape of every tensor under ``prefix`` (read from the header only)."""
    return [{"tensor": name, "dtype": str(checkpoint.dtype(name)).replace("torch.", ""), "shape": list(checkpoint.shape(name))} for name in checkpoint.keys() if name.startswith(prefix + ".")]


def validation_showcase(directory: str, prefix: str) -> List[dict]:
    """Corrupt one tensor of linear ``prefix`` at a time (a copy in a temporary directory), read it back
    and return {corruption, error} rows: what :class:`Checkpoint` reports for each kind of damage."""
    source = Checkpoint(directory)
    tensors = {name: source.tensor(name) for name in source.keys()}

    def with_byte(name, value):
        raw = tensors[name].view(torch.uint8).clone()
        raw.view(-1)[7] = value
        return raw.view(torch.float8_e4m3fn)

    corruptions = {
        "weight_scale_2 = NaN": {f"{prefix}.weight_scale_2": torch.tensor(float("nan"))},
        "weight_scale_2 = 0": {f"{prefix}.weight_scale_2": torch.tensor(0.0)},
        "input_scale = -Inf": {f"{prefix}.input_scale": torch.tensor(float("-inf"))},
        "input_scale negative": {f"{prefix}.input_scale": torch.tensor(-0.5)},
        "NaN byte 0x7f in weight_scale": {f"{prefix}.weight_scale": with_byte(f"{prefix}.weight_scale", 0x7F)},
        "zero block scale": {f"{prefix}.weight_scale": with_byte(f"{prefix}.weight_scale", 0x00)},
        "weight_scale stored as fp32": {f"{prefix}.weight_scale": tensors[f"{prefix}.weight_scale"].float()},
        "weight_scale with half the columns": {f"{prefix}.weight_scale": tensors[f"{prefix}.weight_scale"][:, ::2].contiguous()},
        "input_scale missing": {f"{prefix}.input_scale": None},
    }
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for label, change in corruptions.items():
            damaged = dict(tensors)
            for name, value in change.items():
                if value is None:
                    damaged.pop(name)
                else:
                    damaged[name] = value
            save_checkpoint(scratch, damaged, exclude_modules=source.exclude_modules, model_config=source.model_config, validate=False)
            try:
                Checkpoint(scratch).nvfp4_linear(prefix)
                rows.append({"corruption": label, "error": "(accepted)"})
            except CheckpointError as error:
                rows.append({"corruption": label, "error": str(error)})
    return rows


def plot_dual_scale_errors(rows: Sequence[dict], part: str = "wq_a", axes=None):
    """Left: relative weight error of ``part`` against the scale ratio, one line per strategy; right: the
    worst output channel (row) of ``part``. Exact results (0) are drawn at the bottom, labelled."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    floor = 1e-8
    for ax, key, title in zip(axes, (f"weight_err_{part}", f"worst_row_err_{part}"), (f"{part}: relative weight error", f"{part}: worst row (output channel)")):
        for strategy in STRATEGIES:
            points = sorted((r["ratio"], r[key]) for r in rows if r["strategy"] == strategy)
            ratios = [p[0] for p in points]
            values = [max(p[1], floor) for p in points]
            ax.plot(ratios, values, "o-", color=STRATEGY_COLOURS[strategy], label=STRATEGY_LABELS[strategy])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(floor, color="grey", lw=0.5)
        ax.text(1.0, floor * 1.5, "0 (exact)", color="grey", fontsize=8)
        ax.set_xlabel("weight_scale_2[wkv] / weight_scale_2[wq_a]")
        ax.set_ylabel("relative error vs each part with its own scale")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8, loc="upper left")
    return axes


def plot_fold_thresholds(block_scale: torch.Tensor, ratios=None, ax=None, label: str = "wq_a"):
    """Strategy (b) divides every block scale of the smaller-scale part by the ratio: the fraction of
    ``block_scale`` (e4m3, any shape) that lands in E4M3's subnormals (< 2**-6, 3 bits lose precision)
    or rounds to zero (<= 2**-10), against the ratio."""
    ax = ax or plt.subplots(figsize=(7, 4))[1]
    ratios = np.logspace(0, 5, 61) if ratios is None else np.asarray(ratios)
    values = block_scale.float().flatten()
    values = values[values > 0]
    subnormal = [float((values / r < E4M3_MIN_NORMAL).float().mean()) for r in ratios]
    zero = [float((values / r <= E4M3_UNDERFLOW).float().mean()) for r in ratios]
    ax.plot(ratios, subnormal, label="subnormal after folding (coarser)", color="#f28e2b")
    ax.plot(ratios, zero, label="flushed to zero (block decodes to 0)", color="#e15759")
    ax.set_xscale("log")
    ax.set_xlabel("scale ratio folded into the block scales")
    ax.set_ylabel(f"fraction of {label} block scales")
    ax.set_title(f"Strategy (b) on {label}'s {values.numel()} block scales")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return ax


def recorded_attention_results(directory: Optional[str] = None) -> List[dict]:
    """Every recorded ``attention_*.json`` in data/bench (device runs; CPU dry runs are skipped), each with
    its "recorded on <device>, <date>, commit <sha>" label."""
    directory = directory or repository_path(os.path.join("data", "bench"))
    results = [load_recorded(path) for path in sorted(glob.glob(os.path.join(directory, "attention_*.json")))]
    return [r for r in results if r.get("device") != "cpu"]


def plot_timings(result: dict, axes=None):
    """One panel per case: our time, cuBLAS BF16, the FP8 path (wo_a) and the HBM floor against M."""
    cases = list(dict.fromkeys(r["case"] for r in result["rows"]))
    if axes is None:
        _, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4), squeeze=False)
        axes = axes[0]
    series = (("time_us", "ours (NVFP4)", "#4e79a7"), ("cublas_bf16_us", "cuBLAS BF16", "#59a14f"), ("fp8_us", "FP8 W8A8 (_scaled_mm)", "#b07aa1"), ("diagonal_us", "ours, one-GEMM diagonal (wo_a)", "#76b7b2"), ("floor_us", "HBM floor", "grey"))
    for ax, case in zip(axes, cases):
        rows = sorted((r for r in result["rows"] if r["case"] == case), key=lambda r: r["m"])
        for key, label, colour in series:
            points = [(r["m"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), "o-" if key != "floor_us" else "--", color=colour, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("us per call")
        ax.set_title(case)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].figure.suptitle(result.get("label", ""), fontsize=9)
    return axes

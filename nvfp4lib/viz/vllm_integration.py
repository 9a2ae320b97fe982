"""Pictures for the vLLM integration (notebook 05)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

METHOD_LABELS = {
    "ours": "nvfp4lib plugin (per-shard alpha)",
    "stock_w4a16_single_max_scale": "stock W4A16 (one max scale, as Marlin on Hopper)",
    "stock_w4a4_emulation": "stock W4A4 emulation (vLLM on CPU)",
}
EXACT_FLOOR = 1e-7  # a zero error is drawn at this height and labelled "exact"


def plot_shard_errors(errors: dict, ax=None, title: str = "", shards=None):
    """Grouped bars of relative error per shard, log scale.

    errors: ``{group label: {method: {shard: rel_error}}}`` with methods among :data:`METHOD_LABELS`
    (e.g. ``{"ratio 3": {"ours": {"wq_a": 0.0, "wkv": 0.0}, ...}}``). Zeros are drawn at
    :data:`EXACT_FLOOR` and labelled "exact". shards: the shard order (default: as in the first entry).
    """
    ax = ax or plt.subplots(figsize=(10, 4))[1]
    groups = [(g, shard) for g, per_method in errors.items() for shard in (shards or next(iter(per_method.values())))]
    methods = [m for m in METHOD_LABELS if any(m in per_method for per_method in errors.values())]
    width = 0.8 / len(methods)
    x = np.arange(len(groups))
    for i, method in enumerate(methods):
        values = [errors[g].get(method, {}).get(shard, np.nan) for g, shard in groups]
        heights = [max(v, EXACT_FLOOR) if v == v else np.nan for v in values]
        bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, heights, width, label=METHOD_LABELS[method])
        for bar, value in zip(bars, values):
            if value == 0.0:
                ax.annotate("exact", (bar.get_x() + bar.get_width() / 2, EXACT_FLOOR), ha="center", va="bottom", fontsize=8, rotation=90)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{g}\n{shard}" for g, shard in groups])
    ax.set_ylabel("relative error vs exact per-shard dequant")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8, loc="upper left")
    if title:
        ax.set_title(title)
    return ax

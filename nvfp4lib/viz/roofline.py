"""Tables and plots of the recorded NVFP4 W4A16 GEMM benchmark (``data/bench/gemm_h100.json``, written by
``python -m nvfp4lib.bench gemm``) and of the shared-expert run (``data/bench/shared_expert_h100.json``).

A GEMM row holds ``shape, M, N, K, path, ours_us, cublas_bf16_us, quack_us (or None), hbm_floor_us,
compute_floor_us, floor_us, rel_err, cosine, quant_rel_err_vs_bf16`` (times in microseconds); the payload
holds ``copy_GBps`` and ``bf16_peak_TFLOPs`` (measured in the same process) and the run metadata.
"""
from __future__ import annotations

from typing import Optional, Sequence

import pandas as pd

# issue 4 targets (H100)
DECODE_TARGET_US = {"gate_up": 12.0, "down": 6.5}  # M <= 16
PREFILL_RATIO_TARGET = 0.95  # M = 8192: at least 0.95x cuBLAS BF16 throughput
EXPERT_FLOOR_RATIO_TARGET = 1.3  # whole shared expert at M = 1 vs the sum of its two GEMM floors
ACCURACY_TARGET = {"rel_err": 1e-2, "cosine": 0.9999}

BASELINES = (("ours_us", "ours"), ("cublas_bf16_us", "cuBLAS BF16"), ("quack_us", "QuACK w4a16"), ("humming_us", "humming"))


def gemm_bytes(n: int, k: int, m: int) -> float:
    """HBM bytes of one W4A16 GEMM: NVFP4 weight (4.5 bits per element) + bf16 activations in and out."""
    return n * k * 9 / 16 + 2 * m * k + 2 * m * n


def gemm_table(rows: Sequence[dict]) -> pd.DataFrame:
    """One line per (shape, M): times, floor, speed-ups against each baseline present, accuracy."""
    df = pd.DataFrame(list(rows))
    if df.empty:
        return df
    out = df[["shape", "M", "N", "K"]].copy()
    if "path" in df:
        out["path"] = df["path"]
    for column, label in BASELINES:
        if column in df and df[column].notna().any():
            out[f"{label} us"] = df[column]
    out["floor us"] = df["floor_us"]
    out["ours / floor"] = df["ours_us"] / df["floor_us"]
    for column, label in BASELINES[1:]:
        if column in df and df[column].notna().any():
            out[f"x vs {label}"] = df[column] / df["ours_us"]
    out["rel err"] = df["rel_err"]
    out["cosine"] = df["cosine"]
    if "quant_rel_err_vs_bf16" in df:
        out["quant err vs bf16"] = df["quant_rel_err_vs_bf16"]
    return out.reset_index(drop=True)


def _status(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def targets_table(rows: Sequence[dict], expert_rows: Sequence[dict] = ()) -> pd.DataFrame:
    """The issue's targets, each with the measured number and met / NOT met."""
    df = pd.DataFrame(list(rows))
    lines = []
    if not df.empty:
        for shape, limit in DECODE_TARGET_US.items():
            sel = df[(df["shape"] == shape) & (df["M"] <= 16)]
            if len(sel):
                worst = float(sel["ours_us"].max())
                lines.append(dict(target=f"{shape}, M <= 16: <= {limit} us", measured=f"{worst:.1f} us (worst M)", status=_status(worst <= limit)))
        for column, label in BASELINES[1:]:
            if column in df and df[column].notna().any():
                sel = df[df[column].notna()]
                slower = sel[sel["ours_us"] > sel[column]]
                where = ", ".join(f"{s} M={m}" for s, m in zip(slower["shape"], slower["M"])) or "none"
                lines.append(dict(target=f"every M no slower than {label}", measured=f"slower at: {where}", status=_status(slower.empty)))
        big = df[df["M"] == 8192]
        if len(big):
            ratio = big["cublas_bf16_us"] / big["ours_us"]
            lines.append(dict(target=f"M = 8192: >= {PREFILL_RATIO_TARGET}x cuBLAS BF16",
                              measured=", ".join(f"{s} {r:.3f}x" for s, r in zip(big["shape"], ratio)),
                              status=_status(bool((ratio >= PREFILL_RATIO_TARGET).all()))))
        worst_err, worst_cos = float(df["rel_err"].max()), float(df["cosine"].min())
        lines.append(dict(target=f"accuracy: rel err <= {ACCURACY_TARGET['rel_err']}, cosine >= {ACCURACY_TARGET['cosine']}",
                          measured=f"worst rel err {worst_err:.2e}, worst cosine {worst_cos:.6f}",
                          status=_status(worst_err <= ACCURACY_TARGET["rel_err"] and worst_cos >= ACCURACY_TARGET["cosine"])))
    one = [r for r in expert_rows if r.get("M") == 1 and expert_time_us(r) is not None]
    if one:
        us = expert_time_us(one[0])
        ratio = us / one[0]["floor_sum_us"]
        lines.append(dict(target=f"shared expert, M = 1: <= {EXPERT_FLOOR_RATIO_TARGET}x the sum of its GEMM floors",
                          measured=f"{us:.1f} us = {ratio:.2f}x", status=_status(ratio <= EXPERT_FLOOR_RATIO_TARGET)))
    return pd.DataFrame(lines, columns=["target", "measured", "status"])


def plot_times(rows: Sequence[dict], label: str = "", axes=None):
    """Time per call against M (log-log), one panel per shape: each implementation and the floor."""
    import matplotlib.pyplot as plt

    df = pd.DataFrame(list(rows))
    shapes = list(dict.fromkeys(df["shape"]))
    if axes is None:
        _, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
        axes = axes[0]
    for ax, shape in zip(axes, shapes):
        sel = df[df["shape"] == shape].sort_values("M")
        for column, name in BASELINES:
            if column in sel and sel[column].notna().any():
                ax.plot(sel["M"], sel[column], marker="o", label=name)
        ax.plot(sel["M"], sel["floor_us"], "k--", label="floor (HBM or bf16 peak)")
        n, k = int(sel["N"].iloc[0]), int(sel["K"].iloc[0])
        ax.set(xscale="log", yscale="log", xlabel="tokens M", ylabel="us per call", title=f"{shape} [{n} x {k}]")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if label:
        axes[0].figure.suptitle(label, fontsize=9)
    return axes


def plot_roofline(rows: Sequence[dict], bandwidth_GBps: float, peak_TFLOPs: float, label: str = "", ax=None):
    """Achieved TFLOP/s against arithmetic intensity (FLOP per HBM byte of the W4A16 GEMM), with the
    roof ``min(peak, intensity * bandwidth)`` of the measured copy bandwidth and bf16 peak."""
    import matplotlib.pyplot as plt
    import numpy as np

    df = pd.DataFrame(list(rows))
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 5))
    intensity = 2 * df["M"] * df["N"] * df["K"] / gemm_bytes(df["N"], df["K"], df["M"])
    grid = np.logspace(np.log10(intensity.min() / 2), np.log10(intensity.max() * 2), 200)
    ax.plot(grid, np.minimum(peak_TFLOPs, grid * bandwidth_GBps / 1e3), "k-", lw=2,
            label=f"roof: {bandwidth_GBps:.0f} GB/s, {peak_TFLOPs:.0f} TFLOP/s")
    markers = {"gate_up": "o", "down": "s", "fused_wqa_wkv": "^"}
    colors = {"ours_us": "C0", "cublas_bf16_us": "C1", "quack_us": "C2", "humming_us": "C3"}
    for column, name in BASELINES:
        if column not in df or not df[column].notna().any():
            continue
        for shape in dict.fromkeys(df["shape"]):
            sel = df[(df["shape"] == shape) & df[column].notna()]
            tflops = 2 * sel["M"] * sel["N"] * sel["K"] / (sel[column] * 1e-6) / 1e12
            ax.scatter(intensity[sel.index], tflops, marker=markers.get(shape, "x"), color=colors[column],
                       label=f"{name} {shape}", s=30, alpha=0.8)
    ax.set(xscale="log", yscale="log", xlabel="FLOP per HBM byte (NVFP4 weight + bf16 activations)", ylabel="TFLOP/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if label:
        ax.set_title(label, fontsize=9)
    return ax


def expert_time_us(row: dict) -> Optional[float]:
    """The whole shared expert's time in a row of either recorded schema (the benchmark's fused-expert
    section, ``expert_fused_us``, or scripts/gpu/shared_expert_check.py, ``expert_us``)."""
    value = row.get("expert_fused_us", row.get("expert_us"))
    return None if value is None else float(value)


EXPERT_COLUMNS = ["M", "expert_fused_us", "expert_unfused_us", "expert_us", "gate_up_swiglu_fused_us", "gate_up_then_torch_swiglu_us",
                  "gate_up_us", "swiglu_us", "down_us", "floor_sum_us", "expert_over_floor_sum", "x_floor_sum",
                  "expert_rel_err", "expert_cosine", "swiglu_rel_err", "swiglu_cosine", "rel_err", "cosine"]


def expert_table(rows: Sequence[dict]) -> pd.DataFrame:
    """A shared-expert run (either schema): total and parts per M against the floors, and accuracy."""
    df = pd.DataFrame([r for r in rows if "error" not in r])
    if df.empty:
        return df
    return df[[c for c in EXPERT_COLUMNS if c in df]]


def expert_accuracy_ok(rows: Sequence[dict]) -> bool:
    """Every recorded shared-expert row meets rel err <= 1e-2 and cosine >= 0.9999 (whichever keys it has)."""
    for r in rows:
        if "error" in r:
            continue
        for err_key, cos_key in (("expert_rel_err", "expert_cosine"), ("swiglu_rel_err", "swiglu_cosine"), ("rel_err", "cosine")):
            if err_key in r and (r[err_key] > ACCURACY_TARGET["rel_err"] or r[cos_key] < ACCURACY_TARGET["cosine"]):
                return False
    return True


def variants_table(variants: Sequence[dict]) -> pd.DataFrame:
    """The benchmark's decode-kernel tuning variants, one line per (shape, M), one column per variant (us;
    NaN: not measured at that point, or its output was wrong)."""
    lines = []
    for entry in variants:
        line = {"shape": entry["shape"], "M": entry["M"]}
        for name, result in entry.get("variants", {}).items():
            line[name] = result.get("us") if result.get("correct", True) else float("nan")
        lines.append(line)
    return pd.DataFrame(lines)


PROBE_LABELS = {"cublas": "cuBLAS BF16 (bf16 weight)", "dequant_cublas": "dequantize + cuBLAS (the prefill path)",
                "full": "WGMMA kernel", "own": "probe: own-word decode (standard k order)",
                "noload": "probe: decode, no weight loads", "nodecode": "probe: no weight loads, no decode",
                "sidecar": "probe: decode on a third warpgroup", "sidecar_idle": "probe: third warpgroup idle",
                "decoder": "decoder schedule (decoder warpgroup + SS-WGMMA)"}


def probe_table(rows: Sequence[dict]) -> pd.DataFrame:
    """The WGMMA prefill probe (``scripts/gpu/wgmma_probe.py``): one line per (shape, M), one column per
    timed variant (us); ``vs cuBLAS`` columns are cuBLAS time / variant time (> 1: faster than cuBLAS)."""
    df = pd.DataFrame(list(rows))
    times = [c for c in df.columns if c.endswith("_us")]
    out = df[["shape", "m"]].rename(columns={"m": "M"}).copy()
    for c in times:
        out[c[:-3]] = df[c]
    for c in times:
        if c != "cublas_us":
            out[f"{c[:-3]} vs cuBLAS"] = df["cublas_us"] / df[c]
    return out


def plot_probe(rows: Sequence[dict], label: str = "", ax=None):
    """Grouped bars per (shape, M): every variant's time relative to cuBLAS BF16 (1 = cuBLAS; lower is faster)."""
    import matplotlib.pyplot as plt
    import numpy as np

    df = pd.DataFrame(list(rows))
    times = [c for c in df.columns if c.endswith("_us") and c != "cublas_us"]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(df)), 3.8))
    width = 0.8 / max(1, len(times))
    x = np.arange(len(df))
    for i, c in enumerate(times):
        key = c[:-3]
        base = key.rsplit("_t", 1)[0] if "_t" in key else key
        first = base.split("_")[0]
        # e.g. "decoder_noload_c2_t256": the label of its first word, then the rest (c2: clusters of 2, a4: 4
        # chunks ahead, m256: 256 weight rows per CTA, t256: 256 tokens per CTA)
        name = PROBE_LABELS.get(base) or (PROBE_LABELS.get(first, first) + base[len(first):].replace("_", " "))
        name += key[len(base):].replace("_", " ")
        ax.bar(x + (i - (len(times) - 1) / 2) * width, df[c] / df["cublas_us"], width, label=name)
    ax.axhline(1.0, color="black", lw=1, ls="--", label="cuBLAS BF16")
    ax.set_xticks(x, [f"{s}\nM={m}" for s, m in zip(df["shape"], df["m"])])
    ax.set_ylabel("time / cuBLAS BF16 time")
    ax.set_title(f"WGMMA prefill kernel: where the time goes ({label})" if label else "WGMMA prefill kernel: where the time goes")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def plot_split_sweep(rows: Sequence[dict], label: str = "", axes=None):
    """The decode kernel's time against its split-K count (``data/bench/splits_probe_*.json``): one panel per
    shape, one line per M, the split count the op picks marked (filled) and the HBM floor dashed."""
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if axes is None:
        _, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), squeeze=False)
        axes = axes[0]
    for ax, shape in zip(axes, shapes):
        for r in (r for r in rows if r["shape"] == shape):
            times = sorted((int(k[1:-3]), v) for k, v in r.items() if k.startswith("s") and k.endswith("_us") and k[1:-3].isdigit() and v)
            line, = ax.plot([s for s, _ in times], [t for _, t in times], marker="o", markersize=3, label=f"M = {r['m']}")
            ax.plot([r["default_splits"]], [r["default_us"]], marker="o", markersize=8, color=line.get_color())
            ax.axhline(r["floor_us"], color=line.get_color(), linestyle=":", linewidth=0.8)
        first = next(r for r in rows if r["shape"] == shape)
        ax.set_title(f"{shape} [{first['n']}, {first['k']}]", fontsize=10)
        ax.set_xlabel("split-K count")
        ax.set_ylabel("us per call (lower is better)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    if label:
        axes[0].figure.suptitle(f"decode kernel vs split count - {label} (large dot: the op's choice; dotted: HBM floor)", fontsize=10)
    return axes


def _panels_by_shape(rows: Sequence[dict], axes=None):
    """One panel per shape of a probe's rows: yields (axis, that shape's rows sorted by M, their Ms) with the
    shape titled and M on a log2 axis; the axes are created when not given."""
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if axes is None:
        _, axes = plt.subplots(1, len(shapes), figsize=(3.6 * len(shapes), 3.4), squeeze=False)
        axes = axes[0]
    panels = []
    for ax, shape in zip(axes, shapes):
        mine = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["m"])
        ax.set_title(f"{shape} [{mine[0]['n']}, {mine[0]['k']}]", fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("us per call (lower is better)")
        panels.append((ax, mine, [r["m"] for r in mine]))
    return axes, panels


def plot_ksplit_probe(rows: Sequence[dict], label: str = "", axes=None):
    """The decode kernel with its K range split inside the CTA (``data/bench/ksplit_probe_*.json``): one panel
    per shape, time against M for the grid's split K, the op's in-CTA plan and the best CTA shape measured,
    the HBM floor dotted."""
    axes, panels = _panels_by_shape(rows, axes)
    for ax, mine, ms in panels:
        ax.plot(ms, [r.get("grid_us") for r in mine], marker="s", markersize=3, label="split K across the grid")
        ax.plot(ms, [r.get("default_us") for r in mine], marker="o", markersize=4, label="op (in-CTA plan)")
        ax.plot(ms, [r.get("best_us") for r in mine], linestyle="--", linewidth=0.8, label="best CTA shape measured")
        ax.plot(ms, [r["floor_us"] for r in mine], color="gray", linestyle=":", label="HBM floor")
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    if label:
        axes[0].figure.suptitle(f"decode kernel: in-CTA K split vs grid split K - {label}", fontsize=10)
    return axes


def plot_wgmma_split_probe(rows: Sequence[dict], label: str = "", axes=None):
    """The WGMMA kernel with K split across CTAs (``data/bench/wgmma_split_probe_*.json``): one panel per shape,
    time against M for every (tile_n, splits) measured, cuBLAS BF16 on the dequantized weight dashed."""
    axes, panels = _panels_by_shape(rows, axes)
    for ax, mine, ms in panels:
        variants = sorted({k[:-3] for r in mine for k in r if k.startswith("t") and k.endswith("_us")})
        for v in variants:
            tile_n, splits = v[1:].split("_s")
            what = "stream-K" if splits == "k" else f"{splits} split{'s' if splits != '1' else ''}"
            ax.plot(ms, [r.get(f"{v}_us") for r in mine], marker="x" if splits == "k" else "o", markersize=3,
                    linewidth=0.9 if splits == "1" else 1.4, linestyle="-" if tile_n == "128" else "-.", label=f"{tile_n} tokens, {what}")
        ax.plot(ms, [r["cublas_us"] for r in mine], color="black", linestyle="--", label="cuBLAS BF16")
        ax.set_yscale("log")
    axes[0].legend(fontsize=6)
    if label:
        axes[0].figure.suptitle(f"WGMMA kernel: K split across CTAs - {label}", fontsize=10)
    return axes


def plot_pdl_probe(rows: Sequence[dict], chain: Sequence[dict] = (), label: str = "", axes=None):
    """Programmatic dependent launch (``data/bench/pdl_probe_*.json``): one panel per decode shape, time against M
    with PDL off, on (``start``) and the launch's own choice (``auto``), the HBM floor dotted; with ``chain``
    one more panel for the shared expert (gate_up + SwiGLU -> down) and the sum of its floors."""
    import matplotlib.pyplot as plt

    shapes = len(dict.fromkeys(r["shape"] for r in rows))
    if axes is None:
        _, axes = plt.subplots(1, shapes + bool(chain), figsize=(3.4 * (shapes + bool(chain)), 3.4), squeeze=False)
        axes = axes[0]
    _, panels = _panels_by_shape(rows, axes[:shapes])
    styles = {"off": dict(marker="s", linestyle="-"), "start": dict(marker="o", linestyle="--"), "auto": dict(marker="^", linestyle="-", linewidth=2)}
    for ax, mine, ms in panels + ([(axes[shapes], sorted(chain, key=lambda r: r["m"]), [r["m"] for r in sorted(chain, key=lambda r: r["m"])])]
                                  if chain else []):
        for mode, style in styles.items():
            if any(f"{mode}_us" in r for r in mine):
                ax.plot(ms, [r.get(f"{mode}_us") for r in mine], markersize=3, label=f"PDL {mode}", **style)
        ax.plot(ms, [r.get("floor_us", r.get("floor_sum_us")) for r in mine], color="gray", linestyle=":", label="HBM floor")
        ax.set_ylim(bottom=0)
    if chain:
        ax = axes[shapes]
        ax.set_title("shared expert (gate_up + SwiGLU -> down)", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
    axes[0].legend(fontsize=7)
    if label:
        axes[0].figure.suptitle(f"decode kernel: programmatic dependent launch - {label}", fontsize=10)
    return axes


def plot_before_after(table: pd.DataFrame, before: str, after: str, label: str = "", ax=None):
    """Grouped bars of two timing columns of ``table`` (one group per row, named by its ``shape`` and ``M``),
    the ``floor us`` and, where present, ``target us`` of each row as short horizontal ticks."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(1.6 * len(table) + 2, 3.4))
    xs = list(range(len(table)))
    ax.bar([x - 0.2 for x in xs], table[before], width=0.4, label=before)
    ax.bar([x + 0.2 for x in xs], table[after], width=0.4, label=after)
    for x, (_, row) in zip(xs, table.iterrows()):
        ax.hlines(row["floor us"], x - 0.45, x + 0.45, color="gray", linestyle=":", label="HBM floor" if x == 0 else None)
        if "target us" in row and pd.notna(row["target us"]):
            ax.hlines(row["target us"], x - 0.45, x + 0.45, color="red", label="target" if x == 0 else None)
    ax.set_xticks(xs, [f"{r['shape']}\nM = {r['M']}" for _, r in table.iterrows()], fontsize=8)
    ax.set_ylabel("us")
    ax.legend(fontsize=7)
    if label:
        ax.set_title(label, fontsize=9)
    return ax


def plot_clock_probe(rows: Sequence[dict], label: str = "", axes=None):
    """SM clock and board power under sustained load (``data/bench/clock_probe_*.json``): per case, the median SM
    clock (bars, left) and the throughput it reached against the power drawn (right; the board's limit dotted)."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(12, 3.4))
    names = [r["case"] for r in rows]
    bars = axes[0].bar(names, [r["sm_clock_mhz"] for r in rows], color=["gray" if r["path"] == "cublas" else "C0" for r in rows])
    for bar, r in zip(bars, rows):
        axes[0].annotate(f"{r['power_w']:.0f} W", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                         va="bottom", fontsize=7)
    axes[0].set_ylabel("SM clock (MHz, median)")
    axes[0].tick_params(axis="x", labelsize=7, rotation=15)
    for r in rows:
        axes[1].scatter(r["power_w"], r["tflops"], color="gray" if r["path"] == "cublas" else "C0")
        axes[1].annotate(r["case"], (r["power_w"], r["tflops"]), fontsize=7, xytext=(4, -3), textcoords="offset points")
    axes[1].axvline(700, color="red", linestyle=":", label="700 W board limit")
    axes[1].set(xlabel="board power (W, median)", ylabel="TFLOP/s")
    axes[1].legend(fontsize=7)
    if label:
        axes[0].figure.suptitle(f"clock and power under sustained load - {label}", fontsize=10)
    return axes

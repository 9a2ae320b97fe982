"""GPU host: the prefill path (dequantize to bf16 + cuBLAS) with the weight in row chunks through one reused
bf16 buffer (``gemm_prefill.run_prefill(chunk_bytes=...)``), so each chunk's bf16 weight is written and read
back in the L2 instead of HBM, against one whole-weight dequantization, with cuBLAS BF16 on the dequantized
weight in the same process. Variants (env ``VARIANTS``, comma separated): ``c<MB>`` chunks of at most MB
megabytes, ``o<MB>`` the same with the dequantizations on a side stream one chunk ahead. Every variant is
checked against the fp32 reference before it is timed. CUDA-graph replay over 4 rotating weight sets. Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/chunked_prefill_probe.py
Env: MS (default 1024,2048,4096,8192), SHAPES (gate_up,down,fused_wqa_wkv,wo_b). Writes
$OUT/chunked_prefill_probe.json and prints a table."""
import os

import torch

from nvfp4lib.bench import harness
from nvfp4lib.bench.gemm import bf16_peak_flops, checked_run, probe_cases
from nvfp4lib.kernels.sm90 import gemm_prefill
from nvfp4lib.ops.gemm import dequantize_sm90

ALL = {"gate_up": (6144, 7168, None), "down": (7168, 3072, None), "fused_wqa_wkv": (2048, 7168, None), "wo_b": (7168, 16384, None)}
SHAPES = {s: ALL[s] for s in os.environ.get("SHAPES", ",".join(ALL)).split(",")}
MS = [int(v) for v in os.environ.get("MS", "1024,2048,4096,8192").split(",")]
VARIANTS = os.environ.get("VARIANTS", "c8,c16,c32,c64,o16").split(",")
notes, rows = [], []
bandwidth = harness.copy_bandwidth()
peak = bf16_peak_flops()
dense_cache = {}
for name, n, k, _, _, weights, m, x, ref in probe_cases(SHAPES, MS):
    if name not in dense_cache:
        dense_cache.clear()
        dense_cache[name] = [(dequantize_sm90(p.weight, p.block_scale, n) * p.alpha[:, None]).to(torch.bfloat16) for p in weights]
    dense = dense_cache[name]
    row = dict(shape=name, n=n, k=k, m=m, hbm_floor_us=harness.hbm_floor_us(n * k * 9 / 16 + 2 * m * (n + k), bandwidth),
               compute_floor_us=2e6 * m * n * k / peak)
    row["cublas_us"] = harness.time_safely([lambda d=d: torch.nn.functional.linear(x, d) for d in dense], notes, f"cublas {name} {m}")[0]
    whole = checked_run(lambda p: gemm_prefill.run_prefill(x, p.weight, p.block_scale, p.alpha, n), weights[0], ref, notes, f"whole {name} {m}")
    if whole:
        row["whole_rel_err"] = whole[1]
        row["whole_us"] = harness.time_safely(
            [lambda p=p: gemm_prefill.run_prefill(x, p.weight, p.block_scale, p.alpha, n) for p in weights], notes, f"whole {name} {m}")[0]
    for v in VARIANTS:
        kw = dict(chunk_bytes=int(v[1:]) << 20, overlap=v[0] == "o")
        got = checked_run(lambda p: gemm_prefill.run_prefill(x, p.weight, p.block_scale, p.alpha, n, **kw), weights[0], ref, notes, f"{v} {name} {m}")
        if not got:
            continue
        row[f"{v}_chunks"] = len(gemm_prefill.chunk_bounds(n, k, kw["chunk_bytes"]))
        row[f"{v}_rel_err"] = got[1]
        if whole:
            row[f"{v}_equals_whole"] = bool(torch.equal(got[0], whole[0]))
        row[f"{v}_us"] = harness.time_safely(
            [lambda p=p: gemm_prefill.run_prefill(x, p.weight, p.block_scale, p.alpha, n, **kw) for p in weights], notes, f"{v} {name} {m}")[0]
    rows.append(row)
    print(" ".join(f"{key}={harness.fmt(val) if isinstance(val, float) else val}" for key, val in row.items()
                   if key.endswith("_us") or key in ("shape", "m")), flush=True)
harness.write_probe("chunked_prefill_probe", "scripts/gpu/chunked_prefill_probe.py: CUDA-graph replay (harness.time_graph) over 4 "
                    "rotating weight sets; whole = one dequantization of the weight + one cuBLAS GEMM; cN = row chunks of at most "
                    "N MB of bf16 through one reused buffer, cuBLAS writing y's columns in place; oN = the same, dequantizations "
                    "on a side stream one chunk ahead; cublas = F.linear on the dequantized bf16 weight",
                    rows=rows, notes=notes, copy_GBps=bandwidth / 1e9, bf16_peak_TFLOPs=peak / 1e12)
keys = ["whole"] + VARIANTS
print(f"{'shape':14s}{'M':>6s}{'cublas':>9s}" + "".join(f"{k:>9s}" for k in keys) + "  ratio(best)")
for r in rows:
    times = [r.get(f"{k}_us") for k in keys]
    best = min(t for t in times if t) if any(times) else None
    print(f"{r['shape']:14s}{r['m']:6d}{r['cublas_us']:9.1f}" + "".join(f"{harness.fmt(t):>9s}" for t in times)
          + (f"  {r['cublas_us'] / best:.3f}" if best else ""))
for line in notes:
    print("NOTE", line)

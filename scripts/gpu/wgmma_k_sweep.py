"""GPU host: the WGMMA decoder kernel's fixed cost per CTA. For N = 6144 (gate_up's 48 row blocks: fewer CTAs
than SMs, so every CTA runs in the one wave) and each M in ``MS``, times the kernel at a range of K with the
token tile and split count of each ``VARIANTS`` entry; a straight-line fit of time against K quads per CTA
gives the per-quad cost (the slope) and the cost that does not scale with K (the intercept: launch,
pipeline fill, split sum, epilogue). Every point is checked against the fp32 reference. CUDA-graph replay over 4
rotating weight sets. Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/wgmma_k_sweep.py
Env: PROBE (a timing probe, unchecked), EXTRA (``key=value:...`` run_wgmma options), MS (default 256), KS (default 512,1024,2048,3584,7168), VARIANTS (tile_n x splits [c cluster], default
256x1,256x2,256x1c1). Writes $OUT/wgmma_k_sweep.json and prints the fits."""
import os

import numpy as np

from nvfp4lib.bench import gemm as gemm_bench
from nvfp4lib.bench import harness
from nvfp4lib.kernels.sm90 import gemm_wgmma

N = int(os.environ.get("N", "6144"))
MS = [int(v) for v in os.environ.get("MS", "256").split(",")]
KS = [int(v) for v in os.environ.get("KS", "512,1024,2048,3584,7168").split(",")]
VARIANTS = os.environ.get("VARIANTS", "256x1,256x2,256x1c1").split(",")
PROBE = os.environ.get("PROBE")  # a timing probe of the decoder kernel (run_wgmma probe=...): wrong results, not checked
EXTRA = harness.parse_kwargs(filter(None, os.environ.get("EXTRA", "").split(":")))  # more run_wgmma options, e.g. staged=False
notes, rows = [], []
for k in KS:
    shapes = {f"k{k}": (N, k, None)}
    for name, n, _, _, _, weights, m, x, ref in gemm_bench.probe_cases(shapes, MS):
        for v in VARIANTS:
            tile, _, rest = v.partition("x")
            splits, _, cluster = rest.partition("c")
            kw = dict(tile_n=int(tile), splits=int(splits), stream_k=False, **EXTRA)
            if cluster:
                kw["cluster_m"] = int(cluster)
            if k // 256 < 2 * kw["splits"] and kw["splits"] > 1:
                continue

            def call(p, kw=kw):
                return gemm_wgmma.run_wgmma(x, p.weight, p.block_scale, p.alpha, n, **kw)
            if PROBE:
                kw["probe"] = PROBE
            elif not gemm_bench.checked_run(call, weights[0], ref, notes, f"{name} {m} {v}"):
                continue
            us = harness.time_safely([lambda p=p: call(p) for p in weights], notes, f"{name} {m} {v}")[0]
            rows.append(dict(variant=v, m=m, n=n, k=k, quads_per_cta=-(-(k // 256) // kw["splits"]), us=us))
            print(rows[-1], flush=True)
fits = []
for v in VARIANTS:
    for m in MS:
        pts = [(r["quads_per_cta"], r["us"]) for r in rows if r["variant"] == v and r["m"] == m and r["us"]]
        if len(pts) >= 3:
            slope, intercept = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)
            fits.append(dict(variant=v, m=m, us_per_quad=float(slope), fixed_us=float(intercept)))
harness.write_probe("wgmma_k_sweep", "scripts/gpu/wgmma_k_sweep.py: CUDA-graph replay (harness.time_graph) over 4 rotating weight sets; "
                    f"run_wgmma at N = {N}, fixed (tile_n, splits, cluster), K swept; linear fit of time against K quads per CTA"
                    + (f"; timing probe {PROBE} (wrong results)" if PROBE else "") + (f"; options {EXTRA}" if EXTRA else ""),
                    rows=rows, fits=fits, notes=notes)
for f in fits:
    print(f"{f['variant']:10s} M={f['m']:5d}  {f['us_per_quad']:6.3f} us per quad of 256 k  fixed {f['fixed_us']:6.2f} us")

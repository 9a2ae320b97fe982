"""GPU host: the WGMMA decoder kernel with K split across CTAs (``splits``) against the unsplit kernel and
cuBLAS BF16 on the dequantized weight, at the M where its grid is small (M = 128..1024).

For gate_up, down, fused_wqa_wkv, wo_b and gate_up with the SwiGLU, every (tile_n, splits) in ``VARIANTS``
(splits "k": stream-K),
CUDA-graph replay over 4 rotating weight sets (harness.time_graph); each variant checked against an fp32
reference over the same dequantized weight (rel err <= 1e-2, cosine >= 0.9999) and its graph replay against
eager (bit-equal: the split sum is in a fixed order). The op's own path is timed as ``op``. Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/wgmma_split_probe.py
Writes $OUT/wgmma_split_probe.json."""
import os

import torch

from nvfp4lib.bench import gemm as gemm_bench
from nvfp4lib.bench import harness
from nvfp4lib.kernels.sm90 import gemm_wgmma
from nvfp4lib.ops.gemm import nvfp4_linear

MS = [int(v) for v in os.environ.get("MS", "128,256,512,1024").split(",")]
SHAPES = {"gate_up": (6144, 7168, None), "down": (7168, 3072, None), "fused_wqa_wkv": (2048, 7168, None),
          "wo_b": (7168, 16384, None), "gate_up_swiglu": (6144, 7168, 10.0)}
SHAPES = {k: v for k, v in SHAPES.items() if k in os.environ.get("SHAPES", ",".join(SHAPES)).split(",")}
# tile_n x splits; "x k" (e.g. 128xk): stream-K, one part per cluster of SMs (the K quads of all tiles shared evenly),
# "256xk60": 60 parts; a "c1" suffix (256x1c1, 256xkc1): clusters of one CTA (no x multicast)
VARIANTS = [(int(v.split("x")[0]), v.split("x")[1]) for v in os.environ.get(
    "VARIANTS", "128x1,128x2,128x3,256x1,256x2,256x3,256x4,256x6,256x8").split(",")]
PDL = os.environ.get("PDL")  # the PDL mode of every variant (default: run_wgmma's own choice)
notes, rows = [], []
bandwidth = harness.copy_bandwidth()
sms = torch.cuda.get_device_properties(0).multi_processor_count
for name, (n, k, limit) in SHAPES.items():
    weights = [dict(p=w["prepared"], dq=w["dequantized"]) for w in gemm_bench.weight_sets(n, k, 4)]
    p0 = weights[0]["p"]
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = gemm_bench.fp32_reference(x, p0, n, limit)
        row = dict(shape=name, m=m, n=n, k=k, compute_floor_us=2 * m * n * k / 989e12 * 1e6)
        row["cublas_us"] = harness.time_safely([lambda w=w: torch.nn.functional.linear(x, w["dq"]) for w in weights], notes, f"{name} {m} cublas")[0]
        if not limit:
            row["op_us"] = harness.time_safely([lambda w=w: nvfp4_linear(x, w["p"]) for w in weights], notes, f"{name} {m} op")[0]
        for tile_n, splits in VARIANTS:
            label = f"t{tile_n}_s{splits}"
            # "k" / "k<P>": stream-K over the default / P parts; "c<C>" after it: clusters of C CTAs (default 2)
            kind, _, cluster = splits.partition("c")
            options = dict(splits=int(kind)) if kind.isdigit() else dict(stream_k=True, parts=int(kind[1:] or 0) or None)
            if cluster:
                options["cluster_m"] = int(cluster)

            def call(pw, tile_n=tile_n, options=options):
                return gemm_wgmma.run_wgmma(x, pw.weight, pw.block_scale, pw.alpha, n, tile_n=tile_n, swiglu_limit=limit, pdl=PDL,
                                            **options)
            checked = gemm_bench.checked_run(call, p0, ref, notes, f"{name} {m} {label}")
            if not checked:
                continue
            y, row[f"{label}_rel_err"] = checked
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = call(p0)
            static.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            if not torch.equal(static, call(p0)):
                notes.append(f"{name} {m} {label}: graph replay differs from eager")
            row[f"{label}_us"] = harness.time_safely([lambda w=w: call(w["p"]) for w in weights], notes, f"{name} {m} {label}")[0]
        times = {k_[:-3]: v for k_, v in row.items() if k_.startswith("t") and k_.endswith("_us") and v}
        if times:
            best = min(times, key=times.get)
            row.update(best=best, best_us=times[best])
        rows.append(row)
        print(f"{name:15s} M={m:5d} cublas {harness.fmt(row['cublas_us'])} op {harness.fmt(row.get('op_us'))} | "
              + " ".join(f"{lab}:{t:.1f}" for lab, t in sorted(times.items(), key=lambda kv: kv[1])[:6]), flush=True)
    del weights
harness.write_probe("wgmma_split_probe", "scripts/gpu/wgmma_split_probe.py: CUDA-graph replay (harness.time_graph) over 4 rotating weight sets; "
                    "the WGMMA decoder kernel at (tile_n, K splits) against cuBLAS BF16 on the dequantized weight and the op",
                    rows=rows, notes=notes, copy_GBps=bandwidth / 1e9, sm_count=sms)

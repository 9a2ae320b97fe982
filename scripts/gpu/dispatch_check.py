"""GPU host: the op's path at large M against both of its candidates and cuBLAS, in one process: for each shape and
M in ``MS``, the op (``nvfp4_linear``: whatever ``ops.gemm.use_wgmma`` and ``gemm_wgmma.stream_k_pays`` pick), the
WGMMA kernel with its default plan (stream-K where the rule says so), dequantize + cuBLAS (``run_prefill``), and
cuBLAS BF16 on the dequantized weight. The op's output is checked against the fp32 reference, and its graph
replay against eager (bit-equal). CUDA-graph replay over 4 rotating weight sets. Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/dispatch_check.py
Env: MS (default 1024,1536,2048,3072,4096), SHAPES. Writes $OUT/dispatch_check.json and prints a table."""
import os

import torch

from nvfp4lib.bench import gemm as gemm_bench
from nvfp4lib.bench import harness
from nvfp4lib.kernels.sm90 import gemm_prefill, gemm_wgmma
from nvfp4lib.ops.gemm import DECODE_MAX_M, dequantize_sm90, nvfp4_linear, use_wgmma

ALL = {"gate_up": (6144, 7168, None), "down": (7168, 3072, None), "fused_wqa_wkv": (2048, 7168, None), "wo_b": (7168, 16384, None)}
SHAPES = {s: ALL[s] for s in os.environ.get("SHAPES", ",".join(ALL)).split(",")}
MS = [int(v) for v in os.environ.get("MS", "1024,1536,2048,3072,4096").split(",")]
notes, rows = [], []
sms = torch.cuda.get_device_properties(0).multi_processor_count
dense_of = None
for name, n, k, _, _, weights, m, x, ref in gemm_bench.probe_cases(SHAPES, MS):
    if dense_of != name:  # the bf16 weights of this shape, made once (the last shape's freed first)
        dense_of, dense = name, None
        dense = [(dequantize_sm90(p.weight, p.block_scale, n) * p.alpha[:, None]).to(torch.bfloat16) for p in weights]
    tile_n, splits = gemm_wgmma.wgmma_plan(m, n // 16, k, sms)
    path = "wgmma" if use_wgmma(m, n, k, False) else "decode" if m <= DECODE_MAX_M else "prefill"
    row = dict(shape=name, n=n, k=k, m=m, path=path, plan=f"{tile_n}x{splits}",
               stream_k=gemm_wgmma.stream_k_pays(m, n // 16, k, tile_n, splits, sms))
    checked = gemm_bench.checked_run(lambda p: nvfp4_linear(x, p), weights[0], ref, notes, f"{name} {m} op")
    if checked:
        row["op_rel_err"] = checked[1]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = nvfp4_linear(x, weights[0])
        static.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        row["graph_equals_eager"] = bool(torch.equal(static, checked[0]))
    row["op_us"] = harness.time_safely([lambda p=p: nvfp4_linear(x, p) for p in weights], notes, f"{name} {m} op")[0]
    row["wgmma_us"] = harness.time_safely([lambda p=p: gemm_wgmma.run_wgmma(x, p.weight, p.block_scale, p.alpha, n) for p in weights],
                                          notes, f"{name} {m} wgmma")[0]
    row["prefill_us"] = harness.time_safely([lambda p=p: gemm_prefill.run_prefill(x, p.weight, p.block_scale, p.alpha, n) for p in weights],
                                            notes, f"{name} {m} prefill")[0]
    row["cublas_us"] = harness.time_safely([lambda d=d: torch.nn.functional.linear(x, d) for d in dense], notes, f"{name} {m} cublas")[0]
    rows.append(row)
    print(" ".join(f"{key}={harness.fmt(val) if isinstance(val, float) else val}" for key, val in row.items() if key not in ("n", "k")), flush=True)
harness.write_probe("dispatch_check", "scripts/gpu/dispatch_check.py: CUDA-graph replay (harness.time_graph) over 4 rotating weight sets; "
                    "op = nvfp4_linear (the dispatched path), wgmma = run_wgmma with its default plan, prefill = dequantize + cuBLAS, "
                    "cublas = F.linear on the dequantized bf16 weight", rows=rows, notes=notes, sm_count=sms)
print(f"{'shape':14s}{'M':>6s} {'path':8s}{'plan':>7s}{'sk':>4s}{'op':>9s}{'wgmma':>9s}{'prefill':>9s}{'cublas':>9s}{'x cublas':>9s}")
for r in rows:
    print(f"{r['shape']:14s}{r['m']:6d} {r['path']:8s}{r['plan']:>7s}{'y' if r['stream_k'] else '-':>4s}" + "".join(
        f"{harness.fmt(r.get(key)):>9s}" for key in ("op_us", "wgmma_us", "prefill_us", "cublas_us"))
        + (f"{r['cublas_us'] / r['op_us']:9.3f}" if r.get("op_us") and r.get("cublas_us") else ""))

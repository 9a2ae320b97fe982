"""GPU host: the WGMMA prefill kernel (kernels/sm90/gemm_wgmma.py; its first GPU run was this script's, at
457cf16) at its default schedule. Correctness first (rel Frobenius error <= 1e-2, cosine >= 0.9999 against the fp32 reference, fresh
random inputs, NaN-poisoned outputs, both token tiles), then timing under CUDA-graph replay over 4 rotating
weights beside cuBLAS BF16 on the dequantized weight and the current prefill path (dequantize + cuBLAS).
Run there:
  source /tmp/site/env.sh && PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/wgmma_check.py
Writes $OUT/wgmma_check.json (copy it to data/bench/) and prints a table; exit 1 if any correctness case
fails (timings of a failing kernel are not taken)."""
import os
import sys
import time
import traceback

import torch

from nvfp4lib.bench import harness
from nvfp4lib.bench.harness import cosine, rel_error
from nvfp4lib.formats import quantize
from nvfp4lib.kernels.sm90 import gemm_prefill, gemm_wgmma
from nvfp4lib.ops.gemm import dequantize_sm90, prepare_weight, reference_gemm

SHAPES = {"gate_up": (6144, 7168), "down": (7168, 3072)}
CHECK_M = (1, 100, 256, 1000, 4097)
BENCH_M = (256, 1024, 4096, 8192)
TILES = (128, 256)
WEIGHTS = 4  # rotating weight sets (the weights do not stay in L2 between calls)

torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
t0 = time.time()
failures = 0
checks = []
for name, (n, k) in SHAPES.items():
    w = torch.randn(n, k, device="cuda") * 0.02
    w[0, :16] = 0  # an all-zero block
    q = quantize(w)
    p = prepare_weight(q.packed, q.block_scale, [q.global_scale, q.global_scale * 0.5], (n // 2, n - n // 2), layout="sm90")
    for m in CHECK_M:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = reference_gemm(x, q.packed, q.block_scale, p.alpha)
        for tile_n in TILES:
            row = dict(shape=name, n=n, k=k, m=m, tile_n=tile_n)
            try:
                y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                gemm_wgmma.run_wgmma(x, p.weight, p.block_scale, p.alpha, n, out=y, tile_n=tile_n)
                torch.cuda.synchronize()
                r, c = rel_error(y, ref), cosine(y, ref)
                finite = bool(torch.isfinite(y).all())
                ok = r <= 1e-2 and c >= 0.9999 and finite
                row.update(rel_err=r, cosine=c, finite=finite, ok=ok)
            except Exception as exc:  # report and go on: the first GPU run of this kernel
                ok = False
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
                traceback.print_exc()
            failures += not ok
            checks.append(row)
            print(f"check {name} {n}x{k} M={m:5d} tile_n={tile_n} "
                  f"rel={row.get('rel_err', float('nan')):.2e} cos={row.get('cosine', float('nan')):.6f} "
                  f"{'OK' if ok else 'FAIL ' + row.get('error', '')}", flush=True)

timings = []
notes = []
if failures:
    print(f"{failures} correctness failures: timings skipped", flush=True)
else:
    for name, (n, k) in SHAPES.items():
        preps, dense = [], []
        for _ in range(WEIGHTS):
            q = quantize(torch.randn(n, k, device="cuda") * 0.02)
            p = prepare_weight(q.packed, q.block_scale, q.global_scale, layout="sm90")
            preps.append(p)
            dense.append((dequantize_sm90(p.weight, p.block_scale, n) * p.alpha[:, None]).to(torch.bfloat16))
        for m in BENCH_M:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(WEIGHTS)]
            row = dict(shape=name, n=n, k=k, m=m)
            row["cublas_bf16_us"] = harness.time_safely(
                [lambda d=d: torch.nn.functional.linear(x, d) for d in dense], notes, f"cublas {name} M={m}")[0]
            row["prefill_us"] = harness.time_safely(
                [lambda p=p: gemm_prefill.run_prefill(x, p.weight, p.block_scale, p.alpha, n) for p in preps], notes,
                f"prefill {name} M={m}")[0]
            for tile_n in TILES:
                row[f"wgmma_{tile_n}_us"] = harness.time_safely(
                    [lambda p=p, o=o, t=tile_n: gemm_wgmma.run_wgmma(x, p.weight, p.block_scale, p.alpha, n, out=o, tile_n=t)
                     for p, o in zip(preps, outs)], notes, f"wgmma tile_n={tile_n} {name} M={m}")[0]
            row["wgmma_default_tile_n"] = gemm_wgmma.tile_n_for(m)
            flops = 2.0 * m * n * k
            for key in [key for key in row if key.endswith("_us")]:
                if row[key] is not None:
                    row[key.replace("_us", "_tflops")] = flops / row[key] / 1e6
            timings.append(row)
            print(row, flush=True)

    def f(v, spec=".1f"):
        return harness.fmt(v, spec)

    print(f"\n{'shape':8s} {'M':>5s} {'cuBLAS bf16':>12s} {'prefill':>9s} {'wgmma128':>9s} {'wgmma256':>9s} "
          f"{'best/cuBLAS':>11s}  (us; ratio > 1: faster than cuBLAS)")
    for row in timings:
        measured = [row[f"wgmma_{t}_us"] for t in TILES if row[f"wgmma_{t}_us"] is not None]
        best = min(measured) if measured else None
        ratio = row["cublas_bf16_us"] / best if best and row["cublas_bf16_us"] else None
        print(f"{row['shape']:8s} {row['m']:5d} {f(row['cublas_bf16_us']):>12s} {f(row['prefill_us']):>9s} "
              f"{f(row['wgmma_128_us']):>9s} {f(row['wgmma_256_us']):>9s} {f(ratio, '.2f'):>11s}")

payload = harness.run_metadata("scripts/gpu/wgmma_check.py: correctness (rel Frobenius err <= 1e-2, cosine >= 0.9999, "
                               "NaN-poisoned out) then CUDA-graph replay (harness.time_graph, 4 rotating weights)")
payload.update(checks=checks, failures=failures, timings=timings, notes=notes, seconds=time.time() - t0)
path = harness.write_result(os.path.join(os.environ.get("OUT", "/tmp/out"), "wgmma_check.json"), payload)
print(f"wrote {path}; {failures} failures; {time.time() - t0:.0f} s")
sys.exit(1 if failures else 0)

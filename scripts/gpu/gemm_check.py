"""GPU host: correctness sweep of the sm90 W4A16 GEMM (decode kernel, the op's path, bias, ragged N and M),
then the benchmark (python -m nvfp4lib.bench gemm). Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/gemm_check.py [bench args]
Prints one line per case and fails (exit 1) if any case misses rel_err <= 1e-2 / cosine >= 0.9999."""
import os
import sys
import time

import torch

from nvfp4lib.bench.harness import cosine, rel_error
from nvfp4lib.formats import quantize
from nvfp4lib.kernels.sm90 import gemm_decode
from nvfp4lib.ops.gemm import DECODE_MAX_M, dequantize_rows, nvfp4_linear, prepare_weight, use_wgmma

torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
failures = 0
t0 = time.time()
cases = [((6144, 7168), (1, 3, 8, 9, 16, 17, 64, 65, 300)), ((7168, 3072), (1, 16, 64, 256)),
         ((2048, 7168), (1, 16, 64, 1024)), ((40, 512), (1, 5, 16, 33, 100))]
for (n, k), ms in cases:
    w = torch.randn(n, k, device="cuda") * 0.02
    w[0, :16] = 0  # an all-zero block
    q = quantize(w)
    segments = (n // 2, n - n // 2)
    prepared = prepare_weight(q.packed, q.block_scale, [q.global_scale, q.global_scale * 0.5], segments, layout="sm90")
    wref = dequantize_rows(q.packed, q.block_scale) * prepared.alpha[:, None]
    for m in ms:
        for with_bias in (False, True):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if with_bias else None
            ref = x.float() @ wref.t() + (bias.float() if with_bias else 0)
            if m <= DECODE_MAX_M:
                y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                gemm_decode.run_decode(x, prepared.weight, prepared.block_scale, prepared.alpha, n, bias, out=y)
                y2 = nvfp4_linear(x, prepared, bias)
                y3 = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                gemm_decode.run_decode(x, prepared.weight, prepared.block_scale, prepared.alpha, n, bias, out=y3,
                                       prefetch_x=not gemm_decode.DEFAULTS["prefetch_x"], warps_per_sm=32)
                r3 = rel_error(y3, ref)
                failures += not (r3 <= 1e-2 and bool(torch.isfinite(y3).all()))
                try:  # the shared-memory activation variant (optional: reported, not counted)
                    y4 = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                    gemm_decode.run_decode(x, prepared.weight, prepared.block_scale, prepared.alpha, n, bias, out=y4, x_smem=True)
                    r4 = rel_error(y4, ref)
                    print(f"   x_smem variant rel={r4:.2e} {'OK' if r4 <= 1e-2 and bool(torch.isfinite(y4).all()) else 'FAIL'}")
                except Exception as exc:
                    print(f"   x_smem variant ERROR {type(exc).__name__}: {exc}"[:300])
                if use_wgmma(m, n, k, with_bias):  # the op runs the WGMMA kernel here: its own accuracy, and repeatable
                    r2 = rel_error(y2, ref)
                    failures += not (r2 <= 1e-2 and cosine(y2, ref) >= 0.9999 and bool(torch.isfinite(y2).all()))
                    print(f"   op (WGMMA kernel) rel={r2:.2e}")
                    same = torch.equal(y2, nvfp4_linear(x, prepared, bias))
                else:  # the op is the decode kernel
                    same = torch.equal(y, y2)
            else:
                y = nvfp4_linear(x, prepared, bias)
                same = True
            torch.cuda.synchronize()
            r, c = rel_error(y, ref), cosine(y, ref)
            ok = r <= 1e-2 and c >= 0.9999 and same and bool(torch.isfinite(y).all())
            failures += not ok
            print(f"{n}x{k} M={m:5d} bias={with_bias!s:5s} rel={r:.2e} cos={c:.6f} repeat_equal={same} {'OK' if ok else 'FAIL'}", flush=True)
# fused gate_up + clamped SwiGLU (decode epilogue and the prefill fallback) against fp32
from nvfp4lib.ops.gemm import clamped_swiglu_reference

for n, k in ((6144, 7168), (64, 512)):
    half = n // 2
    w = torch.randn(n, k, device="cuda") * 0.02
    qg, qu = quantize(w[:half]), quantize(w[half:] * 3)
    prepared = prepare_weight(torch.cat([qg.packed, qu.packed]), torch.cat([qg.block_scale, qu.block_scale]),
                              [qg.global_scale, qu.global_scale], [half, half], layout="sm90")
    wref = torch.cat([dequantize_rows(qg.packed, qg.block_scale), dequantize_rows(qu.packed, qu.block_scale)]) * prepared.alpha[:, None]
    for m in (1, 7, 16, 64, 100):
        for limit in (10.0, float("inf")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 4
            ref = clamped_swiglu_reference(x.float() @ wref.t(), limit)
            y = torch.ops.nvfp4lib.gemm_w4a16_swiglu(x, prepared.weight, prepared.block_scale, prepared.alpha, n, limit)
            r, c = rel_error(y, ref), cosine(y, ref)
            ok = r <= 1e-2 and c >= 0.9999 and bool(torch.isfinite(y).all())
            failures += not ok
            print(f"swiglu {n}x{k} M={m:4d} limit={limit} rel={r:.2e} cos={c:.6f} {'OK' if ok else 'FAIL'}", flush=True)
print(f"correctness: {failures} failures ({time.time() - t0:.0f} s)", flush=True)
if failures:
    sys.exit(1)
from nvfp4lib.bench.gemm import main

sys.exit(main(sys.argv[1:]))

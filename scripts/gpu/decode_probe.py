"""GPU host: the decode kernel's weight ring depth (quads in flight per warp) against warps per SM and x_smem.

For gate_up, down, fused_wqa_wkv and the shared expert's gate_up with the fused SwiGLU, at M in ``MS``
(default 1,16): every (depth, warps_per_sm, x_smem) of ``DEPTHS`` x ``WARPS`` x (False, True), CUDA-graph
replay over 4 rotating weight sets (harness.time_graph), accuracy of each variant against the fp32
reference; cuBLAS BF16 and the HBM floor beside them. Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/decode_probe.py
Writes $OUT/decode_probe.json and prints the best variant per case."""
import os

import torch

from nvfp4lib import moe
from nvfp4lib.bench import harness
from nvfp4lib.formats import quantize
from nvfp4lib.kernels.sm90 import gemm_decode
from nvfp4lib.ops.gemm import dequantize_sm90, prepare_weight

MS = [int(v) for v in os.environ.get("MS", "1,16").split(",")]
DEPTHS = [int(v) for v in os.environ.get("DEPTHS", "2,3,4,6").split(",")]
WARPS = [int(v) for v in os.environ.get("WARPS", "8,12,16").split(",")]
SMEM = [bool(int(v)) for v in os.environ.get("XSMEM", "0,1").split(",")]
SHAPES = {"gate_up": (6144, 7168, None), "down": (7168, 3072, None), "fused_wqa_wkv": (2048, 7168, None),
          "gate_up_swiglu": (6144, 7168, 10.0)}
bandwidth = harness.copy_bandwidth()
notes, rows = [], []
for name, (n, k, limit) in SHAPES.items():
    preps, dense = [], []
    for _ in range(4):
        q = quantize(torch.randn(n, k, device="cuda") * 0.02)
        p = prepare_weight(q.packed, q.block_scale, q.global_scale, layout="sm90")
        preps.append(p)
        dense.append((dequantize_sm90(p.weight, p.block_scale, n) * p.alpha[:, None]).to(torch.bfloat16))
    out_n = n // 2 if limit else n
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ dense[0].float().t()
        if limit:
            ref = moe.clamped_swiglu(ref, limit).float()
        outs = [torch.empty(m, out_n, device="cuda", dtype=torch.bfloat16) for _ in preps]
        row = dict(shape=name, m=m, n=n, k=k, swiglu=limit is not None,
                   floor_us=harness.hbm_floor_us(n * k * 9 / 16 + 2 * m * (k + out_n), bandwidth))
        row["cublas_us"] = harness.time_safely([lambda d=d: torch.nn.functional.linear(x, d) for d in dense], notes, f"cublas {name} {m}")[0]
        for depth in DEPTHS:
            for warps in WARPS:
                for xs in SMEM:
                    key = f"d{depth}_w{warps}_{'smem' if xs else 'gmem'}"
                    kw = dict(swiglu_limit=limit, warps_per_sm=warps, x_smem=xs, depth=depth)
                    try:
                        y = gemm_decode.run_decode(x, preps[0].weight, preps[0].block_scale, preps[0].alpha, out_n, **kw)
                        row[key + "_rel_err"] = harness.rel_error(y, ref)
                        row[key + "_us"] = harness.time_safely(
                            [lambda p=p, o=o: gemm_decode.run_decode(x, p.weight, p.block_scale, p.alpha, out_n, out=o, **kw)
                             for p, o in zip(preps, outs)], notes, f"{key} {name} {m}")[0]
                    except Exception as exc:  # a variant that does not compile or run is recorded, not fatal
                        notes.append(f"{key} {name} {m}: {type(exc).__name__}: {exc}"[:300])
        times = {k_[:-3]: v for k_, v in row.items() if k_.startswith("d") and k_.endswith("_us") and v}
        best = min(times, key=times.get) if times else None
        base = times.get(f"d2_w{gemm_decode.DEFAULTS['swiglu_warps_per_sm' if limit else 'warps_per_sm']}_gmem")
        row.update(best=best, best_us=times.get(best), default_us=base)
        rows.append(row)
        print(f"{name:15s} M={m:3d} floor {row['floor_us']:.1f} cuBLAS {harness.fmt(row['cublas_us'])} default {harness.fmt(base)} "
              f"best {best} {harness.fmt(times.get(best))} err {row.get(best + '_rel_err') if best else None}", flush=True)
payload = harness.run_metadata("scripts/gpu/decode_probe.py: CUDA-graph replay (harness.time_graph), 4 rotating weight sets; "
                               "decode kernel variants (depth = weight ring slots, warps_per_sm, x_smem); cuBLAS BF16 in the same "
                               "process; floor = NVFP4 weight + activation bytes / measured copy bandwidth")
payload.update(rows=rows, notes=notes, copy_GBps=bandwidth / 1e9)
harness.write_result(os.path.join(os.environ.get("OUT", "/tmp/out"), "decode_probe.json"), payload)
print(f"{len(notes)} notes", *notes[:10], sep="\n")

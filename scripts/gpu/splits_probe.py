"""GPU host: the decode kernel's time against its split-K count, for the shapes of the decode targets.

For gate_up, down, fused_wqa_wkv and the shared expert's gate_up with the SwiGLU at M in ``MS`` (default 1,
16), every split count in ``SPLITS`` (explicit ``splits=``; the default heuristic's choice is marked),
CUDA-graph replay over 4 rotating weight sets (harness.time_graph); every variant checked against the
default's result (splits change the summation, so equality is to rounding: rel err <= 1e-2). Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/splits_probe.py
Writes $OUT/splits_probe.json."""
import os

import torch

from nvfp4lib.bench import harness
from nvfp4lib.formats import quantize
from nvfp4lib.kernels.sm90 import gemm_decode
from nvfp4lib.ops.gemm import prepare_weight

MS = [int(v) for v in os.environ.get("MS", "1,16").split(",")]
SPLITS = [int(v) for v in os.environ.get("SPLITS", "1,2,3,4,5,6,7,8,10,12,14").split(",")]
notes, rows = [], []
bandwidth = harness.copy_bandwidth()
sms = torch.cuda.get_device_properties(0).multi_processor_count
for name, (n, k, limit) in {"gate_up": (6144, 7168, None), "down": (7168, 3072, None), "fused_wqa_wkv": (2048, 7168, None),
                            "gate_up_swiglu": (6144, 7168, 10.0)}.items():
    weights = []
    for _ in range(4):
        q = quantize(torch.randn(n, k, device="cuda") * 0.02)
        weights.append(prepare_weight(q.packed, q.block_scale, q.global_scale, layout="sm90"))
    out_n = n // 2 if limit else n
    quads = k // 256
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        tiles = gemm_decode.tiles_for(m)
        warp_groups = out_n // 16
        default = gemm_decode.splits_for_wave(warp_groups, quads, -(-m // (8 * tiles)), sms,
                                              gemm_decode.resident_warps(limit is not None, tiles))[1]
        ref = gemm_decode.run_decode(x, weights[0].weight, weights[0].block_scale, weights[0].alpha, out_n, swiglu_limit=limit)
        row = dict(shape=name, m=m, n=n, k=k, default_splits=default, floor_us=harness.hbm_floor_us(n * k * 9 / 16 + 2 * m * (n + k), bandwidth))
        seen = set()
        for s in SPLITS + [default]:
            eff = -(-quads // -(-quads // s))
            if eff in seen:
                continue
            seen.add(eff)
            y = gemm_decode.run_decode(x, weights[0].weight, weights[0].block_scale, weights[0].alpha, out_n, swiglu_limit=limit, splits=eff)
            row[f"s{eff}_rel_err"] = harness.rel_error(y, ref)
            row[f"s{eff}_us"] = harness.time_safely(
                [lambda p=p: gemm_decode.run_decode(x, p.weight, p.block_scale, p.alpha, out_n, swiglu_limit=limit, splits=eff)
                 for p in weights], notes, f"{name} {m} s{eff}")[0]
        times = {int(k_[1:-3]): v for k_, v in row.items() if k_.startswith("s") and k_.endswith("_us") and v}
        best = min(times, key=times.get)
        row.update(best_splits=best, best_us=times[best], default_us=times.get(default))
        rows.append(row)
        print(f"{name:15s} M={m:3d} floor {row['floor_us']:5.2f} default s{default} {harness.fmt(times.get(default))} best s{best} "
              f"{harness.fmt(times[best])} | " + " ".join(f"s{s_}:{t:.1f}" for s_, t in sorted(times.items())), flush=True)
    del weights
harness.write_probe("splits_probe", "scripts/gpu/splits_probe.py: CUDA-graph replay (harness.time_graph) over 4 rotating weight sets; the "
                    "decode kernel at explicit split-K counts; floor = NVFP4 weight + activation bytes / measured copy bandwidth",
                    rows=rows, notes=notes, copy_GBps=bandwidth / 1e9, sm_count=sms)

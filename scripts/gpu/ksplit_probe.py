"""GPU host: the decode kernel with its K range split INSIDE the CTA (``rows`` row groups x ``ksplit`` warps,
partial sums through shared memory) against the default launch (8 row groups a CTA, split K across the grid).

For gate_up, down, fused_wqa_wkv and gate_up with the SwiGLU and wo_b at M in ``MS`` (default 1,8,16,32,64), every
(rows, ksplit, grid splits, tiles) in the sweep below, CUDA-graph replay over 4 rotating weight sets
(harness.time_graph). Every variant is checked against an fp32 reference over the same dequantized weight
(rel err <= 1e-2, cosine >= 0.9999). Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/ksplit_probe.py
Writes $OUT/ksplit_probe.json."""
import os

import torch

from nvfp4lib.bench import gemm as gemm_bench
from nvfp4lib.bench import harness
from nvfp4lib.kernels.sm90 import gemm_decode

MS = [int(v) for v in os.environ.get("MS", "1,16,32,48,64").split(",")]
SHAPES = {"gate_up": (6144, 7168, None), "down": (7168, 3072, None), "fused_wqa_wkv": (2048, 7168, None),
          "gate_up_swiglu": (6144, 7168, 10.0), "wo_b": (7168, 16384, None)}
SWEEP = os.environ.get("SWEEP", "1") == "1"  # 0: only the op's plan, the grid split and their load variants
WAVES = int(os.environ.get("WAVES", "1"))  # CTA shapes up to this many waves (2: where one wave holds none)
SHAPES = {k: v for k, v in SHAPES.items() if k in os.environ.get("SHAPES", ",".join(SHAPES)).split(",")}


def cta_shapes(row_groups, quads, token_blocks, sms, swiglu, tiles):
    """Every (rows, ksplit) with rows in 1, 2, 4 and up to 16 warps whose CTAs fit in ``WAVES`` waves."""
    regs = gemm_decode.KSPLIT_REGISTERS[(swiglu, tiles)]
    for rows in (1, 2, 4):
        for ksplit in range(2, min(quads, 16 // rows) + 1):
            warps = rows * ksplit
            resident = min(65536 // (regs * 32 * warps), 64 // warps, 32)
            if resident and token_blocks * -(-row_groups // rows) <= WAVES * sms * resident:
                yield rows, ksplit


notes, rows_out = [], []
bandwidth = harness.copy_bandwidth()
sms = torch.cuda.get_device_properties(0).multi_processor_count


for name, n, k, limit, out_n, weights, m, x, ref in gemm_bench.probe_cases(SHAPES, MS):
    row = dict(shape=name, m=m, n=n, k=k, plan=gemm_decode.auto_ksplit(out_n // 16, k // 256, m, sms, limit is not None),
               floor_us=harness.hbm_floor_us(n * k * 9 / 16 + 2 * m * (n + k), bandwidth))
    variants = [("default", {}), ("grid", dict(ksplit=1)), ("default_px", dict(prefetch_x=True)),
                ("default_stream", dict(stream_loads=True)), ("grid_stream", dict(ksplit=1, stream_loads=True))]
    for tiles in ([1, 2] if m > 8 and SWEEP else [1] if SWEEP else []):
        tb = -(-m // (8 * tiles))
        for r, s in cta_shapes(out_n // 16, k // 256, tb, sms, limit is not None, tiles):
            variants.append((f"t{tiles}_r{r}_k{s}", dict(tiles=tiles, rows=r, ksplit=s, splits=1)))
        if limit:  # the paired SwiGLU kernel: CTAs of a gate and an up row group x ksplit
            for s in range(2, 9):
                if tb * (out_n // 16) <= WAVES * sms * gemm_decode.ksplit_ctas(False, tiles, 2 * s):
                    variants.append((f"t{tiles}_p{s}", dict(tiles=tiles, rows=2, ksplit=s, splits=1, paired=True)))
    gemm_bench.time_decode_variants(row, variants, x, weights, ref, out_n, limit, notes, f"{name} {m}", keep_error=True)
    times = {k_[:-3]: v for k_, v in row.items() if k_.endswith("_us") and k_ != "floor_us" and v}
    best = min(times, key=times.get)
    row.update(best=best, best_us=times[best], default_us=times.get("default"))
    rows_out.append(row)
    top = sorted(times.items(), key=lambda kv: kv[1])[:5]
    print(f"{name:15s} M={m:3d} floor {row['floor_us']:5.2f} default {row['plan']} {harness.fmt(times.get('default'))} "
          f"grid {harness.fmt(times.get('grid'))} | "
          + " ".join(f"{lab}:{t:.1f}" for lab, t in top), flush=True)
harness.write_probe("ksplit_probe", "scripts/gpu/ksplit_probe.py: CUDA-graph replay (harness.time_graph) over 4 rotating weight sets; "
                    "the decode kernel with rows x ksplit warps a CTA (partial sums in shared memory) and grid "
                    "splits z, against the default launch; floor = NVFP4 weight + activation bytes / measured copy bandwidth",
                    rows=rows_out, notes=notes, copy_GBps=bandwidth / 1e9, sm_count=sms)

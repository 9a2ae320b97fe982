"""GPU host: named launch-option variants of the decode kernel (or, with KERNEL=wgmma, the WGMMA kernel),
timed against its default launch.

Env VARIANTS: ``label:key=value:key=value;label2:...`` (run_decode / run_wgmma keyword arguments; ints, True /
False / None, or words), MS (default 8,16), SHAPES (default gate_up,down,fused_wqa_wkv,wo_b). Every variant is checked
against the fp32 reference (gemm_bench.checked_run; timing probes, ``probe=...``, are not) before it is timed as the benchmark times
(harness.time_graph: 4 rotating weight sets, CUDA-graph replay). Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/decode_variants.py
Writes $OUT/decode_variants.json (KERNEL=wgmma: $OUT/wgmma_variants.json)."""
import os

from nvfp4lib.bench import gemm as gemm_bench
from nvfp4lib.bench import harness

KERNEL = os.environ.get("KERNEL", "decode")
MS = [int(v) for v in os.environ.get("MS", "8,16").split(",")]
SHAPES = {"gate_up": (6144, 7168, None), "down": (7168, 3072, None), "fused_wqa_wkv": (2048, 7168, None),
          "gate_up_swiglu": (6144, 7168, 10.0), "wo_b": (7168, 16384, None)}
SHAPES = {k: v for k, v in SHAPES.items() if k in os.environ.get("SHAPES", "gate_up,down,fused_wqa_wkv,wo_b").split(",")}


VARIANTS = [("default", {})]
for spec in filter(None, os.environ.get("VARIANTS", "").split(";")):
    label, *options = spec.split(":")
    VARIANTS.append((label, harness.parse_kwargs(options)))

notes, rows_out = [], []
bandwidth = harness.copy_bandwidth()
for name, n, k, limit, out_n, weights, m, x, ref in gemm_bench.probe_cases(SHAPES, MS):
    row = dict(shape=name, m=m, n=n, k=k, floor_us=harness.hbm_floor_us(n * k * 9 / 16 + 2 * m * (n + k), bandwidth))
    gemm_bench.time_decode_variants(row, VARIANTS, x, weights, ref, out_n, limit, notes, f"{name} {m}", kernel=KERNEL)
    rows_out.append(row)
    print(f"{name:15s} M={m:3d} floor {row['floor_us']:5.2f} " + " ".join(f"{lab}:{harness.fmt(row.get(lab + '_us'))}" for lab, _ in VARIANTS),
          flush=True)
harness.write_probe(f"{KERNEL}_variants", "scripts/gpu/decode_variants.py: CUDA-graph replay (harness.time_graph) over 4 rotating weight "
                    f"sets; {KERNEL} launch-option variants against the default launch; floor = NVFP4 weight + activation bytes / "
                    "measured copy bandwidth", rows=rows_out, notes=notes, copy_GBps=bandwidth / 1e9,
                    variants={label: {k: str(v) for k, v in kw.items()} for label, kw in VARIANTS})

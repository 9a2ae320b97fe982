"""GPU host: what limits the WGMMA prefill kernel? Times the real kernel beside two timing-only probes
(wrong results on purpose): "own" (each lane decodes its own words from one 16-byte load: the cost with a
weight layout in WGMMA's standard k order) and "nodecode" (no weight loads or decode: the x pipeline and
the MMAs alone), with cuBLAS BF16 and dequantize + cuBLAS in the same process. CUDA-graph replay over 4
rotating weights. Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/wgmma_probe.py
Writes $OUT/wgmma_probe.json and prints a table."""
import os
import sys

import torch

from nvfp4lib.bench import harness
from nvfp4lib.formats import quantize
from nvfp4lib.kernels.sm90 import gemm_prefill, gemm_wgmma
from nvfp4lib.ops.gemm import dequantize_sm90, prepare_weight

SHAPES = {"gate_up": (6144, 7168), "down": (7168, 3072)}
CASES = [(int(m), int(t)) for m, t in (c.split(":") for c in (sys.argv[1:] or ["1024:128", "1024:256", "4096:256", "8192:256"]))]
PROBES = os.environ.get("PROBES", "full,own,nodecode").split(",")
STAGES = [None if s == "d" else int(s) for s in os.environ.get("STAGES", "d").split(",")]
PINGPONG = [bool(int(v)) for v in os.environ.get("PINGPONG", "1,0").split(",")]
notes, rows = [], []
for name, (n, k) in SHAPES.items():
    preps, dense = [], []
    for _ in range(4):
        q = quantize(torch.randn(n, k, device="cuda") * 0.02)
        p = prepare_weight(q.packed, q.block_scale, q.global_scale, layout="sm90")
        preps.append(p)
        dense.append((dequantize_sm90(p.weight, p.block_scale, n) * p.alpha[:, None]).to(torch.bfloat16))
    for m in sorted({m for m, _ in CASES}):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in preps]
        row = dict(shape=name, n=n, k=k, m=m)
        row["cublas_us"] = harness.time_safely([lambda d=d: torch.nn.functional.linear(x, d) for d in dense], notes, f"cublas {name} {m}")[0]
        row["dequant_cublas_us"] = harness.time_safely(
            [lambda p=p: gemm_prefill.run_prefill(x, p.weight, p.block_scale, p.alpha, n) for p in preps], notes, f"prefill {name} {m}")[0]
        for mm, tile_n in CASES:
            if mm != m:
                continue
            for probe in PROBES:
                for st in STAGES:
                    for pp in PINGPONG:
                        key = f"{probe}_t{tile_n}" + (f"_s{st}" if st else "") + ("_pp" if pp else "")
                        # "decoder[_noload|_nofence][@ahead][^tile_m][%cluster_m]": the decoder schedule (a real
                        # kernel) and its timing probes, e.g. "decoder@4^256%2"
                        dec = probe.startswith("decoder")
                        spec, _, cluster = probe.partition("%")
                        spec, _, tile_m = spec.partition("^")
                        name_, _, ahead = spec.partition("@")
                        kw = (dict(schedule="decoder", probe=name_, ahead=int(ahead) if ahead else None,
                                   tile_m=int(tile_m) if tile_m else None, cluster_m=int(cluster) if cluster else None) if dec
                              else dict(probe=probe, pingpong=pp, schedule="register"))
                        if dec and pp != PINGPONG[0]:
                            continue
                        if dec:
                            key = (f"{name_}{'_a' + ahead if ahead else ''}{'_m' + tile_m if tile_m else ''}{'_c' + cluster if cluster else ''}"
                                   f"_t{tile_n}" + (f"_s{st}" if st else ""))
                        row[key + "_us"] = harness.time_safely(
                            [lambda p=p, o=o, st=st, kw=kw: gemm_wgmma.run_wgmma(
                                x, p.weight, p.block_scale, p.alpha, n, out=o, tile_n=tile_n, stages=st, **kw)
                             for p, o in zip(preps, outs)], notes, f"{key} {name} {m}")[0]
        rows.append(row)
        print(" ".join(f"{k}={harness.fmt(v) if isinstance(v, float) else v}" for k, v in row.items()), flush=True)
harness.write_probe("wgmma_probe", "scripts/gpu/wgmma_probe.py: CUDA-graph replay (harness.time_graph), 4 rotating weights; "
                    "probes own/nodecode/noload/sidecar give wrong results on purpose (timing only); decoder = the decoder schedule",
                    rows=rows, notes=notes)

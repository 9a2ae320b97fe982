"""GPU host: the prefill path's dequantization kernel (sm90 layout -> bf16), plain stores against coalesced
stores (pieces exchanged with shuffles so every store fills whole 32-byte sectors). Both must give identical
bytes; each is timed under CUDA-graph replay over 4 rotating weights, beside the traffic floor (4.5-bit read
+ bf16 written, at the measured copy bandwidth).

Run there: source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/dequant_store.py
Writes $OUT/dequant_store.json (copy it to data/bench/); exit 1 if the two store patterns differ.
"""
import os
import sys

import torch

from nvfp4lib.bench.harness import copy_bandwidth, hbm_floor_us, run_metadata, time_graph, write_result
from nvfp4lib.kernels.sm90.gemm_prefill import dequantize_to_bf16
from nvfp4lib.ops.gemm import prepare_weight

SHAPES = {"gate_up": (6144, 7168), "down": (7168, 3072), "wo_b": (7168, 16384), "wo_a (whole)": (16384, 4096)}
bw = copy_bandwidth()
rows, failures = [], 0
for name, (n, k) in SHAPES.items():
    weights = []
    for _ in range(4):
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        block = (1 + 447 * torch.rand(n, k // 16, device="cuda")).to(torch.float8_e4m3fn)
        weights.append(prepare_weight(packed, block, 1e-4, layout="sm90"))
    p = weights[0]
    same = torch.equal(dequantize_to_bf16(p.weight, p.block_scale, p.alpha, n, coalesced=False),
                       dequantize_to_bf16(p.weight, p.block_scale, p.alpha, n, coalesced=True))
    failures += not same
    floor = hbm_floor_us(n * k * 9 // 16 + n * k * 2, bw)
    row = {"shape": name, "n": n, "k": k, "identical": same, "floor_us": floor}
    for coalesced in (False, True):
        us = time_graph([lambda w=w: dequantize_to_bf16(w.weight, w.block_scale, w.alpha, n, coalesced=coalesced) for w in weights])
        row["coalesced_us" if coalesced else "plain_us"] = us
    rows.append(row)
    print(f"{name:<14} plain {row['plain_us']:8.1f} us  coalesced {row['coalesced_us']:8.1f} us  floor {floor:7.1f} us  identical {same}", flush=True)

payload = run_metadata("dequantize_to_bf16 under CUDA-graph replay (harness.time_graph), 4 rotating random NVFP4 weights; "
                       "floor = (N*K*9/16 read + N*K*2 written) / measured copy bandwidth")
payload.update(copy_bandwidth_gbs=bw / 1e9, rows=rows)
write_result(os.path.join(os.environ.get("OUT", "/tmp/out"), "dequant_store.json"), payload)
sys.exit(1 if failures else 0)

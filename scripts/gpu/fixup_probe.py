"""GPU host: the decode kernel's split-K sum with its partials loaded one split at a time (FIXUP_UNROLL = 1,
the former loop) against 8 at a time, A/B in one process on one card. CUDA-graph replay over 4 rotating
weight sets (harness.time_graph); gate_up, down, fused_wqa_wkv at M in 1, 16, 64, the shared expert's
gate_up with the SwiGLU, the MoE decode path; results of both must be bit-equal. Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/fixup_probe.py
Writes $OUT/fixup_probe.json."""
import os

import torch

from nvfp4lib import moe
from nvfp4lib.bench import harness
from nvfp4lib.bench.moe import random_experts
from nvfp4lib.formats import quantize
from nvfp4lib.kernels.sm90 import gemm_decode
from nvfp4lib.ops.gemm import prepare_weight

UNROLLS = [int(v) for v in os.environ.get("UNROLLS", "1,8").split(",")]
notes, rows = [], []
bandwidth = harness.copy_bandwidth()


def prepared(n, k):
    q = quantize(torch.randn(n, k, device="cuda") * 0.02)
    return prepare_weight(q.packed, q.block_scale, q.global_scale, layout="sm90")


def record(case, m, fns, floor_bytes):
    row = dict(case=case, m=m, floor_us=harness.hbm_floor_us(floor_bytes, bandwidth))
    outs = []
    for unroll in UNROLLS:
        gemm_decode.FIXUP_UNROLL = unroll  # part of the compile key: each value compiles its own kernel
        outs.append(fns[0]())
        row[f"unroll{unroll}_us"] = harness.time_safely(fns, notes, f"{case} {m} unroll={unroll}")[0]
    row["equal"] = all(torch.equal(outs[0], o) for o in outs[1:])
    rows.append(row)
    print(f"{case:16s} M={m:3d} floor {row['floor_us']:6.2f} " + " ".join(f"u{u} {harness.fmt(row[f'unroll{u}_us'])}" for u in UNROLLS)
          + f" equal {row['equal']}", flush=True)


for name, (n, k, limit) in {"gate_up": (6144, 7168, None), "down": (7168, 3072, None), "fused_wqa_wkv": (2048, 7168, None),
                            "gate_up_swiglu": (6144, 7168, 10.0)}.items():
    weights = [prepared(n, k) for _ in range(4)]
    out_n = n // 2 if limit else n
    for m in (1, 16, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        record(name, m, [lambda p=p: gemm_decode.run_decode(x, p.weight, p.block_scale, p.alpha, out_n, swiglu_limit=limit)
                         for p in weights], n * k * 9 / 16 + 2 * m * (n + k))
    del weights

sets = [moe.MoEWeights(random_experts(48, 6144, 7168, "cuda", segments=2), random_experts(48, 7168, 3072, "cuda")) for _ in range(4)]
tokens = 8
ids = torch.stack([torch.randperm(48)[:6] for _ in range(tokens)]).cuda()
routing = moe.route(ids, torch.rand(tokens, 6, device="cuda"), 48)
offsets = routing.offsets.to(torch.int32)
xs = torch.randn(tokens * 6, 7168, device="cuda", dtype=torch.bfloat16)


def moe_decode(w):
    gu, dn = w.gate_up, w.down
    h = gemm_decode.run_grouped_decode(xs, offsets, gu.weight, gu.block_scale, gu.alpha, gu.n // 2, tokens, swiglu_limit=10.0)
    return gemm_decode.run_grouped_decode(h, offsets, dn.weight, dn.block_scale, dn.alpha, dn.n, tokens)


record("moe_decode", tokens, [lambda w=w: moe_decode(w) for w in sets], len(set(ids.flatten().tolist())) * 3 * 3072 * 7168 * 9 / 16)
payload = harness.run_metadata("scripts/gpu/fixup_probe.py: CUDA-graph replay (harness.time_graph) over 4 rotating weight sets; the "
                               "decode kernel's split-K partials loaded FIXUP_UNROLL at a time; floor = NVFP4 weight (+ activation) "
                               "bytes / measured copy bandwidth")
payload.update(rows=rows, notes=notes, copy_GBps=bandwidth / 1e9)
harness.write_result(os.path.join(os.environ.get("OUT", "/tmp/out"), "fixup_probe.json"), payload)
print(f"{len(notes)} notes", *notes[:10], sep="\n")

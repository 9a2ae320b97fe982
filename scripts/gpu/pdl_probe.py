"""GPU host: the decode kernels with and without programmatic dependent launch (PDL).

CUDA-graph replay over 4 rotating weight sets (harness.time_graph: each graph holds back-to-back calls, so
with PDL a call's CTAs become resident while the previous call runs). Cases: the decode GEMM for gate_up,
down, fused_wqa_wkv at M in ``MS``; the shared expert (gate_up with the fused SwiGLU, then down) at M = 1;
the MoE decode expert path (8 tokens top-6 over 48 experts: two grouped launches). Each case also checks
that the PDL result equals the plain one bit for bit. Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/pdl_probe.py
Writes $OUT/pdl_probe.json and prints a table."""
import os

import torch

from nvfp4lib import moe
from nvfp4lib.bench import harness
from nvfp4lib.bench.moe import random_experts
from nvfp4lib.formats import quantize
from nvfp4lib.kernels.sm90 import gemm_decode
from nvfp4lib.ops.gemm import prepare_weight

MS = [int(v) for v in os.environ.get("MS", "1,16,64").split(",")]
SHAPES = {"gate_up": (6144, 7168), "down": (7168, 3072), "fused_wqa_wkv": (2048, 7168)}
notes, rows = [], []
bandwidth = harness.copy_bandwidth()


def prepared(n, k):
    q = quantize(torch.randn(n, k, device="cuda") * 0.02)
    return prepare_weight(q.packed, q.block_scale, q.global_scale, layout="sm90")


def record(case, m, fns_for, floor_bytes):
    row = dict(case=case, m=m, floor_us=harness.hbm_floor_us(floor_bytes, bandwidth))
    outs = {}
    for pdl in (False, True):
        fns = fns_for(pdl)
        outs[pdl] = fns[0]()
        row[f"{'pdl' if pdl else 'plain'}_us"] = harness.time_safely(fns, notes, f"{case} {m} pdl={pdl}")[0]
    row["equal"] = bool(torch.equal(outs[False], outs[True]))
    rows.append(row)
    print(f"{case:16s} M={m:3d} floor {row['floor_us']:6.2f} plain {harness.fmt(row['plain_us'])} pdl {harness.fmt(row['pdl_us'])} "
          f"equal {row['equal']}", flush=True)


for name, (n, k) in SHAPES.items():
    weights = [prepared(n, k) for _ in range(4)]
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        record(name, m, lambda pdl: [lambda p=p: gemm_decode.run_decode(x, p.weight, p.block_scale, p.alpha, n, pdl=pdl)
                                     for p in weights], n * k * 9 / 16 + 2 * m * (n + k))
    del weights

experts = [(prepared(6144, 7168), prepared(7168, 3072)) for _ in range(4)]
x = torch.randn(1, 7168, device="cuda", dtype=torch.bfloat16)


def shared_expert(e, pdl):
    h = gemm_decode.run_decode(x, e[0].weight, e[0].block_scale, e[0].alpha, 3072, swiglu_limit=10.0, pdl=pdl)
    return gemm_decode.run_decode(h, e[1].weight, e[1].block_scale, e[1].alpha, 7168, pdl=pdl)


record("shared_expert", 1, lambda pdl: [lambda e=e: shared_expert(e, pdl) for e in experts], 3 * 3072 * 7168 * 9 / 16)
del experts

sets = [moe.MoEWeights(random_experts(48, 6144, 7168, "cuda", segments=2), random_experts(48, 7168, 3072, "cuda")) for _ in range(4)]
tokens = 8
ids = torch.stack([torch.randperm(48)[:6] for _ in range(tokens)]).cuda()
routing = moe.route(ids, torch.rand(tokens, 6, device="cuda"), 48)
xs = torch.randn(tokens * 6, 7168, device="cuda", dtype=torch.bfloat16)
touched = len(set(ids.flatten().tolist()))


def moe_decode(w, pdl):
    gu, dn = w.gate_up, w.down
    h = gemm_decode.run_grouped_decode(xs, routing.offsets.to(torch.int32), gu.weight, gu.block_scale, gu.alpha, gu.n // 2, tokens,
                                       swiglu_limit=10.0, pdl=pdl)
    return gemm_decode.run_grouped_decode(h, routing.offsets.to(torch.int32), dn.weight, dn.block_scale, dn.alpha, dn.n, tokens, pdl=pdl)


record("moe_decode", tokens, lambda pdl: [lambda w=w: moe_decode(w, pdl) for w in sets], touched * 3 * 3072 * 7168 * 9 / 16)
payload = harness.run_metadata("scripts/gpu/pdl_probe.py: CUDA-graph replay (harness.time_graph) over 4 rotating weight sets; decode "
                               "kernels launched with and without programmatic dependent launch; floor = NVFP4 weight (+ activation) "
                               "bytes / measured copy bandwidth")
payload.update(rows=rows, notes=notes, copy_GBps=bandwidth / 1e9)
harness.write_result(os.path.join(os.environ.get("OUT", "/tmp/out"), "pdl_probe.json"), payload)
print(f"{len(notes)} notes", *notes[:10], sep="\n")

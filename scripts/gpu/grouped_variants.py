"""GPU host: tuning evidence for the grouped paths (issues 5 and 7), each variant beside its baseline in
one process, CUDA-graph replay over 4 rotating weight sets (harness.time_graph):

- the one-launch grouped kernel with 1 or 2 token tiles of 8 per CTA: wo_a (16 groups [1024, 4096]) at
  T = 1 and 16 tokens, and the MoE decode step (8 tokens top-6 over 48 experts: gate_up + SwiGLU, down);
  cuBLAS BF16 (bmm over the groups / loop over experts on dequantized weights) beside it;
- the MoE prefill host loop (8192 tokens) with and without the side-stream overlap of the dequantizations,
  checked equal to each other, beside the cuBLAS loop.

Run there: source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/grouped_variants.py
Writes $OUT/grouped_variants.json (copy it to data/bench/) and prints a table.
"""
import os

import torch

from nvfp4lib import moe
from nvfp4lib.bench import moe as moe_bench
from nvfp4lib.bench.harness import copy_bandwidth, hbm_floor_us, rel_error, run_metadata, time_graph, write_result
from nvfp4lib.kernels.sm90 import gemm_decode
from nvfp4lib.ops import moe as moe_ops

SETS = 4
torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
bw = copy_bandwidth()
rows = []


def record(case, variant, us, floor_us, **extra):
    rows.append({"case": case, "variant": variant, "time_us": us, "floor_us": floor_us, **extra})
    print(f"{case:<22}{variant:<28}{us:>10.1f}{floor_us if floor_us is None else round(floor_us, 1)!s:>10}", flush=True)


# wo_a: 16 groups of [1024, 4096]
groups, n_group, k = 16, 1024, 4096
wo_a = [moe_bench.random_experts(groups, n_group, k, "cuda") for _ in range(SETS)]
wo_a_bf16 = [torch.stack(moe_bench.dequantized_bf16(w)).transpose(1, 2) for w in wo_a]  # [G, K, N]
for tokens in (1, 16):
    xs = [torch.randn(groups * tokens, k, device="cuda").bfloat16() for _ in range(SETS)]
    offsets = torch.arange(groups + 1, device="cuda", dtype=torch.int32) * tokens
    floor = hbm_floor_us(wo_a[0].nbytes + 2 * groups * tokens * (k + n_group), bw)
    for tiles in (1, 2):
        fns = [lambda w=w, x=x: gemm_decode.run_grouped_decode(x, offsets, w.weight, w.block_scale, w.alpha, n_group, tokens, tiles=tiles)
               for w, x in zip(wo_a, xs)]
        record("wo_a", f"grouped tiles={tiles}", time_graph(fns), floor, tokens=tokens)
    xg = [x.view(groups, tokens, k) for x in xs]
    record("wo_a", "cuBLAS bmm", time_graph([lambda w=w, x=x: torch.bmm(x, w) for w, x in zip(wo_a_bf16, xg)]), floor, tokens=tokens)
del wo_a, wo_a_bf16
torch.cuda.empty_cache()

# MoE: 48 experts, gate_up [6144, 7168] (gate and up with their own scales), down [7168, 3072]
experts, hidden, inter, top_k = 48, 7168, 3072, 6
sets = [moe.MoEWeights(moe_bench.random_experts(experts, 2 * inter, hidden, "cuda", segments=2),
                       moe_bench.random_experts(experts, hidden, inter, "cuda")) for _ in range(SETS)]
dense = [(moe_bench.dequantized_bf16(w.gate_up), moe_bench.dequantized_bf16(w.down)) for w in sets]
for tokens in (8, 8192):
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)]).cuda()
    routing = moe.route(ids, torch.rand(tokens, top_k, device="cuda"), experts)
    bounds = routing.offsets.tolist()
    counts = [b - a for a, b in zip(bounds, bounds[1:])]
    xs = [torch.randn(tokens * top_k, hidden, device="cuda").bfloat16() for _ in sets]
    floor = hbm_floor_us(moe_bench.touched_bytes(sets[0], counts) + 2 * tokens * top_k * (hidden + inter), bw)
    cublas = time_graph([lambda d=d, x=x: moe_bench.cublas_expert_path(x, bounds, d[0], d[1], 10.0) for d, x in zip(dense, xs)], replays=10)
    if tokens <= 64:
        off32 = routing.offsets.to(torch.int32)

        def grouped(w, x, tiles):
            gu, dn = w.gate_up, w.down
            h = gemm_decode.run_grouped_decode(x, off32, gu.weight, gu.block_scale, gu.alpha, inter, tokens, 10.0, tiles=tiles)
            return gemm_decode.run_grouped_decode(h, off32, dn.weight, dn.block_scale, dn.alpha, hidden, tokens, tiles=tiles)

        for tiles in (1, 2):
            record("moe_decode", f"grouped tiles={tiles}", time_graph([lambda w=w, x=x: grouped(w, x, tiles) for w, x in zip(sets, xs)]), floor,
                   tokens=tokens, cublas_bf16_us=cublas)
    else:
        def loop(w, x, overlap):
            gu, dn = w.gate_up, w.down
            h = moe_ops.grouped_sm90_loop(x, bounds, gu.weight, gu.block_scale, gu.alpha, gu.n, 10.0, overlap=overlap)
            return moe_ops.grouped_sm90_loop(h, bounds, dn.weight, dn.block_scale, dn.alpha, dn.n, overlap=overlap)

        same = torch.equal(loop(sets[0], xs[0], True), loop(sets[0], xs[0], False))
        reference = moe_bench.fp32_expert_path(xs[0], bounds, sets[0])
        err = rel_error(loop(sets[0], xs[0], True), reference)
        for overlap in (False, True):
            us = time_graph([lambda w=w, x=x: loop(w, x, overlap) for w, x in zip(sets, xs)], reps_in_graph=2, replays=10)
            record("moe_prefill", f"sm90 loop overlap={overlap}", us, floor, tokens=tokens, cublas_bf16_us=cublas,
                   overlap_equals_plain=same, rel_err=err)
    record("moe_" + ("decode" if tokens <= 64 else "prefill"), "cuBLAS BF16 loop", cublas, floor, tokens=tokens)

payload = run_metadata("CUDA-graph replay (harness.time_graph), 4 rotating weight sets, median per call; variants and cuBLAS BF16 "
                       "in one process; HBM floor = NVFP4 bytes touched + activations / measured copy bandwidth")
payload.update(copy_bandwidth_gbs=bw / 1e9, rows=rows)
out = os.path.join(os.environ.get("OUT", "/tmp/out"), "grouped_variants.json")
write_result(out, payload)
print("wrote", out)

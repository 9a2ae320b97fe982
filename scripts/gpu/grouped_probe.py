"""GPU host: the one-launch grouped WGMMA kernel on the MoE prefill shapes, per projection and variant.

Routing: ``TOKENS`` (default 8192) tokens, top-6 uniform over 48 experts (as ``bench moe``); per projection
(gate_up [6144, 7168] with two global scales per expert, down [7168, 3072]) the grouped kernel at each
``VARIANTS`` entry (tile_n:cluster_m) beside the cuBLAS BF16 loop over the experts on dequantized weights
and torch._grouped_mm on the same bf16 weights. CUDA-graph replay (harness.time_graph), 4 rotating weight
sets; accuracy of every variant on set 0 against the fp32 reference. Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/grouped_probe.py
Writes $OUT/grouped_probe.json and prints a table."""
import os

import torch
import torch.nn.functional as F

from nvfp4lib import moe
from nvfp4lib.bench import harness
from nvfp4lib.bench.moe import dequantized_bf16, random_experts
from nvfp4lib.kernels.sm90 import gemm_wgmma
from nvfp4lib.ops.moe import _grouped_sm90_reference

TOKENS = int(os.environ.get("TOKENS", "8192"))
EXPERTS, TOP_K = 48, 6
VARIANTS = [tuple(int(v) for v in s.split(":")) for s in os.environ.get("VARIANTS", "128:2,256:2,256:1").split(",")]
SHAPES = {"gate_up": (6144, 7168, 2), "down": (7168, 3072, 1)}
notes, rows = [], []
ids = torch.stack([torch.randperm(EXPERTS)[:TOP_K] for _ in range(TOKENS)]).cuda()
routing = moe.route(ids, torch.rand(TOKENS, TOP_K, device="cuda"), EXPERTS)
bounds = routing.offsets.tolist()
m = bounds[-1]
for name, (n, k, segments) in SHAPES.items():
    sets = [random_experts(EXPERTS, n, k, "cuda", segments=segments) for _ in range(4)]  # sm90 layout on a Hopper GPU
    assert sets[0].layout == "sm90", sets[0].layout
    dense = [dequantized_bf16(w) for w in sets]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in sets]
    ref = _grouped_sm90_reference(x, bounds, sets[0].weight, sets[0].block_scale, sets[0].alpha, n, None)
    row = dict(shape=name, n=n, k=k, rows=m, experts=EXPERTS, max_rows=max(b - a for a, b in zip(bounds, bounds[1:])),
               flops=2.0 * m * n * k)

    def loop(d, o):
        for e, (a, b) in enumerate(zip(bounds, bounds[1:])):
            if b > a:
                o[a:b] = F.linear(x[a:b], d[e])

    row["cublas_loop_us"] = harness.time_safely([lambda d=d, o=o: loop(d, o) for d, o in zip(dense, outs)], notes, f"cublas {name}")[0]
    ends = routing.offsets[1:].to(torch.int32)
    row["grouped_mm_us"] = harness.time_safely([lambda d=d: torch._grouped_mm(x, d.transpose(1, 2), offs=ends) for d in dense],
                                               notes, f"grouped_mm {name}")[0]
    for tile_n, cluster in VARIANTS:
        key = f"wgmma_t{tile_n}_c{cluster}"
        y = gemm_wgmma.run_grouped_wgmma(x, routing.offsets, sets[0].weight, sets[0].block_scale, sets[0].alpha, n, tile_n=tile_n,
                                         cluster_m=cluster)
        row[key + "_rel_err"] = harness.rel_error(y, ref)
        row[key + "_cosine"] = harness.cosine(y, ref)
        row[key + "_us"] = harness.time_safely(
            [lambda w=w, o=o: gemm_wgmma.run_grouped_wgmma(x, routing.offsets, w.weight, w.block_scale, w.alpha, n, out=o,
                                                          tile_n=tile_n, cluster_m=cluster) for w, o in zip(sets, outs)],
            notes, f"{key} {name}")[0]
    if name == "gate_up":  # the fused SwiGLU epilogue against the loop followed by the SwiGLU pass
        act = [torch.empty(m, n // 2, device="cuda", dtype=torch.bfloat16) for _ in sets]
        y = gemm_wgmma.run_grouped_wgmma(x, routing.offsets, sets[0].weight, sets[0].block_scale, sets[0].alpha, n, swiglu_limit=10.0)
        sref = _grouped_sm90_reference(x, bounds, sets[0].weight, sets[0].block_scale, sets[0].alpha, n, 10.0)
        row.update(wgmma_swiglu_rel_err=harness.rel_error(y, sref), wgmma_swiglu_cosine=harness.cosine(y, sref))
        row["wgmma_swiglu_us"] = harness.time_safely(
            [lambda w=w, o=o: gemm_wgmma.run_grouped_wgmma(x, routing.offsets, w.weight, w.block_scale, w.alpha, n, out=o,
                                                          swiglu_limit=10.0) for w, o in zip(sets, act)], notes, "swiglu")[0]
        row["cublas_loop_swiglu_us"] = harness.time_safely(
            [lambda d=d, o=o: (loop(d, o), moe.clamped_swiglu(o, 10.0)) for d, o in zip(dense, outs)], notes, "cublas+swiglu")[0]
    rows.append(row)
    print(" ".join(f"{k}={harness.fmt(v, '.4g') if isinstance(v, float) else v}" for k, v in row.items()), flush=True)
    del sets, dense
    torch.cuda.empty_cache()
harness.write_probe("grouped_probe", "scripts/gpu/grouped_probe.py: CUDA-graph replay (harness.time_graph), 4 rotating weight sets of "
                    f"{EXPERTS} experts, {TOKENS} tokens top-{TOP_K} uniform; cuBLAS BF16 loop and torch._grouped_mm on "
                    "dequantized weights in the same process; accuracy vs the fp32 reference on set 0",
                    rows=rows, notes=notes)
print(f"{'shape':<8}{'cuBLAS loop':>12}{'grouped_mm':>11}" + "".join(f"{f't{t}c{c}':>10}" for t, c in VARIANTS))
for r in rows:
    print(f"{r['shape']:<8}{harness.fmt(r['cublas_loop_us']):>12}{harness.fmt(r['grouped_mm_us']):>11}"
          + "".join(f"{harness.fmt(r[f'wgmma_t{t}_c{c}_us']):>10}" for t, c in VARIANTS))

"""GPU host: where wo_a's grouped WGMMA time goes (16 groups of [1024, 4096], every group all T tokens).

For T in ``TOKENS``: the grouped WGMMA kernel alone on x already regrouped to [16 T, 4096] with its tile
table precomputed, at (tile_n, cluster) variants; the same plus the table built per call; the module's
forward_wgmma (the batched kernel: x read in place, a static table), forward_grouped (regroup copy + table
+ kernel) and forward_batched (whole-weight dequantization + cuBLAS
bmm); cuBLAS BF16 bmm on the dequantized weight. CUDA-graph replay over 4 rotating weight sets. Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/wo_a_probe.py
Writes $OUT/wo_a_probe.json."""
import os

import torch

from nvfp4lib.bench import harness
from nvfp4lib.bench.attention import decoded, random_nvfp4
from nvfp4lib.kernels.sm90 import gemm_wgmma
from nvfp4lib.modules.attention import GroupedNVFP4Projection
from nvfp4lib.synthetic import WO_A

TOKENS = [int(v) for v in os.environ.get("TOKENS", "256,1024,2048,4096").split(",")]
VARIANTS = [tuple(int(v) for v in s.split(":")) for s in os.environ.get("VARIANTS", "128:2,128:1,256:2").split(",")]
G, N, K = 16, 1024, 4096
notes, rows = [], []
mods, dense = [], []
for _ in range(4):
    linear = random_nvfp4(WO_A, G * N, K, "cuda")
    mods.append(GroupedNVFP4Projection(linear, G, device="cuda"))
    dense.append(decoded(linear).view(G, N, K).transpose(1, 2))
for t in TOKENS:
    x = torch.randn(t, G, K, device="cuda", dtype=torch.bfloat16)
    stacked = x.transpose(0, 1).reshape(G * t, K).contiguous()
    x_g = x.transpose(0, 1).contiguous()
    offsets = torch.arange(G + 1, device="cuda", dtype=torch.int32) * t
    row = dict(tokens=t, flops=2.0 * t * G * N * K)
    row["cublas_bmm_us"] = harness.time_safely([lambda w=w: torch.bmm(x_g, w) for w in dense], notes, f"bmm {t}")[0]
    row["batched_us"] = harness.time_safely([lambda m=m: m.forward_batched(x) for m in mods], notes, f"batched {t}")[0]
    row["forward_grouped_us"] = harness.time_safely([lambda m=m: m.forward_grouped(x) for m in mods], notes, f"grouped {t}")[0]
    row["forward_wgmma_us"] = harness.time_safely([lambda m=m: m.forward_wgmma(x) for m in mods], notes, f"batched wgmma {t}")[0]
    row["regroup_copy_us"] = harness.time_safely([lambda: x.transpose(0, 1).reshape(G * t, K).contiguous()], notes, f"copy {t}")[0]

    def args(m):
        p = m.prepared_whole
        return p.weight.view(G, -1, *p.weight.shape[1:]), p.block_scale.view(G, -1, *p.block_scale.shape[1:]), p.alpha.view(G, N)

    for tile_n, cluster in VARIANTS:
        key = f"kernel_t{tile_n}_c{cluster}"
        table = gemm_wgmma.grouped_tile_table(offsets, tile_n, gemm_wgmma.grouped_max_tiles(G * t, G, tile_n))
        outs = [torch.empty(G * t, N, device="cuda", dtype=torch.bfloat16) for _ in mods]
        row[key + "_us"] = harness.time_safely(
            [lambda m=m, o=o: gemm_wgmma.run_grouped_wgmma(stacked, offsets, *args(m), N, out=o, tile_n=tile_n, tiles=table, cluster_m=cluster)
             for m, o in zip(mods, outs)], notes, f"{key} {t}")[0]
    row["kernel_with_table_us"] = harness.time_safely(
        [lambda m=m: gemm_wgmma.run_grouped_wgmma(stacked, offsets, *args(m), N) for m in mods], notes, f"kernel+table {t}")[0]
    rows.append(row)
    print(" ".join(f"{k}={harness.fmt(v) if isinstance(v, float) else v}" for k, v in row.items()), flush=True)
harness.write_probe("wo_a_probe", "scripts/gpu/wo_a_probe.py: CUDA-graph replay (harness.time_graph) over 4 rotating weight sets; "
                    "wo_a = 16 groups of [1024, 4096], every group all T tokens",
                    rows=rows, notes=notes)

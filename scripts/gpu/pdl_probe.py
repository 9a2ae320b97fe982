"""GPU host: programmatic dependent launch (PDL) for the decode kernel, off against on.

With PDL a decode launch may start while the kernel before it on the stream still runs: it issues its first
two weight quads, then ``griddepcontrol.wait`` before it reads x or writes anything. ``start`` / ``loop``:
where the kernel lets the NEXT kernel launch (``griddepcontrol.launch_dependents`` at its start or after its
main loop). Timed as the benchmark times (harness.time_graph: 4 rotating weight sets, 3 times each, in one
CUDA graph), so consecutive calls overlap the way consecutive layers would.

Also the shared expert's chain (gate_up + SwiGLU -> down, the down kernel reads what the gate_up kernel
wrote): replayed in a graph and compared with the fp32 reference, which is where a missing wait would show.
Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/pdl_probe.py
Then the WGMMA decoder kernel (M in WGMMA_MS, default 128,256,1024) with PDL off / on.
Env: MS (default 1,4,8,16,64), WGMMA_MS, SHAPES. Writes $OUT/pdl_probe.json."""
import os

import torch

from nvfp4lib.bench import gemm as gemm_bench
from nvfp4lib.bench import harness
from nvfp4lib.kernels.sm90 import gemm_decode, gemm_wgmma

MS = [int(v) for v in os.environ.get("MS", "1,4,8,16,64").split(",")]
SHAPES = {"gate_up": (6144, 7168, None), "down": (7168, 3072, None), "fused_wqa_wkv": (2048, 7168, None),
          "gate_up_swiglu": (6144, 7168, 10.0), "wo_b": (7168, 16384, None)}
SHAPES = {k: v for k, v in SHAPES.items() if k in os.environ.get("SHAPES", ",".join(SHAPES)).split(",")}
WGMMA_MS = [int(v) for v in os.environ.get("WGMMA_MS", "128,256,1024").split(",") if v]
MODES = os.environ.get("MODES", "off,start,loop,auto").split(",")  # PDL modes; "auto": the launch's default

notes, rows_out = [], []
bandwidth = harness.copy_bandwidth()


for name, n, k, limit, out_n, weights, m, x, ref in gemm_bench.probe_cases(SHAPES, MS):
    row = dict(shape=name, m=m, n=n, k=k, floor_us=harness.hbm_floor_us(n * k * 9 / 16 + 2 * m * (n + k), bandwidth))
    # "auto": the launch's own choice (pdl_for); "<mode>_t1": one token tile of 8 (two token blocks at M = 16)
    variants = [(mode, dict(pdl=None if mode == "auto" else mode)) for mode in MODES]
    if 8 < m <= 16:
        variants += [(f"{mode}_t1", dict(pdl=mode, tiles=1)) for mode in ("off", "start")]
    gemm_bench.time_decode_variants(row, variants, x, weights, ref, out_n, limit, notes, f"{name} {m}")
    rows_out.append(row)
    print(f"{name:15s} M={m:3d} floor {row['floor_us']:5.2f} " + " ".join(f"{lab}:{harness.fmt(row.get(lab + '_us'))}" for lab, _ in variants),
          flush=True)

# The shared expert's chain: gate_up + SwiGLU -> down, each launch with the same PDL mode.
chain = []
gu_sets = [w["prepared"] for w in gemm_bench.weight_sets(6144, 7168, 4)]
dn_sets = [w["prepared"] for w in gemm_bench.weight_sets(7168, 3072, 4)]
for m in [v for v in MS if v <= 16]:
    x = torch.randn(m, 7168, device="cuda", dtype=torch.bfloat16)
    h_ref = gemm_bench.fp32_reference(x, gu_sets[0], 6144, 10.0)
    ref = gemm_bench.fp32_reference(h_ref.to(torch.bfloat16), dn_sets[0], 7168, None)
    floor = harness.hbm_floor_us((6144 * 7168 + 7168 * 3072) * 9 / 16, bandwidth)
    row = dict(m=m, floor_sum_us=floor)
    for mode in MODES:
        def expert(gu, dn, mode=mode):
            pdl = None if mode == "auto" else mode
            h = gemm_decode.run_decode(x, gu.weight, gu.block_scale, gu.alpha, 3072, swiglu_limit=10.0, pdl=pdl)
            return gemm_decode.run_decode(h, dn.weight, dn.block_scale, dn.alpha, 7168, pdl=pdl)
        try:
            expert(gu_sets[0], dn_sets[0])
            torch.cuda.synchronize()
            graph_out = {}
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(4):  # four experts back to back, the first one's output kept
                    y = expert(gu_sets[i], dn_sets[i])
                    if i == 0:
                        graph_out["y"] = y
            graph.replay()
        except Exception as error:  # noqa: BLE001
            notes.append(f"chain {m} {mode}: {type(error).__name__}: {str(error)[:200]}")
            continue
        checked = gemm_bench.checked_run(lambda _: graph_out["y"], None, ref, notes, f"chain {m} {mode} (graph replay)")
        row[f"{mode}_graph_rel_err"] = checked and checked[1]
        row[f"{mode}_us"] = harness.time_safely([lambda i=i: expert(gu_sets[i], dn_sets[i]) for i in range(4)], notes, f"chain {m} {mode}")[0]
    chain.append(row)
    print(f"shared expert  M={m:3d} floor sum {floor:5.2f} " + " ".join(
        f"{md}:{harness.fmt(row.get(md + '_us'))} ({harness.fmt(row.get(md + '_us') and row[md + '_us'] / floor, '.2f')}x)" for md in MODES),
        flush=True)

# The WGMMA decoder kernel (the op's path for M in (64, 1024]) with its launch plan, PDL off / on, and cuBLAS.
wgmma_rows = []
for name, n, k, limit, out_n, weights, m, x, ref in gemm_bench.probe_cases(SHAPES, WGMMA_MS):
    row = dict(shape=name, m=m, n=n, k=k, plan=gemm_wgmma.wgmma_plan(m, -(-n // 16), k, torch.cuda.get_device_properties(0).multi_processor_count))
    for mode in MODES:
        def call(p, mode=mode):
            return gemm_wgmma.run_wgmma(x, p.weight, p.block_scale, p.alpha, n, swiglu_limit=limit, pdl=None if mode == "auto" else mode)
        if gemm_bench.checked_run(call, weights[0], ref, notes, f"wgmma {name} {m} {mode}"):
            row[f"{mode}_us"] = harness.time_safely([lambda p=p: call(p) for p in weights], notes, f"wgmma {name} {m} {mode}")[0]
    wgmma_rows.append(row)
    print(f"wgmma {name:15s} M={m:4d} plan {row['plan']} " + " ".join(f"{md}:{harness.fmt(row.get(md + '_us'))}" for md in MODES), flush=True)

harness.write_probe("pdl_probe", "scripts/gpu/pdl_probe.py: CUDA-graph replay (harness.time_graph) over 4 rotating weight sets, 3 calls "
                    "each in one graph; the decode kernel's launch plan with PDL off / on (next kernel let launch at "
                    "the start or after the main loop); floor = NVFP4 weight + activation bytes / measured copy bandwidth",
                    rows=rows_out, shared_expert=chain, wgmma=wgmma_rows, notes=notes, copy_GBps=bandwidth / 1e9)

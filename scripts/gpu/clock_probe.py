"""GPU host: the SM clock and board power each GEMM runs at under sustained load, our kernels against cuBLAS BF16.

The K sweeps (wgmma_k_sweep.py) put the WGMMA kernel's main loop at 2.41 us a quad of 256 k with 48 CTAs busy,
yet the large-M tables imply ~3 us a quad with every SM busy. This probe asks whether the card's clock explains it:
for each case a CUDA graph of calls (4 rotating weight sets, checked against the fp32 reference first) is replayed
back to back for ``SECONDS`` while ``nvidia-smi`` samples clocks.sm and power.draw every 20 ms (reading only; no
setting is touched); the row holds the time per call and the median clock and power over the window's second half.
Cases (env ``CASES``, default all): the WGMMA kernel at M = 256 with 16 / 48 / 128 CTAs (N = 2048 / 6144 / 16384,
K = 7168, one 256-token tile, no split), gate_up at M = 4096 through the WGMMA kernel and through cuBLAS on the
dequantized weight. Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/clock_probe.py
Writes $OUT/clock_probe.json and prints a table."""
import os
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from nvfp4lib.bench import gemm as gemm_bench
from nvfp4lib.bench import harness
from nvfp4lib.kernels.sm90 import gemm_wgmma

SECONDS = float(os.environ.get("SECONDS_PER_CASE", "2.0"))
K = 7168
CASES = {  # name: (N, M, path)
    "wgmma_16cta": (2048, 256, "wgmma"),
    "wgmma_48cta": (6144, 256, "wgmma"),
    "wgmma_128cta": (16384, 256, "wgmma"),
    "wgmma_m4096": (6144, 4096, "wgmma"),
    "cublas_m4096": (6144, 4096, "cublas"),
}
chosen = [c for c in os.environ.get("CASES", ",".join(CASES)).split(",") if c]


def sustained(graph, calls: int):
    """Replay ``graph`` back to back for SECONDS under nvidia-smi sampling: (us per call, clock MHz, power W)."""
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "20"],
                           stdout=subprocess.PIPE, text=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0, replays = time.time(), 0
    start.record()
    while time.time() - t0 < SECONDS:
        for _ in range(20):
            graph.replay()
        replays += 20
        torch.cuda.synchronize()
    end.record()
    end.synchronize()
    smi.terminate()
    samples = [line.split(",") for line in smi.communicate()[0].splitlines() if line.count(",") == 1]
    samples = [(float(c), float(p)) for c, p in samples[len(samples) // 2:]]  # the second half: warm and settled
    us = start.elapsed_time(end) * 1e3 / (replays * calls)
    return us, statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples), len(samples)


rows, notes = [], []
for name in chosen:
    n, m, path = CASES[name]
    sets = gemm_bench.weight_sets(n, K, 4)
    x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
    ref = gemm_bench.fp32_reference(x, sets[0]["prepared"], n)
    if path == "wgmma":
        def call(s, n=n):
            p = s["prepared"]
            return gemm_wgmma.run_wgmma(x, p.weight, p.block_scale, p.alpha, n, tile_n=256, splits=1, stream_k=False)
    else:
        def call(s):
            return F.linear(x, s["dequantized"])
    y = call(sets[0])
    torch.cuda.synchronize()
    err, cos = harness.rel_error(y, ref), harness.cosine(y, ref)
    if not (err <= 1e-2 and cos >= 0.9999):
        notes.append(f"{name}: WRONG rel err {err:.3g} cosine {cos:.6f}")
        continue
    for s in sets:
        call(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(3):
            for s in sets:
                call(s)
    us, mhz, watts, count = sustained(graph, 3 * len(sets))
    ctas = -(-n // 128) * -(-m // 256) if path == "wgmma" else None
    rows.append(dict(case=name, path=path, n=n, k=K, m=m, ctas=ctas, us=us, tflops=2 * m * n * K / us / 1e6,
                     sm_clock_mhz=mhz, power_w=watts, samples=count, rel_err=err))
    print(rows[-1], flush=True)
    del sets, graph
    torch.cuda.empty_cache()
    time.sleep(1.0)  # let the card cool between cases
harness.write_probe("clock_probe", "scripts/gpu/clock_probe.py: a CUDA graph of 12 calls (4 rotating weight sets) replayed back to "
                    f"back for {SECONDS} s per case, nvidia-smi clocks.sm / power.draw sampled every 20 ms (median of the second "
                    "half); run_wgmma with 256-token tiles, no split; cuBLAS = F.linear on the dequantized bf16 weight",
                    rows=rows, notes=notes)
print(f"{'case':14s} {'CTAs':>5s} {'us':>9s} {'TFLOP/s':>8s} {'MHz':>6s} {'W':>6s}")
for r in rows:
    print(f"{r['case']:14s} {str(r['ctas'] or '-'):>5s} {r['us']:9.1f} {r['tflops']:8.1f} {r['sm_clock_mhz']:6.0f} {r['power_w']:6.0f}")

"""GPU host: what the benchmark method itself costs for a memory-bound call, next to the decode targets.

Under the team's method (CUDA-graph replay of calls over 4 rotating buffers, harness.time_graph), times
(1) a trivial kernel (the per-call launch cost inside a graph), (2) torch reading exactly the NVFP4 bytes
of fused_wqa_wkv, down and gate_up (an int32 sum, one read of each byte), (3) a copy of the same bytes,
beside the HBM floor (bytes / measured copy bandwidth) and the issue's decode bounds. Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/floor_probe.py
Writes $OUT/floor_probe.json and prints a table."""
import torch

from nvfp4lib.bench import harness

SHAPES = {"fused_wqa_wkv": (2048, 7168), "down": (7168, 3072), "gate_up": (6144, 7168)}
notes, rows = [], []
bandwidth = harness.copy_bandwidth()
tiny = [torch.zeros(32, device="cuda") for _ in range(4)]
launch = harness.time_safely([lambda t=t: t.add_(1) for t in tiny], notes, "launch")[0]
for name, (n, k) in SHAPES.items():
    nbytes = n * k * 9 // 16
    bufs = [torch.randint(0, 1 << 30, (nbytes // 4,), dtype=torch.int32, device="cuda") for _ in range(4)]
    dsts = [torch.empty_like(b) for b in bufs]
    row = dict(shape=name, bytes=nbytes, floor_us=harness.hbm_floor_us(nbytes, bandwidth), launch_us=launch,
               sum_us=harness.time_safely([lambda b=b: b.sum(dtype=torch.int64) for b in bufs], notes, f"sum {name}")[0],
               copy_us=harness.time_safely([lambda b=b, d=d: d.copy_(b) for b, d in zip(bufs, dsts)], notes, f"copy {name}")[0])
    row["copy_floor_us"] = harness.hbm_floor_us(2 * nbytes, bandwidth)
    rows.append(row)
    del bufs, dsts
harness.write_probe("floor_probe", "scripts/gpu/floor_probe.py: CUDA-graph replay (harness.time_graph) over 4 rotating buffers; "
                    "launch = a 32-element add_; sum = torch int32 sum over the NVFP4 bytes of the weight; copy = the same "
                    "bytes copied; floor = bytes / measured copy bandwidth (read + written)",
                    rows=rows, notes=notes, copy_GBps=bandwidth / 1e9)
print(f"{'shape':15s}{'MB':>7s}{'floor':>8s}{'launch':>8s}{'sum':>8s}{'copy':>8s}{'copy floor':>11s}")
for r in rows:
    print(f"{r['shape']:15s}{r['bytes'] / 1e6:7.2f}{r['floor_us']:8.2f}{launch:8.2f}{r['sum_us']:8.2f}{r['copy_us']:8.2f}{r['copy_floor_us']:11.2f}")

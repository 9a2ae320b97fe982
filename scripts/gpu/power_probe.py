"""GPU host: does what the tensor cores multiply change how fast they run (power draw, clocks)? Times cuBLAS
BF16 x @ W^T at M = 8192 on gate_up's shape with W random, W made of a few repeated values, and W constant,
under CUDA-graph replay over 4 rotating weights. If structured weights run faster, timing probes that
replace real weights by made-up ones (scripts/gpu/wgmma_probe.py) overstate the headroom.
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/power_probe.py
Writes $OUT/power_probe.json."""
import torch

from nvfp4lib.bench import harness

N, K = 6144, 7168
rows = []
for m in (4096, 8192):
    x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
    kinds = {
        "random": lambda: torch.randn(N, K, device="cuda").bfloat16() * 0.02,
        "few values": lambda: (torch.randint(0, 4, (N, K), device="cuda").float() * 0.01).bfloat16(),
        "constant": lambda: torch.full((N, K), 0.01, device="cuda", dtype=torch.bfloat16),
    }
    row = {"m": m, "n": N, "k": K}
    for name, make in kinds.items():
        ws = [make() for _ in range(4)]
        row[name.replace(" ", "_") + "_us"] = harness.time_graph([lambda w=w: torch.nn.functional.linear(x, w) for w in ws])
    rows.append(row)
    print(row, flush=True)
harness.write_probe("power_probe", "scripts/gpu/power_probe.py: cuBLAS BF16 F.linear under CUDA-graph replay (harness.time_graph), "
                    "4 rotating weights of each kind; x random",
                    rows=rows)

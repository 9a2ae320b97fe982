"""GPU host: the decode kernel's launches for Nsight Compute (where ``ncu`` exists there).

Each case (shape, M, launch options) runs twice eagerly: a checked first call (compile, fp32 reference) and a
second launch. Run under ncu with a kernel-name filter, e.g.
  ncu --clock-control none -k regex:Decode --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section WarpStateStats python3 scripts/gpu/ncu_decode.py
(``--clock-control none``: ncu leaves the card's clocks alone). Env CASES: ``name:M[:key=value...]`` joined by
``,`` (default: gate_up at M = 8 and 16, down and fused_wqa_wkv at 16); values are ints, or the words
True / False / None."""
import os

import torch

from nvfp4lib.bench import gemm as gemm_bench
from nvfp4lib.bench import harness
from nvfp4lib.kernels.sm90 import gemm_decode

SHAPES = {"gate_up": (6144, 7168), "down": (7168, 3072), "fused_wqa_wkv": (2048, 7168), "wo_b": (7168, 16384)}
CASES = os.environ.get("CASES", "gate_up:8,gate_up:16,down:16,fused_wqa_wkv:16")


notes = []
for case in CASES.split(","):
    name, m, *options = case.split(":")
    kw = harness.parse_kwargs(options)
    n, k = SHAPES[name]
    prepared = gemm_bench.weight_sets(n, k, 1)[0]["prepared"]
    x = torch.randn(int(m), k, device="cuda", dtype=torch.bfloat16)
    ref = gemm_bench.fp32_reference(x, prepared, n, None)

    def call(p, kw=kw):
        return gemm_decode.run_decode(x, p.weight, p.block_scale, p.alpha, n, **kw)

    checked = gemm_bench.checked_run(call, prepared, ref, notes, case)
    call(prepared)
    torch.cuda.synchronize()
    print(f"{case}: {'rel err %.2e' % checked[1] if checked else 'FAILED'}", flush=True)
print("\n".join(notes))

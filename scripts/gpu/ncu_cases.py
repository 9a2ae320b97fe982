"""GPU host: GEMM launches for Nsight Compute (where ``ncu`` exists there).

Each case runs twice eagerly: a checked first call (compile, fp32 reference) and a second launch inside the
NVTX range ``profile`` (``ncu --nvtx --nvtx-include profile/`` profiles that launch alone). Or under ncu with a
kernel-name filter, e.g.
  ncu --clock-control none -k regex:Decode --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section WarpStateStats python3 scripts/gpu/ncu_cases.py
(``--clock-control none``: ncu leaves the card's clocks alone). Env CASES: ``[kernel/]name:M[:key=value...]``
joined by ``,``; kernel is ``decode`` (the default: gemm_decode.run_decode), ``wgmma``
(gemm_wgmma.run_wgmma) or ``cublas`` (F.linear on the dequantized weight; no options); values are ints, or
the words True / False / None. Default: the decode kernel for gate_up at M = 8 and 16, down and
fused_wqa_wkv at 16."""
import os

import torch

from nvfp4lib.bench import gemm as gemm_bench
from nvfp4lib.bench import harness
from nvfp4lib.kernels.sm90 import gemm_decode, gemm_wgmma

SHAPES = {"gate_up": (6144, 7168), "down": (7168, 3072), "fused_wqa_wkv": (2048, 7168), "wo_b": (7168, 16384)}
CASES = os.environ.get("CASES", "gate_up:8,gate_up:16,down:16,fused_wqa_wkv:16")
RUNNERS = {"decode": gemm_decode.run_decode, "wgmma": gemm_wgmma.run_wgmma}


notes = []
for case in CASES.split(","):
    kernel, _, spec = case.rpartition("/")
    kernel = kernel or "decode"
    name, m, *options = spec.split(":")
    kw = harness.parse_kwargs(options)
    n, k = SHAPES[name]
    weights = gemm_bench.weight_sets(n, k, 1)[0]
    prepared = weights["prepared"]
    x = torch.randn(int(m), k, device="cuda", dtype=torch.bfloat16)
    ref = gemm_bench.fp32_reference(x, prepared, n, None)

    if kernel == "cublas":
        def call(p, dq=weights["dequantized"]):
            return torch.nn.functional.linear(x, dq)
    else:
        def call(p, kw=kw, run=RUNNERS[kernel]):
            return run(x, p.weight, p.block_scale, p.alpha, n, **kw)

    checked = gemm_bench.checked_run(call, prepared, ref, notes, case)
    with torch.cuda.nvtx.range("profile"):  # ncu --nvtx --nvtx-include profile/ takes this launch alone
        call(prepared)
    torch.cuda.synchronize()
    print(f"{case}: {'rel err %.2e' % checked[1] if checked else 'FAILED'}", flush=True)
print("\n".join(notes))

"""GPU host: the SharedExpert module at DeepSeek-V4-Pro sizes (hidden 7168, intermediate 3072): accuracy
against the fp32 reference (NaN-free, rel err / cosine), and time per call under CUDA-graph replay over 4
rotating experts, beside the HBM floor of its two GEMMs and the time of its parts (gate_up GEMM, SwiGLU,
down GEMM). Issue 4 target: the whole expert at M = 1 within 1.3x the sum of its two GEMM floors.
Run there:
  source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/shared_expert_check.py
Writes $OUT/shared_expert_h100.json (copy it to data/bench/); exit 1 if an accuracy check fails."""
import os
import sys
import time

import torch

from nvfp4lib.bench.harness import copy_bandwidth, cosine, hbm_floor_us, rel_error, run_metadata, time_graph, write_result
from nvfp4lib.modules.shared_expert import SharedExpert, clamped_swiglu, reference_shared_expert
from nvfp4lib.ops.gemm import nvfp4_linear
from nvfp4lib.synthetic import quantize_nvfp4_linear

HIDDEN, INTER, SETS = 7168, 3072, 4
MS = [int(v) for v in os.environ.get("MS", "1,4,16,64,256,1024").split(",")]
torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
t0 = time.time()


def random_expert():
    def weight(n, k):
        return (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)

    wg, wu, wd = weight(INTER, HIDDEN), weight(INTER, HIDDEN), weight(HIDDEN, INTER)
    common = torch.maximum(wg.float().abs().amax(), wu.float().abs().amax())
    linears = (quantize_nvfp4_linear("w1", wg, 8.0, common), quantize_nvfp4_linear("w3", wu, 8.0, common),
               quantize_nvfp4_linear("w2", wd, 8.0))
    return SharedExpert(*linears), linears


experts = [random_expert() for _ in range(SETS)]
layouts = (experts[0][0].gate_up.layout, experts[0][0].down.layout)
bw = copy_bandwidth()
rows, failures = [], 0
for m in MS:
    x = (torch.randn(m, HIDDEN, device="cuda") * 2).to(torch.bfloat16)
    expert, linears = experts[0]
    out = expert(x)
    torch.cuda.synchronize()
    ref = reference_shared_expert(x, *linears)
    row = dict(M=m, rel_err=rel_error(out, ref), cosine=cosine(out, ref), finite=bool(torch.isfinite(out).all()))
    ok = row["finite"] and row["rel_err"] <= 1e-2 and row["cosine"] >= 0.9999
    failures += not ok
    row["expert_us"] = time_graph([(lambda e=e: e(x)) for e, _ in experts])
    row["gate_up_us"] = time_graph([(lambda e=e: nvfp4_linear(x, e.gate_up)) for e, _ in experts])
    h = nvfp4_linear(x, expert.gate_up)
    row["swiglu_us"] = time_graph([lambda: clamped_swiglu(h[:, :INTER], h[:, INTER:], 10.0).to(torch.bfloat16)])
    a = expert.activation(x)
    row["down_us"] = time_graph([(lambda e=e: nvfp4_linear(a, e.down)) for e, _ in experts])
    floor_gate_up = hbm_floor_us(2 * INTER * HIDDEN * 9 / 16 + 2 * m * HIDDEN + 2 * m * 2 * INTER, bw)
    floor_down = hbm_floor_us(HIDDEN * INTER * 9 / 16 + 2 * m * INTER + 2 * m * HIDDEN, bw)
    row.update(floor_gate_up_us=floor_gate_up, floor_down_us=floor_down, floor_sum_us=floor_gate_up + floor_down)
    row["x_floor_sum"] = row["expert_us"] / row["floor_sum_us"]
    row["fused_epilogue"] = expert.fused
    rows.append(row)
    print(f"M={m:5d} expert {row['expert_us']:8.1f} us = gate_up {row['gate_up_us']:7.1f} + swiglu {row['swiglu_us']:5.1f} "
          f"+ down {row['down_us']:7.1f}; floors {floor_gate_up:5.1f} + {floor_down:5.1f}; x{row['x_floor_sum']:.2f}; "
          f"rel_err {row['rel_err']:.1e} cos {row['cosine']:.6f} {'ok' if ok else 'FAIL'}", flush=True)

method = ("SharedExpert(x) (gate_up GEMM -> clamped SwiGLU -> down GEMM) timed by CUDA-graph replay over %d rotating "
          "experts (harness.time_graph, median per call); floors = HBM bytes of each GEMM (NVFP4 weight + bf16 in/out) / "
          "measured copy bandwidth; accuracy vs reference_shared_expert (fp32 over the dequantized weights)" % SETS)
payload = dict(run_metadata(method), copy_GBps=bw / 1e9, hidden=HIDDEN, intermediate=INTER, layouts=layouts,
               wall_s=time.time() - t0, rows=rows)
print("wrote", write_result(os.path.join(os.environ.get("OUT", "/tmp"), "shared_expert_h100.json"), payload))
sys.exit(1 if failures else 0)

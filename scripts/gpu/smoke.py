"""GPU host smoke test: CuTeDSL imports and runs a kernel on the card, the harness measures copy bandwidth.
Run there: source /tmp/site/env.sh && PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/smoke.py"""
import json
import os
import time

import torch

from nvfp4lib.bench.harness import copy_bandwidth, run_metadata
from nvfp4lib.kernels.cute_compile import compile_kernel, current_arch, import_cute

meta = run_metadata("smoke: CuTeDSL launch + 1 GiB device copy")
print(meta, flush=True)
cutlass, cute = import_cute()
from cutlass.cute.runtime import from_dlpack


@cute.kernel
def double_kernel(a: cute.Tensor, b: cute.Tensor):
    tidx, _, _ = cute.arch.thread_idx()
    bidx, _, _ = cute.arch.block_idx()
    i = bidx * 128 + tidx
    b[i] = a[i] * 2.0


@cute.jit
def double(a: cute.Tensor, b: cute.Tensor):
    double_kernel(a, b).launch(grid=(a.shape[0] // 128, 1, 1), block=(128, 1, 1))


a = torch.randn(1 << 20, device="cuda")
b = torch.full_like(a, float("nan"))
t = time.time()
kernel = compile_kernel("smoke", double, from_dlpack(a), from_dlpack(b))
kernel(from_dlpack(a), from_dlpack(b))
torch.cuda.synchronize()
ok = torch.equal(b, a * 2)
print(f"cute arch {current_arch()}, compile+run {time.time() - t:.2f} s, correct: {ok}", flush=True)
bw = copy_bandwidth()
print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
for mod in ("quack", "humming", "papermill"):
    try:
        __import__(mod)
        print(mod, "importable")
    except Exception as e:
        print(mod, "NOT importable:", type(e).__name__, e)
out = os.environ.get("OUT", "/tmp")
json.dump(dict(meta, copy_GBps=bw / 1e9, cute_ok=ok), open(os.path.join(out, "smoke.json"), "w"), indent=1)

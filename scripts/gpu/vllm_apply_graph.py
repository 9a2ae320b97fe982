"""The vLLM plugin's linear apply path on a GPU host WITHOUT vLLM: eager vs inside a CUDA graph.

The plugin's post-load step and forward are vLLM-free functions (``process_loaded_linear`` and
``apply_linear`` in ``nvfp4lib.integrations.vllm``); the vLLM linear method only calls them. This script
runs those same functions on plain ``torch.nn.Module`` holders of DeepSeek-V4-Pro shapes with ModelOpt
tensors (fused_wqa_wkv with two unequal weight_scale_2, shared-expert gate_up / down, wo_b), and checks:

- eager ``apply_linear`` against the exact fp32 reference (each shard dequantized with its own scale);
- a CUDA graph capturing ``apply_linear``: its output buffer is filled with NaN after capture, then the
  graph is replayed on new inputs copied into the static input; the replay must equal eager bit for bit.

Run on the GPU host (no vLLM there):
    source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> PYTHONPATH=.:$PYTHONPATH python3 scripts/gpu/vllm_apply_graph.py [--small]
It writes $OUT/vllm_apply_graph.json (or ./vllm_apply_graph.json without $OUT) and prints a table last.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import nvfp4lib
from nvfp4lib.bench.harness import rel_error, run_metadata, write_result
from nvfp4lib.formats import GLOBAL_SCALE_DENOMINATOR, dequantize
from nvfp4lib.integrations.vllm import apply_linear, module_as_loaded, process_loaded_linear

# name -> (shard row counts, K, amax ratio of each shard to the first)
DSV4_PRO = {
    "fused_wqa_wkv": ((1536, 512), 7168, (1.0, 3.0)),
    "shared_expert.gate_up": ((3072, 3072), 7168, (1.0, 1.0)),
    "shared_expert.down": ((7168,), 3072, (1.0,)),
    "wo_b": ((7168,), 16384, (1.0,)),
}
SMALL = {"fused_wqa_wkv": ((128, 64), 256, (1.0, 40.0)), "down": ((256,), 512, (1.0,))}
TOKENS = (1, 16, 128)


def make_holder(shard_rows, k: int, ratios, device) -> tuple:
    """A module with ModelOpt parameters as vLLM's loaders leave them (per-shard weight_scale_2 / input_scale
    of shape [P]); returns (module, dequantized fp32 weight [N, K], each shard with its own global scale)."""
    parts = []
    for rows, ratio in zip(shard_rows, ratios):
        weight = torch.randn(rows, k, device=device) / k**0.5
        parts.append(nvfp4lib.quantize((weight * (ratio * 0.1 / weight.abs().amax())).to(torch.bfloat16)))  # amax 0.1 * ratio
    holder = module_as_loaded(parts, input_scales=[8.0 / GLOBAL_SCALE_DENOMINATOR] * len(parts))
    return holder, torch.cat([dequantize(*part, torch.float32) for part in parts])


def check_layer(name: str, shard_rows, k: int, ratios, device) -> list:
    holder, w_fp32 = make_holder(shard_rows, k, ratios, device)
    scales = [float(s) for s in holder.weight_scale_2]
    process_loaded_linear(holder, shard_rows)
    rows = []
    for tokens in TOKENS:
        x_static = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (kernel compilation, workspaces) before capture
            apply_linear(holder, x_static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                y_static = apply_linear(holder, x_static)
        except RuntimeError as error:  # e.g. a host-to-device copy or sync inside the op: not graph-safe
            rows.append({"layer": name, "shape": [sum(shard_rows), k], "tokens": tokens, "capture_error": str(error).splitlines()[0][:300],
                         "graph_equals_eager": False, "nan_in_graph_output": True, "rel_error_vs_fp32": float("nan"),
                         "rel_error_first_shard": float("nan"), "rel_error_last_shard": float("nan")})
            torch.cuda.synchronize()
            continue
        equal_all = True
        for _ in range(3):  # fresh inputs each replay, output poisoned before it
            x_new = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
            x_static.copy_(x_new)
            y_static.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            eager = apply_linear(holder, x_new)
            equal_all &= bool(torch.equal(y_static, eager))
        reference = (x_new.float() @ w_fp32.t()).to(torch.bfloat16)
        boundary = shard_rows[0]
        rows.append({
            "layer": name, "shape": [sum(shard_rows), k], "shards": list(shard_rows), "weight_scale_2": scales, "tokens": tokens,
            "graph_equals_eager": equal_all, "nan_in_graph_output": bool(torch.isnan(y_static).any()),
            "rel_error_vs_fp32": rel_error(eager, reference),
            "rel_error_first_shard": rel_error(eager[:, :boundary], reference[:, :boundary]),
            "rel_error_last_shard": rel_error(eager[:, -shard_rows[-1]:], reference[:, -shard_rows[-1]:]),
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small shapes (quick check)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    layers = SMALL if args.small else DSV4_PRO
    rows = [row for name, (shards, k, ratios) in layers.items() for row in check_layer(name, shards, k, ratios, "cuda")]
    meta = run_metadata("vLLM plugin apply path (process_loaded_linear + apply_linear, no vLLM): eager vs CUDA-graph replay with NaN-poisoned output, vs fp32 dequant reference")
    op = torch.ops.nvfp4lib.gemm_w4a16.default
    ok = all(r["graph_equals_eager"] and not r["nan_in_graph_output"] and r["rel_error_vs_fp32"] < 1e-2 for r in rows)
    out_dir = os.environ.get("OUT", ".")
    path = write_result(os.path.join(out_dir, "vllm_apply_graph.json"), {**meta, "op": str(op), "passed": ok, "rows": rows})
    print(f"wrote {path}")
    print(f"{'layer':24s} {'[N, K]':>14s} {'M':>4s} {'graph==eager':>12s} {'rel err':>9s} {'shard0':>9s} {'shard-1':>9s}")
    for r in rows:
        if "capture_error" in r:
            print(f"{r['layer']:24s} {str(r['shape']):>14s} {r['tokens']:4d} capture failed: {r['capture_error']}")
            continue
        print(f"{r['layer']:24s} {str(r['shape']):>14s} {r['tokens']:4d} {str(r['graph_equals_eager']):>12s} {r['rel_error_vs_fp32']:9.2e} {r['rel_error_first_shard']:9.2e} {r['rel_error_last_shard']:9.2e}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

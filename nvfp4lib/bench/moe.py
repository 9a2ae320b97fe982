"""``python -m nvfp4lib.bench moe``: the routed experts (issue 7) vs cuBLAS BF16 and the HBM floor.

Cases (DeepSeek-V4-Pro experts: gate_up [6144, 7168], down [7168, 3072], top-6 over 48 local experts, one
expert-parallel rank of 8; ``--small`` uses tiny ones for a CPU dry run):

- decode: ``--decode-tokens`` (default 8) tokens; target: at most 1.5x the HBM floor of the weights
  actually touched (the experts some token routes to).
- prefill: ``--prefill-tokens`` (default 8192) tokens; target: at least 0.9x the throughput of cuBLAS
  BF16 looped over the experts on dequantized weights.

What is timed: the expert path on tokens already sorted by expert: gate_up with the clamped SwiGLU ->
down (routing and the weighted combine are excluded, they are the same for both sides; ``block_us``
times the whole :func:`nvfp4lib.moe.moe_block` with them, decode only). "ours" is what
:func:`nvfp4lib.moe.grouped_gemm_w4a16` runs on a Hopper GPU with the experts in the sm90 layout:

- decode (groups of at most 64 rows): two launches of the one-launch grouped CuTeDSL kernel (SwiGLU in
  the gate_up epilogue), offsets on the device: ``grouped_us``, also the time reported as ours;
- prefill: two launches of the grouped WGMMA kernel (gate_up with the SwiGLU in its epilogue, then down):
  ``grouped_us``, reported as ours. The earlier path is timed beside it: a host loop of sm90 GEMMs over
  the non-empty experts (dequantize + cuBLAS per expert, the next expert's dequantization on a side
  stream; the bounds read on the host once, before capture): ``loop_us``. Tried and measured slower on
  an H200 (d11259c: 16.4 ms against the loop's 15.2 ms): blocks of 6 experts dequantized in one launch
  and multiplied in one ``torch._grouped_mm``.

The baseline the target names is the loop with ``F.linear`` on each expert's dequantized bf16 weights
(``cublas_bf16_us``). A stronger bf16 baseline is recorded beside it: ``torch._grouped_mm`` over all
experts on their pre-dequantized weights (``grouped_mm_bf16_us``; it keeps 4x the NVFP4 bytes resident). On an H200 it was no faster than the
loop (13.58 against 13.62 ms at d11259c).

Method (the team's): every time is the median over CUDA-graph replays of calls rotating over ``--sets``
independent weight sets (each set is 48 experts, 1.8 GB of NVFP4: far beyond the 50 MB L2 already),
cuBLAS BF16 in the same process; when capture fails (e.g. an op that copies from the host) an eager
median with CUDA events is recorded instead, labelled ``eager``. The HBM floor is (NVFP4 bytes of the
touched experts + activations in and out) / the measured copy bandwidth. Correctness on the first set:
relative error and cosine against the fp32 product over the same dequantized weights, fresh random
inputs. Weights are random NVFP4 (uniform codes, E4M3 block scales uniform in [1, 448], random global
scales, gate and up with different ones).

On a machine without CUDA the cases run for correctness only (times are null). Results: JSON (``--out``,
default ``data/bench/moe_<device>.json``, which notebook 06 shows) and a table on stdout.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable, List

import torch
import torch.nn.functional as F

from .. import moe
from ..ops import moe as moe_ops
from ..ops.gemm import nvfp4_linear
from . import harness

METHOD = (
    "expert path (gate_up -> clamped SwiGLU -> down) on expert-sorted tokens; CUDA-graph replay "
    "(harness.time_graph) rotating over {sets} weight sets of {experts} experts, median of {replays} replays x "
    "{reps} reps (eager CUDA-event median where capture fails, marked); cuBLAS BF16 loop over experts on "
    "dequantized weights in the same process; HBM floor = NVFP4 bytes of touched experts + activations / measured "
    "copy bandwidth; correctness vs fp32 over the same dequantized weights, fresh random inputs"
)
DECODE_FLOOR_FACTOR = 1.5
PREFILL_SPEED_FACTOR = 0.9


def random_experts(num_experts: int, n: int, k: int, device, segments: int = 1) -> moe.GroupedWeight:
    """Random NVFP4 experts [E, n, k]: uniform codes, E4M3 block scales in [1, 448], global scales ~1e-4
    (one per segment, all different)."""
    weight = torch.randint(0, 256, (num_experts, n, k // 2), dtype=torch.uint8, device=device)
    block = (1 + 447 * torch.rand(num_experts, n, k // 16, device=device)).to(torch.float8_e4m3fn)
    scales = 1e-4 * (0.5 + torch.rand(num_experts, segments))
    sizes = None if segments == 1 else tuple([n // segments] * segments)
    return moe.prepare_grouped_weight(weight, block, scales, sizes)


def dequantized_bf16(weights: moe.GroupedWeight) -> torch.Tensor:
    """bf16 [E, n, k]: every expert's dequantized weight (stacked, so the grouped bf16 baseline can use it)."""
    out = torch.empty(weights.num_experts, weights.n, weights.k, dtype=torch.bfloat16, device=weights.weight.device)
    for e in range(weights.num_experts):
        out[e] = weights.dequantized(e)
    return out


def touched_bytes(weights: moe.MoEWeights, counts: List[int]) -> int:
    """NVFP4 bytes (codes, E4M3 scales, fp32 alpha) of the experts some row routes to, both projections."""
    per_expert = sum(w.nbytes // w.num_experts for w in (weights.gate_up, weights.down))
    return per_expert * sum(1 for c in counts if c > 0)


def grouped_expert_path(x_sorted: torch.Tensor, offsets: torch.Tensor, max_rows: int, weights: moe.MoEWeights) -> torch.Tensor:
    """What the MoE block runs between routing and combine: the grouped op twice (gate_up + SwiGLU, down)."""
    activated = moe.grouped_gemm_w4a16(x_sorted, offsets, weights.gate_up, max_rows, weights.swiglu_limit)
    return moe.grouped_gemm_w4a16(activated, offsets, weights.down, max_rows)


def grouped_mm_expert_path(x_sorted: torch.Tensor, offsets: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, limit: float) -> torch.Tensor:
    """A stronger bf16 baseline than the loop: torch._grouped_mm over ALL experts on their pre-dequantized
    bf16 weights (one launch per projection; the weights stay dequantized in memory, 4x the NVFP4 bytes)."""
    ends = offsets[1:].to(torch.int32)
    hidden = torch._grouped_mm(x_sorted, gate_up.transpose(1, 2), offs=ends)
    return torch._grouped_mm(moe.clamped_swiglu(hidden, limit), down.transpose(1, 2), offs=ends)


def loop_expert_path(x_sorted: torch.Tensor, bounds: List[int], weights: moe.MoEWeights) -> torch.Tensor:
    """The op's eager path for large groups, bounds on the host: one sm90 GEMM per non-empty expert
    (gate_up with the SwiGLU, then down). ModelOpt-layout weights: nvfp4_linear per expert."""
    gu, down = weights.gate_up, weights.down
    if gu.layout == "sm90":
        activated = moe_ops.grouped_sm90_loop(x_sorted, bounds, gu.weight, gu.block_scale, gu.alpha, gu.n, weights.swiglu_limit)
        return moe_ops.grouped_sm90_loop(activated, bounds, down.weight, down.block_scale, down.alpha, down.n)
    hidden = torch.empty(x_sorted.shape[0], gu.n, dtype=torch.bfloat16, device=x_sorted.device)
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            hidden[start:end] = nvfp4_linear(x_sorted[start:end], gu.expert(e))
    activated = moe.clamped_swiglu(hidden, weights.swiglu_limit)
    out = torch.empty(x_sorted.shape[0], down.n, dtype=torch.bfloat16, device=x_sorted.device)
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            out[start:end] = nvfp4_linear(activated[start:end], down.expert(e))
    return out


def cublas_expert_path(x_sorted: torch.Tensor, bounds: List[int], gate_up: List[torch.Tensor], down: List[torch.Tensor], limit: float) -> torch.Tensor:
    """The baseline: the same loop with F.linear on dequantized bf16 weights."""
    hidden = torch.empty(x_sorted.shape[0], gate_up[0].shape[0], dtype=torch.bfloat16, device=x_sorted.device)
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            hidden[start:end] = F.linear(x_sorted[start:end], gate_up[e])
    activated = moe.clamped_swiglu(hidden, limit)
    out = torch.empty(x_sorted.shape[0], down[0].shape[0], dtype=torch.bfloat16, device=x_sorted.device)
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            out[start:end] = F.linear(activated[start:end], down[e])
    return out


def fp32_expert_path(x_sorted: torch.Tensor, bounds: List[int], weights: moe.MoEWeights) -> torch.Tensor:
    offsets = torch.tensor(bounds, device=x_sorted.device)
    hidden = moe.reference_grouped_gemm_w4a16_fp32(x_sorted, offsets, weights.gate_up)
    gate, up = hidden.chunk(2, dim=-1)
    activated = F.silu(gate.clamp(max=weights.swiglu_limit)) * up.clamp(-weights.swiglu_limit, weights.swiglu_limit)
    return moe.reference_grouped_gemm_w4a16_fp32(activated, offsets, weights.down)


def _time(fns: List[Callable], args, notes: List[str], label: str):
    """(us, how): graph replay, else eager (reason noted), (None, None) on a CPU."""
    if args.device != "cuda":
        return None, None
    return harness.time_safely(fns, notes, label, reps_in_graph=args.reps, replays=args.replays, eager_fallback=True)


def bench_case(case: str, tokens: int, sets, args, bandwidth) -> dict:
    """One routing of ``tokens`` tokens (top-k uniform over the experts), timed on every weight set."""
    num_experts, top_k = sets[0][0].num_experts, args.top_k
    hidden = sets[0][0].gate_up.k
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)]).to(args.device)
    routing = moe.route(ids, torch.rand(tokens, top_k, device=args.device), num_experts)
    bounds = routing.offsets.tolist()
    counts = [b - a for a, b in zip(bounds, bounds[1:])]
    xs = [torch.randn(tokens * top_k, hidden, device=args.device).bfloat16() for _ in sets]

    weights0 = sets[0][0]
    offsets, max_rows = routing.offsets, tokens  # top-k ids are distinct per token: an expert holds <= T rows
    reference = fp32_expert_path(xs[0], bounds, weights0)
    use_grouped = max_rows <= moe_ops.GROUPED_KERNEL_MAX_ROWS  # the one-launch decode kernel
    # the op's own dispatch test, for the label
    use_wgmma = (args.device == "cuda" and not use_grouped and moe_ops.grouped_wgmma_takes(hidden, weights0.gate_up.n, True)
                 and moe_ops.grouped_wgmma_takes(weights0.down.k, weights0.down.n, False))
    loop_out = loop_expert_path(xs[0], bounds, weights0)
    notes: List[str] = []
    grouped_out = grouped_expert_path(xs[0], offsets, max_rows, weights0)
    grouped, grouped_how = _time([lambda w=w, x=x: grouped_expert_path(x, offsets, max_rows, w) for (w, _, _), x in zip(sets, xs)], args, notes, "grouped")
    loop, loop_how = _time([lambda w=w, x=x: loop_expert_path(x, bounds, w) for (w, _, _), x in zip(sets, xs)], args, notes, "loop")
    grouped_mm = grouped_mm_how = None
    if hasattr(torch, "_grouped_mm") and xs[0].is_cuda:
        grouped_mm, grouped_mm_how = _time([lambda g=g, d=d, x=x: grouped_mm_expert_path(x, offsets, g, d, weights0.swiglu_limit)
                                            for (_, g, d), x in zip(sets, xs)], args, notes, "grouped_mm bf16")
    block = block_how = None
    if case == "decode":
        tokens_x = [torch.randn(tokens, hidden, device=args.device).bfloat16() for _ in sets]
        topk_w = torch.rand(tokens, top_k, device=args.device)
        block, block_how = _time([lambda w=w, x=x: moe.moe_block(x, ids, topk_w, w, check=False) for (w, _, _), x in zip(sets, tokens_x)],
                                 args, notes, "block")
    ours, ours_how, out = grouped, grouped_how, grouped_out
    cublas, cublas_how = _time(
        [lambda g=g, d=d, x=x: cublas_expert_path(x, bounds, g, d, weights0.swiglu_limit) for (_, g, d), x in zip(sets, xs)],
        args, notes, "cublas")
    nbytes = touched_bytes(weights0, counts) + 2 * tokens * top_k * (hidden + weights0.down.n)
    floor = harness.hbm_floor_us(nbytes, bandwidth) if bandwidth else None
    row = {
        "case": case, "tokens": tokens, "top_k": top_k, "experts": num_experts, "experts_touched": sum(c > 0 for c in counts),
        "max_rows_per_expert": max(counts), "hidden": hidden, "intermediate": weights0.down.k,
        "time_us": ours, "time_method": ours_how, "cublas_bf16_us": cublas, "cublas_method": cublas_how,
        "floor_us": floor, "bytes": nbytes, "notes": notes,
        "rel_err": harness.rel_error(out, reference), "cosine": harness.cosine(out, reference),
        "grouped_us": grouped, "grouped_rel_err": None if grouped_out is None else harness.rel_error(grouped_out, reference),
        "loop_us": loop, "loop_rel_err": harness.rel_error(loop_out, reference), "block_us": block, "block_method": block_how,
        "grouped_mm_bf16_us": grouped_mm, "grouped_mm_bf16_method": grouped_mm_how,
        "layout": weights0.gate_up.layout,
        "our_path": ("one-launch grouped decode kernel x2 (gate_up + fused SwiGLU, down)" if use_grouped
                     else "one-launch grouped WGMMA kernel x2 (gate_up + fused SwiGLU, down)" if use_wgmma
                     else "the grouped op (host loop of sm90 GEMMs over non-empty experts when eager)"),
    }
    if case == "decode":
        row.update(target=f"<= {DECODE_FLOOR_FACTOR:g}x floor of touched weights",
                   target_met=None if ours is None or floor is None else ours <= DECODE_FLOOR_FACTOR * floor)
    else:
        row.update(target=f">= {PREFILL_SPEED_FACTOR:g}x cuBLAS BF16 throughput",
                   target_met=None if ours is None or cublas is None else cublas / ours >= PREFILL_SPEED_FACTOR)
    return row


def print_table(rows: List[dict]) -> None:
    print(f"{'case':<9}{'tokens':>7}{'touched':>8}{'ours us':>10}{'cuBLAS us':>11}{'floor us':>10}{'x floor':>9}{'vs cuBLAS':>10}{'rel err':>10}{'cosine':>10}  target")
    for r in rows:
        ratio = r["time_us"] / r["floor_us"] if r["time_us"] and r["floor_us"] else None
        speed = r["cublas_bf16_us"] / r["time_us"] if r["time_us"] and r["cublas_bf16_us"] else None
        verdict = f"{r['target']}: {'-' if r['target_met'] is None else ('met' if r['target_met'] else 'MISSED')}"
        print(f"{r['case']:<9}{r['tokens']:>7}{r['experts_touched']:>8}{harness.fmt(r['time_us']):>10}{harness.fmt(r['cublas_bf16_us']):>11}{harness.fmt(r['floor_us']):>10}"
              f"{harness.fmt(ratio, '.2f'):>9}{harness.fmt(speed, '.2f'):>10}{r['rel_err']:>10.2e}{r['cosine']:>10.6f}  {verdict}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nvfp4lib.bench moe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode-tokens", default="8", help="comma-separated token counts for the decode case")
    parser.add_argument("--prefill-tokens", default="8192", help="comma-separated token counts for the prefill case ('' to skip)")
    parser.add_argument("--experts", type=int, default=48, help="local experts (384 / 8 ranks)")
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--sets", type=int, default=4, help="rotating weight sets")
    parser.add_argument("--reps", type=int, default=2, help="passes over the sets inside one graph")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="tiny experts, 8 of them, a CPU dry run")
    parser.add_argument("--seed", type=int, default=None, help="default: fresh random inputs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.seed is not None:
        torch.manual_seed(args.seed)
    hidden, inter = (256, 128) if args.small else (7168, 3072)
    num_experts = 8 if args.small else args.experts
    decode_tokens = [int(v) for v in args.decode_tokens.split(",") if v]
    prefill_tokens = [64] if args.small else [int(v) for v in args.prefill_tokens.split(",") if v]
    if args.device != "cuda":
        args.sets = 1

    from tqdm import tqdm

    bandwidth = harness.copy_bandwidth() if args.device == "cuda" else None
    sets = []
    for _ in tqdm(range(args.sets), desc="weight sets", disable=None):
        weights = moe.MoEWeights(random_experts(num_experts, 2 * inter, hidden, args.device, segments=2), random_experts(num_experts, hidden, inter, args.device))
        sets.append((weights, dequantized_bf16(weights.gate_up), dequantized_bf16(weights.down)))
    rows = []
    for case, token_list in (("decode", decode_tokens), ("prefill", prefill_tokens)):
        for tokens in tqdm(token_list, desc=case, disable=None):
            rows.append(bench_case(case, tokens, sets, args, bandwidth))
            if args.device == "cuda":
                torch.cuda.empty_cache()

    method = METHOD.format(sets=args.sets, experts=num_experts, replays=args.replays, reps=args.reps)
    if args.device != "cuda":
        method = "CPU dry run: correctness of every case against the fp32 reference, no timing"
    payload = harness.run_metadata(method)
    payload.update(
        copy_bandwidth_gbs=None if bandwidth is None else bandwidth / 1e9,
        shapes="tiny (--small)" if args.small else "DeepSeek-V4-Pro routed experts",
        rows=rows,
    )
    out = args.out or os.path.join("data", "bench", f"moe_{harness.device_slug()}.json")
    harness.write_result(out, payload)
    print_table(rows)
    print(f"wrote {out}")
    return 0

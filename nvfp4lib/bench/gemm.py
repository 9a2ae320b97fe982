"""``python -m nvfp4lib.bench gemm``: the NVFP4 W4A16 GEMM (ours) against cuBLAS BF16 on the dequantized
weight and QuACK ``gemm_w4a16`` (nvfp4) where importable, at DeepSeek-V4-Pro shapes, on one GPU.

Method (the team's): every time is the median per call under CUDA-graph replay of ``--sets`` (>= 4)
rotating weight sets, so the 50 MB L2 cannot hold the weights; all baselines run in the same process on
the same card; the HBM floor ``(N*K*9/16 + 2*M*K + 2*M*N) / copy bandwidth`` (or the bf16 compute floor
``2*M*N*K / measured peak``, whichever is larger) stands beside each time. Accuracy per point: relative
Frobenius error and cosine of our output (written into a NaN-poisoned buffer on the decode path) against
the fp32 reference over the same dequantized weight, and separately the quantization error against the
original bf16 weight; the graph-replayed output must equal the eager one.

Usage: ``python -m nvfp4lib.bench gemm [--shapes gate_up,down,fused_wqa_wkv|NxK,...] [--ms 1,4,...]
[--sets 4] [--out data/bench/gemm_h100.json] [--no-quack]``. Without a GPU it says so and exits 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

SHAPES = {"gate_up": (6144, 7168), "down": (7168, 3072), "fused_wqa_wkv": (2048, 7168)}
MS = (1, 4, 16, 64, 256, 1024, 4096, 8192)


def parse_shapes(text: str) -> dict:
    """'gate_up,down' or '6144x7168' -> {name: (N, K)}."""
    shapes = {}
    for item in filter(None, text.split(",")):
        if item in SHAPES:
            shapes[item] = SHAPES[item]
        elif "x" in item:
            n, k = (int(v) for v in item.split("x"))
            shapes[item] = (n, k)
        else:
            raise ValueError(f"unknown shape {item!r}: use one of {sorted(SHAPES)} or NxK")
    return shapes


def bf16_peak_flops(size: int = 8192) -> float:
    """Measured bf16 matmul throughput (FLOP/s) of a size^3 GEMM, median of 10."""
    from .harness import time_graph

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    us = time_graph([lambda: a @ b], reps_in_graph=2, replays=10)
    return 2 * size**3 / (us * 1e-6)


def _quack():
    try:
        from quack.blockscaled import nvfp4_utils
        from quack.gemm_w4 import gemm_w4a16, prepare_w4_weight
    except Exception as exc:  # not installed, or broken: recorded as absent
        return None, f"{type(exc).__name__}: {exc}"
    return (gemm_w4a16, prepare_w4_weight, nvfp4_utils), None


def weight_sets(n: int, k: int, sets: int, quack=None):
    """Per set: the original bf16 weight's prepared NVFP4 form, its bf16 dequantization (cuBLAS) and QuACK's."""
    from ..formats import dequantize, quantize
    from ..ops.gemm import prepare_weight

    out = []
    for _ in range(sets):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q = quantize(w)
        item = dict(original=w, prepared=prepare_weight(q.packed, q.block_scale, q.global_scale, layout="sm90"),
                    dequantized=dequantize(q.packed, q.block_scale, q.global_scale, torch.bfloat16))
        if quack is not None:
            gemm_w4a16, prepare_w4_weight, utils = quack
            qq, sf = utils.quantize_nvfp4_reference(w)
            item["quack"] = prepare_w4_weight(qq, sf, wformat="nvfp4")
        out.append(item)
    return out


def fp32_reference(x: torch.Tensor, prepared, n: int, limit: float | None = None) -> torch.Tensor:
    """fp32 [M, N] (or the clamped SwiGLU [M, N/2] with ``limit``) of x against the exact dequantization of an
    sm90-layout prepared weight times its alpha: the reference the GPU probes check every variant against."""
    from ..ops.gemm import clamped_swiglu_reference, dequantize_sm90

    ref = x.float() @ dequantize_sm90(prepared.weight, prepared.block_scale, n).t() * prepared.alpha.float()
    return clamped_swiglu_reference(ref, limit) if limit else ref


def probe_cases(shapes: dict, ms):
    """The GPU probes' cases: for each ``name: (N, K, SwiGLU limit or None)`` of ``shapes`` (4 rotating weight
    sets, prepared once) and each M of ``ms``, yields (name, n, k, limit, out_n, prepared weights, m, x bf16
    [m, k], its fp32 reference against the first weight set)."""
    for name, (n, k, limit) in shapes.items():
        weights = [w["prepared"] for w in weight_sets(n, k, 4)]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            yield name, n, k, limit, n // 2 if limit else n, weights, m, x, fp32_reference(x, weights[0], n, limit)
        del weights


def checked_run(call, prepared, ref: torch.Tensor, notes: list, label: str):
    """GPU probes: ``call(prepared)`` once, checked against ``ref`` (finite, rel err <= 1e-2, cosine >= 0.9999).
    Returns (output, rel err), or None with the failure appended to ``notes`` (the sweep goes on)."""
    from .harness import cosine, rel_error

    try:
        y = call(prepared)
        torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 - recorded, the sweep goes on
        notes.append(f"{label}: {type(error).__name__}: {str(error)[:200]}")
        return None
    err, cos = rel_error(y, ref), cosine(y, ref)
    if not (err <= 1e-2 and cos >= 0.9999 and bool(torch.isfinite(y).all())):
        notes.append(f"{label}: WRONG rel err {err:.3g} cosine {cos:.6f}")
        return None
    return y, err


def time_decode_variants(row: dict, variants, x: torch.Tensor, weights, ref: torch.Tensor, out_n: int, limit, notes: list,
                         case: str, keep_error: bool = False, kernel: str = "decode") -> dict:
    """GPU probes: each ``(label, keyword arguments)`` of ``variants`` for ``kernel``'s runner ("decode":
    gemm_decode.run_decode, "wgmma": gemm_wgmma.run_wgmma) on ``x`` over the rotating ``weights``, checked
    against ``ref`` on the first set (:func:`checked_run`), then timed as the benchmark times
    (harness.time_safely) into ``row[label + "_us"]`` (and ``row[label + "_rel_err"]`` with ``keep_error``); a
    variant that fails or is wrong gets a note instead. A timing probe (``probe`` other than "full", wrong
    results on purpose) is timed unchecked and listed in ``row["probes"]``. ``limit``: the SwiGLU limit or
    None; ``case``: the notes' prefix. Returns ``row``."""
    from ..kernels.sm90 import gemm_decode, gemm_wgmma
    from .harness import time_safely

    runners = {"decode": gemm_decode.run_decode, "wgmma": gemm_wgmma.run_wgmma}
    if kernel not in runners:
        raise ValueError(f"kernel must be one of {sorted(runners)}, got {kernel!r}")
    run = runners[kernel]
    n = 2 * out_n if limit and kernel == "wgmma" else out_n  # run_wgmma takes the weight's rows (2I with the SwiGLU)
    for label, kw in variants:
        def call(p, kw=kw):
            return run(x, p.weight, p.block_scale, p.alpha, n, swiglu_limit=limit, **kw)
        if kw.get("probe", "full") != "full":
            row.setdefault("probes", []).append(label)
        else:
            checked = checked_run(call, weights[0], ref, notes, f"{case} {label}")
            if not checked:
                continue
            if keep_error:
                row[f"{label}_rel_err"] = checked[1]
        row[f"{label}_us"] = time_safely([lambda p=p: call(p) for p in weights], notes, f"{case} {label}")[0]
    return row


def measure_point(name, n, k, m, weights, quack, bw, peak, replays):
    from ..kernels.sm90 import gemm_decode, gemm_wgmma
    from ..ops.gemm import DECODE_MAX_M, nvfp4_linear, use_wgmma
    from .harness import cosine, hbm_floor_us, rel_error, time_graph

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    first = weights[0]["prepared"]
    ref = fp32_reference(x, first, n)
    path = "wgmma" if use_wgmma(m, n, k, False) else "decode" if m <= DECODE_MAX_M else "prefill"
    if path == "prefill":
        y = nvfp4_linear(x, first)
    else:  # the op's kernel into a NaN-poisoned output: every element must be written
        y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        run = gemm_wgmma.run_wgmma if path == "wgmma" else gemm_decode.run_decode
        run(x, first.weight, first.block_scale, first.alpha, n, out=y)
    torch.cuda.synchronize()
    original = x.float() @ weights[0]["original"].float().t()
    row = dict(shape=name, M=m, N=n, K=k, path=path,
               rel_err=rel_error(y, ref), cosine=cosine(y, ref), finite=bool(torch.isfinite(y).all()),
               quant_rel_err_vs_bf16=rel_error(y, original))
    # graph replay must reproduce the eager output
    static_y = {}

    def ours(i):
        def call():
            static_y[i] = nvfp4_linear(x, weights[i]["prepared"])
        return call

    fns = [ours(i) for i in range(len(weights))]
    row["ours_us"] = time_graph(fns, replays=replays)
    row["graph_equals_eager"] = bool(torch.equal(static_y[0], y))
    row["cublas_bf16_us"] = time_graph([(lambda w=w: torch.nn.functional.linear(x, w["dequantized"])) for w in weights], replays=replays)
    if quack is not None:
        gemm_w4a16 = quack[0]
        try:
            for w in weights:
                gemm_w4a16(x, *w["quack"], wformat="nvfp4", n_out=n)
            row["quack_us"] = time_graph([(lambda w=w: gemm_w4a16(x, *w["quack"], wformat="nvfp4", n_out=n)) for w in weights], replays=replays)
        except Exception as exc:
            row["quack_us"] = None
            row["quack_error"] = f"{type(exc).__name__}: {exc}"[:200]
    bytes_moved = n * k * 9 / 16 + 2 * m * k + 2 * m * n
    row["hbm_floor_us"] = hbm_floor_us(bytes_moved, bw)
    row["compute_floor_us"] = 2 * m * n * k / peak * 1e6
    row["floor_us"] = max(row["hbm_floor_us"], row["compute_floor_us"])
    row["speedup_vs_cublas"] = row["cublas_bf16_us"] / row["ours_us"]
    return row


def measure_variants(name, n, k, m, weights, replays):
    """Decode-kernel tuning alternatives at one point: {variant: us} (correctness checked for each)."""
    from ..kernels.sm90 import gemm_decode
    from .harness import cosine, rel_error, time_graph

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    first = weights[0]["prepared"]
    ref = fp32_reference(x, first, n)
    out = {}
    default_tiles = gemm_decode.tiles_for(m)
    configs = [dict(x_smem=xs, warps_per_sm=w) for xs in (False, True) for w in (8, 16, 32)]
    if m > gemm_decode.TOKENS_PER_TILE:
        configs += [dict(x_smem=xs, warps_per_sm=w, tiles=3 - default_tiles) for xs in (False, True) for w in (8, 16)]
    for kw in configs:
        key = ",".join(f"{name_}={val}" for name_, val in kw.items())
        try:
            y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            gemm_decode.run_decode(x, first.weight, first.block_scale, first.alpha, n, out=y, **kw)
            ok = rel_error(y, ref) <= 1e-2 and cosine(y, ref) >= 0.9999
            us = time_graph([(lambda w=w: gemm_decode.run_decode(x, w["prepared"].weight, w["prepared"].block_scale,
                                                                  w["prepared"].alpha, n, **kw)) for w in weights], replays=replays)
            out[key] = dict(us=us, correct=bool(ok))
        except Exception as exc:  # a variant that fails is recorded, the others go on
            out[key] = dict(us=float("nan"), correct=False, error=f"{type(exc).__name__}: {exc}"[:200])
    return dict(shape=name, M=m, N=n, K=k, variants=out)


def measure_shared_expert(ms, sets, bw, replays, limit=10.0):
    """DeepSeek-V4-Pro shared expert (gate_up 6144x7168 with the fused clamped SwiGLU, down 7168x3072):
    the fused op against gate_up GEMM + torch SwiGLU, the whole expert, the sum of the two GEMM floors,
    and the accuracy of the whole expert against fp32 over the same dequantized weights."""
    from ..formats import quantize
    from ..ops.gemm import clamped_swiglu_reference, dequantize_sm90, nvfp4_linear, prepare_weight
    from .harness import cosine, hbm_floor_us, rel_error, time_graph

    hidden, inter = 7168, 3072
    experts = []
    for _ in range(sets):
        gate, up = (torch.randn(inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(2))
        down = torch.randn(hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.02
        qg, qu, qd = quantize(gate), quantize(up), quantize(down)
        gate_up = prepare_weight(torch.cat([qg.packed, qu.packed]), torch.cat([qg.block_scale, qu.block_scale]),
                                 [qg.global_scale, qu.global_scale], [inter, inter], layout="sm90")
        experts.append((gate_up, prepare_weight(qd.packed, qd.block_scale, qd.global_scale, layout="sm90")))
    op = torch.ops.nvfp4lib.gemm_w4a16_swiglu

    def fused(x, e):
        return nvfp4_linear(op(x, e[0].weight, e[0].block_scale, e[0].alpha, e[0].n, limit), e[1])

    def unfused(x, e):
        h = clamped_swiglu_reference(nvfp4_linear(x, e[0]), limit).to(torch.bfloat16)
        return nvfp4_linear(h, e[1])

    rows = []
    gu, dn = experts[0]
    w_gu = dequantize_sm90(gu.weight, gu.block_scale, gu.n) * gu.alpha[:, None]
    w_dn = dequantize_sm90(dn.weight, dn.block_scale, dn.n) * dn.alpha[:, None]
    for m in ms:
        x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16)
        ref_h = clamped_swiglu_reference(x.float() @ w_gu.t(), limit)
        ref = ref_h @ w_dn.t()
        h = op(x, gu.weight, gu.block_scale, gu.alpha, gu.n, limit)
        y = fused(x, experts[0])
        floor_sum = hbm_floor_us(2 * inter * hidden * 9 / 16 + 2 * m * hidden, bw) + hbm_floor_us(hidden * inter * 9 / 16 + 2 * m * inter + 2 * m * hidden, bw)
        row = dict(M=m, swiglu_rel_err=rel_error(h, ref_h), swiglu_cosine=cosine(h, ref_h), expert_rel_err=rel_error(y, ref),
                   expert_cosine=cosine(y, ref), floor_sum_us=floor_sum)
        row["gate_up_swiglu_fused_us"] = time_graph([(lambda e=e: op(x, e[0].weight, e[0].block_scale, e[0].alpha, e[0].n, limit)) for e in experts], replays=replays)
        row["gate_up_then_torch_swiglu_us"] = time_graph([(lambda e=e: clamped_swiglu_reference(nvfp4_linear(x, e[0]), limit).to(torch.bfloat16)) for e in experts], replays=replays)
        row["expert_fused_us"] = time_graph([(lambda e=e: fused(x, e)) for e in experts], replays=replays)
        row["expert_unfused_us"] = time_graph([(lambda e=e: unfused(x, e)) for e in experts], replays=replays)
        row["expert_over_floor_sum"] = row["expert_fused_us"] / floor_sum
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nvfp4lib.bench gemm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="gate_up,down,fused_wqa_wkv")
    parser.add_argument("--ms", default=",".join(str(m) for m in MS))
    parser.add_argument("--sets", type=int, default=4)
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "data/bench"), "gemm_h100.json"))
    parser.add_argument("--no-quack", action="store_true")
    parser.add_argument("--variants", default="1,16,64", help="decode M values at which to time the tuning alternatives ('' for none)")
    parser.add_argument("--expert-ms", default="1,16,64,256,1024,4096", help="M values for the shared-expert timing ('' for none)")
    args = parser.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    ms = [int(v) for v in args.ms.split(",")]
    if args.sets < 4:
        raise ValueError("--sets must be at least 4 (the weights must not fit in L2)")
    if not torch.cuda.is_available():
        print("gemm benchmark: no CUDA GPU here; nothing measured (recorded results: data/bench/gemm_*.json)", file=sys.stderr)
        return 1
    from tqdm import tqdm

    from .harness import copy_bandwidth, run_metadata, write_result

    quack, quack_error = (None, "disabled") if args.no_quack else _quack()
    bw = copy_bandwidth()
    peak = bf16_peak_flops()
    rows, variants = [], []
    started = time.time()
    with tqdm(total=len(shapes) * len(ms), desc="gemm", file=sys.stdout) as bar:
        for name, (n, k) in shapes.items():
            weights = weight_sets(n, k, args.sets, quack)
            for m in ms:
                row = measure_point(name, n, k, m, weights, quack, bw, peak, args.replays)
                rows.append(row)
                bar.set_postfix_str(f"{name} M={m} ours {row['ours_us']:.1f}us cublas {row['cublas_bf16_us']:.1f}us")
                bar.update()
            for m in [int(v) for v in args.variants.split(",") if v]:
                try:
                    variants.append(measure_variants(name, n, k, m, weights, args.replays))
                except Exception as exc:  # recorded, the other measurements go on
                    variants.append(dict(shape=name, M=m, error=f"{type(exc).__name__}: {exc}"[:300], variants={}))
            del weights
            torch.cuda.empty_cache()
    method = ("CUDA-graph replay of calls over %d rotating weight sets (harness.time_graph, %d replays, median per call); "
              "cuBLAS BF16 = F.linear on the dequantized bf16 weight; QuACK gemm_w4a16 nvfp4 through its Python "
              "frontend; floor = max(HBM bytes / copy bandwidth, 2MNK / measured bf16 peak); accuracy vs fp32 "
              "reference over the same dequantized weight" % (args.sets, args.replays))
    expert_ms = [int(v) for v in args.expert_ms.split(",") if v]
    try:
        expert = measure_shared_expert(expert_ms, args.sets, bw, args.replays) if expert_ms else []
    except Exception as exc:  # recorded, the GEMM rows are still written
        import traceback

        traceback.print_exc()
        expert = [dict(error=f"{type(exc).__name__}: {exc}"[:300])]
    payload = dict(run_metadata(method), copy_GBps=bw / 1e9, bf16_peak_TFLOPs=peak / 1e12, quack=quack is not None,
                   quack_error=quack_error, wall_s=time.time() - started, rows=rows, variants=variants, shared_expert=expert)
    write_result(args.out, payload)
    print(f"{'shape':14s} {'M':>5s} {'path':8s} {'ours':>8s} {'cublas':>8s} {'quack':>8s} {'floor':>8s} {'x_cub':>6s} {'rel_err':>8s} {'cos':>8s} graph")
    for r in rows:
        q = r.get("quack_us")
        print(f"{r['shape']:14s} {r['M']:5d} {r['path']:8s} {r['ours_us']:8.1f} {r['cublas_bf16_us']:8.1f} {(q or 0):8.1f} "
              f"{r['floor_us']:8.1f} {r['speedup_vs_cublas']:6.2f} {r['rel_err']:8.1e} {r['cosine']:8.6f} {r['graph_equals_eager']}")
    for v in variants:
        print(v["shape"], v["M"], " ".join(f"{key}:{val['us']:.1f}{'' if val['correct'] else '(WRONG)'}" for key, val in v["variants"].items()))
    for r in expert:
        print("shared expert", " ".join(f"{key}={val:.4g}" if isinstance(val, float) else f"{key}={val}" for key, val in r.items()))
    print("wrote", args.out)
    return 0

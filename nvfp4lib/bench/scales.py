"""Scale-assembly benchmark and GPU check: ``python -m nvfp4lib.bench scales [--out PATH] [--quick]``.

1. Exactness: the CuTeDSL kernel against the reference computed on the CPU (one group and grouped,
   static and dynamic, M in {1, 16, 300, 8192}, K = 7168 and others), outputs poisoned beforehand.
2. CUDA graphs: capture once, replay with new activations and new offsets, compare with eager.
3. Speed (the team method): CUDA-graph replay over 4 rotating activation sets, median of many
   replays; the HBM floor counts 2*M*K read + M*K/2 + M*K/16 written over the measured copy bandwidth.
   The torch reference on the GPU (same graph method) is the baseline of the same run.

Writes one JSON (harness.write_result) and prints a table last.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from ..formats import BLOCK_SIZE
from . import harness

SPEED_TARGET_FRACTION = 0.75  # M=8192, K=7168: at least 75% of the copy bandwidth
SPEED_TARGET_SMALL_US = 5.0  # M=16, K=7168: under 5 us per call


def _activations(m, k, gen):
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 1, max(m, 1))[:m].unsqueeze(1)
    x[torch.rand(m, k, generator=gen) < 0.01] *= 30
    return x.to(torch.bfloat16)


def _uneven_offsets(m, groups, gen):
    weights = torch.rand(groups, generator=gen) ** 3
    weights[torch.rand(groups, generator=gen) < 0.2] = 0
    weights[0] += 1e-3
    sizes = torch.floor(weights / weights.sum() * m).long()
    sizes[int(torch.argmax(weights))] += m - int(sizes.sum())
    return torch.cat((torch.zeros(1, dtype=torch.long), torch.cumsum(sizes, 0))).to(torch.int32)


def _bytes_equal(a, b):
    a = a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a
    b = b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b
    return a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def _poison():
    block = torch.full((1 << 28,), 0xFF, dtype=torch.uint8, device="cuda")
    del block


def check_exactness(gen, quick=False):
    """Kernel (through the op) against the CPU reference; returns a list of result dicts."""
    from ..scales import assemble_scales, assemble_scales_grouped, kernel_backend_available, reference_assemble, reference_assemble_grouped

    rows = []
    single_shapes = [(1, 7168), (16, 7168), (300, 7168), (8192, 7168), (129, 3072), (77, 272)]
    if quick:
        single_shapes = single_shapes[:3]
    for m, k in single_shapes:
        x = _activations(m, k, gen)
        for mode in ("static", "dynamic"):
            scale = torch.tensor(float(x.float().abs().amax()) / 2688 * 0.3) if mode == "static" else None
            _poison()
            got = assemble_scales(x.cuda(), None if scale is None else scale.cuda())
            expected = reference_assemble(x, scale)
            rows.append(dict(check="single", m=m, k=k, mode=mode, kernel=kernel_backend_available(x.cuda()),
                             equal=all(_bytes_equal(a, b) for a, b in zip(got, expected))))
    grouped_cases = [(300, 7168, 4), (8192, 7168, 384), (2000, 3072, 8), (16, 7168, 384)]
    if quick:
        grouped_cases = grouped_cases[:1]
    for m, k, groups in grouped_cases:
        x = _activations(m, k, gen)
        offsets = _uneven_offsets(m, groups, gen)
        for mode in ("static", "dynamic"):
            scale = torch.empty(groups).uniform_(0.0005, 0.05, generator=gen) if mode == "static" else None
            _poison()
            got = assemble_scales_grouped(x.cuda(), offsets.cuda(), None if scale is None else scale.cuda())
            expected = reference_assemble_grouped(x, offsets, scale, m)
            rows.append(dict(check="grouped", m=m, k=k, groups=groups, mode=mode, kernel=kernel_backend_available(x.cuda()),
                             equal=all(_bytes_equal(a, b) for a, b in zip(got, expected))))
    return rows


def check_graph_replay(gen):
    """Capture one step (single + grouped, static + dynamic), replay with new data, compare to eager."""
    from ..scales import assemble_scales, assemble_scales_grouped

    m, k = 700, 7168
    x = _activations(m, k, gen).cuda()
    offsets = torch.tensor([0, 100, 100, 650, 700], dtype=torch.int32, device="cuda")
    scale = torch.tensor(0.01, device="cuda")

    def step():
        return (*assemble_scales(x), *assemble_scales(x, scale), *assemble_scales_grouped(x, offsets),
                *assemble_scales_grouped(x, offsets, scale))

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    results = []
    for trial in range(3):
        x.copy_(_activations(m, k, gen).cuda())
        offsets.copy_(torch.tensor([0, 50 * trial, 300, 300 + 100 * trial, 700], dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        results.append(dict(check="graph_replay", trial=trial, equal=all(_bytes_equal(a, b) for a, b in zip(captured, eager))))
    return results


def moved_bytes(m, k):
    """2*M*K read + M*K/2 + M*K/16 written (the issue's count; the padded scale rows are extra)."""
    return 2 * m * k + m * k // 2 + m * k // BLOCK_SIZE


def time_cases(gen, bandwidth, quick=False):
    from ..scales import reference_assemble
    import nvfp4lib.ops.scales  # noqa: F401

    op = torch.ops.nvfp4lib.assemble_scales
    grouped_op = torch.ops.nvfp4lib.assemble_scales_grouped
    cases = [(8192, 7168), (16, 7168), (128, 7168), (2048, 7168)]
    if quick:
        cases = cases[:2]
    rows = []
    for m, k in cases:
        sets = [_activations(m, k, gen).cuda() for _ in range(4)]
        scale = torch.tensor(float(sets[0].float().abs().amax()) / 2688, device="cuda")
        floor = harness.hbm_floor_us(moved_bytes(m, k), bandwidth)
        for mode in ("static", "dynamic"):
            arg = scale if mode == "static" else None
            us = harness.time_graph([lambda x=x: op(x, arg) for x in sets], reps_in_graph=5, replays=100)
            ref_us = None
            if m <= 2048:  # the torch reference (chunked elementwise ops) as the baseline of this run
                ref_us = harness.time_graph([lambda x=x: reference_assemble(x, arg) for x in sets], reps_in_graph=1, replays=20)
            rows.append(dict(case="single", m=m, k=k, mode=mode, us=us, floor_us=floor,
                             fraction_of_copy_bandwidth=floor / us, torch_reference_us=ref_us))
        del sets
    # grouped: 384 experts, uneven
    for m in ((8192,) if quick else (8192, 512)):
        k, groups = 7168, 384
        sets = [_activations(m, k, gen).cuda() for _ in range(4)]
        offsets = _uneven_offsets(m, groups, gen).cuda()
        floor = harness.hbm_floor_us(moved_bytes(m, k), bandwidth)
        for mode in ("static", "dynamic"):
            arg = torch.full((groups,), 0.01, device="cuda") if mode == "static" else None
            us = harness.time_graph([lambda x=x: grouped_op(x, offsets, arg, m) for x in sets], reps_in_graph=5, replays=100)
            rows.append(dict(case="grouped", m=m, k=k, groups=groups, mode=mode, us=us, floor_us=floor,
                             fraction_of_copy_bandwidth=floor / us, torch_reference_us=None))
        del sets
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nvfp4lib.bench scales")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "scales_bench.json"))
    parser.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "little"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("scales benchmark: needs a CUDA GPU")
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    started = time.time()
    exactness = check_exactness(gen, args.quick)
    replay = check_graph_replay(gen)
    bandwidth = harness.copy_bandwidth()
    timings = time_cases(gen, bandwidth, args.quick)
    by_key = {(r["case"], r["m"], r["mode"]): r for r in timings}
    big, small = by_key[("single", 8192, "static")], by_key[("single", 16, "static")]
    payload = harness.run_metadata(
        "exactness: kernel vs CPU reference (bytes), outputs poisoned with 0xFF; graph: capture then replay with new "
        "x and offsets vs eager; speed: CUDA-graph replay of 4 rotating activation sets x 5 reps, median of 100 "
        "replays; floor = (2MK + MK/2 + MK/16) bytes / measured copy bandwidth (read+written)")
    payload.update(
        seed=args.seed,
        copy_bandwidth_GBps=bandwidth / 1e9,
        exactness=exactness,
        graph_replay=replay,
        timings=timings,
        targets=dict(
            large_fraction=big["fraction_of_copy_bandwidth"], large_target=SPEED_TARGET_FRACTION,
            large_met=big["fraction_of_copy_bandwidth"] >= SPEED_TARGET_FRACTION,
            small_us=small["us"], small_target_us=SPEED_TARGET_SMALL_US, small_met=small["us"] < SPEED_TARGET_SMALL_US,
        ),
        all_exact=all(r["equal"] for r in exactness + replay),
        wall_s=time.time() - started,
    )
    harness.write_result(args.out, payload)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; exact: {payload['all_exact']} "
          f"({sum(r['equal'] for r in exactness)}/{len(exactness)} checks, replay {sum(r['equal'] for r in replay)}/{len(replay)})")
    for r in exactness + replay:
        if not r["equal"]:
            print("  MISMATCH", r)
    print(f"{'case':8} {'M':>5} {'K':>5} {'mode':8} {'us':>8} {'floor us':>9} {'of copy bw':>10} {'torch ref us':>12}")
    for r in timings:
        ref = f"{r['torch_reference_us']:.1f}" if r["torch_reference_us"] else "-"
        print(f"{r['case']:8} {r['m']:5d} {r['k']:5d} {r['mode']:8} {r['us']:8.2f} {r['floor_us']:9.2f} "
              f"{r['fraction_of_copy_bandwidth']:10.1%} {ref:>12}")
    print(f"targets: M=8192 {big['fraction_of_copy_bandwidth']:.1%} of copy bw (>= 75%), M=16 {small['us']:.2f} us (< 5 us)")
    return 0 if payload["all_exact"] else 1

"""GPU tests of the sm90 W4A16 GEMM (skipped without a Hopper GPU and CuTeDSL, with the reason): accuracy
against the fp32 reference at every benchmarked shape on both paths, into NaN-poisoned outputs, CUDA-graph
replay equal to eager, and the fused gate_up + clamped SwiGLU. The GPU runner is scripts/gpu/gemm_check.py."""
import pytest
import torch

from nvfp4lib.bench.harness import cosine, rel_error
from nvfp4lib.formats import quantize
from nvfp4lib.ops.gemm import LAYOUT_SM90, clamped_swiglu_reference, dequantize_rows, nvfp4_linear, prepare_weight
from tests.conftest import requires_cute, requires_hopper

pytestmark = [requires_hopper, requires_cute]
SHAPES = [(6144, 7168), (7168, 3072), (2048, 7168)]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 4, 12, 16, 64, 256, 1024, 4096])
def test_accuracy_and_graph_replay(fresh_seed, n, k, m):
    from nvfp4lib.kernels.sm90 import gemm_decode

    q = quantize(torch.randn(n, k, device="cuda") * 0.02)
    p = prepare_weight(q.packed, q.block_scale, q.global_scale)
    assert p.layout == LAYOUT_SM90
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ (dequantize_rows(q.packed, q.block_scale) * p.alpha[:, None]).t()
    if m <= 64:
        y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        gemm_decode.run_decode(x, p.weight, p.block_scale, p.alpha, n, out=y)
    else:
        y = nvfp4_linear(x, p)
    assert torch.isfinite(y).all()
    assert rel_error(y, ref) <= 1e-2 and cosine(y, ref) >= 0.9999
    nvfp4_linear(x, p)  # eager first: compile, counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = nvfp4_linear(x, p)
    static.fill_(float("nan"))
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, nvfp4_linear(x, p))


def _gate_up_case(inter: int, hidden: int, m: int):
    """(prepared gate_up [gate; up] with unequal global scales, x bf16 [m, hidden], the fp32 clamped SwiGLU
    reference [m, inter] at limit 10)."""
    gate, up = quantize(torch.randn(inter, hidden, device="cuda") * 0.02), quantize(torch.randn(inter, hidden, device="cuda") * 0.05)
    p = prepare_weight(torch.cat([gate.packed, up.packed]), torch.cat([gate.block_scale, up.block_scale]),
                       [gate.global_scale, up.global_scale], [inter, inter])
    w = torch.cat([dequantize_rows(gate.packed, gate.block_scale), dequantize_rows(up.packed, up.block_scale)]) * p.alpha[:, None]
    x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16) * 8
    return p, x, clamped_swiglu_reference(x.float() @ w.t(), 10.0)


@pytest.mark.parametrize("m", [1, 16, 64, 200, 1000, 4097])
def test_fused_swiglu(fresh_seed, m):
    """The decode kernel (M <= 64) and the WGMMA kernel (above) with the SwiGLU in the epilogue."""
    inter = 3072
    p, x, ref = _gate_up_case(inter, 7168, m)
    y = torch.ops.nvfp4lib.gemm_w4a16_swiglu(x, p.weight, p.block_scale, p.alpha, p.n, 10.0)
    assert y.shape == (m, inter) and torch.isfinite(y).all()
    assert rel_error(y, ref) <= 1e-2 and cosine(y, ref) >= 0.9999


@pytest.mark.parametrize("m", [1, 300])
def test_modelopt_layout_on_gpu_and_subnormal_fallback(fresh_seed, m):
    """A weight the sm90 layout cannot hold (an E4M3-subnormal block scale) stays in the ModelOpt layout
    and still gives the right answer on the GPU (dequantize + cuBLAS)."""
    q = quantize(torch.randn(512, 1024, device="cuda") * 0.02)
    scales = q.block_scale.clone()
    scales.view(torch.uint8)[5, 7] = 0x02  # E4M3 subnormal
    p = prepare_weight(q.packed, scales, q.global_scale)
    assert p.layout == "modelopt"
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ (dequantize_rows(q.packed, scales) * p.alpha[:, None]).t() + bias.float()
    y = nvfp4_linear(x, p, bias)
    assert torch.isfinite(y).all() and rel_error(y, ref) <= 1e-2 and cosine(y, ref) >= 0.9999


@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("tiles,rows,ksplit,x_stagger", [(1, 1, 8, False), (2, 2, 3, False), (1, 4, 2, False), (2, 1, 16, False),
                                                         (1, 1, 8, True), (2, 2, 3, True)])
def test_decode_in_cta_ksplit(fresh_seed, m, tiles, rows, ksplit, x_stagger):
    """The decode kernel with its K range split inside the CTA, on a shape that leaves a CTA's last row slots
    empty (65 row groups) and K slices of unequal length (20 quads), with a bias, into NaN-poisoned outputs;
    also with the staggered activation loads (``x_stagger``, measured and off by default)."""
    from nvfp4lib.kernels.sm90 import gemm_decode

    n, k = 1040, 5120
    q = quantize(torch.randn(n, k, device="cuda") * 0.02)
    p = prepare_weight(q.packed, q.block_scale, q.global_scale)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ (dequantize_rows(q.packed, q.block_scale) * p.alpha[:, None]).t() + bias.float()
    y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    gemm_decode.run_decode(x, p.weight, p.block_scale, p.alpha, n, bias, out=y, tiles=tiles, rows=rows, ksplit=ksplit,
                           x_stagger=x_stagger)
    assert torch.isfinite(y).all()
    assert rel_error(y, ref) <= 1e-2 and cosine(y, ref) >= 0.9999


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("k,ksplit", [(512, 8), (5120, 4)])
@pytest.mark.parametrize("pdl", ["start", "off"])
def test_decode_early_scales(fresh_seed, m, k, ksplit, pdl):
    """The epilogue's factors read before the main loop (early_scales) give y bit for bit equal to reading them in
    the epilogue: with a bias, and the paired SwiGLU (gate and up alphas unequal), with and without PDL; K = 512 over
    8 slices leaves the slice of every row group's first warp, the one that stores y, without quads (the factors
    are then read in the epilogue). N = 1040 (a CTA's last row slot empty), into NaN-poisoned outputs."""
    from nvfp4lib.kernels.sm90 import gemm_decode

    n = 1040
    q = quantize(torch.randn(n, k, device="cuda") * 0.02)
    p = prepare_weight(q.packed, q.block_scale, q.global_scale)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ (dequantize_rows(q.packed, q.block_scale) * p.alpha[:, None]).t() + bias.float()
    sw, sx, sref = _gate_up_case(n, k, m)
    out = {}
    for early in (False, True):
        y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        gemm_decode.run_decode(x, p.weight, p.block_scale, p.alpha, n, bias, out=y, tiles=1, rows=2, ksplit=ksplit, pdl=pdl,
                               early_scales=early)
        h = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        gemm_decode.run_decode(sx, sw.weight, sw.block_scale, sw.alpha, n, out=h, swiglu_limit=10.0, tiles=1, rows=2, ksplit=ksplit,
                               paired=True, pdl=pdl, early_scales=early)
        assert torch.isfinite(y).all() and rel_error(y, ref) <= 1e-2 and cosine(y, ref) >= 0.9999
        assert torch.isfinite(h).all() and rel_error(h, sref) <= 1e-2 and cosine(h, sref) >= 0.9999
        out[early] = (y, h)
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])


@pytest.mark.parametrize("m", [1, 3, 16, 33, 64])
def test_decode_paired_swiglu(fresh_seed, m):
    """The paired SwiGLU decode kernel (a gate and an up warp per K slice, up sums handed over in shared
    memory) on I = 1040 (65 row groups, K = 5120: unequal K slices) against the fp32 reference, into NaN."""
    from nvfp4lib.kernels.sm90 import gemm_decode

    inter = 1040
    p, x, ref = _gate_up_case(inter, 5120, m)
    for tiles, ksplit in [(1, 6), (2, 4), (1, 3)]:
        y = torch.full((m, inter), float("nan"), device="cuda", dtype=torch.bfloat16)
        gemm_decode.run_decode(x, p.weight, p.block_scale, p.alpha, inter, out=y, swiglu_limit=10.0, tiles=tiles, rows=2, ksplit=ksplit,
                               paired=True)
        assert torch.isfinite(y).all()
        assert rel_error(y, ref) <= 1e-2 and cosine(y, ref) >= 0.9999


@pytest.mark.parametrize("m", [1, 3, 16, 33, 64])
@pytest.mark.parametrize("inter,k", [(1040, 5120), (3072, 7168)])
def test_decode_cluster_paired_swiglu(fresh_seed, m, inter, k):
    """paired="cluster" (the gate and the up row group in two CTAs of a cluster, the up sums sent by st.async into the
    gate CTA's shared memory): bit for bit the paired kernel's y at the same K slices (the same sums in the same order),
    against the fp32 reference, into NaN-poisoned outputs; I = 1040 leaves unequal K slices and 65 row groups; replayed
    in a CUDA graph (PDL on) bit-equal."""
    from nvfp4lib.kernels.sm90 import gemm_decode

    p, x, ref = _gate_up_case(inter, k, m)
    for tiles, ksplit in [(1, 8), (1, 6), (2, 4)]:
        outs = []
        for paired, rows in (("cluster", 1), (True, 2)):
            y = torch.full((m, inter), float("nan"), device="cuda", dtype=torch.bfloat16)
            gemm_decode.run_decode(x, p.weight, p.block_scale, p.alpha, inter, out=y, swiglu_limit=10.0, tiles=tiles, rows=rows,
                                   ksplit=ksplit, paired=paired)
            outs.append(y)
        assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])
        assert rel_error(outs[0], ref) <= 1e-2 and cosine(outs[0], ref) >= 0.9999
    y = torch.full((m, inter), float("nan"), device="cuda", dtype=torch.bfloat16)

    def run():
        gemm_decode.run_decode(x, p.weight, p.block_scale, p.alpha, inter, out=y, swiglu_limit=10.0, tiles=1, rows=1, ksplit=8,
                               paired="cluster")
    run()
    expected = y.clone()
    y.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
        run()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, expected)


@pytest.mark.parametrize("m", [1, 8, 16, 128, 256])
@pytest.mark.parametrize("mode", ["start", "loop"])
def test_pdl_chain_graph_replay(fresh_seed, m, mode):
    """Programmatic dependent launch: six launches each reading what the one before wrote (y -> x), captured
    in one CUDA graph and replayed into NaN-poisoned buffers, equal bit for bit to the same chain run eagerly
    without PDL (a read of x before griddepcontrol.wait would see the poison or a stale value)."""
    from nvfp4lib.kernels.sm90 import gemm_decode, gemm_wgmma

    size = 2048
    weights = [prepare_weight(q.packed, q.block_scale, q.global_scale)
               for q in (quantize(torch.randn(size, size, device="cuda") * 0.03) for _ in range(3))]

    def layer(x, p, out, pdl):
        if m <= gemm_decode.KSPLIT_MAX_M:
            return gemm_decode.run_decode(x, p.weight, p.block_scale, p.alpha, size, out=out, pdl=pdl)
        return gemm_wgmma.run_wgmma(x, p.weight, p.block_scale, p.alpha, size, out=out, pdl=pdl)

    x0 = torch.randn(m, size, device="cuda", dtype=torch.bfloat16)
    expected = x0
    for i in range(6):
        expected = layer(expected, weights[i % 3], None, "off")
    bufs = [torch.empty(m, size, device="cuda", dtype=torch.bfloat16) for _ in range(6)]

    def chain():
        x = x0
        for i in range(6):
            x = layer(x, weights[i % 3], bufs[i], mode)
        return x

    chain()  # eager first: compile, counters
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    for _ in range(3):
        for b in bufs:
            b.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(bufs[-1]).all()
        assert torch.equal(bufs[-1], expected)

"""CPU tests of the W4A16 GEMM: the sm90 layout (repack, register-decode model), the ops' exact CPU
reference (both layouts, fused segments, bias, fused SwiGLU), the fake ops under torch.compile, bad
input, the CuTeDSL kernels' PTX (sm_90a, compiled here without a GPU) and the benchmark's CPU behaviour."""
import os
import re
import tempfile

import pytest
import torch

from nvfp4lib.formats import e2m1_decode, quantize, unpack_nibbles
from nvfp4lib.kernels.sm90 import dequant
from nvfp4lib.ops.gemm import (LAYOUT_MODELOPT, LAYOUT_SM90, clamped_swiglu_reference, dequantize_rows,
                               dequantize_sm90, nvfp4_linear, prepare_weight, reference_gemm)
from tests.conftest import requires_cute


def _quantized(n, k, scale=1.0):
    w = torch.randn(n, k) * scale
    w[0, :16] = 0  # an all-zero block
    return quantize(w)


def test_repack_roundtrip_and_exact_rewrites(fresh_seed):
    q = _quantized(40, 512)
    scales = q.block_scale.clone()
    raw = scales.view(torch.uint8)
    raw[1, 2] = 0x00  # zero scale: its block's codes must become 0
    raw[2, 3] |= 0x80  # negative scale: its block's signs must flip
    words, scale_words = dequant.repack_weight(q.packed, scales)
    assert words.shape == (3, 8, 32, 4) and words.dtype == torch.int32
    assert scale_words.shape == (3, 2, 32, 2) and scale_words.dtype == torch.int32
    codes, scale_bits = dequant.unpack_repacked(words, scale_words, 40, 512)
    # the rewrites leave every product e2m1 * scale unchanged
    expected = dequantize_rows(q.packed, scales)
    got = (e2m1_decode(codes).reshape(40, -1, 16) * scale_bits.view(torch.float8_e4m3fn).float().unsqueeze(-1)).reshape(40, -1)
    assert torch.equal(got, expected)
    untouched = torch.ones(40, 32, dtype=torch.bool)
    untouched[1, 2] = untouched[2, 3] = False
    assert torch.equal(scale_bits[untouched], raw[untouched])
    assert torch.equal(dequantize_sm90(words, scale_words, 40), expected)


def test_register_decode_model_matches_e2m1_times_scale(fresh_seed):
    n, k = 32, 256
    q = _quantized(n, k)
    words, scale_words = dequant.repack_weight(q.packed, q.block_scale)
    values = e2m1_decode(unpack_nibbles(q.packed)).float() * q.block_scale.float().repeat_interleave(16, 1)
    sbytes = scale_words.view(torch.uint8).reshape(2, 1, 32, 4, 2)
    for rg in range(2):
        for c in range(4):
            for lane in torch.randint(0, 32, (6,)).tolist():
                g, t = lane // 4, lane % 4
                for kk in range(4):
                    regs = dequant.decode_word_reference(int(words[rg, c, lane, kk]), int(sbytes[rg, c // 4, lane, c % 4, 0]),
                                                         int(sbytes[rg, c // 4, lane, c % 4, 1]))
                    for j, pair in enumerate(regs):
                        row = 16 * rg + 8 * (j % 2) + g
                        for e, value in enumerate(pair):
                            col = 64 * c + 16 * t + 4 * kk + 2 * (j // 2) + e
                            assert value * 2**dequant.MAGNITUDE_SHIFT == float(values[row, col])


def test_subnormal_scale_keeps_modelopt_layout():
    q = _quantized(16, 256)
    scales = q.block_scale.clone()
    scales.view(torch.uint8)[3, 4] = 0x03  # an E4M3 subnormal
    assert not dequant.decode_layout_supported(scales)
    with pytest.raises(ValueError, match="subnormal"):
        prepare_weight(q.packed, scales, q.global_scale, layout=LAYOUT_SM90)
    assert prepare_weight(q.packed, scales, q.global_scale).layout == LAYOUT_MODELOPT  # CPU default too


def test_sm90_shape_constraint_is_named():
    q = _quantized(16, 128)
    with pytest.raises(ValueError, match="multiple of 256"):
        prepare_weight(q.packed, q.block_scale, q.global_scale, layout=LAYOUT_SM90)


@pytest.mark.parametrize("m", [1, 5, 70])
def test_sm90_op_equals_reference_on_cpu(fresh_seed, m):
    q = _quantized(48, 512)
    x = torch.randn(m, 512).to(torch.bfloat16)
    bias = torch.randn(48).to(torch.bfloat16)
    segments = (32, 16)
    scales = [q.global_scale, q.global_scale * 3]
    modelopt = prepare_weight(q.packed, q.block_scale, scales, segments)
    sm90 = prepare_weight(q.packed, q.block_scale, scales, segments, layout=LAYOUT_SM90)
    assert sm90.layout == LAYOUT_SM90 and sm90.nbytes < 48 * 512 * 9 / 16 + 48 * 4 + 1
    ref = reference_gemm(x, q.packed, q.block_scale, modelopt.alpha, bias)
    assert torch.equal(nvfp4_linear(x, modelopt, bias), ref)
    assert torch.equal(nvfp4_linear(x, sm90, bias), ref)


@pytest.mark.parametrize("layout", [LAYOUT_MODELOPT, LAYOUT_SM90])
def test_fused_swiglu_op_on_cpu(fresh_seed, layout):
    gate, up = _quantized(32, 256), _quantized(32, 256, scale=4.0)
    p = prepare_weight(torch.cat([gate.packed, up.packed]), torch.cat([gate.block_scale, up.block_scale]),
                       [gate.global_scale, up.global_scale], [32, 32], layout=layout)
    x = (torch.randn(3, 256) * 4).to(torch.bfloat16)
    for limit in (10.0, float("inf")):
        h = (x.float() @ dequantize_rows(torch.cat([gate.packed, up.packed]), torch.cat([gate.block_scale, up.block_scale])).t()) * p.alpha
        expected = clamped_swiglu_reference(h, limit).to(torch.bfloat16)
        got = torch.ops.nvfp4lib.gemm_w4a16_swiglu(x, p.weight, p.block_scale, p.alpha, p.n, limit)
        assert got.shape == (3, 32)
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="even"):
        torch.ops.nvfp4lib.gemm_w4a16_swiglu(x, p.weight, p.block_scale, p.alpha, 63, 10.0)


def test_fake_ops_under_torch_compile(fresh_seed):
    q = _quantized(32, 256)
    p = prepare_weight(q.packed, q.block_scale, q.global_scale, layout=LAYOUT_SM90)
    x = torch.randn(4, 256).to(torch.bfloat16)

    def f(x):
        y = nvfp4_linear(x, p)
        s = torch.ops.nvfp4lib.gemm_w4a16_swiglu(x, p.weight, p.block_scale, p.alpha, p.n, 10.0)
        return y, s

    y, s = torch.compile(f, fullgraph=True, backend="eager")(x)
    ye, se = f(x)
    assert torch.equal(y, ye) and torch.equal(s, se) and s.shape == (4, 16)


def test_bad_input_is_refused():
    q = _quantized(32, 256)
    p = prepare_weight(q.packed, q.block_scale, q.global_scale, layout=LAYOUT_SM90)
    with pytest.raises(ValueError, match="K=512"):
        nvfp4_linear(torch.randn(2, 512).to(torch.bfloat16), p)
    with pytest.raises(ValueError, match="bf16"):
        nvfp4_linear(torch.randn(2, 256), p)
    with pytest.raises(ValueError, match="bias"):
        nvfp4_linear(torch.randn(2, 256).to(torch.bfloat16), p, torch.zeros(5))


@requires_cute
@pytest.mark.parametrize("tiles,swiglu,prefetch_x,x_smem", [(1, False, True, False), (2, False, False, False), (2, True, True, False),
                                                           (1, False, False, True), (2, True, False, True)])
def test_decode_kernel_ptx_sm90a(tiles, swiglu, prefetch_x, x_smem):
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_decode

    ptx = ptx_of(gemm_decode.compile_decode(3072, tiles, False, swiglu, prefetch_x, arch="sm_90a", keep_ptx=True, x_smem=x_smem))
    assert ".target sm_90a" in ptx
    groups = 2 if swiglu else 1
    # 4 chunks x 4 steps x tiles x groups MMAs per 256-k step, tensor-core bf16 with fp32 accumulate
    assert len(re.findall(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32", ptx)) == 16 * tiles * groups
    assert len(re.findall(r"mul\.rn\.bf16x2", ptx)) == 64 * groups  # the exact scale fold, 4 per word
    assert "shl.b32" in ptx and "shr.u32" in ptx and "ld.global.v4" in ptx  # register decode, 16-byte weight loads
    if x_smem:  # activations staged once per CTA, then 16-byte shared loads for the B fragments
        assert "bar.sync" in ptx and len(re.findall(r"ld\.shared\.v4", ptx)) == 8 * tiles
    assert "atom" in ptx and "ld.global.cg" in ptx  # split-K: arrival counter, L2 reads of partials
    assert ".local" not in ptx  # no spills to local memory
    if swiglu:
        assert "ex2.approx" in ptx


@requires_cute
@pytest.mark.parametrize("swiglu", [False, True])
def test_grouped_decode_kernel_ptx_sm90a(swiglu):
    """The one-launch grouped variant: the same MMA and decode as the plain kernel, plus its offsets read
    on the device (no host value in the launch decides which rows a group has)."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_decode

    ptx = ptx_of(gemm_decode.compile_decode(3072, 1, False, swiglu, arch="sm_90a", keep_ptx=True, grouped=True))
    plain = ptx_of(gemm_decode.compile_decode(3072, 1, False, swiglu, arch="sm_90a", keep_ptx=True))
    groups = 2 if swiglu else 1
    assert len(re.findall(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32", ptx)) == 16 * groups
    assert len(re.findall(r"mul\.rn\.bf16x2", ptx)) == 64 * groups
    assert ".local" not in ptx
    # two more global loads than the plain kernel: offsets[e] and offsets[e + 1]
    assert len(re.findall(r"ld\.global\.u32|ld\.global\.b32|ld\.global\.s32", ptx)) >= len(re.findall(r"ld\.global\.u32|ld\.global\.b32|ld\.global\.s32", plain)) + 2


@requires_cute
@pytest.mark.parametrize("coalesced", [False, True])
def test_dequant_kernel_ptx_sm90a(coalesced):
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_prefill

    ptx = ptx_of(gemm_prefill.compile_dequant(3072, arch="sm_90a", keep_ptx=True, coalesced=coalesced))
    assert ".target sm_90a" in ptx
    assert len(re.findall(r"mul\.rn\.bf16x2", ptx)) == 64
    assert len(re.findall(r"cvt\.rn\.bf16x2\.f32", ptx)) == 64
    assert len(re.findall(r"st\.global\.v4", ptx)) == 16 and ".local" not in ptx
    # coalesced: 4 chunks x 2 rows x 2 stores x 4 words x 2 candidate pieces exchanged by shuffles
    assert len(re.findall(r"shfl\.sync", ptx)) == (128 if coalesced else 0)


def test_bench_without_gpu_says_so(capsys):
    from nvfp4lib.bench import gemm

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    assert gemm.main(["--shapes", "gate_up", "--ms", "1"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err
    assert gemm.parse_shapes("down,96x512") == {"down": (7168, 3072), "96x512": (96, 512)}
    with pytest.raises(ValueError, match="unknown shape"):
        gemm.parse_shapes("nope")


@requires_cute  # the rule reads the kernel's tile sizes
def test_wgmma_dispatch_rule():
    """The sm90 op runs the WGMMA kernel for M in (64, 1024] (2048 for K > 4096; any M for K > 4096 and N >= 4096
    where the tile waves are 90% full) when its grid (with K splits) is large enough and there is no bias, and from
    M = 33 with one 64-token tile where that grid holds at least 96 CTAs; the decode kernel below, dequantize + cuBLAS
    above."""
    from nvfp4lib.ops.gemm import use_wgmma

    assert use_wgmma(256, 6144, 7168, False) and use_wgmma(256, 7168, 3072, False) and use_wgmma(1024, 7168, 3072, False)
    assert use_wgmma(256, 7168, 16384, False) and use_wgmma(1024, 7168, 16384, False)  # wo_b
    # K > 4096 up to M = 2048 (H100, wgmma_split_probe_*_517eb25.json): gate_up M = 1024 (stream-K) 141.7 us against
    # 163.9 for dequantize + cuBLAS, M = 2048 275.0 against 298.5; fused_wqa_wkv M = 2048 87.8 against 95.2
    assert use_wgmma(1024, 6144, 7168, False) and use_wgmma(2048, 6144, 7168, False) and use_wgmma(2048, 2048, 7168, False)
    assert use_wgmma(2048, 7168, 16384, False)
    # above 2048 for K > 4096 and N >= 4096 where the tile waves are >= 90% full (gate_up, wo_b at 4096 / 6144 / 8192)
    assert all(use_wgmma(m, n, k, False) for m in (4096, 6144, 8192) for n, k in ((6144, 7168), (7168, 16384)))
    assert not use_wgmma(3072, 6144, 7168, False) and not use_wgmma(3072, 7168, 16384, False)  # 87% / 85% full
    assert not any(use_wgmma(m, 2048, 7168, False) or use_wgmma(m, 7168, 3072, False) for m in (4096, 8192))  # fused, down
    # ... where the plan fills about a wave (dispatch_check_*_7ca588a.json): fused_wqa_wkv at M = 1536 has 96 CTAs
    assert use_wgmma(1024, 2048, 7168, False) and not use_wgmma(1536, 2048, 7168, False)
    assert use_wgmma(64, 6144, 7168, False) and use_wgmma(33, 7168, 3072, False)  # 64-token tile, 2 K splits
    assert not use_wgmma(32, 6144, 7168, False) and not use_wgmma(16, 7168, 3072, False)  # decode kernel
    assert use_wgmma(33, 7168, 16384, False) and not use_wgmma(32, 7168, 16384, False)  # wo_b
    assert not use_wgmma(64, 2048, 7168, False)  # fused_wqa_wkv: 16 row blocks x 4 K splits = 64 CTAs, decode kernel
    assert not use_wgmma(64, 6144, 7168, True)  # no bias in the WGMMA epilogue
    assert not use_wgmma(2048, 7168, 3072, False)  # dequantize + cuBLAS
    assert use_wgmma(256, 2048, 7168, False)  # fused_wqa_wkv: 16 row blocks x 2 token blocks x 4 K splits
    assert use_wgmma(65, 6144, 7168, False)  # 48 row blocks x 2 K splits
    assert not use_wgmma(256, 6144, 7168, True)  # no bias in the WGMMA epilogue
    assert not use_wgmma(256, 6143, 7168, False)  # the kernel stores column pairs


@requires_cute
def ptxas_report(ptx: str) -> str:
    """ptxas -v's report on ``ptx`` for sm_90a (skips where no ptxas can assemble CuTeDSL's PTX)."""
    import shutil
    import subprocess

    ptxas = shutil.which("ptxas") or next((p for p in ("/usr/local/cuda/bin/ptxas", "/usr/local/cuda-13.0/bin/ptxas") if os.path.exists(p)), None)
    if ptxas is None:
        pytest.skip("ptxas (CUDA toolkit) is not installed here: the register count cannot be read")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    if out.returncode:  # e.g. a toolkit older than the PTX ISA CuTeDSL emits
        pytest.skip(f"{ptxas} cannot assemble CuTeDSL's PTX here: {(out.stderr or out.stdout).strip()[:200]}")
    return out.stderr + out.stdout


@requires_cute
@pytest.mark.parametrize("swiglu,tiles", [(False, 1), (False, 2), (True, 1), (True, 2)])
def test_decode_register_table_matches_ptxas(swiglu, tiles):
    """gemm_decode.REGISTERS (which sets the resident warps the split rule plans for) is what ptxas allocates."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_decode

    report = ptxas_report(ptx_of(gemm_decode.compile_decode(7168, tiles, False, swiglu, arch="sm_90a", keep_ptx=True)))
    assert int(re.search(r"Used (\d+) registers", report).group(1)) == gemm_decode.REGISTERS[(swiglu, tiles)]


@requires_cute
@pytest.mark.parametrize("n,k", [(6144, 7168), (7168, 3072), (2048, 7168), (7168, 16384)])
def test_decode_wide_plans_fit_without_spill(n, k):
    """The M = 16 plans of the DeepSeek-V4 shapes (wide_registers): ptxas keeps them within WIDE_REGISTERS
    and the CTAs per SM the plan counts on, with no spill (the 80-register cap spilled and serialized the x loads)."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_decode

    tiles, rows, ksplit, paired = gemm_decode.auto_ksplit(n // 16, k // 256, 16, 132, False)
    assert (tiles, paired) == (2, False) and gemm_decode.wide_registers(False, tiles, 1)
    ctas = gemm_decode.ksplit_ctas(False, tiles, rows * ksplit, wide=True)
    report = ptxas_report(ptx_of(gemm_decode.compile_decode(k, tiles, False, arch="sm_90a", keep_ptx=True, rows=rows, ksplit=ksplit,
                                                            stream_loads=gemm_decode.stream_loads_for(ksplit), pdl="start",
                                                            ctas_per_sm=ctas)))
    used = int(re.search(r"Used (\d+) registers", report).group(1))
    assert used <= min(gemm_decode.WIDE_REGISTERS, 65536 // (32 * rows * ksplit * ctas))
    assert re.search(r"\b0 bytes spill stores", report)


def test_decode_split_rule_fills_one_wave():
    """The plain decode kernel's split count: every warp in one wave of the SMs, splits no shorter than 3 / 4
    quads; on the DeepSeek-V4 shapes, the counts measured best (or within 8%) on an H100."""
    from nvfp4lib.kernels.sm90.gemm_decode import REGISTERS, WARPS, splits_for_wave

    def splits(rg, quads, m, swiglu):
        tiles = 1 if m <= 16 else 2
        warps = WARPS // 2 if swiglu else WARPS
        resident = 65536 // (REGISTERS[(swiglu, tiles)] * 32 * warps) * warps
        per_split, n = splits_for_wave(rg, quads, -(-m // (8 * tiles)), 132, resident)
        assert (n - 1) * per_split < quads <= n * per_split
        assert n == 1 or rg * -(-m // (8 * tiles)) * n <= 132 * resident
        return n

    assert [splits(384, 28, m, False) for m in (1, 16, 64)] == [7, 4, 2]  # gate_up
    assert [splits(448, 12, m, False) for m in (1, 16, 64)] == [4, 3, 1]  # down
    assert [splits(128, 28, m, False) for m in (1, 16, 64)] == [7, 7, 6]  # fused_wqa_wkv
    assert [splits(192, 28, m, True) for m in (1, 16, 64)] == [7, 4, 1]  # gate_up with the SwiGLU
    assert splits_for_wave(10_000, 28, 8, 132, 24) == (28, 1)  # more warps than a wave: no split


@requires_cute
@pytest.mark.parametrize("tiles,swiglu,rows,ksplit,paired", [(1, False, 1, 16, False), (2, False, 2, 6, False), (1, True, 2, 6, False),
                                                             (2, True, 1, 2, False), (1, True, 2, 6, True), (2, True, 2, 4, True)])
def test_decode_ksplit_kernel_ptx_sm90a(tiles, swiglu, rows, ksplit, paired):
    """The in-CTA K split: the same MMAs and decode as the grid-split kernel, the partial sums of the K slices
    through shared memory behind one barrier, and the CTAs per SM its plan counts on told to ptxas."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_decode

    ptx = ptx_of(gemm_decode.compile_decode(3072, tiles, False, swiglu, arch="sm_90a", keep_ptx=True, rows=rows, ksplit=ksplit,
                                            paired=paired))
    groups = 2 if swiglu and not paired else 1  # paired: one weight fragment a warp, the up sums through shared memory
    assert len(re.findall(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32", ptx)) == 16 * tiles * groups
    assert len(re.findall(r"mul\.rn\.bf16x2", ptx)) == 64 * groups
    assert "bar.sync" in ptx and "st.shared.v4" in ptx and "ld.shared.v4" in ptx
    assert re.search(rf"\.reqntid {32 * rows * ksplit}, 1, 1", ptx)
    assert re.search(rf"\.minnctapersm {gemm_decode.ksplit_ctas(swiglu and not paired, tiles, rows * ksplit)}\b", ptx)
    assert ptx.count("bar.sync") == (2 if paired else 1)
    assert ".local" not in ptx


@requires_cute
@pytest.mark.parametrize("tiles,ksplit", [(1, 8), (1, 6)])
def test_decode_cluster_paired_ptx_sm90a(tiles, ksplit):
    """paired="cluster": one weight fragment a warp (the plain kernel's MMAs and registers), the K slices' sums through
    shared memory behind one barrier, then the up CTA's first warp sends its sums into the gate CTA's shared memory with
    st.async (16 bytes a lane and token tile, counted on an mbarrier the gate CTA expects the bytes on), after a cluster
    barrier that orders the mbarrier's initialisation before it. The plan: the plain kernel's for
    twice the row groups, one row group a CTA (gate_up at M = 1: 384 CTAs of 8 warps, 3 an SM, instead of the
    paired kernel's 192 of 12)."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_decode

    ptx = ptx_of(gemm_decode.compile_decode(7168, tiles, False, True, arch="sm_90a", keep_ptx=True, rows=1, ksplit=ksplit,
                                            paired="cluster", pdl="start"))
    assert len(re.findall(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32", ptx)) == 16 * tiles
    assert len(re.findall(r"st\.async\.shared::cluster\.mbarrier::complete_tx::bytes\.v4\.b32", ptx)) == tiles
    assert "barrier.cluster.arrive.relaxed" in ptx and "barrier.cluster.wait" in ptx and "expect_tx" in ptx
    assert re.search(rf"\.reqntid {32 * ksplit}, 1, 1", ptx) and re.search(rf"\.minnctapersm {gemm_decode.ksplit_ctas(False, tiles, ksplit)}\b", ptx)
    assert ".local" not in ptx
    with pytest.raises(ValueError, match="cluster"):
        gemm_decode.GemmDecodeKernel(7168, 1, False, False, ksplit=8, rows=1, paired="cluster")  # not SwiGLU
    with pytest.raises(ValueError, match="cluster"):
        gemm_decode.GemmDecodeKernel(7168, 1, False, True, ksplit=8, rows=2, paired="cluster")
    with pytest.raises(ValueError, match="paired must be"):
        gemm_decode.GemmDecodeKernel(7168, 1, False, True, ksplit=8, rows=1, paired="pairs")


@requires_cute
@pytest.mark.parametrize("tiles", [1, 2])
def test_decode_x_stagger_ptx_sm90a(tiles):
    """x_stagger (measured, off by default): the same MMAs and decode, each 16-byte x half loaded at an address
    that depends on the lane's row parity, and one select per MMA operand word; the default kernel has none."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_decode

    def compiled(stagger):
        return ptx_of(gemm_decode.compile_decode(3072, tiles, False, arch="sm_90a", keep_ptx=True, rows=2, ksplit=4,
                                                 x_stagger=stagger))

    plain, staggered = compiled(False), compiled(True)
    mma = r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32"
    assert len(re.findall(mma, staggered)) == len(re.findall(mma, plain)) == 16 * tiles
    assert len(re.findall(r"mul\.rn\.bf16x2", staggered)) == 64
    # the same 16-byte global loads: the weights' 4 a quad (twice: prefetch and loop) and x's 2 per token tile and chunk
    assert len(re.findall(r"ld\.global\.v4\.b32", staggered)) == len(re.findall(r"ld\.global\.v4\.b32", plain)) == 8 + 8 * tiles
    # a select for each of the two x words of every MMA
    assert len(re.findall(r"\bselp\.b32", staggered)) - len(re.findall(r"\bselp\.b32", plain)) == 2 * 16 * tiles
    assert ".local" not in staggered


@requires_cute
@pytest.mark.parametrize("pdl,swiglu,bias", [("start", False, False), ("off", False, True), ("start", True, False)])
def test_decode_early_scales_ptx_sm90a(pdl, swiglu, bias):
    """early_scales: the epilogue's factors (alpha, the up rows' alpha, bias: fp32 scalar loads) are read before the
    first MMA, with PDL right after the wait that lets the kernel read them; without it every one is read after
    the last MMA. The fit rule: the in-CTA split plans with wide registers, or of one tile and short K slices."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_decode

    def positions(early):
        ptx = ptx_of(gemm_decode.compile_decode(3072, 1, bias, swiglu, arch="sm_90a", keep_ptx=True, rows=2, ksplit=4, pdl=pdl,
                                                paired=swiglu, early_scales=early))
        lines = ptx.splitlines()
        loads = [i for i, line in enumerate(lines) if re.search(r"\bld\.global\.b32\b", line)]
        mmas = [i for i, line in enumerate(lines) if "mma.sync" in line]
        waits = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
        assert ".local" not in ptx
        return loads, mmas, waits

    per_column = 2 if swiglu or bias else 1  # alpha, and the up alpha or the bias
    loads, mmas, waits = positions(True)
    early = [i for i in loads if i < mmas[0]]
    assert len(early) == 2 * per_column
    if pdl != "off":
        assert all(i > waits[0] for i in early)
    late_loads, late_mmas, _ = positions(False)
    assert len(late_loads) >= 2 * per_column and all(i > late_mmas[-1] for i in late_loads)
    fit = gemm_decode.early_scales_fit
    assert fit(8, 1, False, 28) and fit(6, 1, False, 12) and fit(5, 2, True, 28) and fit(4, 2, True, 64)  # gate_up, down, M = 16
    assert not fit(6, 1, False, 64)  # wo_b at M <= 8: 11 quads a warp
    assert not fit(4, 2, False, 28) and not fit(1, 1, False, 28)  # the 80-register two-tile plans, the grid's split K


def test_ksplit_plan_fills_one_wave():
    """The in-CTA K split plan: every CTA in one wave, the most warps per row group; on the DeepSeek-V4 shapes
    the plans measured best or within 7% of the best CTA shape on an H100 (data/bench/ksplit_probe_*.json)."""
    from nvfp4lib.kernels.sm90 import gemm_decode
    from nvfp4lib.kernels.sm90.gemm_decode import auto_ksplit, ksplit_ctas, ksplit_plan, wide_registers

    for rg, quads, swiglu in [(384, 28, False), (448, 12, False), (128, 28, False), (192, 28, True), (448, 64, False)]:
        for m in (1, 8, 16, 32, 48, 64):
            plan = auto_ksplit(rg, quads, m, 132, swiglu)
            if plan is None:
                continue
            tiles, rows, ksplit, paired = plan
            # the SwiGLU kernel plans its paired form: a gate and an up warp per K slice, in one CTA or (up to M = 8) in
            # two CTAs of a cluster, planned as the plain kernel's one row group a CTA for twice the row groups
            assert bool(paired) == swiglu and (paired == "cluster") == (swiglu and m <= gemm_decode.CLUSTER_PAIR_MAX_M)
            cluster = paired == "cluster"
            paired = paired is True
            blocks = rg if paired else 2 * rg if cluster else -(-rg // rows)
            token_blocks = -(-m // (8 * tiles))
            ctas = token_blocks * blocks
            wide = wide_registers(swiglu, tiles, token_blocks)
            assert wide == (not swiglu and 8 < m <= 16)  # two token tiles in one block
            options = dict(rows_options=(2,)) if paired else dict(rows_options=(1,)) if cluster else {}
            rgs = 2 * rg if paired or cluster else rg
            waves = 1 if ksplit_plan(rgs, quads, token_blocks, 132, False, tiles, wide=wide, **options) else 2
            assert 2 <= ksplit <= quads and rows * ksplit <= 16
            assert ctas <= waves * 132 * ksplit_ctas(False, tiles, rows * ksplit, wide)
            assert ksplit_plan(rgs, quads, token_blocks, 132, False, tiles, waves, wide=wide, **options)[:2] == (rows, ksplit)
    assert auto_ksplit(384, 28, 1, 132, False) == (1, 1, 8, False)  # gate_up: 12.1 us (grid split K: 16.3)
    assert auto_ksplit(128, 28, 1, 132, False) == (1, 1, 16, False)  # fused_wqa_wkv: 5.2 us (9.9)
    assert auto_ksplit(448, 12, 1, 132, False) == (1, 2, 6, False)  # down: 8.3 us (11.1)
    # 2 token tiles, one token block: the wide register budget (gate_up M = 16 14.8 -> 12.6 us with PDL)
    assert auto_ksplit(384, 28, 16, 132, False) == (2, 1, 5, False)
    assert ksplit_ctas(False, 2, 5, wide=True) == 3 and ksplit_ctas(False, 2, 8) == 3
    assert auto_ksplit(448, 12, 64, 132, False) == (2, 2, 3, False)  # down at M = 64: no one-wave shape, two waves
    # gate_up + SwiGLU: to M = 8 384 CTAs, gate and up row groups in clusters of two (10.0 against 10.7-10.9 us at M = 1 for the
    # paired kernel's 192 CTAs of a gate and an up row group, which it keeps from M = 16)
    assert auto_ksplit(192, 28, 1, 132, True) == (1, 1, 8, "cluster") and auto_ksplit(192, 28, 1, 132, True, cluster_pair=False) == (1, 2, 6, True)
    assert auto_ksplit(192, 28, 16, 132, True) == (1, 2, 4, True)
    assert auto_ksplit(384, 28, 65, 132, False) is None  # above the measured range


@requires_cute
def test_decode_stream_loads_ptx_sm90a():
    """Streaming weight loads: the four 16-byte weight loads per 256 k (and their prologue) through the
    read-only path without an L1 line and with 256-byte L2 fetches; the activations keep plain loads."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_decode

    ptx = ptx_of(gemm_decode.compile_decode(3072, 1, False, False, arch="sm_90a", keep_ptx=True, rows=1, ksplit=8, stream_loads=True))
    assert len(re.findall(r"ld\.global\.nc\.L1::no_allocate\.L2::256B\.v4\.b32", ptx)) == 8
    assert len(re.findall(r"ld\.global\.v4", ptx)) == 8  # x: two 16-byte loads per 64-k chunk
    assert gemm_decode.stream_loads_for(8) and gemm_decode.stream_loads_for(1) and not gemm_decode.stream_loads_for(16)


@requires_cute
@pytest.mark.parametrize("mode", ["off", "start", "loop"])
def test_decode_pdl_ptx_sm90a(mode):
    """Programmatic dependent launch: weight loads may precede ``griddepcontrol.wait``; every x load and every
    global store follows it; ``launch_dependents`` sits at the kernel's start or after its main loop."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_decode

    ptx = ptx_of(gemm_decode.compile_decode(3072, 1, False, False, arch="sm_90a", keep_ptx=True, rows=1, ksplit=8, stream_loads=True,
                                            pdl=mode))
    body = ptx[ptx.index(".entry"):]
    if mode == "off":
        assert "griddepcontrol" not in body
        return
    wait, trigger = body.index("griddepcontrol.wait"), body.index("griddepcontrol.launch_dependents")
    assert body.index("ld.global.nc.L1::no_allocate") < wait  # the first weights are in flight before the wait
    assert wait < body.index("ld.global.v4")  # x
    assert wait < body.index("st.global")
    assert (trigger < body.index("ld.global")) == (mode == "start")
    with pytest.raises(ValueError, match="grouped"):  # its row offsets come from the kernel before
        gemm_decode.GemmDecodeKernel(3072, 1, False, grouped=True, pdl=mode)


@requires_cute
def test_wgmma_pdl_ptx_sm90a():
    """The WGMMA decoder kernel with PDL: the TMA warp waits before the first x load, the MMA warps before their
    stores (with early_alpha, the default, before they read alpha: before the main loop); the grouped kernel (its
    tile table comes from the kernel before) refuses PDL."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_wgmma

    ptx = ptx_of(gemm_wgmma.compile_wgmma(7168, 128, arch="sm_90a", keep_ptx=True, split_k=True, pdl="start"))
    body = ptx[ptx.index(".entry"):]
    assert body.count("griddepcontrol.wait") == 2 and body.count("griddepcontrol.launch_dependents") == 1
    assert body.index("griddepcontrol.wait") < body.index("cp.async.bulk.tensor")
    assert "griddepcontrol" not in ptx_of(gemm_wgmma.compile_wgmma(7168, 128, arch="sm_90a", keep_ptx=True, pdl="off"))
    with pytest.raises(ValueError, match="grouped"):
        gemm_wgmma.GemmWgmmaDecoderKernel(7168, 128, grouped=True, pdl="start")


@requires_cute
def test_decode_wide_registers_ptx_sm90a():
    """The M = 9..16 plan's kernel: compiled for the CTAs per SM its wide register budget holds (ptxas gets
    minnctapersm, so ~120 registers and no spill), and an explicit count that no SM holds is refused."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_decode

    ctas = gemm_decode.ksplit_ctas(False, 2, 5, wide=True)
    ptx = ptx_of(gemm_decode.compile_decode(7168, 2, False, arch="sm_90a", keep_ptx=True, rows=1, ksplit=5, stream_loads=True,
                                            pdl="start", ctas_per_sm=ctas))
    assert re.search(rf"\.minnctapersm {ctas}\b", ptx) and re.search(r"\.reqntid 160, 1, 1", ptx)
    assert len(re.findall(r"mma\.sync\.aligned\.m16n8k16", ptx)) == 32
    with pytest.raises(ValueError, match="ctas_per_sm"):
        gemm_decode.GemmDecodeKernel(7168, 2, False, rows=1, ksplit=5, ctas_per_sm=13)  # 65 warps
    with pytest.raises(ValueError, match="ctas_per_sm"):
        gemm_decode.GemmDecodeKernel(7168, 2, False, ctas_per_sm=2)  # no in-CTA split


def test_pdl_rule():
    """Where the launch takes PDL (measured on an H100, data/bench/pdl_probe_*.json): the in-CTA split plans of
    one token tile, the paired SwiGLU kernel and the plans without streaming loads; not the grid's split K."""
    from nvfp4lib.kernels.sm90.gemm_decode import PDL_MODES, pdl_for

    assert pdl_for(1, 8, True, False) == "start"  # gate_up M <= 8
    assert pdl_for(2, 4, True, True) == "start"  # paired SwiGLU at M = 64
    assert pdl_for(2, 16, False, False) == "start"  # fused_wqa_wkv at M = 16
    assert pdl_for(2, 6, True, False) == "off"  # wo_b at M = 16 under the 80-register cap: 31.7 against 40.0 us with PDL
    assert pdl_for(2, 5, True, False, wide=True) == "start"  # gate_up at M = 16, wide registers: 13.7 -> 12.6 us
    assert pdl_for(1, 1, True, False) == "off"  # the grid's split K: not measured
    assert set(PDL_MODES) == {"off", "start", "loop"}

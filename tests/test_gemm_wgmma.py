"""Tests of the WGMMA prefill kernel (kernels/sm90/gemm_wgmma.py, compile-verified only so far).

CPU: the kernel's operand mapping (which words and scale bytes each lane loads, the half-word decode, the
standard-k-order A fragment) modelled in Python against the dequantized weight; the sm_90a PTX (register
A operand, four WGMMAs per 64-k chunk in one commit group, fence / commit / wait, TMA, no local memory);
argument checks. GPU (Hopper): accuracy against the reference into a NaN-poisoned output."""
import re

import pytest
import torch

from nvfp4lib.formats import quantize
from nvfp4lib.kernels.sm90 import dequant
from nvfp4lib.ops.gemm import dequantize_rows
from tests.conftest import requires_cute, requires_hopper


def _bf16(bits16: int) -> float:
    import struct

    return struct.unpack("<f", struct.pack("<I", (bits16 & 0xFFFF) << 16))[0]


def _decode_half_word_model(word: int, hsel: int, scale_g: int, scale_g8: int):
    """Python model of gemm_wgmma.decode_half_word: registers 2*hsel (row g) and 2*hsel + 1 (row g + 8)."""
    full = dequant.EM_MASK | dequant.SIGN_MASK
    word &= 0xFFFFFFFF
    u0 = (word << (6 * hsel)) & full
    a = (word << 3) & full
    b = ((word >> 4) & 0x00C000C0) | ((word >> 5) & 0x01000100) | ((word << 1) & 0x80008000)
    u1 = b if hsel else a
    out = []
    for bits, sbyte in ((u0, scale_g), (u1, scale_g8)):
        s = _bf16(sbyte * 16 + dequant.SCALE_BIAS_BITS)
        out.append((_bf16(bits) * s, _bf16(bits >> 16) * s))
    return out


def test_fragment_model_is_the_standard_k_order(fresh_seed):
    """Lane (g, t') of warp rg at step s of chunk c holds, in register j' = rh + 2h', the weight of row
    16 rg + g + 8 rh at k = 64c + 16s + 2t' + 8h' + e (the WGMMA / mma.sync A layout in natural k order),
    built from words (lane 4g + s, kk = t'//2 + 2h') and scale word (lane 4g + s, c % 4 // 2)."""
    n, k = 32, 512
    w = torch.randn(n, k)
    w[3, 16:32] = 0
    q = quantize(w)
    words, scale_words = dequant.repack_weight(q.packed, q.block_scale)
    ref = dequantize_rows(q.packed, q.block_scale)
    sbytes = scale_words.contiguous().view(torch.uint8).reshape(*scale_words.shape[:3], 8)
    checked = 0
    for rg in range(n // 16):
        for c in range(k // 64):
            ci = c % 4
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for s in range(4):
                    src = 4 * g + s
                    byte = 4 * (ci // 2) + 2 * (ci % 2)
                    sg, sg8 = int(sbytes[rg, c // 4, src, byte]), int(sbytes[rg, c // 4, src, byte + 1])
                    for h2 in range(2):
                        regs = _decode_half_word_model(int(words[rg, c, src, t // 2 + 2 * h2]), t % 2, sg, sg8)
                        for rh in range(2):
                            for e in range(2):
                                row = 16 * rg + g + 8 * rh
                                col = 64 * c + 16 * s + 2 * t + 8 * h2 + e
                                assert regs[rh][e] * 2**dequant.MAGNITUDE_SHIFT == float(ref[row, col]), (rg, c, lane, s, h2, rh, e)
                                checked += 1
    assert checked == n * k


@requires_cute
@pytest.mark.parametrize("k,tile_n", [(512, 128), (7168, 256), (3072, 128)])
def test_wgmma_kernel_ptx_sm90a(k, tile_n):
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_wgmma

    ptx = ptx_of(gemm_wgmma.compile_wgmma(k, tile_n, arch="sm_90a", keep_ptx=True, schedule="register"))
    assert ".target sm_90a" in ptx
    mma = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16\.f32\.bf16\.bf16\s+\{[^}]*\},\s*(\{[^}]*\}|%rd\d+),\s*(%rd\d+)", ptx)
    # one quad (4 chunks of 64 k) per loop trip, 4 k16 steps per chunk; both warpgroups run the same code
    assert len(mma) == 16 and len(re.findall(r"wgmma\.mma_async", ptx)) == 16
    for n_size, a_operand, b_desc in mma:
        assert int(n_size) == tile_n
        # A from registers: a list of four bf16x2 registers, not a shared-memory descriptor; B: a descriptor
        assert re.fullmatch(r"\{%r\d+, %r\d+, %r\d+, %r\d+\}", a_operand), a_operand
    assert len(re.findall(r"wgmma\.fence\.sync\.aligned", ptx)) == 4  # one per chunk, after its A decode
    assert len(re.findall(r"wgmma\.commit_group\.sync\.aligned", ptx)) == 4  # one group per chunk
    waits = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)
    assert waits.count("1") == 4 and waits.count("0") >= 1  # keep one chunk in flight; drain before the epilogue
    assert "cp.async.bulk.tensor" in ptx and "mbarrier" in ptx  # x by TMA through the mbarrier pipeline
    assert len(re.findall(r"mul\.rn\.bf16x2", ptx)) == 16 * 5  # 16 per chunk (4 in the loop + the prologue's)
    assert ".local" not in ptx  # no spills


@requires_cute
@pytest.mark.parametrize("k,tile_n,tile_m,store_bytes,decoders", [(512, 128, 128, 16, 1), (7168, 256, 128, 16, 1), (768, 256, 128, 8, 1),
                                                                  (7168, 128, 256, 16, 1), (3072, 64, 128, 16, 1), (3072, 16, 128, 8, 1),
                                                                  (3072, 64, 128, 16, 2), (7168, 128, 128, 8, 2)])
def test_decoder_schedule_ptx_sm90a(k, tile_n, tile_m, store_bytes, decoders):
    """The decoder schedule: SS-WGMMA (A and B both shared-memory descriptors), the decoded tile written with
    16-byte (or 8-byte) shared stores and fenced for the async proxy before its barrier arrive, x by TMA."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_wgmma

    ptx = ptx_of(gemm_wgmma.compile_wgmma(k, tile_n, arch="sm_90a", keep_ptx=True, schedule="decoder", tile_m=tile_m,
                                          store_bytes=store_bytes, decoders=decoders))
    assert f".reqntid {128 * decoders + 256}, 1, 1" in ptx  # decoder warpgroups + two MMA warpgroups
    mma = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16\.f32\.bf16\.bf16\s+\{[^}]*\},\s*(%rd\d+),\s*(%rd\d+)", ptx)
    m_tiles = tile_m // 128  # WGMMAs per k16 step and warpgroup (64 rows each)
    assert len(mma) == 4 * m_tiles == len(re.findall(r"wgmma\.mma_async", ptx))  # 4 k16 steps per chunk, A from smem
    assert all(int(n_size) == tile_n for n_size, _, _ in mma)
    trip = 8 if k % 512 == 0 and tile_m == 128 else 4  # chunks per decoder loop trip (the depth of the word ring)
    rgs = tile_m // 64 // decoders  # row groups per decoder warp
    if store_bytes == 8:  # per chunk: row groups x 4 words x 2 rows
        assert len(re.findall(r"st\.shared\.v2\.b32", ptx)) == trip * rgs * 4 * 2 and "st.shared::cta.v4" not in ptx
    else:  # per chunk: row groups x 2 word pairs x 2 rows
        assert len(re.findall(r"st\.shared::cta\.v4\.b32", ptx)) == trip * rgs * 2 * 2 and "st.shared.v2" not in ptx
    assert len(re.findall(r"fence\.proxy\.async", ptx)) == trip  # one per decoded chunk
    assert len(re.findall(r"mul\.rn\.bf16x2", ptx)) == trip * rgs * 4 * 4  # the full decode of every word, once
    assert "cp.async.bulk.tensor" in ptx and ".local" not in ptx


@requires_cute
def test_decoder_schedule_cluster_ptx_sm90a():
    """cluster_m=2: x by TMA multicast to both CTAs of a cluster; MMA warps release the stage in both CTAs."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_wgmma

    ptx = ptx_of(gemm_wgmma.compile_wgmma(7168, 256, arch="sm_90a", keep_ptx=True, schedule="decoder", cluster_m=2))
    assert len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.shared::cluster\.global\.tile\.mbarrier::complete_tx::bytes\.multicast::cluster", ptx)) == 8
    assert "mbarrier.arrive.shared::cluster.b64" in ptx and "mapa" in ptx  # the remote release
    assert "barrier.cluster.arrive" in ptx and "barrier.cluster.wait" in ptx  # barrier init visible cluster-wide
    assert ".local" not in ptx


def test_run_wgmma_rejects_bad_shapes():
    from nvfp4lib.kernels.cute_compile import cute_available

    if not cute_available():
        pytest.skip("nvidia-cutlass-dsl is not installed")
    from nvfp4lib.kernels.sm90 import gemm_wgmma

    q = quantize(torch.randn(32, 256))
    words, scale_words = dequant.repack_weight(q.packed, q.block_scale)
    alpha = torch.ones(32)
    with pytest.raises(ValueError, match="multiple of 256"):
        gemm_wgmma.run_wgmma(torch.zeros(4, 128, dtype=torch.bfloat16), words, scale_words, alpha, 32)
    with pytest.raises(ValueError, match="even"):
        gemm_wgmma.run_wgmma(torch.zeros(4, 256, dtype=torch.bfloat16), words, scale_words, torch.ones(31), 31)
    with pytest.raises(ValueError, match="tile_n"):
        gemm_wgmma.GemmWgmmaKernel(256, tile_n=64)


SHAPES = [(6144, 7168), (7168, 3072), (1152, 512)]  # the last: 9 row blocks of 128 (a cluster of 2 is padded)


@requires_hopper
@requires_cute
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 100, 256, 1000])
@pytest.mark.parametrize("tile_n", [128, 256])
@pytest.mark.parametrize("schedule,tile_m,cluster_m", [("register", None, None), ("decoder", 128, 1), ("decoder", 256, 1),
                                                       ("decoder", 128, 2)])
def test_wgmma_accuracy_on_gpu(fresh_seed, n, k, m, tile_n, schedule, tile_m, cluster_m):
    if tile_m == 256 and tile_n == 256:
        pytest.skip("256 x 256 tiles would need 256 fp32 accumulators a thread: not a valid configuration")
    from nvfp4lib.bench.harness import cosine, rel_error
    from nvfp4lib.kernels.sm90 import gemm_wgmma
    from nvfp4lib.ops.gemm import prepare_weight, reference_gemm

    q = quantize(torch.randn(n, k, device="cuda") * 0.02)
    p = prepare_weight(q.packed, q.block_scale, q.global_scale, layout="sm90")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = reference_gemm(x, q.packed, q.block_scale, p.alpha)
    y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    out = gemm_wgmma.run_wgmma(x, p.weight, p.block_scale, p.alpha, n, out=y, tile_n=tile_n, schedule=schedule, tile_m=tile_m,
                               cluster_m=cluster_m)
    torch.cuda.synchronize()
    assert out.data_ptr() == y.data_ptr()
    assert torch.isfinite(y).all()
    assert rel_error(y, ref) <= 1e-2 and cosine(y, ref) >= 0.9999


@pytest.mark.parametrize("tile_n", [128, 256])
def test_grouped_tile_table_covers_every_row_once(fresh_seed, tile_n):
    """The grouped kernel's token tiles: every row of every group lies in exactly one tile of its own group,
    tiles come in expert order, the tiles past the last group's are empty, and grouped_max_tiles bounds them."""
    from nvfp4lib.kernels.sm90.gemm_wgmma import grouped_max_tiles, grouped_tile_table

    for counts in ([0, 300, 0, 0, 1, 256, 255, 0], [1] * 7, [0, 0, 5000], [0] * 3 + [700] + [0] * 2):
        bounds = [0]
        for c in counts:
            bounds.append(bounds[-1] + c)
        m, experts = bounds[-1], len(counts)
        max_tiles = grouped_max_tiles(m, experts, tile_n)
        table = grouped_tile_table(torch.tensor(bounds, dtype=torch.int32), tile_n, max_tiles)
        assert table.dtype == torch.int32 and table.shape == (max_tiles, 3)
        owner = torch.full((m,), -1)
        experts_seen = []
        for e, row0, row_end in table.tolist():
            if row0 >= row_end:
                continue
            assert bounds[e] <= row0 < row_end == bounds[e + 1]
            rows = slice(row0, min(row0 + tile_n, row_end))
            assert (owner[rows] == -1).all()
            owner[rows] = e
            experts_seen.append(e)
        assert experts_seen == sorted(experts_seen)
        expected = torch.repeat_interleave(torch.arange(experts), torch.tensor(counts))
        assert torch.equal(owner, expected)
        used = sum(-(-c // tile_n) for c in counts)
        assert used <= max_tiles and (table[used:, 1] >= table[used:, 2]).all()


@requires_cute
def test_grouped_decoder_ptx_sm90a():
    """The grouped kernel is the decoder schedule with a tile table: the same SS-WGMMAs and multicast TMA of x."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_wgmma

    ptx = ptx_of(gemm_wgmma.compile_wgmma(7168, 256, arch="sm_90a", keep_ptx=True, schedule="decoder", cluster_m=2, grouped=True))
    assert len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n256k16\.f32\.bf16\.bf16", ptx)) == 4
    assert len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.shared::cluster\.global\.tile\.mbarrier::complete_tx::bytes\.multicast::cluster", ptx)) == 8
    assert ".local" not in ptx
    with pytest.raises(ValueError, match="decoder"):
        gemm_wgmma.compile_wgmma(512, 128, arch="sm_90a", schedule="register", grouped=True)
    # the SwiGLU epilogue: the same MMAs, and per pair of outputs two exponentials (ex2) for the SiLU
    ptx = ptx_of(gemm_wgmma.compile_wgmma(7168, 256, arch="sm_90a", keep_ptx=True, schedule="decoder", grouped=True, swiglu=True))
    assert len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n256k16", ptx)) == 4
    assert len(re.findall(r"ex2\.approx", ptx)) == 256 // 4 and ".local" not in ptx
    with pytest.raises(ValueError, match="tile_m"):
        gemm_wgmma.GemmWgmmaDecoderKernel(512, 128, tile_m=256, swiglu=True)
    dense = ptx_of(gemm_wgmma.compile_wgmma(7168, 128, arch="sm_90a", keep_ptx=True, schedule="decoder", swiglu=True))
    assert len(re.findall(r"ex2\.approx", dense)) == 128 // 4 and ".local" not in dense


def _grouped_case(counts, n, k):
    from nvfp4lib import moe

    weight = torch.randint(0, 256, (len(counts), n, k // 2), dtype=torch.uint8, device="cuda")
    block = (1 + 447 * torch.rand(len(counts), n, k // 16, device="cuda")).to(torch.float8_e4m3fn)
    grouped = moe.prepare_grouped_weight(weight, block, 1e-4 * (0.5 + torch.rand(len(counts), 2)), (n // 2, n // 2), layout="sm90")
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    offsets = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    return grouped, offsets


@requires_hopper
@requires_cute
@pytest.mark.parametrize("n,k", SHAPES[:2] + [(512, 512)])
@pytest.mark.parametrize("counts", [(300, 0, 517, 1), (0, 1024, 129, 0, 256)])
@pytest.mark.parametrize("tile_n,cluster_m", [(128, 2), (256, 2), (256, 1)])
@pytest.mark.parametrize("limit", [None, 10.0, float("inf")])
def test_grouped_wgmma_accuracy_on_gpu(fresh_seed, n, k, counts, tile_n, cluster_m, limit):
    """One launch over uneven groups (empty ones included; a group's last tile runs into the next group's rows,
    which must not be stored), two global scales per expert, into a NaN-poisoned output: every row written.
    With ``limit`` the weight is gate_up and the epilogue computes the clamped SwiGLU."""
    from nvfp4lib.bench.harness import cosine, rel_error
    from nvfp4lib.kernels.sm90 import gemm_wgmma
    from nvfp4lib.ops.moe import _grouped_sm90_reference

    w, offsets = _grouped_case(counts, n, k)
    x = torch.randn(int(offsets[-1]), k, device="cuda", dtype=torch.bfloat16) * (4.0 if limit == 10.0 else 1.0)  # some clamped
    out_n = n if limit is None else n // 2
    y = torch.full((x.shape[0], out_n), float("nan"), device="cuda", dtype=torch.bfloat16)
    gemm_wgmma.run_grouped_wgmma(x, offsets, w.weight, w.block_scale, w.alpha, n, out=y, tile_n=tile_n, cluster_m=cluster_m,
                                 swiglu_limit=limit)
    torch.cuda.synchronize()
    ref = _grouped_sm90_reference(x, offsets.tolist(), w.weight, w.block_scale, w.alpha, n, limit)
    assert torch.isfinite(y).all()
    for e, (a, b) in enumerate(zip(offsets.tolist(), offsets.tolist()[1:])):
        if b > a:
            assert rel_error(y[a:b], ref[a:b]) <= 1e-2 and cosine(y[a:b], ref[a:b]) >= 0.9999, f"group {e}"


@requires_hopper
@requires_cute
@pytest.mark.parametrize("limit", [None, 10.0])
def test_grouped_wgmma_replays_in_a_graph_with_new_offsets(fresh_seed, limit):
    """Captured once, replayed with new rows and new group sizes (the tile table is rebuilt on the device)."""
    from nvfp4lib.kernels.sm90 import gemm_wgmma
    from nvfp4lib.ops.moe import _grouped_sm90_reference

    n, k = 512, 512
    w, offsets = _grouped_case((200, 0, 300, 12), n, k)
    x = torch.randn(512, k, device="cuda", dtype=torch.bfloat16)

    def run():
        return gemm_wgmma.run_grouped_wgmma(x, offsets, w.weight, w.block_scale, w.alpha, n, swiglu_limit=limit)

    run()  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    offsets.copy_(torch.tensor([0, 5, 400, 400, 512], dtype=torch.int32))
    x.copy_(torch.randn_like(x))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = _grouped_sm90_reference(x, offsets.tolist(), w.weight, w.block_scale, w.alpha, n, limit)
    assert torch.isfinite(out).all()
    assert torch.equal(out, run())
    assert (out.float() - ref.float()).norm() <= 1e-2 * ref.float().norm()


@requires_cute
def test_batched_decoder_ptx_sm90a_and_tile_table():
    """The batched kernel (wo_a): the decoder schedule's MMAs; its static tile table lists every group's token tiles."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_wgmma

    ptx = ptx_of(gemm_wgmma.compile_wgmma(4096, 256, arch="sm_90a", keep_ptx=True, schedule="decoder", batched=True))
    assert len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n256k16\.f32\.bf16\.bf16", ptx)) == 4 and ".local" not in ptx
    table = gemm_wgmma.batched_tile_table(300, 3, 256, "cpu")
    assert table.tolist() == [[0, 0, 300], [0, 256, 300], [1, 0, 300], [1, 256, 300], [2, 0, 300], [2, 256, 300]]
    with pytest.raises(ValueError, match="batched"):
        gemm_wgmma.GemmWgmmaDecoderKernel(512, 256, batched=True, swiglu=True, grouped=True)


@requires_hopper
@requires_cute
@pytest.mark.parametrize("tokens", [65, 256, 300, 1024])
def test_batched_wgmma_accuracy_and_graph_on_gpu(fresh_seed, tokens):
    """wo_a through the batched kernel: x [T, 16, 4096] read in place, into a NaN-poisoned [T, 16, 1024], against
    the exact grouped reference; the module dispatches it; a CUDA-graph replay with new x equals eager."""
    from nvfp4lib.bench.harness import cosine, rel_error
    from nvfp4lib.kernels.sm90 import gemm_wgmma
    from nvfp4lib.modules.attention import BATCHED_WGMMA_MAX_T, GroupedNVFP4Projection, reference_grouped_gemm
    from nvfp4lib.synthetic import quantize_nvfp4_linear

    groups, n, k = 16, 1024, 4096
    linear = quantize_nvfp4_linear("attn.wo_a", torch.randn(groups * n, k, device="cuda") * 0.02, 4.0)
    module = GroupedNVFP4Projection(linear, groups, device="cuda")
    assert module.wgmma_kernel
    x = torch.randn(tokens, groups, k, device="cuda", dtype=torch.bfloat16)
    ref = reference_grouped_gemm(x, module.weight, module.weight_scale, module.alpha)
    p = module.prepared_whole
    args = (p.weight.view(groups, -1, *p.weight.shape[1:]), p.block_scale.view(groups, -1, *p.block_scale.shape[1:]), p.alpha.view(groups, n), n)
    y = torch.full((tokens, groups, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    gemm_wgmma.run_batched_wgmma(x, *args, out=y)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
    assert rel_error(y, ref) <= 1e-2 and cosine(y, ref) >= 0.9999
    if tokens <= BATCHED_WGMMA_MAX_T:
        assert torch.equal(module(x), y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = gemm_wgmma.run_batched_wgmma(x, *args)
    x.copy_(torch.randn_like(x))
    static.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, gemm_wgmma.run_batched_wgmma(x, *args))


def test_grouped_and_batched_runners_reject_bad_shapes():
    from nvfp4lib.kernels.cute_compile import cute_available

    if not cute_available():
        pytest.skip("nvidia-cutlass-dsl is not installed")
    from nvfp4lib.kernels.sm90 import gemm_wgmma

    words = torch.zeros(2, 4, 4, 32, 4, dtype=torch.int32)  # E=2, RG=4 (n=64), K=256
    scale_words = torch.zeros(2, 4, 1, 32, 2, dtype=torch.int32)
    alpha = torch.ones(2, 64)
    with pytest.raises(ValueError, match="multiple of 256"):
        gemm_wgmma.run_grouped_wgmma(torch.zeros(4, 128, dtype=torch.bfloat16), torch.tensor([0, 2, 4]), words, scale_words, alpha, 64)
    with pytest.raises(ValueError, match="alpha"):
        gemm_wgmma.run_grouped_wgmma(torch.zeros(4, 256, dtype=torch.bfloat16), torch.tensor([0, 2, 4]), words, scale_words, alpha[:, :32], 64)
    with pytest.raises(ValueError, match="offsets"):
        gemm_wgmma.run_grouped_wgmma(torch.zeros(4, 256, dtype=torch.bfloat16), torch.tensor([0, 4]), words, scale_words, alpha, 64)
    with pytest.raises(ValueError, match="SwiGLU"):
        gemm_wgmma.run_grouped_wgmma(torch.zeros(4, 256, dtype=torch.bfloat16), torch.tensor([0, 2, 4]), words, scale_words, alpha, 64,
                                     swiglu_limit=10.0)
    with pytest.raises(ValueError, match="groups"):
        gemm_wgmma.run_batched_wgmma(torch.zeros(4, 3, 256, dtype=torch.bfloat16), words, scale_words, alpha, 64)
    with pytest.raises(ValueError, match="contiguous bf16"):
        gemm_wgmma.run_batched_wgmma(torch.zeros(4, 2, 256), words, scale_words, alpha, 64)


def test_wgmma_plan_fills_one_wave():
    """(tile_n, K splits) of the plain decoder kernel: one wave of CTAs where possible, at most 4 splits of at
    least 2 quads; on the DeepSeek-V4 shapes the choices measured best on an H100 (wgmma_split_probe)."""
    from nvfp4lib.kernels.sm90.gemm_wgmma import WGMMA_MAX_SPLITS, wgmma_plan

    for n, k in [(6144, 7168), (7168, 3072), (2048, 7168), (7168, 16384), (65536, 1536)]:
        for m in (65, 128, 200, 256, 512, 1024):
            tile_n, splits = wgmma_plan(m, n // 16, k)
            ctas = -(-n // 256) * 2 * -(-m // tile_n)
            assert 1 <= splits <= WGMMA_MAX_SPLITS and (splits == 1 or ctas * splits <= 132)
            assert tile_n == 128 or m >= 256 or (tile_n, splits) == (64, 2)
    assert wgmma_plan(128, 384, 7168) == (128, 2)  # gate_up: 39.2 us against 59.8 unsplit
    assert wgmma_plan(256, 384, 7168) == (256, 2)  # 52.7 against 60.1 (128 tokens, unsplit)
    assert wgmma_plan(256, 448, 3072) == (128, 1)  # down: a short K keeps 128 tokens, no split (29.3 against 33.1)
    # fused_wqa_wkv: 64 tokens x 2 splits (DSMEM sum) where 128 x 4 would sum 128 CTAs in the workspace (22.6 against 23.4
    # us); at M = 128 the 4 splits on 64 CTAs meet in DSMEM and stay (16.6 us)
    assert wgmma_plan(256, 128, 7168) == (64, 2) and wgmma_plan(200, 128, 7168) == (64, 2)
    assert wgmma_plan(128, 128, 7168) == (128, 4) and wgmma_plan(160, 128, 7168) == (128, 4)
    assert wgmma_plan(256, 448, 16384) == (256, 2)  # wo_b: 98.7 against 129.3
    assert wgmma_plan(1024, 384, 7168) == (256, 1)  # no one-wave choice: no split
    # up to M = 64 one 64-token tile (H100, wgmma_decoder_probe_*_8062a02.json: gate_up 31.1 us at M = 64, decode 34.8)
    assert wgmma_plan(64, 384, 7168) == (64, 2) and wgmma_plan(40, 448, 16384) == (64, 2) and wgmma_plan(64, 128, 7168) == (64, 4)


def test_stream_k_rule():
    """Stream-K replaces an unsplit plan whose tile waves are less than 80% full, for K >= 4096 only (H100,
    wgmma_split_probe_*_517eb25.json)."""
    from nvfp4lib.kernels.sm90.gemm_wgmma import stream_k_pays, wgmma_plan

    def pays(m, n, k):
        return stream_k_pays(m, n // 16, k, *wgmma_plan(m, n // 16, k))

    assert pays(1024, 6144, 7168)  # gate_up: 192 tiles on 132 SMs (73%): 141.7 us against 166.6 unsplit
    assert not pays(2048, 6144, 7168)  # 384 tiles (97%): 275.0 unsplit against 331.7
    assert not pays(1024, 7168, 3072)  # down: short K (84.5 against 78.7 unsplit)
    assert not pays(1024, 7168, 16384) and not pays(2048, 7168, 16384)  # wo_b: 224 / 448 tiles (85%)
    assert not pays(2048, 2048, 7168)  # fused_wqa_wkv: 128 tiles, one wave
    assert not pays(256, 6144, 7168)  # a split plan
    assert pays(768, 6144, 7168)  # 144 tiles: a second wave of 12


@requires_cute
@pytest.mark.parametrize("tile_n,swiglu", [(128, False), (256, False), (256, True)])
def test_decoder_split_k_ptx_sm90a(tile_n, swiglu):
    """The split-K decoder kernel: 16-byte coalesced workspace stores, L2 (.cg) 16-byte loads of the other
    splits' partials, the arrival counter (acq_rel), the written counter (release) and the last arrival's wait
    on it (acquire loads); no local memory."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_wgmma

    ptx = ptx_of(gemm_wgmma.compile_wgmma(7168, tile_n, schedule="decoder", arch="sm_90a", keep_ptx=True, split_k=True, swiglu=swiglu))
    plain = ptx_of(gemm_wgmma.compile_wgmma(7168, tile_n, schedule="decoder", arch="sm_90a", keep_ptx=True, swiglu=swiglu))
    frag = 128 * tile_n // 256
    assert len(re.findall(r"st\.global\.v4\.b32", ptx)) == frag // 4 and "st.global.v4" not in plain
    assert len(re.findall(r"ld\.global\.cg\.v4", ptx)) >= frag // 4
    assert "atom" in ptx and "atom" not in plain
    assert re.search(r"atom\.global\.acq_rel\.add", ptx) and re.search(r"atom\.global\.release\.add", ptx)
    assert "ld.acquire.gpu" in ptx and "ld.acquire" not in plain
    small = ptx_of(gemm_wgmma.compile_wgmma(7168, 64, schedule="decoder", arch="sm_90a", keep_ptx=True, split_k=True))
    assert re.search(r"atom\.global\.acq_rel\.add", small) and "ld.acquire" not in small  # 64-token tiles: write, then arrive
    assert ".local" not in ptx
    with pytest.raises(ValueError, match="split"):
        gemm_wgmma.compile_wgmma(7168, tile_n, schedule="register", arch="sm_90a", split_k=True)


@requires_cute
@pytest.mark.parametrize("tile_n,options", [(256, {}), (128, dict(decoders=2)), (64, dict(decoders=2)), (256, dict(split_k=True)),
                                            (128, dict(grouped=True)), (256, dict(batched=True))])
def test_decoder_staged_epilogue_ptx_sm90a(tile_n, options):
    """The staged epilogue: y written with 16-byte stores (two a token row of a warp's 16 columns, tile_n * 2 / 32
    a lane) after one named barrier per MMA warpgroup, no 4-byte y stores left; not with stream-K or the SwiGLU."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_wgmma

    k = 4096 if options.get("grouped") or options.get("batched") else 7168
    staged = ptx_of(gemm_wgmma.compile_wgmma(k, tile_n, arch="sm_90a", keep_ptx=True, staged=True, **options))
    plain = ptx_of(gemm_wgmma.compile_wgmma(k, tile_n, arch="sm_90a", keep_ptx=True, **options))
    workspace = 128 * tile_n // 256 // 4 if options.get("split_k") else 0  # the split sum's own 16-byte stores
    assert len(re.findall(r"st\.global\.v4\.b32", staged)) == tile_n * 2 // 32 + workspace
    assert len(re.findall(r"st\.global\.v4\.b32", plain)) == workspace and len(re.findall(r"st\.global\.b32", plain)) >= tile_n // 4
    assert "bar.sync" in staged and ".local" not in staged
    for off in (dict(stream_k=True), dict(swiglu=True)):
        assert not gemm_wgmma.GemmWgmmaDecoderKernel(7168, 256, staged=True, **off).staged


@requires_cute
@pytest.mark.parametrize("tile_n,options", [(256, dict(staged=True)), (64, dict(decoders=2)), (256, dict(split_k=True)),
                                            (256, dict(swiglu=True)), (256, dict(stream_k=True)), (128, dict(grouped=True)),
                                            (256, dict(batched=True, staged=True))])
def test_decoder_early_alpha_ptx_sm90a(tile_n, options):
    """early_alpha (the default): the MMA warps read their rows' alpha (two fp32 values a thread) before the first
    WGMMA, none after the last; without it the epilogue reads them (the direct epilogues once per accumulator pair,
    each behind the y store before it). Not for the register schedule."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_wgmma

    k = 4096 if options.get("grouped") or options.get("batched") else 7168

    def positions(early):
        ptx = ptx_of(gemm_wgmma.compile_wgmma(k, tile_n, arch="sm_90a", keep_ptx=True, pdl="off" if options.get("grouped") or
                                              options.get("batched") else "start", early_alpha=early, **options))
        lines = ptx.splitlines()
        loads = [i for i, line in enumerate(lines) if re.search(r"\bld\.global\.b32\b", line)]
        mmas = [i for i, line in enumerate(lines) if "wgmma.mma_async" in line]
        assert ".local" not in ptx
        return loads, mmas

    loads, mmas = positions(True)
    late_loads, late_mmas = positions(False)
    assert loads and all(i < mmas[0] for i in loads)
    assert sum(i < mmas[0] for i in loads) == sum(i < late_mmas[0] for i in late_loads) + 2
    assert sum(i > late_mmas[-1] for i in late_loads) >= 2
    assert gemm_wgmma.DECODER_EARLY_ALPHA
    with pytest.raises(ValueError, match="decoder schedule"):
        gemm_wgmma.compile_wgmma(k, 128, schedule="register", arch="sm_90a", early_alpha=True)


@requires_cute
@pytest.mark.parametrize("tile_n,options,splits", [(256, {}, 2), (64, dict(decoders=2), 2), (128, dict(decoders=2, staged=True), 2),
                                                   (256, dict(swiglu=True), 2), (128, dict(decoders=2), 4), (64, dict(decoders=2), 4)])
def test_decoder_dsmem_split_ptx_sm90a(tile_n, options, splits):
    """dsmem_split: the two K splits meet in distributed shared memory. One st.async of 16 bytes (counted in bytes
    on the other CTA's mbarrier) per four fp32 of a thread's fragment, as many 16-byte shared loads to take the other's
    in, one cluster-scope release arrival (this CTA's x stages are free), paired with a cluster-scope acquire wait on
    the other CTA's arrivals before writing into its stages; no workspace, arrival counter or gpu-scope
    fence, which the workspace split has. Four splits: each CTA sends three quarters of its fragment (one to each other
    CTA, 12 st.async sites: one code path per CTA of the cluster) and stores its quarter of the tokens. Refused where it
    does not apply."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_wgmma

    ptx = ptx_of(gemm_wgmma.compile_wgmma(7168, tile_n, arch="sm_90a", keep_ptx=True, split_k=True, cluster_m=1, dsmem_split=splits,
                                          pdl="start", **options))
    frag = 128 * tile_n // 256
    # two splits: a quarter of the fragment a st.async; four: three quarters to three CTAs, in each of four branches
    sends = frag // 4 if splits == 2 else 4 * 3 * (frag // 4 // 4)
    assert len(re.findall(r"st\.async\.shared::cluster\.mbarrier::complete_tx::bytes\.v4\.b32", ptx)) == sends
    assert len(re.findall(r"ld\.shared::cta\.v4\.b32", ptx)) >= sends // (1 if splits == 2 else 4)
    arrivals = 1 if splits == 2 else 4 * 3
    assert ptx.count("mbarrier.arrive.release.cluster.shared::cluster.b64") == arrivals and "barrier.cluster.wait" in ptx
    # the wait on the other CTAs' arrivals (one site a CTA's code path) acquires at cluster scope
    assert len(re.findall(r"mbarrier\.try_wait\.parity\.acquire\.cluster\.shared::cta\.b64", ptx)) >= (1 if splits == 2 else 4)
    assert not re.search(r"\batom\.", ptx) and "fence.acq_rel.gpu" not in ptx and ".local" not in ptx
    workspace = ptx_of(gemm_wgmma.compile_wgmma(7168, tile_n, arch="sm_90a", keep_ptx=True, split_k=True, pdl="start", **options))
    assert re.search(r"\batom\.", workspace) and "fence.acq_rel.gpu" in workspace and "st.async" not in workspace
    for bad in (dict(split_k=True, cluster_m=2), dict(stream_k=True), dict(split_k=True, tile_m=256, tile_n=128), dict(split_k=False),
                dict(split_k=True, swiglu=True, dsmem_split=4), dict(split_k=True, dsmem_split=3)):
        with pytest.raises(ValueError, match="dsmem_split"):
            gemm_wgmma.GemmWgmmaDecoderKernel(7168, bad.pop("tile_n", 256), **{"cluster_m": 1, "dsmem_split": True, **bad})
    fits = gemm_wgmma.dsmem_split_fits
    assert fits("decoder", 2, None, None, False) and fits("decoder", 2, 128, 1, False)
    assert fits("decoder", 4, None, None, False) and not fits("decoder", 4, None, None, False, swiglu=True)
    assert fits("decoder", 4, None, None, False, ctas=64) and not fits("decoder", 4, None, None, False, ctas=128)
    assert fits("decoder", 2, None, None, False, ctas=112)
    assert not fits("decoder", 3, None, None, False) and not fits("decoder", 2, None, 2, False)
    assert not fits("decoder", 2, 256, None, False) and not fits("register", 2, None, None, False) and not fits("decoder", 2, None, None, True)


def test_stream_segments():
    """Stream-K: parts share tiles x quads work units evenly; the most segments any tile has (the workspace's
    second dimension) against a direct count."""
    from nvfp4lib.kernels.sm90.gemm_wgmma import stream_segments

    for tiles, quads, parts in [(24, 28, 66), (48, 28, 66), (96, 28, 66), (28, 12, 66), (5, 2, 10), (1, 28, 7), (3, 64, 66)]:
        units = tiles * quads
        bounds = [p * units // parts for p in range(parts + 1)]
        counts = [sum(1 for p in range(parts) if bounds[p] < (t + 1) * quads and bounds[p + 1] > t * quads) for t in range(tiles)]
        assert stream_segments(tiles, quads, parts) == max(counts)
    assert stream_segments(96, 28, 66) == 2  # gate_up at M = 1024: 40.7 quads a part, a tile meets at most 2
    assert stream_segments(24, 28, 66) == 4  # M = 128: 10.2 quads a part


@requires_cute
def test_decoder_stream_k_ptx_sm90a():
    """The stream-K decoder kernel: the split-K sum (workspace stores, arrival counter) inside a loop over the
    part's segments; no local memory; it does not combine with split_k or the grouped kernel."""
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90 import gemm_wgmma

    ptx = ptx_of(gemm_wgmma.compile_wgmma(7168, 256, arch="sm_90a", keep_ptx=True, stream_k=True))
    assert len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n256k16\.f32\.bf16\.bf16", ptx)) == 4
    assert "atom" in ptx and re.search(r"st\.global\.v4\.b32", ptx) and ".local" not in ptx
    for bad in (dict(grouped=True), dict(split_k=True)):
        with pytest.raises(ValueError, match="stream_k"):
            gemm_wgmma.GemmWgmmaDecoderKernel(7168, 256, stream_k=True, **bad)


@requires_hopper
@requires_cute
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [65, 200, 256])
@pytest.mark.parametrize("tile_n,splits", [(128, 2), (256, 2), (128, 3), (256, 4), (128, "k"), (256, "k"), (128, "k7")])
@pytest.mark.parametrize("limit", [None, 10.0])
def test_wgmma_split_k_on_gpu(fresh_seed, n, k, m, tile_n, splits, limit):
    """K split across CTAs (plain and SwiGLU), and stream-K ("k": one part per cluster of SMs; "k7": 7 parts,
    so tiles of many uneven segments): accuracy into a NaN-poisoned output and graph replay bit-equal to eager
    (the split sum does not depend on which split arrives last)."""
    options = dict(splits=splits) if isinstance(splits, int) else dict(stream_k=True, parts=int(splits[1:] or 0) or None)
    check_split_run(n, k, m, limit, tile_n=tile_n, **options)


@requires_hopper
@requires_cute
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [65, 256])
@pytest.mark.parametrize("tile_n,splits", [(256, 2), (256, 4), (128, 3), (256, "k"), (128, "k7")])
@pytest.mark.parametrize("limit", [None, 10.0])
@pytest.mark.parametrize("ahead", [8, 16])
def test_wgmma_split_k_ahead_on_gpu(fresh_seed, n, k, m, tile_n, splits, limit, ahead):
    """Split K and stream-K with eight or sixteen chunks of weight words in flight (two or four quads a decode-loop
    trip): splits and segments whose quads are not whole trips (K = 7168 in 4 splits: 7 quads each; K = 3072 in 3:
    4 quads, 12 in all; stream-K's uneven segments) decode the rest one quad at a time. Accuracy, NaN-poisoned
    output, graph replay bit-equal to eager."""
    options = dict(splits=splits) if isinstance(splits, int) else dict(stream_k=True, parts=int(splits[1:] or 0) or None)
    check_split_run(n, k, m, limit, tile_n=tile_n, ahead=ahead, **options)


@requires_hopper
@requires_cute
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 40, 64, 100])
@pytest.mark.parametrize("tile_n,splits,store_bytes,decoders", [(64, 2, 16, 1), (64, 4, 8, 1), (16, 1, 16, 1), (32, 3, 16, 1),
                                                                (64, 2, 16, 2), (64, 1, 8, 2), (128, 2, 16, 2)])
@pytest.mark.parametrize("limit", [None, 10.0])
def test_wgmma_small_tiles_on_gpu(fresh_seed, n, k, m, tile_n, splits, store_bytes, decoders, limit):
    """Tiles of 16..128 tokens (the op's WGMMA path up to M = 64 takes 64), with K splits, both store widths and
    one or two decoder warpgroups: accuracy into a NaN-poisoned output and graph replay bit-equal to eager."""
    if limit and decoders == 2:
        pytest.skip("the SwiGLU kernel has one decoder warpgroup")
    check_split_run(n, k, m, limit, tile_n=tile_n, splits=splits, store_bytes=store_bytes, decoders=decoders)


def check_split_run(n: int, k: int, m: int, limit, **options):
    """run_wgmma(**options) on a random [n, k] weight and x [m, k] (the clamped SwiGLU with ``limit``): finite,
    rel err <= 1e-2 and cosine >= 0.9999 against the reference into a NaN-poisoned output, and a CUDA-graph
    replay bit-equal to eager."""
    from nvfp4lib.bench.harness import cosine, rel_error
    from nvfp4lib.kernels.sm90 import gemm_wgmma
    from nvfp4lib.ops.gemm import clamped_swiglu_reference, prepare_weight, reference_gemm

    if limit and n % 128:
        pytest.skip("the SwiGLU epilogue needs 2I rows with I a multiple of 64")
    q = quantize(torch.randn(n, k, device="cuda") * 0.02)
    p = prepare_weight(q.packed, q.block_scale, q.global_scale, layout="sm90")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = reference_gemm(x, q.packed, q.block_scale, p.alpha)
    if limit:
        ref = clamped_swiglu_reference(ref.float(), limit)
    out_n = n // 2 if limit else n

    def call(out=None):
        return gemm_wgmma.run_wgmma(x, p.weight, p.block_scale, p.alpha, n, out=out, swiglu_limit=limit, **options)

    y = call(torch.full((m, out_n), float("nan"), device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
    assert rel_error(y, ref) <= 1e-2 and cosine(y, ref) >= 0.9999
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = call()
    static.fill_(float("nan"))
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, y)


@requires_hopper
@requires_cute
@pytest.mark.parametrize("n,k", [(6144, 7168), (1152, 512), (200, 512)])  # 200: a row block that ends inside y
@pytest.mark.parametrize("m", [33, 65, 300])
@pytest.mark.parametrize("tile_n,options", [(256, {}), (128, dict(decoders=2)), (64, dict(decoders=2)), (256, dict(splits=2)),
                                            (128, dict(splits=3))])
def test_wgmma_staged_epilogue_on_gpu(fresh_seed, n, k, m, tile_n, options):
    """The staged epilogue writes exactly what the direct one does (bit-equal, both into NaN-poisoned outputs) and
    is correct; n not a multiple of 8 falls back to the direct epilogue."""
    from nvfp4lib.kernels.sm90 import gemm_wgmma

    if options.get("splits", 1) > 1 and k // 256 < 2 * options["splits"]:
        pytest.skip("too few quads for the split")
    check_split_run(n, k, m, None, tile_n=tile_n, staged=True, **options)
    q = quantize(torch.randn(n, k, device="cuda") * 0.02)
    from nvfp4lib.ops.gemm import prepare_weight

    p = prepare_weight(q.packed, q.block_scale, q.global_scale, layout="sm90")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    outs = [gemm_wgmma.run_wgmma(x, p.weight, p.block_scale, p.alpha, n, tile_n=tile_n, staged=staged,
                                 out=torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16), **options)
            for staged in (True, False)]
    assert torch.equal(outs[0], outs[1])
    assert gemm_wgmma.staged_epilogue(outs[0], n, tile_n) == (n % 8 == 0 and tile_n >= 128)


@requires_hopper
@requires_cute
@pytest.mark.parametrize("n,k", [(6144, 7168), (1152, 512), (208, 512)])  # 208: a row block that ends inside y
@pytest.mark.parametrize("m", [40, 300])
@pytest.mark.parametrize("options", [dict(tile_n=256), dict(tile_n=128), dict(tile_n=64), dict(tile_n=256, splits=2),
                                     dict(tile_n=128, splits=3), dict(tile_n=256, swiglu_limit=10.0), dict(tile_n=128, swiglu_limit=10.0, splits=2),
                                     dict(tile_n=256, stream_k=True), dict(tile_n=256, stream_k=True, swiglu_limit=10.0),
                                     dict(tile_n=256, staged=False)])
def test_wgmma_early_alpha_bit_equal_on_gpu(fresh_seed, n, k, m, options):
    """The decoder kernel with its alpha read before the main loop (early_alpha, the default) writes exactly what it
    writes reading them in the epilogue: every epilogue (direct, staged, SwiGLU), split K and stream-K, into
    NaN-poisoned outputs, with unequal per-column alphas (two global scales)."""
    from nvfp4lib.kernels.sm90 import gemm_wgmma
    from nvfp4lib.ops.gemm import prepare_weight

    options = dict(options)
    if options.get("splits", 1) > 1 and k // 256 < 2 * options["splits"]:
        pytest.skip("too few quads for the split")
    if options.get("stream_k") and k // 256 < 2:
        pytest.skip("too few quads for stream-K")
    half = n // 2
    qa, qb = quantize(torch.randn(half, k, device="cuda") * 0.02), quantize(torch.randn(n - half, k, device="cuda") * 0.05)
    p = prepare_weight(torch.cat([qa.packed, qb.packed]), torch.cat([qa.block_scale, qb.block_scale]), [qa.global_scale, qb.global_scale],
                       [half, n - half], layout="sm90")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out_n = n // 2 if options.get("swiglu_limit") else n
    if options.get("swiglu_limit") and n % 128:
        pytest.skip("the SwiGLU epilogue needs 2I rows with I a multiple of 64")
    outs = [gemm_wgmma.run_wgmma(x, p.weight, p.block_scale, p.alpha, n, early_alpha=early,
                                 out=torch.full((m, out_n), float("nan"), device="cuda", dtype=torch.bfloat16), **options)
            for early in (True, False)]
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


@requires_hopper
@requires_cute
@pytest.mark.parametrize("n,k", [(6144, 7168), (7168, 3072), (1152, 512), (208, 512)])  # 208: a row block that ends inside y
@pytest.mark.parametrize("m", [40, 64, 256, 300])
@pytest.mark.parametrize("tile_n,limit,staged,splits", [(64, None, None, 2), (128, None, None, 2), (256, None, None, 2), (256, None, False, 2),
                                                        (256, 10.0, None, 2), (128, 10.0, None, 2), (64, None, None, 4), (128, None, None, 4)])
def test_wgmma_dsmem_split_on_gpu(fresh_seed, n, k, m, tile_n, limit, staged, splits):
    """Two (or four) K splits meeting in distributed shared memory (dsmem_split, the default for them) write exactly
    what the workspace split writes (own + other fp32 partial either way; four summed in split order), into
    NaN-poisoned outputs; correct against the reference and replayed bit-equal in a CUDA graph (check_split_run)."""
    from nvfp4lib.kernels.sm90 import gemm_wgmma
    from nvfp4lib.ops.gemm import prepare_weight

    if limit and n % 128:
        pytest.skip("the SwiGLU epilogue needs 2I rows with I a multiple of 64")
    if m > tile_n and m != 300:
        pytest.skip("one token tile or a ragged last one is enough here")
    if k // 256 < 2 * splits:
        pytest.skip("too few quads for the split")
    check_split_run(n, k, m, limit, tile_n=tile_n, splits=splits, dsmem_split=True, staged=staged)
    q = quantize(torch.randn(n, k, device="cuda") * 0.02)
    p = prepare_weight(q.packed, q.block_scale, q.global_scale, layout="sm90")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out_n = n // 2 if limit else n
    outs = [gemm_wgmma.run_wgmma(x, p.weight, p.block_scale, p.alpha, n, tile_n=tile_n, splits=splits, swiglu_limit=limit, staged=staged,
                                 dsmem_split=dsmem, out=torch.full((m, out_n), float("nan"), device="cuda", dtype=torch.bfloat16))
            for dsmem in (True, False)]
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


@requires_hopper
@requires_cute
@pytest.mark.parametrize("n,k", [(7168, 3072), (512, 512), (208, 512)])  # 208: a row block that ends inside y
@pytest.mark.parametrize("tile_n", [128, 256])
def test_grouped_staged_epilogue_on_gpu(fresh_seed, n, k, tile_n):
    """The grouped kernel (uneven and empty groups; a group's last tile runs into the next group's rows, which must
    not be written) with the staged epilogue: bit-equal to the direct one, both into NaN-poisoned outputs; asked for
    by default where y allows."""
    from nvfp4lib.kernels.sm90 import gemm_wgmma

    w, offsets = _grouped_case((300, 0, 517, 1, 129), n, k)
    x = torch.randn(int(offsets[-1]), k, device="cuda", dtype=torch.bfloat16)
    outs = [gemm_wgmma.run_grouped_wgmma(x, offsets, w.weight, w.block_scale, w.alpha, n, tile_n=tile_n, staged=staged,
                                         out=torch.full((x.shape[0], n), float("nan"), device="cuda", dtype=torch.bfloat16))
            for staged in (True, False)]
    torch.cuda.synchronize()
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])
    assert gemm_wgmma.staged_epilogue(outs[0], n, tile_n) == (n % 8 == 0)


@requires_hopper
@requires_cute
@pytest.mark.parametrize("tokens", [65, 300])
@pytest.mark.parametrize("tile_n", [128, 256])
def test_batched_staged_epilogue_on_gpu(fresh_seed, tokens, tile_n):
    """The batched kernel (wo_a's 16 groups, x read in place) with the staged epilogue: bit-equal to the direct one,
    both into NaN-poisoned outputs, and equal to it under CUDA-graph replay."""
    from nvfp4lib.kernels.sm90 import gemm_wgmma
    from nvfp4lib.ops.gemm import prepare_weight

    groups, n, k = 16, 1024, 4096
    q = quantize(torch.randn(groups * n, k, device="cuda") * 0.02)
    p = prepare_weight(q.packed, q.block_scale, q.global_scale, layout="sm90")
    args = (p.weight.view(groups, -1, *p.weight.shape[1:]), p.block_scale.view(groups, -1, *p.block_scale.shape[1:]),
            p.alpha.view(groups, n), n)
    x = torch.randn(tokens, groups, k, device="cuda", dtype=torch.bfloat16)

    def run(staged, out=None):
        return gemm_wgmma.run_batched_wgmma(x, *args, tile_n=tile_n, staged=staged, out=out)

    outs = [run(staged, torch.full((tokens, groups, n), float("nan"), device="cuda", dtype=torch.bfloat16)) for staged in (True, False)]
    torch.cuda.synchronize()
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run(None)
    static.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, outs[1])

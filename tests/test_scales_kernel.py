"""The CuTeDSL scale-assembly kernel: compiles for sm_90a and sm_100a on a CPU machine (PTX checked);
on a Hopper GPU it equals the exact reference bit for bit and survives CUDA-graph capture."""
import re

import pytest
import torch

from conftest import requires_cute, requires_hopper

VARIANTS = [(grouped, dynamic) for grouped in (False, True) for dynamic in (False, True)]


@requires_cute
@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
@pytest.mark.parametrize("grouped,dynamic", VARIANTS)
@pytest.mark.parametrize("rows_per_cta", [1, 4])
def test_kernel_compiles_to_the_expected_ptx(arch, grouped, dynamic, rows_per_cta):
    from nvfp4lib.kernels.cute_compile import ptx_of
    from nvfp4lib.kernels.sm90.quantize import compile_scale_assembly

    ptx = ptx_of(compile_scale_assembly(7168, grouped, dynamic, rows_per_cta=rows_per_cta, arch=arch, keep_ptx=True))
    assert re.search(rf"^\.target {arch}\b", ptx, re.M), f"PTX does not target {arch}"
    entries = re.findall(r"\.entry (\S+)\(", ptx)
    assert any("quantize_kernel" in e for e in entries)
    assert any("amax_kernel" in e for e in entries) == dynamic
    # exactness: IEEE divisions only, never the approximate ones
    assert "div.rn.f32" in ptx and "div.approx" not in ptx and "div.full" not in ptx
    assert "rcp.approx" not in ptx and "ex2.approx" not in ptx
    # per row: two 16-byte vector loads of the bf16 block, one 8-byte store of its codes, one scale byte
    quantize_body = ptx[ptx.index("quantize_kernel"):]
    quantize_body = quantize_body[: quantize_body.index("\n}\n")]
    assert len(re.findall(r"ld\.global(\.\w+)*\.v4\.(b|u|s)32", quantize_body)) == 2 * rows_per_cta
    assert len(re.findall(r"st\.global(\.\w+)*\.v2\.(b|u|s)32", quantize_body)) == rows_per_cta
    assert len(re.findall(r"st\.global(\.\w+)*\.(b|u)8", quantize_body)) == rows_per_cta
    # all of a thread's loads are issued before its first store (bytes in flight)
    assert quantize_body.rindex("ld.global.v4") < quantize_body.index("st.global.v2")
    # the E2M1 encode is the branch-free round-to-nearest-even form, never a compare chain
    assert "0f4A800000" in quantize_body and "0f3E800000" not in quantize_body  # no compare against 0.25
    # dynamic mode reduces the amax on the device: one atomic max per warp, no host round trip
    assert bool(re.search(r"atom\.global(\.\w+)*\.max", ptx)) == dynamic
    if grouped:
        # one band-group lookup, then the group's padded start and two offsets: a handful of scalar loads
        scalar_loads = re.findall(r"ld\.global\.(b|u|s)32\s", quantize_body)
        assert 4 <= len(scalar_loads) <= 8, f"{len(scalar_loads)} scalar loads in the grouped quantize kernel"


def kernel_e4m3_round(ratio):
    """The kernel's E4M3 rounding (fp32 bits, ratio in [2**-6, 448]) -> (fp32 value, byte)."""
    bits = ratio.view(torch.int32)
    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -(1 << 20)
    return rounded.view(torch.float32), ((((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)).to(torch.uint8)


def kernel_e2m1_magnitude(scaled):
    """The kernel's E2M1 magnitude code of a non-negative fp32 value."""
    clipped = torch.clamp(scaled, max=6.0)
    halves = (clipped + 4194304.0).view(torch.int32) - 0x4A800000
    bits = clipped.view(torch.int32)
    normal = ((bits + 0x1FFFFF + ((bits >> 22) & 1)) >> 22) - 252
    return torch.where(clipped < 1.0, halves, normal)


def test_kernel_e4m3_rounding_equals_the_torch_cast(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    ratio = torch.exp(torch.empty(1 << 20).uniform_(-6 * 0.6932, 8.81 * 0.6932, generator=gen))
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[torch.isfinite(e4m3) & (e4m3 >= 2.0**-6)]
    midpoints = (e4m3[:-1] + e4m3[1:]) / 2  # exact ties
    ratio = torch.cat((ratio, e4m3, midpoints, torch.nextafter(midpoints, torch.tensor(0.0)), torch.nextafter(midpoints, torch.tensor(1e3))))
    ratio = ratio.clamp(2.0**-6, 448.0)
    value, byte = kernel_e4m3_round(ratio)
    expected = ratio.to(torch.float8_e4m3fn)
    assert torch.equal(value, expected.float()) and torch.equal(byte, expected.view(torch.uint8))


def test_kernel_e2m1_encode_equals_formats_encode(fresh_seed):
    from nvfp4lib.formats import e2m1_encode

    gen = torch.Generator().manual_seed(fresh_seed)
    special = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 1e-30, 1e30, float("inf")])
    values = torch.cat((torch.rand(1 << 20, generator=gen) * 7, torch.rand(1 << 18, generator=gen) * 1.1, special))
    values = torch.cat((values, torch.nextafter(values, torch.tensor(0.0)), torch.nextafter(values, torch.tensor(1e38)))).abs()
    expected = e2m1_encode(torch.clamp(values, -6.0, 6.0)).int()
    assert torch.equal(kernel_e2m1_magnitude(values), expected)


def emulate_kernel_row_mapping(offsets, m, capacity, rows_per_cta):
    """The kernel's index arithmetic in Python: for every scale row p of the grouped buffer, the token row
    it quantizes (or -1 for padding), walking CTAs of rows_per_cta rows the way quantize_kernel does."""
    from nvfp4lib.scales import grouped_scale_rows, padded_group_offsets, sanitized_offsets

    num_groups = offsets.numel() - 1
    rows = grouped_scale_rows(m, num_groups, capacity)
    bounds = sanitized_offsets(offsets, m)
    padded = padded_group_offsets(bounds, m, capacity, sanitized=True)
    band_group = torch.searchsorted(padded[1:], torch.arange(0, rows, 128, dtype=torch.int32), right=True)
    token_of_row = torch.full((rows,), -1)
    for row_block in range(rows // rows_per_cta):
        first_p = row_block * rows_per_cta
        group = int(band_group[first_p // 128])
        safe = min(group, num_groups - 1)
        group_start, first_token = int(padded[safe]), int(bounds[safe])
        kept = min(int(bounds[safe + 1]) - first_token, capacity) if group < num_groups else 0
        for r in range(rows_per_cta):
            local = first_p + r - group_start
            if local < kept:
                token_of_row[first_p + r] = first_token + local
    return token_of_row, padded


def emulate_kernel_group_amax(x, offsets, m):
    """The amax kernel's running-group flushes in Python (per CTA of 16 rows) -> amax per group."""
    from nvfp4lib.scales import sanitized_offsets

    num_groups = offsets.numel() - 1
    bounds = sanitized_offsets(offsets, m)
    row_group = torch.searchsorted(bounds[1:], torch.arange(m), right=True)
    row_amax = x.float().abs().amax(dim=1)
    amax = torch.zeros(num_groups)
    for first_row in range(0, m, 16):
        current, best = int(row_group[first_row]), 0.0
        for row in range(first_row, min(first_row + 16, m)):
            if int(row_group[row]) != current:
                if current < num_groups:
                    amax[current] = max(float(amax[current]), best)
                current, best = int(row_group[row]), 0.0
            best = max(best, float(row_amax[row]))
        if current < num_groups:
            amax[current] = max(float(amax[current]), best)
    return amax


@pytest.mark.parametrize("rows_per_cta", [1, 4])
def test_kernel_row_mapping_matches_the_reference(rows_per_cta, fresh_seed):
    """Every real row's scales land where the reference puts them; every other scale row is padding."""
    from test_scales import random_offsets

    from nvfp4lib import quantize, unswizzle_scales
    from nvfp4lib.scales import reference_assemble_grouped

    gen = torch.Generator().manual_seed(fresh_seed)
    for case in range(20):
        m = int(torch.randint(1, 900, (1,), generator=gen))
        groups = int(torch.randint(1, 40, (1,), generator=gen))
        offsets = random_offsets(m, groups, gen)
        sizes = offsets[1:] - offsets[:-1]
        capacity = int(sizes.max()) if case % 2 else m
        token_of_row, padded = emulate_kernel_row_mapping(offsets, m, capacity, rows_per_cta)
        # one block per row whose amax is a row signature: its scale byte tells which token row it came from
        x = torch.zeros(m, 16, dtype=torch.bfloat16)
        x[:, 1] = (torch.arange(m) % 251 + 1).to(torch.bfloat16)
        scale = torch.tensor(0.1)  # ratios 1.7 .. 418: inside the E4M3 range, no saturation
        reference = reference_assemble_grouped(x, offsets, scale, capacity)
        assert torch.equal(padded.int(), reference.padded_offsets)
        scales = unswizzle_scales(reference.swizzled_scale, token_of_row.numel(), 16).view(torch.uint8)[:, 0]
        expected = torch.zeros_like(scales)
        real = token_of_row >= 0
        row_scales = quantize(x, scale).block_scale.view(torch.uint8)[:, 0]
        expected[real] = row_scales[token_of_row[real]]
        assert torch.equal(scales, expected), f"case {case}: the emulated kernel mapping differs from the reference"
        assert int(real.sum()) == int(sizes.clamp(max=capacity).sum())


def test_kernel_amax_flushes_match_the_reference(fresh_seed):
    from test_scales import random_offsets

    from nvfp4lib.scales import reference_assemble_grouped

    gen = torch.Generator().manual_seed(fresh_seed)
    for case in range(10):
        m = int(torch.randint(1, 600, (1,), generator=gen))
        groups = int(torch.randint(1, 30, (1,), generator=gen))
        offsets = random_offsets(m, groups, gen)
        x = activations(m, 32, gen)
        expected = reference_assemble_grouped(x, offsets, None, m).global_scales
        amax = emulate_kernel_group_amax(x, offsets, m)
        got = torch.where(amax > 0, amax / torch.tensor(2688.0), torch.ones_like(amax))
        assert torch.equal(got, expected)


@requires_cute
def test_kernel_rejects_bad_k():
    from nvfp4lib.kernels.sm90.quantize import ScaleAssemblyKernel

    with pytest.raises(ValueError, match="multiple of 16"):
        ScaleAssemblyKernel(100, grouped=False, dynamic=False)


# ----------------------------------------------------------------------------------------------
# GPU: bit for bit against the reference computed on the CPU, graph replay with new data
# ----------------------------------------------------------------------------------------------
def poison_allocator(nbytes=1 << 28):
    """Fill freed caching-allocator memory with 0xFF (NaN in e4m3, garbage codes), so outputs that a
    kernel forgets to write show up."""
    block = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device="cuda")
    del block


def as_bytes(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def assert_outputs_equal(got, expected, what):
    for index, (a, b) in enumerate(zip(got, expected)):
        a, b = as_bytes(a).cpu(), as_bytes(b).cpu()
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what} output {index}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if not torch.equal(a, b):
            bad = (a != b).nonzero()
            raise AssertionError(f"{what} output {index}: {len(bad)} elements differ, first at {bad[0].tolist()}")


def activations(m, k, gen):
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 1, max(m, 1))[:m].unsqueeze(1)
    x[torch.rand(m, k, generator=gen) < 0.01] *= 30
    return x.to(torch.bfloat16)


@requires_hopper
@requires_cute
@pytest.mark.parametrize("m,k", [(1, 7168), (16, 7168), (300, 272), (1000, 3072), (129, 16)])
@pytest.mark.parametrize("static", [False, True])
def test_single_group_kernel_equals_reference(m, k, static, fresh_seed):
    from nvfp4lib.scales import assemble_scales, kernel_backend_available, reference_assemble

    gen = torch.Generator().manual_seed(fresh_seed)
    x = activations(m, k, gen)
    scale = torch.tensor(float(x.float().abs().amax()) / 2688 * 0.3) if static else None  # some blocks saturate
    assert kernel_backend_available(x.cuda())
    poison_allocator()
    got = assemble_scales(x.cuda(), scale)
    assert_outputs_equal(got, reference_assemble(x, scale), f"single group m={m} k={k}")


@requires_hopper
@requires_cute
@pytest.mark.parametrize("case", range(6))
def test_grouped_kernel_equals_reference(case, fresh_seed):
    from nvfp4lib.scales import assemble_scales_grouped, reference_assemble_grouped
    from test_scales import random_offsets

    gen = torch.Generator().manual_seed(fresh_seed + case)
    m = int(torch.randint(1, 3000, (1,), generator=gen))
    k = (7168, 3072, 272)[case % 3]
    groups = (4, 8, 384)[case % 3]
    x = activations(m, k, gen)
    offsets = random_offsets(m, groups, gen).to(torch.int32)
    scales = torch.empty(groups).uniform_(0.0005, 0.05, generator=gen) if case % 2 else None
    capacity = m
    poison_allocator()
    got = assemble_scales_grouped(x.cuda(), offsets.cuda(), None if scales is None else scales.cuda(), capacity=capacity)
    assert_outputs_equal(got, reference_assemble_grouped(x, offsets, scales, capacity), f"grouped case {case}")


@requires_hopper
@requires_cute
@pytest.mark.parametrize("grouped", [False, True])
def test_graph_replay_with_new_data_equals_eager(grouped, fresh_seed):
    from nvfp4lib.scales import assemble_scales, assemble_scales_grouped

    gen = torch.Generator().manual_seed(fresh_seed)
    m, k = 700, 7168
    x = activations(m, k, gen).cuda()
    offsets = torch.tensor([0, 100, 100, 650, 700], dtype=torch.int32, device="cuda")
    scale = torch.tensor(0.01, device="cuda")

    def step():
        if grouped:
            return (*assemble_scales_grouped(x, offsets), *assemble_scales_grouped(x, offsets, scale))
        return (*assemble_scales(x), *assemble_scales(x, scale))

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for trial in range(3):
        x.copy_(activations(m, k, gen).cuda())
        offsets.copy_(torch.tensor([0, 50 * trial, 300, 300 + 100 * trial, 700], dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        assert_outputs_equal(captured, step(), f"replay {trial}")


@requires_hopper
@requires_cute
@pytest.mark.parametrize("static", [False, True])
def test_kernel_non_finite_blocks_match_the_reference(static, fresh_seed):
    """Scale bytes and global scale equal the reference with NaN and Inf in the input; packed codes are
    compared on the rows whose scaled values are not NaN (those codes are unspecified)."""
    from nvfp4lib.scales import assemble_scales, reference_assemble

    gen = torch.Generator().manual_seed(fresh_seed)
    x = activations(300, 7168, gen)
    x[3, 100], x[77, 5000], x[299, 7167] = float("nan"), -float("nan"), float("inf")
    x[150, 16:32] = -float("inf")
    scale = torch.tensor(0.01) if static else None
    got = assemble_scales(x.cuda(), None if scale is None else scale.cuda())
    expected = reference_assemble(x, scale)
    assert_outputs_equal(got[1:], expected[1:], "scales / global scale with NaN and Inf")
    finite_rows = torch.ones(300, dtype=torch.bool)
    # codes of NaN-scaled elements are unspecified: NaN rows always, Inf rows under a dynamic (Inf) scale
    finite_rows[[3, 77] if static else [3, 77, 150, 299]] = False
    assert torch.equal(got[0].cpu()[finite_rows], expected[0][finite_rows])

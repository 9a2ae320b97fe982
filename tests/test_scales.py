"""nvfp4lib.scales: the reference equals composing quantize and swizzle_scales, one group and MoE groups,
static and dynamic; the torch.library ops trace under torch.compile; bad input is a clear error."""
import pytest
import torch

from nvfp4lib import quantize, swizzle_scales
from nvfp4lib.layout import padded_scale_cols
from nvfp4lib.scales import (
    assemble_scales,
    assemble_scales_grouped,
    grouped_scale_rows,
    padded_group_offsets,
)


def activations(m, k, gen, dtype=torch.bfloat16):
    """Fresh heavy-tailed values with per-row magnitudes spanning decades (saturation and tiny blocks)."""
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 1, max(m, 1))[:m].unsqueeze(1)
    x[torch.rand(m, k, generator=gen) < 0.01] *= 30
    return x.to(dtype)


def as_bytes(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def assert_same(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    assert torch.equal(as_bytes(a), as_bytes(b)), f"{what} differ"


def random_offsets(m, groups, gen, empty_fraction=0.3):
    """Uneven group sizes summing to m, some groups empty."""
    weights = torch.rand(groups, generator=gen) ** 3
    weights[torch.rand(groups, generator=gen) < empty_fraction] = 0
    if weights.sum() == 0:
        weights[0] = 1
    sizes = torch.floor(weights / weights.sum() * m).long()
    sizes[int(torch.argmax(weights))] += m - int(sizes.sum())
    return torch.cat((torch.zeros(1, dtype=torch.long), torch.cumsum(sizes, 0)))


@pytest.mark.parametrize("m,k", [(1, 16), (16, 7168), (127, 80), (128, 256), (300, 272), (513, 64)])
@pytest.mark.parametrize("static", [False, True])
def test_single_group_equals_quantize_then_swizzle(m, k, static, fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    x = activations(m, k, gen)
    scale = float(x.float().abs().amax()) / 2688 * float(torch.empty(1).uniform_(0.05, 3, generator=gen)) if static else None
    got = assemble_scales(x, scale)
    expected = quantize(x, scale)
    assert_same(got.packed, expected.packed, "packed E2M1")
    assert_same(got.swizzled_scale, swizzle_scales(expected.block_scale), "swizzled block scales")
    assert_same(got.global_scale, expected.global_scale, "global scale")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes_take_the_reference(dtype, fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    x = activations(40, 96, gen, dtype)
    got, expected = assemble_scales(x), quantize(x)
    assert_same(got.packed, expected.packed, "packed")
    assert_same(got.swizzled_scale, swizzle_scales(expected.block_scale), "scales")


def check_grouped_against_per_group_quantize(x, offsets, got, static_scales, capacity):
    k16p = padded_scale_cols(x.shape[1] // 16)
    num_groups = offsets.numel() - 1
    assert got.swizzled_scale.numel() == grouped_scale_rows(x.shape[0], num_groups, capacity) * k16p
    expected_padded = [0]
    for e in range(num_groups):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        expected_padded.append(expected_padded[-1] + -(-(hi - lo) // 128) * 128)
        scale = None if static_scales is None else static_scales[e]
        if hi == lo:
            expected_global = torch.tensor(1.0) if scale is None else scale.float()
            assert_same(got.global_scales[e], expected_global, f"global scale of empty group {e}")
            continue
        ref = quantize(x[lo:hi], scale)
        assert_same(got.packed[lo:hi], ref.packed, f"packed rows of group {e}")
        assert_same(got.global_scales[e], ref.global_scale, f"global scale of group {e}")
        chunk = got.swizzled_scale[expected_padded[e] * k16p : expected_padded[e + 1] * k16p]
        assert_same(chunk, swizzle_scales(ref.block_scale), f"swizzled scales of group {e}")
    assert got.padded_offsets.tolist() == expected_padded
    tail = got.swizzled_scale[expected_padded[-1] * k16p :]
    assert not as_bytes(tail).any(), "scale bytes past the last group must be zero"


@pytest.mark.parametrize("case", range(8))
def test_grouped_equals_per_group_quantize_then_swizzle(case, fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed + case)
    m = int(torch.randint(1, 700, (1,), generator=gen))
    k = 16 * int(torch.randint(1, 30, (1,), generator=gen))
    groups = int(torch.randint(1, 9, (1,), generator=gen))
    x = activations(m, k, gen)
    offsets = random_offsets(m, groups, gen).to(torch.int32 if case % 2 else torch.int64)
    static = case % 4 >= 2
    scales = None
    if static:
        scales = torch.empty(groups).uniform_(0.0005, 0.05, generator=gen)
    capacity = int((offsets[1:] - offsets[:-1]).max()) if case % 3 == 0 else None
    got = assemble_scales_grouped(x, offsets, scales, capacity=capacity)
    check_grouped_against_per_group_quantize(x, offsets, got, scales, capacity)


def test_grouped_four_uneven_groups_with_an_empty_one(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    x = activations(300, 512, gen)
    offsets = torch.tensor([0, 5, 5, 170, 300])
    got = assemble_scales_grouped(x, offsets)
    check_grouped_against_per_group_quantize(x, offsets, got, None, None)
    assert got.padded_offsets.tolist() == [0, 128, 128, 384, 640]


def test_grouped_static_scalar_is_shared(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    x = activations(90, 128, gen)
    offsets = torch.tensor([0, 40, 90])
    got = assemble_scales_grouped(x, offsets, 0.002)
    check_grouped_against_per_group_quantize(x, offsets, got, torch.tensor([0.002, 0.002]), None)


def test_one_group_is_the_grouped_op_with_one_group(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    x = activations(200, 192, gen)
    single = assemble_scales(x)
    grouped = assemble_scales_grouped(x, torch.tensor([0, 200]))
    for a, b, what in zip(single[:2], grouped[:2], ("packed", "scales")):
        assert_same(a, b, what)


def test_capacity_bound_is_tight_and_size_only():
    assert grouped_scale_rows(8192, 1) == 8192
    assert grouped_scale_rows(300, 4) == 128 * ((300 + 4 * 127) // 128)
    assert grouped_scale_rows(1000, 384, capacity=16) == 384 * 128  # the capacity bound is the smaller
    assert grouped_scale_rows(1000, 384) == 128 * ((1000 + 384 * 127) // 128)
    # the worst case for that bound: every group one row past a multiple of 128
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        groups = int(torch.randint(1, 20, (1,), generator=gen))
        sizes = torch.randint(0, 400, (groups,), generator=gen)
        offsets = torch.cat((torch.zeros(1, dtype=torch.long), torch.cumsum(sizes, 0)))
        m = int(offsets[-1])
        needed = int(padded_group_offsets(offsets, m, max(1, m))[-1])
        assert needed <= grouped_scale_rows(m, groups, int(sizes.max()))


@pytest.mark.parametrize(
    "offsets,capacity,message",
    [
        ([0, 50, 40, 100], None, "non-decreasing"),
        ([0, 50, 120, 100], None, "out of range"),
        ([0, 50, 90], None, "end at M"),
        ([3, 50, 100], None, "start at 0"),
        ([0, -1, 100], None, "out of range"),
        ([0, 70, 100], 64, "capacity"),
    ],
)
def test_bad_offsets_are_clear_errors(offsets, capacity, message):
    x = torch.randn(100, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        assemble_scales_grouped(x, torch.tensor(offsets), capacity=capacity)


@pytest.mark.parametrize("bad", [0.0, -0.01, float("nan"), float("inf")])
def test_bad_input_scale_is_an_error_naming_it(bad):
    x = torch.randn(10, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="input_scale"):
        assemble_scales(x, bad)
    with pytest.raises(ValueError, match=r"input_scale\[1\]"):
        assemble_scales_grouped(x, torch.tensor([0, 5, 10]), torch.tensor([0.01, bad]))


def test_k_not_a_multiple_of_16_is_an_error():
    with pytest.raises(ValueError, match="multiple of 16"):
        assemble_scales(torch.randn(4, 40, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="multiple of 16"):
        assemble_scales_grouped(torch.randn(4, 40, dtype=torch.bfloat16), torch.tensor([0, 4]))


def test_unchecked_bad_offsets_never_write_out_of_bounds(fresh_seed):
    """validate=False (what capture and torch.compile get): garbage offsets are sanitised on the device;
    outputs keep their size-only shapes, and the groups that are valid still come out exact."""
    gen = torch.Generator().manual_seed(fresh_seed)
    x = activations(260, 64, gen)
    k16p = padded_scale_cols(4)
    rows = grouped_scale_rows(260, 3, 100)
    for offsets in ([0, 300, 10, 260], [0, -5, 900, 7], [0, 250, 255, 260], [5, 5, 5, 5]):
        got = assemble_scales_grouped(x, torch.tensor(offsets), capacity=100, validate=False)
        assert got.swizzled_scale.numel() == rows * k16p
        assert int(got.padded_offsets[-1]) <= rows and bool((got.padded_offsets[1:] >= got.padded_offsets[:-1]).all())
    # the first group (rows 0..99 kept of 250) is still exact; rows past the capacity are dropped
    got = assemble_scales_grouped(x, torch.tensor([0, 250, 255, 260]), capacity=100, validate=False)
    ref = quantize(x[0:250])
    ref_kept = quantize(x[:100], ref.global_scale)
    assert_same(got.swizzled_scale[: 128 * k16p], swizzle_scales(ref_kept.block_scale), "kept rows of an over-capacity group")


def test_ops_trace_under_torch_compile_fullgraph(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    x = activations(150, 128, gen)
    offsets = torch.tensor([0, 20, 20, 150])
    scale = torch.tensor(0.004)

    def step(x, offsets, scale):
        one = assemble_scales(x, scale)
        dynamic = assemble_scales(x)
        grouped = assemble_scales_grouped(x, offsets)
        return (*one, *dynamic, *grouped)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(x, offsets, scale), step(x, offsets, scale)):
        assert_same(got, expected, "compiled vs eager")


def test_fake_implementations_match_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import nvfp4lib.ops.scales  # noqa: F401

    x = torch.randn(77, 96, dtype=torch.bfloat16)
    offsets = torch.tensor([0, 7, 77])
    real = torch.ops.nvfp4lib.assemble_scales_grouped(x, offsets, None, 70)
    real_one = torch.ops.nvfp4lib.assemble_scales(x, None)
    with FakeTensorMode() as mode:
        fake = torch.ops.nvfp4lib.assemble_scales_grouped(mode.from_tensor(x), mode.from_tensor(offsets), None, 70)
        fake_one = torch.ops.nvfp4lib.assemble_scales(mode.from_tensor(x), None)
    for r, f in zip((*real, *real_one), (*fake, *fake_one)):
        assert r.shape == f.shape and r.dtype == f.dtype


def test_op_passes_torch_library_opcheck(fresh_seed):
    import nvfp4lib.ops.scales  # noqa: F401

    x = activations(40, 64, torch.Generator().manual_seed(fresh_seed))
    torch.library.opcheck(torch.ops.nvfp4lib.assemble_scales.default, (x, torch.tensor(0.003)))
    torch.library.opcheck(torch.ops.nvfp4lib.assemble_scales_grouped.default, (x, torch.tensor([0, 10, 40]), None, 40))


def test_non_finite_blocks_are_visible_never_silent(fresh_seed):
    """A NaN block gets the E4M3 NaN scale byte (0x7f); an Inf saturates its block at 448 and code +-6;
    dynamic mode with a NaN amax falls back to global scale 1.0 (documented; audit.py reports it)."""
    from nvfp4lib import unswizzle_scales

    gen = torch.Generator().manual_seed(fresh_seed)
    x = activations(3, 64, gen)
    x[0, 5], x[1, 20], x[2, 40] = -float("nan"), float("nan"), float("inf")
    got = assemble_scales(x, 0.01)
    scales = unswizzle_scales(got.swizzled_scale, 3, 64).view(torch.uint8)
    assert scales[0, 0] == 0x7F and scales[1, 1] == 0x7F and scales[2, 2] == 0x7E
    assert (got.packed[2, 20] & 0x0F) == 0x7  # +inf -> +6
    assert float(assemble_scales(x).global_scale) == 1.0

"""nvfp4lib.layout: the 128x4 swizzle against its closed form, torchao's to_blocked and CuTeDSL's layout."""
import pytest
import torch

from nvfp4lib import padded_rows, padded_scale_cols, scale_offset, swizzle_scales, unswizzle_scales
from nvfp4lib.kernels.cute_compile import cute_available

to_blocked = pytest.importorskip("torchao.prototype.mx_formats.utils", reason="torchao (the test extra) is the independent oracle").to_blocked


def random_scales(gen, m, k16, batch=None):
    shape = (m, k16) if batch is None else (batch, m, k16)
    # bytes 1..126: valid, non-zero E4M3 values, so zero padding is distinguishable from data
    return torch.randint(1, 127, shape, generator=gen, dtype=torch.uint8).view(torch.float8_e4m3fn)


@pytest.mark.parametrize("case", range(24))
def test_swizzle_equals_torchao_to_blocked_and_round_trips(case, fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed + case)
    m = int(torch.randint(1, 600, (1,), generator=gen))
    k16 = int(torch.randint(1, 30, (1,), generator=gen))
    sf = random_scales(gen, m, k16)
    swizzled = swizzle_scales(sf)
    assert swizzled.dtype == sf.dtype and swizzled.numel() == padded_rows(m) * padded_scale_cols(k16)
    assert torch.equal(swizzled.view(torch.uint8), to_blocked(sf).view(torch.uint8))
    assert torch.equal(unswizzle_scales(swizzled, m, 16 * k16).view(torch.uint8), sf.view(torch.uint8))


def test_closed_form_offset_addresses_every_scale(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    m, k16 = 300, 11
    sf = random_scales(gen, m, k16)
    flat = swizzle_scales(sf).view(torch.uint8)
    rows, cols = torch.meshgrid(torch.arange(m), torch.arange(k16), indexing="ij")
    offsets = scale_offset(rows, cols, k16)
    assert torch.equal(flat[offsets], sf.view(torch.uint8))
    assert offsets.unique().numel() == m * k16  # a bijection onto its image
    assert scale_offset(0, 0, k16) == 0 and scale_offset(32, 0, k16) == 4 and scale_offset(1, 0, k16) == 16
    assert scale_offset(128, 0, k16) == 512 * 3  # the second 128-row band starts after ceil(11/4) = 3 atoms


def test_padding_is_zero_never_uninitialised(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    m, k16 = 130, 5
    flat = swizzle_scales(random_scales(gen, m, k16)).view(torch.uint8)
    written = torch.zeros_like(flat, dtype=torch.bool)
    rows, cols = torch.meshgrid(torch.arange(m), torch.arange(k16), indexing="ij")
    written[scale_offset(rows, cols, k16).flatten()] = True
    assert (flat[~written] == 0).all() and (flat[written] != 0).all()
    assert (~written).sum() == padded_rows(m) * padded_scale_cols(k16) - m * k16


def test_batched_layout_is_one_swizzle_per_matrix(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    sf = random_scales(gen, 70, 9, batch=3)
    swizzled = swizzle_scales(sf)
    assert swizzled.shape == (3, padded_rows(70) * padded_scale_cols(9))
    for i in range(3):
        assert torch.equal(swizzled[i].view(torch.uint8), swizzle_scales(sf[i]).view(torch.uint8))
    assert torch.equal(unswizzle_scales(swizzled, 70, 144).view(torch.uint8), sf.view(torch.uint8))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"\[M, K/16\]"):
        swizzle_scales(torch.zeros(5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1-byte"):
        swizzle_scales(torch.zeros(4, 4))
    buf = swizzle_scales(torch.ones(10, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 16"):
        unswizzle_scales(buf, 10, 100)
    with pytest.raises(ValueError, match="multiple of 16"):
        unswizzle_scales(buf, 10, 7)  # K passed as the number of scale columns by mistake
    with pytest.raises(ValueError, match="does not hold"):
        unswizzle_scales(buf, 300, 112)  # a buffer of 128 padded rows cannot hold 300 rows
    with pytest.raises(ValueError, match="does not hold"):
        unswizzle_scales(buf, 10, 16 * 9)  # 9 scale columns pad to 12, the buffer has 8


@pytest.mark.skipif(not cute_available(), reason="nvidia-cutlass-dsl is not installed (pip install -e '.[cute]')")
@pytest.mark.parametrize("m, k", [(128, 64), (256, 448), (300, 7168 // 16 * 16), (7168 // 14, 96)])
def test_swizzle_equals_cutedsl_blockscaled_layout(m, k):
    from nvfp4lib.kernels.cute_layout_probe import cute_scale_offsets

    k16 = k // 16
    expected = cute_scale_offsets(m, k)
    rows, cols = torch.meshgrid(torch.arange(m), torch.arange(k16), indexing="ij")
    assert torch.equal(scale_offset(rows, cols, k16), expected)

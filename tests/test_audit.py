"""nvfp4lib.audit: the amplification numbers, the two E4M3 casts, the 3977x scenario, scale padding."""
import pytest
import torch

from nvfp4lib import quantize
from nvfp4lib.audit import (
    amplification_sweep,
    amplified_activations,
    audit_input_scale,
    e4m3_cast,
    emulated_blockscaled_gemm,
    padded_scale_buffer,
    quantize_with_cast,
)
from nvfp4lib.formats import dequantize
from nvfp4lib.layout import scale_offset, unswizzle_scales


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan"), float("inf"), float("-inf")])
def test_bad_input_scale_is_an_error_naming_the_tensor(bad):
    x = torch.randn(8, 64)
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.experts\.7\.input_scale"):
        audit_input_scale(torch.tensor(bad), x, name="layers.3.mlp.experts.7.input_scale")


def test_matched_scale_has_no_amplification(fresh_seed):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(fresh_seed)).clamp(-5.25, 5.25)
    # amax exactly 5.25 = 2688 * 2**-9: the matched scale 2**-9 is exact in fp32, so the audit's own
    # calibrated scale equals it bit for bit (an amax/2688 that rounds would make the two differ by an ulp)
    x[0, 0] = 5.25
    report = audit_input_scale(2.0**-9, x)
    assert report.amplification == 1.0
    assert report.clipped_element_fraction == 0.0
    assert report.nonfinite_inputs == 0
    assert report.relative_error == report.relative_error_calibrated
    assert report.relative_error < 0.15


def test_the_3977x_scenario(fresh_seed):
    """Activations 3977x beyond the calibration: saturating -> finite but useless; non-saturating -> NaN."""
    gen = torch.Generator().manual_seed(fresh_seed)
    calibration_amax = 3.0
    x = amplified_activations(128, 1024, calibration_amax, 3977.0, gen)
    input_scale = calibration_amax / 2688
    report = audit_input_scale(input_scale, x, name="input_scale")
    assert 3900 < report.amplification < 4050  # 3977 up to bf16 rounding of the pinned outlier
    # every block holding an element beyond the calibration saturates (channels may share a block)
    outlier_blocks = (x.float().abs() > calibration_amax).reshape(128, -1, 16).any(-1)
    assert outlier_blocks.any(dim=1).all(), "every row carries an outlier"
    assert report.saturated_block_fraction >= outlier_blocks.float().mean().item()
    assert report.clipped_element_fraction > 0
    assert report.relative_error > 0.9 and report.relative_error_calibrated < 0.15

    _, saturated_scale, saturated = quantize_with_cast(x, input_scale, saturating=True)
    assert torch.isfinite(saturated).all()
    assert (saturated_scale.float() == 448).any()
    _, wrapped_scale, wrapped = quantize_with_cast(x, input_scale, saturating=False)
    assert torch.isnan(wrapped_scale.float()).any() and torch.isnan(wrapped).any()
    # every GEMM row that reduces over a NaN element is NaN
    y = torch.nan_to_num(wrapped, nan=float("nan")) @ torch.randn(1024, 8, generator=gen)
    assert torch.isnan(y).all(dim=1).float().mean() > 0.5


def test_saturating_cast_equals_quantize(fresh_seed):
    x = torch.randn(33, 160, generator=torch.Generator().manual_seed(fresh_seed)) * 40
    packed, block_scale, decoded = quantize_with_cast(x, 0.001, saturating=True)
    ref = quantize(x, 0.001)
    assert torch.equal(packed, ref.packed) and torch.equal(block_scale.view(torch.uint8), ref.block_scale.view(torch.uint8))
    assert torch.equal(decoded, dequantize(ref.packed, ref.block_scale, 0.001, torch.float32))


def test_e4m3_casts():
    values = torch.tensor([1.0, 448.0, 460.0, 464.0, 465.0, 1e6, -1e6, float("nan")])
    saturating = e4m3_cast(values, True).float()
    assert saturating[:7].tolist() == [1.0, 448.0, 448.0, 448.0, 448.0, 448.0, -448.0]
    assert torch.isnan(saturating[7])
    wrapped = e4m3_cast(values, False).float()
    assert wrapped[:4].tolist() == [1.0, 448.0, 448.0, 448.0]
    assert torch.isnan(wrapped[4:]).all()


def test_sweep_error_grows_and_nonsaturating_goes_nan(fresh_seed):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(fresh_seed))
    saturating = amplification_sweep(x, [1, 4, 64, 3977], saturating=True)
    errors = [row["relative_error"] for row in saturating]
    assert errors == sorted(errors) and errors[-1] > 10 * errors[0]
    assert all(row["nan_fraction"] == 0 for row in saturating)
    wrapped = amplification_sweep(x, [1, 3977], saturating=False)
    assert wrapped[0]["nan_fraction"] == 0 and wrapped[1]["nan_fraction"] > 0.5


def test_zero_padding_is_clean_and_uninitialised_padding_poisons(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    x = torch.randn(200, 80, generator=gen)  # K/16 = 5 scale columns, padded to 8; 200 rows padded to 256
    q = quantize(x)
    weight = torch.randn(24, 80, generator=gen)
    clean = emulated_blockscaled_gemm(q.packed, padded_scale_buffer(q.block_scale, "zero"), q.global_scale, weight)
    expected = dequantize(q.packed, q.block_scale, q.global_scale, torch.float32) @ weight.t()
    torch.testing.assert_close(clean[:200], expected, rtol=1e-5, atol=1e-4)
    assert not clean[200:].any()
    garbage = padded_scale_buffer(q.block_scale, "uninitialised", torch.Generator().manual_seed(fresh_seed + 1))
    padding_bytes = unswizzle_scales(garbage, 256, 128).view(torch.uint8)  # [256 rows, 8 scale columns]
    # about 1 in 128 random bytes is an E4M3 NaN; make sure valid row 3 holds one in its padded columns
    if not ((padding_bytes[3, 5:] & 0x7F) == 0x7F).any():
        flat = garbage.view(torch.uint8).clone()
        flat[scale_offset(3, 6, 5)] = 0x7F
        garbage = flat.view(torch.float8_e4m3fn)
        padding_bytes = unswizzle_scales(garbage, 256, 128).view(torch.uint8)
    poisoned = emulated_blockscaled_gemm(q.packed, garbage, q.global_scale, weight, packed_padding=torch.full((256, 64), 0x77, dtype=torch.uint8))
    # exactly the valid rows with a NaN byte among their padded scale columns are NaN (padding data is non-zero)
    nan_rows = ((padding_bytes[:200, 5:] & 0x7F) == 0x7F).any(dim=1)
    assert nan_rows[3] and torch.equal(torch.isnan(poisoned[:200]).any(dim=1), nan_rows), "a NaN byte in the padded scale columns reaches valid rows"
    assert not torch.isfinite(poisoned[200:]).all() or poisoned[200:].abs().max() > 0

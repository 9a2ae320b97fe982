"""fused_wqa_wkv with two weight_scale_2: strategies (a) max, (b) fold into block scales, (c) per-segment alpha."""
import pytest
import torch

from nvfp4lib.dual_scale import (
    STRATEGIES,
    Part,
    error_table,
    fold_block_scales,
    fuse,
    make_parts,
    prepared_weight_fp32,
    true_weight,
)
from nvfp4lib.formats import quantize
from nvfp4lib.ops.gemm import nvfp4_linear

SIZES, K, M = (96, 32), 256, 8
BF16_HALF_ULP = 2.0**-8  # bf16 keeps 8 significant bits: rounding moves a value by at most 2**-8 of itself


def assert_equal_to_bf16_rounding(out: torch.Tensor, reference_fp32: torch.Tensor):
    """out (bf16) is reference_fp32 rounded once to bf16, up to fp32 summation-order noise."""
    noise = 1e-5 * float(reference_fp32.abs().max())
    excess = (out.float() - reference_fp32).abs() - (BF16_HALF_ULP * reference_fp32.abs() + noise)
    assert float(excess.max()) <= 0, f"off by more than bf16 rounding: {float(excess.max())}"


@pytest.mark.parametrize("ratio", [1.0, 1.25, 2.0, 10.0, 1000.0, 0.37])
def test_segment_alpha_equals_each_part_dequantized_with_its_own_scale(fresh_seed, ratio):
    parts = make_parts(SIZES, K, (1.0, ratio))
    x = torch.randn(M, K, dtype=torch.bfloat16)
    prepared = fuse(parts, "segment_alpha")
    assert prepared.segment_sizes == SIZES
    assert torch.equal(prepared_weight_fp32(prepared), true_weight(parts)), "the decoded weight is exact"
    out = nvfp4_linear(x, prepared)
    assert_equal_to_bf16_rounding(out, x.float() @ true_weight(parts).t())


@pytest.mark.parametrize("ratio", [1.25, 2.0, 10.0, 1000.0])
def test_max_decodes_the_smaller_part_ratio_times_too_large(fresh_seed, ratio):
    parts = make_parts(SIZES, K, (1.0, ratio))
    x = torch.randn(M, K, dtype=torch.bfloat16)
    truth = true_weight(parts)
    decoded = prepared_weight_fp32(fuse(parts, "max"))
    n_q = SIZES[0]
    measured = float(parts[1].weight_scale_2 / parts[0].weight_scale_2)
    torch.testing.assert_close(decoded[:n_q], truth[:n_q] * measured, rtol=1e-6, atol=0)
    assert torch.equal(decoded[n_q:], truth[n_q:]), "the part owning the max scale is untouched"
    out = nvfp4_linear(x, fuse(parts, "max"))
    assert_equal_to_bf16_rounding(out[:, :n_q], measured * (x.float() @ truth[:n_q].t()))


def test_all_strategies_agree_when_the_scales_are_equal(fresh_seed):
    parts = make_parts(SIZES, K, (1.0, 1.0))
    assert float(parts[0].weight_scale_2) == float(parts[1].weight_scale_2)
    decoded = [prepared_weight_fp32(fuse(parts, s)) for s in STRATEGIES]
    for other in decoded[1:]:
        assert torch.equal(other, decoded[0])


def test_fold_is_exact_for_a_power_of_two_ratio_above_the_subnormals(fresh_seed):
    # plain Gaussian rows (row_spread 0): every block scale sits far above 2**-5 (log-normal rows can, once
    # in ~300k draws, put one below it, and then halving it is not exact)
    parts = make_parts(SIZES, K, (1.0, 2.0), row_spread=0.0)
    assert float(parts[0].weight_scale.float().min()) >= 2.0**-5, "halving stays a normal E4M3 number"
    assert torch.equal(prepared_weight_fp32(fuse(parts, "fold")), true_weight(parts))


def test_fold_rounds_block_scales_to_e4m3_at_other_ratios(fresh_seed):
    parts = make_parts(SIZES, K, (1.0, 1.25), row_spread=0.0)  # normal block scales: the 2**-4 bound below holds
    n_q = SIZES[0]
    decoded = prepared_weight_fp32(fuse(parts, "fold"))[:n_q]
    truth = true_weight(parts)[:n_q]
    nonzero = truth != 0
    relative = ((decoded - truth).abs()[nonzero] / truth.abs()[nonzero])
    assert float(relative.max()) > 0, "1/1.25 is not a power of two: some block scales must round"
    # re-rounding a block scale to E4M3 moves it by at most half a step: 2**-4 of itself for normals
    assert float(relative.max()) <= 2.0**-4 * (1 + 1e-6)


def test_fold_underflows_small_block_scales_at_large_ratios(fresh_seed):
    data = torch.randn(64, K).clamp(-4, 4)
    data[-1, -1] = 4.0  # the tensor amax is exactly 4, so the block scales below are bounded
    data[:8, :16] *= 1e-3  # eight blocks with tiny amax: block scale <= 0.004 * 448 / 4 = 0.448, < 2**-10 after / 1000
    data[8:16, :16] *= 0.03  # eight with small amax: block scale <= 13.44, subnormal (< 2**-6) after / 1000
    amax = data.abs().amax()
    small = quantize(data, amax / 2688)
    large = quantize(torch.randn(32, K) * 1000 * amax / 4, 1000 * amax / 2688)
    parts = [Part(small.packed, small.block_scale, small.global_scale), Part(large.packed, large.block_scale, large.global_scale)]
    prepared = fuse(parts, "fold")
    folded = prepared.block_scale[:64].float()
    assert torch.all(folded[:8, 0] == 0), "scales below 2**-10 after dividing by 1000 flush to zero"
    decoded = prepared_weight_fp32(prepared)
    assert torch.all(decoded[:8, :16] == 0), "those blocks decode to zero"
    assert float(true_weight(parts)[:8, :16].abs().max()) > 0
    # the others survive; the small ones as coarse subnormals (< 2**-6, steps of 2**-9)
    assert bool((folded[8:] > 0).all())
    assert bool((folded[8:16, 0] < 2.0**-6).all())


def test_fold_block_scales_rounding_and_saturation():
    block = torch.tensor([448.0, 1.0, 2.0**-6, 0.5]).to(torch.float8_e4m3fn)
    assert fold_block_scales(block, 0.5).float().tolist() == [224.0, 0.5, 2.0**-7, 0.25]
    assert fold_block_scales(block, 2.0**-10).float().tolist()[2] == 0.0  # 2**-16 underflows
    assert fold_block_scales(block, 4.0).float().tolist()[0] == 448.0  # saturates, never NaN
    with pytest.raises(ValueError, match="positive"):
        fold_block_scales(block, 0.0)


def test_fuse_rejects_bad_input(fresh_seed):
    parts = make_parts(SIZES, K, (1.0, 2.0))
    with pytest.raises(ValueError, match="unknown strategy 'mean'"):
        fuse(parts, "mean")
    other = make_parts((16,), 2 * K, (1.0,))[0]
    with pytest.raises(ValueError, match=r"part 1: weight \(16, 256\) must be \[N_i, 128\]"):
        fuse([parts[0], other])
    with pytest.raises(ValueError, match="at least one part"):
        fuse([])


def test_error_table_orders_the_strategies():
    # row_spread 2: row magnitudes spread over ~e**8, so small rows have block scales near E4M3's bottom
    rows = error_table(ratios=(1.0, 1.25, 2.0, 10.0, 1000.0), sizes=SIZES, k=K, m=M, row_spread=2.0)
    assert len(rows) == 15
    by = {(r["ratio"], r["strategy"]): r for r in rows}
    for ratio in (1.0, 1.25, 2.0, 10.0, 1000.0):
        c = by[(ratio, "segment_alpha")]
        assert c["weight_err_wq_a"] == 0 and c["weight_err_wkv"] == 0
        assert c["output_err"] < BF16_HALF_ULP, "only the final bf16 rounding"
        a = by[(ratio, "max")]
        assert a["weight_err_wq_a"] == pytest.approx(a["measured_ratio"] - 1, rel=1e-5, abs=1e-7)
        assert a["weight_err_wkv"] == 0
        b = by[(ratio, "fold")]
        assert b["weight_err_wkv"] == 0
    for ratio in (1.25, 10.0, 1000.0):
        # not a power of two: every block scale of wq_a is rounded again to 3 mantissa bits
        assert 2.0**-6 < by[(ratio, "fold")]["weight_err_wq_a"] < 2.0**-4
    # halving is exact except for the few scales in [2**-6, 2**-5) with an odd mantissa (subnormal after)
    assert by[(2.0, "fold")]["weight_err_wq_a"] < 1e-4 and by[(2.0, "fold")]["zero_block_scales"] == 0
    # at 1000 the blocks of small rows underflow: those channels lose most of their weight
    assert by[(1000.0, "fold")]["zero_block_scales"] > 0
    assert by[(1000.0, "fold")]["worst_row_err_wq_a"] > 0.5 > by[(10.0, "fold")]["worst_row_err_wq_a"]
    assert by[(1000.0, "max")]["output_err_wq_a"] > 100
